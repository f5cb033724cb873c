"""Writing WebDataset tar shards and their manifest.

A shard ``{prefix}-{000000..}.tar`` holds, per sample, ``{key}.cls`` (the label as ASCII digits) where
the source has a label and ``{key}.png`` (the uint8 image as it is: grey or RGB, no rescaling).
Shards are written by ``webdataset.TarWriter`` (a sample's members in sorted order of their
extensions), deterministically (fixed mtime, owner and mode; PNG at a fixed compression level), so
the same data gives the same bytes and the same sha256.

Guarantees:

1. Each shard is written atomically (:func:`ddpm.data.storage.atomic_write`): a reader never sees half
   of one.
2. ``manifest.json`` is written last; readers only use shards it lists.
3. Re-running is idempotent: a shard whose existing bytes hash to the new sha256 is not rewritten, and
   an unchanged manifest is not rewritten. Before the first shard that *changes*, the old manifest is
   deleted, so no reader pairs an old manifest with new shards.
4. Samples the source cannot provide are counted and reported (``skipped`` in the manifest), never
   dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ddpm.data.manifest import FORMAT, MANIFEST, VERSION, dumps, image_hash
from ddpm.data.sources import Sample, Skip, Source
from ddpm.data.storage import DataError, SourceError, atomic_write, check_name, join, open_fs
from ddpm.image import png_bytes

MAX_REPORTED_SKIPS = 20  # reasons kept in the manifest; the count is always exact


@dataclass
class WriteResult:
    url: str
    manifest: dict[str, Any]
    shards_written: int = 0
    shards_unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic WebDataset tar of ``(name, data)`` members, written by ``webdataset.TarWriter``.

    Consecutive members sharing a key (the name up to its first dot) form one sample, written with
    its members in sorted order of their extensions (TarWriter's order). USTAR, mtime 0, mode 0444,
    owner 0/0 with empty names: no bytes depend on when or by whom the tar was written.
    """
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
        for key, sample in itertools.groupby(members, key=lambda member: member[0].partition(".")[0]):
            parts = {name.partition(".")[2]: data for name, data in sample}
            if "" in parts:
                raise ValueError(f"tar member {key!r} has no extension (WebDataset names are key.ext)")
            tar.write({"__key__": key, **parts})
    return buf.getvalue()


def _sha256_of(fs: Any, path: str) -> str | None:
    try:
        with fs.open(path, "rb") as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
    except FileNotFoundError:
        return None


class _Writer:
    def __init__(self, fs: Any, root: str, prefix: str):
        self.fs, self.root, self.prefix = fs, root, prefix
        self.manifest_path = join(root, MANIFEST)
        self.old_manifest_removed = False
        self.written = self.unchanged = 0

    def flush(self, index: int, members: list[tuple[str, bytes]], count: int) -> dict[str, Any]:
        name = f"{self.prefix}-{index:06d}.tar"
        data = build_tar(members)
        digest = hashlib.sha256(data).hexdigest()
        path = join(self.root, name)
        if _sha256_of(self.fs, path) == digest:
            self.unchanged += 1
        else:
            if not self.old_manifest_removed and self.fs.exists(self.manifest_path):
                self.fs.rm_file(self.manifest_path)  # the old manifest no longer matches the shards
            self.old_manifest_removed = True
            atomic_write(self.fs, path, data)
            self.written += 1
        return {"name": name, "num_samples": count, "sha256": digest, "size": len(data)}


@dataclass
class _Accepted:
    """What the samples written so far have in common, and what was skipped."""

    levels: int
    shape: tuple[int, ...] | None = None
    lo: int = 255
    hi: int = 0
    has_label: int = 0
    no_label: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # image_hash of each accepted image, in order

    def members(self, item: Sample | Skip) -> list[tuple[str, bytes]]:
        """The tar members of one sample (its PNG, and its label), or none when it is skipped (why:
        :attr:`skipped`). All images must share the first one's shape and lie in ``[0, levels)``."""
        if isinstance(item, Skip):
            self.skipped.append((item.key, item.reason))
            return []
        key, image, label = item
        check_name(key, "sample key")
        if "." in key:
            raise DataError(f"sample key {key!r} contains a dot (WebDataset splits keys at the first dot)")
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            self.skipped.append((key, f"image {image.shape} {image.dtype}; expected uint8 H x W x 1 or 3"))
            return []
        if self.shape is None:
            self.shape = image.shape
        elif image.shape != self.shape:
            self.skipped.append((key, f"shape {image.shape} differs from the first sample's {self.shape}"))
            return []
        if int(image.max()) >= self.levels:
            self.skipped.append((key, f"value {int(image.max())} >= levels={self.levels}"))
            return []
        self.lo, self.hi = min(self.lo, int(image.min())), max(self.hi, int(image.max()))
        self.hashes.append(image_hash(image))
        if label is None:
            self.no_label += 1
            return [(f"{key}.png", png_bytes(image))]
        self.has_label += 1
        return [(f"{key}.png", png_bytes(image)), (f"{key}.cls", str(int(label)).encode())]


