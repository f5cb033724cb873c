"""pipelines/storage/lock.py: a lock two jobs can never hold at once, on local disks (flock) and object
stores (conditional writes), that a crash never blocks for good, and that a holder never rewrites or
deletes once another job has it (issue 25, item 1).

The races run as real processes that start at the same instant over storage whose reads are slow
(a file system wrapper that sleeps in ``cat_file``): the window where "check, then remove, then
create" let two jobs both take a stale lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.errors import RefusedError
from pipelines.storage import lock as L
from tests.support import dead_pid

# One contender: waits for START, takes the lock over slow storage, holds it HOLD s, prints what happened.
CONTENDER = r"""
import asyncio, json, sys, time
import fsspec.core
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem
from pipelines.errors import RefusedError
from pipelines.storage.lock import FolderLock

url, start, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])

class Slow:
    def cat_file(self, *a, **k):
        data = super().cat_file(*a, **k)
        time.sleep(0.5)  # a slow store: the old take-over read, decided, then acted on what it read
        return data

class SlowS3(S3FileSystem):
    async def _cat_file(self, *a, **k):
        data = await super()._cat_file(*a, **k)
        await asyncio.sleep(0.5)
        return data

if url.startswith("s3://"):
    fs = SlowS3(skip_instance_cache=True)
    root = url[len("s3://"):]
else:
    fs, root = type("SlowLocal", (Slow, LocalFileSystem), {})(), url
time.sleep(max(0.0, start - time.time()))
try:
    with FolderLock(fs, root, url, "sample"):
        t0 = time.time()
        time.sleep(hold)
        print(json.dumps({"held": [t0, time.time()]}))
except RefusedError as e:
    print(json.dumps({"refused": str(e)}))
"""


def _race(url: str, n: int = 2, hold: float = 2.0) -> list[dict]:
    start = time.time() + 8.0  # every contender has imported s3fs and the lock by then; one every 0.25 s
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, url, str(start + 0.25 * i), str(hold)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def _assert_one_holder(outs: list[dict]) -> None:
    held = sorted(o["held"] for o in outs if "held" in o)
    assert held, outs
    for (a0, a1), (b0, b1) in zip(held, held[1:]):
        assert b0 >= a1, f"two jobs held the lock at once: {outs}"
    assert any("refused" in o for o in outs), outs


def _stale_record() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "what": "sample",
                       "since": "2020-01-01T00:00:00Z", "heartbeat": time.time() - 3600}).encode()


@pytest.mark.timeout(180)
def test_two_jobs_taking_over_one_stale_local_lock_never_both_hold_it(tmp_path):
    (tmp_path / L.LOCK).write_bytes(_stale_record())
    _assert_one_holder(_race(str(tmp_path), n=3))


@pytest.mark.timeout(180)
def test_two_jobs_taking_over_one_stale_s3_lock_never_both_hold_it(s3_prefix):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{s3_prefix[5:]}/{L.LOCK}", _stale_record())
    _assert_one_holder(_race(s3_prefix, n=3))


def _local(path: Path):
    from ddpm.data.storage import open_fs

    return open_fs(str(path))


def test_an_empty_local_lock_left_by_a_crash_is_taken(tmp_path):
    (tmp_path / L.LOCK).write_bytes(b"")  # a crash between create and write, of an older version
    fs, root = _local(tmp_path)
    with L.FolderLock(fs, root, str(tmp_path), "sample"):
        assert json.loads((tmp_path / L.LOCK).read_text())["pid"] == os.getpid()


def test_a_live_local_holder_is_refused_even_from_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom ddpm.data.storage import open_fs\nfrom pipelines.storage.lock import FolderLock\n"
        f"fs, root = open_fs({str(tmp_path)!r})\nwith FolderLock(fs, root, 'x', 'train'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fs, root = _local(tmp_path)
        with pytest.raises(RefusedError, match=f"pid {holder.pid} on"):
            with L.FolderLock(fs, root, str(tmp_path), "train"):
                pass
        holder.kill()  # SIGKILL: no release; the kernel drops the flock
        holder.wait()
        with L.FolderLock(fs, root, str(tmp_path), "train"):  # a dead holder's lock: taken at once
            assert json.loads((tmp_path / L.LOCK).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_an_empty_s3_lock_ages_like_any_other(s3_prefix, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = s3_prefix[5:]
    fs.pipe_file(f"{root}/{L.LOCK}", b"")
    with pytest.raises(RefusedError, match="a job that left no record"):
        with L.FolderLock(fs, root, s3_prefix, "sample"):
            pass
    monkeypatch.setattr(L, "STALE_S", 1.0)
    time.sleep(2.5)  # the store's last-modified time, not the record, says how old it is
    with L.FolderLock(fs, root, s3_prefix, "sample"):
        assert json.loads(fs.cat_file(f"{root}/{L.LOCK}"))["pid"] == os.getpid()
    assert not fs.exists(f"{root}/{L.LOCK}")


def test_an_s3_lock_taken_over_is_neither_rewritten_nor_deleted_by_its_old_holder(s3_prefix, monkeypatch):
    import s3fs

    monkeypatch.setattr(L, "HEARTBEAT_S", 0.2)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = s3_prefix[5:]
    other = json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs"}).encode()
    lock = L.FolderLock(fs, root, s3_prefix, "train")
    with lock:
        fs.pipe_file(f"{root}/{L.LOCK}", other)  # another job took it over (our beats had failed)
        deadline = time.time() + 20
        while not lock.lost and time.time() < deadline:
            time.sleep(0.1)
        assert lock.lost
    assert fs.cat_file(f"{root}/{L.LOCK}") == other  # not rewritten, not deleted
