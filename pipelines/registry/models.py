"""Resolve a ``--model`` URI to a ready-to-sample model, without unpickling anything.

Accepted: every model URI MLflow accepts, read with MLflow's own parser -- ``runs:/RUN_ID/model``,
``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS``, ``models:/NAME/STAGE``
(deprecated stages), ``models:/m-<id>`` (a logged model's id) -- each naming the weights and config
artifacts of the pyfunc logged by training; or a checkpoint path/URL (``.../checkpoint.pt``, local
or ``s3://``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import UsageError


@dataclass
class LoadedModel:
    uri: str
    config: Any  # ddpm.config.ExperimentConfig
    model: Any  # ddpm.unet.UNet with EMA weights, eval mode
    diffusion: Any  # ddpm.diffusion.Diffusion
    run_id: str | None = None
    name: str | None = None  # registered model name
    version: str | None = None
    model_id: str | None = None  # MLflow 3 logged model (m-...): evaluation metrics are linked to it
    info: dict = field(default_factory=dict)


def _is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


URI_FORMS = ("runs:/ID/model, models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS, "
             "models:/m-<logged model id>, or a checkpoint path/URL")


def describe(uri: str) -> dict[str, str | None]:
    """Run id, registered name and version, and logged model id behind a model URI.

    Checks that it exists; downloads nothing. ``latest`` and aliases resolve to a version number.
    """
    if not _is_mlflow_uri(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise UsageError(f"model {uri!r} does not exist (expected {URI_FORMS})")
        return {"run_id": None, "name": None, "version": None, "model_id": None}
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from pipelines import tracking

    c = tracking.client()
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            run = c.get_run(run_id)
            return {"run_id": run_id, "name": None, "version": None,
                    "model_id": _logged_model_of_run(c, run, path.strip("/") or "model")}
        resolved = get_model_name_and_version(c, uri)  # (model_id,) or (name, version)
        if len(resolved) == 1:
            logged = c.get_logged_model(resolved[0])
            return {"run_id": logged.source_run_id, "name": None, "version": None, "model_id": logged.model_id}
        mv = c.get_model_version(*resolved)
        return {"run_id": mv.run_id, "name": mv.name, "version": str(mv.version), "model_id": model_id_of(mv)}
    except MlflowException as e:
        raise UsageError(f"model {uri!r} does not exist in the MLflow store or is not a model URI "
                         f"({URI_FORMS}): {str(e).splitlines()[0]}") from e


def model_id_of(version: Any) -> str | None:
    """The logged model (m-...) a registered version points at: its ``model_id``, which some stores
    leave empty, else the ``models:/m-...`` source it was registered from."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") and "/" not in source[8:] else None


def _logged_model_of_run(c: Any, run: Any, name: str) -> str | None:
    """The id of the logged model ``name`` that ``run`` produced (None for a model logged as plain files)."""
    found = c.search_logged_models([run.info.experiment_id],
                                   filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'",
                                   max_results=1)
    return found[0].model_id if found else None


def load(uri: str) -> LoadedModel:
    """Load the EMA model behind ``uri`` for sampling (eval mode, CPU)."""
    from ddpm.diffusion import Diffusion

    meta = describe(uri)
    if not _is_mlflow_uri(uri):
        from ddpm.checkpoint import CheckpointError, load_model

        try:
            cfg, model, diffusion = load_model(uri)
        except CheckpointError as e:  # unsafe, corrupt or incompatible: the user's input, exit 2
            raise UsageError(f"model {uri!r} cannot be loaded: {e}") from e
        return LoadedModel(uri=uri, config=cfg, model=model, diffusion=diffusion)
    import mlflow

    from ddpm.checkpoint import CheckpointError, import_weights

    model_uri = uri  # pinned to what describe() resolved: a version registered meanwhile is not mixed in
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        model_uri = f"runs:/{run_id}/{path.strip('/') or 'model'}"
    elif meta["version"] is not None:
        model_uri = f"models:/{meta['name']}/{meta['version']}"
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        folder = _weights_folder(local)
        if folder is None:
            raise UsageError(f"model {model_uri!r} holds no ddpm weights (model.safetensors + config.json); "
                             "was it logged by ddpm-pipe?")
        try:
            cfg, model = import_weights(folder)
        except CheckpointError as e:
            raise UsageError(f"model {model_uri!r} cannot be loaded: {e}") from e
    model.eval()
    return LoadedModel(uri=uri, config=cfg, model=model, diffusion=Diffusion.from_config(cfg.diffusion),
                       run_id=meta["run_id"], name=meta["name"], version=meta["version"],
                       model_id=meta["model_id"])


def _weights_folder(local: str) -> str | None:
    """The folder under a downloaded pyfunc model that holds ``model.safetensors``."""
    from ddpm.checkpoint import WEIGHTS_FILE

    for root, _dirs, files in os.walk(local):
        if WEIGHTS_FILE in files:
            return root
    return None
