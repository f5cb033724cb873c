"""`ddpm-pipe train`: the driver side of a training run.

Resolve config, data and storage -> MLflow run (resumed by name) -> ``TorchTrainer`` with one worker
per node (times GPUs per node) running :func:`pipelines.train.ray_train.worker_main` -> the final checkpoint
becomes a registered model version. Data resolution and checks live in pipelines/storage/data.py, the Ray
Train wiring (worker entry point, checkpoint I/O, ``RunConfig``) in pipelines/train/ray_train.py.
"""

from __future__ import annotations

import os
from typing import Any

from ddpm.config import ExperimentConfig, load_config
from pipelines.storage.data import check_data, resolve_data
from pipelines.errors import PipelineError, UsageError
from pipelines.train.ray_train import CHECKPOINT_FILE, run_config, worker_main
from pipelines.settings import resolve


def resolve_config(config: str, overrides: list[str], max_steps: int | None = None,
                   precision: str | None = None, max_time: float | None = None) -> ExperimentConfig:
    """``--config`` and ``--set`` (strings, parsed once), then the typed command-line options."""
    typed = {"train.max_steps": max_steps, "train.precision": precision, "train.max_time": max_time}
    return load_config(config, overrides).with_values({k: v for k, v in typed.items() if v is not None})


def check_builds(cfg: ExperimentConfig, workers: int) -> None:
    """Build what every worker builds, on the driver and before any run exists: the schedule, the
    network (on the ``meta`` device: shapes only, no memory) and the per-worker batch."""
    import torch

    from ddpm.diffusion import Diffusion
    from ddpm.unet import UNet

    try:
        Diffusion.from_config(cfg.diffusion)
        with torch.device("meta"):
            UNet(cfg.model)
    except ValueError as e:
        raise UsageError(f"config {cfg.name!r} does not build: {e}") from e
    per_step = workers * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise UsageError(f"train.batch_size={cfg.train.batch_size} does not divide over {workers} worker(s) x "
                         f"train.grad_accum={cfg.train.grad_accum}; use a multiple of {per_step}")


