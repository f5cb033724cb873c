"""Shared test set-up: small torch thread counts, one DDPM_HOME per session, shared servers.

Servers (moto S3, MLflow, a Ray cluster) are session fixtures in tests/fixtures/, started on
loopback on first use and stopped at the end of the session.
"""

from __future__ import annotations


import pytest
import torch

from tests.fixtures.s3 import *  # noqa: F401,F403
from tests.fixtures.ray_cluster import *  # noqa: F401,F403
from tests.fixtures.mlflow_server import *  # noqa: F401,F403

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own DDPM_HOME and local MLflow store unless it sets one."""
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "ddpm-home"))
    # MLflow's set_tracking_uri/set_registry_uri write these into os.environ; never carry them over.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
