"""`ddpm-pipe run`: prepare -> (tune) -> train -> evaluate -> promote -> sample, as one workflow.

A short, explicit sequence of steps, not a workflow engine. Each step has typed inputs; their hash
(the step's options, the resolved config, the upstream outputs it reads, the package version) is
recorded with its outputs in ``DDPM_HOME/workflows/<name>/state.json``. Re-running the same name
skips a step whose inputs hash the same and whose outputs still exist; a changed input reruns that
step, and, since later steps read its outputs, the steps after it.

Everything is tracked under one MLflow parent run (the workflow) with a nested run per step, so the
lineage data manifest -> training run -> model version -> samples can be followed in the MLflow UI.
``--submit`` sends the same command to a Ray cluster as a Ray Job, so it outlives the laptop.

The steps are a table (:data:`STEPS`): each names its inputs and its body; :class:`_Run` runs one
step or skips it. Every value of the ``--workflow`` file is checked when it is loaded, before the
first step (:meth:`WorkflowSpec.load`, :meth:`WorkflowSpec.check`), by the same checks the
commands themselves use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import ray.job_submission
from mlflow.entities import Metric

import ddpm
from ddpm.config import PRESETS, ConfigError, ExperimentConfig, Sampler, parse_duration, read_yaml_mapping
from ddpm.data.manifest import read_manifest
from ddpm.data.storage import DataError, atomic_write, is_local, open_fs
from pipelines import console, tracking
from pipelines.errors import RefusedError, UsageError
from pipelines.names import check_name
from pipelines.registry import evaluate, models, promote
from pipelines.sample import command as sample
from pipelines.sample.request import SampleRequest, check_format, resolve_settings
from pipelines.settings import SECRET_ENV_VARS, Settings, redact, resolve
from pipelines.storage import data
from pipelines.storage.lock import FolderLock
from pipelines.storage.scratch import scratch, scratch_dir
from pipelines.train import command as train
from pipelines.train.async_logger import CURVES, metric_name
from pipelines.train.loop import sample_grid
from pipelines.tune import command as tune
from pipelines.tune.ranking import check_metric


@dataclass(frozen=True)
class TuneStep:
    enabled: bool = False  # the paper's hyper-parameters are a good default; sweeping is opt-in
    trials: int = 8
    max_steps: int = 200
    scheduler: str = "asha"
    search: str = "random"
    metric: str = "bpd"  # what trials are ranked and stopped on (pipelines.tune.ranking.RANKABLE)

    def check(self, cfg: ExperimentConfig, t_known: bool) -> None:
        _at_least("tune.trials", self.trials, 1)
        _at_least("tune.max_steps", self.max_steps, 1)
        tune.check_options(self.scheduler, self.search, prefix="tune.")
        check_metric(self.metric, cfg, option="tune.metric")


@dataclass(frozen=True)
class TrainStep:
    nodes: int = 1
    gpus_per_node: int = 0
    max_steps: int | None = None  # None: the config's train.max_steps (or no limit with max_time alone)
    max_time: float | str | None = None  # None: the config's train.max_time; 600, "90s", "10m", "1.5h"

    def check(self, cfg: ExperimentConfig, t_known: bool) -> None:
        _at_least("train.nodes", self.nodes, 1)
        _at_least("train.gpus_per_node", self.gpus_per_node, 0)
        if self.max_steps is not None:
            _at_least("train.max_steps", self.max_steps, 1)


@dataclass(frozen=True)
class EvaluateStep:
    num: int = 500  # samples scored against the held-out split (KID, FD, precision/recall, ...)
    sampler: Sampler | None = None  # None: the model's own (its config's sample section), as steps and eta
    steps: int | None = None
    eta: float | None = None
    nodes: int = 1

    def check(self, cfg: ExperimentConfig, t_known: bool) -> None:
        evaluate.check_num(self.num, "evaluate.num")
        _at_least("evaluate.nodes", self.nodes, 1)
        _check_setting(cfg, t_known, "evaluate.", self.sampler, self.steps, self.eta)


@dataclass(frozen=True)
class PromoteStep:
    alias: str = "champion"
    metric: str = "kid"  # unbiased, with a standard error; against held-out images
    min_delta: float = 0.0

    def check(self, cfg: ExperimentConfig, t_known: bool) -> None:
        check_name(self.alias, "promote.alias")
        promote.check_gate(self.metric, self.min_delta, prefix="promote.")


@dataclass(frozen=True)
class SampleStep:
    num: int = 64
    sampler: Sampler | None = None  # None: the model's own (its config's sample section), as steps and eta
    steps: int | None = None
    eta: float | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    batch_size: int = 256
    precision: str = "fp32"
    format: str = "png"
    seed: int = 0

    def request(self, model: str, address: str | None = None) -> SampleRequest:
        return SampleRequest(model=model, num=self.num, sampler=self.sampler, steps=self.steps, eta=self.eta,
                             batch_size=self.batch_size, nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                             seed=self.seed, precision=self.precision, address=address)

    def check(self, cfg: ExperimentConfig, t_known: bool) -> None:
        self.request("").validate(prefix="sample.")
        check_format(self.format, prefix="sample.")
        _check_setting(cfg, t_known, "sample.", self.sampler, self.steps, self.eta)


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise UsageError(f"{key} must be >= {low}, got {value}")


def _check_setting(cfg: ExperimentConfig, t_known: bool, prefix: str, sampler: str | None, steps: int | None,
                   eta: float | None) -> None:
    """A step's sampling setting against the config that will be trained (its own sampler and T);
    after a sweep (``t_known`` false: T is the sweep's to choose) all but ``steps <= T``."""
    T = cfg.diffusion.timesteps if t_known else max(steps or 1, cfg.diffusion.timesteps)
    resolve_settings(cfg, sampler, steps, eta, prefix=prefix, num_timesteps=T)


@dataclass(frozen=True)
class WorkflowSpec:
    """The ``--workflow`` YAML: one section per step, each optional."""

    tune: TuneStep = field(default_factory=TuneStep)
    train: TrainStep = field(default_factory=TrainStep)
    evaluate: EvaluateStep = field(default_factory=EvaluateStep)
    promote: PromoteStep = field(default_factory=PromoteStep)
    sample: SampleStep = field(default_factory=SampleStep)

    @classmethod
    def load(cls, path: str | None) -> WorkflowSpec:
        """The file's steps: unknown steps or keys, and values of the wrong type, fail here (exit 2)."""
        if not path:
            return cls()
        if not Path(path).exists():
            raise UsageError(f"--workflow {path!r} does not exist")
        try:
            doc = read_yaml_mapping(path, "the workflow file must hold a mapping of steps")
        except ConfigError as e:
            raise UsageError(str(e)) from None
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - set(kinds))
        if unknown:
            raise UsageError(f"{path}: unknown workflow step(s) {', '.join(unknown)}; valid: {', '.join(kinds)}")
        built = {}
        for name, section in doc.items():
            kind = kinds[name]
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
            hints = typing.get_type_hints(kind)
            for key, value in section.items():
                _check_type(f"{path}: {name}.{key}", value, hints[key])
            built[name] = kind(**section)
        return cls(**built)

    def check(self, cfg: ExperimentConfig) -> None:
        """Every step's values, before the first step runs: the commands' own checks, against
        ``cfg`` (the config to train) where a value depends on it (a sampler's steps and T)."""
        for step in (self.tune, self.train, self.evaluate, self.promote, self.sample):
            step.check(cfg, t_known=not self.tune.enabled)


