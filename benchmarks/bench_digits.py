"""The digits preset in fp32 and bf16: training images/s, final loss and sample quality, side by side.

Both precisions train the ``digits`` preset from the same seed with ``pipelines.loop.train_loop`` in a
plain process for ``--steps`` steps; the loss is the loop's mean over the last quarter of the steps.
Sample quality: the EMA model's ``--samples`` DDIM-50 samples against the real digits, as the Frechet
distance between Gaussians fitted to the pixels (``ddpm.metrics``; lower is better). bf16 passes when
its loss and distance are within noise of fp32's (the seed-to-seed spread is reported with ``--seeds 2``).

    python -m benchmarks.bench_digits [--steps 300 --samples 256] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from benchmarks import common


def _run(url: str, steps: int, precision: str, seed: int, samples: int, quick: bool, real) -> dict[str, float]:
    import torch

    from ddpm.config import ExperimentConfig
    from ddpm.diffusion import Diffusion
    from ddpm.metrics import frechet_distance_from_features
    from ddpm.samplers import ddim_loop
    from ddpm.unet import UNet
    from pipelines.loop import LoopContext, LoopData, train_loop

    cfg = ExperimentConfig.preset("digits").override([
        f"train.max_steps={steps}", f"train.log_every={max(steps // 4, 1)}", f"train.checkpoint_every={steps}",
        f"train.eval_every={10 * steps}", f"train.sample_every={10 * steps}", f"train.precision={precision}",
        f"train.seed={seed}", f"train.warmup_steps={min(200, steps // 4)}"] +
        (["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[4]",
          "train.batch_size=32"] if quick else []))
    final: dict[str, Any] = {}
    out = train_loop(cfg, LoopData(url=url), LoopContext(report=lambda m, s: final.update(s or {}),
                                                         log=lambda msg: None))
    model = UNet(cfg.model).eval()
    model.load_state_dict(final["ema"]["module"])
    x = ddim_loop(Diffusion.from_config(cfg.diffusion), model, (samples, 1, 8, 8), steps=50,
                  generator=torch.Generator().manual_seed(seed))
    fd = frechet_distance_from_features(x.flatten(1).double(), real[: max(samples, 2)].flatten(1).double())
    return {"loss": round(out["loss"], 4), "images_per_s": round(out["images_per_s"], 1),
            "pixel_frechet": round(float(fd), 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seeds", type=int, default=1, help="seeds per precision (spread = noise)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.samples, args.seeds = 4, 8, 1

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
    by = {prec: [r for r in rows if r["precision"] == prec] for prec in ("fp32", "bf16")}
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    result = {"benchmark": "digits_precision", "steps": args.steps, "samples": args.samples,
              "machine": common.machine(threads), "load_before": load_before, "runs": rows,
              "bf16_over_fp32": {k: round(mean(by["bf16"], k) / mean(by["fp32"], k), 3)
                                 for k in ("loss", "images_per_s", "pixel_frechet")}}
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
