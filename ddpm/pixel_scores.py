"""Sample-quality scores in pixel space, for any image data: a PCA basis of the training images.

A feature network (``ddpm.features``) is built to ignore fine pixel detail, so a sampler that
smooths its images or narrows their spread along the finer directions can keep every feature score
at the real data's floor. These scores look at the pixels themselves, and need nothing but the
training split, so they work on any data set, offline:

- the basis: the top K principal components of the training images (flattened, ``[N x C*H*W]``),
  K the fewest that hold ``variance`` (default 90%) of their variance (:class:`PCABasis`);
- ``pixel_fd``: the Frechet distance between samples and held-out images projected on the basis
  and *whitened* (each component divided by its training standard deviation), so a fine component
  counts as much as a coarse one; unwhitened, the first few components (half the variance on
  digits) would hide what happens in the rest;
- ``fine_spread``: the geometric mean, over the finer half of the basis (components K/2 .. K-1, by
  decreasing variance), of the samples' variance over the held-out images' variance along each.
  1 is the real data's spread; 0.7 is samples 30% less varied than real images in the fine
  directions. Its direction is ``one`` (:data:`ddpm.metrics.METRIC_DIRECTIONS`): nearer to 1 in
  log terms is better, as over-dispersed samples are no better than under-dispersed ones.

:func:`evaluate_pixels` returns both with their jackknife standard errors and the real data's
floor, the same keys as :func:`ddpm.features.evaluate_samples`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm import metrics

#: The scores' space in result keys (``features:pixel-pca-v1-<K>``); bump when the rules change.
FEATURES = "pixel-pca-v1"

#: What each pixel score compares a set of images with (the held-out reference, as
#: :data:`ddpm.features.COMPARED_WITH` says for the feature scores).
COMPARED_WITH: dict[str, str | None] = {"pixel_fd": "reference", "fine_spread": "reference"}


def _flat(images: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images.detach().cpu()
                           ).reshape(len(images), -1).to(torch.float64)


@dataclass(frozen=True)
class PCABasis:
    """Principal components of training images, float64.

    ``mean`` ``[D]``, ``components`` ``[K x D]`` (orthonormal rows, by decreasing variance),
    ``variances`` ``[K]`` (the training variance along each), ``explained`` (the share of the total
    training variance the K components hold).
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    explained: float

    @classmethod
    def fit(cls, images: Any, variance: float = 0.9) -> PCABasis:
        """The fewest components of ``images`` ``[N x ...]`` that hold at least ``variance`` of theirs."""
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1], got {variance}")
        x = _flat(images)
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 images for a PCA basis, got {x.shape[0]}")
        mean = x.mean(dim=0)
        cov = torch.cov((x - mean).T).reshape(x.shape[1], x.shape[1])
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        share = eigvals.cumsum(0) / eigvals.sum()
        k = int((share < variance - 1e-12).sum().item()) + 1
        k = min(k, int((eigvals > 1e-12 * eigvals[0]).sum().item()))  # never a zero-variance direction
        return cls(mean=mean, components=eigvecs[:, :k].T.contiguous(), variances=eigvals[:k],
                   explained=float(share[k - 1]))

    @property
    def size(self) -> int:
        """K, the number of components."""
        return int(self.components.shape[0])

    @property
    def fine(self) -> slice:
        """The finer half of the components (K/2 .. K-1): where smoothing shows first."""
        return slice(self.size // 2, self.size)

    def project(self, images: Any, whiten: bool = True) -> torch.Tensor:
        """``[N x ...]`` images -> ``[N x K]`` coordinates (divided by the training std with ``whiten``)."""
        z = (_flat(images) - self.mean) @ self.components.T
        return z / self.variances.sqrt() if whiten else z


def _spread(z: torch.Tensor, z_ref: torch.Tensor, fine: slice) -> float:
    """Geometric mean over ``fine`` of the coordinates' variance ratio ``z`` / ``z_ref``."""
    return math.exp((z.var(dim=0) / z_ref.var(dim=0))[fine].log().mean().item())


def pixel_fd(samples: Any, reference: Any, basis: PCABasis) -> float:
    """Frechet distance between the whitened projections of ``samples`` and ``reference``."""
    return metrics.frechet_distance_from_features(basis.project(samples), basis.project(reference))


def variance_ratios(samples: Any, reference: Any, basis: PCABasis) -> torch.Tensor:
    """``[K]``: the samples' variance along each component over the reference's."""
    return basis.project(samples).var(dim=0) / basis.project(reference).var(dim=0)


def fine_spread(samples: Any, reference: Any, basis: PCABasis) -> float:
    """Geometric mean of :func:`variance_ratios` over the finer half of the basis (1 = real spread)."""
    return _spread(basis.project(samples), basis.project(reference), basis.fine)


class PixelYardstick:
    """The pixel scores of :data:`COMPARED_WITH` for any set of images, as
    :class:`ddpm.metrics.Score` objects against one reference (the held-out ``real_test``), in the
    basis of ``real_train`` (fitted here unless ``basis`` is given)."""

    def __init__(self, real_test: Any, real_train: Any, basis: PCABasis | None = None,
                 variance: float = 0.9) -> None:
        self.train = _flat(real_train)
        self.basis = basis if basis is not None else PCABasis.fit(self.train, variance)
        self.ref = self.basis.project(real_test)  # [M x K], whitened once

    def scores(self, images: Any) -> dict[str, metrics.Score]:
        """``{score: Score}`` of ``[N x ...]`` images, on their coordinates projected once."""
        z, fine = self.basis.project(images), self.basis.fine
        return {"pixel_fd": metrics.Score(metrics.frechet_distance_from_features, (z,), (self.ref,)),
                "fine_spread": metrics.Score(lambda a, b: _spread(a, b, fine), (z,), (self.ref,))}

    def floor_scores(self, num: int, seed: int = 0) -> dict[str, metrics.Score]:
        """The scores of ``min(num, len(real_train))`` training images (a seeded random subset)."""
        pick = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:num]
        return self.scores(self.train[pick])


def evaluate_pixels(samples: Any, real_test: Any, real_train: Any, basis: PCABasis | None = None,
                    variance: float = 0.9, groups: int = metrics.GROUPS, seed: int = 0) -> dict[str, float]:
    """Score ``[N x C x H x W]`` samples in [-1, 1] against held-out images, with the real floor.

    1. The basis: :meth:`PCABasis.fit` on ``real_train`` (``variance`` of it), unless given.
    2. ``pixel_fd`` and ``fine_spread`` of the samples against ``real_test``.
    3. ``<score>_floor``: the same for ``min(N, len(real_train))`` training images (a seeded random
       subset) in place of the samples, as :func:`ddpm.features.evaluate_samples` does: what
       real images of the same number score, so no model beats it beyond noise.
    4. ``<score>_se``, ``<score>_floor_se``: delete-a-group jackknife standard errors
       (:func:`ddpm.metrics.score_value`, ``groups`` groups).

    Also returns ``pca_components`` (K) and ``pca_explained`` (the share of variance they hold).
    """
    yardstick = PixelYardstick(real_test, real_train, basis, variance)
    out = {**metrics.score_values(yardstick.scores(samples), groups, seed),
           **metrics.score_values(yardstick.floor_scores(len(samples), seed), groups, seed, suffix="_floor")}
    out.update(pca_components=float(yardstick.basis.size), pca_explained=yardstick.basis.explained)
    return out


__all__ = ["COMPARED_WITH", "FEATURES", "PCABasis", "PixelYardstick", "evaluate_pixels", "fine_spread", "pixel_fd", "variance_ratios"]
