"""Object-store faults: transient errors are retried with backoff; permanent ones fail clearly and
leave nothing half-written. Errors are injected through a failing fsspec file system (``flaky://``)."""

from __future__ import annotations

import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.config import ExperimentConfig
from ddpm.data import retry
from ddpm.data.storage import atomic_write


class FlakyFS(MemoryFileSystem):
    """An in-memory object store whose calls fail as ``plan`` says: ``{"pipe_file": [err, err]}``
    raises those errors on the first calls, then works; a callable fails forever."""

    protocol = ("flaky",)
    plan: dict = {}
    calls: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("flaky://"):] if str(path).startswith("flaky://") else path
        return super()._strip_protocol(path)

    def _maybe_fail(self, op: str) -> None:
        FlakyFS.calls[op] = FlakyFS.calls.get(op, 0) + 1
        todo = FlakyFS.plan.get(op)
        if callable(todo):
            raise todo()
        if todo:
            raise todo.pop(0)

    def pipe_file(self, path, value, *args, **kwargs):
        self._maybe_fail("pipe_file")
        return super().pipe_file(path, value, *args, **kwargs)

    def mv(self, path1, path2, *args, **kwargs):
        self._maybe_fail("mv")
        return super().mv(path1, path2, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self._maybe_fail("cat_file")
        return super().cat_file(path, *args, **kwargs)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.fixture
def flaky(monkeypatch):
    """A fresh folder on the flaky store, no real sleeping (the pauses are recorded)."""
    FlakyFS.plan, FlakyFS.calls = {}, {}
    pauses: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", pauses.append)
    folder = f"/faults-{uuid.uuid4().hex[:8]}"
    yield FlakyFS(skip_instance_cache=True), folder, pauses
    FlakyFS.plan = {}


def _state() -> dict:
    cfg = ExperimentConfig.preset("digits")
    return {"config": cfg, "model": {"w": torch.arange(4.0)}, "step": 3}


def _listing(fs, folder: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)) if fs.exists(folder) else []


@pytest.mark.timeout(60)
def test_transient_write_errors_are_retried_with_backoff(flaky):
    fs, folder, pauses = flaky
    FlakyFS.plan = {"pipe_file": [ConnectionError("reset by peer"), TimeoutError("slow down")]}
    atomic_write(fs, f"{folder}/00000000.png", b"png")
    assert fs.cat_file(f"{folder}/00000000.png") == b"png"
    assert FlakyFS.calls["pipe_file"] == 3
    assert pauses == [0.5, 1.0]  # exponential backoff


@pytest.mark.timeout(60)
def test_transient_checkpoint_upload_and_commit_errors_are_retried(flaky):
    fs, folder, pauses = flaky
    FlakyFS.plan = {"pipe_file": [OSError("503 SlowDown")], "mv": [ConnectionError("dropped")]}
    save_checkpoint(f"flaky://{folder}/checkpoint.pt", _state())
    assert load_checkpoint(f"flaky://{folder}/checkpoint.pt")["step"] == 3
    assert _listing(fs, folder) == ["checkpoint.pt"]  # the temporary upload is gone
    assert len(pauses) == 2


@pytest.mark.timeout(60)
def test_transient_shard_read_errors_are_retried(tmp_path, flaky):
    from ddpm.data.reader import read_shard
    from ddpm.data.shards import build_tar
    from ddpm.image import png_bytes
    import hashlib
    import numpy as np

    fs, folder, pauses = flaky
    tar = build_tar([("0000000.png", png_bytes(np.zeros((4, 4, 1), np.uint8)))])
    fs.pipe_file(f"{folder}/train-000000.tar", tar)
    FlakyFS.calls = {}
    FlakyFS.plan = {"cat_file": [ConnectionError("reset")]}
    entry = {"name": "train-000000.tar", "num_samples": 1, "sha256": hashlib.sha256(tar).hexdigest()}
    assert read_shard(fs, folder, entry).keys == ["0000000"]
    assert FlakyFS.calls["cat_file"] == 2 and pauses == [0.5]


@pytest.mark.timeout(60)
def test_permanent_write_failure_is_a_clear_error_and_leaves_nothing(flaky, monkeypatch):
    fs, folder, pauses = flaky
    monkeypatch.setenv("DDPM_STORAGE_RETRIES", "3")
    FlakyFS.plan = {"pipe_file": lambda: ConnectionError("connection refused")}
    with pytest.raises(retry.StorageError, match=r"writing .*/00000001.png: failed after 3 attempts: "
                                                 r"ConnectionError: connection refused"):
        atomic_write(fs, f"{folder}/00000001.png", b"png")
    assert _listing(fs, folder) == []
    assert pauses == [0.5, 1.0]


@pytest.mark.timeout(60)
def test_permanent_checkpoint_commit_failure_leaves_no_partial_object(flaky, monkeypatch):
    fs, folder, _ = flaky
    monkeypatch.setenv("DDPM_STORAGE_RETRIES", "2")
    save_checkpoint(f"flaky://{folder}/checkpoint.pt", {**_state(), "step": 1})
    FlakyFS.plan = {"mv": lambda: OSError("service unavailable")}
    with pytest.raises(retry.StorageError, match="moving .*checkpoint.pt: failed after 2 attempts"):
        save_checkpoint(f"flaky://{folder}/checkpoint.pt", {**_state(), "step": 2})
    assert _listing(fs, folder) == ["checkpoint.pt"]  # no temporary upload left behind
    assert load_checkpoint(f"flaky://{folder}/checkpoint.pt")["step"] == 1  # the old one, whole


@pytest.mark.timeout(60)
def test_permission_errors_are_not_retried(flaky):
    fs, folder, pauses = flaky
    FlakyFS.plan = {"pipe_file": lambda: PermissionError("access denied")}
    with pytest.raises(PermissionError, match="access denied"):
        atomic_write(fs, f"{folder}/x.png", b"png")
    assert FlakyFS.calls["pipe_file"] == 1 and pauses == []


@pytest.mark.timeout(120)
def test_a_transient_error_reading_the_manifest_is_retried_then_a_failure_not_bad_data(flaky, digits_shards,
                                                                                       monkeypatch):
    """Issue 25 (exit codes): the manifest read before training is retried like every object-store
    read; a store still failing is exit 1 ("run the command again"), not exit 2 ("bad data")."""
    from pipelines.errors import PipelineError, UsageError
    from pipelines.storage.data import check_data

    fs, folder, pauses = flaky
    for f in digits_shards.iterdir():
        fs.pipe_file(f"{folder}/{f.name}", f.read_bytes())
    cfg = ExperimentConfig.preset("digits")
    FlakyFS.plan = {"cat_file": [ConnectionError("reset by peer")]}
    check_data(f"flaky://{folder}", cfg)  # one dropped request: retried, then the data checks out
    assert pauses == [0.5]
    monkeypatch.setenv("DDPM_STORAGE_RETRIES", "3")
    FlakyFS.plan = {"cat_file": lambda: ConnectionError("connection refused")}
    with pytest.raises(PipelineError, match=r"manifest.json: failed after 3 attempts.*run the command again") as info:
        check_data(f"flaky://{folder}", cfg)
    assert info.value.exit_code == 1 and not isinstance(info.value, UsageError)
    FlakyFS.plan = {}
    with pytest.raises(UsageError, match="no manifest.json"):  # missing data stays bad input (exit 2)
        check_data(f"flaky://{folder}/nothing-here", cfg)
