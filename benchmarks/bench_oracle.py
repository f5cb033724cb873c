"""Every sampler on the exact denoiser of Gaussian data: which few-step settings give the data back.

Data x_0 ~ N(0.1, 0.3^2) per pixel (issue 23's), the linear schedule with T = 1000, and the optimal
eps-network for it (``tests.ddpm.helpers.GaussianOracle``): whatever a sampler loses here is the
sampler's own error, not the model's. Per sampler, model calls and timestep spacing: the output's
exact mean and std (``tests.ddpm.helpers.exact_moments``) and those of ``--num`` samples (std known
to about 1/sqrt(2 num): 0.5% at 20,000), without clipping. ``ddpm`` rows use the config's default
variance (fixed_large), fixed_small, and Analytic-DPM's optimal one with the closed-form Gamma_t.

    python -m benchmarks.bench_oracle [--num 20000] [--calls 10 15 20 25]
                                      [--json-out bench-results/oracle_samplers.json]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks import common

MU, S = 0.1, 0.3
# (row name, sampler, diffusion variance, eta, Analytic-DPM variance)
ROWS = (("ddpm fixed_large", "ddpm", "fixed_large", 0.0, False),
        ("ddpm fixed_small", "ddpm", "fixed_small", 0.0, False),
        ("ddpm analytic", "ddpm", "fixed_large", 0.0, True), ("ddim eta 0", "ddim", "fixed_large", 0.0, False),
        ("ddim eta 1", "ddim", "fixed_large", 1.0, False), ("dpmpp", "dpmpp", "fixed_large", 0.0, False),
        ("dpmpp-3m", "dpmpp-3m", "fixed_large", 0.0, False), ("unipc", "unipc", "fixed_large", 0.0, False),
        ("dpmpp-2m-sde", "dpmpp-2m-sde", "fixed_large", 0.0, False), ("edm", "edm", "fixed_large", 0.0, False))


def measure(name: str, sampler: str, variance: str, eta: float, analytic: bool, calls: int, spacing: str,
            num: int, seed: int = 0) -> dict[str, Any]:
    import torch

    from ddpm.diffusion import Diffusion
    from ddpm.samplers import make_sampler, run_loop
    from ddpm.schedules import make_betas
    from tests.ddpm.helpers import GaussianOracle, exact_moments, gaussian_ms_eps

    diffusion = Diffusion(make_betas("linear", 1000), variance=variance)
    ms_eps = gaussian_ms_eps(diffusion.alphas_cumprod, S) if analytic else None
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)
    mean, std = exact_moments(make_sampler(diffusion, sampler, calls, eta, spacing, ms_eps), oracle, cols=2 * calls + 8)
    made = []

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # counts calls; the oracle's log stays short
        made.append(int(t[0]))
        oracle.calls.clear()
        return oracle(x_t, t)

    x = run_loop(make_sampler(diffusion, sampler, calls, eta, spacing, ms_eps), model, (num, 1, 1, 1),
                 generator=torch.Generator().manual_seed(seed), clip_denoised=False)
    return {"row": name, "sampler": sampler, "calls": len(made), "spacing": spacing, "exact_mean": mean,
            "exact_std": std, "mean": x.mean().item(), "std": x.std().item(), "num": num}


def table(results: list[dict[str, Any]], spacing: str, calls: list[int]) -> str:
    rows = [r for r in results if r["spacing"] == spacing]
    lines = [f"| {spacing} | " + " | ".join(f"{c} calls" for c in calls) + " |", "|---" * (len(calls) + 1) + "|"]
    for name in dict.fromkeys(r["row"] for r in rows):
        cells = {r["calls"]: r for r in rows if r["row"] == name}
        cell = "{exact_mean:.4f} / {exact_std:.4f} ({std:.3f})"
        lines.append(f"| {name} | " + " | ".join(cell.format(**cells[c]) for c in calls) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=20_000, help="samples per cell (std known to ~1/sqrt(2 num))")
    p.add_argument("--calls", type=int, nargs="+", default=[10, 15, 20, 25])
    p.add_argument("--spacings", nargs="+", default=["linspace", "trailing", "logsnr", "karras"])
    p.add_argument("--quick", action="store_true", help="200 samples, 3 and 5 calls: a smoke test")
    p.add_argument("--json-out", default=os.path.join("bench-results", "oracle_samplers.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.calls = 200, [3, 5]
    results = [measure(*row, calls, spacing, args.num) for spacing in args.spacings for row in ROWS
               for calls in args.calls]
    reference = [measure(f"ddpm {v}", "ddpm", v, 0.0, False, 1000, "linspace", args.num)
                 for v in (("fixed_large", "fixed_small") if not args.quick else ())]
    out = {"benchmark": "oracle_samplers", "data": {"mean": MU, "std": S}, "schedule": "linear, T=1000",
           "clip_denoised": False, "machine": common.machine(), "results": results, "reference_1000": reference}
    common.write_json(out, args.json_out)
    print(f"cells: exact mean / exact std (std of {args.num} samples)\n")
    for spacing in args.spacings:
        print(table(results, spacing, args.calls) + "\n")
    for r in reference:
        print(f"{r['row']}, 1000 calls: {r['exact_mean']:.4f} / {r['exact_std']:.4f} ({r['std']:.3f})")
    return out


if __name__ == "__main__":
    main()
