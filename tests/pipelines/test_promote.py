"""`ddpm-pipe promote`: the alias moves only when the candidate's keyed evaluation beats the holder's."""

from __future__ import annotations

import json

import pytest

from tests.support import FAST, cli_json, mlflow_client, register_tiny, run_cli

KEY = "kid/data:abc/eta:0/features:digits-cnn-v3/num:16/sampler:ddim/steps:5/vs:test-360"


def promote(*args: str):
    return run_cli("promote", "--json", *args)




def _bare_versions(name: str, n: int):
    """Registered versions without artifacts: promote reads only their tags."""
    c = mlflow_client()
    c.create_registered_model(name)
    for _ in range(n):
        c.create_model_version(name, source="s3://ddpm-tests/nowhere")
    return c


@pytest.mark.timeout(600)
def test_promotion_against_a_real_tracking_server(mlflow_server, monkeypatch, tmp_path, digits_home):
    from pipelines.registry.evaluate import evaluate_command

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    c = mlflow_client()
    assert c.tracking_uri == mlflow_server
    fd = {}  # the default promotion metric's values: KID against the held-out split
    for seed in (0, 1):
        _, version, _ = register_tiny(tmp_path, name="gated", seed=seed)
        out = evaluate_command(f"models:/gated/{version}", **FAST)
        fd[version] = out["scores"]["kid"]
    worse, better = sorted(fd, key=fd.get, reverse=True)
    assert fd[worse] > fd[better]

    # No holder yet: an evaluated version takes the alias.
    first = promote("--name", "gated", "--version", worse)
    assert first.exit_code == 0, first.output
    assert {k: str(v) for k, v in c.get_registered_model("gated").aliases.items()} == {"champion": worse}

    # The better one beats it under the same key.
    second = promote("--name", "gated", "--version", better)
    assert second.exit_code == 0, second.output
    assert str(c.get_model_version_by_alias("gated", "champion").version) == better
    tags = c.get_model_version("gated", better).tags
    assert tags["ddpm.promote.champion.decision"] == "promoted"
    assert tags["ddpm.promote.champion.holder_version"] == worse
    assert float(tags["ddpm.promote.champion.holder_value"]) == pytest.approx(fd[worse])
    assert float(tags["ddpm.promote.champion.candidate_value"]) == pytest.approx(fd[better])
    assert tags["ddpm.promote.champion.key"].startswith("kid/") and "sampler:ddim" in tags["ddpm.promote.champion.key"]
    assert any(k.startswith("ddpm.promote.champion.history.") for k in tags)
    assert c.get_model_version("gated", worse).tags["ddpm.promote.champion.replaced_by"] == better

    # The worse one is refused with exit 3, both numbers in the message, and the refusal recorded.
    third = promote("--name", "gated", "--version", worse)
    assert third.exit_code == 3, third.output
    assert f"{fd[worse]:.6g}" in third.output and f"{fd[better]:.6g}" in third.output
    assert str(c.get_model_version_by_alias("gated", "champion").version) == better
    assert c.get_model_version("gated", worse).tags["ddpm.promote.champion.decision"] == "refused"

    # --force overrides and records why.
    forced = promote("--name", "gated", "--version", worse, "--force", "--reason", "rollback drill")
    assert forced.exit_code == 0, forced.output
    assert cli_json(forced)["decision"] == "forced"
    tags = c.get_model_version("gated", worse).tags
    assert tags["ddpm.promote.champion.decision"] == "forced"
    assert tags["ddpm.promote.champion.reason"] == "rollback drill"
    assert str(c.get_model_version_by_alias("gated", "champion").version) == worse


