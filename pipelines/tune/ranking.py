"""What a sweep ranks its trials on (``tune --metric``), and an early stop that respects noise.

Every report carries held-out bits/dim (``bpd``); with ``train.quality_num`` it also carries the
sample-quality scores of :mod:`pipelines.train.quality`, each with its jackknife standard error.
A sweep can rank and stop trials on any of them. ASHA alone compares raw values at each rung, so a
trial whose score is behind the rung's best by less than the scores' own noise can be stopped on a
coin flip; :class:`PatientASHA` keeps every such trial running.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ddpm.config import ExperimentConfig
from pipelines.errors import UsageError
from pipelines.train.quality import DIGITS_SCORES

# metric -> the direction that is better: what a trial report can be ranked on.
RANKABLE = {"bpd": "min", "kid": "min", "pixel_fd": "min", "classifier_score": "max"}
QUALITY_NUM = 256  # samples per report when a sweep ranks on a sample-quality score and the config has none


def se_key(metric: str) -> str:
    """The report's key of ``metric``'s standard error."""
    return "bpd_stderr" if metric == "bpd" else f"{metric}_se"


def check_metric(metric: str, cfg: ExperimentConfig, option: str = "--metric") -> None:
    """``metric`` is one a trial of ``cfg`` reports (exit 2 naming the valid ones): the digits feature
    scores need digits data."""
    if metric not in RANKABLE:
        raise UsageError(f"{option} {metric!r} is not valid; valid: {', '.join(RANKABLE)}")
    if metric in DIGITS_SCORES and cfg.data.source != "digits":
        raise UsageError(f"{option} {metric} is measured in the digits feature space, and this config's data "
                         f"is {cfg.data.source!r}: rank on bpd or pixel_fd")


def with_quality(cfg: ExperimentConfig, metric: str) -> ExperimentConfig:
    """``cfg`` with sample quality measured at every report when the sweep ranks on it."""
    if metric == "bpd" or cfg.train.quality_num:
        return cfg
    return cfg.with_values({"train.quality_num": QUALITY_NUM})


class PatientASHA(ASHAScheduler):
    """ASHA that never stops a trial whose score is within ``z`` standard errors of the best score
    reported at the same step: ``|m - m_best| <= z * sqrt(se^2 + se_best^2)``.

    The standard errors are the reports' own (``se_attr``). Trials it spares are counted in
    :attr:`spared`; trials at ``max_t`` end as ASHA ends them.
    """

    def __init__(self, *, se_attr: str, z: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.se_attr, self.z = se_attr, z
        self.spared = 0
        self._best: dict[float, tuple[float, float]] = {}  # step -> (metric_op * value, se) of the best

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        step, value = result.get(self._time_attr), result.get(self._metric)
        if step is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return action
        se = result.get(self.se_attr)
        se = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else 0.0
        signed = self._metric_op * float(value)  # larger is better
        best = self._best.get(step)
        if best is None or signed > best[0]:
            self._best[step] = best = (signed, se)
        if action == TrialScheduler.STOP and step < self._max_t \
                and best[0] - signed <= self.z * math.hypot(se, best[1]):
            self._num_stopped -= 1
            self.spared += 1
            return TrialScheduler.CONTINUE
        return action


__all__ = ["QUALITY_NUM", "RANKABLE", "PatientASHA", "check_metric", "se_key", "with_quality"]
