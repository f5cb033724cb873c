"""The HTTP API's request, checked where it enters, and its image encodings (no Ray, no web framework).

``POST /v1/samples`` takes a JSON object, ``GET /v1/samples.png`` the same fields as query
parameters; both become a :class:`SamplesRequest` through :func:`parse_samples`, the one check of
what a client sends. A bad field is an :class:`ApiError` naming it (HTTP 400): an unknown field, a
wrong type, an unknown sampler, steps above the model's T, ``num`` above the service's ``--max-num``,
a negative eta, a class for an unconditional model. Nothing a client sends names a model, a path or
a URL: the service samples the one model it holds, and writes nothing.

Fields (all optional):

- ``num``: images, 1 .. ``--max-num`` (default 1; with ``seeds``, their number);
- ``seed``: image i is sample i of ``ddpm-pipe sample --seed SEED`` (noise seed
  :func:`ddpm.noise.sample_seed` (seed, i)), so the same seed gives the same images as ``sample``;
  default 0;
- ``seeds``: a list instead: image j is sample 0 of ``sample --seed seeds[j]``;
- ``sampler``, ``steps``, ``eta``: as ``sample --sampler/--steps/--eta``, the model's own when left out
  (:func:`pipelines.sample.request.resolve_settings`);
- ``class_labels``: a class-conditional model's classes, a list (image i asks for
  ``class_labels[i mod len]``, as ``sample --class`` repeated) or ``"balanced"``; ``guidance``: its
  classifier-free guidance weight (:func:`pipelines.sample.request.resolve_classes`).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from ddpm.config import ExperimentConfig, Sampler
from ddpm.image import grid, png_bytes
from ddpm.noise import SEED_STRIDE, sample_seed
from pipelines.errors import UsageError
from pipelines.sample.output import sample_png
from pipelines.sample.request import labels_of, resolve_classes, resolve_settings

FIELDS = ("num", "seed", "seeds", "sampler", "steps", "eta", "class_labels", "guidance")
MAX_NUM = 256  # --max-num's default: images per request
SAMPLERS: tuple[str, ...] = get_args(Sampler)


class ApiError(Exception):
    """A request the service refuses: ``status`` (4xx), the ``field`` at fault (None: the request as a
    whole) and a message saying what is valid; the body of the response is :meth:`body`."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class SamplesRequest:
    """One checked request: a noise seed per image (:func:`ddpm.noise.sample_seed`), the settled
    sampler, steps and eta, and for a conditional model the class each image asks for and the
    guidance weight (None for an unconditional request)."""

    seeds: tuple[int, ...]
    sampler: Sampler
    steps: int
    eta: float
    labels: tuple[int, ...] | None = None
    guidance: float | None = None

    @property
    def num(self) -> int:
        return len(self.seeds)

    @property
    def setting(self) -> tuple[str, int, float, float | None, bool]:
        """What requests must share to be sampled in one batch (one :class:`ddpm.pipeline.DDPMPipeline`)."""
        return (self.sampler, self.steps, self.eta, self.guidance, self.labels is None)


def _integer(body: dict[str, Any], name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(value)}", name)
    if low is not None and value < low or high is not None and value > high:
        raise ApiError(400, f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}", name)
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {json.dumps(value)}", name)
    return float(value)


