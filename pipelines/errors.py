"""Errors the command line turns into exit codes: 1 failure, 2 bad usage, 3 refused."""

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
