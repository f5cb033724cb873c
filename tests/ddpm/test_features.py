"""The digits feature network: split, accuracy, determinism, cache, and evaluate_samples.

The yardstick's own tests use real digits: held-out images must score at the floor, the training
images themselves (a perfect memoriser) must not beat it and are caught by the copy rate, corrupted
images must score worse the stronger the corruption, and samples of one class are caught by coverage.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpm import features, metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def trained(cache_dir):
    return features.load_digits_feature_net(cache_dir)


@pytest.fixture(scope="module")
def split():
    return features.digits_split()


def test_digits_split_rule_is_the_data_sources():
    from ddpm.data.sources import digits

    train, test = features.digits_split_indices(1797)
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test)
    assert [int(s.key) for s in digits("test").iterate()] == test.tolist()
    assert [int(s.key) for s in digits("train").iterate()] == train.tolist()


def test_digits_split_images(split):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    assert set(y_test.tolist()) == set(range(10))


def test_classifier_accuracy_and_cache(trained, cache_dir):
    net, info = trained
    assert info["version"] == features.FEATURE_NET_VERSION
    assert info["test_accuracy"] >= 0.95
    path = Path(info["path"])
    assert path.parent == cache_dir and features.FEATURE_NET_VERSION in path.name
    torch.load(path, weights_only=True)  # only tensors and numbers inside

    again, info2 = features.load_digits_feature_net(cache_dir)
    assert info2["cached"] and info2["test_accuracy"] == info["test_accuracy"]
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert net.features(torch.zeros(3, 1, 8, 8)).shape == (3, features.FEATURE_DIM)
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_training_is_deterministic():
    net, _ = features.train_digits_feature_net(epochs=2)  # the full recipe's first epochs, twice: cheap
    rng_state = torch.get_rng_state()
    again, _ = features.train_digits_feature_net(epochs=2)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_default_cache_dir_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    assert features.default_cache_dir() == tmp_path / "home" / "cache"


def test_classifier_confidence(trained, split):
    net, _ = trained
    x_test = split[2]
    assert features.classifier_confidence(net, x_test) > 0.95
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert features.classifier_confidence(net, noise) < features.classifier_confidence(net, x_test)


def test_conditional_accuracy_of_real_digits_is_the_classifiers_test_accuracy(trained, split):
    """Held-out digits "asked for" their true class score the classifier's own test accuracy (the
    ceiling a conditional model is compared with); asked for the next class, almost none are right."""
    net, info = trained
    x_test, y_test = split[2], split[3]
    out = features.conditional_accuracy(net, x_test, y_test)
    assert out["cond_accuracy"] == pytest.approx(info["test_accuracy"], abs=1e-12)
    n, p = len(y_test), out["cond_accuracy"]
    assert 0.5 * math.sqrt(p * (1 - p) / n) < out["cond_accuracy_se"] < 2 * math.sqrt(p * (1 - p) / n) + 1e-9
    predicted = features.class_probabilities(net, x_test).argmax(dim=1)
    for c in range(10):
        mine = y_test == c
        assert out[f"num_class{c}"] == mine.sum().item()
        assert out[f"cond_accuracy_class{c}"] == pytest.approx((predicted[mine] == c).double().mean().item())
    wrong = features.conditional_accuracy(net, x_test, (y_test + 1) % 10)
    assert wrong["cond_accuracy"] < 0.1
    only_three = features.conditional_accuracy(net, x_test[y_test == 3], y_test[y_test == 3])
    assert math.isnan(only_three["cond_accuracy_class0"]) and only_three["num_class0"] == 0
    assert metrics.direction("cond_accuracy") == "higher"
    with pytest.raises(ValueError, match="one per sample"):
        features.conditional_accuracy(net, x_test, y_test[:5])


def test_class_spread_is_one_for_real_digits_and_falls_as_each_class_collapses(trained, split):
    """Real held-out digits against the training ones spread as much (about 1); each class's images
    pulled halfway to their class mean spread a quarter as much in pixels, and far less in features."""
    net, _ = trained
    x_train, y_train, x_test, y_test = split
    real = metrics.score_value(features.class_spread_score(net, x_test, y_test, x_train, y_train))
    assert abs(math.log(real[0])) < 3 * real[1] / real[0] + 0.1 and real[1] > 0
    means = torch.stack([x_test[y_test == c].mean(0) for c in range(10)])
    collapsed = 0.5 * x_test + 0.5 * means[y_test]
    value, se = metrics.score_value(features.class_spread_score(net, collapsed, y_test, x_train, y_train))
    assert value < 0.6 and value + 3 * se < real[0]
    assert metrics.direction("class_spread") == "one"
    with pytest.raises(ValueError, match="one per sample"):
        features.class_spread_score(net, x_test, y_test[:5], x_train, y_train)


def test_evaluate_samples_real_images_sit_at_the_floor(trained, split, halves):
    net, _ = trained
    x_train = split[0]
    # Fresh real images stand in for a perfect model: random halves, since load_digits is ordered
    # by writer and its first and second halves differ (FD 59 against a floor of 25).
    samples, held_out = halves
    out = features.evaluate_samples(samples, held_out, x_train, net=net)
    assert out["num_samples"] == 180 and out["num_floor"] == 180  # min(N, M) training images
    for name in ("fd", "precision", "recall", "confidence", "copy_rate"):
        assert f"{name}_floor" in out
    assert out["fd"] < 1.5 * out["fd_floor"]
    assert out["precision"] > 0.8 and out["recall"] > 0.8 and out["confidence"] > 0.95
    assert out["copy_rate"] < 0.15


def test_evaluate_samples_flags_bad_and_copied_samples(trained, split):
    net, _ = trained
    x_train, _, x_test, _ = split
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    bad = features.evaluate_samples(noise, x_test, x_train, net=net)
    assert bad["fd"] > 5 * bad["fd_floor"] and bad["precision"] < 0.2
    copied = features.evaluate_samples(x_train[:200], x_test, x_train, net=net)
    assert copied["copy_rate"] == 1.0 and copied["copy_rate_floor"] < 0.1


# -- the yardstick itself ----------------------------------------------------------------------

# Scores with a standard error that every corruption must worsen; coverage (an integer) and the
# copy rate (not a quality score: noise moves images away from the training set) are checked apart.
SCORES = ("fd", "kid", "precision", "recall", "classifier_score", "confidence", "class_tv")


@pytest.fixture(scope="module")
def halves(split):
    """Two disjoint random halves of the test split: samples stand-in and reference (180 each)."""
    x_test = split[2]
    perm = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))
    return x_test[perm[:180]], x_test[perm[180:]]


@pytest.fixture(scope="module")
def held_out(trained, split, halves):
    """A perfect generalising model: fresh real images the model and the feature net never saw."""
    return features.evaluate_samples(halves[0], halves[1], split[0], net=trained[0])


def _noise(out: dict, name: str) -> float:
    """Standard error of the difference between a score and its floor (independent draws)."""
    return math.hypot(out[f"{name}_se"], out[f"{name}_floor_se"])


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """To the digits' 17 grey levels in [-1, 1], as evaluation does to samples."""
    return torch.round((x.clamp(-1, 1) + 1) * 8) / 8 - 1


