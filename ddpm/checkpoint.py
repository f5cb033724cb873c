"""Training checkpoints and exported weights: tensors and primitives only, never pickled objects.

A checkpoint is a ``torch.save``'d dict written atomically through fsspec (local path, ``file://``,
``s3://``, ...). Besides what the caller passes (``model``, ``ema``, ``optimizer``, ``step``, ...) it
holds the config as a JSON string, the package version and :data:`FORMAT_VERSION`. Loading uses
``torch.load(weights_only=True)``, so a file carrying code is refused instead of run.

The model-registry artifact is a folder with ``model.safetensors`` (EMA weights; the config and
versions also sit in its metadata) and ``config.json`` beside it.
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

import torch
from torch import nn

import ddpm
from ddpm.config import ConfigError, ExperimentConfig

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "ddpm_version", "config", "model")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be read: unsafe, corrupt, incompatible, or incomplete."""


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back."""
    if isinstance(value, (torch.Tensor, str, int, float, bool, type(None))):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}] must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where} is a {type(value).__name__}; only tensors, numbers, "
                    "strings, None, lists and dicts may be saved")


def _config_json(config: ExperimentConfig | str | dict) -> str:
    if isinstance(config, ExperimentConfig):
        return config.to_json()
    if isinstance(config, dict):
        return ExperimentConfig.from_dict(config).to_json()
    if isinstance(config, str):
        return config
    raise TypeError(f"config must be an ExperimentConfig, a dict or a JSON string, got {type(config).__name__}")


def _write(url: str, data: bytes, storage_options: dict | None) -> None:
    """Write ``data`` to ``url`` whole or not at all, through a temporary name on every store."""
    import fsspec

    from ddpm.data.storage import atomic_write

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "/" in path:  # atomic_write makes only local folders; remote stores with folders need theirs
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    atomic_write(fs, path, data, via_temp=True)


def save_checkpoint(url: str, state: dict[str, Any], storage_options: dict | None = None) -> None:
    """Save a training state.

    :param state: must hold ``config`` (ExperimentConfig, dict or JSON string) and ``model`` (a state
        dict); anything else (``ema``, ``optimizer``, ``step``, RNG states) is kept as given. Values
        must be tensors, numbers, strings, None, lists or dicts.
    """
    missing = {"config", "model"} - set(state)
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {sorted(missing)}")
    payload = dict(state)
    payload["config"] = _config_json(state["config"])
    payload["ddpm_version"] = ddpm.__version__
    payload["format_version"] = FORMAT_VERSION
    _check_plain(payload, "state")
    buf = io.BytesIO()
    torch.save(payload, buf)
    _write(url, buf.getvalue(), storage_options)


def _parse_config(text: Any, url: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_dict(json.loads(text))
    except (ConfigError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{url}: its config does not build with ddpm {ddpm.__version__}: {e}") from e


def load_checkpoint(url: str, storage_options: dict | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    :return: the saved dict, with ``config`` parsed into an :class:`ExperimentConfig`.
    :raises CheckpointError: the file holds code or other objects, is not a checkpoint, has another
        format version, lacks required keys, or its config does not build.
    :raises FileNotFoundError: nothing at ``url``.
    """
    import fsspec

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        data = f.read()
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        detail = lines[-2] if len(lines) >= 2 else str(e)  # torch's reason, without its boilerplate
        raise CheckpointError(f"{url}: refused: not a weights-only checkpoint (it holds objects other "
                              f"than tensors and primitives, or is corrupt): {detail.strip()}") from e
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{url}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{url}: not a ddpm checkpoint (holds a {type(state).__name__}, not a dict)")
    version = state.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise CheckpointError(f"{url}: checkpoint format version {version!r} (ddpm {state.get('ddpm_version')}); "
                              f"ddpm {ddpm.__version__} reads format {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{url}: not a ddpm checkpoint, missing key(s) {', '.join(missing)}")
    state["config"] = _parse_config(state["config"], url)
    return state


def _build(config: ExperimentConfig, weights: dict[str, torch.Tensor], url: str) -> nn.Module:
    from ddpm.unet import UNet

    model = UNet(config.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{url}: weights do not fit the config's model: {e}") from e
    return model.eval()


def load_model(url: str, storage_options: dict | None = None, map_location: str | torch.device = "cpu",
               weights: str = "ema") -> tuple[ExperimentConfig, nn.Module, Any]:
    """Load a model for sampling from a checkpoint file or an exported weights folder.

    :param weights: ``"ema"`` (the averaged weights the paper samples from) or ``"model"`` (raw).
    :return: (config, UNet in eval mode on ``map_location``, ``Diffusion`` built from the config).
    """
    import fsspec

    from ddpm.diffusion import Diffusion

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path):
        config, model = import_weights(url, storage_options)
        model.to(map_location)
    else:
        state = load_checkpoint(url, storage_options, map_location)
        config = state["config"]
        if weights == "ema":
            if "ema" not in state or "module" not in state["ema"]:
                raise CheckpointError(f"{url}: has no EMA weights (pass weights='model' for the raw ones)")
            sd = state["ema"]["module"]
        elif weights == "model":
            sd = state["model"]
        else:
            raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
        model = _build(config, sd, url)
    return config, model, Diffusion.from_config(config.diffusion)


def export_weights(model: nn.Module, folder: str, config: ExperimentConfig,
                   storage_options: dict | None = None) -> None:
    """Write ``folder/model.safetensors`` (the model's weights) and ``folder/config.json``.

    Pass the EMA module (``ema.module``) for a registry artifact. ``config.json`` holds
    ``{"config": ..., "ddpm_version": ..., "format_version": ...}``.
    """
    from safetensors.torch import save as save_safetensors

    meta = {"config": config.to_json(), "ddpm_version": ddpm.__version__, "format_version": str(FORMAT_VERSION)}
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
               for k, v in model.state_dict().items()}
    folder = folder.rstrip("/")
    _write(f"{folder}/{WEIGHTS_FILE}", save_safetensors(tensors, metadata=meta), storage_options)
    doc = {"config": config.to_dict(), "ddpm_version": ddpm.__version__, "format_version": FORMAT_VERSION}
    _write(f"{folder}/{CONFIG_FILE}", json.dumps(doc, indent=2).encode(), storage_options)


def import_weights(folder: str, storage_options: dict | None = None) -> tuple[ExperimentConfig, nn.Module]:
    """Read a folder written by :func:`export_weights`: (config, UNet in eval mode on the CPU)."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    path = path.rstrip("/")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not fs.exists(f"{path}/{name}"):
            raise CheckpointError(f"{folder}: no {name} (not an exported ddpm model)")
    try:
        doc = json.loads(fs.cat_file(f"{path}/{CONFIG_FILE}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: not valid JSON: {e}") from e
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format version {doc.get('format_version')!r}; "
                              f"ddpm {ddpm.__version__} reads format {FORMAT_VERSION}")
    config = _parse_config(json.dumps(doc.get("config")), folder)
    try:
        tensors = load_safetensors(fs.cat_file(f"{path}/{WEIGHTS_FILE}"))
    except Exception as e:
        raise CheckpointError(f"{folder}/{WEIGHTS_FILE}: not readable safetensors: {e}") from e
    return config, _build(config, tensors, folder)
