"""Issue 15's recipe levers at equal training time: which change to the digits preset wins.

Each recipe is the ``digits`` preset with a few config values changed (``ddpm.config`` keys, as
``--set`` takes them). In one process, one after the other, each trains for the same wall-clock
``--budget`` (default 10 minutes) exactly as ``bench_quality`` trains ddpm-pipe
(:func:`benchmarks.bench_quality.train_ours`, seed 0), then its EMA weights make ``--samples`` (500)
images with each sampler setting and are scored as ``ddpm-pipe evaluate`` scores
(:func:`pipelines.registry.evaluate.measure_sampler`: against the 360 held-out test digits, jackknife standard
errors, floors from as many training images). Every row is compared with the first recipe (the
preset itself) at the same sampler setting (:func:`benchmarks.bench_samplers.against`: ``better`` or
``worse`` at two standard errors or more, the copy rate by its excess over the floor).

The samplers are the preset's default (DDIM-25, eta 1), DPM-Solver++-20 and DDIM-50 (eta 0);
1000-step ancestral sampling is left out (164 s per model) unless ``--samplers ddpm:1000`` asks.

    python -m benchmarks.bench_recipes [--budget 10m] [--samples 500] [--recipes NAME ...]
                                       [--samplers ddim:25:1 dpmpp:20 ...] [--quick] [--json-out PATH]

``--quick``: 3 s of training per recipe, 50 samples, 3-step samplers: a smoke test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from benchmarks import common
from benchmarks.bench_quality import _duration, setting_name, train_ours
from benchmarks.bench_samplers import against, parse_row

# name -> config values changed from the digits preset (issue 15's levers; the first is the baseline).
RECIPES: dict[str, dict[str, Any]] = {
    "preset": {},
    "v-prediction": {"diffusion.prediction": "v"},
    "min-snr-5": {"diffusion.snr_gamma": 5.0},
    "ema-0.999": {"train.ema_decay": 0.999},
    "width-48": {"model.ch": 48},
    "cosine": {"diffusion.schedule": "cosine"},
    "lr-1e-3": {"train.lr": 1e-3},
    "batch-128": {"train.batch_size": 128},
    "depth-2": {"model.num_res_blocks": 2},
}
DEFAULT_RECIPES = ("preset", "v-prediction", "min-snr-5", "ema-0.999", "width-48")
DEFAULT_SAMPLERS = ("ddim:25:1", "dpmpp:20", "ddim:50")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=_duration, default=600.0, help="training wall time per recipe (default 10m)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES),
                   help="the first is the baseline the others are compared with")
    p.add_argument("--samplers", nargs="+", type=parse_row, default=[parse_row(r) for r in DEFAULT_SAMPLERS])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="seconds of training, 50 samples, 3 steps: a smoke test")
    p.add_argument("--json-out", default=None, help="default bench-results/recipes.json (recipes-quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.samples = min(args.budget, 3.0), 50
        args.samplers = [(s, 3, e) for s, _, e in args.samplers]
    json_out = args.json_out or os.path.join("bench-results", f"recipes{'-quick' if args.quick else ''}.json")

    from pipelines.storage.data import prepare_command
    from pipelines.registry.evaluate import load_eval_data, measure_sampler
    from pipelines.settings import resolve

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = common.set_threads(args.threads or cores)
    os.environ["DDPM_TORCH_THREADS"] = str(threads)
    load_before, start = common.load(), time.perf_counter()
    settings = resolve()
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "digits")
        for split in ("train", "test"):
            prepare_command(source="digits", out=os.path.join(data, split), split=split)
        ev = None
        for name in args.recipes:
            loaded, info = train_ours(os.path.join(data, "train"), args.budget, 0, RECIPES[name])
            info = {k: v for k, v in info.items() if k != "config"}
            models[name] = {"changes": RECIPES[name], **info}
            print(f"[bench_recipes] {name}: {info['steps']} steps in {info['train_s']} s, loss {info['loss']}",
                  flush=True)
            ev = ev or load_eval_data(loaded.config, data, settings)
            for sampler, steps, eta in args.samplers:
                r = measure_sampler(loaded, ev, sampler, steps, eta, args.samples, 1, None, settings)
                row = {"recipe": name, "sampler": sampler, "steps": steps, "eta": eta, "num": r["num"],
                       "seconds": round(r["sec_per_sample"] * r["num"], 2), "scores": r["scores"], "se": r["se"],
                       "floors": r["floors"], "floor_se": r["floor_se"]}
                base = next((b for b in rows if b["recipe"] == args.recipes[0]
                             and (b["sampler"], b["steps"], b["eta"]) == (sampler, steps, eta)), None)
                row["vs_first"] = {} if base is None else against(row, base)
                rows.append(row)
                print(f"[bench_recipes] {name} {setting_name(row)}: kid {row['scores']['kid']:.4g} "
                      f"classifier_score {row['scores']['classifier_score']:.4g} ({summary(row)})", flush=True)
    result = {"benchmark": "recipes", "budget_s": args.budget, "samples": args.samples, "quick": args.quick,
              "baseline": args.recipes[0], "machine": common.machine(threads), "load_before": load_before,
              "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1), "models": models,
              "compared": f"{args.samples} samples per row against the test split ({len(ev.test)} held-out "
                          f"digits); floor: {args.samples} training images in place of the samples; each row "
                          f"against the {args.recipes[0]!r} row of the same sampler",
              "floors": rows[0]["floors"], "floor_se": rows[0]["floor_se"], "rows": rows}
    print(table(result))
    common.write_json(result, json_out)
    print(f"[bench_recipes] wrote {json_out}")
    return result


def summary(row: dict[str, Any]) -> str:
    """A row's verdicts against the baseline's row, for the table: "baseline" for the baseline's own
    rows, "within noise" when no score differs by two standard errors or more."""
    if not row["vs_first"]:
        return "baseline"
    parts = [f"{v} on {', '.join(n for n, c in row['vs_first'].items() if c['verdict'] == v)}"
             for v in ("better", "worse") if any(c["verdict"] == v for c in row["vs_first"].values())]
    return "; ".join(parts) or "within noise"


def table(result: dict[str, Any]) -> str:
    names = ("kid", "fd", "precision", "recall", "classifier_score", "confidence", "copy_rate")
    head = ["recipe", "steps trained", "sampler", *names, f"vs {result['baseline']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [f"{r['scores'][n]:.4g}" + (f" ± {r['se'][n]:.2g}" if r["se"].get(n) is not None else "")
                 for n in names]
        lines.append("| " + " | ".join([r["recipe"], str(result["models"][r["recipe"]]["steps"]), setting_name(r),
                                        *cells, summary(r)]) + " |")
    lines.append("| real data (floor) | - | - | " + " | ".join(f"{result['floors'][n]:.4g}" for n in names)
                 + " | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
