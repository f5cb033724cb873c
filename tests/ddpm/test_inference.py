"""SamplingNet: the same function as the network it wraps, in the dtype and layout asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from ddpm.config import UNetConfig
from ddpm.diffusion import Diffusion
from ddpm.inference import SamplingNet, sampling_dtype
from ddpm.samplers import generate
from ddpm.schedules import make_betas
from ddpm.unet import UNet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(4,), dropout=0.0)).eval()
    with torch.no_grad():  # non-zero residual branches, so the comparison is not trivially x
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _x_t():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 10, 500, 999])


def test_fp32_channels_last_is_the_same_function(net):
    x, t = _x_t()
    fast = SamplingNet(copy.deepcopy(net), "fp32", channels_last=True)
    with torch.no_grad():
        ref, out = net(x, t), fast(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert next(fast.model.parameters()).dtype == torch.float32
    assert fast.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_weights_stay_close_and_return_float32(net):
    x, t = _x_t()
    fast = SamplingNet(copy.deepcopy(net), "bf16")
    with torch.no_grad():
        ref, out = net(x, t), fast(x, t)
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    assert out.dtype == torch.float32
    err = (out - ref).abs()
    assert 0 < err.max() < 0.1 * ref.abs().max()  # bf16 really ran (not equal) and stayed close
    assert err.mean() < 0.02 * ref.abs().mean() + 1e-3


def test_sampler_arithmetic_stays_float32_for_a_bf16_net(net):
    diffusion = Diffusion(make_betas("linear", 100))
    fast = SamplingNet(copy.deepcopy(net), "bf16")
    x = generate(fast, diffusion, (2, 1, 8, 8), sampler="ddim", steps=3, seeds=[0, 1])
    ref = generate(net, diffusion, (2, 1, 8, 8), sampler="ddim", steps=3, seeds=[0, 1])
    assert x.dtype == torch.float32  # the noise and the updates were float32
    assert (x - ref).abs().mean() < 0.05


def test_sampling_dtype_and_bad_precision(net):
    assert sampling_dtype(torch.bfloat16) is torch.float32
    assert sampling_dtype(torch.float16) is torch.float32
    assert sampling_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="valid: fp32, bf16, fp16"):
        SamplingNet(copy.deepcopy(net), "fp8")
