"""Reading shards: :class:`ShardLoader` for training, :func:`load_split` for held-out evaluation.

Images are decoded from PNG to uint8 and mapped to float32 in [-1, 1] by :func:`to_float`
(``x = v / (levels - 1) * 2 - 1``; the paper's scaling for 8-bit data, ``levels = 256``). Labels (the
``.cls`` of each image, -1 where absent) come with the images when asked for (``return_labels``: a
class-conditional model); the paper's unconditional model takes images alone.

Order and coverage (one epoch of :class:`ShardLoader`, N samples, W ranks, batch B per rank)::

    1. G = the shards in a random order, each shard's samples in a random order
       (seeded by (seed, epoch): every rank computes the same G).
    2. S = ceil(N / (W * B)) batches per rank; the padded order P has L = S * W * B entries,
       P[i] = G[i mod N]   -- pad by wrap-around.
    3. Rank r takes the contiguous block P[r*S*B : (r+1)*S*B] (so it reads about 1/W of the shards),
       shuffles it within windows of ``shuffle_window`` samples (mixing several shards per batch),
       and cuts it into S batches of exactly B.
    4. Batch b of the rank goes to DataLoader worker b mod num_workers; the loader receives batches
       in order b = 0, 1, 2, ... whatever the number of workers.

Coverage rule: **pad by wrap-around**. Every rank yields exactly S batches of B per epoch (DDP never
waits on a rank with fewer batches); every sample is seen at least once per epoch; exactly L - N
(< W * B) extra draws repeat the first samples of G, so each sample is seen once or twice (more only
when N < W * B). Chosen over carrying the remainder because an epoch is then self-contained: it is a
pure function of (seed, epoch), which makes resuming and checking coverage exact and simple.

The position is ``(epoch, offset)`` (batches already delivered in that epoch), the same on every
rank; :meth:`ShardLoader.state_dict` / :meth:`ShardLoader.load_state_dict` save and restore it so a
resumed run continues the epoch. Random flips are drawn from (seed, epoch, rank, batch), so they too
resume exactly and do not depend on the number of workers.

A shard that is missing, corrupt, fails its sha256, holds a different number of samples than the
manifest says, or has an image of the wrong shape stops reading with an error naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch

from ddpm.data.manifest import read_manifest
from ddpm.data.storage import DataError, SAFE_NAME, join, open_fs, storage_options_for



def to_float(x: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 values 0..levels-1 -> float32 in [-1, 1]: ``v / (levels - 1) * 2 - 1``."""
    return x.to(torch.float32) * (2.0 / (levels - 1)) - 1.0


# -- one shard ----------------------------------------------------------------------------------
class Shard:
    """A shard read into memory: its sample keys, PNG bytes and labels (-1 where absent)."""

    def __init__(self, name: str, keys: list[str], pngs: list[bytes], labels: list[int]):
        self.name, self.keys, self.pngs, self.labels = name, keys, pngs, labels


def read_shard(fs: Any, root: str, entry: dict[str, Any], verify: bool = True) -> Shard:
    """Fetch and parse one shard listed in a manifest; raise :class:`DataError` naming it if bad."""
    name = entry["name"]
    from ddpm.data.retry import with_retries

    try:
        data = with_retries(lambda: fs.cat_file(join(root, name)), f"reading shard {name}")
    except FileNotFoundError:
        raise DataError(f"shard {name}: listed in the manifest but missing at {root}") from None
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"shard {name}: sha256 does not match the manifest (changed or truncated)")
    samples: OrderedDict[str, dict[str, bytes]] = OrderedDict()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not SAFE_NAME.match(member.name) or ".." in member.name:
                    raise DataError(f"shard {name}: member {member.name!r} is not a plain file name "
                                    "(path traversal is refused)")
                if not member.isfile():
                    raise DataError(f"shard {name}: member {member.name!r} is not a regular file")
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataError(f"shard {name}: corrupt tar ({e})") from None
    keys, pngs, labels = [], [], []
    for key, parts in samples.items():
        if "png" not in parts:
            raise DataError(f"shard {name}: sample {key!r} has no .png (members: {', '.join(parts)})")
        keys.append(key)
        pngs.append(parts["png"])
        try:
            labels.append(int(parts["cls"]) if "cls" in parts else -1)
        except ValueError:
            raise DataError(f"shard {name}: sample {key!r} has a non-integer .cls") from None
    if len(keys) != entry["num_samples"]:
        raise DataError(f"shard {name}: holds {len(keys)} samples, the manifest says {entry['num_samples']}")
    return Shard(name, keys, pngs, labels)


