"""pipelines.storage.ray_storage: Ray's storage takes its S3 endpoint from the same function as fsspec's options;
the processes a command starts get the same endpoint variables."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ddpm.data.storage import S3_ENDPOINT_VARS
from pipelines.storage.ray_storage import ray_storage


@pytest.fixture
def no_endpoint(monkeypatch):
    for name in S3_ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_local_paths_become_absolute(no_endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_storage("runs") == (str(tmp_path / "runs"), None)
    assert ray_storage(f"file://{tmp_path}/r") == (str(Path(tmp_path) / "r"), None)


def test_s3_without_an_endpoint_is_left_to_ray(no_endpoint):
    assert ray_storage("s3://bucket/runs/") == ("s3://bucket/runs/", None)


def test_s3_endpoint_variable_first_as_for_fsspec(no_endpoint):
    no_endpoint.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    no_endpoint.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9001")
    path, fs = ray_storage("s3://bucket/runs/")
    assert path == "bucket/runs" and fs.type_name == "s3"
    blob = pickle.dumps(fs)
    assert b"s3-only:9001" in blob and b"general:9000" not in blob


def test_started_processes_get_every_endpoint_variable(no_endpoint):
    from pipelines.sample.pool import worker_env
    from pipelines.workflow import job_env

    for name in S3_ENDPOINT_VARS:
        no_endpoint.setenv(name, f"http://{name.lower()}:9000")
    for env in (worker_env("/some/checkpoint.pt"), job_env(list(S3_ENDPOINT_VARS))):  # run --submit --env NAME
        assert {name: env.get(name) for name in S3_ENDPOINT_VARS} == {
            name: f"http://{name.lower()}:9000" for name in S3_ENDPOINT_VARS}
