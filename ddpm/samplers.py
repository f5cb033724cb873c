"""Sampling loops: DDPM ancestral (with respacing), DDIM and DPM-Solver++ 2M.

Each sampler is a small object holding ONE descending list of timesteps, ``timesteps``, the single
source of truth: the model is called at ``timesteps[i]`` (original training timesteps) and the
step towards ``timesteps[i + 1]`` (clean data after the last one) reads it from the same list.
The shared loop is a few lines::

    for i in range(len(sampler.timesteps)):
        x, pred_xstart = sampler.step(model, x, i, noise, clip_denoised)

Noise (x_T and every step's) comes from one :class:`ddpm.noise.NoiseSource`, so per-sample
``seeds`` make sample i independent of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, get_args

import torch

from ddpm.config import Sampler
from ddpm.diffusion import Diffusion, Model, Progress
from ddpm.inference import sampling_dtype
from ddpm.noise import NoiseSource

SAMPLERS: tuple[str, ...] = get_args(Sampler)  # ddpm, ddim, dpmpp: named once, in ddpm.config
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20}  # ddpm: T


def default_steps(sampler: str, num_timesteps: int, preferred: int | None = None) -> int:
    """Model calls to make when the caller asked for no particular number: ``preferred`` (a
    config's ``sample.steps``) or else the sampler's default (T for ddpm, 50 ddim, 20 dpmpp), capped
    at T, so that a model with a small T (a tuning sweep can pick one) still samples."""
    steps = preferred if preferred is not None else DEFAULT_STEPS.get(sampler, num_timesteps)
    return min(int(steps), num_timesteps)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from T-1 down to 0 (``[T-1]`` for one step), descending."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, T={num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    # Spacing (T-1)/(steps-1) >= 1, so the rounded values are distinct.
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def _full(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


class DDPMSampler:
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Algorithm 2).

    With ``steps < T`` the process is respaced (improved-diffusion): the kept timesteps get betas
    1 - abar[s_i] / abar[s_{i-1}], so their alphas_cumprod are unchanged, and the model still sees
    the original timesteps.
    """

    def __init__(self, diffusion: Diffusion, steps: int | None = None) -> None:
        steps = diffusion.num_timesteps if steps is None else steps
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps)
        self.process = diffusion if steps == diffusion.num_timesteps else diffusion.respace(self.timesteps)

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        index = len(self.timesteps) - 1 - i  # position of timesteps[i] in the (respaced) process
        out = self.process.p_mean_variance(model, x, _full(index, x), clip_denoised)
        if index > 0:  # no noise on the last step (Algorithm 2, line 4)
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise.next()
        else:
            x = out["mean"]
        return x, out["pred_xstart"]


class DDIMSampler:
    """DDIM (Song, Meng and Ermon 2021); ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like."""

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["ddim"], eta: float = 0.0) -> None:
        check_eta(eta, "ddim")
        self.diffusion, self.eta = diffusion, float(eta)
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps)

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.timesteps[i]
        abar = self.diffusion.alphas_cumprod
        abar_t = abar[t].item()
        abar_prev = abar[self.timesteps[i + 1]].item() if i + 1 < len(self.timesteps) else 1.0
        # 1. Predicted x_0 and the eps consistent with it (after clipping).
        out = self.diffusion.p_mean_variance(model, x, _full(t, x), clip_denoised)
        # 2. sigma_t(eta) = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)  (DDIM eq. 16)
        sigma = self.eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # 3. x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z  (DDIM eq. 12)
        x = (math.sqrt(abar_prev) * out["pred_xstart"]
             + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * out["eps"])
        if sigma > 0:
            x = x + sigma * noise.next()
        return x, out["pred_xstart"]


