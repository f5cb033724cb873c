"""Plots for the docs: a run's training curves, and sample quality against sampler steps.

    .venv/bin/python scripts/plots.py --run-id RUN_ID --out docs/img
    .venv/bin/python scripts/plots.py --run-name demo-train --experiment digits --out docs/img
    .venv/bin/python scripts/plots.py --sampler-table eval.json --out docs/img
    .venv/bin/python scripts/plots.py --guidance-sweep eval.json --out docs/img
    .venv/bin/python scripts/plots.py --grids TEACHER TEACHER#ddim:4@trailing STUDENT --out docs/img

With a run: reads its metric history from the tracking store that `ddpm-pipe` uses
(``MLFLOW_TRACKING_URI``, else ``DDPM_HOME``'s sqlite store) and writes ``loss.png`` and ``bpd.png``
(the estimate with its standard error as a band) into ``--out``. With ``--sampler-table``: the
sampler table of ``ddpm-pipe evaluate --table`` (its ``--json`` output, or the run's
``evaluation/sampler_table.json`` artifact) -> ``sampler_quality.png``: KID and classifier score
(± one standard error) against the number of steps, one line per sampler and eta, the real data's
floor as a dashed line. With ``--guidance-sweep``: the guidance sweep of ``ddpm-pipe evaluate`` of a
class-conditional model (its ``--json`` output, or the run's ``evaluation/guidance_sweep.json``) ->
``guidance_sweep.png``: conditional accuracy, and diversity (recall, class spread) against the
guidance weight w (± one standard error), the classifier's accuracy on real digits as a dashed line
when known. With ``--grids``: 64 samples of each model, side by side (the same seeds: sample i from
seed i, as ``evaluate``), each with its own sampler or ``URI#sampler:steps[:eta][@spacing]`` ->
``grids.png``, titled by model and sampler: a distilled student beside its teacher. Needs matplotlib
(not a dependency of the package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# A training metric's MLflow names: a run's charts open on "training/loss", "training/bpd" and the
# sample grid, the rest under "training details/" (pipelines/train/async_logger.py); runs logged
# before that used the bare name.
NAMES = {"loss": ("training/loss", "loss"), "bpd": ("training/bpd", "bpd"),
         "bpd_stderr": ("training details/bpd_stderr", "bpd_stderr")}


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order (``key``: ``loss``, ``bpd`` or ``bpd_stderr``,
    under whichever of its names the run has)."""
    for name in NAMES.get(key, (key,)):
        points = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        if points:
            break
    return [m.step for m in points], [m.value for m in points]


def find_run(client, experiment: str, run_name: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'", max_results=1)
    if not runs:
        raise SystemExit(f"no run named {run_name!r} in experiment {experiment!r}")
    return runs[0].info.run_id


def plot(run_id: str, out: Path, client) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    steps, loss = history(client, run_id, "loss")
    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, loss, lw=1.2)
        ax.set(xlabel="step", ylabel="L_simple (mean over the log interval)", yscale="log",
               title="training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
        written.append(out / "loss.png")
    steps, bpd = history(client, run_id, "bpd")
    if steps:
        _, err = history(client, run_id, "bpd_stderr")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, bpd, marker="o", ms=3, lw=1.2)
        if len(err) == len(bpd):
            ax.fill_between(steps, [b - e for b, e in zip(bpd, err)], [b + e for b, e in zip(bpd, err)], alpha=0.25)
        ax.set(xlabel="step", ylabel="bits/dim (estimate)", title="held-out bits/dim")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "bpd.png", dpi=120)
        plt.close(fig)
        written.append(out / "bpd.png")
    return written


SAMPLER_PANELS = (("kid", "KID against held-out digits (lower is better)"),
                  ("classifier_score", "classifier score (higher is better)"),
                  ("pixel_fd", "pixel-PCA Frechet distance (lower is better)"),
                  ("fine_spread", "fine-component variance ratio (1 = real)"))


def sampler_rows(doc) -> list[dict]:
    """The rows of a sampler table: ``evaluate --json`` output (its ``table``) or the artifact (a list)."""
    rows = doc.get("table") if isinstance(doc, dict) else doc
    if not rows:
        raise SystemExit("no sampler table in that file: run `ddpm-pipe evaluate --table --json`")
    return rows