def write_shards(
    samples: Source | Iterable[Sample | Skip],
    url: str,
    *,
    shard_size: int = 1000,
    source: str | None = None,
    split: str | None = None,
    levels: int | None = None,
    classes: list[str] | None = None,
    prefix: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool | None = None,
    split_rule: dict[str, Any] | None = None,
) -> WriteResult:
    """Write ``samples`` as shards plus ``manifest.json`` into the folder ``url``.

    ``samples`` is a :class:`~ddpm.data.sources.Source` (name, split, levels and classes are taken from
    it) or any iterable of ``Sample``/``Skip`` with those given as arguments. ``prefix`` defaults to
    the split. ``progress``: a tqdm bar on stderr (None: only when stderr is a terminal).
    ``split_rule``: how the images were assigned to this split, recorded in the manifest (a Source's own).
    """
    from tqdm.auto import tqdm

    if isinstance(samples, Source):
        source = source or samples.name
        split = split or samples.split
        levels = levels or samples.levels
        classes = classes if classes is not None else samples.classes
        split_rule = split_rule or samples.split_rule
        total = samples.num_samples
    else:
        total = None
    if source is None or split is None or levels is None:
        raise ValueError("source, split and levels are needed when samples is not a Source")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    prefix = check_name(prefix or split, "shard prefix")

    fs, root = open_fs(url, storage_options)  # no makedirs: on s3 it would create a missing bucket
    writer = _Writer(fs, root, prefix)
    accepted = _Accepted(levels)
    shards: list[dict[str, Any]] = []
    members: list[tuple[str, bytes]] = []
    count = 0
    bar = tqdm(total=total, desc=f"shards -> {url}", unit="img", disable=None if progress is None else not progress)
    for item in samples:
        bar.update(1)
        new = accepted.members(item)
        if not new:
            continue
        members += new
        count += 1
        if count == shard_size:
            shards.append(writer.flush(len(shards), members, count))
            members, count = [], 0
    if count:
        shards.append(writer.flush(len(shards), members, count))
    bar.close()
    if not shards:
        skipped = accepted.skipped
        reason = f"; first skip: {skipped[0][1]}" if skipped else ""
        raise SourceError(f"source {source!r} ({split}) gave no usable samples ({len(skipped)} skipped{reason})")
    data = dumps(_manifest(source, split, levels, classes, accepted, shards, split_rule))
    try:
        same = fs.cat_file(writer.manifest_path) == data
    except FileNotFoundError:
        same = False
    if not same:
        atomic_write(fs, writer.manifest_path, data)
    return WriteResult(url, json.loads(data), writer.written, writer.unchanged, accepted.skipped)


def _manifest(source: str, split: str, levels: int, classes: list[str] | None, accepted: _Accepted,
              shards: list[dict[str, Any]], split_rule: dict[str, Any] | None) -> dict[str, Any]:
    height, width, channels = accepted.shape
    labelled = accepted.no_label == 0
    return {
        **({"split_rule": split_rule} if split_rule else {}),
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "split": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shape": [channels, height, width],
        "dtype": "uint8",
        "levels": levels,
        "value_range": [0, levels - 1],
        "observed_range": [accepted.lo, accepted.hi],
        "labels": labelled,
        "classes": classes if labelled else None,
        "skipped": {"count": len(accepted.skipped),
                    "first": [list(s) for s in accepted.skipped[:MAX_REPORTED_SKIPS]]},
        "shards": shards,
        "image_hashes": accepted.hashes,
    }
