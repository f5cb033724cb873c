"""Sampling throughput: denoiser evaluations per second at batch 64, ours against diffusers' UNet2DModel.

Forward passes under ``torch.no_grad`` of the CIFAR-10 architecture in one process, alternating the
models (ABBA), medians over ``--repeats``. Both models carry the same weights (diffusers' default
init, converted into ours): our zero-initialized residual branches produce denormal activations
that slow a CPU by a few percent, which a trained model does not have. Cases: ``ours`` (plain NCHW,
fp32 or bf16 autocast), ``ours_cl`` (``ddpm.inference.SamplingNet``: channels-last, fp32; what the
sample job runs), ``ours_bf16_weights`` / ``ours_bf16_cl`` (SamplingNet with bf16 weights, NCHW /
channels-last; the sample job's ``--precision bf16``), ``diffusers`` (fp32, or bf16 autocast) and
``diffusers_bf16_weights`` (diffusers cast with ``.to(torch.bfloat16)``, a reference only).
With ``--ddim-steps N`` it also times an N-step DDIM run for ``--ddim-num`` images with our sampler
(and SamplingNet, as the sample job) against diffusers' ``DDIMScheduler`` loop (the 1000-step DDPM
time follows from evaluations/s).

    python -m benchmarks.bench_forward [--batch 64 --repeats 3] [--ddim-steps 50] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import common


def _ddim(ours, theirs, steps: int, num: int, size: int) -> dict[str, float]:
    import torch

    from ddpm.config import DiffusionConfig
    from ddpm.diffusion import Diffusion
    from ddpm.samplers import generate

    diffusion = Diffusion.from_config(DiffusionConfig())
    shape = (num, 3, size, size)
    start = time.perf_counter()
    generate(ours, diffusion, shape, "ddim", steps=steps, generator=torch.Generator().manual_seed(0))
    out = {"ours_s": round(time.perf_counter() - start, 2)}
    if theirs is not None:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
        sched.set_timesteps(steps)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        with torch.no_grad():
            for t in sched.timesteps:  # diffusers' documented loop
                x = sched.step(theirs(x, t).sample, t, x).prev_sample
        out["diffusers_s"] = round(time.perf_counter() - start, 2)
        out["ratio"] = round(out["diffusers_s"] / out["ours_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: per-process CPU seconds (robust to other load; use with --threads 1)")
    p.add_argument("--ddim-steps", type=int, default=0, help="also time an N-step DDIM run (0: skip)")
    p.add_argument("--ddim-num", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a tiny model, one repeat: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1
        args.ddim_steps, args.ddim_num = min(args.ddim_steps, 2), 2

    import torch

    threads = common.set_threads(args.threads)
    load_before = common.load()
    from ddpm.inference import SamplingNet

    torch.manual_seed(0)
    theirs = common.diffusers_cifar10(args.quick)
    theirs_bf16 = None
    if theirs is not None:
        theirs.eval()
        theirs_bf16 = common.diffusers_cifar10(args.quick).eval()
        theirs_bf16.load_state_dict(theirs.state_dict())
        theirs_bf16.to(torch.bfloat16)

    def ours_model():
        m = common.ours_cifar10(args.quick).eval()
        if theirs is not None:
            common.copy_diffusers_weights(theirs, m)
        return m

    ours = ours_model()
    nets = {"ours_cl": SamplingNet(ours_model(), "fp32"),
            "ours_bf16_weights": SamplingNet(ours_model(), "bf16", channels_last=False),
            "ours_bf16_cl": SamplingNet(ours_model(), "bf16")}
    size = ours.config.image_size
    x = torch.randn(args.batch, 3, size, size)
    t = torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():  # one image's forward FLOPs (convolutions and matmuls), for GFLOP/s
        flops_per_image = common.count_flops(lambda: ours(x[:1], t[:1]))
    peaks = common.matmul_peaks(args.precisions.split(","), args.quick, args.clock)

    def case(model, precision: str, xx=x):
        def run() -> float:
            now = common.clock(args.clock)
            with torch.no_grad(), common.autocast(precision):
                start = now()
                common.call(model, xx, t)
                return args.batch / (now() - start)
        return run

    rows = []
    for prec in args.precisions.split(","):
        if prec == "fp32":
            cases = {"ours": case(ours, prec), "ours_cl": case(nets["ours_cl"], prec)}
        else:  # SamplingNet casts inside; no autocast around it
            cases = {"ours": case(ours, prec), "ours_bf16_weights": case(nets["ours_bf16_weights"], "fp32"),
                     "ours_bf16_cl": case(nets["ours_bf16_cl"], "fp32")}
        if theirs is not None:
            cases["diffusers"] = case(theirs, prec)
            if prec == "bf16":
                cases["diffusers_bf16_weights"] = case(theirs_bf16, "fp32", x.to(torch.bfloat16))
        for c in cases.values():
            c()  # warm-up
        ips = common.alternate(cases, args.repeats)
        row: dict[str, Any] = {"precision": prec, "batch": args.batch, "load": common.load()}
        row.update(common.summarize(ips, "evals_per_s", flops_per_image, peaks[prec]["median_gflops"]))
        row.update(common.ratios_to(ips, "diffusers"))  # against diffusers as its users run it
        rows.append(row)

    result = {"benchmark": "forward", "model": "quick" if args.quick else "cifar10 U-Net (35.7M)",
              "machine": common.machine(threads), "load_before": load_before, "repeats": args.repeats, "clock": args.clock,
              "gflop_per_image_fwd": round(flops_per_image / 1e9, 2), "matmul_peak": peaks, "results": rows}
    if args.ddim_steps:
        result["ddim"] = {"steps": args.ddim_steps, "num": args.ddim_num, "load": common.load(),
                          **_ddim(nets["ours_cl"], theirs, args.ddim_steps, args.ddim_num, size)}
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
