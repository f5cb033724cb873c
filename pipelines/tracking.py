"""The one place that talks to MLflow about runs: experiments, runs and nested runs, params, datasets.

A training worker logs through :class:`pipelines.train.async_logger.AsyncLogger` instead (a
background thread with bounded retries and buffer, so training never stalls on tracking).

Every run carries what ``mlflow.start_run`` would set (``mlflow.user``, ``mlflow.source.name``,
``mlflow.source.type``, ``mlflow.source.git.commit``; the commit is that of the ``pipelines``
source tree, or ``DDPM_GIT_COMMIT`` in an image built without ``.git``). Experiments are tagged
as model training (``mlflow.experimentKind``), so MLflow's UI opens them on runs and charts.
Data goes in as an MLflow dataset built from the shards' manifest (:func:`log_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types.schema import Schema, TensorSpec
from mlflow.utils import git_utils
from mlflow.utils.mlflow_tags import (MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT,
                                      MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME)

from ddpm.data.manifest import identity, read_manifest
from pipelines.errors import PipelineError, RefusedError, UsageError
from pipelines.settings import Settings, redact, redact_obj, resolve

RUN_NAME_TAG = "ddpm.run_name"
KIND_TAG = "ddpm.kind"
STORAGE_TAG = "ddpm.storage"  # a training run's checkpoint folder (<storage>/<run name>)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by MLflow's UI to pick the experiment's view
EXPERIMENT_KIND = "custom_model_development"  # runs, charts, models (not the GenAI traces view)
GIT_COMMIT_ENV = "DDPM_GIT_COMMIT"  # the image's commit, passed at build time (no .git in the image)


def configure(settings: Settings) -> None:
    """Point MLflow at the resolved store and bound its HTTP retries (its default retries for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)


class RedactingClient(MlflowClient):
    """The MLflow client every write of this package goes through: what it stores (params, run,
    version, model and experiment tags, version descriptions, dataset sources) passes
    :func:`pipelines.settings.redact` first, so no URL credential or secret value reaches the store."""

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().set_tag(run_id, key, redact(value), synchronous=synchronous)

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().log_param(run_id, key, redact(value), synchronous=synchronous)

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                  tags: Sequence[RunTag] = (), synchronous: bool | None = None) -> Any:
        return super().log_batch(run_id, metrics, [Param(p.key, redact(p.value)) for p in params],
                                 [RunTag(t.key, redact(t.value)) for t in tags], synchronous=synchronous)

    def create_run(self, experiment_id: str, start_time: int | None = None, tags: dict[str, Any] | None = None,
                   run_name: str | None = None) -> Run:
        return super().create_run(experiment_id, start_time, redact_obj(tags), run_name)

    def set_model_version_tag(self, name: str, version: str | None = None, key: str | None = None, value: Any = None,
                              stage: str | None = None) -> None:
        return super().set_model_version_tag(name, version, key, redact(value), stage)

    def set_registered_model_tag(self, name: str, key: str, value: Any) -> None:
        return super().set_registered_model_tag(name, key, redact(value))

    def update_model_version(self, name: str, version: str, description: str | None = None) -> Any:
        return super().update_model_version(name, version, redact(description) if description else description)

    def create_model_version(self, name: str, source: str, run_id: str | None = None, tags: dict | None = None,
                             run_link: str | None = None, description: str | None = None, **kwargs: Any) -> Any:
        return super().create_model_version(name, source, run_id, redact_obj(tags), run_link,
                                            redact(description) if description else description, **kwargs)

    def log_inputs(self, run_id: str, datasets: Sequence[DatasetInput] | None = None, models: Any = None) -> None:
        datasets = [DatasetInput(masked_dataset(d.dataset), d.tags) for d in datasets or []]
        return super().log_inputs(run_id, datasets, models)

    def set_logged_model_tags(self, model_id: str, tags: dict[str, Any]) -> None:
        return super().set_logged_model_tags(model_id, redact_obj(tags))

    def log_model_params(self, model_id: str, params: dict[str, str]) -> None:
        return super().log_model_params(model_id, redact_obj(params))

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any) -> None:
        return super().set_experiment_tag(experiment_id, key, redact(value))


