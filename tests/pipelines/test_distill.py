"""`ddpm-pipe distill`: its rounds and grids, bad input (exit 2 before any Ray job), and a tiny
distillation on the shared simulated Ray cluster that registers a student sampled on its own grid."""

from __future__ import annotations

import json

import pytest
import torch

from ddpm.config import ExperimentConfig
from ddpm.diffusion import Diffusion
from ddpm.distill import student_timesteps
from ddpm.pipeline import DDPMPipeline
from ddpm.samplers import make_sampler
from pipelines.distill.command import DISTILL_LR
from pipelines.distill.schedule import first_grid, from_steps, grid_spacing, plan_rounds, round_grid, student_config
from pipelines.errors import UsageError
from tests.support import TINY, TINY_NET, cli_json, mlflow_client, register_tiny, run_cli, save_tiny_checkpoint


# -- rounds and grids ----------------------------------------------------------------------------------
def test_from_steps_defaults_to_the_teachers_own_steps_rounded_up_to_a_power_of_two_at_most_t():
    digits = ExperimentConfig.preset("digits")  # dpmpp-2m-sde, 20 steps, T = 1000
    assert from_steps(digits, None) == 32
    assert from_steps(digits.with_values({"sample.steps": 64}), None) == 64
    assert from_steps(digits.with_values({"sample.sampler": "ddpm", "sample.steps": None}), None) == 512  # T = 1000
    assert from_steps(digits, 48) == 48  # given: as given
    with pytest.raises(UsageError, match="above the teacher's T = 1000"):
        from_steps(digits, 2048)


def test_rounds_halve_from_k_to_n_and_refuse_what_cannot_be_reached():
    assert [(r.teacher_steps, r.student_steps) for r in plan_rounds(32, 4, 1000)] == [(32, 16), (16, 8), (8, 4)]
    assert [r.index for r in plan_rounds(48, 12, 1000)] == [0, 1]
    with pytest.raises(UsageError, match="valid: 16, 8, 4, 2, 1"):
        plan_rounds(32, 6, 1000)
    with pytest.raises(UsageError, match="below the teacher's 32"):
        plan_rounds(32, 32, 1000)
    with pytest.raises(UsageError, match="cannot be halved"):
        plan_rounds(33, 11, 1000)


@pytest.mark.parametrize(("T", "K", "N", "spacing"), [(1000, 32, 4, "cosine"), (1000, 64, 8, "cosine"),
                                                     (1000, 48, 3, "cosine"), (1000, 512, 4, "trailing"),
                                                     (100, 16, 2, "cosine"), (50, 32, 1, "trailing")])
def test_the_students_config_samples_exactly_the_grid_it_was_distilled_for(T, K, N, spacing):
    """DDIM with the student config's sample section calls the model at exactly
    ``student_timesteps(first grid, N)``, and each round's teacher grid is the previous student's.
    The grid is cosine where its halvings nest, else trailing (cosine timesteps meet near t = 0 at
    K = 512 of T = 1000, and at 32 of T = 50)."""
    abar = Diffusion.from_config(ExperimentConfig.preset("digits").with_values({"diffusion.timesteps": T}).diffusion).alphas_cumprod
    assert grid_spacing(abar, K, N) == spacing
    cfg = student_config(ExperimentConfig.preset("digits").with_values({"diffusion.timesteps": T}), N, "s", spacing)
    pipe = DDPMPipeline.from_config(torch.nn.Identity(), cfg)
    assert (pipe.sampler, pipe.steps, pipe.eta, pipe.spacing) == ("ddim", N, 0.0, spacing)
    diffusion = Diffusion.from_config(cfg.diffusion)
    ts = make_sampler(diffusion, pipe.sampler, pipe.steps, pipe.eta, pipe.spacing).timesteps
    first = first_grid(abar, K, spacing)
    assert ts == student_timesteps(first, N)
    rounds = plan_rounds(K, N, T)
    for a, b in zip(rounds, rounds[1:]):
        assert round_grid(first, b) == student_timesteps(round_grid(first, a))
    assert student_timesteps(round_grid(first, rounds[-1])) == ts


# -- bad input: exit 2, one line, no Ray -----------------------------------------------------------------
@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached Ray")

    monkeypatch.setattr("pipelines.cluster.connect", refuse)


