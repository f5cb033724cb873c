"""One masking function (``pipelines.settings.redact``) for every kind of credential, applied at every
sink: what is printed, what MLflow stores, the files this tool writes and what Ray pickles into sweep
state (issue 25, item 6)."""

from __future__ import annotations

import json

import pytest

from tests.support import tiny_config

SLASHED_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key: it has '/'
PASSWORD = "planted-pass/word"
CREDENTIALED = f"https://alice:{PASSWORD}@data.example/digits/train"
PRESIGNED = ("https://b.s3.amazonaws.com/m.json?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1&X-Amz-Signature=deadbeefsig"
             "&X-Amz-Security-Token=planted-session-token&x-id=GetObject")
SECRETS = (SLASHED_SECRET, PASSWORD, "AKIAEXAMPLE", "deadbeefsig", "planted-session-token")


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} in {text[:300]}"


def test_redact_masks_a_password_with_a_slash_signed_queries_and_secret_values_in_any_form(monkeypatch):
    from urllib.parse import quote

    from pipelines.settings import redact, shareable_uri

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SLASHED_SECRET)
    assert redact(f"s3://AKIAEXAMPLE:{SLASHED_SECRET}@bucket/key") == "s3://***@bucket/key"
    assert redact(CREDENTIALED) == "https://***@data.example/digits/train"
    masked = redact(PRESIGNED)
    assert masked.endswith("X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&x-id=GetObject")
    assert masked.startswith("https://b.s3.amazonaws.com/m.json?X-Amz-Algorithm=AWS4-HMAC-SHA256")
    assert redact(f"key={SLASHED_SECRET} or {quote(SLASHED_SECRET, safe='')}") == "key=*** or ***"
    # what is not a credential stays: a port, an @ in a path, sqlite's absolute path
    for text in ("http://host:5000/a@b", "https://host/p/img@2x.png?size=2", "sqlite:////home/me@work/mlflow.db"):
        assert redact(text) == text
    for uri in (f"s3://AKIAEXAMPLE:{SLASHED_SECRET}@bucket/key", CREDENTIALED, PRESIGNED):
        assert shareable_uri(uri) is None, uri
    assert shareable_uri("http://mlflow.example:5000") == "http://mlflow.example:5000"


@pytest.mark.timeout(300)
def test_mlflow_stores_tags_descriptions_and_dataset_sources_masked(tmp_path, digits_shards):
    """Every write goes through the package's client: run tags at creation, later tags, the dataset's
    source, a version's tags and description (the sinks of tracking, tune, evaluate, register and
    import-diffusers)."""
    from pipelines import tracking
    from pipelines.settings import resolve
    from pipelines.tune.command import STORAGE_TAG

    tracking.configure(resolve())
    c = tracking.client()
    exp_id = tracking.experiment_id("masking")
    run_id, _ = tracking.start_or_resume_run(exp_id, "r", {"ddpm.model_uri": PRESIGNED, "ddpm.source": CREDENTIALED})
    c.set_tag(run_id, STORAGE_TAG, f"s3://AKIAEXAMPLE:{SLASHED_SECRET}@bucket/sweeps")
    from ddpm.data.manifest import read_manifest

    entity = tracking.dataset(CREDENTIALED, read_manifest(str(digits_shards)))
    tracking.log_dataset(run_id, entity, "training")
    c.create_registered_model("masked")
    mv = c.create_model_version("masked", f"runs:/{run_id}/model", run_id, tags={"src": CREDENTIALED},
                                description=f"trained on {CREDENTIALED}")
    c.set_model_version_tag("masked", mv.version, "data", PRESIGNED)
    c.update_model_version("masked", mv.version, f"from {PRESIGNED}")
    run = c.get_run(run_id)
    version = c.get_model_version("masked", mv.version)
    stored = json.dumps([run.data.tags, [i.dataset.source for i in run.inputs.dataset_inputs],
                         version.tags, version.description])
    _clean(stored)
    assert "https://***@data.example/digits/train" in stored and "X-Amz-Signature=***" in stored
    _clean(entity.source)  # the entity itself (Ray pickles it; the sweep callback keeps it) is masked too


