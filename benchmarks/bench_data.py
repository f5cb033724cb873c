"""Decode throughput of the shard reader, in samples/s per core, from local and S3 shards.

One :class:`~ddpm.data.reader.ShardLoader` with no worker processes and one torch thread reads
``--epochs`` epochs (fetch, sha256 check, tar parse, PNG decode, scaling to [-1, 1], flips for
cifar); samples/s per core = samples / CPU seconds of this process (wall-clock rate alongside).
Datasets: ``digits`` (the real 8 x 8 set) and ``cifar`` (your archive with ``--cifar PATH``, else
synthetic 32 x 32 RGB images smooth enough to compress like photographs). S3 is moto's server in
a child process on loopback (``--s3-endpoint URL --s3-bucket NAME`` for a real one), so it measures
the client's cost, not a network.

    python -m benchmarks.bench_data [--json-out bench-results/data.json] [--no-s3]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common


def _synthetic_cifar(n: int, seed: int = 0):
    from ddpm.data.sources import Sample

    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.normal(128, 50, (4, 4, 3))
        img = np.kron(low, np.ones((8, 8, 1))) + rng.normal(0, 12, (32, 32, 3))  # blocks + texture
        yield Sample(f"{i:07d}", np.clip(img, 0, 255).astype(np.uint8), int(i % 10))


def _prepare(name: str, url: str, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from ddpm.data.shards import write_shards
    from ddpm.data.sources import open_source

    if name == "digits":
        return write_shards(open_source("digits"), url, shard_size=args.shard_size, storage_options=options).manifest
    if args.cifar:
        src = open_source(args.cifar)
        return write_shards(src, url, shard_size=args.shard_size, storage_options=options).manifest
    return write_shards(_synthetic_cifar(args.cifar_samples), url, shard_size=args.shard_size, source="cifar-synthetic",
                        split="train", levels=256, storage_options=options).manifest


def _measure(url: str, args: argparse.Namespace, options: dict[str, Any], flip: bool) -> dict[str, float]:
    import torch

    from ddpm.data.reader import ShardLoader

    torch.set_num_threads(1)
    loader = ShardLoader(url, args.batch_size, seed=0, random_flip=flip, storage_options=options)
    batches = loader.batches_per_epoch * args.epochs
    it = iter(loader)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = batches * args.batch_size
    return {"samples": samples, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "samples_per_s_per_core": round(samples / cpu, 1), "samples_per_s_wall": round(samples / wall, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="digits,cifar", help="comma-separated: digits, cifar")
    p.add_argument("--cifar", default=None, help="a cifar-10-python.tar.gz (default: synthetic images)")
    p.add_argument("--cifar-samples", type=int, default=10_000, help="synthetic cifar images")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-s3", action="store_true", help="local shards only")
    p.add_argument("--s3-endpoint", default=None, help="an S3 endpoint to use instead of a local moto server")
    p.add_argument("--s3-bucket", default="ddpm-bench")
    p.add_argument("--json-out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    results: list[dict[str, Any]] = []
    moto = None
    with tempfile.TemporaryDirectory() as tmp:
        storages: list[tuple[str, str, dict[str, Any]]] = [("local", tmp, {})]
        if not args.no_s3:
            endpoint = args.s3_endpoint
            if endpoint is None:
                os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
                os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
                moto, endpoint = _start_moto()
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            if moto is not None:
                client.create_bucket(Bucket=args.s3_bucket)
            storages.append(("s3", f"s3://{args.s3_bucket}/bench-{os.getpid()}", {"endpoint_url": endpoint}))
        try:
            for name in args.datasets.split(","):
                for storage, base, options in storages:
                    url = f"{base}/{name}/train"
                    manifest = _prepare(name, url, args, options)
                    size = sum(s["size"] for s in manifest["shards"]) / manifest["num_samples"]
                    row = {"dataset": name, "storage": storage, "num_samples": manifest["num_samples"],
                           "shape": manifest["shape"], "shard_bytes_per_sample": round(size),
                           "batch_size": args.batch_size, "random_flip": name == "cifar"}
                    row.update(_measure(url, args, options, flip=name == "cifar"))
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait()
    report = {"benchmark": "data_decode", "python": platform.python_version(), "machine": platform.machine(),
              "processor": platform.processor(), "cpus": os.cpu_count(), "results": results}
    print(common.write_json(report, args.json_out))
    return report


if __name__ == "__main__":
    main()
