"""One way into sampling: a network, its diffusion and a sampler that turn ``(num, seed)`` into images.

In the spirit of diffusers' ``DDPMPipeline``: every caller that wants many seeded samples (the
training run's sample grids, ``evaluate``, the batch-sampling workers, the registered pyfunc model)
builds a :class:`DDPMPipeline` and calls it, so sample i of a seed is the same image everywhere::

    pipe = DDPMPipeline.from_config(SamplingNet(model), cfg, sampler="ddim", steps=50)
    x0 = pipe(num=500, seed=0)              # [500 x C x H x W] float32 in [-1, 1]

Sample i draws all its noise from ``ddpm.noise.sample_seed(seed, i)``, whatever the batch size.
One batch with explicit seeds or a shared generator is :func:`ddpm.samplers.generate`.

A class-conditional model (``model.num_classes = K``) takes one label per sample, which travels with
its seed through the batching, and a guidance weight (:mod:`ddpm.guidance`)::

    pipe = DDPMPipeline.from_config(SamplingNet(model), cfg, guidance=2.0)
    x0 = pipe(num=500, seed=0, class_labels=balanced_labels(500, K))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ddpm.config import Sampler, Spacing
from ddpm.diffusion import Diffusion, Model
from ddpm.guidance import ClassifierFreeGuidance, check_class_labels, check_guidance
from ddpm.noise import sample_seed
from ddpm.samplers import (check_eta, check_sampler, config_spacing, default_spacing, default_steps, generate,
                           make_sampler)

if TYPE_CHECKING:
    from ddpm.config import ExperimentConfig, SampleConfig

BatchProgress = Callable[[int, int], Any]  # (samples done, samples in all)


def sampling_settings(sample: SampleConfig, num_timesteps: int, sampler: Sampler | None = None,
                      steps: int | None = None, eta: float | None = None, *,
                      prefix: str = "") -> tuple[Sampler, int, float]:
    """``(sampler, steps, eta)``: what is given, the rest from a model's ``sample`` config, checked.

    The config's ``steps`` and ``eta`` belong to the config's sampler: with another ``sampler`` the
    defaults are that sampler's own (:func:`ddpm.samplers.default_steps`, capped at T; eta 0).
    ``sample``, ``evaluate``, the workflow and the pyfunc model all resolve their defaults here; the
    result is checked by :meth:`DDPMPipeline.check_settings` (``prefix``: see there).
    """
    sampler = sampler or sample.sampler
    own = sampler == sample.sampler
    if steps is None:
        steps = default_steps(sampler, num_timesteps, sample.steps if own else None)
    if eta is None:
        eta = sample.eta if own else 0.0
    DDPMPipeline.check_settings(sampler, steps, eta, num_timesteps, prefix=prefix)
    return sampler, int(steps), float(eta)


def _calls_so_far(call_progress: BatchProgress, batch: int, batches: int) -> BatchProgress:
    """A sampling loop's ``progress(step, steps)`` of one batch, as calls over all ``batches``."""
    return lambda step, steps: call_progress(batch * steps + step, batches * steps)