def _check_type(where: str, value: object, tp: object) -> None:
    """``value`` as a workflow file may give it for a field typed ``tp`` (an int is a float; a
    ``Literal`` lists its values; ``None`` only where the field takes it)."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union \
        else (tp,)
    for option in options:
        if option is type(None) and value is None:
            return
        if typing.get_origin(option) is typing.Literal:
            if value in typing.get_args(option):
                return
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if isinstance(option, type) and option is not type(None) and isinstance(value, option) \
                and not (option is int and isinstance(value, bool)):
            return
    choices = [c for o in options if typing.get_origin(o) is typing.Literal for c in typing.get_args(o)]
    if choices and all(typing.get_origin(o) is typing.Literal or o is type(None) for o in options):
        optional = " (or leave it out)" if type(None) in options else ""
        raise UsageError(f"{where} {value!r} is not valid; valid: {', '.join(map(str, choices))}{optional}")
    names = [" or ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is typing.Literal
             else "None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options]
    raise UsageError(f"{where}: {value!r} is not {' or '.join(names)}")


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
        # A temporary of this process's own (atomic_write): a crash never leaves a half-written state.
        atomic_write(fsspec.filesystem("file"), str(self.path), json.dumps(self.steps, indent=2, default=str).encode())


def digest(inputs: dict[str, Any]) -> str:
    text = json.dumps({**inputs, "ddpm_version": ddpm.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest_digest(url: str) -> str:
    return hashlib.sha256(json.dumps(read_manifest(url), sort_keys=True).encode()).hexdigest()[:16]


def _outputs_exist(step: str, outputs: dict[str, Any]) -> bool:
    """Whether a recorded step's outputs are still there (else it reruns).

    "Gone" is an answer: no manifest (or another one), no model in the MLflow store (it says so), no
    file. Failing to ask is not: an MLflow or storage error propagates and the workflow stops,
    rather than redoing (and re-registering) a step whose outputs may well exist.
    """
    if step == "prepare":
        try:
            return _manifest_digest(outputs["train_url"]) == outputs["train_manifest"]
        except DataError:
            return False
    if step == "tune":
        return Path(outputs["best_config_path"]).exists()
    if step in ("train", "evaluate", "promote"):
        try:
            models.describe(outputs["model_uri"])
        except UsageError:  # the store answered: no such model
            return False
        return True
    if step == "sample":
        fs, path = fsspec.core.url_to_fs(outputs["manifest"])
        return fs.exists(path)
    return True


@dataclass
class _Run:
    """One run of a workflow: what it was asked, where it records, and what each step gave."""

    name: str
    config: str
    overrides: list[str]
    cfg: ExperimentConfig
    spec: WorkflowSpec
    settings: Settings
    storage: str | None
    address: str | None
    exp_id: str = ""
    parent_id: str = ""
    state: State | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def step(self, step: Step) -> None:
        """Skip ``step`` if its inputs hash as recorded and its outputs still exist; else run it,
        record its outputs and log them to a nested run."""
        inputs = step.inputs(self)
        key = digest(inputs)
        previous = self.state.done(step.name, key)
        if previous is not None and _outputs_exist(step.name, previous):
            console.info(f"[run] {step.name}: up to date, skipped")
            self.skipped.append(step.name)
            self.outputs[step.name] = previous
            return
        console.info(f"[run] {step.name}: running")
        t0 = time.perf_counter()
        out = step.body(self)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        self.state.record(step.name, key, out)
        _log_step(self.exp_id, self.parent_id, self.name, step.name, key, out)
        self.ran.append(step.name)
        self.outputs[step.name] = out


@dataclass(frozen=True)
class Step:
    """One row of :data:`STEPS`: the inputs that decide whether it reruns, and what it does."""

    name: str
    inputs: Callable[[_Run], dict[str, Any]]
    body: Callable[[_Run], dict[str, Any]]
    enabled: Callable[[_Run], bool] = lambda run: True


# -- the steps ---------------------------------------------------------------------------------------
def _prepare_inputs(run: _Run) -> dict[str, Any]:
    """1. data: source -> shards (train and held-out test split)."""
    d = run.cfg.data
    return {"source": d.source, "train_url": d.url or run.settings.data_url(d.source, "train"),
            "test_url": d.holdout_url or run.settings.data_url(d.source, "test")}


def _prepare(run: _Run) -> dict[str, Any]:
    urls = _prepare_inputs(run)
    data.ensure_prepared(run.cfg.data.source, urls["train_url"], "train")
    data.ensure_prepared(run.cfg.data.source, urls["test_url"], "test")
    return {"train_url": urls["train_url"], "test_url": urls["test_url"],
            "train_manifest": _manifest_digest(urls["train_url"]), "test_manifest": _manifest_digest(urls["test_url"])}


def _tune_inputs(run: _Run) -> dict[str, Any]:
    """2. an optional sweep: its best config replaces the given one."""
    return {"config": run.cfg.to_dict(), "tune": dataclasses.asdict(run.spec.tune),
            "data": run.outputs["prepare"]["train_manifest"]}


def _tune(run: _Run) -> dict[str, Any]:
    """The sweep is named after its inputs: changed ones start a new sweep (a restore would keep the
    old space), the same ones restore it (also when it finished: its best config is what is wanted)."""
    t = run.spec.tune
    res = tune.tune_command(trials=t.trials, config=run.config, overrides=run.overrides,
                            data=run.outputs["prepare"]["train_url"], max_steps=t.max_steps, scheduler=t.scheduler,
                            search=t.search, storage=run.storage, name=f"{run.name}-tune-{digest(_tune_inputs(run))[:8]}",
                            address=run.address, resume_finished=True, metric=t.metric)
    return {"best_config_path": res["best_config_path"], "best_bpd": res["best_bpd"],
            "parent_run_id": res["parent_run_id"]}


def _train_source(run: _Run) -> tuple[str, list[str]]:
    """The config and overrides the train step trains: the sweep's best config, or the given ones."""
    if "tune" in run.outputs:
        return run.outputs["tune"]["best_config_path"], []
    return run.config, run.overrides


