"""Security: nothing is unpickled from checkpoints or registered models, and no credential reaches
MLflow, checkpoints, manifests or sample folders. Path traversal from manifests and tar members is
covered by tests/ddpm/test_data_shards.py::test_path_traversal_refused."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from pipelines.errors import UsageError
from tests.support import TINY, cli_json, run_cli


class _Exploit:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(120)
def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": "{}", "model": _Exploit(marker)}, evil)
    for name in ("a.png", "b.png"):
        from PIL import Image

        Image.new("L", (8, 8)).save(tmp_path / name)
    result = run_cli("interpolate", "--model", str(evil), "--a", str(tmp_path / "a.png"),
                                      "--b", str(tmp_path / "b.png"), "--out", str(tmp_path / "mix.png"))
    assert result.exit_code == 2, result.output
    assert "refused: not a weights-only checkpoint" in result.output
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_malicious_registered_model_is_refused_and_its_code_never_runs(tmp_path):
    """A run's model whose weights file is a pickle, next to a pickled python model: loading reads
    safetensors and JSON only, so it is refused and nothing runs."""
    import mlflow

    from pipelines import tracking
    from pipelines.registry import models
    from pipelines.settings import resolve
    from tests.support import TINY_NET, save_tiny_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "model" / "artifacts" / "ddpm_model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    from ddpm.checkpoint import load_checkpoint

    cfg = load_checkpoint(str(save_tiny_checkpoint(tmp_path / "c.pt", overrides=TINY_NET)))["config"]
    (folder / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "format_version": 1}))
    (tmp_path / "model" / "python_model.pkl").write_bytes(pickle.dumps(_Exploit(marker)))

    tracking.configure(resolve())
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("evil"), "evil")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(tmp_path / "model"), "model")
    with pytest.raises(UsageError, match="model.safetensors: not readable safetensors"):
        models.load(f"runs:/{run_id}/model")
    assert not marker.exists()


def _stored(name: str, version: str, run_id: str) -> tuple[Path, Path]:
    """Where the local artifact store keeps version ``version`` of ``name``: its model folder and the
    sha256 listing recorded at registration, files that a writer of the store (not of the registry's
    database) can change."""
    from urllib.parse import urlparse

    from pipelines.registry import digests, models
    from tests.support import mlflow_client

    c = mlflow_client()
    mv = c.get_model_version(name, version)
    model = urlparse(c.get_logged_model(models.model_id_of(mv)).artifact_location).path
    listing = Path(urlparse(c.get_run(run_id).info.artifact_uri).path) / mv.tags[digests.LISTING_TAG]
    return Path(model), listing


@pytest.mark.timeout(180)
def test_registered_files_changed_in_the_artifact_store_are_refused_before_loading(tmp_path, capsys):
    """Issue 25, item 7: registering records the sha256 of every artifact file; a file changed in the
    store afterwards (weights that still load; the listing itself) is refused with exit 2, naming it."""
    from pipelines.registry import digests, models
    from tests.support import TINY_NET, register_tiny

    run_id, version, _ = register_tiny(tmp_path, name="guarded", overrides=TINY_NET)
    uri = f"models:/guarded/{version}"
    stored, listing_file = _stored("guarded", version, run_id)
    listing = digests.parse(listing_file.read_text())
    assert {"MLmodel", "mlflow_model.py", "code/ddpm/unet.py", "artifacts/ddpm_model/model.safetensors",
            "artifacts/ddpm_model/config.json"} <= set(listing)
    assert all(listing[p] == digests.file_sha256(str(stored / p)) for p in listing)

    weights = stored / "artifacts" / "ddpm_model" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))  # still valid safetensors
    with pytest.raises(UsageError, match="artifacts/ddpm_model/model.safetensors differs from the one recorded at "
                                         "registration: the artifact store was changed after registration"):
        models.load(uri)
    result = run_cli("sample", "--model", uri, "--num", "2", "--steps", "2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "artifact store was changed after registration" in result.output
    assert not (tmp_path / "out").exists()

    weights.write_bytes(original)  # the weights back; the listing rewritten to bless a planted file
    listing_file.write_text(listing_file.read_text() + f"{'0' * 64}  planted.py\n")
    with pytest.raises(UsageError, match="listing of its files .* differs from the digest its version's tag"):
        models.load(uri)
    assert "cannot be verified" not in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_an_untouched_version_loads_and_one_registered_without_digests_loads_with_one_warning(tmp_path, capsys):
    from ddpm.checkpoint import load_model
    from pipelines.registry import digests, models
    from tests.support import TINY_NET, mlflow_client, register_tiny

    _, version, ckpt = register_tiny(tmp_path, name="plain", overrides=TINY_NET)
    uri = f"models:/plain/{version}"
    _, reference, _ = load_model(str(ckpt), weights="ema")
    for _ in range(2):  # downloaded and checked, then from the cache
        sd = models.load(uri).model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items())
    assert "warning" not in capsys.readouterr().err

    c = mlflow_client()  # as a version registered before digests were recorded
    for tag in (digests.SHA256_TAG, digests.LISTING_TAG):
        c.delete_model_version_tag("plain", version, tag)
    for _ in range(2):
        sd = models.load(uri).model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"[models] warning: {uri} was registered before ddpm-pipe recorded the sha256 of its "
                        "artifacts: its files cannot be verified; loading it unverified"]


def _files(*roots: Path):
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                yield Path(dirpath) / name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_planted_credentials_never_reach_mlflow_checkpoints_manifests_or_samples(ray_cluster, tmp_path,
                                                                               monkeypatch):
    import mlflow

    from pipelines import tracking
    from pipelines.settings import resolve

    secrets = {"AWS_SECRET_ACCESS_KEY": f"fake-aws-secret-{uuid.uuid4().hex}",
               "AWS_ACCESS_KEY_ID": f"AKIAFAKE{uuid.uuid4().hex[:12].upper()}",
               "MLFLOW_TRACKING_TOKEN": f"fake-token-{uuid.uuid4().hex}"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    sets = [x for s in TINY for x in ("--set", s)]
    result = run_cli("train", "--nodes", "1", "--max-steps", "2", "--run-name", "secret",
                                      "--storage", str(tmp_path / "storage"), "--json", *sets)
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    sampled = run_cli("sample", "--model", out["model_uri"], "--num", "2", "--steps", "2",
                                       "--out", str(tmp_path / "samples"), "--format", "npz")
    assert sampled.exit_code == 0, sampled.output

    tracking.configure(resolve())
    run = tracking.client().get_run(out["run_id"])
    logged = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=out["run_id"], dst_path=str(tmp_path / "dl")))
    files = list(_files(artifacts, Path(out["checkpoint"]), tmp_path / "storage", tmp_path / "samples",
                        Path(os.environ["DDPM_HOME"])))  # DDPM_HOME: mlflow.db, mlartifacts, data manifests
    assert any(f.name == "checkpoint.pt" for f in files) and any(f.name == "manifest.json" for f in files)
    assert any(f.name == "model.safetensors" for f in files)
    for name, value in secrets.items():
        assert value not in logged, f"{name} in the run's params/tags/metrics"
        for f in files:
            assert value.encode() not in f.read_bytes(), f"{name} written to {f}"


# -- keys never travel inside what Ray pickles (issue 17, item 1) --------------------------------
PLANTED = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY", "AWS_SECRET_ACCESS_KEY": "planted-secret",
           "AWS_SESSION_TOKEN": "planted-session-token"}
PLANTED_PASSWORD = "planted-mlflow-password"


@pytest.fixture
def planted_keys(s3_endpoint, monkeypatch):
    """S3 with a custom endpoint (the compose defaults) and planted keys in this process's environment."""
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    return PLANTED