def plot_sampler_table(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    from ddpm.samplers import default_spacing

    panels = [(name, title) for name, title in SAMPLER_PANELS if name in rows[0]["scores"]]
    cols = min(len(panels), 2)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    axes = axes.ravel()
    lines: dict[str, list[dict]] = {}
    for r in rows:
        spacing = r.get("spacing")  # a line per sampler on its own spacing; other spacings apart
        label = (r["sampler"] + (f" eta {r['eta']:g}" if r["sampler"] == "ddim" else "")
                 + (f" @{spacing}" if spacing and spacing != default_spacing(r["sampler"].removesuffix("-analytic"))
                    else ""))
        if all(q["steps"] != r["steps"] for q in lines.get(label, [])):  # a repeated row once
            lines.setdefault(label, []).append(r)
    for ax, (name, title) in zip(axes, panels):
        for label, rs in lines.items():
            rs = sorted(rs, key=lambda r: r["steps"])
            ax.errorbar([r["steps"] for r in rs], [r["scores"][name] for r in rs],
                        yerr=[r["se"].get(name) or 0.0 for r in rs], marker="o", ms=3, capsize=2, label=label)
        floor = rows[0]["floors"].get(name)
        if floor is not None:
            ax.axhline(floor, ls="--", color="grey", lw=1, label="real data (floor)")
        ax.set(xscale="log", xlabel="sampling steps (network evaluations)", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['num']} samples per setting", fontsize=9)
    fig.tight_layout()
    path = out / "sampler_quality.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_rows(doc) -> tuple[list[dict], float | None]:
    """The rows of a guidance sweep and the classifier's real-digit accuracy (None if not given):
    ``evaluate --json`` output (its ``conditional.sweep``) or the artifact (a list)."""
    if isinstance(doc, dict):
        rows = (doc.get("conditional") or {}).get("sweep")
        ceiling = (doc.get("feature_net") or {}).get("test_accuracy")
    else:
        rows, ceiling = doc, None
    if not rows:
        raise SystemExit("no guidance sweep in that file: run `ddpm-pipe evaluate --json` on a class-conditional model")
    return rows, ceiling


def plot_guidance_sweep(rows: list[dict], out: Path, ceiling: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["guidance"])
    w = [r["guidance"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    panels = ((axes[0], ("cond_accuracy",), "conditional accuracy (higher is better)"),
              (axes[1], ("recall", "class_spread"), "diversity: recall, class spread (1: real digits)"))
    for ax, names, title in panels:
        for name in names:
            ax.errorbar(w, [r["scores"][name] for r in rows], yerr=[r["se"].get(name) or 0.0 for r in rows],
                        marker="o", ms=3, capsize=2, label=name)
        ax.set(xlabel="guidance weight w (0: unconditional, 1: conditional)", title=title)
        ax.grid(alpha=0.3)
    if ceiling is not None:
        axes[0].axhline(ceiling, ls="--", color="grey", lw=1, label="the classifier on real digits")
    axes[1].axhline(1.0, ls=":", color="grey", lw=1)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['num']} samples per w, every class in turn, the same seeds", fontsize=9)
    fig.tight_layout()
    path = out / "guidance_sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grids(specs: list[str], out: Path, num: int = 64) -> Path:
    """``grids.png``: ``num`` samples of each model spec (``URI`` or ``URI#sampler:steps[:eta][@spacing]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.bench_samplers import parse_row
    from ddpm.image import grid
    from ddpm.inference import SamplingNet
    from ddpm.pipeline import DDPMPipeline
    from pipelines.registry.models import load

    fig, axes = plt.subplots(1, len(specs), figsize=(2.8 * len(specs), 3.2), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        uri, _, setting = spec.partition("#")
        loaded = load(uri)
        try:
            row = parse_row(setting) if setting else None
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"--grids {spec!r}: {e}") from None
        pipe = DDPMPipeline.from_config(SamplingNet(loaded.model), loaded.config, loaded.diffusion,
                                        **({"sampler": row.sampler, "steps": row.steps, "eta": row.eta,
                                            "spacing": row.spacing} if row else {}))
        ax.imshow(grid(pipe(num, 0), loaded.config.data.levels, scale=4).squeeze(), cmap="gray")
        how = f"{pipe.sampler} {pipe.steps}" + (f" eta {pipe.eta:g}" if pipe.eta else "") + f", {pipe.spacing}"
        ax.set_title(f"{uri.rsplit('/', 2)[-2] if uri.startswith('models:/') else Path(uri).stem}\n{how}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grids.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id")
    which.add_argument("--run-name")
    which.add_argument("--sampler-table", metavar="JSON", help="`ddpm-pipe evaluate --table --json` output")
    which.add_argument("--guidance-sweep", metavar="JSON",
                       help="`ddpm-pipe evaluate --json` output of a class-conditional model, or its guidance_sweep.json")
    which.add_argument("--grids", nargs="+", metavar="URI[#sampler:steps]", help="models to sample side by side")
    p.add_argument("--experiment", default="digits", help="with --run-name")
    p.add_argument("--out", default="docs/img")
    args = p.parse_args(argv)
    if args.grids:
        path = plot_grids(args.grids, Path(args.out))
        print(path)
        return [path]
    if args.sampler_table or args.guidance_sweep:
        import json

        if args.sampler_table:
            path = plot_sampler_table(sampler_rows(json.loads(Path(args.sampler_table).read_text())), Path(args.out))
        else:
            rows, ceiling = sweep_rows(json.loads(Path(args.guidance_sweep).read_text()))
            path = plot_guidance_sweep(rows, Path(args.out), ceiling)
        print(path)
        return [path]

    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    client = tracking.client()
    run_id = args.run_id or find_run(client, args.experiment, args.run_name)
    written = plot(run_id, Path(args.out), client)
    if not written:
        raise SystemExit(f"run {run_id} has no loss or bpd history")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