def masked_dataset(data: Dataset) -> Dataset:
    """A dataset entity whose source (the shards' URL) is masked (:func:`pipelines.settings.redact`)."""
    return Dataset(name=data.name, digest=data.digest, source_type=data.source_type, source=redact(data.source),
                   schema=data.schema, profile=data.profile)


def client() -> MlflowClient:
    """The MLflow client of this package: a :class:`RedactingClient`."""
    return RedactingClient()


def experiment_id(name: str, settings: Settings | None = None) -> str:
    """Get or create an experiment; the local store keeps artifacts under DDPM_HOME/mlartifacts
    (``settings`` default: :func:`pipelines.settings.resolve`; else MLflow would put them in
    ``./mlruns`` of whatever folder the process runs in)."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed; a user's choice stays
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    settings = settings if settings is not None else resolve()  # only a new experiment needs them
    location = None
    if settings.tracking_uri.startswith("sqlite:"):
        location = (settings.home / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter.

    MLflow's parser strips the outer quotes and knows no escapes: a value holding ``'`` goes in
    double quotes, one holding both kinds cannot be written and is refused.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UsageError(f"{value!r} holds both kinds of quote and cannot be searched for in MLflow")


def provenance_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` sets (user, source name and type), plus the project's git commit.

    The source name is the command (``ddpm-pipe train``); the commit, repository and branch are
    those of the ``pipelines`` source tree (an editable install or a checkout), else
    ``DDPM_GIT_COMMIT``; none is set when neither is known.
    """
    tags = {k: v for k, v in resolve_tags().items() if k.startswith("mlflow.")}
    argv = [Path(sys.argv[0]).name, *sys.argv[1:2]] if sys.argv and sys.argv[0] else []
    command = " ".join(a for a in argv if a and not a.startswith("-"))
    if command:
        tags[MLFLOW_SOURCE_NAME] = command
    here = str(Path(__file__).resolve().parent)
    commit = git_utils.get_git_commit(here) or os.environ.get(GIT_COMMIT_ENV)
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        for key, value in ((MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url(here)),
                           (MLFLOW_GIT_BRANCH, git_utils.get_git_branch(here))):
            if value:
                tags[key] = value
    return tags


def find_run(exp_id: str, run_name: str, parent_run_id: str | None = None) -> Run | None:
    """The newest run of this experiment whose ddpm.run_name tag equals ``run_name``, or None."""
    flt = f"tags.`{RUN_NAME_TAG}` = {quote(run_name)}"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = {quote(parent_run_id)}"
    runs = client().search_runs([exp_id], filter_string=flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def start_or_resume_run(exp_id: str, run_name: str, tags: dict[str, str] | None = None,
                        parent_run_id: str | None = None, claim: dict[str, str] | None = None) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``: re-running the same name reuses its run (no duplicates).

    ``claim``: tags that say where this run's state lives (``ddpm.storage``); a run of this name that
    records other values is another job's, and is refused (exit 3) instead of resumed. Of two jobs
    that create the run of one name at the same moment, the first created keeps it; the other's
    run is deleted and that job refused (:func:`_first_of_its_name`).
    """
    c = client()
    claim = {k: redact(v) for k, v in (claim or {}).items()}
    existing = find_run(exp_id, run_name, parent_run_id)
    if existing is not None:
        _check_claim(existing, run_name, claim)
        c.update_run(existing.info.run_id, status="RUNNING")
        for key, value in claim.items():
            if key not in existing.data.tags:
                c.set_tag(existing.info.run_id, key, value)
        return existing.info.run_id, True
    all_tags = {**provenance_tags(), RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **(tags or {}), **claim}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    _first_of_its_name(exp_id, run_name, parent_run_id, run.info.run_id)
    return run.info.run_id, False


def _check_claim(run: Run, run_name: str, claim: dict[str, str]) -> None:
    for key, value in claim.items():
        recorded = run.data.tags.get(key)
        if recorded is not None and recorded != value:
            raise RefusedError(f"MLflow run '{run_name}' ({run.info.run_id}) records {key} = {recorded}, not "
                               f"{value}: it is another job's run; use another name, or the same {key}")


def _first_of_its_name(exp_id: str, run_name: str, parent_run_id: str | None, run_id: str) -> None:
    """Keep ``run_id`` only if it is the first run of this name: another job created one meanwhile."""
    flt = f"tags.`{RUN_NAME_TAG}` = {quote(run_name)}"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = {quote(parent_run_id)}"
    runs = client().search_runs([exp_id], filter_string=flt, max_results=50,
                                order_by=["attributes.start_time ASC"])
    first = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if first is not None and first.info.run_id != run_id:
        client().delete_run(run_id)
        raise RefusedError(f"another job created MLflow run '{run_name}' ({first.info.run_id}) at the same "
                           "time; it keeps the name: wait for it, or use another name")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def fail_run(run_id: str, message: str) -> PipelineError:
    """End the run as FAILED; return the error for the caller to raise (``raise fail_run(...) from e``)."""
    end_run(run_id, "FAILED")
    return PipelineError(message)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))
    return out


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params once; on a resumed run the already logged ones are left alone."""
    c = client()
    have = c.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in flatten(params).items() if k not in have]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])