def _noisy(x: torch.Tensor, strength: float) -> torch.Tensor:
    return _quantise(x + strength * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))


def _blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :]) / k.sum() ** 2
    return _quantise(torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0), k[None, None]))


def test_the_reference_is_the_held_out_split_and_the_floor_training_images(held_out):
    assert held_out["num_reference"] == 180 and held_out["num_samples"] == 180
    assert held_out["num_floor"] == 180 and held_out["num_train"] == 1437
    assert set(features.COMPARED_WITH) == {k for k in held_out if f"{k}_floor" in held_out}


def test_held_out_images_score_at_the_floor_within_noise(held_out):
    for name in SCORES:
        assert 0 < held_out[f"{name}_se"] < math.inf, name
        if name != "confidence":
            assert abs(held_out[name] - held_out[f"{name}_floor"]) <= 3 * _noise(held_out, name), name
    # The classifier saw the floor's training images: its confidence on them is higher than on unseen
    # digits (the documented ceiling), by about 0.01.
    assert held_out["confidence_floor"] - 0.02 < held_out["confidence"] <= held_out["confidence_floor"]
    assert held_out["classes_covered"] == held_out["classes_covered_floor"] == 10
    assert held_out["classifier_score"] > 8.5 and held_out["kid"] < 0.1
    assert held_out["copy_rate"] <= held_out["copy_rate_floor"] + 3 * _noise(held_out, "copy_rate")


def test_a_perfect_memoriser_does_not_beat_the_floor_and_is_caught_by_the_copy_rate(trained, split, halves):
    x_train = split[0]
    out = features.evaluate_samples(x_train[:180], halves[1], x_train, net=trained[0])  # the training images
    for name in SCORES:
        assert not metrics.better(name, out[name], out[f"{name}_floor"], min_delta=3 * _noise(out, name)), name
    assert out["copy_rate"] == 1.0 and out["copy_rate_floor"] < 0.1


# Pixel noise keeps the class mix (class_tv does not move beyond noise); blur merges classes.
# Noise up to 1.2: at 0.6 recall fell only 0.05 against a standard error of 0.07 on one machine (a
# k-NN score moves in steps of 1/180), so the strongest level must be clearly bad, not borderline.
@pytest.mark.parametrize("corrupt,strengths,coarse", [
    (_noisy, (0.3, 0.6, 1.2), ("precision", "recall")),
    (_blurred, (0.5, 0.8, 1.2), ("precision", "recall", "class_tv"))], ids=["noise", "blur"])
def test_corrupted_images_score_worse_the_stronger_the_corruption(trained, split, halves, held_out, corrupt,
                                                                    strengths, coarse):
    samples, reference = halves
    outs = [held_out] + [features.evaluate_samples(corrupt(samples, s), reference, split[0], net=trained[0])
                         for s in strengths]
    for name in ("fd", "kid", "classifier_score", "confidence"):  # strictly monotone in the strength
        values = [o[name] for o in outs]
        assert all(metrics.better(name, a, b) for a, b in zip(values, values[1:])), (name, values)
    for name in coarse:  # coarser: the strongest is worse by over one standard error
        worst = outs[-1]
        assert metrics.better(name, held_out[name], worst[name], min_delta=_noise(worst, name)), name
    assert outs[-1]["kid"] > outs[-1]["kid_floor"] + 2 * _noise(outs[-1], "kid")
    assert outs[-1]["classes_covered"] <= held_out["classes_covered"]


def test_samples_of_a_single_class_are_caught_by_coverage_and_score(trained, split, halves):
    x_train, y_train = split[0], split[1]
    out = features.evaluate_samples(x_train[y_train == 3], halves[1], x_train, net=trained[0])
    assert out["classes_covered"] == 1 and out["classes_covered_floor"] == 10
    assert out["class_tv"] > 0.8 and out["class_tv"] > out["class_tv_floor"] + 5 * _noise(out, "class_tv")
    assert out["classifier_score"] < 1.5 and out["classifier_score_floor"] > 8.5
    assert out["recall"] < out["recall_floor"] - 5 * _noise(out, "recall")
