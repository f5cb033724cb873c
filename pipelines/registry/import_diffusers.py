"""`ddpm-pipe import-diffusers`: a diffusers ``UNet2DModel`` folder -> a registered model version.

The network converts through ``ddpm.convert_diffusers`` (the paper's architecture only; a
class-conditional one, ``num_class_embeds = K``, becomes ``model.num_classes = K``, sampled with
``--class``/``--classes`` and ``--guidance`` as a model trained here). The rest of
the config is the paper's CIFAR-10 setting: linear betas 1e-4..0.02 over T = 1000 steps, epsilon
prediction, sigma_t^2 = beta_t, 256 grey levels (the ``cifar10`` preset), with the converted
network in place of the preset's. The version is logged by ``pipelines.registry.register`` in a run of the
``import-diffusers`` experiment that records the source folder.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ddpm.config import DiffusionConfig, ExperimentConfig, UNetConfig
from ddpm.convert_diffusers import DiffusersConversionError, load_diffusers_unet
from ddpm.unet import UNet
from pipelines import tracking
from pipelines.errors import UsageError
from pipelines.names import check_name
from pipelines.registry.models import MODEL_ARTIFACT
from pipelines.registry.register import log_model
from pipelines.settings import resolve

EXPERIMENT = "import-diffusers"


def diffusers_config(unet_config: UNetConfig, name: str) -> ExperimentConfig:
    """The ``ExperimentConfig`` of an imported network: the ``cifar10`` preset around it."""
    base = ExperimentConfig.preset("cifar10")
    return replace(base, name=name, model=unet_config,
                   diffusion=DiffusionConfig(schedule="linear", timesteps=1000, prediction="eps",
                                             variance="learned_range" if unet_config.learn_sigma else "fixed_large",
                                             loss="hybrid" if unet_config.learn_sigma else "simple"),
                   train=replace(base.train, registered_model=name))


def import_command(path: str, name: str) -> dict[str, Any]:
    """Convert the diffusers model at ``path`` and register it as a new version of ``name``."""
    check_name(name, "--name")
    try:
        unet_config, state_dict = load_diffusers_unet(path)
    except (DiffusersConversionError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    cfg = diffusers_config(unet_config, name)
    model = UNet(cfg.model)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UsageError(f"{path}: converted weights do not fit the U-Net: {str(e).splitlines()[0]}") from None
    model.eval()

    settings = resolve()
    tracking.configure(settings)
    exp_id = tracking.experiment_id(EXPERIMENT, settings)
    run_id = tracking.client().create_run(exp_id, run_name=f"import-{name}",
                                          tags={**tracking.provenance_tags(), tracking.KIND_TAG: "import-diffusers",
                                                "ddpm.source": path}).info.run_id
    try:
        tracking.log_params(run_id, {**cfg.to_dict(), "import": {"path": path}})
        version = log_model(run_id, cfg, model, name, metadata={"source": "diffusers", "path": path})
    except Exception:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    params = sum(p.numel() for p in model.parameters())
    uri = f"models:/{name}/{version}"
    K = cfg.model.num_classes
    return {"message": f"imported {path} ({params:,} parameters, T=1000 linear, 256 levels, "
                       f"{f'class-conditional on {K} classes' if K else 'unconditional'}) as {uri}; MLflow run {run_id}",
            "name": name, "version": version, "model_uri": uri, "run_id": run_id, "num_classes": K,
            "run_model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}", "parameters": params}
