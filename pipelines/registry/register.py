"""Logging a model to MLflow as a pyfunc "model from code" and registering it as a model version.

What is logged under the run's model ``model``::

    MLmodel                      python_function flavor, loader from code (mlflow_model.py)
    mlflow_model.py              the pyfunc: predict(num, seeds, sampler, steps, eta) -> images
    code/ddpm/                   the package's source (code_paths), so loading needs no install
    artifacts/ddpm_model/        model.safetensors (EMA weights) + config.json, see ddpm.checkpoint
    input_example.json           {"num": 2, "seed": 0, "sampler": "ddim", "steps": 10} (and its
    serving_input_example.json   serving payload; MLflow checks at logging that predict accepts it)

Registering a version records the sha256 of each of these files (:func:`record_digests`,
``pipelines/registry/digests.py``): ``ddpm-pipe`` checks them before it loads the version.

The model carries a signature (inputs: the columns of :func:`signature`; output: uint8 images
``[num x H x W x C]``), so ``mlflow models predict`` / ``mlflow models serve`` know its input. The
logged model holds the flattened config as its params; the registered version gets a description
(what it was trained on, to which step) that :func:`record_evaluation` extends with headline scores.

Nothing of the project is pickled: weights are safetensors, the config is JSON, the model is code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy
import safetensors
import torch
from mlflow.entities import Run
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

import ddpm
from ddpm.checkpoint import export_weights, load_checkpoint, load_model
from ddpm.config import ExperimentConfig
from pipelines import tracking
from pipelines.registry import SHORT_TAG, digests
from pipelines.registry.models import MODEL_ARTIFACT, WEIGHTS_ARTIFACT
from pipelines.settings import masked_config, redact_obj
from pipelines.storage.scratch import scratch

EXAMPLE_STEPS = 10  # the input example's sampler steps: MLflow runs it once when logging (cheap)
EVAL_HEADING = "\n\nLatest evaluation "  # where a version's description turns to its scores


def signature(config: ExperimentConfig) -> ModelSignature:
    """The pyfunc's signature: request columns in, uint8 images ``[-1 x H x W x C]`` out.

    ``num`` is required; ``seed`` (sample i uses ``ddpm.noise.sample_seed(seed, i)``) or ``seeds``
    (one per sample), ``sampler``, ``steps``, ``eta``, ``batch_size``, and for a class-conditional
    model ``class_labels`` (one class per sample) and ``guidance`` (w) are optional.
    """
    optional = [("seed", DataType.long), ("seeds", Array(DataType.long)), ("sampler", DataType.string),
                ("steps", DataType.long), ("eta", DataType.double), ("batch_size", DataType.long),
                ("class_labels", Array(DataType.long)), ("guidance", DataType.double)]
    inputs = Schema([ColSpec(DataType.long, "num"), *(ColSpec(t, n, required=False) for n, t in optional)])
    m = config.model
    outputs = Schema([TensorSpec(numpy.dtype("uint8"), (-1, m.image_size, m.image_size, m.in_channels))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(config: ExperimentConfig) -> dict[str, Any]:
    """Two DDIM samples from seed 0 in a few steps (at most T); of a class-conditional model, of its
    first two classes (the config's guidance)."""
    example = {"num": 2, "seed": 0, "sampler": "ddim", "steps": min(EXAMPLE_STEPS, config.diffusion.timesteps)}
    if config.model.num_classes:
        example["class_labels"] = [c % config.model.num_classes for c in range(2)]
    return example


def log_model(run_id: str, config: ExperimentConfig, model: torch.nn.Module, name: str | None,
              metadata: dict[str, Any] | None = None) -> str | None:
    """Log ``model`` (a ``ddpm.unet.UNet``) with its ``ExperimentConfig`` as the run's pyfunc model.

    Registers it as a new version of ``name`` unless ``name`` is empty. Returns the version number
    (as a string), or None when not registered. The config goes in masked (its ``data.url`` may hold
    credentials): it is the artifact's ``config.json`` and the version's description.
    """
    config = masked_config(config)
    with scratch("model") as tmp:
        folder = Path(tmp) / WEIGHTS_ARTIFACT
        export_weights(model, str(folder), config)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={WEIGHTS_ARTIFACT: str(folder)},
                code_paths=[str(Path(ddpm.__file__).parent)],
                pip_requirements=_requirements(),
                signature=signature(config),
                input_example=input_example(config),
                registered_model_name=name or None,
                metadata=redact_obj({"ddpm_version": ddpm.__version__, **(metadata or {})}),
            )
    c = tracking.client()
    have = c.get_logged_model(info.model_id).params  # MLflow copies the run's params onto its models
    items = [(k, v) for k, v in tracking.flatten(config.to_dict()).items() if k not in have]
    for i in range(0, len(items), 100):
        c.log_model_params(info.model_id, dict(items[i:i + 100]))
    if not name:
        return None
    version = str(info.registered_model_version)
    c.update_model_version(name, version, training_description(c, run_id, config, metadata or {}))
    record_digests(c, run_id, name, version, info.model_id)
    return version


def record_digests(c: MlflowClient, run_id: str, name: str, version: str, model_id: str) -> None:
    """Record the sha256 of every artifact file of version ``version`` of ``name`` (the logged model
    ``model_id``), as stored: the listing (:func:`pipelines.registry.digests.listing`) as the run's
    artifact ``registry/<name>-v<version>.sha256``, its digest and path as the version's tags. Loading
    the version checks its files against it (:func:`pipelines.registry.models.weights_folder`)."""
    location = c.get_logged_model(model_id).artifact_location  # not models:/, whose download adds a file
    with scratch("model") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
        text = digests.listing(local)
    path = f"{digests.LISTING_FOLDER}/{name}-v{version}.sha256"
    c.log_text(run_id, text, path)
    c.set_model_version_tag(name, version, digests.LISTING_TAG, path)
    c.set_model_version_tag(name, version, digests.SHA256_TAG, digests.text_sha256(text))


