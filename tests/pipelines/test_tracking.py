"""What a run carries in MLflow: provenance, the experiment's kind, its data as a dataset, stepped images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import mlflow_client

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def digits_train(tmp_path_factory) -> Path:
    from pipelines.storage.data import prepare_command

    out = tmp_path_factory.mktemp("digits") / "train"
    prepare_command(source="digits", out=str(out), split="train", shard_size=600)
    return out


@pytest.mark.timeout(60)
def test_runs_carry_user_source_and_the_projects_git_commit(monkeypatch):
    from pipelines import tracking

    c = mlflow_client()
    monkeypatch.setattr("sys.argv", ["/somewhere/.venv/bin/ddpm-pipe", "train", "--max-steps", "5"])
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("prov"), "p1", {tracking.KIND_TAG: "train"})
    tags = c.get_run(run_id).data.tags
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.returncode == 0, head.stderr  # the tests run in a checkout
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.source.name"] == "ddpm-pipe train"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags[tracking.KIND_TAG] == "train" and tags["mlflow.runName"] == "p1"


@pytest.mark.timeout(60)
def test_outside_a_checkout_the_commit_comes_from_the_image(monkeypatch):
    from pipelines import tracking

    monkeypatch.setattr("mlflow.utils.git_utils.get_git_commit", lambda path: None)  # no .git (an image)
    assert "mlflow.source.git.commit" not in tracking.provenance_tags()
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "0123abc")
    assert tracking.provenance_tags()["mlflow.source.git.commit"] == "0123abc"


@pytest.mark.timeout(60)
def test_experiments_open_as_model_training_in_the_ui():
    from pipelines import tracking

    c = mlflow_client()
    new = tracking.experiment_id("kind-new")
    assert c.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # its artifacts live under DDPM_HOME even when no settings were passed, never in ./mlruns of the cwd
    from pipelines.settings import resolve

    assert c.get_experiment(new).artifact_location == (resolve().home / "mlartifacts" / "kind-new").as_uri()
    old = c.create_experiment("kind-old")  # made before the tag existed: tagged on next use
    assert tracking.experiment_id("kind-old") == old
    assert c.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    mine = c.create_experiment("kind-mine", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    tracking.experiment_id("kind-mine")  # a kind someone chose stays
    assert c.get_experiment(mine).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


@pytest.mark.timeout(120)
def test_training_data_is_an_mlflow_dataset_with_the_manifests_digest_and_counts(digits_train):
    from pipelines import tracking

    c = mlflow_client()
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("data"), "d1")
    manifest = json.loads((digits_train / "manifest.json").read_text())
    first = tracking.log_dataset(run_id, str(digits_train), "training")
    tracking.log_dataset(run_id, str(digits_train), "training")  # a resumed run logs it again
    tracking.log_dataset(run_id, first, "training")  # the entity, reused (as tune's trials do)
    inputs = c.get_run(run_id).inputs.dataset_inputs
    contexts = [t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"]
    assert contexts == ["training"]  # one input per dataset, not per call
    ds = inputs[0].dataset
    assert ds.name == "digits-train" and ds.digest == tracking.manifest_digest(manifest) == first.digest
    assert json.loads(ds.source) == {"uri": str(digits_train)} and ds.source_type == "local"
    profile = json.loads(ds.profile)
    assert profile["num_samples"] == manifest["num_samples"] == 1437  # the digits training split
    assert profile["shards"] == len(manifest["shards"]) == 3 and profile["shape"] == [1, 8, 8]
    assert "image" in ds.schema
    with pytest.raises(ValueError, match="context"):
        tracking.log_dataset(run_id, first, "train")


@pytest.mark.timeout(60)
def test_s3_data_is_an_s3_source():
    from pipelines import tracking

    manifest = {"source": "digits", "split": "test", "shape": [1, 8, 8], "num_samples": 1, "levels": 17,
                "shards": [{"name": "test-000000.tar", "num_samples": 1, "sha256": "0" * 64, "size": 10}]}
    ds = tracking.dataset("s3://bucket/digits/test", manifest)
    assert ds.source_type == "s3" and json.loads(ds.source) == {"uri": "s3://bucket/digits/test"}
    assert ds.name == "digits-test" and json.loads(ds.profile)["bytes"] == 10


@pytest.mark.timeout(120)
def test_sample_grids_are_stepped_mlflow_images(tmp_path):
    from PIL import Image

    from pipelines import tracking
    from pipelines.train.async_logger import AsyncLogger

    c = mlflow_client()
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("images"), "i1")
    logger = AsyncLogger(run_id)
    for step in (10, 20):
        path = tmp_path / f"samples_step{step:07d}.png"
        Image.new("L", (18, 18), color=step).save(path)
        logger.log_image(path, "samples", step)
    stats = logger.close()
    assert stats["dropped"] == 0, stats
    images = [a.path for a in c.list_artifacts(run_id, "images")]
    full = sorted(p for p in images if p.endswith(".png"))
    assert [p.split("+step+")[1].split("+")[0] for p in full] == ["10", "20"], images
    assert all(p.startswith("images/training~samples+step+") for p in full)  # image "training/samples"
    assert {a.path for a in c.list_artifacts(run_id, "samples")} == {
        "samples/samples_step0000010.png", "samples/samples_step0000020.png"}  # the files, as before
    assert c.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_a_run_of_one_name_that_records_another_storage_is_refused():
    """MLflow knows a run by experiment and name, the train lock by storage and name: the run records
    its storage (``ddpm.storage``) and a job of the same name with another one is refused (exit 3)
    instead of resuming it (issue 25, item 2)."""
    from pipelines import tracking
    from pipelines.errors import RefusedError
    from pipelines.settings import resolve

    tracking.configure(resolve())
    exp_id = tracking.experiment_id("claims")
    run_id, resumed = tracking.start_or_resume_run(exp_id, "r", claim={tracking.STORAGE_TAG: "/a/r"})
    assert not resumed and mlflow_client().get_run(run_id).data.tags[tracking.STORAGE_TAG] == "/a/r"
    assert tracking.start_or_resume_run(exp_id, "r", claim={tracking.STORAGE_TAG: "/a/r"}) == (run_id, True)
    with pytest.raises(RefusedError, match="another job's run"):
        tracking.start_or_resume_run(exp_id, "r", claim={tracking.STORAGE_TAG: "/b/r"})
