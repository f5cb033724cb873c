"""`ddpm-pipe data prepare`: a data source -> WebDataset shards + manifest on any fsspec URL."""

from __future__ import annotations

from typing import Any

from pipelines.errors import PipelineError, UsageError


def prepare_command(source: str = "digits", out: str | None = None, shard_size: int = 1000,
                    split: str = "train", endpoint_url: str | None = None) -> dict[str, Any]:
    """Write ``source``'s ``split`` as shards into ``out`` (default ``DDPM_HOME/data/<source>/<split>``).

    Returns the manifest's main fields, the shard counts (written / unchanged), the skipped samples
    and a one-line ``message``.
    """
    from ddpm.data.shards import write_shards
    from ddpm.data.sources import open_source
    from ddpm.data.storage import DataError, SourceError, storage_options_for
    from pipelines.settings import resolve, redact

    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    endpoint = endpoint_url or None
    try:
        src = open_source(source, split, storage_options_for(source, endpoint))
        url = out or resolve().data_url(src.name, split)
        result = write_shards(src, url, shard_size=shard_size,
                              storage_options=storage_options_for(url, endpoint))
    except SourceError as e:
        raise UsageError(redact(str(e))) from None
    except DataError as e:
        raise PipelineError(redact(str(e))) from None
    m = result.manifest
    skipped = len(result.skipped)
    message = (f"{m['num_samples']} {split} samples of {src.name} ({'x'.join(map(str, m['shape']))}, "
               f"{m['levels']} levels) in {len(m['shards'])} shards at {url}: "
               f"{result.shards_written} written, {result.shards_unchanged} unchanged")
    if skipped:
        message += f"; {skipped} samples skipped, first: {result.skipped[0][1]}"
    return {
        "message": message,
        "url": url,
        "manifest": f"{url.rstrip('/')}/manifest.json",
        "source": src.name,
        "split": split,
        "num_samples": m["num_samples"],
        "num_shards": len(m["shards"]),
        "shape": m["shape"],
        "levels": m["levels"],
        "labels": m["labels"],
        "shards_written": result.shards_written,
        "shards_unchanged": result.shards_unchanged,
        "skipped": skipped,
        "skipped_first": [list(s) for s in result.skipped[:20]],
    }
