"""Resolve a ``--model`` URI to a ready-to-sample model, without unpickling anything.

Accepted: ``runs:/RUN_ID/model``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (MLflow; the
weights and config artifacts of the pyfunc logged by training), or a checkpoint path/URL
(``.../checkpoint.pt``, local or ``s3://``).
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
    info: dict = field(default_factory=dict)


def _is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def describe(uri: str) -> dict[str, str | None]:
    """Run id, registered name and version behind a model URI (checks it exists; no download)."""
    if not _is_mlflow_uri(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            raise UsageError(f"model {uri!r} does not exist (expected runs:/ID/model, models:/NAME/VERSION, "
                             "models:/NAME@ALIAS, or a checkpoint path/URL)")
        return {"run_id": None, "name": None, "version": None}
    from pipelines import tracking

    c = tracking.client()
    try:
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/", 1)[0]
            c.get_run(run_id)
            return {"run_id": run_id, "name": None, "version": None}
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = rest.split("/", 1)
            mv = c.get_model_version(name, version)
        return {"run_id": mv.run_id, "name": mv.name, "version": str(mv.version)}
    except Exception as e:
        raise UsageError(f"model {uri!r} does not exist in the MLflow store: {str(e).splitlines()[0]}") from e


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

    model_uri = uri
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        model_uri = f"runs:/{run_id}/{path.strip('/') or 'model'}"
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
                       run_id=meta["run_id"], name=meta["name"], version=meta["version"])


def _weights_folder(local: str) -> str | None:
    """The folder under a downloaded pyfunc model that holds ``model.safetensors``."""
    from ddpm.checkpoint import WEIGHTS_FILE

    for root, _dirs, files in os.walk(local):
        if WEIGHTS_FILE in files:
            return root
    return None
