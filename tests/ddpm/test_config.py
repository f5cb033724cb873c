"""ddpm.config: typed changes (with_values), string overrides (--set) and their errors."""

from __future__ import annotations

import pytest

from ddpm.config import ConfigError, ExperimentConfig, load_config


def test_with_values_changes_typed_values_and_leaves_the_rest():
    base = ExperimentConfig.preset("digits")
    cfg = base.with_values({"train.max_steps": 7, "diffusion.schedule": "cosine", "diffusion.beta_start": None,
                            "diffusion.beta_end": None, "model.ch_mult": [1, 2]})
    assert cfg.train.max_steps == 7 and cfg.diffusion.schedule == "cosine"
    assert cfg.model.ch_mult == (1, 2)  # coerced to the field's tuple type
    assert cfg.train.lr == base.train.lr and cfg.data == base.data
    assert base.train.max_steps != 7  # frozen: a new config, the old one unchanged


def test_override_strings_equal_typed_values():
    base = ExperimentConfig.preset("digits")
    assert base.override(["train.lr=1e-4", "model.ch_mult=[1,2]", "diffusion.beta_end=null"]) == \
        base.with_values({"train.lr": 1e-4, "model.ch_mult": (1, 2), "diffusion.beta_end": None})
    assert load_config("digits", ["train.max_steps=9"]).train.max_steps == 9
    snr = base.override(["diffusion.prediction=eps", "diffusion.snr_gamma=5"]).diffusion.snr_gamma
    assert snr == 5.0 and isinstance(snr, float) and base.diffusion.snr_gamma is None


@pytest.mark.parametrize("changes,message", [
    ({"train.nope": 1}, "unknown config key 'train.nope'; valid keys in train: "),
    ({"nosection.x": 1}, "unknown config section 'nosection'; valid: model, diffusion"),
    ({"sample.sampler": "euler"}, "valid: ddpm, ddim, dpmpp"),
    ({"train.precision": "fp8"}, "valid: fp32, bf16, fp16"),
])
def test_bad_keys_and_choices_list_the_valid_ones(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ExperimentConfig.preset("digits").with_values(changes)


def test_override_needs_key_equals_value():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        ExperimentConfig.preset("digits").override(["train.lr"])


@pytest.mark.parametrize("text, seconds", [("600", 600.0), (600, 600.0), ("90s", 90.0), ("10m", 600.0),
                                           ("1.5h", 5400.0), (" 2 M ", 120.0), (".5m", 30.0), (0.25, 0.25)])
def test_parse_duration_reads_seconds_and_s_m_h(text, seconds):
    from ddpm.config import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m", "-5", "0", "0s", "1h30m", "ten minutes", "inf", "nan", "1e3"])
def test_parse_duration_refuses_anything_else_naming_the_forms(text):
    from ddpm.config import parse_duration

    with pytest.raises(ValueError, match=r"is not a duration; valid: seconds .*\(90s, 10m, 1\.5h\)"):
        parse_duration(text)


def test_train_max_time_is_seconds_above_zero():
    cfg = load_config("digits", ["train.max_time=90"])
    assert cfg.train.max_time == 90.0 and load_config("digits").train.max_time is None
    with pytest.raises(ConfigError, match=r"train.max_time must be a number of seconds > 0, got 0"):
        load_config("digits", ["train.max_time=0"])


def test_digits_preset_uses_edms_recipe():
    """The digits preset trains with EDM's preconditioning and noise levels around the digits' std
    (issue 23, item 3: level with eps on every score, finer in pixel detail, in two seeds)."""
    d = ExperimentConfig.preset("digits").diffusion
    assert (d.prediction, d.sigma_data, d.timestep_sampling) == ("edm", 0.75, "lognormal")
    assert (d.schedule, d.timesteps, d.loss, d.snr_gamma) == ("linear", 1000, "simple", None)


def test_cifar10_preset_is_the_papers_run():
    """Golden values: the preset takes most of them from the dataclasses' defaults, so a changed
    default must not silently change the paper's configuration (Ho et al. 2020, section 4 and B)."""
    cfg = ExperimentConfig.preset("cifar10")
    d, t, s = cfg.diffusion, cfg.train, cfg.sample
    assert (d.schedule, d.timesteps, d.prediction, d.variance, d.loss) == ("linear", 1000, "eps", "fixed_large", "simple")
    assert (t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay, t.max_steps) == (128, 2e-4, 5000, 1.0, 0.9999, 800_000)
    # Sampling is not the paper's 1000 ancestral steps: the preset's few-step default (issue 29).
    assert (s.sampler, s.steps) == ("dpmpp", 20) and t.registered_model == "ddpm-cifar10"
    assert (cfg.data.source, cfg.data.levels, cfg.data.random_flip) == ("cifar10", 256, True)
    assert (cfg.model.ch, cfg.model.ch_mult, cfg.model.attn_resolutions, cfg.model.dropout) == (128, (1, 2, 2, 2), (16,), 0.1)


def test_digits_cond_preset_is_digits_made_class_conditional():
    """The preset the conditional measurement chose (docs/RESULTS.md): the digits preset with 10 classes,
    half the labels dropped, guidance 1.5 by default, sampled on the solver's own log-SNR grid (where
    it was measured); everything else the digits preset's."""
    cond, base = ExperimentConfig.preset("digits-cond"), ExperimentConfig.preset("digits")
    assert (cond.model.num_classes, cond.train.label_dropout, cond.sample.guidance) == (10, 0.5, 1.5)
    assert (cond.name, cond.train.registered_model) == ("digits-cond", "ddpm-digits-cond")
    assert cond.sample.spacing is None and base.sample.spacing == "cosine"
    assert cond.with_values({"name": "digits", "model.num_classes": 0, "train.label_dropout": 0.1,
                             "train.registered_model": "ddpm-digits", "sample.guidance": 1.0,
                             "sample.spacing": "cosine"}) == base
    assert load_config("digits-cond") == cond
