"""The data layer against a real S3-compatible endpoint (moto's server on loopback)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

from ddpm.data.manifest import read_manifest
from ddpm.data.reader import ShardLoader, epoch_order, load_split, to_float
from ddpm.data.shards import write_shards
from ddpm.data.sources import Sample
from ddpm.data.storage import DataError, open_fs

N, SHARD, WORLD, WORKERS, BATCH = 45, 6, 2, 2, 4  # 8 shards (the last of 3); S = ceil(45/8) = 6


def _samples():
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img[0, 0, 0] = i
        out.append(Sample(f"{i:07d}", img, i % 3))
    return out


@pytest.fixture
def s3_shards(s3_prefix):
    url = f"{s3_prefix}/train"
    result = write_shards(_samples(), url, shard_size=SHARD, source="t", split="train", levels=256)
    assert result.shards_written == math.ceil(N / SHARD)
    return url


def test_write_read_back_and_idempotent(s3_shards):
    m = read_manifest(s3_shards)
    assert m["num_samples"] == N and len(m["shards"]) == 8 and m["shape"] == [3, 4, 4]
    x, y, _ = load_split(s3_shards)
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(np.stack([s.image for s in _samples()])))
    assert y.tolist() == [i % 3 for i in range(N)]
    again = write_shards(_samples(), s3_shards, shard_size=SHARD, source="t", split="train", levels=256)
    assert (again.shards_written, again.shards_unchanged) == (0, 8)
    fs, root = open_fs(s3_shards)
    assert not [p for p in fs.ls(root, detail=False) if ".tmp-" in p]


def test_two_ranks_two_workers_coverage_and_resume(s3_shards):
    s = math.ceil(N / (WORLD * BATCH))
    per_rank, streams = [], []
    for rank in range(WORLD):
        loader = ShardLoader(s3_shards, BATCH, rank=rank, world_size=WORLD, seed=11, num_workers=WORKERS,
                             return_index=True)
        assert loader.batches_per_epoch == s
        it = iter(loader)
        batches = [next(it) for _ in range(s + 2)]  # one epoch and two batches of the next
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["offset"] == 2
        assert all(x.shape == (BATCH, 3, 4, 4) for x, _ in batches)
        assert all(((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist() == idx.tolist() for x, idx in batches)
        per_rank.append([i for _, idx in batches[:s] for i in idx.tolist()])
        streams.append(batches)
    # equal batches per rank, every sample at least once, exactly L - N duplicates: the first of G
    assert [len(ix) for ix in per_rank] == [s * BATCH] * WORLD
    seen = Counter(i for ix in per_rank for i in ix)
    assert sorted(seen) == list(range(N))
    counts = [SHARD] * 7 + [N - 7 * SHARD]
    g = epoch_order(counts, 11, 0)
    extra = s * WORLD * BATCH - N
    assert extra == 3 and seen - Counter(range(N)) == Counter(int(sh * SHARD + p) for sh, p in g[:extra])

    # a resumed reader continues where the first one stopped (worker count does not change the stream)
    first = ShardLoader(s3_shards, BATCH, rank=1, world_size=WORLD, seed=11, return_index=True)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = ShardLoader(s3_shards, BATCH, rank=1, world_size=WORLD, seed=11, return_index=True)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [next(it) for _ in range(s + 2 - 4)]
    assert [idx.tolist() for _, idx in rest] == [idx.tolist() for _, idx in streams[1][4:]]


def test_s3_errors_name_the_shard(s3_shards, s3_bucket):
    fs, root = open_fs(s3_shards)
    fs.rm_file(f"{root}/train-000003.tar")
    with pytest.raises(DataError, match="train-000003.tar.*missing"):
        ShardLoader(s3_shards, BATCH)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(f"s3://{s3_bucket}/does-not-exist")


def test_as_webdataset_reads_the_s3_shards(s3_shards, monkeypatch):
    import webdataset as wds

    from ddpm.data import as_webdataset

    x, y, _ = load_split(s3_shards)
    got = list(as_webdataset(s3_shards))  # the endpoint from AWS_ENDPOINT_URL, as the project's reader
    assert torch.equal(torch.stack([xi for xi, _ in got]), to_float(x, 256))
    assert [label for _, label in got] == y.tolist()

    # explicit storage options travel to DataLoader workers (the environment no longer names the endpoint)
    options = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    loader = wds.WebLoader(as_webdataset(s3_shards, options), batch_size=None, num_workers=2)
    labels = Counter(label for _, label in loader)
    assert labels == Counter(y.tolist())
