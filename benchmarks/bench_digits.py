"""The digits preset in fp32 and bf16: training images/s, final loss and sample quality, side by side.

Both precisions train the ``digits`` preset from the same seed with ``pipelines.train.loop.train_loop`` in a
plain process for ``--steps`` steps; the loss is the loop's mean over the last quarter of the steps.
Sample quality: the EMA model's ``--samples`` DDIM-50 samples against the real digits, as the Frechet
distance between Gaussians fitted to the pixels (``ddpm.metrics``; lower is better). bf16 passes when
its loss and distance are within noise of fp32's (the seed-to-seed spread is reported with ``--seeds 2``).

Time to a fixed sample quality (``--time-to-quality``): each precision trains again, and every
``--check-every`` steps ``--samples`` DDIM-50 samples of the EMA model are scored with the digits
feature net's Frechet distance against the held-out test split (``ddpm.features``, as
``ddpm-pipe evaluate``); the clock stops when the distance reaches the real data's floor (the same
number of training images compared with the test split the same way; before the yardstick fix the
floor was test images against the training split, which copies of training images beat). Scoring
time is excluded from the training time.

    python -m benchmarks.bench_digits [--steps 300 --samples 256] [--time-to-quality] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from benchmarks import common


def _run(url: str, steps: int, precision: str, seed: int, samples: int, quick: bool, real) -> dict[str, float]:

    from ddpm.metrics import frechet_distance_from_features
    from ddpm.unet import UNet
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    cfg = _cfg(steps, precision, seed, quick)
    final: dict[str, Any] = {}
    out = train_loop(cfg, LoopData(url=url), LoopContext(report=lambda m, s: final.update(s or {}),
                                                         log=lambda msg: None))
    model = UNet(cfg.model).eval()
    model.load_state_dict(final["ema"]["module"])
    x = _ddim50(model, cfg, samples, seed)
    fd = frechet_distance_from_features(x.flatten(1).double(), real[: max(samples, 2)].flatten(1).double())
    return {"loss": round(out["loss"], 4), "images_per_s": round(out["images_per_s"], 1),
            "pixel_frechet": round(float(fd), 3)}


def _ddim50(model, cfg, samples: int, seed: int):
    """``samples`` DDIM-50 (eta 0) samples, sample i from ``ddpm.noise.sample_seed(seed, i)``
    (:class:`ddpm.pipeline.DDPMPipeline`'s seeds: the same images whatever the batch)."""
    from ddpm.pipeline import DDPMPipeline

    return DDPMPipeline.from_config(model, cfg, sampler="ddim", steps=50, eta=0.0)(samples, seed)


class _Reached(Exception):
    """Raised from the report callback to end training once the quality target is met."""


def _cfg(steps: int, precision: str, seed: int, quick: bool, checkpoint_every: int | None = None):
    from ddpm.config import ExperimentConfig

    return ExperimentConfig.preset("digits").override([
        f"train.max_steps={steps}", f"train.log_every={max(steps // 4, 1)}",
        f"train.checkpoint_every={checkpoint_every or steps}",
        f"train.eval_every={10 * steps}", f"train.sample_every={10 * steps}", f"train.precision={precision}",
        f"train.seed={seed}", f"train.warmup_steps={min(200, steps // 4)}"] +
        (["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
          "train.batch_size=32"] if quick else []))


def time_to_quality(url: str, precision: str, check_every: int, max_steps: int, samples: int, quick: bool,
                    seed: int = 0) -> dict[str, Any]:
    """Training seconds until the feature Frechet distance of ``samples`` samples reaches the floor."""
    import time

    import torch

    from ddpm import metrics
    from ddpm.features import digits_split, extract_features, load_digits_feature_net
    from ddpm.unet import UNet
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    net, _ = load_digits_feature_net()
    train_x, _, test_x, _ = digits_split()
    ref = extract_features(net, test_x)  # held out from the model and the feature net
    floor_x = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:samples]]
    floor = float(metrics.frechet_distance_from_features(extract_features(net, floor_x), ref))
    cfg = _cfg(max_steps, precision, seed, quick, checkpoint_every=check_every)
    checks: list[dict[str, float]] = []
    start, scoring = time.perf_counter(), 0.0

    def report(m: dict, state: dict | None) -> None:
        nonlocal scoring
        if state is None:
            return
        t0 = time.perf_counter()
        model = UNet(cfg.model).eval()
        model.load_state_dict(state["ema"]["module"])
        x = _ddim50(model, cfg, samples, seed)
        fd = float(metrics.frechet_distance_from_features(extract_features(net, x), ref))
        checks.append({"step": m["step"], "train_s": round(t0 - start - scoring, 1), "fd": round(fd, 2)})
        scoring += time.perf_counter() - t0
        if fd <= floor:
            raise _Reached

    try:
        train_loop(cfg, LoopData(url=url), LoopContext(report=report, log=lambda msg: None))
    except _Reached:
        pass
    reached = checks[-1] if checks and checks[-1]["fd"] <= floor else None
    return {"precision": precision, "floor_fd": round(floor, 2), "samples": samples, "checks": checks,
            "reached_at_step": reached and reached["step"], "seconds_to_floor": reached and reached["train_s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seeds", type=int, default=1, help="seeds per precision (spread = noise)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--time-to-quality", action="store_true",
                   help="also time each precision's training until its samples' FD against the test split "
                        "reaches the floor (as many training images, scored the same way)")
    p.add_argument("--check-every", type=int, default=250, help="steps between quality checks")
    p.add_argument("--max-steps", type=int, default=3000, help="give up on the quality target after this")
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.seeds = 4, 8, 1
        args.check_every, args.max_steps = 2, 4

    from ddpm.data.reader import load_split, to_float
    from ddpm.data.shards import write_shards
    from ddpm.data.sources import open_source

    threads = common.set_threads(args.threads)
    os.environ["DDPM_TORCH_THREADS"] = str(threads)
    load_before = common.load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "digits", "train")
        write_shards(open_source("digits"), url, shard_size=500)
        images, _, manifest = load_split(url)
        real = to_float(images, manifest["levels"])
        for seed in range(args.seeds):
            for prec in ("fp32", "bf16"):
                rows.append({"precision": prec, "seed": seed, "load": common.load(),
                             **_run(url, args.steps, prec, seed, args.samples, args.quick, real)})
        quality = ([time_to_quality(url, prec, args.check_every, args.max_steps, args.samples, args.quick)
                    for prec in ("fp32", "bf16")] if args.time_to_quality else [])
    by = {prec: [r for r in rows if r["precision"] == prec] for prec in ("fp32", "bf16")}
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    result = {"benchmark": "digits_precision", "steps": args.steps, "samples": args.samples,
              "machine": common.machine(threads), "load_before": load_before, "runs": rows,
              "bf16_over_fp32": {k: round(mean(by["bf16"], k) / mean(by["fp32"], k), 3)
                                 for k in ("loss", "images_per_s", "pixel_frechet")}}
    if quality:
        result["time_to_quality"] = quality
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
