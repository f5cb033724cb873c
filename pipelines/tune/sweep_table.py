"""The live table of `ddpm-pipe tune`: one row per trial, the best so far, then the ranked table.

On a terminal the table is redrawn in place; otherwise it is printed as plain lines, at most every
``every_s`` seconds and whenever a trial ends. It is fed by a Tune ``Callback`` on the driver
(:class:`TableCallback`), which sees every trial's start, results and end.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from ray.tune import Callback

from ddpm.config import ExperimentConfig

COLUMNS = ("trial", "state", "T", "schedule", "beta range", "lr", "step", "bpd")


def describe(cfg: ExperimentConfig) -> dict[str, str]:
    """The swept settings of a trial's config, as table cells."""
    d = cfg.diffusion
    beta = "-" if d.beta_start is None or d.beta_end is None else f"{d.beta_start:.2g}..{d.beta_end:.2g}"
    return {"T": str(d.timesteps), "schedule": d.schedule, "beta range": beta, "lr": f"{cfg.train.lr:.2g}"}


def render(rows: list[dict[str, str]]) -> list[str]:
    """Rows of cells -> aligned text lines (a header first)."""
    widths = {c: max([len(c)] + [len(r.get(c, "")) for r in rows]) for c in COLUMNS}
    line = lambda r: "  ".join(r.get(c, "").ljust(widths[c]) for c in COLUMNS).rstrip()  # noqa: E731
    return [line({c: c for c in COLUMNS})] + [line(r) for r in rows]


def _bpd(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


class SweepTable:
    """The trials' state, kept from Tune's callback events; :meth:`show` prints it."""

    def __init__(self, config_of: Callable[[dict], ExperimentConfig], max_steps: int, stream: IO[str] | None = None,
                 every_s: float = 10.0) -> None:
        self.config_of, self.max_steps = config_of, max_steps
        # None: sys.stderr, looked up when shown. Tune pickles the run config and so this table (with
        # its callback) into tuner.pkl, and an open stream does not pickle.
        self._stream = stream
        self.every_s = every_s
        self.trials: dict[str, dict[str, str]] = {}
        self.best: tuple[float, str] | None = None
        self._drawn = 0  # lines drawn last time (terminal)
        self._last = -1e9

    def update(self, trial_id: str, state: str, config: dict | None = None,
               result: dict | None = None) -> None:
        row = self.trials.get(trial_id)
        if row is None:
            row = {"trial": trial_id, "step": "0", "bpd": "-"}
            if config is not None:
                row.update(describe(self.config_of(config)))
            self.trials[trial_id] = row
        row["state"] = state
        if result:
            row["step"] = str(int(result.get("step", 0)))
            bpd = result.get("bpd")
            row["bpd"] = _bpd(bpd)
            if isinstance(bpd, (int, float)) and math.isfinite(bpd) and (self.best is None or bpd < self.best[0]):
                self.best = (float(bpd), trial_id)

    def lines(self) -> list[str]:
        best = (f"best so far: trial {self.best[1]}, held-out {self.best[0]:.3f} bits/dim"
                if self.best else "best so far: none yet")
        return render(list(self.trials.values())) + [best]

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:  # redraw in place: up over the last drawing, clear to the end, draw again
            text = self.lines()
            up = f"\033[{self._drawn}F\033[J" if self._drawn else ""
            self.stream.write(up + "\n".join(text) + "\n")
            self.stream.flush()
            self._drawn = len(text)
        elif force or now - self._last >= self.every_s:
            self._last = now
            print("\n".join(f"[tune] {x}" for x in self.lines()), file=self.stream, flush=True)


class TableCallback(Callback):
    """A Tune ``Callback`` that keeps ``table`` up to date and shows it."""

    def __init__(self, table: SweepTable) -> None:
        self.table = table

    def on_trial_start(self, iteration, trials, trial, **info):
        self.table.update(trial.trial_id, "RUNNING", trial.config)
        self.table.show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.table.update(trial.trial_id, "RUNNING", trial.config, result)
        self.table.show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = int((trial.last_result or {}).get("step", 0))
        self.table.update(trial.trial_id, "DONE" if step >= self.table.max_steps else "STOPPED", trial.config,
                          trial.last_result)
        self.table.show(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.table.update(trial.trial_id, "FAILED", trial.config, trial.last_result)
        self.table.show(force=True)


def ranked(rows: list[dict[str, Any]], config_of: Callable[[dict], ExperimentConfig]) -> list[str]:
    """The final table: the trials ranked by held-out bits/dim (failed ones last)."""
    def key(r):
        bpd = r.get("bpd")
        return (0, bpd) if isinstance(bpd, (int, float)) and math.isfinite(bpd) else (1, 0.0)

    cells = []
    for rank, r in enumerate(sorted(rows, key=key), 1):
        cells.append({"trial": f"{rank}. {r.get('trial_id')}", "state": r.get("ending", ""),
                      **describe(config_of(r.get("params") or {})),
                      "step": str(r.get("step") or 0), "bpd": _bpd(r.get("bpd"))})
    return render(cells)
