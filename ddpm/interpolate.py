"""Interpolation in x_t space (Ho et al. 2020, section 4.3, figure 8).

1. Encode both source images with q(x_t | x_0) (eq. 4), using the SAME noise eps for both:
   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
2. Mix the latents linearly: xbar_t = (1 - lambda) x_t + lambda x'_t, for ``lambdas`` evenly spaced
   weights in [0, 1].
3. Decode each mix with the ancestral reverse process from t down to 0 (Algorithm 2). Every mix gets
   the same per-sample seed, so the reverse noise too is fixed across the weights, as in the paper.
"""

from __future__ import annotations

import torch

from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource, sample_seed
from ddpm.samplers import DDPMSampler


def interpolate(model: Model, diffusion: Diffusion, x_a: torch.Tensor, x_b: torch.Tensor, t: int,
                lambdas: int, seed: int = 0) -> torch.Tensor:
    """Decoded interpolations ``[lambdas x C x H x W]`` between ``x_a`` and ``x_b`` (each ``[1 x C x H x W]``).

    ``t`` is the 0-based index into the schedule (``t = T - 1`` noises fully); all noise comes from
    ``sample_seed(seed, 0)``. Raises ``ValueError`` for ``t`` outside [0, T-1] or ``lambdas < 2``.
    """
    T = diffusion.num_timesteps
    if not 0 <= t < T:
        raise ValueError(f"t={t} is out of range: the model has T={T}, so t must be in [0, {T - 1}]")
    if lambdas < 2:
        raise ValueError(f"lambdas must be >= 2, got {lambdas}")
    weights = torch.linspace(0.0, 1.0, lambdas).reshape(-1, 1, 1, 1)
    # One seed for every row: the same eps for both encodings and the same reverse noise for all weights.
    noise = NoiseSource((lambdas, *x_a.shape[1:]), seeds=[sample_seed(seed, 0)] * lambdas)
    eps = noise.next()[:1]
    tt = torch.full((1,), t, dtype=torch.long)
    with torch.no_grad():
        # 1. x_t and x'_t from q(x_t | x_0) with the same eps (Ho, eq. 4).
        xt_a, xt_b = diffusion.q_sample(x_a, tt, eps), diffusion.q_sample(x_b, tt, eps)
        # 2. Linear interpolation of the latents.
        x = (1 - weights) * xt_a + weights * xt_b
        # 3. Ancestral steps t, t-1, ..., 0 (Algorithm 2): positions T-1-t .. T-1 of the full list.
        sampler = DDPMSampler(diffusion)
        for i in range(T - 1 - t, T):
            x, _ = sampler.step(model, x, i, noise)
    return x


__all__ = ["interpolate"]
