"""Every sampler on the exact denoiser of Gaussian data: which few-step settings give the data back.

Data x_0 ~ N(0.1, 0.3^2) per pixel (issue 23's), the linear schedule with T = 1000, and the optimal
eps-network for it (``tests.ddpm.helpers.GaussianOracle``): whatever a sampler loses here is the
sampler's own error, not the model's. Per sampler, model calls and timestep spacing: the output's
exact mean and std (``tests.ddpm.helpers.exact_moments``) and those of ``--num`` samples (std known
to about 1/sqrt(2 num): 0.5% at 20,000), without clipping. ``ddpm`` rows use the config's default
variance (fixed_large), fixed_small, and Analytic-DPM's optimal one with the closed-form Gamma_t.

    python -m benchmarks.bench_oracle [--num 20000] [--calls 10 15 20 25]
                                      [--json-out bench-results/oracle_samplers.json]
    python -m benchmarks.bench_oracle --sde-variants    # exact std of stochastic-solver variants only

``--sde-variants``: the exact std of variants of the default SDE-DPM-Solver++(2M) that the library
does not ship (issue 23: is there a stochastic solver within 1% on the oracle at 20 calls?): its
step into the last timestep at first order, the "heun" second-order coefficient (diffusers'
``solver_type="heun"``) and k-diffusion's third-order ``sample_dpmpp_3m_sde`` at eta 1 and 0.5.
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


def sde_variants(calls: list[int], spacings: list[str]) -> list[dict[str, Any]]:
    """The exact mean and std of each ``--sde-variants`` solver (module docstring) on the oracle."""
    import math

    import torch

    from ddpm.diffusion import Diffusion
    from ddpm.samplers.dpm_solver import SDEDPMSolverPPSampler
    from ddpm.schedules import make_betas
    from tests.ddpm.helpers import GaussianOracle, exact_moments

    class Multistep(SDEDPMSolverPPSampler):
        """x_t = (sigma_t/sigma_s) e^{-eta h} x_s + alpha_t (1 - e^{-h_eta}) x0 + alpha_t (phi2 D1 - phi3 D2)
        + sigma_t sqrt(1 - e^{-2 eta h}) z, h_eta = (1 + eta) h (k-diffusion's 3M SDE; ``order`` 2 is
        the heun 2M SDE)."""

        def __init__(self, diffusion: Diffusion, steps: int, spacing: str, order: int, eta: float) -> None:
            super().__init__(diffusion, steps, spacing)
            self.order, self.eta, self.hist = order, eta, []

        def step(self, model, x, i, noise, clip_denoised=True):  # noqa: ANN001, ANN201
            x0 = self.predict_xstart(model, x, i, clip_denoised)
            if i + 1 == len(self.timesteps):
                return x0, x0
            h = self.lam[i + 1] - self.lam[i]
            he = (1 + self.eta) * h
            a = self.alpha[i + 1]
            x = (self.sigma[i + 1] / self.sigma[i]) * math.exp(-self.eta * h) * x - a * math.expm1(-he) * x0
            phi2 = math.expm1(-he) / he + 1
            if len(self.hist) >= 2 and self.order == 3:
                (p1, h1), (p2, h2) = self.hist[-1], self.hist[-2]
                r0, r1 = h1 / h, h2 / h
                d10, d11 = (x0 - p1) / r0, (p1 - p2) / r1
                d1, d2 = d10 + (d10 - d11) * r0 / (r0 + r1), (d10 - d11) / (r0 + r1)
                x = x + a * (phi2 * d1 - (phi2 / he - 0.5) * d2)
            elif self.hist:
                p1, h1 = self.hist[-1]
                x = x + a * phi2 * (x0 - p1) / (h1 / h)
            if self.eta:
                x = x + self.sigma[i + 1] * math.sqrt(-math.expm1(-2 * self.eta * h)) * noise.next()
            self.hist.append((x0, h))
            return x, x0

    diffusion = Diffusion(make_betas("linear", 1000))
    oracle = GaussianOracle(diffusion.alphas_cumprod, MU, S)

    def last_first_order(calls: int, spacing: str) -> SDEDPMSolverPPSampler:
        s = SDEDPMSolverPPSampler(diffusion, calls, spacing)
        s.first_order_into_last = True
        return s

    makers = {"2m-sde, first order into the last step": last_first_order,
              "2m-sde heun": lambda n, sp: Multistep(diffusion, n, sp, 2, 1.0),
              "3m-sde eta 1": lambda n, sp: Multistep(diffusion, n, sp, 3, 1.0),
              "3m-sde eta 0.5": lambda n, sp: Multistep(diffusion, n, sp, 3, 0.5)}
    out = []
    with torch.no_grad():
        for name, make in makers.items():
            for spacing in spacings:
                for n in calls:
                    mean, std = exact_moments(make(n, spacing), oracle, cols=2 * n + 8)
                    out.append({"row": name, "calls": n, "spacing": spacing, "exact_mean": mean, "exact_std": std})
    return out


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
    p.add_argument("--sde-variants", action="store_true", help="only the exact std of the stochastic variants")
    p.add_argument("--json-out", default=None,
                   help="default bench-results/oracle_samplers.json (oracle_sde_variants.json with --sde-variants)")
    args = p.parse_args(argv)
    json_out = args.json_out or os.path.join(
        "bench-results", "oracle_sde_variants.json" if args.sde_variants else "oracle_samplers.json")
    if args.quick:
        args.num, args.calls = 200, [3, 5]
    if args.sde_variants:
        rows = sde_variants(args.calls, ["logsnr", "karras"])
        for r in rows:
            print(f"{r['row']:40s} {r['spacing']:7s} {r['calls']:3d} calls: mean {r['exact_mean']:.4f} "
                  f"std {r['exact_std']:.4f} ({100 * (r['exact_std'] / S - 1):+.1f}%)")
        out = {"benchmark": "oracle_sde_variants", "data": {"mean": MU, "std": S}, "results": rows}
        common.write_json(out, json_out)
        return out
    results = [measure(*row, calls, spacing, args.num) for spacing in args.spacings for row in ROWS
               for calls in args.calls]
    reference = [measure(f"ddpm {v}", "ddpm", v, 0.0, False, 1000, "linspace", args.num)
                 for v in (("fixed_large", "fixed_small") if not args.quick else ())]
    out = {"benchmark": "oracle_samplers", "data": {"mean": MU, "std": S}, "schedule": "linear, T=1000",
           "clip_denoised": False, "machine": common.machine(), "results": results, "reference_1000": reference}
    common.write_json(out, json_out)
    print(f"cells: exact mean / exact std (std of {args.num} samples)\n")
    for spacing in args.spacings:
        print(table(results, spacing, args.calls) + "\n")
    for r in reference:
        print(f"{r['row']}, 1000 calls: {r['exact_mean']:.4f} / {r['exact_std']:.4f} ({r['std']:.3f})")
    return out


if __name__ == "__main__":
    main()
