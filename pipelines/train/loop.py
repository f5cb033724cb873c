"""The per-worker training loop, shared by `train` (Ray Train), `tune` (Tune trials) and benchmarks.

The loop knows nothing of Ray: a :class:`LoopContext` gives it its rank, device, the checkpoint to
resume from, a way to wrap the model for data parallelism and a way to report. Ray Train, Ray Tune
and a plain process each provide one.

One optimizer step (paper, algorithm 1):
  1. x_0 ~ q(x_0): a batch of this rank's shard share, in [-1, 1]
  2. t ~ Uniform({0..T-1}), eps ~ N(0, I)
  3. gradient step on ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2
  4. clip the global gradient norm, Adam, learning-rate warm-up, EMA update.

The run ends at ``train.max_steps`` or, when ``train.max_time`` is set, at the first step that ends
past that many seconds of training (counted from the loop's start plus what the resumed checkpoint
had trained), whichever comes first; a new run takes at least one step (its budget may be spent by
the time it is ready, a distillation round's share of one especially). Rank 0's clock decides and every rank follows it
(:attr:`LoopContext.agree`), so all ranks stop after the same step. The last step does what a
finished run's does: log, held-out bits/dim, sample grid, final checkpoint; ``ddpm.stop_reason``
(``max_steps`` or ``max_time``) and ``ddpm.stop_step`` are set on the run. The learning-rate
schedule is a linear warm-up then constant, so it needs no horizon: a time budget changes nothing
about it (a decaying schedule would have to take its horizon from ``max_steps``).
"""

from __future__ import annotations

import ast
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddpm import likelihood
from ddpm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, export_weights
from ddpm.config import ConfigError, ExperimentConfig, TrainConfig
from ddpm.data import check_labels
from ddpm.data.reader import ShardLoader, load_split, to_float
from ddpm.diffusion import Diffusion
from ddpm.ema import EMA
from ddpm.guidance import balanced_labels, training_batch
from ddpm.image import save_grid
from ddpm.inference import compile_or_eager
from ddpm.pipeline import DDPMPipeline
from ddpm.unet import UNet
from pipelines import console
from pipelines.settings import masked_config
from pipelines.train import fault_injection
from pipelines.train.quality import QualityProbe, quality_summary

if TYPE_CHECKING:
    from pipelines.train.async_logger import AsyncLogger


BPD_CALLS = 16  # model calls of the held-out bits/dim estimate (likelihood.bits_per_dim_estimate's strata)
LINE_EVERY_S = 8.0  # a step line at least this often (so no silence reaches 10 s) when train.log_every steps take longer (no silent minutes)
QUIET_S = 2.0  # a held-out bits/dim or sample grid shorter than this prints no progress line (they repeat)
NO_STEP_LIMIT = 10**12  # train.max_steps when a time budget alone is the limit (`train --max-time`, no step count)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of training on garbage."""


@dataclass
class LoopContext:
    """What a training loop needs from whatever runs it (plain process, Ray Train, Ray Tune)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    restore: Callable[[], dict | None] = lambda: None
    report: Callable[[dict, dict | None], None] = lambda metrics, state: None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    all_gather: Callable[[object], list] = lambda obj: [obj]
    log: Callable[[str], None] = print
    agree: Callable[[bool], bool] = lambda flag: flag  # rank 0's flag, on every rank


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank of the default process group (a one-element broadcast)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def _clock() -> float:
    """The loop's clock (a function, so a test can make one rank's clock run ahead)."""
    return time.perf_counter()


@dataclass
class Objective:
    """What the loop minimises and where a new run starts; the defaults are DDPM's own.

    ``loss(net, x_start, labels) -> [N]`` replaces algorithm 1's loss (``Diffusion.training_loss``):
    distillation's student against its frozen teacher (pipelines/distill/worker.py). ``init``: the
    weights a new run starts from (model and EMA) instead of :func:`build`'s seeded ones, e.g. the
    teacher's (Salimans & Ho 2022, Algorithm 2). ``finished(ema_module)`` is called on every rank
    when the loop ends, however far it ran (a resumed finished run included), with the EMA network.
    """

    loss: Callable[[Callable, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    init: dict[str, torch.Tensor] | None = None
    finished: Callable[[torch.nn.Module], None] | None = None


DDPM = Objective()  # algorithm 1 from a seeded init


@dataclass
class LoopData:
    """Where this worker's data comes from."""

    url: str
    holdout_url: str | None = None
    storage_options: dict | None = None
    holdout_size: int = 256  # held-out images used for the bits/dim estimate


