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
from ddpm.data.manifest import FORMAT, MANIFEST, check_labels, read_manifest, shared_images
from ddpm.data.shards import write_shards
from ddpm.data.retry import PERMANENT, with_retries
from ddpm.data.sources import Source, carve, open_source
from ddpm.data.storage import DataError, SourceError, is_local, open_fs, storage_options_for
from pipelines.console import info
from pipelines.errors import PipelineError, RefusedError, UsageError
from pipelines.settings import Settings, redact, resolve
from pipelines.storage.lock import FolderLock
from pipelines.storage.outputs import TEMP, listing, refuse_foreign, remove_stale_temporaries


# -- where the training and held-out shards are, and whether they fit ----------------------------
def resolve_data(cfg: ExperimentConfig, data: str | None, settings: Settings) -> tuple[str, str | None]:
    """The training shard URL and the held-out split URL; prepares the embedded default if missing.
    ``data`` is a split folder (its test split next to it) or a folder holding ``train/`` (and ``test/``)."""
    url = data or cfg.data.url or settings.data_url(cfg.data.source, "train")
    if not manifest_exists(url) and manifest_exists(f"{url.rstrip('/')}/train"):
        url = f"{url.rstrip('/')}/train"  # a dataset folder, as `data prepare --test-fraction` writes
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
    fit the model (its image shape and levels; a class-conditional model's labels, naming the split
    without them: :func:`ddpm.data.check_labels`) (a worker would find out only after Ray had restarted it ``max_failures`` times).
    Local shards are also hashed against the manifest (cheap: a local read); shards in an object
    store are hashed by the worker that reads them, whose error is not retried (pipelines/train/failures.py)."""
    options = storage_options_for(url)
    try:
        manifest = read_manifest(url, options)
        fs, root = open_fs(url, options)
        listing = with_retries(lambda: fs.ls(root, detail=True), f"listing {url}")
        sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("size") for p in listing}
    except (DataError, *PERMANENT) as e:  # the data is not there or not ours to read: bad input
        raise UsageError(f"data {url}: {e}") from e
    except OSError as e:  # the store still failing after the retries: a failure, not bad input
        raise PipelineError(f"data {url}: {e}; nothing was started, run the command again") from e
    want = [cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size]
    if manifest["shape"] != want:
        raise UsageError(f"data {url}: images are [C, H, W] = {manifest['shape']} but the model takes {want} "
                         "(model.in_channels, model.image_size)")
    if manifest["levels"] != cfg.data.levels:
        raise UsageError(f"data {url}: {manifest['levels']} pixel levels but data.levels={cfg.data.levels}")
    try:
        check_labels(manifest, cfg.model.num_classes, url)  # a class-conditional model needs every label
    except DataError as e:
        raise UsageError(str(e)) from None
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
                    split: str = "train", endpoint_url: str | None = None, test_fraction: float | None = None,
                    split_seed: int = 0) -> dict[str, Any]:
    """Write ``source``'s ``split`` as shards into ``out`` (default :meth:`~pipelines.settings.Settings.data_url`: ``DDPM_HOME/data/<source>/<split>`` on a local storage).

    With ``test_fraction``, carve a held-out split from the source's training split instead
    (:func:`ddpm.data.sources.carve`, seeded by ``split_seed``) and write both: ``out/train`` and
    ``out/test`` (default ``<data>/<source>/{train,test}``); the result then holds each
    split's under ``splits``.

    Returns the manifest's main fields, the shard counts (written / unchanged), the skipped samples
    and a one-line ``message``; a warning on stderr when the split written shares images with the
    other split next to it (:func:`warn_if_shared`).
    """
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if test_fraction is not None and split != "train":
        raise UsageError("--test-fraction writes both splits (carved from the source's train split); leave out --split")
    endpoint = endpoint_url or None
    try:
        if test_fraction is None:
            src = open_source(source, split, storage_options_for(source, endpoint))
            written = _write_split(src, out or resolve().data_url(src.name, split), shard_size, endpoint)
            _warn_sibling(written["url"], split)  # one source prepared twice, as train and as test
            return written
        whole = open_source(source, "train", storage_options_for(source, endpoint))
        carved = carve(whole, test_fraction, split_seed)
        base = out.rstrip("/") if out else None
        # The test split first: a fraction too small for the data fails before anything else is written.
        splits = {name: _write_split(carved[name], f"{base}/{name}" if base else resolve().data_url(whole.name, name),
                                     shard_size, endpoint) for name in ("test", "train")}
    except SourceError as e:
        raise UsageError(redact(str(e))) from None
    except DataError as e:
        raise PipelineError(redact(str(e))) from None
    train, test = splits["train"], splits["test"]
    total = train["num_samples"] + test["num_samples"]
    message = (f"carved {whole.name} with --test-fraction {test_fraction:g} (seed {split_seed}): "
               f"{test['num_samples']} of {total} images ({test['num_samples'] / total:.1%}) held out\n"
               f"  {train['message']}\n  {test['message']}")
    return {**train, "message": message, "url": train["url"].rsplit("/", 1)[0], "split": "train+test",
            "splits": {"train": train, "test": test}, "test_fraction": test_fraction, "split_seed": split_seed}


def _write_split(src: Source, url: str, shard_size: int, endpoint: str | None) -> dict[str, Any]:
    """One split of ``src`` as shards at ``url`` (the folder rule, locked), leftovers removed."""
    split = src.split
    fs, root = open_fs(url, storage_options_for(url, endpoint))
    shard_name = re.compile(rf"^{re.escape(split)}-[0-9]{{6}}\.tar$")
    _check_ours(fs, root, url, shard_name)
    with FolderLock(fs, root, url, "data prepare"):
        result = write_shards(src, url, shard_size=shard_size, storage_options=storage_options_for(url, endpoint))
        removed = _clean_leftovers(fs, root, url, shard_name, result.manifest)
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


# -- images in both splits -------------------------------------------------------------------------
def warn_if_shared(train: dict[str, Any], test: dict[str, Any], train_url: str, test_url: str,
                   who: str) -> int | None:
    """One warning line on stderr (``[who] warning: ...``) when the test split holds images of the
    training split (equal content hashes, recorded in the manifests); returns how many (None: a
    manifest written before hashes were recorded, nothing to compare)."""
    shared = shared_images(train, test)
    if shared:
        info(f"[{who}] warning: {shared} of {test['num_samples']} test images at {redact(test_url)} are also in "
             f"the training split at {redact(train_url)} (same pixels): held-out scores of a model trained on "
             "it measure memory, not generalisation; carve disjoint splits with `ddpm-pipe data prepare "
             "--source SOURCE --test-fraction 0.1`")
    return shared


def check_splits_disjoint(train_url: str, test_url: str, who: str) -> int | None:
    """:func:`warn_if_shared` for two split folders; None, and no word, when either manifest cannot
    be read (the command that reads the data reports that)."""
    try:
        train, test = (read_manifest(u, storage_options_for(u)) for u in (train_url, test_url))
    except (DataError, OSError, ValueError):
        return None
    return warn_if_shared(train, test, train_url, test_url, who)


def _warn_sibling(url: str, split: str) -> None:
    """After writing one split at ``url``: :func:`check_splits_disjoint` with the other split next to it."""
    if "/" not in url.rstrip("/"):
        return
    sibling = f"{url.rstrip('/').rsplit('/', 1)[0]}/{'test' if split == 'train' else 'train'}"
    if manifest_exists(sibling):
        check_splits_disjoint(*((url, sibling) if split == "train" else (sibling, url)), "data")


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
