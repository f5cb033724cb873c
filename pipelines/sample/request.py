"""What `ddpm-pipe sample` is asked for: a :class:`SampleRequest`, checked where it enters and settled
against the model's config on the driver (:meth:`SampleRequest.resolved`), so that the workers get
the sampler, steps and eta to use and check nothing again.

A class-conditional model (``model.num_classes = K``) is asked for classes with ``--class C``
(repeatable) or ``--classes balanced`` (every class in turn), and a guidance weight ``--guidance W``
(:mod:`ddpm.guidance`). Sample i asks for ``classes[i mod len(classes)]`` (:func:`labels_of`): a
function of its index alone, like its noise seed, so the image of (seed, i) does not depend on the
workers, the batch size or a resume. With no class, a conditional model samples its null class
(unconditionally). :func:`resolve_classes` is the one check of these options (`sample`,
`interpolate` and `evaluate`), all of it on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import get_args, get_type_hints

from ddpm.config import ExperimentConfig, Sampler, SampleConfig
from ddpm.guidance import check_class_labels, check_guidance
from ddpm.noise import SEED_STRIDE
from ddpm.pipeline import sampling_settings
from pipelines.errors import UsageError
from pipelines.sample import FORMATS

PRECISIONS: tuple[str, ...] = get_args(get_type_hints(SampleConfig)["precision"])


@dataclass(frozen=True)
class SampleRequest:
    """What to sample. ``sampler``, ``steps`` and ``eta`` left None are the model's own (its config's
    ``sample`` section; for another sampler than the config's, that sampler's defaults), filled in by
    :meth:`resolved` (:func:`ddpm.pipeline.sampling_settings`)."""

    model: str
    num: int
    sampler: Sampler | None = None
    steps: int | None = None
    eta: float | None = None
    batch_size: int = 256
    nodes: int = 1
    gpus_per_node: int = 0
    seed: int = 0
    precision: str = "fp32"
    progressive: int = 0
    address: str | None = None
    compile: bool = False  # torch.compile each worker's network (eager if it fails); speed only
    classes: tuple[int, ...] = ()  # --class: sample i asks for classes[i mod len(classes)]; (): none
    balanced: bool = False  # --classes balanced: every class of the model in turn (resolved into classes)
    guidance: float | None = None  # classifier-free guidance weight w; None: the model's sample.guidance
    # Exactly the model the workers load, set by the driver (pipelines.sample.command.settle): an alias
    # or ``latest`` resolved once to models:/NAME/VERSION (pipelines.registry.models.pinned).
    pinned: str | None = None

    def validate(self, prefix: str = "--") -> None:
        """The counts and the precision (the sampling setting is checked by :meth:`resolved`);
        ``prefix`` is how the caller's user spells the options (``--num``, a workflow's ``sample.num``)."""
        dash = (lambda name: name) if prefix == "--" else (lambda name: name.replace("-", "_"))
        if self.precision not in PRECISIONS:
            raise UsageError(f"{prefix}precision {self.precision!r} is not valid; valid: {', '.join(PRECISIONS)}")
        for name, value, low in (("num", self.num, 1), ("batch-size", self.batch_size, 1),
                                 ("nodes", self.nodes, 1), ("gpus-per-node", self.gpus_per_node, 0),
                                 ("progressive", self.progressive, 0)):
            if value < low:
                raise UsageError(f"{prefix}{dash(name)} must be >= {low}, got {value}")
        if self.num >= SEED_STRIDE:
            raise UsageError(f"{prefix}num must be below {SEED_STRIDE} (one seed per sample)")

    def resolved(self, config: ExperimentConfig) -> SampleRequest:
        """This request with the model's own sampler, steps and eta filled in (:func:`resolve_settings`),
        its classes and guidance checked against the model's (:func:`resolve_classes`)."""
        sampler, steps, eta = resolve_settings(config, self.sampler, self.steps, self.eta)
        classes, guidance = resolve_classes(config, self.classes, self.balanced, self.guidance)
        return replace(self, sampler=sampler, steps=steps, eta=eta, classes=classes, guidance=guidance)

    def labels(self, indices: list[int]) -> list[int] | None:
        """The class each of ``indices`` asks for (None: no class asked)."""
        return labels_of(indices, self.classes)


def check_format(fmt: str, prefix: str = "--") -> None:
    """``fmt`` is one of :data:`pipelines.sample.FORMATS` (exit 2 naming them)."""
    if fmt not in FORMATS:
        raise UsageError(f"{prefix}format {fmt!r} is not valid; valid: {', '.join(FORMATS)}")


def resolve_settings(config: ExperimentConfig, sampler: str | None, steps: int | None, eta: float | None,
                     prefix: str = "--", num_timesteps: int | None = None) -> tuple[Sampler, int, float]:
    """``(sampler, steps, eta)`` for a model of ``config``: what is given, the rest the model's own
    (:func:`ddpm.pipeline.sampling_settings`), checked against its T (``num_timesteps``, default the
    config's) by :meth:`ddpm.pipeline.DDPMPipeline.check_settings`; a bad one is a usage error
    (exit 2) naming the valid values, its options spelled with ``prefix``."""
    T = config.diffusion.timesteps if num_timesteps is None else num_timesteps
    try:
        return sampling_settings(config.sample, T, sampler, steps, eta, prefix=prefix)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_classes(config: ExperimentConfig, classes: tuple[int, ...] | list[int] | None, balanced: bool,
                    guidance: float | None, prefix: str = "--") -> tuple[tuple[int, ...], float | None]:
    """``(classes, guidance)`` to sample a model of ``config`` with: ``classes`` checked against its K
    classes (``balanced``: all of them, 0..K-1), ``guidance`` the weight asked for or the model's
    ``sample.guidance`` when classes are asked (None when none are).

    A usage error (exit 2) naming the option (spelled with ``prefix``) and the valid values: a class
    for an unconditional model or outside [0, K), ``--class`` with ``--classes balanced``, a
    negative guidance, a guidance other than 1 for an unconditional model, or a guidance for a
    conditional model with no class asked (it would not be used: the null class is unguided).
    """
    K = config.model.num_classes
    classes = tuple(int(c) for c in classes or ())
    if balanced and classes:
        raise UsageError(f"give {prefix}class or {prefix}classes balanced, not both")
    if balanced:
        if not K:
            raise UsageError(f"{prefix}classes balanced needs a class-conditional model (model.num_classes > 0); "
                             "this one is unconditional")
        classes = tuple(range(K))
    try:
        if classes:
            check_class_labels(list(classes), K, name=f"{prefix}class")
        if guidance is not None:
            guidance = check_guidance(guidance, K, name=f"{prefix}guidance")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if guidance is not None and K and not classes:
        raise UsageError(f"{prefix}guidance needs {prefix}class or {prefix}classes balanced: with no class "
                         "the model samples its null class, unconditionally and unguided")
    if not classes:
        return (), None
    return classes, config.sample.guidance if guidance is None else guidance


def labels_of(indices: list[int], classes: tuple[int, ...]) -> list[int] | None:
    """The class sample i asks for, ``classes[i mod len(classes)]``, for each of ``indices`` (None when
    ``classes`` is empty); with ``classes = 0..K-1`` it is :func:`ddpm.guidance.balanced_labels`."""
    return [classes[i % len(classes)] for i in indices] if classes else None


__all__ = ["PRECISIONS", "SampleRequest", "check_format", "labels_of", "resolve_classes", "resolve_settings"]
