"""`ddpm-pipe run`: prepare -> (tune) -> train -> evaluate -> promote -> sample, as one workflow.

A short, explicit sequence of steps, not a workflow engine. Each step has typed inputs; their hash
(the step's options, the resolved config, the upstream outputs it reads, the package version) is
recorded with its outputs in ``DDPM_HOME/workflows/<name>/state.json``. Re-running the same name
skips a step whose inputs hash the same and whose outputs still exist; a changed input reruns that
step, and, since later steps read its outputs, the steps after it.

Everything is tracked under one MLflow parent run (the workflow) with a nested run per step, so the
lineage data manifest -> training run -> model version -> samples can be followed in the MLflow UI.
``--submit`` sends the same command to a Ray cluster as a Ray Job, so it outlives the laptop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ddpm
from ddpm.config import ConfigError, parse_duration, read_yaml_mapping
from pipelines.errors import UsageError
from pipelines.names import check_name
from pipelines.settings import redact, shareable_uri


@dataclass(frozen=True)
class TuneStep:
    enabled: bool = False  # the paper's hyper-parameters are a good default; sweeping is opt-in
    trials: int = 8
    max_steps: int = 200
    scheduler: str = "asha"
    search: str = "random"


@dataclass(frozen=True)
class TrainStep:
    nodes: int = 1
    gpus_per_node: int = 0
    max_steps: int | None = None  # None: the config's train.max_steps
    max_time: float | str | None = None  # None: the config's train.max_time; 600, "90s", "10m", "1.5h"


@dataclass(frozen=True)
class EvaluateStep:
    num: int = 500  # samples scored against the held-out split (KID, FD, precision/recall, ...)
    sampler: str | None = None  # None: the model's own (its config's sample section), as steps and eta
    steps: int | None = None
    eta: float | None = None
    nodes: int = 1


@dataclass(frozen=True)
class PromoteStep:
    alias: str = "champion"
    metric: str = "kid"  # unbiased, with a standard error; against held-out images
    min_delta: float = 0.0


@dataclass(frozen=True)
class SampleStep:
    num: int = 64
    sampler: str | None = None  # None: the model's own (its config's sample section), as steps and eta
    steps: int | None = None
    eta: float | None = None
    nodes: int = 1
    format: str = "png"
    seed: int = 0


@dataclass(frozen=True)
class WorkflowSpec:
    """The ``--workflow`` YAML: one section per step, each optional."""

    tune: TuneStep = field(default_factory=TuneStep)
    train: TrainStep = field(default_factory=TrainStep)
    evaluate: EvaluateStep = field(default_factory=EvaluateStep)
    promote: PromoteStep = field(default_factory=PromoteStep)
    sample: SampleStep = field(default_factory=SampleStep)

    @classmethod
    def load(cls, path: str | None) -> "WorkflowSpec":
        if not path:
            return cls()
        if not Path(path).exists():
            raise UsageError(f"--workflow {path!r} does not exist")
        try:
            data = read_yaml_mapping(path, "the workflow file must hold a mapping of steps")
        except ConfigError as e:
            raise UsageError(str(e)) from None
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise UsageError(f"{path}: unknown workflow step(s) {', '.join(unknown)}; valid: {', '.join(sections)}")
        built = {}
        for name, section in data.items():
            kind = {"tune": TuneStep, "train": TrainStep, "evaluate": EvaluateStep, "promote": PromoteStep,
                    "sample": SampleStep}[name]
            valid = [f.name for f in dataclasses.fields(kind)]
            bad = sorted(set(section or {}) - set(valid))
            if bad:
                raise UsageError(f"{path}: unknown key(s) {', '.join(bad)} in {name}; valid: {', '.join(valid)}")
            section = dict(section or {})
            if name == "train" and section.get("max_time") is not None:
                try:
                    section["max_time"] = parse_duration(section["max_time"])
                except ValueError as e:
                    raise UsageError(f"{path}: train.max_time: {e}") from None
            built[name] = kind(**section)
        return cls(**built)


class State:
    """Recorded inputs and outputs of each finished step of one workflow name."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, step: str, digest: str) -> dict[str, Any] | None:
        rec = self.steps.get(step)
        return rec["outputs"] if rec and rec.get("inputs") == digest else None

    def record(self, step: str, digest: str, outputs: dict[str, Any]) -> None:
        self.steps[step] = {"inputs": digest, "outputs": outputs, "finished": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.steps, indent=2, default=str))
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written state


