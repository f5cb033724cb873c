"""The search space of `ddpm-pipe tune`: the default, a YAML file that replaces or extends it, validation.

Keys are dotted config keys (``diffusion.timesteps``) plus one derived key, ``diffusion.beta_ratio``:
the trial's ``beta_start = beta_ratio * beta_end``, so ``beta_start < beta_end`` holds by
construction while both are used as given (never rescaled by T). A YAML file looks like::

    replace: false              # true: drop the default space, keep only what is below
    diffusion.timesteps: {type: randint, lower: 100, upper: 1000, log: true}
    diffusion.schedule: {type: choice, values: [linear, cosine]}
    train.lr: {type: loguniform, lower: 1.0e-4, upper: 3.0e-3}
    train.ema_decay: 0.995       # a plain value fixes the key in every trial

Distributions: ``loguniform``/``uniform`` (lower, upper), ``randint`` (lower, upper inclusive,
optional ``log``), ``choice`` (values). Unknown keys or distributions fail listing the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from ddpm.config import ConfigError, ExperimentConfig, read_yaml_mapping

BETA_RATIO = "diffusion.beta_ratio"  # derived: beta_start = beta_ratio * beta_end

DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required fields, optional fields)
    "loguniform": (("lower", "upper"), ()),
    "uniform": (("lower", "upper"), ()),
    "randint": (("lower", "upper"), ("log",)),
    "choice": (("values",), ()),
}

# What the paper's choices leave open (Ho et al. 2020 fix T=1000, linear 1e-4..0.02, lr 2e-4).
DEFAULT_SPACE: dict[str, Any] = {
    "diffusion.timesteps": {"type": "randint", "lower": 100, "upper": 4000, "log": True},  # T
    "diffusion.schedule": {"type": "choice", "values": ["linear", "cosine", "quadratic", "sigmoid"]},
    "diffusion.beta_end": {"type": "loguniform", "lower": 5e-3, "upper": 0.2},
    BETA_RATIO: {"type": "loguniform", "lower": 1e-3, "upper": 0.5},  # beta_start / beta_end
    "train.lr": {"type": "loguniform", "lower": 1e-4, "upper": 3e-3},
}


def config_keys(cfg: ExperimentConfig) -> list[str]:
    """Every dotted leaf key of a config (``model.ch``, ``diffusion.timesteps``, ...)."""
    keys = []
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            keys.extend(f"{section}.{k}" for k in values)
    return keys


def load_space(path: str | None, base: ExperimentConfig) -> dict[str, Any]:
    """The default space, replaced or extended by the YAML file at ``path``; validated against ``base``."""
    space = dict(DEFAULT_SPACE)
    if path:
        if not Path(path).exists():
            raise ConfigError(f"--space {path!r}: no such file")
        data = read_yaml_mapping(path, "must hold a mapping of dotted config keys to distributions",
                                 name=f"--space {path}")
        replace = data.pop("replace", False)
        if not isinstance(replace, bool):
            raise ConfigError(f"--space {path}: 'replace' must be true or false, got {replace!r}")
        space = {} if replace else space
        space.update(data)
        if "diffusion.beta_start" in data and BETA_RATIO not in data:
            space.pop(BETA_RATIO, None)  # an explicit beta_start replaces the derived one
    validate(space, base)
    return space


def _where(key: str) -> str:
    return f"search space key {key!r}"


# Sampling-time settings that a sweep cannot rank: trials compare on held-out bits/dim, which they do
# not change, and sweeping them needs no training. Each names where it is swept instead.
SAMPLING_TIME = {
    "sample.guidance": "ddpm-pipe evaluate --model MODEL (a class-conditional model's guidance sweep: "
                       "conditional accuracy and diversity at w = 0, 1, 1.5, 2, 3 and 5, from one trained model)",
}


def validate(space: dict[str, Any], base: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` on an unknown key, distribution or field, a value the config refuses,
    or a distribution over a sampling-time setting (:data:`SAMPLING_TIME`)."""
    valid = config_keys(base) + [BETA_RATIO]
    for key, spec in space.items():
        if key not in valid:
            raise ConfigError(f"unknown {_where(key)}; valid: {', '.join(valid)}")
        if isinstance(spec, dict) and key in SAMPLING_TIME:
            raise ConfigError(f"{_where(key)} is a sampling-time setting: trials are ranked on held-out bits/dim, "
                              f"which it does not change, and it needs no retraining; sweep it with "
                              f"{SAMPLING_TIME[key]}")
        if not isinstance(spec, dict):
            _check_value(base, key, spec, space)
            continue
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{_where(key)}: unknown distribution type {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
        required, optional = DISTRIBUTIONS[kind]
        fields = set(spec) - {"type"}
        missing = [f for f in required if f not in fields]
        extra = sorted(fields - set(required) - set(optional))
        if missing or extra:
            raise ConfigError(f"{_where(key)}: {kind} takes {', '.join(required + optional)}; "
                              f"{'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(extra)}")
        if kind == "choice":
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{_where(key)}: choice values must be a non-empty list")
            for v in values:
                _check_value(base, key, v, space)
            continue
        lo, hi = spec["lower"], spec["upper"]
        numbers = (int,) if kind == "randint" else (int, float)
        if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in (lo, hi)):
            raise ConfigError(f"{_where(key)}: {kind} lower and upper must be "
                              f"{'integers' if kind == 'randint' else 'numbers'}, got {lo!r}, {hi!r}")
        if not lo < hi:
            raise ConfigError(f"{_where(key)}: lower={lo} must be < upper={hi}")
        if (kind == "loguniform" or spec.get("log")) and lo <= 0:
            raise ConfigError(f"{_where(key)}: a log scale needs lower > 0, got {lo}")
        for v in (lo, hi):
            _check_value(base, key, v, space)
    _check_beta_order(space)