class DPMSolverPPSampler:
    """DPM-Solver++ 2M (Lu et al. 2022, Algorithm 2): multistep, data prediction, discrete abar.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
    the step from s = timesteps[i] to t = timesteps[i + 1] is
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,  h = lambda_t - lambda_s,
    with D the second-order multistep combination of the last two data predictions. The last model
    call is at t = 0 and is returned as is (the step to sigma = 0 reduces to x = D, first order, as
    diffusers' ``final_sigmas_type="zero"``). The step into t = 0 is first order too (diffusers'
    ``lower_order_final``): evenly spaced timesteps make its h several times the previous one, and
    the multistep extrapolation then overshoots (on Gaussian data, 20 steps give a variance 50% too
    large with it, 10% too small without). Holds the previous prediction: use one sampler per loop.
    """

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["dpmpp"]) -> None:
        self.diffusion = diffusion
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps)
        abar = diffusion.alphas_cumprod[self.timesteps]
        self.alpha = abar.sqrt().tolist()
        self.sigma = (1 - abar).sqrt().tolist()
        self.lam = (0.5 * (abar.log() - torch.log1p(-abar))).tolist()
        self._prev: torch.Tensor | None = None  # the data prediction at timesteps[i-1]

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.diffusion.p_mean_variance(model, x, _full(self.timesteps[i], x), clip_denoised)
        x0 = out["pred_xstart"]
        if i + 1 == len(self.timesteps):
            self._prev = None
            return x0, x0
        # 1. h_i = lambda_{t_i} - lambda_{t_{i-1}} towards the next timestep in the list.
        h = self.lam[i + 1] - self.lam[i]
        # 2. D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i; first order
        #    (D = x0) on the first step and on the step into t = 0.
        if self._prev is None or i + 2 == len(self.timesteps):
            D = x0
        else:
            r = (self.lam[i] - self.lam[i - 1]) / h
            D = (1 + 0.5 / r) * x0 - (0.5 / r) * self._prev
        # 3. x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) D_i.
        x = (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * math.expm1(-h) * D
        self._prev = x0
        return x, x0


def _device_dtype(model: Model, device: torch.device | str | None) -> tuple[torch.device, torch.dtype]:
    params = getattr(model, "parameters", None)
    p = next((q for q in params() if q.is_floating_point()), None) if callable(params) else None
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    return dev, (sampling_dtype(p.dtype) if p is not None else torch.float32)


def run_loop(sampler: DDPMSampler | DDIMSampler | DPMSolverPPSampler, model: Model, shape: Sequence[int], *,
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
    dev, dtype = _device_dtype(model, device)
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


def check_eta(eta: float, sampler: str | None = "ddim", *, name: str = "eta") -> None:
    """``ValueError`` unless ``eta`` (DDIM's noise scale, eq. 16) is valid for ``sampler``.

    The one eta rule: ddim takes eta >= 0 (0 deterministic, 1 DDPM-like); every other sampler only
    eta = 0. ``sampler=None`` (not known yet: a model's own) checks the range alone. ``name`` is how
    the caller's user spells it (``--eta``); the message names the valid range.
    """
    if not eta >= 0:  # also NaN
        raise ValueError(f"{name} must be in [0, inf) (0 deterministic, 1 DDPM-like), got {eta}")
    if eta != 0 and sampler is not None and sampler != "ddim":
        raise ValueError(f"{name}={eta} only applies to the ddim sampler, not {sampler!r} "
                         f"(valid: {name} = 0 for {sampler}, {name} >= 0 for ddim)")


def check_sampler(sampler: str, eta: float = 0.0) -> None:
    """``ValueError`` naming the valid samplers, or an ``eta`` the sampler does not take (:func:`check_eta`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    check_eta(eta, sampler)


def make_sampler(diffusion: Diffusion, sampler: str, steps: int | None = None,
                 eta: float = 0.0) -> DDPMSampler | DDIMSampler | DPMSolverPPSampler:
    """The sampler object named ``sampler`` with ``steps`` model calls (default: :func:`default_steps`)."""
    check_sampler(sampler, eta)
    if steps is None:
        steps = default_steps(sampler, diffusion.num_timesteps)
    if sampler == "ddpm":
        return DDPMSampler(diffusion, steps)
    if sampler == "ddim":
        return DDIMSampler(diffusion, steps, eta)
    return DPMSolverPPSampler(diffusion, steps)


def generate(model: Model, diffusion: Diffusion, shape: Sequence[int], sampler: str = "ddim",
             steps: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
             seeds: torch.Tensor | Sequence[int] | None = None, clip_denoised: bool = True,
             progressive: int = 0, progress: Progress | None = None,
             device: torch.device | str | None = None) -> Any:
    """One batch of samples of ``shape`` ``[N x C x H x W]`` with sampler ``ddpm``, ``ddim`` or ``dpmpp``.

    ``steps`` defaults to T for ddpm, 50 for ddim and 20 for dpmpp (capped at T). ``eta`` is DDIM's
    and must be 0 for the others. Returns x_0, or (x_0, preds) with ``progressive > 0``; see
    :func:`run_loop`. Many seeded samples in batches: :class:`ddpm.pipeline.DDPMPipeline`.
    """
    return run_loop(make_sampler(diffusion, sampler, steps, eta), model, shape, generator=generator, seeds=seeds,
                    clip_denoised=clip_denoised, progressive=progressive, progress=progress, device=device)


__all__ = ["DDIMSampler", "DDPMSampler", "DEFAULT_STEPS", "DPMSolverPPSampler", "SAMPLERS", "check_eta", "check_sampler",
           "default_steps", "generate", "make_sampler", "run_loop", "space_timesteps"]
