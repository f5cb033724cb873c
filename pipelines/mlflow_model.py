"""The registered model as MLflow "model from code": a pyfunc whose ``predict`` samples.

This file is logged as the model's code; ``ddpm`` travels beside it as ``code_paths``. The weights
(safetensors, EMA) and the config (JSON) are artifacts, so loading unpickles nothing of the project.

``predict`` takes a dict (or a one-row DataFrame) with ``num`` (required), and optional ``seed``,
``sampler`` (ddpm|ddim|dpmpp), ``steps``, ``eta``; it returns uint8 images (num, H, W, C).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class DDPMSampler(PythonModel):
    def load_context(self, context) -> None:
        from ddpm.checkpoint import import_weights
        from ddpm.config import ExperimentConfig
        from ddpm.diffusion import Diffusion
        from ddpm.unet import UNet

        with open(context.artifacts["config"]) as f:
            self.config = ExperimentConfig.from_dict(__import__("json").load(f))
        self.model = UNet(self.config.model)
        import_weights(self.model, context.artifacts["weights"])
        self.model.eval()
        self.diffusion = Diffusion.from_config(self.config.diffusion)

    def predict(self, context, model_input, params=None):
        import torch

        from ddpm.image import to_uint8
        from ddpm.samplers import generate

        req = dict(model_input) if isinstance(model_input, dict) else model_input.iloc[0].to_dict()
        req.update(params or {})
        num = int(req["num"])
        seed = int(req.get("seed", 0))
        steps = req.get("steps")
        m = self.config.model
        with torch.no_grad():
            x = generate(self.model, self.diffusion, (num, m.in_channels, m.image_size, m.image_size),
                         sampler=str(req.get("sampler", self.config.sample.sampler)),
                         steps=int(steps) if steps not in (None, "") else self.config.sample.steps,
                         eta=float(req.get("eta", 0.0)), seeds=seed * 1_000_003 + torch.arange(num))
        return to_uint8(x, self.config.data.levels)


mlflow.models.set_model(DDPMSampler())
