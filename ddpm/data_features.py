"""A feature space for any image data, offline: a small CNN trained on the data's own training split.

The digits have their own network (:mod:`ddpm.features`); natural images have Inception-v3, whose
weights are a download. For a user's own images, offline, this module trains a small network on the
training split the diffusion model was trained on, as the digits network is (seeded, one thread,
cached under ``$DDPM_HOME/cache`` by :data:`DATA_NET_VERSION` and the split's content hash), and its
64-d penultimate activations are the feature space of :class:`ddpm.features.FeatureYardstick`:
``fd``, ``kid``, ``precision``, ``recall`` against the held-out split, and ``copy_rate`` in pixels,
each with its jackknife standard error and the training images' floor.

The task it learns (what the features must tell apart): every training image is shown in its four
quarter-turns and the network predicts which turn it sees (rotation prediction, the self-supervised
task of Gidaris, Singh and Komodakis, ICLR 2018) together with the image's class when the split has
labels of two or more classes: one cross-entropy over the (class, turn) pairs. So data without
labels still gets a trained space, and labels sharpen it where they exist. To tell the turns apart
the network must find the objects and their up-right orientation, which shapes features that
respond to a sample's content, not just its colour histogram.

Shapes: images ``[N x C x S x S]`` (square, any C and S >= 4) in [-1, 1]; features ``[N x 64]``.
At most :data:`MAX_TRAIN_IMAGES` training images are used (a seeded subset above that), so the fit
takes seconds for a few hundred 32x32 images and stays under a minute for large splits on one core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ddpm import features, metrics

# Bump when the architecture, the task or the training recipe changes: cached weights and every
# stored result keyed by it then stop matching.
DATA_NET_VERSION = "data-cnn-v1"
FEATURE_DIM = 64
TURNS = 4  # quarter-turns: 0, 90, 180, 270 degrees
MAX_TRAIN_IMAGES = 1024  # training images the fit uses at most (x TURNS inputs an epoch)


class DataFeatureNet(nn.Module):
    """Conv net for ``[N x C x S x S]`` images: conv + ReLU + 2x2 max-pool per level (16, 32, 64
    channels, then 64) until the side is at most 4, average-pooled to 4x4, then a linear layer to
    ``feature_dim`` features and a head of ``num_targets`` logits."""

    def __init__(self, in_channels: int, image_size: int, num_targets: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"images must be at least 4x4 for the data feature network, got {image_size}")
        layers: list[nn.Module] = []
        ch, size, width = in_channels, image_size, 16
        while True:
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.ReLU()]
            ch = width
            if size <= 4:
                break
            layers.append(nn.MaxPool2d(2))
            size, width = size // 2, min(2 * width, 64)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(ch * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_targets)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N x feature_dim]``."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N x num_targets]``."""
        return self.head(self.features(x))


def turned(x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in its :data:`TURNS` quarter-turns, and the task's targets.

    :param x: ``[N x C x S x S]``.
    :param labels: ``[N]`` class indices in ``[0, K)``, or None.
    :return: ``[TURNS*N x C x S x S]`` (turn k of image i at row ``k*N + i``) and ``[TURNS*N]``
        int64 targets ``label * TURNS + k`` (``k`` without labels).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"quarter-turns need square images, got {tuple(x.shape[-2:])}")
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(TURNS)])
    turn = torch.arange(TURNS).repeat_interleave(len(x))
    if labels is None:
        return xs, turn
    return xs, torch.as_tensor(labels, dtype=torch.long).repeat(TURNS) * TURNS + turn


