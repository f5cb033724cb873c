"""Training faults on the shared simulated Ray cluster: a killed worker, a lost node, a killed driver.

Each resumes from the last checkpoint Ray Train registered; at most one checkpoint interval of work
is redone. Tiny configs (tests/pipelines/helpers.py's TINY): the point is the recovery, not the model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.fixtures.ray_cluster import add_node
from tests.support import TINY, cli_json, mlflow_client, wait_until, run_cli

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the registered checkpoints


def sets(*extra: str) -> list[str]:
    return [x for s in (*TINY, *extra) for x in ("--set", s)]


def train(tmp_path: Path, name: str, nodes: int, steps: int, *extra: str) -> dict:
    args = ["train", "--nodes", str(nodes), "--max-steps", str(steps), "--run-name", name,
            "--storage", str(tmp_path / "storage"), "--json", *sets(*extra)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return cli_json(result)


def final_state(out: dict) -> dict:
    from ddpm.checkpoint import load_checkpoint

    return load_checkpoint(os.path.join(out["checkpoint"], "checkpoint.pt"))


def wait_for_checkpoint(run_dir: Path, step: int, timeout: float, alive=lambda: True) -> None:
    """Until Ray Train has registered the checkpoint of ``step`` (its snapshot names it); fails if
    training ends first (before the fault could be injected)."""
    name, snap = f"checkpoint_{step:08d}", run_dir / SNAPSHOT
    wait_until(lambda: snap.exists() and name in snap.read_text(errors="replace"), timeout,
               f"{name} registered in {run_dir}", alive=alive)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_resumes_and_ends_bit_identical_to_an_uninterrupted_run(ray_cluster, tmp_path,
                                                                             monkeypatch):
    clean = train(tmp_path, "clean", 2, 4)
    marker = tmp_path / "killed"
    # Rank 1 dies after step 3 (os._exit); step 2 is the last checkpoint: the group restarts there.
    monkeypatch.setenv("DDPM_FAULT_EXIT", f"1:3:{marker}")
    killed = train(tmp_path, "killed", 2, 4)
    assert marker.exists()
    c = mlflow_client()
    assert [m.value for m in c.get_metric_history(killed["run_id"], "training details/resumed_from_step")] == [2]
    assert killed["metrics"]["step"] == 4 and killed["metrics"]["ranks_in_sync"] == 1.0
    steps = [m.step for m in c.get_metric_history(killed["run_id"], "training/loss")]
    assert steps.count(1) == 1 and steps.count(2) == 1 and steps.count(4) == 1  # restarted at 2, not 0

    # The checkpoint holds RNG (per rank), optimizer, lr schedule, EMA and reader position, so the
    # redone steps 3-4 draw the same batches, t and noise: the weights agree bit for bit.
    a, b = final_state(clean), final_state(killed)
    assert a["step"] == b["step"] == 4
    for part in ("model",):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), f"ema.{k} differs"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_removed_and_fresh_node_added_resumes_on_the_new_node(ray_cluster, tmp_path):
    """A strictly spread group of 4 on 4 nodes loses one node; it can only run again once a fresh
    node joins. The shared cluster has 4 nodes again afterwards."""
    import ray

    from pipelines.train.command import train_command

    steps = 10
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train_command(overrides=TINY, storage=str(tmp_path / "storage"), nodes=4,
                                              max_steps=steps, run_name="node-lost")
        except BaseException as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for_checkpoint(tmp_path / "storage" / "node-lost", 2, timeout=300, alive=thread.is_alive)
    victim = next(iter(ray_cluster.worker_nodes))  # never the head: the driver and controller live there
    lost_id = victim.node_id
    ray_cluster.remove_node(victim, allow_graceful=False)
    fresh = add_node(ray_cluster)  # with the S3 credentials the other nodes hold
    ray_cluster.wait_for_nodes()
    thread.join(timeout=420)
    assert not thread.is_alive(), "training did not finish after the node was replaced"
    assert "error" not in outcome, repr(outcome.get("error"))
    out = outcome["result"]
    assert out["metrics"]["step"] == steps and out["metrics"]["ranks_in_sync"] == 1.0

    c = mlflow_client()
    resumed = [m.value for m in c.get_metric_history(out["run_id"], "training details/resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= 2  # lost at most one checkpoint interval
    nodes = {p.split("@")[1] for p in c.get_run(out["run_id"]).data.tags["ddpm.placement"].split(",")}
    assert len(nodes) == 4 and fresh.node_id[:12] in nodes and lost_id[:12] not in nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_driver_rerun_resumes_the_same_run_and_ignores_a_partial_checkpoint(ray_cluster, tmp_path):
    storage = tmp_path / "storage"
    cmd = [str(Path(sys.executable).with_name("ddpm-pipe")), "train", "--nodes", "2", "--max-steps", "10",
           "--run-name", "driver", "--storage", str(storage), "--address", ray_cluster.address, "--json",
           *sets()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_checkpoint(storage / "driver", 2, timeout=300, alive=lambda: first.poll() is None)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        log.close()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]

    # What a kill during an upload can leave: a checkpoint folder Ray never registered, numbered
    # beyond every real one and holding half a file. It must not be taken as the latest.
    partial = storage / "driver" / "checkpoint_00000099"
    partial.mkdir()
    good = next((storage / "driver").glob("checkpoint_00000002")) / "checkpoint.pt"
    (partial / "checkpoint.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    out = cli_json(second)
    assert out["resumed"] and out["metrics"]["step"] == 10
    assert not out["checkpoint"].rstrip("/").endswith("checkpoint_00000099")

    c = mlflow_client()
    runs = c.search_runs([c.get_experiment_by_name("digits").experiment_id],
                         filter_string="tags.`ddpm.run_name` = 'driver'")
    assert [r.info.run_id for r in runs] == [out["run_id"]]  # one run, not two
    assert runs[0].info.status == "FINISHED"
    resumed = [m.value for m in c.get_metric_history(out["run_id"], "training details/resumed_from_step")]
    assert len(resumed) == 1 and 2 <= resumed[0] < 10, resumed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_shard_found_by_a_worker_stops_the_run_after_one_attempt(ray_cluster, tmp_path, digits_shards,
                                                                    monkeypatch):
    """A shard whose bytes no longer match its sha256 (same size), as the driver cannot see it for
    data in an object store: the worker's DataError ends the run at once with exit 2. Ray Train
    used to restart the worker group max_failures=3 times, each attempt failing the same way."""
    import shutil

    from pipelines.train import command as T

    data = Path(shutil.copytree(digits_shards, tmp_path / "data"))
    for shard in data.glob("train-*.tar"):  # every shard: whatever a rank reads first fails
        raw = bytearray(shard.read_bytes())
        raw[600] ^= 0xFF
        shard.write_bytes(bytes(raw))
    monkeypatch.setattr(T, "check_data", lambda url, cfg: None)  # as for s3:// data: hashed by the reader
    starts = tmp_path / "worker-starts"
    real = T.worker_main

    def counted(loop_config):  # pickled by value: every worker process of every attempt appends a line
        with open(starts, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(loop_config)

    monkeypatch.setattr(T, "worker_main", counted)
    args = ["train", "--nodes", "2", "--max-steps", "2", "--run-name", "badshard", "--data", str(data),
            "--storage", str(tmp_path / "storage"), *sets()]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert re.search(r"train-00000[0-2]\.tar: sha256 does not match the manifest", result.output), result.output
    assert "not retried" in result.output
    assert len(starts.read_text().split()) == 2  # one attempt: two workers, started once
    c = mlflow_client()
    runs = c.search_runs([c.get_experiment_by_name("digits").experiment_id],
                         "tags.`ddpm.run_name` = 'badshard'")
    assert [r.info.status for r in runs] == ["FAILED"]