def assert_no_secret(label: str, obj) -> None:
    """Pickle ``obj`` as Ray does (cloudpickle) and look for every planted secret in the bytes."""
    from ray import cloudpickle

    blob = cloudpickle.dumps(obj)
    for value in (*PLANTED.values(), PLANTED_PASSWORD):
        assert value.encode() not in blob, f"{value} pickled with {label}"


class _Captured(Exception):
    """Raised by the fakes below once they hold what the command was about to hand to Ray."""


def test_storage_file_system_and_train_run_config_pickle_without_keys(planted_keys, s3_prefix):
    from pipelines import cluster
    from pipelines.storage.ray_storage import ray_storage
    from pipelines.train.ray_train import run_config

    path, fs = ray_storage(f"{s3_prefix}/runs")
    assert fs is not None and fs.type_name == "s3"  # the endpoint case: our own pyarrow file system
    assert_no_secret("the storage file system", fs)
    placement = cluster.Placement(workers=2, use_gpu=False, strategy="PACK", cpus_per_worker=1.0,
                                  threads_per_worker=1)
    assert_no_secret("the train RunConfig", run_config("r", f"{s3_prefix}/runs", keep=2,
                                                       env=cluster.worker_env(placement)))


def test_file_system_built_without_keys_reads_them_from_the_environment(s3_endpoint, s3_prefix):
    """The key-less file system works: it writes through the endpoint with the environment's keys,
    also when unpickled (as in a Ray worker)."""
    import pickle

    import s3fs

    path, fs = ray_storage_of(s3_prefix)
    worker_fs = pickle.loads(pickle.dumps(fs))
    with worker_fs.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"written by a worker")
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat_file(f"{path}/probe.txt") == b"written by a worker"


