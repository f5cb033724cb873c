"""`ddpm-pipe serve`: online sampling of a model URI on Ray Serve, following an alias as it moves.

The command checks everything before anything starts (the options, the token's variable, that the
model exists and its config reads), connects to ``--address`` (or starts a local Ray instance),
starts Serve with its HTTP proxy on ``--host:--port`` (127.0.0.1 unless told otherwise; one proxy,
on the head node), records the start as an MLflow run (experiment ``serve``: the model, its pinned
version, the settings), deploys the application (``pipelines/serve/deployment.py``) and waits
until ``GET /readyz`` answers. Then it waits for Ctrl-C or SIGTERM (``docker stop``, ``kill``, a
Kubernetes pod's end), which stop it alike.

Stopping (:meth:`Service.stop`): the replicas' request statistics are summarised to the run
(requests by status class, latency p50/p95/p99 of sampling requests, images/s), the application is
deleted, Serve is shut down if this command started it, and the local Ray instance if it started
that; it ends with exit 130 after all of it. Serve's own driver-side INFO lines are off unless
``--verbose``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipelines import cluster, console, tracking
from pipelines.errors import Interrupted, PipelineError, UsageError
from pipelines.registry import models
from pipelines.sample.pool import worker_env
from pipelines.serve.app import summarise, token_digest
from pipelines.serve.deployment import APP_NAME, STATS_EVERY_S, ServeOptions, application
from pipelines.serve.model import follows
from pipelines.settings import redact, resolve

if TYPE_CHECKING:
    from ray.actor import ActorHandle

EXPERIMENT = "serve"  # the MLflow experiment of serve runs
READY_TIMEOUT_S = 300.0  # deploying: replicas import torch and load the model (a minute on a busy CPU)


class StatsSink:
    """A Ray actor of the command's: the latest (cumulative) statistics of each replica."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}

    def put(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.snapshots[replica] = snapshot

    def all(self) -> list[dict[str, Any]]:
        return list(self.snapshots.values())


@dataclass
class Service:
    """A deployed service: where it answers, what it serves, and what to undo when it stops."""

    url: str
    options: ServeOptions
    meta: dict[str, str | None]
    run_id: str | None
    started_ray: bool
    started_serve: bool
    sink: ActorHandle | None = None
    started_at: float = field(default_factory=time.time)

    def stop(self, status: str = "FINISHED") -> dict[str, float]:
        """Summarise the statistics to the run, delete the application, shut down what this command
        started; returns the summary."""
        import ray
        from ray import serve

        summary: dict[str, float] = {}
        try:
            summary = self.stats()
        except Exception as e:  # the summary is a report; stopping must go on
            console.info(f"[serve] could not gather the request statistics: {e}")
        try:
            serve.delete(APP_NAME)
            # A local instance this command started ends below, Serve's actors with it; Serve's own
            # shutdown there only adds Ray's "Task ServeController.graceful_shutdown failed" line.
            if self.started_serve and not self.started_ray:
                _shutdown_serve()
        finally:
            if self.sink is not None:
                ray.kill(self.sink)
            if self.run_id is not None:
                self._record(summary, status)
            if self.started_ray:
                ray.shutdown()
        return summary

    def stats(self) -> dict[str, float]:
        """The replicas' statistics so far, summarised (after their next hand-over to the sink)."""
        import ray

        if self.sink is None:
            return {}
        time.sleep(STATS_EVERY_S + 0.5)  # the replicas' last hand-over
        return summarise(ray.get(self.sink.all.remote(), timeout=30))

    def _record(self, summary: dict[str, float], status: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"serve.{k}", v, now, 0) for k, v in {**summary, "uptime_s": time.time() - self.started_at}.items()]
        try:
            tracking.client().log_batch(self.run_id, metrics=metrics)
            tracking.end_run(self.run_id, status)
        except Exception as e:
            console.info(f"[serve] could not record the summary to MLflow run {self.run_id}: {e}")


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _shutdown_serve() -> None:
    """``serve.shutdown()`` without Ray's "Task ServeController.graceful_shutdown failed ... will be
    retried" line: the controller ends itself inside that call, which Serve's client sends with
    endless retries; sent once here, its end is the expected answer."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=30)
    except (ValueError, ray.exceptions.RayActorError):  # no controller, or it ended: Serve is down
        pass
    serve.shutdown()  # forgets the client (nothing is left to stop)


def _quiet_serve() -> None:
    """Serve's driver-side INFO lines ("Started Serve", "Connecting to existing Serve app ... will not be
    applied", "Deleting app") off unless ``--verbose``: Serve sets its logger to INFO when imported."""
    import logging

    from ray import serve  # noqa: F401  (its import configures the logger set here)

    if not console.verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def _serve_client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def _start_serve(host: str, port: int, local: bool) -> bool:
    """Start Serve's controller and HTTP proxy (one, on the head node) at ``host:port``; True if this call
    started it. Serve already running on the cluster is used if it listens there, else refused."""
    from ray import serve

    client = _serve_client()
    if client is not None:
        http = client.http_config
        if (http.host, int(http.port)) != (host, port):
            raise UsageError(f"Serve already runs on this Ray cluster with its HTTP proxy at {http.host}:{http.port}; "
                             f"pass --host {http.host} --port {http.port}, or stop it first (`serve shutdown`)")
        return False
    if local and not _free(host, port):
        raise UsageError(f"{host}:{port} is in use; pass another --port")
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    return True


