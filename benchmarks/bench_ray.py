"""Ray overhead: the training loop under 1-worker Ray Train against the same loop in a plain process.

Both run ``pipelines.train.loop.train_loop`` on the ``digits`` preset for ``--steps`` steps from the same
shards, with the same torch thread count (``DDPM_TORCH_THREADS``; Ray otherwise sets
``OMP_NUM_THREADS=1`` in its workers). The plain side uses the default :class:`LoopContext`; the Ray
side is ``pipelines.train.ray_train.worker_main`` inside a ``TorchTrainer`` with one worker and no MLflow run.
Throughput is the loop's own images/s over the second half of the steps (steady state); the
end-to-end time of the Ray side adds worker start-up, checkpoint reporting and shutdown. Runs
alternate (plain, Ray, Ray, plain, ...) and the ratio is the median of per-pair ratios.

    python -m benchmarks.bench_ray [--steps 40 --repeats 2] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from benchmarks import common


def _config(steps: int, quick: bool):
    from ddpm.config import ExperimentConfig, UNetConfig

    cfg = ExperimentConfig.preset("digits")
    train = {"max_steps": steps, "log_every": max(steps // 2, 1), "checkpoint_every": steps,
             "eval_every": 10 * steps, "sample_every": 10 * steps}
    over: dict[str, Any] = {"train": train}
    if quick:
        over["model"] = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                   attn_resolutions=(4,), dropout=0.1).__dict__
        train["batch_size"] = 32
    d = cfg.to_dict()
    for section, values in over.items():
        d[section] = {**d[section], **values}
    return ExperimentConfig.from_dict(d)


def _plain(cfg, url: str) -> dict[str, float]:
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    start = time.perf_counter()
    out = train_loop(cfg, LoopData(url=url), LoopContext(log=lambda msg: None))
    return {"images_per_s": out["images_per_s"], "end_to_end_s": time.perf_counter() - start}


def _ray(cfg, url: str, storage: str, threads: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.ray_train import worker_main

    start = time.perf_counter()
    trainer = TorchTrainer(
        worker_main, train_loop_config={"config": cfg, "data_url": url},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-ray-{time.time_ns()}", storage_path=storage,
                             worker_runtime_env={"env_vars": {"DDPM_TORCH_THREADS": str(threads)}}))
    result = trainer.fit()
    return {"images_per_s": float(result.metrics["images_per_s"]), "end_to_end_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 4, 1

    import ray

    from ddpm.data.shards import write_shards
    from ddpm.data.sources import open_source

    threads = args.threads or os.cpu_count() or 1
    os.environ["DDPM_TORCH_THREADS"] = str(threads)
    load_before = common.load()
    cfg = _config(args.steps, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "digits", "train")
        write_shards(open_source("digits"), url, shard_size=500)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        try:
            cases = {"plain": lambda: _plain(cfg, url),
                     "ray": lambda: _ray(cfg, url, os.path.join(tmp, "ray"), threads)}
            runs = common.alternate(cases, 2 * args.repeats)
        finally:
            ray.shutdown()
    ratios = [r["images_per_s"] / p["images_per_s"] for p, r in zip(runs["plain"], runs["ray"])]
    e2e = [p["end_to_end_s"] / r["end_to_end_s"] for p, r in zip(runs["plain"], runs["ray"])]
    result = {"benchmark": "ray_overhead", "preset": "digits" + (" (quick model)" if args.quick else ""),
              "steps": args.steps, "batch": cfg.train.batch_size, "machine": common.machine(threads),
              "load_before": load_before,
              "plain": {"images_per_s": round(common.median([r["images_per_s"] for r in runs["plain"]]), 2),
                        "end_to_end_s": round(common.median([r["end_to_end_s"] for r in runs["plain"]]), 2)},
              "ray": {"images_per_s": round(common.median([r["images_per_s"] for r in runs["ray"]]), 2),
                      "end_to_end_s": round(common.median([r["end_to_end_s"] for r in runs["ray"]]), 2)},
              "ratio": round(common.median(ratios), 3), "ratio_end_to_end": round(common.median(e2e), 3),
              "ratio_repeats": [round(v, 3) for v in ratios]}
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
