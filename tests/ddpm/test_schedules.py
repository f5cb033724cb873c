"""Beta schedules: hand formulas, golden values, ranges, T scaling, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ddpm.schedules import SCHEDULES, make_betas


@pytest.mark.parametrize("name", SCHEDULES)
def test_shape_dtype_range_monotone(name):
    betas = make_betas(name, 1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert bool((betas > 0).all()) and bool((betas < 1).all())
    assert bool((betas[1:] >= betas[:-1]).all())  # noise grows with t


def test_linear_paper_values():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    step = torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64)
    torch.testing.assert_close(betas[1:] - betas[:-1], step)


def test_default_range_scales_with_T():
    betas = make_betas("linear", 250)  # improved-diffusion: scale = 1000 / T
    assert betas[0].item() == pytest.approx(4e-4) and betas[-1].item() == pytest.approx(0.08)
    q = make_betas("quadratic", 500)
    assert q[0].item() == pytest.approx(2e-4) and q[-1].item() == pytest.approx(0.04)


def test_explicit_range_used_as_given():
    betas = make_betas("linear", 10, beta_start=1e-3, beta_end=0.2)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    half = make_betas("linear", 500, beta_end=0.01)  # a missing end keeps its scaled default
    assert half[0].item() == pytest.approx(2e-4) and half[-1].item() == pytest.approx(0.01)


def test_quadratic_is_linear_in_sqrt_beta():
    betas = make_betas("quadratic", 100, 1e-4, 0.02)
    root = betas.sqrt()
    torch.testing.assert_close(root[1:] - root[:-1], torch.full((99,), (0.02**0.5 - 1e-4**0.5) / 99, dtype=torch.float64))
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_sigmoid_formula():
    T, start, end = 101, 1e-4, 0.02
    betas = make_betas("sigmoid", T, start, end)
    x = torch.linspace(-6, 6, T, dtype=torch.float64)
    torch.testing.assert_close(betas, 1 / (1 + torch.exp(-x)) * (end - start) + start)
    assert betas[50].item() == pytest.approx((start + end) / 2)  # sigmoid(0) = 1/2


def test_cosine_alphas_cumprod_matches_formula():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)
    torch.testing.assert_close(abar[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    assert betas.max().item() == pytest.approx(0.999)  # the clip at t = T (f(T) = 0 exactly)
    assert betas[0].item() == pytest.approx(4.128422482196914e-05, rel=1e-9)  # golden
    assert abar[499].item() == pytest.approx(0.4938435904406382, rel=1e-9)  # golden


def test_cosine_rejects_a_range():
    with pytest.raises(ValueError, match="cosine"):
        make_betas("cosine", 1000, beta_start=1e-4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="linear, cosine, quadratic, sigmoid"):
        make_betas("exponential", 1000)


@pytest.mark.parametrize("T", [0, -3])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must be"):
        make_betas("linear", T)


def test_betas_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="explicit beta_start/beta_end"):
        make_betas("linear", 10)  # default end 0.02 * 100 = 2
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        make_betas("linear", 10, 0.0, 0.5)


def test_single_step():
    assert make_betas("linear", 1, 0.5, 0.5).tolist() == [0.5]


def test_matches_diffusers_schedules():
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs in [("linear", "linear"), ("quadratic", "scaled_linear"), ("sigmoid", "sigmoid")]:
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule=theirs)
        torch.testing.assert_close(make_betas(ours, 1000).float(), sched.betas, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 20, 21, 25, 1000])
def test_beta_range_is_the_min_and_max_make_betas_gives(name, T):
    """Configs check a schedule with beta_range (no torch, no tensor); it must agree with make_betas,
    also on which (schedule, T) pairs are refused (small T pushes the scaled default end past 1)."""
    from ddpm.schedules import beta_range

    try:
        betas = make_betas(name, T)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e).split(" (min")[0])):
            beta_range(name, T)
        return
    lo, hi = beta_range(name, T)
    assert lo == pytest.approx(betas.min().item(), rel=1e-9) and hi == pytest.approx(betas.max().item(), rel=1e-9)


@pytest.mark.parametrize("args,message", [
    (("linear", 10), "gives betas outside (0, 1) (min 0.01, max 2)"),
    (("quadratic", 20), "gives betas outside (0, 1)"),
    (("cosine", 100, 1e-3), "the cosine schedule has no beta range"),
    (("linear", 0), "T must be an integer >= 1"),
])
def test_beta_range_raises_what_make_betas_raises(args, message):
    from ddpm.schedules import beta_range

    with pytest.raises(ValueError, match=re.escape(message)):
        beta_range(*args)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_betas(*args)
