"""pipelines/storage/run_folder.py: ``train``, ``distill`` and ``tune`` write only into a ``<storage>/<name>``
folder that is theirs (issue 25: "``--storage`` gets no ownership check")."""

from __future__ import annotations

import json

import pytest
from fsspec.implementations.local import LocalFileSystem
from typer.testing import CliRunner

from pipelines.errors import RefusedError
from pipelines.storage import run_folder as R
from pipelines.storage.outputs import LOCK


def _names(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_a_new_folder_is_marked_while_used_and_left_as_it_was_when_nothing_was_written(tmp_path):
    fs, root = LocalFileSystem(), str(tmp_path / "storage" / "run")
    with R.run_folder(fs, root, root, "train"):
        assert json.loads((tmp_path / "storage" / "run" / R.MARKER).read_text()) == {"kind": "train"}
    assert not (tmp_path / "storage").exists()  # the lock removes the folders it made, once empty


def test_a_folder_with_a_run_in_it_keeps_its_marker_and_is_taken_again(tmp_path):
    fs, root = LocalFileSystem(), str(tmp_path)
    with R.run_folder(fs, root, root, "distill"):
        (tmp_path / "checkpoint_00000100").mkdir()
    assert _names(tmp_path) == {R.MARKER, "checkpoint_00000100"}
    with R.run_folder(fs, root, root, "distill"):  # the same kind resumes
        pass


@pytest.mark.parametrize("names", [["notes.txt"], ["checkpoint_00000100", "holiday.jpg"], ["tuner.pkl"]])
def test_a_folder_holding_other_files_is_refused_untouched(tmp_path, names):
    for name in names:
        (tmp_path / name).write_text("someone else's")
    with pytest.raises(RefusedError, match="not a ddpm-pipe train run's"):
        with R.run_folder(LocalFileSystem(), str(tmp_path), str(tmp_path), "train"):
            pass
    assert _names(tmp_path) == set(names)  # no lock, no marker


@pytest.mark.parametrize("kind, other", [("train", "tune"), ("tune", "train"), ("distill", "train")])
def test_a_run_folder_of_another_kind_is_refused(tmp_path, kind, other):
    (tmp_path / R.MARKER).write_text(json.dumps({"kind": other}))
    with pytest.raises(RefusedError, match=f"is a {other} run's folder, not a {kind} run's"):
        with R.run_folder(LocalFileSystem(), str(tmp_path), str(tmp_path), kind):
            pass
    assert _names(tmp_path) == {R.MARKER}


def test_a_damaged_marker_is_refused(tmp_path):
    (tmp_path / R.MARKER).write_text("{not json")
    with pytest.raises(RefusedError, match="damaged run marker"):
        R.check_owner(LocalFileSystem(), str(tmp_path), str(tmp_path), "train")


@pytest.mark.parametrize("kind, names", [
    ("train", ["checkpoint_00000500", "checkpoint_00001000", "checkpoint_manager_snapshot.json",
               ".validate_storage_marker"]),
    ("tune", ["tuner.pkl", "experiment_state-2026-12-05_10-00-00.json", "trial_0"]),
])
def test_a_folder_written_before_the_marker_existed_is_still_ours(tmp_path, kind, names):
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / LOCK).write_text("")  # a crashed job's lock does not make it foreign
    with R.run_folder(LocalFileSystem(), str(tmp_path), str(tmp_path), kind):
        pass
    assert json.loads((tmp_path / R.MARKER).read_text()) == {"kind": kind}


def test_train_into_a_foreign_storage_folder_exits_3_before_any_run(digits_home, tmp_path):
    """The command, end to end: refused with the folder untouched, before Ray or MLflow start."""
    from pipelines.cli import app

    foreign = tmp_path / "shared" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("do not touch")
    result = CliRunner().invoke(app, ["train", "--storage", str(tmp_path / "shared"), "--run-name", "mine",
                                      "--max-steps", "1"])
    assert result.exit_code == 3, result.output
    assert "thesis.tex" in result.output and "--run-name" in result.output
    assert _names(foreign) == {"thesis.tex"}
    assert not (digits_home / "mlflow.db").exists()