def _autocast(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"]).astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))


def build(cfg: ExperimentConfig, device: torch.device
          ) -> tuple[UNet, EMA, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Diffusion]:
    """Model, EMA, optimizer, warm-up schedule and diffusion for a config (same init on every rank)."""
    torch.manual_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    model = UNet(cfg.model).to(device, memory_format=memory_format)  # before the EMA copies it
    ema = EMA(model, decay=cfg.train.ema_decay)
    # Fused Adam (one kernel over all parameters) has CUDA and CPU kernels; elsewhere, foreach.
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=not fused, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg.train, step))  # a function: not in checkpoints
    return model, ema, opt, sched, Diffusion.from_config(cfg.diffusion)


def lr_factor(tc: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) over ``train.lr``: a linear warm-up over
    ``warmup_steps`` to 1, times, with ``lr_decay="linear"``, ``1 - step / max_steps`` (0 at
    ``max_steps``, where the run ends)."""
    warm = min(1.0, (step + 1) / max(tc.warmup_steps, 1))
    return warm * max(0.0, 1.0 - step / tc.max_steps) if tc.lr_decay == "linear" else warm


def sample_grid(model: torch.nn.Module, diffusion: Diffusion, cfg: ExperimentConfig, path: str, n: int = 64,
                seed: int = 0, label: str = "train", log: Callable[[str], None] | None = None) -> str:
    """Sample ``n`` images with the config's own few-step sampler (its ``sample`` section) and save
    them as one PNG grid; progress with an ETA as ``[label] sample grid: ...`` lines through ``log``
    (default: stderr).

    ``sample.steps`` is capped at T (:meth:`ddpm.pipeline.DDPMPipeline.from_config`): a sweep over T (``ddpm-pipe
    tune``) may pick a T below the preset's step count, and the grid must not end such a run. A
    class-conditional model (K classes) samples every class evenly with the config's guidance: ``n``
    rounded up to whole rows of K, column c asked for class c.
    """
    model.eval()
    K = cfg.model.num_classes
    pipe = DDPMPipeline.from_config(model, cfg, diffusion)
    n = K * math.ceil(n / K) if K else n
    batches = -(-n // pipe.batch_size)
    bar = console.Progress(label, batches * pipe.steps, "call", write=log or console.info, after_s=QUIET_S,
                           what=f"sample grid of {n} ({pipe.sampler}, {pipe.steps} steps)")
    x = pipe(n, seed, call_progress=bar.at, class_labels=balanced_labels(n, K) if K else None)
    bar.close()
    save_grid(x, path, levels=cfg.data.levels, nrow=K or None)
    return path


def _log_best_model(ema_module: torch.nn.Module, cfg: ExperimentConfig, artifact_dir: str, tracker: AsyncLogger,
                    step: int, bpd: float, best_dirs: list[str]) -> None:
    """Log the EMA weights with the lowest held-out bits/dim so far as the run's ``best_model/``
    artifact (``model.safetensors`` + ``config.json``, as ``ddpm-pipe`` logs models); the last
    K checkpoints may all be past it. Each improvement writes a fresh folder, because the tracker
    uploads asynchronously; only the two newest are kept on local disk."""
    folder = os.path.join(artifact_dir, f"best_step{step:07d}")
    export_weights(ema_module, folder, cfg)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        tracker.log_artifact(os.path.join(folder, name), "best_model")
    tracker.set_tag("ddpm.best_model", f"step={step} bpd={bpd:.4f}")
    best_dirs.append(folder)
    while len(best_dirs) > 2:
        shutil.rmtree(best_dirs.pop(0), ignore_errors=True)


@dataclass
class _Holdout:
    """Rank 0's yardsticks: held-out images for bits/dim, the sample-quality probe (``quality_num``)."""

    images: torch.Tensor | None = None
    probe: QualityProbe | None = None


