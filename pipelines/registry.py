"""Logging a model to MLflow as a pyfunc "model from code" and registering it as a model version.

What is logged under the run's model ``model``::

    MLmodel                      python_function flavor, loader from code (mlflow_model.py)
    mlflow_model.py              the pyfunc: predict(num, seeds, sampler, steps, eta) -> images
    code/ddpm/                   the package's source (code_paths), so loading needs no install
    artifacts/ddpm_model/        model.safetensors (EMA weights) + config.json, see ddpm.checkpoint

Nothing of the project is pickled: weights are safetensors, the config is JSON, the model is code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ddpm

MODEL_ARTIFACT = "model"  # the model's name within its run: runs:/RUN_ID/model
WEIGHTS_ARTIFACT = "ddpm_model"  # the pyfunc artifact key (and folder) of the exported weights


def log_model(run_id: str, config: Any, model: Any, name: str | None,
              metadata: dict[str, Any] | None = None) -> str | None:
    """Log ``model`` (a ``ddpm.unet.UNet``) with its ``ExperimentConfig`` as the run's pyfunc model.

    Registers it as a new version of ``name`` unless ``name`` is empty. Returns the version number
    (as a string), or None when not registered.
    """
    import mlflow

    from ddpm.checkpoint import export_weights

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / WEIGHTS_ARTIFACT
        export_weights(model, str(folder), config)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={WEIGHTS_ARTIFACT: str(folder)},
                code_paths=[str(Path(ddpm.__file__).parent)],
                pip_requirements=_requirements(),
                registered_model_name=name or None,
                metadata={"ddpm_version": ddpm.__version__, **(metadata or {})},
            )
    return str(info.registered_model_version) if name else None


def log_and_register(run_id: str, checkpoint_path: str, name: str | None) -> str | None:
    """Log a training checkpoint's EMA weights and config as the run's model; register it as ``name``.

    The checkpoint file itself is logged too (``checkpoint/``). Returns the new version or None.
    """
    import mlflow

    from ddpm.checkpoint import load_model, load_checkpoint

    config, model, _ = load_model(checkpoint_path, weights="ema")
    step = int(load_checkpoint(checkpoint_path).get("step", 0))
    version = log_model(run_id, config, model, name, metadata={"step": step})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(checkpoint_path, "checkpoint")
    return version


def _requirements() -> list[str]:
    """Pinned to the major.minor versions this package was logged with."""
    import numpy
    import safetensors
    import torch

    def floor(version: str) -> str:
        return ".".join(version.split("+")[0].split(".")[:2])

    return [f"torch>={floor(torch.__version__)}", f"numpy>={floor(numpy.__version__)}",
            f"safetensors>={floor(safetensors.__version__)}", "pyyaml", "fsspec"]
