"""``manifest.json``: the list of shards a reader uses (never a directory listing).

A manifest is written last, after every shard it lists is complete. Its fields::

    format        "ddpm-pipe/webdataset"     version   1
    source        "digits", "cifar10", a file or folder name
    split         "train" or "test"
    num_samples   total over the shards
    shape         [C, H, W] of every image (stored as H x W (x C) uint8 PNG)
    dtype         "uint8"
    levels        pixel levels (17 for digits, 256 for 8-bit images); values lie in [0, levels - 1]
    value_range   [0, levels - 1]            observed_range  [min, max] seen while writing
    labels        true when every sample has a ``.cls`` label     classes  class names or null
    skipped       samples the source could not provide (counted, with the first reasons)
    shards        [{"name": "train-000000.tar", "num_samples": 1000, "sha256": "...", "size": bytes}]
    image_hashes  one content hash per image, in shard order (:func:`image_hash`): what
                  :func:`shared_images` compares to find images in both splits (absent in
                  manifests written before it; their overlap cannot be checked)
    split_rule    how the source assigned images to this split, where it says (a carved split:
                  ``{"rule": ..., "test_fraction": 0.1, "seed": 0}``, see ``ddpm.data.sources.carve``)

It holds no timestamps, so writing the same data twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ddpm.data.retry import with_retries
from ddpm.data.storage import DataError, check_name, join, open_fs

FORMAT = "ddpm-pipe/webdataset"
VERSION = 1
MANIFEST = "manifest.json"
HASH_CHARS = 16  # hex characters kept of an image's sha256: 64 bits, no chance collision below ~10^9 images


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def validate(manifest: Any, where: str) -> dict[str, Any]:
    """Check a parsed manifest's fields; raise :class:`DataError` naming ``where`` and the problem."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{where}: manifest version {manifest.get('version')!r}, this reader knows {VERSION}")
    for key in ("shards", "num_samples", "shape", "levels", "split", "source"):
        if key not in manifest:
            raise DataError(f"{where}: manifest has no {key!r}")
    shape = manifest["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise DataError(f"{where}: shape must be [C, H, W], got {shape!r}")
    if shape[0] not in (1, 3):
        raise DataError(f"{where}: {shape[0]} channels; 1 (grey) or 3 (RGB) are supported")
    if not (isinstance(manifest["levels"], int) and 2 <= manifest["levels"] <= 256):
        raise DataError(f"{where}: levels must be in 2..256, got {manifest['levels']!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{where}: the manifest lists no shards (empty prefix?)")
    names = set()
    for entry in shards:
        check_name(entry.get("name"), f"{where}: shard")
        if not entry["name"].endswith(".tar"):
            raise DataError(f"{where}: shard {entry['name']!r} is not a .tar file")
        if entry["name"] in names:
            raise DataError(f"{where}: shard {entry['name']!r} is listed twice")
        names.add(entry["name"])
        n = entry.get("num_samples")
        if not (isinstance(n, int) and n > 0):
            raise DataError(f"{where}: shard {entry['name']} has num_samples={n!r}")
        if not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            raise DataError(f"{where}: shard {entry['name']} has no sha256 checksum")
    total = sum(e["num_samples"] for e in shards)
    if total != manifest["num_samples"]:
        raise DataError(f"{where}: shards hold {total} samples but num_samples={manifest['num_samples']}")
    return manifest


def image_hash(image: np.ndarray) -> str:
    """An image's content hash: sha256 over ``"HxWxC:"`` and its uint8 bytes (H x W x C, row-major),
    the first :data:`HASH_CHARS` hex characters. The same pixels give the same hash whatever the
    file, name or format they came from."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    image = image[:, :, None] if image.ndim == 2 else image
    head = "x".join(map(str, image.shape)).encode() + b":"
    return hashlib.sha256(head + image.tobytes()).hexdigest()[:HASH_CHARS]


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without ``image_hashes`` (the shards' sha256 already pin the same bytes): what a
    digest of the data hashes, so data prepared before the hashes were recorded keeps its digest."""
    return {k: v for k, v in manifest.items() if k != "image_hashes"}


def shared_images(train: dict[str, Any], test: dict[str, Any]) -> int | None:
    """How many of ``test``'s images are also in ``train`` (equal :func:`image_hash`); None when
    either manifest records no hashes (written before they were)."""
    if "image_hashes" not in train or "image_hashes" not in test:
        return None
    seen = set(train["image_hashes"])
    return sum(h in seen for h in test["image_hashes"])


def check_labels(manifest: dict[str, Any], num_classes: int, where: str | None = None) -> None:
    """Check that a split can train a model with ``num_classes`` classes (0: unconditional, no check).

    A class-conditional model needs every image's label (the manifest's ``labels``) and, where the
    manifest names its classes, no more of them than the model has.

    :param where: how errors name the split's location (its URL); the manifest's source by default.
    :raises DataError: naming the split and what is missing.
    """
    if not num_classes:
        return
    split, where = manifest.get("split", "?"), where or manifest.get("source", "the data")
    if not manifest.get("labels"):
        raise DataError(f"{where}: the {split!r} split has no labels (not every image has a .cls), but a "
                        f"class-conditional model (model.num_classes={num_classes}) trains on them; prepare "
                        "labelled data or set model.num_classes=0")
    classes = manifest.get("classes")
    if classes and len(classes) > num_classes:
        raise DataError(f"{where}: the {split!r} split has {len(classes)} classes but model.num_classes="
                        f"{num_classes} (labels must lie in [0, {num_classes})); set model.num_classes={len(classes)}")


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and validate ``{url}/manifest.json``."""
    fs, root = open_fs(url, storage_options)
    path = join(root, MANIFEST)
    try:  # a dropped request is retried (ddpm.data.retry); a missing manifest is not
        raw = with_retries(lambda: fs.cat_file(path), f"reading {url}/{MANIFEST}")
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST} at {url} (missing or empty prefix; run `ddpm-pipe data prepare`)") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{url}/{MANIFEST} is not valid JSON: {e}") from None
    return validate(manifest, f"{url}/{MANIFEST}")


def resolve_split(url: str, split: str, storage_options: dict[str, Any] | None = None) -> str:
    """The folder holding ``split``'s manifest, given a split folder or the dataset folder above it.

    Tried in order: ``{url}/{split}``; ``url`` itself if its manifest is of ``split``; the sibling
    ``{parent of url}/{split}`` (so the test split is found "next to" a train folder).
    """
    fs, root = open_fs(url, storage_options)
    url, root = url.rstrip("/"), root.rstrip("/")
    if fs.exists(join(join(root, split), MANIFEST)):
        return f"{url}/{split}"
    if not fs.exists(join(root, MANIFEST)):
        raise DataError(f"no {MANIFEST} at {url} or {url}/{split} (run `ddpm-pipe data prepare --split {split}`)")
    if read_manifest(url, storage_options).get("split") == split:
        return url
    if "/" in root and fs.exists(join(join(root.rsplit("/", 1)[0], split), MANIFEST)):
        return f"{url.rsplit('/', 1)[0]}/{split}"
    raise DataError(f"{url} holds another split and no {split!r} split is next to it")
