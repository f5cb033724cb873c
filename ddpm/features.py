"""The digits feature network: a small classifier that gives a feature space for 8x8 digits.

It is trained by the project on the digits training split (seeded, single thread, a few seconds on
one CPU core), cached on disk under a name that carries :data:`FEATURE_NET_VERSION`, and its own
test-split accuracy is reported. :func:`evaluate_samples` turns it into Frechet distance,
precision/recall, classifier confidence and copy rate, each with the real data's floor beside it.

The split is the digits data source's (``ddpm.data.sources.digits``): in ``load_digits`` order,
index % 5 == 0 is the test split (360 images), the rest the training split (1437), so the network
never trains on the test images that evaluation uses as real data. Pixels 0..16 map to [-1, 1] as
``x / 8 - 1``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ddpm import metrics

# Bump when the architecture, training recipe or split rule changes: cached weights and every
# stored result keyed by it then stop matching.
FEATURE_NET_VERSION = "digits-cnn-v2"  # v2: the data source's split

FEATURE_DIM = 64  # penultimate features; small enough for a full-rank covariance from ~100 samples


# -- data --------------------------------------------------------------------------------------


def digits_split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``load_digits`` order: the data source's fixed split."""
    from ddpm.data.sources import DIGITS_TEST_EVERY

    index = np.arange(n)
    return index[index % DIGITS_TEST_EVERY != 0], index[index % DIGITS_TEST_EVERY == 0]


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images ``[N x 1 x 8 x 8]`` float32 in [-1, 1], labels int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test = digits_split_indices(len(x))
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return x[train], y[train], x[test], y[test]


# -- network -----------------------------------------------------------------------------------


class DigitsFeatureNet(nn.Module):
    """Conv classifier for ``[N x 1 x 8 x 8]`` digits in [-1, 1]; ``features`` gives ``[N x 64]``."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N x feature_dim]``."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8x8 -> 4x4
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N x num_classes]``."""
        return self.head(self.features(x))


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded global RNG and one thread, restored afterwards (no global state leaks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order: the same weights every time
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(dim=1) == y).double().mean().item()


def train_digits_feature_net(seed: int = 0, epochs: int = 15, batch_size: int = 64,
                             lr: float = 3e-3) -> tuple[DigitsFeatureNet, dict[str, Any]]:
    """Train on the digits training split; returns the net (eval mode) and its info."""
    x_train, y_train, x_test, y_test = digits_split()
    start = time.perf_counter()
    with _deterministic(seed):
        net = DigitsFeatureNet()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        info = {"version": FEATURE_NET_VERSION, "test_accuracy": _accuracy(net, x_test, y_test),
                "train_accuracy": _accuracy(net, x_train, y_train),
                "train_seconds": time.perf_counter() - start}
    net.requires_grad_(False)
    return net, info


def default_cache_dir() -> Path:
    """``$DDPM_HOME/cache`` (``DDPM_HOME`` defaults to ``./.ddpm``), read when called."""
    return Path(os.environ.get("DDPM_HOME", ".ddpm")).expanduser() / "cache"


def load_digits_feature_net(cache_dir: str | Path | None = None) -> tuple[DigitsFeatureNet, dict[str, Any]]:
    """The cached feature net, trained and cached first if absent.

    Returns ``(net, info)``; ``info`` has ``version``, ``test_accuracy``, ``path`` and ``cached``
    (True when the weights were read from disk). The file holds only tensors and numbers and is
    read with ``torch.load(weights_only=True)``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"digits_feature_net-{FEATURE_NET_VERSION}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("version") == FEATURE_NET_VERSION:
            net = DigitsFeatureNet()
            net.load_state_dict(blob["state_dict"])
            net.eval().requires_grad_(False)
            info = {"version": FEATURE_NET_VERSION, "test_accuracy": float(blob["test_accuracy"]),
                    "path": str(path), "cached": True}
            return net, info
    net, info = train_digits_feature_net()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save({"version": FEATURE_NET_VERSION, "test_accuracy": info["test_accuracy"],
                "state_dict": net.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
    return net, {**info, "path": str(path), "cached": False}


# -- scores ------------------------------------------------------------------------------------


def _batched(net: DigitsFeatureNet, fn: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([getattr(net, fn)(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def extract_features(net: DigitsFeatureNet, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``[N x 1 x 8 x 8]`` images in [-1, 1] -> ``[N x D]`` features."""
    return _batched(net, "features", x, batch_size)


def classifier_confidence(net: DigitsFeatureNet, x: torch.Tensor, batch_size: int = 512) -> float:
    """Mean over images of the largest softmax probability (1.0: every image a clear digit)."""
    probs = _batched(net, "forward", x, batch_size).softmax(dim=1)
    return probs.max(dim=1).values.double().mean().item()


def _scores(feats: torch.Tensor, images: torch.Tensor, net: DigitsFeatureNet, ref_feats: torch.Tensor,
            train_images: torch.Tensor, test_images: torch.Tensor, k: int,
            quantile: float) -> dict[str, float]:
    precision, recall = metrics.precision_recall(ref_feats, feats, k=k)
    return {
        "fd": metrics.frechet_distance_from_features(feats, ref_feats),
        "precision": precision,
        "recall": recall,
        "confidence": classifier_confidence(net, images),
        "copy_rate": metrics.copy_rate(images, train_images, test_images, quantile=quantile),
    }


def evaluate_samples(samples: torch.Tensor, real_test: torch.Tensor, real_train: torch.Tensor,
                     net: DigitsFeatureNet | None = None, k: int = 3, copy_quantile: float = 0.05,
                     cache_dir: str | Path | None = None) -> dict[str, float]:
    """Score ``[N x 1 x 8 x 8]`` samples in [-1, 1] against the digits data, with the real floor.

    1. Reference: the training images' features (the distribution the model was fit to).
    2. ``fd``, ``precision``, ``recall`` (k-NN, ``k``) compare the samples' features with the
       reference; ``confidence`` is :func:`classifier_confidence` of the samples; ``copy_rate`` is
       :func:`ddpm.metrics.copy_rate` in pixel space, its threshold from ``real_test``.
    3. ``<metric>_floor``: the same scores for the first ``num_floor = min(N, M)`` real test
       images in place of the samples, i.e. what a model drawing fresh images from the data would
       get (FD and recall depend on the number of images, hence the same count). The copy-rate
       floor is about ``copy_quantile`` by construction.

    Returns floats: the five scores, their floors, ``num_samples`` and ``num_floor``.
    """
    if net is None:
        net, _ = load_digits_feature_net(cache_dir)
    samples, real_test, real_train = (torch.as_tensor(t, dtype=torch.float32)
                                      for t in (samples, real_test, real_train))
    n_floor = min(len(samples), len(real_test))
    ref = extract_features(net, real_train)
    out = _scores(extract_features(net, samples), samples, net, ref, real_train, real_test, k, copy_quantile)
    floor_images = real_test[:n_floor]
    floor = _scores(extract_features(net, floor_images), floor_images, net, ref, real_train, real_test,
                    k, copy_quantile)
    out.update({f"{name}_floor": value for name, value in floor.items()})
    out.update(num_samples=float(len(samples)), num_floor=float(n_floor))
    return out


__all__ = [
    "FEATURE_DIM", "FEATURE_NET_VERSION", "DigitsFeatureNet", "classifier_confidence", "default_cache_dir",
    "digits_split", "digits_split_indices", "evaluate_samples", "extract_features",
    "load_digits_feature_net", "train_digits_feature_net",
]
