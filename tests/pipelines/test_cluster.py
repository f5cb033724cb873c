"""Worker runtime environment: what every Ray worker of a job gets (no Ray needed)."""

from __future__ import annotations

import pytest

from pipelines.cluster import Placement, worker_env


@pytest.mark.timeout(60)
def test_worker_env_carries_ddpm_settings_threads_and_plain_print(monkeypatch):
    monkeypatch.setenv("DDPM_STORAGE_RETRIES", "7")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = worker_env(Placement(workers=2, use_gpu=False, strategy="PACK", cpus_per_worker=1.0,
                               threads_per_worker=3))["env_vars"]
    assert env["DDPM_STORAGE_RETRIES"] == "7" and "UNRELATED_SECRET" not in env
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["DDPM_TORCH_THREADS"] == "3"
    # Ray Train's print patch made every worker line appear twice on the console.
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


@pytest.mark.timeout(60)
def test_workers_get_the_drivers_home_only_as_a_fallback_for_a_node_without_its_own(monkeypatch, tmp_path):
    """Issue 25, item 10: the driver's DDPM_HOME is a folder of its machine. Workers (train's, the
    sampling pool's) get it as DDPM_DRIVER_HOME, never as DDPM_HOME: a node started with its own
    DDPM_HOME keeps it; a node without one (a cluster on one machine) uses the driver's."""
    from pipelines.sample.pool import worker_env as pool_env
    from pipelines.settings import DRIVER_HOME_ENV, resolve

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "driver"))
    placement = Placement(workers=2, use_gpu=False, strategy="PACK", cpus_per_worker=1.0, threads_per_worker=1)
    for env in (worker_env(placement)["env_vars"], pool_env("models:/m/1")):
        assert "DDPM_HOME" not in env and env[DRIVER_HOME_ENV] == str(tmp_path / "driver")
    monkeypatch.setenv(DRIVER_HOME_ENV, str(tmp_path / "driver"))  # as in such a worker
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "node"))
    assert resolve().home == tmp_path / "node"
    monkeypatch.delenv("DDPM_HOME")
    assert resolve().home == tmp_path / "driver"


@pytest.mark.timeout(60)
def test_data_and_samples_default_to_a_remote_storage_or_their_own_prefixes(monkeypatch, tmp_path):
    """Issue 25, item 10: with --storage on object storage, nothing a job's other nodes read is left
    on the driver's disk: data and samples default under the storage; DDPM_DATA and DDPM_SAMPLES
    name other prefixes; a local storage keeps them in DDPM_HOME."""
    from pipelines.settings import resolve

    monkeypatch.setenv("DDPM_HOME", str(tmp_path))
    monkeypatch.delenv("DDPM_STORAGE", raising=False)
    local = resolve()
    assert local.data_url("digits", "test") == str(tmp_path / "data" / "digits" / "test")
    assert local.samples_url("x") == str(tmp_path / "samples" / "x")
    remote = resolve(storage="s3://b/ddpm/")
    assert remote.data_url("digits") == "s3://b/ddpm/data/digits/train"
    assert remote.samples_url("x") == "s3://b/ddpm/samples/x"
    monkeypatch.setenv("DDPM_DATA", "s3://d/shards/")
    monkeypatch.setenv("DDPM_SAMPLES", "gs://s/out")
    given = resolve(storage=str(tmp_path / "ray"))
    assert (given.data_url("digits"), given.samples_url("x")) == ("s3://d/shards/digits/train", "gs://s/out/x")
