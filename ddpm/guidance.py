"""Class conditioning and classifier-free guidance (Ho & Salimans 2021).

One network learns both the conditional and the unconditional model. Its labels are
``y in [0, K]`` for ``K = model.num_classes`` classes, ``K`` being the "null" class (no class):

1. Training (Ho & Salimans, Algorithm 1): each batch's labels, with a share ``train.label_dropout``
   replaced by the null class (:func:`drop_labels`, :func:`training_batch`).
2. Sampling (Algorithm 2): :class:`ClassifierFreeGuidance` turns the network, one label per sample and
   a weight w into the plain ``model(x_t, t)`` that every sampler takes, so no sampler knows about
   classes::

       out = out_uncond + w (out_cond - out_uncond)

   w = 1 is plain conditional sampling, w = 0 unconditional, w > 1 trades diversity for fidelity
   (this w is the paper's 1 + w). Both branches come from ONE batched forward pass of 2N rows.

Labels are checked where they enter (:func:`check_class_labels`: the pipeline, the training batch),
not inside the network, whose forward stays free of host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def check_class_labels(labels: torch.Tensor | Sequence[int], num_classes: int, *,
                       name: str = "class labels") -> torch.Tensor:
    """``labels`` as an int64 CPU tensor ``[N]``, after checking them against a model's classes.

    :param num_classes: the model's ``model.num_classes`` K; valid labels lie in [0, K).
    :param name: how the caller's user spells them (``--class``), for the messages.
    :raises ValueError: labels for an unconditional model (K = 0), labels that are not a 1-D integer
        sequence, or a label outside [0, K), each naming the valid range.
    """
    if num_classes == 0:
        raise ValueError(f"{name} given to an unconditional model (model.num_classes=0); only a "
                         "class-conditional model (model.num_classes=K > 0) takes labels in [0, K)")
    y = torch.as_tensor(labels).cpu()
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got {tuple(y.shape)} {y.dtype}")
    y = y.long()
    bad = y[(y < 0) | (y >= num_classes)].unique().tolist()
    if bad:
        absent = " (-1: an image with no label)" if -1 in bad else ""
        raise ValueError(f"{name} must lie in [0, {num_classes}) (the model's {num_classes} classes), "
                         f"got {bad[:10]}{absent}")
    return y


def check_guidance(guidance: float, num_classes: int, *, name: str = "guidance") -> float:
    """``guidance`` as a float, after checking it: w in [0, inf), and w = 1 for an unconditional model.

    :raises ValueError: naming the valid range.
    """
    w = float(guidance)
    if not (w >= 0 and math.isfinite(w)):  # also NaN
        raise ValueError(f"{name} must be in [0, inf) (0 unconditional, 1 conditional, > 1 guided), got {guidance}")
    if num_classes == 0 and w != 1.0:
        raise ValueError(f"{name}={guidance} needs a class-conditional model (model.num_classes > 0); "
                         "an unconditional model takes only 1")
    return w


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """``[num]`` int64 labels with an even share of every class, in a fixed order: label i is
    ``i mod num_classes`` (so every prefix is balanced too, and each class gets floor or ceil of
    num / num_classes)."""
    if num_classes < 1:
        raise ValueError("balanced labels need a class-conditional model (model.num_classes > 0)")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    return torch.arange(num, dtype=torch.long) % num_classes


def drop_labels(labels: torch.Tensor, num_classes: int, dropout: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Training labels ``[N]`` with each replaced by the null class ``num_classes`` with probability
    ``dropout`` (Ho & Salimans, Algorithm 1, p_uncond).

    The draw is ``torch.rand(N) < dropout`` from ``generator`` (torch's global generator if None, which
    the training loop's checkpoints save, so a resumed run drops the same labels). It is made
    whatever ``dropout`` is, so the random stream after it does not depend on the share.

    :raises ValueError: a label outside [0, num_classes) (:func:`check_class_labels`), -1 included
        (an image with no label).
    """
    y = check_class_labels(labels, num_classes, name="training labels")
    drop = torch.rand(len(y), generator=generator, device=generator.device if generator is not None else None)
    return torch.where(drop.cpu() < dropout, torch.full_like(y, num_classes), y)


