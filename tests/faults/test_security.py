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
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import UsageError
from tests.pipelines.test_train import TINY


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
    result = CliRunner().invoke(app, ["interpolate", "--model", str(evil), "--a", str(tmp_path / "a.png"),
                                      "--b", str(tmp_path / "b.png"), "--out", str(tmp_path / "mix.png")])
    assert result.exit_code == 2, result.output
    assert "refused: not a weights-only checkpoint" in result.output
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_malicious_registered_model_is_refused_and_its_code_never_runs(tmp_path):
    """A run's model whose weights file is a pickle, next to a pickled python model: loading reads
    safetensors and JSON only, so it is refused and nothing runs."""
    import mlflow

    from pipelines import models, tracking
    from pipelines.settings import resolve
    from tests.pipelines.test_sample import make_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "model" / "artifacts" / "ddpm_model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    from ddpm.checkpoint import load_checkpoint

    cfg = load_checkpoint(make_checkpoint(str(tmp_path / "c.pt")))["config"]
    (folder / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "format_version": 1}))
    (tmp_path / "model" / "python_model.pkl").write_bytes(pickle.dumps(_Exploit(marker)))

    tracking.configure(resolve())
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("evil"), "evil")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(tmp_path / "model"), "model")
    with pytest.raises(UsageError, match="model.safetensors: not readable safetensors"):
        models.load(f"runs:/{run_id}/model")
    assert not marker.exists()


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
    result = CliRunner().invoke(app, ["train", "--nodes", "1", "--max-steps", "2", "--run-name", "secret",
                                      "--storage", str(tmp_path / "storage"), "--json", *sets])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    sampled = CliRunner().invoke(app, ["sample", "--model", out["model_uri"], "--num", "2", "--steps", "2",
                                       "--out", str(tmp_path / "samples"), "--format", "npz"])
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
