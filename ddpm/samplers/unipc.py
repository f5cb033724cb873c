"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): multistep predictor UniP-p and corrector UniC-p on the data prediction, B(h) =
e^h - 1 ("bh2"), as diffusers' ``UniPCMultistepScheduler(solver_order=3, solver_type="bh2")``.
"""

from __future__ import annotations

import math

import torch

from ddpm.config import Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.noise import NoiseSource
from ddpm.samplers.base import DEFAULT_SPACING, DEFAULT_STEPS, LogSNRGrid


class UniPCSampler(LogSNRGrid):
    """UniPC-p, bh2, data prediction; ``order = 3`` (the paper's choice for unconditional models).

    Call i evaluates x0_i = x_0(x_i, t_i) at the predictor's x_i, then (i > 0) UniC corrects x_i
    with it, at no extra call (sec. 3.1, Theorem 3.1: order p+1), and UniP predicts x_{i+1} from
    the corrected x_i and x0_i, x0_{i-1}, ... (sec. 3.2, Corollary 3.2). Orders: 1, 2, 3 while the
    history fills, 2 on the step into the last timestep (diffusers' ``lower_order_final``); the last
    call is returned as is (the step to sigma = 0 reduces to x = x0). The same samples as diffusers'
    scheduler on the same timesteps (tests/ddpm/test_samplers.py). Holds its history: use one
    sampler per loop.
    """

    def __init__(self, diffusion: Diffusion, steps: int = DEFAULT_STEPS["unipc"],
                 spacing: Spacing = DEFAULT_SPACING["unipc"], order: int = 3) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        super().__init__(diffusion, steps, spacing)
        self.order = order
        self._x0s: list[torch.Tensor] = []  # x0_{i-1}, x0_{i-2}, ...: newest first
        self._last: tuple[torch.Tensor, int] | None = None  # (x_{i-1} after correction, its UniP order)

    def step(self, model: Model, x: torch.Tensor, i: int, noise: NoiseSource,
             clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.predict_xstart(model, x, i, clip_denoised)
        n = len(self.timesteps)
        if i + 1 == n:  # the step to sigma = 0 is x = x0_i; correcting x_i first would change nothing
            self._x0s, self._last = [], None
            return x0, x0
        if self._last is not None:  # UniC: redo the step i-1 -> i with x0_i as one more point
            x = self._update(self._last[0], i - 1, self._x0s[:self._last[1]], self._last[1], x0)
        history = [x0, *self._x0s]
        order = min(self.order, len(history), n - i)  # lower_order_final: 2 into the last timestep
        self._last = (x, order)
        self._x0s = history[:self.order]
        return self._update(x, i, history[:order], order), x0

    def _update(self, x: torch.Tensor, i: int, m: list[torch.Tensor], order: int,
                m_next: torch.Tensor | None = None) -> torch.Tensor:
        """x_{i+1} from x_i and m = [x0_i, x0_{i-1}, ...] (``order`` of them): UniP-p, or UniC-p
        when ``m_next`` = x0_{i+1} (the prediction at the uncorrected x_{i+1}) is given."""
        lam = self.lam
        h = lam[i + 1] - lam[i]
        # 1. r_k = (lambda_{i-k} - lambda_i)/h and D1_k = (x0_{i-k} - x0_i)/r_k, k = 1..p-1; r_p = 1.
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0]
        D1s = [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]
        # 2. h phi_1(-h) = e^{-h} - 1 and B(h) = e^{-h} - 1 (bh2), in the data-prediction sign (hh = -h).
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = h_phi_1
        # 3. R_p rows r^{j-1} and g_p / B(h): b_j = j! hh phi_{j+1}(hh) / B(h), phi by its recursion
        #    phi_{k+1}(z) = (phi_k(z) - 1/k!) / z (Theorem 3.1's linear system).
        R, b = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for j in range(1, order + 1):
            R.append([r ** (j - 1) for r in rks])
            b.append(h_phi_k * factorial / B_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        # 4. The coefficients a_p: solve R a = b (the predictor drops the new point's row and column);
        #    UniP-2 and UniC-1 use a = 1/2 (diffusers' simplified forms).
        if m_next is None:
            rhos = [] if order == 1 else [0.5] if order == 2 else _solve(R[:-1], b[:-1], order - 1)
        else:
            rhos = [0.5] if order == 1 else _solve(R, b, order)
            D1s = D1s + [m_next - m[0]]  # r_p = 1: the new point one whole step ahead
        # 5. x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) x0_i - alpha_{i+1} B(h) sum_k a_k D1_k.
        x = (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * h_phi_1 * m[0]
        for a, D1 in zip(rhos, D1s):
            x = x - self.alpha[i + 1] * B_h * a * D1
        return x


def _solve(R: list[list[float]], b: list[float], k: int) -> list[float]:
    """The first ``k`` rows and columns of R a = b, solved in float64."""
    A = torch.tensor([row[:k] for row in R[:k]], dtype=torch.float64)
    return torch.linalg.solve(A, torch.tensor(b[:k], dtype=torch.float64)).tolist()


__all__ = ["UniPCSampler"]
