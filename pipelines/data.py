"""`ddpm-pipe data prepare`: a data source -> WebDataset shards + manifest on any fsspec URL.

The output folder follows the rule of every writing command (``pipelines/outputs.py``): it must be
new, empty, or hold only this split's shards (``{split}-NNNNNN.tar``), its ``manifest.json`` (ours:
format ``ddpm-pipe/webdataset``) and their temporaries; anything else is refused (exit 3),
untouched. One job writes it at a time. After a successful run, what earlier runs left there is
removed: temporaries of interrupted runs (their process gone) and shards the new manifest does not
list (an earlier, larger run's).
"""

from __future__ import annotations

import re
from typing import Any

from pipelines.errors import PipelineError, RefusedError, UsageError


def prepare_command(source: str = "digits", out: str | None = None, shard_size: int = 1000,
                    split: str = "train", endpoint_url: str | None = None) -> dict[str, Any]:
    """Write ``source``'s ``split`` as shards into ``out`` (default ``DDPM_HOME/data/<source>/<split>``).

    Returns the manifest's main fields, the shard counts (written / unchanged), the skipped samples
    and a one-line ``message``.
    """
    from ddpm.data.shards import write_shards
    from ddpm.data.sources import open_source
    from ddpm.data.storage import DataError, SourceError, open_fs, storage_options_for
    from pipelines.outputs import FolderLock
    from pipelines.settings import resolve, redact

    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    endpoint = endpoint_url or None
    try:
        src = open_source(source, split, storage_options_for(source, endpoint))
        url = out or resolve().data_url(src.name, split)
        fs, root = open_fs(url, storage_options_for(url, endpoint))
        shard_name = re.compile(rf"^{re.escape(split)}-[0-9]{{6}}\.tar$")
        _check_ours(fs, root, url, shard_name)
        with FolderLock(fs, root, url, "data prepare"):
            result = write_shards(src, url, shard_size=shard_size,
                                  storage_options=storage_options_for(url, endpoint))
            removed = _clean_leftovers(fs, root, url, shard_name, result.manifest)
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
    if removed:
        message += f"; removed {len(removed)} leftover file(s) of earlier runs"
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
        "removed": removed,
    }


def _check_ours(fs: Any, root: str, url: str, shard_name: re.Pattern) -> None:
    """Refuse (exit 3) a folder holding anything but this split's shards and our manifest."""
    import json

    from ddpm.data.manifest import FORMAT, MANIFEST
    from pipelines.outputs import listing, refuse_foreign

    names = listing(fs, root, url)
    refuse_foreign(url, names, lambda n: n == MANIFEST or bool(shard_name.match(n)), "shards of this split")
    if MANIFEST in names:
        try:
            ours = json.loads(fs.cat_file(f"{root}/{MANIFEST}")).get("format") == FORMAT
        except (ValueError, AttributeError):
            ours = False
        if not ours:
            raise RefusedError(f"output {url!r} holds a {MANIFEST} that is not a {FORMAT} manifest; "
                               "choose an empty or new folder")


def _clean_leftovers(fs: Any, root: str, url: str, shard_name: re.Pattern, manifest: dict[str, Any]) -> list[str]:
    """After a successful run: remove shards the manifest does not list and dead runs' temporaries."""
    from ddpm.data.manifest import MANIFEST
    from pipelines.outputs import TEMP, listing, remove_stale_temporaries

    listed = {s["name"] for s in manifest["shards"]}
    names = listing(fs, root, url)
    removed = []
    for name in names:
        if shard_name.match(name) and name not in listed:
            fs.rm(f"{root}/{name}")
            removed.append(name)
    temporaries = [n for n in names if (m := TEMP.match(n)) and (m["name"] == MANIFEST or shard_name.match(m["name"]))]
    return removed + remove_stale_temporaries(fs, root, temporaries)
