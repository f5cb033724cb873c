"""Outputs at user paths: write only where everything is ours, one job at a time, and clean only our
own leftovers.

The rule every command that writes to a user path follows (``sample``, ``data prepare``,
``interpolate``; ``train`` takes the lock of step 2 for ``<storage>/<run-name>``):

1. Decide ownership first, touching nothing: a folder is ours when every name in it is one this
   command writes (``is_ours``); a hidden temporary ``.{name}.tmp-{pid}-{hex}`` (left by
   :func:`ddpm.data.storage.atomic_write`) counts as ours only when ``name`` does. Anything else: refused,
   exit 3, the folder untouched. A single output file is ours when ``is_ours(bytes)`` says so.
2. One writer: :class:`FolderLock` creates ``.ddpm-lock`` (host, pid, heartbeat) exclusively; a
   second job into the same folder is refused (exit 3) while the first one is alive: on this host,
   while its pid is; from another host, while its heartbeat (rewritten every ``HEARTBEAT_S``) is
   younger than ``STALE_S``. A dead job's lock is taken over, so a crash never blocks for good.
3. Only then remove leftovers: our temporaries whose process is provably gone (its pid is not alive
   on this host). A live process's temporary, or one from another host, is left alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fsspec import AbstractFileSystem

from ddpm.data.storage import atomic_write, is_local
from pipelines.errors import RefusedError, UsageError

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]+$")  # atomic_write's temporary names
LOCK = ".ddpm-lock"
HEARTBEAT_S = 30.0  # a lock holder rewrites its lock this often
STALE_S = 120.0  # a lock of another host not rewritten for this long is taken over


def listing(fs: AbstractFileSystem, root: str, url: str) -> list[str]:
    """The names in the folder ``root`` ([] when it does not exist); a file there is an error."""
    try:
        if not fs.isdir(root):
            if fs.exists(root):
                raise UsageError(f"output {url!r} is a file, not a folder")
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return []


def refuse_foreign(url: str, names: list[str], is_ours: Callable[[str], bool], what: str) -> list[str]:
    """Raise :class:`RefusedError` if any of ``names`` is not ours; return our temporaries.

    ``what`` completes "holds files that are not ..." (e.g. "samples of this tool").
    """
    foreign, temporaries = [], []
    for name in names:
        m = TEMP.match(name)
        target = m.group("name") if m else name
        if target == LOCK or is_ours(target):
            if m:
                temporaries.append(name)
        else:
            foreign.append(name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RefusedError(f"output {url!r} holds files that are not {what} ({shown}); "
                           "choose an empty or new folder")
    return temporaries


def refuse_foreign_file(fs: AbstractFileSystem, path: str, url: str, is_ours: Callable[[bytes], bool], what: str) -> None:
    """Raise :class:`RefusedError` if ``path`` exists and its bytes are not ours (``what``: "an image
    this tool wrote")."""
    try:
        if fs.isdir(path):
            raise RefusedError(f"output {url!r} is a folder, not {what}; choose a file name")
        data = fs.cat_file(path)
    except FileNotFoundError:
        return
    if not is_ours(data):
        raise RefusedError(f"output {url!r} exists and is not {what}; choose another --out or remove it")


def missing_folders(root: str) -> list[str]:
    """The local folders that making ``root`` would create, deepest first."""
    missing, folder = [], os.path.abspath(root)
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def remove_if_empty(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: undo what :func:`missing_folders` listed."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(fs: AbstractFileSystem, root: str, temporaries: list[str]) -> list[str]:
    """Remove those of ``temporaries`` whose writer is provably gone; return the names removed.

    Only on a local file system, where a pid means a process on this host; never this process's own.
    """
    if not is_local(fs):
        return []
    removed = []
    for name in temporaries:
        pid = int(TEMP.match(name).group("pid"))
        if pid != os.getpid() and not _alive(pid):
            try:
                fs.rm(f"{root}/{name}")
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


class FolderLock:
    """``.ddpm-lock`` in a folder: the one job writing there (``with FolderLock(...):``).

    Local folders: created with ``O_CREAT | O_EXCL``, so two jobs cannot both take it. Object stores:
    checked, then written (best effort). While held, a thread rewrites it every ``HEARTBEAT_S``.
    A lock is stale, and taken over, when its process is gone: on this host its pid is not alive;
    from another host its heartbeat is older than ``STALE_S``. A live holder: exit 3 naming it.
    """

    def __init__(self, fs: AbstractFileSystem, root: str, url: str, what: str) -> None:
        self.fs, self.root, self.url, self.what = fs, root, url, what
        self.path = f"{root}/{LOCK}"
        self.held = False
        self.created: list[str] = []  # local folders this lock made, deepest first
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "since": self._since, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.fs.cat_file(self.path))
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            return not _alive(pid)
        beat = holder.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat > STALE_S

    def _take(self) -> bool:
        if is_local(self.fs):
            self.created = self.created or missing_folders(self.root)
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, self._record())
        return True

    def __enter__(self) -> FolderLock:
        for _ in range(3):
            if self._take():
                self.held = True
                self._beat = threading.Thread(target=self._heartbeat, name="ddpm-lock-heartbeat", daemon=True)
                self._beat.start()
                return self
            holder = self._holder()
            if holder is None:
                continue  # released between our two looks
            if not self._stale(holder):
                who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                raise RefusedError(f"{self.url!r} is being written by another {self.what} job ({who}); "
                                   f"wait for it, or use another output or name (if that job is gone, "
                                   f"delete {self.url.rstrip('/')}/{LOCK})")
            try:
                self.fs.rm(self.path)  # its process is gone: take it over
            except FileNotFoundError:
                pass
        raise RefusedError(f"{self.url!r}: could not take {LOCK}; another job keeps taking it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                atomic_write(self.fs, self.path, self._record())
            except Exception:  # a missed beat only makes the lock look older to other hosts
                pass

    def __exit__(self, *exc: object) -> None:
        """Release the lock; a folder the lock created and nothing else filled is removed again."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.held:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self.held = False
        remove_if_empty(self.created)
