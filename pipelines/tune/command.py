"""`ddpm-pipe tune`: a Ray Tune sweep over T, the beta range, the schedule and the learning rate.

Driver: config + search space -> parent MLflow run (resumed by sweep name) -> ``Tuner`` of a function
trainable (or ``Tuner.restore`` of the same sweep, only from the storage its parent run recorded:
:func:`check_resumable`) -> the best trial's full variational bound -> best config YAML, printed and
logged to the parent run.

Trials compare on ``bpd``: the held-out bits/dim estimate of :func:`ddpm.likelihood.bits_per_dim_estimate`
(the same images, timesteps and noise in every trial), which, unlike L_simple, does not depend on T
or the schedule. ASHA stops trials early on it.

A trial runs :func:`pipelines.train.loop.train_loop` in its own process, or a ``TorchTrainer`` of
``--workers-per-trial`` workers: ``pipelines/tune/trial.py``, the trial side; this file is the driver.

Ray issue 54305: a trial that wraps a TorchTrainer and is stopped by the scheduler dies with its
controller, but the workers' placement group (owned by the job, not the dead controller) keeps
holding the CPUs, so later trials wait forever. Here each trial's rank 0 records its placement
group in a named registry actor, and the sweep callback (:class:`SweepCallback`) removes it on the driver when the trial
ends (completed, stopped or failed). Concurrency is capped so that K trials' workers fit the cluster.

MLflow is written from the driver only (the same callback): one child run per trial under the
sweep's parent run, its params at start and every report as metric history. No trial process opens
the tracking store, so a sqlite store sees one writer.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from mlflow.entities import Dataset, Metric
from ray import tune
from ray.actor import ActorHandle
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from fsspec import AbstractFileSystem
from ray.util.placement_group import PlacementGroup, remove_placement_group

from ddpm.checkpoint import load_checkpoint
from ddpm.config import ExperimentConfig
from ddpm.data.reader import load_split, to_float
from ddpm.data.storage import open_fs, s3_endpoint, storage_options_for
from ddpm.likelihood import bits_per_dim
from pipelines import cluster, console, tracking
from pipelines.cluster import Placement
from pipelines.errors import RefusedError, UsageError
from pipelines.names import check_name
from pipelines.settings import Settings, masked_config, redact, resolve
from pipelines.storage.data import check_data, resolve_data
from pipelines.storage.run_folder import MARKER, run_folder
from pipelines.storage.outputs import LOCK, TEMP
from pipelines.storage.ray_storage import ray_storage
from pipelines.train.async_logger import metric_name
from pipelines.train.quality import QUALITY_SCORES
from pipelines.tune.ranking import RANKABLE, PatientASHA, check_metric, se_key, with_quality
from pipelines.train.command import check_builds, resolve_config
from pipelines.train.loop import build
from pipelines.train.ray_train import CHECKPOINT_FILE
from pipelines.tune import SCHEDULERS, SEARCHES, search_space, sweep_table
from pipelines.tune.trial import trial_distributed, trial_single

METRIC = "bpd"
STORAGE_TAG = "ddpm.tune.storage"  # where the sweep's Tune state lives; a resume must find the same
STATE_TAG = "ddpm.tune.state_sha256"  # state_digest of the sweep's folder when its job last left it
REGISTRY_PREFIX = "ddpm-tune-pgs-"
FULL_BOUND_IMAGES = 64  # held-out images for the best trial's full bound (T model calls each)


def replace_restored_callbacks(tuner: tune.Tuner, callbacks: list[tune.Callback]) -> None:
    """Give a restored ``Tuner`` this run's callbacks instead of those the first run pickled into
    ``tuner.pkl`` (which point at that run's MLflow parent run and table).

    Ray has no public way to do this: ``Tuner.restore`` takes no ``run_config`` or ``callbacks`` and
    ``Tuner`` exposes no run config (ray-project/ray#41364, open). So this reaches into the private
    ``Tuner._local_tuner`` (a ``TunerInternal``; None under Ray Client, which tune does not use),
    the one place that does; checked on Ray 2.60.0 (tests/pipelines/test_tune.py restores a real
    ``tuner.pkl`` through it). If Ray changes it, this fails loudly instead of resuming with stale callbacks.
    """
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not hasattr(local, "get_run_config"):
        raise RuntimeError(f"cannot set the callbacks of a restored Tuner on Ray {ray.__version__}: "
                           "Tuner._local_tuner.get_run_config() is gone (checked on Ray 2.60.0); "
                           "see pipelines/tune/command.py replace_restored_callbacks")
    local.get_run_config().callbacks = list(callbacks)


def _placement_registry(name: str) -> ActorHandle:
    """A named actor mapping trial id -> placement group id of its TorchTrainer workers."""

    @ray.remote(num_cpus=0)
    class PlacementRegistry:
        def __init__(self) -> None:
            self.groups: dict[str, str] = {}

        def put(self, trial_id: str, pg_hex: str) -> None:
            self.groups[trial_id] = pg_hex

        def pop(self, trial_id: str) -> str | None:
            return self.groups.pop(trial_id, None)

    return PlacementRegistry.options(name=name, get_if_exists=True).remote()


def _remove_placement_group(pg_hex: str) -> bool:
    """Remove a (possibly already removed) placement group; True when it was still there."""
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
    state = ray.util.placement_group_table(pg).get("state")
    if state in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


class SweepCallback(tune.Callback):
    """Nested MLflow runs for trials (one child run per trial under the sweep's parent run, its params
    at start and every report as metric history), and the reaper of stopped trials' worker
    placement groups (``registry``: the :func:`_placement_registry` actor's name)."""

    def __init__(self, exp_id: str, parent_run_id: str, sweep: str, base: ExperimentConfig, max_steps: int,
                 registry: str | None = None, data_input: Dataset | None = None) -> None:
        # It is pickled into tuner.pkl with the run config: the config and the dataset go in masked.
        self.exp_id, self.parent_run_id, self.sweep, self.base = exp_id, parent_run_id, sweep, masked_config(base)
        self.max_steps, self.registry = max_steps, registry
        self.data_input = None if data_input is None else tracking.masked_dataset(data_input)
        self.runs: dict[str, str] = {}
        self.reaped = 0

    def _run(self, trial: tune.experiment.Trial) -> str:
        if trial.trial_id not in self.runs:
            run_id, _ = tracking.start_or_resume_run(
                self.exp_id, f"{self.sweep}-{trial.trial_id}", {tracking.KIND_TAG: "tune-trial"},
                parent_run_id=self.parent_run_id)
            cfg = search_space.apply(self.base, trial.config)
            tracking.log_params(run_id, {**cfg.to_dict(), "tune": {"trial_id": trial.trial_id, **trial.config}})
            if self.data_input is not None:  # the sweep's training data (an mlflow.data entity)
                tracking.log_dataset(run_id, self.data_input, "training")
            self.runs[trial.trial_id] = run_id
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        tracking.client().update_run(self._run(trial), status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("step", 0))
        ts = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), float(v), ts, step) for k, v in result.items()
                   if k in ("loss", "bpd", "bpd_stderr", "grad_norm", "lr", "images_per_s", *QUALITY_SCORES,
                            *(f"{q}_se" for q in QUALITY_SCORES))
                   and isinstance(v, (int, float))]  # named as a training run's, so the two chart alike
        tracking.client().log_batch(self._run(trial), metrics=metrics)

    def _end(self, trial: tune.experiment.Trial, status: str) -> None:
        if self.registry is not None:
            pg_hex = ray.get(ray.get_actor(self.registry).pop.remote(trial.trial_id))
            if pg_hex and _remove_placement_group(pg_hex):
                self.reaped += 1  # a stopped trial's leaked workers (ray issue 54305)
        run_id = self._run(trial)
        step = int((trial.last_result or {}).get("step", 0))
        ending = "failed" if status == "FAILED" else "completed" if step >= self.max_steps else "stopped early"
        c = tracking.client()
        c.set_tag(run_id, "ddpm.tune.ending", ending)
        c.set_terminated(run_id, status=status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")


def _default_concurrency(workers: int) -> int:
    """Trials that fit at once: one CPU for a single-process trial; W worker CPUs plus one otherwise."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    per_trial = 1 if workers == 1 else workers + 1
    return max(1, int(cpus // per_trial))


def _full_bound(result: tune.Result, cfg: ExperimentConfig, holdout_url: str, storage_options: dict,
                n: int) -> tuple[float, float] | None:
    """The best trial's full variational bound (mean bits/dim and its standard error) on ``n`` images."""
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
    elif (result.metrics or {}).get("checkpoint_path"):
        path = result.metrics["checkpoint_path"]
        state = load_checkpoint(f"{path.rstrip('/')}/{CHECKPOINT_FILE}")
    else:
        return None
    _model, ema, _opt, _sched, diffusion = build(cfg, torch.device("cpu"))
    ema.load_state_dict(state["ema"])
    images, _labels, _manifest = load_split(holdout_url, storage_options=storage_options)
    x = to_float(images[:n], cfg.data.levels)
    ema.module.eval()
    with torch.no_grad():
        bpd = bits_per_dim(diffusion, ema.module, x, levels=cfg.data.levels,
                           generator=torch.Generator().manual_seed(0))
    return float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")


def check_options(scheduler: str, search: str, prefix: str = "--") -> None:
    """``scheduler`` and ``search`` are ones this sweep knows (exit 2 naming the valid ones); ``prefix``
    is how the caller's user spells the options (``--scheduler``, a workflow file's ``tune.scheduler``)."""
    for option, value, valid in (("scheduler", scheduler, SCHEDULERS), ("search", search, SEARCHES)):
        if value not in valid:
            raise UsageError(f"{prefix}{option} {value!r} is not valid; valid: {', '.join(valid)}")


@dataclass
class _Sweep:
    """A sweep as asked and checked, before anything is written (:func:`_plan`)."""

    name: str
    named: bool  # given with --name (a generated name is never resumed)
    trials: int
    config: str
    overrides: list[str]
    base: ExperimentConfig  # what the best config builds on (full max_steps)
    trial_base: ExperimentConfig
    space_spec: dict[str, Any]
    scheduler: str
    search: str
    concurrent: int | None
    workers_per_trial: int
    experiment: str
    settings: Settings
    data_url: str
    holdout_url: str
    opts: dict[str, Any]
    full_bound_images: int
    resume_finished: bool
    metric: str = METRIC  # what trials are ranked and stopped on (pipelines.tune.ranking.RANKABLE)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def steps(self) -> int:
        return self.trial_base.train.max_steps


def tune_command(trials: int = 8, config: str = "digits", overrides: list[str] | None = None,
                 space: str | None = None, data: str | None = None, max_steps: int | None = None,
                 scheduler: str = "asha", search: str = "random", concurrent: int | None = None,
                 workers_per_trial: int = 1, storage: str | None = None, experiment: str | None = None,
                 name: str | None = None, address: str | None = None,
                 full_bound_images: int = FULL_BOUND_IMAGES, resume_finished: bool = False,
                 metric: str = METRIC) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the best trial on ``metric`` (:data:`pipelines.tune.ranking.RANKABLE`),
    its config file and every trial's ending.

    One job per sweep: it holds ``<storage>/<name>/.ddpm-lock`` (exit 3 for a second one) while it runs."""
    check_options(scheduler, search)
    overrides = list(overrides or [])
    base = resolve_config(config, overrides)
    trial_base = resolve_config(config, overrides, max_steps)
    # Every report must carry a fresh bpd: evaluate at each checkpoint (report) step.
    trial_base = trial_base.with_values({"train.eval_every": trial_base.train.checkpoint_every})
    check_metric(metric, trial_base)
    trial_base = with_quality(trial_base, metric)  # a sample-quality metric: measured at every report
    space_spec = search_space.load_space(space, trial_base)
    sweep = name or f"{base.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    check_name(sweep, "--name" if name else "the config's name (in the default --name)")
    check_name(experiment or base.name, "--experiment" if experiment else "the config's name (the default --experiment)")
    check_builds(trial_base, workers_per_trial)  # as train does: before any run, trial or worker
    settings = resolve(storage, address)
    data_url, holdout_url = resolve_data(trial_base, data, settings)
    check_data(data_url, trial_base)
    if not holdout_url:
        raise UsageError("tune compares trials on held-out bits/dim: set data.holdout_url or use a data "
                         "folder .../train with a .../test split beside it")
    plan = _Sweep(sweep, name is not None, trials, config, overrides, base, trial_base, space_spec, scheduler,
                  search, concurrent, workers_per_trial, experiment or base.name, settings, data_url, holdout_url,
                  storage_options_for(data_url), full_bound_images, resume_finished, metric)
    url = f"{settings.storage.rstrip('/')}/{sweep}"
    fs, root = open_fs(url, storage_options_for(url))
    with run_folder(fs, root, url, "tune"):
        return _run_sweep(plan, fs, root)


def storage_location(storage: str, sweep: str) -> str:
    """Where a sweep's Tune state lives, as its MLflow run records it: the URL and, for an
    S3-compatible store, its endpoint (the same bucket name on another endpoint is another place)."""
    url = f"{storage.rstrip('/')}/{sweep}"
    endpoint = s3_endpoint() if url.startswith("s3://") else None
    if not url.startswith(("s3://", "gs://", "memory://")):
        url = ray_storage(url)[0]
    return f"{url} (endpoint {endpoint})" if endpoint else url


def state_digest(fs: AbstractFileSystem, root: str) -> str:
    """sha256 over the names and bytes of the files at the top of a sweep's folder: what
    ``Tuner.restore`` unpickles (``tuner.pkl``, the experiment and searcher state), not our lock or marker."""
    h = hashlib.sha256()
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "file" or name in (LOCK, MARKER) or TEMP.match(name):
            continue
        h.update(f"{name}\0{entry.get('size')}\0".encode())
        h.update(hashlib.sha256(fs.cat_file(entry["name"])).digest())
    return h.hexdigest()


def _run_sweep(plan: _Sweep, fs: AbstractFileSystem, root: str) -> dict[str, Any]:
    """The sweep, its lock held: the parent MLflow run, the Tuner (new or restored), the results."""
    settings, sweep = plan.settings, plan.name
    tracking.configure(settings)
    exp_id = tracking.experiment_id(plan.experiment, settings)
    path, rfs = ray_storage(settings.storage)
    sweep_path = f"{path.rstrip('/')}/{sweep}"
    location = storage_location(settings.storage, sweep)
    restoring = tune.Tuner.can_restore(sweep_path, storage_filesystem=rfs)
    if restoring:
        check_resumable(exp_id, sweep, location, named=plan.named, digest=state_digest(fs, root),
                        resume_finished=plan.resume_finished)
    parent_run_id, resumed = tracking.start_or_resume_run(exp_id, sweep, {tracking.KIND_TAG: "tune"},
                                                          claim={STORAGE_TAG: location})
    tracking.log_params(parent_run_id, {"tune": {
        "trials": plan.trials, "max_steps": plan.steps, "scheduler": plan.scheduler, "search": plan.search,
        "metric": plan.metric,
        "workers_per_trial": plan.workers_per_trial, "space": {k: str(v) for k, v in plan.space_spec.items()},
        "config": plan.config, "overrides": plan.overrides, "data": plan.data_url}})
    data_input = tracking.log_dataset(parent_run_id, plan.data_url, "training", plan.opts)
    tuner, callback, registry = _tuner(plan, exp_id, parent_run_id, data_input, restoring, sweep_path, rfs)
    try:
        grid = tuner.fit()
    except Exception as e:
        raise tracking.fail_run(parent_run_id, f"sweep '{sweep}' failed: {type(e).__name__}: {e}") from e
    finally:
        if registry is not None:
            ray.kill(registry)
        # What a resume will unpickle, as this job leaves it: checked before any restore.
        tracking.client().set_tag(parent_run_id, STATE_TAG, state_digest(fs, root))
    return _finish(grid, plan.base, sweep, parent_run_id, resumed or restoring, plan.steps, plan.holdout_url,
                   plan.opts, plan.full_bound_images, settings, time.perf_counter() - plan.t0, callback.reaped,
                   plan.metric)


def _tuner(plan: _Sweep, exp_id: str, parent_run_id: str, data_input: Dataset, restoring: bool, sweep_path: str,
           rfs: object) -> tuple[tune.Tuner, SweepCallback, ActorHandle | None]:
    """The sweep's ``Tuner`` (restored, with this run's callbacks, or new), its MLflow callback and
    the placement registry actor of distributed trials (None for single-process ones)."""
    sweep, trial_base, workers = plan.name, plan.trial_base, plan.workers_per_trial
    started = cluster.connect(plan.settings.ray_address, min_cpus=workers)
    placement = cluster.trial_placement(workers, started) if workers > 1 else None
    concurrent = plan.concurrent or _default_concurrency(workers)
    data_spec = {"url": plan.data_url, "holdout_url": plan.holdout_url, "storage_options": plan.opts}
    registry = _placement_registry(REGISTRY_PREFIX + sweep) if workers > 1 else None
    trainable = _trainable(trial_base, data_spec, placement, plan.settings, sweep)
    callbacks = sweep_callbacks(exp_id, parent_run_id, sweep, trial_base, plan.steps,
                                REGISTRY_PREFIX + sweep if registry else None, data_input)
    callback = callbacks[0]
    if restoring:
        tuner = tune.Tuner.restore(sweep_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=rfs)
        # The restored run config carries the callback pickled by the first run; use this run's.
        replace_restored_callbacks(tuner, callbacks)
        console.info(f"[tune] resuming sweep '{sweep}' from {sweep_path}")
    else:
        tuner = _new_tuner(trainable, plan.space_spec, plan.trials, plan.scheduler, plan.search, concurrent,
                           trial_base, sweep, sweep_path.rsplit("/", 1)[0], rfs, callbacks, plan.metric)
        console.info(f"[tune] sweep '{sweep}': {plan.trials} trial(s) of {plan.steps} step(s), {concurrent} at "
                     f"once, {workers} worker(s) each, scheduler {plan.scheduler}, search {plan.search}, "
                     f"ranked on {plan.metric}; "
                     f"MLflow parent run {parent_run_id}")
    return tuner, callback, registry


def sweep_callbacks(exp_id: str, parent_run_id: str, sweep: str, trial_base: ExperimentConfig, steps: int,
                    registry: str | None, data_input: Dataset | None) -> list[tune.Callback]:
    """The sweep's callbacks: its MLflow callback (first) and the table printer. Ray pickles them
    into ``tuner.pkl`` with the run config, so what they hold (the config, the dataset entity) is
    masked: the ``--data`` URL may carry credentials."""
    callback = SweepCallback(exp_id, parent_run_id, sweep, trial_base, steps, registry, data_input)
    masked = masked_config(trial_base)
    table = sweep_table.SweepTable(lambda params: search_space.apply(masked, params), steps)
    return [callback, sweep_table.TableCallback(table)]


def _trainable(trial_base: ExperimentConfig, data_spec: dict, placement: Placement | None, settings: Settings,
               sweep: str) -> Callable:
    """The Tune trainable: :func:`trial_single` (one CPU), or :func:`trial_distributed` for a
    ``placement`` (its trial process only drives the TorchTrainer; the workers reserve their own CPUs)."""
    if placement is None:
        return tune.with_resources(tune.with_parameters(trial_single, base=trial_base, data=data_spec), {"CPU": 1})
    return tune.with_resources(
        tune.with_parameters(trial_distributed, base=trial_base, data=data_spec, placement=placement,
                             storage=settings.storage, sweep=sweep, registry=REGISTRY_PREFIX + sweep), {"CPU": 1})


def _new_tuner(trainable: Callable, space_spec: dict[str, Any], trials: int, scheduler: str, search: str,
               concurrent: int, trial_base: ExperimentConfig, sweep: str, path: str, fs: object,
               callbacks: Sequence[tune.Callback], metric: str = METRIC) -> tune.Tuner:
    """A new sweep's ``Tuner``: ASHA on the step count (rungs at the checkpoint interval), sparing
    every trial within two standard errors of its rung's best (:class:`PatientASHA`), or none;
    random search (its own concurrency cap) or Optuna, both seeded with ``train.seed``."""
    steps, every = trial_base.train.max_steps, trial_base.train.checkpoint_every
    sched = PatientASHA(se_attr=se_key(metric), time_attr="step", max_t=steps, grace_period=min(every, steps),
                        reduction_factor=2) if scheduler == "asha" else None
    if search == "optuna":
        search_alg, limit = OptunaSearch(seed=trial_base.train.seed), concurrent
    else:  # Tune ignores max_concurrent_trials for a generator: it takes its own cap
        search_alg, limit = BasicVariantGenerator(max_concurrent=concurrent, random_state=trial_base.train.seed), None
    # Tune warns at every checkpoint of a short trial that snapshots are frequent; they are cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    run_config = tune.RunConfig(
        name=sweep, storage_path=path, storage_filesystem=fs, callbacks=list(callbacks),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), failure_config=tune.FailureConfig(max_failures=0),
        verbose=0)
    return tune.Tuner(
        trainable, param_space=search_space.to_tune(space_spec),
        tune_config=tune.TuneConfig(metric=metric, mode=RANKABLE[metric], num_samples=trials, scheduler=sched,
                                    search_alg=search_alg, max_concurrent_trials=limit),
        run_config=run_config)


def _ranked_on(m: dict[str, Any], metric: str) -> str:
    """``kid 0.0123 +- 0.002; `` for a sample-quality metric (bits/dim follows in any case)."""
    if metric == "bpd":
        return ""
    return f"{metric} {m[metric]:.4g} +- {m.get(se_key(metric), float('nan')):.2g}; "


def check_resumable(exp_id: str, sweep: str, location: str, named: bool, digest: str | None = None,
                    resume_finished: bool = False) -> None:
    """Refuse (exit 3) to restore Tune state from ``location`` unless this user left it there as it is.

    Restoring unpickles ``tuner.pkl`` and the trial states: whoever can write the storage prefix runs
    code in this process. So a restore needs (1) the sweep named with ``--name`` (a generated name is
    never resumed), (2) this tracking store's parent run of that name, recording in its
    ``ddpm.tune.storage`` tag the very location found now (URL and S3 endpoint), and (3) the state's
    ``digest`` (:func:`state_digest`) equal to the one that run recorded when its job last wrote it.
    A finished sweep is not restored unless ``resume_finished`` (``--resume-finished``).
    """
    def refuse(why: str) -> RefusedError:
        return RefusedError(f"refused to resume sweep '{sweep}' from {location}: {why}. Resuming unpickles "
                            "Tune's state there, which runs code; use another --name (or --storage) "
                            "to start a new sweep")

    if not named:
        raise refuse("Tune state exists under a name that was not given with --name")
    previous = tracking.find_run(exp_id, sweep)
    if previous is None:
        raise refuse("this MLflow store has no sweep of that name, so this state was not written by it")
    recorded = previous.data.tags.get(STORAGE_TAG)
    if recorded != redact(location):  # the tag is stored masked (tracking.RedactingClient)
        raise refuse(f"the sweep's MLflow run records its storage as {recorded or 'nothing (an older sweep)'}")
    if digest is not None and previous.data.tags.get(STATE_TAG) != digest:
        raise refuse("the state there is not what this sweep's last job left (sha256 "
                     f"{previous.data.tags.get(STATE_TAG) or 'not recorded'}, found {digest}): changed since, "
                     "or its driver was killed while Tune wrote it")
    if previous.info.status == "FINISHED" and not resume_finished:
        raise RefusedError(f"sweep '{sweep}' has finished (MLflow run {previous.info.run_id}); its best config "
                           "is logged there. Use another --name for a new sweep, or --resume-finished to "
                           "restore it and report its results again")


def _finish(grid: tune.ResultGrid, base: ExperimentConfig, sweep: str, parent_run_id: str, resumed: bool,
            steps: int, holdout_url: str, opts: dict, full_bound_images: int, settings: Settings, wall_s: float,
            reaped: int, metric: str = METRIC) -> dict[str, Any]:
    """Summarise the trials, compute the best one's (on ``metric``) full bound, write and log the best config."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        params = {k: v for k, v in (r.config or {}).items()}
        ending = "failed" if r.error else "completed" if m.get("step", 0) >= steps else "stopped early"
        rows.append({"trial_id": m.get("trial_id"), "ending": ending, "step": m.get("step"),
                     "bpd": m.get("bpd"), "bpd_stderr": m.get("bpd_stderr"), "params": params,
                     metric: m.get(metric), se_key(metric): m.get(se_key(metric)),
                     "error": str(r.error)[:300] if r.error else None})
    ok = [r for r in grid if not r.error and (r.metrics or {}).get(metric) is not None]
    if not ok:
        errors = "; ".join(x["error"] for x in rows if x["error"])[:500]
        raise tracking.fail_run(parent_run_id, f"sweep '{sweep}': no trial reported {metric}: {errors}")
    best = grid.get_best_result(metric=metric, mode=RANKABLE[metric], scope="last", filter_nan_and_inf=True)
    best_cfg = search_space.apply(base, best.config)
    full = _full_bound(best, best_cfg, holdout_url, opts, full_bound_images)

    out_dir = settings.home / "tune" / sweep
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path = out_dir / "best_config.yaml"
    best_path.write_text(best_cfg.to_yaml())
    c = tracking.client()
    metrics = {"best_bpd": float(best.metrics["bpd"]), "best_bpd_stderr": float(best.metrics.get("bpd_stderr", 0.0)),
               f"best_{metric}": float(best.metrics[metric]),
               f"best_{metric}_se": float(best.metrics.get(se_key(metric), float("nan"))),
               "wall_s": wall_s, "trials": float(len(rows)),
               "trials_stopped_early": float(sum(x["ending"] == "stopped early" for x in rows)),
               "trials_failed": float(sum(x["ending"] == "failed" for x in rows))}
    if full is not None:
        metrics["best_bpd_full"], metrics["best_bpd_full_stderr"] = full
    for k, v in metrics.items():
        c.log_metric(parent_run_id, k, v)
    c.set_tag(parent_run_id, "ddpm.tune.best_trial", str(best.metrics.get("trial_id")))
    c.log_artifact(parent_run_id, str(best_path))
    tracking.end_run(parent_run_id)

    endings = {e: sum(x["ending"] == e for x in rows) for e in ("completed", "stopped early", "failed")}
    full_text = (f"; full bound {full[0]:.3f} +- {full[1]:.3f} on {full_bound_images} held-out images"
                 if full else "")
    table = sweep_table.ranked(rows, lambda params: search_space.apply(base, params))
    message = (f"sweep '{sweep}' ({'resumed' if resumed else 'new'}): {len(rows)} trials "
               f"({endings['completed']} completed, {endings['stopped early']} stopped early, "
               f"{endings['failed']} failed) in {wall_s:.0f}s\n" + "\n".join(table) + "\n"
               f"best trial {best.metrics.get('trial_id')} on {metric}: {_ranked_on(best.metrics, metric)}"
               f"bpd estimate {best.metrics['bpd']:.3f} +- {best.metrics.get('bpd_stderr', float('nan')):.3f}"
               f"{full_text}\n"
               f"best config: {best_path} (train it with `ddpm-pipe train --config {best_path}`); "
               f"MLflow parent run {parent_run_id}\n{best_cfg.to_yaml().rstrip()}")
    return {"name": sweep, "resumed": resumed, "parent_run_id": parent_run_id, "wall_s": wall_s,
            "best_trial": best.metrics.get("trial_id"), "best_params": best.config,
            "metric": metric, "best_value": best.metrics[metric], "best_value_se": best.metrics.get(se_key(metric)),
            "best_bpd": best.metrics["bpd"], "best_bpd_stderr": best.metrics.get("bpd_stderr"),
            "best_bpd_full": full[0] if full else None, "best_config_path": str(best_path),
            "best_config": best_cfg.to_dict(), "trials": rows, "endings": endings,
            "placement_groups_reaped": reaped, "message": message}