def _check_value(base: ExperimentConfig, key: str, value: object, space: dict[str, Any] | None = None) -> None:
    if key == BETA_RATIO:
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ConfigError(f"{_where(key)}: beta_start/beta_end ratio must be in (0, 1), got {value!r}")
        return
    if key.startswith("diffusion.beta_"):  # checked per trial, together with the schedule
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ConfigError(f"{_where(key)}: {value!r} is not in (0, 1)")
        return
    changes = {key: value}
    if key == "diffusion.timesteps" and space is not None and "diffusion.beta_end" in space:
        # Trials take beta_end from the space (always in (0, 1)), not the schedule's T-scaled
        # default, which leaves (0, 1) for small T: check T with an explicit range.
        changes.update({"diffusion.schedule": "linear", "diffusion.beta_start": None, "diffusion.beta_end": 0.02})
    try:
        base.with_values(changes)
    except ConfigError as e:
        raise ConfigError(f"{_where(key)}: {e}") from None


def _bounds(spec: object) -> tuple[float, float] | None:
    if not isinstance(spec, dict):
        return (spec, spec) if isinstance(spec, (int, float)) else None
    if spec["type"] == "choice":
        return min(spec["values"]), max(spec["values"])
    return spec["lower"], spec["upper"]


def _check_beta_order(space: dict[str, Any]) -> None:
    """beta_start < beta_end must hold in every trial, not by luck of the draw."""
    if "diffusion.beta_start" in space and BETA_RATIO in space:
        raise ConfigError(f"search space: give diffusion.beta_start or {BETA_RATIO}, not both")
    if "diffusion.beta_start" in space:
        start, end = _bounds(space["diffusion.beta_start"]), _bounds(space.get("diffusion.beta_end"))
        if end is None or start is None or not start[1] < end[0]:
            raise ConfigError("search space: diffusion.beta_start and diffusion.beta_end ranges overlap, so "
                              f"beta_start < beta_end is not guaranteed; sample diffusion.beta_end and {BETA_RATIO} "
                              "(beta_start = ratio x beta_end) instead")
    if BETA_RATIO in space and "diffusion.beta_end" not in space:
        raise ConfigError(f"search space: {BETA_RATIO} needs diffusion.beta_end in the space")


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune ``param_space`` for a validated space (flat, dotted keys)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
        elif spec["type"] == "loguniform":
            out[key] = tune.loguniform(spec["lower"], spec["upper"])
        elif spec["type"] == "uniform":
            out[key] = tune.uniform(spec["lower"], spec["upper"])
        elif spec["type"] == "randint":  # Tune's upper bound is exclusive; ours is inclusive
            fn = tune.lograndint if spec.get("log") else tune.randint
            out[key] = fn(spec["lower"], spec["upper"] + 1)
        else:
            out[key] = tune.choice(spec["values"])
    return out


def apply(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: ``base`` with the sampled ``params`` (the derived beta ratio resolved).

    The cosine schedule has no beta range, so a sampled range is dropped for it.
    """
    params = dict(params)
    ratio = params.pop(BETA_RATIO, None)
    if ratio is not None:
        params["diffusion.beta_start"] = float(ratio) * float(params["diffusion.beta_end"])
    schedule = params.get("diffusion.schedule", base.diffusion.schedule)
    if schedule == "cosine":
        params["diffusion.beta_start"] = None
        params["diffusion.beta_end"] = None
    return base.with_values(params)
