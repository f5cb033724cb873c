"""Training data on the driver: where the shards are (:func:`resolve_data`), whether they fit the model
(:func:`check_data`), and `ddpm-pipe data prepare`: a data source -> WebDataset shards + manifest on any
fsspec URL.

The output folder follows the rule of every writing command (``pipelines/storage/outputs.py``): it must be
new, empty, or hold only this split's shards (``{split}-NNNNNN.tar``), its ``manifest.json`` (ours:
format ``ddpm-pipe/webdataset``) and their temporaries; anything else is refused (exit 3),
untouched. One job writes it at a time. After a successful run, what earlier runs left there is
removed: temporaries of interrupted runs (their process gone) and shards the new manifest does not
list (an earlier, larger run's).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fsspec import AbstractFileSystem

from ddpm.config import ExperimentConfig
from ddpm.data.manifest import FORMAT, MANIFEST, read_manifest
from ddpm.data.shards import write_shards
from ddpm.data.sources import open_source
from ddpm.data.storage import DataError, SourceError, is_local, open_fs, storage_options_for
from pipelines.console import info
from pipelines.errors import PipelineError, RefusedError, UsageError
from pipelines.settings import Settings, redact, resolve
from pipelines.storage.lock import FolderLock
from pipelines.storage.outputs import TEMP, listing, refuse_foreign, remove_stale_temporaries


# -- where the training and held-out shards are, and whether they fit ----------------------------
def resolve_data(cfg: ExperimentConfig, data: str | None, settings: Settings) -> tuple[str, str | None]:
    """The training shard URL and the held-out split URL; prepares the embedded default if missing."""
    url = data or cfg.data.url or settings.data_url(cfg.data.source, "train")
    holdout = cfg.data.holdout_url or None
    if not data and not cfg.data.url:
        ensure_prepared(cfg.data.source, url, split="train")
        holdout = holdout or settings.data_url(cfg.data.source, "test")
        ensure_prepared(cfg.data.source, holdout, split="test")
    elif holdout is None:
        sibling = url.rstrip("/").rsplit("/", 1)[0] + "/test" if url.rstrip("/").endswith("/train") else None
        holdout = sibling if sibling and manifest_exists(sibling) else None
    return url, holdout


def manifest_exists(url: str) -> bool:
    try:
        read_manifest(url)
        return True
    except Exception:
        return False


def check_data(url: str, cfg: ExperimentConfig) -> None:
    """Fail before any run or worker starts when the shards are missing, empty, incomplete or do not
    fit the model (a worker would find out only after Ray had restarted it ``max_failures`` times).
    Local shards are also hashed against the manifest (cheap: a local read); shards in an object
    store are hashed by the worker that reads them, whose error is not retried (pipelines/train/failures.py)."""
    options = storage_options_for(url)
    try:
        manifest = read_manifest(url, options)
        fs, root = open_fs(url, options)
        sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("size") for p in fs.ls(root, detail=True)}
    except (DataError, OSError) as e:
        raise UsageError(f"data {url}: {e}") from e
    want = [cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size]
    if manifest["shape"] != want:
        raise UsageError(f"data {url}: images are [C, H, W] = {manifest['shape']} but the model takes {want} "
                         "(model.in_channels, model.image_size)")
    if manifest["levels"] != cfg.data.levels:
        raise UsageError(f"data {url}: {manifest['levels']} pixel levels but data.levels={cfg.data.levels}")
    for entry in manifest["shards"]:
        name, size = entry["name"], entry.get("size")
        if name not in sizes:
            raise UsageError(f"data {url}: shard {name} is listed in the manifest but missing")
        if size is not None and sizes[name] != size:
            raise UsageError(f"data {url}: shard {name} has {sizes[name]} bytes, the manifest says {size} "
                             "(truncated or replaced)")
        if is_local(fs):
            digest = hashlib.sha256()
            with open(f"{root}/{name}", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                raise UsageError(f"data {url}: shard {name} does not match its sha256 in the manifest "
                                 "(changed or corrupt); prepare the data again")


def ensure_prepared(source: str, url: str, split: str) -> None:
    """Write the shards of ``source`` to ``url`` unless a manifest is already there."""
    if not manifest_exists(url):
        info(f"[data] preparing {source} ({split}) -> {url}")
        prepare_command(source=source, out=url, split=split)



# -- `ddpm-pipe data prepare` ---------------------------------------------------------------------
def prepare_command(source: str = "digits", out: str | None = None, shard_size: int = 1000,
                    split: str = "train", endpoint_url: str | None = None) -> dict[str, Any]:
    """Write ``source``'s ``split`` as shards into ``out`` (default ``DDPM_HOME/data/<source>/<split>``).

    Returns the manifest's main fields, the shard counts (written / unchanged), the skipped samples
    and a one-line ``message``.
    """
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


def _check_ours(fs: AbstractFileSystem, root: str, url: str, shard_name: re.Pattern) -> None:
    """Refuse (exit 3) a folder holding anything but this split's shards and our manifest."""
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


def _clean_leftovers(fs: AbstractFileSystem, root: str, url: str, shard_name: re.Pattern,
                    manifest: dict[str, Any]) -> list[str]:
    """After a successful run: remove shards the manifest does not list and dead runs' temporaries."""
    listed = {s["name"] for s in manifest["shards"]}
    names = listing(fs, root, url)
    removed = []
    for name in names:
        if shard_name.match(name) and name not in listed:
            fs.rm(f"{root}/{name}")
            removed.append(name)
    temporaries = [n for n in names if (m := TEMP.match(n)) and (m["name"] == MANIFEST or shard_name.match(m["name"]))]
    return removed + remove_stale_temporaries(fs, root, temporaries)