def ray_storage_of(url: str):
    from pipelines.storage.ray_storage import ray_storage

    return ray_storage(url)


@pytest.mark.timeout(300)
def test_train_hands_ray_nothing_holding_keys_or_a_tracking_password(planted_keys, s3_prefix, digits_shards,
                                                                    monkeypatch, local_ray):
    """Everything ``train`` gives TorchTrainer (loop config, run config with its file system and
    worker env, scaling config) pickles without the planted AWS keys or the tracking URI's password.

    The settings resolve to a tracking URI holding ``alice:<password>@`` while MLflow itself writes
    to the local store (no server needed to see what would travel). The local Ray instance
    ``cluster.connect`` starts holds the progress channel's queue actor (``local_ray`` ends it).
    """
    import dataclasses

    import ray.train.torch

    from pipelines import cluster, settings, tracking
    from pipelines.train import command as train
    from pipelines.train.command import train_command

    def resolve_with_password(*args, **kwargs):
        real = settings.resolve(*args, **kwargs)
        return dataclasses.replace(real, tracking_uri=f"http://alice:{PLANTED_PASSWORD}@mlflow.example:5000")

    real_configure = tracking.configure
    monkeypatch.setattr(train, "resolve", resolve_with_password)
    monkeypatch.setattr(tracking, "configure", lambda _settings: real_configure(settings.resolve()))
    captured: dict = {}

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            captured.update(kwargs, args=args)
            raise _Captured

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    # cluster.connect itself: it joins the instance already up (the shared cluster, in a shuffled
    # run) or starts a "local" one; a bare ray.init() (a stub returning False left it to the queue
    # actor's auto-init) joins the head named in /tmp/ray/ray_current_cluster, which a head stopped
    # without `ray stop` leaves behind: a 300 s wait for a GCS that is gone, seen in CI
    monkeypatch.setattr(cluster, "plan", lambda *a, **k: cluster.Placement(
        workers=2, use_gpu=False, strategy="PACK", cpus_per_worker=1.0, threads_per_worker=1))
    with pytest.raises(_Captured):
        train_command(overrides=TINY, data=str(digits_shards), storage=f"{s3_prefix}/runs", nodes=2,
                      max_steps=2, run_name="planted")
    assert captured["run_config"].storage_filesystem is not None
    assert captured["train_loop_config"]["tracking_uri"] is None  # the workers read their own
    for label in ("train_loop_config", "run_config", "scaling_config", "args"):
        assert_no_secret(label, captured[label])


