"""The Ray Train worker of `ddpm-pipe distill`: the rounds, each one run of the training loop.

Each round is :func:`pipelines.train.loop.train_loop` with an :class:`~pipelines.train.loop.Objective`:
the loss is :meth:`ddpm.distill.ProgressiveDistillation.loss` of the student against the round's
frozen teacher, a new round's student starts from the teacher's weights (Salimans & Ho 2022,
Algorithm 2), and the student's EMA weights at the round's end are the next round's teacher.

Checkpoints are the loop's, plus ``distill``: the round, the steps and seconds of the rounds before
it and the round's teacher weights. A restarted worker group (a lost worker) or a re-run of the same
``--run-name`` resumes from the latest one, mid-round. The loop's own step counts from 0 in each
round; what is reported to Ray (and names the checkpoint folders) is the step over all rounds, so
that the latest checkpoint is also the highest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ddpm.config import ExperimentConfig
from ddpm.diffusion import Diffusion
from ddpm.distill import ProgressiveDistillation
from ddpm.unet import UNet
from pipelines.distill.schedule import Round, round_budget, round_grid, student_config
from pipelines.train.loop import LoopContext, Objective, train_loop
from pipelines.train.ray_train import log_placement, loop_data, rank0_tracker, worker_context

STATE_KEY = "distill"  # the checkpoint's key of the round's state


def distill_main(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point (``train_loop_per_worker``) of a distillation.

    ``loop_config`` is train's (:func:`pipelines.train.command.fit`) with ``rounds`` (list of
    :class:`Round`), ``round_run_ids`` (one nested MLflow run each), ``first_grid`` (the first
    teacher's timesteps), ``teacher`` (its EMA weights) and ``name`` (the student's registered name).
    """
    cfg: ExperimentConfig = loop_config["config"]
    rounds: list[Round] = loop_config["rounds"]
    ctx = worker_context(loop_config)
    latest = ctx.restore()
    state = latest[STATE_KEY] if latest is not None else {"round": 0, "offset": 0, "teacher": loop_config["teacher"]}
    teacher_weights, offset = state["teacher"], int(state["offset"])
    spent = float(state.get("spent_s", 0.0))  # seconds of the rounds before (checkpoints before 2026-12-06: none)
    for r in rounds[int(state["round"]):]:
        resumed = latest if latest is not None and int(latest[STATE_KEY]["round"]) == r.index else None
        round_cfg = student_config(cfg, r.student_steps, loop_config["name"], cfg.sample.spacing)  # the run's grid
        if loop_config.get("in_all"):  # the budget is for all rounds: this round's share
            steps, time = round_budget(cfg.train.max_steps, cfg.train.max_time, len(rounds), r.index, spent)
            round_cfg = round_cfg.with_values({"train.max_steps": steps, "train.max_time": time})
        teacher = _frozen(round_cfg, teacher_weights, ctx.device)
        diffusion = Diffusion.from_config(round_cfg.diffusion)
        # the first teacher predicts what it was trained to; a later round's teacher is a student
        first = loop_config.get("teacher_prediction", round_cfg.diffusion.prediction)
        reads = Diffusion.from_config(dataclasses.replace(round_cfg.diffusion, prediction=first)) \
            if r.index == 0 and first != round_cfg.diffusion.prediction else diffusion
        distill = ProgressiveDistillation(diffusion, round_grid(loop_config["first_grid"], r), reads)
        end: dict[str, dict[str, torch.Tensor]] = {}
        objective = Objective(
            loss=lambda net, x, labels, d=distill, t=teacher: d.loss(net, t, x, labels=labels),
            init=teacher_weights,
            finished=lambda ema, end=end: end.update(weights={k: v.detach().cpu().clone()
                                                              for k, v in ema.state_dict().items()}))
        round_state = {"round": r.index, "offset": offset, "teacher": teacher_weights, "spent_s": spent}
        round_ctx = _round_context(ctx, r, len(rounds), resumed, round_state)
        with rank0_tracker(loop_config, ctx, loop_config["round_run_ids"][r.index], "distill") as (tracker, art):
            log_placement(ctx, tracker)
            final = train_loop(round_cfg, loop_data(loop_config), round_ctx, tracker=tracker, artifact_dir=art,
                               objective=objective)
            if tracker is not None:
                tracker.log_metrics({"wall_s": final.get("wall_s", 0.0)}, int(final["step"]))
        teacher_weights, offset = end["weights"], offset + int(final["step"])
        spent += max(ctx.all_gather(float(final["train_s"])))  # the ranks' clocks differ by a little: one figure


def _frozen(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], device: torch.device) -> UNet:
    """The round's teacher: the network with ``weights``, in eval mode, no gradients."""
    net = UNet(cfg.model)
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False)


def _round_context(ctx: LoopContext, r: Round, total: int, resumed: dict | None, state: dict) -> LoopContext:
    """``ctx`` for round ``r``: restores ``resumed`` (this round's checkpoint, or None: a new round),
    reports the step over all rounds with the round's ``state`` in each checkpoint, and says
    ``[distill round i/R: K -> K/2 steps]`` where the loop says ``[train]``."""
    base_report, base_log = ctx.report, ctx.log
    tag = f"[distill {r.label(total)}]"

    def report(metrics: dict, ckpt: dict | None) -> None:
        step = int(metrics["step"])
        base_report({**metrics, "step": state["offset"] + step, "round": r.index + 1, "round_step": step},
                    None if ckpt is None else {**ckpt, STATE_KEY: state})

    return dataclasses.replace(ctx, restore=lambda: resumed, report=report,
                               log=lambda line: base_log(line.replace("[train]", tag, 1)))


__all__ = ["STATE_KEY", "distill_main"]
