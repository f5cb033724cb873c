"""Faults inside the training loop, run in-process (``pipelines.train.loop.train_loop`` with a plain
:class:`LoopContext`, no Ray): non-finite losses, a checkpoint write killed halfway, and the MLflow
server going down and coming back mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm.config import load_config
from pipelines.train.loop import LoopContext, LoopData, NonFiniteLossError, train_loop
from tests.support import TINY, start_mlflow_server, stop_process_group, wait_until


def config(*extra: str):
    return load_config("digits", [*TINY, "train.eval_every=1000", "train.sample_every=1000", *extra])


@pytest.fixture
def poisoned_loss(monkeypatch):
    """Make chosen calls of ``Diffusion.training_loss`` (1-based) return NaN or inf."""
    from ddpm.diffusion import Diffusion

    real = Diffusion.training_loss
    plan = {"calls": 0, "bad": set(), "value": float("nan")}

    def training_loss(self, *args, **kwargs):
        plan["calls"] += 1
        loss = real(self, *args, **kwargs)
        bad = plan["bad"] == "all" or plan["calls"] in plan["bad"]
        return loss * plan["value"] if bad else loss

    monkeypatch.setattr(Diffusion, "training_loss", training_loss)
    return plan


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_step_is_skipped_and_counted(digits_shards, poisoned_loss, value):
    poisoned_loss.update(bad={2}, value=value)
    logs: list[str] = []
    reports: list[tuple[dict, dict | None]] = []
    ctx = LoopContext(log=logs.append, report=lambda m, s: reports.append((m, s)))
    final = train_loop(config("train.max_steps=3"), LoopData(url=str(digits_shards)), ctx)
    assert final["step"] == 3 and final["nonfinite_total"] == 1
    assert any("step 1: non-finite loss/gradient skipped (1 in a row)" in line for line in logs), logs
    ckpt = reports[0][1]
    assert ckpt["step"] == 2 and ckpt["nonfinite_total"] == 1  # the count survives a resume
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # no garbage trained in


@pytest.mark.timeout(120)
def test_nonfinite_losses_in_a_row_stop_the_run_with_a_clear_error(digits_shards, poisoned_loss):
    poisoned_loss.update(bad="all")
    reports: list = []
    ctx = LoopContext(log=lambda s: None, report=lambda m, s: reports.append(s))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row at step 0 "
                                                 r"\(train.max_nonfinite=3\); lower train.lr"):
        train_loop(config("train.max_steps=5", "train.max_nonfinite=3"), LoopData(url=str(digits_shards)), ctx)
    assert poisoned_loss["calls"] == 3 and reports == []  # stopped at once, nothing checkpointed


# -- a checkpoint write killed halfway ------------------------------------------------------------------
_KILL_MID_WRITE = """
import os, signal, sys, torch
from ddpm.checkpoint import save_checkpoint
from ddpm.config import ExperimentConfig

def die(fd):  # half the bytes are on disk when the process is killed
    os.ftruncate(fd, os.fstat(fd).st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

os.fsync = die
save_checkpoint(sys.argv[1], {"config": ExperimentConfig.preset("digits"), "model": {"w": torch.ones(1000)},
                              "step": 2})
"""


@pytest.mark.timeout(120)
def test_checkpoint_write_killed_halfway_leaves_the_previous_one_whole(tmp_path):
    from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ddpm.config import ExperimentConfig

    url = str(tmp_path / "checkpoint.pt")
    state = {"config": ExperimentConfig.preset("digits"), "model": {"w": torch.zeros(1000)}, "step": 1}
    save_checkpoint(url, state)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, url], capture_output=True, timeout=100)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    partial = [p for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert len(partial) == 1 and partial[0].name.startswith(".checkpoint.pt.tmp-")  # hidden, never "latest"
    assert load_checkpoint(url)["step"] == 1  # the committed one, whole
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(partial[0]))  # and the half file is refused, not half-loaded
    save_checkpoint(url, {**state, "step": 3})  # the next write commits normally
    assert load_checkpoint(url)["step"] == 3


# -- the MLflow server down for part of a run ---------------------------------------------------------
@pytest.mark.timeout(180)
def test_mlflow_server_down_mid_run_training_goes_on_and_the_gap_is_accounted(digits_shards, tmp_path,
                                                                              monkeypatch):
    from pipelines import tracking
    from pipelines.settings import resolve
    from pipelines.train.async_logger import AsyncLogger

    server, uri = start_mlflow_server(tmp_path)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.configure(resolve())  # bounds MLflow's own HTTP retries (minutes by default)
        run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("outage"), "outage")
        tracker = AsyncLogger(run_id)
        times: dict[str, float] = {}

        def report(metrics: dict, state: dict | None) -> None:  # called every checkpoint (2 steps)
            nonlocal server
            if metrics["step"] == 2:
                wait_until(lambda: tracker.sent >= 2, 20, "steps 1-2 delivered", interval=0.1)
                stop_process_group(server, signal.SIGKILL)  # then the tracking server dies mid-run
                times["down"] = time.monotonic()
            elif metrics["step"] == 6:
                times["steps_3_to_6"] = time.monotonic() - times["down"]
                server, _ = start_mlflow_server(tmp_path, int(uri.rsplit(":", 1)[1]))  # and comes back
                times["up"] = time.monotonic()

        start = time.monotonic()
        final = train_loop(config("train.max_steps=8"), LoopData(url=str(digits_shards)),
                           LoopContext(log=lambda s: None, report=report), tracker=tracker)
        stats = tracker.close(timeout=30)
        outage_s = times["up"] - times["down"]
        assert final["step"] == 8
        assert times["steps_3_to_6"] < 10  # training did not wait for the dead server
        assert time.monotonic() - start - outage_s < 60  # nor for its retries afterwards

        steps = {m.step for m in tracking.client().get_metric_history(run_id, "training/loss")}
        assert {1, 2, 8} <= steps  # before and after the outage
        # Every step's metrics were delivered late (buffered) or are counted as dropped: the gap is known.
        assert len(set(range(1, 9)) - steps) <= stats["dropped"], (steps, stats)
    finally:
        stop_process_group(server, signal.SIGKILL)
