"""Outputs at user paths: write only where everything is ours, one job at a time, and clean only our
own leftovers.

The rule every writing command follows (``sample``, ``data prepare``, ``interpolate``):

1. Decide ownership first, touching nothing: a folder is ours when every name in it is one this
   command writes (``is_ours``); a hidden temporary ``.{name}.tmp-{pid}-{hex}`` (left by
   :func:`ddpm.data.storage.atomic_write`) counts as ours only when ``name`` does. Anything else: refused,
   exit 3, the folder untouched. A single output file is ours when ``is_ours(bytes)`` says so.
2. One writer: :class:`FolderLock` creates ``.ddpm-lock`` (host, pid) exclusively; a second job into
   the same folder is refused (exit 3) while the first one's process is alive.
3. Only then remove leftovers: our temporaries whose process is provably gone (its pid is not alive
   on this host). A live process's temporary, or one from another host, is left alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from pipelines.errors import RefusedError

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]+$")  # atomic_write's temporary names
LOCK = ".ddpm-lock"


def listing(fs: Any, root: str, url: str) -> list[str]:
    """The names in the folder ``root`` ([] when it does not exist); a file there is an error."""
    from pipelines.errors import UsageError

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
        if name == LOCK or is_ours(m.group("name") if m else name):
            if m:
                temporaries.append(name)
        else:
            foreign.append(name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RefusedError(f"output {url!r} holds files that are not {what} ({shown}); "
                           "choose an empty or new folder")
    return temporaries


def refuse_foreign_file(fs: Any, path: str, url: str, is_ours: Callable[[bytes], bool], what: str) -> None:
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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(fs: Any, root: str, temporaries: list[str]) -> list[str]:
    """Remove those of ``temporaries`` whose writer is provably gone; return the names removed.

    Only on a local file system, where a pid means a process on this host; never this process's own.
    """
    from ddpm.data.storage import is_local

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
    """``.ddpm-lock`` in an output folder: the one job writing there (``with FolderLock(...):``).

    Local folders: created with ``O_CREAT | O_EXCL``, so two jobs cannot both take it; a lock whose
    process is gone (same host, pid not alive) is taken over. Object stores: checked, then written
    (best effort; their writers are usually one driver). A lock held by a live process, or by one on
    another host, is refused with exit 3 naming the holder and the lock file.
    """

    def __init__(self, fs: Any, root: str, url: str, what: str) -> None:
        self.fs, self.root, self.url, self.what = fs, root, url, what
        self.path = f"{root}/{LOCK}"
        self.held = self.created = False

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

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
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def __enter__(self) -> "FolderLock":
        from ddpm.data.storage import is_local

        for _ in range(3):
            if is_local(self.fs):
                self.created = self.created or not os.path.isdir(self.root)
                os.makedirs(self.root, exist_ok=True)
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "wb") as f:
                        f.write(self._record())
                    self.held = True
                    return self
            elif not self.fs.exists(self.path):
                self.fs.pipe_file(self.path, self._record())
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                continue  # released between our two looks
            if not self._stale(holder):
                who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                raise RefusedError(f"output {self.url!r} is being written by another {self.what} job ({who}); "
                                   f"wait for it, or use another --out (if that job is gone, delete "
                                   f"{self.url.rstrip('/')}/{LOCK})")
            try:
                self.fs.rm(self.path)  # its process is gone: take it over
            except FileNotFoundError:
                pass
        raise RefusedError(f"output {self.url!r}: could not take {LOCK}; another job keeps taking it")

    def __exit__(self, *exc: Any) -> None:
        """Release the lock; a folder the lock created and nothing else filled is removed again."""
        if self.held:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self.held = False
        if self.created:
            try:
                os.rmdir(self.root)  # only if empty
            except OSError:
                pass
