"""A run's folder under ``--storage`` (``<storage>/<run name>``): whose it is, and one job at a time.

``train``, ``distill`` and ``tune`` write Ray's checkpoints and state into ``<storage>/<name>``, which
the user names. Before anything is written there (the lock included) the folder must be ours:

- missing or empty: ours;
- holding ``.ddpm-run`` (written on first use: ``{"kind": "train"}``, ``"distill"`` or ``"tune"``):
  ours when the kind is this command's, else refused (a sweep's folder is not a training run's);
- holding no marker (a folder written before the marker existed): ours only when every name in it is
  one Ray writes for this kind of run (``checkpoint_00001000``, ``checkpoint_manager_snapshot.json``
  ... for a training run; ``tuner.pkl`` beside Tune's state for a sweep);
- anything else: :class:`RefusedError` (exit 3) naming what is there, the folder untouched.

Then :class:`pipelines.storage.lock.FolderLock` makes the job the only writer, and the marker is
written (once) under the lock; a job that ends having written nothing else takes it away again.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

from fsspec import AbstractFileSystem

from pipelines.errors import RefusedError
from pipelines.storage.lock import FolderLock
from pipelines.storage.outputs import LOCK, TEMP, listing

MARKER = ".ddpm-run"
KINDS = ("train", "distill", "tune")
# What Ray Train writes into a run's folder (V2: one folder a checkpoint, the manager's snapshot).
RAY_TRAIN_NAMES = re.compile(r"^(checkpoint_\d+|checkpoint_manager_snapshot\.json|\.validate_storage_marker"
                             r"|checkpoint_tmp_[0-9a-f]+)$")


def _kind_of(fs: AbstractFileSystem, root: str) -> str | None:
    """The kind the folder's marker records (``None`` for a damaged marker)."""
    try:
        record = json.loads(fs.cat_file(f"{root}/{MARKER}"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if kind in KINDS else None


def _legacy_ours(names: list[str], kind: str) -> bool:
    """Whether a folder with no marker holds only what Ray writes for a run of ``kind``."""
    if kind == "tune":
        return "tuner.pkl" in names
    return all(RAY_TRAIN_NAMES.match(n) for n in names)


def check_owner(fs: AbstractFileSystem, root: str, url: str, kind: str) -> bool:
    """Raise :class:`RefusedError` unless ``root`` is ours for a run of ``kind`` (module docstring);
    touches nothing. Returns whether the marker still has to be written."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = [n for n in listing(fs, root, url) if n != LOCK and not TEMP.match(n)]
    if MARKER in names:
        owner = _kind_of(fs, root)
        if owner == kind:
            return False
        what = f"a {owner} run's" if owner else "a damaged run marker's"
        raise RefusedError(f"{url!r} is {what} folder, not a {kind} run's; choose another run name "
                           f"(--run-name / --name) or --storage")
    if names and not _legacy_ours(names, kind):
        foreign = [n for n in names if kind == "tune" or not RAY_TRAIN_NAMES.match(n)]
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RefusedError(f"{url!r} holds files that are not a ddpm-pipe {kind} run's ({shown}); "
                           f"choose another run name (--run-name / --name) or --storage")
    return True


@contextlib.contextmanager
def run_folder(fs: AbstractFileSystem, root: str, url: str, kind: str) -> Iterator[FolderLock]:
    """``with run_folder(fs, root, url, "train"):``: check the folder is ours, hold its lock, mark it."""
    unmarked = check_owner(fs, root, url, kind)
    with FolderLock(fs, root, url, kind) as lock:
        if unmarked:
            check_owner(fs, root, url, kind)  # again under the lock: another job may have marked it since
            fs.pipe_file(f"{root}/{MARKER}", json.dumps({"kind": kind}).encode())
        try:
            yield lock
        finally:  # a job that wrote nothing leaves nothing: the lock then removes the folders it made
            if unmarked and set(listing(fs, root, url)) <= {MARKER, LOCK}:
                fs.rm(f"{root}/{MARKER}")
