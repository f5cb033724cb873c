"""Logging a trained model to MLflow as a pyfunc and registering it as a model version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ddpm

MODEL_ARTIFACT = "model"


def log_and_register(run_id: str, checkpoint_path: str, name: str | None) -> str | None:
    """Log the checkpoint's EMA weights and config as the run's pyfunc model; register it as ``name``.

    Returns the new version number (as a string), or None when ``name`` is empty.
    """
    import mlflow

    from ddpm.checkpoint import export_weights, load_checkpoint
    from ddpm.config import ExperimentConfig
    from ddpm.unet import UNet

    state = load_checkpoint(checkpoint_path)
    cfg = ExperimentConfig.from_dict(json.loads(state["config"]))
    model = UNet(cfg.model)
    model.load_state_dict(_ema_weights(state))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        export_weights(model, str(weights))
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(cfg.to_dict(), indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(Path(ddpm.__file__).parent)],
                pip_requirements=[f"torch>={_torch_floor()}", "numpy", "pillow", "pyyaml", "safetensors"],
                registered_model_name=name or None,
                metadata={"ddpm_version": ddpm.__version__, "step": int(state["step"])},
            )
            mlflow.log_artifact(checkpoint_path, "checkpoint")
    return str(info.registered_model_version) if name else None


def _ema_weights(state: dict) -> dict:
    """The EMA model's parameters as a plain UNet state dict."""
    ema = state["ema"]
    sd = ema.get("module", ema) if isinstance(ema, dict) else ema
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()
            if k != "n_averaged" and not k.endswith("n_averaged")}


def _torch_floor() -> str:
    return "2.11"