def _wait_ready(url: str, timeout: float, must: bool = True) -> dict[str, Any]:
    """``GET /readyz`` until it answers 200 (its JSON), or a :class:`PipelineError` after ``timeout``;
    with ``must=False`` (a remote cluster, whose proxy this machine may not reach) one line instead."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    if not must:
        console.info(f"[serve] deployed; {url}/readyz does not answer from here ({last})")
        return {}
    raise PipelineError(f"the service at {url} was not ready after {timeout:g} s ({last}); "
                        "see the replica's log in /tmp/ray/session_latest/logs/serve")


def _start_run(options: ServeOptions, meta: dict[str, str | None], pinned: str, url: str) -> str:
    settings = resolve()
    tracking.configure(settings)
    exp = tracking.experiment_id(EXPERIMENT, settings)
    name = f"serve-{meta.get('name') or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, _ = tracking.start_or_resume_run(exp, name, tags={tracking.KIND_TAG: "serve"})
    tracking.log_params(run_id, {"model": redact(options.model), "pinned": pinned, "model_name": meta.get("name"),
                                 "model_version": meta.get("version"), "model_run_id": meta.get("run_id"),
                                 "url": url, "token": options.token_sha256 is not None,
                                 **{k: getattr(options, k) for k in (
                                     "max_num", "max_batch_size", "batch_wait_timeout", "reload_every", "replicas",
                                     "min_replicas", "max_replicas", "gpus_per_replica", "cpus_per_replica")}})
    return run_id


def start_service(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  track: bool = True) -> Service:
    """Check, connect, start Serve, deploy ``options`` and wait until ready (module docstring);
    ``track=False`` records no MLflow run (benchmarks)."""
    import ray

    _quiet_serve()
    if options.min_replicas is not None and options.max_replicas is not None and options.min_replicas > options.max_replicas:
        raise UsageError(f"--min-replicas {options.min_replicas} is above --max-replicas {options.max_replicas}")
    meta = models.describe(options.model)  # exit 2 for a model that is not there
    pinned = models.pinned(options.model, meta)
    models.read_config(pinned)  # and one whose config does not read, before anything starts
    started_ray = cluster.connect(address)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if host in ("0.0.0.0", "::"):
        url = f"http://127.0.0.1:{port}"
    started_serve = run_id = sink = None
    try:
        started_serve = _start_serve(host, port, local=started_ray)
        sink = ray.remote(StatsSink).options(num_cpus=0).remote()
        options = replace(options, env={**worker_env(options.model), **options.env}, stats_sink=sink)
        run_id = _start_run(options, meta, pinned, url) if track else None
        from ray import serve

        console.info(f"[serve] deploying {redact(options.model)} ({pinned}) ...")
        serve.run(application(options), name=APP_NAME, route_prefix="/")
        _wait_ready(url, READY_TIMEOUT_S if started_ray or not address else 30.0, must=started_ray or not address)
    except BaseException:
        service = Service(url, options, meta, run_id, bool(started_ray), bool(started_serve), sink)
        try:
            service.stop("FAILED")
        except Exception:
            pass
        raise
    return Service(url, options, meta, run_id, started_ray, bool(started_serve), sink)


def serve_command(model: str, host: str, port: int, address: str | None, replicas: int, min_replicas: int | None,
                  max_replicas: int | None, gpus_per_replica: float, cpus_per_replica: float, max_batch_size: int,
                  batch_wait_timeout: float, max_num: int, reload_every: float, token_env: str | None) -> dict[str, Any]:
    """`ddpm-pipe serve`: see the module docstring. Returns only after Ctrl-C (exit 130)."""
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise UsageError(f"--token-env {token_env}: the variable is not set (or empty); export {token_env}=<token> "
                             "or leave --token-env out")
    options = ServeOptions(model=model, max_num=max_num, max_batch_size=max_batch_size,
                           batch_wait_timeout=batch_wait_timeout, reload_every=reload_every, replicas=replicas,
                           min_replicas=min_replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica,
                           cpus_per_replica=cpus_per_replica, token_sha256=token_digest(token) if token else None)
    service = start_service(options, host, port, address)
    auth = f" -H \"Authorization: Bearer ${token_env}\"" if token_env else ""
    moving = f"; following {model} (polled every {reload_every:g} s)" if follows(model) and reload_every > 0 else ""
    console.info(f"[serve] {service.meta.get('name') or model} version {service.meta.get('version') or '-'} "
                 f"at {service.url}{moving}. Ctrl-C stops.\n"
                 f"  curl{auth} -X POST {service.url}/v1/samples -d '{{\"num\": 4, \"seed\": 0}}'\n"
                 f"  curl{auth} -o grid.png '{service.url}/v1/samples.png?num=16&seed=0'")
    print(f"[serve] ready at {service.url}", file=sys.stderr, flush=True)
    stopped_by = "Ctrl-C"

    def terminate(signum: int, frame: Any) -> None:  # docker stop, kill, a Kubernetes pod's end
        nonlocal stopped_by
        stopped_by = "SIGTERM"
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Ray's own handler is C code: nothing to put back
        summary = service.stop("FINISHED")
        served = f"{summary.get('requests', 0):.0f} request(s), {summary.get('images', 0):.0f} image(s)"
        raise Interrupted(f"serve stopped ({stopped_by}) after {served}; application deleted") from None


__all__ = ["EXPERIMENT", "Service", "StatsSink", "serve_command", "start_service"]
