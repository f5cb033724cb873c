"""The trial side of `ddpm-pipe tune`: what runs in a trial's process (see ``pipelines/tune/command.py``).

A trial runs :func:`pipelines.train.loop.train_loop`:
- ``--workers-per-trial 1``: in the trial's own process (:func:`trial_single`), reporting through
  ``ray.tune.report`` and resuming from ``ray.tune.get_checkpoint``.
- ``--workers-per-trial W > 1``: the trial launches a ``TorchTrainer`` (:func:`trial_distributed`),
  whose rank 0 reports go to Tune through ``TuneReportCallback``; rank 0 records the workers'
  placement group for the sweep's reaper (ray issue 54305).
"""

from __future__ import annotations

import os

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.tune.integration.ray_train import TuneReportCallback

from ddpm.config import ExperimentConfig
from pipelines import cluster
from pipelines.cluster import Placement
from pipelines.train.loop import LoopContext, LoopData, train_loop
from pipelines.train.ray_train import checkpoint_io, run_config, worker_main
from pipelines.tune import search_space


def _tune_context() -> LoopContext:
    """A :class:`LoopContext` for a single-process trial: report and restore through Ray Tune."""
    restore, report = checkpoint_io(ray.tune.report, ray.tune.get_checkpoint, ray.tune.Checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    return LoopContext(device=device, restore=restore, report=report)


def trial_single(params: dict, base: ExperimentConfig, data: dict) -> None:
    """Tune function trainable: the training loop in this trial's process."""
    os.environ.setdefault("DDPM_TORCH_THREADS", "1")  # one CPU per trial
    cfg = search_space.apply(base, params)
    train_loop(cfg, LoopData(url=data["url"], holdout_url=data["holdout_url"],
                             storage_options=data["storage_options"]), _tune_context())


def _worker_recording_placement(loop_config: dict) -> None:
    """Ray Train worker entry: rank 0 records its placement group for the sweep's reaper, then trains."""
    if ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            registry = ray.get_actor(loop_config["registry"])
            ray.get(registry.put.remote(loop_config["trial_id"], pg.id.hex()))
    worker_main(loop_config)


def trial_distributed(params: dict, base: ExperimentConfig, data: dict, placement: Placement, storage: str,
                      sweep: str, registry: str) -> None:
    """Tune function trainable: a TorchTrainer of ``placement`` (:func:`pipelines.cluster.trial_placement`,
    chosen once by the driver); rank 0's reports go to Tune.

    Re-running the same trial (a resumed sweep) resumes the inner run from its own storage by name.
    """
    cfg = search_space.apply(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    rc = run_config(f"{sweep}-{trial_id}", storage, keep=1, max_failures=0, env=cluster.worker_env(placement))
    rc.callbacks = [TuneReportCallback()]
    loop_config = {"config": cfg, "data_url": data["url"], "holdout_url": data["holdout_url"],
                   "storage_options": data["storage_options"], "run_id": None, "tracking_uri": None,
                   "trial_id": trial_id, "registry": registry}
    trainer = ray.train.torch.TorchTrainer(_worker_recording_placement, train_loop_config=loop_config,
                                           scaling_config=cluster.scaling_config(placement), run_config=rc)
    trainer.fit()
