"""The shards as a standard WebDataset pipeline, for users' own loops and tools.

:func:`as_webdataset` returns a ``webdataset.DataPipeline`` of ``(x, label)`` samples, built from
WebDataset's own stages: shard list -> split by node -> split by worker -> (shard shuffle) -> open
-> tar members (``tar_file_expander``) -> samples (``group_by_keys``) -> (sample shuffle) -> decode.
Only the opener is ours: WebDataset 1.0 opens URLs through ``gopen`` (also inside
``tarfile_to_samples`` and ``wds.WebDataset``), which has no ``s3://`` handler and one global table
of schemes, so shards are opened through fsspec with the pipeline's own storage options (what
WebDataset's maintainers suggest for stores it does not know: a pipeline with its own opening stage).

This is not the training reader. :class:`ddpm.data.reader.ShardLoader` gives exact coverage (every
sample once per epoch, the same number of batches on every rank), checks each shard's sha256 and
resumes mid-epoch; a WebDataset pipeline splits whole shards over ranks and workers (a rank can get
more samples than another, or none when there are fewer shards than ranks x workers) and does not
resume. See docs/DATA.md.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ddpm.data.manifest import read_manifest, resolve_split
from ddpm.data.reader import to_float
from ddpm.data.storage import DataError, join, open_fs, storage_options_for


class FsspecOpener:
    """A pipeline stage: ``{"url": u}`` -> ``{"url": u, "stream": <fsspec file open for reading>}``.

    Each file is closed when the next shard is asked for (the stage before reads a shard to its end
    first). Picklable (DataLoader workers): the file system is opened again in each process.
    """

    def __init__(self, storage_options: dict[str, Any]):
        self.storage_options = storage_options
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        import fsspec.core

        for sample in src:
            url = sample["url"]
            if self._fs is None:
                self._fs, _ = open_fs(url, self.storage_options)
            try:
                stream = self._fs.open(fsspec.core.strip_protocol(url), "rb")
            except FileNotFoundError:
                raise DataError(f"shard {url}: listed in the manifest but missing") from None
            with stream:
                yield {**sample, "stream": stream}


class Decode:
    """A pipeline stage: a WebDataset sample ``{"__key__", "png", "cls"?}`` -> ``(x, label)``.

    ``x``: float32 [C x H x W] in [-1, 1] (``v / (levels - 1) * 2 - 1``, as the training reader);
    ``label``: the ``.cls`` integer, -1 where the data has no labels.
    """

    def __init__(self, shape: list[int], levels: int):
        self.shape, self.levels = shape, levels

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        where = f"{sample.get('__url__', '?')}: sample {sample['__key__']!r}"
        if "png" not in sample:
            raise DataError(f"{where} has no .png")
        with Image.open(io.BytesIO(sample["png"])) as img:
            arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        c, h, w = self.shape
        if arr.shape != (h, w, c) or arr.dtype != np.uint8 or arr.max() >= self.levels:
            raise DataError(f"{where} is {arr.dtype} {arr.shape} (H x W x C) with max {arr.max()}; "
                            f"the manifest says [C, H, W] = {self.shape}, levels = {self.levels}")
        x = to_float(torch.from_numpy(arr.copy()).permute(2, 0, 1), self.levels)
        return x, int(sample["cls"]) if "cls" in sample else -1


def shard_urls(url: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The URLs of the shards ``{url}/manifest.json`` lists (never a directory listing), and the manifest."""
    manifest = read_manifest(url, storage_options)
    return [join(url.rstrip("/"), entry["name"]) for entry in manifest["shards"]], manifest


def as_webdataset(url: str, storage_options: dict[str, Any] | None = None, *, split: str | None = None,
                  shardshuffle: bool = False, shuffle: int = 0, seed: int = 0,
                  nodesplitter: Callable[..., Iterable[Any]] | None = None,
                  workersplitter: Callable[..., Iterable[Any]] | None = None) -> Any:
    """A ``webdataset.DataPipeline`` of ``(x, label)`` over the shard folder ``url`` (local or fsspec URL).

    ``x``: float32 [C x H x W] in [-1, 1]; ``label``: int, -1 where the data has no labels. One pass
    over the manifest's shards per iteration (add ``wds.repeatedly`` or iterate again for more).
    ``storage_options``: fsspec options; None reads the s3 endpoint from the environment now.
    ``split``: given, ``url`` may also be the dataset folder above the split.
    ``shardshuffle``: shuffle the shard order (seeded by ``seed``); ``shuffle``: a sample buffer of
    that many (0: none). ``nodesplitter`` / ``workersplitter``: WebDataset's, by default
    ``wds.split_by_node`` (shards dealt round-robin over torch.distributed ranks, or all shards when
    not distributed) and ``wds.split_by_worker`` (over DataLoader workers); pass ``wds.single_node_only``
    or your own. Batch with ``pipeline.append(wds.batched(n))`` or ``wds.WebLoader(pipeline, batch_size=n)``.
    """
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    options = storage_options_for(url) if storage_options is None else storage_options
    if split is not None:
        url = resolve_split(url, split, options)
    urls, manifest = shard_urls(url, options)
    stages: list[Any] = [wds.SimpleShardList(urls), nodesplitter or wds.split_by_node,
                         workersplitter or wds.split_by_worker]
    if shardshuffle:
        stages.append(wds.detshuffle(len(urls), seed=seed))
    stages += [FsspecOpener(options), tar_file_expander, group_by_keys]
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    stages.append(wds.map(Decode(manifest["shape"], manifest["levels"])))
    return wds.DataPipeline(*stages)
