"""What a person sees: quiet by default, Ray's and MLflow's own logs with ``--verbose``.

Quiet (the default) means one line per phase, live progress and the closing summary, on stderr
(stdout is left to the result, so ``--json`` stays machine-readable). What makes it quiet:
- Ray does not forward its processes' output to the driver (``log_to_driver=False``): the Train
  controller, the placement-group cleaner and the workers write to their log files under the Ray
  session folder (``/tmp/ray/session_latest/logs``) instead. Training progress reaches the console
  through a :class:`pipelines.train.progress.ProgressChannel`, a queue the rank-0 worker writes its
  lines into.
- Ray's driver logger at ERROR, Ray Train's own logger at WARNING (``ray.train.LoggingConfig``),
  MLflow's logger at WARNING and its artifact progress bars off; MLflow's event lines printed past
  its logger (model registration) are held back by :func:`muted`.
This module imports the standard library and ``pipelines.settings`` (for :func:`redact`, which every
line passes) only: the command line loads it for ``--help``.
``--verbose`` (``DDPM_VERBOSE=1``, which workers inherit with the other ``DDPM_*`` settings) turns
all of that back on. Errors always reach the console: a failed worker's error travels back as the
exception the command reports.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from pipelines.settings import redact

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
    if "mlflow" in sys.modules:  # imported already (a second command in one process): set its level now
        logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


@contextlib.contextmanager
def muted() -> Iterator[None]:
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
    """One phase line on stderr (masked: :func:`pipelines.settings.redact`)."""
    print(redact(message), file=sys.stderr, flush=True)


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` options for the console mode (see the module docstring)."""
    loud = verbose()
    return {"log_to_driver": loud, "configure_logging": True, "logging_level": "INFO" if loud else "ERROR"}


# -- progress in this process ----------------------------------------------------------------------
@contextlib.contextmanager
def phase(label: str, what: str, write: Callable[[str], None] = info) -> Iterator[None]:
    """``[label] what ...`` when a phase with no count of its own starts, and ``[label] what: N s``
    when it ends (``write``: :func:`info`, or a training worker's log)."""
    write(f"[{label}] {what} ...")
    start = time.perf_counter()
    yield
    write(f"[{label}] {what}: {time.perf_counter() - start:.1f} s")


class Progress:
    """A counter with rate and ETA on stderr: rewritten in place on a terminal, a plain line at
    most every ``every_s`` seconds (and at the end) otherwise. With ``write`` (a training worker's
    log), plain lines go through it instead. With ``after_s``, nothing is written before that many
    seconds have passed: a phase that repeats during a run (the held-out bits/dim, the sample grid)
    prints only when it is slow enough to be worth a line."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = 5.0, enabled: bool = True,
                 stream: IO[str] | None = None, write: Callable[[str], None] | None = None, what: str = "",
                 after_s: float = 0.0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.what = f"{what}: " if what else ""  # the phase counted, before the count
        self.stream = stream or sys.stderr
        self.write = write or (lambda line: print(line, file=self.stream, flush=True))
        self.tty = write is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled, self.every_s, self.after_s = enabled, every_s, after_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = -1e9
        self._shown = False  # a line was written (on a terminal, close ends it)
        self.suffix = ""

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_text = f"ETA {eta:.0f}s" if self.done < self.total and eta == eta else f"{elapsed:.1f}s"
        return redact(f"[{self.label}] {self.what}{self.done}/{self.total} {self.unit}s ({pct:.0f}%) "
                      f"{rate:.1f} {self.unit}s/s {eta_text}{self.suffix}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or now - self.start < self.after_s:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self._shown = True
        elif now - self._last >= self.every_s or self.done >= self.total:
            self._last, self._shown = now, True
            self.write(self.line())

    def at(self, done: int, _total: int | None = None) -> None:
        """Set the count (a ``progress(done, total)`` callback of the samplers and the bound)."""
        self.update(done - self.done)

    def close(self) -> None:
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