def log_and_register(run_id: str, checkpoint_path: str, name: str | None) -> str | None:
    """Log a training checkpoint's EMA weights and config as the run's model; register it as ``name``.

    The checkpoint file itself is logged too (``checkpoint/``). Returns the new version or None.
    """
    config, model, _ = load_model(checkpoint_path, weights="ema")
    step = int(load_checkpoint(checkpoint_path).get("step", 0))
    version = log_model(run_id, config, model, name, metadata={"step": step})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(checkpoint_path, "checkpoint")
    return version


def training_description(c: MlflowClient, run_id: str, config: ExperimentConfig, metadata: dict[str, Any]) -> str:
    """One paragraph for the version page: network, chain, training data and step, run."""
    run = c.get_run(run_id)
    m, d = config.model, config.diffusion
    data = [f"{i.dataset.name} ({json.loads(i.dataset.profile or '{}').get('num_samples', '?')} images, "
            f"digest {i.dataset.digest}, {i.dataset.source_type} {_source_uri(i.dataset.source)})"
            for i in (run.inputs.dataset_inputs if run.inputs else [])
            if any(t.key == "mlflow.data.context" and t.value == "training" for t in i.tags)]
    trained = f"trained to step {metadata['step']}" if "step" in metadata else "trained"
    return (f"DDPM '{config.name}': U-Net ch={m.ch} ch_mult={list(m.ch_mult)} on {m.in_channels}x{m.image_size}x"
            f"{m.image_size} images, T={d.timesteps} {d.schedule} schedule, {d.prediction} prediction; "
            f"{conditioning(config, _class_names(run))}; "
            f"{trained} on {', '.join(data) or config.data.url or config.data.source} "
            f"in run {run.info.run_name} ({run_id}).")


def conditioning(config: ExperimentConfig, names: list[str] | None = None) -> str:
    """Whether a model is class-conditional, in words: on which classes (``names``: the training
    data's class names, when known), its label dropout and default guidance."""
    K = config.model.num_classes
    if not K:
        return "unconditional"
    named = f" ({', '.join(names)})" if names and len(names) == K else ""
    return (f"class-conditional on {K} classes, labels 0..{K - 1}{named}, label {K} the null class "
            f"(unconditional), trained with label dropout {config.train.label_dropout:g}, sampled with "
            f"classifier-free guidance w={config.sample.guidance:g} by default")


def _class_names(run: Run) -> list[str] | None:
    """The class names of the run's training data, from its dataset profile (its manifest's ``classes``)."""
    for i in run.inputs.dataset_inputs if run.inputs else []:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in i.tags):
            names = json.loads(i.dataset.profile or "{}").get("classes")
            if names:
                return [str(n) for n in names]
    return None


def _source_uri(source_json: str) -> str:
    try:
        source = json.loads(source_json)
    except ValueError:
        return source_json
    return str(source.get("uri") or source.get("url") or source)


def record_evaluation(c: MlflowClient, run_id: str, versions: list[tuple[str, str]],
                      primary: list[dict[str, Any]], results: list[dict[str, Any]], stamp: str) -> None:
    """What the registry shows of an evaluation made in run ``run_id``, beside the full-key
    ``ddpm.eval.*`` version tags that `ddpm-pipe promote` reads.

    ``primary`` are the results of the setting asked for (each ``{"key", "metric", "value"}``; any
    metric names): version tags ``eval.<metric>`` = value and the headline of each version's
    description. Every result goes into the table ``evaluation/results-<stamp>.md`` of the run.
    """
    with scratch("model") as tmp:
        table = Path(tmp) / f"results-{stamp}.md"
        table.write_text(results_markdown(results, stamp))
        c.log_artifact(run_id, str(table), "evaluation")
    headline = ", ".join(f"{r['metric']} {r['value']:.4g}" for r in primary)
    for name, version in versions:
        for r in primary:
            c.set_model_version_tag(name, version, SHORT_TAG + r["metric"], f"{r['value']:.6g}")
        trained = (c.get_model_version(name, version).description or "").split(EVAL_HEADING)[0].rstrip()
        c.update_model_version(name, version, f"{trained}{EVAL_HEADING}({stamp}): {headline}. Every result with "
                               f"the setting it depends on: run {run_id}, artifact evaluation/{table.name}.".lstrip())


def results_markdown(results: list[dict[str, Any]], stamp: str) -> str:
    """Every result as a table row: metric, value, and the setting it depends on (its key's parts)."""
    lines = [f"# Evaluation {stamp}", "", "| metric | value | depends on |", "|---|---|---|"]
    for r in results:
        setting = ", ".join(r["key"].split("/")[1:])
        lines.append(f"| {r['metric']} | {r['value']:.6g} | {setting} |")
    return "\n".join(lines) + "\n"


def _requirements() -> list[str]:
    """Pinned to the major.minor versions this package was logged with."""

    def floor(version: str) -> str:
        return ".".join(version.split("+")[0].split(".")[:2])

    return [f"torch>={floor(torch.__version__)}", f"numpy>={floor(numpy.__version__)}",
            f"safetensors>={floor(safetensors.__version__)}", "pyyaml", "fsspec"]
