"""Pieces of the Ray-agnostic training loop that need no cluster."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import ExperimentConfig
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet
from pipelines.loop import sample_grid


@pytest.mark.timeout(120)
def test_sample_grid_caps_the_configs_steps_at_T(tmp_path):
    # A sweep over T can pick T=30 under a preset that samples with 50 DDIM steps; the run's
    # final grid must still be drawn (with 30 steps) instead of failing the trained run.
    cfg = ExperimentConfig.preset("digits").override([
        "diffusion.timesteps=30", "sample.sampler=ddim", "sample.steps=50", "model.ch=16",
        "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"])
    torch.manual_seed(0)
    model = UNet(cfg.model)
    diffusion = Diffusion.from_config(cfg.diffusion)
    with pytest.raises(ValueError):  # what the grid used to do with the config's steps
        from ddpm.samplers import generate

        generate(model, diffusion, (1, 1, 8, 8), sampler="ddim", steps=50)
    path = sample_grid(model, diffusion, cfg, str(tmp_path / "grid.png"), n=4)
    assert (tmp_path / "grid.png").stat().st_size > 0 and path.endswith("grid.png")
