"""Scratch folders in the system's temporary folder that a killed process does not leave behind for good.

A worker writes each checkpoint into a scratch folder before Ray copies it to the run's storage, and
keeps a scratch folder for its MLflow artifacts; the driver of ``run --submit`` ships its files from
one. Each is removed when its block ends, but a process that is killed (SIGKILL, the OOM killer, a
node lost mid-checkpoint) cannot: an 18 MB checkpoint a kill. So every scratch folder is named
``ddpm-<what>-<pid>-<random>``, and the first scratch folder a process makes removes those whose pid is
gone on this host (this user's only; a live pid's folder, or a reused pid's, is left alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator

from pipelines.storage.outputs import alive

NAME = re.compile(r"^ddpm-(?P<what>[a-z]+)-(?P<pid>[0-9]+)-")
_swept: set[str] = set()  # the temporary folders this process has already swept


def remove_stale(root: str | None = None) -> list[str]:
    """Remove the scratch folders under ``root`` (default: the system's temporary folder) whose
    process is gone; return their names."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        m = NAME.match(name)
        if not m or int(m.group("pid")) == os.getpid() or alive(int(m.group("pid"))):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def scratch_dir(what: str, root: str | None = None) -> str:
    """A new folder ``<root>/ddpm-<what>-<pid>-<random>`` (``what``: lower-case letters); the first call
    of a process for ``root`` removes the stale ones first."""
    if not what.isalpha() or not what.islower():
        raise ValueError(f"what must be lower-case letters, got {what!r}")
    root = root or tempfile.gettempdir()
    if root not in _swept:
        _swept.add(root)
        remove_stale(root)
    return tempfile.mkdtemp(prefix=f"ddpm-{what}-{os.getpid()}-", dir=root)


@contextlib.contextmanager
def scratch(what: str) -> Iterator[str]:
    """``with scratch("ckpt") as folder:``: a :func:`scratch_dir`, removed when the block ends."""
    folder = scratch_dir(what)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