@pytest.mark.timeout(300)
def test_tune_hands_ray_nothing_holding_keys(planted_keys, s3_prefix, digits_shards, monkeypatch):
    """The sweep's RunConfig (what Ray writes to ``tuner.pkl`` in the bucket), TuneConfig, search
    space and the trainable's parameters pickle without the planted keys."""
    from ray import tune

    from pipelines import cluster
    from pipelines.tune.command import tune_command

    captured: dict = {}
    real_can_restore = tune.Tuner.can_restore

    class FakeTuner:
        can_restore = staticmethod(real_can_restore)

        def __init__(self, trainable, **kwargs):
            captured.update(kwargs, trainable=trainable)
            raise _Captured

    def fake_with_parameters(trainable, **kwargs):
        captured["parameters"] = kwargs
        return trainable

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(tune, "with_parameters", fake_with_parameters)
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: False)
    with pytest.raises(_Captured):
        tune_command(trials=2, overrides=[*TINY, f"data.holdout_url={digits_shards}"], data=str(digits_shards),
                     max_steps=2, concurrent=1, storage=f"{s3_prefix}/sweeps", name="planted")
    assert captured["run_config"].storage_filesystem is not None
    for label in ("run_config", "tune_config", "param_space", "parameters", "trainable"):
        assert_no_secret(label, captured[label])


# -- resuming a sweep unpickles its storage: only from a prefix the user named (item 1) -----------
def _plant_tuner_state(storage: Path, sweep: str, marker: Path) -> None:
    (storage / sweep).mkdir(parents=True)
    (storage / sweep / "tuner.pkl").write_bytes(pickle.dumps(_Exploit(marker)))


def _tune(storage: Path, data: Path, *extra: str):
    sets = [x for s in [*TINY, f"data.holdout_url={data}"] for x in ("--set", s)]
    return run_cli("tune", "--trials", "1", "--max-steps", "2", "--data", str(data),
                                    "--storage", str(storage), *sets, *extra)


@pytest.mark.timeout(120)
def test_planted_sweep_state_under_a_new_name_is_refused_and_never_unpickled(tmp_path, digits_shards):
    from pipelines import tracking
    from pipelines.settings import resolve

    marker = tmp_path / "pwned"
    _plant_tuner_state(tmp_path / "storage", "planted", marker)
    result = _tune(tmp_path / "storage", digits_shards, "--name", "planted")
    assert result.exit_code == 3, result.output
    assert "refused to resume sweep 'planted'" in result.output
    assert "this MLflow store has no sweep of that name" in result.output
    assert not marker.exists()
    tracking.configure(resolve())
    exp = tracking.client().get_experiment_by_name("digits")
    assert exp is None or tracking.find_run(exp.experiment_id, "planted") is None  # no run left behind


