"""What every sampler shares: the defaults table, the step contract, the loop, the log-SNR grid.

A sampler is a small object holding ONE descending list of training timesteps, ``timesteps``, one
entry per model call: step ``i`` calls the model once, at ``timesteps[i]``, and moves x towards the
next noise level in its list (clean data after the last call)::

    for i in range(len(sampler.timesteps)):
        x, pred_xstart = sampler.step(model, x, i, noise, clip_denoised)

So ``steps`` always counts model calls. Noise (x_T and every step's) comes from one
:class:`ddpm.noise.NoiseSource`, so per-sample ``seeds`` make sample i independent of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model, Progress
from ddpm.inference import sampling_dtype
from ddpm.noise import NoiseSource
from ddpm.samplers.timesteps import space_timesteps

# Model calls per sample when none are asked for (ddpm: T), and each sampler's timestep spacing when
# none is asked for (linspace where not listed); the constructors' defaults read these tables. The
# new samplers' values: their std on the Gaussian oracle, data N(0.1, 0.3^2), exact (test_samplers.py):
# unipc 0.2997, dpmpp-3m 0.3021, dpmpp-2m-sde 0.3066 for the data's 0.3; edm 0.347 at EDM's own 35
# calls (its CIFAR-10 NFE), 0.3017 only at 401 (benchmarks/bench_oracle.py has them all).
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20, "dpmpp-3m": 20, "unipc": 20, "dpmpp-2m-sde": 25, "edm": 35}
DEFAULT_SPACING: dict[str, Spacing] = {"dpmpp-3m": "logsnr", "unipc": "logsnr", "dpmpp-2m-sde": "logsnr",
                                       "edm": "karras"}


class Stepper(Protocol):
    """The contract :func:`run_loop` relies on (see the module docstring)."""

    timesteps: list[int]

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...


def full(t: int, x: torch.Tensor) -> torch.Tensor:
    """Timestep (or index) ``t`` for every row of ``x``: int64 ``[N]`` on ``x``'s device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


class LogSNRGrid:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) at each
    of ``timesteps`` (Lu et al. 2022, sec. 2), for the exponential-integrator solvers; and their
    data prediction x_0(x_t, t) from one model call (clipped to [-1, 1] with ``clip_denoised``)."""

    def __init__(self, diffusion: Diffusion, steps: int, spacing: Spacing) -> None:
        self.diffusion = diffusion
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps, spacing, diffusion.alphas_cumprod)
        abar = diffusion.alphas_cumprod[self.timesteps]
        self.alpha = abar.sqrt().tolist()
        self.sigma = (1 - abar).sqrt().tolist()
        self.lam = (0.5 * (abar.log() - torch.log1p(-abar))).tolist()

    def predict_xstart(self, model: Model, x: torch.Tensor, i: int, clip_denoised: bool) -> torch.Tensor:
        return self.diffusion.p_mean_variance(model, x, full(self.timesteps[i], x), clip_denoised)["pred_xstart"]

    def first_order(self, x: torch.Tensor, i: int, D: torch.Tensor) -> torch.Tensor:
        """x_{t_{i+1}} = (sigma_{i+1}/sigma_i) x - alpha_{i+1} (e^{-h} - 1) D (DPM-Solver++ eq. 9 with
        x_0 ~ D over the step; D = x_0(x_i) is DDIM)."""
        h = self.lam[i + 1] - self.lam[i]
        return (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * math.expm1(-h) * D


def device_dtype(model: Model, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    params = getattr(model, "parameters", None)
    p = next((q for q in params() if q.is_floating_point()), None) if callable(params) else None
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    return dev, (sampling_dtype(p.dtype) if p is not None else torch.float32)


def run_loop(sampler: Stepper, model: Model, shape: Sequence[int], *,
             generator: torch.Generator | None = None, seeds: torch.Tensor | Sequence[int] | None = None,
             clip_denoised: bool = True, progressive: int = 0, progress: Progress | None = None,
             device: torch.device | str | None = None) -> Any:
    """Run ``sampler`` from x_T ~ N(0, I) of ``shape`` ``[N x C x H x W]`` to x_0.

    ``progress(done, total)`` is called after each step (done = 1..total). With ``progressive = K``
    the predicted x_0 at K evenly spaced steps is returned too, as (x_0, preds ``[K x N x C x H x W]``)
    (Ho et al. 2020, figure 6). Device and dtype follow the model's parameters unless ``device``
    is given; a bf16/fp16 network (:class:`ddpm.inference.SamplingNet`) is sampled in float32.
    """
    if progressive < 0:
        raise ValueError(f"progressive must be >= 0, got {progressive}")
    dev, dtype = device_dtype(model, device)
    noise = NoiseSource(shape, generator=generator, seeds=seeds, device=dev, dtype=dtype)
    n = len(sampler.timesteps)
    keep = torch.linspace(0, n - 1, progressive).round().long().tolist() if progressive else []
    preds: list[torch.Tensor] = []
    with torch.no_grad():
        x = noise.next()
        for i in range(n):
            x, pred_xstart = sampler.step(model, x, i, noise, clip_denoised)
            preds.extend(pred_xstart for k in keep if k == i)
            if progress is not None:
                progress(i + 1, n)
    return (x, torch.stack(preds)) if progressive else x


__all__ = ["DEFAULT_SPACING", "DEFAULT_STEPS", "LogSNRGrid", "Stepper", "device_dtype", "full", "run_loop"]