class DDPMPipeline:
    """``model`` + ``diffusion`` + one sampler choice; call it for seeded samples in batches.

    :param model: the denoiser ``model(x_t [N x C x H x W], t [N]) -> [N x C' x H x W]`` (often a
        :class:`ddpm.inference.SamplingNet`).
    :param image_shape: ``(C, H, W)`` of one sample.
    :param sampler: one of :data:`ddpm.samplers.SAMPLERS` (``ddpm``: ancestral, fewer steps respace).
    :param steps: model calls per sample; ``None`` is the sampler's default capped at T
        (:func:`ddpm.samplers.default_steps`). More than T is a ``ValueError``.
    :param eta: DDIM's noise scale; must be 0 for the other samplers.
    :param spacing: where the model is called (:mod:`ddpm.samplers.timesteps`); ``None`` is the
        sampler's own (:func:`ddpm.samplers.default_spacing`).
    :param ms_eps: Gamma_t ``[T]`` for ``ddpm`` with Analytic-DPM's variance
        (:func:`ddpm.samplers.estimate_ms_eps`); ``None``: the process's own variance.
    :param batch_size: samples per network call.
    :param num_classes: the model's ``model.num_classes`` (0: unconditional); a class-conditional
        ``model`` is called ``model(x_t, t, y)``.
    :param guidance: classifier-free guidance weight w >= 0 for samples given a class (1: plain
        conditional, one network pass; other w: one pass of twice the rows). 1 for an unconditional model.
    """

    def __init__(self, model: Model, diffusion: Diffusion, image_shape: Sequence[int], *,
                 sampler: Sampler = "ddim", steps: int | None = None, eta: float = 0.0,
                 spacing: Spacing | None = None, ms_eps: torch.Tensor | Sequence[float] | None = None,
                 clip_denoised: bool = True, batch_size: int = 64, num_classes: int = 0,
                 guidance: float = 1.0) -> None:
        T = diffusion.num_timesteps
        self.steps = default_steps(sampler, T) if steps is None else int(steps)
        self.check_settings(sampler, self.steps, eta, T)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spacing = spacing or default_spacing(sampler)
        self.ms_eps = None if ms_eps is None else torch.as_tensor(ms_eps, dtype=torch.float64)
        make_sampler(diffusion, sampler, self.steps, eta, self.spacing, self.ms_eps)  # the spacing's and ms_eps's checks
        self.model, self.diffusion = model, diffusion
        self.image_shape = tuple(int(s) for s in image_shape)
        self.sampler, self.eta = sampler, float(eta)
        self.clip_denoised, self.batch_size = clip_denoised, int(batch_size)
        self.num_classes, self.guidance = int(num_classes), check_guidance(guidance, num_classes)

    @staticmethod
    def check_settings(sampler: str, steps: int, eta: float, num_timesteps: int, *, prefix: str = "") -> None:
        """The one check of a sampling setting: a known sampler, an ``eta`` it takes
        (:func:`ddpm.samplers.check_eta`) and ``1 <= steps <= T``; ``ValueError`` naming the valid ones.

        ``prefix`` is how the caller's user spells the options (``"--"``: ``--steps``, ``--eta``). The
        constructor and :func:`sampling_settings` call it, so a driver can check a setting before any
        worker builds the pipeline.
        """
        check_sampler(sampler)
        check_eta(eta, sampler, name=f"{prefix}eta")
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"{prefix}steps must be in [1, T={num_timesteps}], got {steps}")

    @classmethod
    def from_config(cls, model: Model, cfg: ExperimentConfig, diffusion: Diffusion | None = None, *,
                    sampler: Sampler | None = None, steps: int | None = None, eta: float | None = None,
                    spacing: Spacing | None = None, ms_eps: torch.Tensor | Sequence[float] | None = None,
                    batch_size: int | None = None, guidance: float | None = None) -> DDPMPipeline:
        """A pipeline with ``cfg.sample``'s settings for whatever is not given (``cfg.model.num_classes``
        for the classes, ``cfg.sample.guidance`` for the guidance weight).

        The config's ``steps``, ``eta`` and ``spacing`` belong to the config's sampler: with another
        ``sampler`` the defaults are that sampler's own (steps capped at T, eta 0, its spacing).
        ``ms_eps`` as :class:`DDPMPipeline`.
        """
        diffusion = diffusion if diffusion is not None else Diffusion.from_config(cfg.diffusion)
        sampler, steps, eta = sampling_settings(cfg.sample, diffusion.num_timesteps, sampler, steps, eta)
        s = cfg.sample
        spacing = spacing or config_spacing(s, sampler)
        m = cfg.model
        return cls(model, diffusion, (m.in_channels, m.image_size, m.image_size), sampler=sampler, steps=steps,
                   eta=eta, spacing=spacing, ms_eps=ms_eps, clip_denoised=s.clip_denoised,
                   batch_size=batch_size or s.batch_size, num_classes=m.num_classes,
                   guidance=s.guidance if guidance is None else guidance)

    def __call__(self, num: int, seed: int = 0, *, start: int = 0, progress: BatchProgress | None = None,
                 progressive: int = 0, class_labels: torch.Tensor | Sequence[int] | None = None,
                 call_progress: BatchProgress | None = None) -> Any:
        """Samples ``start .. start+num-1`` of ``seed``: float32 ``[num x C x H x W]`` in [-1, 1].

        With ``progressive = K``, also the predicted x_0 at K steps, ``[K x num x C x H x W]``.
        ``class_labels``: ``num`` labels in [0, num_classes) of a class-conditional model, label j
        for sample ``start + j`` (:func:`ddpm.guidance.balanced_labels` gives an even share); None
        samples its null class (unconditional). ``progress(samples done, samples)`` is called after
        each batch, ``call_progress(calls done, calls)`` after each batched network call (steps x
        batches in all): fine enough for an ETA when all samples fit in one batch.
        """
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        return self.from_seeds([sample_seed(seed, i) for i in range(start, start + num)], progress=progress,
                               progressive=progressive, class_labels=class_labels, call_progress=call_progress)

    def from_seeds(self, seeds: Sequence[int], *, progress: BatchProgress | None = None,
                   progressive: int = 0, class_labels: torch.Tensor | Sequence[int] | None = None,
                   call_progress: BatchProgress | None = None) -> Any:
        """One sample per noise seed (and per class label, if given), in batches of ``batch_size``;
        sample j depends on ``(seeds[j], class_labels[j])`` alone. See :meth:`__call__`."""
        seeds = [int(s) for s in seeds]
        labels = None
        if class_labels is not None:
            labels = check_class_labels(class_labels, self.num_classes)
            if len(labels) != len(seeds):
                raise ValueError(f"got {len(labels)} class labels for {len(seeds)} samples; give one per sample")
        xs: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []
        batches = -(-len(seeds) // self.batch_size)
        with torch.no_grad():
            for i in range(0, len(seeds), self.batch_size):
                chunk = seeds[i:i + self.batch_size]
                net = self._network(None if labels is None else labels[i:i + self.batch_size], len(chunk))
                calls = None if call_progress is None else _calls_so_far(call_progress, i // self.batch_size, batches)
                out = generate(net, self.diffusion, (len(chunk), *self.image_shape), self.sampler,
                               steps=self.steps, eta=self.eta, seeds=chunk, clip_denoised=self.clip_denoised,
                               progressive=progressive, spacing=self.spacing, ms_eps=self.ms_eps, progress=calls)
                x, p = out if progressive else (out, None)
                xs.append(x.float())
                if p is not None:
                    preds.append(p.float())
                if progress is not None:
                    progress(i + len(chunk), len(seeds))
        x = torch.cat(xs) if xs else torch.empty(0, *self.image_shape)
        return (x, torch.cat(preds, dim=1)) if progressive else x

    def _network(self, labels: torch.Tensor | None, n: int) -> Model:
        """What the sampler calls for a batch of ``n`` samples with these labels: the model itself
        when unconditional, else the guided model (the null class, unguided, where no labels)."""
        if not self.num_classes:
            return self.model
        if labels is None:
            return ClassifierFreeGuidance(self.model, torch.full((n,), self.num_classes), 1.0, self.num_classes)
        return ClassifierFreeGuidance(self.model, labels, self.guidance, self.num_classes)

    def __repr__(self) -> str:
        cond = f", num_classes={self.num_classes}, guidance={self.guidance}" if self.num_classes else ""
        return (f"DDPMPipeline(sampler={self.sampler!r}, steps={self.steps}, eta={self.eta}, spacing={self.spacing!r}, "
                f"T={self.diffusion.num_timesteps}, image_shape={self.image_shape}, batch_size={self.batch_size}"
                f"{cond})")


__all__ = ["DDPMPipeline", "sampling_settings"]
