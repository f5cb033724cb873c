"""`ddpm-pipe run`: the whole workflow on the simulated multi-node cluster, resumed, and submitted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ddpm.samplers import SAMPLERS
from tests.support import TINY, cli_json, free_port, mlflow_client, run_cli, wait_until

WORKFLOW = """
train: {nodes: 2}
evaluate: {num: 32, steps: 5}
sample: {num: 8, steps: 5, nodes: 2}
"""


def run_args(tmp_path, name: str, *extra: str, workflow: str = WORKFLOW) -> list[str]:
    spec = tmp_path / "workflow.yaml"
    spec.write_text(workflow)
    sets = [x for s in TINY + ["train.max_steps=2"] for x in ("--set", s)]
    return ["run", "--name", name, "--workflow", str(spec), "--storage", str(tmp_path / "storage"),
            "--json", *sets, *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workflow_runs_every_step_then_resumes(ray_cluster, tmp_path):
    first = run_cli(*run_args(tmp_path, "wf"))
    assert first.exit_code == 0, first.output
    out = cli_json(first)
    assert out["ran"] == ["prepare", "train", "evaluate", "promote", "sample"]
    steps = out["steps"]
    assert steps["train"]["model_uri"].startswith("models:/ddpm-digits/")
    assert steps["promote"]["promoted"] is True  # the first evaluated version takes the alias
    assert steps["sample"]["grid"].endswith(".png")

    c = mlflow_client()
    parent = c.get_run(out["parent_run_id"])
    lineage = json.loads(parent.data.tags["ddpm.lineage"])
    assert lineage["train_run"] == steps["train"]["run_id"]
    assert lineage["data_manifest"] == steps["prepare"]["train_manifest"]
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    kinds = {r.data.tags.get("ddpm.kind") for r in children}
    # The train and evaluate steps' own runs are nested under the workflow's run, which shows the curves.
    assert {"train", "evaluate", "workflow.prepare", "workflow.promote", "workflow.sample"} <= kinds
    assert {"training/loss", "training/bpd"} <= set(parent.data.metrics)
    (evaluated,) = [r for r in children if r.data.tags.get("ddpm.kind") == "evaluate"]
    assert evaluated.info.run_id == steps["evaluate"]["run_id"] and "kid" in evaluated.data.metrics
    version = c.get_model_version("ddpm-digits", steps["train"]["version"])
    assert any(k.startswith("eval.") or "fd" in k for k in version.tags), version.tags

    second = run_cli(*run_args(tmp_path, "wf"))
    assert second.exit_code == 0, second.output
    again = cli_json(second)
    assert again["ran"] == [] and again["skipped"] == ["prepare", "train", "evaluate", "promote", "sample"]
    assert again["parent_run_id"] == out["parent_run_id"]

    # A changed input (the sample count) reruns that step only.
    third = run_cli(*run_args(tmp_path, "wf", workflow=WORKFLOW.replace("num: 8", "num: 9")))
    assert third.exit_code == 0, third.output
    assert cli_json(third)["ran"] == ["sample"]


def test_unknown_workflow_key_is_a_usage_error(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text("train: {nodez: 2}\n")
    result = run_cli("run", "--workflow", str(spec))
    assert result.exit_code == 2
    assert "nodez" in result.output and "nodes" in result.output


def test_workflow_train_max_time_takes_the_cli_forms(tmp_path):
    from pipelines.workflow import WorkflowSpec

    spec = tmp_path / "w.yaml"
    spec.write_text("train: {max_time: 10m, max_steps: 50000}\n")
    assert WorkflowSpec.load(str(spec)).train.max_time == 600.0
    spec.write_text("train: {max_time: 10x}\n")
    result = run_cli("run", "--workflow", str(spec))
    assert result.exit_code == 2
    assert "train.max_time: '10x' is not a duration" in result.output and "10m" in result.output


@pytest.mark.parametrize("step,expected", [
    ("train: {nodes: 0}", "train.nodes must be >= 1, got 0"),
    ("train: {nodes: two}", "train.nodes: 'two' is not int"),
    ("tune: {scheduler: hyperband}", "tune.scheduler 'hyperband' is not valid; valid: asha, none"),
    ("evaluate: {num: 3}", "evaluate.num must be above 4"),
    ("evaluate: {sampler: euler}",
     f"evaluate.sampler 'euler' is not valid; valid: {', '.join(SAMPLERS)} (or leave it out)"),
    ("evaluate: {steps: 5000}", "evaluate.steps must be in [1, T=1000], got 5000"),
    ("promote: {metric: nope}", "promote.metric: "),
    ("promote: {min_delta: -1}", "promote.min_delta must be >= 0, got -1"),
    ("promote: {alias: 'not an alias'}", "promote.alias 'not an alias' is not a valid name"),
    ("sample: {batch_size: 0}", "sample.batch_size must be >= 1, got 0"),
    ("sample: {format: jpg}", "sample.format 'jpg' is not valid; valid: png, webdataset, npz"),
    ("sample: {precision: fp8}", "sample.precision 'fp8' is not valid; valid: fp32, bf16"),
    ("sample: {sampler: ddpm, eta: 1}", "sample.eta=1 only applies to the ddim sampler, not 'ddpm'"),
])
def test_every_steps_values_are_checked_before_the_first_step(tmp_path, step, expected):
    """A bad value in a late step (sample, promote) used to be found after training had finished."""
    spec = tmp_path / "w.yaml"
    spec.write_text(step + "\n")
    result = run_cli("run", "--workflow", str(spec), "--json")
    assert result.exit_code == 2, result.output
    assert expected in cli_json(result)["error"]
    home = Path(os.environ["DDPM_HOME"])
    assert not any((home / p).exists() for p in ("data", "workflows", "mlflow.db")), list(home.glob("*"))


def _stub_steps(monkeypatch, tmp_path) -> dict:
    """Every step's command stubbed, and the model it "registers" known to the store; what the
    commands were called with lands in the returned dict."""
    from pipelines import workflow
    from pipelines.registry import evaluate, models, promote
    from pipelines.sample import command as sample
    from pipelines.storage import data
    from pipelines.train import command as train

    calls: dict = {}
    uri = "models:/ddpm-digits/1"
    manifest = tmp_path / "samples" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    monkeypatch.setattr(data, "ensure_prepared", lambda *a, **k: None)
    monkeypatch.setattr(workflow, "_manifest_digest", lambda url: "d")
    monkeypatch.setattr(workflow, "_grid", lambda *a, **k: "grid.png")
    monkeypatch.setattr(workflow, "_log_step", lambda *a, **k: None)
    monkeypatch.setattr(models, "describe", lambda model: {"run_id": "r", "name": "ddpm-digits", "version": "1"})
    monkeypatch.setattr(train, "train_command", lambda **k: calls.setdefault("train", k) and {
        "run_id": "r", "model_uri": uri, "version": "1", "registered_model": "ddpm-digits", "checkpoint": "c",
        "metrics": {"loss": 0.1}})
    monkeypatch.setattr(evaluate, "evaluate_command", lambda **k: calls.setdefault("evaluate", k) and {
        "bpd": 1.0, "scores": {"fd": 1.0}, "floors": {"fd": 0.5}, "sec_per_sample": 0.1})
    monkeypatch.setattr(promote, "promote_command", lambda **k: calls.setdefault("promote", k) and {"message": "ok"})
    monkeypatch.setattr(sample, "sample_command", lambda **k: calls.setdefault("sample", k) and {
        "out": str(manifest.parent), "manifest": str(manifest)})
    return calls


def test_run_passes_the_sample_steps_settings_and_prints_only_its_result(tmp_path, monkeypatch):
    """The sample step's batch size, GPUs and precision come from the workflow file (they were
    hard-coded); the [run] lines go to stderr, stdout holds the one JSON result."""
    calls = _stub_steps(monkeypatch, tmp_path)
    spec = tmp_path / "w.yaml"
    spec.write_text("sample: {batch_size: 32, gpus_per_node: 2, precision: bf16, nodes: 3, format: npz}\n")
    result = run_cli("run", "--workflow", str(spec), "--name", "stub", "--json")
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["ran"] == ["prepare", "train", "evaluate", "promote", "sample"]
    sampled = calls["sample"]
    assert (sampled["batch_size"], sampled["gpus_per_node"], sampled["precision"]) == (32, 2, "bf16")
    assert (sampled["nodes"], sampled["format"]) == (3, "npz")
    assert "[run] sample: running" in result.stderr and "[run]" not in result.stdout
    again = run_cli("run", "--workflow", str(spec), "--name", "stub", "--json")
    assert cli_json(again)["skipped"] == out["ran"] and "[run] sample: up to date, skipped" in again.stderr


def test_outputs_that_cannot_be_checked_stop_the_run_instead_of_redoing_the_step(monkeypatch):
    """"Gone" (the store says no such model) reruns a step; an MLflow error is not taken for "gone"."""
    from pipelines import workflow
    from pipelines.errors import PipelineError, UsageError
    from pipelines.registry import models

    def gone(uri):
        raise UsageError(f"model {uri!r} does not exist in the MLflow store")

    def outage(uri):
        raise PipelineError("the MLflow store could not say whether model 'x' exists: 503")

    recorded = {"model_uri": "models:/ddpm-digits/1"}
    monkeypatch.setattr(models, "describe", lambda uri: {"run_id": "r"})
    assert workflow._outputs_exist("train", recorded)
    monkeypatch.setattr(models, "describe", gone)
    assert not workflow._outputs_exist("evaluate", recorded)
    monkeypatch.setattr(models, "describe", outage)
    with pytest.raises(PipelineError, match="503"):
        workflow._outputs_exist("promote", recorded)
    assert not workflow._outputs_exist("prepare", {"train_url": "/nowhere/train", "train_manifest": "d"})


@pytest.mark.parametrize("thrown,error", [
    (("no run abc", "RESOURCE_DOES_NOT_EXIST"), "UsageError"),
    (("no such alias", "INVALID_PARAMETER_VALUE"), "UsageError"),
    (("Not a proper models:/ URI: models:/tiny/1/2", "INTERNAL_ERROR"), "UsageError"),  # MLflow's URI parser
    (("API request to http://mlflow:5000/api failed with exception ConnectionError", "INTERNAL_ERROR"),
     "PipelineError"),
    (("busy", "TEMPORARILY_UNAVAILABLE"), "PipelineError"),
    ({"error_code": "INTERNAL_ERROR", "message": "database is locked"}, "PipelineError"),  # the server's own
])
def test_describe_tells_no_such_model_from_a_store_that_cannot_answer(monkeypatch, thrown, error):
    import mlflow
    from mlflow.protos import databricks_pb2

    from pipelines import errors
    from pipelines.registry import models

    class Client:
        def get_run(self, run_id):
            if isinstance(thrown, dict):
                raise mlflow.exceptions.RestException(thrown)
            message, code = thrown
            raise mlflow.exceptions.MlflowException(message, error_code=getattr(databricks_pb2, code))

    monkeypatch.setattr(models, "_mlflow", lambda: (mlflow, Client()))
    with pytest.raises(getattr(errors, error)) as raised:
        models.describe("runs:/abc/model")
    assert type(raised.value) is getattr(errors, error)  # a UsageError is a PipelineError too: exactly this one


@pytest.fixture(scope="module")
def ray_head():
    """A separate local Ray head with the dashboard (Jobs API), started by `ray start --block`, shared
    by this module's two job-submission tests.

    Stopping the blocking `ray start` process stops that head's processes and nothing else. Its
    session files go to a folder of its own: in Ray's default one, ``ray start`` would record the head
    in /tmp/ray/ray_current_cluster, which outlives it (only ``ray stop`` clears it), and a later bare
    ``ray.init()`` in this session would wait minutes for that gone head.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import urllib.error
    import urllib.request

    # Every fixed default port of a head (client server 10001, agent 52365, ...) may be taken by the
    # session's shared cluster: give each one a free port.
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port")}
    dash = ports["dashboard-port"]
    temp = tempfile.mkdtemp(prefix="rh-")  # short: Ray's socket paths live under it
    bin_dir = os.path.dirname(sys.executable)  # the job's `ddpm-pipe` is this environment's
    # A loopback-only test head: no token authentication (a real cluster's token is read by the
    # Jobs client from RAY_AUTH_MODE=token and ~/.ray/auth_token).
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                             f"--temp-dir={temp}",
                             *(f"--{name}={port}" for name, port in ports.items())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    url = f"http://127.0.0.1:{dash}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
        except urllib.error.HTTPError:  # it answers (401 when token authentication is on): it is up
            pass
        except Exception:
            return False
        return True

    try:
        wait_until(answers, 120, "Ray head answering", interval=1, alive=lambda: proc.poll() is None)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workflow_submitted_as_ray_job(ray_head, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "job-home"))
    result = run_cli(*run_args(tmp_path, "job", "--submit", "--address", ray_head))
    assert result.exit_code == 0, result.output
    job_id = cli_json(result)["job_id"]
    client = JobSubmissionClient(ray_head)
    wait_until(lambda: client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
               800, "end of the submitted workflow", interval=2)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "workflow 'job': ran prepare, train, evaluate, promote, sample" in logs


