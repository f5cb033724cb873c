"""ddpm.interpolate: x_t-space interpolation (Ho et al. 2020, section 4.3) with the noise fixed across weights."""

from __future__ import annotations

import pytest
import torch

from ddpm.diffusion import Diffusion
from ddpm.interpolate import interpolate
from ddpm.schedules import make_betas
from ddpm.unet import UNet
from tests.support import perturbed, tiny_unet_config


@pytest.fixture(scope="module")
def model_and_diffusion():
    torch.manual_seed(0)
    model = perturbed(UNet(tiny_unet_config()).eval())  # the zero-initialised output layer broken
    return model, Diffusion(make_betas("linear", 50), variance="fixed_large")


@pytest.mark.timeout(120)
def test_noise_is_fixed_across_weights_and_the_ends_are_the_sources_decoded(model_and_diffusion):
    model, diffusion = model_and_diffusion
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1, torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    three = interpolate(model, diffusion, x_a, x_b, t=20, lambdas=3, seed=5)
    five = interpolate(model, diffusion, x_a, x_b, t=20, lambdas=5, seed=5)
    assert three.shape == (3, 1, 8, 8)
    # lambda = 0, 0.5, 1 appear in both: the same noise whatever the number of weights.
    for i, j in ((0, 0), (1, 2), (2, 4)):
        assert torch.allclose(three[i], five[j], atol=1e-5)
    assert (three[0] - three[2]).abs().max() > 0.1  # the two ends differ
    other = interpolate(model, diffusion, x_a, x_b, t=20, lambdas=3, seed=6)
    assert (other - three).abs().max() > 0.1  # the seed sets the noise
    # At t = 0 the sources come back nearly unchanged (one step of tiny noise, then the decoder).
    near = interpolate(model, diffusion, x_a, x_b, t=0, lambdas=2, seed=5)
    assert (near[0] - x_a).abs().mean() < 0.1


def test_t_and_lambdas_out_of_range_are_value_errors(model_and_diffusion):
    model, diffusion = model_and_diffusion
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"T=50.*\[0, 49\]"):
        interpolate(model, diffusion, x, x, t=50, lambdas=3)
    with pytest.raises(ValueError, match="lambdas must be >= 2"):
        interpolate(model, diffusion, x, x, t=10, lambdas=1)
