"""A trained network made ready for sampling: weights cast once, channels-last layout, float32 out.

Sampling calls the same network tens to thousands of times with no gradient, so what autocast
does on every call (cast each weight to bf16) is done once here, and the activations stay in the
layout the convolution kernels prefer. The samplers' own arithmetic (posterior means, DDIM updates,
the noise) stays in float32: :class:`SamplingNet` takes and returns float32 ``[N x C x H x W]``.

Measured on the CIFAR-10 U-Net at batch 64 (docs/PERFORMANCE.md, ``benchmarks.bench_forward``):
channels-last is 7-15% faster than NCHW on a CPU, and bf16 weights are faster than bf16 autocast
because no casts are left per call. bf16 weights are sound for inference only: training keeps fp32
master weights (``pipelines/loop.py``).
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SamplingNet(nn.Module):
    """``model`` with its weights in ``precision`` and (optionally) channels-last memory format.

    :param model: the denoiser, ``model(x_t [N x C x H x W], t [N]) -> [N x C' x H x W]``. It is
        converted in place (``.to(dtype)``, ``.to(memory_format=...)``) and put in eval mode; pass a
        copy to keep the original.
    :param precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 only makes sense on a GPU).
    :param channels_last: run convolutions on NHWC tensors; outputs come back NCHW-contiguous.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", channels_last: bool = True) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.precision, self.channels_last = precision, channels_last
        self.dtype = PRECISIONS[precision]
        self.model = model.eval().to(self.dtype)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    @property
    def config(self):
        """The wrapped network's config (``UNetConfig`` for ours), for code that reads shapes from it."""
        return getattr(self.model, "config", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:param x: [N x C x H x W] float32 x_t. :param t: [N] timesteps. :return: float32, contiguous."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.model(x.to(dtype=self.dtype, memory_format=fmt), t)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def sampling_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the samplers compute in for a network whose weights are ``param_dtype``:
    float32 for half types (their noise and updates would lose the small per-step differences),
    the weights' own dtype otherwise (float64 for the closed-form tests)."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


__all__ = ["PRECISIONS", "SamplingNet", "sampling_dtype"]
