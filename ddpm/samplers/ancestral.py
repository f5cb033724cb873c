"""Ancestral sampling (Ho et al. 2020, Algorithm 2), respaced, with an optional optimal variance.

:class:`DDPMSampler` uses the process's own variance (``fixed_small``, ``fixed_large`` or learned).
:class:`AnalyticDDPMSampler` replaces it by Analytic-DPM's optimal one (Bao et al. 2022), which
needs Gamma_t = E ||eps_theta(x_t, t)||^2 / d at the sampler's timesteps: :func:`estimate_ms_eps`
estimates it from a model and training data.

Measured (exact moments on the Gaussian oracle, data N(0.1, 0.3^2), linspace; std of x_0):
respaced to 100 steps, fixed_small 0.272, fixed_large 0.311; to 25 steps 0.224 and 0.348; the
optimal variance 0.300 at any step count. For Gaussian data q(x_s | x_t) IS Gaussian with exactly
that variance, so this oracle cannot tell the optimal variance from the true reverse process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource
from ddpm.samplers.base import full
from ddpm.samplers.timesteps import space_timesteps


class DDPMSampler:
    """Ancestral sampling x_{t-1} = mu_theta(x_t, t) + sigma_t z (Ho et al. 2020, Algorithm 2).

    With ``steps < T`` the process is respaced (improved-diffusion): the kept timesteps get betas
    1 - abar[s_i] / abar[s_{i-1}], so their alphas_cumprod are unchanged, and the model still sees
    the original timesteps. ``spacing`` picks which timesteps are kept (:mod:`ddpm.samplers.timesteps`).
    """

    def __init__(self, diffusion: Diffusion, steps: int | None = None, spacing: Spacing = "linspace") -> None:
        steps = diffusion.num_timesteps if steps is None else steps
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps, spacing, diffusion.alphas_cumprod)
        self.process = diffusion if steps == diffusion.num_timesteps else diffusion.respace(self.timesteps)

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        index = len(self.timesteps) - 1 - i  # position of timesteps[i] in the (respaced) process
        out = self.process.p_mean_variance(model, x, full(index, x), clip_denoised)
        if index > 0:  # no noise on the last step (Algorithm 2, line 4)
            x = out["mean"] + self.std(index, out) * noise.next()
        else:
            x = out["mean"]
        return x, out["pred_xstart"]

    def std(self, index: int, out: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """sigma at ``index`` of the (respaced) process: the process's own variance."""
        return torch.exp(0.5 * out["log_variance"])


class AnalyticDDPMSampler(DDPMSampler):
    """:class:`DDPMSampler` with Analytic-DPM's optimal reverse variance (Bao et al. 2022, Theorem 1).

    For the step from t = ``timesteps[i]`` to s = ``timesteps[i+1]`` of the respaced chain
    (beta = 1 - abar_t / abar_s, the process's mean unchanged):
    sigma*^2 = beta~ + c^2 (1 - abar_t)/abar_t (1 - Gamma_t), with beta~ = beta (1 - abar_s)/(1 - abar_t)
    the posterior variance and c = beta sqrt(abar_s)/(1 - abar_t) the posterior mean's x_0 coefficient.
    ``ms_eps`` holds Gamma_t = E ||eps_theta(x_t, t)||^2 / d, a float ``[T]`` indexed by training
    timestep (:func:`estimate_ms_eps`); only the sampler's timesteps are read. As the paper's code
    (``reverse_ddpm_ms_eps``), the x_0 covariance term (1 - abar_t)/abar_t (1 - Gamma_t) is clipped
    to [0, 1], the most that data in [-1, 1] allows.
    """

    def __init__(self, diffusion: Diffusion, ms_eps: torch.Tensor | Sequence[float], steps: int | None = None,
                 spacing: Spacing = "linspace") -> None:
        super().__init__(diffusion, steps, spacing)
        gamma = torch.as_tensor(ms_eps, dtype=torch.float64)
        if gamma.shape != (diffusion.num_timesteps,):
            raise ValueError(f"ms_eps must have shape ({diffusion.num_timesteps},) (one per timestep), "
                             f"got {tuple(gamma.shape)}")
        gamma = gamma[self.timesteps]
        if not bool(torch.isfinite(gamma).all()):
            raise ValueError("ms_eps must be finite at every timestep the sampler uses")
        abar = diffusion.alphas_cumprod[self.timesteps]
        abar_s = torch.cat([abar[1:], torch.ones(1, dtype=torch.float64)])  # the next noise level; clean last
        beta = 1 - abar / abar_s
        # 1. beta~ = beta (1 - abar_s)/(1 - abar_t): the variance of q(x_s | x_t, x_0)  (Ho, eq. 7).
        small = beta * (1 - abar_s) / (1 - abar)
        # 2. E Cov[x_0 | x_t] / d = (1 - abar_t)/abar_t (1 - Gamma_t)  (Theorem 1 with the score
        #    s_t = -eps / sqrt(1 - abar_t)), clipped to [0, 1].
        cov = ((1 - abar) / abar * (1 - gamma)).clamp(0.0, 1.0)
        # 3. sigma*^2 = beta~ + (beta sqrt(abar_s)/(1 - abar_t))^2 E Cov[x_0 | x_t] / d  (Theorem 1,
        #    DDPM's lambda^2 = beta~).
        var = small + (beta * abar_s.sqrt() / (1 - abar)) ** 2 * cov
        self._std = var.sqrt().tolist()  # by position i in timesteps

    def std(self, index: int, out: dict[str, torch.Tensor]) -> float:
        return self._std[len(self.timesteps) - 1 - index]


def estimate_ms_eps(model: Model, diffusion: Diffusion, x_start: torch.Tensor,
                    timesteps: Sequence[int] | None = None, *, batch_size: int = 256,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma_t = E_{x_0, eps} ||eps_theta(x_t, t)||^2 / d by Monte Carlo (Bao et al. 2022, sec. 3;
    their code's ``save_ms_eps``).

    ``x_start`` ``[N x C x H x W]``: training images in [-1, 1]; each gets one fresh
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps per timestep (``generator``'s noise). Returns float64
    ``[T]``: the estimate at ``timesteps`` (default: all T), NaN elsewhere. eps_theta is the noise
    the network's output implies (an x_0 or v network works too; learned variances are ignored).
    """
    T = diffusion.num_timesteps
    ts = range(T) if timesteps is None else sorted({int(t) for t in timesteps})
    out = torch.full((T,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for t in ts:
            total = 0.0
            for x0 in x_start.split(batch_size):
                eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
                tt = full(t, x0)
                x_t = diffusion.q_sample(x0, tt, eps)
                pred = diffusion.p_mean_variance(model, x_t, tt, clip_denoised=False)["eps"]
                total += pred.double().pow(2).flatten(1).mean(1).sum().item()
            out[t] = total / len(x_start)
    return out


__all__ = ["AnalyticDDPMSampler", "DDPMSampler", "estimate_ms_eps"]
