"""Shared test set-up: small torch thread counts, one DDPM_HOME per session, shared servers.

Servers (moto S3, MLflow, a Ray cluster) are session fixtures in tests/fixtures/, started on
loopback on first use and stopped at the end of the session.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

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
    stray = Path("mlruns")  # MLflow's default artifact root, relative to the working folder
    before = stray.exists()
    yield
    if not before and stray.exists():
        shutil.rmtree(stray, ignore_errors=True)
        pytest.fail("this test left MLflow artifacts in ./mlruns of the working folder: an experiment was "
                    "created without its DDPM_HOME artifact location", pytrace=False)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # a test that never imported Ray cannot have started it
    return ray is not None and ray.is_initialized()


@pytest.fixture
def local_ray():
    """For a test that runs a command which starts a local Ray instance: ended after the test (one
    that was running before, the shared cluster's connection, is left as it was)."""
    before = _ray_running()
    yield
    if not before and _ray_running():
        sys.modules["ray"].shutdown()


@pytest.fixture(autouse=True)
def _no_leaked_ray(request):
    """Fail the test that leaves Ray running where it found none, after ending that instance.

    A command run in-process (``train``, ``tune``) starts a local Ray instance and leaves it up, as a
    process that exits anyway may; in the test process that instance would outlive the test and
    make the next test's ``ray.init`` (the ``ray_cluster`` fixture's) fail, so whether the suite
    passed depended on the order of its tests. A test that needs Ray asks for ``ray_cluster`` (the
    one shared cluster) or ``local_ray`` (its own instance, ended after it).
    """
    before = _ray_running() or "ray_cluster" in request.fixturenames
    yield
    if not before and _ray_running():
        sys.modules["ray"].shutdown()
        pytest.fail("this test left Ray running: ask for the ray_cluster fixture (the shared cluster) "
                    "or local_ray (an instance ended after the test)", pytrace=False)
