"""The feature space trained on a data set's own training split (ddpm.data_features): shapes, the
turn task's inputs and targets, determinism, the cache, and the yardstick checked on cases whose
answer is known (real held-out images sit at the floor; blurred or noisy ones do not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ddpm import data_features as df
from ddpm.data.sources import sample_images
from ddpm.features import digits_split


def _crops(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's sample photographs in 32x32 RGB crops, float in [-1, 1], and their photo label."""
    samples = list(sample_images(split))
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor([s.label for s in samples])


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (3, 28), (3, 32)])
def test_the_network_takes_any_square_image_and_gives_64_features(shape):
    channels, side = shape
    net = df.DataFeatureNet(channels, side, num_targets=8)
    x = torch.randn(5, channels, side, side)
    assert net.features(x).shape == (5, df.FEATURE_DIM)
    assert net(x).shape == (5, 8)


def test_images_below_4x4_are_refused():
    with pytest.raises(ValueError, match="at least 4x4"):
        df.DataFeatureNet(3, 2, num_targets=4)


def test_turned_gives_each_quarter_turn_and_its_target():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    xs, targets = df.turned(x)
    assert xs.shape == (8, 1, 3, 3)
    for k in range(df.TURNS):
        for i in range(2):
            assert torch.equal(xs[k * 2 + i], torch.rot90(x[i], k, dims=(1, 2)))
    assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    _, with_labels = df.turned(x, torch.tensor([1, 0]))
    assert with_labels.tolist() == [4, 0, 5, 1, 6, 2, 7, 3]  # label * 4 + turn
    with pytest.raises(ValueError, match="square"):
        df.turned(torch.zeros(1, 1, 2, 3))


def test_class_indices_use_labels_of_two_or_more_classes_only():
    assert df.class_indices(None) == (None, 1)
    assert df.class_indices([3, 3, 3]) == (None, 1)  # one class: the task is the turns alone
    index, k = df.class_indices([7, 5, 7, 9])
    assert index.tolist() == [1, 0, 1, 2] and k == 3


@pytest.mark.timeout(120)
def test_training_is_seeded_and_cached(tmp_path):
    x = torch.rand(40, 3, 8, 8) * 2 - 1
    a, info = df.train_data_feature_net(x, epochs=2)
    b, _ = df.train_data_feature_net(x, epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert info["task"] == "turns" and info["num_classes"] == 1 and info["num_train"] == 40
    first, first_info = df.load_data_feature_net(x, None, "abc123", tmp_path)
    again, again_info = df.load_data_feature_net(x, None, "abc123", tmp_path)
    assert not first_info["cached"] and again_info["cached"]
    assert df.cache_path("abc123", tmp_path).is_file()
    assert torch.equal(first.features(x), again.features(x))
    other, other_info = df.load_data_feature_net(x, None, "other", tmp_path)  # another split: its own net
    assert not other_info["cached"]


def _beyond_floor(out: dict[str, float], name: str) -> float:
    """How many combined standard errors the score is above its floor (KID and FD: higher is worse)."""
    return (out[name] - out[f"{name}_floor"]) / np.hypot(out[f"{name}_se"], out[f"{name}_floor_se"])


def _blur(x: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    kernel = torch.full((channels, 1, 3, 3), 1 / 9)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


@pytest.fixture(scope="module")
def unlabelled_digits():
    """The digits as a user's own unlabelled data: (train, unseen, test, net, info). The network
    learns the quarter-turns alone, on the training split less 400 images (``unseen``: real digits
    that neither it nor the floor sees); ``test`` is the held-out split, the reference."""
    x_train, _, x_test, _ = digits_split()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    train, unseen = x_train[order[400:]], x_train[order[:400]]
    net, info = df.train_data_feature_net(train, None, x_test)
    return train, unseen, x_test, net, info


@pytest.mark.timeout(300)
def test_unlabelled_digits_teach_the_network_their_turns(unlabelled_digits):
    info = unlabelled_digits[-1]
    assert info["task"] == "turns" and info["num_classes"] == 1 and info["num_train"] == df.MAX_TRAIN_IMAGES  # 1037 given, a seeded 1024 used
    assert info["test_accuracy"] > 0.8, info  # chance is 1/4


@pytest.mark.timeout(300)
def test_the_yardstick_puts_real_images_at_the_floor_and_damaged_ones_beyond_it(unlabelled_digits):
    """Known answers: 400 real digits the network never saw are within two standard errors of the
    training images' floor on KID and FD; the same digits blurred by a 3x3 kernel, or with noise of
    std 0.3 added, are not real data, and both scores say so beyond two standard errors."""
    train, unseen, test, net, _ = unlabelled_digits
    real = df.evaluate_samples(unseen, test, train, net)
    assert real["num_samples"] == 400 and real["num_reference"] == 360
    for name in ("kid", "fd"):
        assert abs(_beyond_floor(real, name)) < 2, (name, real)
    noise = torch.randn(unseen.shape, generator=torch.Generator().manual_seed(0))
    for damaged in (_blur(unseen), (unseen + 0.3 * noise).clamp(-1, 1)):
        got = df.evaluate_samples(damaged, test, train, net)
        for name in ("kid", "fd"):
            assert _beyond_floor(got, name) > 2, (name, got)


@pytest.mark.timeout(300)
def test_real_photo_crops_are_not_flagged(tmp_path):
    """RGB with labels (scikit-learn's two photos, 32x32 crops): the network learns (photo, turn) pairs,
    and 100 real crops it never saw are within two standard errors of the floor. (With only ~100
    test crops this data set cannot resolve small damage; the digits above test the power.)"""
    crops, labels = _crops("train")
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(0))
    train, unseen = crops[order[100:]], crops[order[:100]]
    test, test_labels = _crops("test")
    net, info = df.train_data_feature_net(train, labels[order[100:]], test, test_labels)
    assert info["task"] == "classes-turns" and info["num_classes"] == 2
    assert info["train_accuracy"] > 2 / 8, info  # above chance (1/8) on what it was shown
    real = df.evaluate_samples(unseen, test, train, net)
    for name in ("kid", "fd"):
        assert abs(_beyond_floor(real, name)) < 2, (name, real)
