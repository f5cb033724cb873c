"""The Ray Serve side of ``ddpm-pipe serve``: one deployment holding the model, its HTTP ingress the
FastAPI app of ``pipelines/serve/app.py``, requests batched by :class:`pipelines.serve.batcher.Batcher`.

Each replica loads the model once (:class:`pipelines.serve.model.ModelHolder`; for an alias it polls
the registry every ``reload_every`` seconds and switches to the version the alias moves to), builds
the app around it (``__serve_build_asgi_app__``: Serve calls it after the constructor), and samples
each batch of requests in its one sampling thread (which also loaded the model: why, in
``SampleDeployment.__init__``), so the health routes answer while the network runs.
``max_batch_size`` counts images (a request of ``num`` 4 counts 4; one larger request runs alone);
the requests of a batch that share a sampling setting run as one network batch. The batcher fills the
next batch while the model samples the current one (why not ``@serve.batch``: the batcher's docstring).

:func:`application` is the one place a :class:`ServeOptions` becomes a Serve application: the CLI's
``serve`` command calls it, and a KubeRay ``RayService`` names it as its import path
(``infra/k8s/rayservice.yaml``: ``pipelines.serve.deployment:from_args`` with the options as args).
With several replicas, each polls on its own: for one poll period after an alias moves, replicas may
answer with either version (each response names its own in ``X-Model-Version``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray import serve

from pipelines.serve.api import MAX_NUM, SamplesRequest
from pipelines.serve.app import RequestStats, build_app, token_digest
from pipelines.serve.batcher import Batcher
from pipelines.serve.model import ModelHolder, ServedModel

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.actor import ActorHandle
    from ray.serve import Application

APP_NAME = "ddpm"  # the Serve application's name (serve status, serve.delete)
DEPLOYMENT_NAME = "DDPMSampler"
STATS_EVERY_S = 2.0  # how often a replica hands its request statistics to the command's sink


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` deploys (checked by the command before anything starts)."""

    model: str  # any model URI; an alias is followed
    max_num: int = MAX_NUM  # images per request
    max_batch_size: int = 64  # images per batch (pipelines.serve.batcher)
    batch_wait_timeout: float = 0.01  # seconds a request waits for batch-mates while the model is idle
    reload_every: float = 30.0  # seconds between registry polls (alias URIs); 0: never
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling between them
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    token_sha256: str | None = None  # the bearer token's digest (never the token)
    env: dict[str, str] = field(default_factory=dict)  # what replicas need to reach the store (no secrets)
    stats_sink: ActorHandle | None = None  # the command's StatsSink actor (None: statistics stay in the replica)

    def deployment_options(self) -> dict[str, Any]:
        """``Deployment.options(...)``: replicas or autoscaling, resources, the replicas' environment."""
        threads = max(1, int(self.cpus_per_replica))
        actor = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica,
                 "runtime_env": {"env_vars": {**self.env, "OMP_NUM_THREADS": str(threads),
                                              "DDPM_TORCH_THREADS": str(threads)}}}
        # A replica takes enough requests at once to fill a batch while the previous one runs.
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": max(16, 2 * self.max_batch_size)}
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            opts["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                          "initial_replicas": min(max(self.replicas, low), high),
                                          "target_ongoing_requests": self.max_batch_size}
        else:
            opts["num_replicas"] = self.replicas
        return opts


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SampleDeployment:
    """One replica: the model holder, its request statistics, the batched sampling method."""

    def __init__(self, options: ServeOptions) -> None:
        os.environ.update(options.env)  # the tracking store (no credentials: replicas read their own)
        self.options = options
        self.stats = RequestStats()
        # One thread does all the replica's torch work, from its first operation on: the OpenMP thread
        # team of the first thread to run a parallel region is the fast one; in any other thread a
        # 2-thread torch sampled one digit 3x slower (160 ms against 52 ms; 78 against 115 images/s
        # at 32 images), measured on 2 cores (docs/SERVING.md). Loading happens there too.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddpm-sampling")
        threads = int(os.environ.get("DDPM_TORCH_THREADS") or 1)
        self.holder = self._torch.submit(self._first_load, options.model, threads).result()
        self.holder.follow(options.reload_every)
        self.batcher = Batcher(self.sample_batch, options.max_batch_size, options.batch_wait_timeout,
                               size=lambda req: req.num)
        self._stopped = threading.Event()
        if options.stats_sink is not None:
            threading.Thread(target=self._push_stats, args=(options.stats_sink,), daemon=True).start()

    @staticmethod
    def _first_load(uri: str, threads: int) -> ModelHolder:
        """In the sampling thread: torch's thread count, then the model (its first parallel work)."""
        torch.set_num_threads(threads)
        return ModelHolder(uri)

    def _push_stats(self, sink: ActorHandle) -> None:
        """Hand the (cumulative) statistics to the command's sink every :data:`STATS_EVERY_S`."""
        replica = uuid.uuid4().hex[:8]
        while not self._stopped.wait(STATS_EVERY_S):
            try:
                sink.put.remote(replica, self.stats.snapshot())
            except Exception:  # the command is gone (its sink with it): nothing to report to
                return

    def __serve_build_asgi_app__(self) -> FastAPI:
        limits = {"max_batch_size": self.options.max_batch_size, "batch_wait_timeout": self.options.batch_wait_timeout,
                  "reload_every": self.options.reload_every}
        return build_app(self.holder, self.submit, self.options.max_num, self.options.token_sha256, self.stats,
                         limits)

    async def submit(self, req: SamplesRequest) -> tuple[np.ndarray, ServedModel]:
        return await self.batcher.submit(req)

    async def sample_batch(self, requests: list[SamplesRequest]) -> list[tuple[np.ndarray, ServedModel]]:
        model = self.holder.current  # read once: the whole batch is sampled by this version
        start = time.perf_counter()
        xs = await asyncio.get_running_loop().run_in_executor(self._torch, model.sample, requests)
        self.stats.add_batch(len(requests), sum(r.num for r in requests), time.perf_counter() - start)
        return [(x, model) for x in xs]

    def request_stats(self) -> dict[str, Any]:
        """This replica's :meth:`pipelines.serve.app.RequestStats.snapshot` (the command's summary)."""
        return self.stats.snapshot()

    def serving(self) -> dict[str, Any]:
        """The version this replica serves and when it switched (tests, the command's summary)."""
        return {"pinned": self.holder.current.pinned, "version": self.holder.current.version,
                "switches": self.holder.switches}

    def __del__(self) -> None:
        self._stopped.set()
        self.holder.close()
        self._torch.shutdown(wait=False)


def application(options: ServeOptions) -> Application:
    """The Serve application of ``options`` (``serve.run(application(options), name=APP_NAME)``)."""
    return SampleDeployment.options(**options.deployment_options()).bind(options)


def from_args(args: dict[str, Any]) -> Application:
    """A Serve application builder (``import_path: pipelines.serve.deployment:from_args``) for a
    config file or a KubeRay ``RayService``: ``args`` are :class:`ServeOptions`' fields, plus
    ``token_env``, the variable (set on the cluster's nodes, e.g. from a Kubernetes secret) that holds
    the bearer token."""
    args = dict(args)
    token_env = args.pop("token_env", None)
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ValueError(f"token_env {token_env} is not set on this node; set it or leave token_env out")
        args["token_sha256"] = token_digest(token)
    known = set(ServeOptions.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown serve option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return application(ServeOptions(**args))


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "SampleDeployment", "ServeOptions", "application", "from_args"]
