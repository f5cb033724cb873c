"""The rounds of a progressive distillation: which teacher, which grids, which student config.

Round r's teacher samples with DDIM on K_r = K / 2^r timesteps and its student on K_r / 2
(:mod:`ddpm.distill`), until the student takes ``steps`` = N. The first teacher's grid is the
``cosine`` spacing of K steps out of T (:mod:`ddpm.samplers.timesteps`: the noise levels of uniform
times under the cosine schedule, the grid Salimans and Ho halve): every 2^k-th point of it is the
``cosine`` spacing of K / 2^k steps, exactly, so a student after k rounds is sampled by plain
``ddim`` with ``spacing=cosine`` on exactly the grid it was distilled for, from its config's
``sample`` section, with no extra flag (``sample``, ``evaluate``, ``serve``, the pyfunc model).
Where the cosine grids do not nest (timesteps that meet near t = 0: a small T, or K above 256 on
T = 1000) the grid is ``trailing``, which always nests. The other spacings do not nest
(``linspace`` of 2N points does not hold ``linspace`` of N).

Why cosine: on the linear schedule ``trailing`` spends half of a 4-step student's calls where x_t
is still nearly noise (t = 999, 749) and leaves one step for everything below SNR 1.1; the cosine
grid (999, 433, 258, 121) does not. The teacher's own DDIM on it, 2000 samples: 32 steps fine
spread 0.890 against 0.857 on ``trailing``; 4 steps KID 0.031 against 0.196; the 4-step student of
the same 3 x 1,350 steps, fine spread 0.873 against 0.810 (docs/RESULTS.md, "The cosine grid").

Everything here is checked on the driver, before any run or Ray job: bad input is a
:class:`~pipelines.errors.UsageError` (exit 2), one line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.config import ExperimentConfig, Spacing
from ddpm.distill import student_timesteps
from ddpm.pipeline import sampling_settings
from ddpm.samplers.timesteps import space_timesteps
from pipelines.distill import PREDICTIONS
from pipelines.errors import UsageError
from pipelines.train.loop import NO_STEP_LIMIT

GRID_SPACINGS: tuple[Spacing, ...] = ("cosine", "trailing")  # the first whose grids nest (module docstring)
MIN_ROUND_S = 1e-3  # a round's time when the rounds before it spent the budget in all: one step
SUFFIX = "-distilled"  # a student's registered name: <teacher name>-distilled


@dataclass(frozen=True)
class Round:
    """One round: the teacher's ``teacher_steps`` (K_r, even) and the student's half of them."""

    index: int  # 0-based
    teacher_steps: int

    @property
    def student_steps(self) -> int:
        return self.teacher_steps // 2

    def label(self, total: int) -> str:
        return f"round {self.index + 1}/{total}: {self.teacher_steps} -> {self.student_steps} steps"


def check_teacher(cfg: ExperimentConfig, uri: str) -> None:
    """A teacher must be an eps, v or edm model of this project (its config read: it is one)."""
    p = cfg.diffusion.prediction
    if p not in PREDICTIONS:
        raise UsageError(f"teacher {uri!r} predicts {p!r}: distillation needs an eps, v or edm model "
                         f"(valid: {', '.join(PREDICTIONS)})")


def from_steps(cfg: ExperimentConfig, given: int | None) -> int:
    """K, the first teacher's step count: ``given`` (``--from-steps``), else the teacher's own
    sampler's steps (its config's ``sample`` section) rounded up to a power of two, or the largest
    power of two <= T where that passes T (e.g. the ancestral sampler's T = 1000 steps: 512)."""
    T = cfg.diffusion.timesteps
    if given is not None:
        if given > T:
            raise UsageError(f"--from-steps {given} is above the teacher's T = {T} timesteps")
        return given
    _, steps, _ = sampling_settings(cfg.sample, T)
    k = 1 << max(steps - 1, 0).bit_length()
    return k if k <= T else 1 << (T.bit_length() - 1)


def plan_rounds(K: int, N: int, T: int) -> list[Round]:
    """The rounds from K to N steps: K, K/2, ..., 2N teacher steps.

    :raises UsageError: N is not below K, or not K / 2^k (the valid N listed), or K is odd.
    """
    try:
        student_timesteps(space_timesteps(T, K, "trailing"), N)
    except ValueError as e:
        raise UsageError(f"--steps {N} from --from-steps {K}: {e}") from None
    rounds, k = [], K
    while k > N:
        rounds.append(Round(len(rounds), k))
        k //= 2
    return rounds


def grid_spacing(alphas_cumprod: torch.Tensor, K: int, N: int) -> Spacing:
    """The first of :data:`GRID_SPACINGS` whose grid of k steps is every (K/k)-th point of its grid
    of K, for every k = K, K/2, ..., N (``trailing`` always is)."""
    T = len(alphas_cumprod)
    for spacing in GRID_SPACINGS:
        first, k, nests = space_timesteps(T, K, spacing, alphas_cumprod), K, True
        while nests and k >= N:
            nests = space_timesteps(T, k, spacing, alphas_cumprod) == first[:: K // k]
            k //= 2
        if nests:
            return spacing
    raise AssertionError("trailing grids always nest")  # pragma: no cover


def first_grid(alphas_cumprod: torch.Tensor, K: int, spacing: Spacing) -> list[int]:
    """The first teacher's K timesteps out of T = len(``alphas_cumprod``) on ``spacing``, descending."""
    return space_timesteps(len(alphas_cumprod), K, spacing, alphas_cumprod)


def round_grid(first: list[int], r: Round) -> list[int]:
    """Round ``r``'s teacher grid: every 2^r-th point of the first teacher's."""
    return student_timesteps(first, r.teacher_steps) if r.teacher_steps < len(first) else list(first)


def round_budget(max_steps: int, max_time: float | None, total: int, index: int,
                 spent_s: float = 0.0) -> tuple[int, float | None]:
    """Round ``index``'s share of a budget for all ``total`` rounds together (``--in-all``):
    ``(max_steps, max_time)`` of the round.

    The steps are shared out evenly, the last rounds taking one more where they do not divide (a
    step count of :data:`~pipelines.train.loop.NO_STEP_LIMIT`, no step limit, stays one). The time
    left, ``max_time`` less the ``spent_s`` seconds of the rounds before, is shared evenly among this
    round and the ones after it, so what a round leaves (it stopped at its steps first) goes to the
    next; a round with nothing left gets :data:`MIN_ROUND_S`, which the training loop turns into one
    step (a new run always takes one, so that every round ends with a student). The worker calls
    this at the start of each round, and again on resuming one (``spent_s`` is in the round's
    checkpoints), so a resumed round has the budget it started with.
    """
    steps = max_steps
    if max_steps < NO_STEP_LIMIT:
        steps = max_steps // total + (index >= total - max_steps % total)
    time = None if max_time is None else max((max_time - spent_s) / (total - index), MIN_ROUND_S)
    return steps, time


def student_config(cfg: ExperimentConfig, steps: int, name: str, spacing: Spacing,
                   prediction: str | None = None) -> ExperimentConfig:
    """The student's config after a round that ends at ``steps``: the teacher's network and process
    (predicting ``prediction`` when given), registered as ``name``, sampled as it was distilled: DDIM,
    eta 0, on the ``spacing`` grid of ``steps`` (:func:`grid_spacing`; = :func:`ddpm.distill.student_timesteps`
    of the first grid)."""
    return cfg.with_values({"sample.sampler": "ddim", "sample.steps": steps, "sample.eta": 0.0,
                            "sample.spacing": spacing, "train.registered_model": name,
                            "diffusion.prediction": prediction or cfg.diffusion.prediction})


__all__ = ["GRID_SPACINGS", "MIN_ROUND_S", "SUFFIX", "PREDICTIONS", "Round", "check_teacher", "first_grid",
           "from_steps", "grid_spacing", "plan_rounds", "round_budget", "round_grid", "student_config"]
