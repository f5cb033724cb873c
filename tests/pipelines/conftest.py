"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_home_template(tmp_path_factory):
    """Prepared digits shards and a trained feature net, made once and copied into each test's DDPM_HOME."""
    from ddpm.features import load_digits_feature_net
    from pipelines.storage.data import prepare_command

    root = tmp_path_factory.mktemp("digits-home")
    for split in ("train", "test"):
        prepare_command(source="digits", out=str(root / "data" / "digits" / split), split=split)
    load_digits_feature_net(root / "cache")
    return root


@pytest.fixture
def digits_home(digits_home_template):
    home = Path(os.environ["DDPM_HOME"])
    shutil.copytree(digits_home_template, home, dirs_exist_ok=True)
    return home

