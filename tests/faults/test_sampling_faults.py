"""A batch-sampling worker killed mid-job: Ray restarts the actor, the lost unit is redone, and every
index is written exactly once (the driver is the only writer)."""

from __future__ import annotations

import json

import pytest

from pipelines.sample import command as S
from tests.support import TINY_NET, read_npz_folder, save_tiny_checkpoint

N = 8


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_sampling_worker_is_restarted_and_every_index_is_written_once(ray_cluster, tmp_path,
                                                                            monkeypatch):
    import ray

    pools: list = []

    class RecordedPool(S.WorkerPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(S, "WorkerPool", RecordedPool)
    written: list[str] = []

    def kill_a_worker_once(names: list[str]) -> None:
        if not written:  # after the first unit: actor 0 is busy with its next unit; kill its process
            ray.kill(pools[0].actors[0], no_restart=False)
        written.extend(names)

    ckpt = str(save_tiny_checkpoint(tmp_path / "checkpoint.pt", overrides=TINY_NET))
    out = tmp_path / "out"
    req = S.SampleRequest(model=ckpt, num=N, sampler="ddim", steps=4, batch_size=2, nodes=2)
    result = S.write_samples(req, str(out), fmt="npz", progress=False, on_written=kill_a_worker_once)

    assert result["written"] == N
    assert len(written) == len(set(written)) == N // 2  # four units of two, none written twice
    got = read_npz_folder(out)  # asserts no index appears in two files
    assert sorted(got) == list(range(N))
    assert json.loads((out / "manifest.json").read_text())["count"] == N
