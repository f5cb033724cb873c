"""Sample-quality metrics: Frechet and kernel distances, precision/recall, classifier score, class
coverage, copy rate, their standard errors, and how results compare.

All metrics take features as ``[N x D]`` arrays (numpy or torch); images are flattened to
``[N x C*H*W]`` where a function accepts pixels. Statistics are computed in float64.

- Frechet distance (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) between Gaussians fitted
  to two feature sets.
- Kernel distance, KID (Binkowski et al. 2018, https://arxiv.org/abs/1801.01401): the unbiased
  squared MMD with the cubic polynomial kernel; unlike FD it has no bias that depends on N.
- Improved precision and recall (Kynkaanniemi et al. 2019, https://arxiv.org/abs/1904.06991).
- Classifier score (the Inception Score's form, Salimans et al. 2016, https://arxiv.org/abs/1606.03498)
  and class coverage from a classifier's predictions.
- Copy rate: the share of samples nearer to a training image than real held-out images are.
- :func:`jackknife`: the standard error of any of them (delete-a-group jackknife); a :class:`Score`
  holds one score's inputs, so :func:`score_difference` can give the standard error of the
  difference of two sample sets' scores against one reference (its noise shared, so it cancels).
- ``METRIC_DIRECTIONS``, :func:`better` and :func:`result_key`: every result is keyed by what it
  depends on, and two results are only compared when their keys are equal.
- :func:`inception_fid`: Inception-v3 FID for natural images through torchmetrics, from a weights
  file the user supplies (nothing is downloaded).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Direction = Literal["lower", "higher", "one"]  # "one": a ratio to the real data's, 1 is best


def _as_2d_float64(x: Any) -> torch.Tensor:
    """``[N x ...]`` numpy array or tensor -> ``[N x D]`` float64 CPU tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.ndim < 1:
        raise ValueError("expected at least one dimension [N x ...]")
    return t.reshape(t.shape[0], -1).to(torch.float64)


# -- Frechet distance -------------------------------------------------------------------------


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D x D]`` (unbiased, as pytorch-fid) of ``[N x D]`` features."""
    f = _as_2d_float64(features).numpy()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    1. S1 S2 is similar to M = S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so
       tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)).
    2. Both square roots come from symmetric eigendecompositions with tiny negative eigenvalues
       (round-off) clipped to 0; unlike a general ``sqrtm`` of S1 S2 this never returns complex
       parts, and it is exact for singular covariances (fewer samples than dimensions).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))


def frechet_distance_from_features(a: Any, b: Any) -> float:
    """Frechet distance between Gaussians fitted to ``[N x D]`` and ``[M x D]`` features."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# -- kernel distance (KID) ---------------------------------------------------------------------


