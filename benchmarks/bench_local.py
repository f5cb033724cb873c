"""End-to-end wall time of a small local job: `ddpm-pipe sample --num 500` as a user runs it.

    .venv/bin/python -m benchmarks.bench_local --repeats 5 --out bench-results/local.json
    .venv/bin/python -m benchmarks.bench_local --model models:/ddpm-digits/1   # a registered model

Each repeat runs the CLI once per mode, the modes interleaved so that both see the same machine:
- ``ray``: ``DDPM_SAMPLE_IN_PROCESS=0``, the one-worker job on a Ray instance started for it (one
  actor that loads the model), as every `sample` ran before;
- ``in_process``: the default for one worker and no cluster, the worker in the CLI's process;
- ``no_freeze``: ``in_process`` through ``pipelines.cli.main`` rather than the console entry point,
  so without the entry point's ``gc.freeze()`` at the end (the baseline for it).
The median of the repeats is reported per mode, with the 1-minute load average before each run
(the machine may be shared). Without ``--model`` the model is the ``digits`` preset's U-Net with
random weights saved as a checkpoint: the speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"ray": "0", "in_process": "1", "no_freeze": "1"}


def run_once(cli: str, model: str, num: int, out: str, mode: str, env: dict[str, str]) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    command = [cli] if mode != "no_freeze" else [sys.executable, "-c", "from pipelines.cli import main; main()"]
    proc = subprocess.run([*command, "sample", "--model", model, "--num", str(num), "--out", out, "--json"],
                          env={**env, "DDPM_SAMPLE_IN_PROCESS": MODES[mode]}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "load_1m_before": round(load, 2), **result["timings"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model URI; default a random digits checkpoint")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    cli = str(Path(sys.executable).with_name("ddpm-pipe"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        model = args.model
        if model is None:
            from benchmarks.bench_sample import make_model

            model = os.path.join(tmp, "checkpoint.pt")
            make_model(model, "digits")
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for k in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(run_once(cli, model, args.num, os.path.join(tmp, f"{mode}-{k}"), mode, env))
                print(f"[bench_local] {mode} run {k + 1}: {runs[mode][-1]['wall_s']:.1f} s "
                      f"(load {runs[mode][-1]['load_1m_before']:.1f})", file=sys.stderr, flush=True)
            result = summarize(args, runs)
            if args.out:  # after every repeat, so an interrupted run keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def summarize(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    done = {m: rs for m, rs in runs.items() if rs}
    return {
        "bench": "local", "command": f"ddpm-pipe sample --model MODEL --num {args.num}",
        "model": args.model or "digits preset, random weights (checkpoint)", "repeats": len(runs[args.modes[0]]),
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "median_wall_s": {m: round(statistics.median(r["wall_s"] for r in rs), 3) for m, rs in done.items()},
        "median_sample_s": {m: round(statistics.median(r["sample_s"] for r in rs), 3) for m, rs in done.items()},
        "load_1m": {m: [r["load_1m_before"] for r in rs] for m, rs in done.items()},
        "runs": runs,
    }


if __name__ == "__main__":
    main()
