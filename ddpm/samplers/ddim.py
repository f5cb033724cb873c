"""DDIM (Song, Meng and Ermon 2021) and the one rule for its eta."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource
from ddpm.samplers.base import DEFAULT_STEPS, full
from ddpm.samplers.timesteps import space_timesteps


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


class DDIMSampler:
    """DDIM (Song, Meng and Ermon 2021); ``eta = 0`` is deterministic, ``eta = 1`` is DDPM-like."""

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["ddim"], eta: float = 0.0,
                 spacing: Spacing = "linspace") -> None:
        check_eta(eta, "ddim")
        self.diffusion, self.eta = diffusion, float(eta)
        self.timesteps = space_timesteps(diffusion.num_timesteps, steps, spacing, diffusion.alphas_cumprod)

    @classmethod
    def on_timesteps(cls, diffusion: Diffusion, timesteps: Sequence[int], eta: float = 0.0) -> DDIMSampler:
        """DDIM on an explicit list of timesteps instead of a spacing's: a distilled student's grid
        (:func:`ddpm.distill.student_timesteps`). ``timesteps`` must be distinct, descending, in [0, T)."""
        ts = [int(t) for t in timesteps]
        T = diffusion.num_timesteps
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] >= T:
            raise ValueError(f"timesteps must be distinct, descending and in [0, {T}), got {ts}")
        sampler = cls(diffusion, len(ts), eta)
        sampler.timesteps = ts  # the one list step() reads
        return sampler

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.timesteps[i]
        abar = self.diffusion.alphas_cumprod
        abar_t = abar[t].item()
        abar_prev = abar[self.timesteps[i + 1]].item() if i + 1 < len(self.timesteps) else 1.0
        # 1. Predicted x_0 and the eps consistent with it (after clipping).
        out = self.diffusion.p_mean_variance(model, x, full(t, x), clip_denoised)
        # 2. sigma_t(eta) = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)  (DDIM eq. 16)
        sigma = self.eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # 3. x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z  (DDIM eq. 12)
        x = (math.sqrt(abar_prev) * out["pred_xstart"]
             + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * out["eps"])
        if sigma > 0:
            x = x + sigma * noise.next()
        return x, out["pred_xstart"]


__all__ = ["DDIMSampler", "check_eta"]
