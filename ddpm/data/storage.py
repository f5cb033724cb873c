"""Opening shard folders on any fsspec storage, and writing objects so no reader sees half of one.

``s3://`` goes through s3fs. Its endpoint comes from ``endpoint_url`` if given, else from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (:func:`s3_endpoint`, the one place that reads them, when
called, never at import); credentials come from the usual AWS variables through botocore, never from
an options dict, so the dict :func:`storage_options_for` returns may travel (pickled) to Ray workers. Filesystem instances are
not taken from fsspec's cache (``skip_instance_cache``): a cached s3fs instance keeps its endpoint,
its listing cache and, after a fork, a dead event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Any

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # one path component, no "..", no "/"
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's order: the S3-specific one first


class DataError(ValueError):
    """Bad data or a bad shard folder; the message names the file and what is wrong."""


class SourceError(DataError):
    """A data source that cannot be used as given (missing path, unknown kind, bad layout)."""


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a single safe path component, else raise (no traversal, no '..')."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise DataError(f"{what} {name!r} is not a plain file name (path traversal is refused)")
    return name


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3-compatible endpoint: ``endpoint_url`` if given, else the first of :data:`S3_ENDPOINT_VARS`
    set in the environment now; None means AWS itself."""
    return endpoint_url or next((os.environ[v] for v in S3_ENDPOINT_VARS if os.environ.get(v)), None)


def storage_options_for(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The fsspec options for ``url``, the one builder: for s3, ``{"endpoint_url": ...}`` when an
    endpoint is set (:func:`s3_endpoint`), else nothing. Never keys (see the module docstring)."""
    if not str(url).startswith(("s3://", "s3a://")):
        return {}
    endpoint = s3_endpoint(endpoint_url)
    return {"endpoint_url": endpoint} if endpoint else {}


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` or any fsspec URL."""
    import fsspec.core

    options = dict(storage_options or {})
    if "://" in str(url) and not str(url).startswith("file://"):
        options.setdefault("skip_instance_cache", True)
    fs, path = fsspec.core.url_to_fs(str(url), **options)
    return fs, path.rstrip("/") or path


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def _temp_path(path: str) -> str:
    """A hidden name beside ``path``, unique to this process and call: ``.{name}.tmp-{pid}-{hex}``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(fs: Any, path: str, data: bytes, *, via_temp: bool = False) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old object, the new one, or none.

    Local: write a hidden temporary file in the same folder, fsync, then ``os.replace``.
    Object stores (s3, gcs, azure): an object becomes visible only when its upload completes, so
    one upload of the finished bytes to the final key is already atomic; a temp key plus a server-side
    copy would only double the traffic.
    ``via_temp=True`` (checkpoints): on any non-local file system, upload to a hidden temporary name,
    then move it over ``path``: a rename on stores that may show a file while it is written (sftp,
    hdfs, ...), a server-side copy on an object store. A failed upload or move removes the temporary.
    Remote calls are retried with backoff (:func:`ddpm.data.retry.with_retries`).
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _temp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    from ddpm.data.retry import with_retries

    if not via_temp:
        with_retries(lambda: fs.pipe_file(path, data), f"writing {path}")
        return
    tmp = _temp_path(path)
    try:
        with_retries(lambda: fs.pipe_file(tmp, data), f"writing {tmp}")
        with_retries(lambda: fs.mv(tmp, path), f"moving {tmp} to {path}")
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise
