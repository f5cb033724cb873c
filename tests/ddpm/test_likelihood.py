"""Bits/dim: the full variational bound against closed forms, and its stratified estimate.

With the optimal denoiser for x_0 ~ N(mu, s^2), the model mean is affine in x_t, so for a fixed data
point every expected KL term has a closed form, and the decoder term is a 1-D Gaussian integral
(done here by Gauss-Hermite quadrature).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import Diffusion
from ddpm.likelihood import (LN2, bits_per_dim, bits_per_dim_estimate, calc_bpd_loop,
                             discretized_gaussian_log_likelihood, normal_kl)
from ddpm.schedules import make_betas
from tests.ddpm.helpers import GaussianOracle

torch.set_num_threads(1)

MU, S, LEVELS = 0.3, 0.5, 17
X0_VALUES = (-1.0, 0.25, 1.0)  # both open-ended edge bins and an inner one
COPIES = 1024


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(make_betas("linear", 50), variance="fixed_large")  # default range scaled by 1000/50: 2e-3 .. 0.4


@pytest.fixture(scope="module")
def data():
    return torch.tensor(X0_VALUES).repeat_interleave(COPIES).view(-1, 1, 1, 1)


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def expected_terms(d: Diffusion, x0: float) -> tuple[float, float, float]:
    """(prior, sum of expected KLs, expected decoder NLL) in bits for one pixel x0, fixed_large variance."""
    ab, betas = d.alphas_cumprod.tolist(), d.betas.tolist()
    T = len(ab)

    def shrink(a):  # E[x_0 | x_t] = k x_t + (1 - k sqrt(a)) mu
        return math.sqrt(a) * S**2 / (a * S**2 + 1 - a)

    a = ab[-1]
    prior = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0**2)
    kl = 0.0
    for t in range(1, T):
        a, ap, beta = ab[t], ab[t - 1], betas[t]
        var_q = beta * (1 - ap) / (1 - a)  # Ho eq. 7
        c1 = beta * math.sqrt(ap) / (1 - a)
        k = shrink(a)
        err2 = (x0 - MU) ** 2 * (1 - k * math.sqrt(a)) ** 2 + k**2 * (1 - a)  # E (x_0 - E[x_0|x_t])^2
        kl += 0.5 * (math.log(beta / var_q) + var_q / beta - 1 + c1**2 * err2 / beta)
    # Decoder: mean = E[x_0 | x_1], variance beta~_1 (fixed_large at t = 0), bins of half-width 1/16.
    a, hw = ab[0], 1 / (LEVELS - 1)
    sd = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    k = shrink(a)
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    nll = 0.0
    for e, w in zip(nodes, weights):
        mean = k * (math.sqrt(a) * x0 + math.sqrt(1 - a) * e) + (1 - k * math.sqrt(a)) * MU
        hi, lo = (x0 + hw - mean) / sd, (x0 - hw - mean) / sd
        if x0 < -1 + hw:
            p = _phi(hi)
        elif x0 > 1 - hw:
            p = _phi(-lo)
        else:  # on the side of the mean where the tail probabilities are small, to avoid cancellation
            p = _phi(-lo) - _phi(-hi) if hi + lo > 0 else _phi(hi) - _phi(lo)
        nll -= w / math.sqrt(2 * math.pi) * math.log(p)
    return prior / LN2, kl / LN2, nll / LN2


def test_normal_kl_closed_forms():
    z = torch.zeros(3)
    torch.testing.assert_close(normal_kl(z, z, z, z), z)
    torch.testing.assert_close(normal_kl(torch.ones(1), torch.zeros(1), 0.0, 0.0), torch.tensor([0.5]))
    # KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2
    torch.testing.assert_close(normal_kl(torch.zeros(1), torch.ones(1), 0.0, 0.0), torch.tensor([(math.e - 2) / 2]))


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_likelihood_sums_to_one(levels):
    x = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for mean, scale in [(0.1, 0.3), (-0.95, 0.01), (0.5, 2.0)]:
        logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)),
                                                   levels)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_far_tail_is_finite():
    x = torch.tensor([0.5])
    logp = discretized_gaussian_log_likelihood(x, torch.zeros(1), torch.tensor([math.log(0.01)]), 256)
    assert math.isfinite(logp.item()) and logp.item() < -1000  # about -(0.5/0.01)^2/2 = -1250


def test_full_bound_matches_closed_form(diffusion, data):
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)
    out = calc_bpd_loop(diffusion, oracle, data, levels=LEVELS, clip_denoised=False,
                        generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (len(data), 50) and bool(torch.isfinite(out["total_bpd"]).all())
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))
    for i, x0 in enumerate(X0_VALUES):
        rows = slice(i * COPIES, (i + 1) * COPIES)
        prior, kl, nll = expected_terms(diffusion, x0)
        assert out["prior_bpd"][rows][0].item() == pytest.approx(prior, rel=1e-5)
        for got, want in [(out["vb"][rows, 1:].sum(1), kl), (out["vb"][rows, 0], nll),
                          (out["total_bpd"][rows], prior + kl + nll)]:
            se = got.std().item() / math.sqrt(COPIES)
            assert abs(got.mean().item() - want) < 4 * se + 1e-4, (x0, got.mean().item(), want, se)


def test_estimate_is_unbiased(diffusion, data):
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)
    runs = [bits_per_dim_estimate(diffusion, oracle, data, levels=LEVELS, num_timesteps=8, seed=seed,
                                  clip_denoised=False) for seed in range(4)]
    est = torch.stack([r[0] for r in runs])  # [seeds x N]
    stderr = torch.stack([r[1] for r in runs])
    full = bits_per_dim(diffusion, oracle, data, levels=LEVELS, clip_denoised=False,
                        generator=torch.Generator().manual_seed(1))
    for i, x0 in enumerate(X0_VALUES):
        rows = slice(i * COPIES, (i + 1) * COPIES)
        e, f = est[:, rows].flatten(), full[rows]
        want = sum(expected_terms(diffusion, x0))
        se_e = e.std().item() / math.sqrt(e.numel())
        assert abs(e.mean().item() - want) < 4 * se_e, (x0, e.mean().item(), want, se_e)
        se_diff = math.sqrt(se_e**2 + f.var().item() / f.numel())
        assert abs(e.mean().item() - f.mean().item()) < 4 * se_diff
        # The collapsed-strata variance errs on the large side.
        assert stderr[:, rows].pow(2).mean().item() >= 0.8 * e.var().item()


def test_estimate_is_reproducible(diffusion, data):
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)
    x = data[::256]
    a = bits_per_dim_estimate(diffusion, oracle, x, levels=LEVELS, num_timesteps=5, seed=3)
    b = bits_per_dim_estimate(diffusion, oracle, x, levels=LEVELS, num_timesteps=5, seed=3)
    c = bits_per_dim_estimate(diffusion, oracle, x, levels=LEVELS, num_timesteps=5, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    assert bool(torch.isfinite(a[1]).all()) and bool((a[1] > 0).all())
    one = bits_per_dim_estimate(diffusion, oracle, x, levels=LEVELS, num_timesteps=1)
    assert bool(torch.isnan(one[1]).all()) and bool(torch.isfinite(one[0]).all())


def test_bits_per_dim_is_seeded_by_its_generator_at_image_levels():
    d = Diffusion(make_betas("linear", 30), variance="fixed_large")
    oracle = GaussianOracle(d.alphas_cumprod, 0.0, 0.5)
    x = (torch.randint(0, 256, (4, 3, 4, 4)) / 127.5 - 1).float()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    bpd = bits_per_dim(d, oracle, x, generator=g1)
    torch.testing.assert_close(bpd, bits_per_dim(d, oracle, x, 256, generator=g2))
    assert bpd.shape == (4,) and bool(torch.isfinite(bpd).all()) and bool((bpd > 0).all())


def test_the_bound_and_its_estimate_report_progress_per_model_call(diffusion):
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)
    x = torch.full((2, 1, 1, 1), 0.25)
    full, est = [], []
    bits_per_dim(diffusion, oracle, x, LEVELS, generator=torch.Generator().manual_seed(0),
                 progress=lambda done, total: full.append((done, total)))
    bits_per_dim_estimate(diffusion, oracle, x, LEVELS, num_timesteps=4,
                          progress=lambda done, total: est.append((done, total)))
    assert full == [(i, 50) for i in range(1, 51)] and est == [(i, 4) for i in range(1, 5)]
