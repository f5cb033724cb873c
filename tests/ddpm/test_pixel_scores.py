"""The pixel-space yardstick: closed-form cases, then digits whose answer is known (blurred, and
with their fine components shrunk, they must score worse than real digits beyond noise; real digits
must not)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ddpm import metrics
from ddpm.features import digits_split
from ddpm.pixel_scores import PCABasis, evaluate_pixels, fine_spread, pixel_fd, variance_ratios


def _gaussian(n: int, stds: list[float], seed: int = 0) -> torch.Tensor:
    """``[n x D]`` data with independent coordinates of the given standard deviations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(stds), generator=g, dtype=torch.float64) * torch.tensor(stds, dtype=torch.float64)


def test_basis_keeps_the_fewest_components_that_hold_the_asked_variance():
    x = _gaussian(200_000, [4.0, 2.0, 1.0, 0.5, 0.1])  # variances 16, 4, 1, 0.25, 0.01 (total 21.26)
    basis = PCABasis.fit(x, variance=0.9)
    assert basis.size == 2 and basis.explained == pytest.approx(20 / 21.26, abs=2e-3)  # 16/21.26 < 0.9
    assert torch.allclose(basis.components @ basis.components.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.variances, torch.tensor([16.0, 4.0], dtype=torch.float64), rtol=2e-2)
    assert PCABasis.fit(x, variance=0.99).size == 4 and PCABasis.fit(x, variance=1.0).size == 5
    assert basis.fine == slice(1, 2)
    with pytest.raises(ValueError, match=r"variance must be in \(0, 1\]"):
        PCABasis.fit(x, variance=0.0)


def test_pixel_fd_is_zero_for_one_set_and_whitened_for_a_shift():
    x = _gaussian(100_000, [4.0, 2.0, 1.0, 0.5])
    basis = PCABasis.fit(x, variance=1.0)
    assert pixel_fd(x, x, basis) == pytest.approx(0.0, abs=1e-9)
    for k in (0, 3):  # the coarsest and the finest component
        # Whitened, a shift of one training standard deviation costs 1 whatever the component's size.
        shift = basis.components[k] * basis.variances[k].sqrt()
        assert pixel_fd(x + shift, x, basis) == pytest.approx(1.0, rel=1e-9)


def test_fine_spread_is_the_geometric_mean_variance_ratio_of_the_finer_half():
    x = _gaussian(50_000, [4.0, 2.0, 1.0, 0.5])
    basis = PCABasis.fit(x, variance=1.0)  # four components, the fine half is the last two
    coords = basis.project(x, whiten=False)
    scale = torch.tensor([1.0, 1.0, 0.5, 0.8], dtype=torch.float64)  # variance x 0.25 and x 0.64
    shrunk = basis.mean + (coords * scale) @ basis.components
    ratios = variance_ratios(shrunk, x, basis)
    assert torch.allclose(ratios, scale**2, rtol=1e-9)
    assert fine_spread(shrunk, x, basis) == pytest.approx(math.sqrt(0.25 * 0.64), rel=1e-9)
    assert fine_spread(x, x, basis) == pytest.approx(1.0, rel=1e-12)


def test_a_ratio_metric_is_best_at_one_in_log_terms():
    assert metrics.direction("fine_spread") == "one" and metrics.direction("fine_spread_floor") == "one"
    assert metrics.direction("pixel_fd") == "lower"
    assert metrics.better("fine_spread", 0.9, 0.8) and metrics.better("fine_spread", 1.05, 0.9)
    assert not metrics.better("fine_spread", 2.0, 0.5) and not metrics.better("fine_spread", 0.5, 2.0)  # equal in log
    assert metrics.better("fine_spread", 1.0, 0.0) and not metrics.better("fine_spread", math.nan, 1.0)
    assert metrics.badness("fine_spread", 0.5, 0.05) == (pytest.approx(math.log(2)), pytest.approx(0.1))
    assert metrics.badness("classifier_score", 9.0, 0.1) == (-9.0, 0.1)


@pytest.fixture(scope="module")
def digits():
    x_train, _, x_test, _ = digits_split()
    return x_train, x_test


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.full((1, 1, 3, 3), 1 / 9)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def _shrink_fine(x: torch.Tensor, basis: PCABasis, factor: float) -> torch.Tensor:
    """``x`` with its coordinates along the finer half of ``basis`` multiplied by ``factor``."""
    flat = x.reshape(len(x), -1).double() - basis.mean
    coords = flat @ basis.components.T
    fine = basis.fine
    flat = flat + ((factor - 1.0) * coords[:, fine]) @ basis.components[fine]
    return (flat + basis.mean).float().reshape(x.shape)


def _beyond_noise(out: dict[str, float], name: str) -> float:
    """How many combined standard errors the score is worse than its floor (on the badness scale)."""
    bad, se = metrics.badness(name, out[name], out[f"{name}_se"])
    floor, floor_se = metrics.badness(name, out[f"{name}_floor"], out[f"{name}_floor_se"])
    return (bad - floor) / math.hypot(se, floor_se)


@pytest.mark.parametrize("corruption", ["blur", "shrink"])
def test_smoothed_digits_score_worse_than_real_ones_beyond_two_standard_errors(digits, corruption):
    x_train, x_test = digits
    basis = PCABasis.fit(x_train)
    real = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:700]]
    corrupted = _blur(real) if corruption == "blur" else _shrink_fine(real, basis, 0.7)  # 30% less amplitude
    out = evaluate_pixels(corrupted, x_test, x_train, basis=basis)
    assert out["fine_spread"] < 1.0
    for name in ("pixel_fd", "fine_spread"):
        assert _beyond_noise(out, name) > 2.0, (name, out)


def test_real_digits_are_not_worse_than_the_floor(digits):
    x_train, x_test = digits
    out = evaluate_pixels(x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:700]],
                          x_test, x_train)
    assert out["pca_components"] == 21 and 0.9 <= out["pca_explained"] < 0.91  # digits: 21 components hold 90%
    for name in ("pixel_fd", "fine_spread"):
        assert abs(_beyond_noise(out, name)) < 2.0, (name, out)
        assert out[f"{name}_se"] > 0 and out[f"{name}_floor_se"] > 0
