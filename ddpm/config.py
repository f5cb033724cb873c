"""Typed, frozen experiment configuration.

An :class:`ExperimentConfig` holds one dataclass per concern (model, diffusion, data, train, sample).
It comes from a preset (``digits``, ``cifar10``) or a YAML file, with dotted overrides
(``train.lr=1e-4``). Unknown keys and bad choices fail at once with the valid options listed.

Only the standard library and PyYAML are used here, so the config can be read anywhere. A config
that constructs also builds: the U-Net's shape rules and the schedule's beta range are checked here,
so a bad one fails on the driver and never reaches a worker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ddpm.schedules import beta_range

Schedule = Literal["linear", "cosine", "quadratic", "sigmoid"]
Prediction = Literal["eps", "x0", "v", "edm"]
TimestepSampling = Literal["uniform", "lognormal"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "vb", "hybrid"]
Sampler = Literal["ddpm", "ddim", "dpmpp", "dpmpp-3m", "unipc", "dpmpp-2m-sde", "edm"]
Spacing = Literal["linspace", "leading", "trailing", "karras", "logsnr", "cosine"]  # where a sampler puts its timesteps
Precision = Literal["fp32", "bf16", "fp16"]
LrDecay = Literal["none", "linear"]  # after the warm-up: constant, or linearly down to 0 at max_steps

PRESETS = ("digits", "digits-cond", "cifar10")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the valid choices."""


