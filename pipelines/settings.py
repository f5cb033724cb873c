"""Where things live, resolved when a command runs (never at import).

``DDPM_HOME`` (default ``./.ddpm``) holds the local MLflow store (``mlflow.db``, ``mlartifacts/``),
prepared data, Ray storage and samples. ``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, the ``AWS_*``
variables and ``--storage`` override the embedded defaults. With a storage that is not a local
folder (``--storage s3://...`` or ``DDPM_STORAGE``), data and samples default to ``<storage>/data``
and ``<storage>/samples``, so a job on a cluster keeps nothing its other nodes need on the local disk
of the node that runs its driver; ``DDPM_DATA`` (shards, ``<source>/<split>`` under it) and
``DDPM_SAMPLES`` name other prefixes. ``DDPM_PLACEMENT_TIMEOUT`` (``300``,
``90s``, ``10m``) is how long a job waits for the cluster to place its workers before it fails.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit

from ddpm.config import ExperimentConfig, parse_duration
from pipelines.errors import UsageError

T = TypeVar("T")

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN", "RAY_AUTH_TOKEN", "PGPASSWORD", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_API_KEY", "HF_TOKEN",
)
# Query parameters that carry a credential: presigned S3 (SigV4 and V2), GCS, Azure SAS, OAuth and the usual.
CREDENTIAL_QUERY_KEYS = frozenset(k.lower() for k in (
    "X-Amz-Signature", "X-Amz-Security-Token", "X-Amz-Credential", "Signature", "AWSAccessKeyId",
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId", "sig", "token", "access_token", "id_token",
    "refresh_token", "password", "passwd", "secret", "client_secret", "api_key", "apikey", "key"))
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>[^\s'\"<>`]*)")


DRIVER_HOME_ENV = "DDPM_DRIVER_HOME"  # the driver's DDPM_HOME, for a Ray worker whose node has none


PLACEMENT_TIMEOUT = 300.0  # seconds a job waits for its workers' placement (a node is lost, the CPUs are
# held by another job) before it fails saying what it asked for; a cluster that autoscales may need more
PLACEMENT_TIMEOUT_ENV = "DDPM_PLACEMENT_TIMEOUT"


@dataclass(frozen=True)
class Settings:
    home: Path
    tracking_uri: str
    registry_uri: str
    ray_address: str | None
    storage: str
    placement_timeout: float = PLACEMENT_TIMEOUT  # seconds (DDPM_PLACEMENT_TIMEOUT)
    data_root: str = ""  # DDPM_DATA; "": <storage>/data on a remote storage, else DDPM_HOME/data
    samples_root: str = ""  # DDPM_SAMPLES; "": <storage>/samples on a remote storage, else DDPM_HOME/samples

    def data_url(self, source: str, split: str = "train") -> str:
        return f"{self._root(self.data_root, 'data')}/{source}/{split}"

    def samples_url(self, name: str) -> str:
        return f"{self._root(self.samples_root, 'samples')}/{name}"

    def _root(self, given: str, folder: str) -> str:
        if given:
            return given.rstrip("/")
        if is_remote(self.storage):  # every node reaches it, unlike the driver's DDPM_HOME
            return f"{self.storage.rstrip('/')}/{folder}"
        return str(self.home / folder)


def is_remote(url: str) -> bool:
    """Whether ``url`` names something other than a local folder (``s3://``, ``gs://``, ...)."""
    return "://" in url and not url.startswith("file://")


def resolve(storage: str | None = None, address: str | None = None) -> Settings:
    """Read the environment now and return the resolved locations (creates DDPM_HOME).

    :raises UsageError: (exit 2) ``DDPM_PLACEMENT_TIMEOUT`` is not a duration.
    """
    try:
        placement_timeout = parse_duration(os.environ.get(PLACEMENT_TIMEOUT_ENV) or PLACEMENT_TIMEOUT)
    except ValueError as e:
        raise UsageError(f"{PLACEMENT_TIMEOUT_ENV}: {e}") from None
    home = Path(os.environ.get("DDPM_HOME") or os.environ.get(DRIVER_HOME_ENV) or ".ddpm").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return Settings(
        home=home,
        tracking_uri=tracking,
        registry_uri=registry,
        ray_address=address or os.environ.get("RAY_ADDRESS") or None,
        storage=storage or os.environ.get("DDPM_STORAGE") or str(home / "ray"),
        placement_timeout=placement_timeout,
        data_root=os.environ.get("DDPM_DATA") or "",
        samples_root=os.environ.get("DDPM_SAMPLES") or "",
    )


def worker_home_env() -> dict[str, str]:
    """The driver's ``DDPM_HOME`` as Ray workers get it: ``{DDPM_DRIVER_HOME: <absolute path>}`` (empty
    when none is set here), never as ``DDPM_HOME``. A worker uses it only where its node was started
    without a ``DDPM_HOME`` of its own (a cluster on one machine, as the tests' simulated one); a
    node's own wins, since the driver's path is a folder of another machine (its model cache, its
    feature net)."""
    home = os.environ.get("DDPM_HOME") or os.environ.get(DRIVER_HOME_ENV)
    return {DRIVER_HOME_ENV: str(Path(home).expanduser().resolve())} if home else {}


def _mask_query(rest: str) -> str:
    """``rest`` (``path?query#fragment``) with the values of credential query parameters
    (:data:`CREDENTIAL_QUERY_KEYS`) masked; everything else kept as written."""
    if "?" not in rest.partition("#")[0]:
        return rest
    path, _, query = rest.partition("?")
    query, hash_, fragment = query.partition("#")
    parts = re.split(r"([&;])", query)
    for k, part in enumerate(parts):
        key, eq, _value = part.partition("=")
        if eq and unquote_plus(key).strip().lower() in CREDENTIAL_QUERY_KEYS:
            parts[k] = f"{key}=***"
    return f"{path}?{''.join(parts)}{hash_}{fragment}"


def _looks_like_userinfo(netloc: str) -> bool:
    """``user:secret`` rather than ``host:port``: what ``urlsplit`` takes for the host when the
    password holds a ``/``, ``?`` or ``#`` (it ends the host at the first of them)."""
    if ":" not in netloc:
        return False
    try:
        urlsplit(f"//{netloc}").port
    except ValueError:  # "Port could not be cast to integer value": the part after ':' is no port
        return True
    return False


def _mask_url(m: re.Match) -> str:
    """One URL of a text, parsed with ``urlsplit``: its whole user-info and its credential query
    values masked, the rest kept byte for byte."""
    scheme, url = m.group("scheme"), m.group(0)
    try:
        netloc = urlsplit(url).netloc
        if "@" not in netloc and "@" in url[len(scheme):] and _looks_like_userinfo(netloc):
            # A password holding '/' (most AWS secret keys): the user-info runs to the first '@'.
            url = scheme + "***@" + url[len(scheme):].partition("@")[2]
            netloc = urlsplit(url).netloc
    except ValueError:  # not a URL urlsplit reads (an unbalanced '[' in its host): masked whole
        return scheme + "***"
    rest = url[len(scheme) + len(netloc):]
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return scheme + netloc + _mask_query(rest)


def redact(text: str) -> str:
    """``text`` fit to print or log: in every URL the whole user-info (``http://user:pass@host`` ->
    ``http://***@host``, a password holding ``/`` too) and credential query values
    (``X-Amz-Signature=***``), and anywhere the value of a secret environment variable (as is or
    URL-encoded) become ``***``.

    The one masking function. Every sink goes through it: what the CLI prints, the MLflow client
    (:func:`pipelines.tracking.client`: params, tags, descriptions, dataset sources), the files this
    tool writes (manifests, reports, checkpoints' configs: :func:`redact_obj`), a submitted job's
    command line, and what Ray pickles into sweep state (:func:`masked_config`).
    """
    text = _URL.sub(_mask_url, str(text))
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            for form in dict.fromkeys((value, quote(value, safe=""), quote_plus(value))):
                text = text.replace(form, "***")
    return text


def redact_obj(obj: T) -> T:
    """``obj`` (JSON-like: dicts, lists, tuples, strings, numbers) with :func:`redact` applied to every string."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact(k) if isinstance(k, str) else k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def masked_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every string masked (``data.url`` may be a URL holding credentials): for what is
    stored or pickled where others read it (checkpoints, ``tuner.pkl``)."""
    masked = redact_obj(cfg.to_dict())
    return cfg if masked == cfg.to_dict() else ExperimentConfig.from_dict(masked)


def shareable_uri(uri: str) -> str | None:
    """``uri`` if it may travel to another process (a Ray worker, a Ray job), else None.

    A URI holding credentials (user-info, a credential query parameter) never travels inside a
    config, a runtime env or a pickle: the receiving process reads its own ``MLFLOW_TRACKING_URI``
    (a local Ray instance inherits the driver's; a cluster's nodes have their own, ``infra/README.md``).
    """
    return uri if _URL.sub(_mask_url, uri) == uri else None
