"""`ddpm-pipe distill`: the driver side of a progressive distillation (Salimans & Ho 2022).

Resolve the teacher (a model URI, pinned to a version) and check it, the rounds (K -> ... -> N steps,
:mod:`pipelines.distill.schedule`), the data (default: the teacher's own) and storage, all before any
run or Ray job (bad input: exit 2) -> one MLflow run, resumed by name, with one nested run per round
-> one Ray Train job running every round (:func:`pipelines.distill.worker.distill_main`) through
train's machinery (:func:`pipelines.train.command.fit`: the progress channel, failure handling,
Ctrl-C) -> the last round's student becomes a version of ``<teacher name>-distilled``, its tags
naming its teacher's pinned version and its rounds.
"""

from __future__ import annotations

import os
from typing import Any

from ray.train import Result

from ddpm.config import ExperimentConfig
from ddpm.data.storage import open_fs, storage_options_for
from ddpm.diffusion import Diffusion
from pipelines import cluster, console, tracking
from pipelines.distill.schedule import (PREDICTIONS, SUFFIX, Round, check_teacher, first_grid, from_steps, grid_spacing,
                                        plan_rounds, student_config)
from pipelines.distill.worker import distill_main
from pipelines.errors import Interrupted, UsageError
from pipelines.names import check_name
from pipelines.registry import models
from pipelines.registry.register import log_and_register
from pipelines.settings import resolve
from pipelines.storage.data import check_data, check_splits_disjoint, resolve_data
from pipelines.storage.run_folder import run_folder
from pipelines.train.command import check_builds, connect_and_place, fit, with_options
from pipelines.train.loop import NO_STEP_LIMIT
from pipelines.train.ray_train import CHECKPOINT_FILE

# The student starts at its teacher's weights: a from-scratch rate (digits: 2e-3) wrecked it in two
# 4-minute rounds (KID 0.43 against 0.14 for the teacher's DDIM-8). At 10 minutes in all from 128
# steps, 3e-4 beat 1e-4 on fine spread in two training seeds (about 0.006, 3.2-5.0 standard errors)
# and 1e-3 was behind 3e-4 on classifier score and confidence (docs/DISTILL.md).
DISTILL_LR = 3e-4
SETTABLE = ("train.", "data.")  # what --set may change (:func:`_check_overrides`)
TEACHER_TAG = "ddpm.teacher"  # the student version's (and run's) teacher: models:/NAME/VERSION (pinned)
ROUNDS_TAG = "ddpm.distill.rounds"  # e.g. "32->16,16->8"
STEPS_TAG = "ddpm.distill.steps"  # N, the student's sampling steps
FROM_STEPS_TAG = "ddpm.distill.from_steps"  # K, the first teacher's
SPACING_TAG = "ddpm.distill.spacing"  # the grid's spacing (cosine, or trailing where cosine does not nest)
PREDICTION_TAG = "ddpm.distill.prediction"  # what the student predicts (eps, v, edm)


