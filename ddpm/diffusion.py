"""Gaussian diffusion (Ho, Jain and Abbeel 2020): forward process, posterior, parameterizations, losses.

The network is an argument, never an attribute: ``model(x_t, t)`` takes ``x_t`` of shape
``[N x C x H x W]`` and ``t`` an int64 tensor ``[N]`` of original training timesteps, and returns
``[N x C x H x W]`` (or ``[N x 2C x H x W]`` with ``variance="learned_range"``).

Equation numbers: (Ho) Ho et al. 2020; (IDDPM) Nichol & Dhariwal 2021; (v) Salimans & Ho 2022;
(EDM) Karras et al. 2022.
Sampling loops live in :mod:`ddpm.samplers` and :mod:`ddpm.pipeline`, the whole bound in bits/dim in
:mod:`ddpm.likelihood`; each imports this module, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, get_args

import torch

from ddpm.config import LossType, Prediction, TimestepSampling, Variance
from ddpm.losses import LN2, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from ddpm.noise import randn
from ddpm.schedules import log_sigmas, make_betas

if TYPE_CHECKING:
    from ddpm.config import DiffusionConfig

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], Any]

PREDICTIONS: tuple[str, ...] = get_args(Prediction)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSSES: tuple[str, ...] = get_args(LossType)
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM sec. 5, Table 1: training noise levels ln sigma ~ N(P_mean, P_std^2)

_HYBRID_LAMBDA = 0.001  # IDDPM sec. 3.1: L_hybrid = L_simple + lambda L_vlb


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


class Diffusion:
    """The forward process q and the reverse process p_theta for a given beta schedule.

    All schedule arrays are float64 tensors of shape ``[T]`` on the CPU, cast to the input's dtype
    and device when used. ``timestep_map[i]`` is the original training timestep of index i; it is
    ``arange(T)`` except for a :meth:`respace`-d process, whose model calls use the original steps.

    ``variance`` defaults to ``fixed_small`` (the posterior variance beta~_t) as the public API
    promises; the config (``DiffusionConfig.variance``) defaults to ``fixed_large`` (beta_t, the
    paper's CIFAR-10 choice), and :meth:`from_config` always passes it explicitly.
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        prediction: Prediction = "eps",
        variance: Variance = "fixed_small",
        loss: LossType = "simple",
        *,
        timestep_map: torch.Tensor | Sequence[int] | None = None,
        snr_gamma: float | None = None,
        sigma_data: float = 0.5,
        timestep_sampling: TimestepSampling = "uniform",
    ) -> None:
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("variance", variance, VARIANCES)
        _check_choice("loss", loss, LOSSES)
        _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 or None (unweighted), got {snr_gamma}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.prediction, self.variance, self.loss = prediction, variance, loss
        self.snr_gamma, self.sigma_data, self.timestep_sampling = snr_gamma, float(sigma_data), timestep_sampling

        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()  # float64 for accuracy
        if betas.dim() != 1 or len(betas) < 1:
            raise ValueError(f"betas must be 1-D and non-empty, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        T = len(betas)
        self.timestep_map = (torch.arange(T) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.long).cpu())
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {tuple(self.timestep_map.shape)}")

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t (Ho, eq. 4)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log1p(-self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)  (Ho, eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip the log at t = 0 to beta~_1 (IDDPM; improved-diffusion)
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # sigma_t^2 = beta_t ("fixed_large", Ho sec. 3.2); at t = 0 beta~_1 as Ho's code and IDDPM,
        # which only matters for the decoder p(x_0 | x_1).
        self.large_variance = torch.cat([first, betas[1:]])
        # EDM's preconditioning (EDM Table 1) in the VP process: x_t / sqrt(abar_t) = x_0 + sigma_t eps
        # with sigma_t^2 = (1 - abar_t) / abar_t, and D(x) = c_skip x + c_out F(c_in x) predicts x_0.
        sigma2, sd2 = (1.0 - self.alphas_cumprod) / self.alphas_cumprod, self.sigma_data**2
        self.edm_c_skip = sd2 / (sigma2 + sd2)
        self.edm_c_out = sigma2.sqrt() * self.sigma_data / (sigma2 + sd2).sqrt()
        self.edm_c_in_vp = 1.0 / (self.alphas_cumprod * (sigma2 + sd2)).sqrt()  # c_in / sqrt(abar): on x_t
        self._cast_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Diffusion:
        betas = make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)
        return cls(betas, prediction=cfg.prediction, variance=cfg.variance, loss=cfg.loss, snr_gamma=cfg.snr_gamma,
                   sigma_data=cfg.sigma_data, timestep_sampling=cfg.timestep_sampling)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return (f"Diffusion(T={self.num_timesteps}, prediction={self.prediction!r}, "
                f"variance={self.variance!r}, loss={self.loss!r}"
                + (f", snr_gamma={self.snr_gamma}" if self.snr_gamma is not None else "")
                + (f", sigma_data={self.sigma_data}" if self.prediction == "edm" else "")
                + (f", timestep_sampling={self.timestep_sampling!r}" if self.timestep_sampling != "uniform" else "")
                + ")")

    def respace(self, use_timesteps: Sequence[int] | torch.Tensor) -> Diffusion:
        """The process restricted to a subset of indices (improved-diffusion's ``SpacedDiffusion``).

        Betas are recomputed so that the kept alphas_cumprod are unchanged:
        ``beta'_i = 1 - abar[s_i] / abar[s_{i-1}]``. Model calls still get the original timesteps.
        """
        use = sorted({int(t) for t in (use_timesteps.tolist() if isinstance(use_timesteps, torch.Tensor)
                                       else use_timesteps)})
        if not use or use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps to keep must lie in [0, {self.num_timesteps}), got {use_timesteps}")
        abar = self.alphas_cumprod[use]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Diffusion(1.0 - abar / abar_prev, self.prediction, self.variance, self.loss,
                         timestep_map=self.timestep_map[use], snr_gamma=self.snr_gamma, sigma_data=self.sigma_data,
                         timestep_sampling=self.timestep_sampling)

    # -- helpers -------------------------------------------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``self.<name>[t]`` cast to ``x``'s dtype and device, shaped ``[N x 1 x 1 x ...]``."""
        key = (name, x.device, x.dtype)
        arr = self._cast_cache.get(key)
        if arr is None:
            arr = self._cast_cache[key] = getattr(self, name).to(device=x.device, dtype=x.dtype)
        return arr[t.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))

    def _check_output(self, model_output: torch.Tensor, x: torch.Tensor) -> int:
        """The input channel count C, after checking that the network returned C (or 2C) channels."""
        C = x.shape[1]
        want = 2 * C if self.variance == "learned_range" else C
        if model_output.shape[1] != want:
            raise ValueError(f"model output has {model_output.shape[1]} channels; variance={self.variance!r} "
                             f"with {C} input channels needs {want}")
        return C

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original training timesteps that the model sees for indices ``t`` ``[N]``."""
        key = ("timestep_map", t.device, torch.long)
        m = self._cast_cache.get(key)
        if m is None:
            m = self._cast_cache[key] = self.timestep_map.to(t.device)
        return m[t]

    def model_output(self, model: Model, x_t: torch.Tensor, t: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output at indices ``t``: ``model(x_t, original t)``, or for ``prediction="edm"``
        ``model(c_in x_t / sqrt(abar_t), original t)`` (EDM Table 1: the input scaled to unit variance).
        With ``labels`` ``[N]`` (a class-conditional network) they are its third argument."""
        if self.prediction == "edm":
            x_t = self._extract("edm_c_in_vp", t, x_t) * x_t
        if labels is None:
            return model(x_t, self.model_timesteps(t))
        return model(x_t, self.model_timesteps(t), labels)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """``[n]`` training indices: uniform over {0..T-1} (Ho, Algorithm 1), or with
        ``timestep_sampling="lognormal"`` EDM's noise levels ln sigma ~ N(-1.2, 1.2^2) (EDM Table 1),
        each taken to the index whose sigma_t is nearest in log terms (clamped to [sigma_0, sigma_T-1])."""
        dev = generator.device if generator is not None else device
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=dev)
        log_sigma = EDM_P_MEAN + EDM_P_STD * torch.randn(n, generator=generator, device=dev, dtype=torch.float64)
        levels = log_sigmas(self.alphas_cumprod)
        right = torch.searchsorted(levels, log_sigma.cpu()).clamp(1, len(levels) - 1)
        nearer_left = (log_sigma.cpu() - levels[right - 1]) < (levels[right] - log_sigma.cpu())
        return (right - nearer_left.long()).to(dev)

    # -- forward process -----------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho, eq. 4): (mean, variance, log_variance)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start).neg().add(1.0).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho, eq. 4); all ``[N x C x H x W]``."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) (Ho, eq. 6-7): (mean, variance, log_variance_clipped), each ``[N x ...]``."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- parameterizations ---------------------------------------------------------------------
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x_0."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), eq. 4 solved for eps."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def edm_target(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """F's target for ``x_start`` (edm): (x_0 - c_skip x_t / sqrt(abar_t)) / c_out, the F with which
        D = c_skip x_t / sqrt(abar_t) + c_out F is x_0 (EDM eq. 7-8). All ``[N x C x H x W]``."""
        skip = self._extract("edm_c_skip", t, x_t) * self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        return (x_start - skip * x_t) / self._extract("edm_c_out", t, x_t)

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v, sec. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (v, sec. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    # -- reverse process -----------------------------------------------------------------------
    def p_mean_variance(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mean, variance) for indices ``t`` ``[N]``.

        Returns ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and ``eps`` (the noise
        implied by the possibly clipped ``pred_xstart``), each ``[N x C x H x W]``.
        """
        return self.p_mean_variance_from_output(self.model_output(model, x_t, t), x_t, t, clip_denoised)

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """:meth:`p_mean_variance` given the network output ``[N x C (or 2C) x H x W]``."""
        C = self._check_output(model_output, x_t)
        # 1. Variance: fixed (Ho sec. 3.2: beta~_t or beta_t) or learned (IDDPM eq. 15).
        if self.variance == "learned_range":
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("betas", t, x_t).log()
            frac = (var_values + 1) / 2  # the network outputs v in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = log_variance.exp()
        elif self.variance == "fixed_small":
            variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
            log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            variance = self._extract("large_variance", t, x_t).expand_as(x_t)
            log_variance = variance.log()
        # 2. The network's prediction of x_0, from whichever quantity it was trained on.
        if self.prediction == "eps":
            pred_xstart = self.predict_xstart_from_eps(x_t, t, model_output)
        elif self.prediction == "x0":
            pred_xstart = model_output
        elif self.prediction == "v":
            pred_xstart = self.predict_xstart_from_v(x_t, t, model_output)
        else:  # edm: D = c_skip x_t / sqrt(abar_t) + c_out F (EDM eq. 7)
            pred_xstart = (self._extract("edm_c_skip", t, x_t) * self._extract("sqrt_recip_alphas_cumprod", t, x_t)
                           * x_t + self._extract("edm_c_out", t, x_t) * model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # 3. mu_theta(x_t, t) = mu~_t(x_t, x_0 = pred_xstart) (Ho, eq. 7; for eps this is eq. 11).
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    # -- training ------------------------------------------------------------------------------
    def training_loss(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        levels: int = 256,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example loss ``[N]`` for data ``x_start`` ``[N x C x H x W]`` in [-1, 1].

        ``t`` defaults to uniform draws from {0..T-1} and ``noise`` to N(0, I), both from
        ``generator``. ``simple``: mean squared error on the parameterization's target (Ho, eq. 14).
        ``vb``: T L_t in bits/dim, an unbiased estimate of L_vlb. ``hybrid``: L_simple + lambda L_vlb
        with lambda = 0.001 and the mean detached in the vb term, so it only trains the variance (IDDPM
        sec. 3.1); with a fixed variance that term has no gradient and is left out. ``levels`` sets the
        decoder's bins at t = 0 (256 for 8-bit images). With ``snr_gamma`` the squared error is
        weighted by :meth:`snr_weight` (min-SNR-gamma, Hang et al. 2023). ``labels`` ``[N]``: the
        class of each example for a class-conditional network, the null class where dropped
        (:func:`ddpm.guidance.drop_labels`); ``None`` calls ``model(x_t, t)`` as for any other.
        """
        N = x_start.shape[0]
        if t is None:
            t = self.sample_timesteps(N, generator, x_start.device).to(x_start.device)
        if noise is None:
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = self.model_output(model, x_t, t, labels)
        C = self._check_output(model_output, x_start)

        if self.loss == "vb":
            out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
            return self.vb_term_bpd(out, x_start, x_t, t, levels) * self.num_timesteps

        target = {"eps": noise, "x0": x_start, "v": self.get_v(x_start, noise, t)}.get(self.prediction)
        if target is None:  # edm: EDM eq. 8 with its lambda(sigma) = 1 / c_out^2, so the squared error
            # in F is unweighted.
            target = self.edm_target(x_t, t, x_start)
        loss = mean_flat((target - model_output[:, :C]) ** 2)
        if self.snr_gamma is not None:
            loss = loss * self.snr_weight(t).to(loss.dtype)
        if self.loss == "hybrid" and self.variance == "learned_range":
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            out = self.p_mean_variance_from_output(frozen, x_t, t, clip_denoised=False)
            # lambda * (T L_t): the vb term's L_vlb estimate (IDDPM eq. 16).
            loss = loss + _HYBRID_LAMBDA * self.num_timesteps * self.vb_term_bpd(out, x_start, x_t, t, levels)
        return loss

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights ``[N]`` (Hang et al. 2023, eq. 10 and sec. 3.4), float64.

        With SNR_t = abar_t / (1 - abar_t), each target's squared error weighted by
        min(SNR_t, gamma) / w_target: w = SNR_t for eps, 1 for x_0, SNR_t + 1 for v, so that every
        parameterization gets the x_0-space weight min(SNR_t, gamma). ``snr_gamma`` None: all ones.
        """
        abar = self.alphas_cumprod[t.cpu()]
        if self.snr_gamma is None:
            return torch.ones_like(abar).to(t.device)
        snr = abar / (1.0 - abar)
        clipped = snr.clamp(max=self.snr_gamma)
        w = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[self.prediction]
        return w.to(t.device)

    def vb_term_bpd(self, out: dict[str, torch.Tensor], x_start: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, levels: int = 256) -> torch.Tensor:
        """One term of the bound, ``[N]`` bits/dim: the KL at ``t > 0``, the decoder NLL at ``t == 0``.

        ``out`` is :meth:`p_mean_variance`'s result at (x_t, t):
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) and L_0 = -log p(x_0 | x_1) (Ho, eq. 5, 13).
        """
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / LN2
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"], levels)) / LN2
        return torch.where(t == 0, nll, kl)


__all__ = ["Diffusion", "LOSSES", "PREDICTIONS", "TIMESTEP_SAMPLINGS", "VARIANCES", "mean_flat"]
