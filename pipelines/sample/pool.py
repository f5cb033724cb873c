"""`ddpm-pipe sample`'s workers: one :class:`SampleWorker` per Ray actor (or in this process), and the
:class:`WorkerPool` that hands them units of sample indices (why actors: ``pipelines/sample/command.py``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddpm.data.storage import S3_ENDPOINT_VARS
from ddpm.inference import SamplingNet
from ddpm.noise import sample_seed
from ddpm.pipeline import DDPMPipeline
from pipelines.errors import PipelineError, first_line
from pipelines.registry import models
from pipelines.sample.request import SampleRequest, labels_of
from pipelines.settings import resolve, shareable_uri, worker_home_env

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

    from pipelines.cluster import Placement

PLACEMENT_POLL_S = 5.0  # while no unit finishes, how often the pool checks that its group is still placed


class SampleWorker:
    """One Ray actor (or the command's own process): loads the model once, then samples units of
    indices with the settled ``sampler``, ``steps`` and ``eta``, and for a class-conditional model
    the settled ``classes`` (sample i asks for ``labels_of([i], classes)``) and ``guidance`` (see
    the module docstring and ``pipelines/sample/request.py``)."""

    def __init__(self, uri: str, sampler: str, steps: int, eta: float, precision: str,
                 progressive: int, threads: int, env: dict[str, str], compile: bool = False,
                 classes: tuple[int, ...] = (), guidance: float | None = None) -> None:
        self._error: Exception | None = None
        self.classes = tuple(classes)
        try:
            self._setup(uri, sampler, steps, eta, precision, progressive, threads, env, compile, guidance)
        except Exception as e:  # raised from info(): an actor that dies in __init__ loses the cause
            self._error = e

    def _setup(self, uri: str, sampler: str, steps: int, eta: float, precision: str,
               progressive: int, threads: int, env: dict[str, str], compile: bool, guidance: float | None) -> None:
        os.environ.update(env)  # the tracking store; never credentials (workers read their own)
        torch.set_num_threads(int(os.environ.get("DDPM_TORCH_THREADS") or 0) or max(1, threads))
        start = time.perf_counter()
        loaded = models.load(uri)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Weights cast once and channels-last (ddpm/inference.py): faster than autocast per call.
        self.model = SamplingNet(loaded.model.to(self.device), precision=precision, compile=compile,
                                 log=lambda m: print(f"[sample] {m}", file=sys.stderr, flush=True))
        self.progressive = progressive
        # The driver sizes units to --batch-size, and a unit is sampled as one batch.
        self.pipe = DDPMPipeline.from_config(self.model, loaded.config, loaded.diffusion, sampler=sampler,
                                             steps=steps, eta=eta, batch_size=sys.maxsize, guidance=guidance)
        self._info = {"load_s": time.perf_counter() - start, "device": str(self.device)}

    def info(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        return {**self._info, "node_id": _node_id()}

    def sample(self, indices: list[int], seed: int, call_progress: Callable[[int, int], None] | None = None
               ) -> dict[str, list[int] | float | np.ndarray | None]:
        """x_0 for ``indices`` as float32 ``[n x C x H x W]`` (and the progressive predictions, and the
        class each asked for: ``labels``, None when no class was asked); ``call_progress(calls done,
        calls)`` after each network call (in this process only)."""
        start = time.perf_counter()
        labels = labels_of(indices, self.classes)
        out = self.pipe.from_seeds([sample_seed(seed, i) for i in indices], progressive=self.progressive,
                                   class_labels=labels, call_progress=call_progress)
        x, preds = out if self.progressive else (out, None)
        return {"indices": list(indices), "labels": labels, "seconds": time.perf_counter() - start,
                "x": x.float().cpu().numpy(),
                "progressive": None if preds is None else preds.float().cpu().numpy().swapaxes(0, 1)}


def _node_id() -> str:
    ray = sys.modules.get("ray")  # loaded only by a job on Ray (see WorkerPool)
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


def runs_in_process(req: SampleRequest) -> bool:
    """A one-worker CPU job with no cluster to use runs in this process: no Ray instance to start and
    no actor to launch, which were most of a small local job's time (seconds, not tens of seconds).
    With ``--nodes`` above 1, ``--address``, ``RAY_ADDRESS`` or Ray already running here, the job
    goes to Ray as before; ``DDPM_SAMPLE_IN_PROCESS=0`` sends every job there (to compare)."""
    ray = sys.modules.get("ray")
    if os.environ.get("DDPM_SAMPLE_IN_PROCESS", "1") == "0":
        return False
    return (req.nodes == 1 and req.gpus_per_node == 0 and not req.address and not os.environ.get("RAY_ADDRESS")
            and not (ray is not None and ray.is_initialized()))


class WorkerPool:
    """:func:`pipelines.cluster.workers_for` :class:`SampleWorker` actors in one placement group, or one
    :class:`SampleWorker` in this process (:func:`runs_in_process`).

    Ray is imported by :meth:`_start_actors`, for a job that goes to Ray only: the in-process job
    starts without it (a second of a 6.5 s local job, docs/PERFORMANCE.md).
    """

    def __init__(self, req: SampleRequest, env: dict[str, str]) -> None:
        self.actors: list[ActorHandle] = []
        self.pg: PlacementGroup | None = None
        self.placement: Placement | None = None
        self.started = False
        self._local: SampleWorker | None = None
        if runs_in_process(req):
            self._local = SampleWorker(req.pinned or req.model, req.sampler, req.steps, req.eta, req.precision,
                                       req.progressive, os.cpu_count() or 1, {}, req.compile, req.classes,
                                       req.guidance)
            self.info = {k: v for k, v in self._local.info().items() if k != "node_id"}
            self.info.update(workers=1, nodes_used=1)
            return
        self._start_actors(req, env)

    def _start_actors(self, req: SampleRequest, env: dict[str, str]) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pipelines import cluster

        self._ray = ray
        self._deadline = resolve().placement_timeout
        self.started = cluster.connect(req.address, min_cpus=cluster.workers_for(req.nodes, req.gpus_per_node))
        try:
            placement = self.placement = cluster.plan(req.nodes, req.gpus_per_node, started_locally=self.started)
            bundle = {"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})}
            self.pg = ray.util.placement_group([bundle] * placement.workers, strategy=placement.strategy)
            try:
                ray.get(self.pg.ready(), timeout=self._deadline)
            except ray.exceptions.GetTimeoutError:
                raise cluster.placement_timeout("sampling", placement, self._deadline) from None
            remote = ray.remote(SampleWorker)
            for k in range(placement.workers):
                self.actors.append(remote.options(
                    max_restarts=2, max_task_retries=2,  # a killed worker is restarted, its unit redone
                    num_cpus=placement.cpus_per_worker, num_gpus=1 if placement.use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
                ).remote(req.pinned or req.model, req.sampler, req.steps, req.eta, req.precision, req.progressive,
                         placement.threads_per_worker, env, req.compile, req.classes, req.guidance))
            infos = self._get([a.info.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.info = {"device": infos[0]["device"], "workers": len(self.actors),
                     "nodes_used": len({i["node_id"] for i in infos}), "load_s": max(i["load_s"] for i in infos)}

    def _get(self, refs: object) -> Any:
        """``ray.get(refs)``; a worker's :class:`PipelineError` comes back as itself, any other failure
        as a one-line :class:`PipelineError`."""
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, PipelineError):
                raise cause from None
            raise PipelineError(f"a sampling worker failed: {first_line(e)}") from e

    def run(self, units: Iterable[list[int]], seed: int, on_result: Callable[[dict[str, Any]], None],
            on_partial: Callable[[int], None] | None = None) -> None:
        """Sample every unit; ``on_result`` gets each unit's result on the driver as it arrives. In
        this process, ``on_partial(k)`` also says after each network call that the unit under way is
        k of its samples' worth done (its share of the calls): a progress line for a unit that takes
        minutes on a CPU."""
        if self._local is not None:
            for unit in units:
                n = len(unit)  # read by the callback during this unit's own call only
                calls = None if on_partial is None else (lambda done, total: on_partial(n * done // max(total, 1)))
                on_result(self._local.sample(unit, seed, call_progress=calls))
            return
        queue = deque(units)
        pending: dict[object, ActorHandle] = {}  # the ObjectRef of a unit's result -> its actor
        for actor in self.actors:
            if queue:
                pending[actor.sample.remote(queue.popleft(), seed)] = actor
        unplaced_since: float | None = None
        while pending:
            ready, _ = self._ray.wait(list(pending), num_returns=1, timeout=PLACEMENT_POLL_S)
            if not ready:
                unplaced_since = self._check_placement(unplaced_since)
                continue
            unplaced_since = None
            actor = pending.pop(ready[0])
            if queue:  # keep the actor busy while the driver writes
                pending[actor.sample.remote(queue.popleft(), seed)] = actor
            on_result(self._get(ready[0]))

    def _check_placement(self, since: float | None) -> float | None:
        """While no unit finishes: since when the group has not been placed whole (None: it is), e.g.
        a node that held a worker is gone and Ray waits to restart the actor elsewhere; past the
        deadline, :func:`pipelines.cluster.placement_timeout`'s error (exit 1)."""
        from pipelines import cluster

        if self._ray.util.placement_group_table(self.pg).get("state") == "CREATED":
            return None
        now = time.monotonic()
        since = now if since is None else since
        if now - since > self._deadline:
            raise cluster.placement_timeout("sampling (a worker lost mid-job could not be placed again)",
                                            self.placement, self._deadline)
        return since

    def close(self) -> None:
        if self._local is not None:
            return
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:
                pass
        if self.pg is not None:
            try:
                self._ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
        if self.started:
            self._ray.shutdown()


def worker_env(model: str) -> dict[str, str]:
    """What workers need to resolve a model URI: the tracking store (no secrets: a URI holding
    credentials is left out, the workers read their own, see :func:`pipelines.settings.shareable_uri`)."""
    env: dict[str, str] = {}
    if models.is_mlflow_uri(model):
        settings = resolve()
        uris = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_REGISTRY_URI": settings.registry_uri}
        env = {k: v for k, v in uris.items() if shareable_uri(v)}
    for name in (*S3_ENDPOINT_VARS, "DDPM_TORCH_THREADS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(worker_home_env())  # a node's own DDPM_HOME wins over the driver's
    return env


def units_of(indices: list[int], size: int) -> list[list[int]]:
    """Split sorted ``indices`` into runs of consecutive indices of at most ``size`` each."""
    units: list[list[int]] = []
    for i in indices:
        if units and units[-1][-1] == i - 1 and len(units[-1]) < size:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def unit_size(missing: int, workers: int, batch_size: int) -> int:
    """At most ``batch_size``, and small enough that every worker gets a unit."""
    return max(1, min(batch_size, math.ceil(missing / max(workers, 1))))


__all__ = ["SampleWorker", "WorkerPool", "runs_in_process", "unit_size", "units_of", "worker_env"]
