"""SamplingNet: the same function as the network it wraps, in the dtype and layout asked for."""

from __future__ import annotations

import copy

import pytest
import torch

from ddpm.diffusion import Diffusion
from ddpm.inference import SamplingNet, sampling_dtype
from ddpm.samplers import generate
from ddpm.schedules import make_betas
from ddpm.unet import UNet
from tests.support import perturbed, tiny_unet_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    # Non-zero residual branches, so the comparison is not trivially x.
    return perturbed(UNet(tiny_unet_config(16, attention=True)).eval())


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
    diffusion = Diffusion(make_betas("linear", 100), variance="fixed_large")
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


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here")


def test_compile_falls_back_to_eager_once_and_says_so(net):
    from ddpm.inference import compile_or_eager

    x, t = _x_t()
    lines = []
    call = compile_or_eager(net, lines.append, backend=_failing_backend, what="test net")
    with torch.no_grad():
        out1, out2, ref = call(x, t), call(x, t), net(x, t)
    torch.testing.assert_close(out1, ref)
    torch.testing.assert_close(out2, ref)
    assert len(lines) == 1 and "torch.compile of the test net failed" in lines[0] and "no C++ compiler" in lines[0]


def test_compiled_sampling_net_is_the_same_function(net):
    x, t = _x_t()
    lines = []
    # dynamo's "eager" backend traces the graph without C++ code generation: seconds, not a minute
    fast = SamplingNet(copy.deepcopy(net), "fp32", compile="eager", log=lines.append)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), net(x, t), rtol=1e-5, atol=1e-5)
    assert lines == [] and fast._compiled is not None
    assert set(fast.state_dict()) == {f"model.{k}" for k in net.state_dict()}  # one copy of the weights


def test_an_error_of_the_input_is_not_swallowed_by_the_fallback(net):
    from ddpm.inference import compile_or_eager

    call = compile_or_eager(net, lambda m: None, backend=_failing_backend)
    with pytest.raises(ValueError, match="UNet expects x of shape"):
        call(torch.zeros(1, 3, 8, 8), torch.tensor([1]))
