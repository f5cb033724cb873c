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
    run = c.get_run(run_id)
    (test_input,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "digits-test"]
    assert [t.value for t in test_input.tags] == ["evaluation"]
    linked = {m.key: m for m in c.get_logged_model(models.model_id_of(mv)).metrics}
    assert set(linked) == {f"eval/{m}" for m in primary}
    assert linked["eval/bpd"].value == primary["bpd"] and linked["eval/bpd"].dataset_name == "digits-test"
    tables = [a.path for a in c.list_artifacts(run_id, "evaluation") if a.path.split("/")[-1].startswith("results-")]
    assert len(tables) == 1 and tables[0].endswith(".md")
