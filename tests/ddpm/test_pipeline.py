"""ddpm.pipeline.DDPMPipeline: the one way to many seeded samples, against generate() and the config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddpm.config import DiffusionConfig, ExperimentConfig, SampleConfig
from ddpm.diffusion import Diffusion
from ddpm.noise import sample_seeds
from ddpm.pipeline import DDPMPipeline
from ddpm.samplers import config_spacing, generate
from ddpm.schedules import make_betas
from tests.ddpm.helpers import GaussianOracle, gaussian_ms_eps

SHAPE = (1, 3, 3)


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(make_betas("linear", 40), variance="fixed_large")


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 8, 0.0), ("ddim", 6, 0.5), ("dpmpp", 5, 0.0),
                                               ("unipc", 7, 0.0), ("dpmpp-2m-sde", 6, 0.0), ("edm", 7, 0.0)])
def test_batches_do_not_change_samples_and_match_generate(diffusion, sampler, steps, eta):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    whole = DDPMPipeline(oracle, diffusion, SHAPE, sampler=sampler, steps=steps, eta=eta, batch_size=7)(7, seed=3)
    pieces = DDPMPipeline(oracle, diffusion, SHAPE, sampler=sampler, steps=steps, eta=eta, batch_size=3)(7, seed=3)
    ref = generate(oracle, diffusion, (7, *SHAPE), sampler, steps=steps, eta=eta, seeds=sample_seeds(3, 0, 7))
    assert whole.shape == (7, *SHAPE) and whole.dtype == torch.float32
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-6)
    # start=k gives samples k.. of the same seed; another seed gives other samples.
    tail = DDPMPipeline(oracle, diffusion, SHAPE, sampler=sampler, steps=steps, eta=eta)(3, seed=3, start=4)
    torch.testing.assert_close(tail, whole[4:], rtol=0, atol=1e-6)
    other = DDPMPipeline(oracle, diffusion, SHAPE, sampler=sampler, steps=steps, eta=eta)(7, seed=4)
    assert (other - whole).abs().max() > 1e-3


def test_spacing_and_analytic_variance_reach_the_sampler(diffusion):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    pipe = DDPMPipeline(oracle, diffusion, SHAPE, sampler="unipc", steps=6, spacing="trailing")
    assert pipe.spacing == "trailing" and "spacing='trailing'" in repr(pipe)
    ref = generate(oracle, diffusion, (4, *SHAPE), "unipc", steps=6, spacing="trailing", seeds=sample_seeds(0, 0, 4))
    torch.testing.assert_close(pipe(4), ref, rtol=0, atol=1e-6)
    assert DDPMPipeline(oracle, diffusion, SHAPE, sampler="unipc").spacing == "logsnr"  # the sampler's own
    ms_eps = gaussian_ms_eps(diffusion.alphas_cumprod, 0.5)
    analytic = DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddpm", steps=5, ms_eps=ms_eps)
    ref = generate(oracle, diffusion, (3, *SHAPE), "ddpm", steps=5, ms_eps=ms_eps, seeds=sample_seeds(0, 0, 3))
    torch.testing.assert_close(analytic(3), ref, rtol=0, atol=1e-6)
    plain = DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddpm", steps=5)(3)
    assert (plain - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="valid: linspace, leading, trailing"):
        DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddim", spacing="uniform")
    with pytest.raises(ValueError, match="only applies to the ddpm sampler"):
        DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddim", ms_eps=ms_eps)
    cfg = replace(ExperimentConfig.preset("digits"), diffusion=DiffusionConfig(timesteps=40))
    assert DDPMPipeline.from_config(oracle, cfg, sampler="dpmpp", spacing="logsnr").spacing == "logsnr"
    # a config's spacing belongs to its own sampler (a distilled student's trailing DDIM); another
    # sampler gets its own default
    student = cfg.with_values({"sample.sampler": "ddim", "sample.steps": 4, "sample.spacing": "trailing"})
    assert config_spacing(student.sample, "ddim") == "trailing" == DDPMPipeline.from_config(oracle, student).spacing
    assert config_spacing(student.sample, "unipc") == "logsnr" == DDPMPipeline.from_config(
        oracle, student, sampler="unipc").spacing
    assert config_spacing(cfg.sample, "ddim") == "linspace"


def test_progress_counts_samples_and_progressive_keeps_predictions(diffusion):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    seen = []
    pipe = DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddim", steps=4, batch_size=2)
    x, preds = pipe(5, progress=lambda done, total: seen.append((done, total)), progressive=3)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert x.shape == (5, *SHAPE) and preds.shape == (3, 5, *SHAPE)
    torch.testing.assert_close(preds[-1], x)  # the last prediction of x_0 is the sample (ddim, eta 0)
    assert pipe(0).shape == (0, *SHAPE)


def test_call_progress_counts_network_calls_over_all_batches(diffusion):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    calls = []
    pipe = DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddim", steps=4, batch_size=2)
    pipe(5, call_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]  # 3 batches x 4 steps, counted on across batches


def test_from_config_uses_the_configs_steps_for_its_sampler_only():
    cfg = replace(ExperimentConfig.preset("digits"), diffusion=DiffusionConfig(timesteps=30),
                  sample=SampleConfig(sampler="ddim", steps=12, eta=0.3, batch_size=5))
    model = GaussianOracle(Diffusion.from_config(cfg.diffusion).alphas_cumprod)
    own = DDPMPipeline.from_config(model, cfg)
    assert (own.sampler, own.steps, own.eta, own.batch_size) == ("ddim", 12, 0.3, 5)
    assert own.image_shape == (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    other = DDPMPipeline.from_config(model, cfg, sampler="dpmpp")
    assert (other.steps, other.eta) == (20, 0.0)
    ddpm = DDPMPipeline.from_config(model, cfg, sampler="ddpm")
    assert ddpm.steps == 30  # T, the ancestral sampler's default
    spaced = replace(cfg, sample=replace(cfg.sample, spacing="trailing"))
    assert DDPMPipeline.from_config(model, spaced).spacing == "trailing"  # the config's, for its sampler
    assert DDPMPipeline.from_config(model, spaced, sampler="ddim").spacing == "trailing"  # the same sampler
    assert DDPMPipeline.from_config(model, spaced, sampler="dpmpp").spacing == "linspace"  # dpmpp's own
    assert DDPMPipeline.from_config(model, spaced, spacing="leading").spacing == "leading"  # as given


def test_bad_choices_fail_listing_the_valid_ones(diffusion):
    oracle = GaussianOracle(diffusion.alphas_cumprod)
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpmpp"):
        DDPMPipeline(oracle, diffusion, SHAPE, sampler="euler")
    with pytest.raises(ValueError, match=r"steps must be in \[1, T=40\], got 41"):
        DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddim", steps=41)
    with pytest.raises(ValueError, match="only applies to the ddim sampler"):
        DDPMPipeline(oracle, diffusion, SHAPE, sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        DDPMPipeline(oracle, diffusion, SHAPE, batch_size=0)


def test_sampling_settings_take_what_is_given_and_the_rest_from_the_models_config():
    """The config's steps and eta belong to its own sampler; another sampler gets its own defaults."""
    from ddpm.config import ExperimentConfig, SampleConfig
    from ddpm.pipeline import sampling_settings

    digits = ExperimentConfig.preset("digits").sample  # the measured winner: SDE-DPM-Solver++ 2M, 20 calls
    assert sampling_settings(digits, 1000) == ("dpmpp-2m-sde", 20, 0.0)
    assert sampling_settings(digits, 1000, steps=50) == ("dpmpp-2m-sde", 50, 0.0)
    assert sampling_settings(digits, 1000, "ddim") == ("ddim", 50, 0.0)  # another sampler: its own defaults
    assert sampling_settings(digits, 1000, "ddim", eta=1.0) == ("ddim", 50, 1.0)
    assert sampling_settings(digits, 1000, "dpmpp") == ("dpmpp", 20, 0.0)
    assert sampling_settings(digits, 1000, "ddpm") == ("ddpm", 1000, 0.0)
    assert sampling_settings(digits, 10) == ("dpmpp-2m-sde", 10, 0.0)  # the config's 20 capped at a small T
    ddim = SampleConfig(sampler="ddim", steps=25, eta=1.0)  # a config's eta belongs to its own sampler
    assert sampling_settings(ddim, 1000) == ("ddim", 25, 1.0)
    assert sampling_settings(ddim, 1000, eta=0.0) == ("ddim", 25, 0.0)
    assert sampling_settings(ddim, 1000, "dpmpp") == ("dpmpp", 20, 0.0)
    assert sampling_settings(SampleConfig(), 1000) == ("ddpm", 1000, 0.0)  # the paper's default
