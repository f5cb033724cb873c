"""Progressive distillation (Salimans and Ho 2022) against the exact denoiser of Gaussian data N(0.1, 0.3^2).

The teacher is the analytic optimal network (``helpers.GaussianOracle``). The exact student of a round
is Algorithm 2's target itself (:class:`ExactStudent`): with it, every student DDIM step must land
where the teacher's two land, and N student steps must give the teacher's 2N-step samples, to float64
precision; chained rounds likewise (16 teacher steps -> 1 student step). Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import Diffusion
from ddpm.distill import STUDENT_PREDICTIONS, ProgressiveDistillation, distillation_loss, student_timesteps
from ddpm.samplers import DDIMSampler, run_loop, space_timesteps
from ddpm.schedules import make_betas
from tests.ddpm.helpers import GaussianOracle, exact_moments

torch.set_num_threads(1)

MU, S = 0.1, 0.3  # the data, as in test_samplers.py
K = 16  # the first teacher's DDIM steps
SHAPE = (4, 2, 2, 2)
# Golden: deterministic DDIM at 16 linspace steps with the oracle, exact moments of x_0
# (helpers.exact_moments; its std is far below 0.3: 16 steps leave one step for t = 67 -> 0).
DDIM16_MEAN, DDIM16_STD = 0.09985833551403152, 0.22299471512596603
# Golden: distillation_loss of the teacher's own one-step prediction as the student (test below).
ONE_STEP_LOSS = 2.9325171033249e-4


class Gain(nn.Module):
    """``model(x_t, t) * gain`` with ``gain`` a float64 parameter: a module with weights (so
    :func:`run_loop` samples in float64) whose gradient the tests can read."""

    def __init__(self, model, gain=1.0):
        super().__init__()
        self.model = model
        self.gain = nn.Parameter(torch.tensor(gain, dtype=torch.float64))

    def forward(self, x_t, t):
        return self.gain * self.model(x_t, t)


class ExactStudent:
    """The exact student of ``round_``: Algorithm 2's target from ``teacher``, in the student's
    parameterisation, at the student position of each row's timestep."""

    def __init__(self, round_, teacher):
        self.round, self.teacher = round_, teacher

    def __call__(self, x_t, t):
        i = torch.tensor([self.round.timesteps.index(int(s)) for s in t])
        d = self.round.diffusion
        if d.prediction == "edm":  # the network sees c_in x_t / sqrt(abar_t) (Diffusion.model_output)
            x_t = x_t / d.edm_c_in_vp.to(x_t)[t].view(-1, *([1] * (x_t.dim() - 1)))
        return self.round.target(x_t, i, self.round.target_xstart(self.teacher, x_t, i))


@pytest.fixture(scope="module")
def betas():
    return make_betas("linear", 1000)


@pytest.fixture(scope="module")
def teacher_diffusion(betas):
    return Diffusion(betas)  # eps, as trained


@pytest.fixture(scope="module")
def oracle(teacher_diffusion):
    return GaussianOracle(teacher_diffusion.alphas_cumprod, MU, S)


@pytest.fixture(scope="module")
def grid():
    return space_timesteps(1000, K)


def ddim_loop(sampler, model, x):
    """Deterministic DDIM from ``x`` = x_T in x's dtype (float64), no clipping."""
    with torch.no_grad():
        for i in range(len(sampler.timesteps)):
            x, _ = sampler.step(model, x, i, None, False)
    return x


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the grid ---------------------------------------------------------------------------------------
def test_student_timesteps_halve_the_grid(grid):
    assert grid == [999, 932, 866, 799, 733, 666, 599, 533, 466, 400, 333, 266, 200, 133, 67, 0]
    assert student_timesteps(grid) == grid[::2] == [999, 866, 733, 599, 466, 333, 200, 67]
    assert student_timesteps(grid, 4) == student_timesteps(student_timesteps(grid)) == grid[::4]
    assert student_timesteps(grid, 1) == [999]
    assert student_timesteps([5, 0]) == [5]
    assert student_timesteps(range(999, -1, -1), 125) == list(range(999, -1, -8))  # T = 1000: 500, 250, 125


