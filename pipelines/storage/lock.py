"""``.ddpm-lock``: the one job writing a folder (or training a run name), on a local disk or an object store.

Taking a lock is one atomic step wherever it lives, never "check, remove, create":

- Local folders: ``fcntl.flock`` on the lock file, held for as long as the job runs. The file is
  created whole (written under a temporary name, then hard-linked to ``.ddpm-lock``, which fails if
  it exists), so no lock is ever seen empty. The kernel drops a flock when its process dies: a
  crashed job's lock is free at once, and taking it over is flock-ing that same file, which one
  process only can do. A record naming another host whose heartbeat is fresh is still respected
  (a shared file system that does not carry flocks between hosts).
- Object stores (S3, MinIO): conditional writes on the object's ETag. The lock is created with
  ``If-None-Match: *``; a stale one is replaced with ``If-Match: <its ETag>``, so of two jobs that
  found it stale one wins and the other is refused; each heartbeat is ``If-Match: <our ETag>`` and
  the release a delete ``If-Match: <our ETag>``, so a lock another job has taken is never rewritten
  nor deleted (the holder that lost it says so on stderr). Stale: its pid is gone on this host, or
  the store's last-modified time is older than ``STALE_S`` (an empty or unreadable lock too).
- Other remote file systems: checked, then written (best effort); the record's token is checked
  before each heartbeat and before the delete.

Every record carries a random ``token``: a holder only ever rewrites or removes a lock holding its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec.asyn
from fsspec import AbstractFileSystem

from ddpm.data.storage import is_local
from pipelines.errors import RefusedError
from pipelines.storage.outputs import LOCK, alive, missing_folders, remove_if_empty

HEARTBEAT_S = 30.0  # a lock holder rewrites its lock this often
STALE_S = 120.0  # a lock of another host not rewritten for this long is taken over
RETRY_S = 5.0  # a failed heartbeat is tried again this soon


def _parse(data: bytes) -> dict[str, Any]:
    """A lock record; ``{}`` for an empty or unreadable one."""
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


@dataclass
class _Seen:
    """A lock found held: its record and, on an object store, its ETag and age in seconds."""

    holder: dict[str, Any]
    etag: str | None = None
    age: float | None = None


class FolderLock:
    """``with FolderLock(fs, root, url, what):``: hold ``root/.ddpm-lock`` (see the module docstring).

    A live holder: :class:`RefusedError` (exit 3) naming it. While held, a thread rewrites the
    record every ``HEARTBEAT_S``. ``lost`` turns true when another job took the lock over.
    """

    def __init__(self, fs: AbstractFileSystem, root: str, url: str, what: str) -> None:
        self.fs, self.root, self.url, self.what = fs, root, url, what
        self.path = f"{root}/{LOCK}"
        self.token = uuid.uuid4().hex
        self.held = self.lost = False
        self.created: list[str] = []  # local folders this lock made, deepest first
        self._fd: int | None = None  # local: the open, flock-ed lock file
        self._etag: str | None = None  # object store: our record's ETag
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._s3 = not is_local(fs) and hasattr(fs, "call_s3")

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "since": self._since, "heartbeat": time.time(), "token": self.token}).encode()

    # -- local: flock ----------------------------------------------------------------------------
    def _take_local(self) -> _Seen | None:
        """Hold the lock (None), or return what holds it."""
        self.created = self.created or missing_folders(self.root)
        os.makedirs(self.root, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                if self._create_local():
                    return None
                continue  # made by another job between our two looks
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 65536, 0))
                os.close(fd)
                return _Seen(holder)
            if not self._same_file(fd):  # its holder removed it while we opened it
                os.close(fd)
                continue
            holder = _parse(os.pread(fd, 65536, 0))
            if self._fresh_elsewhere(holder, os.fstat(fd).st_mtime):
                os.close(fd)
                return _Seen(holder)
            self._fd = fd
            self._write_local(self._record())
            return None
        raise RefusedError(f"{self.url!r}: could not take {LOCK}; another job keeps taking it")

    def _create_local(self) -> bool:
        """Create the lock whole and flock-ed: a temporary file, then a hard link (fails if it exists)."""
        tmp = f"{self.root}/.{LOCK}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, self._record())
            os.fsync(fd)
            os.link(tmp, self.path)
        except FileExistsError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        self._fd = fd
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _write_local(self, data: bytes) -> None:
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    @staticmethod
    def _fresh_elsewhere(holder: dict[str, Any], mtime: float) -> bool:
        """A record of another host that beat recently (its heartbeat, else the file's time)."""
        host = holder.get("host")
        if not host or host == socket.gethostname():
            return False
        beat = holder.get("heartbeat")
        beat = beat if isinstance(beat, (int, float)) else mtime
        return time.time() - beat <= STALE_S

    # -- object stores: conditional writes -------------------------------------------------------
    def _s3_call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        bucket, key, _ = self.fs.split_path(self.path)
        return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    def _put(self, **condition: str) -> bool:
        """Write our record if ``condition`` holds (True), else False: the lock is another job's."""
        try:
            self._etag = self._s3_call("put_object", Body=self._record(), **condition)["ETag"]
            return True
        except FileExistsError:  # If-None-Match: an object is there
            return False
        except OSError as e:  # If-Match: another ETag (s3fs: EINVAL), or a conflicting write (409)
            if _lost_condition(e):
                return False
            raise

    def _get(self) -> _Seen | None:
        """The lock's record, ETag and age, from one GET (so the three belong to one version)."""
        bucket, key, _ = self.fs.split_path(self.path)

        async def get() -> tuple[bytes, dict[str, Any]]:
            got = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with got["Body"] as body:
                return await body.read(), got

        try:
            body, got = fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _Seen(_parse(body), got["ETag"], time.time() - got["LastModified"].timestamp())

    def _take_s3(self) -> _Seen | None:
        for _ in range(10):
            if self._put(IfNoneMatch="*"):
                return None
            seen = self._get()
            if seen is None:
                continue  # released between our two looks
            if not self._stale(seen):
                return seen
            if self._put(IfMatch=seen.etag):  # only one of the jobs that found it stale gets here
                return None
        raise RefusedError(f"{self.url!r}: could not take {LOCK}; another job keeps taking it")

    def _stale(self, seen: _Seen) -> bool:
        pid = seen.holder.get("pid")
        if seen.holder.get("host") == socket.gethostname() and isinstance(pid, int) and not alive(pid):
            return True
        if seen.age is not None:  # the store's own clock of the last write: an empty lock ages too
            return seen.age > STALE_S
        beat = seen.holder.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat > STALE_S

    # -- other file systems: best effort ---------------------------------------------------------
    def _take_other(self) -> _Seen | None:
        for _ in range(3):
            try:
                holder = _parse(self.fs.cat_file(self.path))
            except FileNotFoundError:
                self.fs.pipe_file(self.path, self._record())
                return None
            if not self._stale(_Seen(holder)):
                return _Seen(holder)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
        raise RefusedError(f"{self.url!r}: could not take {LOCK}; another job keeps taking it")

    def _ours_remote(self) -> bool:
        try:
            return _parse(self.fs.cat_file(self.path)).get("token") == self.token
        except FileNotFoundError:
            return False

    # -- holding ---------------------------------------------------------------------------------
    def __enter__(self) -> FolderLock:
        seen = self._take_local() if is_local(self.fs) else self._take_s3() if self._s3 else self._take_other()
        if seen is not None:
            h = seen.holder
            who = f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}" if h else "a job that left no record"
            raise RefusedError(f"{self.url!r} is being written by another {self.what} job ({who}); "
                               f"wait for it, or use another output or name (if that job is gone, "
                               f"delete {self.url.rstrip('/')}/{LOCK})")
        self.held = True
        self._beat = threading.Thread(target=self._heartbeat, name="ddpm-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _beat_once(self) -> bool:
        """Rewrite the record, only while it is ours; False when another job holds it now."""
        if self._fd is not None:
            self._write_local(self._record())
            return True
        if self._s3:
            return self._put(IfMatch=self._etag)
        if not self._ours_remote():
            return False
        self.fs.pipe_file(self.path, self._record())
        return True

    def _heartbeat(self) -> None:
        wait = HEARTBEAT_S
        while not self._stop.wait(wait):
            try:
                if not self._beat_once():
                    self.lost = True
                    print(f"warning: {self.url.rstrip('/')}/{LOCK} was taken over by another job; this "
                          f"{self.what} job no longer holds it", file=sys.stderr, flush=True)
                    return
                wait = HEARTBEAT_S
            except Exception:  # a missed beat only makes the lock look older: try again soon
                wait = min(RETRY_S, HEARTBEAT_S)

    def __exit__(self, *exc: object) -> None:
        """Release the lock if it is still ours; a folder the lock made and nothing filled is removed."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.held and not self.lost:
            with contextlib.suppress(FileNotFoundError):
                self._release()
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        self.held = False
        remove_if_empty(self.created)

    def _release(self) -> None:
        if self._fd is not None:
            if self._same_file(self._fd):
                os.unlink(self.path)  # while still flock-ed: a job that opened it finds it gone
        elif self._s3:
            try:
                self._s3_call("delete_object", IfMatch=self._etag)
            except OSError as e:
                if not _lost_condition(e):
                    raise
        elif self._ours_remote():
            self.fs.rm(self.path)


def _lost_condition(e: OSError) -> bool:
    """Whether an object store refused a conditional request: the ETag changed (412) or another
    conditional write raced ours (409)."""
    text = str(e)
    return e.errno == errno.EINVAL or "PreconditionFailed" in text or "ConditionalRequestConflict" in text


__all__ = ["HEARTBEAT_S", "LOCK", "STALE_S", "FolderLock"]