def parse_samples(body: Any, config: ExperimentConfig, num_timesteps: int, max_num: int = MAX_NUM) -> SamplesRequest:
    """``body`` (a decoded JSON object, or the query parameters :func:`query_body` converted) checked
    against the model of ``config`` (T = ``num_timesteps``) and the service's ``max_num``.

    :raises ApiError: (400) naming the field at fault and what is valid.
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object with the fields {', '.join(FIELDS)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; valid: {', '.join(FIELDS)}", unknown[0])
    if "seed" in body and "seeds" in body:
        raise ApiError(400, "give seed or seeds, not both", "seeds")
    seed_range = (0, (1 << 63) // SEED_STRIDE - 1)  # sample_seed(seed, i) stays distinct for every seed
    num = _integer(body, "num", 1)
    if num is not None and num > max_num:
        raise ApiError(400, f"num must be in [1, {max_num}] (this service's --max-num), got {num}", "num")
    if body.get("seeds") is not None:
        seeds = body["seeds"]
        if not isinstance(seeds, list) or not seeds:
            raise ApiError(400, f"seeds must be a non-empty list of integers, got {json.dumps(seeds)}", "seeds")
        for s in seeds:
            _integer({"seeds": s}, "seeds", *seed_range)
        if len(seeds) > max_num:
            raise ApiError(400, f"num must be in [1, {max_num}] (this service's --max-num), got {len(seeds)} seeds",
                           "num")
        if num is not None and num != len(seeds):
            raise ApiError(400, f"num ({num}) differs from the number of seeds ({len(seeds)}); leave num out", "num")
        noise = tuple(sample_seed(s, 0) for s in seeds)
    else:
        seed = _integer(body, "seed", *seed_range) or 0
        noise = tuple(sample_seed(seed, i) for i in range(num or 1))
    sampler = body.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise ApiError(400, f"sampler {json.dumps(sampler)} is not valid; valid: {', '.join(SAMPLERS)}", "sampler")
    steps = _integer(body, "steps", 1)
    if steps is not None and steps > num_timesteps:
        raise ApiError(400, f"steps must be in [1, T={num_timesteps}] (the model's T), got {steps}", "steps")
    eta = _number(body, "eta")
    if eta is not None and eta < 0:
        raise ApiError(400, f"eta must be >= 0 (0 deterministic, 1 DDPM-like), got {eta:g}", "eta")
    try:
        sampler, steps, eta = resolve_settings(config, sampler, steps, eta, prefix="", num_timesteps=num_timesteps)
    except UsageError as e:  # what is left: an eta the sampler does not take
        raise ApiError(400, str(e), "eta") from None
    labels, guidance = _classes(body, config)
    return SamplesRequest(seeds=noise, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                          labels=None if not labels else tuple(labels_of(list(range(len(noise))), labels)))


def _classes(body: dict[str, Any], config: ExperimentConfig) -> tuple[tuple[int, ...], float | None]:
    """``class_labels`` and ``guidance`` checked by :func:`pipelines.sample.request.resolve_classes`."""
    given = body.get("class_labels")
    balanced = given == "balanced"
    if given is not None and not balanced:
        if not isinstance(given, list) or not given or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in given):
            raise ApiError(400, "class_labels must be a non-empty list of integers or \"balanced\", got "
                           f"{json.dumps(given)}", "class_labels")
    classes = () if balanced or given is None else tuple(given)
    guidance = _number(body, "guidance")
    try:
        resolve_classes(config, classes, balanced, None, prefix="")
    except UsageError as e:
        raise ApiError(400, str(e), "class_labels") from None
    try:
        return resolve_classes(config, classes, balanced, guidance, prefix="")
    except UsageError as e:
        raise ApiError(400, str(e), "guidance") from None


def query_body(params: dict[str, str]) -> dict[str, Any]:
    """The query parameters of ``GET /v1/samples.png`` as a request body: numbers parsed (a value that is
    no number stays a string, for :func:`parse_samples` to refuse), ``class_labels`` and ``seeds``
    comma-separated."""

    def number(text: str) -> Any:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    body: dict[str, Any] = {}
    for key, value in params.items():
        if key in ("seeds", "class_labels") and value != "balanced":
            body[key] = [number(v) for v in value.split(",") if v]
        elif key == "sampler":
            body[key] = value
        else:
            body[key] = number(value)
    return body


def encode_images(x: np.ndarray, levels: int) -> list[str]:
    """``[N x C x H x W]`` in [-1, 1] -> N base64 PNGs, each the bytes ``sample --format png`` writes."""
    return [base64.b64encode(sample_png(image, levels)).decode("ascii") for image in x]


def grid_png(x: np.ndarray, levels: int) -> bytes:
    """``[N x C x H x W]`` in [-1, 1] -> one PNG grid (images under 32 px scaled up, as training's grids)."""
    return png_bytes(grid(torch.from_numpy(x), levels=levels, scale=max(1, 32 // x.shape[-1])))


__all__ = ["FIELDS", "MAX_NUM", "ApiError", "SamplesRequest", "encode_images", "grid_png", "parse_samples",
           "query_body"]