DURATION_FORMS = "seconds (600, 90.5) or a number with s, m or h (90s, 10m, 1.5h)"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: ``600``, ``90s``, ``10m``, ``1.5h``; a ``ValueError`` naming the forms
    for anything else, zero included (a budget of nothing is a mistake, not a request)."""
    match = _DURATION.fullmatch(str(text).strip().lower())
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a duration; valid: {DURATION_FORMS}")
    return seconds


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return get_args(tp) if get_origin(tp) is Literal else None


def _check_choice(owner: str, name: str, value: Any, tp: Any) -> None:
    choices = _choices(tp)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{owner}.{name}={value!r} is not a valid choice; valid: {', '.join(map(str, choices))}"
        )


def _validate_choices(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    owner = _SECTION_NAMES.get(type(obj), type(obj).__name__)
    for f in fields(obj):
        _check_choice(owner, f.name, getattr(obj, f.name), hints[f.name])


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class UNetConfig:
    """The noise-prediction U-Net (Ho et al. 2020, appendix B; PixelCNN++ backbone)."""

    image_size: int = 32  # height = width of the input, in pixels
    in_channels: int = 3
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channels per resolution level, times ch
    num_res_blocks: int = 2  # residual blocks per level
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1
    num_heads: int = 1
    learn_sigma: bool = False  # output 2*in_channels (Improved DDPM's learned_range variance)
    resblock_updown: bool = False  # the paper uses conv/avg-pool resampling, not resblocks
    # Class-conditional on this many classes, plus a learned "null" class (index num_classes) for
    # classifier-free guidance (Ho & Salimans 2021); 0 is the paper's unconditional model.
    num_classes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        _require(self.image_size >= 1, f"model.image_size must be >= 1, got {self.image_size}")
        _require(self.in_channels >= 1, f"model.in_channels must be >= 1, got {self.in_channels}")
        _require(self.ch >= 1, f"model.ch must be >= 1, got {self.ch}")
        _require(len(self.ch_mult) >= 1, "model.ch_mult must list at least one level")
        _require(self.num_res_blocks >= 1, "model.num_res_blocks must be >= 1")
        _require(self.num_classes >= 0,
                 f"model.num_classes must be >= 0 (0: unconditional, K: K classes), got {self.num_classes}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.ch_mult) - 1)
        _require(
            self.image_size % factor == 0,
            f"model.image_size={self.image_size} is not divisible by 2**(len(ch_mult)-1)={factor}; "
            f"the U-Net halves the resolution {len(self.ch_mult) - 1} times",
        )
        _require(self.ch % 32 == 0 or self.ch % 8 == 0, "model.ch must be a multiple of 8 (GroupNorm)")
        sizes = [self.image_size // 2**i for i in range(len(self.ch_mult))]
        unknown = sorted(set(self.attn_resolutions) - set(sizes))
        _require(not unknown, f"model.attn_resolutions has {unknown}, which no level has; the level sizes are {sizes}")
        _require(self.num_heads >= 1, f"model.num_heads must be >= 1, got {self.num_heads}")
        # Attention runs at the listed sizes and in the middle block (ch x the last multiplier).
        attended = {self.ch * m for m, size in zip(self.ch_mult, sizes) if size in self.attn_resolutions}
        attended.add(self.ch * self.ch_mult[-1])
        bad = sorted(c for c in attended if c % self.num_heads)
        _require(not bad, f"model.num_heads={self.num_heads} does not divide the attention channels {bad} "
                          f"(model.ch x ch_mult); choose a divisor of {math.gcd(*attended)}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @classmethod
    def cifar10(cls) -> "UNetConfig":
        """The paper's CIFAR-10 model: 35.7M parameters."""
        return cls(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.1)

    @classmethod
    def digits(cls) -> "UNetConfig":
        """A small model for scikit-learn's 8x8 digits (one channel, 17 grey levels): 1.1M parameters.

        Sized so `make demo` trains recognisable digits on a 2-core CPU in minutes; no dropout, as
        short runs do not overfit (the paper's 0.1 is for 800k CIFAR-10 steps).
        """
        return cls(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                   attn_resolutions=(4,), dropout=0.0)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network predicts."""

    schedule: Schedule = "linear"
    timesteps: int = 1000  # T
    beta_start: float | None = None  # None: the schedule's default (linear: 1e-4 * 1000/T)
    beta_end: float | None = None  # None: the schedule's default (linear: 0.02 * 1000/T)
    prediction: Prediction = "eps"  # the paper's choice
    # The paper's CIFAR-10 choice (sigma_t^2 = beta_t). ddpm.Diffusion's own default is fixed_small
    # (beta~_t); Diffusion.from_config always passes this value, so configs never see that default.
    variance: Variance = "fixed_large"
    loss: LossType = "simple"  # L_simple, the paper's eq. 14
    # Min-SNR-gamma weighting of the squared error (Hang et al. 2023): min(SNR_t, gamma) over the
    # target's own SNR weight; None is the paper's unweighted L_simple. 5 is the paper's choice.
    snr_gamma: float | None = None
    # prediction=edm: EDM's preconditioning (Karras et al. 2022, Table 1) around the data's std.
    sigma_data: float = 0.5  # EDM's value for images in [-1, 1]
    # Training timesteps: uniform (the paper's) or EDM's log-normal noise levels, ln sigma ~ N(-1.2, 1.2^2).
    timestep_sampling: TimestepSampling = "uniform"

    def __post_init__(self) -> None:
        _validate_choices(self)
        _require(self.timesteps >= 1, f"diffusion.timesteps (T) must be >= 1, got {self.timesteps}")
        _require(self.snr_gamma is None or self.snr_gamma > 0,
                 f"diffusion.snr_gamma must be > 0 or unset (unweighted L_simple), got {self.snr_gamma}")
        _require(not (self.snr_gamma is not None and self.loss == "vb"),
                 "diffusion.snr_gamma weights the squared error of loss=simple or hybrid; loss=vb has none")
        _require(self.sigma_data > 0, f"diffusion.sigma_data must be > 0, got {self.sigma_data}")
        _require(not (self.prediction == "edm" and self.snr_gamma is not None),
                 "diffusion.prediction=edm has its own loss weighting (EDM's lambda); leave snr_gamma unset")
        _require(not (self.timestep_sampling == "lognormal" and self.loss != "simple"),
                 "diffusion.timestep_sampling=lognormal reweights L_simple's timesteps; loss=vb and hybrid "
                 "need uniform timesteps for their bound")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            _require(v is None or 0.0 < v < 1.0, f"diffusion.{name} must be in (0, 1), got {v}")
        if self.beta_start is not None and self.beta_end is not None:
            _require(self.beta_start <= self.beta_end,
                     f"diffusion.beta_start={self.beta_start} must be <= beta_end={self.beta_end}")
        try:
            beta_range(self.schedule, self.timesteps, self.beta_start, self.beta_end)
        except ValueError as e:
            raise ConfigError(f"diffusion: {e}") from None
        _require(not (self.variance == "learned_range" and self.loss == "simple"),
                 "diffusion.variance=learned_range needs loss=hybrid or vb (L_simple gives the "
                 "variance no gradient)")


@dataclass(frozen=True)
class DataConfig:
    """Where the training shards are and how they are read."""

    source: str = "digits"  # used by `data prepare` when url is empty
    url: str = ""  # shard folder (local path, file://, s3://); empty: the pipeline's default (DDPM_HOME/data/<source>, ...)
    levels: int = 17  # pixel levels: 256 for 8-bit images, 17 for the digits set
    random_flip: bool = False  # the paper flips CIFAR-10 horizontally
    num_workers: int = 0  # DataLoader worker processes per training rank
    holdout_url: str = ""  # held-out split for bits/dim; empty: the test split next to url

    def __post_init__(self) -> None:
        _require(self.levels >= 2, f"data.levels must be >= 2, got {self.levels}")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the paper: Adam 2e-4, warm-up 5000, grad clip 1, EMA 0.9999)."""

    batch_size: int = 128  # global batch, divided across workers
    lr: float = 2e-4
    warmup_steps: int = 5000  # linear learning-rate warm-up
    # "linear": after the warm-up the rate falls linearly to 0 at max_steps (a step count, not
    # max_time: with a time budget alone the fall is that of max_steps); progressive distillation's
    # recipe (Salimans & Ho 2022: annealed to 0 in each round, no EMA)
    lr_decay: LrDecay = "none"
    grad_clip: float = 1.0  # clip the global gradient norm at this value
    ema_decay: float = 0.9999
    max_steps: int = 800_000
    max_time: float | None = None  # seconds of training; the run stops at max_steps or here, first reached
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Precision = "fp32"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000  # held-out bits/dim estimate (and sample quality, with quality_num)
    # Samples scored every eval_every steps with the config's own sampler (KID and classifier score
    # on digits, the pixel-PCA distance on any data, each with its standard error); 0: none.
    # Scores on few samples read differently from evaluate's 2000 (the classifier score about 1.5% lower at
    # 256, ddpm.metrics.classifier_score): compare the probe with itself.
    quality_num: int = 0
    sample_every: int = 5000  # sample grid artifact
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the last K, plus the best
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    registered_model: str = "ddpm"  # registry name the final model is registered under
    channels_last: bool = False  # NHWC activations and weights (oneDNN/cuDNN's native conv layout)
    compile: bool = False  # torch.compile the model's forward; falls back to eager if it fails
    # Share of training labels replaced by the null class, so one network learns the conditional and
    # the unconditional model (Ho & Salimans 2021, Algorithm 1: p_uncond 0.1); unused when unconditional.
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        _validate_choices(self)
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.grad_clip > 0, "train.grad_clip must be > 0")
        _require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        _require(self.max_time is None or (math.isfinite(self.max_time) and self.max_time > 0),
                 f"train.max_time must be a number of seconds > 0, got {self.max_time}")
        _require(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _require(0.0 <= self.label_dropout < 1.0,
                 f"train.label_dropout must be in [0, 1) (the share of labels trained as the null class), "
                 f"got {self.label_dropout}")
        _require(self.quality_num == 0 or self.quality_num >= 10,
                 f"train.quality_num must be 0 (off) or >= 10 (a standard error needs samples), got {self.quality_num}")
        for name in ("log_every", "eval_every", "sample_every", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1")


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for sampling and evaluation."""

    sampler: Sampler = "ddpm"
    steps: int | None = None  # None: the sampler's own (ddpm.samplers.DEFAULT_STEPS; T for ddpm)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 DDPM-like
    spacing: Spacing | None = None  # None: the sampler's own (ddpm.samplers.DEFAULT_SPACING)
    clip_denoised: bool = True  # clip predicted x_0 to [-1, 1]
    batch_size: int = 256
    num: int = 64
    precision: Literal["fp32", "bf16"] = "fp32"
    # Classifier-free guidance weight w: eps_uncond + w (eps_cond - eps_uncond); 1 is plain
    # conditional sampling, 0 unconditional (class-conditional models only).
    guidance: float = 1.0

    def __post_init__(self) -> None:
        _validate_choices(self)
        _require(self.steps is None or self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _require(self.eta >= 0.0, f"sample.eta must be >= 0, got {self.eta}")
        _require(self.guidance >= 0.0 and math.isfinite(self.guidance),
                 f"sample.guidance must be in [0, inf) (0 unconditional, 1 conditional), got {self.guidance}")
        _require(self.batch_size >= 1, "sample.batch_size must be >= 1")
        _require(self.num >= 1, "sample.num must be >= 1")


# The one rule for names (experiments, runs, sweeps, workflows, registered models): a name becomes a
# folder and an MLflow search value, so it can neither leave its folder (``../x``) nor break a filter
# (``it's``). ``pipelines.names.check_name`` applies it to what users type.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 128 characters"


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; stored in checkpoints and registered models."""

    name: str = "digits"
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        # The name becomes an MLflow experiment and a folder under DDPM_HOME, also when it comes from
        # a checkpoint or a registered model's config.json (issue 25, item 9).
        _require(isinstance(self.name, str) and NAME_PATTERN.fullmatch(self.name) is not None,
                 f"name={self.name!r} is not a valid experiment name (it names an MLflow experiment and a "
                 f"folder): use {NAME_RULE}")
        _require(self.model.learn_sigma == (self.diffusion.variance == "learned_range"),
                 "model.learn_sigma must be true exactly when diffusion.variance=learned_range")
        _require(self.model.num_classes > 0 or self.sample.guidance == 1.0,
                 f"sample.guidance={self.sample.guidance} needs a class-conditional model (model.num_classes > 0); "
                 "an unconditional model takes only 1")

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ExperimentConfig":
        if name == "digits":
            return cls(
                name="digits",
                model=UNetConfig.digits(),
                # EDM's preconditioning and log-normal noise levels (Karras et al. 2022) around the digits'
                # std of 0.75: at the 10-minute budget level with eps on every score and finer in pixel
                # detail, in two seeds (fine spread 0.94 against 0.90; docs/RESULTS.md, bench_recipes).
                diffusion=DiffusionConfig(schedule="linear", timesteps=1000, prediction="edm", sigma_data=0.75,
                                          timestep_sampling="lognormal"),
                data=DataConfig(source="digits", levels=17, random_flip=False),
                # 3000 steps of batch 64: about 130 passes over the 1437 training digits, a few
                # minutes on 2 CPU cores (docs/RESULTS.md has the measured time and scores).
                train=TrainConfig(batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995,
                                  max_steps=3000, log_every=100, eval_every=500, sample_every=1000,
                                  checkpoint_every=500, registered_model="ddpm-digits", quality_num=256),
                # SDE-DPM-Solver++ 2M at 20 calls on the cosine grid (the noise levels of uniform times
                # under the cosine schedule): at 2000 samples within noise of 1000-step ancestral
                # sampling of the same EDM model on every score, in two draws and pooled; on its own
                # log-SNR spacing it was behind pooled on classifier score and confidence (2.0, 2.4).
                # On the Gaussian oracle its std is 1.9% above the data's (log-SNR: 3.4%).
                # docs/RESULTS.md, benchmarks/bench_samplers.py.
                sample=SampleConfig(sampler="dpmpp-2m-sde", steps=20, spacing="cosine", num=64),
            )
        if name == "digits-cond":
            # The digits preset, class-conditional with classifier-free guidance: at its 10-minute step
            # count (6,500 on a quiet machine), 500 balanced samples at w = 1.5 are 99.0% conditional
            # accuracy (real held-out digits: 97.8%; w = 1 stops at 94%). Half the labels dropped: its
            # null class is level with the unconditional preset on every score at 2000 samples; with
            # 30% dropped (eps recipe) it was behind on the classifier score (docs/RESULTS.md).
            return cls.preset("digits").with_values({
                "name": "digits-cond", "model.num_classes": 10, "train.label_dropout": 0.5,
                "train.registered_model": "ddpm-digits-cond", "sample.guidance": 1.5,
                "sample.spacing": None})  # the solver's own log-SNR grid: its figures were measured there
        if name == "cifar10":
            # The paper's CIFAR-10 run: every section not given here is its dataclass's default, which
            # is the paper's (linear betas over T=1000, batch 128, Adam 2e-4 with 5000 warm-up steps,
            # EMA 0.9999, 800k steps). Sampling is the exception: DPM-Solver++(2M) at 20 steps, the
            # few-step default of this preset and of every config made from it for a folder of images
            # (the DPM-Solver papers, Lu et al. 2022, report CIFAR-10 FID close to its converged value
            # by 15-20 model calls; not measured here). The paper's 1000 ancestral steps: --sampler ddpm.
            return cls(name="cifar10", model=UNetConfig.cifar10(),
                       data=DataConfig(source="cifar10", levels=256, random_flip=True),
                       train=TrainConfig(registered_model="ddpm-cifar10"),
                       sample=SampleConfig(sampler="dpmpp", steps=20))
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        return _build(cls, data, "")

    def override(self, assignments: list[str] | tuple[str, ...]) -> "ExperimentConfig":
        """Apply ``section.key=value`` strings (``--set``): each value is parsed once as a YAML scalar,
        then :meth:`with_values` does the rest."""
        import yaml

        changes: dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            key, raw = item.split("=", 1)
            changes[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        return self.with_values(changes)

    def with_values(self, changes: Mapping[str, Any]) -> "ExperimentConfig":
        """A new config with typed values changed: ``{"train.max_steps": 500, "diffusion.beta_end": None}``.

        Keys are dotted paths; values are Python values, checked and converted like a YAML file's
        (an unknown key or a bad choice raises :class:`ConfigError` listing the valid ones).
        """
        data = self.to_dict()
        for key, value in changes.items():
            parts = key.split(".")
            node = data
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    valid = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                    raise ConfigError(f"unknown config section {'.'.join(parts[:i + 1])!r}; valid: {valid}")
                node = node[part]
            leaf = parts[-1]
            if leaf not in node:
                where = ".".join(parts[:-1]) or "top level"
                raise ConfigError(f"unknown config key {key!r}; valid keys in {where}: {', '.join(node)}")
            node[leaf] = _to_plain(value)
        return ExperimentConfig.from_dict(data)


_SECTION_NAMES = {UNetConfig: "model", DiffusionConfig: "diffusion", DataConfig: "data",
                  TrainConfig: "train", SampleConfig: "sample"}


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(owner: str, name: str, value: Any, tp: Any) -> Any:
    """Check and convert a plain (YAML/JSON) value to the annotated field type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(get_args(tp)):
                return None
            raise ConfigError(f"{owner}.{name} must not be empty")
        return _coerce(owner, name, value, args[0])
    if origin is Literal:
        _check_choice(owner, name, value, tp)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{owner}.{name} must be a list, got {value!r}")
        (inner, *_rest) = get_args(tp)
        return tuple(_coerce(owner, name, v, inner) for v in value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise ConfigError(f"{owner}.{name} must be a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{owner}.{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{owner}.{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{owner}.{name} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, owner: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {owner or 'top level'!r} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = owner or "top level"
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} in {where}; valid: {', '.join(names)}")
    kwargs = {k: _coerce(owner or _SECTION_NAMES.get(cls, ""), k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the unknown-key check
        raise ConfigError(str(e)) from e


def read_yaml_mapping(path: str, not_a_mapping: str, name: str | None = None) -> dict[str, Any]:
    """The mapping held by the YAML file at ``path``; an empty file reads as ``{}``.

    :param not_a_mapping: what the error says when the file holds something else.
    :param name: how errors name the file (``"--space space.yaml"``); ``path`` by default.
    :raises ConfigError: ``"{name}: not valid YAML: ..."`` or ``"{name}: {not_a_mapping}"``.
    """
    import yaml

    name = path if name is None else name
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: {not_a_mapping}")
    return data


def load_config(spec: str | None = "digits", overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Resolve ``--config`` and ``--set``.

    ``spec`` is a preset name or a YAML/JSON path. A file may name a preset to start from with a
    top-level ``base: digits`` key; its sections are merged over that preset, key by key.
    """
    spec = spec or "digits"
    if spec in PRESETS:
        cfg = ExperimentConfig.preset(spec)
    else:
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
        data = read_yaml_mapping(spec, "the config file must hold a mapping")
        base = data.pop("base", None)
        if base is not None:
            merged = ExperimentConfig.preset(str(base)).to_dict()
            for key, value in data.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            data = merged
        cfg = ExperimentConfig.from_dict(data)
    return cfg.override(list(overrides)) if overrides else cfg


__all__ = [
    "ConfigError", "DURATION_FORMS", "DataConfig", "DiffusionConfig", "ExperimentConfig", "PRESETS", "SampleConfig",
    "TrainConfig", "UNetConfig", "load_config", "parse_duration", "read_yaml_mapping", "replace",
]
