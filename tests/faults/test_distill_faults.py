"""Distillation faults on the shared simulated Ray cluster: a worker killed mid-round.

As training's (tests/faults/test_training_faults.py): Ray Train restarts the worker group from the
last checkpoint, which holds the round, its teacher and the loop's whole state, so the run ends bit
for bit where an uninterrupted one does, the next round's teacher included.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.support import TINY, TINY_NET, cli_json, mlflow_client, register_tiny, run_cli


def distill(tmp_path, teacher: str, name: str) -> dict:
    sets = [x for s in TINY if s.startswith("train.") for x in ("--set", s)]
    result = run_cli("distill", "--teacher", teacher, "--steps", "2", "--from-steps", "8", "--nodes", "2",
                     "--max-steps", "4", "--run-name", name, "--storage", str(tmp_path / "storage"), "--json", *sets)
    assert result.exit_code == 0, result.output
    return cli_json(result)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_resumes_mid_round_and_ends_bit_identical_to_an_uninterrupted_run(ray_cluster, tmp_path,
                                                                                      monkeypatch):
    from ddpm.checkpoint import load_checkpoint

    _, version, _ = register_tiny(tmp_path, "teach", overrides=TINY_NET)
    teacher = f"models:/teach/{version}"
    clean = distill(tmp_path, teacher, "clean")
    marker = tmp_path / "killed"
    # Rank 1 dies after round 1's step 3 (os._exit); step 2 is the last checkpoint: the group restarts there.
    monkeypatch.setenv("DDPM_FAULT_EXIT", f"1:3:{marker}")
    killed = distill(tmp_path, teacher, "killed")
    assert marker.exists()
    c = mlflow_client()
    rounds = c.search_runs([c.get_run(killed["run_id"]).info.experiment_id],
                           f"tags.`mlflow.parentRunId` = '{killed['run_id']}'")
    first = next(r for r in rounds if r.info.run_name == "killed-round1")
    assert [m.value for m in c.get_metric_history(first.info.run_id, "training details/resumed_from_step")] == [2]
    assert clean["metrics"]["step"] == killed["metrics"]["step"] == 8  # 4 steps in each of 2 rounds

    a, b = (load_checkpoint(os.path.join(out["checkpoint"], "checkpoint.pt")) for out in (clean, killed))
    assert a["distill"]["round"] == b["distill"]["round"] == 1
    assert a["distill"]["spent_s"] > 0 and b["distill"]["spent_s"] > 0  # round 1's seconds: a budget --in-all's
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), f"ema.{k} differs"
    for k, v in a["distill"]["teacher"].items():  # round 2's teacher: round 1's student, redone after the kill
        assert torch.equal(v, b["distill"]["teacher"][k]), f"teacher.{k} differs"
