"""Names users give (runs, sweeps, workflows, experiments, registered models): one rule, checked
before anything is written, and MLflow filters that quote their values (issue 17, item 8)."""

from __future__ import annotations

import pytest

from tests.support import run_cli
from pipelines.errors import UsageError
from pipelines.names import ALLOWED, check_name


@pytest.mark.parametrize("name", ["digits", "run-1", "a.b_c", "A" * 128])
def test_valid_names_pass(name):
    assert check_name(name, "--name") == name


@pytest.mark.parametrize("name", ["../../x", "a/b", "it's", 'say"hi"', "x y", "", ".hidden", "..", "-x",
                                  "A" * 129, "tab\tname"])
def test_invalid_names_fail_naming_the_option_and_the_rule(name):
    with pytest.raises(UsageError) as e:
        check_name(name, "--run-name")
    assert str(e.value) == f"--run-name {name!r} is not a valid name: use {ALLOWED}"


@pytest.mark.parametrize("args, option", [
    (["run", "--name", "../../x"], "--name"),
    (["run", "--name", "it's"], "--name"),
    (["train", "--run-name", "it's"], "--run-name"),
    (["train", "--run-name", "../x"], "--run-name"),
    (["train", "--experiment", "a/b"], "--experiment"),
    (["train", "--set", "train.registered_model=it's"], "train.registered_model"),
    (["tune", "--name", "../../x"], "--name"),
    (["tune", "--experiment", "it's"], "--experiment"),
    (["promote", "--name", "it's"], "--name"),
    (["import-diffusers", "--path", "nowhere", "--name", "../m"], "--name"),
])
def test_every_command_refuses_a_bad_name_with_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, option):
    home = tmp_path / "home" / "ddpm"
    monkeypatch.setenv("DDPM_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert f"error: {option} " in result.output and "is not a valid name: use letters, digits" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "home" / "x").exists()  # ../../x, ../x
    assert not home.exists()  # refused before DDPM_HOME, the MLflow store or Ray were touched


def test_run_name_with_a_quote_is_found_by_a_quoted_filter():
    """A tag value holding ``'`` (written by another tool) is still found: filters quote values."""
    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    exp_id = tracking.experiment_id("quotes")
    for name in ("it's", 'say "hi"'):
        run_id, resumed = tracking.start_or_resume_run(exp_id, name)
        assert not resumed
        assert tracking.find_run(exp_id, name).info.run_id == run_id
        assert tracking.start_or_resume_run(exp_id, name) == (run_id, True)
    with pytest.raises(UsageError, match="both kinds of quote"):
        tracking.find_run(exp_id, "it's \"both\"")
