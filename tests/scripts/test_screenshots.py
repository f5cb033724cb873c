"""scripts/screenshots.py: MLflow's UI over a tracked training run, rendered by headless Chromium.

Needs Debian's ``chromium`` (.ci/run installs it): without it this test fails, it does not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = (1, 2, 3, 4)


def tracked_run(tmp_path: Path) -> tuple[str, str, str]:
    """A run as `ddpm-pipe train` leaves it, made with the pipeline's own tracking functions:
    an experiment tagged as model training, a run with provenance, its dataset, loss and bits/dim
    curves, a grid of real digits logged as the stepped image ``samples``, and the registered model.
    Returns (experiment id, run id, version)."""
    import torch
    from sklearn.datasets import load_digits

    from ddpm.data.shards import write_shards
    from ddpm.data.sources import Sample
    from ddpm.image import save_grid
    from pipelines import tracking
    from pipelines.registry import register as registry
    from pipelines.settings import resolve
    from pipelines.train.async_logger import AsyncLogger
    from tests.support import save_tiny_checkpoint

    settings = resolve()
    tracking.configure(settings)
    digits = load_digits().images[:64].astype("uint8")  # 8 x 8, values 0..16
    data = str(tmp_path / "data" / "train")
    write_shards([Sample(f"{i:07d}", img, 0) for i, img in enumerate(digits)], data, source="digits",
                 split="train", levels=17)
    exp_id = tracking.experiment_id("digits", settings)
    run_id, _ = tracking.start_or_resume_run(exp_id, "screens", {tracking.KIND_TAG: "train"})
    tracking.log_params(run_id, {"train": {"max_steps": len(STEPS)}, "run": {"data": data}})
    tracking.log_dataset(run_id, data, "training")
    logger = AsyncLogger(run_id)
    for step in STEPS:
        logger.log_metrics({"loss": 1.0 / step, "bpd": 6.0 - step / 4}, step)
    grid = save_grid(torch.from_numpy(digits[:16, None]).float() / 8 - 1, str(tmp_path / "samples.png"), levels=17)
    logger.log_image(grid, "samples", STEPS[-1])
    report = logger.close(timeout=120)
    assert report["dropped"] == 0, report
    version = registry.log_and_register(run_id, str(save_tiny_checkpoint(tmp_path / "ckpt.pt")), "ddpm-digits")
    tracking.end_run(run_id)
    return exp_id, run_id, version


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_run_page_shows_the_metrics_and_the_sample_grid(tmp_path):
    assert shutil.which("chromium"), "chromium is not installed: apt-get install -y chromium (.ci/run does)"
    exp_id, run_id, version = tracked_run(tmp_path)
    out = tmp_path / "img"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--out", str(out), "--dom"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-3000:]
    stems = ["mlflow-run", "mlflow-run-charts", "mlflow-model-version", "mlflow-experiment-charts"]
    for stem in stems:
        png = (out / f"{stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, stem  # a rendered page, not a blank one
    assert f"#/experiments/{exp_id}/runs/{run_id}" in done.stdout
    assert f"#/models/ddpm-digits/versions/{version}" in done.stdout

    run_page = (out / "mlflow-run.html").read_text()
    assert "screens" in run_page  # the run's name: the page rendered the run, not an error or a spinner
    for metric in ("training/loss", "training/bpd"):
        assert re.search(rf">\s*{metric}\s*<", run_page), f"metric {metric!r} not on the run page"
    assert "digits-train" in run_page  # the dataset logged with log_input
    charts = (out / "mlflow-run-charts.html").read_text()
    assert re.search(r"<img[^>]+src=\"[^\"]*images(%2F|/)training~samples(%2B|\+)step(%2B|\+)4", charts), \
        "the sample grid is not rendered"
    version_page = (out / "mlflow-model-version.html").read_text()
    assert f"Version {version}" in version_page and "screens" in version_page
