"""Does the yardstick's standard error hold? Two sampler rows drawn again and again from fresh seeds.

Every verdict of ``bench_samplers`` (and ``evaluate``'s comparisons) divides a paired difference by its
jackknife standard error (:func:`ddpm.metrics.score_difference`, 40 groups) and calls two standard
errors a difference. That is only a verdict if the standard error is the spread the difference
really has. This benchmark measures it, on a case whose answer is known: the same two rows of one
model, each draw from another seed (sample j of draw s from ``sample_seed(s, j)``, both rows alike,
as ``bench_samplers --seed s``), against the same held-out split. Per score, over the draws:

- ``sd_diff``: the spread of the paired difference from draw to draw (what the error should be);
- ``rms_se``: the root-mean-square of the standard errors the yardstick gave for it;
- ``ratio`` = sd_diff / rms_se, with its 95% interval from the draws' count (chi-square, n - 1
  degrees of freedom): above 1 beyond the interval, the yardstick's standard error is too small and
  its "worse" verdicts too eager; below, too large (conservative).

Caveat, by design: the held-out split is the same in every draw, so ``sd_diff`` leaves out the
split's own share of the error, which the jackknife counts (it leaves out held-out images too). A
score that reads the held-out images (KID, FD, precision, recall, pixel FD, fine spread) may
rightly show a ratio below 1; a ratio above 1 is too small an error whatever the split.

    python -m benchmarks.bench_calibration --model /work/bench-models/recipes/edm.pt \
        --rows dpmpp-2m-sde:20 dpmpp-2m-sde:25@karras --draws 10 [--num 2000] [--json-out ...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

from benchmarks import common
from benchmarks.bench_quality import Yardstick, gaps
from benchmarks.bench_samplers import load, parse_row, sample_row


def ratio_interval(n: int, level: float = 0.95) -> tuple[float, float]:
    """Where sd/sigma falls with probability ``level`` when ``n`` draws come from N(mu, sigma^2)."""
    from scipy.stats import chi2

    df = n - 1
    return math.sqrt(chi2.ppf((1 - level) / 2, df) / df), math.sqrt(chi2.ppf((1 + level) / 2, df) / df)


def summarize(draws: list[dict[str, tuple[float, float]]]) -> dict[str, dict[str, Any]]:
    """Per score, over the draws' ``{score: (diff, se)}``: the spread of the difference against the
    standard errors given (module docstring). Scores without a finite standard error are left out."""
    out: dict[str, dict[str, Any]] = {}
    for name in draws[0]:
        pairs = [d[name] for d in draws if name in d and math.isfinite(d[name][1]) and d[name][1] > 0]
        if len(pairs) < 3:
            continue
        diffs, ses = [p[0] for p in pairs], [p[1] for p in pairs]
        sd, rms = statistics.stdev(diffs), math.sqrt(statistics.fmean(s * s for s in ses))
        low, high = ratio_interval(len(pairs))
        ratio = sd / rms
        out[name] = {"draws": len(pairs), "mean_diff": statistics.fmean(diffs), "sd_diff": sd, "rms_se": rms,
                     "ratio": ratio, "interval": [round(low, 3), round(high, 3)],
                     "z": [round(d / s, 2) for d, s in pairs],
                     "verdict": ("too small" if ratio > high else "too large" if ratio < low else "consistent")}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint path/URL or model URI")
    p.add_argument("--rows", nargs=2, type=parse_row, required=True, metavar="ROW",
                   help="two bench_samplers rows (sampler:steps[:eta][@spacing]); the first is the reference")
    p.add_argument("--draws", type=int, default=10, help="seeds 0 .. draws-1")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-out", default=os.path.join("bench-results", "calibration.json"))
    args = p.parse_args(argv)
    if args.draws < 3:
        p.error("--draws must be 3 or more: a spread needs them")

    from pipelines.registry.evaluate import load_eval_data
    from pipelines.settings import resolve

    threads = common.set_threads(args.threads)
    settings = resolve()
    loaded = load(args.model)
    ev = load_eval_data(loaded.config, None, settings)
    yardstick = Yardstick(ev, settings)
    load_before, start = common.load(), time.perf_counter()
    draws: list[dict[str, tuple[float, float]]] = []
    for seed in range(args.draws):
        ref, row = (yardstick.scores(sample_row(loaded, ev, r, args.num, settings, {}, seed=seed)["samples"])
                    for r in args.rows)
        draws.append(gaps(row, ref, True))
        print(f"[bench_calibration] draw {seed + 1}/{args.draws}: "
              + ", ".join(f"{k} {d:+.3g} ({d / s:+.1f} se)" for k, (d, s) in draws[-1].items()
                          if math.isfinite(s) and s > 0), flush=True)
    scores = summarize(draws)
    result = {"benchmark": "calibration", "model": args.model, "num": args.num, "draws": args.draws,
              "rows": [f"{r.sampler}:{r.steps}:{r.eta:g}@{r.spacing or 'default'}" for r in args.rows],
              "compared": "the second row minus the first, paired (sample j of both from seed (s, j)), against the "
                          f"test split ({len(ev.test)} held-out images) in every draw",
              "machine": common.machine(threads), "load_before": load_before, "load_after": common.load(),
              "wall_s": round(time.perf_counter() - start, 1), "scores": scores}
    for name, s in scores.items():
        print(f"[bench_calibration] {name}: spread {s['sd_diff']:.3g} against standard error {s['rms_se']:.3g}: "
              f"ratio {s['ratio']:.2f} (95% interval {s['interval'][0]}-{s['interval'][1]}): {s['verdict']}")
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