def _train_inputs(run: _Run) -> dict[str, Any]:
    """3. train -> a registered model version."""
    config, overrides = _train_source(run)
    t = run.spec.train
    cfg = train.resolve_config(config, overrides, t.max_steps, max_time=t.max_time)
    return {"config": cfg.to_dict(), "train": dataclasses.asdict(t),
            "data": run.outputs["prepare"]["train_manifest"]}


def _train(run: _Run) -> dict[str, Any]:
    config, overrides = _train_source(run)
    t = run.spec.train
    res = train.train_command(config=config, overrides=overrides, data=run.outputs["prepare"]["train_url"],
                              storage=run.storage, nodes=t.nodes, gpus_per_node=t.gpus_per_node,
                              max_steps=t.max_steps, max_time=t.max_time, experiment=run.cfg.name,
                              run_name=f"{run.name}-train", address=run.address, parent_run_id=run.parent_id)
    return {"run_id": res["run_id"], "model_uri": res["model_uri"], "version": res["version"],
            "registered_model": res["registered_model"], "checkpoint": res["checkpoint"],
            "loss": res["metrics"].get("loss"), "bpd": res["metrics"].get("bpd")}


def _evaluate_inputs(run: _Run) -> dict[str, Any]:
    """4. evaluate the new version (its metrics become the version tags promotion compares)."""
    return {"model": run.outputs["train"]["model_uri"], "evaluate": dataclasses.asdict(run.spec.evaluate),
            "data": run.outputs["prepare"]["test_manifest"]}


