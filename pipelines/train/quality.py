"""Sample quality during training: the yardstick's headline scores every ``train.eval_every`` steps.

Held-out bits/dim says how well the model fits the data, not how its few-step samples look. With
``train.quality_num = N > 0``, rank 0 also samples N images from the EMA weights with the config's
own sampler (its ``sample`` section: the setting users will sample with) at a fixed seed, so two
points of one curve differ by the model, not by the noise, and scores them against the held-out
split with one jackknife standard error each (:func:`ddpm.metrics.score_values`):

- ``pixel_fd``: the pixel-PCA Frechet distance (:class:`ddpm.pixel_scores.PixelYardstick`, its basis
  fitted once on the training split), for any data;
- ``kid`` and ``classifier_score``: in the digits feature network's space
  (:class:`ddpm.features.DigitsYardstick`), for the digits data only.

A class-conditional model samples every class in turn at the config's guidance. The scores go to
MLflow next to ``bpd`` (``training/kid``, ...; their ``_se`` under ``training details/``) and into
every report, so ``ddpm-pipe tune --metric kid`` can rank and stop trials on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ddpm import features, metrics
from ddpm.config import ExperimentConfig
from ddpm.data.reader import load_split, to_float
from ddpm.diffusion import Diffusion
from ddpm.guidance import balanced_labels
from ddpm.image import to_levels
from ddpm.pipeline import DDPMPipeline
from ddpm.pixel_scores import PixelYardstick

QUALITY_SCORES = ("kid", "pixel_fd", "classifier_score")  # what a training run can log, when it applies
DIGITS_SCORES = ("kid", "classifier_score")


@dataclass
class QualityProbe:
    """Rank 0's yardstick for one run: the held-out split, the pixel basis and (digits) the feature net."""

    cfg: ExperimentConfig
    pixel: PixelYardstick
    digits: features.DigitsYardstick | None

    @classmethod
    def load(cls, cfg: ExperimentConfig, train_url: str, test_url: str,
             storage_options: dict | None = None) -> QualityProbe:
        """Read both splits (``uint8`` images on ``cfg.data.levels``) and build the yardsticks; the
        digits feature net is read from ``$DDPM_HOME/cache`` (trained there first if absent)."""
        levels = cfg.data.levels
        train = to_float(load_split(train_url, storage_options=storage_options)[0], levels)
        test = to_float(load_split(test_url, storage_options=storage_options)[0], levels)
        digits = None
        if cfg.data.source == "digits" and tuple(test.shape[1:]) == (1, 8, 8):
            net, _info = features.load_digits_feature_net()
            digits = features.DigitsYardstick(net, test, train)
        return cls(cfg, PixelYardstick(test, train), digits)

    def measure(self, model: torch.nn.Module, diffusion: Diffusion, seed: int = 0) -> dict[str, float]:
        """``{score: value, score_se: standard error}`` of ``cfg.train.quality_num`` samples of ``model``
        (in eval mode), on the data's own grey levels as ``ddpm-pipe evaluate`` scores them."""
        cfg, num = self.cfg, self.cfg.train.quality_num
        pipe = DDPMPipeline.from_config(model, cfg, diffusion)
        K = cfg.model.num_classes
        x = pipe(num, seed, class_labels=balanced_labels(num, K)) if K else pipe(num, seed)
        samples = to_float(to_levels(x.float().cpu(), cfg.data.levels), cfg.data.levels)
        scores: dict[str, metrics.Score] = {"pixel_fd": self.pixel.scores(samples)["pixel_fd"]}
        if self.digits is not None:
            feature_scores = self.digits.scores(samples)
            scores.update({name: feature_scores[name] for name in DIGITS_SCORES})
        return metrics.score_values(scores)


def quality_summary(values: dict[str, Any]) -> str:
    """`` kid 0.012 +- 0.002 ...`` for the progress line: the scores a report holds, if any."""
    return "".join(f" {name} {values[name]:.3g}±{values[f'{name}_se']:.2g}" for name in QUALITY_SCORES
                   if name in values)


__all__ = ["DIGITS_SCORES", "QUALITY_SCORES", "QualityProbe", "quality_summary"]
