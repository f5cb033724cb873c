"""Sample quality at equal training time: the digits preset against a plain diffusers baseline.

In one process, one after the other, each model trains for the same wall-clock ``--budget``
(default 10 minutes) on the digits training split (1437 images, 8x8, 17 grey levels scaled to
[-1, 1], as ``ddpm-pipe data prepare`` and the training loop read them):

- ``ddpm-pipe``: the ``digits`` preset as ``ddpm-pipe train`` runs it (``pipelines.train.loop.train_loop``
  in this process, ``train.max_time`` = the budget, ``train.max_steps`` out of reach); no held-out
  bits/dim or sample grids during training (the baseline has none either).
- ``diffusers``: the baseline of issue 15, a plain training script: ``UNet2DModel`` with block
  channels (64, 128) and attention at 4x4 (:data:`BASELINE_UNET`, 3,990,017 parameters),
  ``DDPMScheduler`` linear with 1000 steps, epsilon MSE with uniform t, ``AdamW`` at 2e-4 (torch's
  other defaults), batch 128 of shuffled epochs, no clipping, no learning-rate schedule, and EMA with
  warm-up (``diffusers.training_utils.EMAModel``, ``use_ema_warmup=True``, ``power=3/4`` as diffusers'
  ``train_unconditional`` example); the EMA weights sample.

Each model's EMA weights then make ``--samples`` (500) images with every sampler: issue 15's three
(1000-step ancestral, DDIM-50 with eta 0, DPM-Solver++(2M)-20), then the preset's own default (its
``sample`` config: SDE-DPM-Solver++ 2M at 20 calls for ``digits``), the same setting for both. ddpm-pipe through ``pipelines.registry.evaluate.measure_sampler`` (its
``DDPMPipeline``, as ``ddpm-pipe evaluate`` samples); the baseline with diffusers' ``DDPMScheduler``,
``DDIMScheduler`` (``eta`` passed to its ``step``) and ``DPMSolverMultistepScheduler`` (``sde-dpmsolver++``
with ``use_lu_lambdas`` for the SDE solver), in batches of the
same size. Both are scored by
``pipelines.registry.evaluate.score_samples``, the code ``ddpm-pipe evaluate`` scores with: samples on the
data's grey levels against the held-out test split (360 digits), each score with its jackknife standard
error, and the floor (as many training images in place of the samples). ``seconds`` is the wall time
to make the samples. ``vs_diffusers`` gives, per sampler and metric, ddpm-pipe's value minus the
baseline's, that difference in standard errors (``z``) and which is better (``within noise`` under
two standard errors); each row's ``vs_floor`` says per metric whether it is at the real data's floor
within noise, or worse (or better) than it. The copy rate counts only above the real data's own (the floor): a model whose
samples sit nearer to the training images than held-out digits do is copying, one that sits farther
is not better for it (blobs score 0), so two models both under the floor are level.

``--quick``: a few seconds of training, 50 samples, 5/3/3/3 sampler steps: a smoke test whose figures
mean nothing.

    python -m benchmarks.bench_quality [--budget 10m] [--samples 500] [--threads N] [--quick] [--save DIR]
                                       [--json-out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from types import SimpleNamespace
from typing import Any

from benchmarks import common

SAMPLERS = (("ddpm", 1000, 0.0), ("ddim", 50, 0.0), ("dpmpp", 20, 0.0))  # (sampler, steps, eta): issue 15's
QUICK_SAMPLERS = (("ddpm", 5, 0.0), ("ddim", 3, 0.0), ("dpmpp", 3, 0.0))  # three; the preset's own is added
NOISE_Z = 2.0  # a difference of fewer standard errors than this is noise
METRICS = ("kid", "fd", "precision", "recall", "classifier_score", "confidence", "class_tv",
           "classes_covered", "copy_rate", "pixel_fd", "fine_spread")
# Scores that are a fault only above the real data's own value: a copy rate under the floor (samples
# farther from the training images than held-out images are) is no better for being lower.
FAULT_ABOVE_FLOOR = ("copy_rate",)
# Issue 15's baseline: block channels 64/128, attention at the 4x4 level, about 4.0M parameters.
BASELINE_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 2,
    "block_out_channels": (64, 128),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),  # 8x8, then 4x4 with attention
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}
BASELINE_TRAIN = {"lr": 2e-4, "batch_size": 128, "optimizer": "AdamW (torch defaults otherwise)",
                  "ema": {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75},
                  "scheduler": "DDPMScheduler linear, 1000 steps", "grad_clip": None}


def train_ours(url: str, budget: float, seed: int = 0, changes: dict[str, Any] | None = None,
               steps: int | None = None) -> tuple[SimpleNamespace, dict[str, Any]]:
    """The digits preset (with ``changes``, ``with_values`` keys) for ``budget`` seconds of
    ``train_loop``, or ``steps`` steps when given (what a budget buys depends on the machine's
    load; a step count does not); the EMA model, ready to sample."""
    from ddpm.config import ExperimentConfig
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    limit = {"train.max_steps": steps, "train.max_time": None} if steps else {
        "train.max_steps": 10**9, "train.max_time": budget}
    cfg = ExperimentConfig.preset("digits").with_values({**(changes or {}), **limit, "train.seed": seed})
    last: dict[str, Any] = {}
    out = train_loop(cfg, LoopData(url=url), LoopContext(report=lambda m, s: last.update(state=s) if s else None,
                                                         log=lambda msg: None))
    loaded = ema_model(cfg, last["state"])
    info = {"steps": int(out["step"]), "train_s": round(out["wall_s"], 1), "loss": round(out["loss"], 4),
            "images_per_s": round(out["step"] * cfg.train.batch_size / out["wall_s"], 1),
            "params": sum(p.numel() for p in loaded.model.parameters()), "batch_size": cfg.train.batch_size,
            "stopped_by_time": bool(out["max_time_reached"]), "config": cfg.to_dict()}
    return loaded, info


def ema_model(cfg: Any, state: dict[str, Any]) -> SimpleNamespace:
    """The EMA weights of a training ``state`` (a checkpoint's dict) as a model to sample: what
    :func:`train_ours` returns, and ``bench_recipes --reuse`` from a kept checkpoint."""
    from ddpm.diffusion import Diffusion
    from ddpm.unet import UNet

    model = UNet(cfg.model)
    model.load_state_dict(state["ema"]["module"])
    return SimpleNamespace(model=model.eval(), config=cfg, diffusion=Diffusion.from_config(cfg.diffusion),
                           uri=None, state=state)


def train_baseline(x_train, budget: float, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Issue 15's diffusers script for ``budget`` seconds: the first step ending past it is the last."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**BASELINE_UNET)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=BASELINE_TRAIN["lr"])
    ema = EMAModel(unet.parameters(), **BASELINE_TRAIN["ema"])
    batch, n = BASELINE_TRAIN["batch_size"], len(x_train)
    g = torch.Generator().manual_seed(seed)
    order, pos, step, losses = torch.randperm(n, generator=g), 0, 0, []
    unet.train()
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        if pos + batch > n:  # a new epoch, reshuffled (the short last batch is dropped)
            order, pos = torch.randperm(n, generator=g), 0
        x0 = x_train[order[pos:pos + batch]]
        pos += batch
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        loss = F.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        step += 1
    seconds = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    tail = losses[-max(len(losses) // 4, 1):]
    info = {"steps": step, "train_s": round(seconds, 1), "loss": round(sum(tail) / len(tail), 4),
            "images_per_s": round(step * batch / seconds, 1), "params": sum(p.numel() for p in unet.parameters()),
            "batch_size": batch, "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in BASELINE_UNET.items()},
            "train": BASELINE_TRAIN}
    return unet.eval(), info


def sample_baseline(unet, sampler: str, steps: int, num: int, batch_size: int, seed: int = 0, eta: float = 0.0):
    """``num`` samples ``[num x 1 x 8 x 8]`` in [-1, 1] with diffusers' scheduler for ``sampler``
    (``eta``: DDIM's noise scale, passed to ``DDIMScheduler.step``)."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
    scheduler = {"ddpm": lambda: DDPMScheduler.from_config(base),
                 "ddim": lambda: DDIMScheduler.from_config(base),
                 "dpmpp": lambda: DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++",
                                                                          solver_order=2),
                 # SDE-DPM-Solver++ 2M on steps uniform in log-SNR, as ddpm-pipe's dpmpp-2m-sde samples
                 "dpmpp-2m-sde": lambda: DPMSolverMultistepScheduler.from_config(
                     base, algorithm_type="sde-dpmsolver++", solver_order=2, use_lu_lambdas=True)}[sampler]()
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's; got eta {eta} for {sampler}")
    extra = {"eta": eta} if sampler == "ddim" else {}
    g = torch.Generator().manual_seed(seed)
    xs = []
    with torch.inference_mode():
        for i in range(0, num, batch_size):
            scheduler.set_timesteps(steps)  # also resets the multistep solver's history
            x = torch.randn((min(batch_size, num - i), 1, 8, 8), generator=g) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                eps = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(eps, t, x, generator=g, **extra).prev_sample
            xs.append(x.clamp(-1, 1))
    return torch.cat(xs)


def with_default(samplers, config, quick: bool = False) -> tuple[tuple[str, int, float], ...]:
    """``samplers`` and, when not among them, the model's own default setting
    (:func:`ddpm.pipeline.sampling_settings` of its ``sample`` config; 3 steps with ``quick``)."""
    from ddpm.pipeline import sampling_settings

    sampler, steps, eta = sampling_settings(config.sample, config.diffusion.timesteps)
    own = (sampler, 3 if quick else steps, eta)
    return tuple(samplers) if own in samplers else (*samplers, own)


def setting_name(row: dict[str, Any]) -> str:
    """``ddim-50``; ``ddim-25-eta1`` when eta is not 0; ``dpmpp-20@linspace`` when the spacing is not
    the sampler's own."""
    from ddpm.samplers import default_spacing

    spacing = row.get("spacing")
    own = default_spacing(row["sampler"].removesuffix("-analytic"))
    return (f"{row['sampler']}-{row['steps']}" + (f"-eta{row['eta']:g}" if row.get("eta") else "")
            + (f"@{spacing}" if spacing and spacing != own else ""))


def _row(model: str, r: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "sampler": r["sampler"], "steps": r["steps"], "eta": r["eta"], "num": r["num"],
            "seconds": round(r["sec_per_sample"] * r["num"], 2), "scores": r["scores"], "se": r["se"]}


class Yardstick:
    """Every score of ``evaluate`` for digits, as :class:`ddpm.metrics.Score` objects against the
    held-out split: the feature network's (:class:`ddpm.features.DigitsYardstick`) and the pixel
    scores (:class:`ddpm.pixel_scores.PixelYardstick`), built once so that two sample sets can be
    compared on one reference (:func:`gaps`)."""

    def __init__(self, ev: Any, settings: Any) -> None:
        from ddpm.features import DigitsYardstick, load_digits_feature_net
        from ddpm.pixel_scores import PixelYardstick
        from pipelines.registry.evaluate import K_NEAREST

        net, _ = load_digits_feature_net(settings.home / "cache")
        self.parts = (DigitsYardstick(net, ev.test, ev.train, k=K_NEAREST), PixelYardstick(ev.test, ev.train))

    def scores(self, samples: Any) -> dict[str, Any]:
        return {name: score for part in self.parts for name, score in part.scores(samples).items()}

    def floor_scores(self, num: int) -> dict[str, Any]:
        return {name: score for part in self.parts for name, score in part.floor_scores(num).items()}


def gaps(a: dict[str, Any], b: dict[str, Any], paired: bool, floors: dict[str, float] | None = None,
         ) -> dict[str, tuple[float, float]]:
    """Per metric of :data:`METRICS`: ``a`` minus ``b`` (two :meth:`Yardstick.scores` against one
    reference) on :func:`ddpm.metrics.badness`'s lower-is-better scale, and the jackknife standard
    error of that difference (:func:`ddpm.metrics.score_difference`: the reference's noise, shared,
    cancels). ``paired``: sample j of both sets comes from noise seed j. With ``floors``, a score of
    :data:`FAULT_ABOVE_FLOOR` counts only its excess over the floor."""
    from dataclasses import replace

    from ddpm.metrics import badness, score_difference

    out = {}
    for name in METRICS:
        if name not in a or name not in b:
            continue
        floor = floors.get(name) if floors and name in FAULT_ABOVE_FLOOR else None

        def bad(*sets: Any, stat: Any = a[name].stat, name: str = name, floor: float | None = floor) -> float:
            value = badness(name, stat(*sets))[0]
            return max(value - floor, 0.0) if floor is not None else value

        out[name] = score_difference(replace(a[name], stat=bad), replace(b[name], stat=bad), paired)
    return out


def compare(ours: dict[str, Any], theirs: dict[str, Any], floors: dict[str, float] | None = None,
            paired: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Per metric: ours minus theirs, that difference in standard errors (``z``), and which is better:
    a model is ``better`` only when the difference is at least :data:`NOISE_Z` standard errors
    (``within noise`` otherwise); a score without a standard error (classes_covered) compares as is.
    Values are compared on :func:`ddpm.metrics.badness`'s lower-is-better scale (a ratio best at 1
    by ``|log|``), so ``diff`` and ``z`` are positive when ours is worse. ``mdd`` is the smallest
    difference the comparison could have called (:data:`NOISE_Z` standard errors of the difference).
    The standard error of the difference is that of ``paired`` (:func:`gaps`, which also gives the
    difference) where given; else the two rows' own standard errors combined, which counts the
    shared reference's noise twice. With ``floors``, a score of :data:`FAULT_ABOVE_FLOOR` compares by
    its excess over the floor (``max(value - floor, 0)``; ``diff`` is the difference of the excesses)."""
    from ddpm.metrics import badness

    out = {}
    for name in METRICS:
        if name not in ours["scores"] or name not in theirs["scores"]:
            continue
        a, se_a = badness(name, ours["scores"][name], ours["se"].get(name))
        b, se_b = badness(name, theirs["scores"][name], theirs["se"].get(name))
        if name in FAULT_ABOVE_FLOOR and floors and name in floors:
            a, b = max(a - floors[name], 0.0), max(b - floors[name], 0.0)
        diff, se = a - b, math.hypot(se_a or 0.0, se_b or 0.0)
        if paired and name in paired:
            diff, se = paired[name]
            se = se if math.isfinite(se) else 0.0
        z = diff / se if se > 0 else None
        if diff == 0 or (z is not None and abs(z) < NOISE_Z):
            better = "within noise"
        else:
            better = "ddpm-pipe" if diff < 0 else "diffusers"
        out[name] = {"diff": diff, "z": z, "mdd": NOISE_Z * se if se > 0 else None, "better": better}
    seconds = ours.get("seconds"), theirs.get("seconds")  # none for a floor
    out["seconds_ratio"] = round(seconds[0] / seconds[1], 3) if all(seconds) else None
    return out


def vs_floor(row: dict[str, Any], floors: dict[str, float], floor_se: dict[str, float | None]) -> dict[str, str]:
    """Per metric, the row against the real data's own value: ``at the floor`` within
    :data:`NOISE_Z` standard errors (both sides' combined), else ``worse`` or ``better`` than it
    (on :func:`ddpm.metrics.badness`'s scale). No model can be ahead of another beyond noise on a
    score where both are at the floor."""
    from ddpm.metrics import badness

    out = {}
    for name in METRICS:
        if name not in row["scores"] or name not in floors:
            continue
        a, se_a = badness(name, row["scores"][name], row["se"].get(name))
        f, se_f = badness(name, floors[name], floor_se.get(name))
        if name in FAULT_ABOVE_FLOOR:
            a = max(a, f)  # under the floor is no better
        se = math.hypot(se_a or 0.0, se_f or 0.0)
        if a == f or (se > 0 and abs(a - f) < NOISE_Z * se):
            out[name] = "at the floor"
        else:
            out[name] = "better" if a < f else "worse"
    return out


def table(result: dict[str, Any]) -> str:
    """The markdown table: one row per model and sampler (value ± standard error), then the floor."""
    names = [n for n in METRICS if any(n in r["scores"] for r in result["results"])]
    head = ["model", "sampler", "steps", "eta", *names, f"s / {result['samples']} samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(value, se):
        return f"{value:.4g}" + (f" ± {se:.2g}" if se is not None else "")

    for r in result["results"]:
        lines.append("| " + " | ".join([r["model"], r["sampler"], str(r["steps"]), f"{r.get('eta', 0.0):g}",
                                        *(cell(r["scores"][n], r["se"].get(n)) for n in names),
                                        f"{r['seconds']:.1f}"]) + " |")
    floors, fse = result["floors"], result["floor_se"]
    lines.append("| real data (floor) | - | - | - | "
                 + " | ".join(cell(floors[n], fse.get(n)) if n in floors else "-" for n in names) + " | - |")
    lines.append(f"\n{result['compared']}")
    return "\n".join(lines)


def _duration(text: str) -> float:
    from ddpm.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=_duration, default=600.0,
                   help="training wall time per model: 600, 90s, 10m, 1.5h (default 10m)")
    p.add_argument("--samples", type=int, default=500, help="samples per model and sampler")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="seconds of training, 50 samples, few steps: a smoke test")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="keep both trained models: DIR/ddpm-pipe.pt (a checkpoint `ddpm-pipe evaluate --model` "
                        "takes) and DIR/diffusers/ (UNet2DModel.save_pretrained)")
    p.add_argument("--json-out", default=None,
                   help="default bench-results/bench_quality.json (bench_quality-quick.json with --quick)")
    args = p.parse_args(argv)
    samplers = SAMPLERS
    if args.quick:
        args.budget, args.samples, samplers = min(args.budget, 3.0), 50, QUICK_SAMPLERS
    json_out = args.json_out or os.path.join("bench-results", f"bench_quality{'-quick' if args.quick else ''}.json")

    from pipelines.storage.data import prepare_command
    from pipelines.registry.evaluate import load_eval_data, measure_sampler, score_samples
    from pipelines.settings import resolve

    cores = common.cores()
    threads = common.set_threads(args.threads or cores)
    os.environ["DDPM_TORCH_THREADS"] = str(threads)  # train_loop sets it again from here
    load_before = common.load()
    settings = resolve()  # the feature net's cache: DDPM_HOME/cache, as `ddpm-pipe evaluate`
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "digits")
        for split in ("train", "test"):
            prepare_command(source="digits", out=os.path.join(data, split), split=split)
        loaded, ours_info = train_ours(os.path.join(data, "train"), args.budget, args.seed)
        ev = load_eval_data(loaded.config, data, settings)
    print(f"[bench_quality] ddpm-pipe: {ours_info['steps']} steps in {ours_info['train_s']} s", flush=True)
    unet, theirs_info = train_baseline(ev.train, args.budget, args.seed)
    print(f"[bench_quality] diffusers: {theirs_info['steps']} steps in {theirs_info['train_s']} s", flush=True)
    if args.save:
        from ddpm.checkpoint import save_checkpoint

        os.makedirs(args.save, exist_ok=True)
        save_checkpoint(os.path.join(args.save, "ddpm-pipe.pt"), loaded.state)
        unet.save_pretrained(os.path.join(args.save, "diffusers"))
        print(f"[bench_quality] saved both models in {args.save}", flush=True)

    batch = loaded.config.sample.batch_size
    samplers = with_default(samplers, loaded.config, args.quick)
    rows, first = [], None
    for sampler, steps, eta in samplers:
        ours = measure_sampler(loaded, ev, sampler, steps, eta, args.samples, 1, None, settings)
        start = time.perf_counter()
        x = sample_baseline(unet, sampler, steps, args.samples, batch, args.seed, eta)
        theirs = score_samples(x, time.perf_counter() - start, ev, sampler, steps, eta, settings)
        first = first or ours
        rows += [_row("ddpm-pipe", ours), _row("diffusers", theirs)]
        print(f"[bench_quality] {sampler} {steps} eta {eta:g}: kid {ours['scores'].get('kid', float('nan')):.4g} (ddpm-pipe) "
              f"vs {theirs['scores'].get('kid', float('nan')):.4g} (diffusers)", flush=True)
    compared = ("compared with the test split ("
                f"{len(ev.test)} held-out digits); copy_rate against the training split ({len(ev.train)}); "
                "floor: the same comparison with " + " / ".join(dict.fromkeys(
                    c["label"].split(" vs ")[0] for c in first["floor_compared"].values()))
                + " in place of the samples (copy_rate: the test split's own); ± one jackknife standard error")
    result = {
        "benchmark": "quality", "budget_s": args.budget, "samples": args.samples, "quick": args.quick,
        "machine": common.machine(threads), "load_before": load_before, "load_after": common.load(),
        "models": {"ddpm-pipe": ours_info, "diffusers": theirs_info},
        "samplers": [{"sampler": s, "steps": n, "eta": e} for s, n, e in samplers],
        "results": rows, "floors": first["floors"], "floor_se": first["floor_se"], "compared": compared,
        "feature_net": first.get("feature_net"),
        "vs_diffusers": {setting_name(rows[i]): compare(rows[i], rows[i + 1], first["floors"])
                         for i in range(0, len(rows), 2)},
    }
    for row in rows:
        row["vs_floor"] = vs_floor(row, result["floors"], result["floor_se"])
    print(table(result))
    common.write_json(result, json_out)
    print(f"[bench_quality] wrote {json_out}")
    return result


if __name__ == "__main__":
    main()