def _bad(*args: str) -> str:
    result = run_cli("distill", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.timeout(120)
def test_a_teacher_uri_that_does_not_resolve_exits_2(tmp_path, no_ray):
    assert "does not exist" in _bad("--teacher", str(tmp_path / "nothing.pt"), "--steps", "4")
    assert "does not exist" in _bad("--teacher", "models:/nobody/1", "--steps", "4")


@pytest.mark.timeout(120)
def test_a_teacher_of_another_prediction_or_not_of_this_project_exits_2(tmp_path, no_ray):
    x0 = save_tiny_checkpoint(tmp_path / "x0.pt", overrides=[*TINY_NET, "diffusion.prediction=x0"])
    assert "needs an eps, v or edm model" in _bad("--teacher", str(x0), "--steps", "4")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    assert "cannot be read" in _bad("--teacher", str(junk), "--steps", "4")


@pytest.mark.timeout(120)
def test_steps_that_are_not_a_halving_of_the_starting_steps_exit_2(tmp_path, no_ray):
    teacher = str(save_tiny_checkpoint(tmp_path / "t.pt", overrides=TINY_NET))  # T = 50, 20 dpmpp steps: K = 32
    assert "valid: 16, 8, 4, 2, 1" in _bad("--teacher", teacher, "--steps", "5")
    assert "below the teacher's 32" in _bad("--teacher", teacher, "--steps", "32")
    assert "below the teacher's 8" in _bad("--teacher", teacher, "--steps", "8", "--from-steps", "8")
    assert "above the teacher's T = 50" in _bad("--teacher", teacher, "--steps", "8", "--from-steps", "64")
    assert "may set only train.*, data.*" in _bad("--teacher", teacher, "--steps", "8", "--set", "model.ch=16")
    x0 = run_cli("distill", "--teacher", teacher, "--steps", "8", "--prediction", "x0")  # Typer's own check
    assert x0.exit_code == 2 and "--prediction': 'x0'; valid: eps, v, edm" in x0.output


def test_a_budget_in_all_is_shared_out_evenly_and_what_a_round_leaves_goes_to_the_next():
    from pipelines.distill.schedule import MIN_ROUND_S, round_budget
    from pipelines.train.loop import NO_STEP_LIMIT

    assert [round_budget(4000, None, 4, i)[0] for i in range(4)] == [1000] * 4
    steps = [round_budget(10, None, 4, i)[0] for i in range(4)]
    assert steps == [2, 2, 3, 3] and sum(steps) == 10  # the later rounds take the remainder
    assert round_budget(NO_STEP_LIMIT, 600.0, 4, 0) == (NO_STEP_LIMIT, 150.0)
    # round 1 stopped at its steps after 90 s: the 510 s left are shared by the 3 rounds still to run
    assert round_budget(NO_STEP_LIMIT, 600.0, 4, 1, spent_s=90.0) == (NO_STEP_LIMIT, 170.0)
    assert round_budget(100, 600.0, 4, 3, spent_s=700.0) == (25, MIN_ROUND_S)  # overspent: one step
    assert round_budget(100, None, 4, 3, spent_s=700.0) == (25, None)  # no time budget: none given


@pytest.mark.timeout(120)
def test_a_budget_in_all_below_one_step_a_round_exits_2(tmp_path, no_ray):
    teacher = str(save_tiny_checkpoint(tmp_path / "t.pt", overrides=TINY_NET))
    assert "2 training steps cannot be shared among 3 rounds" in _bad(
        "--teacher", teacher, "--steps", "2", "--from-steps", "16", "--max-steps", "2", "--in-all")


# -- a tiny distillation on the cluster ----------------------------------------------------------------
def distill_args(tmp_path, teacher: str, *extra: str, steps: int = 2, per_round: int = 3, name: str = "d1") -> list[str]:
    sets = [x for s in TINY if s.startswith("train.") for x in ("--set", s)]
    return ["distill", "--teacher", teacher, "--steps", str(steps), "--from-steps", "8", "--nodes", "2",
            "--max-steps", str(per_round), "--run-name", name, "--storage", str(tmp_path / "storage"),
            "--json", *sets, *extra]  # the data: the teacher's own (digits, prepared on first use)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_distill_registers_a_student_that_samples_in_its_own_steps(ray_cluster, tmp_path):
    _, version, _ = register_tiny(tmp_path, "teach", overrides=TINY_NET)
    # an eps teacher, a v student (the paper's choice): round 1 reads the teacher as eps, round 2 as v
    # 7 steps for both rounds (--in-all): 3 and 4 (tests/faults/test_distill_faults.py runs per round)
    result = run_cli(*distill_args(tmp_path, f"models:/teach/{version}", "--prediction", "v", "--in-all", per_round=7))
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["model_uri"] == "models:/teach-distilled/1"
    assert out["rounds"] == [[8, 4], [4, 2]] and out["metrics"]["step"] == 7
    assert "in 2 round(s), 7 steps in all" in result.stderr
    assert "[distill round 1/2: 8 -> 4 steps] step 3/3" in result.stderr
    assert "[distill round 2/2: 4 -> 2 steps] step 4/4" in result.stderr

    c = mlflow_client()
    tags = c.get_model_version("teach-distilled", "1").tags
    assert tags["ddpm.teacher"] == f"models:/teach/{version}"
    assert tags["ddpm.distill.rounds"] == "8->4,4->2" and tags["ddpm.distill.steps"] == "2"
    assert tags["ddpm.distill.prediction"] == "v"
    run = c.get_run(out["run_id"])
    assert run.data.tags["ddpm.kind"] == "distill" and run.info.status == "FINISHED"
    children = c.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{out['run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["d1-round1", "d1-round2"]
    assert all(r.info.status == "FINISHED" and "training/loss" in r.data.metrics for r in children)

    from pipelines.registry.models import read_config

    student = read_config("models:/teach-distilled/1")
    assert student.diffusion.prediction == "v"
    assert student.train.lr == DISTILL_LR  # not the teacher's from-scratch rate
    sample = student.sample
    assert (sample.sampler, sample.steps, sample.eta, sample.spacing) == ("ddim", 2, 0.0, "cosine")  # nests on T = 50 from 8
    assert tags["ddpm.distill.spacing"] == "cosine"
    result = run_cli("sample", "--model", "models:/teach-distilled/1", "--num", "2", "--out",
                     str(tmp_path / "samples"), "--json")
    assert result.exit_code == 0, result.output
    done = cli_json(result)
    with open(done["manifest"]) as f:
        manifest = json.load(f)
    assert (manifest["sampler"], manifest["steps"], done["steps"]) == ("ddim", 2, 2), manifest
