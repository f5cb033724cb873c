"""ShardLoader: equal batches per rank, the wrap-around coverage rule (exact), resume, flips, scaling."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from ddpm.data.reader import ShardLoader, epoch_order, to_float
from ddpm.data.shards import write_shards
from ddpm.data.sources import Sample
from ddpm.image import to_levels


def indexed_samples(n, width=4):
    """Sample i's first two pixels spell i (base 256), so a decoded batch names its samples."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (2, width, 1), dtype=np.uint8)
        img[0, 0, 0], img[0, 1, 0] = i % 256, i // 256
        out.append(Sample(f"{i:07d}", img, None))
    return out


def pixel_index(x):
    v = to_levels(x, 256).long()
    return (v[:, 0, 0, 0] + 256 * v[:, 0, 0, 1]).tolist()


@pytest.fixture
def shards(tmp_path):
    def make(n, shard_size):
        url = str(tmp_path / f"d{n}-{shard_size}")
        write_shards(indexed_samples(n), url, shard_size=shard_size, source="t", split="train", levels=256)
        return url
    return make


def take(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def assert_wraparound_epoch(per_rank, n, world, batch, counts, seed, epoch):
    """The coverage rule, exactly: S*B per rank, all N seen, the L-N extra draws are G[:L-N]."""
    s = math.ceil(n / (world * batch))
    assert [len(ix) for ix in per_rank] == [s * batch] * world
    seen = Counter(i for ix in per_rank for i in ix)
    missing = [i for i in range(n) if seen[i] == 0]
    assert missing == []
    extra = s * world * batch - n
    g = epoch_order(counts, seed, epoch)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = [int(offsets[sh] + p) for sh, p in g[np.arange(extra) % n]]
    assert seen - Counter(range(n)) == Counter(first)  # duplicates: exactly the first L-N of G
    return sum(seen.values()) - n


@pytest.mark.parametrize("n,shard_size,world,batch", [(50, 7, 2, 8), (64, 16, 2, 8), (23, 5, 3, 4), (5, 2, 2, 4)])
def test_coverage_rule_exact(shards, n, shard_size, world, batch):
    url = shards(n, shard_size)
    counts = [min(shard_size, n - i) for i in range(0, n, shard_size)]
    loaders = [ShardLoader(url, batch, rank=r, world_size=world, seed=7, return_index=True, shuffle_window=9)
               for r in range(world)]
    s = loaders[0].batches_per_epoch
    assert all(ld.batches_per_epoch == s == math.ceil(n / (world * batch)) for ld in loaders)
    for epoch in range(2):
        per_rank = []
        for ld in loaders:
            got = take(ld, s)
            for x, idx in got:
                assert x.shape == (batch, 1, 2, 4) and x.dtype == torch.float32
                assert pixel_index(x) == idx.tolist()  # the index really names the decoded image
            per_rank.append([i for _, idx in got for i in idx.tolist()])
        dups = assert_wraparound_epoch(per_rank, n, world, batch, counts, 7, epoch)
        assert dups == s * world * batch - n and (n < world * batch or dups < world * batch)


def test_epochs_reshuffle_and_seed_matters(shards):
    url = shards(40, 10)
    a = [idx.tolist() for _, idx in take(ShardLoader(url, 10, seed=1, return_index=True), 8)]
    b = [idx.tolist() for _, idx in take(ShardLoader(url, 10, seed=2, return_index=True), 4)]
    assert sorted(sum(a[:4], [])) == sorted(sum(a[4:], [])) == list(range(40))
    assert a[:4] != a[4:] and a[:4] != b


def test_workers_do_not_change_the_stream(shards):
    url = shards(30, 6)
    ref = [idx.tolist() for _, idx in take(ShardLoader(url, 4, rank=1, world_size=2, return_index=True), 7)]
    two = [idx.tolist() for _, idx in take(ShardLoader(url, 4, rank=1, world_size=2, num_workers=2,
                                                       return_index=True), 7)]
    assert two == ref


def test_resume_continues_the_epoch(shards):
    url = shards(50, 8)
    full = ShardLoader(url, 6, rank=0, world_size=2, seed=3, random_flip=True)
    ref = take(full, 9)  # crosses the epoch boundary (S = 5)
    first = ShardLoader(url, 6, rank=0, world_size=2, seed=3, random_flip=True)
    take(first, 3)
    state = first.state_dict()
    assert state == {"epoch": 0, "offset": 3, "seed": 3, "world_size": 2, "batch_size": 6, "num_samples": 50}
    resumed = ShardLoader(url, 6, rank=0, world_size=2, seed=3, random_flip=True)
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    assert all(torch.equal(a, b) for a, b in zip(ref[3:], rest))
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["offset"] == 4


def test_geometry_change_warns(shards):
    url = shards(20, 5)
    ld = ShardLoader(url, 5)
    with pytest.warns(UserWarning, match="another geometry"):
        ld.load_state_dict({"epoch": 2, "offset": 1, "seed": 0, "world_size": 2, "batch_size": 5, "num_samples": 20})
    assert ld.state_dict()["epoch"] == 2 and ld.state_dict()["offset"] == 2


def test_random_flip_flips_whole_images(shards):
    url = shards(16, 16)
    plain = take(ShardLoader(url, 16, seed=5, return_index=True), 1)[0]
    flipped = take(ShardLoader(url, 16, seed=5, random_flip=True, return_index=True), 1)[0]
    assert torch.equal(plain[1], flipped[1])
    same = [torch.equal(a, b) for a, b in zip(plain[0], flipped[0])]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain[0], flipped[0])]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 16


