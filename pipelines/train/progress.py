"""Training progress from Ray workers to the driver's console: rank 0 puts its lines (step, loss,
images/s, bits/dim, ETA) into a :class:`ProgressChannel`; a driver thread prints them on stderr."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import ray
from ray.util.queue import Empty, Queue

from pipelines.console import info

_STEP = re.compile(r"^\[train\] (?:step|resumed from step) (\d+)")  # the loop's progress lines


class ProgressChannel:
    """A queue the workers put progress lines into; a driver thread prints them as they come.

    ``ray.util.queue.Queue`` is an actor (0 CPUs here, so it never takes a worker's place); its
    handle travels to the workers in the loop config, and :func:`remote_log` turns it into the
    loop's ``log`` function. Works the same on a local instance and a remote cluster. Use it as a
    context manager: the thread must stop (and the actor go) before Ray shuts down, also when
    setting up the trainer fails.
    """

    def __init__(self, printer: Callable[[str], None] = info) -> None:
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self.last_step: int | None = None  # the latest step a progress line named
        self._printer = printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="ddpm-progress", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except BaseException:  # the actor or Ray itself is gone (shutdown): nothing more will come
                return
            if m := _STEP.match(line):
                self.last_step = int(m[1])
            self._printer(line)

    def __enter__(self) -> ProgressChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Print what is still queued, then stop the thread and the actor."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            ray.kill(self.queue.actor)
        except Exception:
            pass


def remote_log(queue: Queue | None) -> Callable[[str], None]:
    """The worker side of a :class:`ProgressChannel`: put each line, never block training (no
    channel: the line goes to the worker's own output, its log file)."""
    if queue is None:
        return lambda message: print(message, flush=True)

    def log(message: str) -> None:
        print(message, flush=True)  # also into the worker's log file
        try:
            queue.put_nowait(message)
        except Exception:  # full or gone: progress is best effort
            pass

    return log