def _evaluate(run: _Run) -> dict[str, Any]:
    e, model = run.spec.evaluate, run.outputs["train"]["model_uri"]
    res = evaluate.evaluate_command(model=model, data=run.outputs["prepare"]["test_url"], num=e.num,
                                    sampler=e.sampler, steps=e.steps, eta=e.eta, nodes=e.nodes, address=run.address,
                                    parent_run_id=run.parent_id, run_name=f"{run.name}-evaluate")
    floors = {f"{k}_floor": v for k, v in res["floors"].items()}
    errors = {f"{k}_se": v for k, v in res.get("se", {}).items()}
    errors.update({f"{k}_floor_se": v for k, v in res.get("floor_se", {}).items()})
    scores = {k: v for k, v in {**res["scores"], **floors, **errors}.items() if isinstance(v, (int, float))}
    return {"model_uri": model, "run_id": res.get("run_id"), "bpd": res["bpd"], "scores": scores,
            "compared": res.get("compared", {}), "floor_compared": res.get("floor_compared", {}),
            "sec_per_sample": res["sec_per_sample"]}


def _promote_inputs(run: _Run) -> dict[str, Any]:
    """5. promote if better (a refusal is an outcome, not a failure)."""
    return {"model": run.outputs["train"]["model_uri"], "promote": dataclasses.asdict(run.spec.promote),
            "evaluation": run.outputs["evaluate"]["scores"]}


