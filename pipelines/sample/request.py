"""What `ddpm-pipe sample` is asked for: a :class:`SampleRequest`, checked where it enters and settled
against the model's config on the driver (:meth:`SampleRequest.resolved`), so that the workers get
the sampler, steps and eta to use and check nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import get_args, get_type_hints

from ddpm.config import ExperimentConfig, Sampler, SampleConfig
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
        """This request with the model's own sampler, steps and eta filled in (:func:`resolve_settings`)."""
        sampler, steps, eta = resolve_settings(config, self.sampler, self.steps, self.eta)
        return replace(self, sampler=sampler, steps=steps, eta=eta)


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


__all__ = ["PRECISIONS", "SampleRequest", "check_format", "resolve_settings"]
