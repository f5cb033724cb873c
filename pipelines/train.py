"""`ddpm-pipe train`: the Ray Train launcher and the per-worker entry point.

Driver: resolve config, data and storage -> MLflow run (resumed by name) -> ``TorchTrainer`` with
one worker per node (times GPUs per node) -> the final checkpoint becomes a registered model version.
Workers: :func:`worker_main` runs :func:`pipelines.loop.train_loop` with a Ray Train context.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from ddpm.config import ExperimentConfig, load_config
from pipelines.errors import PipelineError, UsageError
from pipelines.settings import Settings, resolve

CHECKPOINT_FILE = "checkpoint.pt"


# -- worker side ----------------------------------------------------------------------------------
def checkpoint_io(report_fn, get_checkpoint, checkpoint_cls, name_dirs: bool = False):
    """``(restore, report)`` for a :class:`LoopContext` on top of Ray Train's or Ray Tune's API.

    ``report(metrics, state)`` saves ``state`` (when given) as ``checkpoint.pt`` in a temporary folder
    and hands it to Ray, which copies it to the run's storage; ``restore()`` loads the latest one.
    """
    from ddpm.checkpoint import load_checkpoint, save_checkpoint

    def restore():
        ckpt = get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint(os.path.join(d, CHECKPOINT_FILE))

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            report_fn(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="ddpm-ckpt-")
        try:
            save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), state)
            extra = {"checkpoint_dir_name": f"checkpoint_{int(metrics['step']):08d}"} if name_dirs else {}
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(tmp), **extra)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return restore, report


def _ray_context(tracking_uri: str | None):
    import ray.train
    import ray.train.torch
    import torch

    from pipelines.loop import LoopContext, rank0_decides

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    restore, report = checkpoint_io(ray.train.report, ray.train.get_checkpoint, ray.train.Checkpoint,
                                    name_dirs=True)

    def wrap(model):
        return ray.train.torch.prepare_model(model) if world > 1 else model

    def all_gather(obj):
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


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``train_loop_per_worker``)."""
    import ray

    from pipelines.console import remote_log
    from pipelines.loop import LoopData, train_loop

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    ctx = _ray_context(loop_config.get("tracking_uri"))
    ctx.log = remote_log(loop_config.get("progress"))  # the driver prints these lines
    tracker = None
    artifact_dir = None
    if ctx.rank == 0 and loop_config.get("run_id"):
        from pipelines.tracking import AsyncLogger

        if loop_config.get("tracking_uri"):  # else (it held credentials) this process's own MLFLOW_TRACKING_URI
            os.environ["MLFLOW_TRACKING_URI"] = loop_config["tracking_uri"]
        # mlflow itself (seconds to import) is first imported by the logger's thread, not before step 1.
        tracker = AsyncLogger(loop_config["run_id"])
        artifact_dir = tempfile.mkdtemp(prefix="ddpm-artifacts-")
    # Where each rank runs and what it reads: logged once so placement and data shares can be checked.
    placement = ctx.all_gather({"rank": ctx.rank, "node_id": ray.get_runtime_context().get_node_id(),
                                "pid": os.getpid()})
    if tracker is not None:
        tracker.set_tag("ddpm.placement", ",".join(f"{p['rank']}@{p['node_id'][:12]}" for p in placement))
    data = LoopData(url=loop_config["data_url"], holdout_url=loop_config.get("holdout_url"),
                    storage_options=loop_config.get("storage_options"))
    try:
        final = train_loop(cfg, data, ctx, tracker=tracker, artifact_dir=artifact_dir)
        if tracker is not None:
            tracker.log_metrics({"wall_s": final.get("wall_s", 0.0)}, int(final["step"]))
    finally:
        if tracker is not None:
            stats = tracker.close(timeout=30)
            if stats["dropped"]:
                ctx.log(f"[train] MLflow: {stats['dropped']} logging item(s) dropped during a tracking outage")
        if artifact_dir:
            shutil.rmtree(artifact_dir, ignore_errors=True)


# -- driver side ----------------------------------------------------------------------------------
def resolve_config(config: str, overrides: list[str], max_steps: int | None = None,
                   precision: str | None = None, max_time: float | None = None) -> ExperimentConfig:
    """``--config`` and ``--set`` (strings, parsed once), then the typed command-line options."""
    typed = {"train.max_steps": max_steps, "train.precision": precision, "train.max_time": max_time}
    return load_config(config, overrides).with_values({k: v for k, v in typed.items() if v is not None})