def class_indices(labels: Any) -> tuple[torch.Tensor | None, int]:
    """``labels`` as indices into their sorted distinct values, and the number of classes; ``(None, 1)``
    when there are no labels or only one class (the task is then the turns alone)."""
    if labels is None:
        return None, 1
    values, index = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    if len(values) < 2:
        return None, 1
    return torch.from_numpy(index.astype(np.int64)), len(values)


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    with torch.no_grad():
        hits = sum((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                   for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)


def train_data_feature_net(train: torch.Tensor, train_labels: Any = None, test: torch.Tensor | None = None,
                           test_labels: Any = None, seed: int = 0, epochs: int = 15, batch_size: int = 64,
                           lr: float = 3e-3) -> tuple[DataFeatureNet, dict[str, Any]]:
    """Train on ``train`` (``[N x C x S x S]`` in [-1, 1]) for the turn (and class) task; returns the
    net (eval mode, no gradients) and its info: ``version``, ``task`` (``"turns"`` or
    ``"classes-turns"``), ``num_classes``, ``num_train`` (images used), the task accuracy on the
    training images and, with ``test``, on the held-out ones (``test_accuracy``: chance is
    1 / (classes x 4); it says the features learned the task), ``train_seconds``."""
    x = torch.as_tensor(train, dtype=torch.float32)
    index, num_classes = class_indices(train_labels)
    with features.deterministic(seed):
        if len(x) > MAX_TRAIN_IMAGES:
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MAX_TRAIN_IMAGES]
            x, index = x[keep], None if index is None else index[keep]
        start = time.perf_counter()
        inputs, targets = turned(x, index)
        net = DataFeatureNet(x.shape[1], x.shape[-1], num_classes * TURNS)
        features.fit(net, inputs, targets, seed, epochs, batch_size, lr)
        info: dict[str, Any] = {"version": DATA_NET_VERSION, "task": "classes-turns" if index is not None else "turns",
                                "num_classes": num_classes, "num_train": len(x),
                                "train_accuracy": _accuracy(net, inputs, targets),
                                "train_seconds": time.perf_counter() - start}
        if test is not None:
            test_index = _test_indices(train_labels, test_labels) if index is not None else None
            info["test_accuracy"] = _accuracy(net, *turned(torch.as_tensor(test, dtype=torch.float32), test_index))
    net.requires_grad_(False)
    return net, info


def _test_indices(train_labels: Any, test_labels: Any) -> torch.Tensor | None:
    """The test labels as indices of the training split's classes (None if a test class is unseen)."""
    if test_labels is None:
        return None
    values = np.unique(np.asarray(train_labels).reshape(-1))
    test = np.asarray(test_labels).reshape(-1)
    pos = np.searchsorted(values, test)
    if np.any(pos >= len(values)) or np.any(values[np.minimum(pos, len(values) - 1)] != test):
        return None
    return torch.from_numpy(pos.astype(np.int64))


def cache_path(data_hash: str, cache_dir: str | Path | None = None) -> Path:
    """Where the network of the training split with content hash ``data_hash`` is cached."""
    cache = Path(cache_dir) if cache_dir is not None else features.default_cache_dir()
    return cache / f"data_feature_net-{DATA_NET_VERSION}-{data_hash}.pt"


def load_data_feature_net(train: torch.Tensor, train_labels: Any, data_hash: str,
                          cache_dir: str | Path | None = None, test: torch.Tensor | None = None,
                          test_labels: Any = None) -> tuple[DataFeatureNet, dict[str, Any]]:
    """The network of the training split whose content hash is ``data_hash``, trained and cached first
    if absent (``cache_dir``, default ``$DDPM_HOME/cache``). ``info`` as
    :func:`train_data_feature_net`'s, with ``path`` and ``cached``. The file holds only tensors and
    numbers and is read with ``torch.load(weights_only=True)``."""
    path = cache_path(data_hash, cache_dir)
    x = torch.as_tensor(train, dtype=torch.float32)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("version") == DATA_NET_VERSION and blob.get("data_hash") == data_hash:
            net = DataFeatureNet(x.shape[1], x.shape[-1], int(blob["num_targets"]))
            net.load_state_dict(blob["state_dict"])
            net.eval().requires_grad_(False)
            return net, {**blob["info"], "path": str(path), "cached": True}
    net, info = train_data_feature_net(x, train_labels, test, test_labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save({"version": DATA_NET_VERSION, "data_hash": data_hash, "num_targets": net.head.out_features,
                "info": info, "state_dict": net.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
    return net, {**info, "path": str(path), "cached": False}


#: What each score compares a set of images with (as :data:`ddpm.features.COMPARED_WITH`).
COMPARED_WITH: dict[str, str | None] = {"fd": "reference", "kid": "reference", "precision": "reference",
                                        "recall": "reference", "copy_rate": "train"}


def evaluate_samples(samples: torch.Tensor, real_test: torch.Tensor, real_train: torch.Tensor,
                     net: DataFeatureNet, k: int = 3, copy_quantile: float = 0.05, groups: int = metrics.GROUPS,
                     seed: int = 0) -> dict[str, float]:
    """:data:`COMPARED_WITH`'s scores of ``[N x C x S x S]`` samples in [-1, 1] in ``net``'s feature
    space, with standard errors and the training images' floor, as
    :func:`ddpm.features.evaluate_samples` gives them for digits (same keys)."""
    yardstick = features.FeatureYardstick(net, real_test, real_train, k=k, copy_quantile=copy_quantile)
    return yardstick.values(samples, groups, seed)


__all__ = ["COMPARED_WITH", "DATA_NET_VERSION", "FEATURE_DIM", "MAX_TRAIN_IMAGES", "TURNS", "DataFeatureNet",
           "cache_path", "class_indices", "evaluate_samples", "load_data_feature_net", "train_data_feature_net", "turned"]