def test_submit_ships_the_local_config_and_workflow_files_as_the_jobs_working_dir(tmp_path, monkeypatch):
    """The job names its files relative to its working dir, which holds copies taken at submission;
    the submitter's paths appear nowhere in it and the temporary folder is gone afterwards."""
    import ray.job_submission

    submitted = []

    class FakeJobClient:
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env, submission_id):
            folder = runtime_env["working_dir"]
            submitted.append({"entrypoint": entrypoint, "folder": folder,
                              "files": {p.name: p.read_text() for p in Path(folder).iterdir()}})
            return submission_id

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    local = tmp_path / "laptop-only"
    local.mkdir()
    (local / "exp.yaml").write_text("base: digits\nname: shipped\n")
    (local / "wf.yaml").write_text(WORKFLOW)
    result = run_cli("run", "--submit", "--address", "http://127.0.0.1:8265", "--json",
                                      "--config", str(local / "exp.yaml"), "--workflow", str(local / "wf.yaml"))
    assert result.exit_code == 0, result.output
    job = submitted[0]
    assert job["files"] == {"config.yaml": "base: digits\nname: shipped\n", "workflow.yaml": WORKFLOW}
    assert "--config config.yaml" in job["entrypoint"] and "--workflow workflow.yaml" in job["entrypoint"]
    assert str(local) not in job["entrypoint"]
    assert not Path(job["folder"]).exists()  # uploaded by submit_job, then removed

    preset = run_cli("run", "--submit", "--address", "http://127.0.0.1:8265")
    assert preset.exit_code == 0, preset.output
    assert "--config digits" in submitted[1]["entrypoint"] and submitted[1]["files"] == {}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submitted_job_reads_files_that_exist_only_on_the_submitting_side(ray_head, tmp_path, monkeypatch):
    """Config and workflow files in a folder deleted right after submission: the job still reads
    them (shipped in its runtime env). The workflow asks for 16 nodes (the batch of 64 divides over
    them, so the driver's batch check passes) so the job stops, exit 2, at the train step's capacity
    check, after the prepare step has written the shards where the shipped config says."""
    import shutil

    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "job-home"))
    local = tmp_path / "laptop-only"
    local.mkdir()
    data = tmp_path / "shipped-data"
    (local / "exp.yaml").write_text(f"base: digits\ndata: {{url: {data / 'train'}, holdout_url: {data / 'test'}}}\n")
    (local / "wf.yaml").write_text("train: {nodes: 16}\n")
    result = run_cli("run", "--name", "shipped", "--submit", "--address", ray_head, "--json",
                                      "--config", str(local / "exp.yaml"), "--workflow", str(local / "wf.yaml"))
    assert result.exit_code == 0, result.output
    shutil.rmtree(local)  # the job can only read its shipped copies
    job_id = cli_json(result)["job_id"]
    client = JobSubmissionClient(ray_head)
    assert str(local) not in client.get_job_info(job_id).entrypoint
    try:
        wait_until(lambda: client.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED), 300, "end of the job", interval=2)
    except AssertionError:
        raise AssertionError((client.get_job_status(job_id), client.get_job_info(job_id).message,
                              client.get_job_logs(job_id)[-3000:])) from None
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.FAILED, logs[-3000:]
    assert "--nodes 16 needs 16 CPUs" in logs, logs[-3000:]  # the shipped workflow was read
    assert (data / "train" / "manifest.json").exists(), logs[-3000:]  # the shipped config was read
