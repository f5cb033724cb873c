"""A one-worker local `sample` runs in the driver's process: when it does, and that it samples the
same images as the Ray actors do."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sample import command as S
from pipelines.sample import pool as P
from tests.support import TINY_NET, read_npz_folder, request, save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt", overrides=TINY_NET))


@pytest.mark.timeout(60)
def test_only_a_one_worker_job_with_no_cluster_runs_in_process(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever other tests started
    req = request("model.pt")
    assert P.runs_in_process(req)
    assert not P.runs_in_process(request("model.pt", gpus_per_node=1))  # Ray checks the GPU is there
    assert not P.runs_in_process(request("model.pt", nodes=2))
    assert not P.runs_in_process(request("model.pt", gpus_per_node=2))
    assert not P.runs_in_process(request("model.pt", address="ray://head:10001"))
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert not P.runs_in_process(req)
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("DDPM_SAMPLE_IN_PROCESS", "0")
    assert not P.runs_in_process(req)
    monkeypatch.delenv("DDPM_SAMPLE_IN_PROCESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connected to a cluster already: use it
    assert not P.runs_in_process(req)
    monkeypatch.undo()  # before the leak check reads ray.is_initialized (this file run alone)


@pytest.mark.timeout(300)
def test_in_process_job_writes_the_same_samples_as_the_ray_workers(ray_cluster, tmp_path, ckpt, monkeypatch):
    on_ray = S.write_samples(request(ckpt, nodes=1, batch_size=4), str(tmp_path / "ray"), fmt="npz",
                             progress=False)
    monkeypatch.setattr(P, "runs_in_process", lambda req: True)
    local = S.write_samples(request(ckpt, nodes=1, batch_size=3), str(tmp_path / "local"), fmt="npz",
                            progress=False)
    assert on_ray["written"] == local["written"] == len(read_npz_folder(tmp_path / "local"))
    a, b = read_npz_folder(tmp_path / "ray"), read_npz_folder(tmp_path / "local")
    assert sorted(a) == sorted(b) == list(range(len(a)))
    for i in a:
        np.testing.assert_allclose(a[i], b[i], atol=1e-4)
    assert local["workers"] == 1


@pytest.mark.timeout(300)
def test_local_benchmark_runs_the_cli_in_process_and_records_its_timings(tmp_path, ckpt):
    import json

    from benchmarks import bench_local

    out = tmp_path / "local.json"
    bench_local.main(["--model", ckpt, "--num", "4", "--repeats", "1", "--modes", "in_process",
                      "no_freeze", "--out", str(out)])
    result = json.loads(out.read_text())
    run = result["runs"]["in_process"][0]
    assert result["repeats"] == 1 and result["median_wall_s"]["in_process"] == run["wall_s"] > 0
    assert run["samples_written"] == 4 and run["load_s"] >= 0 and "load_1m_before" in run
    assert result["runs"]["no_freeze"][0]["samples_written"] == 4


@pytest.mark.timeout(120)
def test_in_process_progress_moves_within_a_batch_by_network_calls(tmp_path, ckpt, capsys, monkeypatch):
    """Issue 29: one batch of 64 samples took over a minute on a CPU with no line before its end;
    in process, the bar counts each network call as its share of the batch's samples."""
    monkeypatch.setattr(P, "runs_in_process", lambda req: True)  # even where another test left Ray up
    S.write_samples(request(ckpt, num=8, batch_size=8, steps=4), str(tmp_path / "out"), fmt="npz", progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[sample] ")]
    # one unit of 8 samples over 4 calls: 2 samples' worth after the first call (the first line), then the end
    assert lines[0].startswith("[sample] 2/8 samples (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("[sample] 8/8 samples (100%)")
    assert sorted(read_npz_folder(tmp_path / "out")) == list(range(8))
