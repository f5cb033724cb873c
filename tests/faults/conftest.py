"""Shared by the fault tests: the digits shards, prepared once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The digits training split in shards of 600 samples (written once per session)."""
    from pipelines.storage.data import prepare_command

    out = tmp_path_factory.mktemp("digits") / "train"
    prepare_command(source="digits", out=str(out), split="train", shard_size=600)
    return out
