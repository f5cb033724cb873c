"""Connect to (or start) Ray and turn ``--nodes/--gpus-per-node`` into a placement that fits.

A request the cluster cannot place fails at once with what the cluster has, instead of waiting.
:func:`workers_for` is the one rule for how many workers a request makes; :func:`plan` the placement
of a train or sample job, :func:`trial_placement` that of one tune trial's workers.

A request that fits the cluster's size can still wait for ever on a fixed-size cluster: another job
holds the CPUs, or a node is lost and a strictly spread group has nowhere to go. Every wait on
placement (the sample pool's, training's worker group) ends after ``DDPM_PLACEMENT_TIMEOUT``
(:data:`pipelines.settings.PLACEMENT_TIMEOUT`) with :func:`placement_timeout`'s error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import ScalingConfig

from pipelines import console
from pipelines.errors import PipelineError, UsageError
from pipelines.settings import DRIVER_HOME_ENV, PLACEMENT_TIMEOUT_ENV, worker_home_env


@dataclass(frozen=True)
class Placement:
    """How the workers of one job are laid out."""

    workers: int
    use_gpu: bool
    strategy: str  # STRICT_SPREAD (one worker per node), SPREAD or PACK
    cpus_per_worker: float
    threads_per_worker: int  # torch threads per worker so the cores are not oversubscribed


def workers_for(nodes: int, gpus_per_node: int = 0) -> int:
    """How many workers ``--nodes/--gpus-per-node`` make: one per node, times ``gpus_per_node`` when
    there are GPUs (one GPU each)."""
    return nodes * max(gpus_per_node, 1)


def connect(address: str | None = None, min_cpus: int = 1) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local instance; print the dashboard.

    The local instance gets ``max(cores, min_cpus)`` logical CPUs so that ``--nodes 4`` runs on a
    2-core laptop, and runs the dashboard: Ray Train's controller and placement-group cleaner
    query actor states through it (the state API), and people expect its URL. With no port given,
    Ray takes 8265 or the next free one, so several local instances on one machine do not clash.
    What Ray prints is set by the console mode (``pipelines.console``). Returns True when this
    call started a local instance.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = console.ray_init_options()
    if address:
        try:
            context = ray.init(address=address, **common)
        except ConnectionError as e:
            raise UsageError(f"cannot reach the Ray cluster at {address}: {e}") from e
        console.info(f"[ray] connected to {address}; dashboard {_dashboard(context)}")
        return False
    cores = os.cpu_count() or 1
    console.info(f"[ray] starting a local instance ({max(cores, min_cpus)} CPUs) ...")  # seconds, on a busy machine
    for attempt in (1, 2):
        try:
            # include_dashboard=None: Ray starts it, and a dashboard that fails to come up (a busy
            # machine) costs the URL, not the run; True would fail the run.
            context = ray.init(address="local", num_cpus=max(cores, min_cpus), include_dashboard=None, **common)
            break
        except Exception as e:  # Ray gives its raylet 30 s to register, which a busy machine can miss
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            console.info("[ray] the local instance was slow to start (a busy machine?); starting it again")
    console.info(f"[ray] local instance ({max(cores, min_cpus)} CPUs); dashboard {_dashboard(context)}")
    return True


def _dashboard(context: object) -> str:
    """The dashboard URL of what ``ray.init`` returned (a ``RayContext``), or why there is none."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "not running (see dashboard.log in /tmp/ray/session_latest/logs)"
    return url if "://" in url else f"http://{url}"