@dataclass
class _Parts:
    """Everything a checkpoint holds the state of besides the counters; the field names are the
    checkpoint's keys."""

    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: ShardLoader

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).state_dict() for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            getattr(self, f.name).load_state_dict(state[f.name])


def _restore_or_seed(state: dict | None, parts: _Parts, ctx: LoopContext, seed: int,
                     tracker: AsyncLogger | None = None) -> tuple[int, int, float, float]:
    """Load a checkpoint's state into ``parts`` and this rank's RNGs, or seed the RNGs for a new run.

    Returns (step, non-finite steps so far, seconds trained, best held-out bits/dim), all zero (and
    inf) for a new run.
    """
    if state is None:
        # Each rank draws its own t and noise; the model init (build) is identical on every rank.
        rank_seed = seed * 1000 + ctx.rank
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed)
        random.seed(rank_seed)
        return 0, 0, 0.0, math.inf
    parts.load_state_dict(state)
    step = int(state["step"])
    rngs = state["rng"]
    _set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])
    ctx.log(f"[train] resumed from step {step}")
    if tracker is not None and ctx.rank == 0:
        tracker.log_metrics({"resumed_from_step": step}, step)
    return (step, int(state.get("nonfinite_total", 0)), float(state.get("train_s", 0.0)),
            float(state.get("best_bpd", math.inf)))


