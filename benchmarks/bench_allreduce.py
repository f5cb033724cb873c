"""gloo all-reduce time and bus bandwidth for 1 to 4 processes on this machine (inputs to docs/SCALING.md).

Each world size runs in fresh processes (``torch.multiprocessing.spawn``, one torch thread each) that
all-reduce a float32 buffer of ``--mb`` MiB (default: the CIFAR-10 U-Net's 35.7M parameters, 136 MiB,
i.e. one step's gradients as DDP would send them, un-bucketed) ``--iters`` times. Bus bandwidth uses the
ring formula: bytes on the wire per worker = 2 (N-1)/N x bytes, bus GB/s = that / time.

    python -m benchmarks.bench_allreduce [--workers 1 2 3 4] [--quick] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from typing import Any

from benchmarks import common

CIFAR10_PARAMS = 35_746_307


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, numel: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    buf = torch.ones(numel)
    dist.all_reduce(buf)  # warm-up: connection set-up
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def measure(world: int, numel: int, iters: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, _port(), numel, iters, q), nprocs=world, start_method="spawn")
    times = q.get()
    med = statistics.median(times)
    nbytes = numel * 4
    wire = 2 * (world - 1) / world * nbytes
    return {"workers": world, "bytes": nbytes, "median_s": round(med, 4), "min_s": round(min(times), 4),
            "bus_gb_per_s": round(wire / med / 1e9, 3) if world > 1 else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--mb", type=float, default=CIFAR10_PARAMS * 4 / 2**20, help="buffer size in MiB")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 MiB, 2 iterations, 1-2 workers: a smoke test")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.mb, args.iters = [1, 2], 1.0, 2
    numel = int(args.mb * 2**20 / 4)
    load_before = common.load()
    rows = [{**measure(w, numel, args.iters), "load": common.load()} for w in args.workers]
    result = {"benchmark": "allreduce_gloo", "machine": common.machine(1), "load_before": load_before,
              "mib": round(args.mb, 1), "iters": args.iters, "results": rows}
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
