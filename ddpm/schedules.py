"""Noise schedules: the betas of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Published schedules are append-only: once a name is released, its values never change (trained
checkpoints store only the name and T). Add a new name instead of editing an old one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")

_PAPER_T = 1000  # Ho et al. 2020 use T = 1000 and beta from 1e-4 to 0.02
_PAPER_BETA_START = 1e-4
_PAPER_BETA_END = 0.02
_COSINE_S = 0.008  # Nichol & Dhariwal 2021, eq. 17: small offset so beta_1 is not too small
_COSINE_MAX_BETA = 0.999  # ibid.: clip to avoid a singularity at t = T


def beta_range(
    name: str, T: int, beta_start: float | None = None, beta_end: float | None = None
) -> tuple[float, float]:
    """The smallest and largest beta :func:`make_betas` gives for these arguments, in plain Python.

    Raises the same ``ValueError`` as :func:`make_betas` would (unknown name, bad T, a range given to
    ``cosine``, betas outside (0, 1)), so a config can be checked without torch and before any
    worker builds it.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if int(T) != T or T < 1:
        raise ValueError(f"the number of timesteps T must be an integer >= 1, got {T}")
    T = int(T)
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta range; leave beta_start/beta_end unset")
        betas = _cosine_list(T)
        lo, hi = min(betas), max(betas)
    else:
        start, end = _endpoints(T, beta_start, beta_end)
        if name == "sigmoid":  # the first and last points of sigmoid(linspace(-6, 6, T))
            ends = [_sigmoid(-6.0) * (end - start) + start] + ([_sigmoid(6.0) * (end - start) + start] if T > 1 else [])
        else:  # linear and quadratic are monotone between their end points
            ends = [start, end] if T > 1 else [start]
        lo, hi = min(ends), max(ends)
    if not (0.0 < lo and hi < 1.0):
        raise ValueError(
            f"schedule {name!r} with T={T} gives betas outside (0, 1) (min {lo:.4g}, max {hi:.4g}); "
            "for small T pass an explicit beta_start/beta_end"
        )
    return lo, hi


def make_betas(
    name: str, T: int, beta_start: float | None = None, beta_end: float | None = None
) -> "torch.Tensor":
    """The betas of schedule ``name`` for ``T`` steps, float64 of shape ``(T,)``.

    ``linear``, ``quadratic`` and ``sigmoid`` run from ``beta_start`` to ``beta_end``. A missing end
    defaults to the paper's (1e-4, 0.02) scaled by ``1000 / T`` so that any T gives a similar total
    amount of noise (improved-diffusion's ``get_named_beta_schedule``); a given end is used as is.
    ``cosine`` (Nichol & Dhariwal 2021) has no range and rejects one.
    """
    import torch

    beta_range(name, T, beta_start, beta_end)  # every argument error, before building anything
    T = int(T)
    if name == "cosine":
        betas = torch.tensor(_cosine_list(T), dtype=torch.float64)
    else:
        start, end = _endpoints(T, beta_start, beta_end)
        if name == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float64)
        elif name == "quadratic":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        else:  # sigmoid, as diffusers' DDPMScheduler
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
    if not bool(((betas > 0) & (betas < 1)).all()):  # rounding at the edge of (0, 1)
        raise ValueError(
            f"schedule {name!r} with T={T} gives betas outside (0, 1) "
            f"(min {betas.min().item():.4g}, max {betas.max().item():.4g}); "
            "for small T pass an explicit beta_start/beta_end"
        )
    return betas


def log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t = log sqrt((1 - abar_t) / abar_t), float64 ``[T]``, increasing in t: the noise level
    of x_t / sqrt(abar_t) = x_0 + sigma_t eps (Karras et al. 2022's sigma for a VP schedule)."""
    import torch  # here, not at the top: the config imports this module without torch

    abar = torch.as_tensor(alphas_cumprod).to(torch.float64)
    return 0.5 * (torch.log1p(-abar) - abar.log())


def _endpoints(T: int, beta_start: float | None, beta_end: float | None) -> tuple[float, float]:
    """The range of linear/quadratic/sigmoid: as given, else the paper's scaled by 1000 / T."""
    scale = _PAPER_T / T
    start = _PAPER_BETA_START * scale if beta_start is None else float(beta_start)
    end = _PAPER_BETA_END * scale if beta_end is None else float(beta_end)
    return start, end


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _cosine_list(T: int) -> list[float]:
    """beta_t = 1 - abar(t+1)/abar(t), abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2) (Nichol & Dhariwal, eq. 17)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), _COSINE_MAX_BETA) for i in range(T)]


__all__ = ["SCHEDULES", "beta_range", "log_sigmas", "make_betas"]
