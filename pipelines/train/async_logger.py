"""Rank 0's MLflow logging during training: metrics, tags, artifacts and sample grids from a
background thread, so that training never stalls on tracking.

This module imports no MLflow: its thread does, when it sends the first item (see
:meth:`AsyncLogger._send`); a training worker starts its first step without waiting for MLflow's
import (seconds). Everything else about runs is ``pipelines/tracking.py``.

The run's charts open on the loss, the held-out bits/dim and the sample grid: MLflow's UI shows a
chart section per metric-name prefix, sorted by name and before the unprefixed ones, so those
three are named into the section ``training`` and every other metric into ``training details``
(:func:`metric_name`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.settings import redact

log = logging.getLogger(__name__)

# With the sample grid, what a training run's charts open on: the loss, held-out bits/dim and,
# with train.quality_num, the sample-quality scores (pipelines/train/quality.py).
CURVES = ("loss", "bpd", "kid", "pixel_fd", "classifier_score")


def metric_name(name: str) -> str:
    """The MLflow name of a training metric or image (``loss`` -> ``training/loss``,
    ``grad_norm`` -> ``training details/grad_norm``, ``samples`` -> ``training/samples``)."""
    return f"training/{name}" if name in (*CURVES, "samples") else f"training details/{name}"


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
        """``metrics`` at ``step``, each under its chart section (:func:`metric_name`)."""
        self._put(("metrics", {metric_name(k): float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("tag", key, redact(str(value))))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put(("artifact", str(local_path), artifact_path))

    def log_image(self, local_path: str | Path, key: str, step: int) -> None:
        """A PNG as MLflow image ``key`` at ``step`` (the UI's image chart, one slider over steps,
        under the key's chart section, :func:`metric_name`), and the file itself under the artifact
        folder ``key/``."""
        self._put(("artifact", str(local_path), key))
        self._put(("image", str(local_path), metric_name(key), int(step)))

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Flush what can be flushed within ``timeout`` seconds; return delivery counts."""
        self._put(("stop",))
        self._thread.join(timeout)
        pending = self._q.qsize()
        self.dropped += pending
        return {"sent": self.sent, "dropped": self.dropped, "errors": self.errors[-5:]}

    # -- consumer side ------------------------------------------------------------------------
    def _send(self, item: tuple) -> None:
        # MLflow is imported here, on this thread, the first time an item is sent: it takes seconds to
        # import, and no training worker (rank 0 included) waits for it before its first step.
        from mlflow.entities import Metric
        from pipelines.tracking import RedactingClient as MlflowClient  # masks what it stores

        c = MlflowClient()
        kind = item[0]
        if kind == "metrics":
            _, metrics, step, ts = item
            c.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        elif kind == "tag":
            c.set_tag(self.run_id, item[1], item[2])
        elif kind == "artifact":
            c.log_artifact(self.run_id, item[1], item[2])
        elif kind == "image":
            with Image.open(item[1]) as image:
                c.log_image(self.run_id, image.copy(), key=item[2], step=item[3], synchronous=True)

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
