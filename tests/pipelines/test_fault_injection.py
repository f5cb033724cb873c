"""pipelines.train.fault_injection: the test-only worker kill fires once, at the planned rank and step."""

from __future__ import annotations

import pytest

from pipelines.train import fault_injection


class Exited(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    calls = []

    def fake_exit(code):
        calls.append(code)
        raise Exited

    monkeypatch.setattr(fault_injection.os, "_exit", fake_exit)
    monkeypatch.setattr(fault_injection.time, "sleep", lambda s: None)
    return calls


def test_off_unless_planned(exits, monkeypatch):
    monkeypatch.delenv("DDPM_FAULT_EXIT", raising=False)
    for step in range(1, 5):
        fault_injection.exit_if_planned(0, step)
    assert exits == []


def test_fires_once_at_the_planned_rank_and_step(exits, monkeypatch, tmp_path):
    marker = tmp_path / "killed"
    monkeypatch.setenv("DDPM_FAULT_EXIT", f"1:3:{marker}")
    fault_injection.exit_if_planned(0, 3)  # another rank
    fault_injection.exit_if_planned(1, 2)  # another step
    assert exits == [] and not marker.exists()
    with pytest.raises(Exited):
        fault_injection.exit_if_planned(1, 3)
    assert exits == [1] and marker.exists()
    fault_injection.exit_if_planned(1, 3)  # the restarted worker group trains on
    assert exits == [1]