@pytest.mark.timeout(120)
def test_sweep_state_found_under_another_storage_than_recorded_is_refused(tmp_path, digits_shards):
    """The sweep's MLflow run records where it ran; the same --name under another --storage whose
    prefix holds Tune state (written by whoever can write there) is not resumed."""
    from pipelines import tracking
    from pipelines.settings import resolve
    from pipelines.tune.command import STORAGE_TAG

    tracking.configure(resolve())
    exp_id = tracking.experiment_id("digits")
    run_id, _ = tracking.start_or_resume_run(exp_id, "mine", {tracking.KIND_TAG: "tune"})
    tracking.client().set_tag(run_id, STORAGE_TAG, str(tmp_path / "own" / "mine"))
    marker = tmp_path / "pwned"
    _plant_tuner_state(tmp_path / "shared", "mine", marker)
    result = _tune(tmp_path / "shared", digits_shards, "--name", "mine")
    assert result.exit_code == 3, result.output
    assert f"records its storage as {tmp_path / 'own' / 'mine'}" in result.output
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_sweep_state_changed_since_its_job_left_it_is_refused(tmp_path, digits_shards):
    """Right --name, right --storage: the state there must also be what the sweep's last job left
    (the sha256 it recorded as ddpm.tune.state_sha256); planted after, it is not unpickled
    (issue 25, item 8)."""
    from pipelines import tracking
    from pipelines.settings import resolve
    from pipelines.storage.ray_storage import ray_storage
    from pipelines.tune.command import STORAGE_TAG

    tracking.configure(resolve())
    exp_id = tracking.experiment_id("digits")
    storage = tmp_path / "storage"
    run_id, _ = tracking.start_or_resume_run(exp_id, "mine", {tracking.KIND_TAG: "tune"})
    tracking.client().set_tag(run_id, STORAGE_TAG, f"{ray_storage(str(storage))[0].rstrip('/')}/mine")
    tracking.client().set_tag(run_id, "ddpm.tune.state_sha256", "0" * 64)  # what its job left
    marker = tmp_path / "pwned"
    _plant_tuner_state(storage, "mine", marker)  # written there since
    result = _tune(storage, digits_shards, "--name", "mine")
    assert result.exit_code == 3, result.output
    assert "not what this sweep's last job left" in result.output
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_sweep_state_under_a_generated_name_is_never_resumed(tmp_path, digits_shards, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    marker = tmp_path / "pwned"
    _plant_tuner_state(tmp_path / "storage", "digits-tune-20260101-000000", marker)
    result = _tune(tmp_path / "storage", digits_shards)
    assert result.exit_code == 3, result.output
    assert "not given with --name" in result.output
    assert not marker.exists()


# -- credentials inside URIs are masked wherever printed or logged (item 10) ----------------------
CREDENTIALED_URI = f"http://alice:{PLANTED_PASSWORD}@mlflow.example:5000"


def test_redact_masks_credentials_inside_any_url():
    from pipelines.settings import redact

    text = (f"store {CREDENTIALED_URI}/api, head https://bob:pw@head:8265 and s3://bucket/key, "
            "sqlite:////home/me@work/mlflow.db, http://host:5000")
    assert redact(text) == ("store http://***@mlflow.example:5000/api, head https://***@head:8265 and "
                            "s3://bucket/key, sqlite:////home/me@work/mlflow.db, http://host:5000")


@pytest.mark.timeout(120)
def test_cli_error_never_prints_a_url_password():
    result = run_cli("run", "--submit", "--address",
                                      f"http://alice:{PLANTED_PASSWORD}@127.0.0.1:1")
    assert result.exit_code == 2, result.output
    assert "cannot reach the Ray Jobs API at http://***@127.0.0.1:1" in result.output
    assert PLANTED_PASSWORD not in result.output


class FakeJobClient:
    """Stands in for ``JobSubmissionClient``: records each submission (and what its working dir held)."""

    submitted: list[dict] = []

    def __init__(self, address: str):
        self.address = address

    def submit_job(self, entrypoint: str, runtime_env: dict, submission_id: str) -> str:
        folder = Path(runtime_env["working_dir"])
        files = {p.name: p.read_text() for p in folder.iterdir()}
        FakeJobClient.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env, "files": files})
        return submission_id


@pytest.fixture
def fake_jobs(monkeypatch):
    import ray.job_submission

    FakeJobClient.submitted = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    return FakeJobClient.submitted


