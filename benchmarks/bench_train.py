"""Training-step throughput of our CIFAR-10 U-Net against diffusers' UNet2DModel of the same architecture.

One training step is what ``pipelines.train.loop`` does per batch: x_t from ``Diffusion.training_loss``
(uniform t, Gaussian eps), forward, L_simple, backward, global-norm clip, Adam (ours: fused, as the
loop builds it; diffusers: torch's default foreach; ``--same-optimizer``: foreach for both). Both models
run the same step on the same batch in one process, alternating (ABBA), ``--steps`` timed steps per
repeat, medians over ``--repeats``; fp32 and bf16 autocast. Ours runs as the training loop runs it
contiguous (``ours``) and channels-last (``ours_cl``, ``TrainConfig.channels_last``); diffusers as its
users run it (contiguous NCHW; ``--channels-last both`` adds ``diffusers_cl``). Both start from the
same weights (diffusers' init, converted into ours). Ratios are medians of per-repeat ratios, each
pair measured back to back.

Achieved GFLOP/s = FLOPs per image (``torch.utils.flop_counter``, forward + backward) x images/s,
against this machine's matrix-multiply rate measured in the same run.

    python -m benchmarks.bench_train [--batch 16 --repeats 3 --steps 2] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import common


def _step_fn(model, opt, diffusion, x, precision: str, channels_last: bool):
    import torch

    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def net(x_t, t):
        if channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return common.call(model, x_t, t)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with common.autocast(precision):
            loss = diffusion.training_loss(net, xx).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    return step


def profile(step, top: int = 15) -> list[dict[str, Any]]:
    """One step under torch.profiler: the ``top`` operators by self CPU time, with their share."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
             "share": round(e.self_cpu_time_total / total, 3)} for e in rows]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--channels-last", choices=["ours", "both", "none"], default="ours",
                   help="which models also run a channels_last case (ours_cl / diffusers_cl)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: per-process CPU seconds (robust to other load; use with --threads 1)")
    p.add_argument("--same-optimizer", action="store_true",
                   help="foreach Adam for every model (compares the networks alone)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each model (torch.profiler, top operators by self CPU time)")
    p.add_argument("--quick", action="store_true", help="a tiny model, one repeat: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.steps = 4, 1, 1

    import torch

    from ddpm.diffusion import Diffusion
    from ddpm.config import DiffusionConfig

    threads = common.set_threads(args.threads)
    load_before = common.load()
    peaks = common.matmul_peaks(args.precisions.split(","), args.quick, args.clock)
    diffusion = Diffusion.from_config(DiffusionConfig())
    torch.manual_seed(0)
    ours = common.ours_cifar10(args.quick)
    theirs = common.diffusers_cifar10(args.quick)
    if theirs is not None:  # the same weights on both sides (common.copy_diffusers_weights says why)
        common.copy_diffusers_weights(theirs, ours)
    models = {"ours": ours}
    layout = {"ours": False}  # channels_last?
    if args.channels_last in ("ours", "both"):
        models["ours_cl"], layout["ours_cl"] = common.ours_cifar10(args.quick), True
        models["ours_cl"].load_state_dict(ours.state_dict())
    if theirs is not None:
        models["diffusers"], layout["diffusers"] = theirs, False
        if args.channels_last == "both":
            models["diffusers_cl"], layout["diffusers_cl"] = common.diffusers_cifar10(args.quick), True
            models["diffusers_cl"].load_state_dict(theirs.state_dict())
    size = ours.config.image_size
    x = torch.rand(args.batch, 3, size, size) * 2 - 1
    for name, m in models.items():
        m.train()
        if layout[name]:
            m.to(memory_format=torch.channels_last)
    # Ours: the optimizer pipelines.train.loop.build makes (fused Adam); diffusers: torch's default (foreach),
    # as in diffusers' train_unconditional example. --same-optimizer gives every model foreach Adam.
    def adam(name, m):
        fused = name.startswith("ours") and not args.same_optimizer
        return torch.optim.Adam(m.parameters(), lr=2e-4, foreach=not fused, fused=fused or None)
    opts = {name: adam(name, m) for name, m in models.items()}

    # FLOPs of one image's forward + backward (the optimizer's elementwise work is not counted).
    def fwd_bwd():
        common.call(models["ours"], x[:1], torch.tensor([10])).sum().backward()
    flops_per_image = common.count_flops(fwd_bwd)
    models["ours"].zero_grad(set_to_none=True)

    rows = []
    for prec in args.precisions.split(","):
        steps = {name: _step_fn(m, opts[name], diffusion, x, prec, layout[name]) for name, m in models.items()}
        for s in steps.values():
            s()  # warm-up: allocator, oneDNN primitive caches

        def case(step):
            def run() -> float:
                now = common.clock(args.clock)
                start = now()
                for _ in range(args.steps):
                    step()
                return args.batch * args.steps / (now() - start)
            return run

        ips = common.alternate({name: case(s) for name, s in steps.items()}, args.repeats)
        row: dict[str, Any] = {"precision": prec, "batch": args.batch, "load": common.load()}
        row.update(common.summarize(ips, "images_per_s", flops_per_image, peaks[prec]["median_gflops"]))
        row.update(common.ratios_to(ips, "diffusers"))
        rows.append(row)

    profiles = {}
    if args.profile:
        for prec in args.precisions.split(","):
            for name, m in models.items():
                profiles[f"{name} {prec}"] = profile(_step_fn(m, opts[name], diffusion, x, prec, layout[name]))
                print(f"-- {name} {prec}\n" + "\n".join(
                    f"{r['op']:<45} {r['self_s']:8.3f} s {r['share']:6.1%}" for r in profiles[f"{name} {prec}"]))

    result = {"benchmark": "train_step", "model": "quick" if args.quick else "cifar10 U-Net (35.7M)",
              "machine": common.machine(threads), "load_before": load_before, "steps_per_repeat": args.steps, "clock": args.clock,
              "repeats": args.repeats, "optimizer": "foreach Adam for all" if args.same_optimizer else
              "ours: fused Adam (as pipelines.train.loop); diffusers: foreach Adam", "gflop_per_image_fwd_bwd": round(flops_per_image / 1e9, 2),
              "matmul_peak": peaks, "results": rows}
    if profiles:
        result["profile"] = profiles
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
