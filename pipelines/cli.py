"""The `ddpm-pipe` command line: parse options, call one function, print its result.

Every command returns a dict; ``--json`` prints it as one JSON line on stdout, otherwise its
``message`` is printed. A failure with ``--json`` prints ``{"error": ..., "exit_code": ...}`` on
stdout too. Exit codes: 0 success, 1 failure, 2 bad usage, 3 refused.
Progress and phase lines go to stderr; Ray's and MLflow's own logs only with ``--verbose``
(``pipelines/console.py``). Option choices come from the one list of each (the config's ``Literal``
types, ``pipelines.sample.FORMATS``, ``pipelines.tune.SCHEDULERS``), so ``--help`` lists them and
shell completion (``--install-completion``) offers them.

This is the command boundary: each command imports its ``*_command`` function (and with it Ray,
MLflow and torch) when it runs, so ``ddpm-pipe --help`` loads none of them
(``tests/pipelines/test_layering.py``). Everything imported above it is light.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional, get_args, get_type_hints

import typer
from typer._click import exceptions as click_exceptions

import ddpm
from ddpm.config import ConfigError, Precision, Sampler, SampleConfig, load_config, parse_duration
from pipelines import console
from pipelines.distill import PREDICTIONS as DISTILL_PREDICTIONS
from pipelines.errors import PipelineError
from pipelines.sample import FORMATS
from pipelines.settings import redact
from pipelines.tune import SCHEDULERS, SEARCHES

app = typer.Typer(
    name="ddpm-pipe",
    help="Train, tune, evaluate, register and sample DDPMs as Ray pipelines tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare WebDataset shards from a data source.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved experiment configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

_state = {"debug": False, "json": False}


def _choice(*flags: str, values: tuple[str, ...], help: str) -> typer.models.OptionInfo:
    """An option whose value must be one of ``values``: listed in --help, offered by completion,
    and a wrong value fails with exit 2 naming the valid ones."""

    def parse(value: str) -> str:
        if value not in values:
            raise typer.BadParameter(f"{value!r}; valid: {', '.join(values)}")  # short: not wrapped
        return value

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return typer.Option(*flags, help=help, metavar="[" + "|".join(values) + "]", parser=parse,
                        autocompletion=complete)


def _duration(value: str) -> float:
    """Seconds from ``600``, ``90s``, ``10m`` or ``1.5h``; anything else fails with exit 2 naming the forms."""
    try:
        return parse_duration(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _duration_or_never(value: str) -> float:
    """:func:`_duration`, or 0 (``0``: never)."""
    return 0.0 if str(value).strip() in ("0", "0s", "0.0") else _duration(value)


TRAIN_PRECISIONS: tuple[str, ...] = get_args(Precision)
SAMPLE_PRECISIONS: tuple[str, ...] = get_args(get_type_hints(SampleConfig)["precision"])

# -- shared option types (one vocabulary for every command) -------------------------------------
Json = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON result on stdout.")]
Config = Annotated[str, typer.Option("--config", "-c", help="Preset name (digits, cifar10) or a YAML file.")]
Set = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable).")]
Data = Annotated[Optional[str], typer.Option("--data", help="Shard folder URL (local path, file://, s3://). Default: DATA/<source>, DATA being DDPM_DATA, else STORAGE/data where the storage is not a local folder (s3://), else DDPM_HOME/data.")]
Storage = Annotated[Optional[str], typer.Option("--storage", help="Checkpoint/run storage URL (local path or s3://). Default: DDPM_HOME/ray.")]
Address = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address; default RAY_ADDRESS, else a local Ray instance.")]
Nodes = Annotated[int, typer.Option("--nodes", min=1, help="Number of nodes (one worker per node, times --gpus-per-node).")]
GpusPerNode = Annotated[int, typer.Option("--gpus-per-node", min=0, help="GPUs (workers) per node; 0 trains on CPU.")]
SampleGpusPerNode = Annotated[int, typer.Option("--gpus-per-node", min=0, help="GPUs (sampling workers) per node; 0 samples on CPU.")]
Experiment = Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment name. Default: the config's name.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Model URI: runs:/ID/model, models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS, models:/m-<logged model id>, or a checkpoint path/URL.")]
Num = Annotated[int, typer.Option("--num", "-n", min=1, help="Number of samples.")]
SamplerOpt = Annotated[Optional[str], _choice("--sampler", values=get_args(Sampler), help="The sampler (ddpm.samplers; ddpm is the paper's ancestral one, --steps below T respaces it). Default: the model's own (its config's sample.sampler).")]
Steps = Annotated[Optional[int], typer.Option("--steps", min=1, help="Sampling steps, at most the model's T. Default: the model's config's sample.steps for its own sampler, else that sampler's default (ddpm.samplers.DEFAULT_STEPS; T for ddpm).")]
Eta = Annotated[Optional[float], typer.Option("--eta", min=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like; 0 for the other samplers. Default: the model's config's sample.eta for its own sampler, else 0.")]
ClassOpt = Annotated[Optional[list[int]], typer.Option("--class", help="Class-conditional models: the class to sample (repeatable: sample i asks for the i-th mod their number). Default: none, the model's null class (unconditional).")]
Classes = Annotated[Optional[str], _choice("--classes", values=("balanced",), help="Class-conditional models: balanced asks for every class in turn (sample i for class i mod K).")]
Guidance = Annotated[Optional[float], typer.Option("--guidance", min=0.0, help="Classifier-free guidance weight w with --class/--classes: 0 unconditional, 1 plain conditional, above 1 guided (one batched pass of twice the rows). Default: the model's config's sample.guidance.")]


def _fail(message: str, code: int) -> None:
    """The message on stderr, prefixed ``error:`` unless the user stopped the command (exit 130: Ctrl-C
    is how ``serve`` ends; the message says what happened), and with ``--json`` as a JSON line on stdout."""
    message = redact(message)
    typer.echo(message if code == 130 else f"error: {message}", err=True)
    if _state["json"]:
        typer.echo(json.dumps({"error": message, "exit_code": code}))
    raise typer.Exit(code)


def _emit(result: dict[str, Any], json_out: bool) -> None:
    """The result on stdout (credentials inside URLs masked): one JSON line, or its ``message``."""
    if json_out:
        typer.echo(redact(json.dumps(result, default=str, sort_keys=True)))
    elif result.get("message"):
        typer.echo(redact(result["message"]))


def _dispatch(func: Callable[..., dict[str, Any] | None], json_out: bool, **kwargs: Any) -> None:
    """Call a ``*_command`` function with the parsed options, report its result or error.

    Each command imports its function inside its own body (so ``ddpm-pipe --help`` stays fast and
    loads no Ray or MLflow) and passes it here by reference. While it runs, whatever writes to
    ``sys.stdout`` (Ray's driver prints the raylet's warnings there) goes to stderr: stdout is the
    result's alone.
    """
    _state["json"] = json_out
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = func(**kwargs) or {}
    except typer.Exit:
        raise
    except ConfigError as e:
        if _state["debug"]:
            raise
        _fail(str(e), 2)
    except PipelineError as e:
        if _state["debug"]:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # one clear line, the traceback only with --debug
        if _state["debug"]:
            raise
        _fail(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    else:
        _emit(result, json_out)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ddpm-pipe {ddpm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show Ray's and MLflow's own logs (worker output, Ray Train's checkpoint lines, MLflow's messages).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("DDPM_DEBUG", "") not in ("", "0")
    console.configure(verbose or console.verbose())


# -- config ---------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(config: Config = "digits", set_: Set = None, json_out: Json = False) -> None:
    """Print the resolved config as YAML (or JSON with --json)."""
    _state["json"] = json_out
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _fail(str(e), 2)
    _emit({"config": cfg.to_dict(), "message": cfg.to_yaml().rstrip()}, json_out)


# -- data -----------------------------------------------------------------------------------------
@data_app.command("prepare")
def data_prepare(
    source: Annotated[str, typer.Option("--source", help="digits, sample-images (scikit-learn's photos in 32x32 crops), an image folder, a .npz/.npy file, or a CIFAR-10 python archive (path or URL).")] = "digits",
    out: Annotated[Optional[str], typer.Option("--out", help="Output URL (local path, file://, s3://). Default: DATA/<source>/<split> (DATA: DDPM_DATA, else DDPM_STORAGE/data where that is not a local folder, else DDPM_HOME/data); with --test-fraction, the folder of both splits (OUT/train, OUT/test).")] = None,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Samples per shard.")] = 1000,
    split: Annotated[str, _choice("--split", values=("train", "test"), help="Which split of the source.")] = "train",
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help="Carve a held-out split from the one source: about this share of its images (by a seeded hash of each image's pixels, so copies stay together) go to OUT/test, the rest to OUT/train. See docs/DATA.md.")] = None,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the --test-fraction assignment (recorded in the manifests).")] = 0,
    endpoint_url: Annotated[Optional[str], typer.Option("--endpoint-url", help="S3-compatible endpoint; default AWS_ENDPOINT_URL.")] = None,
    json_out: Json = False,
) -> None:
    """Convert a data source to WebDataset tar shards plus a manifest (both splits with --test-fraction)."""
    from pipelines.storage.data import prepare_command

    _dispatch(prepare_command, json_out, source=source, out=out, shard_size=shard_size, split=split,
              endpoint_url=endpoint_url, test_fraction=test_fraction, split_seed=split_seed)


# -- train ----------------------------------------------------------------------------------------
TrainPrecision = Annotated[Optional[str], _choice("--precision", values=TRAIN_PRECISIONS, help="Override train.precision.")]

@app.command()
def train(
    config: Config = "digits",
    set_: Set = None,
    data: Data = None,
    storage: Storage = None,
    nodes: Nodes = 1,
    gpus_per_node: GpusPerNode = 0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Override train.max_steps.")] = None,
    max_time: Annotated[Optional[float], typer.Option("--max-time", parser=_duration, metavar="DURATION", help="Stop after this much training (600, 90s, 10m, 1.5h; sets train.max_time in seconds); with no step count (--max-steps or --set train.max_steps) the time is the limit, else whichever comes first. The last step checkpoints and registers as a finished run does.")] = None,
    precision: TrainPrecision = None,
    experiment: Experiment = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run name; re-running the same name resumes it.")] = None,
    address: Address = None,
    json_out: Json = False,
) -> None:
    """Train a DDPM with Ray Train (DDP), tracked in MLflow."""
    from pipelines.train.command import train_command

    _dispatch(train_command, json_out, config=config, overrides=set_ or [],
              data=data, storage=storage, nodes=nodes, gpus_per_node=gpus_per_node, max_steps=max_steps,
              max_time=max_time, precision=precision, experiment=experiment, run_name=run_name, address=address)


# -- distill --------------------------------------------------------------------------------------
@app.command()
def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="The teacher's model URI (as --model): an eps, v or edm model of this project; an alias is pinned to its version.")],
    steps: Annotated[int, typer.Option("--steps", min=1, help="The student's sampling steps N: the starting steps halved k >= 1 times (K / 2^k), one round each.")],
    from_steps: Annotated[Optional[int], typer.Option("--from-steps", min=2, help="The first teacher's DDIM steps K (on the cosine grid, or trailing where the cosine grid's halvings do not nest). Default: the teacher's own sampler's steps (its config's sample section) rounded up to a power of two, at most T.")] = None,
    set_: Set = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Shard folder URL (local path, file://, s3://). Default: the teacher's own training data.")] = None,
    storage: Storage = None,
    nodes: Nodes = 1,
    gpus_per_node: GpusPerNode = 0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Training steps per round (for all rounds with --in-all). Default: the teacher's config's train.max_steps.")] = None,
    max_time: Annotated[Optional[float], typer.Option("--max-time", parser=_duration, metavar="DURATION", help="Training time per round, for all rounds with --in-all (600, 90s, 10m, 1.5h); with no step count the time is the limit, else whichever comes first.")] = None,
    in_all: Annotated[bool, typer.Option("--in-all", help="--max-steps and --max-time are for all rounds together: the steps shared out evenly, the time left shared evenly among the rounds still to run (what one round leaves goes to the next).")] = False,
    precision: TrainPrecision = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment name. Default: the teacher's config's name.")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run name; re-running the same name resumes it, mid-round. Default: the student's name.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The student's registered model name. Default: <teacher name>-distilled.")] = None,
    prediction: Annotated[Optional[str], _choice("--prediction", values=DISTILL_PREDICTIONS, help="What the student predicts. Default: what the teacher predicts; v for an eps teacher is the paper's choice (an eps student's x-prediction blows up at 1-2 steps).")] = None,
    address: Address = None,
    json_out: Json = False,
) -> None:
    """Progressive distillation (Salimans & Ho 2022): a student sampling in --steps, one Ray Train job."""
    from pipelines.distill.command import distill_command

    _dispatch(distill_command, json_out, teacher=teacher, steps=steps, from_steps_=from_steps,
              overrides=set_ or [], data=data, storage=storage, nodes=nodes, gpus_per_node=gpus_per_node,
              max_steps=max_steps, max_time=max_time, precision=precision, experiment=experiment,
              run_name=run_name, name=name, address=address, prediction=prediction, in_all=in_all)


# -- tune -----------------------------------------------------------------------------------------
@app.command()
def tune(
    trials: Annotated[int, typer.Option("--trials", min=1, help="Number of trials.")] = 8,
    config: Config = "digits",
    set_: Set = None,
    space: Annotated[Optional[str], typer.Option("--space", help="YAML search space replacing or extending the default.")] = None,
    data: Data = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Training steps per trial.")] = None,
    scheduler: Annotated[str, _choice("--scheduler", values=SCHEDULERS, help="asha stops poor trials early on held-out bits/dim.")] = "asha",
    search: Annotated[str, _choice("--search", values=SEARCHES, help="How trials are drawn from the space.")] = "random",
    concurrent: Annotated[Optional[int], typer.Option("--concurrent", min=1, help="Trials at once. Default: what the cluster's CPUs allow.")] = None,
    workers_per_trial: Annotated[int, typer.Option("--workers-per-trial", min=1, help="Training workers per trial (above 1 wraps a TorchTrainer).")] = 1,
    storage: Storage = None,
    experiment: Experiment = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Sweep name; re-running the same name resumes it (a finished sweep only with --resume-finished).")] = None,
    resume_finished: Annotated[bool, typer.Option("--resume-finished", help="Restore a sweep of this --name that has finished, to report its results again.")] = False,
    address: Address = None,
    metric: Annotated[str, _choice("--metric", values=("bpd", "kid", "pixel_fd", "classifier_score"), help="What trials are ranked and stopped early on: held-out bits/dim, or a sample-quality score of the config's own sampler (measured at every report; ASHA never stops a trial within two standard errors of its rung's best).")] = "bpd",
    json_out: Json = False,
) -> None:
    """Sweep T, the beta range, the schedule and the learning rate with Ray Tune."""
    from pipelines.tune.command import tune_command

    _dispatch(tune_command, json_out, trials=trials, config=config,
              overrides=set_ or [], space=space, data=data, max_steps=max_steps, scheduler=scheduler,
              search=search, concurrent=concurrent, workers_per_trial=workers_per_trial, storage=storage,
              experiment=experiment, name=name, address=address, metric=metric, resume_finished=resume_finished)


# -- evaluate / promote ---------------------------------------------------------------------------
@app.command()
def evaluate(
    model: Model,
    data: Data = None,
    num: Num = 1000,
    sampler: SamplerOpt = None,
    steps: Steps = None,
    eta: Eta = None,
    nodes: Nodes = 1,
    table: Annotated[bool, typer.Option("--table", help="Also measure the sampler table (DDPM 1000; DDIM 10/20/50/100, eta 0 and 1).")] = False,
    class_: ClassOpt = None,
    classes: Classes = None,
    guidance: Guidance = None,
    guidance_sweep: Annotated[Optional[bool], typer.Option("--guidance-sweep/--no-guidance-sweep", help="Class-conditional models: also measure conditional accuracy and diversity at guidance 0, 1, 1.5, 2, 3 and 5 (default: on for them).")] = None,
    bound: Annotated[str, _choice("--bound", values=("full", "estimate"), help="Held-out bits/dim: the full bound (T model calls per 64 images) or its stratified unbiased estimate with a standard error (16 calls).")] = "full",
    address: Address = None,
    json_out: Json = False,
) -> None:
    """Measure bits/dim, and KID, FD, precision/recall, classifier score, class coverage and copy rate against held-out images, each with its floor; of a class-conditional model also conditional accuracy overall and per class and the guidance sweep; log them to MLflow."""
    from pipelines.registry.evaluate import evaluate_command

    _dispatch(evaluate_command, json_out, model=model, data=data,
              num=num, sampler=sampler, steps=steps, eta=eta, nodes=nodes, table=table, address=address,
              classes=tuple(class_ or ()), balanced=classes == "balanced", guidance=guidance,
              guidance_sweep=guidance_sweep, bound=bound)


@app.command()
def promote(
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    version: Annotated[Optional[str], typer.Option("--version", help="Candidate version. Default: the latest.")] = None,
    alias: Annotated[str, typer.Option("--alias", help="Alias to move.")] = "champion",
    metric: Annotated[str, typer.Option("--metric", help="Evaluation metric to compare (kid, fd, classifier_score, ...).")] = "kid",
    min_delta: Annotated[float, typer.Option("--min-delta", help="Required improvement (>= 0; with --against, a negative value is how much worse the candidate may be).")] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="Move the alias whatever the metrics say (recorded as a tag).")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why --force was used; recorded as a tag.")] = None,
    against: Annotated[Optional[str], typer.Option("--against", help="Compare with this registered model (models:/NAME/VERSION or @ALIAS, any name: a distilled student's teacher) instead of the alias holder, on the same data, features and sample count whatever the sampler.")] = None,
    json_out: Json = False,
) -> None:
    """Move an alias to a version only if its evaluation beats the current holder's (or --against's)."""
    from pipelines.registry.promote import promote_command

    _dispatch(promote_command, json_out, name=name, version=version,
              alias=alias, metric=metric, min_delta=min_delta, force=force, reason=reason, against=against)


# -- sample / interpolate -------------------------------------------------------------------------
@app.command()
def sample(
    model: Model,
    num: Num = 64,
    out: Annotated[Optional[str], typer.Option("--out", help="Output URL (local path or s3://). Default: SAMPLES/<name>, SAMPLES being DDPM_SAMPLES, else DDPM_STORAGE/samples where that is not a local folder, else DDPM_HOME/samples.")] = None,
    sampler: SamplerOpt = None,
    steps: Steps = None,
    eta: Eta = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per model call.")] = 256,
    nodes: Nodes = 1,
    gpus_per_node: SampleGpusPerNode = 0,
    seed: Annotated[int, typer.Option("--seed", help="Sample i depends on (seed, i) alone.")] = 0,
    format_: Annotated[str, _choice("--format", values=FORMATS, help="One PNG per sample, or tar/npz chunks.")] = "png",
    precision: Annotated[str, _choice("--precision", values=SAMPLE_PRECISIONS, help="Sampling precision.")] = "fp32",
    progressive: Annotated[int, typer.Option("--progressive", min=0, help="Also save predicted x_0 at K steps per sample.")] = 0,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile each worker's network (~40 s on a CPU, then 3-5% faster; eager if it fails).")] = False,
    class_: ClassOpt = None,
    classes: Classes = None,
    guidance: Guidance = None,
    address: Address = None,
    json_out: Json = False,
) -> None:
    """Generate samples on the Ray cluster, resumably, to any fsspec URL."""
    from pipelines.sample.command import sample_command

    _dispatch(sample_command, json_out, model=model, num=num, out=out,
              sampler=sampler, steps=steps, eta=eta, batch_size=batch_size, nodes=nodes,
              gpus_per_node=gpus_per_node, seed=seed, format=format_, precision=precision,
              progressive=progressive, address=address, compile=compile_, classes=tuple(class_ or ()),
              balanced=classes == "balanced", guidance=guidance)


@app.command()
def interpolate(
    model: Model,
    a: Annotated[str, typer.Option("--a", help="First image file.")],
    b: Annotated[str, typer.Option("--b", help="Second image file.")],
    t: Annotated[int, typer.Option("--t", min=0, help="Diffusion step to interpolate at.")] = 500,
    lambdas: Annotated[int, typer.Option("--lambdas", min=2, help="Number of interpolation weights.")] = 11,
    out: Annotated[str, typer.Option("--out", help="Output PNG.")] = "interpolation.png",
    seed: Annotated[int, typer.Option("--seed", help="Noise seed: the same encoding noise and reverse noise for every weight.")] = 0,
    class_: ClassOpt = None,
    classes: Classes = None,
    guidance: Guidance = None,
    json_out: Json = False,
) -> None:
    """Interpolate two images in x_t space and denoise (the paper's section 4.3)."""
    from pipelines.sample.interpolate import interpolate_command

    _dispatch(interpolate_command, json_out, model=model, a=a,
              b=b, t=t, lambdas=lambdas, out=out, seed=seed, classes=tuple(class_ or ()),
              balanced=classes == "balanced", guidance=guidance)


@app.command()
def serve(
    model: Model,
    host: Annotated[str, typer.Option("--host", help="Address the HTTP proxy listens on; 0.0.0.0 exposes the service beyond this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Replicas of the model (the initial number with --min/--max-replicas).")] = 1,
    min_replicas: Annotated[Optional[int], typer.Option("--min-replicas", min=0, help="Autoscale: at least this many replicas (with or without --max-replicas).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option("--max-replicas", min=1, help="Autoscale: at most this many replicas.")] = None,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", min=0.0, help="GPUs per replica (fractions share one); 0 samples on CPU.")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option("--cpus-per-replica", min=0.5, help="CPUs Ray reserves per replica; a CPU replica samples with this many torch threads (rounded down, at least 1). On CPUs, one replica per core with 1 each answered faster than fewer replicas with more threads (docs/SERVING.md).")] = 1.0,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Images a replica samples together: the requests waiting while it samples form the next batch, up to this many images (one larger request runs alone).")] = 64,
    batch_wait_timeout: Annotated[float, typer.Option("--batch-wait-timeout", min=0.0, help="Seconds a request waits for batch-mates while the replica is idle (not after a lone request: a single client never waits).")] = 0.01,
    max_num: Annotated[int, typer.Option("--max-num", min=1, max=100_000, help="Images per request at most (num above it: HTTP 400).")] = 256,
    reload_every: Annotated[float, typer.Option("--reload-every", parser=_duration_or_never, metavar="DURATION", help="With an alias URI (models:/NAME@ALIAS): how often the registry is asked where it points; a new version is loaded beside the old and switched to atomically. 0 never asks.")] = 30.0,
    token_env: Annotated[Optional[str], typer.Option("--token-env", help="Name of an environment variable holding a bearer token that every route but /healthz and /readyz then requires (never logged).")] = None,
    address: Address = None,
) -> None:
    """Serve a model over HTTP on Ray Serve (POST /v1/samples, GET /v1/samples.png, /v1/model), following an alias as it moves; Ctrl-C stops it (docs/SERVING.md)."""
    from pipelines.serve.command import serve_command

    _dispatch(serve_command, False, model=model, host=host, port=port, address=address, replicas=replicas,
              min_replicas=min_replicas, max_replicas=max_replicas, gpus_per_replica=gpus_per_replica,
              cpus_per_replica=cpus_per_replica, max_batch_size=max_batch_size,
              batch_wait_timeout=batch_wait_timeout, max_num=max_num,
              reload_every=reload_every, token_env=token_env)


@app.command("import-diffusers")
def import_diffusers(
    path: Annotated[str, typer.Option("--path", help="Folder of a diffusers UNet2DModel (config.json + weights).")],
    name: Annotated[str, typer.Option("--name", help="Registered model name.")],
    json_out: Json = False,
) -> None:
    """Register a diffusers UNet2DModel of the paper's architecture as a model version."""
    from pipelines.registry.import_diffusers import import_command

    _dispatch(import_command, json_out, path=path, name=name)


# -- run ------------------------------------------------------------------------------------------
@app.command()
def run(
    config: Config = "digits",
    set_: Set = None,
    workflow: Annotated[Optional[str], typer.Option("--workflow", help="Workflow YAML (steps and their options).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Workflow name; re-running it resumes.")] = None,
    storage: Storage = None,
    address: Address = None,
    submit: Annotated[bool, typer.Option("--submit", help="Submit the workflow as a Ray Job and return.")] = False,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="With --submit: a variable the job takes from here, NAME (its value here) or NAME=VALUE (repeatable; secrets refused). Nothing else is sent: the cluster's nodes have their own settings.")] = None,
    json_out: Json = False,
) -> None:
    """Run prepare -> (tune) -> train -> evaluate -> register -> promote -> sample as one workflow."""
    from pipelines.workflow import run_command

    _dispatch(run_command, json_out, config=config, overrides=set_ or [],
              workflow=workflow, name=name, storage=storage, address=address, submit=submit, env=env or [])


def main() -> None:
    """The console entry point: with --json, a usage error is a JSON error object on stdout too."""
    if "--json" not in sys.argv[1:]:
        app(prog_name="ddpm-pipe")
        return
    try:
        code = app(prog_name="ddpm-pipe", standalone_mode=False)
    except click_exceptions.ClickException as e:
        e.show()
        typer.echo(json.dumps({"error": e.format_message(), "exit_code": e.exit_code}))
        sys.exit(e.exit_code)
    except click_exceptions.Abort:
        typer.echo(json.dumps({"error": "interrupted", "exit_code": 130}))
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