def _optimizer_step(parts: _Parts, net: Callable, diffusion: Diffusion, batches: Iterator[torch.Tensor],
                    cfg: ExperimentConfig, device: torch.device,
                    objective: Objective = DDPM) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step of algorithm 1 (or ``objective.loss``) over ``train.grad_accum`` micro-batches.

    Returns (the last micro-batch's loss, the global gradient norm before clipping, whether both were
    finite). A non-finite step updates nothing (weights, schedule, EMA); the loss scaler still
    updates, so fp16 lowers its scale.
    """
    tc = cfg.train
    opt, scaler = parts.optimizer, parts.scaler
    opt.zero_grad(set_to_none=True)
    for _ in range(tc.grad_accum):
        x, labels = training_batch(next(batches), cfg.model.num_classes, tc.label_dropout)  # labels None: unconditional
        x = x.to(device, non_blocking=True)
        labels = None if labels is None else labels.to(device, non_blocking=True)
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(tc.precision, device):
            if objective.loss is None:
                loss = diffusion.training_loss(net, x, levels=cfg.data.levels, labels=labels).mean()
            else:
                loss = objective.loss(net, x, labels).mean()
        scaler.scale(loss / tc.grad_accum).backward()
    scaler.unscale_(opt)
    # Gradients are all-reduced, so every rank sees the same norm and takes the same branch.
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), tc.grad_clip)
    if not bool(torch.isfinite(grad_norm) & torch.isfinite(loss.detach())):  # one host sync, not two
        opt.zero_grad(set_to_none=True)
        scaler.update()
        return loss, grad_norm, False
    scaler.step(opt)
    scaler.update()
    parts.scheduler.step()
    parts.ema.update(parts.model)
    return loss, grad_norm, True


@dataclass
class _Counters:
    """What the loop counts besides the checkpointed parts; a checkpoint holds these too."""

    step: int
    nonfinite_total: int
    trained_s: float  # seconds of training before this attempt (a resumed checkpoint's)
    best_bpd: float
    loss_sum: torch.Tensor  # since the last log line, on the device (no host sync per step)
    loss_count: int = 0
    nonfinite_run: int = 0
    clock_start: float = 0.0  # _clock() when this attempt started: for the time budget and wall_s
    t_last: float = 0.0  # time.perf_counter() at the last log line: for the images/s of each interval
    step_last: int = 0
    t_line: float = 0.0  # time.perf_counter() at rank 0's last step line (log interval or LINE_EVERY_S)
    stepped: bool = False  # rank 0 has had a step in this attempt (its first gets a line)

    def trained(self) -> float:
        """Seconds of training so far, this attempt and the ones before it."""
        return self.trained_s + _clock() - self.clock_start


def _prepare(cfg: ExperimentConfig, data: LoopData, ctx: LoopContext, tracker: AsyncLogger | None,
             init: dict[str, torch.Tensor] | None = None
             ) -> tuple[_Parts, Diffusion, torch.nn.Module, Callable, _Holdout, _Counters]:
    """Threads, the parts (restored, or seeded and started from ``init``'s weights when given), the
    wrapped and maybe compiled network, rank 0's held-out images and quality probe:
    ``(parts, diffusion, ddp_model, net, holdout, counters)``."""
    tc = cfg.train
    threads = int(os.environ.get("DDPM_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    if tc.batch_size % (ctx.world_size * tc.grad_accum):
        raise ConfigError(f"train.batch_size={tc.batch_size} must divide by workers x grad_accum "
                         f"= {ctx.world_size} x {tc.grad_accum}")
    micro_batch = tc.batch_size // (ctx.world_size * tc.grad_accum)
    model, ema, opt, sched, diffusion = build(cfg, ctx.device)
    state = ctx.restore()
    if state is None and init is not None:
        model.load_state_dict(init)
        ema = EMA(model, decay=tc.ema_decay)  # the average starts as a copy of the initial weights
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=tc.precision == "fp16")
    loader = ShardLoader(data.url, batch_size=micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                         seed=tc.seed, random_flip=cfg.data.random_flip, num_workers=cfg.data.num_workers,
                         storage_options=data.storage_options, return_labels=cfg.model.num_classes > 0)
    check_labels(loader.manifest, cfg.model.num_classes, data.url)  # a conditional model needs labelled data
    parts = _Parts(model, ema, opt, sched, scaler, loader)
    step, nonfinite_total, trained_s, best_bpd = _restore_or_seed(state, parts, ctx, tc.seed, tracker)
    ddp_model = ctx.wrap_model(model)
    net = compile_or_eager(ddp_model, ctx.log, what="model") if tc.compile else ddp_model
    holdout = _Holdout()
    if ctx.rank == 0 and data.holdout_url:
        images, _labels, _manifest = load_split(data.holdout_url, storage_options=data.storage_options)
        holdout.images = to_float(images[: data.holdout_size], cfg.data.levels).to(ctx.device)
        if tc.quality_num:
            holdout.probe = QualityProbe.load(cfg, data.url, data.holdout_url, data.storage_options)
    counters = _Counters(step=step, nonfinite_total=nonfinite_total, trained_s=trained_s, best_bpd=best_bpd,
                         loss_sum=torch.zeros((), device=ctx.device), clock_start=_clock(),
                         t_last=time.perf_counter(), step_last=step)
    counters.t_line = counters.t_last
    return parts, diffusion, ddp_model, net, holdout, counters


def train_loop(cfg: ExperimentConfig, data: LoopData, ctx: LoopContext, tracker: AsyncLogger | None = None,
               artifact_dir: str | None = None, objective: Objective = DDPM) -> dict[str, float]:
    """Train until ``cfg.train.max_steps`` (or the time budget); report metrics, and a checkpoint
    every interval. Each step is :func:`_optimizer_step`, then :func:`_after_step`; ``objective``
    says what a step minimises and where a new run starts (:class:`Objective`)."""
    tc = cfg.train
    start = time.perf_counter()
    what = "[train] preparing the data, the model and the checkpoint"  # worker start to first step: a phase
    if ctx.rank == 0:
        ctx.log(f"{what} ...")
    parts, diffusion, ddp_model, net, holdout, n = _prepare(cfg, data, ctx, tracker, objective.init)
    if ctx.rank == 0:
        ctx.log(f"{what}: {time.perf_counter() - start:.1f} s ({'resuming at' if n.step else 'from'} step {n.step})")
    batches = iter(parts.loader)
    last_metrics: dict[str, float] = {}
    best_dirs: list[str] = []  # local copies of the best EMA weights, newest last

    def out_of_time() -> bool:
        return tc.max_time is not None and ctx.agree(n.trained() >= tc.max_time)

    stop_reason = "max_steps"
    if 0 < n.step < tc.max_steps and out_of_time():  # resumed a run that had spent its budget (a new one steps once)
        stop_reason = "max_time"
    while n.step < tc.max_steps and stop_reason != "max_time":
        ddp_model.train()
        loss, grad_norm, finite = _optimizer_step(parts, net, diffusion, batches, cfg, ctx.device, objective)
        if not finite:
            n.nonfinite_run += 1
            n.nonfinite_total += 1
            ctx.log(f"[train] step {n.step}: non-finite loss/gradient skipped ({n.nonfinite_run} in a row)")
            if n.nonfinite_run >= tc.max_nonfinite:
                raise NonFiniteLossError(
                    f"{n.nonfinite_run} non-finite losses in a row at step {n.step} (train.max_nonfinite="
                    f"{tc.max_nonfinite}); lower train.lr or use precision fp32")
            continue
        n.nonfinite_run = 0
        n.step += 1
        n.loss_sum += loss.detach()
        n.loss_count += 1
        if n.step < tc.max_steps and out_of_time():
            stop_reason = "max_time"
        final = n.step == tc.max_steps or stop_reason == "max_time"
        metrics = _measure(cfg, parts, diffusion, holdout, n, grad_norm, final, artifact_dir, tracker, best_dirs,
                           ctx.log)
        _after_step(cfg, parts, diffusion, ctx, n, metrics, final, artifact_dir, tracker)
        last_metrics.update(metrics)
        fault_injection.exit_if_planned(ctx.rank, n.step)  # test-only: off unless DDPM_FAULT_EXIT is set
        if final:
            # DDP keeps replicas identical; check it, since a silent divergence would waste the run.
            sums = ctx.all_gather(float(sum(p.detach().double().sum() for p in parts.model.parameters())))
            last_metrics["ranks_in_sync"] = float(all(v == sums[0] for v in sums))
            if tracker is not None:
                tracker.log_metrics({"ranks_in_sync": last_metrics["ranks_in_sync"]}, n.step)
        if n.step % tc.checkpoint_every == 0 or final:
            rngs = ctx.all_gather(_rng_state())
            ckpt = None
            if ctx.rank == 0:
                ckpt = {**parts.state_dict(), "step": n.step, "rng": rngs, "nonfinite_total": n.nonfinite_total,
                        "best_bpd": n.best_bpd, "train_s": n.trained(), "config": masked_config(cfg).to_json()}
            extra = {"max_time_reached": float(stop_reason == "max_time")} if final else {}
            ctx.report({"step": n.step, **last_metrics, **extra}, ckpt)
    _stopped(cfg, ctx, n.step, stop_reason, tracker)
    if objective.finished is not None:
        objective.finished(parts.ema.module)
    return {**last_metrics, "step": n.step, "wall_s": _clock() - n.clock_start, "train_s": n.trained(),
            "max_time_reached": float(stop_reason == "max_time")}


def _measure(cfg: ExperimentConfig, parts: _Parts, diffusion: Diffusion, holdout: _Holdout,
             n: _Counters, grad_norm: torch.Tensor, final: bool, artifact_dir: str | None,
             tracker: AsyncLogger | None, best_dirs: list[str], log: Callable[[str], None]) -> dict[str, float]:
    """This step's metrics: the log interval's (loss, gradient norm, learning rate, images/s and
    ``eta_s``) every ``log_every`` steps, the held-out bits/dim (and, with ``quality_num``, the
    sample quality of :mod:`pipelines.train.quality`) every ``eval_every``, and the final step's
    both; a new best bits/dim logs the EMA weights as ``best_model/``. The bits/dim is the
    stratified estimate (:data:`BPD_CALLS` model calls over the held-out images, not the T of the
    full bound), its progress a line through ``log``."""
    tc = cfg.train
    metrics: dict[str, float] = {}
    if n.step % tc.log_every == 0 or final:
        now = time.perf_counter()
        ips = (n.step - n.step_last) * tc.batch_size / max(now - n.t_last, 1e-9)
        metrics.update(loss=float(n.loss_sum) / max(n.loss_count, 1), grad_norm=float(grad_norm),
                       lr=parts.scheduler.get_last_lr()[0], images_per_s=ips, nonfinite_total=n.nonfinite_total)
        eta = (tc.max_steps - n.step) * tc.batch_size / max(ips, 1e-9)
        if tc.max_time is not None:
            eta = min(eta, max(tc.max_time - n.trained(), 0.0))
        metrics["eta_s"] = eta
        n.loss_sum.zero_()
        n.loss_count = 0
        n.t_last, n.step_last = now, n.step
    if holdout.images is not None and (n.step % tc.eval_every == 0 or final):
        ema = parts.ema.module
        ema.eval()
        bar = console.Progress("train", BPD_CALLS, "call", write=log, after_s=QUIET_S,
                               what=f"held-out bits/dim ({len(holdout.images)} images, stratified estimate)")
        with torch.no_grad():
            est, err = likelihood.bits_per_dim_estimate(diffusion, ema, holdout.images, levels=cfg.data.levels,
                                                        num_timesteps=BPD_CALLS, seed=0, progress=bar.at)
        metrics["bpd"] = float(est.mean())
        metrics["bpd_stderr"] = float(err.pow(2).sum().sqrt() / len(err))
        if holdout.probe is not None:
            metrics.update(holdout.probe.measure(ema, diffusion))
        if metrics["bpd"] < n.best_bpd:
            n.best_bpd = metrics["best_bpd"] = metrics["bpd"]
            if artifact_dir and tracker is not None:
                _log_best_model(ema, cfg, artifact_dir, tracker, n.step, n.best_bpd, best_dirs)
    return metrics


def _after_step(cfg: ExperimentConfig, parts: _Parts, diffusion: Diffusion, ctx: LoopContext, n: _Counters,
                metrics: dict[str, float], final: bool, artifact_dir: str | None,
                tracker: AsyncLogger | None) -> None:
    """Rank 0's share of a step: the progress line, the sample grid every ``sample_every`` steps
    (and the last), the metrics to MLflow. ``metrics["eta_s"]`` is for the line only."""
    tc = cfg.train
    eta = metrics.pop("eta_s", None)
    if ctx.rank != 0:
        return
    of = f"/{tc.max_steps}" if tc.max_steps < NO_STEP_LIMIT else ""
    now = time.perf_counter()
    if "loss" in metrics:  # one line per log interval, with bits/dim when measured
        held_out = f" held-out {metrics['bpd']:.3f} bits/dim" if "bpd" in metrics else ""
        held_out += quality_summary(metrics)
        ctx.log(f"[train] step {n.step}{of} loss {metrics['loss']:.4f} "
                f"{metrics['images_per_s']:.1f} img/s{held_out} ETA {eta:.0f}s")
        n.t_line = now
    elif now - n.t_line >= LINE_EVERY_S or not n.stepped:  # a long log interval, or the first step:
        # the step and its ETA, no metrics (the first step's line says training has begun)
        ips = (n.step - n.step_last) * tc.batch_size / max(now - n.t_last, 1e-9)
        left = (tc.max_steps - n.step) * tc.batch_size / max(ips, 1e-9)
        if tc.max_time is not None:
            left = min(left, max(tc.max_time - n.trained(), 0.0))
        ctx.log(f"[train] step {n.step}{of} {ips:.1f} img/s ETA {left:.0f}s")
        n.t_line = now
    n.stepped = True
    if artifact_dir and tracker is not None and (n.step % tc.sample_every == 0 or final):
        path = os.path.join(artifact_dir, f"samples_step{n.step:07d}.png")
        sample_grid(parts.ema.module, diffusion, cfg, path, log=ctx.log)
        tracker.log_image(path, "samples", n.step)
    if metrics and tracker is not None:
        tracker.log_metrics(metrics, n.step)


def _stopped(cfg: ExperimentConfig, ctx: LoopContext, step: int, stop_reason: str,
             tracker: AsyncLogger | None) -> None:
    """Rank 0 says why the run stopped, on the console and as the run's tags."""
    if ctx.rank != 0:
        return
    tc = cfg.train
    ctx.log(f"[train] stopped at step {step}: " + (
        f"train.max_time={tc.max_time:g}s reached" if stop_reason == "max_time"
        else f"train.max_steps={tc.max_steps} reached"))
    if tracker is not None:
        tracker.set_tag("ddpm.stop_reason", stop_reason)
        tracker.set_tag("ddpm.stop_step", str(step))