def test_submitted_job_env_holds_no_credentials_and_the_output_masks_the_address(fake_jobs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", CREDENTIALED_URI)
    result = run_cli("run", "--submit", "--json", "--address",
                                      f"http://alice:{PLANTED_PASSWORD}@127.0.0.1:8265")
    assert result.exit_code == 0, result.output
    assert PLANTED_PASSWORD not in result.output and "http://***@127.0.0.1:8265" in result.output
    env = fake_jobs[0]["runtime_env"]["env_vars"]
    assert "MLFLOW_TRACKING_URI" not in env  # the cluster's own is used
    assert not set(env) & set(PLANTED)
    assert_no_secret("the job's runtime env", fake_jobs[0])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # nothing secret: it travels when asked
    assert run_cli("run", "--submit", "--address", "http://127.0.0.1:8265",
                   "--env", "MLFLOW_TRACKING_URI").exit_code == 0
    assert fake_jobs[1]["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    # Asked for, a credential is refused rather than sent (issue 25, item 10)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", CREDENTIALED_URI)
    refused = run_cli("run", "--submit", "--address", "http://127.0.0.1:8265", "--env", "MLFLOW_TRACKING_URI")
    assert refused.exit_code == 2 and PLANTED_PASSWORD not in refused.output, refused.output
    assert len(fake_jobs) == 2


def test_sampling_actors_env_holds_no_tracking_password(monkeypatch):
    import mlflow

    from pipelines.sample.pool import worker_env

    mlflow.set_tracking_uri(CREDENTIALED_URI)
    mlflow.set_registry_uri(CREDENTIALED_URI)
    assert "MLFLOW_TRACKING_URI" not in worker_env("models:/m/1")
    mlflow.set_tracking_uri("http://mlflow.example:5000")
    mlflow.set_registry_uri("http://mlflow.example:5000")
    assert worker_env("models:/m/1")["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


@pytest.mark.timeout(300)
def test_workflow_summary_masks_the_tracking_uri_password(monkeypatch):
    """``run``'s summary names the MLflow store; with ``user:pass@`` in it, the password is masked.
    The steps are stubbed: this checks the summary, not the steps."""
    import dataclasses

    from pipelines import settings, tracking, workflow
    from pipelines.storage import data
    from pipelines.registry import evaluate, promote
    from pipelines.sample import command as sample
    from pipelines.train import command as train

    real_resolve, real_configure = settings.resolve, tracking.configure
    monkeypatch.setattr(workflow, "resolve", lambda *a, **k: dataclasses.replace(
        real_resolve(*a, **k), tracking_uri=CREDENTIALED_URI))
    monkeypatch.setattr(tracking, "configure", lambda _s: real_configure(real_resolve()))
    uri = "models:/ddpm-digits/1"
    monkeypatch.setattr(data, "ensure_prepared", lambda *a, **k: None)
    monkeypatch.setattr(workflow, "_manifest_digest", lambda url: "d")
    monkeypatch.setattr(workflow, "_log_step", lambda *a, **k: None)
    monkeypatch.setattr(workflow, "_grid", lambda *a, **k: "grid.png")
    monkeypatch.setattr(train, "train_command", lambda **k: {
        "run_id": "r", "model_uri": uri, "version": "1", "registered_model": "ddpm-digits",
        "checkpoint": "c", "metrics": {"loss": 0.1}})
    monkeypatch.setattr(evaluate, "evaluate_command", lambda **k: {
        "bpd": 1.0, "scores": {"fd": 1.0}, "floors": {"fd": 0.5}, "sec_per_sample": 0.1})
    monkeypatch.setattr(promote, "promote_command", lambda **k: {"message": "promoted"})
    monkeypatch.setattr(sample, "sample_command", lambda **k: {"out": "out", "manifest": "m"})
    result = run_cli("run", "--name", "summary")
    assert result.exit_code == 0, result.output
    assert "MLflow store     : http://***@mlflow.example:5000" in result.output
    assert PLANTED_PASSWORD not in result.output
    assert PLANTED_PASSWORD not in workflow.run_command(name="summary")["message"]  # also for library callers


def test_a_sweep_whose_run_records_this_storage_may_be_resumed(tmp_path):
    """The gate's other side: the sweep's own parent run, recording the same location, lets it pass
    (the full resume: tests/pipelines/test_tune.py::test_tune_sweep_nested_runs_best_config_trains_and_resumes)."""
    from pipelines import tracking
    from pipelines.errors import RefusedError
    from pipelines.settings import resolve
    from pipelines.tune.command import STORAGE_TAG, check_resumable

    tracking.configure(resolve())
    exp_id = tracking.experiment_id("digits")
    run_id, _ = tracking.start_or_resume_run(exp_id, "mine", {tracking.KIND_TAG: "tune"})
    tracking.client().set_tag(run_id, STORAGE_TAG, str(tmp_path / "storage" / "mine"))
    check_resumable(exp_id, "mine", str(tmp_path / "storage" / "mine"), named=True)
    with pytest.raises(RefusedError, match="not given with --name"):
        check_resumable(exp_id, "mine", str(tmp_path / "storage" / "mine"), named=False)


def test_a_config_name_that_leaves_its_folder_is_refused_wherever_the_config_comes_from(tmp_path):
    """``ExperimentConfig.name`` becomes an MLflow experiment and a folder (``mlartifacts/<name>``):
    a checkpoint's or a registered model's own config is checked like a name typed on the command line
    (issue 25, item 9)."""
    from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ddpm.config import ConfigError, ExperimentConfig
    from ddpm.unet import UNet
    from tests.support import TINY_NET, tiny_config

    base = ExperimentConfig.preset("digits").to_dict()
    for bad in ("../..", "../../escape", "a/b", ".hidden", "it's", "", "x" * 129):
        with pytest.raises(ConfigError, match="not a valid experiment name"):
            ExperimentConfig.from_dict({**base, "name": bad})
    for good in ("digits", "cifar10", "my_exp-2.1"):
        assert ExperimentConfig.from_dict({**base, "name": good}).name == good
    cfg = tiny_config(TINY_NET)
    text = cfg.to_json().replace('"name": "digits"', '"name": "../../escape"')
    assert '"../../escape"' in text
    save_checkpoint(str(tmp_path / "c.pt"), {"config": text, "model": UNet(cfg.model).state_dict()})
    with pytest.raises(CheckpointError, match="not a valid experiment name"):
        load_checkpoint(str(tmp_path / "c.pt"))


def test_one_predict_request_cannot_ask_for_unbounded_work(tmp_path, monkeypatch):
    """The served model bounds ``num`` (DDPM_PREDICT_MAX_NUM, 1024 by default) and ``batch_size``
    (the config's sample.batch_size) before it samples anything (issue 25, item 9)."""
    from types import SimpleNamespace

    from ddpm.checkpoint import export_weights
    from ddpm.unet import UNet
    from pipelines.registry import mlflow_model
    from tests.support import TINY_NET, tiny_config

    cfg = tiny_config([*TINY_NET, "sample.batch_size=8"])
    export_weights(UNet(cfg.model), str(tmp_path / "w"), cfg)
    model = mlflow_model.DDPMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"ddpm_model": str(tmp_path / "w")}))
    assert model.predict(None, {"num": 2, "sampler": "ddim", "steps": 2, "batch_size": 8}).shape[0] == 2

    class _NoSampling:
        @staticmethod
        def from_config(*args, **kwargs):
            raise AssertionError("an out-of-bounds request reached the sampler")

    monkeypatch.setattr(mlflow_model, "DDPMPipeline", _NoSampling)
    for request, message in (({"num": 1025}, "num=1025 is out of range: 1 to 1024"),
                             ({"num": 0}, "num=0 is out of range"),
                             ({"num": "many"}, "num must be an integer"),
                             ({"num": 2, "batch_size": 10**9}, "batch_size=1000000000 is out of range: 1 to 8"),
                             ({"num": 2, "batch_size": 0}, "batch_size=0 is out of range")):
        with pytest.raises(ValueError, match=message):
            model.predict(None, request)
    monkeypatch.setenv("DDPM_PREDICT_MAX_NUM", "4")
    with pytest.raises(ValueError, match="num=5 is out of range: 1 to 4"):
        model.predict(None, {"num": 5})
