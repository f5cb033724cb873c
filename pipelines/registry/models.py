"""Resolve a ``--model`` URI to a ready-to-sample model, without unpickling anything.

Accepted: every model URI MLflow accepts, read with MLflow's own parser -- ``runs:/RUN_ID/model``,
``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``, ``models:/NAME/STAGE``
(deprecated stages), ``models:/m-<id>`` (a logged model's id) -- each naming the weights and config
artifacts of the pyfunc logged by training; or a checkpoint path/URL (``.../checkpoint.pt``, local
or ``s3://``) or an exported weights folder.

MLflow (about 3 s to import) is imported only for an MLflow URI, in :func:`_mlflow`: sampling a
checkpoint file runs without it (``sample``'s in-process job, docs/PERFORMANCE.md).

A registered version's weights are downloaded once per machine: :func:`weights_folder` keeps the
pyfunc's ``ddpm_model/`` folder (weights and config, not the pyfunc's code and environment files)
in ``$DDPM_HOME/cache/models/<key>``, the key naming the tracking store, run, logged model and
version, with each file's sha256 beside it; a copy whose files no longer match is downloaded again.
The store is still asked that the version exists (:func:`describe`) on every load; a local sqlite
registry is asked without importing MLflow (:mod:`pipelines.registry.sqlite_registry`), so sampling a
cached version of the embedded default's registry never imports it. A registered
version's files are checked against the sha256 recorded at its registration before they enter the
cache (:mod:`pipelines.registry.digests`): a file changed in the artifact store since is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import fsspec
import torch

from ddpm.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, import_weights, load_checkpoint, load_model
from ddpm.config import ConfigError, ExperimentConfig
from ddpm.data.storage import is_local
from ddpm.diffusion import Diffusion
from pipelines import console
from pipelines.errors import PipelineError, UsageError, first_line
from pipelines.registry import digests, sqlite_registry
from pipelines.settings import Settings, resolve

if TYPE_CHECKING:
    from types import ModuleType

    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ddpm.unet import UNet

MODEL_ARTIFACT = "model"  # the model's name within its run: runs:/RUN_ID/model
WEIGHTS_ARTIFACT = "ddpm_model"  # the pyfunc artifact key (and folder) of the exported weights
URI_FORMS = ("runs:/ID/model, models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS, "
             "models:/m-<logged model id>, or a checkpoint path/URL")
# The MLflow store's answers that a model is not there (or the URI names none); any other error of a
# store that was asked means it could not answer: an outage, exit 1, which no caller may take for
# the model being gone (the workflow would train again).
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST")
DIGESTS_FILE = "sha256.json"  # beside a cached weights folder's files: {"files": {name: sha256}, "registered": ...}
_UNVERIFIED: set[str] = set()  # models whose "cannot be verified" warning this process has printed


@dataclass
class LoadedModel:
    uri: str  # as asked (an alias stays an alias: it names the job's records)
    pinned: str  # exactly what was loaded (:func:`pinned`): the URI handed to workers
    config: ExperimentConfig
    model: UNet  # EMA weights, eval mode
    diffusion: Diffusion
    run_id: str | None = None
    name: str | None = None  # registered model name
    version: str | None = None
    model_id: str | None = None  # MLflow 3 logged model (m-...): evaluation metrics are linked to it
    info: dict = field(default_factory=dict)


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def _mlflow() -> tuple[ModuleType, MlflowClient]:
    """``(mlflow, client)`` pointed at the resolved store: the one import of MLflow here (see the
    module docstring)."""
    import mlflow
    import mlflow.store.artifact.utils.models  # noqa: F401  (get_model_name_and_version, in describe)

    from pipelines import tracking

    tracking.configure(resolve())
    return mlflow, tracking.client()


def describe(uri: str) -> dict[str, str | None]:
    """Run id, registered name and version, and logged model id behind a model URI.

    Checks that it exists; downloads nothing. ``latest`` and aliases resolve to a version number.

    :raises UsageError: (exit 2) there is no such model (the store says so), or it is not a model URI.
    :raises PipelineError: (exit 1) the MLflow store could not answer (:func:`_store_failed`).
    """
    if not is_mlflow_uri(uri):
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as e:  # an unknown protocol, or its package not installed
            raise UsageError(f"model {uri!r}: cannot open ({e}); expected {URI_FORMS}") from None
        if not fs.exists(path):
            raise UsageError(f"model {uri!r} does not exist (expected {URI_FORMS})")
        return {"run_id": None, "name": None, "version": None, "model_id": None}
    found = sqlite_registry.find_version(resolve().registry_uri, uri)
    if found is not None:  # a local sqlite registry read without importing MLflow (sqlite_registry)
        return {"run_id": found.run_id, "name": found.name, "version": found.version, "model_id": model_id_of(found)}
    mlflow, c = _mlflow()
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            run = c.get_run(run_id)
            return {"run_id": run_id, "name": None, "version": None,
                    "model_id": _logged_model_of_run(c, run, path.strip("/") or MODEL_ARTIFACT)}
        resolved = mlflow.store.artifact.utils.models.get_model_name_and_version(c, uri)  # (id,) or (name, version)
        if len(resolved) == 1:
            logged = c.get_logged_model(resolved[0])
            return {"run_id": logged.source_run_id, "name": None, "version": None, "model_id": logged.model_id}
        mv = c.get_model_version(*resolved)
        return {"run_id": mv.run_id, "name": mv.name, "version": str(mv.version), "model_id": model_id_of(mv)}
    except mlflow.exceptions.MlflowException as e:
        if _store_failed(e, from_server=isinstance(e, mlflow.exceptions.RestException)):
            raise PipelineError(f"the MLflow store could not say whether model {uri!r} exists: {first_line(e)}") from e
        raise UsageError(f"model {uri!r} does not exist in the MLflow store or is not a model URI "
                         f"({URI_FORMS}): {str(e).splitlines()[0]}") from e


def _store_failed(e: MlflowException, from_server: bool) -> bool:
    """Whether MLflow could not answer (an HTTP request that failed; a server error, ``from_server``:
    a ``RestException``), as against an answer that the model is not there (:data:`NOT_THERE`) or a
    URI MLflow's parser refuses (raised before any request, as a plain ``MlflowException``)."""
    if e.error_code in NOT_THERE:
        return False
    return from_server or str(e).startswith("API request to") or e.error_code in (
        "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "IO_ERROR", "ABORTED")


def model_id_of(version: ModelVersion | sqlite_registry.VersionRecord) -> str | None:
    """The logged model (m-...) a registered version points at: its ``model_id``, which some stores
    leave empty, else the ``models:/m-...`` source it was registered from."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") and "/" not in source[8:] else None


def _logged_model_of_run(c: MlflowClient, run: Run, name: str) -> str | None:
    """The id of the logged model ``name`` that ``run`` produced (None for a model logged as plain files)."""
    found = c.search_logged_models([run.info.experiment_id],
                                   filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'",
                                   max_results=1)
    return found[0].model_id if found else None


def pinned(uri: str, meta: dict[str, str | None]) -> str:
    """The URI of exactly the model :func:`describe` found (its ``meta``): ``models:/NAME/VERSION`` for
    an alias, ``latest`` or a stage, so that a version registered meanwhile (or an alias moved) is not
    mixed in. A driver resolves once and hands this to every worker: a worker (or an actor Ray
    restarts mid-job) that resolved the alias itself would load whatever it points to by then."""
    if not is_mlflow_uri(uri):
        return uri
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        return f"runs:/{run_id}/{path.strip('/') or MODEL_ARTIFACT}"
    if meta["version"] is not None:
        return f"models:/{meta['name']}/{meta['version']}"
    return uri


def read_config(uri: str) -> ExperimentConfig:
    """The config of the model behind ``uri``, without its weights: a logged model's ``config.json``
    (one small download), an exported folder's, or a checkpoint's (a local file memory-mapped, a
    remote one read whole). Drivers resolve sampling settings from it before any worker starts.

    :raises UsageError: (exit 2) there is no model there, or its config cannot be read.
    """
    try:
        if is_mlflow_uri(uri):
            folder = weights_folder(uri, describe(uri))
            with open(os.path.join(folder, CONFIG_FILE)) as f:
                return ExperimentConfig.from_dict(json.load(f)["config"])
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            return ExperimentConfig.from_dict(json.loads(fs.cat_file(f"{path.rstrip('/')}/{CONFIG_FILE}"))["config"])
        if not is_local(fs):
            return load_checkpoint(uri)["config"]
        try:
            config = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
        except pickle.UnpicklingError:  # load_checkpoint says why, in the words of every other path
            return load_checkpoint(uri)["config"]
        return ExperimentConfig.from_dict(json.loads(config) if isinstance(config, str) else config)
    except UsageError:
        raise
    except ConfigError as e:  # read, but not a config this version of ddpm builds
        raise UsageError(f"model {uri!r}: its config does not build ({e})") from e
    except (CheckpointError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"model {uri!r}: its config cannot be read ({type(e).__name__}: {e})") from e


def load(uri: str) -> LoadedModel:
    """Load the EMA model behind ``uri`` for sampling (eval mode, CPU)."""
    meta = describe(uri)
    if not is_mlflow_uri(uri):
        try:
            cfg, model, diffusion = load_model(uri)
        except CheckpointError as e:  # unsafe, corrupt or incompatible: the user's input, exit 2
            raise UsageError(f"model {uri!r} cannot be loaded: {e}") from e
        return LoadedModel(uri=uri, pinned=uri, config=cfg, model=model, diffusion=diffusion)
    model_uri = pinned(uri, meta)
    folder = weights_folder(uri, meta)
    try:
        cfg, model = import_weights(folder)
    except CheckpointError as e:
        raise UsageError(f"model {model_uri!r} cannot be loaded: {e}") from e
    model.eval()
    return LoadedModel(uri=uri, config=cfg, model=model, diffusion=Diffusion.from_config(cfg.diffusion),
                       run_id=meta["run_id"], name=meta["name"], version=meta["version"],
                       model_id=meta["model_id"], pinned=model_uri)


def _cache_key(meta: dict[str, str | None], model_uri: str, settings: Settings) -> str:
    """What identifies a version's artifacts: the store, the run, the logged model and the version."""
    ident = [settings.tracking_uri, settings.registry_uri, meta["run_id"], meta["model_id"], meta["name"],
             meta["version"], model_uri]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def _digests(folder: str) -> dict[str, str]:
    return {name: digests.file_sha256(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name != DIGESTS_FILE}


def _intact(folder: str, registered: str | None) -> bool:
    """A cached copy whose files are all there and match the digests written with them, checked
    against the listing whose digest is ``registered`` (None: a version with none to check against)."""
    try:
        with open(os.path.join(folder, DIGESTS_FILE)) as f:
            recorded = json.load(f)
        files = recorded["files"]
        return recorded["registered"] == registered and WEIGHTS_FILE in files and _digests(folder) == files
    except (OSError, ValueError, KeyError, TypeError):  # a copy of an older format: downloaded again
        return False


def _registered_digest(c: MlflowClient, model_uri: str, meta: dict[str, str | None]) -> str | None:
    """The digest of the artifact listing recorded when ``meta``'s version was registered
    (:data:`pipelines.registry.digests.SHA256_TAG`), or None, with one warning line on stderr (once
    per process), for a model that has none: a version registered before listings were recorded,
    or a model that is no registered version (``runs:/``, ``models:/m-...``)."""
    if meta["version"] is not None:
        try:
            tags = c.get_model_version(meta["name"], meta["version"]).tags
        except Exception as e:  # it was there a moment ago (describe): the store failed to answer
            raise PipelineError(f"the MLflow store could not give the tags of {model_uri}: {first_line(e)}") from e
        if tags.get(digests.SHA256_TAG):
            return tags[digests.SHA256_TAG]
    if model_uri not in _UNVERIFIED:
        _UNVERIFIED.add(model_uri)
        why = ("was registered before ddpm-pipe recorded the sha256 of its artifacts" if meta["version"] is not None
               else "is not a registered version (no sha256 of its artifacts was recorded)")
        console.info(f"[models] warning: {model_uri} {why}: its files cannot be verified; loading it unverified")
    return None


def _registered_listing(mlflow: ModuleType, c: MlflowClient, model_uri: str, meta: dict[str, str | None],
                        digest: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the listing recorded at registration, once its text is checked
    against ``digest`` (the version's tag, which the artifact store cannot change).

    :raises UsageError: (exit 2) the listing is gone or differs: the artifact store was changed.
    :raises PipelineError: (exit 1) the store could not answer.
    """
    path = c.get_model_version(meta["name"], meta["version"]).tags.get(digests.LISTING_TAG, "")
    where = f"runs:/{meta['run_id']}/{path}"
    changed = ("the artifact store was changed after registration. Register the model again from a trusted "
               "checkpoint, and restrict who can write the artifact store")
    gone = f"refused to load {model_uri}: the sha256 listing of its files recorded at registration ({where}) is gone: "
    if not path:
        raise UsageError(f"{gone}its version has no {digests.LISTING_TAG} tag beside {digests.SHA256_TAG}")
    try:
        with tempfile.TemporaryDirectory() as tmp, open(c.download_artifacts(meta["run_id"], path, tmp)) as f:
            text = f.read()
    except mlflow.exceptions.MlflowException as e:
        if _store_failed(e, from_server=isinstance(e, mlflow.exceptions.RestException)):
            raise PipelineError(f"the MLflow store could not give the artifact listing of {model_uri}: "
                                f"{first_line(e)}") from e
        raise UsageError(gone + changed) from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(gone + changed) from e
    if digests.text_sha256(text) != digest:
        raise UsageError(f"refused to load {model_uri}: the sha256 listing of its files ({where}) differs from the "
                         f"digest its version's tag {digests.SHA256_TAG} recorded at registration: {changed}")
    return digests.parse(text)


def weights_folder(uri: str, meta: dict[str, str | None]) -> str:
    """The local folder of ``model.safetensors`` and ``config.json`` of the MLflow model ``uri``
    (:func:`describe`'s ``meta``): the cached copy if intact, else downloaded into the cache first.

    A registered version's files are checked, when downloaded, against the sha256 listing recorded at
    registration (:mod:`pipelines.registry.digests`), and the cached copy records the digest of the
    listing it was checked against: the one place every project path that loads a registered model
    goes through (sample's driver and workers, evaluate, interpolate, the workflow). A version
    registered before listings were recorded loads with one warning line.

    The copy is written under a temporary name and renamed into place, so concurrent loads see no
    folder or a whole one.

    :raises UsageError: (exit 2) the model holds no ddpm weights, or a file differs from the one
        registered (the artifact store was changed after registration).
    """
    settings = resolve()
    model_uri = pinned(uri, meta)
    folder = settings.home / "cache" / "models" / _cache_key(meta, model_uri, settings)
    found = sqlite_registry.find_version(settings.registry_uri, model_uri) if meta["version"] is not None else None
    if (found is not None and found.run_id == meta["run_id"] and found.tags.get(digests.SHA256_TAG)
            and _intact(str(folder), found.tags[digests.SHA256_TAG])):
        return str(folder)  # checked against the version's tag as below, read without MLflow (sqlite_registry)
    mlflow, c = _mlflow()
    registered = _registered_digest(c, model_uri, meta)
    if _intact(str(folder), registered):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/artifacts/{WEIGHTS_ARTIFACT}",
                                                        dst_path=tmp)
            base = f"artifacts/{WEIGHTS_ARTIFACT}"  # where the download sits in the model's listing
        except mlflow.exceptions.MlflowException:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)  # logged as plain files
            base = ""
        found = _weights_folder(local)
        if found is None:
            raise UsageError(f"model {model_uri!r} holds no ddpm weights (model.safetensors + config.json); "
                             "was it logged by ddpm-pipe?")
        staged = os.path.join(tmp, "staged")
        os.makedirs(staged)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if os.path.exists(os.path.join(found, name)):
                shutil.copyfile(os.path.join(found, name), os.path.join(staged, name))
        if registered is not None:
            under = os.path.relpath(found, local).replace(os.sep, "/")
            prefix = "/".join(p for p in (base, under) if p and p != ".")
            digests.check({f"{prefix}/{name}".lstrip("/"): os.path.join(staged, name) for name in os.listdir(staged)},
                          _registered_listing(mlflow, c, model_uri, meta, registered), model_uri)
        with open(os.path.join(staged, DIGESTS_FILE), "w") as f:
            json.dump({"files": _digests(staged), "registered": registered}, f)
        shutil.rmtree(folder, ignore_errors=True)  # a copy that no longer matches its digests
        try:
            os.replace(staged, folder)
        except OSError:  # another load put an intact copy in place meanwhile
            if not _intact(str(folder), registered):
                raise
    return str(folder)


def _weights_folder(local: str) -> str | None:
    """The folder under a downloaded pyfunc model that holds ``model.safetensors``."""
    for root, _dirs, files in os.walk(local):
        if WEIGHTS_FILE in files:
            return root
    return None
