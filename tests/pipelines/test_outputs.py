"""pipelines/storage/outputs.py: whose files a folder holds, one writer per folder, which leftovers may go."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from pipelines.storage import lock as L
from pipelines.storage import outputs as O
from pipelines.errors import RefusedError


def local(path):
    from ddpm.data.storage import open_fs

    return open_fs(str(path))


def test_a_temporary_is_ours_only_when_its_target_is():
    ours = lambda name: name.endswith(".png")  # noqa: E731
    assert O.refuse_foreign("out", ["1.png", ".1.png.tmp-12-abcdef12", O.LOCK], ours, "x") == [".1.png.tmp-12-abcdef12"]
    with pytest.raises(RefusedError, match=r"not samples \(\.thesis\.tex\.tmp-4242-deadbeef\)"):
        O.refuse_foreign("out", ["1.png", ".thesis.tex.tmp-4242-deadbeef"], ours, "samples")


def test_second_lock_is_refused_while_the_first_is_held_and_free_after(tmp_path):
    fs, root = local(tmp_path / "a" / "b")
    with L.FolderLock(fs, root, "b", "sample"):
        holder = json.loads((tmp_path / "a" / "b" / O.LOCK).read_text())
        assert holder["pid"] == __import__("os").getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RefusedError, match="being written by another sample job"):
            with L.FolderLock(fs, root, "b", "sample"):
                pass
    assert not (tmp_path / "a").exists()  # the folders the lock made, empty again, are removed
    with L.FolderLock(fs, root, "b", "sample"):
        (tmp_path / "a" / "b" / "kept.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["kept.txt"]


@pytest.mark.parametrize("age,stale", [
    (10, False),  # another host, beating
    (3600, True),  # another host, silent
    (None, False),  # another host, no heartbeat: cannot be proven gone
])
def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path, age, stale):
    # The heartbeat's age is taken when the test runs, not when it is collected (a long session
    # would make a "beating" lock written at collection time look silent).
    holder = {"host": "elsewhere", "pid": 1, **({} if age is None else {"heartbeat": time.time() - age})}
    (tmp_path / O.LOCK).write_text(json.dumps(holder))
    fs, root = local(tmp_path)
    if stale:
        with L.FolderLock(fs, root, str(tmp_path), "train"):
            assert json.loads((tmp_path / O.LOCK).read_text())["host"] == socket.gethostname()
    else:
        with pytest.raises(RefusedError, match="on elsewhere"):
            with L.FolderLock(fs, root, str(tmp_path), "train"):
                pass
        assert json.loads((tmp_path / O.LOCK).read_text()) == holder  # untouched


def test_the_heartbeat_rewrites_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    fs, root = local(tmp_path)
    with L.FolderLock(fs, root, str(tmp_path), "train"):
        first = json.loads((tmp_path / O.LOCK).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / O.LOCK).read_text())["heartbeat"] > first
    assert not (tmp_path / O.LOCK).exists()


def test_only_temporaries_of_gone_processes_are_removed(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".a.png.tmp-{done.pid}-abcdef12", f".b.png.tmp-{live.pid}-abcdef12",
                 f".c.png.tmp-{__import__('os').getpid()}-abcdef12"]
        for name in names:
            (tmp_path / name).write_bytes(b"half")
        fs, root = local(tmp_path)
        assert O.remove_stale_temporaries(fs, root, names) == [names[0]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    finally:
        live.kill()
        live.wait()
