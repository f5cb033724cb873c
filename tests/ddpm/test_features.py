"""The digits feature network: split, accuracy, determinism, cache, and evaluate_samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import features


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


def test_training_is_deterministic(trained):
    net, info = trained
    rng_state = torch.get_rng_state()
    again, _ = features.train_digits_feature_net()
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


def test_evaluate_samples_real_images_sit_at_the_floor(trained, split):
    net, _ = trained
    x_train, _, x_test, _ = split
    samples, held_out = x_test[:180], x_test[180:]  # fresh real images stand in for a perfect model
    out = features.evaluate_samples(samples, held_out, x_train, net=net)
    assert out["num_samples"] == 180 and out["num_floor"] == 180  # min(N, M) test images
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
