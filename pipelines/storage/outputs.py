"""Outputs at user paths: write only where everything is ours, one job at a time, and clean only our
own leftovers.

The rule every command that writes to a user path follows (``sample``, ``data prepare``,
``interpolate``; ``train`` takes the lock of step 2 for ``<storage>/<run-name>``):

1. Decide ownership first, touching nothing: a folder is ours when every name in it is one this
   command writes (``is_ours``); a hidden temporary ``.{name}.tmp-{pid}-{hex}`` (left by
   :func:`ddpm.data.storage.atomic_write`) counts as ours only when ``name`` does. Anything else: refused,
   exit 3, the folder untouched. A single output file is ours when ``is_ours(bytes)`` says so.
2. One writer: :class:`pipelines.storage.lock.FolderLock` holds ``.ddpm-lock`` (a flock on local
   disks, conditional writes on object stores); a second job into the same folder is refused
   (exit 3) while the first one is alive. A dead job's lock is taken over, so a crash never blocks
   for good.
3. Only then remove leftovers: our temporaries whose process is provably gone (its pid is not alive
   on this host). A live process's temporary, or one from another host, is left alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from fsspec import AbstractFileSystem

from ddpm.data.storage import is_local
from pipelines.errors import RefusedError, UsageError

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]+$")  # atomic_write's temporary names
LOCK = ".ddpm-lock"


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


def alive(pid: int) -> bool:
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
        if pid != os.getpid() and not alive(pid):
            try:
                fs.rm(f"{root}/{name}")
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
