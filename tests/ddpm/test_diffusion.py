"""Forward process, posterior (Ho eq. 6-7), parameterizations, p_mean_variance and training losses."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.diffusion import Diffusion
from ddpm.schedules import make_betas
from tests.ddpm.helpers import GaussianOracle

torch.set_num_threads(1)


def zero_model(x_t, t):
    return torch.zeros_like(x_t)


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(make_betas("linear", 1000), variance="fixed_large")


def test_num_timesteps_and_float64(diffusion):
    assert diffusion.num_timesteps == 1000
    assert diffusion.alphas_cumprod.dtype == torch.float64
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(4.0358297653756754e-05, rel=1e-9)  # golden


def test_golden_posterior_variance(diffusion):
    # The same numbers as diffusers' DDPMScheduler tests (_get_variance(487) = 0.00979, (999) = 0.02).
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.posterior_variance[487].item() == pytest.approx(0.009791571985690042, rel=1e-9)
    assert diffusion.posterior_variance[999].item() == pytest.approx(0.01999998352656061, rel=1e-9)


def test_posterior_matches_bayes_rule(diffusion):
    # Ho eq. 6-7 derived independently: q(x_{t-1}|x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) times
    # q(x_t|x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, precision-weighted means add.
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 10, 487, 998, 999])
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    xt = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior(x0, xt, t)
    beta = diffusion.betas[t].view(-1, 1, 1, 1)
    abar_prev = torch.cumprod(1 - diffusion.betas, 0)[t - 1].view(-1, 1, 1, 1)
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * xt / beta) / prec
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, (1 / prec).expand_as(xt))
    torch.testing.assert_close(log_var, var.log())


def test_posterior_at_t0_is_x0_with_clipped_log_variance(diffusion):
    x0, xt = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    mean, var, log_var = diffusion.q_posterior(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert bool((var == 0).all())
    torch.testing.assert_close(log_var, torch.full_like(xt, diffusion.posterior_variance[1].log().item()))


def test_q_sample_moments(diffusion):
    g = torch.Generator().manual_seed(1)
    n, t = 20000, 300
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    tt = torch.full((n,), t)
    xt = diffusion.q_sample(x0, tt, torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64))
    abar = diffusion.alphas_cumprod[t].item()
    mean, var, _ = diffusion.q_mean_variance(x0[:1], tt[:1])
    assert mean.item() == pytest.approx(abar**0.5 * 0.7) and var.item() == pytest.approx(1 - abar)
    assert abs(xt.mean().item() - mean.item()) < 4 * (var.item() / n) ** 0.5
    assert abs(xt.var().item() - var.item()) < 4 * var.item() * (2 / n) ** 0.5


def test_conversions_round_trip(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 700, 999])
    xt = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(xt, t, x0), eps)
    v = diffusion.get_v(x0, eps, t)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(xt, t, v), x0)
    # v also satisfies eps = sqrt(abar) v + sqrt(1 - abar) x_t (Salimans & Ho).
    a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * xt, eps)


def test_float32_inputs_get_float32_coefficients(diffusion):
    x = torch.randn(2, 1, 2, 2)
    out = diffusion.q_sample(x, torch.tensor([3, 4]), torch.randn_like(x))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterizations_agree(diffusion, prediction):
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    ref = Diffusion(diffusion.betas, variance="fixed_large").p_mean_variance(
        GaussianOracle(diffusion.alphas_cumprod), x, t, False)
    d = Diffusion(diffusion.betas, prediction=prediction, variance="fixed_large")
    out = d.p_mean_variance(GaussianOracle(diffusion.alphas_cumprod, prediction=prediction), x, t, False)
    for key in ("mean", "pred_xstart", "eps", "variance"):
        torch.testing.assert_close(out[key], ref[key])


def test_fixed_and_learned_variances(diffusion):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 600])
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    small = Diffusion(diffusion.betas, variance="fixed_small").p_mean_variance(oracle, x, t)
    large = Diffusion(diffusion.betas, variance="fixed_large").p_mean_variance(oracle, x, t)
    pv, beta = diffusion.posterior_variance, diffusion.betas
    torch.testing.assert_close(small["variance"][:, 0, 0, 0], pv[t])
    torch.testing.assert_close(large["variance"][:, 0, 0, 0], torch.stack([pv[1], beta[1], beta[600]]))
    torch.testing.assert_close(large["log_variance"], large["variance"].log())
    learned = Diffusion(diffusion.betas, variance="learned_range", loss="hybrid")
    lo_log, hi_log = diffusion.posterior_log_variance_clipped[t], beta[t].log()
    for v, expected in [(1.0, hi_log), (-1.0, lo_log), (0.0, (hi_log + lo_log) / 2)]:
        out = learned.p_mean_variance(GaussianOracle(diffusion.alphas_cumprod, var_value=v), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], expected)
        torch.testing.assert_close(out["mean"], small["mean"])  # the mean ignores the variance channels
    with pytest.raises(ValueError, match="needs 2"):
        learned.p_mean_variance(oracle, x, t)
    with pytest.raises(ValueError, match="needs 2"):
        learned.training_loss(oracle, x)


def test_clip_denoised_clamps_pred_xstart(diffusion):
    x = torch.full((1, 1, 1, 1), 50.0)
    out = diffusion.p_mean_variance(zero_model, x, torch.tensor([10]), clip_denoised=True)
    assert out["pred_xstart"].item() == 1.0
    eps = diffusion.predict_eps_from_xstart(x, torch.tensor([10]), out["pred_xstart"])
    torch.testing.assert_close(out["eps"], eps)


def test_bad_choices_list_valid_options(diffusion):
    with pytest.raises(ValueError, match="eps, x0, v"):
        Diffusion(diffusion.betas, prediction="score")
    with pytest.raises(ValueError, match="fixed_small, fixed_large, learned_range"):
        Diffusion(diffusion.betas, variance="big")
    with pytest.raises(ValueError, match="simple, vb, hybrid"):
        Diffusion(diffusion.betas, loss="l1")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Diffusion(torch.tensor([0.1, 1.0]))


def test_default_variance_is_the_posterior_variance_as_the_api_promises():
    d = Diffusion(make_betas("linear", 100))
    assert d.variance == "fixed_small"
    x, t = torch.zeros(2, 1, 1, 1), torch.tensor([0, 50])
    out = d.p_mean_variance(lambda x_t, tt: torch.zeros_like(x_t), x, t, clip_denoised=False)
    # fixed_small: sigma_t^2 = beta~_t (Ho et al. eq. 7), exactly 0 at t = 0
    expected = d.posterior_variance.to(torch.float32)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(out["variance"], expected)


def test_from_config():
    d = Diffusion.from_config(DiffusionConfig(schedule="cosine", timesteps=100, prediction="v"))
    assert d.num_timesteps == 100 and d.prediction == "v" and d.variance == "fixed_large"
    torch.testing.assert_close(d.betas, make_betas("cosine", 100))


def test_respace_keeps_alphas_cumprod_and_original_timesteps(diffusion):
    kept = [0, 10, 500, 999]
    spaced = diffusion.respace(kept)
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept])
    assert spaced.timestep_map.tolist() == kept
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    x = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    out = spaced.p_mean_variance(oracle, x, torch.arange(4), clip_denoised=False)
    assert oracle.calls[-1] == kept  # the model sees original timesteps
    ref = diffusion.p_mean_variance(oracle, x, torch.tensor(kept), clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], ref["pred_xstart"])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_oracle_beats_zero_model(diffusion, prediction):
    d = Diffusion(diffusion.betas, prediction=prediction, variance="fixed_large")
    g = torch.Generator().manual_seed(3)
    x0 = 0.3 + 0.5 * torch.randn(256, 1, 2, 2, generator=g)
    oracle = GaussianOracle(diffusion.alphas_cumprod, prediction=prediction)
    loss = d.training_loss(oracle, x0, generator=torch.Generator().manual_seed(4))
    zero = d.training_loss(zero_model, x0, generator=torch.Generator().manual_seed(4))
    assert loss.shape == (256,) and zero.shape == (256,)
    assert loss.mean() < zero.mean()
    if prediction == "eps":
        assert zero.mean().item() == pytest.approx(1.0, abs=0.1)  # E|eps|^2 per dim


def test_training_loss_explicit_t_and_noise(diffusion):
    x0 = torch.randn(3, 1, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 100, 999])
    loss = diffusion.training_loss(zero_model, x0, t=t, noise=noise)
    torch.testing.assert_close(loss, noise.pow(2).mean(dim=(1, 2, 3)))  # Ho eq. 14 with eps_theta = 0


def test_training_loss_vb(diffusion):
    d = Diffusion(diffusion.betas, loss="vb", variance="fixed_large")
    x0 = (torch.randint(0, 17, (8, 1, 2, 2)) / 8.0 - 1).float()
    oracle = GaussianOracle(diffusion.alphas_cumprod, mu=0.0, s=0.6)
    loss = d.training_loss(oracle, x0, generator=torch.Generator().manual_seed(0), levels=17)
    assert loss.shape == (8,) and bool(torch.isfinite(loss).all()) and bool((loss >= 0).all())


def test_hybrid_vb_term_trains_only_the_variance():
    d = Diffusion(make_betas("linear", 100), variance="learned_range", loss="hybrid")
    simple = Diffusion(make_betas("linear", 100), variance="learned_range", loss="vb")
    a = torch.nn.Parameter(torch.tensor(0.5))
    b = torch.nn.Parameter(torch.tensor(0.1))

    def model(x_t, t):
        return torch.cat([a * x_t, b * torch.ones_like(x_t)], dim=1)

    x0 = torch.rand(16, 1, 2, 2) * 2 - 1
    t, noise = torch.randint(1, 100, (16,)), torch.randn(16, 1, 2, 2)
    hybrid = d.training_loss(model, x0, t=t, noise=noise)
    mse = (noise - a * d.q_sample(x0, t, noise)).pow(2).mean(dim=(1, 2, 3))
    ga, gb = torch.autograd.grad((hybrid - mse).sum(), [a, b])
    assert ga.item() == 0.0 and gb.item() != 0.0  # stop-grad on the mean (IDDPM sec. 3.1)
    vb = simple.training_loss(model, x0, t=t, noise=noise)
    ga_vb, _ = torch.autograd.grad(vb.sum(), [a, b])
    assert ga_vb.item() != 0.0  # the pure vb loss does train the mean
    torch.testing.assert_close(hybrid - mse, vb * 0.001)  # lambda L_vlb with L_vlb = T L_t


def test_training_loss_reproducible_with_generator(diffusion):
    x0 = torch.randn(4, 1, 2, 2)
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    l1 = diffusion.training_loss(oracle, x0, generator=torch.Generator().manual_seed(7))
    l2 = diffusion.training_loss(oracle, x0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_gamma_weights_the_squared_error_in_closed_form(prediction):
    """Hang et al. 2023: every parameterization ends up with the x_0-space weight min(SNR_t, gamma);
    eps's own weight is SNR_t and v's SNR_t + 1, so theirs are divided by it."""
    betas = make_betas("linear", 1000)
    plain = Diffusion(betas, prediction=prediction)
    weighted = Diffusion(betas, prediction=prediction, snr_gamma=5.0)
    t = torch.tensor([0, 50, 200, 400, 999])
    abar = plain.alphas_cumprod[t]
    snr = abar / (1 - abar)  # 9999 at t=0, about 0.5 at t=400 (linear schedule), 4e-5 at t=999
    expected = {"eps": torch.minimum(snr, torch.tensor(5.0)) / snr, "x0": torch.minimum(snr, torch.tensor(5.0)),
                "v": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)}[prediction]
    torch.testing.assert_close(weighted.snr_weight(t), expected)
    if prediction == "eps":  # above gamma the weight is gamma / SNR, below it 1
        assert weighted.snr_weight(t)[0].item() == pytest.approx(5.0 / snr[0].item())
        assert weighted.snr_weight(t)[-1].item() == 1.0
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    noise = torch.randn(5, 1, 4, 4)
    a = plain.training_loss(zero_model, x0, t=t, noise=noise)
    b = weighted.training_loss(zero_model, x0, t=t, noise=noise)
    torch.testing.assert_close(b, a * expected.float())
    torch.testing.assert_close(plain.snr_weight(t), torch.ones(5, dtype=torch.float64))  # unset: unweighted


def test_min_snr_gamma_from_config_survives_respacing_and_is_checked():
    d = Diffusion.from_config(DiffusionConfig(snr_gamma=5.0))
    assert d.snr_gamma == 5.0 and d.respace(range(0, 1000, 10)).snr_gamma == 5.0 and "snr_gamma=5.0" in repr(d)
    assert Diffusion.from_config(DiffusionConfig()).snr_gamma is None  # the paper's L_simple
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        Diffusion(make_betas("linear", 100), snr_gamma=0.0)
    from ddpm.config import ConfigError

    with pytest.raises(ConfigError, match="snr_gamma must be > 0 or unset"):
        DiffusionConfig(snr_gamma=-1.0)
    with pytest.raises(ConfigError, match="loss=vb has none"):
        DiffusionConfig(snr_gamma=5.0, loss="vb")


# -- EDM preconditioning and noise levels (Karras et al. 2022) ----------------------------------


class EDMOracle(GaussianOracle):
    """The optimal F of ``prediction="edm"`` for Gaussian data: it takes EDM's scaled input
    c_in x_t / sqrt(abar_t), undoes the scaling, and returns (x_0* - c_skip x_t / sqrt(abar_t)) / c_out."""

    def __init__(self, alphas_cumprod, sigma_data=0.5, **kwargs):
        super().__init__(alphas_cumprod, prediction="x0", **kwargs)
        self.sigma_data = sigma_data

    def forward(self, x_in, t):
        a = self.abar.to(x_in)[t].view(-1, *([1] * (x_in.dim() - 1)))
        sigma2, sd2 = (1 - a) / a, self.sigma_data**2
        x_t = x_in * (a * (sigma2 + sd2)).sqrt()
        x0 = super().forward(x_t, t)
        return (x0 - sd2 / (sigma2 + sd2) * x_t / a.sqrt()) / (sigma2.sqrt() * self.sigma_data / (sigma2 + sd2).sqrt())


def test_edm_preconditioning_closed_form(diffusion):
    d = Diffusion(diffusion.betas, prediction="edm", variance="fixed_large", sigma_data=0.5)
    abar = diffusion.alphas_cumprod
    sigma2 = (1 - abar) / abar
    # EDM Table 1 with sigma_data = 0.5: c_skip = 0.25 / (sigma^2 + 0.25), c_out = 0.5 sigma / sqrt(sigma^2 + 0.25).
    torch.testing.assert_close(d.edm_c_skip, 0.25 / (sigma2 + 0.25))
    torch.testing.assert_close(d.edm_c_out, 0.5 * sigma2.sqrt() / (sigma2 + 0.25).sqrt())
    # The network's input c_in x_t / sqrt(abar) has unit variance when x_0 has std sigma_data.
    x0 = 0.5 * torch.randn(200_000, dtype=torch.float64)
    t = torch.full((200_000,), 600)
    x_t = d.q_sample(x0.view(-1, 1, 1, 1), t).flatten()
    assert (d.edm_c_in_vp[600] * x_t).std().item() == pytest.approx(1.0, rel=0.01)


def test_edm_training_target_is_what_sampling_reads_back(diffusion):
    """F = the training target, fed back as the network's output, gives pred_xstart = x_0 exactly."""
    d = Diffusion(diffusion.betas, prediction="edm", variance="fixed_large")
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 1, 2, 2, generator=g,
                                                                                          dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    captured = {}

    def model(x_in, t_model):
        captured["out"] = torch.zeros_like(x_in)
        return captured["out"]

    loss = d.training_loss(model, x0, t=t, noise=noise)  # with F = 0 the loss is the target's square
    c = lambda name: d._extract(name, t, x_t)  # noqa: E731
    target = (x0 - c("edm_c_skip") * c("sqrt_recip_alphas_cumprod") * x_t) / c("edm_c_out")
    torch.testing.assert_close(loss, target.pow(2).mean(dim=(1, 2, 3)))
    out = d.p_mean_variance_from_output(target, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0)


