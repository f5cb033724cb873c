"""Errors the command line turns into exit codes: 1 failure, 2 bad usage, 3 refused, 130 interrupted."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A command failed; the message is one clear line for the user (exit code 1)."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad options or input the user can fix (exit code 2)."""

    exit_code = 2


class RefusedError(PipelineError):
    """A gate said no: a promotion that does not beat the holder, an output that is not ours (exit 3)."""

    exit_code = 3


class Interrupted(PipelineError):
    """The user stopped a command (Ctrl-C); the message says where and how to resume (exit code 130)."""

    exit_code = 130


def first_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (where Ray and fsspec put the cause), at most 400 characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:400]
