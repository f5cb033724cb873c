"""Which training-worker errors Ray Train may retry: lost workers yes, bad input no.

Ray Train's ``FailureConfig(max_failures)`` restarts the worker group after ANY worker error. That is
right for a killed process or a lost node, and wrong for an error that comes back identically on
every attempt: a shard whose sha256 does not match, a config a worker cannot use, losses that are
non-finite from the same checkpoint and seed, a checkpoint that cannot be read (the retry restores
the same file), memory that runs out (the retry asks for the same batch). Those are recognised by
type (:data:`NOT_RETRIED`),
and :class:`StopOnBadInput`, a Ray Train callback run by the controller, turns the first one into a
controller error, which Ray does not retry. The driver finds it with :func:`worker_input_error`.
"""

from __future__ import annotations

import ray.train
import torch

from ddpm.checkpoint import CheckpointError
from ddpm.config import ConfigError
from ddpm.data.storage import DataError
from pipelines.train.loop import NonFiniteLossError

OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)
NOT_RETRIED: tuple[type[BaseException], ...] = (ConfigError, DataError, NonFiniteLossError, CheckpointError,
                                                *OUT_OF_MEMORY)
BAD_INPUT: tuple[type[BaseException], ...] = (ConfigError, DataError)  # exit 2; the others exit 1


class WorkerInputError(RuntimeError):
    """A worker stopped on an error that a retry would repeat; ``exit_code`` 2 for bad input, else 1."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message, exit_code)
        self.message, self.exit_code = message, exit_code

    def __str__(self) -> str:
        return self.message


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what it wraps: Ray's wrappers (``_base_exc``, ``cause``, ``controller_failure``),
    ``__cause__`` and ``__context__``."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or not isinstance(e, BaseException):
            continue
        seen.append(e)
        todo += [getattr(e, name, None) for name in ("_base_exc", "cause", "controller_failure",
                                                      "__cause__", "__context__")]
        todo += list(getattr(e, "worker_failures", {}).values())
    return seen


def deterministic_cause(exc: BaseException) -> BaseException | None:
    """The first error in ``exc``'s chain that a retry would repeat, else None."""
    return next((e for e in _chain(exc) if isinstance(e, NOT_RETRIED)), None)


def worker_input_error(exc: BaseException) -> WorkerInputError | None:
    """The :class:`WorkerInputError` that ended a ``trainer.fit()``, if that is what ended it."""
    return next((e for e in _chain(exc) if isinstance(e, WorkerInputError)), None)


def placement_timed_out(exc: BaseException) -> bool:
    """Whether a ``trainer.fit()`` ended because its worker group could not be placed in time (Ray
    Train's ``WorkerGroupStartupTimeoutError``, found by name: the class is in Ray's internals)."""
    return any(type(e).__name__ == "WorkerGroupStartupTimeoutError" for e in _chain(exc))


class StopOnBadInput(ray.train.UserCallback):
    """Ray Train callback (run in the controller): end the run at once on an error a retry would repeat.

    Raising from ``after_exception`` makes the controller fail with a ``ControllerError``, which
    Ray's failure policy raises instead of retrying (only worker-group errors are retried).
    """

    def after_exception(self, run_context: object, worker_exceptions: dict[int, BaseException]) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            cause = deterministic_cause(exc)
            if cause is not None:
                raise WorkerInputError(f"worker {rank}: {_describe(cause)} (not retried: a retry would fail the "
                                       f"same way){_advice(cause)}", 2 if isinstance(cause, BAD_INPUT) else 1)


def _describe(cause: BaseException) -> str:
    return str(cause) or type(cause).__name__


def _advice(cause: BaseException) -> str:
    """What to do about a cause that is not the user's input."""
    if isinstance(cause, OUT_OF_MEMORY):
        return ("; out of memory: lower train.batch_size (with train.grad_accum to keep the effective "
                "batch) or use --precision bf16")
    if isinstance(cause, CheckpointError):
        return ("; remove that checkpoint folder from the run's storage to resume from the one before it, "
                "or start again under another --run-name")
    return ""
