"""Helpers shared by the pipeline and fault tests: tiny configs, checkpoints, CLI calls, MLflow queries.

Plain functions and constants (fixtures live in conftest.py files); imported as
``from tests.pipelines.helpers import ...`` rather than from another test module.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.sample.command import SampleRequest

N = 6  # samples per sample test: enough for several units on two workers, cheap on two cores

# A tiny U-Net and a few steps: the point is the distributed plumbing, not the model.
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
        "diffusion.timesteps=100", "train.batch_size=16", "train.log_every=1", "train.eval_every=2",
        "train.sample_every=4", "train.checkpoint_every=2", "train.warmup_steps=2"]


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def train_args(tmp_path, *extra: str, nodes: int = 4, steps: int = 4, name: str = "t1",
               storage: str | None = None) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["train", "--nodes", str(nodes), "--max-steps", str(steps), "--run-name", name,
            "--storage", storage or str(tmp_path / "storage"), "--json", *sets, *extra]


def mlflow_client():
    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    return tracking.client()


def make_checkpoint(path: str, seed: int = 0) -> str:
    """A tiny random U-Net (8x8 grey, T=50) saved with its config and EMA weights; no training."""
    import torch

    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import DiffusionConfig, ExperimentConfig, UNetConfig
    from ddpm.unet import UNet

    cfg = ExperimentConfig.preset("digits")
    cfg = replace(cfg, model=UNetConfig(image_size=8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                        attn_resolutions=(), dropout=0.0),
                  diffusion=DiffusionConfig(timesteps=50))
    torch.manual_seed(seed)
    model = UNet(cfg.model)
    with torch.no_grad():  # break the zero-initialised output layer so the network matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    save_checkpoint(path, {"config": cfg, "model": sd,
                           "ema": {"module": sd, "num_updates": 0, "decay": 0.999, "warmup": True}})
    return path


def read_npz_folder(folder) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npz"):
            with np.load(os.path.join(folder, name)) as z:
                for k, i in enumerate(z["indices"].tolist()):
                    assert i not in out, f"index {i} twice"
                    out[i] = z["x"][k]
    return out


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): provably gone."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# A tiny U-Net and a short chain for registry/evaluate tests: the point is the plumbing, not the model.
REGISTRY_TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
        "model.dropout=0.0", "diffusion.timesteps=50", "sample.batch_size=8"]


def tiny_config():
    from ddpm.config import ExperimentConfig

    return ExperimentConfig.preset("digits").override(REGISTRY_TINY)


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
    from pipelines import tracking
    from pipelines.registry import register as registry
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    ckpt = save_tiny_checkpoint(tmp_path / f"ckpt-{seed}.pt", seed)
    exp_id = tracking.experiment_id("tests", settings)
    run_id, _ = tracking.start_or_resume_run(exp_id, f"{name}-{seed}")
    version = registry.log_and_register(run_id, str(ckpt), name)
    tracking.end_run(run_id)
    return run_id, version, ckpt


FAST = {"num": 16, "sampler": "ddim", "steps": 5, "bpd_images": 8}


def request(ckpt: str, **kw) -> SampleRequest:
    """A small DDIM sampling request for ``ckpt``."""
    return SampleRequest(**{"model": ckpt, "num": N, "sampler": "ddim", "steps": 4, "batch_size": 4, **kw})
