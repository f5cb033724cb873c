"""Classifier-free guidance's cost: network time per sample, guided (w != 1) against unguided (w = 1).

Issue 26 asks guided sampling to cost at most 2.1x the network time of unguided sampling at the same
steps: guidance must be one batched forward pass of 2N rows, not two passes. On the digits-size
U-Net (``UNetConfig.digits()`` with 10 classes) as the sample job runs it (``SamplingNet``, fp32,
channels-last), with random weights (the paper's init zeroes residual branches, whose denormal
activations would slow the CPU), in one process, cases alternated (ABBA), medians over
``--repeats``:

- ``forward``: one network evaluation for ``--batch`` samples: the plain unconditional digits model,
  the conditional model with w = 1 (N rows) and with w = 3 (2N rows); ``ratio_guided`` is the median
  of the per-repeat ratios guided / w = 1.
- ``sampling``: a ``--steps``-step DDIM run of ``--batch`` samples through :class:`DDPMPipeline`,
  w = 3 against w = 1 (the samplers' own arithmetic included).

    python -m benchmarks.bench_guidance [--batch 64 --repeats 5 --steps 25] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import common

GUIDED_W = 3.0  # any w other than 0 and 1 costs the same: one pass of 2N rows
NUM_CLASSES = 10


def _random_weights(model) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the sampling case (0: skip it)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: per-process CPU seconds (robust to other load; use with --threads 1)")
    p.add_argument("--quick", action="store_true", help="batch 4, one repeat, 2 steps: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.steps = 4, 1, min(args.steps, 2)

    import torch

    from ddpm.config import DiffusionConfig, UNetConfig
    from ddpm.diffusion import Diffusion
    from ddpm.guidance import ClassifierFreeGuidance, balanced_labels
    from ddpm.inference import SamplingNet
    from ddpm.pipeline import DDPMPipeline
    from ddpm.unet import UNet

    threads = common.set_threads(args.threads)
    load_before = common.load()
    plain_cfg = UNetConfig.digits()
    cond_cfg = UNetConfig(**{**plain_cfg.__dict__, "num_classes": NUM_CLASSES})
    plain, cond = UNet(plain_cfg), UNet(cond_cfg)
    for m in (plain, cond):
        _random_weights(m)
    plain, cond = SamplingNet(plain, "fp32"), SamplingNet(cond, "fp32")

    n, size = args.batch, plain_cfg.image_size
    x = torch.randn(n, plain_cfg.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1))
    labels = balanced_labels(n, NUM_CLASSES)
    nets = {"unconditional": plain, "conditional_w1": ClassifierFreeGuidance(cond, labels, 1.0, NUM_CLASSES),
            "guided": ClassifierFreeGuidance(cond, labels, GUIDED_W, NUM_CLASSES)}

    def forward_case(net):
        def run() -> float:
            now = common.clock(args.clock)
            with torch.no_grad():
                start = now()
                net(x, t)
                return (now() - start) / n
        return run

    def per_sample(cases: dict) -> dict[str, list[float]]:
        for c in cases.values():
            c()  # warm-up
        return common.alternate(cases, args.repeats)

    def summary(secs: dict[str, list[float]], ref: str) -> dict[str, Any]:
        out: dict[str, Any] = {name: {"ms_per_sample": round(1e3 * common.median(xs), 4),
                                      "repeats_ms": [round(1e3 * v, 4) for v in xs]} for name, xs in secs.items()}
        out["ratio_guided"] = round(common.median([g / r for g, r in zip(secs["guided"], secs[ref])]), 3)
        return out

    result: dict[str, Any] = {
        "benchmark": "guidance", "model": f"digits U-Net, {NUM_CLASSES} classes", "guidance": GUIDED_W,
        "batch": n, "machine": common.machine(threads), "load_before": load_before, "repeats": args.repeats,
        "clock": args.clock,
        "forward": {**summary(per_sample({k: forward_case(v) for k, v in nets.items()}), "conditional_w1"),
                    "load": common.load()},
    }
    if args.steps:
        diffusion = Diffusion.from_config(DiffusionConfig())

        def sampling_case(w: float):
            pipe = DDPMPipeline(cond, diffusion, (plain_cfg.in_channels, size, size), sampler="ddim",
                                steps=args.steps, batch_size=n, num_classes=NUM_CLASSES, guidance=w)

            def run() -> float:
                return common.timed(lambda: pipe(n, seed=0, class_labels=labels), args.clock) / n
            return run

        secs = per_sample({"conditional_w1": sampling_case(1.0), "guided": sampling_case(GUIDED_W)})
        result["sampling"] = {"sampler": "ddim", "steps": args.steps, **summary(secs, "conditional_w1"),
                              "load": common.load()}
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
