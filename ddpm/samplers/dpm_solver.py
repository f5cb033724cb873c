"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): multistep exponential integrators on the data prediction, discrete abar.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), a step
from s = timesteps[i] to t = timesteps[i + 1] with h = lambda_t - lambda_s and the data predictions
x0_i, x0_{i-1}, x0_{i-2} of the last calls is

- 2M (ODE):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D  (Algorithm 2),
- 3M (ODE):  the same with a third-order D (DPM-Solver's multistep third order, data prediction),
- 2M SDE:    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z
  (sec. 5 / appendix: SDE-DPM-Solver++(2M); diffusers' ``algorithm_type="sde-dpmsolver++"``, midpoint),

with D the multistep combination of the last predictions. The last model call is returned as is:
the step to sigma = 0 reduces to x = x0 (diffusers' ``final_sigmas_type="zero"``). Each holds its
previous predictions: use one sampler object per loop.
"""

from __future__ import annotations

import math

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource
from ddpm.samplers.base import DEFAULT_SPACING, DEFAULT_STEPS, LogSNRGrid


class DPMSolverPPSampler(LogSNRGrid):
    """DPM-Solver++ 2M (Lu et al. 2022, Algorithm 2): multistep, data prediction, discrete abar.

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, h = lambda_t - lambda_s, with D the
    second-order multistep combination of the last two data predictions. The last model call is at
    t = 0 (linspace) and is returned as is (the step to sigma = 0 reduces to x = D, first order, as
    diffusers' ``final_sigmas_type="zero"``). The step into the last timestep is first order too
    (diffusers' ``lower_order_final``): evenly spaced timesteps make its h several times the previous
    one, and the multistep extrapolation then overshoots (on Gaussian data, 20 steps give a variance
    50% too large with it, 10% too small without). Holds the previous prediction: use one sampler per loop.
    """

    first_order_into_last = True  # D = x0 on the step into the last timestep (see above)

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["dpmpp"],
                 spacing: Spacing = "linspace") -> None:
        super().__init__(diffusion, steps, spacing)
        self._prev: torch.Tensor | None = None  # the data prediction at timesteps[i-1]

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.predict_xstart(model, x, i, clip_denoised)
        if i + 1 == len(self.timesteps):
            self._prev = None
            return x0, x0
        # 1. h_i = lambda_{t_i} - lambda_{t_{i-1}} towards the next timestep in the list.
        h = self.lam[i + 1] - self.lam[i]
        # 2. D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i; first order
        #    (D = x0) on the first step and (first_order_into_last) on the step into the last timestep.
        if self._prev is None or (self.first_order_into_last and i + 2 == len(self.timesteps)):
            D = x0
        else:
            r = (self.lam[i] - self.lam[i - 1]) / h
            D = (1 + 0.5 / r) * x0 - (0.5 / r) * self._prev
        x = self.update(x, i, h, D, noise)
        self._prev = x0
        return x, x0

    def update(self, x: torch.Tensor, i: int, h: float, D: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        # 3. x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) D_i.
        return self.first_order(x, i, D)


class DPMSolverPP3MSampler(LogSNRGrid):
    """DPM-Solver++ 3M: the third-order multistep data-prediction solver (Lu et al. 2022; diffusers'
    ``DPMSolverMultistepScheduler(solver_order=3)``).

    Orders 1, 2, 3 on the first three steps (no history yet), then 3; below 15 calls the step into
    the last timestep is second order (diffusers' ``lower_order_final``); the last call is returned
    as is. The same samples as diffusers' scheduler on the same timesteps (tests/ddpm/test_samplers.py).
    """

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["dpmpp-3m"],
                 spacing: Spacing = DEFAULT_SPACING["dpmpp-3m"]) -> None:
        super().__init__(diffusion, steps, spacing)
        self._prev: list[torch.Tensor] = []  # data predictions at timesteps[i-1], timesteps[i-2]

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.predict_xstart(model, x, i, clip_denoised)
        n = len(self.timesteps)
        if i + 1 == n:
            self._prev = []
            return x0, x0
        # diffusers' lower_order_final: below 15 calls, second order into the last timestep.
        order = min(3, len(self._prev) + 1, n - i if n < 15 else 3)
        lam, alpha_t = self.lam, self.alpha[i + 1]
        # 1. h = lambda_{i+1} - lambda_i; the earlier steps as fractions of it: r0 = h_{i-1}/h, r1 = h_{i-2}/h.
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)  # e^{-h} - 1
        # 2. First order (DDIM): x_t = (sigma_t/sigma_s) x - alpha_t (e^{-h} - 1) x0_i.
        x = self.first_order(x, i, x0)
        if order == 2:
            # 3. 2M (midpoint): - alpha_t (e^{-h} - 1) D1_0 / 2 with D1_0 = (x0_i - x0_{i-1}) / r0.
            r0 = (lam[i] - lam[i - 1]) / h
            x = x - 0.5 * alpha_t * phi1 * (x0 - self._prev[0]) / r0
        elif order == 3:
            # 4. 3M: divided differences D1_0 = (x0_i - x0_{i-1})/r0, D1_1 = (x0_{i-1} - x0_{i-2})/r1 give
            #    the first and second lambda-derivative terms D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) and
            #    D2 = (D1_0 - D1_1)/(r0 + r1) of x0 in the exponential integrator
            #    x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lambda x0(lambda) dlambda, so that
            #    x_t += alpha_t ((e^{-h} - 1)/h + 1) D1 - alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) D2.
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d10, d11 = (x0 - self._prev[0]) / r0, (self._prev[0] - self._prev[1]) / r1
            D1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            D2 = (d10 - d11) / (r0 + r1)
            x = x + alpha_t * (phi1 / h + 1) * D1 - alpha_t * ((phi1 + h) / h**2 - 0.5) * D2
        self._prev = [x0, *self._prev[:1]]
        return x, x0


class SDEDPMSolverPPSampler(DPMSolverPPSampler):
    """SDE-DPM-Solver++ 2M (Lu et al. 2022, sec. 5 and appendix; diffusers' ``sde-dpmsolver++``,
    ``solver_type="midpoint"``): the exact solution of the linear part of the reverse SDE in lambda
    plus 2M's multistep D; fresh noise every step, drawn from the NoiseSource.

    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z,
    D = (1 + 1/(2 r)) x0_s - 1/(2 r) x0_{s'} (D0 + D1/2 of the midpoint form; first order on the
    first step only, as diffusers). The last call is returned as is. The same samples as diffusers'
    scheduler given the same noise.
    """

    first_order_into_last = False

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["dpmpp-2m-sde"],
                 spacing: Spacing = DEFAULT_SPACING["dpmpp-2m-sde"]) -> None:
        super().__init__(diffusion, steps, spacing)

    def update(self, x: torch.Tensor, i: int, h: float, D: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
        # 3. x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z.
        one_minus = -math.expm1(-2 * h)  # 1 - e^{-2h}
        return ((self.sigma[i + 1] / self.sigma[i]) * math.exp(-h) * x + self.alpha[i + 1] * one_minus * D
                + self.sigma[i + 1] * math.sqrt(one_minus) * noise.next())


__all__ = ["DPMSolverPP3MSampler", "DPMSolverPPSampler", "SDEDPMSolverPPSampler"]
