"""What a person sees: quiet by default, Ray's and MLflow's own logs with ``--verbose``.

Quiet (the default) means one line per phase, live progress and the closing summary, on stderr
(stdout is left to the result, so ``--json`` stays machine-readable). What makes it quiet:
- Ray does not forward its processes' output to the driver (``log_to_driver=False``): the Train
  controller, the placement-group cleaner and the workers write to their log files under the Ray
  session folder (``/tmp/ray/session_latest/logs``) instead. Training progress reaches the console
  through a :class:`ProgressChannel`, a queue the rank-0 worker writes its lines into.
- Ray's driver logger at ERROR, Ray Train's own logger at WARNING (``ray.train.LoggingConfig``),
  MLflow's logger at WARNING and its artifact progress bars off; MLflow's event lines printed past
  its logger (model registration) are held back by :func:`muted`.
``--verbose`` (``DDPM_VERBOSE=1``, which workers inherit with the other ``DDPM_*`` settings) turns
all of that back on. Errors always reach the console: a failed worker's error travels back as the
exception the command reports.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from typing import Any, Callable

VERBOSE_ENV = "DDPM_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose: bool) -> None:
    """Set the console mode for this process and the Ray workers it starts (before any import of
    Ray or MLflow: MLflow reads its logging level when it is imported)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def muted():
    """Unless verbose, hold back what a library call writes to ``sys.stderr`` (MLflow's event lines
    such as "Created version '3' of model ...", which it prints past its logger); if the call
    fails, what it wrote is printed before the error travels on."""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def info(message: str) -> None:
    """One phase line on stderr."""
    print(message, file=sys.stderr, flush=True)


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` options for the console mode (see the module docstring)."""
    loud = verbose()
    return {"log_to_driver": loud, "configure_logging": True, "logging_level": "INFO" if loud else "ERROR"}


def train_logging_config():
    """Ray Train's own log level: its per-checkpoint lines only with --verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


# -- progress from Ray workers ---------------------------------------------------------------------
class ProgressChannel:
    """A queue the workers put progress lines into; a driver thread prints them as they come.

    ``ray.util.queue.Queue`` is an actor (0 CPUs here, so it never takes a worker's place); its
    handle travels to the workers in the loop config, and :func:`remote_log` turns it into the
    loop's ``log`` function. Works the same on a local instance and a remote cluster. Use it as a
    context manager: the thread must stop (and the actor go) before Ray shuts down, also when
    setting up the trainer fails.
    """

    def __init__(self, printer: Callable[[str], None] = info) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self._printer = printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="ddpm-progress", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self._printer(self.queue.get(timeout=0.5))
            except Empty:
                if self._stop.is_set():
                    return
            except BaseException:  # the actor or Ray itself is gone (shutdown): nothing more will come
                return

    def __enter__(self) -> "ProgressChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Print what is still queued, then stop the thread and the actor."""
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            ray.kill(self.queue.actor)
        except Exception:
            pass


def remote_log(queue: Any) -> Callable[[str], None]:
    """The worker side of a :class:`ProgressChannel`: put each line, never block training."""
    if queue is None:
        return lambda message: print(message, flush=True)

    def log(message: str) -> None:
        print(message, flush=True)  # also into the worker's log file
        try:
            queue.put_nowait(message)
        except Exception:  # full or gone: progress is best effort
            pass

    return log


# -- progress in this process ----------------------------------------------------------------------
class Progress:
    """A counter with rate and ETA on stderr: rewritten in place on a terminal, a plain line at
    most every ``every_s`` seconds (and at the end) otherwise."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 5.0, enabled: bool = True,
                 stream=None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled, self.every_s = enabled, every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = -1e9
        self.suffix = ""

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_text = f"ETA {eta:.0f}s" if self.done < self.total and eta == eta else f"{elapsed:.1f}s"
        return (f"[{self.label}] {self.done}/{self.total} {self.unit}s ({pct:.0f}%) "
                f"{rate:.1f} {self.unit}s/s {eta_text}{self.suffix}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        elif now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
