"""The Ray storage (``RunConfig(storage_path, storage_filesystem)``) for the URLs users pass (local
paths, file://, s3://); fsspec options come from :func:`ddpm.data.storage.storage_options_for`.

Credentials never travel inside an object: every process (the driver, each Ray worker) reads the
usual ``AWS_*`` variables from its own environment. A local Ray instance started by a command
inherits the driver's; on a cluster each node has its own (``infra/README.md``). Only the
(non-secret) endpoint and region of an S3-compatible store travel.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs

from ddpm.data.storage import s3_endpoint


def ray_storage(url: str) -> tuple[str, fs.S3FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

    A local path becomes absolute; ``s3://`` with a custom endpoint (:func:`ddpm.data.storage.s3_endpoint`)
    gets a pyarrow S3 file system (Ray would otherwise talk to AWS itself). It is built without keys:
    pyarrow pickles the keys it is given (Ray pickles the file system to its workers and into
    ``tuner.pkl`` in the bucket), while one built without them resolves them from the environment
    wherever it is unpickled.
    """
    if url.startswith("s3://"):
        endpoint = s3_endpoint()
        if not endpoint:
            return url, None
        parsed = urlparse(endpoint)
        s3 = fs.S3FileSystem(
            endpoint_override=parsed.netloc or endpoint,
            scheme=parsed.scheme or "https",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
        return url[len("s3://"):].rstrip("/"), s3
    if url.startswith("file://"):
        url = url[len("file://"):]
    return str(Path(url).expanduser().resolve()), None
