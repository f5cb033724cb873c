"""``as_webdataset``: the shards as a standard WebDataset pipeline, checked against the project's reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.data import as_webdataset
from ddpm.data.reader import load_split, to_float
from ddpm.data.shards import write_shards
from ddpm.data.sources import Sample
from ddpm.data.storage import DataError

N, SHARD, LEVELS = 11, 3, 17  # 4 shards (the last of 2); digits-like 17 grey levels


def _samples(labels=True, channels=1):
    rng = np.random.default_rng(0)
    return [Sample(f"{i:07d}", rng.integers(0, LEVELS, (5, 4, channels), dtype=np.uint8), i % 10 if labels else None)
            for i in range(N)]


def _write(url, **kw):
    return write_shards(_samples(**kw), str(url), shard_size=SHARD, source="t", split="train", levels=LEVELS)


def _as_expected(url):
    """(x, labels) from the project's own reader, scaled as training sees them."""
    x, y, m = load_split(str(url))
    return to_float(x, m["levels"]), y


def test_round_trip_matches_the_project_reader(tmp_path):
    import webdataset as wds

    _write(tmp_path / "d")
    pipeline = as_webdataset(str(tmp_path / "d"))
    assert isinstance(pipeline, wds.DataPipeline)
    got = list(pipeline)
    x, y = _as_expected(tmp_path / "d")
    assert len(got) == N and all(xi.shape == (1, 5, 4) and xi.dtype == torch.float32 for xi, _ in got)
    assert torch.equal(torch.stack([xi for xi, _ in got]), x)  # levels 17: 16 -> 1.0, not 16/255
    assert [label for _, label in got] == y.tolist()
    assert x.min() >= -1 and x.max() <= 1


def test_rgb_unlabelled_and_split_folder(tmp_path):
    _write(tmp_path / "ds" / "train", labels=False, channels=3)
    got = list(as_webdataset(str(tmp_path / "ds"), split="train"))
    x, y = _as_expected(tmp_path / "ds" / "train")
    assert y is None and [label for _, label in got] == [-1] * N
    assert torch.equal(torch.stack([xi for xi, _ in got]), x) and x.shape[1] == 3


def test_two_ranks_split_the_shards_where_webdataset_default_refuses(tmp_path, monkeypatch):
    import webdataset as wds

    _write(tmp_path / "d")
    x, _ = _as_expected(tmp_path / "d")
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append([xi for xi, _ in as_webdataset(str(tmp_path / "d"))])
    assert [len(p) for p in per_rank] == [6, 5]  # shards 0, 2 (3 + 3) and 1, 3 (3 + 2)
    assert torch.equal(torch.stack(per_rank[0] + per_rank[1]), torch.cat([x[0:3], x[6:9], x[3:6], x[9:]]))
    with pytest.raises(ValueError, match="explicit nodesplitter"):  # why as_webdataset passes one
        next(iter(wds.WebDataset(str(tmp_path / "d" / "train-000000.tar"), shardshuffle=False)))


def test_dataloader_workers_and_seeded_shuffle(tmp_path):
    import webdataset as wds

    _write(tmp_path / "d")
    x, _ = _as_expected(tmp_path / "d")
    loader = wds.WebLoader(as_webdataset(str(tmp_path / "d")), batch_size=None, num_workers=2)
    got = torch.stack([xi for xi, _ in loader])
    assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, x.numpy()))  # each sample once over 2 workers
    first = [label for _, label in as_webdataset(str(tmp_path / "d"), shardshuffle=True, shuffle=5, seed=3)]
    again = [label for _, label in as_webdataset(str(tmp_path / "d"), shardshuffle=True, shuffle=5, seed=3)]
    assert first == again and sorted(first) == sorted(i % 10 for i in range(N)) and first != [i % 10 for i in range(N)]


def test_missing_manifest_and_shard_named(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        as_webdataset(str(tmp_path / "nothing"))
    _write(tmp_path / "d")
    (tmp_path / "d" / "train-000002.tar").unlink()
    with pytest.raises(DataError, match="train-000002.tar: listed in the manifest but missing"):
        list(as_webdataset(str(tmp_path / "d")))