def test_edm_oracle_agrees_with_the_eps_oracle_and_beats_zero(diffusion):
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    ref = Diffusion(diffusion.betas, variance="fixed_large").p_mean_variance(
        GaussianOracle(diffusion.alphas_cumprod), x, t, False)
    d = Diffusion(diffusion.betas, prediction="edm", variance="fixed_large")
    out = d.p_mean_variance(EDMOracle(diffusion.alphas_cumprod), x, t, False)
    for key in ("mean", "pred_xstart", "eps"):
        torch.testing.assert_close(out[key], ref[key])
    x0 = 0.3 + 0.5 * torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    loss = d.training_loss(EDMOracle(diffusion.alphas_cumprod), x0, generator=torch.Generator().manual_seed(4))
    zero = d.training_loss(zero_model, x0, generator=torch.Generator().manual_seed(4))
    # With the data's std equal to sigma_data, EDM's weighting makes the optimal F's expected loss
    # lambda(sigma) x the posterior variance = 1 at every noise level; F = 0 also pays for the mean 0.3.
    assert loss.mean().item() == pytest.approx(1.0, abs=0.1) and loss.mean() < zero.mean()


def test_lognormal_timesteps_follow_edms_noise_levels(diffusion):
    d = Diffusion(diffusion.betas, timestep_sampling="lognormal")
    t = d.sample_timesteps(100_000, torch.Generator().manual_seed(6))
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    log_sigma = 0.5 * (torch.log1p(-diffusion.alphas_cumprod) - diffusion.alphas_cumprod.log())[t]
    assert log_sigma.median().item() == pytest.approx(-1.2, abs=0.03)  # EDM's P_mean
    q25, q75 = log_sigma.quantile(torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    assert (q75 - q25) / 1.349 == pytest.approx(1.2, rel=0.03)  # EDM's P_std, from the quartiles
    uniform = Diffusion(diffusion.betas).sample_timesteps(100_000, torch.Generator().manual_seed(6))
    assert abs(uniform.double().mean().item() - 499.5) < 3


def test_edm_settings_survive_config_and_respacing_and_are_checked():
    from ddpm.config import ConfigError

    d = Diffusion.from_config(DiffusionConfig(prediction="edm", sigma_data=0.7, timestep_sampling="lognormal"))
    r = d.respace(range(0, 1000, 10))
    assert (r.prediction, r.sigma_data, r.timestep_sampling) == ("edm", 0.7, "lognormal")
    assert "sigma_data=0.7" in repr(d) and "lognormal" in repr(d)
    with pytest.raises(ConfigError, match="sigma_data must be > 0"):
        DiffusionConfig(sigma_data=0.0)
    with pytest.raises(ConfigError, match="leave snr_gamma unset"):
        DiffusionConfig(prediction="edm", snr_gamma=5.0)
    with pytest.raises(ConfigError, match="need uniform timesteps"):
        DiffusionConfig(timestep_sampling="lognormal", loss="hybrid", variance="learned_range")
    with pytest.raises(ConfigError, match="valid: uniform, lognormal"):
        DiffusionConfig(timestep_sampling="edm")
    with pytest.raises(ValueError, match="valid: uniform, lognormal"):
        Diffusion(make_betas("linear", 100), timestep_sampling="beta")
