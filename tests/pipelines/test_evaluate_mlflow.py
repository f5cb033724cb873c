"""What `ddpm-pipe evaluate` leaves in MLflow's UI: the held-out data as a dataset, the scores as
metrics of the logged model, short version tags, the description's headline and a results table."""

from __future__ import annotations

import pytest

from tests.support import FAST, register_tiny


@pytest.mark.timeout(300)
def test_evaluation_of_a_version_shows_on_its_model_page(tmp_path, digits_home):
    from pipelines import tracking
    from pipelines.registry import models
    from pipelines.registry.evaluate import EVAL_TAG, evaluate_command

    run_id, version, _ = register_tiny(tmp_path)
    out = evaluate_command(f"models:/tiny/{version}", **FAST)
    c = tracking.client()
    mv = c.get_model_version("tiny", version)
    primary = {r["metric"]: r["value"] for r in out["results"] if r["key"] == mv.tags.get(f"ddpm.eval_last.{r['metric']}")}
    assert {"bpd", "fd"} <= set(primary)
    for metric, value in primary.items():
        assert mv.tags[f"eval.{metric}"] == f"{value:.6g}"  # short names beside the full keys
    assert any(t.startswith(EVAL_TAG) for t in mv.tags)  # promote's full keys stay
    assert "Latest evaluation (" in mv.description and f"bpd {primary['bpd']:.4g}" in mv.description
    assert out["run_id"] in mv.description  # the version page names the evaluation's run
    run = c.get_run(out["run_id"])  # the evaluation's own run (test_evaluate.py: beside the training run)
    (test_input,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "digits-test"]
    assert [t.value for t in test_input.tags] == ["evaluation"]
    linked = {m.key: m for m in c.get_logged_model(models.model_id_of(mv)).metrics}
    assert set(linked) == set(primary)  # the setting asked for, by its short names, on the model page
    assert linked["bpd"].value == primary["bpd"] and linked["bpd"].dataset_name == "digits-test"
    assert linked["bpd"].dataset_digest == test_input.dataset.digest and linked["bpd"].run_id == out["run_id"]
    tables = [a.path for a in c.list_artifacts(out["run_id"], "evaluation")
              if a.path.split("/")[-1].startswith("results-")]
    assert len(tables) == 1 and tables[0].endswith(".md")
    again = evaluate_command(f"models:/tiny/{version}", **FAST)  # a re-evaluation: the same run, a new point
    assert again["run_id"] == out["run_id"]
    assert [m.value for m in c.get_metric_history(out["run_id"], "bpd")] == [primary["bpd"]] * 2
