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
