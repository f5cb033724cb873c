"""Samplers by name: the choices (named once, in :data:`ddpm.config.Sampler`), their defaults, and
:func:`make_sampler` / :func:`generate`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import torch

from ddpm.config import SampleConfig, Sampler, Spacing
from ddpm.diffusion import Diffusion, Model, Progress
from ddpm.samplers.ancestral import AnalyticDDPMSampler, DDPMSampler
from ddpm.samplers.base import DEFAULT_SPACING, DEFAULT_STEPS, Stepper, run_loop
from ddpm.samplers.ddim import DDIMSampler, check_eta
from ddpm.samplers.dpm_solver import DPMSolverPP3MSampler, DPMSolverPPSampler, SDEDPMSolverPPSampler
from ddpm.samplers.edm import EDMSampler
from ddpm.samplers.unipc import UniPCSampler

SAMPLERS: tuple[str, ...] = get_args(Sampler)  # named once, in ddpm.config
# The samplers that take (diffusion, steps, spacing); ddpm and ddim have their own arguments.
_SOLVERS = {"dpmpp": DPMSolverPPSampler, "dpmpp-3m": DPMSolverPP3MSampler, "unipc": UniPCSampler,
            "dpmpp-2m-sde": SDEDPMSolverPPSampler, "edm": EDMSampler}


def default_steps(sampler: str, num_timesteps: int, preferred: int | None = None) -> int:
    """Model calls to make when the caller asked for no particular number: ``preferred`` (a
    config's ``sample.steps``) or else the sampler's default (:data:`DEFAULT_STEPS`; T for ddpm),
    capped at T, so that a model with a small T (a tuning sweep can pick one) still samples."""
    steps = preferred if preferred is not None else DEFAULT_STEPS.get(sampler, num_timesteps)
    return min(int(steps), num_timesteps)


def default_spacing(sampler: str) -> Spacing:
    """The sampler's own timestep spacing (:data:`DEFAULT_SPACING`; linspace where not listed)."""
    return DEFAULT_SPACING.get(sampler, "linspace")


def config_spacing(sample: SampleConfig, sampler: str) -> Spacing:
    """The spacing a model whose config has sample section ``sample`` samples with under ``sampler``:
    the section's own ``spacing`` for the section's own sampler, else the sampler's default."""
    return (sample.spacing if sampler == sample.sampler else None) or default_spacing(sampler)


def check_sampler(sampler: str, eta: float = 0.0) -> None:
    """``ValueError`` naming the valid samplers, or an ``eta`` the sampler does not take (:func:`check_eta`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    check_eta(eta, sampler)


def make_sampler(diffusion: Diffusion, sampler: str, steps: int | None = None, eta: float = 0.0,
                 spacing: Spacing | None = None, ms_eps: torch.Tensor | Sequence[float] | None = None) -> Stepper:
    """The sampler object named ``sampler`` with ``steps`` model calls (default: :func:`default_steps`)
    on ``spacing`` (default: :func:`default_spacing`).

    ``ms_eps`` (Gamma_t per training timestep, :func:`ddpm.samplers.estimate_ms_eps`) gives ``ddpm``
    Analytic-DPM's optimal variance (:class:`AnalyticDDPMSampler`); the other samplers refuse it.
    """
    check_sampler(sampler, eta)
    if ms_eps is not None and sampler != "ddpm":
        raise ValueError(f"ms_eps (Analytic-DPM's reverse variance) only applies to the ddpm sampler, not {sampler!r}")
    if steps is None:
        steps = default_steps(sampler, diffusion.num_timesteps)
    spacing = spacing or default_spacing(sampler)
    if sampler == "ddpm":
        if ms_eps is not None:
            return AnalyticDDPMSampler(diffusion, ms_eps, steps, spacing)
        return DDPMSampler(diffusion, steps, spacing)
    if sampler == "ddim":
        return DDIMSampler(diffusion, steps, eta, spacing)
    return _SOLVERS[sampler](diffusion, steps, spacing)


def generate(model: Model, diffusion: Diffusion, shape: Sequence[int], sampler: str = "ddim",
             steps: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
             seeds: torch.Tensor | Sequence[int] | None = None, clip_denoised: bool = True,
             progressive: int = 0, progress: Progress | None = None,
             device: torch.device | str | None = None, *, spacing: Spacing | None = None,
             ms_eps: torch.Tensor | Sequence[float] | None = None) -> Any:
    """One batch of samples of ``shape`` ``[N x C x H x W]`` with the sampler named ``sampler``.

    ``steps`` (model calls) and ``spacing`` default to the sampler's own (:data:`DEFAULT_STEPS`, capped
    at T; :data:`DEFAULT_SPACING`). ``eta`` is DDIM's and must be 0 for the others; ``ms_eps`` see
    :func:`make_sampler`. Returns x_0, or (x_0, preds) with ``progressive > 0``; see :func:`run_loop`.
    Many seeded samples in batches: :class:`ddpm.pipeline.DDPMPipeline`.
    """
    return run_loop(make_sampler(diffusion, sampler, steps, eta, spacing, ms_eps), model, shape, generator=generator,
                    seeds=seeds, clip_denoised=clip_denoised, progressive=progressive, progress=progress,
                    device=device)


__all__ = ["SAMPLERS", "check_sampler", "default_spacing", "default_steps", "generate", "make_sampler"]
