"""Issue 15's recipe levers at equal training time: which change to the digits preset wins.

Each recipe is the ``digits`` preset with a few config values changed (``ddpm.config`` keys, as
``--set`` takes them). In one process, one after the other, each trains for the same wall-clock
``--budget`` (default 10 minutes; or ``--steps`` steps) exactly as ``bench_quality`` trains ddpm-pipe
(:func:`benchmarks.bench_quality.train_ours`, seed 0), then its EMA weights make ``--samples`` (2000)
images with each sampler setting and are scored as ``ddpm-pipe evaluate`` scores
(:func:`benchmarks.bench_samplers.sample_row`, as :func:`pipelines.registry.evaluate.measure_sampler`: against the 360 held-out test digits, jackknife standard
errors, floors from as many training images). Every row is compared with the first recipe (the
preset itself) at the same sampler setting by the paired jackknife
(:func:`benchmarks.bench_quality.gaps`: sample j of both from seed j, one held-out split; then
:func:`benchmarks.bench_samplers.against`: ``better`` or ``worse`` at two standard errors of the
difference or more, the copy rate by its excess over the floor), and with the real data's floor.

The samplers are the preset's default (SDE-DPM-Solver++ 2M, 20 calls), DDIM-25 with eta 1 (the
default before) and DPM-Solver++-20;
1000-step ancestral sampling is left out (164 s per model) unless ``--samplers ddpm:1000`` asks.

    python -m benchmarks.bench_recipes [--budget 10m | --steps 6500] [--samples 2000] [--recipes NAME ...] [--save DIR [--reuse]]
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
from benchmarks.bench_quality import METRICS, Yardstick, _duration, ema_model, gaps, setting_name, train_ours
from benchmarks.bench_samplers import against, parse_row, sample_row

# The digits preset's process before it took EDM's recipe (issue 23): eps-prediction, uniform timesteps.
EPS: dict[str, Any] = {"diffusion.prediction": "eps", "diffusion.sigma_data": 0.5, "diffusion.timestep_sampling": "uniform"}
# name -> config values changed from the digits preset (issue 15's levers; the first is the baseline).
# The levers of the eps-prediction loss (v, min-SNR weighting, the hybrid loss) start from EPS.
RECIPES: dict[str, dict[str, Any]] = {
    "preset": {},
    "eps": EPS,
    "v-prediction": {**EPS, "diffusion.prediction": "v"},
    "min-snr-5": {**EPS, "diffusion.snr_gamma": 5.0},
    "ema-0.999": {"train.ema_decay": 0.999},
    "width-48": {"model.ch": 48},
    "cosine": {"diffusion.schedule": "cosine"},
    "lr-1e-3": {"train.lr": 1e-3},
    "batch-128": {"train.batch_size": 128},
    "depth-2": {"model.num_res_blocks": 2},
    # Issue 23's few-step levers: learned variances with the hybrid loss (Nichol and Dhariwal 2021),
    # read by the ancestral sampler (DDIM ignores the variance); EDM's preconditioning and log-normal
    # noise levels (Karras et al. 2022) around the digits' own std (0.75 in [-1, 1]), the preset's now.
    "learned-hybrid": {**EPS, "model.learn_sigma": True, "diffusion.variance": "learned_range",
                       "diffusion.loss": "hybrid"},
    "edm": {"diffusion.prediction": "edm", "diffusion.sigma_data": 0.75, "diffusion.timestep_sampling": "lognormal"},
}
DEFAULT_RECIPES = ("preset", "eps", "v-prediction", "min-snr-5", "ema-0.999", "width-48")
DEFAULT_SAMPLERS = ("dpmpp-2m-sde:20", "ddim:25:1", "dpmpp:20")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=_duration, default=600.0, help="training wall time per recipe (default 10m)")
    p.add_argument("--steps", type=int, default=None,
                   help="train each recipe this many steps instead of --budget (a loaded machine buys fewer "
                        "steps with a budget; 6500 steps of the preset take about 10 minutes on 2 quiet cores)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES),
                   help="the first is the baseline the others are compared with")
    p.add_argument("--samplers", nargs="+", type=parse_row, default=[parse_row(r) for r in DEFAULT_SAMPLERS])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="seconds of training, 50 samples, 3 steps: a smoke test")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="keep each recipe's model as DIR/<recipe>.pt (a checkpoint `ddpm-pipe evaluate --model` and "
                        "benchmarks.bench_samplers take)")
    p.add_argument("--reuse", action="store_true",
                   help="with --save: a recipe whose DIR/<recipe>.pt exists is loaded from it, not trained again")
    p.add_argument("--json-out", default=None, help="default bench-results/recipes.json (recipes-quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.samples, args.steps = min(args.budget, 3.0), 50, None
        args.samplers = [row._replace(steps=3) for row in args.samplers]
    json_out = args.json_out or os.path.join("bench-results", f"recipes{'-quick' if args.quick else ''}.json")

    from ddpm.checkpoint import save_checkpoint
    from pipelines.registry.evaluate import load_eval_data
    from pipelines.storage.data import prepare_command
    from pipelines.settings import resolve

    cores = common.cores()
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
        ev, yardstick, floor_scores = None, None, {}
        base: dict[Any, tuple[dict[str, Any], dict[str, Any]]] = {}
        for name in args.recipes:
            kept = os.path.join(args.save, f"{name}.pt") if args.save else None
            if args.reuse and kept and os.path.exists(kept):
                loaded, info = reused(kept, name, args.steps)
            else:
                loaded, info = train_ours(os.path.join(data, "train"), args.budget, 0, RECIPES[name], args.steps)
            info = {k: v for k, v in info.items() if k != "config"}
            models[name] = {"changes": RECIPES[name], **info}
            if args.save and "reused" not in info:
                os.makedirs(args.save, exist_ok=True)
                save_checkpoint(os.path.join(args.save, f"{name}.pt"), loaded.state)
            print(f"[bench_recipes] {name}: {info['steps']} steps in {info['train_s']} s, loss {info['loss']}",
                  flush=True)
            if ev is None:
                ev = load_eval_data(loaded.config, data, settings)
                yardstick = Yardstick(ev, settings)
                floor_scores = yardstick.floor_scores(args.samples)
            ms_eps: dict[int, float] = {}  # one model's Analytic-DPM Gamma_t
            for spec in args.samplers:
                r = sample_row(loaded, ev, spec, args.samples, settings, ms_eps)
                row = {"recipe": name, "sampler": r["sampler"], "steps": r["steps"], "eta": r["eta"],
                       "spacing": r["spacing"], "num": r["num"], "seconds": round(r["sec_per_sample"] * r["num"], 2),
                       "scores": r["scores"], "se": r["se"], "floors": r["floors"], "floor_se": r["floor_se"]}
                scores = yardstick.scores(r["samples"])
                # Sample j of every recipe comes from seed j: paired with the baseline's, one held-out split.
                row["vs_first"] = {} if spec not in base else against(
                    row, base[spec][0], gaps(scores, base[spec][1], True, row["floors"]))
                row["vs_floor"] = {n: c["verdict"] for n, c in against(
                    row, {"scores": row["floors"], "se": row["floor_se"], "floors": row["floors"]},
                    gaps(scores, floor_scores, False, row["floors"])).items()}
                base.setdefault(spec, (row, scores))  # the first recipe's row of this sampler setting
                rows.append(row)
                print(f"[bench_recipes] {name} {setting_name(row)}: kid {row['scores']['kid']:.4g} "
                      f"classifier_score {row['scores']['classifier_score']:.4g} "
                      f"fine_spread {row['scores']['fine_spread']:.3g} ({summary(row)})", flush=True)
    result = {"benchmark": "recipes", "budget_s": None if args.steps else args.budget, "train_steps": args.steps,
              "samples": args.samples, "quick": args.quick,
              "baseline": args.recipes[0], "machine": common.machine(threads), "load_before": load_before,
              "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1), "models": models,
              "compared": f"{args.samples} samples per row against the test split ({len(ev.test)} held-out "
                          f"digits); floor: {args.samples} training images in place of the samples; each row "
                          f"against the {args.recipes[0]!r} row of the same sampler by the paired jackknife "
                          "(sample j of both from seed j, one held-out split)",
              "floors": rows[0]["floors"], "floor_se": rows[0]["floor_se"], "rows": rows}
    print(table(result))
    common.write_json(result, json_out)
    print(f"[bench_recipes] wrote {json_out}")
    return result


def reused(path: str, name: str, steps: int | None) -> tuple[Any, dict[str, Any]]:
    """Recipe ``name``'s model as an earlier ``--save`` kept it, checked to be that recipe (its changed
    values already set) trained that many ``steps`` (when a step count is asked for)."""
    from ddpm.checkpoint import load_checkpoint
    from ddpm.config import ExperimentConfig

    state = load_checkpoint(path)
    cfg = state["config"]
    want = ExperimentConfig.preset("digits").with_values(RECIPES[name])  # its process and network
    if ((cfg.diffusion, cfg.model) != (want.diffusion, want.model) or cfg.with_values(RECIPES[name]) != cfg
            or (steps is not None and int(state["step"]) != steps)):
        raise SystemExit(f"--reuse: {path} is not recipe {name!r} ({RECIPES[name] or 'the preset'}) at {steps} "
                         f"steps (its step: {state['step']})")
    info = {"steps": int(state["step"]), "train_s": round(float(state.get("train_s") or 0), 1), "loss": None,
            "reused": path}
    return ema_model(cfg, state), info


def summary(row: dict[str, Any]) -> str:
    """A row's verdicts against the baseline's row, for the table: "baseline" for the baseline's own
    rows, "within noise" when no score differs by two standard errors or more."""
    if not row["vs_first"]:
        return "baseline"
    parts = [f"{v} on {', '.join(n for n, c in row['vs_first'].items() if c['verdict'] == v)}"
             for v in ("better", "worse") if any(c["verdict"] == v for c in row["vs_first"].values())]
    return "; ".join(parts) or "within noise"


def table(result: dict[str, Any]) -> str:
    names = [n for n in METRICS if n in result["floors"]]
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
