"""The one place that talks to MLflow: runs, nested runs, async metric logging, artifacts, registry.

Training must never stall on tracking: metrics go through :class:`AsyncLogger`, a background thread
with bounded retries and a bounded buffer; what cannot be delivered is counted and reported.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError, UsageError
from pipelines.settings import Settings, redact

log = logging.getLogger(__name__)

RUN_NAME_TAG = "ddpm.run_name"
KIND_TAG = "ddpm.kind"


def configure(settings: Settings) -> None:
    """Point MLflow at the resolved store and bound its HTTP retries (its default retries for minutes)."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def experiment_id(name: str, settings: Settings | None = None) -> str:
    """Get or create an experiment; the local store keeps artifacts under DDPM_HOME/mlartifacts."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if settings is not None and settings.tracking_uri.startswith("sqlite:"):
        location = (settings.home / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter.

    MLflow's parser strips the outer quotes and knows no escapes: a value holding ``'`` goes in
    double quotes, one holding both kinds cannot be written and is refused.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UsageError(f"{value!r} holds both kinds of quote and cannot be searched for in MLflow")


def find_run(exp_id: str, run_name: str, parent_run_id: str | None = None):
    """The newest run of this experiment whose ddpm.run_name tag equals ``run_name``, or None."""
    flt = f"tags.`{RUN_NAME_TAG}` = {quote(run_name)}"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = {quote(parent_run_id)}"
    runs = client().search_runs([exp_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def start_or_resume_run(exp_id: str, run_name: str, tags: dict[str, str] | None = None,
                        parent_run_id: str | None = None) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``: re-running the same name reuses its run (no duplicates)."""
    c = client()
    existing = find_run(exp_id, run_name, parent_run_id)
    if existing is not None:
        c.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, True
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def fail_run(run_id: str, message: str) -> PipelineError:
    """End the run as FAILED; return the error for the caller to raise (``raise fail_run(...) from e``)."""
    end_run(run_id, "FAILED")
    return PipelineError(message)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))
    return out


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params once; on a resumed run the already logged ones are left alone."""
    from mlflow.entities import Param

    c = client()
    have = c.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in flatten(params).items() if k not in have]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])


class AsyncLogger:
    """Log metrics, tags and artifacts from a background thread.

    Each item is retried ``retries`` times with exponential backoff; items that still fail are
    dropped and counted (``dropped``), so a tracking outage costs a gap in the curves, never the run.
    The buffer holds at most ``max_buffer`` items; beyond that the oldest metric is dropped.
    """

    def __init__(self, run_id: str, retries: int = 3, backoff: float = 0.5, max_buffer: int = 10_000):
        self.run_id = run_id
        self.retries = retries
        self.backoff = backoff
        self.sent = 0
        self.dropped = 0
        self.errors: list[str] = []
        self._q: queue.Queue = queue.Queue(maxsize=max_buffer)
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- producer side (training thread): never blocks ---------------------------------------
    def _put(self, item: tuple) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            try:
                self._q.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self._q.put_nowait(item)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", {k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("tag", key, redact(str(value))))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put(("artifact", str(local_path), artifact_path))

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Flush what can be flushed within ``timeout`` seconds; return delivery counts."""
        self._put(("stop",))
        self._thread.join(timeout)
        pending = self._q.qsize()
        self.dropped += pending
        return {"sent": self.sent, "dropped": self.dropped, "errors": self.errors[-5:]}

    # -- consumer side ------------------------------------------------------------------------
    def _send(self, item: tuple) -> None:
        from mlflow.entities import Metric

        c = client()
        kind = item[0]
        if kind == "metrics":
            _, metrics, step, ts = item
            c.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        elif kind == "tag":
            c.set_tag(self.run_id, item[1], item[2])
        elif kind == "artifact":
            c.log_artifact(self.run_id, item[1], item[2])

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item[0] == "stop":
                return
            for attempt in range(self.retries + 1):
                try:
                    self._send(item)
                    self.sent += 1
                    break
                except Exception as e:  # tracking outage: retry, then drop and count
                    if attempt == self.retries:
                        self.dropped += 1
                        self.errors.append(redact(f"{type(e).__name__}: {e}")[:300])
                        log.warning("MLflow logging failed, dropped one %s item: %s", item[0], redact(str(e)))
                    else:
                        time.sleep(self.backoff * 2**attempt)
