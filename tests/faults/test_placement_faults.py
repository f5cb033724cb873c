"""Issue 25, item 5: a job whose workers cannot be placed (the cluster's CPUs held by another job, a
node lost mid-job) fails after ``DDPM_PLACEMENT_TIMEOUT`` saying what it asked for, what the cluster
has and what to do (exit 1), its lock released and its MLflow run FAILED, instead of waiting for ever."""

from __future__ import annotations

import contextlib
import time

import pytest

from pipelines import cluster
from pipelines.cluster import Placement
from pipelines.errors import PipelineError
from pipelines.sample import pool as P
from tests.support import (TINY_NET, cli_json, mlflow_client, run_cli, save_tiny_checkpoint, train_args,
                           wait_until)


@contextlib.contextmanager
def every_cpu_held():
    """Another job's placement group holding every free CPU of the shared cluster, removed after."""
    import ray

    # what the last test freed shows in the resource view a moment later
    free = int(wait_until(lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
                          and ray.available_resources()["CPU"], 60, "every CPU of the cluster free"))
    pg = ray.util.placement_group([{"CPU": 1}] * free, strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    try:
        yield
    finally:
        ray.util.remove_placement_group(pg)


def _waiting_groups() -> list[str]:
    import ray

    return [k for k, g in ray.util.placement_group_table().items() if g["state"] in ("PENDING", "RESCHEDULING")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sampling_workers_that_cannot_be_placed_fail_after_the_deadline(ray_cluster, tmp_path, monkeypatch):
    ckpt = str(save_tiny_checkpoint(tmp_path / "checkpoint.pt", overrides=TINY_NET))
    out = tmp_path / "out"
    monkeypatch.setenv("DDPM_PLACEMENT_TIMEOUT", "2s")
    with every_cpu_held():
        start = time.monotonic()
        result = run_cli("sample", "--model", ckpt, "--num", "2", "--steps", "2", "--nodes", "2", "--out", str(out))
        waited = time.monotonic() - start
        assert not _waiting_groups()  # the pool's group is removed, not left to grab the CPUs later
    assert result.exit_code == 1, result.output
    assert "sampling: 2 worker(s) of {'CPU': 1.0} each (STRICT_SPREAD) could not be placed within 2 s" in result.output
    assert "node(s), CPUs per node" in result.output and "free now {" in result.output
    assert "DDPM_PLACEMENT_TIMEOUT" in result.output
    assert waited < 60
    assert not (out / ".ddpm-lock").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_workers_that_cannot_be_placed_fail_the_run_after_the_deadline(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_PLACEMENT_TIMEOUT", "5s")
    with every_cpu_held():
        result = run_cli(*train_args(tmp_path, nodes=2, steps=1, name="unplaced"))
        assert not _waiting_groups()
    assert result.exit_code == 1, result.output
    assert "training: 2 worker(s)" in result.output and "could not be placed within 5 s" in result.output
    assert "node(s), CPUs per node" in result.output and "re-run with --run-name unplaced" in result.output
    error = cli_json(result)["error"]
    run_id = error.split("MLflow run ")[1].split()[0]
    assert mlflow_client().get_run(run_id).info.status == "FAILED"
    assert not (tmp_path / "storage" / "unplaced" / ".ddpm-lock").exists()


class _Unplaced:
    """Ray as the pool sees it once a node holding a worker is gone: no unit finishes, the group waits
    to be placed again (RESCHEDULING)."""

    class util:
        @staticmethod
        def placement_group_table(pg: object) -> dict[str, str]:
            return {"state": "RESCHEDULING"}

    @staticmethod
    def wait(refs: list, num_returns: int, timeout: float | None = None) -> tuple[list, list]:
        time.sleep(0.05)
        return [], refs


class _Actor:
    class sample:
        @staticmethod
        def remote(unit: list[int], seed: int) -> object:
            return object()


@pytest.mark.timeout(60)
def test_a_pool_whose_lost_worker_cannot_be_placed_again_fails_after_the_deadline(monkeypatch):
    monkeypatch.setattr(cluster, "capacity", lambda: {"nodes": 1, "cpus_per_node": [2.0], "gpus_per_node": [0.0]})
    monkeypatch.setattr(cluster.ray, "available_resources", lambda: {"CPU": 0.0})
    pool = P.WorkerPool.__new__(P.WorkerPool)
    pool._local, pool._ray, pool.pg, pool._deadline = None, _Unplaced(), object(), 0.3
    pool.actors = [_Actor(), _Actor()]
    pool.placement = Placement(workers=2, use_gpu=False, strategy="STRICT_SPREAD", cpus_per_worker=1.0,
                               threads_per_worker=1)
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"a worker lost mid-job could not be placed again\): 2 worker\(s\) .* "
                                            r"within 0.3 s; the cluster has 1 node\(s\)"):
        pool.run([[0], [1], [2]], 0, on_result=lambda r: None)
    assert time.monotonic() - start < 5


def test_a_placement_timeout_that_is_not_a_duration_is_a_usage_error(monkeypatch):
    from pipelines.errors import UsageError
    from pipelines.settings import resolve

    assert resolve().placement_timeout == 300.0
    monkeypatch.setenv("DDPM_PLACEMENT_TIMEOUT", "10m")
    assert resolve().placement_timeout == 600.0
    monkeypatch.setenv("DDPM_PLACEMENT_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="DDPM_PLACEMENT_TIMEOUT: 'soon' is not a duration"):
        resolve()