def test_to_float_scaling():
    v = torch.arange(17, dtype=torch.uint8)
    x = to_float(v, 17)
    assert x[0] == -1 and x[-1] == 1 and torch.allclose(x[8], torch.tensor(0.0))
    assert torch.equal(to_levels(x, 17), v)
    assert torch.equal(to_levels(to_float(torch.arange(256, dtype=torch.uint8), 256), 256),
                       torch.arange(256, dtype=torch.uint8))


def test_loader_finds_the_split_below_a_dataset_folder(tmp_path):
    write_shards(indexed_samples(6), str(tmp_path / "ds" / "train"), shard_size=4, source="t", split="train",
                 levels=256)
    loader = ShardLoader(str(tmp_path / "ds"), 3, split="train")
    assert loader.url == f"{tmp_path}/ds/train" and loader.batches_per_epoch == 2


def test_labels_come_with_their_images_when_asked(tmp_path):
    samples = [Sample(s.key, s.image, i % 3) for i, s in enumerate(indexed_samples(20))]
    url = str(tmp_path / "labelled")
    write_shards(samples, url, shard_size=6, source="t", split="train", levels=256, classes=["a", "b", "c"])
    x, labels, index = take(ShardLoader(url, 4, return_labels=True, return_index=True), 1)[0]
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in index.tolist()]
    assert pixel_index(x) == index.tolist()
    assert torch.equal(next(iter(ShardLoader(url, 4, return_labels=True)))[1], labels)  # (x, labels)


def test_check_labels_names_the_split_that_cannot_train_a_conditional_model(tmp_path, shards):
    from ddpm.data.manifest import check_labels, read_manifest
    from ddpm.data.storage import DataError

    unlabelled = read_manifest(shards(10, 5))
    check_labels(unlabelled, 0)  # an unconditional model needs none
    with pytest.raises(DataError, match=r"at/here: the 'train' split has no labels.*model.num_classes=10"):
        check_labels(unlabelled, 10, "at/here")
    samples = [Sample(s.key, s.image, i % 3) for i, s in enumerate(indexed_samples(9))]
    url = str(tmp_path / "three")
    write_shards(samples, url, shard_size=9, source="t", split="train", levels=256, classes=["a", "b", "c"])
    check_labels(read_manifest(url), 3)
    check_labels(read_manifest(url), 10)
    with pytest.raises(DataError, match=r"'train' split has 3 classes but model.num_classes=2 .*\[0, 2\)"):
        check_labels(read_manifest(url), 2)