def decode(shard: Shard, index: int, shape: list[int], levels: int) -> np.ndarray:
    """Sample ``index`` of ``shard`` as uint8 H x W x C, checked against the manifest's [C, H, W]."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(shard.pngs[index])) as img:
            arr = np.asarray(img)
    except (OSError, ValueError) as e:
        raise DataError(f"shard {shard.name}: sample {shard.keys[index]!r} is not a readable PNG ({e})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c, h, w = shape
    if arr.shape != (h, w, c) or arr.dtype != np.uint8:
        raise DataError(f"shard {shard.name}: sample {shard.keys[index]!r} is {arr.dtype} {arr.shape} "
                        f"(H x W x C), the manifest says [C, H, W] = {shape}")
    if arr.max() >= levels:
        raise DataError(f"shard {shard.name}: sample {shard.keys[index]!r} has value {arr.max()} >= "
                        f"levels={levels}")
    return arr


# -- the epoch plan -----------------------------------------------------------------------------
def epoch_order(counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """G: (N, 2) rows (shard, position), shards in random order, each shard's samples shuffled."""
    rng = np.random.default_rng([seed, epoch])
    blocks = []
    for s in rng.permutation(len(counts)):
        pos = rng.permutation(counts[s])
        blocks.append(np.stack([np.full_like(pos, s), pos], axis=1))
    return np.concatenate(blocks)


