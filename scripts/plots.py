"""Training curves of an MLflow run as PNGs: the loss and the held-out bits/dim against the step.

    .venv/bin/python scripts/plots.py --run-id RUN_ID --out docs/img
    .venv/bin/python scripts/plots.py --run-name demo-train --experiment digits --out docs/img

Reads the run's metric history from the tracking store that `ddpm-pipe` uses (``MLFLOW_TRACKING_URI``,
else ``DDPM_HOME``'s sqlite store) and writes ``loss.png`` and ``bpd.png`` (the estimate with its
standard error as a band) into ``--out``. Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
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


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id")
    which.add_argument("--run-name")
    p.add_argument("--experiment", default="digits", help="with --run-name")
    p.add_argument("--out", default="docs/img")
    args = p.parse_args(argv)

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
