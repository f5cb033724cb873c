"""Samples/s of the `sample` job against the number of Ray workers on this machine, and the scaling.

    .venv/bin/python -m benchmarks.bench_sample --workers 1 2 --num 64 --steps 10 --out bench-results/sample.json

The model is the `digits` preset's U-Net with random weights (the speed does not depend on training),
saved as a checkpoint; one local Ray instance holds every run, so each worker gets
``cores // workers`` torch threads (cluster.plan). ``samples_per_s`` counts sampling only (workers
already loaded); ``end_to_end_per_s`` includes starting the actors and loading the model.
Scaling efficiency = samples/s with W workers / (W x samples/s with 1 worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def make_model(path: str, preset: str) -> int:
    import torch

    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import ExperimentConfig
    from ddpm.unet import UNet

    cfg = ExperimentConfig.preset(preset)
    torch.manual_seed(0)
    model = UNet(cfg.model)
    sd = model.state_dict()
    save_checkpoint(path, {"config": cfg, "model": sd, "ema": {"module": sd, "num_updates": 0,
                                                               "decay": 0.999, "warmup": True}})
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num", type=int, default=64, help="samples per run")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="digits")
    p.add_argument("--repeats", type=int, default=1, help="runs per worker count; the best is kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (DDPM_TORCH_THREADS); default cores // workers")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    import ray
    import torch

    from pipelines.sample.command import SampleRequest, sample_arrays

    cores = os.cpu_count() or 1
    if args.threads:
        os.environ["DDPM_TORCH_THREADS"] = str(args.threads)
    ray.init(address="local", num_cpus=max(cores, max(args.workers)), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "checkpoint.pt")
        params = make_model(ckpt, args.preset)
        for w in args.workers:
            best = None
            for _ in range(args.repeats):
                req = SampleRequest(model=ckpt, num=args.num, sampler="ddim", steps=args.steps,
                                    batch_size=args.batch_size, nodes=w, seed=0)
                start = time.perf_counter()
                run = sample_arrays(req, progress=False)
                wall = time.perf_counter() - start
                if best is None or run.timings["samples_per_s"] > best[0].timings["samples_per_s"]:
                    best = (run, wall)
            run, wall = best
            if reference is None:
                reference = run.x
            rows.append({"workers": w, "samples_per_s": run.timings["samples_per_s"],
                         "sample_s": run.timings["sample_s"], "startup_s": run.timings["startup_s"],
                         "end_to_end_per_s": round(args.num / wall, 3),
                         "max_abs_diff_vs_first": float((run.x - reference).abs().max())})
    ray.shutdown()
    first = min(rows, key=lambda r: r["workers"])  # the 1-worker run when there is one
    base = first["samples_per_s"] / first["workers"]
    for r in rows:
        r["scaling_efficiency"] = round(r["samples_per_s"] / (r["workers"] * base), 3)
    result = {"benchmark": "sample", "model": f"{args.preset} U-Net, {params} parameters, random weights",
              "sampler": "ddim", "steps": args.steps, "num": args.num, "batch_size": args.batch_size,
              "cores": cores, "threads_per_worker": args.threads or "cores // workers", "torch": torch.__version__, "ray": ray.__version__,
              "machine": platform.processor() or platform.machine(), "runs": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
