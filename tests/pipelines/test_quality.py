"""Sample quality during training (pipelines/train/quality.py): evaluate's scores, every eval_every steps."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import features, pixel_scores
from ddpm.config import ConfigError, load_config
from ddpm.data.reader import load_split, to_float
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet

QUICK = ["model.ch=16", "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
         "diffusion.timesteps=50", "sample.sampler=ddim", "sample.steps=5", "sample.eta=1",
         "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1", "train.eval_every=2",
         "train.sample_every=1000", "train.checkpoint_every=1000", "train.quality_num=40"]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from pipelines.storage.data import prepare_command

    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "test"):
        prepare_command(source="digits", out=str(root / split), split=split, shard_size=600)
    return str(root / "train"), str(root / "test")


class RecordingTracker:
    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)

    def set_tag(self, key, value):
        pass

    def log_image(self, path, key, step):
        pass

    def log_artifact(self, path, folder):
        pass


@pytest.mark.timeout(300)
def test_the_probes_scores_are_evaluates_on_the_same_samples(splits):
    """The curve and the final evaluation are one yardstick: same samples, same scores and errors."""
    from ddpm.pipeline import DDPMPipeline
    from ddpm.image import to_levels
    from pipelines.train.quality import QualityProbe

    cfg = load_config("digits", QUICK)
    probe = QualityProbe.load(cfg, *splits)
    torch.manual_seed(0)
    model, diffusion = UNet(cfg.model).eval(), Diffusion.from_config(cfg.diffusion)
    got = probe.measure(model, diffusion)

    x = DDPMPipeline.from_config(model, cfg, diffusion)(40, 0)
    samples = to_float(to_levels(x, 17), 17)
    test, train = (to_float(load_split(u)[0], 17) for u in (splits[1], splits[0]))
    want = {**features.evaluate_samples(samples, test, train),
            **pixel_scores.evaluate_pixels(samples, test, train)}
    assert set(got) == {"kid", "kid_se", "classifier_score", "classifier_score_se", "pixel_fd", "pixel_fd_se"}
    for name, value in got.items():
        assert math.isfinite(value) and value == pytest.approx(want[name], rel=1e-6), name
    assert got["kid_se"] > 0 and got["pixel_fd_se"] > 0
    # An untrained network's samples are noise: far from real digits beyond their standard error.
    assert got["pixel_fd"] - want["pixel_fd_floor"] > 2 * got["pixel_fd_se"]


@pytest.mark.timeout(300)
def test_training_logs_the_scores_with_their_errors_every_eval_every_steps(splits):
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    def run(*sets):
        tracker, logs = RecordingTracker(), []
        ctx = LoopContext(log=logs.append, report=lambda m, s: None, restore=lambda: None)
        final = train_loop(load_config("digits", [*QUICK, *sets]),
                           LoopData(url=splits[0], holdout_url=splits[1]), ctx, tracker=tracker)
        return final, tracker.metrics, logs

    final, logged, logs = run("train.max_steps=4")
    for step in (2, 4):
        assert {"bpd", "kid", "kid_se", "pixel_fd", "pixel_fd_se", "classifier_score"} <= set(logged[step]), step
    assert "kid" not in logged[1] and "kid" not in logged[3]
    assert final["kid"] == logged[4]["kid"]  # in the final report, for tune
    assert any(line.startswith("[train] step 4/4 ") and " kid " in line and " pixel_fd " in line for line in logs)

    _, logged, _ = run("train.max_steps=2", "train.quality_num=0")
    assert "bpd" in logged[2] and "kid" not in logged[2]


def test_quality_num_needs_enough_samples_for_an_error():
    with pytest.raises(ConfigError, match=r"train.quality_num must be 0 \(off\) or >= 10"):
        load_config("digits", ["train.quality_num=5"])
    assert load_config("digits").train.quality_num == 256  # on for the digits preset
    assert load_config("cifar10").train.quality_num == 0
