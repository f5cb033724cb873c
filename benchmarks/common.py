"""Shared helpers for the benchmark suite: machine record, timing, medians, matmul peak, FLOPs, JSON.

Every benchmark measures ratios inside one process, alternating the models it compares, so that
load from other work on the machine hits both sides alike; the load average is recorded with each
result so a reader can judge the absolute figures.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

# google/ddpm-cifar10-32's architecture, as diffusers' UNet2DModel keyword arguments.
DIFFUSERS_CIFAR10 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256), "attention_head_dim": None, "norm_eps": 1e-6,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "dropout": 0.1,
}
# A tiny model of the same layout, for --quick (smoke tests run it in seconds).
QUICK_OVERRIDES = {"block_out_channels": (32, 32), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                   "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "sample_size": 8}


def machine(threads: int | None = None) -> dict[str, Any]:
    """What the figures were measured on, with the 1/5/15-minute load averages at this moment."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "loadavg": load()}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def clock(kind: str = "wall") -> Callable[[], float]:
    """``wall``: perf_counter. ``cpu``: this process's CPU seconds, which other work on the machine
    does not inflate; with one torch thread it is the work done (more threads add spin-waiting)."""
    return time.process_time if kind == "cpu" else time.perf_counter


def timed(fn: Callable[[], Any], kind: str = "wall") -> float:
    now = clock(kind)
    start = now()
    fn()
    return now() - start


def autocast(precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def alternate(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each case once per repeat, in turn (A B A B ...), and collect its per-repeat figures.

    Alternating spreads changes in machine load over every case instead of biasing one.
    """
    out: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # ABBA: no case always goes first
        for name in order:
            out[name].append(cases[name]())
    return out


def matmul_peak(precision: str = "fp32", n: int = 1024, repeats: int = 5, kind: str = "wall") -> dict[str, float]:
    """This machine's measured matrix-multiply rate (GFLOP/s): median and best of ``repeats``."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        reps = 4
        dt = timed(lambda: [a @ b for _ in range(reps)], kind)
        rates.append(2 * n**3 * reps / dt / 1e9)
    return {"median_gflops": round(median(rates), 1), "best_gflops": round(max(rates), 1), "n": n}


def matmul_peaks(precisions: list[str], quick: bool, kind: str = "wall") -> dict[str, dict[str, float]]:
    """:func:`matmul_peak` for each precision (a small, quick one for ``--quick`` smoke runs)."""
    return {prec: matmul_peak(prec, n=256 if quick else 1024, repeats=2 if quick else 5, kind=kind)
            for prec in precisions}


def summarize(ips: dict[str, list[float]], unit: str, flops_per_item: int, peak_gflops: float) -> dict[str, Any]:
    """Per case: the median rate as ``unit``, the repeats, achieved GFLOP/s and its share of the peak."""
    out: dict[str, Any] = {}
    for name, xs in ips.items():
        med = median(xs)
        gflops = med * flops_per_item / 1e9
        out[name] = {unit: round(med, 3), "repeats": [round(v, 3) for v in xs], "gflops": round(gflops, 1),
                     "share_of_matmul_peak": round(gflops / peak_gflops, 3)}
    return out


def ratios_to(ips: dict[str, list[float]], ref: str = "diffusers") -> dict[str, float]:
    """``ratio`` (for ``ours``) and ``ratio_<variant>`` (for ``ours_<variant>``) against ``ref``: the
    median of per-repeat ratios, each pair measured back to back under the same load. Empty if
    ``ref`` did not run."""
    if ref not in ips:
        return {}
    return {("ratio" if name == "ours" else f"ratio_{name.removeprefix('ours_')}"):
            round(median([a / b for a, b in zip(xs, ips[ref])]), 3)
            for name, xs in ips.items() if name.startswith("ours")}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, as torch.utils.flop_counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def ours_cifar10(quick: bool = False):
    from ddpm.config import UNetConfig
    from ddpm.unet import UNet

    cfg = UNetConfig.cifar10()
    if quick:
        cfg = UNetConfig(image_size=8, in_channels=3, ch=32, ch_mult=(1, 1), num_res_blocks=2,
                         attn_resolutions=(4,), dropout=0.1)
    return UNet(cfg)


def diffusers_cifar10(quick: bool = False):
    """diffusers' UNet2DModel of the same architecture (the ``bench`` extra), or None if absent."""
    try:
        import diffusers
    except ImportError:
        return None
    kwargs = {**DIFFUSERS_CIFAR10, **(QUICK_OVERRIDES if quick else {})}
    return diffusers.UNet2DModel(**kwargs)


def copy_diffusers_weights(theirs, ours) -> None:
    """Give ``ours`` the weights of ``theirs`` (the same architecture; ``ddpm.convert_diffusers``), so
    both models compute the same function on the same numbers: a fair race. Our own init zeroes
    every residual branch's last layer, and zero branches make denormal activations that slow a
    CPU by a few percent (measured: docs/PERFORMANCE.md); trained weights have none."""
    from ddpm.convert_diffusers import convert_state_dict

    ours.load_state_dict(convert_state_dict(theirs.state_dict()))


def call(model, x, t):
    """Both models' forward, returning a tensor (diffusers wraps its output in ``.sample``)."""
    out = model(x, t)
    return getattr(out, "sample", out)


def write_json(result: dict[str, Any], path: str | None) -> str:
    text = json.dumps(result, indent=1)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    return text
