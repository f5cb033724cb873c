"""The digits feature network: a small classifier that gives a feature space for 8x8 digits.

It is trained by the project on the digits training split only (seeded, single thread, a few
seconds on one idle CPU core), cached on disk under a name that carries
:data:`FEATURE_NET_VERSION`, and its own test-split accuracy is reported. :func:`evaluate_samples`
turns it into Frechet and kernel distances, precision/recall, classifier score and confidence,
class coverage and copy rate, each with its standard error and the real data's floor beside it.

The split is the digits data source's (``ddpm.data.sources.digits``): in ``load_digits`` order,
index % 5 == 0 is the test split (360 images), the rest the training split (1437). The test split is
the reference samples are compared with: neither this network nor the diffusion model (trained on
the training split) has seen it. Pixels 0..16 map to [-1, 1] as ``x / 8 - 1``.
"""

from __future__ import annotations

import contextlib
import math
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
FEATURE_NET_VERSION = "digits-cnn-v3"  # v3: scored against the test split (v2: the data source's split)

FEATURE_DIM = 64  # penultimate features; small enough for a full-rank covariance from ~100 samples
NUM_CLASSES = 10


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
def deterministic(seed: int) -> Iterator[None]:
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


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch_size: int,
        lr: float) -> nn.Module:
    """Train ``net`` to classify ``[N x C x H x W]`` ``x`` as ``[N]`` ``y`` (cross-entropy, Adam,
    seeded shuffles) and return it in eval mode. Call it inside :func:`deterministic`."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            inputs, targets = x[idx], y[idx]
            loss = F.cross_entropy(net(inputs), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def train_digits_feature_net(seed: int = 0, epochs: int = 15, batch_size: int = 64,
                             lr: float = 3e-3) -> tuple[DigitsFeatureNet, dict[str, Any]]:
    """Train on the digits training split; returns the net (eval mode) and its info.

    The net fits its training images more tightly than unseen ones (train accuracy 1.0, test
    about 0.98), so scores read from its predictions (classifier score, confidence) are higher for
    training images than for held-out ones; features and distances are not measurably affected.
    Random 1-pixel shifts during training narrowed the gap little and let uniform noise into the
    k-NN precision of real digits (0.57 instead of 0.1), so they are not used.
    """
    x_train, y_train, x_test, y_test = digits_split()
    start = time.perf_counter()
    with deterministic(seed):
        net = fit(DigitsFeatureNet(), x_train, y_train, seed, epochs, batch_size, lr)
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


def _batched(net: nn.Module, fn: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([getattr(net, fn)(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def extract_features(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``[N x C x H x W]`` images in [-1, 1] -> ``[N x D]`` features (``net.features``, batched)."""
    return _batched(net, "features", x, batch_size)