DATA_CONTEXTS = ("training", "validation", "evaluation")  # mlflow.data.context of a logged dataset


def manifest_digest(manifest: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the manifest's :func:`ddpm.data.manifest.identity`."""
    return hashlib.sha256(json.dumps(identity(manifest), sort_keys=True).encode()).hexdigest()[:12]


def dataset(url: str, manifest: dict[str, Any]) -> Dataset:
    """The shards at ``url`` as an ``mlflow.data`` dataset entity: source ``url``, the manifest's
    digest, name ``<source>-<split>``, an image schema, and the manifest's counts as its profile."""
    with warnings.catch_warnings():  # MLflow registers its local source twice and warns about it
        warnings.simplefilter("ignore")
        try:
            source = resolve_dataset_source(url)
        except Exception:  # a scheme MLflow has no source type for (memory://, ...)
            source = CodeDatasetSource(tags={"uri": url})
    c, h, w = manifest["shape"]
    # The images as one tensor (MLflow schemas do not mix tensors and columns: labels are profiled).
    schema = Schema([TensorSpec(np.dtype("uint8"), (-1, h, w, c), "image")])
    meta = MetaDataset(source, f"{manifest['source']}-{manifest['split']}", manifest_digest(manifest), schema)
    profile = {key: manifest.get(key) for key in ("num_samples", "shape", "levels", "split", "source", "labels",
                                                  "classes")}
    profile.update(shards=len(manifest["shards"]), bytes=sum(int(s.get("size") or 0) for s in manifest["shards"]))
    # MetaDataset itself has no profile; the source masked: the entity is logged, pickled and kept
    return masked_dataset(Dataset(**meta.to_dict(), profile=json.dumps(profile)))


def log_dataset(run_id: str, data: str | Dataset, context: str,
                storage_options: dict[str, Any] | None = None) -> Dataset:
    """Log ``data`` as the run's input in ``context`` (``mlflow.data.context``: training, evaluation).

    ``data`` is a shards URL (its manifest is read) or the entity a previous call returned; that
    entity is returned (plain data: Ray may pickle it; its ``name`` and ``digest`` label metrics).
    MLflow keeps one input per dataset (name and digest) and run: a resumed run does not log it twice.
    """
    if context not in DATA_CONTEXTS:
        raise ValueError(f"context {context!r} is not one of {DATA_CONTEXTS}")
    if isinstance(data, str):
        data = dataset(data, read_manifest(data, storage_options))
    client().log_inputs(run_id, datasets=[DatasetInput(data, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return data
