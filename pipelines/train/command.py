"""`ddpm-pipe train`: the driver side of a training run.

Resolve config, data and storage -> MLflow run (resumed by name) -> ``TorchTrainer`` with one worker
per node (times GPUs per node) running :func:`pipelines.train.ray_train.worker_main` -> the final checkpoint
becomes a registered model version. Data resolution and checks live in pipelines/storage/data.py, the Ray
Train wiring (worker entry point, checkpoint I/O, ``RunConfig``) in pipelines/train/ray_train.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import ray.train.torch
import torch
from ray.train import Result

from ddpm.config import ExperimentConfig, load_config
from ddpm.data.storage import open_fs, storage_options_for
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet
from pipelines import cluster, console, tracking
from pipelines.cluster import Placement
from pipelines.errors import Interrupted, PipelineError, UsageError
from pipelines.names import check_name
from pipelines.registry.register import log_and_register
from pipelines.settings import Settings, resolve, shareable_uri
from pipelines.storage.data import check_data, check_splits_disjoint, resolve_data
from pipelines.storage.run_folder import run_folder
from pipelines.train.failures import placement_timed_out, worker_input_error
from pipelines.train.loop import NO_STEP_LIMIT
from pipelines.train.progress import ProgressChannel
from pipelines.train.ray_train import CHECKPOINT_FILE, run_config, worker_group_start_timeout, worker_main


def resolve_config(config: str, overrides: list[str], max_steps: int | None = None,
                   precision: str | None = None, max_time: float | None = None) -> ExperimentConfig:
    """``--config`` and ``--set`` (strings, parsed once), then the typed command-line options
    (:func:`with_options`)."""
    return with_options(load_config(config, overrides), overrides, max_steps, precision, max_time)


def with_options(cfg: ExperimentConfig, overrides: list[str], max_steps: int | None = None,
                 precision: str | None = None, max_time: float | None = None) -> ExperimentConfig:
    """``cfg`` (``--set`` ``overrides`` already applied) with the typed command-line options.

    A time budget given with no step count (neither ``max_steps`` nor ``--set train.max_steps``) is
    the limit: the config's ``train.max_steps`` is lifted (:data:`pipelines.train.loop.NO_STEP_LIMIT`).
    """
    if max_time is not None and max_steps is None and not any(
            item.split("=", 1)[0].strip() == "train.max_steps" for item in overrides):
        max_steps = NO_STEP_LIMIT
    typed = {"train.max_steps": max_steps, "train.precision": precision, "train.max_time": max_time}
    return cfg.with_values({k: v for k, v in typed.items() if v is not None})


def check_builds(cfg: ExperimentConfig, workers: int) -> None:
    """Build what every worker builds, on the driver and before any run exists: the schedule, the
    network (on the ``meta`` device: shapes only, no memory) and the per-worker batch."""
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
    cfg = resolve_config(config, overrides or [], max_steps, precision, max_time)
    check_name(run_name or cfg.name, "--run-name" if run_name else "the config's name (the default --run-name)")
    run_name = run_name or cfg.name
    check_name(experiment or cfg.name, "--experiment" if experiment else "the config's name (the default --experiment)")
    check_name(cfg.train.registered_model, "train.registered_model")
    check_builds(cfg, cluster.workers_for(nodes, gpus_per_node))
    settings = resolve(storage, address)
    data_url, holdout_url = resolve_data(cfg, data, settings)
    check_data(data_url, cfg)
    if holdout_url:
        check_splits_disjoint(data_url, holdout_url, "train")

    # One writer per run name: its checkpoints live in storage/<run-name> (pipelines/storage/outputs.py).
    run_url = f"{settings.storage.rstrip('/')}/{run_name}"
    fs, root = open_fs(run_url, storage_options_for(run_url))
    with run_folder(fs, root, run_url, "train"):
        tracking.configure(settings)
        exp_id = tracking.experiment_id(experiment or cfg.name, settings)
        # MLflow knows the run by experiment and name, the lock by storage and name: the run records its
        # storage, and a run of this name that records another is another job's (exit 3).
        run_id, resumed = tracking.start_or_resume_run(exp_id, run_name, {tracking.KIND_TAG: "train"},
                                                       parent_run_id=parent_run_id,
                                                       claim={tracking.STORAGE_TAG: run_url})
        gpus_per_node, placement = connect_and_place(settings, nodes, gpus_per_node, "train")
        # What is used, so logged after the placement: the GPU default above may change gpus_per_node.
        tracking.log_params(run_id, {**cfg.to_dict(), "run": {"nodes": nodes, "gpus_per_node": gpus_per_node,
                                                              "workers": placement.workers, "data": data_url}})
        tracking.log_dataset(run_id, data_url, "training", storage_options_for(data_url))
        console.info(f"[train] {placement.workers} worker(s), {placement.strategy}, run '{run_name}' "
                     f"({'resuming' if resumed else 'new'}) to {_limit(cfg)}, MLflow run {run_id}")
        result = fit(cfg, settings, placement, run_name, run_id, data_url, holdout_url, max_failures)
        return _register(cfg, result, run_name, run_id, resumed)


def connect_and_place(settings: Settings, nodes: int, gpus_per_node: int, what: str) -> tuple[int, Placement]:
    """Connect to (or start) Ray and plan the workers: ``(gpus_per_node, placement)``. One machine
    started here with a CUDA GPU and no ``--gpus-per-node``: trains on it."""
    started = cluster.connect(settings.ray_address, min_cpus=cluster.workers_for(nodes, gpus_per_node))
    if started and gpus_per_node == 0 and nodes == 1 and _local_gpus() > 0:
        gpus_per_node = 1  # one machine with a GPU: use it
        console.info(f"[{what}] a CUDA GPU is present: training on it (--gpus-per-node 1)")
    return gpus_per_node, cluster.plan(nodes, gpus_per_node, started_locally=started)


def _limit(cfg: ExperimentConfig) -> str:
    """Where the run stops, in words: a step, a time budget, or whichever comes first."""
    budget = f"{cfg.train.max_time:g} s of training" if cfg.train.max_time else ""
    if cfg.train.max_steps >= NO_STEP_LIMIT:
        return budget
    return f"step {cfg.train.max_steps}" + (f" or {budget}" if budget else "")


def fit(cfg: ExperimentConfig, settings: Settings, placement: Placement, run_name: str, run_id: str,
        data_url: str, holdout_url: str | None, max_failures: int,
        worker: Callable[[dict[str, Any]], None] | None = None, extra: dict[str, Any] | None = None) -> Result:
    """Run the ``TorchTrainer`` of ``worker`` (default :func:`worker_main`; ``extra``: more of its
    loop config, as `distill` adds); rank 0's progress lines reach the console through a
    :class:`ProgressChannel` until it ends, however it ends. A failure ends the MLflow run as FAILED
    (bad input found by a worker: one attempt, exit 2; workers not placed within
    ``settings.placement_timeout``: exit 1, saying what the cluster has); Ctrl-C ends it as KILLED (exit 130)."""
    with ProgressChannel() as progress:
        loop_config = {"config": cfg, "data_url": data_url, "holdout_url": holdout_url,
                       "storage_options": storage_options_for(data_url), "run_id": run_id,
                       "tracking_uri": shareable_uri(settings.tracking_uri), "progress": progress.queue, **(extra or {})}
        trainer = ray.train.torch.TorchTrainer(
            worker or worker_main,
            train_loop_config=loop_config,
            scaling_config=cluster.scaling_config(placement),
            run_config=run_config(run_name, settings.storage, cfg.train.keep_checkpoints, max_failures,
                                  env=cluster.worker_env(placement), placement_deadline=True),
        )
        try:
            with worker_group_start_timeout(settings.placement_timeout):
                result = _fit_in_a_thread(trainer)
        except KeyboardInterrupt:
            tracking.end_run(run_id, "KILLED")
            step = "its start" if progress.last_step is None else f"step {progress.last_step}"
            raise Interrupted(f"interrupted at {step}; re-run with --run-name {run_name} to resume") from None
        except Exception as e:
            bad = worker_input_error(e)
            if bad is not None:  # bad input found by a worker: one attempt, exit 2
                failed = tracking.fail_run(run_id, f"training stopped: {bad}")
                raise (UsageError if bad.exit_code == 2 else PipelineError)(str(failed)) from None
            if placement_timed_out(e):  # a node lost, the CPUs held by another job: not waited on for ever
                waited = cluster.placement_timeout("training", placement, settings.placement_timeout)
                raise tracking.fail_run(run_id, f"{waited}; MLflow run {run_id} ended FAILED, re-run with "
                                                f"--run-name {run_name} to resume") from e
            raise tracking.fail_run(run_id, f"training failed: {_root_cause(e)}") from e
    if result.checkpoint is None:
        raise tracking.fail_run(run_id, "training ended without a checkpoint")
    return result


def _fit_in_a_thread(trainer: ray.train.torch.TorchTrainer) -> Result:
    """``trainer.fit()`` in a thread of its own, so that Ctrl-C reaches this one, the main thread, as
    ``KeyboardInterrupt``: on the main thread Ray Train installs its own SIGINT handler, which aborts
    the run and ends the process with exit 1 and no word (Ray 2.60)."""
    outcome: dict[str, Result | BaseException] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ddpm-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _register(cfg: ExperimentConfig, result: Result, run_name: str, run_id: str, resumed: bool) -> dict[str, Any]:
    """Log the final checkpoint's EMA weights as the run's model, register it, end the run."""
    with console.phase("train", f"registering the model as a new version of '{cfg.train.registered_model}'"), \
            result.checkpoint.as_directory() as d, console.muted():
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
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