def train_command(config: str = "digits", overrides: list[str] | None = None, data: str | None = None,
                  storage: str | None = None, nodes: int = 1, gpus_per_node: int = 0,
                  max_steps: int | None = None, precision: str | None = None, experiment: str | None = None,
                  run_name: str | None = None, address: str | None = None,
                  parent_run_id: str | None = None, max_failures: int = 3,
                  max_time: float | None = None) -> dict[str, Any]:
    """Train on Ray; returns the run id, final metrics, checkpoint and registered model version."""
    from ray.train.torch import TorchTrainer

    from ddpm.data.storage import open_fs, storage_options_for
    from pipelines import cluster, console, tracking
    from pipelines.names import check_name
    from pipelines.storage.outputs import FolderLock
    from pipelines.registry.register import log_and_register
    from pipelines.settings import shareable_uri

    cfg = resolve_config(config, overrides or [], max_steps, precision, max_time)
    check_name(run_name or cfg.name, "--run-name" if run_name else "the config's name (the default --run-name)")
    run_name = run_name or cfg.name
    check_name(experiment or cfg.name, "--experiment" if experiment else "the config's name (the default --experiment)")
    check_name(cfg.train.registered_model, "train.registered_model")
    check_builds(cfg, cluster.workers_for(nodes, gpus_per_node))
    settings = resolve(storage, address)
    data_url, holdout_url = resolve_data(cfg, data, settings)
    check_data(data_url, cfg)

    # One writer per run name: its checkpoints live in storage/<run-name> (pipelines/storage/outputs.py).
    run_url = f"{settings.storage.rstrip('/')}/{run_name}"
    fs, root = open_fs(run_url, storage_options_for(run_url))
    with FolderLock(fs, root, run_url, "train"):
        tracking.configure(settings)
        exp_id = tracking.experiment_id(experiment or cfg.name, settings)
        run_id, resumed = tracking.start_or_resume_run(exp_id, run_name, {tracking.KIND_TAG: "train"},
                                                       parent_run_id=parent_run_id)
        started = cluster.connect(settings.ray_address, min_cpus=cluster.workers_for(nodes, gpus_per_node))
        if started and gpus_per_node == 0 and nodes == 1 and _local_gpus() > 0:
            gpus_per_node = 1  # one machine with a GPU: use it
            console.info("[train] a CUDA GPU is present: training on it (--gpus-per-node 1)")
        placement = cluster.plan(nodes, gpus_per_node, started_locally=started)
        # What is used, so logged after the placement: the GPU default above may change gpus_per_node.
        tracking.log_params(run_id, {**cfg.to_dict(), "run": {"nodes": nodes, "gpus_per_node": gpus_per_node,
                                                              "workers": placement.workers, "data": data_url}})
        tracking.log_dataset(run_id, data_url, "training", storage_options_for(data_url))
        # Rank 0 puts its progress lines (step, loss, images/s, bits/dim, ETA) here; a thread prints them.
        # Rank 0 puts its progress lines (step, loss, images/s, bits/dim, ETA) here; a thread prints them
        # until the block ends, however it ends.
        with console.ProgressChannel() as progress:
            loop_config = {"config": cfg, "data_url": data_url, "holdout_url": holdout_url,
                           "storage_options": storage_options_for(data_url), "run_id": run_id,
                           "tracking_uri": shareable_uri(settings.tracking_uri), "progress": progress.queue}
            trainer = TorchTrainer(
                worker_main,
                train_loop_config=loop_config,
                scaling_config=cluster.scaling_config(placement),
                run_config=run_config(run_name, settings.storage, cfg.train.keep_checkpoints, max_failures,
                                      env=cluster.worker_env(placement)),
            )
            console.info(f"[train] {placement.workers} worker(s), {placement.strategy}, run '{run_name}' "
                         f"({'resuming' if resumed else 'new'}) to step {cfg.train.max_steps}"
                         + (f" or {cfg.train.max_time:g} s of training" if cfg.train.max_time else "")
                         + f", MLflow run {run_id}")
            try:
                result = trainer.fit()
            except Exception as e:
                from pipelines.train.failures import worker_input_error

                bad = worker_input_error(e)
                if bad is not None:  # bad input found by a worker: one attempt, exit 2
                    failed = tracking.fail_run(run_id, f"training stopped: {bad}")
                    raise (UsageError if bad.exit_code == 2 else PipelineError)(str(failed)) from None
                raise tracking.fail_run(run_id, f"training failed: {_root_cause(e)}") from e
        if result.checkpoint is None:
            raise tracking.fail_run(run_id, "training ended without a checkpoint")
        console.info(f"[train] registering the model as a new version of '{cfg.train.registered_model}'")
        with result.checkpoint.as_directory() as d, console.muted():
            version = log_and_register(run_id, os.path.join(d, CHECKPOINT_FILE), cfg.train.registered_model)
        tracking.end_run(run_id)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        checkpoint_url = result.checkpoint.path
        model_uri = f"models:/{cfg.train.registered_model}/{version}"
        stop_reason = "max_time" if metrics.get("max_time_reached") else "max_steps"
        return {
            "run_id": run_id, "resumed": resumed, "metrics": metrics, "checkpoint": checkpoint_url,
            "model_uri": model_uri, "registered_model": cfg.train.registered_model, "version": version,
            "stop_reason": stop_reason,
            "message": (f"trained '{run_name}' to step {metrics.get('step')}"
                        f"{f' (the {cfg.train.max_time:g} s time budget)' if stop_reason == 'max_time' else ''}"
                        f": loss {metrics.get('loss', float('nan')):.4f}; "
                        f"checkpoint {checkpoint_url}; registered {model_uri}; MLflow run {run_id}"),
        }


def _root_cause(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"[:500]


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