def _promote(run: _Run) -> dict[str, Any]:
    p, trained = run.spec.promote, run.outputs["train"]
    try:
        res = promote.promote_command(name=trained["registered_model"], version=trained["version"],
                                      alias=p.alias, metric=p.metric, min_delta=p.min_delta)
        return {"model_uri": trained["model_uri"], "promoted": True, "message": res["message"]}
    except RefusedError as err:
        return {"model_uri": trained["model_uri"], "promoted": False, "message": str(err)}


def _sample_inputs(run: _Run) -> dict[str, Any]:
    """6. batch-sample the new version, and a grid of it for a quick look."""
    return {"model": run.outputs["train"]["model_uri"], "sample": dataclasses.asdict(run.spec.sample)}


def _sample(run: _Run) -> dict[str, Any]:
    s, trained = run.spec.sample, run.outputs["train"]
    out_url = run.settings.samples_url(f"{run.name}-v{trained['version']}")
    res = sample.sample_command(model=trained["model_uri"], num=s.num, out=out_url, sampler=s.sampler, steps=s.steps,
                                eta=s.eta, batch_size=s.batch_size, nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                                seed=s.seed, format=s.format, precision=s.precision, progressive=0,
                                address=run.address)
    grid = _grid(trained["model_uri"], run.settings, run.name)
    return {"out": res.get("out", out_url), "manifest": res.get("manifest"), "grid": grid,
            "model_uri": trained["model_uri"]}


STEPS: tuple[Step, ...] = (
    Step("prepare", _prepare_inputs, _prepare),
    Step("tune", _tune_inputs, _tune, enabled=lambda run: run.spec.tune.enabled),
    Step("train", _train_inputs, _train),
    Step("evaluate", _evaluate_inputs, _evaluate),
    Step("promote", _promote_inputs, _promote),
    Step("sample", _sample_inputs, _sample),
)


