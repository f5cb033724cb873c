"""Gaussian terms of the variational bound, free of any diffusion object (improved-diffusion's ``losses.py``).

Units: nats unless a name says bits; ``LN2`` converts. Every function is elementwise over tensors of
any shape except :func:`mean_flat`, which reduces ``[N x ...] -> [N]``.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: ``[N x ...] -> [N]``."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor | float,
              logvar2: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    mean2 = torch.as_tensor(mean2, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        levels: int) -> torch.Tensor:
    """log P(x) elementwise for x on ``levels`` values in [-1, 1] under N(means, e^(2 log_scales)) binned.

    A bin has half-width 1 / (levels - 1); the two outer bins extend to -inf and +inf (Ho, eq. 13).
    Computed in float64 with log-CDFs, so that the tails do not underflow; returned in ``x``'s dtype.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    half_width = 1.0 / (levels - 1)
    x64, m64, s64 = x.double(), means.double(), log_scales.double()
    centered = x64 - m64
    inv_stdv = torch.exp(-s64)
    plus_in = inv_stdv * (centered + half_width)
    min_in = inv_stdv * (centered - half_width)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # lowest bin: P(X < x + w)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # highest bin: P(X > x - w)
    # Inner bins: log(Phi(hi) - Phi(lo)), taken on the side of the mean where both tails are large.
    right = centered > 0
    hi = torch.where(right, -min_in, plus_in)
    lo = torch.where(right, -plus_in, min_in)
    log_hi = torch.special.log_ndtr(hi)
    log_mid = log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))
    log_probs = torch.where(x64 < -1 + half_width, log_cdf_plus,
                            torch.where(x64 > 1 - half_width, log_one_minus_cdf_min, log_mid))
    return log_probs.to(x.dtype)


__all__ = ["LN2", "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl"]