@pytest.mark.parametrize("teacher,steps,match", [
    (range(15, -1, -1), 3, r"halved k >= 1 times .*valid: 8, 4, 2, 1$"),
    (range(15, -1, -1), 6, r"valid: 8, 4, 2, 1$"),
    (range(15, -1, -1), 16, r"below the teacher's 16; valid: 8, 4, 2, 1$"),
    (range(15, -1, -1), 32, r"below the teacher's 16"),
    (range(15, -1, -1), 0, r"valid: 8, 4, 2, 1$"),
    (range(15, -1, -1), 4.0, r"valid: 8, 4, 2, 1$"),
    (range(999, -1, -1), 64, r"valid: 500, 250, 125$"),
    ([9, 6, 3], None, "cannot be halved"),
    ([], None, "cannot be halved"),
    ([3, 5], None, "distinct, descending"),
    ([5, 5], None, "distinct, descending"),
    ([3, -1], None, ">= 0"),
])
def test_student_timesteps_reject_bad_grids(teacher, steps, match):
    with pytest.raises(ValueError, match=match):
        student_timesteps(teacher, steps)


def test_bad_rounds_are_refused(betas, teacher_diffusion, grid):
    with pytest.raises(ValueError, match="share the schedule"):
        ProgressiveDistillation(Diffusion(make_betas("cosine", 1000)), grid, teacher_diffusion)
    with pytest.raises(ValueError, match="share the schedule"):
        ProgressiveDistillation(teacher_diffusion.respace(range(0, 1000, 2)), grid, teacher_diffusion)
    with pytest.raises(ValueError, match=r"in \[0, 1000\)"):
        ProgressiveDistillation(teacher_diffusion, [1000, 0])
    with pytest.raises(ValueError, match="cannot be halved"):
        ProgressiveDistillation(teacher_diffusion, [999, 500, 0])
    with pytest.raises(ValueError, match=r"distinct, descending and in \[0, 1000\)"):
        DDIMSampler.on_timesteps(teacher_diffusion, [0, 999])
    with pytest.raises(ValueError, match=r"in \[0, 1000\)"):
        DDIMSampler.on_timesteps(teacher_diffusion, [])