def run_command(config: str = "digits", overrides: list[str] | None = None, workflow: str | None = None,
                name: str | None = None, storage: str | None = None, address: str | None = None,
                submit: bool = False, env: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the workflow; with ``submit``, send it to a Ray cluster as a Ray Job."""
    overrides = list(overrides or [])
    cfg = train.resolve_config(config, overrides)
    spec = WorkflowSpec.load(workflow)
    check_name(name or f"{cfg.name}-workflow", "--name" if name else "the config's name (in the default --name)")
    check_name(cfg.name, "the config's name (the workflow's MLflow experiment)")
    name = name or f"{cfg.name}-workflow"
    t = spec.train
    spec.check(train.resolve_config(config, overrides, t.max_steps, max_time=t.max_time))  # before any step
    if submit:
        return submit_job(config, overrides, workflow, name, storage, address, env or [])
    if env:
        raise UsageError("--env only applies with --submit (it names what the Ray job takes from here)")
    settings = resolve(storage, address)
    folder = settings.home / "workflows" / name
    fs, root = open_fs(str(folder))
    with FolderLock(fs, root, str(folder), "workflow"):  # one job per workflow name (its state.json)
        return _run_steps(_Run(name=name, config=config, overrides=overrides, cfg=cfg, spec=spec, settings=settings,
                               storage=storage, address=address, state=State(folder / "state.json")))


def _run_steps(run: _Run) -> dict[str, Any]:
    """Every step of ``run`` under its parent MLflow run (resumed by name); the summary."""
    name, cfg, settings = run.name, run.cfg, run.settings
    tracking.configure(settings)
    run.exp_id = tracking.experiment_id(cfg.name, settings)
    run.parent_id, resumed = tracking.start_or_resume_run(run.exp_id, name, {tracking.KIND_TAG: "workflow"})
    try:
        for step in STEPS:
            if step.enabled(run):
                run.step(step)
    except Exception:
        tracking.end_run(run.parent_id, "FAILED")
        raise
    out = run.outputs
    tracking.client().set_tag(run.parent_id, "ddpm.lineage", json.dumps({
        "data_manifest": out["prepare"]["train_manifest"], "train_run": out["train"]["run_id"],
        "model": out["train"]["model_uri"], "samples": out["sample"]["out"]}))
    tracking.end_run(run.parent_id)
    return {"name": name, "parent_run_id": run.parent_id, "resumed": resumed, "ran": run.ran,
            "skipped": run.skipped, "steps": out, "message": _summary(run)}


def _summary(run: _Run) -> str:
    """The closing lines: what ran, the model and its promotion, the scores, where things are."""
    out, settings = run.outputs, run.settings
    trained, promoted, evaluated, sampled = out["train"], out["promote"], out["evaluate"], out["sample"]
    ui = f"mlflow ui --backend-store-uri {settings.tracking_uri}" if settings.tracking_uri.startswith("sqlite:") \
        else settings.tracking_uri
    message = "\n".join([
        f"workflow '{run.name}': ran {', '.join(run.ran) or 'nothing'}; skipped {', '.join(run.skipped) or 'nothing'}",
        f"  registered model : {trained['model_uri']} ({'promoted to ' + run.spec.promote.alias if promoted['promoted'] else 'not promoted: ' + promoted['message']})",
        f"  evaluation       : bpd {evaluated['bpd']:.3f} (held-out bound)",
        *_score_lines(evaluated),
        f"  sample grid      : {sampled['grid']}",
        f"  samples          : {sampled['out']}",
        f"  MLflow store     : {settings.tracking_uri} (UI: {ui})",
    ])
    return redact(message)  # a tracking URI may hold user:password@


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


def _grid(model_uri: str, settings: Settings, name: str) -> str:
    """A 64-image grid of the model's samples next to the batch output, for a quick look (on object
    storage too: the driver's node may be gone when someone looks)."""
    loaded = models.load(model_uri)
    url = settings.samples_url(f"{name}-grid.png")
    fs, path = open_fs(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return sample_grid(loaded.model, loaded.diffusion, loaded.config, path)
    with scratch("grid") as folder:
        local = sample_grid(loaded.model, loaded.diffusion, loaded.config, os.path.join(folder, "grid.png"))
        atomic_write(fs, path, Path(local).read_bytes())
    return url


def _log_step(exp_id: str, parent_id: str, name: str, label: str, key: str, out: dict[str, Any]) -> None:
    """A nested MLflow run per step, holding its input digest and outputs.

    The train and evaluate steps' own runs are their nested runs; the training curves
    (:data:`pipelines.train.async_logger.CURVES`) are copied to the workflow's run as well, so the
    experiment's chart view, which shows the workflow's run and keeps its steps folded under it,
    opens on them.
    """
    if label in ("train", "evaluate") and out.get("run_id"):
        tracking.client().set_tag(out["run_id"], "ddpm.step_inputs", key)
        if label == "train":
            _copy_curves(out["run_id"], parent_id)
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


def _copy_curves(source_run_id: str, run_id: str) -> None:
    """The training curves' metric histories of ``source_run_id``, step by step, into ``run_id``."""
    c = tracking.client()
    points = [m for name in CURVES for m in c.get_metric_history(source_run_id, metric_name(name))]
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for m in points]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])