def polynomial_kernel(a: Any, b: Any, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (x . y / D + coef0)^degree for rows of ``[N x D]`` and ``[M x D]`` -> ``[N x M]``."""
    x, y = _as_2d_float64(a), _as_2d_float64(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    return (x @ y.T / x.shape[1] + coef0) ** degree


def kernel_distance(a: Any, b: Any, degree: int = 3, coef0: float = 1.0) -> float:
    """KID: the unbiased estimate of MMD^2 between the distributions of two feature sets.

    With k = :func:`polynomial_kernel` (Binkowski et al. 2018, eq. 4 with their default kernel),
    ``[N x D]`` features x and ``[M x D]`` features y:

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (N (N - 1)) + sum_{i != j} k(y_i, y_j) / (M (M - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / (N M).

    Its expectation is the population MMD^2 for any N, M >= 2 (0 when both sets come from the same
    distribution), so an estimate may be slightly negative.
    """
    x, y = _as_2d_float64(a), _as_2d_float64(b)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 feature vectors in each set, got {n} and {m}")
    kxx, kyy = polynomial_kernel(x, x, degree, coef0), polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


# -- classifier score and class coverage -------------------------------------------------------


def classifier_score(probs: Any) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from ``[N x K]`` class probabilities (the Inception Score's form).

    p(y) is the mean of p(y|x) over the set. The score is 1 when every prediction is the same (or
    uniform) and K when the predictions are one-hot and the classes balanced: high means confident
    predictions spread over all classes.

    It reads low on few samples: the entropy of the estimated p(y) is biased down by about
    (1 / 2N) sum_k Var_x p(k|x) / p(k). On random subsets of the 1,437 training digits (all of them:
    9.95): 9.81 at N = 256, 9.85 at 360, 9.89 at 500, 9.94 at 1000. Compare scores at equal N only:
    the training log's probe (``train.quality_num`` 256) reads about 1.5% below a 2000-sample
    ``evaluate`` of the same model.
    """
    p = _as_2d_float64(probs)
    marginal = p.mean(dim=0)
    kl = (p * (torch.log(p.clamp_min(1e-300)) - torch.log(marginal.clamp_min(1e-300)))).sum(dim=1)
    return math.exp(kl.mean().item())


def class_histogram(labels: Any, num_classes: int) -> np.ndarray:
    """Share of each class ``[K]`` among integer labels ``[N]``."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).ravel()
    if y.size == 0:
        raise ValueError("no labels")
    return np.bincount(y, minlength=num_classes)[:num_classes] / y.size


def class_tv(labels: Any, ref_labels: Any, num_classes: int) -> float:
    """Total variation between two class histograms: 0.5 sum_k |p_k - q_k|, in [0, 1]."""
    return float(0.5 * np.abs(class_histogram(labels, num_classes)
                              - class_histogram(ref_labels, num_classes)).sum())


def classes_covered(labels: Any, ref_labels: Any, num_classes: int, share: float = 0.5) -> int:
    """Classes of the reference that hold at least ``share`` of their reference share among ``labels``."""
    p, q = class_histogram(labels, num_classes), class_histogram(ref_labels, num_classes)
    return int(((q > 0) & (p >= share * q)).sum())


# -- standard errors ---------------------------------------------------------------------------


def _take(x: Any, index: np.ndarray) -> Any:
    return x[torch.from_numpy(index)] if isinstance(x, torch.Tensor) else np.asarray(x)[index]


GROUPS = 40  # jackknife groups of every standard error the yardstick gives (score_value, score_difference)


def jackknife(stat: Any, *sets: Any, groups: int = GROUPS, seed: int = 0,
              link: Sequence[int] | None = None) -> tuple[Any, Any]:
    """``stat(*sets)`` and its delete-a-group jackknife standard error.

    1. Each set (rows ``[N_s x ...]``) is split into the same number G = min(``groups``, smallest
       N_s) of random groups of near-equal size (seeded with ``seed``); the unit i is the i-th group
       of every set, so G units are independent draws when the sets are. ``link`` gives each set
       an id: sets with one id hold rows of the same items (equal lengths: the features and class
       probabilities of one image set, or two samplers' samples of the same seeds) and are split the
       same way, row j of each in the same group. Default: each set split on its own.
    2. theta_i = ``stat`` on the sets without unit i.
    3. se = sqrt((G - 1) / G * sum_i (theta_i - mean theta)^2) (Efron and Stein 1981).

    ``stat`` may return a float or a tuple of floats (then both results are numpy arrays). The
    value returned is ``stat`` of the full sets; se is NaN when G < 2.
    """
    value = stat(*sets)
    vector = isinstance(value, tuple)
    sizes = [len(s) for s in sets]
    link = list(range(len(sets))) if link is None else list(link)
    if len(link) != len(sets):
        raise ValueError(f"link has {len(link)} ids for {len(sets)} sets")
    g = min([groups, *sizes])
    if g < 2:
        se = np.full(len(value), np.nan) if vector else math.nan
    else:
        rng = np.random.default_rng(seed)
        split: dict[int, np.ndarray] = {}
        for n, key in zip(sizes, link):
            if key not in split:  # each row's unit: groups of near-equal size, one draw per id
                split[key] = rng.permutation(n) % g
            elif len(split[key]) != n:
                raise ValueError(f"linked sets must have equal lengths, got {len(split[key])} and {n}")
        unit = [split[key] for key in link]
        thetas = np.array([stat(*(_take(s, np.flatnonzero(u != i)) for s, u in zip(sets, unit)))
                           for i in range(g)], dtype=np.float64)
        se = np.sqrt((g - 1) / g * ((thetas - thetas.mean(axis=0)) ** 2).sum(axis=0))
    if vector:
        return np.asarray(value, dtype=np.float64), se
    return float(value), float(se)


@dataclass(frozen=True)
class Score:
    """One score of one set of samples, as data: ``stat(*samples, *reference)``.

    ``samples`` are per-sample arrays (row j of each is sample j: its features, its class
    probabilities, ...), ``reference`` the arrays of the set it is compared with (rows one item each;
    empty for a property of the samples alone). ``standard_error`` False: the score has none (a
    count). Built by a yardstick (:class:`ddpm.features.DigitsYardstick`,
    :class:`ddpm.pixel_scores.PixelYardstick`), read by :func:`score_value` and
    :func:`score_difference`.
    """

    stat: Callable[..., float]
    samples: tuple[Any, ...]
    reference: tuple[Any, ...] = ()
    standard_error: bool = True


def score_value(score: Score, groups: int = GROUPS, seed: int = 0) -> tuple[float, float]:
    """(value, jackknife standard error) of ``score``, the samples grouped together, the reference
    together (NaN without a standard error).

    ``groups`` is 40: with 10, a score's error depended on how the rows fell into groups, the more so
    for scores that are not smooth (k-NN, histograms). Measured on 500 noisy training digits against
    the 360 held-out ones, six grouping seeds: the largest error over the smallest was 1.7-3.2 with 10
    groups (classifier score 0.015 to 0.049) and 1.2-1.5 with 40, at about four times the compute
    (``benchmarks/bench_groups.py``; docs/RESULTS.md, "The yardstick").
    """
    sets = (*score.samples, *score.reference)
    if not score.standard_error:
        return float(score.stat(*sets)), math.nan
    link = [0] * len(score.samples) + [1] * len(score.reference)
    return jackknife(score.stat, *sets, groups=groups, seed=seed, link=link)


def score_values(scores: dict[str, Score], groups: int = GROUPS, seed: int = 0,
                 suffix: str = "") -> dict[str, float]:
    """``{name<suffix>: value, name<suffix>_se: standard error}`` of each score."""
    out: dict[str, float] = {}
    for name, score in scores.items():
        value, se = score_value(score, groups=groups, seed=seed)
        out.update({f"{name}{suffix}": value, f"{name}{suffix}_se": se})
    return out


def score_difference(a: Score, b: Score, paired: bool, groups: int = GROUPS,
                     seed: int = 0) -> tuple[float, float]:
    """``a`` minus ``b`` (the same score of two sample sets against one reference) and the
    jackknife standard error of the difference.

    ``groups`` is 40 (:data:`GROUPS`): a verdict divides by this error, and with 10 groups a k-NN
    score's error depended on how the rows fell into groups. Measured on two samplers'
    2000 digits against 360 held-out ones (precision, ``benchmarks/bench_calibration.py`` and
    docs/RESULTS.md): six ways of grouping the same samples gave 0.0077 to 0.0217 with 10 groups and
    0.0158 to 0.0190 with 40; KID 0.0058-0.0134 and 0.0090-0.0112.

    The reference's own noise is common to both, so it largely cancels: the difference is known
    far better than either score's standard error says. ``paired``: row j of ``a`` and of ``b`` come
    from the same noise seed (two samplers on one model), so they are left out together. ``a``'s
    ``stat`` and ``reference`` are used for both.
    """
    na, nb = len(a.samples), len(b.samples)

    def diff(*sets: Any) -> float:
        ref = sets[na + nb:]
        return float(a.stat(*sets[:na], *ref)) - float(a.stat(*sets[na:na + nb], *ref))

    sets = (*a.samples, *b.samples, *a.reference)
    if not a.standard_error:
        return diff(*sets), math.nan
    link = [0] * na + [0 if paired else 2] * nb + [1] * len(a.reference)
    return jackknife(diff, *sets, groups=groups, seed=seed, link=link)


# -- nearest neighbours ------------------------------------------------------------------------


def _kth_nn_distance(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row ``[N]``."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {x.shape[0]}")
    out = []
    for i in range(0, x.shape[0], chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(out)


def _nn_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its nearest row of ``ref`` ``[N]``."""
    return torch.cat([torch.cdist(x[i:i + chunk], ref).min(dim=1).values
                      for i in range(0, x.shape[0], chunk)])


def _coverage(x: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of rows of ``x`` inside at least one ball (centre_j, radius_j)."""
    inside = [(torch.cdist(x[i:i + chunk], centres) <= radii[None]).any(dim=1)
              for i in range(0, x.shape[0], chunk)]
    return torch.cat(inside).double().mean().item()


# -- precision and recall ----------------------------------------------------------------------


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, section 2).

    Each set's manifold is the union of balls around its points, the radius of a ball being the
    distance to that point's k-th nearest neighbour in the same set (eq. 1).
    Precision is the share of fake points inside the real manifold; recall is the share of real
    points inside the fake manifold (eq. 2). Distances are Euclidean, computed in chunks of
    ``chunk`` rows.
    """
    real, fake = _as_2d_float64(real_feats), _as_2d_float64(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    precision = _coverage(fake, real, _kth_nn_distance(real, k, chunk), chunk)
    recall = _coverage(real, fake, _kth_nn_distance(fake, k, chunk), chunk)
    return precision, recall


# -- copy rate ---------------------------------------------------------------------------------


def copies(samples: Any, train: Any, test: Any, quantile: float = 0.05, chunk: int = 1024) -> torch.Tensor:
    """``[N]`` bool: sample i is nearer to the training set than real held-out images usually are.

    Definition (features or flattened pixels, Euclidean):

    1. d_test[j] = distance from real test image j to its nearest training image.
    2. tau = the ``quantile`` (default 5th percentile) of d_test, taken as an observed value
       (numpy ``method="lower"``), so ``quantile=0`` gives the smallest test-to-train distance.
    3. sample i is a copy when its nearest-training distance is <= tau.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    s, tr, te = _as_2d_float64(samples), _as_2d_float64(train), _as_2d_float64(test)
    if not s.shape[1] == tr.shape[1] == te.shape[1]:
        raise ValueError(f"sizes differ: samples {s.shape[1]}, train {tr.shape[1]}, test {te.shape[1]}")
    d_test = _nn_distance(te, tr, chunk).numpy()
    tau = np.quantile(d_test, quantile, method="lower")
    return _nn_distance(s, tr, chunk) <= tau


def copy_rate(samples: Any, train: Any, test: Any, quantile: float = 0.05, chunk: int = 1024) -> float:
    """Share of samples nearer to the training set than real held-out images usually are (:func:`copies`).

    A model that draws fresh images from the data distribution scores about ``quantile`` (real test
    images score exactly the share at or below tau); exact copies of training images score 1.0.
    """
    return copies(samples, train, test, quantile, chunk).double().mean().item()


# -- directions and result keys ----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    description: str


# What each score measures, by the way it is better.
LOWER_IS_BETTER = {
    "fd": "Frechet distance in the feature network's space",
    "kid": "kernel distance (unbiased MMD^2, cubic kernel) in the feature network's space",
    "class_tv": "total variation between the samples' and the reference's class histograms",
    "fid": "Inception-v3 Frechet distance (natural images)",
    "bpd": "held-out bits per dimension (variational bound)",
    "copy_rate": "share of samples nearer to training images than test images are",
    "sec_per_sample": "wall-clock seconds per generated sample",
    "pixel_fd": "Frechet distance in the whitened PCA space of the training images' pixels",
}
HIGHER_IS_BETTER = {
    "classifier_score": "exp E_x KL(p(y|x) || p(y)) of the feature classifier",
    "classes_covered": "classes holding at least half their reference share of samples",
    "precision": "share of samples inside the real manifold (k-NN, k=3)",
    "recall": "share of real images inside the sample manifold (k-NN, k=3)",
    "confidence": "mean max softmax probability of the feature classifier",
    "cond_accuracy": "share of class-conditional samples the feature classifier puts in the class asked for",
}
# Ratios to the real data's value: 1 is best, and 1/r is as far from it as r (compared in log terms).
BEST_AT_ONE = {
    "fine_spread": "samples' over held-out images' variance along the finer pixel-PCA components (geometric mean)",
    "class_spread": "class-conditional samples' spread about their class centroid in feature space over the "
                    "held-out images' of that class (geometric mean over classes)",
}
METRICS: dict[str, Metric] = {
    **{name: Metric(name, "lower", text) for name, text in LOWER_IS_BETTER.items()},
    **{name: Metric(name, "higher", text) for name, text in HIGHER_IS_BETTER.items()},
    **{name: Metric(name, "one", text) for name, text in BEST_AT_ONE.items()},
}

METRIC_DIRECTIONS: dict[str, Direction] = {name: m.direction for name, m in METRICS.items()}

_FLOOR_SUFFIX = "_floor"
_SE_SUFFIX = "_se"


def _strip_floor(name: str) -> str:
    if name.endswith(_FLOOR_SUFFIX) and name[: -len(_FLOOR_SUFFIX)] in METRIC_DIRECTIONS:
        return name[: -len(_FLOOR_SUFFIX)]
    return name


def _is_se(name: str) -> bool:
    return name.endswith(_SE_SUFFIX) and _strip_floor(name[: -len(_SE_SUFFIX)]) in METRIC_DIRECTIONS


def metric_name(key: str) -> str:
    """The metric a name or result key refers to: ``fd/sampler:ddim/...`` -> ``fd``;
    ``fd_floor`` -> ``fd`` (a floor has its metric's direction); ``kid_se``, ``kid_floor_se``
    -> ``kid`` (standard errors)."""
    name = key.split("/", 1)[0]
    if _is_se(name):
        name = name[: -len(_SE_SUFFIX)]
    return _strip_floor(name)


def direction(metric: str) -> Direction:
    """'lower', 'higher' or 'one' (nearest 1) is better for a metric name or result key (a standard
    error: lower)."""
    name = metric_name(metric)
    if name not in METRIC_DIRECTIONS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(sorted(METRIC_DIRECTIONS))}")
    return "lower" if _is_se(metric.split("/", 1)[0]) else METRIC_DIRECTIONS[name]


def badness(metric: str, value: float, se: float | None = None) -> tuple[float, float | None]:
    """``value`` (and its standard error ``se``) on a lower-is-better scale for ``metric``: itself
    for 'lower', its negative for 'higher', ``|log value|`` for 'one' (se / value by the delta
    method). Comparisons of any two results go through this one rule."""
    kind = direction(metric)
    if kind == "lower":
        return float(value), se
    if kind == "higher":
        return -float(value), se
    value = float(value)
    if not value > 0:  # a ratio of variances; 0 or less (or NaN) is as bad as it gets
        return (math.inf if value <= 0 else math.nan), None
    return abs(math.log(value)), (None if se is None else se / value)


def better(metric: str, a: float, b: float, min_delta: float = 0.0) -> bool:
    """True when ``a`` beats ``b`` on ``metric`` by strictly more than ``min_delta`` (on the
    :func:`badness` scale: for a 'one' metric, ``|log a|`` against ``|log b|``). A negative
    ``min_delta`` is a tolerance: ``a`` may then be worse than ``b`` by less than ``-min_delta``.

    ``metric`` is a name or a result key. A NaN on either side is never better.
    """
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return False
    (bad_a, _), (bad_b, _) = badness(metric, a), badness(metric, b)
    if math.isnan(bad_a) or math.isnan(bad_b) or (bad_a == bad_b and min_delta >= 0):
        return False
    return bad_b - bad_a > min_delta


_KEY_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _key_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int, float)):
        raise TypeError("result key values must be str, int, float, bool or None, "
                        f"got {type(value).__name__}")
    return str(value)


def result_key(metric: str, **depends_on: Any) -> str:
    """Canonical key of a result: the metric, then every dependency sorted by name.

    ``result_key("fd", sampler="ddim", steps=50, num=1000, data="3f2a", features="digits-cnn-v2")``
    -> ``"fd/data:3f2a/features:digits-cnn-v2/num:1000/sampler:ddim/steps:50"``.
    Keys and values may hold letters, digits, ``_ . -``; the result is a valid MLflow metric name.
    Results are comparable only when their keys are equal.
    """
    direction(metric)  # unknown metrics fail here
    parts = [metric]
    for name in sorted(depends_on):
        value = _key_value(depends_on[name])
        for piece in (name, value):
            if not _KEY_PART.match(piece):
                raise ValueError(f"result key part {piece!r} may only hold letters, digits, '_', '.', '-'")
        parts.append(f"{name}:{value}")
    return "/".join(parts)


def parse_result_key(key: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`result_key` (values come back as strings)."""
    metric, *rest = key.split("/")
    return metric, dict(part.split(":", 1) for part in rest)


# -- Inception FID (natural images) ------------------------------------------------------------

INCEPTION_WEIGHTS_HINT = (
    "Inception FID needs the FID Inception-v3 weights as a local file (nothing is downloaded at "
    "run time): get 'pt_inception-2015-12-05-6726825d.pth' (from the torch-fidelity / pytorch-fid "
    "releases) on a machine with network access, copy it here and pass its path; it also needs "
    "'pip install torchmetrics torch-fidelity'"
)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N x 3 x H x W]`` float in [-1, 1] (or uint8) -> uint8 in [0, 255], same layout."""
    from ddpm.image import to_levels

    return images if images.dtype == torch.uint8 else to_levels(images, 256)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path | None,
                  batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Inception-v3 FID (2048-d pool features) between two image sets, via torchmetrics.

    ``real`` and ``fake`` are ``[N x 3 x H x W]``, float in [-1, 1] or uint8. ``weights_path`` is
    the local FID Inception weights file; without it, or without torchmetrics, a clear error says
    how to supply them.
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(f"no Inception weights at {weights_path!r}. {INCEPTION_WEIGHTS_HINT}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(f"torchmetrics is not installed. {INCEPTION_WEIGHTS_HINT}") from e
    fid = FrechetInceptionDistance(feature=2048, normalize=False,
                                   feature_extractor_weights_path=str(weights_path)).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            fid.update(_to_uint8(images[i:i + batch_size]).to(device), real=is_real)
    return float(fid.compute())


__all__ = [
    "BEST_AT_ONE", "GROUPS", "INCEPTION_WEIGHTS_HINT", "METRICS", "METRIC_DIRECTIONS", "Metric", "Score", "badness",
    "better", "class_histogram", "class_tv", "classes_covered", "classifier_score", "copies", "copy_rate", "direction", "feature_stats",
    "frechet_distance", "frechet_distance_from_features", "inception_fid", "jackknife", "kernel_distance",
    "metric_name", "parse_result_key", "polynomial_kernel", "precision_recall", "result_key", "score_difference",
    "score_value", "score_values",
]
