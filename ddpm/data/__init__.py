"""The data layer: sources -> WebDataset tar shards + ``manifest.json`` -> training batches.

Shards live in one folder per split on any fsspec storage (local path, ``file://``, ``s3://``)::

    {url}/{prefix}-000000.tar, {prefix}-000001.tar, ...   # {key}.png (uint8, as is) + {key}.cls
    {url}/manifest.json                                   # written last; the only list readers use

Images are stored as they are (uint8 PNG, grey or RGB, no resizing) with their label where the source
has one; the paper's unconditional models ignore them, class-conditional ones (``model.num_classes``)
train on them (:func:`check_labels` says whether a split can).

- :mod:`ddpm.data.sources`: ``digits``, image folders, ``.npy``/``.npz`` arrays, the CIFAR-10 archive.
- :mod:`ddpm.data.shards`: :func:`write_shards` (atomic per shard, idempotent, manifest last).
- :mod:`ddpm.data.manifest`: :func:`read_manifest`, :func:`resolve_split`, :func:`check_labels`.
- :mod:`ddpm.data.reader`: :class:`ShardLoader` (per-rank training stream, pad-by-wrap-around
  coverage, resumable), :func:`load_split`, :func:`to_float` (its inverse, to level indices, is
  :func:`ddpm.image.to_levels`).
- :mod:`ddpm.data.wds`: :func:`as_webdataset`, the same shards as a standard ``webdataset`` pipeline of
  ``(x, label)`` for users' own loops and tools (local or ``s3://``; no exact coverage, no resume).
- :mod:`ddpm.data.storage`: fsspec opening, s3 endpoint from the environment, atomic writes.

Names are imported lazily, so ``import ddpm.data`` pulls in neither PIL, fsspec, webdataset nor
scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "ddpm.data.storage",
    "SourceError": "ddpm.data.storage",
    "open_fs": "ddpm.data.storage",
    "storage_options_for": "ddpm.data.storage",
    "Sample": "ddpm.data.sources",
    "Skip": "ddpm.data.sources",
    "Source": "ddpm.data.sources",
    "open_source": "ddpm.data.sources",
    "write_shards": "ddpm.data.shards",
    "WriteResult": "ddpm.data.shards",
    "read_manifest": "ddpm.data.manifest",
    "resolve_split": "ddpm.data.manifest",
    "check_labels": "ddpm.data.manifest",
    "ShardLoader": "ddpm.data.reader",
    "load_split": "ddpm.data.reader",
    "to_float": "ddpm.data.reader",
    "as_webdataset": "ddpm.data.wds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddpm.data' has no attribute {name!r}")