@pytest.mark.timeout(60)
def test_min_delta_and_direction():
    c = _bare_versions("m", 3)
    c.set_model_version_tag("m", "1", f"ddpm.eval.{KEY}", "10.0")
    c.set_model_version_tag("m", "2", f"ddpm.eval.{KEY}", "9.5")
    c.set_model_version_tag("m", "3", f"ddpm.eval.{KEY.replace('kid/', 'recall/')}", "0.4")
    assert promote("--name", "m", "--version", "1").exit_code == 0
    refused = promote("--name", "m", "--version", "2", "--min-delta", "1")
    assert refused.exit_code == 3 and "9.5" in refused.output and "10" in refused.output
    assert "lower is better" in refused.output
    assert promote("--name", "m", "--version", "2", "--min-delta", "0.4").exit_code == 0
    assert str(c.get_registered_model("m").aliases["champion"]) == "2"
    # Higher-is-better metrics gate the other way, on their own alias.
    assert promote("--name", "m", "--version", "3", "--alias", "best-recall", "--metric", "recall").exit_code == 0


@pytest.mark.timeout(60)
def test_no_comparable_evaluation_is_refused():
    c = _bare_versions("n", 3)
    c.set_model_version_tag("n", "1", f"ddpm.eval.{KEY}", "10.0")
    c.set_model_version_tag("n", "2", f"ddpm.eval.{KEY.replace('num:16', 'num:64')}", "1.0")
    unevaluated = promote("--name", "n", "--version", "3")
    assert unevaluated.exit_code == 3 and "no evaluation of 'kid'" in unevaluated.output
    assert "champion" not in c.get_registered_model("n").aliases
    assert promote("--name", "n", "--version", "1").exit_code == 0
    other_key = promote("--name", "n", "--version", "2")  # evaluated on 64 samples, the holder on 16
    assert other_key.exit_code == 3 and "no comparable evaluation" in other_key.output
    assert c.get_model_version("n", "2").tags["ddpm.promote.champion.why"] == "no comparable evaluation"
    assert str(c.get_registered_model("n").aliases["champion"]) == "1"
    latest = promote("--name", "n")  # --version defaults to the latest (3, unevaluated)
    assert latest.exit_code == 3 and "version 3" in latest.output
    assert promote("--name", "n", "--metric", "nope").exit_code == 2
    assert promote("--name", "missing").exit_code == 2


@pytest.mark.timeout(60)
def test_a_student_is_gated_against_its_teacher_on_the_same_yardstick():
    """``--against``: another registered name (a distilled student's teacher), compared with the sampling
    settings left out of the key (the student's DDIM 4 on trailing against the teacher's 20-step solver)
    and the same data, features and sample count; a negative --min-delta is a tolerance."""
    teacher, student = _bare_versions("teacher", 1), _bare_versions("teacher-distilled", 2)
    solver = KEY.replace("sampler:ddim/steps:5", "sampler:dpmpp-2m-sde/steps:20")
    four = KEY.replace("sampler:ddim/steps:5", "sampler:ddim/spacing:trailing/steps:4")
    teacher.set_model_version_tag("teacher", "1", f"ddpm.eval.{solver}", "10.0")
    teacher.set_model_version_tag("teacher", "1", f"ddpm.eval.{solver.replace('num:16', 'num:64')}", "1.0")
    student.set_model_version_tag("teacher-distilled", "1", f"ddpm.eval.{four}", "10.4")
    student.set_model_version_tag("teacher-distilled", "2", f"ddpm.eval.{four.replace('num:16', 'num:8')}", "9.0")

    worse = promote("--name", "teacher-distilled", "--version", "1", "--against", "models:/teacher/1")
    assert worse.exit_code == 3 and "10.4 (ddim 4 steps, trailing)" in worse.output, worse.output
    assert "10 of models:/teacher/1 (dpmpp-2m-sde 20 steps)" in worse.output
    assert promote("--name", "teacher-distilled", "--version", "1", "--min-delta", "-0.1",
                   "--against", "models:/teacher/1").exit_code == 3  # worse by 0.4, tolerance 0.1
    ok = promote("--name", "teacher-distilled", "--version", "1", "--min-delta", "-0.5", "--against",
                 "models:/teacher/1")
    assert ok.exit_code == 0, ok.output
    tags = student.get_model_version("teacher-distilled", "1").tags
    assert tags["ddpm.promote.champion.against"] == "models:/teacher/1"
    assert tags["ddpm.promote.champion.against_key"] == solver  # the 16-sample one, not the 64
    assert str(student.get_registered_model("teacher-distilled").aliases["champion"]) == "1"
    other = promote("--name", "teacher-distilled", "--version", "2", "--against", "models:/teacher/1")
    assert other.exit_code == 3 and "no evaluation of 'kid' on the yardstick" in other.output  # 8 samples
    assert promote("--name", "teacher-distilled", "--against", "runs:/abc/model").exit_code == 2
    assert promote("--name", "teacher-distilled", "--against", "models:/nowhere/1").exit_code == 2
    assert promote("--name", "teacher-distilled", "--min-delta", "-0.1").exit_code == 2  # only with --against


