"""Retry object-store calls with exponential backoff: a dropped request costs a pause, not the run.

Transient: connection errors, timeouts and the other ``OSError``s an object store raises for a failed
or throttled request (s3fs turns a 503 SlowDown into one). Permanent, raised at once: a missing object
or bucket, a refused permission, a path of the wrong kind; retrying those only delays the error.

``DDPM_STORAGE_RETRIES`` (attempts, default 5) and ``DDPM_STORAGE_BACKOFF`` (first pause in seconds,
default 0.5, doubled each time) are read on each call; Ray workers get them with the other ``DDPM_*``.
"""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")

PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# botocore's connection errors do not derive from the built-in ConnectionError.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ConnectionClosedError", "ClientPayloadError", "ServerDisconnectedError"}


class StorageError(OSError):
    """An object-store call still failed after every retry; the message names the object."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, PERMANENT):
        return False
    return isinstance(e, (OSError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES


def with_retries(call: Callable[[], T], what: str, attempts: int | None = None,
                 backoff: float | None = None) -> T:
    """Return ``call()``; on a transient error wait ``backoff * 2**k`` s and try again.

    :param what: the operation and object, for the error message (``"writing s3://b/k"``).
    :raises StorageError: still failing after ``attempts`` tries (the last error is its cause).
    """
    attempts = attempts or int(os.environ.get("DDPM_STORAGE_RETRIES", "5"))
    backoff = float(os.environ.get("DDPM_STORAGE_BACKOFF", "0.5")) if backoff is None else backoff
    for k in range(attempts):
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            if k == attempts - 1:
                raise StorageError(f"{what}: failed after {attempts} attempts: {type(e).__name__}: {e}") from e
            time.sleep(backoff * 2**k)
    raise AssertionError("unreachable")
