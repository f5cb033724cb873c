"""Sample quality against sampler and steps, for one trained model: which few-step sampler keeps up
with 1000-step ancestral sampling (issue 15's goal: at most 25 network evaluations, within noise of
it on every metric).

Every row samples ``--num`` images from the same model with the same seed and scores them as
``ddpm-pipe evaluate`` does (``pipelines.registry.evaluate.measure_sampler``: samples on the data's grey
levels against the held-out test split, one jackknife standard error each, the floor from as many
training images). Each row is compared with the first (the reference, 1000-step ancestral by
default): per metric the difference, that difference in standard errors (``z``) and ``within
noise`` under two. The JSON's ``table`` has the rows in the form ``scripts/plots.py
--sampler-table`` plots.

    python -m benchmarks.bench_samplers --model CHECKPOINT_OR_URI [--num 500] [--rows ddpm:1000 dpmpp:20 ddim:25:1]
                                        [--json-out bench-results/samplers.json]

A row is ``sampler:steps`` or ``sampler:steps:eta`` (eta for ddim only).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks import common
from benchmarks.bench_quality import METRICS, NOISE_Z, compare

DEFAULT_ROWS = ("ddpm:1000", "ddpm:25", "ddpm:50", "ddim:10", "ddim:20", "ddim:25", "ddim:50", "ddim:20:1",
                "ddim:25:1", "ddim:25:0.5", "dpmpp:10", "dpmpp:15", "dpmpp:20", "dpmpp:25")


def parse_row(text: str) -> tuple[str, int, float]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"row {text!r} must be sampler:steps or sampler:steps:eta (ddim)")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0


def against(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per metric: row minus reference, in standard errors, and whether the row is better or worse
    beyond noise (:func:`benchmarks.bench_quality.compare`, with the row in the first place; the copy
    rate by its excess over the floor)."""
    verdicts = {"ddpm-pipe": "better", "diffusers": "worse", "within noise": "within noise"}
    out = compare(row, ref, ref.get("floors"))
    out.pop("seconds_ratio", None)
    return {name: {"diff": c["diff"], "z": c["z"], "verdict": verdicts[c["better"]]} for name, c in out.items()}


def load(model: str) -> Any:
    """A checkpoint path (``bench_quality --save``'s ``ddpm-pipe.pt``) or any model URI ``evaluate`` takes."""
    from pipelines.registry.models import load as load_model

    return load_model(model)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint path/URL or model URI")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--rows", nargs="+", type=parse_row, default=[parse_row(r) for r in DEFAULT_ROWS])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-out", default=os.path.join("bench-results", "samplers.json"))
    args = p.parse_args(argv)

    from pipelines.registry.evaluate import load_eval_data, measure_sampler
    from pipelines.settings import resolve

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = common.set_threads(args.threads or cores)
    settings = resolve()
    loaded = load(args.model)
    ev = load_eval_data(loaded.config, None, settings)
    load_before, rows, start = common.load(), [], time.perf_counter()
    for sampler, steps, eta in args.rows:
        r = measure_sampler(loaded, ev, sampler, steps, eta, args.num, 1, None, settings)
        row = {k: r[k] for k in ("sampler", "steps", "eta", "num", "sec_per_sample", "scores", "se", "floors",
                                 "floor_se")}
        row["seconds"] = round(r["sec_per_sample"] * r["num"], 2)
        row["vs_reference"] = against(row, rows[0]) if rows else {}
        rows.append(row)
        worse = [n for n, c in row["vs_reference"].items() if c["verdict"] == "worse"]
        print(f"[bench_samplers] {sampler} {steps} eta {eta:g}: kid {row['scores']['kid']:.4g} "
              f"classifier_score {row['scores']['classifier_score']:.4g} {row['seconds']:.1f} s"
              + (f"; worse than the reference on {', '.join(worse)}" if worse else ""), flush=True)
    result = {"benchmark": "samplers", "model": args.model, "num": args.num, "reference": rows[0]["sampler"]
              + f"-{rows[0]['steps']}", "noise_z": NOISE_Z, "machine": common.machine(threads),
              "load_before": load_before, "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1),
              "compared": f"{args.num} samples per row against the test split ({len(ev.test)} held-out digits); "
                          f"floor: {args.num} training images in place of the samples",
              "table": rows}
    print(table(result))
    common.write_json(result, args.json_out)
    print(f"[bench_samplers] wrote {args.json_out}")
    return result


def table(result: dict[str, Any]) -> str:
    names = [n for n in METRICS if n in result["table"][0]["scores"]]
    head = ["sampler", "steps", "eta", *names, "s", f"worse than {result['reference']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        cells = [f"{r['scores'][n]:.4g}" + (f" ± {r['se'][n]:.2g}" if r["se"].get(n) is not None else "")
                 for n in names]
        worse = [n for n, c in r["vs_reference"].items() if c["verdict"] == "worse"]
        lines.append("| " + " | ".join([r["sampler"], str(r["steps"]), f"{r['eta']:g}", *cells,
                                        f"{r['seconds']:.1f}", ", ".join(worse) or "-"]) + " |")
    floors = result["table"][0]["floors"]
    lines.append("| real data (floor) | - | - | " + " | ".join(f"{floors[n]:.4g}" if n in floors else "-"
                                                           for n in names) + " | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
