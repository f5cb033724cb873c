"""The registered model: a pyfunc "model from code" that pickles nothing and samples in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

@pytest.fixture(autouse=True)
def _no_stale_registry_uri(monkeypatch):
    """mlflow.set_registry_uri also writes MLFLOW_REGISTRY_URI into os.environ, and
    pipelines.settings.resolve() prefers that variable: drop the previous test's store."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


# A tiny U-Net and a short chain: the point is the plumbing, not the model.
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
        "model.dropout=0.0", "diffusion.timesteps=50", "sample.batch_size=8"]


def tiny_config():
    from ddpm.config import ExperimentConfig

    return ExperimentConfig.preset("digits").override(TINY)


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny digits model saved as a training checkpoint (EMA = model)."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.ema import EMA
    from ddpm.unet import UNet

    torch.manual_seed(seed)
    model = UNet(tiny_config().model)
    with torch.no_grad():  # random, non-zero everywhere (the U-Net zero-initialises some outputs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(str(path), {"config": tiny_config(), "model": model.state_dict(),
                                "ema": EMA(model).state_dict(), "step": 7})
    return path


def register_tiny(tmp_path: Path, name: str = "tiny", seed: int = 0) -> tuple[str, str, Path]:
    """Log a tiny checkpoint into a new run of the current tracking store; returns (run_id, version, ckpt)."""
    from pipelines import registry, tracking
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    ckpt = save_tiny_checkpoint(tmp_path / f"ckpt-{seed}.pt", seed)
    exp_id = tracking.experiment_id("tests", settings)
    run_id, _ = tracking.start_or_resume_run(exp_id, f"{name}-{seed}")
    version = registry.log_and_register(run_id, str(ckpt), name)
    tracking.end_run(run_id)
    return run_id, version, ckpt


@pytest.mark.timeout(120)
def test_logged_model_is_code_plus_safetensors_and_pickles_nothing(tmp_path):
    import mlflow
    import yaml

    run_id, version, _ = register_tiny(tmp_path)
    assert version == "1"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny/1", dst_path=str(tmp_path / "dl")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".joblib"))], files
    assert "artifacts/ddpm_model/model.safetensors" in files and "artifacts/ddpm_model/config.json" in files
    assert "mlflow_model.py" in files and "code/ddpm/unet.py" in files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("mlflow_model.py")
    assert "python_model" not in flavor  # a pickled PythonModel would be named here
    doc = json.loads((local / "artifacts/ddpm_model/config.json").read_text())
    assert doc["config"]["diffusion"]["timesteps"] == 50 and doc["ddpm_version"]


@pytest.mark.timeout(180)
def test_pyfunc_loads_in_a_fresh_process_and_samples(tmp_path):
    register_tiny(tmp_path)
    from pipelines.settings import resolve

    script = textwrap.dedent("""
        import json, sys
        import mlflow
        m = mlflow.pyfunc.load_model("models:/tiny/1")
        a = m.predict({"num": 3, "seeds": [11, 12, 13], "sampler": "ddim", "steps": 4})
        b = m.predict({"num": 1, "seeds": [12], "sampler": "ddim", "steps": 4})
        c = m.predict({"num": 2, "sampler": "ddpm", "steps": 5})
        print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "same": bool((a[1] == b[0]).all()),
                          "max": int(a.max()), "ddpm_shape": list(c.shape),
                          "ddpm_in_sys_modules": "pipelines" in sys.modules}))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolve().tracking_uri, "PYTHONPATH": "",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, 8, 8, 1] and out["dtype"] == "uint8"
    assert out["same"]  # sample i depends on its seed alone, not on its batch
    assert out["max"] <= 255 and out["ddpm_shape"] == [2, 8, 8, 1]
    assert not out["ddpm_in_sys_modules"]


@pytest.mark.timeout(120)
def test_runs_and_models_uris_load_the_checkpoints_ema_weights(tmp_path):
    from ddpm.checkpoint import load_model
    from pipelines import models

    run_id, version, ckpt = register_tiny(tmp_path)
    _, reference, _ = load_model(str(ckpt), weights="ema")
    for uri in (f"runs:/{run_id}/model", f"models:/tiny/{version}", str(ckpt)):
        loaded = models.load(uri)
        sd = loaded.model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items()), uri
    assert models.load(f"models:/tiny/{version}").run_id == run_id
    from pipelines.errors import UsageError

    with pytest.raises(UsageError):
        models.load("models:/tiny/99")