def rank_plan(counts: list[int], seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
              shuffle_window: int) -> np.ndarray:
    """The (S * B, 2) rows (shard, position) rank ``rank`` reads in ``epoch``, in batch order."""
    order = epoch_order(counts, seed, epoch)
    n = len(order)
    per_rank = math.ceil(n / (world_size * batch_size)) * batch_size
    block = order[np.arange(rank * per_rank, (rank + 1) * per_rank) % n]
    for w, start in enumerate(range(0, per_rank, shuffle_window)):
        rng = np.random.default_rng([seed, epoch, rank, w])
        block[start:start + shuffle_window] = rng.permutation(block[start:start + shuffle_window])
    return block


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker side of :class:`ShardLoader`: yields ``(t, batch)`` for t = start + worker, += workers.

    ``t`` counts this rank's batches over all epochs (epoch = t // S, batch = t % S).
    """

    def __init__(self, url: str, manifest: dict[str, Any], storage_options: dict[str, Any], *, batch_size: int,
                 rank: int, world_size: int, seed: int, random_flip: bool, shuffle_window: int, verify: bool,
                 return_index: bool, return_labels: bool = False):
        super().__init__()
        self.url, self.manifest, self.storage_options = url, manifest, storage_options
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.random_flip, self.shuffle_window, self.verify = random_flip, shuffle_window, verify
        self.return_index, self.return_labels = return_index, return_labels
        self.counts = [e["num_samples"] for e in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # global index of each shard's first sample
        n = sum(self.counts)
        self.batches_per_epoch = math.ceil(n / (world_size * batch_size))
        # shards one shuffle window can span at most: the k smallest whose counts first reach the window,
        # plus the partial shards at its two ends; each worker keeps that many parsed (still encoded) shards
        smallest = np.cumsum(sorted(self.counts))
        self.cache_size = int(np.searchsorted(smallest, shuffle_window)) + 2
        self.start = 0
        self._fs: Any = None
        self._plan: tuple[int, np.ndarray] | None = None
        self._cache: OrderedDict[int, Shard] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _plan=None, _cache=OrderedDict())  # opened again in each worker
        return state

    def _shard(self, s: int) -> Shard:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        if self._fs is None:
            self._fs, self._root = open_fs(self.url, self.storage_options)
        shard = read_shard(self._fs, self._root, self.manifest["shards"][s], self.verify)
        self._cache[s] = shard
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return shard

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, rank_plan(self.counts, self.seed, epoch, self.rank, self.world_size,
                                           self.batch_size, self.shuffle_window))
        return self._plan[1]

    def batch(self, t: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        epoch, b = divmod(t, self.batches_per_epoch)
        rows = self.plan(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        shape, levels = self.manifest["shape"], self.manifest["levels"]
        images = np.stack([decode(self._shard(int(s)), int(p), shape, levels) for s, p in rows])
        x = to_float(torch.from_numpy(images).permute(0, 3, 1, 2), levels).contiguous()
        if self.random_flip:
            flip = np.random.default_rng([self.seed, epoch, self.rank, b, 1]).random(len(rows)) < 0.5
            x[torch.from_numpy(flip)] = x[torch.from_numpy(flip)].flip(-1)
        parts = [x]
        if self.return_labels:
            parts.append(torch.tensor([self._shard(int(s)).labels[int(p)] for s, p in rows], dtype=torch.int64))
        if self.return_index:
            parts.append(torch.from_numpy(self.offsets[rows[:, 0]] + rows[:, 1]))
        return parts[0] if len(parts) == 1 else tuple(parts)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        t = self.start + worker
        while True:
            yield t, self.batch(t)
            t += workers


class ShardLoader:
    """An endless, resumable, rank- and worker-aware stream of training batches.

    Build one per training rank (``rank`` of ``world_size``; ``batch_size`` is per rank). Iterating
    yields float32 tensors [B x C x H x W] in [-1, 1] forever, epoch after epoch; with
    ``return_labels`` also their int64 labels [B] (-1 where absent: see
    :func:`ddpm.data.manifest.check_labels`), then with ``return_index`` the samples' indices in
    manifest order (for tests), as one tuple. See the module
    docstring for the order and the coverage rule. Each ``iter()`` starts where the last batch
    delivered left off (or where :meth:`load_state_dict` put it).

    ``storage_options``: fsspec options; None reads the s3 endpoint from the environment now.
    ``shuffle_window``: samples shuffled together within a rank's block (bigger mixes more shards
    per batch; each worker keeps the shards of about one window in memory, still PNG-encoded).
    ``verify``: check each shard's sha256 when it is read.
    ``split``: given, ``url`` may also be the dataset folder above the split (see ``resolve_split``).
    ``num_workers`` > 0 uses a torch DataLoader (``multiprocessing_context``: its start method).
    """

    def __init__(self, url: str, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, random_flip: bool = False, storage_options: dict[str, Any] | None = None,
                 shuffle_window: int = 8192, verify: bool = True, return_index: bool = False,
                 return_labels: bool = False,
                 pin_memory: bool = False, prefetch_factor: int | None = None,
                 multiprocessing_context: str | None = None, split: str | None = None):
        from ddpm.data.manifest import resolve_split

        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size < 1 or num_workers < 0 or shuffle_window < 1:
            raise ValueError("batch_size and shuffle_window must be >= 1, num_workers >= 0")
        options = storage_options_for(url) if storage_options is None else storage_options
        self.url = (url if split is None else resolve_split(url, split, options)).rstrip("/")
        self.manifest = read_manifest(self.url, options)
        fs, root = open_fs(self.url, options)
        for entry in self.manifest["shards"]:
            if not fs.exists(join(root, entry["name"])):
                raise DataError(f"shard {entry['name']}: listed in {self.url}/manifest.json but missing")
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.stream = ShardStream(self.url, self.manifest, options, batch_size=batch_size, rank=rank,
                                  world_size=world_size, seed=seed, random_flip=random_flip,
                                  shuffle_window=shuffle_window, verify=verify, return_index=return_index,
                                  return_labels=return_labels)
        self._t = 0  # batches delivered by this rank, over all epochs

    # -- what the manifest says ----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.manifest["num_samples"]

    @property
    def levels(self) -> int:
        return self.manifest["levels"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])

    @property
    def batches_per_epoch(self) -> int:
        """S = ceil(N / (world_size * batch_size)), the same on every rank."""
        return self.stream.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._t // self.batches_per_epoch

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        self.stream.start = self._t
        if self.num_workers == 0:
            source: Any = iter(self.stream)
        else:
            source = torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context)
        for t, batch in source:
            if t != self._t:  # DataLoader hands out worker batches round-robin; this guards that
                raise RuntimeError(f"ShardLoader received batch {t}, expected {self._t}")
            self._t += 1
            yield batch

    # -- position --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "offset", "seed", "world_size", "batch_size", "num_samples"}``; the same on every rank."""
        s = self.stream
        epoch, offset = divmod(self._t, self.batches_per_epoch)
        return {"epoch": epoch, "offset": offset, "seed": s.seed, "world_size": s.world_size,
                "batch_size": s.batch_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``(epoch, offset)``. If the geometry changed (world size, batch size, data),
        the epoch continues at the same fraction of its batches, with a warning: exact resumption
        needs the same geometry."""
        epoch, offset = int(state["epoch"]), int(state["offset"])
        s = self.stream
        same = (state.get("world_size", s.world_size), state.get("batch_size", s.batch_size),
                state.get("num_samples", self.num_samples)) == (s.world_size, s.batch_size, self.num_samples)
        if not same:
            old = math.ceil(state["num_samples"] / (state["world_size"] * state["batch_size"]))
            new_offset = offset * self.batches_per_epoch // old
            warnings.warn(f"ShardLoader state from another geometry ({state}); continuing epoch {epoch} "
                          f"at batch {new_offset} of {self.batches_per_epoch}", stacklevel=2)
            offset = new_offset
        if state.get("seed", s.seed) != s.seed:
            warnings.warn(f"ShardLoader state has seed {state['seed']}, this loader {s.seed}", stacklevel=2)
        if not 0 <= offset < self.batches_per_epoch:
            raise ValueError(f"offset {offset} outside the epoch's {self.batches_per_epoch} batches")
        self._t = epoch * self.batches_per_epoch + offset


# -- whole splits -------------------------------------------------------------------------------
def load_split(url: str, storage_options: dict[str, Any] | None = None, *, split: str | None = None,
               verify: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Load a whole (small) split: ``(uint8 [N x C x H x W], int64 labels [N] or None, manifest)``.

    ``url`` is a split folder, or with ``split`` a dataset folder (see ``resolve_split``). Samples come
    in manifest order. Use :func:`to_float` with ``manifest["levels"]`` for the model's scale.
    """
    from ddpm.data.manifest import resolve_split

    options = storage_options_for(url) if storage_options is None else storage_options
    if split is not None:
        url = resolve_split(url, split, options)
    manifest = read_manifest(url, options)
    fs, root = open_fs(url, options)
    c, h, w = manifest["shape"]
    images = np.empty((manifest["num_samples"], h, w, c), dtype=np.uint8)
    labels: list[int] = []
    i = 0
    for entry in manifest["shards"]:
        shard = read_shard(fs, root, entry, verify)
        for j in range(len(shard.keys)):
            images[i] = decode(shard, j, manifest["shape"], manifest["levels"])
            i += 1
        labels.extend(shard.labels)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64) if manifest.get("labels") else None
    return x, y, manifest
