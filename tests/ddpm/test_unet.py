"""The U-Net: the paper's parameter count, shapes, timestep embedding, input validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ddpm.config import UNetConfig
from ddpm.unet import UNet, count_parameters, timestep_embedding
from tests.support import tiny_unet_config

TINY = tiny_unet_config(32, attention=True)


def test_cifar10_preset_has_the_papers_parameter_count():
    # diffusers' UNet2DModel for google/ddpm-cifar10-32 has 35,746,307 parameters.
    assert count_parameters(UNet(UNetConfig.cifar10())) == 35_746_307


def test_digits_preset_forward_shape_and_zero_init():
    model = UNet(UNetConfig.digits()).eval()
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 8, 8)
    assert torch.all(out == 0)  # conv_out starts at zero, as in the paper's code


def test_learn_sigma_doubles_output_channels():
    cfg = replace(TINY, learn_sigma=True)
    assert UNet(cfg)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 2, 8, 8)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_output_depends_on_t_and_scalar_t_broadcasts():
    model = _randomize(UNet(TINY))
    x = torch.randn(2, 1, 8, 8)
    a = model(x, torch.tensor([10, 10]))
    assert not torch.allclose(a, model(x, torch.tensor([900, 900])))
    torch.testing.assert_close(model(x, torch.tensor(10)), a)


def test_channels_last_gives_the_same_output_and_keeps_the_format():
    model = _randomize(UNet(TINY))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    y = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(y, model(x, t), atol=1e-5, rtol=1e-5)
    wide = UNet(replace(TINY, in_channels=3)).to(memory_format=torch.channels_last)
    out = wide(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_backward_reaches_every_parameter():
    model = _randomize(UNet(TINY)).train()
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_resblock_updown_variant_runs():
    cfg = replace(TINY, resblock_updown=True)
    model = UNet(cfg)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    assert "down.0.downsample.conv1.weight" in model.state_dict()


def test_multi_head_attention():
    cfg = replace(TINY, num_heads=4)
    assert _randomize(UNet(cfg))(torch.randn(1, 1, 8, 8), torch.tensor([5])).shape == (1, 1, 8, 8)


def test_timestep_embedding_matches_the_tf_formula():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    want = torch.tensor([[math.sin(s * f) for f in freqs] + [math.cos(s * f) for f in freqs] for s in t.tolist()])
    torch.testing.assert_close(emb, want)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (2, 1, 8), (1, 8, 8)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"expects x of shape \(N, 1, 8, 8\)"):
        UNet(TINY)(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


def test_wrong_t_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects t of shape \(2,\)"):
        UNet(TINY)(torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_attention_resolution_no_level_has_is_refused():
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(replace(TINY, attn_resolutions=(3,)))
