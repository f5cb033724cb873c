"""Latency and throughput of `ddpm-pipe serve` on loopback, against offline `sample` throughput.

    .venv/bin/python -m benchmarks.bench_serve --requests 20 --out bench-results/serve.json

The model is the `digits` preset's U-Net with random weights (speed does not depend on training),
sampled with the preset's own sampler and steps. Five bounded measurements, each a fixed number of
requests or images and a time limit (whichever ends first):

1. offline: ``sample``'s in-process job (:func:`pipelines.sample.command.sample_arrays`) of
   ``--offline-num`` images in one batch, after a warm-up run: images/s with the model loaded;
2. latency (after one warm-up request and ``--settle`` seconds, so that it does not overlap the new
   deployment's start-up): one client, ``--requests`` requests of one image each in turn: p50/p95 in ms,
   against the bare sampling of one image by the replica's own code (``ServedModel.sample``, no HTTP,
   ``--requests`` times; the target: p95 under 1.5x the bare p50);
3. saturation: ``--concurrency`` clients, ``--requests`` x ``--concurrency`` one-image requests in
   all: images/s and its ratio to offline (batching merges concurrent requests, ``--max-batch-size``);
4. Serve alone: as many ``GET /healthz`` requests from as many clients (nothing sampled): requests/s,
   and the bound it puts on one-image requests, 1 / (1 + offline images/s / requests/s);
5. requests of ``--multi-num`` images (16) from ``--concurrency`` / 16 clients: images/s against offline.

Each client keeps one HTTP connection alive (``--new-connections``: one per request).

One replica with all the cores (``--replicas N``: N sharing them); a local Ray instance started
and ended here. The machine's load average is recorded with the result: the figures are only
comparable at equal load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from benchmarks.bench_sample import make_model
from benchmarks.common import load, machine, write_json

if TYPE_CHECKING:
    from ddpm.config import ExperimentConfig


def _request(url: str, body: dict | None, conn: http.client.HTTPConnection | None = None) -> float:
    """Seconds one request took (an error raises): ``POST /v1/samples`` with ``body``, or ``GET
    /healthz`` without one; on ``conn`` (kept alive between a client's requests, as an application's
    HTTP client does) or a new connection."""
    method, path = ("POST", "/v1/samples") if body is not None else ("GET", "/healthz")
    data = json.dumps(body).encode() if body is not None else None
    start = time.perf_counter()
    if conn is None:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, method=method), timeout=300) as r:
            r.read()
    else:
        conn.request(method, path, data, {"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
    return time.perf_counter() - start


def _clients(url: str, total: int, concurrency: int, limit_s: float, keep_alive: bool = True, num: int = 1,
             health: bool = False) -> dict:
    """``total`` requests of ``num`` images (``health``: ``GET /healthz``, no sampling) from
    ``concurrency`` threads (stopping at ``limit_s``), each client on one kept-alive connection
    unless ``keep_alive`` is off (a new connection per request)."""
    lock = threading.Lock()
    sent = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit_s
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=300) if keep_alive else None
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= total:
                    break
                sent[0] += 1
                seed = sent[0] * num
            try:
                latencies.append(_request(url, None if health else {"num": num, "seed": seed}, conn))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()  # reconnects on the next request
        if conn is not None:
            conn.close()

    start, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    ms = sorted(1000 * s for s in latencies)

    def pct(q: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1) if ms else None

    rate = {"requests_per_s": round(len(latencies) / wall, 1)} if health else {
        "images_per_s": round(num * len(latencies) / wall, 3), "num": num}
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), **rate, "p50_ms": pct(0.5), "p95_ms": pct(0.95), "keep_alive": keep_alive,
            "concurrency": concurrency,
            "client_cpu_cores": round(cpu / wall, 2)}  # what the load generator itself used of the machine


def _bare_one_image(ckpt: str, repeats: int) -> dict:
    """The replica's own sampling of one image (``ServedModel.sample``, model loaded, no HTTP), in ms."""
    from pipelines.serve.api import MAX_NUM, parse_samples
    from pipelines.serve.model import ServedModel

    served = ServedModel.load(ckpt)
    req = parse_samples({"num": 1, "seed": 0}, served.config, served.num_timesteps, MAX_NUM)
    served.sample([req])  # warm: builds the pipeline
    ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        served.sample([req])
        ms.append(1000 * (time.perf_counter() - start))
    ms.sort()
    return {"repeats": repeats, "p50_ms": round(ms[len(ms) // 2], 1), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20, help="latency requests; x --concurrency at saturation")
    # Enough clients to fill the server's batches: saturation is when every batch is full.
    p.add_argument("--concurrency", type=int, default=64, help="clients at saturation")
    p.add_argument("--max-batch-size", type=int, default=64, help="images per batch (serve's default)")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas sharing the machine's cores (each with cores / replicas torch threads)")
    p.add_argument("--batch-wait-timeout", type=float, default=None,
                   help="seconds a batch waits to fill (default: serve's own)")
    p.add_argument("--offline-num", type=int, default=256, help="images of the offline run (one batch: sample's default)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per measurement at most")
    # So that the latency phase does not overlap the new deployment's start-up; what moved its p95
    # most was the machine's load before the run (recorded in the result; docs/SERVING.md).
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds between the warm-up request and the latency measurement")
    p.add_argument("--new-connections", action="store_true",
                   help="a new HTTP connection per request (default: each client keeps one alive)")
    p.add_argument("--multi-num", type=int, default=16,
                   help="images per request in the last measurement (concurrency / multi-num clients, requests each)")
    p.add_argument("--preset", default="digits")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    import ray

    from pipelines.sample.command import SampleRequest, sample_arrays
    from pipelines.sample.request import resolve_settings
    from pipelines.serve.command import start_service
    from pipelines.serve.deployment import ServeOptions
    from scripts.screenshots import free_port

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DDPM_HOME", os.path.join(tmp, "home"))
        ckpt = os.path.join(tmp, "model.pt")
        params = make_model(ckpt, args.preset)
        load_before = load()
        # before Ray starts: sample's in-process job; the first run warms torch up (10x slower on a CPU)
        runs = [sample_arrays(SampleRequest(model=ckpt, num=args.offline_num, batch_size=args.offline_num),
                              progress=False) for _ in range(2)]
        offline = runs[-1]
        offline_ips = offline.timings["samples_per_s"]
        bare = _bare_one_image(ckpt, args.requests)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            wait = {} if args.batch_wait_timeout is None else {"batch_wait_timeout": args.batch_wait_timeout}
            service = start_service(ServeOptions(model=ckpt, max_batch_size=args.max_batch_size, replicas=args.replicas,
                                                 cpus_per_replica=float(max(1, cores // args.replicas)), **wait),
                                    port=free_port(), track=False)
            try:
                _request(service.url, {"num": 1, "seed": 0})  # warm: the first call builds the pipeline
                keep, n = not args.new_connections, args.requests
                time.sleep(args.settle)
                load_latency = load()
                latency = _clients(service.url, n, 1, args.time_limit, keep)
                saturation = _clients(service.url, n * args.concurrency, args.concurrency, args.time_limit, keep)
                batching = service.stats()  # the replica's own count until here: batches, time spent sampling
                # Serve's own cost of a request, no sampling: a bound on one-image requests per second.
                serve_only = _clients(service.url, n * args.concurrency, args.concurrency, args.time_limit, keep,
                                      health=True)
                clients = max(1, args.concurrency // args.multi_num)
                multi = _clients(service.url, n * clients, clients, args.time_limit, keep, num=args.multi_num)
            finally:
                service.stop()
        finally:
            ray.shutdown()
    info = offline.info
    result = {"benchmark": "serve", "preset": args.preset, "params": params, "machine": machine(),
              "load_before": load_before, "sampler": None, "offline": {"num": args.offline_num,
                                                                       "images_per_s": offline_ips,
                                                                       "device": info.get("device")},
              "bare_one_image": bare, "latency_one_image": {**latency, "settle_s": args.settle,
                                                            "load_before": load_latency},
              "latency_p95_vs_bare_p50": round(latency["p95_ms"] / bare["p50_ms"], 3) if latency["p95_ms"] else None,
              "saturation": {**saturation, "replicas": args.replicas,
                                                           "max_batch_size": args.max_batch_size,
                                                           "batch_wait_timeout": service.options.batch_wait_timeout},
              "server": {k: round(v, 3) for k, v in batching.items()
                         if k.startswith(("batches", "mean_batch", "sampling", "one_image"))},
              "saturation_vs_offline": round(saturation["images_per_s"] / offline_ips, 3) if offline_ips else None,
              "http_only": serve_only, "multi_image": multi,
              "multi_image_vs_offline": round(multi["images_per_s"] / offline_ips, 3) if offline_ips else None,
              # With perfect batching a one-image request still costs Serve's own time per request and
              # the offline time per image, on the same cores: the most one-image requests could reach.
              "one_image_bound_vs_offline": round(1 / (offline_ips / serve_only["requests_per_s"] + 1), 3)
              if offline_ips and serve_only["requests_per_s"] else None}
    result["sampler"] = dict(zip(("sampler", "steps", "eta"), resolve_settings(_config(args.preset), None, None, None)))
    print(write_json(result, args.out))
    return result


def _config(preset: str) -> ExperimentConfig:
    from ddpm.config import ExperimentConfig

    return ExperimentConfig.preset(preset)


if __name__ == "__main__":
    main()