def test_what_tune_pickles_into_tuner_pkl_holds_no_data_url_credential():
    """The sweep callback and the table callback travel in the RunConfig that Ray writes to tuner.pkl;
    the config and the dataset entity they hold carry the --data URL."""
    from mlflow.entities import Dataset
    from ray import cloudpickle

    from pipelines.tune import command

    cfg = tiny_config().with_values({"data.url": CREDENTIALED, "data.holdout_url": PRESIGNED})
    entity = Dataset(name="digits-train", digest="d", source_type="http", source=json.dumps({"url": CREDENTIALED}))
    blobs = [cloudpickle.dumps(command.SweepCallback("0", "parent", "sweep", cfg, 4, None, entity))]
    if hasattr(command, "sweep_callbacks"):  # what tune_command hands to Ray (absent before the fix)
        callbacks = command.sweep_callbacks("0", "parent", "sweep", cfg, 4, None, entity)
        assert [type(c).__name__ for c in callbacks] == ["SweepCallback", "TableCallback"]
        blobs.append(cloudpickle.dumps(callbacks))
    for blob in blobs:
        for secret in SECRETS:
            assert secret.encode() not in blob, secret
    assert hasattr(command, "sweep_callbacks")


@pytest.mark.timeout(300)
def test_checkpoints_keep_the_config_with_its_data_url_masked(tmp_path, digits_shards):
    """The config saved in every checkpoint (and so in the registered model's config.json): its
    ``data.url`` masked; the loop itself reads the data it was given."""
    from ddpm.checkpoint import load_checkpoint, save_checkpoint
    from pipelines.train.loop import LoopContext, LoopData, train_loop
    from tests.support import TINY_NET

    cfg = tiny_config([*TINY_NET, "train.batch_size=4", "train.max_steps=1", "train.checkpoint_every=1",
                       "train.eval_every=5", "train.sample_every=5", "train.log_every=1"])
    states = []
    ctx = LoopContext(report=lambda metrics, state: states.append(state) if state is not None else None,
                      log=lambda line: None)
    train_loop(cfg.with_values({"data.url": CREDENTIALED}), LoopData(url=str(digits_shards)), ctx)
    save_checkpoint(str(tmp_path / "c.pt"), states[-1])
    _clean((tmp_path / "c.pt").read_bytes().decode("latin-1"))
    assert load_checkpoint(str(tmp_path / "c.pt"))["config"].data.url == "https://***@data.example/digits/train"


@pytest.mark.timeout(300)
def test_a_registered_models_config_json_and_description_hold_the_data_url_masked(tmp_path):
    """A config whose ``data.url`` holds a credential (an old checkpoint's, import-diffusers' own)
    goes into the model's ``config.json`` and the version's description masked."""
    import mlflow

    from ddpm.unet import UNet
    from pipelines import tracking
    from pipelines.registry import register
    from pipelines.settings import resolve

    tracking.configure(resolve())
    cfg = tiny_config().with_values({"data.url": CREDENTIALED})
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("masking"), "registered")
    version = register.log_model(run_id, cfg, UNet(cfg.model), "masked-model", metadata={"path": PRESIGNED})
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/masked-model/{version}",
                                                dst_path=str(tmp_path / "dl"))
    config_json = (tmp_path / "dl" / "artifacts" / "ddpm_model" / "config.json").read_text()
    mlmodel = (tmp_path / "dl" / "MLmodel").read_text()
    description = tracking.client().get_model_version("masked-model", version).description
    assert local and "https://***@data.example/digits/train" in config_json + description
    for text in (config_json, mlmodel, description):
        _clean(text)


def test_console_lines_sample_records_and_evaluation_reports_are_masked(capsys):
    from pipelines import console
    from pipelines.sample.command import _identity
    from pipelines.sample.request import SampleRequest

    console.info(f"[ray] connected to {CREDENTIALED}")
    bar = console.Progress("sample", 1, "sample")
    bar.suffix = f" -> {PRESIGNED}"
    bar.update(1)
    _clean(capsys.readouterr().err)
    req = SampleRequest(model=f"s3://AKIAEXAMPLE:{SLASHED_SECRET}@bucket/c.pt", num=1, sampler="ddim", steps=1,
                        eta=0.0)
    _clean(json.dumps(_identity(req, "png", {})))


def test_submit_refuses_a_credential_in_the_jobs_command_line(monkeypatch):
    from tests.support import run_cli

    result = run_cli("run", "--submit", "--address", "http://127.0.0.1:1", "--set", f"data.url={CREDENTIALED}")
    assert result.exit_code == 2, result.output
    assert "holds a credential" in result.output
    _clean(result.output)
