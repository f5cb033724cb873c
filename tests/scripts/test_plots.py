"""scripts/plots.py: an MLflow run's loss and held-out bits/dim history -> PNGs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("plots", ROOT / "scripts" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_curves_of_a_run_are_written_as_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from mlflow.entities import Metric

    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    c = tracking.client()
    exp = tracking.experiment_id("digits")
    run_id = c.create_run(exp, run_name="curves").info.run_id
    c.log_batch(run_id, metrics=[Metric("loss", 1.0 / s, 0, s) for s in (10, 20, 30)]
                + [Metric("bpd", 5.0 - s / 10, 0, s) for s in (10, 30)]
                + [Metric("bpd_stderr", 0.1, 0, s) for s in (10, 30)])
    plots = load_script()
    written = plots.main(["--run-name", "curves", "--out", str(tmp_path / "img")])
    assert [p.name for p in written] == ["loss.png", "bpd.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert plots.history(c, run_id, "loss") == ([10, 20, 30], [0.1, 0.05, 1.0 / 30])  # a run of before
    named = c.create_run(exp, run_name="curves-named").info.run_id  # a run as the training loop names it now
    c.log_batch(named, metrics=[Metric("training/loss", 2.0 / s, 0, s) for s in (10, 20)]
                + [Metric("training/bpd", 4.0, 0, 10), Metric("training details/bpd_stderr", 0.2, 0, 10)])
    assert plots.history(c, named, "loss") == ([10, 20], [0.2, 0.1])
    assert plots.history(c, named, "bpd_stderr") == ([10], [0.2])


@pytest.mark.timeout(120)
def test_sampler_table_plot_from_evaluate_json(tmp_path):
    """`evaluate --table --json` output (a dict with ``table``) and the artifact (the list) both plot."""
    import json

    def row(sampler, steps, eta, kid):
        return {"sampler": sampler, "steps": steps, "eta": eta, "num": 500,
                "scores": {"kid": kid, "classifier_score": 9 - kid}, "se": {"kid": 0.01, "classifier_score": 0.2},
                "floors": {"kid": 0.0, "classifier_score": 9.3}}

    rows = [row("ddpm", 1000, 0.0, 0.02)] + [row("ddim", n, e, 1 / n + e / 10) for n in (10, 50) for e in (0.0, 1.0)]
    plots = load_script()
    for i, doc in enumerate(({"model": "m", "table": rows}, rows)):
        (tmp_path / f"t{i}.json").write_text(json.dumps(doc))
        [path] = plots.main(["--sampler-table", str(tmp_path / f"t{i}.json"), "--out", str(tmp_path / f"img{i}")])
        assert path.name == "sampler_quality.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "none.json").write_text(json.dumps({"model": "m"}))
    with pytest.raises(SystemExit, match="no sampler table"):
        plots.main(["--sampler-table", str(tmp_path / "none.json")])


@pytest.mark.timeout(120)
def test_guidance_sweep_plot_from_evaluate_json(tmp_path):
    """A class-conditional model's `evaluate --json` output (its ``conditional.sweep``) and the
    ``guidance_sweep.json`` artifact (the list) both plot."""
    import json

    pytest.importorskip("matplotlib")

    def row(w):
        return {"guidance": w, "num": 500, "sec_per_sample": 0.01,
                "scores": {"cond_accuracy": 1 - 0.3 / (1 + w), "recall": 0.9 - w / 10, "class_spread": 1.1 - w / 8,
                           "precision": 0.8, "kid": 0.01},
                "se": {"cond_accuracy": 0.01, "recall": 0.02, "class_spread": 0.03, "precision": 0.02, "kid": 0.01}}

    rows = [row(w) for w in (0, 1, 1.5, 2, 3, 5)]
    plots = load_script()
    for i, doc in enumerate(({"conditional": {"sweep": rows}, "feature_net": {"test_accuracy": 0.97}}, rows)):
        (tmp_path / f"s{i}.json").write_text(json.dumps(doc))
        [path] = plots.main(["--guidance-sweep", str(tmp_path / f"s{i}.json"), "--out", str(tmp_path / f"img{i}")])
        assert path.name == "guidance_sweep.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.sweep_rows({"conditional": {"sweep": rows}, "feature_net": {"test_accuracy": 0.97}})[1] == 0.97
    (tmp_path / "uncond.json").write_text(json.dumps({"model": "m", "conditional": None}))
    with pytest.raises(SystemExit, match="no guidance sweep"):
        plots.main(["--guidance-sweep", str(tmp_path / "uncond.json")])


@pytest.mark.timeout(300)
def test_grids_of_models_side_by_side(tmp_path):
    """``--grids``: each model with its own sampler or the one its spec names; one PNG."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from tests.support import save_tiny_checkpoint

    a = save_tiny_checkpoint(tmp_path / "teacher.pt")
    b = save_tiny_checkpoint(tmp_path / "student.pt", seed=1, overrides=["sample.sampler=ddim", "sample.steps=2"])
    (path,) = load_script().main(["--grids", str(a), f"{a}#ddim:2@trailing", str(b), "--out", str(tmp_path / "img")])
    assert path.name == "grids.png"
    width, height = Image.open(path).size
    assert width > 2 * height  # three panels in a row
    with pytest.raises(SystemExit):
        load_script().main(["--grids", f"{a}#ddim", "--out", str(tmp_path / "img")])
