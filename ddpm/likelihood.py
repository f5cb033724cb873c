"""Log-likelihood bounds in bits/dim (Ho et al. 2020, eq. 5; improved-diffusion's ``calc_bpd_loop``).

    L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                       (the prior term, exact)
    L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (Gaussian KLs)
    L_0     = E_q -log p(x_0 | x_1)                              (discretized Gaussian decoder, eq. 13)

Indices here are 0-based: index t holds the term whose model call sees x_{t+1} in the paper's 1-based
notation, and index 0 is the decoder. Data lie in [-1, 1] on ``levels`` evenly spaced values, so a bin
has half-width 1 / (levels - 1); the two outer bins extend to -inf and +inf.
"""

from __future__ import annotations

import torch

from ddpm.diffusion import Diffusion, Model, Progress
from ddpm.losses import LN2, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from ddpm.noise import randn

def prior_bpd(diffusion: Diffusion, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, ``[N]``; no model needed.

    Computed in float64: the KL is tiny (about 1e-7 bits for the paper's schedule) and float32 loses it.
    """
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1, device=x_start.device, dtype=torch.long)
    mean, _, log_variance = diffusion.q_mean_variance(x_start.double(), t)
    return (mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LN2).to(x_start.dtype)


@torch.no_grad()
def calc_bpd_loop(diffusion: Diffusion, model: Model, x_start: torch.Tensor, levels: int = 256, *,
                  clip_denoised: bool = True, generator: torch.Generator | None = None,
                  progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Every term of the bound, one model call per timestep (T calls).

    Returns ``total_bpd`` ``[N]``, ``prior_bpd`` ``[N]`` and ``vb`` ``[N x T]`` (bits/dim). Each term
    draws its own x_t ~ q(x_t | x_0) with noise from ``generator``. ``progress(calls done, T)`` is
    called after each model call.
    """
    N, T = x_start.shape[0], diffusion.num_timesteps
    vb = torch.zeros(N, T, dtype=x_start.dtype, device=x_start.device)
    for i in range(T):
        t = torch.full((N,), i, device=x_start.device, dtype=torch.long)
        noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = diffusion.q_sample(x_start, t, noise)
        out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        vb[:, i] = diffusion.vb_term_bpd(out, x_start, x_t, t, levels)
        if progress is not None:
            progress(i + 1, T)
    prior = prior_bpd(diffusion, x_start)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb}


def bits_per_dim(diffusion: Diffusion, model: Model, x_start: torch.Tensor, levels: int = 256, *,
                 clip_denoised: bool = True, generator: torch.Generator | None = None,
                 progress: Progress | None = None) -> torch.Tensor:
    """The full variational bound on -log p(x_0) in bits/dim, ``[N]`` (T model calls; ``progress``
    as :func:`calc_bpd_loop`)."""
    return calc_bpd_loop(diffusion, model, x_start, levels, clip_denoised=clip_denoised,
                         generator=generator, progress=progress)["total_bpd"]


@torch.no_grad()
def bits_per_dim_estimate(diffusion: Diffusion, model: Model, x_start: torch.Tensor, levels: int = 256,
                          num_timesteps: int = 16, seed: int = 0, *, clip_denoised: bool = True,
                          progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An unbiased estimate of :func:`bits_per_dim` from ``num_timesteps`` model calls: (estimate, stderr).

    1. Split {0..T-1} into K = ``num_timesteps`` contiguous strata S_k of near-equal size.
    2. For each example and stratum draw one t_k uniform in S_k and one x_t; then
       y_k = |S_k| L_{t_k} has expectation sum_{t in S_k} E L_t, so prior + sum_k y_k is unbiased.
    3. Var(sum_k y_k) is estimated by collapsing strata in adjacent pairs: sum_pairs (y_a - y_b)^2,
       which errs on the large side (by the squared gap between the pair's means); with K = 1 the
       standard error is NaN.

    All draws come from a CPU ``torch.Generator`` seeded with ``seed``, so the same inputs give the
    same estimate on every call (useful for comparing checkpoints or trials on equal terms).
    Both results are ``[N]`` bits/dim. ``progress(calls done, K)`` is called after each model call.
    """
    N, T = x_start.shape[0], diffusion.num_timesteps
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    K = min(int(num_timesteps), T)
    bounds = torch.linspace(0, T, K + 1, dtype=torch.float64).round().long().tolist()
    g = torch.Generator().manual_seed(int(seed))
    ys = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        size = hi - lo
        u = torch.rand(N, generator=g, dtype=torch.float64)
        t = (lo + (u * size).long()).clamp(max=hi - 1).to(x_start.device)
        noise = randn(x_start.shape, generator=g, device=x_start.device, dtype=x_start.dtype)
        x_t = diffusion.q_sample(x_start, t, noise)
        out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        ys.append(size * diffusion.vb_term_bpd(out, x_start, x_t, t, levels).double())
        if progress is not None:
            progress(len(ys), K)
    y = torch.stack(ys)  # [K x N]
    estimate = prior_bpd(diffusion, x_start).double() + y.sum(dim=0)
    if K == 1:
        stderr = torch.full_like(estimate, float("nan"))
    else:
        m = K // 2 * 2
        var = ((y[0:m:2] - y[1:m:2]) ** 2).sum(dim=0)
        if K % 2:
            var = var + (y[-1] - y[-2]) ** 2
        stderr = var.sqrt()
    return estimate.to(x_start.dtype), stderr.to(x_start.dtype)


# LN2, normal_kl and discretized_gaussian_log_likelihood are ddpm.losses', re-exported for callers of the bound.
__all__ = ["LN2", "bits_per_dim", "bits_per_dim_estimate", "calc_bpd_loop", "discretized_gaussian_log_likelihood",
           "normal_kl", "prior_bpd"]