def resolve_data(cfg: ExperimentConfig, data: str | None, settings: Settings) -> tuple[str, str | None]:
    """The training shard URL and the held-out split URL; prepares the embedded default if missing."""
    url = data or cfg.data.url or settings.data_url(cfg.data.source, "train")
    holdout = cfg.data.holdout_url or None
    if not data and not cfg.data.url:
        ensure_prepared(cfg.data.source, url, split="train")
        holdout = holdout or settings.data_url(cfg.data.source, "test")
        ensure_prepared(cfg.data.source, holdout, split="test")
    elif holdout is None:
        sibling = url.rstrip("/").rsplit("/", 1)[0] + "/test" if url.rstrip("/").endswith("/train") else None
        holdout = sibling if sibling and _exists(sibling) else None
    return url, holdout


def _exists(url: str) -> bool:
    from ddpm.data import read_manifest

    try:
        read_manifest(url)
        return True
    except Exception:
        return False


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


def check_data(url: str, cfg: ExperimentConfig) -> None:
    """Fail before any run or worker starts when the shards are missing, empty, incomplete or do not
    fit the model (a worker would find out only after Ray had restarted it ``max_failures`` times).
    Local shards are also hashed against the manifest (cheap: a local read); shards in an object
    store are hashed by the worker that reads them, whose error is not retried (pipelines/failures.py)."""
    import hashlib

    from ddpm.data import DataError, open_fs, read_manifest, storage_options_for
    from ddpm.data.storage import is_local

    options = storage_options_for(url)
    try:
        manifest = read_manifest(url, options)
        fs, root = open_fs(url, options)
        sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("size") for p in fs.ls(root, detail=True)}
    except (DataError, OSError) as e:
        raise UsageError(f"data {url}: {e}") from e
    want = [cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size]
    if manifest["shape"] != want:
        raise UsageError(f"data {url}: images are [C, H, W] = {manifest['shape']} but the model takes {want} "
                         "(model.in_channels, model.image_size)")
    if manifest["levels"] != cfg.data.levels:
        raise UsageError(f"data {url}: {manifest['levels']} pixel levels but data.levels={cfg.data.levels}")
    for entry in manifest["shards"]:
        name, size = entry["name"], entry.get("size")
        if name not in sizes:
            raise UsageError(f"data {url}: shard {name} is listed in the manifest but missing")
        if size is not None and sizes[name] != size:
            raise UsageError(f"data {url}: shard {name} has {sizes[name]} bytes, the manifest says {size} "
                             "(truncated or replaced)")
        if is_local(fs):
            digest = hashlib.sha256()
            with open(f"{root}/{name}", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                raise UsageError(f"data {url}: shard {name} does not match its sha256 in the manifest "
                                 "(changed or corrupt); prepare the data again")


def ensure_prepared(source: str, url: str, split: str) -> None:
    """Write the shards of ``source`` to ``url`` unless a manifest is already there."""
    if not _exists(url):
        from pipelines.console import info
        from pipelines.data import prepare_command

        info(f"[data] preparing {source} ({split}) -> {url}")
        prepare_command(source=source, out=url, split=split)


def run_config(name: str, storage: str, keep: int, max_failures: int = 3, env: dict | None = None):
    """Ray ``RunConfig``: checkpoints under storage/name, the last ``keep`` kept, restarts when a worker
    is lost, but not on bad input (:class:`pipelines.failures.StopOnBadInput`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from pipelines.console import train_logging_config
    from pipelines.failures import StopOnBadInput
    from pipelines.storage import ray_storage

    path, fs = ray_storage(storage)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="step",
                                           checkpoint_score_order="max"),
        worker_runtime_env=env,
        logging_config=train_logging_config(),
        callbacks=[StopOnBadInput()],
    )


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
    from pipelines.outputs import FolderLock
    from pipelines.registry import log_and_register
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

    # One writer per run name: its checkpoints live in storage/<run-name> (pipelines/outputs.py).
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
        progress = console.ProgressChannel()
        loop_config = {"config": cfg.to_dict(), "data_url": data_url, "holdout_url": holdout_url,
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
            from pipelines.failures import worker_input_error

            bad = worker_input_error(e)
            if bad is not None:  # bad input found by a worker: one attempt, exit 2
                failed = tracking.fail_run(run_id, f"training stopped: {bad}")
                raise (UsageError if bad.exit_code == 2 else PipelineError)(str(failed)) from None
            raise tracking.fail_run(run_id, f"training failed: {_root_cause(e)}") from e
        finally:
            progress.close()
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
