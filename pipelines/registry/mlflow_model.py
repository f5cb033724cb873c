"""The registered model as MLflow "model from code": a pyfunc whose ``predict`` samples.

This file is logged as the model's code; ``ddpm`` travels beside it as ``code_paths``. The weights
(safetensors, EMA) and the config (JSON) are one artifact folder written by
``ddpm.checkpoint.export_weights``, so loading unpickles nothing of the project.

``predict`` takes a dict (or a one-row DataFrame) with ``num`` (required) and optionally
``seeds`` (one int per sample, or one int ``seed``: sample i then uses ``seed * 1_000_003 + i``),
``sampler`` (ddpm|ddim|dpmpp), ``steps`` and ``eta`` (each default the config's, ddpm.pipeline.sampling_settings), ``batch_size``;
a class-conditional model also takes ``class_labels`` (one class per sample, or one class for all;
none: its null class, unconditional) and ``guidance`` (w, default the config's ``sample.guidance``).
It returns uint8 images ``[num x H x W x C]`` on the data's grey levels. The logged signature
(``pipelines.registry.register.signature``) declares these columns, so pyfunc hands ``predict`` a DataFrame.

One request is bounded, so that it cannot exhaust the server's memory: ``num`` at most
:data:`MAX_NUM` (``DDPM_PREDICT_MAX_NUM`` where the model is served), ``batch_size`` at most the
config's ``sample.batch_size`` (what the model's owner set); ``steps`` (1 to T) is checked by the pipeline.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext

from ddpm.checkpoint import import_weights
from ddpm.diffusion import Diffusion
from ddpm.image import to_uint8
from ddpm.inference import SamplingNet
from ddpm.noise import sample_seed
from ddpm.pipeline import DDPMPipeline


MAX_NUM = 1024  # samples one request may ask for, unless DDPM_PREDICT_MAX_NUM says otherwise
MAX_NUM_ENV = "DDPM_PREDICT_MAX_NUM"


def _bounded(value: object, name: str, low: int, high: int, why: str) -> int:
    """``value`` as an int in ``[low, high]``, else a ValueError that says the range and why."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name}={number} is out of range: {low} to {high} ({why})")
    return number


class DDPMPyfunc(PythonModel):
    """The registered model: ``predict({"num": N, "seed": S, ...})`` samples through :class:`ddpm.pipeline.DDPMPipeline`."""

    def load_context(self, context: PythonModelContext) -> None:
        self.config, model = import_weights(context.artifacts["ddpm_model"])
        self.model = SamplingNet(model)  # as `ddpm-pipe sample` runs it: same seeds, same images
        self.diffusion = Diffusion.from_config(self.config.diffusion)

    # pd.DataFrame: a type hint MLflow takes as "no schema from hints" (the logged signature holds it)
    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        req = dict(model_input) if isinstance(model_input, dict) else model_input.iloc[0].to_dict()
        req.update(params or {})
        limit = int(os.environ.get(MAX_NUM_ENV) or MAX_NUM)
        num = _bounded(_scalar(req["num"]), "num", 1, limit,
                       f"one request's samples; ask again for more, or set {MAX_NUM_ENV} where the model is served")
        seeds = req.get("seeds", req.get("seed", 0))
        if hasattr(seeds, "__len__") and not isinstance(seeds, str):
            seeds = [int(s) for s in seeds]
            if len(seeds) != num:
                raise ValueError(f"got {len(seeds)} seeds for num={num}")
        else:
            seeds = [sample_seed(int(seeds), i) for i in range(num)]
        sampler = str(_scalar(req.get("sampler") or self.config.sample.sampler))
        steps = _scalar(req.get("steps"))  # none: the config's steps for the config's sampler (capped at T)
        batch = _scalar(req.get("batch_size"))
        eta = _scalar(req.get("eta"))  # none: the config's eta for the config's sampler, else 0
        guidance = _scalar(req.get("guidance"))
        cap = self.config.sample.batch_size
        batch = None if batch in (None, "") else _bounded(batch, "batch_size", 1, cap,
                                                          "the model config's sample.batch_size")
        pipe = DDPMPipeline.from_config(self.model, self.config, self.diffusion, sampler=sampler,
                                        steps=None if steps in (None, "") else int(steps),  # checked there: 1..T
                                        eta=None if eta in (None, "") or eta != eta else float(eta),
                                        batch_size=batch,
                                        guidance=None if _missing(guidance) else float(guidance))
        return to_uint8(pipe.from_seeds(seeds, class_labels=_labels(req.get("class_labels"), num)),
                        self.config.data.levels)


def _scalar(value: object) -> object:
    """A DataFrame cell may hold a one-element list; a dict value is used as is."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    return value


def _missing(value: object) -> bool:
    """An optional column left out: None, an empty string, or the NaN a DataFrame fills in."""
    return value is None or value == "" or (isinstance(value, float) and value != value)


def _labels(value: object, num: int) -> list[int] | None:
    """``class_labels``: one per sample, or one for all ``num``; None when left out. Checked by the
    pipeline (a class of an unconditional model or out of range: ``ValueError``)."""
    if value is None or (not hasattr(value, "__len__") and _missing(value)):
        return None
    if hasattr(value, "__len__") and not isinstance(value, str):
        labels = [int(c) for c in value]
        return labels * num if len(labels) == 1 else labels
    return [int(value)] * num


mlflow.models.set_model(DDPMPyfunc())