def class_probabilities(net: DigitsFeatureNet, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``[N x 1 x 8 x 8]`` images -> ``[N x 10]`` softmax class probabilities."""
    return _batched(net, "forward", x, batch_size).softmax(dim=1)


def classifier_confidence(net: DigitsFeatureNet, x: torch.Tensor, batch_size: int = 512) -> float:
    """Mean over images of the largest softmax probability (1.0: every image a clear digit)."""
    return class_probabilities(net, x, batch_size).max(dim=1).values.double().mean().item()


#: What each score compares a set of images with: ``"reference"`` (the held-out test split),
#: ``"train"`` (the training split, in pixels) or ``None`` (a property of the set alone).
COMPARED_WITH: dict[str, str | None] = {
    "fd": "reference", "kid": "reference", "precision": "reference", "recall": "reference",
    "classifier_score": None, "confidence": None, "class_tv": "reference", "classes_covered": "reference",
    "copy_rate": "train",
}


class FeatureYardstick:
    """The scores any feature network gives a set of images, as :class:`ddpm.metrics.Score` objects
    against one reference (the held-out ``real_test``): ``fd``, ``kid``, ``precision``, ``recall``
    (:func:`distance_scores`) in the network's feature space and ``copy_rate`` in pixel space.

    ``net`` is any module with ``features(x) -> [N x D]`` (the digits network, or
    :class:`ddpm.data_features.DataFeatureNet` for other data). Build it once per reference;
    :meth:`scores` of two sample sets can then be compared with :func:`ddpm.metrics.score_difference`
    (the reference's noise shared).
    """

    def __init__(self, net: nn.Module, real_test: torch.Tensor, real_train: torch.Tensor, k: int = 3,
                 copy_quantile: float = 0.05) -> None:
        self.net, self.k, self.copy_quantile = net, k, copy_quantile
        self.test, self.train = (torch.as_tensor(t, dtype=torch.float32) for t in (real_test, real_train))
        self.ref_feats = extract_features(net, self.test)  # [M x D]
        self.scale = rms_scale(self.ref_feats)  # KID's feature scale (distance_scores)

    def scores(self, images: torch.Tensor, copies: torch.Tensor | None = None) -> dict[str, metrics.Score]:
        """``{score: Score}`` of ``[N x C x H x W]`` images; ``copies`` (``[N]`` bool) replaces the
        images' own copy flags (the floor of the copy rate)."""
        images = torch.as_tensor(images, dtype=torch.float32)
        feats = extract_features(self.net, images)
        if copies is None:
            copies = metrics.copies(images, self.train, self.test, quantile=self.copy_quantile)
        return {**distance_scores(feats, self.ref_feats, self.scale, self.k), **self._more(images),
                "copy_rate": metrics.Score(share, (copies,))}

    def _more(self, images: torch.Tensor) -> dict[str, metrics.Score]:
        """Scores a subclass adds between the distances and the copy rate (the digits classifier's)."""
        return {}

    def floor_scores(self, num: int, seed: int = 0) -> dict[str, metrics.Score]:
        """The scores of ``min(num, len(real_train))`` training images (a seeded random subset) in place
        of samples; the copy rate's is the reference's own (training images score 1.0)."""
        n_floor = min(num, len(self.train))
        pick = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n_floor]
        own = metrics.copies(self.test, self.train, self.test, quantile=self.copy_quantile)
        return {**self.scores(self.train[pick], copies=torch.zeros(n_floor, dtype=torch.bool)),
                "copy_rate": metrics.Score(share, (own,))}

    def values(self, samples: torch.Tensor, groups: int = metrics.GROUPS, seed: int = 0) -> dict[str, float]:
        """The scores of ``samples`` and their floors, with jackknife standard errors, as floats
        (``<score>``, ``<score>_se``, ``<score>_floor``, ``<score>_floor_se``) and the set sizes
        ``num_samples``, ``num_floor``, ``num_reference``, ``num_train``."""
        out = {**metrics.score_values(self.scores(samples), groups, seed),
               **metrics.score_values(self.floor_scores(len(samples), seed), groups, seed, suffix="_floor")}
        out.update(num_samples=float(len(samples)), num_floor=float(min(len(samples), len(self.train))),
                   num_reference=float(len(self.test)), num_train=float(len(self.train)))
        return out


class DigitsYardstick(FeatureYardstick):
    """The digits network's scores, :data:`COMPARED_WITH`: :class:`FeatureYardstick`'s, and those read
    from its class predictions (classifier score, confidence, class histogram against the reference)."""

    def __init__(self, net: DigitsFeatureNet, real_test: torch.Tensor, real_train: torch.Tensor, k: int = 3,
                 copy_quantile: float = 0.05) -> None:
        super().__init__(net, real_test, real_train, k, copy_quantile)
        self.ref_labels = class_probabilities(net, self.test).argmax(dim=1)  # [M], the classifier's labels

    def _more(self, images: torch.Tensor) -> dict[str, metrics.Score]:
        probs = class_probabilities(self.net, images)
        labels = probs.argmax(dim=1)
        return {
            "classifier_score": metrics.Score(metrics.classifier_score, (probs,)),
            "confidence": metrics.Score(_confidence, (probs,)),
            "class_tv": metrics.Score(lambda a, b: metrics.class_tv(a, b, NUM_CLASSES), (labels,), (self.ref_labels,)),
            "classes_covered": metrics.Score(lambda a, b: float(metrics.classes_covered(a, b, NUM_CLASSES)),
                                             (labels,), (self.ref_labels,), standard_error=False),
        }


def distance_scores(feats: torch.Tensor, ref: torch.Tensor, scale: float, k: int) -> dict[str, metrics.Score]:
    """``fd``, ``kid`` (on features divided by ``scale``, the reference's root-mean-square feature,
    so x . y / D is of order 1), ``precision`` and ``recall`` (k-NN, ``k``) of ``[N x D]`` features
    against the reference's ``[M x D]``: the feature scores of any yardstick."""
    return {
        "fd": metrics.Score(metrics.frechet_distance_from_features, (feats,), (ref,)),
        "kid": metrics.Score(metrics.kernel_distance, (feats / scale,), (ref / scale,)),
        "precision": metrics.Score(lambda a, b: metrics.precision_recall(b, a, k=k)[0], (feats,), (ref,)),
        "recall": metrics.Score(lambda a, b: metrics.precision_recall(b, a, k=k)[1], (feats,), (ref,)),
    }


def rms_scale(feats: torch.Tensor) -> float:
    """The root-mean-square value of ``[M x D]`` features (KID's feature scale), never 0."""
    return max(feats.double().pow(2).mean().sqrt().item(), 1e-12)


def share(hits: torch.Tensor) -> float:
    """The share of true entries of a ``[N]`` bool tensor (a copy rate, an accuracy)."""
    return hits.double().mean().item()


def _confidence(probs: torch.Tensor) -> float:
    return probs.max(dim=1).values.double().mean().item()


def conditional_accuracy_score(net: DigitsFeatureNet, samples: torch.Tensor, labels: torch.Tensor | Any,
                               batch_size: int = 512) -> metrics.Score:
    """The share of ``[N x 1 x 8 x 8]`` samples that the classifier puts in the class each was asked
    for (``labels`` ``[N]``), as a :class:`ddpm.metrics.Score` (one hit per sample, so
    :func:`ddpm.metrics.score_difference` can pair two guidance weights' samples by seed)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(samples),):
        raise ValueError(f"got {tuple(labels.shape)} labels for {len(samples)} samples; give one per sample")
    hits = class_probabilities(net, samples, batch_size).argmax(dim=1) == labels
    return metrics.Score(share, (hits,))


def conditional_accuracy(net: DigitsFeatureNet, samples: torch.Tensor, labels: torch.Tensor | Any,
                         num_classes: int = NUM_CLASSES, groups: int = metrics.GROUPS, seed: int = 0) -> dict[str, float]:
    """Conditional accuracy of a class-conditional model: the feature classifier's accuracy on
    samples asked for each class, overall and per class, with jackknife standard errors.

    :param samples: ``[N x 1 x 8 x 8]`` in [-1, 1], sample j asked for class ``labels[j]``
        (:func:`ddpm.guidance.balanced_labels` gives every class an even share). Real held-out
        digits with their true labels give the ceiling (the classifier's own test accuracy).
    :return: ``cond_accuracy`` and ``cond_accuracy_se`` over all samples; for each class c,
        ``cond_accuracy_class{c}``, its ``_se`` and ``num_class{c}`` (NaN accuracy for a class no
        sample asked for).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    score = conditional_accuracy_score(net, samples, labels)
    (hits,) = score.samples
    out = metrics.score_values({"cond_accuracy": score}, groups, seed)
    for c in range(num_classes):
        mine = labels == c
        value, se = metrics.score_value(metrics.Score(share, (hits[mine],)), groups, seed)
        out.update({f"cond_accuracy_class{c}": value, f"cond_accuracy_class{c}_se": se,
                    f"num_class{c}": float(mine.sum())})
    return out


def _class_spread(feats: torch.Tensor, labels: torch.Tensor, ref_feats: torch.Tensor, ref_labels: torch.Tensor,
                  num_classes: int) -> float:
    """Geometric mean over classes of (the samples' mean squared feature distance to their class
    centroid) / (the reference's); classes with fewer than 2 rows on either side are left out."""
    logs = []
    for c in range(num_classes):
        a, b = feats[labels == c].double(), ref_feats[ref_labels == c].double()
        if len(a) < 2 or len(b) < 2:
            continue
        spread_a = (a - a.mean(0)).pow(2).sum(1).mean()
        spread_b = (b - b.mean(0)).pow(2).sum(1).mean()
        logs.append(math.log(max(spread_a.item(), 1e-300) / max(spread_b.item(), 1e-300)))
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def class_spread_score(net: DigitsFeatureNet, samples: torch.Tensor, labels: torch.Tensor | Any,
                       real: torch.Tensor, real_labels: torch.Tensor | Any,
                       num_classes: int = NUM_CLASSES) -> metrics.Score:
    """How diverse a class-conditional model's samples are within each class: for every class c, the
    samples asked for c spread about their centroid in the feature space (mean squared distance),
    over the same for the real images of class c; the geometric mean over classes. 1 is the real
    data's spread; below 1 the samples of a class collapse towards fewer modes (what strong
    classifier-free guidance does, Ho & Salimans 2021, fig. 1). A :class:`ddpm.metrics.Score`: the
    samples and their labels are left out together, as the real images and theirs.

    :param samples: ``[N x 1 x 8 x 8]`` in [-1, 1], sample j asked for class ``labels[j]``.
    :param real: held-out real digits with their true labels ``real_labels``.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(samples),):
        raise ValueError(f"got {tuple(labels.shape)} labels for {len(samples)} samples; give one per sample")
    feats, ref = extract_features(net, samples), extract_features(net, real)
    return metrics.Score(lambda a, y, b, z: _class_spread(a, y, b, z, num_classes), (feats, labels),
                         (ref, torch.as_tensor(real_labels, dtype=torch.long)))


def evaluate_samples(samples: torch.Tensor, real_test: torch.Tensor, real_train: torch.Tensor,
                     net: DigitsFeatureNet | None = None, k: int = 3, copy_quantile: float = 0.05,
                     cache_dir: str | Path | None = None, groups: int = metrics.GROUPS, seed: int = 0) -> dict[str, float]:
    """Score ``[N x 1 x 8 x 8]`` samples in [-1, 1] against held-out digits, with the real floor.

    1. Reference: ``real_test`` (M images), which neither the feature net nor the diffusion model
       trained on. ``fd`` and ``kid`` compare the samples' features with the reference's
       (``kid`` on features divided by the reference's root-mean-square value, so x . y / D is of
       order 1); ``precision`` and ``recall`` are k-NN (``k``) against the reference;
       ``class_tv`` and ``classes_covered`` compare the classifier's class histogram of the samples
       with the reference's; ``classifier_score`` and ``confidence`` are of the samples alone;
       ``copy_rate`` is :func:`ddpm.metrics.copy_rate` against ``real_train`` in pixel space, its
       threshold from ``real_test``.
    2. ``<score>_floor``: the same scores for ``num_floor = min(N, len(real_train))`` training images
       (a seeded random subset) in place of the samples: what a model that reproduces its training
       data gets, so copying cannot score better than the floor beyond noise. The copy rate's floor
       is the reference's own (about ``copy_quantile``; training images score 1.0). The net has
       seen the training images, so the classifier score and confidence floors sit above what
       unseen real digits get (by about 0.5 and 0.01 on 180 images): for those two the floor is
       a ceiling a model that generalises reaches only within about two standard errors.
    3. ``<score>_se`` and ``<score>_floor_se``: delete-a-group jackknife standard errors over
       ``groups`` groups (:func:`ddpm.metrics.jackknife`); NaN for ``classes_covered``.

    Returns floats: the scores, their floors and standard errors, ``num_samples``, ``num_floor``,
    ``num_reference`` and ``num_train``.
    """
    if net is None:
        net, _ = load_digits_feature_net(cache_dir)
    return DigitsYardstick(net, real_test, real_train, k=k, copy_quantile=copy_quantile).values(samples, groups, seed)


__all__ = [
    "COMPARED_WITH", "FEATURE_DIM", "FEATURE_NET_VERSION", "NUM_CLASSES", "DigitsFeatureNet", "DigitsYardstick",
    "FeatureYardstick",
    "class_probabilities", "class_spread_score", "classifier_confidence", "conditional_accuracy",
    "conditional_accuracy_score", "default_cache_dir", "deterministic", "distance_scores", "fit", "rms_scale",
    "share",
    "digits_split", "digits_split_indices", "evaluate_samples", "extract_features",
    "load_digits_feature_net", "train_digits_feature_net",
]
