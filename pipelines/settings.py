"""Where things live, resolved when a command runs (never at import).

``DDPM_HOME`` (default ``./.ddpm``) holds the local MLflow store (``mlflow.db``, ``mlartifacts/``),
prepared data, Ray storage and samples. ``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, the ``AWS_*``
variables and ``--storage`` override the embedded defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN",
)
# The user-info part of a URL: scheme://USER:PASSWORD@host (user-info cannot hold '/', '@' or a space).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


@dataclass(frozen=True)
class Settings:
    home: Path
    tracking_uri: str
    registry_uri: str
    ray_address: str | None
    storage: str

    def data_url(self, source: str, split: str = "train") -> str:
        return str(self.home / "data" / source / split)

    def samples_url(self, name: str) -> str:
        return str(self.home / "samples" / name)


def resolve(storage: str | None = None, address: str | None = None) -> Settings:
    """Read the environment now and return the resolved locations (creates DDPM_HOME)."""
    home = Path(os.environ.get("DDPM_HOME", ".ddpm")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return Settings(
        home=home,
        tracking_uri=tracking,
        registry_uri=registry,
        ray_address=address or os.environ.get("RAY_ADDRESS") or None,
        storage=storage or os.environ.get("DDPM_STORAGE") or str(home / "ray"),
    )


def redact(text: str) -> str:
    """``text`` fit to print or log: credentials inside URLs (``http://user:pass@host`` ->
    ``http://***@host``) and the value of every secret environment variable become ``***``.

    The one masking function: the CLI applies it to everything it prints, tracking to every param
    and tag it logs.
    """
    text = _USERINFO.sub(r"\g<scheme>***@", str(text))
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def shareable_uri(uri: str) -> str | None:
    """``uri`` if it may travel to another process (a Ray worker, a Ray job), else None.

    A URI holding credentials (``user:pass@``) never travels inside a config, a runtime env or a
    pickle: the receiving process reads its own ``MLFLOW_TRACKING_URI`` (a local Ray instance
    inherits the driver's; a cluster's nodes have their own, ``infra/README.md``).
    """
    return None if _USERINFO.search(uri) else uri