# -- the target -------------------------------------------------------------------------------------
def test_target_xstart_closed_form(teacher_diffusion, oracle, grid):
    """x~ by hand: the oracle's x^(z) = P z + Q (E[x_0 | z_t] for Gaussian data), two DDIM steps in
    scalars, then Algorithm 2's line 10; at the last step x~ is the teacher's second x^."""
    abar = teacher_diffusion.alphas_cumprod.tolist()
    levels = [abar[t] for t in grid] + [1.0]

    def step(z, a, a_next):
        d = a * S**2 + 1 - a
        x = math.sqrt(a) * S**2 / d * z + MU * (1 - a) / d
        eps = (z - math.sqrt(a) * x) / math.sqrt(1 - a)
        return math.sqrt(a_next) * x + math.sqrt(1 - a_next) * eps

    round_ = ProgressiveDistillation(teacher_diffusion, grid)
    i = torch.arange(K // 2)
    z = torch.linspace(-2, 2, K // 2, dtype=torch.float64).view(-1, 1, 1, 1)
    got = round_.target_xstart(oracle, z, i).flatten().tolist()
    for n, (zn, xn) in enumerate(zip(z.flatten().tolist(), got)):
        a, a1, a2 = levels[2 * n: 2 * n + 3]
        z2 = step(step(zn, a, a1), a1, a2)
        r = math.sqrt(1 - a2) / math.sqrt(1 - a)
        assert xn == pytest.approx((z2 - r * zn) / (math.sqrt(a2) - r * math.sqrt(a)), rel=1e-12, abs=1e-13)
    assert levels[-1] == 1.0  # the last student step ends at clean data: x~ = z_t''


@pytest.mark.parametrize("prediction", STUDENT_PREDICTIONS)
def test_target_in_each_parameterisation_converts_back(betas, teacher_diffusion, oracle, grid, prediction):
    """eps~ and v~ read back through the library's own converters (p_mean_variance) give x~."""
    student_diffusion = Diffusion(betas, prediction=prediction)
    round_ = ProgressiveDistillation(student_diffusion, grid, teacher_diffusion)
    i = torch.arange(K // 2).repeat_interleave(2)
    x_t = torch.randn(len(i), 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_tilde = round_.target_xstart(oracle, x_t, i)
    target = round_.target(x_t, i, x_tilde)
    back = student_diffusion.p_mean_variance_from_output(target, x_t, round_.student_t(i), False)["pred_xstart"]
    torch.testing.assert_close(back, x_tilde, rtol=1e-12, atol=1e-12)
    assert (prediction == "x0") == torch.equal(target, x_tilde)


@pytest.mark.parametrize("prediction", STUDENT_PREDICTIONS)
def test_weighting_is_truncated_snr_in_x_space(betas, teacher_diffusion, oracle, grid, prediction):
    """The weight is max(SNR_t, 1); the loss in any parameterisation is max(SNR_t, 1) ||x~ - x^||^2."""
    round_ = ProgressiveDistillation(Diffusion(betas, prediction=prediction), grid, teacher_diffusion)
    i = torch.arange(K // 2)
    abar = teacher_diffusion.alphas_cumprod[round_.timesteps]
    torch.testing.assert_close(round_.truncated_snr(i), (abar / (1 - abar)).clamp(min=1.0), rtol=1e-14, atol=0)
    assert round_.truncated_snr(i)[0] == 1.0 and round_.truncated_snr(i)[-1] > 1.0  # both sides of SNR = 1
    x_start = MU + S * torch.randn(len(i), 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    student = GaussianOracle(teacher_diffusion.alphas_cumprod, MU, S, prediction=prediction)  # not the target
    loss = round_.loss(student, oracle, x_start, i, noise)
    x_t = round_.diffusion.q_sample(x_start, round_.student_t(i), noise)
    x_hat = round_.diffusion.p_mean_variance(student, x_t, round_.student_t(i), False)["pred_xstart"]
    x_mse = ((round_.target_xstart(oracle, x_t, i) - x_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, round_.truncated_snr(i) * x_mse, rtol=1e-9, atol=1e-15)


# -- the exact student ------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", STUDENT_PREDICTIONS)
def test_each_student_step_is_two_teacher_steps(betas, teacher_diffusion, oracle, grid, prediction):
    round_ = ProgressiveDistillation(Diffusion(betas, prediction=prediction), grid, teacher_diffusion)
    student, teacher = round_.sampler(), DDIMSampler.on_timesteps(teacher_diffusion, grid)
    exact = ExactStudent(round_, oracle)
    for i in range(round_.steps):
        z = x_T(10 + i) * math.sqrt(1 - teacher_diffusion.alphas_cumprod[grid[2 * i]].item())
        z_mid, _ = teacher.step(oracle, z, 2 * i, None, False)
        z_end, _ = teacher.step(oracle, z_mid, 2 * i + 1, None, False)
        got, _ = student.step(exact, z, i, None, False)
        torch.testing.assert_close(got, z_end, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", STUDENT_PREDICTIONS)
def test_one_round_halves_the_steps(betas, teacher_diffusion, oracle, grid, prediction):
    """The exact student at N = 8 DDIM steps gives the teacher's 16-step samples from the same x_T."""
    round_ = ProgressiveDistillation(Diffusion(betas, prediction=prediction), grid, teacher_diffusion)
    sampler = round_.sampler()
    assert sampler.timesteps == grid[::2] and len(sampler.timesteps) == K // 2
    want = ddim_loop(DDIMSampler(teacher_diffusion, K), oracle, x_T())
    exact = ExactStudent(round_, oracle)
    torch.testing.assert_close(ddim_loop(sampler, exact, x_T()), want, rtol=1e-12, atol=1e-12)
    # Through the sampler machinery (run_loop, a seeded x_T, float64 from the weights' dtype).
    out = run_loop(sampler, Gain(exact), SHAPE, generator=torch.Generator().manual_seed(5), clip_denoised=False)
    ref = run_loop(DDIMSampler(teacher_diffusion, K), Gain(oracle), SHAPE, generator=torch.Generator().manual_seed(5),
                   clip_denoised=False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    m, sd = exact_moments(sampler, exact)
    assert m == pytest.approx(DDIM16_MEAN, rel=1e-12) and sd == pytest.approx(DDIM16_STD, rel=1e-12)


def test_chained_rounds_reach_one_step(betas, teacher_diffusion, oracle, grid):
    """Four rounds, each student the next teacher, in turn v, x0, edm, eps: 16 -> 8 -> 4 -> 2 -> 1 steps,
    each equal to the 16-step teacher; the last one is a single model call."""
    want = ddim_loop(DDIMSampler(teacher_diffusion, K), oracle, x_T())
    teacher, t_diffusion, t_grid = oracle, teacher_diffusion, grid
    for prediction in ["v", "x0", "edm", "eps"]:
        round_ = ProgressiveDistillation(Diffusion(betas, prediction=prediction), t_grid, t_diffusion)
        student = ExactStudent(round_, teacher)
        assert round_.timesteps == student_timesteps(grid, len(t_grid) // 2)
        torch.testing.assert_close(ddim_loop(round_.sampler(), student, x_T()), want, rtol=1e-11, atol=1e-11)
        teacher, t_diffusion, t_grid = student, round_.diffusion, round_.timesteps
    assert t_grid == [999]
    m, sd = exact_moments(DDIMSampler.on_timesteps(t_diffusion, t_grid), teacher)
    assert m == pytest.approx(DDIM16_MEAN, rel=1e-11) and sd == pytest.approx(DDIM16_STD, rel=1e-11)


def test_an_edm_teacher_is_read_through_its_preconditioning(betas, teacher_diffusion, oracle, grid):
    """An edm teacher (the oracle's F for sigma_data = 0.75, EDM's recipe for digits) and its edm
    student: the exact student's 8 steps give the eps teacher's 16-step samples; the exact student's
    loss is zero and its weight still makes the loss max(SNR, 1) times the x-space error."""
    edm = Diffusion(betas, prediction="edm", sigma_data=0.75)
    edm_oracle = GaussianOracle(edm.alphas_cumprod, MU, S, prediction="edm", sigma_data=0.75)
    round_ = ProgressiveDistillation(edm, grid)
    want = ddim_loop(DDIMSampler(teacher_diffusion, K), oracle, x_T())
    torch.testing.assert_close(ddim_loop(DDIMSampler.on_timesteps(edm, grid), edm_oracle, x_T()), want,
                               rtol=1e-12, atol=1e-12)  # the same teacher, read through F
    exact = ExactStudent(round_, edm_oracle)
    torch.testing.assert_close(ddim_loop(round_.sampler(), exact, x_T()), want, rtol=1e-12, atol=1e-12)
    x_start = MU + S * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert distillation_loss(exact, edm_oracle, x_start, edm, grid, generator=torch.Generator().manual_seed(6)) < 1e-20
    one_step = distillation_loss(edm_oracle, edm_oracle, x_start, edm, grid, generator=torch.Generator().manual_seed(6))
    assert one_step.item() == pytest.approx(ONE_STEP_LOSS, rel=1e-12)  # as for eps, x0 and v students


# -- the loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", STUDENT_PREDICTIONS)
def test_loss_is_zero_for_the_exact_student_only(betas, teacher_diffusion, oracle, grid, prediction):
    student_diffusion = Diffusion(betas, prediction=prediction)
    round_ = ProgressiveDistillation(student_diffusion, grid, teacher_diffusion)
    x_start = MU + S * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = {"teacher_diffusion": teacher_diffusion, "generator": torch.Generator().manual_seed(6)}
    exact = distillation_loss(ExactStudent(round_, oracle), oracle, x_start, student_diffusion, grid, **kwargs)
    assert exact.dim() == 0 and exact.item() < 1e-20
    # The teacher's own one-step prediction is not its two-step result: positive (golden), and the
    # same in every parameterisation (the weight makes it max(SNR, 1) ||x~ - x^||^2); a scaled target too.
    kwargs["generator"] = torch.Generator().manual_seed(6)
    one_step = GaussianOracle(teacher_diffusion.alphas_cumprod, MU, S, prediction=prediction)
    got = distillation_loss(one_step, oracle, x_start, student_diffusion, grid, **kwargs).item()
    assert got == pytest.approx(ONE_STEP_LOSS, rel=1e-12)
    kwargs["generator"] = torch.Generator().manual_seed(6)
    off = distillation_loss(Gain(ExactStudent(round_, oracle), 1.01), oracle, x_start, student_diffusion, grid,
                            **kwargs)
    assert off.item() > 1e-6
    # The mean over the batch of the per-example loss, at the positions drawn from the generator.
    i = round_.sample_positions(64, torch.Generator().manual_seed(6))
    assert set(i.tolist()) == set(range(round_.steps))


def test_gradient_reaches_the_student_only(betas, teacher_diffusion, oracle, grid):
    round_ = ProgressiveDistillation(Diffusion(betas, prediction="v"), grid, teacher_diffusion)
    teacher = Gain(oracle)
    student = Gain(ExactStudent(round_, teacher), 1.1)
    x_start = MU + S * torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = distillation_loss(student, teacher, x_start, round_.diffusion, grid, teacher_diffusion=teacher_diffusion,
                             generator=torch.Generator().manual_seed(8))
    loss.backward()
    assert loss.item() > 0 and student.gain.grad is not None and student.gain.grad.item() > 0  # gain 1.1 -> 1
    assert teacher.gain.grad is None and teacher.gain.requires_grad
    exact = Gain(ExactStudent(round_, teacher))
    at_target = round_.loss(exact, teacher, x_start, generator=torch.Generator().manual_seed(8)).mean()
    at_target.backward()
    assert at_target.item() < 1e-20 and abs(exact.gain.grad.item()) < 1e-9 and teacher.gain.grad is None
