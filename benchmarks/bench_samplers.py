"""Sample quality against sampler and steps, for one trained model: which few-step sampler keeps up
with 1000-step ancestral sampling (issue 23's goal: at most 25 network evaluations, within noise of
it on every score, the pixel ones included).

Every row samples ``--num`` images (default 2000) from the same model with the same seed and scores
them as ``ddpm-pipe evaluate`` does (``pipelines.registry.evaluate.score_samples``: samples on the data's
grey levels against the held-out test split, one jackknife standard error each, the floor from as
many training images). Each row is compared with the first (the reference, 1000-step ancestral by
default) by the paired jackknife (:func:`benchmarks.bench_quality.gaps`: sample j of both rows comes
from seed j and both are scored against one held-out split, so the split's own noise cancels): per
score the difference, that difference in standard errors (``z``), the smallest difference the
comparison could call (``mdd``, two standard errors) and ``within noise`` under two; and with the
real data's floor (``vs_floor``). The JSON's ``table`` has the rows in the form ``scripts/plots.py
--sampler-table`` plots.

    python -m benchmarks.bench_samplers --model CHECKPOINT_OR_URI [--num 2000] [--rows ddpm:1000 dpmpp:20 ddim:25:1]
                                        [--json-out bench-results/samplers.json] [--cache DIR]

``--cache DIR`` keeps each row's samples of a checkpoint file (named by its sha256) and reads them
back in later runs: the 1000-step reference is sampled once, not in every comparison.

A row is ``sampler:steps`` or ``sampler:steps:eta`` (eta for ddim only), optionally ``@spacing``
(``linspace``, ``trailing``, ``logsnr``, ...; default the sampler's own); ``ddpm-analytic`` is the
ancestral sampler with Analytic-DPM's optimal variance, its Gamma_t estimated on the training split.

``--students URI ...`` adds a row per other model (a distilled student of ``--model``), sampled with
its own config's sampler, steps and spacing, and compared with the reference like every row (issue 28);
``URI#ROW`` samples it with ``ROW`` (the row syntax above) instead. Another model's rows are paired with
the reference too (the same seeds, one held-out split): ``--students OTHER.pt#ddpm:1000`` compares two
checkpoints' 1000-step samples, cached like ``--model``'s rows:

    python -m benchmarks.bench_samplers --model TEACHER --rows dpmpp-2m-sde:20 ddim:4@trailing \
        --students models:/ddpm-digits-distilled/1 --json-out bench-results/distill.json
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any, NamedTuple

from benchmarks import common
from benchmarks.bench_quality import METRICS, NOISE_Z, Yardstick, compare, gaps
from ddpm.pixel_scores import variance_ratios

# The reference, then every sampler at 10, 15, 20 and 25 model calls on its own spacing (issue 23),
# the DDIM settings of the last default, and the spacings that matter at few calls.
DEFAULT_ROWS = ("ddpm:1000",
                *(f"{s}:{n}" for s in ("unipc", "dpmpp-3m", "dpmpp", "dpmpp-2m-sde", "edm", "ddpm-analytic", "ddim")
                  for n in (10, 15, 20, 25)),
                *(f"ddim:{n}:1" for n in (10, 15, 20, 25)),
                "ddpm:25@trailing", "ddpm:25", "dpmpp:20@linspace", "ddim:25:1@logsnr", "unipc:20@karras")
# A pseudo-sampler of this benchmark: ancestral sampling with Analytic-DPM's optimal reverse
# variance (Bao et al. 2022), its Gamma_t estimated on the training split (ddpm.samplers.estimate_ms_eps).
ANALYTIC = "ddpm-analytic"


class Row(NamedTuple):
    sampler: str
    steps: int
    eta: float = 0.0
    spacing: str | None = None  # None: the sampler's own
    model: str | None = None  # None: --model; else a --students URI


def parse_row(text: str) -> Row:
    """``sampler:steps``, ``sampler:steps:eta`` (ddim), each optionally ``@spacing``."""
    body, _, spacing = text.partition("@")
    parts = body.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"row {text!r} must be sampler:steps or sampler:steps:eta (ddim), "
                                         "optionally @spacing")
    return Row(parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0, spacing or None)


def student_spec(text: str) -> tuple[str, Row | None]:
    """``URI`` (sampled with its own config's settings: None) or ``URI#ROW`` (with :func:`parse_row`'s)."""
    uri, sep, row = text.partition("#")
    return uri, parse_row(row) if sep else None


def cache_path(cache: str | None, model: str, row: Row, num: int, seed: int = 0) -> str | None:
    """Where ``row``'s ``num`` samples of the checkpoint file ``model`` are kept under ``cache`` (named by
    the file's sha256 and the row, so another model or setting never reads them); None for a model URI
    (its version could move) or without ``cache``."""
    if cache is None or not os.path.isfile(model):
        return None
    name = f"{row.sampler}-{row.steps}-{row.eta:g}-{row.spacing or 'default'}-{num}" + (f"-seed{seed}" if seed else "")
    return os.path.join(cache, _file_sha256(model)[:16], name + ".pt")


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str) -> str:
    """:func:`pipelines.registry.digests.file_sha256`, once per model file and run (every row asks)."""
    from pipelines.registry.digests import file_sha256

    return file_sha256(path)


def sample_row(loaded: Any, ev: Any, row: Row, num: int, settings: Any, ms_eps: dict[str, Any],
               cached: str | None = None, seed: int = 0) -> dict[str, Any]:
    """``num`` samples of ``row`` (sample i from ``sample_seed(seed, i)``, as ``evaluate``), scored as
    ``evaluate`` scores (:func:`pipelines.registry.evaluate.score_samples`); the result says the
    spacing used. ``ms_eps`` caches Analytic-DPM's Gamma_t (one estimate at every timestep any row
    calls). With ``cached`` (a file, :func:`cache_path`) the samples and their seconds are read from
    it when it exists and written to it when not: the 1000-step reference row costs about 15 minutes
    on 2 cores."""
    import torch

    from pipelines.registry.evaluate import score_samples

    if cached and os.path.exists(cached):
        kept = torch.load(cached)
        return score_samples(kept["x"], kept["seconds"], ev, row.sampler, kept["steps"], kept["eta"], settings,
                             spacing=kept["spacing"])

    from ddpm.inference import SamplingNet
    from ddpm.pipeline import DDPMPipeline
    from ddpm.samplers import estimate_ms_eps, make_sampler

    sampler = "ddpm" if row.sampler == ANALYTIC else row.sampler
    gamma = None
    if row.sampler == ANALYTIC:
        steps = make_sampler(loaded.diffusion, "ddpm", row.steps, spacing=row.spacing).timesteps
        missing = [t for t in steps if t not in ms_eps]
        if missing:
            g = torch.Generator().manual_seed(0)
            est = estimate_ms_eps(loaded.model, loaded.diffusion, ev.train, missing, generator=g)
            ms_eps.update({t: est[t].item() for t in missing})
        gamma = torch.full((loaded.diffusion.num_timesteps,), float("nan"), dtype=torch.float64)
        gamma[steps] = torch.tensor([ms_eps[t] for t in steps], dtype=torch.float64)
    pipe = DDPMPipeline.from_config(SamplingNet(loaded.model), loaded.config, loaded.diffusion, sampler=sampler,
                                    steps=row.steps, eta=row.eta, spacing=row.spacing, ms_eps=gamma)
    start = time.perf_counter()
    x = pipe(num, seed)
    seconds = time.perf_counter() - start
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.save({"x": x, "seconds": seconds, "steps": pipe.steps, "eta": pipe.eta, "spacing": pipe.spacing},
                   cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    return score_samples(x, seconds, ev, row.sampler, pipe.steps, pipe.eta, settings, spacing=pipe.spacing)


def against(row: dict[str, Any], ref: dict[str, Any], paired: dict[str, tuple[float, float]] | None = None
            ) -> dict[str, Any]:
    """Per metric: row minus reference (on :func:`ddpm.metrics.badness`'s lower-is-better scale), in
    standard errors, the smallest difference the comparison could call (``mdd``), and whether the row
    is better or worse beyond noise (:func:`benchmarks.bench_quality.compare`, with the row in the
    first place; the copy rate by its excess over the floor). ``paired``: the differences and their
    standard errors from :func:`benchmarks.bench_quality.gaps` (one reference, the same seeds)."""
    verdicts = {"ddpm-pipe": "better", "diffusers": "worse", "within noise": "within noise"}
    out = compare(row, ref, ref.get("floors"), paired)
    out.pop("seconds_ratio", None)
    return {name: {"diff": c["diff"], "z": c["z"], "mdd": c["mdd"], "verdict": verdicts[c["better"]]}
            for name, c in out.items()}


def load(model: str) -> Any:
    """A checkpoint path (``bench_quality --save``'s ``ddpm-pipe.pt``) or any model URI ``evaluate`` takes."""
    from pipelines.registry.models import load as load_model

    return load_model(model)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint path/URL or model URI")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0,
                   help="sample j of every row from seed (seed, j), as `sample --seed`: another draw to confirm a verdict")
    p.add_argument("--rows", nargs="+", type=parse_row, default=[parse_row(r) for r in DEFAULT_ROWS])
    p.add_argument("--students", nargs="+", type=student_spec, default=[], metavar="URI[#ROW]",
                   help="other models (distilled students), one row each: their own sampler settings, or URI#ROW")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep each row's samples of a checkpoint file here and reuse them in later runs")
    p.add_argument("--json-out", default=os.path.join("bench-results", "samplers.json"))
    args = p.parse_args(argv)

    from pipelines.registry.evaluate import load_eval_data
    from pipelines.settings import resolve

    cores = common.cores()
    threads = common.set_threads(args.threads or cores)
    settings = resolve()
    loaded = load(args.model)
    ev = load_eval_data(loaded.config, None, settings)
    models = {None: loaded, **{uri: load(uri) for uri, _ in args.students}}
    specs = [*args.rows, *(row._replace(model=uri) if row else Row(
        models[uri].config.sample.sampler, models[uri].config.sample.steps, models[uri].config.sample.eta,
        models[uri].config.sample.spacing, uri) for uri, row in args.students)]
    yardstick = Yardstick(ev, settings)
    pixels = yardstick.parts[-1]
    floor_scores = yardstick.floor_scores(args.num)
    load_before, rows, start = common.load(), [], time.perf_counter()
    ref_scores: dict[str, Any] = {}
    ms_eps: dict[int, float] = {}
    for spec in specs:
        r = sample_row(models[spec.model], ev, spec, args.num, settings, ms_eps,
                       cache_path(args.cache, spec.model or args.model, spec, args.num, args.seed), args.seed)
        row = {k: r[k] for k in ("sampler", "steps", "eta", "spacing", "num", "sec_per_sample", "scores", "se",
                                 "floors", "floor_se")}
        row["model"] = spec.model or args.model
        row["seconds"] = round(r["sec_per_sample"] * r["num"], 2)
        scores = yardstick.scores(r["samples"])
        # The variance ratio along each pixel-PCA component, coarse to fine (fine_spread: the finer half's).
        row["component_ratios"] = [round(v, 4) for v in variance_ratios(r["samples"], ev.test, pixels.basis).tolist()]
        # Every row drew sample j from seed j: paired with the reference row, one held-out split.
        row["vs_reference"] = against(row, rows[0], gaps(scores, ref_scores, True, rows[0]["floors"])) if rows else {}
        row["vs_floor"] = {name: c["verdict"] for name, c in against(
            row, {"scores": row["floors"], "se": row["floor_se"], "floors": row["floors"]},
            gaps(scores, floor_scores, False, row["floors"])).items()}
        ref_scores = ref_scores or scores
        rows.append(row)
        worse = [n for n, c in row["vs_reference"].items() if c["verdict"] == "worse"]
        print(f"[bench_samplers] {row['model'] if spec.model else ''} {row['sampler']} {row['steps']} eta {row['eta']:g} {row['spacing']}: kid {row['scores']['kid']:.4g} "
              f"classifier_score {row['scores']['classifier_score']:.4g} "
              f"fine_spread {row['scores']['fine_spread']:.3g} {row['seconds']:.1f} s"
              + (f"; worse than the reference on {', '.join(worse)}" if worse else ""), flush=True)
    result = {"benchmark": "samplers", "model": args.model, "num": args.num, "seed": args.seed, "reference": rows[0]["sampler"]
              + f"-{rows[0]['steps']}", "noise_z": NOISE_Z, "machine": common.machine(threads),
              "load_before": load_before, "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1),
              "compared": f"{args.num} samples per row against the test split ({len(ev.test)} held-out digits); "
                          f"floor: {args.num} training images in place of the samples; each row against the "
                          "reference by the paired jackknife (sample j of both from seed j, one held-out split)",
              "table": rows}
    print(table(result))
    common.write_json(result, args.json_out)
    print(f"[bench_samplers] wrote {args.json_out}")
    return result


def table(result: dict[str, Any]) -> str:
    """One row per setting (value ± standard error), the scores it is worse on than the reference
    and than the real data's floor; then the floor, and the smallest difference from the reference
    each comparison could call (``mdd``, :data:`benchmarks.bench_quality.NOISE_Z` standard errors of
    the paired difference; the median over the rows, on the lower-is-better scale)."""
    names = [n for n in METRICS if n in result["table"][0]["scores"]]
    models = len({r.get("model") for r in result["table"]}) > 1  # a column for the model when rows differ in it
    head = [*(["model"] if models else []), "sampler", "steps", "eta", "spacing", *names, "s",
            f"worse than {result['reference']}", "worse than real data"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        cells = [f"{r['scores'][n]:.4g}" + (f" ± {r['se'][n]:.2g}" if r["se"].get(n) is not None else "")
                 for n in names]
        worse = [n for n, c in r["vs_reference"].items() if c["verdict"] == "worse"]
        below = [n for n, v in r.get("vs_floor", {}).items() if v == "worse"]
        lines.append("| " + " | ".join([*([r["model"]] if models else []), r["sampler"], str(r["steps"]),
                                        f"{r['eta']:g}", r.get("spacing", "-"), *cells,
                                        f"{r['seconds']:.1f}", ", ".join(worse) or "-", ", ".join(below) or "-"])
                     + " |")
    floors = result["table"][0]["floors"]
    pad = "- | " * models
    lines.append(f"| {pad}real data (floor) | - | - | - | " + " | ".join(f"{floors[n]:.4g}" if n in floors else "-"
                                                           for n in names) + " | - | - | - |")
    mdd = {n: sorted(r["vs_reference"][n]["mdd"] for r in result["table"][1:]
                     if n in r["vs_reference"] and r["vs_reference"][n].get("mdd") is not None) for n in names}
    lines.append(f"| {pad}smallest detectable difference (median) | - | - | - | " + " | ".join(
        f"{v[len(v) // 2]:.2g}" if v else "-" for v in mdd.values()) + " | - | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
