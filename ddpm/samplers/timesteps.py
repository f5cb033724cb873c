"""Where a sampler calls the model: ``steps`` distinct descending training timesteps out of T.

Six spacings (names in :data:`ddpm.config.Spacing`), in 0-based timesteps; the first three as Lin
et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2) and
diffusers' ``timestep_spacing``:

- ``linspace``: ``round(linspace(T-1, 0, steps))``: both ends; the last model call is at t = 0.
- ``leading``: ``(steps-1, ..., 1, 0) * (T // steps)``: ends at 0 but starts below T-1 (at
  T - T/steps), where x_T ~ N(0, I) is not yet the marginal: kept for comparison, not advised.
- ``trailing``: ``round(T - k T/steps) - 1``, k = 0..steps-1: starts at T-1 and ends at T/steps - 1.
  No call is spent near t = 0, but the last call's x_0 prediction is returned from there, and on
  the linear schedule sigma_{T/steps - 1} is 0.17 at 20 steps: that x_0 is a posterior mean, too
  smooth (for data N(0.1, 0.3^2), std 0.260 instead of 0.3, whatever the sampler before it).
- ``karras``: the sigma_t = sqrt((1 - abar_t) / abar_t) of EDM (Karras et al. 2022, eq. 5, rho = 7)
  from sigma_{T-1} down to sigma_0 (diffusers' ``use_karras_sigmas``).
- ``logsnr``: evenly spaced in lambda_t = log(alpha_t / sigma_t) = -log sigma_t from T-1 to 0
  (DPM-Solver's ``skip_type="logSNR"``, which Lu et al. advise for low-resolution images).
- ``cosine``: the noise levels of ``trailing`` times under the cosine schedule alpha_s = cos(pi s / 2)
  of Salimans and Ho 2022 (s = 1, 1 - 1/steps, ..., 1/steps; sigma_t = tan(pi s / 2)), each at the
  nearest of this schedule's timesteps: the grid their progressive distillation halves. It nests:
  every other point of ``2N`` is the grid of ``N`` (the same sigmas, rounded alike), as long as no
  two meet near t = 0. On the linear schedule it puts the 4-step grid at t = 999, 433, 258, 121
  where ``trailing`` has 999, 749, 499, 249: two calls spent where x_t is still nearly noise.

``karras`` and ``logsnr`` round each sigma to the nearest timestep in log sigma, then separate any
that meet at small sigma. Why the spacing matters: on the linear schedule,
evenly spaced t leave one step for lambda from 1.7 to 4.6 at 20 steps (t = 53 to 0), where data of
std 0.3 is still being denoised; ``logsnr`` gives that range six steps.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch

from ddpm.config import Spacing
from ddpm.schedules import log_sigmas

SPACINGS: tuple[str, ...] = get_args(Spacing)
KARRAS_RHO = 7.0  # EDM eq. 5: rho = 7 (their sec. 3, "Discretization")


def nearest_timesteps(sigmas: torch.Tensor, alphas_cumprod: torch.Tensor) -> list[int]:
    """The timestep whose sigma_t is nearest each of ``sigmas`` in log sigma (clamped to [0, T-1])."""
    ls = log_sigmas(alphas_cumprod).numpy()
    t = np.interp(sigmas.to(torch.float64).log().numpy(), ls, np.arange(len(ls), dtype=np.float64))
    return [int(v) for v in np.rint(t)]


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = KARRAS_RHO) -> list[int]:
    """``steps`` distinct descending timesteps on EDM's sigmas (eq. 5), from T-1 to 0.

    sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with
    sigma_max = sigma_{T-1}, sigma_min = sigma_0; rounding can make neighbours meet at small sigma,
    so they are then made distinct (:func:`_distinct`).
    """
    smax, smin = log_sigmas(alphas_cumprod)[[-1, 0]].exp().tolist()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return _distinct(nearest_timesteps(sigmas, alphas_cumprod), len(alphas_cumprod))


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> list[int]:
    """``steps`` distinct descending timesteps evenly spaced in lambda_t = -log sigma_t from T-1 to 0
    (DPM-Solver's ``skip_type="logSNR"``), rounded and made distinct as :func:`karras_timesteps`."""
    ls = log_sigmas(alphas_cumprod)
    sigmas = torch.linspace(ls[-1].item(), ls[0].item(), steps, dtype=torch.float64).exp()
    return _distinct(nearest_timesteps(sigmas, alphas_cumprod), len(alphas_cumprod))


def cosine_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> list[int]:
    """``steps`` descending timesteps at sigma = tan(pi s / 2), s = 1 - k / steps for k = 0..steps-1
    (uniform ``trailing`` times of the cosine schedule alpha_s = cos(pi s / 2), Salimans and Ho 2022,
    sec. 4), each the nearest timestep in log sigma; the first is T-1 (sigma = infinity there), and
    any that meet near t = 0 are made distinct as :func:`karras_timesteps`."""
    T = len(alphas_cumprod)
    s = 1.0 - torch.arange(1, steps, dtype=torch.float64) / steps
    return _distinct([T - 1, *nearest_timesteps(torch.tan(torch.pi / 2 * s), alphas_cumprod)], T)


def _distinct(ts: list[int], T: int) -> list[int]:
    """Descending ``ts`` made strictly so: each lifted to one above the next (as Analytic-DPM's
    ``_round_and_remove_dup``), then, where that passed T-1, each lowered to one below the previous."""
    for i in reversed(range(len(ts) - 1)):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    for i in range(len(ts)):
        ts[i] = min(ts[i], T - 1 if i == 0 else ts[i - 1] - 1)
    return ts


def space_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "linspace",
                    alphas_cumprod: torch.Tensor | None = None) -> list[int]:
    """``steps`` distinct descending timesteps out of T = ``num_timesteps`` (``[T-1]`` for one step).

    ``karras``, ``logsnr`` and ``cosine`` need the schedule's ``alphas_cumprod`` ``[T]``; the others only T. See the module's
    docstring for what each spacing does.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, T={num_timesteps}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    T = num_timesteps
    if steps == 1:
        return [T - 1]
    if spacing == "linspace":
        # Spacing (T-1)/(steps-1) >= 1, so the rounded values are distinct.
        return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    if spacing == "leading":
        return [k * (T // steps) for k in reversed(range(steps))]
    if spacing == "trailing":
        return [round(T - k * T / steps) - 1 for k in range(steps)]
    if alphas_cumprod is None or len(alphas_cumprod) != T:
        raise ValueError(f"spacing {spacing!r} needs the schedule's alphas_cumprod of length T={T}")
    if spacing == "logsnr":
        return logsnr_timesteps(alphas_cumprod, steps)
    if spacing == "cosine":
        return cosine_timesteps(alphas_cumprod, steps)
    return karras_timesteps(alphas_cumprod, steps)


__all__ = ["KARRAS_RHO", "SPACINGS", "cosine_timesteps", "karras_timesteps", "log_sigmas", "nearest_timesteps", "space_timesteps"]
