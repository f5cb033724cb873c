"""pipelines/storage/scratch.py: a killed process's scratch folders are removed by the next process that
makes one (issue 25: "temp folders of killed workers are left in /tmp")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from pipelines.storage import scratch as S
from tests.support import dead_pid

KILLED = r"""
import os, signal, sys
from pipelines.storage.scratch import scratch
with scratch("ckpt") as folder:  # tempfile.gettempdir() is $TMPDIR
    open(os.path.join(folder, "checkpoint.pt"), "wb").write(b"x" * 1000)
    print(folder, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-checkpoint: no finally runs
"""


def test_a_killed_process_leaves_its_scratch_folder_and_the_next_one_removes_it(tmp_path, monkeypatch):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", KILLED], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    left = run.stdout.strip()
    assert os.path.isdir(left) and os.path.dirname(left) == str(tmp_path)
    monkeypatch.setattr(S, "_swept", set())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process's temporary folder: the same
    with S.scratch("ckpt") as mine:
        assert not os.path.exists(left)  # the dead process's folder is gone
        assert os.path.isdir(mine)
    assert not os.path.exists(mine)


def test_only_scratch_folders_of_gone_processes_are_removed(tmp_path):
    gone = tmp_path / f"ddpm-ckpt-{dead_pid()}-abc"
    live = tmp_path / f"ddpm-ckpt-{os.getppid()}-abc"  # our parent: alive
    own = tmp_path / f"ddpm-artifacts-{os.getpid()}-abc"
    other = tmp_path / f"pytest-{dead_pid()}-abc"  # not a scratch name
    file = tmp_path / f"ddpm-ckpt-{dead_pid()}-file"  # a file, not a folder
    for folder in (gone, live, own, other):
        folder.mkdir()
    file.write_text("x")
    assert S.remove_stale(str(tmp_path)) == [gone.name]
    assert not gone.exists() and live.exists() and own.exists() and other.exists() and file.exists()


def test_scratch_names_carry_the_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_swept", set())
    folder = S.scratch_dir("model", root=str(tmp_path))
    assert os.path.basename(folder).startswith(f"ddpm-model-{os.getpid()}-")
    with pytest.raises(ValueError, match="lower-case letters"):
        S.scratch_dir("ckpt-1", root=str(tmp_path))
