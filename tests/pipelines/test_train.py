"""`ddpm-pipe train` on the shared simulated 4-node Ray cluster."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

# A tiny U-Net and a few steps: the point is the distributed plumbing, not the model.
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
        "diffusion.timesteps=100", "train.batch_size=16", "train.log_every=1", "train.eval_every=2",
        "train.sample_every=4", "train.checkpoint_every=2", "train.warmup_steps=2"]


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def train_args(tmp_path, *extra: str, nodes: int = 4, steps: int = 4, name: str = "t1",
               storage: str | None = None) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["train", "--nodes", str(nodes), "--max-steps", str(steps), "--run-name", name,
            "--storage", storage or str(tmp_path / "storage"), "--json", *sets, *extra]


def mlflow_client():
    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    return tracking.client()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_four_nodes_spread_in_sync_and_tracked(ray_cluster, tmp_path):
    result = run_cli(*train_args(tmp_path))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["metrics"]["step"] == 4
    assert out["metrics"]["ranks_in_sync"] == 1.0

    c = mlflow_client()
    run = c.get_run(out["run_id"])
    placement = run.data.tags["ddpm.placement"].split(",")
    assert len(placement) == 4
    assert len({p.split("@")[1] for p in placement}) == 4, placement  # 4 distinct nodes
    assert run.data.params["train.batch_size"] == "16"
    assert "loss" in run.data.metrics and "bpd" in run.data.metrics
    # Provenance: the data as an MLflow dataset, the code's commit, the grids as stepped images.
    assert [(i.dataset.name, [t.value for t in i.tags]) for i in run.inputs.dataset_inputs] == [
        ("digits-train", ["training"])]
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert any(a.path.startswith("images/samples+step+4+") for a in c.list_artifacts(out["run_id"], "images"))
    history = c.get_metric_history(out["run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    artifacts = {a.path for a in c.list_artifacts(out["run_id"])}
    assert "checkpoint" in artifacts and "samples" in artifacts and "best_model" in artifacts
    # The best copy: the EMA weights at the lowest held-out bits/dim, loadable like a logged model.
    bpd = {m.step: m.value for m in c.get_metric_history(out["run_id"], "bpd")}
    best_step = min(bpd, key=bpd.get)
    assert run.data.tags["ddpm.best_model"] == f"step={best_step} bpd={bpd[best_step]:.4f}"
    assert {a.path for a in c.list_artifacts(out["run_id"], "best_model")} == {
        "best_model/model.safetensors", "best_model/config.json"}
    from ddpm.checkpoint import import_weights

    best_cfg, best_net = import_weights(c.download_artifacts(out["run_id"], "best_model", str(tmp_path / "best")))
    assert best_cfg.model.ch == 32 and sum(p.numel() for p in best_net.parameters()) > 0
    version = c.get_model_version(out["registered_model"], out["version"])
    assert version.run_id == out["run_id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rerun_of_finished_run_resumes_without_duplicate_runs(ray_cluster, tmp_path):
    first = run_cli(*train_args(tmp_path, nodes=1, steps=2, name="again"))
    assert first.exit_code == 0, first.output
    second = run_cli(*train_args(tmp_path, nodes=1, steps=4, name="again"))
    assert second.exit_code == 0, second.output
    a = json.loads(first.stdout.strip().splitlines()[-1])
    b = json.loads(second.stdout.strip().splitlines()[-1])
    assert b["resumed"] and b["run_id"] == a["run_id"]
    c = mlflow_client()
    assert [m.value for m in c.get_metric_history(b["run_id"], "resumed_from_step")] == [2]
    history = c.get_metric_history(b["run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # steps 1-2 were not trained twice


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    # Rank 1 dies after step 3; the last checkpoint is step 2, so the group restarts from step 2.
    monkeypatch.setenv("DDPM_FAULT_EXIT", f"1:3:{marker}")
    result = run_cli(*train_args(tmp_path, nodes=2, steps=4, name="killed"))
    assert result.exit_code == 0, result.output
    assert marker.exists()
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["metrics"]["step"] == 4 and out["metrics"]["ranks_in_sync"] == 1.0
    c = mlflow_client()
    # Every attempt of the rerun resumed from the step-2 checkpoint on S3. (Ray Train may restart a
    # worker group on a loaded machine, FailureConfig allows it; each restart logs its own resume.)
    resumes = [m.value for m in c.get_metric_history(out["run_id"], "resumed_from_step")]
    assert resumes and set(resumes) == {2}, resumes
    steps = [m.step for m in c.get_metric_history(out["run_id"], "loss")]
    assert steps.count(1) == 1 and steps.count(2) == 1 and steps.count(4) == 1  # not from step 0


def test_nodes_beyond_cluster_fail_fast(ray_cluster, tmp_path):
    # 8 nodes: the batch of 16 divides over them (that driver check comes first), the 4-node cluster cannot place them.
    result = run_cli(*train_args(tmp_path, nodes=8, steps=1, name="toobig"))
    assert result.exit_code == 2
    assert "cannot be placed" in result.output and "4 node(s)" in result.output


def test_bad_config_key_is_a_usage_error(tmp_path):
    result = run_cli("train", "--set", "train.nope=1", "--storage", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown config key" in result.output and "batch_size" in result.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoints_go_to_s3_storage_and_resume_from_there(ray_cluster, tmp_path, s3_prefix):
    import s3fs

    storage = f"{s3_prefix}/runs"
    first = run_cli(*train_args(tmp_path, nodes=2, steps=2, name="s3run", storage=storage))
    assert first.exit_code == 0, first.output
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = storage[len("s3://"):]
    assert fs.exists(f"{root}/s3run/checkpoint_00000002/checkpoint.pt")
    second = run_cli(*train_args(tmp_path, nodes=2, steps=4, name="s3run", storage=storage))
    assert second.exit_code == 0, second.output
    out = json.loads(second.stdout.strip().splitlines()[-1])
    assert out["resumed"] and out["metrics"]["step"] == 4
    assert fs.exists(f"{root}/s3run/checkpoint_00000004/checkpoint.pt")
    c = mlflow_client()
    # Every attempt of the rerun resumed from the step-2 checkpoint on S3. (Ray Train may restart a
    # worker group on a loaded machine, FailureConfig allows it; each restart logs its own resume.)
    resumes = [m.value for m in c.get_metric_history(out["run_id"], "resumed_from_step")]
    assert resumes and set(resumes) == {2}, resumes


@pytest.mark.timeout(300)
def test_logged_placement_is_the_one_used_when_a_local_gpu_is_taken(tmp_path, monkeypatch):
    """One machine with a GPU: train switches to --gpus-per-node 1; the run's params say so (they
    were logged before the switch, saying 0)."""
    from pipelines import cluster, tracking, train

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