def _other_job(*args: str):
    """``ddpm-pipe promote --json ARGS`` as a process of its own (same DDPM_HOME): the second job of a race."""
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("ddpm-pipe"))
    return subprocess.run([cli, "promote", "--json", *args], capture_output=True, text=True, timeout=120)


def _raced_versions(name: str):
    """Version 1 holds @champion (kid 10); versions 2 (kid 9) and 3 (kid 8) each beat it."""
    c = _bare_versions(name, 3)
    for v, value in (("1", "10.0"), ("2", "9.0"), ("3", "8.0")):
        c.set_model_version_tag(name, v, f"ddpm.eval.{KEY}", value)
    assert promote("--name", name, "--version", "1").exit_code == 0
    return c


@pytest.mark.timeout(180)
def test_a_promotion_whose_holder_moved_while_it_decided_is_refused(monkeypatch):
    """Job A reads holder 1 and passes its gate; before it moves the alias, job B (a real
    `ddpm-pipe promote` process) promotes version 3 from the same holder. A must not overwrite
    B's alias with version 2, never compared against 3 (issue 25, item 3)."""
    from pipelines.registry import promote as promote_module

    c = _raced_versions("raced")
    gate = promote_module._gate
    seen = []

    def gate_raced(*args, **kwargs):
        seen.append(_other_job("--name", "raced", "--version", "3"))
        return gate(*args, **kwargs)

    monkeypatch.setattr(promote_module, "_gate", gate_raced)
    a = promote("--name", "raced", "--version", "2")
    assert seen[0].returncode == 0, seen[0].stderr
    assert a.exit_code == 3, a.output
    assert "moved to version 3" in a.output
    assert str(c.get_registered_model("raced").aliases["champion"]) == "3"
    tags = c.get_model_version("raced", "2").tags
    assert tags["ddpm.promote.champion.decision"] == "refused"
    assert tags["ddpm.promote.champion.why"] == "raced another promotion"
    history = [json.loads(v)["decision"] for k, v in sorted(tags.items()) if ".history." in k]
    assert history == ["pending", "refused"]  # the decision was recorded before the alias was touched


@pytest.mark.timeout(180)
def test_two_promotions_from_one_holder_never_both_win(monkeypatch):
    """Both jobs pass their gate and their check of the holder; B (a real process) runs entirely
    while A is about to set the alias. B sees A's pending decision from the same holder, puts the
    alias back and is refused; A then promotes against the holder it compared with. On the old
    code both report "promoted" and the last write wins (issue 25, item 3)."""
    from mlflow.tracking import MlflowClient

    c = _raced_versions("twice")
    setter = MlflowClient.set_registered_model_alias
    seen = []

    def set_raced(self, name, alias, version):
        if name == "twice" and str(version) == "2" and not seen:
            seen.append(_other_job("--name", "twice", "--version", "3"))
        return setter(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_raced)
    a = promote("--name", "twice", "--version", "2")
    b = seen[0]
    assert b.returncode == 3, b.stdout + b.stderr
    assert "raced this one" in b.stderr and "version(s) 2" in b.stderr
    assert a.exit_code == 0, a.output
    assert str(c.get_registered_model("twice").aliases["champion"]) == "2"
    assert c.get_model_version("twice", "3").tags["ddpm.promote.champion.decision"] == "refused"
    assert c.get_model_version("twice", "2").tags["ddpm.promote.champion.decision"] == "promoted"
