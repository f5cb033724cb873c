"""Samplers against the analytic optimal denoiser for Gaussian data.

For x_0 ~ N(mu, s^2) per pixel the optimal network makes E[x_0 | x_t] = P_t x_t + Q_t affine, so every
sampler step is affine in x and in fresh noise. The tests propagate the mean and variance of x exactly
through each sampler's own timestep list with its coefficients written out here (not by calling the
sampler), then check 4096 samples against them within 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.diffusion import Diffusion
from ddpm.noise import NoiseSource, randn
from ddpm.samplers import (DDIMSampler, DDPMSampler, DPMSolverPPSampler, check_eta, check_sampler, generate, run_loop,
                           space_timesteps)
from ddpm.schedules import make_betas
from tests.ddpm.helpers import GaussianOracle

torch.set_num_threads(1)

MU, S = 0.3, 0.5
SHAPE = (1024, 4, 1, 1)  # 4096 scalar samples


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(make_betas("linear", 1000), variance="fixed_large")


@pytest.fixture(scope="module")
def abar(diffusion):
    return diffusion.alphas_cumprod.tolist()


def posterior_x0(a):
    """E[x_0 | x_t] = P x_t + Q for x_t = sqrt(a) x_0 + sqrt(1 - a) eps, x_0 ~ N(MU, S^2)."""
    d = a * S**2 + 1 - a
    return math.sqrt(a) * S**2 / d, MU * (1 - a) / d


def ddpm_moments(abar, timesteps, variance="fixed_large"):
    """Ho Algorithm 2 on the respaced chain s_0 < ... < s_{n-1}: x <- c1 x0_hat + c2 x + sigma z."""
    kept = sorted(timesteps)
    ab = [abar[s] for s in kept]
    m, v = 0.0, 1.0
    for i in reversed(range(len(kept))):
        ab_prev = ab[i - 1] if i > 0 else 1.0
        beta = 1 - ab[i] / ab_prev
        c1 = beta * math.sqrt(ab_prev) / (1 - ab[i])  # Ho eq. 7
        c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab[i])
        P, Q = posterior_x0(ab[i])
        A, B = c1 * P + c2, c1 * Q
        if i == 0:
            var = 0.0
        elif variance == "fixed_small":
            var = beta * (1 - ab_prev) / (1 - ab[i])
        else:
            var = beta
        m, v = A * m + B, A * A * v + var
    return m, v


def ddim_moments(abar, timesteps, eta):
    """DDIM eq. 12: x <- sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps_hat + sigma z."""
    m, v = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a = abar[t]
        ap = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        P, Q = posterior_x0(a)
        # eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a)
        k = math.sqrt(1 - ap - sigma2) / math.sqrt(1 - a)
        A = math.sqrt(ap) * P + k * (1 - math.sqrt(a) * P)
        B = math.sqrt(ap) * Q - k * math.sqrt(a) * Q
        m, v = A * m + B, A * A * v + sigma2
    return m, v


def dpmpp_moments(abar, timesteps):
    """DPM-Solver++ 2M, deterministic: track x = A x_T + B and the previous x0_hat likewise."""
    lam = [0.5 * math.log(abar[t] / (1 - abar[t])) for t in timesteps]
    A, B, prev = 1.0, 0.0, None
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        P, Q = posterior_x0(abar[t])
        x0 = (P * A, P * B + Q)
        if i == n - 1:
            return x0[1], x0[0] ** 2
        h = lam[i + 1] - lam[i]
        if prev is None or i == n - 2:
            D = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = tuple((1 + 0.5 / r) * x0[j] - 0.5 / r * prev[j] for j in range(2))
        ratio = math.sqrt(1 - abar[timesteps[i + 1]]) / math.sqrt(1 - abar[t])
        coef = -math.sqrt(abar[timesteps[i + 1]]) * math.expm1(-h)
        A, B, prev = ratio * A + coef * D[0], ratio * B + coef * D[1], x0


def assert_moments(x, m, v):
    n = x.numel()
    assert abs(x.mean().item() - m) < 4 * math.sqrt(v / n), (x.mean().item(), m)
    assert abs(x.var().item() - v) < 4 * v * math.sqrt(2 / (n - 1)), (x.var().item(), v)


def test_space_timesteps():
    ts = space_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert space_timesteps(10, 10) == list(range(9, -1, -1))
    assert space_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError, match="steps must be"):
        space_timesteps(10, 11)


@pytest.mark.parametrize("steps,variance", [(1000, "fixed_large"), (50, "fixed_large"), (50, "fixed_small"),
                                            (7, "fixed_small")])
def test_ddpm_matches_exact_moments(diffusion, abar, steps, variance):
    d = Diffusion(diffusion.betas, variance=variance)
    sampler = DDPMSampler(d, steps)
    m, v = ddpm_moments(abar, sampler.timesteps, variance)
    x = run_loop(sampler, GaussianOracle(d.alphas_cumprod, MU, S), SHAPE,
                 generator=torch.Generator().manual_seed(steps), clip_denoised=False)
    assert_moments(x, m, v)
    if steps == 1000:  # the full chain reproduces the data distribution
        assert abs(m - MU) < 1e-3 and abs(v - S**2) < 2e-3
        assert_moments(x, MU, S**2)


@pytest.mark.parametrize("steps,eta", [(1000, 0.0), (50, 0.0), (50, 1.0), (10, 0.5)])
def test_ddim_matches_exact_moments(diffusion, abar, steps, eta):
    sampler = DDIMSampler(diffusion, steps, eta)
    m, v = ddim_moments(abar, sampler.timesteps, eta)
    x = run_loop(sampler, GaussianOracle(diffusion.alphas_cumprod, MU, S), SHAPE,
                 generator=torch.Generator().manual_seed(10 + steps), clip_denoised=False)
    assert_moments(x, m, v)
    if steps == 1000:
        assert abs(m - MU) < 1e-3 and abs(v - S**2) < 2e-3
        assert_moments(x, MU, S**2)


def test_ddim_eta_one_is_ddpm_with_posterior_variance(abar):
    # DDIM's sigma(eta=1) is beta~ of the respaced chain, so the two closed forms must agree.
    ts = space_timesteps(1000, 50)
    assert ddim_moments(abar, ts, 1.0) == pytest.approx(ddpm_moments(abar, ts, "fixed_small"), rel=1e-9)


@pytest.mark.parametrize("steps", [20, 8])
def test_dpmpp_matches_exact_moments(diffusion, abar, steps):
    sampler = DPMSolverPPSampler(diffusion, steps)
    m, v = dpmpp_moments(abar, sampler.timesteps)
    x = run_loop(sampler, GaussianOracle(diffusion.alphas_cumprod, MU, S), SHAPE,
                 generator=torch.Generator().manual_seed(20 + steps), clip_denoised=False)
    assert_moments(x, m, v)
    assert sampler.timesteps[-1] == 0


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_parameterizations_give_the_same_samples(diffusion, prediction):
    d = Diffusion(diffusion.betas, prediction=prediction, variance="fixed_large")
    ref = generate(GaussianOracle(diffusion.alphas_cumprod), diffusion, (8, 2, 2, 2), "ddim", steps=10,
                   generator=torch.Generator().manual_seed(0))
    out = generate(GaussianOracle(diffusion.alphas_cumprod, prediction=prediction), d, (8, 2, 2, 2), "ddim",
                   steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 25), ("ddim", 10), ("dpmpp", 10)])
def test_model_sees_the_samplers_timestep_list(diffusion, sampler, steps):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    generate(oracle, diffusion, (2, 1, 2, 2), sampler, steps=steps)
    assert [c[0] for c in oracle.calls] == space_timesteps(1000, steps)  # original training timesteps
    assert all(len(set(c)) == 1 for c in oracle.calls)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_per_sample_seeds_ignore_batch_composition(diffusion, sampler):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    kwargs = {"steps": 12, "eta": 1.0 if sampler == "ddim" else 0.0}
    full = generate(oracle, diffusion, (4, 1, 3, 3), sampler, seeds=[10, 11, 12, 13], **kwargs)
    part = generate(oracle, diffusion, (2, 1, 3, 3), sampler, seeds=torch.tensor([13, 11]), **kwargs)
    torch.testing.assert_close(part[0], full[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part[1], full[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full[0], full[1])


def test_noise_source_per_sample_streams():
    a = NoiseSource((3, 2), seeds=[5, 6, 7])
    b = NoiseSource((1, 2), seeds=[6])
    for _ in range(3):
        torch.testing.assert_close(a.next()[1], b.next()[0], rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(randn((2, 3), generator=g1), torch.randn(2, 3, generator=g2))
    assert randn((2, 3), seeds=[1, 2], dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        NoiseSource((3, 2), seeds=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        NoiseSource((1, 2), generator=g1, seeds=[1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_progressive_and_progress(diffusion, sampler):
    seen = []
    x, preds = generate(GaussianOracle(diffusion.alphas_cumprod), diffusion, (3, 2, 2, 2), sampler, steps=9,
                        progressive=4, progress=lambda i, n: seen.append((i, n)),
                        generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2, 2, 2) and preds.shape == (4, 3, 2, 2, 2)
    assert seen == [(i, 9) for i in range(1, 10)]
    if sampler != "ddpm":  # the last step returns its x_0 prediction
        torch.testing.assert_close(preds[-1], x)


def test_generate_defaults_and_errors(diffusion):
    small = Diffusion(make_betas("linear", 30), variance="fixed_large")
    oracle = GaussianOracle(small.alphas_cumprod)
    generate(oracle, small, (1, 1, 1, 1), "ddim")  # default 50 steps capped at T = 30
    assert len(oracle.calls) == 30
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp"):
        generate(oracle, small, (1, 1, 1, 1), "euler")
    with pytest.raises(ValueError, match="only applies to the ddim"):
        generate(oracle, small, (1, 1, 1, 1), "ddpm", eta=1.0)


def test_learned_range_model_samples(diffusion):
    d = Diffusion(diffusion.betas, variance="learned_range", loss="hybrid")
    oracle = GaussianOracle(diffusion.alphas_cumprod, var_value=0.0)
    for sampler in ("ddpm", "ddim", "dpmpp"):
        x = generate(oracle, d, (2, 3, 2, 2), sampler, steps=5)
        assert x.shape == (2, 3, 2, 2) and bool(torch.isfinite(x).all())


def test_samples_carry_no_graph(diffusion):
    w = torch.nn.Parameter(torch.tensor(0.0))

    def model(x_t, t):
        return w * x_t

    x = generate(model, diffusion, (2, 1, 2, 2), "ddim", steps=3)
    assert not x.requires_grad


def test_golden_seeded_ddim_loop(diffusion):
    x = generate(GaussianOracle(diffusion.alphas_cumprod), diffusion, (2, 1, 2, 2), "ddim", steps=10,
                 generator=torch.Generator().manual_seed(0))
    assert x.sum().item() == pytest.approx(1.8142677545547485, rel=1e-4)


def test_default_steps_prefer_the_config_and_never_exceed_T():
    from ddpm.samplers import default_steps

    assert default_steps("ddpm", 1000) == 1000
    assert default_steps("ddim", 1000) == 50 and default_steps("dpmpp", 1000) == 20
    assert default_steps("ddim", 30) == 30  # a small T caps the sampler's default
    assert default_steps("ddim", 1000, preferred=100) == 100
    assert default_steps("ddim", 30, preferred=100) == 30  # and a config's steps


def test_one_eta_rule_names_the_valid_range(diffusion):
    for sampler in ("ddpm", "ddim", "dpmpp"):
        check_eta(0.0, sampler)
    check_eta(0.5, "ddim")
    check_eta(1.0, "ddim")
    with pytest.raises(ValueError, match=r"eta must be in \[0, inf\).*got -0.5"):
        check_eta(-0.5, "ddim")
    with pytest.raises(ValueError, match=r"got nan"):
        check_eta(float("nan"), "ddim")
    check_eta(1.0, None)  # the sampler not known yet (a model's own): the range alone
    with pytest.raises(ValueError, match=r"--eta must be in \[0, inf\).*got -1"):
        check_eta(-1.0, None, name="--eta")
    with pytest.raises(ValueError, match=r"--eta=1.0 only applies to the ddim sampler, not 'dpmpp' "
                                         r"\(valid: --eta = 0 for dpmpp, --eta >= 0 for ddim\)"):
        check_eta(1.0, "dpmpp", name="--eta")
    # the sampler objects and the sampler check use the same rule
    with pytest.raises(ValueError, match=r"\[0, inf\)"):
        DDIMSampler(diffusion, 10, eta=-1.0)
    with pytest.raises(ValueError, match=r"\[0, inf\)"):
        check_sampler("ddim", -1.0)