def training_batch(batch: Any, num_classes: int, dropout: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, labels)`` for one training step from a :class:`ddpm.data.ShardLoader` batch.

    Unconditional (``num_classes`` 0): ``batch`` is the images ``[N x C x H x W]`` and labels are None.
    Class-conditional: ``batch`` is ``(images, labels)`` (the loader built with ``return_labels``) and
    the labels come back through :func:`drop_labels`. Both stay on the CPU.
    """
    if not num_classes:
        return batch, None
    x, labels = batch
    return x, drop_labels(labels, num_classes, dropout, generator)


class ClassifierFreeGuidance(nn.Module):
    """A class-conditional network with fixed labels and weight w, as a plain ``model(x_t, t)``.

    ``forward(x_t [N x C x H x W], t [N])`` returns ``out_u + w (out_c - out_u)`` with
    ``out_c = net(x_t, t, labels)`` and ``out_u = net(x_t, t, null)``, from one forward pass of the
    2N rows ``[x_t; x_t]`` with labels ``[labels; null]`` (w = 1: one pass of N rows with ``labels``;
    w = 0: one pass of N rows with the null class).

    Why guiding the network output f is exact whatever f is. Every sampler reads f through
    :meth:`ddpm.diffusion.Diffusion.p_mean_variance`, which turns it into eps (and x_0) by a map that
    is affine in f, with coefficients that depend on x_t and t alone:

    1. eps:  eps = f.
    2. x0:   eps = (x_t - sqrt(abar_t) f) / sqrt(1 - abar_t)      (Ho et al. eq. 4 solved for eps)
    3. v:    eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) f          (Salimans & Ho sec. 4)
    4. edm:  x_0 = c_skip x_t / sqrt(abar_t) + c_out f (Karras et al. eq. 7), then eps as in 2.

    Both branches see the same x_t and t, so with eps = a + b f the same a and b serve both, and as
    the weights (1 - w) + w sum to 1, a + b (f_u + w (f_c - f_u)) = eps_u + w (eps_c - eps_u): the
    guided f IS the guided eps (and the guided x_0 and v) of Ho & Salimans eq. 6. Clipping x_0
    (``clip_denoised``) applies to the guided prediction, as in every implementation.

    Learned variances (``2C`` output channels) are not an affine function of eps: only the first C
    channels are guided and the conditional branch's variance channels are kept, as GLIDE does.

    :param model: ``model(x_t, t, y)`` with ``y`` ``[N]`` int64 in [0, num_classes] (a
        class-conditional :class:`ddpm.unet.UNet`, or :class:`ddpm.inference.SamplingNet` around one).
    :param labels: ``[N]`` int64, one label per row of the batches this wrapper will see; values in
        [0, num_classes], ``num_classes`` being the null class. Trusted: check them where they
        enter (:func:`check_class_labels`).
    :param guidance: w >= 0 (trusted: :func:`check_guidance`).
    :param num_classes: the model's K; K is the null label.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, guidance: float, num_classes: int) -> None:
        super().__init__()
        self.model, self.guidance, self.num_classes = model, float(guidance), int(num_classes)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _labels_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, null labels) on ``device``, copied there once."""
        if device not in self._on:
            y = self.labels.to(device)
            self._on[device] = (y, torch.full_like(y, self.num_classes))
        return self._on[device]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:param x_t: [N x C x H x W]. :param t: [N] original training timesteps.
        :return: the guided output, [N x C' x H x W] as the network's."""
        y, null = self._labels_on(x_t.device)
        if len(y) != x_t.shape[0]:
            raise ValueError(f"guidance has {len(y)} labels for a batch of {x_t.shape[0]}")
        w = self.guidance
        if w == 1.0:
            return self.model(x_t, t, y)
        if w == 0.0:
            return self.model(x_t, t, null)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out_c, out_u = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        C = x_t.shape[1]
        guided = out_u[:, :C] + w * (out_c[:, :C] - out_u[:, :C])
        return torch.cat([guided, out_c[:, C:]], dim=1) if out_c.shape[1] > C else guided


__all__ = ["ClassifierFreeGuidance", "balanced_labels", "check_class_labels", "check_guidance", "drop_labels",
           "training_batch"]
