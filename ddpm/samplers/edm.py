"""EDM's stochastic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2) applied to a discrete-time eps (or x_0, v) model.

EDM works in x~ = x_t / sqrt(abar_t) with noise level sigma_t = sqrt((1 - abar_t) / abar_t), where
the probability-flow ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma with D the denoiser, here the
model's x_0 prediction at the timestep of sigma. The model only knows its T training timesteps, so
every sigma is rounded to the nearest one, as EDM's own ``round_sigma`` does for the discrete
iDDPM/ADM models (their ``iDDPMPrecond``): no interpolation, each call at a training timestep.
"""

from __future__ import annotations

import math

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource
from ddpm.samplers.base import DEFAULT_SPACING, DEFAULT_STEPS, full
from ddpm.samplers.timesteps import nearest_timesteps, space_timesteps

# EDM's README setting for its one discrete eps-model (ADM on ImageNet-64, 256 levels):
S_CHURN, S_MIN, S_MAX, S_NOISE = 40.0, 0.05, 50.0, 1.003  # --S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003


class EDMSampler:
    """Heun steps on Karras sigmas with churn (Karras et al. 2022, Algorithm 2), ``steps`` model calls.

    The noise levels t_0 > ... > t_{K-1} are K = steps // 2 + 1 timesteps of ``spacing`` (``karras``:
    their eq. 5 with rho = 7 from sigma_{T-1} down to sigma_0), and t_K is clean data. For each level:
    churn to sigma_hat = (1 + gamma) sigma (rounded to a timestep), gamma = min(S_churn / K, sqrt 2 - 1)
    for sigma in [S_min, S_max], an Euler step to the next level, and Heun's correction there. A Heun
    step costs 2 calls; the step into clean data is Euler (1 call), so K levels make 2K - 1 calls:
    with an even ``steps`` the first, highest-noise step is Euler too (the ODE is nearly linear there),
    so the model is called exactly ``steps`` times. ``timesteps`` lists those calls in order.
    x_T ~ N(0, I) at t_{T-1} is x~ = x_T / sqrt(abar_{T-1}) (EDM: sigma_max z; they differ by
    sqrt(1 + 1/sigma_max^2), 2e-5 on the linear schedule).
    """

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["edm"],
                 spacing: Spacing = DEFAULT_SPACING["edm"], *, s_churn: float = S_CHURN, s_min: float = S_MIN,
                 s_max: float = S_MAX, s_noise: float = S_NOISE) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.diffusion = diffusion
        abar = diffusion.alphas_cumprod
        levels = space_timesteps(diffusion.num_timesteps, steps // 2 + 1, spacing, abar)
        K = len(levels)
        sigma = [math.sqrt((1 - abar[t].item()) / abar[t].item()) for t in levels]
        gamma = [min(s_churn / K, math.sqrt(2) - 1) if s_min <= s <= s_max else 0.0 for s in sigma]
        hats = nearest_timesteps(torch.tensor([s * (1 + g) for s, g in zip(sigma, gamma)]), abar)
        self.s_noise = float(s_noise)
        self._level = levels + [None]  # t_{K} = clean data
        self._hat = [max(h, t) for h, t in zip(hats, levels)]  # sigma_hat >= sigma
        # Calls in order: (timestep, level j, Heun's correction?)
        self._calls: list[tuple[int, int, bool]] = []
        for j in range(K):
            self._calls.append((self._hat[j], j, False))
            if j + 1 < K and not (steps % 2 == 0 and j == 0):
                self._calls.append((levels[j + 1], j, True))
        self.timesteps = [c[0] for c in self._calls]
        self._euler: tuple[torch.Tensor, torch.Tensor] | None = None  # (x~^, d) of the current level

    def _scale(self, t: int | None) -> float:
        """sqrt(abar_t): x_t = sqrt(abar_t) x~ (1 for clean data)."""
        return 1.0 if t is None else self.diffusion.alphas_cumprod[t].sqrt().item()

    def _sigma(self, t: int | None) -> float:
        return 0.0 if t is None else math.sqrt(1 / self._scale(t) ** 2 - 1)

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        t, j, heun = self._calls[i]
        t_next = self._level[j + 1]
        s_next = self._sigma(t_next)
        s_hat = self._sigma(self._hat[j])
        if not heun:
            s = self._sigma(self._level[j])
            # 1. x~ = x_t / sqrt(abar_t); churn: x~^ = x~ + sqrt(sigma_hat^2 - sigma^2) S_noise z  (Alg. 2, lines 4-6).
            x_hat = x / self._scale(self._level[j])
            if s_hat > s:
                x_hat = x_hat + math.sqrt(s_hat**2 - s**2) * self.s_noise * noise.next()
            # 2. D = D(x~^; sigma_hat); d = (x~^ - D)/sigma_hat; Euler: x~' = x~^ + (sigma' - sigma_hat) d  (lines 7-8).
            D = self._denoise(model, x_hat, self._hat[j], clip_denoised)
            d = (x_hat - D) / s_hat
            self._euler = (x_hat, d)
            x_next = x_hat + (s_next - s_hat) * d if t_next is not None else D  # sigma' = 0: x~' = D
        else:
            # 3. Heun: d' = (x~' - D(x~'; sigma'))/sigma'; x~' = x~^ + (sigma' - sigma_hat)(d + d')/2  (lines 9-11).
            x_hat, d = self._euler
            x_t = x / self._scale(t_next)
            D = self._denoise(model, x_t, t_next, clip_denoised)
            x_next = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * (x_t - D) / s_next)
        if t_next is None:
            self._euler = None
        return x_next * self._scale(t_next), D

    def _denoise(self, model: Model, x_tilde: torch.Tensor, t: int, clip_denoised: bool) -> torch.Tensor:
        """D(x~; sigma_t): the model's x_0 prediction at x_t = sqrt(abar_t) x~."""
        x_t = x_tilde * self._scale(t)
        return self.diffusion.p_mean_variance(model, x_t, full(t, x_t), clip_denoised)["pred_xstart"]


__all__ = ["EDMSampler"]
