"""Test-only fault injection: kill a training worker at a chosen step, to test recovery (tests/faults).

Off unless ``DDPM_FAULT_EXIT`` is set; the training loop calls :func:`exit_if_planned` once per step.
"""

from __future__ import annotations

import os
import time

FAULT_EXIT_ENV = "DDPM_FAULT_EXIT"  # RANK:STEP:MARKER
FAULT_EXIT_DELAY_ENV = "DDPM_FAULT_EXIT_DELAY"  # seconds to wait before exiting (default 5)


def exit_if_planned(rank: int, step: int) -> None:
    """``DDPM_FAULT_EXIT=RANK:STEP:MARKER`` kills this worker process once at that step.

    The marker file makes it fire once, so the restarted worker group trains on (tests/faults).
    It waits ``DDPM_FAULT_EXIT_DELAY`` seconds first (default 5): Ray Train's controller collects
    reported checkpoints every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s), and a checkpoint reported
    less than that before a crash can be lost with it (then two intervals of work are lost).
    """
    spec = os.environ.get(FAULT_EXIT_ENV)
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(float(os.environ.get(FAULT_EXIT_DELAY_ENV, "5")))
        os._exit(1)


__all__ = ["FAULT_EXIT_DELAY_ENV", "FAULT_EXIT_ENV", "exit_if_planned"]