def digest(inputs: dict[str, Any]) -> str:
    text = json.dumps({**inputs, "ddpm_version": ddpm.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest_digest(url: str) -> str:
    from ddpm.data import read_manifest

    return hashlib.sha256(json.dumps(read_manifest(url), sort_keys=True).encode()).hexdigest()[:16]


def _outputs_exist(step: str, outputs: dict[str, Any]) -> bool:
    """Whether a recorded step's outputs are still there (else it reruns)."""
    try:
        if step == "prepare":
            return _manifest_digest(outputs["train_url"]) == outputs["train_manifest"]
        if step == "tune":
            return Path(outputs["best_config_path"]).exists()
        if step in ("train", "evaluate", "promote"):
            from pipelines.registry import models

            models.describe(outputs["model_uri"])
            return True
        if step == "sample":
            import fsspec

            fs, path = fsspec.core.url_to_fs(outputs["manifest"])
            return fs.exists(path)
    except Exception:
        return False
    return True


def run_command(config: str = "digits", overrides: list[str] | None = None, workflow: str | None = None,
                name: str | None = None, storage: str | None = None, address: str | None = None,
                submit: bool = False) -> dict[str, Any]:
    """Run (or resume) the workflow; with ``submit``, send it to a Ray cluster as a Ray Job."""
    from pipelines.train.command import resolve_config

    overrides = list(overrides or [])
    cfg = resolve_config(config, overrides)
    spec = WorkflowSpec.load(workflow)
    check_name(name or f"{cfg.name}-workflow", "--name" if name else "the config's name (in the default --name)")
    check_name(cfg.name, "the config's name (the workflow's MLflow experiment)")
    name = name or f"{cfg.name}-workflow"
    if submit:
        return submit_job(config, overrides, workflow, name, storage, address)
    from pipelines import tracking
    from pipelines.settings import resolve

    settings = resolve(storage, address)
    tracking.configure(settings)
    exp_id = tracking.experiment_id(cfg.name, settings)
    parent_id, resumed = tracking.start_or_resume_run(exp_id, name, {tracking.KIND_TAG: "workflow"})
    state = State(settings.home / "workflows" / name / "state.json")
    outputs: dict[str, dict[str, Any]] = {}
    ran, skipped = [], []

    def step(label: str, inputs: dict[str, Any], body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = digest(inputs)
        previous = state.done(label, key)
        if previous is not None and _outputs_exist(label, previous):
            print(f"[run] {label}: up to date, skipped")
            skipped.append(label)
            outputs[label] = previous
            return previous
        print(f"[run] {label}: running")
        t0 = time.perf_counter()
        out = body()
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        state.record(label, key, out)
        _log_step(exp_id, parent_id, name, label, key, out)
        ran.append(label)
        outputs[label] = out
        return out

    try:
        # 1. data: source -> shards (train and held-out test split)
        from pipelines.storage.data import ensure_prepared

        train_url = cfg.data.url or settings.data_url(cfg.data.source, "train")
        test_url = cfg.data.holdout_url or settings.data_url(cfg.data.source, "test")

        def prepare() -> dict[str, Any]:
            ensure_prepared(cfg.data.source, train_url, "train")
            ensure_prepared(cfg.data.source, test_url, "test")
            return {"train_url": train_url, "test_url": test_url,
                    "train_manifest": _manifest_digest(train_url), "test_manifest": _manifest_digest(test_url)}

        data = step("prepare", {"source": cfg.data.source, "train_url": train_url, "test_url": test_url}, prepare)

        # 2. optional sweep: its best config replaces the given one
        train_config, train_overrides = config, overrides
        if spec.tune.enabled:
            def tune() -> dict[str, Any]:
                from pipelines.tune.command import tune_command

                res = tune_command(trials=spec.tune.trials, config=config, overrides=overrides,
                                   data=data["train_url"], max_steps=spec.tune.max_steps,
                                   scheduler=spec.tune.scheduler, search=spec.tune.search,
                                   storage=storage, name=f"{name}-tune", address=address)
                return {"best_config_path": res["best_config_path"], "best_bpd": res["best_bpd"],
                        "parent_run_id": res["parent_run_id"]}

            tuned = step("tune", {"config": cfg.to_dict(), "tune": dataclasses.asdict(spec.tune),
                                  "data": data["train_manifest"]}, tune)
            train_config, train_overrides = tuned["best_config_path"], []
        train_cfg = resolve_config(train_config, train_overrides, spec.train.max_steps, max_time=spec.train.max_time)

        # 3. train -> a registered model version
        def train() -> dict[str, Any]:
            from pipelines.train.command import train_command

            res = train_command(config=train_config, overrides=train_overrides, data=data["train_url"],
                                storage=storage, nodes=spec.train.nodes, gpus_per_node=spec.train.gpus_per_node,
                                max_steps=spec.train.max_steps, max_time=spec.train.max_time,
                                experiment=cfg.name, run_name=f"{name}-train",
                                address=address, parent_run_id=parent_id)
            return {"run_id": res["run_id"], "model_uri": res["model_uri"], "version": res["version"],
                    "registered_model": res["registered_model"], "checkpoint": res["checkpoint"],
                    "loss": res["metrics"].get("loss"), "bpd": res["metrics"].get("bpd")}

        trained = step("train", {"config": train_cfg.to_dict(), "train": dataclasses.asdict(spec.train),
                                 "data": data["train_manifest"]}, train)

        # 4. evaluate the new version (metrics become version tags promotion compares)
        def evaluate() -> dict[str, Any]:
            from pipelines.registry.evaluate import evaluate_command

            e = spec.evaluate
            res = evaluate_command(model=trained["model_uri"], data=data["test_url"], num=e.num,
                                   sampler=e.sampler, steps=e.steps, eta=e.eta, nodes=e.nodes, address=address)
            floors = {f"{k}_floor": v for k, v in res["floors"].items()}
            errors = {f"{k}_se": v for k, v in res.get("se", {}).items()}
            errors.update({f"{k}_floor_se": v for k, v in res.get("floor_se", {}).items()})
            scores = {k: v for k, v in {**res["scores"], **floors, **errors}.items()
                      if isinstance(v, (int, float))}
            return {"model_uri": trained["model_uri"], "bpd": res["bpd"], "scores": scores,
                    "compared": res.get("compared", {}), "floor_compared": res.get("floor_compared", {}),
                    "sec_per_sample": res["sec_per_sample"]}

        evaluated = step("evaluate", {"model": trained["model_uri"], "evaluate": dataclasses.asdict(spec.evaluate),
                                      "data": data["test_manifest"]}, evaluate)

        # 5. promote if better (a refusal is an outcome, not a failure)
        def promote() -> dict[str, Any]:
            from pipelines.errors import RefusedError
            from pipelines.registry.promote import promote_command

            p = spec.promote
            try:
                res = promote_command(name=trained["registered_model"], version=trained["version"],
                                      alias=p.alias, metric=p.metric, min_delta=p.min_delta)
                return {"model_uri": trained["model_uri"], "promoted": True, "message": res["message"]}
            except RefusedError as err:
                return {"model_uri": trained["model_uri"], "promoted": False, "message": str(err)}

        promoted = step("promote", {"model": trained["model_uri"], "promote": dataclasses.asdict(spec.promote),
                                    "evaluation": evaluated["scores"]}, promote)

        # 6. batch-sample the new version
        def sample() -> dict[str, Any]:
            from pipelines.sample.command import sample_command

            s = spec.sample
            out_url = settings.samples_url(f"{name}-v{trained['version']}")
            res = sample_command(model=trained["model_uri"], num=s.num, out=out_url, sampler=s.sampler,
                                 steps=s.steps, eta=s.eta, batch_size=256, nodes=s.nodes, gpus_per_node=0,
                                 seed=s.seed, format=s.format, precision="fp32", progressive=0, address=address)
            grid = _grid(trained["model_uri"], settings, name, train_cfg)
            return {"out": res.get("out", out_url), "manifest": res.get("manifest"), "grid": grid,
                    "model_uri": trained["model_uri"]}

        sampled = step("sample", {"model": trained["model_uri"], "sample": dataclasses.asdict(spec.sample)}, sample)
    except Exception:
        tracking.end_run(parent_id, "FAILED")
        raise
    tracking.client().set_tag(parent_id, "ddpm.lineage", json.dumps({
        "data_manifest": data["train_manifest"], "train_run": trained["run_id"], "model": trained["model_uri"],
        "samples": sampled["out"]}))
    tracking.end_run(parent_id)
    ui = f"mlflow ui --backend-store-uri {settings.tracking_uri}" if settings.tracking_uri.startswith("sqlite:") \
        else settings.tracking_uri
    message = "\n".join([
        f"workflow '{name}': ran {', '.join(ran) or 'nothing'}; skipped {', '.join(skipped) or 'nothing'}",
        f"  registered model : {trained['model_uri']} ({'promoted to ' + spec.promote.alias if promoted['promoted'] else 'not promoted: ' + promoted['message']})",
        f"  evaluation       : bpd {evaluated['bpd']:.3f} (held-out bound)",
        *_score_lines(evaluated),
        f"  sample grid      : {sampled['grid']}",
        f"  samples          : {sampled['out']}",
        f"  MLflow store     : {settings.tracking_uri} (UI: {ui})",
    ])
    message = redact(message)  # a tracking URI may hold user:password@
    return {"name": name, "parent_run_id": parent_id, "resumed": resumed, "ran": ran, "skipped": skipped,
            "steps": outputs, "message": message}


SUMMARY_SCORES = ("kid", "fd", "classifier_score", "class_tv", "precision", "recall")


def _score_lines(evaluated: dict[str, Any]) -> list[str]:
    """One summary line per headline score: value ± s.e., what it was compared with, and its floor."""
    scores, compared = evaluated["scores"], evaluated.get("compared", {})
    floor_what = evaluated.get("floor_compared", {})

    def cell(name: str) -> str:
        se = scores.get(f"{name}_se")
        return f"{scores[name]:.4g}" + (f" ± {se:.2g}" if se is not None else "")

    lines = []
    for k in SUMMARY_SCORES:
        if k in scores and f"{k}_floor" in scores:
            lines.append(f"    {compared.get(k, k):<36} {cell(k):<16} (real-data floor {cell(k + '_floor')}: "
                         f"{floor_what.get(k, 'training images')})")
    return lines


def _grid(model_uri: str, settings, name: str, cfg) -> str:
    """A 64-image grid of the model's samples next to the batch output, for a quick look."""
    from pipelines.registry import models
    from pipelines.train.loop import sample_grid

    loaded = models.load(model_uri)
    path = settings.home / "samples" / f"{name}-grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return sample_grid(loaded.model, loaded.diffusion, loaded.config, str(path))


def _log_step(exp_id: str, parent_id: str, name: str, label: str, key: str, out: dict[str, Any]) -> None:
    """A nested MLflow run per step, holding its input digest and outputs."""
    from mlflow.entities import Metric

    from pipelines import tracking

    if label == "train":  # the training run itself is the nested run
        tracking.client().set_tag(out["run_id"], "ddpm.step_inputs", key)
        return
    run_id, _ = tracking.start_or_resume_run(exp_id, f"{name}-{label}", {tracking.KIND_TAG: f"workflow.{label}",
                                                                          "ddpm.step_inputs": key},
                                             parent_run_id=parent_id)
    tracking.log_params(run_id, {label: {k: v for k, v in out.items() if not isinstance(v, dict)}})
    numeric = {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric.update({k: float(v) for k, v in (out.get("scores") or {}).items()})
    if numeric:
        now = int(time.time() * 1000)
        tracking.client().log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in numeric.items()])
    tracking.end_run(run_id)


def ship_files(config: str, workflow: str | None) -> tuple[str, str, str | None]:
    """A new folder holding copies of the local files the job reads; ``(folder, config, workflow)``
    with ``config``/``workflow`` as the job names them, relative to that folder (its working dir).

    A preset name stays a name; a config or workflow file is copied under a fixed name.
    """
    from ddpm.config import PRESETS

    folder = tempfile.mkdtemp(prefix="ddpm-job-")
    if config not in PRESETS:
        shipped = "config" + Path(config).suffix
        shutil.copyfile(config, os.path.join(folder, shipped))
        config = shipped
    if workflow:
        shipped = "workflow" + Path(workflow).suffix
        shutil.copyfile(workflow, os.path.join(folder, shipped))
        workflow = shipped
    return folder, config, workflow


def job_env() -> dict[str, str]:
    """Settings the Ray job takes from the submitter: non-secret ones only.

    Credentials (``AWS_*`` keys, a tracking URI holding ``user:pass@``) stay out: a job's runtime env
    is shown by the Ray dashboard; the cluster's own environment holds them.
    """
    from ddpm.data.storage import S3_ENDPOINT_VARS

    env = {k: v for k, v in os.environ.items() if k in ("DDPM_HOME", "MLFLOW_TRACKING_URI", "DDPM_STORAGE",
                                                         *S3_ENDPOINT_VARS, "AWS_DEFAULT_REGION")}
    if "MLFLOW_TRACKING_URI" in env and shareable_uri(env["MLFLOW_TRACKING_URI"]) is None:
        del env["MLFLOW_TRACKING_URI"]
    return env


def submit_job(config: str, overrides: list[str], workflow: str | None, name: str, storage: str | None,
               address: str | None) -> dict[str, Any]:
    """Submit ``ddpm-pipe run`` as a Ray Job (Jobs API, needs ``ray[default]`` on the cluster).

    The local config and workflow files travel with the job as its working directory (uploaded by
    the Jobs client), so they need not exist on the cluster.
    """
    from ray.job_submission import JobSubmissionClient

    job_address = address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not job_address:
        raise UsageError("--submit needs --address (the cluster's dashboard URL, e.g. http://HEAD:8265) "
                         "or RAY_ADDRESS")
    try:
        client = JobSubmissionClient(job_address)
    except Exception as e:
        raise UsageError(f"cannot reach the Ray Jobs API at {job_address}: {str(e).splitlines()[0]}") from e
    folder, job_config, job_workflow = ship_files(config, workflow)
    args = ["ddpm-pipe", "run", "--config", job_config, "--name", name]
    for item in overrides:
        args += ["--set", item]
    if job_workflow:
        args += ["--workflow", job_workflow]
    if storage:
        args += ["--storage", storage]
    runtime_env = {"working_dir": folder, "env_vars": job_env()}
    submission_id = f"{name}-{int(time.time())}"
    deadline = time.time() + 120
    try:
        while True:  # a freshly started head drops connections or answers "No available agent" for a while
            try:
                job_id = client.submit_job(entrypoint=shlex.join(args), runtime_env=runtime_env,
                                           submission_id=submission_id)
                break
            except (RuntimeError, OSError) as e:
                starting = isinstance(e, OSError) or "No available agent" in str(e)
                if not starting or time.time() > deadline:
                    raise
                time.sleep(2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # uploaded by submit_job
    return {"job_id": job_id, "address": job_address, "entrypoint": shlex.join(args),
            "message": f"submitted workflow '{name}' as Ray Job {job_id}; follow it with: "
                       f"ray job logs --address {job_address} --follow {job_id}"}
