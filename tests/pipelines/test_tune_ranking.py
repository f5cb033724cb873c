"""tune --metric: what trials rank on, and an ASHA that never stops a trial within noise of the best."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ddpm.config import load_config
from pipelines.errors import UsageError
from pipelines.tune.ranking import RANKABLE, PatientASHA, check_metric, se_key, with_quality
from tests.support import run_cli

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _decisions(scheduler, results):
    scheduler.set_search_properties("kid", "min")
    trials = {}
    out = []
    for trial_id, result in results:
        if trial_id not in trials:
            trials[trial_id] = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        out.append(scheduler.on_trial_result(None, trials[trial_id], result))
    return out


RESULTS = [
    ("best", {"step": 1, "kid": 0.010, "kid_se": 0.002}),
    ("close", {"step": 1, "kid": 0.014, "kid_se": 0.002}),  # behind by 0.004 < 2 x hypot(0.002, 0.002)
    ("far", {"step": 1, "kid": 0.030, "kid_se": 0.002}),  # behind by 0.020: 7 standard errors
]


def test_patient_asha_spares_a_trial_within_two_standard_errors_of_its_rungs_best():
    kwargs = dict(time_attr="step", max_t=8, grace_period=1, reduction_factor=2)
    assert _decisions(ASHAScheduler(**kwargs), RESULTS) == [CONTINUE, STOP, STOP]  # plain ASHA: a coin flip
    patient = PatientASHA(se_attr="kid_se", **kwargs)
    assert _decisions(patient, RESULTS) == [CONTINUE, CONTINUE, STOP]
    assert patient.spared == 1
    # A later rung has its own best; at max_t a trial ends as ASHA ends it.
    patient = PatientASHA(se_attr="kid_se", **{**kwargs, "max_t": 1})
    assert _decisions(patient, RESULTS)[1] == STOP


def test_metric_choices_and_their_checks():
    digits, cifar = load_config("digits"), load_config("cifar10")
    for metric in RANKABLE:
        check_metric(metric, digits)
    with pytest.raises(UsageError, match="--metric 'fid' is not valid; valid: bpd, kid, pixel_fd, classifier_score"):
        check_metric("fid", digits)
    with pytest.raises(UsageError, match="digits feature space.*rank on bpd or pixel_fd"):
        check_metric("kid", cifar)
    check_metric("pixel_fd", cifar)
    assert se_key("bpd") == "bpd_stderr" and se_key("kid") == "kid_se"
    # A sample-quality metric turns the measurement on; bits/dim leaves the config alone.
    base = digits.with_values({"train.quality_num": 0})
    assert with_quality(base, "kid").train.quality_num == 256 and with_quality(base, "bpd").train.quality_num == 0
    # The CLI's choices (spelled out so --help imports no Ray) are these.
    result = run_cli("tune", "--metric", "fid")
    said = " ".join(result.output.replace("│", " ").split())  # the error box wraps its lines
    assert result.exit_code == 2 and f"valid: {', '.join(RANKABLE)}" in said, result.output
