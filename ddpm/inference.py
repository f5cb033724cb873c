"""A trained network made ready for sampling: weights cast once, channels-last layout, float32 out.

Sampling calls the same network tens to thousands of times with no gradient, so what autocast
does on every call (cast each weight to bf16) is done once here, and the activations stay in the
layout the convolution kernels prefer. The samplers' own arithmetic (posterior means, DDIM updates,
the noise) stays in float32: :class:`SamplingNet` takes and returns float32 ``[N x C x H x W]``.

Channels-last and cast-once bf16 weights are what ``benchmarks.bench_forward`` compares (figures in
docs/PERFORMANCE.md, not here, where they would go stale). bf16 weights are sound for inference
only: training keeps fp32 master weights (``pipelines/train/loop.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compile_or_eager(model: Callable, log: Callable[[str], None] = print, backend: Any = "inductor",
                     what: str = "model") -> Callable:
    """``torch.compile(model)`` that falls back to ``model`` itself if compiling fails.

    Compilation happens at the first call; if that raises (no C++ compiler on the machine, an
    operator the backend cannot handle, ...), ``log`` says so once and every call from then on runs
    ``model`` eagerly. An error that eager execution raises too is re-raised: it is the input's.
    """
    current: list[Callable] = [torch.compile(model, backend=backend)]

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return current[0](*args, **kwargs)
        except Exception as e:
            if current[0] is model:
                raise
            log(f"torch.compile of the {what} failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            current[0] = model
            return model(*args, **kwargs)

    return call


class SamplingNet(nn.Module):
    """``model`` with its weights in ``precision`` and (optionally) channels-last memory format.

    :param model: the denoiser, ``model(x_t [N x C x H x W], t [N]) -> [N x C' x H x W]``. It is
        converted in place (``.to(dtype)``, ``.to(memory_format=...)``) and put in eval mode; pass a
        copy to keep the original.
    :param precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 only makes sense on a GPU).
    :param channels_last: run convolutions on NHWC tensors; outputs come back NCHW-contiguous.
    :param compile: ``torch.compile`` the network (:func:`compile_or_eager`: eager if it fails);
        ``True`` uses inductor, a string names another backend. Compiling takes tens of seconds
        at the first call (measured cost and gain: docs/PERFORMANCE.md).
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", channels_last: bool = True,
                 compile: bool | str = False, log: Callable[[str], None] = print) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.precision, self.channels_last = precision, channels_last
        self.dtype = PRECISIONS[precision]
        self.model = model.eval().to(self.dtype)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._compiled: Callable | None = None  # a plain function, not a second child module
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._compiled = compile_or_eager(self.model, log, backend=backend, what="sampling network")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [N x C x H x W] float32 x_t. :param t: [N] timesteps. :param y: [N] class labels
        (a class-conditional network only). :return: float32, contiguous."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        net = self._compiled or self.model
        x = x.to(dtype=self.dtype, memory_format=fmt)
        out = net(x, t) if y is None else net(x, t, y)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def sampling_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the samplers compute in for a network whose weights are ``param_dtype``:
    float32 for half types (their noise and updates would lose the small per-step differences),
    the weights' own dtype otherwise (float64 for the closed-form tests)."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


__all__ = ["PRECISIONS", "SamplingNet", "compile_or_eager", "sampling_dtype"]
