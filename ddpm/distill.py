"""Progressive distillation (Salimans and Ho, ICLR 2022): a student that samples in half the teacher's steps.

One round: the teacher samples with deterministic DDIM (eta = 0) on K = 2N descending timesteps
``t_0 > t_1 > ... > t_{2N-1}``, then steps to clean data (alpha = 1, sigma = 0). The student calls
the model at every other one, ``t_0, t_2, ..., t_{2N-2}``, and its step i goes in ONE DDIM step from
t = t_{2i} to t'' = t_{2i+2} (clean data after the last), where the teacher takes two, via
t' = t_{2i+1}. Each round's student is the next round's teacher, so the grids nest: after k rounds
the student keeps every 2^k-th point of the first teacher's grid (paper, sec. 4: 1024 -> ... -> 4).

Notation (paper, sec. 2): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), SNR_t = alpha_t^2 /
sigma_t^2. Timesteps are indices into the :class:`~ddpm.diffusion.Diffusion`, as in every sampler; the
model still sees the original training timestep. Tensors are ``[N x C x H x W]``, student positions
``i`` int64 ``[N]`` in [0, N_student).

- :func:`student_timesteps`: the grid halved, once or k times (N = K / 2^k).
- :class:`ProgressiveDistillation`: one round: Algorithm 2's target x~, the same target as eps~ or v~,
  the truncated-SNR weight, the per-example loss, and the student's sampler (DDIM on the halved grid,
  :meth:`ddpm.samplers.DDIMSampler.on_timesteps`).
- :func:`distillation_loss`: one batch's loss, a scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpm.diffusion import PREDICTIONS, Diffusion, Model
from ddpm.losses import mean_flat
from ddpm.noise import randn
from ddpm.samplers.ddim import DDIMSampler

STUDENT_PREDICTIONS: tuple[str, ...] = PREDICTIONS  # the target is derived for each (eps, x0, v, edm's F)


def _check_grid(timesteps: Sequence[int], what: str) -> list[int]:
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])) or (ts and ts[-1] < 0):
        raise ValueError(f"{what} must be distinct, descending and >= 0, got {ts}")
    return ts


def student_timesteps(teacher_timesteps: Sequence[int], steps: int | None = None) -> list[int]:
    """The student's N = ``steps`` timesteps: every (K/N)-th of the teacher's K, from the first.

    One round halves the grid (the default, N = K/2: every other point); k rounds keep every
    2^k-th, so N must be K / 2^k for some k >= 1; for K a power of two (the paper's 1024 or 8192),
    a power of two below K.

    :raises ValueError: a teacher grid that is not distinct, descending and >= 0, or has an odd
        count K (it cannot be halved), or an N that is not K / 2^k below K; each names the valid N.
    """
    ts = _check_grid(teacher_timesteps, "teacher timesteps")
    K = len(ts)
    valid, n = [], K
    while n > 0 and n % 2 == 0:
        n //= 2
        valid.append(n)
    if not valid:
        raise ValueError(f"the teacher's {K} steps cannot be halved (the count must be even, "
                         "e.g. a power of two such as 1024)")
    N = valid[0] if steps is None else steps
    if isinstance(N, bool) or not isinstance(N, int) or N not in valid:
        why = (f"must be below the teacher's {K}" if isinstance(N, int) and N >= K
               else f"must be the teacher's {K} halved k >= 1 times (K / 2^k)")
        raise ValueError(f"student steps {steps!r} {why}; valid: {', '.join(map(str, valid))}")
    return ts[:: K // N]


class ProgressiveDistillation:
    """One round: a teacher on ``teacher_timesteps`` (K = 2N, descending) and a student on every other one.

    ``diffusion`` is the student's process: its ``prediction`` (eps, x0, v or edm) is the parameterisation
    the student is trained in. ``teacher_diffusion`` (default: the same) reads the teacher's outputs,
    so an eps teacher can train a v student (the paper's choice, sec. 4); both must share the schedule.
    ``clip_denoised`` clips the teacher's x-predictions in its two steps to [-1, 1]; off by default as
    in the authors' code (``clip_x=False``), so that the student copies the teacher's DDIM exactly.
    """

    def __init__(self, diffusion: Diffusion, teacher_timesteps: Sequence[int],
                 teacher_diffusion: Diffusion | None = None, *, clip_denoised: bool = False) -> None:
        teacher_diffusion = diffusion if teacher_diffusion is None else teacher_diffusion
        if not (torch.equal(teacher_diffusion.alphas_cumprod, diffusion.alphas_cumprod)
                and torch.equal(teacher_diffusion.timestep_map, diffusion.timestep_map)):
            raise ValueError("the teacher's and the student's Diffusion must share the schedule "
                             "(alphas_cumprod and timestep_map)")
        self.timesteps = student_timesteps(teacher_timesteps)  # checks the teacher's grid
        self.teacher_timesteps = [int(t) for t in teacher_timesteps]
        T = diffusion.num_timesteps
        if self.teacher_timesteps[0] >= T:
            raise ValueError(f"teacher timesteps must lie in [0, {T}), got {self.teacher_timesteps[0]}")
        self.diffusion, self.teacher_diffusion, self.clip_denoised = diffusion, teacher_diffusion, clip_denoised
        # The teacher's 2N + 1 levels, clean data last (abar = 1), float64 for accuracy.
        abar = torch.cat([diffusion.alphas_cumprod[self.teacher_timesteps], torch.ones(1, dtype=torch.float64)])
        self.alpha, self.sigma = abar.sqrt(), (1.0 - abar).sqrt()
        self._grid = torch.tensor(self.teacher_timesteps)

    @property
    def steps(self) -> int:
        """N, the student's model calls per sample."""
        return len(self.timesteps)

    def __repr__(self) -> str:
        return (f"ProgressiveDistillation({2 * self.steps} -> {self.steps} steps, "
                f"teacher={self.teacher_diffusion.prediction!r}, student={self.diffusion.prediction!r})")

    # -- grid ----------------------------------------------------------------------------------
    def _level(self, arr: torch.Tensor, j: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``arr[j]`` for teacher levels ``j`` ``[N]``, in ``x``'s dtype and device, ``[N x 1 x ...]``."""
        return arr.to(device=x.device, dtype=x.dtype)[j.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))

    def student_t(self, i: torch.Tensor) -> torch.Tensor:
        """The timesteps of student positions ``i`` ``[N]``: ``teacher_timesteps[2 i]``, on ``i``'s device."""
        return self._grid.to(i.device)[2 * i]

    def sample_positions(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """``[n]`` student positions, uniform over {0..N-1} (the paper's discrete-time t = i/N)."""
        dev = generator.device if generator is not None else device
        return torch.randint(0, self.steps, (n,), generator=generator, device=dev)

    # -- the target (Algorithm 2) --------------------------------------------------------------
    def _teacher_ddim(self, teacher: Model, z: torch.Tensor, j: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
        """The teacher's DDIM step (eta = 0) from level ``j`` to ``j + 1``, each row its own level:
        z_s = alpha_s x^(z_t) + sigma_s eps^(z_t) (DDIM eq. 12 with sigma = 0; Algorithm 2, lines 6-9)."""
        d, t = self.teacher_diffusion, self._grid.to(z.device)[j.to(z.device)]
        out = d.p_mean_variance_from_output(d.model_output(teacher, z, t, labels), z, t, self.clip_denoised)
        return self._level(self.alpha, j + 1, z) * out["pred_xstart"] + self._level(self.sigma, j + 1, z) * out["eps"]

    def target_xstart(self, teacher: Model, x_t: torch.Tensor, i: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 2's x~ for student positions ``i`` ``[N]``, ``x_t`` at ``student_t(i)``; no gradient.

        x~ is the x-prediction with which ONE DDIM step t -> t'' lands where the teacher's two land.
        At the last step (t'' clean: alpha = 1, sigma = 0) it is the teacher's second x-prediction.
        """
        j = 2 * i.to(x_t.device)
        with torch.no_grad():
            # 1. Two DDIM steps of the teacher: z_t -> z_t' -> z_t'' (Algorithm 2, lines 6-9).
            z_end = self._teacher_ddim(teacher, self._teacher_ddim(teacher, x_t, j, labels), j + 1, labels)
            # 2. x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (line 10).
            ratio = self._level(self.sigma, j + 2, x_t) / self._level(self.sigma, j, x_t)
            return (z_end - ratio * x_t) / (self._level(self.alpha, j + 2, x_t) - ratio * self._level(self.alpha, j, x_t))

    def target(self, x_t: torch.Tensor, i: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
        """x~ in the student's parameterisation: x~ (x0); eps~ = (z_t - alpha_t x~) / sigma_t (eps);
        v~ = alpha_t eps~ - sigma_t x~ (v; Salimans & Ho, sec. 4 and appendix D); for edm the F~ whose
        D = c_skip z_t / alpha_t + c_out F~ is x~ (EDM eq. 8's target with x~ for x_0)."""
        d, t = self.diffusion, self.student_t(i.to(x_t.device))
        if d.prediction == "x0":
            return x_tilde
        if d.prediction == "edm":
            return d.edm_target(x_t, t, x_tilde)
        eps = d.predict_eps_from_xstart(x_t, t, x_tilde)
        return eps if d.prediction == "eps" else d.get_v(x_tilde, eps, t)

    # -- the loss ------------------------------------------------------------------------------
    def truncated_snr(self, i: torch.Tensor) -> torch.Tensor:
        """max(SNR_t, 1) at student positions ``i`` ``[N]``, float64: the x-space weight of the paper's
        "truncated SNR" loss, max(||x - x^||^2, ||eps - eps^||^2) = max(SNR_t, 1) ||x - x^||^2 (sec. 4)."""
        j = 2 * i.cpu()
        return (self.alpha[j] ** 2 / self.sigma[j] ** 2).clamp(min=1.0).to(i.device)

    def loss_weight(self, i: torch.Tensor) -> torch.Tensor:
        """The weight ``[N]`` (float64) on the squared error in the student's parameterisation that makes
        it max(SNR_t, 1) times the x-space one: errors in eps are SNR_t, in v (SNR_t + 1) times x's, in
        edm's F 1 / c_out^2 = (1 + SNR_t sigma_data^2) / sigma_data^2 times x's (x^ = ... + c_out F)."""
        j = 2 * i.cpu()
        snr = self.alpha[j] ** 2 / self.sigma[j] ** 2
        sd2 = self.diffusion.sigma_data ** 2
        w = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0,
             "edm": (1.0 + snr * sd2) / sd2}[self.diffusion.prediction]
        return (snr.clamp(min=1.0) / w).to(i.device)

    def loss(self, student: Model, teacher: Model, x_start: torch.Tensor, i: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None, *,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example loss ``[N]`` for data ``x_start`` ``[N x C x H x W]`` (Algorithm 2, one iteration).

        ``i`` (student positions) defaults to uniform draws and ``noise`` to N(0, I), both from
        ``generator``; z_t = alpha_t x + sigma_t eps at t = ``student_t(i)``. The teacher's target is
        computed without gradient, so only the student's parameters get one. ``labels`` ``[N]`` are
        passed to both networks (class-conditional ones), as in :meth:`Diffusion.training_loss`.
        """
        if i is None:
            i = self.sample_positions(x_start.shape[0], generator, x_start.device)
        i = i.to(x_start.device)
        if noise is None:
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        t = self.student_t(i)
        x_t = self.diffusion.q_sample(x_start, t, noise)
        target = self.target(x_t, i, self.target_xstart(teacher, x_t, i, labels))
        out = self.diffusion.model_output(student, x_t, t, labels)
        loss = mean_flat((target - out[:, : x_start.shape[1]]) ** 2)  # a learned variance's channels: untrained
        return loss * self.loss_weight(i).to(loss.dtype)

    # -- sampling ------------------------------------------------------------------------------
    def sampler(self, eta: float = 0.0) -> DDIMSampler:
        """The student's sampler: DDIM on its N timesteps (eta = 0 is what it was distilled for).
        After k rounds: ``DDIMSampler.on_timesteps(diffusion, student_timesteps(first_grid, N))``."""
        return DDIMSampler.on_timesteps(self.diffusion, self.timesteps, eta)


def distillation_loss(student: Model, teacher: Model, x_start: torch.Tensor, diffusion: Diffusion,
                      teacher_timesteps: Sequence[int], *, teacher_diffusion: Diffusion | None = None,
                      clip_denoised: bool = False, i: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """One batch's loss, a scalar: the mean over the batch of :meth:`ProgressiveDistillation.loss` for
    the round from ``teacher_timesteps`` (K = 2N) to every other one. A training loop can build the
    :class:`ProgressiveDistillation` once (it checks its arguments) and call its ``loss``."""
    round_ = ProgressiveDistillation(diffusion, teacher_timesteps, teacher_diffusion, clip_denoised=clip_denoised)
    return round_.loss(student, teacher, x_start, i, noise, generator, labels=labels).mean()


__all__ = ["STUDENT_PREDICTIONS", "ProgressiveDistillation", "distillation_loss", "student_timesteps"]