def capacity() -> dict[str, Any]:
    """What the connected cluster has: alive nodes and their CPUs/GPUs."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "nodes": len(nodes),
        "cpus_per_node": [float(n["Resources"].get("CPU", 0)) for n in nodes],
        "gpus_per_node": [float(n["Resources"].get("GPU", 0)) for n in nodes],
        "total": {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
    }


def plan(nodes: int, gpus_per_node: int = 0, started_locally: bool = False,
         cpus_per_worker: float = 1.0) -> Placement:
    """Check the request against the cluster and choose the placement.

    - One worker per node, times ``gpus_per_node`` when there are GPUs.
    - On a real cluster with one worker per node the group is STRICT_SPREAD: it cannot silently
      pack onto fewer nodes. With several GPUs per node it is PACK (GPUs bound it per node).
    - On a local instance that this command started (one node), the workers are packed there.
    """
    cap = capacity()
    workers = workers_for(nodes, gpus_per_node)
    have = f"the cluster has {cap['nodes']} node(s), CPUs per node {cap['cpus_per_node']}, GPUs per node {cap['gpus_per_node']}"
    if gpus_per_node > 0:
        fitting = [g for g in cap["gpus_per_node"] if g >= gpus_per_node]
        if len(fitting) < nodes:
            raise UsageError(f"--nodes {nodes} --gpus-per-node {gpus_per_node} cannot be placed: {have}")
        strategy = "STRICT_SPREAD" if gpus_per_node == 1 else "PACK"
    elif started_locally or cap["nodes"] == 1:
        total = cap["total"].get("CPU", 0)
        if total < workers * cpus_per_worker:
            raise UsageError(f"--nodes {nodes} needs {workers * cpus_per_worker:g} CPUs: {have}")
        strategy = "PACK"
    else:
        fitting = [c for c in cap["cpus_per_node"] if c >= cpus_per_worker]
        if len(fitting) < nodes:
            raise UsageError(f"--nodes {nodes} cannot be placed one worker per node: {have}")
        strategy = "STRICT_SPREAD"
    cores = os.cpu_count() or 1
    per_node = workers if strategy == "PACK" and gpus_per_node == 0 else max(gpus_per_node, 1)
    threads = max(1, cores // max(per_node, 1)) if (started_locally or cap["nodes"] == 1) else max(1, int(cpus_per_worker))
    return Placement(workers=workers, use_gpu=gpus_per_node > 0, strategy=strategy,
                     cpus_per_worker=cpus_per_worker, threads_per_worker=threads)


def placement_timeout(what: str, placement: Placement, waited: float) -> PipelineError:
    """The error (exit 1) of a wait on placement that ran out: what was asked, what the cluster has
    and has free now, and what to do."""
    cap = capacity()
    bundle = {"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})}
    free = {k: float(v) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return PipelineError(
        f"{what}: {placement.workers} worker(s) of {bundle} each ({placement.strategy}) could not be placed "
        f"within {waited:g} s; the cluster has {cap['nodes']} node(s), CPUs per node {cap['cpus_per_node']}, "
        f"GPUs per node {cap['gpus_per_node']}, free now {free}. Free what other jobs hold (`ray status`), bring "
        f"back or add the nodes, ask for fewer --nodes, or wait longer with {PLACEMENT_TIMEOUT_ENV}=<seconds>")


def trial_placement(workers: int, started_locally: bool = False) -> Placement:
    """The placement of one tune trial's ``workers`` TorchTrainer workers (CPU only).

    Checked against the cluster as :func:`plan` checks a train job (fails at once if they cannot fit),
    then SPREAD with one CPU and one torch thread each, not :func:`plan`'s STRICT_SPREAD or PACK:
    concurrent trials share the cluster, and each trial's group must fit beside the others'.
    """
    plan(workers, 0, started_locally=started_locally)
    return Placement(workers=workers, use_gpu=False, strategy="SPREAD", cpus_per_worker=1.0, threads_per_worker=1)


def scaling_config(placement: Placement) -> ScalingConfig:
    """The Ray Train ``ScalingConfig`` for a placement."""
    return ScalingConfig(
        num_workers=placement.workers,
        use_gpu=placement.use_gpu,
        placement_strategy=placement.strategy,
        resources_per_worker={"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})},
    )


def worker_env(placement: Placement) -> dict[str, Any]:
    """Runtime env for workers: thread counts that do not oversubscribe the cores, and the driver's
    ``DDPM_*`` settings (workers on other nodes do not share the driver's environment).

    Ray Train 2.5x replaces ``print`` in its workers with a logger that also tees to the (wrapped)
    stdout, so every worker line reached the console twice; ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``
    keeps plain ``print`` (lines still land in the worker's log file and reach the driver once).
    """
    n = str(placement.threads_per_worker)
    env = {k: v for k, v in os.environ.items() if k.startswith("DDPM_") and k not in ("DDPM_HOME", DRIVER_HOME_ENV)}
    env.update(worker_home_env())  # a node's own DDPM_HOME wins over the driver's
    env.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "DDPM_TORCH_THREADS": n,
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
    return {"env_vars": env}
