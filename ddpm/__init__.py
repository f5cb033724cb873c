"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel, 2020) in pure PyTorch.

Nothing here imports Ray, MLflow or Typer. Names are resolved lazily so ``import ddpm`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Diffusion": "ddpm.diffusion",
    "UNet": "ddpm.unet",
    "EMA": "ddpm.ema",
    "UNetConfig": "ddpm.config",
    "DiffusionConfig": "ddpm.config",
    "DataConfig": "ddpm.config",
    "TrainConfig": "ddpm.config",
    "SampleConfig": "ddpm.config",
    "ExperimentConfig": "ddpm.config",
    "ConfigError": "ddpm.config",
    "load_config": "ddpm.config",
    "make_betas": "ddpm.schedules",
    "SamplingNet": "ddpm.inference",
    "DDPMPipeline": "ddpm.pipeline",
    "ClassifierFreeGuidance": "ddpm.guidance",
    "balanced_labels": "ddpm.guidance",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
