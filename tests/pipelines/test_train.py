"""`ddpm-pipe train` on the shared simulated 4-node Ray cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import TINY, cli_json, mlflow_client, run_cli, train_args, wait_until


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_four_nodes_spread_in_sync_and_tracked(ray_cluster, tmp_path):
    result = run_cli(*train_args(tmp_path))
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["metrics"]["step"] == 4
    assert out["metrics"]["ranks_in_sync"] == 1.0

    c = mlflow_client()
    run = c.get_run(out["run_id"])
    placement = run.data.tags["ddpm.placement"].split(",")
    assert len(placement) == 4
    assert len({p.split("@")[1] for p in placement}) == 4, placement  # 4 distinct nodes
    assert run.data.params["train.batch_size"] == "16"
    # The run's charts open on the loss, bits/dim and the sample grid (section "training"), the rest below.
    assert {"training/loss", "training/bpd", "training details/grad_norm"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if not k.startswith(("training/", "training details/"))]
    # Provenance: the data as an MLflow dataset, the code's commit, the grids as stepped images.
    assert [(i.dataset.name, [t.value for t in i.tags]) for i in run.inputs.dataset_inputs] == [
        ("digits-train", ["training"])]
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert any(a.path.startswith("images/training~samples+step+4+") for a in c.list_artifacts(out["run_id"], "images"))
    history = c.get_metric_history(out["run_id"], "training/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    artifacts = {a.path for a in c.list_artifacts(out["run_id"])}
    assert "checkpoint" in artifacts and "samples" in artifacts and "best_model" in artifacts
    # The best copy: the EMA weights at the lowest held-out bits/dim, loadable like a logged model.
    bpd = {m.step: m.value for m in c.get_metric_history(out["run_id"], "training/bpd")}
    best_step = min(bpd, key=bpd.get)
    assert run.data.tags["ddpm.best_model"] == f"step={best_step} bpd={bpd[best_step]:.4f}"
    assert {a.path for a in c.list_artifacts(out["run_id"], "best_model")} == {
        "best_model/model.safetensors", "best_model/config.json"}
    from ddpm.checkpoint import import_weights

    best_cfg, best_net = import_weights(c.download_artifacts(out["run_id"], "best_model", str(tmp_path / "best")))
    assert best_cfg.model.ch == 32 and sum(p.numel() for p in best_net.parameters()) > 0
    version = c.get_model_version(out["registered_model"], out["version"])
    assert version.run_id == out["run_id"]


def test_nodes_beyond_cluster_fail_fast(ray_cluster, tmp_path):
    # 8 nodes: the batch of 16 divides over them (that driver check comes first), the 4-node cluster cannot place them.
    result = run_cli(*train_args(tmp_path, nodes=8, steps=1, name="toobig"))
    assert result.exit_code == 2
    assert "cannot be placed" in result.output and "4 node(s)" in result.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_max_time_stops_both_ranks_checkpoints_registers_and_says_why(ray_cluster, tmp_path):
    result = run_cli(*train_args(tmp_path, "--max-time", "4s", nodes=2, steps=100_000, name="budget"))
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    step = out["metrics"]["step"]
    assert 1 <= step < 100_000 and out["stop_reason"] == "max_time" and "(the 4 s time budget)" in out["message"]
    assert out["metrics"]["max_time_reached"] == 1.0 and out["metrics"]["ranks_in_sync"] == 1.0
    assert out["checkpoint"].rstrip("/").endswith(f"checkpoint_{step:08d}")  # the final checkpoint
    run = mlflow_client().get_run(out["run_id"])
    assert run.data.tags["ddpm.stop_reason"] == "max_time" and run.data.tags["ddpm.stop_step"] == str(step)
    assert run.data.params["train.max_time"] == "4.0"
    assert mlflow_client().get_model_version(out["registered_model"], out["version"]).run_id == out["run_id"]


@pytest.mark.parametrize("value", ["10x", "0", "-1m", "soon"])
def test_bad_max_time_exits_2_naming_the_option_and_the_forms(tmp_path, value):
    result = run_cli("train", "--max-time", value, "--storage", str(tmp_path))
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert "Invalid value for '--max-time'" in text and f"{value!r} is not a duration" in text
    assert "90s, 10m, 1.5h" in text


def test_max_time_reaches_the_config_in_seconds(monkeypatch, tmp_path):
    import pipelines.train.command as train

    seen = {}

    def fake_train_command(**kwargs):
        seen["cfg"] = train.resolve_config(kwargs["config"], kwargs["overrides"], kwargs["max_steps"],
                                           kwargs["precision"], kwargs["max_time"])
        return {"message": "ok"}

    monkeypatch.setattr(train, "train_command", fake_train_command)
    result = run_cli("train", "--max-time", "1.5m", "--max-steps", "9")
    assert result.exit_code == 0, result.output
    assert seen["cfg"].train.max_time == 90.0 and seen["cfg"].train.max_steps == 9


def test_a_time_budget_with_no_step_count_is_the_limit(monkeypatch):
    """``--max-time`` alone lifts the preset's step count (the digits preset stopped a 10-minute budget
    at its 3,000 steps after 5 minutes); a step count given with it still applies."""
    import pipelines.train.command as train
    from pipelines.train.loop import NO_STEP_LIMIT

    assert train.resolve_config("digits", [], max_time=600.0).train.max_steps == NO_STEP_LIMIT
    assert train.resolve_config("digits", [], max_steps=9, max_time=600.0).train.max_steps == 9
    assert train.resolve_config("digits", ["train.max_steps=50"], max_time=600.0).train.max_steps == 50
    assert train.resolve_config("digits", []).train.max_steps == 3000  # no budget: the preset's count
    seen = {}
    monkeypatch.setattr(train, "train_command", lambda **kw: seen.update(cfg=train.resolve_config(
        kw["config"], kw["overrides"], kw["max_steps"], kw["precision"], kw["max_time"])) or {"message": "ok"})
    assert run_cli("train", "--max-time", "10m").exit_code == 0
    assert seen["cfg"].train.max_time == 600.0 and seen["cfg"].train.max_steps == NO_STEP_LIMIT
    assert train._limit(seen["cfg"]) == "600 s of training"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_during_train_exits_130_saying_where_and_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C) to a running `ddpm-pipe train`: exit 130, the step reached and the command that
    resumes it on stderr, nothing on stdout, and the MLflow run ended as KILLED."""
    sets = [x for s in [*TINY, "train.checkpoint_every=1"] for x in ("--set", s)]
    cli = str(Path(sys.executable).with_name("ddpm-pipe"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([cli, "train", "--nodes", "1", "--max-steps", "100000", "--run-name", "stopped",
                             "--storage", str(tmp_path / "storage"), *sets], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        wait_until(lambda: lines.append(proc.stderr.readline()) or "[train] step 2" in lines[-1], 400,
                   "a progress line of step 2", interval=0, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + err
    said = re.search(r"interrupted at step (\d+); re-run with --run-name stopped to resume", err)
    assert said and int(said[1]) >= 2, err[-2000:]
    assert out == ""
    c = mlflow_client()
    run = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`ddpm.run_name` = 'stopped'")[0]
    assert run.info.status == "KILLED"


def test_bad_config_key_is_a_usage_error(tmp_path):
    result = run_cli("train", "--set", "train.nope=1", "--storage", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown config key" in result.output and "batch_size" in result.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoints_go_to_s3_storage_and_a_rerun_resumes_the_same_run_from_there(ray_cluster, tmp_path,
                                                                                   s3_prefix):
    import s3fs

    storage = f"{s3_prefix}/runs"
    first = run_cli(*train_args(tmp_path, nodes=2, steps=2, name="s3run", storage=storage))
    assert first.exit_code == 0, first.output
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = storage[len("s3://"):]
    assert fs.exists(f"{root}/s3run/checkpoint_00000002/checkpoint.pt")
    second = run_cli(*train_args(tmp_path, nodes=2, steps=4, name="s3run", storage=storage))
    assert second.exit_code == 0, second.output
    a = cli_json(first)
    out = cli_json(second)
    assert out["resumed"] and out["metrics"]["step"] == 4
    assert out["run_id"] == a["run_id"]  # the same MLflow run, not a second one
    assert fs.exists(f"{root}/s3run/checkpoint_00000004/checkpoint.pt")
    c = mlflow_client()
    runs = c.search_runs([c.get_run(out["run_id"]).info.experiment_id],
                         filter_string="tags.`ddpm.run_name` = 's3run'")
    assert [r.info.run_id for r in runs] == [out["run_id"]]
    # Every attempt of the rerun resumed from the step-2 checkpoint on S3. (Ray Train may restart a
    # worker group on a loaded machine, FailureConfig allows it; each restart logs its own resume.)
    resumes = [m.value for m in c.get_metric_history(out["run_id"], "training details/resumed_from_step")]
    assert resumes and set(resumes) == {2}, resumes
    steps = [m.step for m in c.get_metric_history(out["run_id"], "training/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps.count(1) == steps.count(2) == 1  # 1-2 not redone


@pytest.mark.timeout(300)
def test_logged_placement_is_the_one_used_when_a_local_gpu_is_taken(tmp_path, monkeypatch):
    """One machine with a GPU: train switches to --gpus-per-node 1; the run's params say so (they
    were logged before the switch, saying 0)."""
    from pipelines import cluster, tracking
    from pipelines.train import command as train

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    planned, logged = [], {}
    real_log_params = tracking.log_params
    monkeypatch.setattr(train, "_local_gpus", lambda: 1)
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: True)  # "started a local instance"
    monkeypatch.setattr(cluster, "plan", lambda nodes, gpus, **k: planned.append((nodes, gpus)) or cluster.Placement(
        workers=cluster.workers_for(nodes, gpus), use_gpu=gpus > 0, strategy="PACK", cpus_per_worker=1.0,
        threads_per_worker=1))
    monkeypatch.setattr(tracking, "log_params", lambda run_id, p: logged.update(p) or real_log_params(run_id, p))
    monkeypatch.setattr(tracking, "log_dataset", stop)  # the next step after the params: no Ray needed
    with pytest.raises(Stop):
        train.train_command(overrides=TINY, storage=str(tmp_path / "storage"), nodes=1, max_steps=1, run_name="gpu")
    assert planned == [(1, 1)]
    assert logged["run"] == {"nodes": 1, "gpus_per_node": 1, "workers": 1, "data": logged["run"]["data"]}


def test_workers_for_is_one_per_node_times_its_gpus():
    from pipelines.cluster import workers_for

    assert [workers_for(n, g) for n, g in ((1, 0), (4, 0), (1, 1), (2, 1), (2, 4))] == [1, 4, 1, 2, 8]