def ship_files(config: str, workflow: str | None) -> tuple[str, str, str | None]:
    """A new folder holding copies of the local files the job reads; ``(folder, config, workflow)``
    with ``config``/``workflow`` as the job names them, relative to that folder (its working dir).

    A preset name stays a name; a config or workflow file is copied under a fixed name.
    """
    folder = scratch_dir("job")
    if config not in PRESETS:
        shipped = "config" + Path(config).suffix
        shutil.copyfile(config, os.path.join(folder, shipped))
        config = shipped
    if workflow:
        shipped = "workflow" + Path(workflow).suffix
        shutil.copyfile(workflow, os.path.join(folder, shipped))
        workflow = shipped
    return folder, config, workflow


def job_env(names: list[str]) -> dict[str, str]:
    """What the Ray job takes from the submitter: only the variables named with ``--env`` (``NAME``:
    its value here; ``NAME=VALUE``). Nothing else travels: the submitter's ``DDPM_HOME``,
    ``MLFLOW_TRACKING_URI`` or ``AWS_ENDPOINT_URL`` are often ``localhost`` addresses that mean nothing
    on the cluster, whose nodes have their own. A secret (``AWS_*`` keys, tokens, a URL holding
    credentials) is refused (exit 2): a job's runtime env is shown by the Ray dashboard.
    """
    env: dict[str, str] = {}
    for item in names:
        key, eq, value = item.partition("=")
        if not eq:
            if key not in os.environ:
                raise UsageError(f"--env {key}: not set here; give it as --env {key}=VALUE")
            value = os.environ[key]
        if key in SECRET_ENV_VARS or redact(value) != value:
            raise UsageError(f"--env {key}: a secret does not travel with a job (the Ray dashboard shows its "
                             "environment); set it in the cluster's own environment")
        env[key] = value
    return env


def submit_job(config: str, overrides: list[str], workflow: str | None, name: str, storage: str | None,
               address: str | None, env: list[str]) -> dict[str, Any]:
    """Submit ``ddpm-pipe run`` as a Ray Job (Jobs API, needs ``ray[default]`` on the cluster).

    The local config and workflow files travel with the job as its working directory (uploaded by
    the Jobs client), so they need not exist on the cluster.
    """
    job_address = address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not job_address:
        raise UsageError("--submit needs --address (the cluster's dashboard URL, e.g. http://HEAD:8265) "
                         "or RAY_ADDRESS")
    env_vars = job_env(env)
    args = ["ddpm-pipe", "run", "--config", "config" + Path(config).suffix if config not in PRESETS else config,
            "--name", name, *[x for item in overrides for x in ("--set", item)]]
    args += ["--workflow", "workflow" + Path(workflow).suffix] if workflow else []
    args += ["--storage", storage] if storage else []
    if redact(shlex.join(args)) != shlex.join(args):  # the dashboard shows the command line
        raise UsageError("a value of this command holds a credential (a URL with user:password@ or a signed "
                         "query); it would be shown by the Ray dashboard: set it in the cluster's environment")
    try:
        client = ray.job_submission.JobSubmissionClient(job_address)
    except Exception as e:
        raise UsageError(f"cannot reach the Ray Jobs API at {job_address}: {str(e).splitlines()[0]}") from e
    folder, _config, _workflow = ship_files(config, workflow)  # the names args gives them
    runtime_env = {"working_dir": folder, "env_vars": env_vars}
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