def distill_command(teacher: str, steps: int, from_steps_: int | None = None, overrides: list[str] | None = None,
                    data: str | None = None, storage: str | None = None, nodes: int = 1, gpus_per_node: int = 0,
                    max_steps: int | None = None, max_time: float | None = None, precision: str | None = None,
                    experiment: str | None = None, run_name: str | None = None, name: str | None = None,
                    address: str | None = None, max_failures: int = 3,
                    prediction: str | None = None, in_all: bool = False) -> dict[str, Any]:
    """Distill ``teacher`` into a ``steps``-step student on Ray; returns the run, the rounds and the
    registered student. ``max_steps`` / ``max_time`` are per round, or for all rounds together with
    ``in_all`` (:func:`~pipelines.distill.schedule.round_budget`); ``prediction`` is what the student
    predicts (default: the teacher's; v from an eps teacher is the paper's choice)."""
    _check_overrides(overrides or [])
    if prediction is not None and prediction not in PREDICTIONS:
        raise UsageError(f"--prediction {prediction!r}: valid: {', '.join(PREDICTIONS)}")
    meta = models.describe(teacher)  # exit 2: no such model
    teacher_uri = models.pinned(teacher, meta)
    teacher_cfg = models.read_config(teacher)  # exit 2: not a model of this project
    check_teacher(teacher_cfg, teacher)
    T = teacher_cfg.diffusion.timesteps
    K = from_steps(teacher_cfg, from_steps_)
    rounds = plan_rounds(K, steps, T)
    alphas_cumprod = Diffusion.from_config(teacher_cfg.diffusion).alphas_cumprod
    spacing = grid_spacing(alphas_cumprod, K, steps)
    given = name is not None
    name = name or f"{meta['name'] or teacher_cfg.train.registered_model}{SUFFIX}"
    check_name(name, "--name" if given else "the student's name (<teacher name>-distilled)")
    cfg = student_config(teacher_cfg, steps, name, spacing, prediction).with_values({"train.lr": DISTILL_LR})  # --set train.lr: below
    if max_steps is not None or max_time is not None:  # a budget given: the teacher's time budget is not inherited
        cfg = cfg.with_values({"train.max_time": None})
    cfg = with_options(cfg.override(overrides or []), overrides or [], max_steps, precision, max_time)
    if in_all and cfg.train.max_steps < len(rounds):
        raise UsageError(f"--in-all: {cfg.train.max_steps} training steps cannot be shared among {len(rounds)} "
                         f"rounds; give --max-steps {len(rounds)} or more")
    run_name = run_name or name
    check_name(run_name, "--run-name")
    check_name(experiment or cfg.name, "--experiment" if experiment else "the teacher's config's name")
    workers = cluster.workers_for(nodes, gpus_per_node)
    check_builds(cfg, workers)
    settings = resolve(storage, address)
    data_url, holdout_url = resolve_data(cfg, data, settings)
    check_data(data_url, cfg)
    if holdout_url:
        check_splits_disjoint(data_url, holdout_url, "train")
    loaded = models.load(teacher_uri)
    weights = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}

    run_url = f"{settings.storage.rstrip('/')}/{run_name}"
    fs, root = open_fs(run_url, storage_options_for(run_url))
    with run_folder(fs, root, run_url, "distill"):
        tracking.configure(settings)
        exp_id = tracking.experiment_id(experiment or cfg.name, settings)
        tags = {tracking.KIND_TAG: "distill", TEACHER_TAG: teacher_uri, **_schedule_tags(rounds, K, steps, cfg)}
        run_id, resumed = tracking.start_or_resume_run(exp_id, run_name, tags, claim={tracking.STORAGE_TAG: run_url})
        round_ids = [tracking.start_or_resume_run(exp_id, f"{run_name}-round{r.index + 1}",
                                                  {tracking.KIND_TAG: "distill-round"}, parent_run_id=run_id)[0]
                     for r in rounds]
        gpus_per_node, placement = connect_and_place(settings, nodes, gpus_per_node, "distill")
        run = {"nodes": nodes, "gpus_per_node": gpus_per_node, "workers": placement.workers, "data": data_url}
        tracking.log_params(run_id, {**cfg.to_dict(), "run": run,
                                     "distill": {"teacher": teacher_uri, "from_steps": K, "steps": steps,
                                                 "budget": "in all" if in_all else "per round"}})
        for r, rid in zip(rounds, round_ids):
            tracking.log_params(rid, {"round": r.index + 1, "teacher_steps": r.teacher_steps,
                                      "student_steps": r.student_steps})
        tracking.log_dataset(run_id, data_url, "training", storage_options_for(data_url))
        console.info(f"[distill] {teacher_uri} from {K} to {steps} steps in {len(rounds)} round(s)"
                     f"{_budget(cfg, in_all)}; {placement.workers} worker(s), run '{run_name}' "
                     f"({'resuming' if resumed else 'new'}), MLflow run {run_id}")
        extra = {"rounds": rounds, "round_run_ids": round_ids, "first_grid": first_grid(alphas_cumprod, K, spacing), "teacher": weights,
                 "name": name, "teacher_prediction": teacher_cfg.diffusion.prediction, "in_all": in_all}
        try:
            result = fit(cfg, settings, placement, run_name, run_id, data_url, holdout_url, max_failures,
                         worker=distill_main, extra=extra)
        except BaseException as e:  # the parent run was ended by fit; its round runs end as it did
            for rid in round_ids:
                if tracking.client().get_run(rid).info.status == "RUNNING":
                    tracking.end_run(rid, "KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
            raise
        for rid in round_ids:
            tracking.end_run(rid)
        return _register(result, name, run_name, run_id, resumed, teacher_uri, rounds, K, steps, cfg)


def _check_overrides(overrides: list[str]) -> None:
    """``--set`` may change how the student is trained (``train.*``, ``data.*``), not the network,
    process or sampler it shares with its teacher (its weights start as the teacher's)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(SETTABLE):
            raise UsageError(f"--set {key}: distill may set only {', '.join(s + '*' for s in SETTABLE)}; the student "
                             "keeps its teacher's network, diffusion and (distilled) sampler")


def _schedule_tags(rounds: list[Round], K: int, N: int, cfg: ExperimentConfig) -> dict[str, str]:
    return {ROUNDS_TAG: ",".join(f"{r.teacher_steps}->{r.student_steps}" for r in rounds),
            FROM_STEPS_TAG: str(K), STEPS_TAG: str(N), SPACING_TAG: cfg.sample.spacing or "",
            PREDICTION_TAG: cfg.diffusion.prediction}


def _budget(cfg: ExperimentConfig, in_all: bool) -> str:
    tc = cfg.train
    steps = f"{tc.max_steps} steps" if tc.max_steps < NO_STEP_LIMIT else ""
    time = f"{tc.max_time:g} s" if tc.max_time else ""
    budget = " or ".join(x for x in (steps, time) if x)
    return f", {budget} in all" if in_all else f" of {budget} each"


def _register(result: Result, name: str, run_name: str, run_id: str, resumed: bool, teacher_uri: str,
              rounds: list[Round], K: int, N: int, cfg: ExperimentConfig) -> dict[str, Any]:
    """Log the last round's student (EMA weights, its config saying DDIM on its N-step grid) as the
    run's model, register it as a version of ``name`` tagged with its teacher and rounds, end the run."""
    with console.phase("distill", f"registering the student as a new version of '{name}'"), \
            result.checkpoint.as_directory() as d, console.muted():
        version = log_and_register(run_id, os.path.join(d, CHECKPOINT_FILE), name)
    c = tracking.client()
    for key, value in {TEACHER_TAG: teacher_uri, **_schedule_tags(rounds, K, N, cfg)}.items():
        c.set_model_version_tag(name, version, key, value)
    tracking.end_run(run_id)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    model_uri = f"models:/{name}/{version}"
    return {
        "run_id": run_id, "resumed": resumed, "metrics": metrics, "checkpoint": result.checkpoint.path,
        "model_uri": model_uri, "registered_model": name, "version": version, "teacher": teacher_uri,
        "from_steps": K, "steps": N, "rounds": [[r.teacher_steps, r.student_steps] for r in rounds],
        "message": (f"distilled {teacher_uri} from {K} to {N} steps in {len(rounds)} round(s) "
                    f"({metrics.get('step')} steps in all, last loss {metrics.get('loss', float('nan')):.4f}); "
                    f"registered {model_uri}; MLflow run {run_id}"),
    }
