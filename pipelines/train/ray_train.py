"""The Ray Train wiring of training: the per-worker entry point, its checkpoint I/O and the ``RunConfig``.

Workers: :func:`worker_main` runs :func:`pipelines.train.loop.train_loop` with a :class:`LoopContext` built
on Ray Train's API. ``train`` (pipelines/train/command.py) and ``tune``'s distributed trials
(pipelines/tune/command.py) both launch it; ``tune``'s single-process trials share :func:`checkpoint_io`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.config import ExperimentConfig
from pipelines import console
from pipelines.storage.ray_storage import ray_storage
from pipelines.storage.scratch import scratch, scratch_dir
from pipelines.train.async_logger import AsyncLogger
from pipelines.train.failures import StopOnBadInput
from pipelines.train.loop import LoopContext, LoopData, rank0_decides, train_loop
from pipelines.train.progress import remote_log

CHECKPOINT_FILE = "checkpoint.pt"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait for its workers' placement


def checkpoint_io(report_fn: Callable[..., None], get_checkpoint: Callable[[], ray.train.Checkpoint | None],
                  checkpoint_cls: type[ray.train.Checkpoint], name_dirs: bool = False
                  ) -> tuple[Callable[[], dict | None], Callable[[dict, dict | None], None]]:
    """``(restore, report)`` for a :class:`LoopContext` on top of Ray Train's or Ray Tune's API.

    ``report(metrics, state)`` saves ``state`` (when given) as ``checkpoint.pt`` in a temporary folder
    and hands it to Ray, which copies it to the run's storage; ``restore()`` loads the latest one.
    """

    def restore() -> dict | None:
        ckpt = get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            try:
                return load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
            except CheckpointError as e:  # name the checkpoint in the run's storage, not the local copy
                raise CheckpointError(f"checkpoint {ckpt.path}: {str(e).replace(d, '.', 1)}") from e

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            report_fn(metrics)
            return
        with scratch("ckpt") as tmp:  # a killed worker's is removed by the next (pipelines/storage/scratch.py)
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), state)
            extra = {"checkpoint_dir_name": f"checkpoint_{int(metrics['step']):08d}"} if name_dirs else {}
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(tmp), **extra)

    return restore, report


def _ray_context() -> LoopContext:
    """A :class:`LoopContext` on Ray Train's API: this worker's rank, device, checkpoints and DDP."""
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    restore, report = checkpoint_io(ray.train.report, ray.train.get_checkpoint, ray.train.Checkpoint,
                                    name_dirs=True)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model) if world > 1 else model

    def all_gather(obj: object) -> list:
        if world == 1:
            return [obj]
        out: list = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    device = ray.train.torch.get_device()
    if device.type == "cpu" and world == 1 and torch.backends.mps.is_available():
        device = torch.device("mps")  # Apple GPU: Ray does not schedule it, one worker can use it
    return LoopContext(rank=rank, world_size=world, device=device, restore=restore,
                       report=report, wrap_model=wrap, all_gather=all_gather,
                       agree=(lambda flag: rank0_decides(flag, device)) if world > 1 else (lambda flag: flag))


@contextlib.contextmanager
def rank0_tracker(loop_config: dict[str, Any], ctx: LoopContext, run_id: str | None, what: str = "train"
                  ) -> Iterator[tuple[AsyncLogger | None, str | None]]:
    """``(tracker, artifact_dir)`` of MLflow run ``run_id`` on rank 0 (``(None, None)`` elsewhere or
    with no run): an :class:`AsyncLogger` and a scratch folder for its artifacts, closed (and
    dropped items said through ``ctx.log``, as ``[what]``) when the block ends, however it ends."""
    if ctx.rank != 0 or not run_id:
        yield None, None
        return
    if loop_config.get("tracking_uri"):  # else (it held credentials) this process's own MLFLOW_TRACKING_URI
        os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
    # mlflow itself (seconds to import) is first imported by the logger's thread, not before step 1.
    tracker = AsyncLogger(run_id)
    artifact_dir = scratch_dir("artifacts")
    try:
        yield tracker, artifact_dir
    finally:
        stats = tracker.close(timeout=30)
        if stats["dropped"]:
            ctx.log(f"[{what}] MLflow: {stats['dropped']} logging item(s) dropped during a tracking outage")
        shutil.rmtree(artifact_dir, ignore_errors=True)


def worker_context(loop_config: dict[str, Any]) -> LoopContext:
    """This worker's :class:`LoopContext`, its lines sent to the driver, which prints them."""
    ctx = _ray_context()
    ctx.log = remote_log(loop_config.get("progress"))
    return ctx


def log_placement(ctx: LoopContext, tracker: AsyncLogger | None) -> None:
    """Where each rank runs, as the run's ``ddpm.placement`` tag (all ranks take part in the gather)."""
    placement = ctx.all_gather({"rank": ctx.rank, "node_id": ray.get_runtime_context().get_node_id(),
                                "pid": os.getpid()})
    if tracker is not None:
        tracker.set_tag("ddpm.placement", ",".join(f"{p['rank']}@{p['node_id'][:12]}" for p in placement))


def loop_data(loop_config: dict[str, Any]) -> LoopData:
    return LoopData(url=loop_config["data_url"], holdout_url=loop_config.get("holdout_url"),
                    storage_options=loop_config.get("storage_options"))


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``train_loop_per_worker``)."""
    cfg: ExperimentConfig = loop_config["config"]  # typed: Ray pickles the dataclass itself
    ctx = worker_context(loop_config)
    with rank0_tracker(loop_config, ctx, loop_config.get("run_id")) as (tracker, artifact_dir):
        # Where each rank runs and what it reads: logged once so placement and data shares can be checked.
        log_placement(ctx, tracker)
        final = train_loop(cfg, loop_data(loop_config), ctx, tracker=tracker, artifact_dir=artifact_dir)
        if tracker is not None:
            tracker.log_metrics({"wall_s": final.get("wall_s", 0.0)}, int(final["step"]))


def run_config(name: str, storage: str, keep: int, max_failures: int = 3, env: dict | None = None,
               placement_deadline: bool = False) -> RunConfig:
    """Ray ``RunConfig``: checkpoints under storage/name, the last ``keep`` kept, restarts when a worker
    is lost, but not on bad input (:class:`pipelines.train.failures.StopOnBadInput`); Ray Train's own
    per-checkpoint log lines only with ``--verbose``. With ``placement_deadline``, a worker group that
    cannot start (within :func:`worker_group_start_timeout`) ends the run: Ray Train's default is to
    try again for ever."""
    path, fs = ray_storage(storage)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=max_failures,
                                     **({"controller_failure_limit": 0} if placement_deadline else {})),
        checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="step",
                                           checkpoint_score_order="max"),
        worker_runtime_env=env,
        logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "WARNING"),
        callbacks=[StopOnBadInput()],
    )


@contextlib.contextmanager
def worker_group_start_timeout(seconds: float) -> Iterator[None]:
    """How long Ray Train waits for its worker group's placement group, ``seconds``, while the block
    runs: ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, which the trainer hands from this process's
    environment to its controller when ``fit()`` starts it (the driver's own value is put back after)."""
    before = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before
