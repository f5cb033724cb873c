"""Closed-form checks of the sample-quality metrics, and the result-key/direction rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm import metrics


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# -- Frechet distance -------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_one_dimensional_is_squared_wasserstein():
    # W2^2 between N(m1, a^2) and N(m2, b^2) = (m1 - m2)^2 + (a - b)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5 ** 2)


def test_frechet_distance_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for d in (3, 16, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_distance_identical_stats_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    mu = rng.normal(size=32)
    feats = rng.normal(size=(10, 32))  # 10 points in 32-d: a rank-9 covariance
    sigma = np.cov(feats, rowvar=False)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(mu, _random_cov(rng, 32), mu, sigma) > 0


def test_frechet_distance_from_features_estimates_the_gaussian_distance():
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, size=(20_000, 4))
    b = rng.normal(1.0, 2.0, size=(20_000, 4))
    expected = 4 * 1.0 + 4 * (1.0 - 2.0) ** 2  # per dim: (dmu)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance_from_features(a, torch.from_numpy(b)) == pytest.approx(expected, rel=0.03)
    mu, sigma = metrics.feature_stats(a)
    assert mu.shape == (4,) and sigma.shape == (4, 4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -- precision / recall ------------------------------------------------------------------------


def test_precision_recall_identical_distributions_near_one():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    p, r = metrics.precision_recall(real, fake, k=3, chunk=512)
    assert p > 0.9 and r > 0.9


def test_precision_recall_disjoint_clouds_are_zero():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g) + 100.0
    assert metrics.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_shrunk_fake_has_high_precision_low_recall():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(2000, 4, generator=g), 0.2 * torch.randn(2000, 4, generator=g)
    p, r = metrics.precision_recall(real, fake)
    assert p > 0.9 and r < 0.2


def test_precision_recall_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(300, 5, generator=g), 1.3 * torch.randn(250, 5, generator=g)
    assert metrics.precision_recall(real, fake, chunk=7) == metrics.precision_recall(real, fake, chunk=4096)


# -- copy rate ---------------------------------------------------------------------------------


def test_copy_rate_exact_copies_and_far_samples():
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(400, 1, 8, 8, generator=g), torch.randn(100, 1, 8, 8, generator=g)
    assert metrics.copy_rate(train[:50], train, test) == 1.0
    assert metrics.copy_rate(train[:50] + 50.0, train, test) == 0.0


def test_copy_rate_fresh_draws_score_about_the_quantile():
    g = torch.Generator().manual_seed(5)
    train, test = torch.randn(1000, 6, generator=g), torch.randn(500, 6, generator=g)
    fresh = torch.randn(2000, 6, generator=g)
    assert metrics.copy_rate(fresh, train, test, quantile=0.05) == pytest.approx(0.05, abs=0.03)
    assert metrics.copy_rate(test, train, test, quantile=0.2) == pytest.approx(0.2, abs=1 / 500)
    assert metrics.copy_rate(test, train, test, quantile=0.0) == pytest.approx(1 / 500)


# -- directions and keys -----------------------------------------------------------------------


def test_directions_and_better():
    assert metrics.METRIC_DIRECTIONS["fd"] == "lower" and metrics.METRIC_DIRECTIONS["recall"] == "higher"
    assert metrics.better("fd", 1.0, 2.0) and not metrics.better("fd", 2.0, 1.0)
    assert metrics.better("precision", 0.9, 0.8) and not metrics.better("precision", 0.8, 0.9)
    assert not metrics.better("fd", 1.0, 1.0)  # a tie is not better
    assert not metrics.better("fd", 1.9, 2.0, min_delta=0.5) and metrics.better("fd", 1.0, 2.0, min_delta=0.5)
    assert not metrics.better("bpd", math.nan, 2.0) and not metrics.better("bpd", 1.0, math.nan)
    # a negative min_delta is a tolerance: worse by less than it passes (a tie too), by more does not
    assert metrics.better("fd", 2.4, 2.0, min_delta=-0.5) and metrics.better("fd", 2.0, 2.0, min_delta=-0.5)
    assert not metrics.better("fd", 2.6, 2.0, min_delta=-0.5)
    assert not metrics.better("fd", math.nan, 2.0, min_delta=-0.5)
    key = metrics.result_key("copy_rate", num=100)
    assert metrics.better(key, 0.01, 0.2) and metrics.better("confidence_floor", 0.99, 0.9)
    with pytest.raises(ValueError, match="unknown metric 'fdd'; valid:"):
        metrics.better("fdd", 1.0, 2.0)


def test_result_key_is_canonical():
    deps = dict(sampler="ddim", steps=50, num=1000, data="3f2a9c", features="digits-cnn-v2")
    a = metrics.result_key("fd", **deps)
    b = metrics.result_key("fd", **dict(reversed(list({**deps, "num": 1000.0}.items()))))
    assert a == b == "fd/data:3f2a9c/features:digits-cnn-v2/num:1000/sampler:ddim/steps:50"
    assert a != metrics.result_key("fd", **{**deps, "steps": 20})
    assert metrics.result_key("bpd", eta=None, clip=True) == "bpd/clip:true/eta:none"
    assert metrics.parse_result_key(a) == ("fd", {"data": "3f2a9c", "features": "digits-cnn-v2",
                                                  "num": "1000", "sampler": "ddim", "steps": "50"})
    with pytest.raises(ValueError, match="may only hold"):
        metrics.result_key("fd", data="a/b")
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.result_key("nope", steps=1)


# -- Inception FID -----------------------------------------------------------------------------


def test_inception_fid_without_weights_says_how_to_supply_them(tmp_path):
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        metrics.inception_fid(images, images, weights_path=None)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        metrics.inception_fid(images, images, weights_path=tmp_path / "missing.pth")


def test_inception_fid_without_torchmetrics_says_how_to_install_it(tmp_path):
    try:
        import torchmetrics  # noqa: F401
        pytest.skip("torchmetrics is installed")
    except ImportError:
        pass
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torchmetrics"):
        metrics.inception_fid(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), weights_path=weights)


# -- kernel distance (KID) ---------------------------------------------------------------------


def test_kernel_distance_known_kernel_values():
    # D = 1, k(x, y) = (x y + 1)^3: k(0, 0) = 1, k(1, 1) = 8, k(0, 1) = 1 -> MMD^2 = 1 + 8 - 2 * 1.
    x, y = torch.zeros(2, 1), torch.ones(3, 1)
    assert metrics.kernel_distance(x, y) == pytest.approx(7.0)
    assert metrics.kernel_distance(x, x) == pytest.approx(0.0)  # every pair the same point
    assert metrics.polynomial_kernel(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.0]]))[0, 0] == 8.0


def test_kernel_distance_matches_the_double_sum():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert metrics.kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kernel_distance_estimates_the_population_mmd():
    # D = 1: (xy + 1)^3 = sum_j C(3, j) (xy)^j, so MMD^2 = 3 (dm1)^2 + 3 (dm2)^2 + (dm3)^2 with the
    # raw moments m_j. U(0, 1) against U(0.5, 1.5): m = (1/2, 1/3, 1/4) and (1, 13/12, 5/4)
    # -> 3/4 + 27/16 + 1 = 3.4375.
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(2000, 1, generator=g), torch.rand(2000, 1, generator=g) + 0.5
    assert metrics.kernel_distance(x, y) == pytest.approx(3.4375, rel=0.05)


def test_kernel_distance_is_unbiased_where_the_plug_in_estimate_is_not():
    g = torch.Generator().manual_seed(8)
    draws = [(torch.rand(10, 4, generator=g), torch.rand(10, 4, generator=g)) for _ in range(400)]
    kid = np.array([metrics.kernel_distance(a, b) for a, b in draws])
    assert abs(kid.mean()) < 3 * kid.std() / np.sqrt(len(kid))  # same distribution: E = 0
    biased = np.array([(metrics.polynomial_kernel(a, a).mean() + metrics.polynomial_kernel(b, b).mean()
                        - 2 * metrics.polynomial_kernel(a, b).mean()).item() for a, b in draws])
    assert biased.mean() > 10 * biased.std() / np.sqrt(len(biased))  # the V-statistic's bias is visible


# -- standard errors ---------------------------------------------------------------------------


def test_jackknife_of_a_mean_is_the_textbook_standard_error():
    x = torch.from_numpy(np.random.default_rng(9).normal(size=40))
    value, se = metrics.jackknife(lambda v: v.mean().item(), x, groups=40)  # leave-one-out
    assert value == pytest.approx(x.mean().item())
    assert se == pytest.approx(x.std().item() / np.sqrt(40), rel=1e-10)
    _, nan = metrics.jackknife(lambda v: v.mean().item(), x[:1])
    assert math.isnan(nan)


def test_jackknife_standard_error_of_kid_matches_its_spread_over_draws():
    """With the default grouping (score_value's)."""
    g = torch.Generator().manual_seed(10)
    values, ses = [], []
    for _ in range(60):
        a, b = torch.randn(60, 4, generator=g), 1.3 * torch.randn(40, 4, generator=g)
        v, se = metrics.score_value(metrics.Score(metrics.kernel_distance, (a,), (b,)))
        values.append(v)
        ses.append(se)
    assert np.mean(ses) == pytest.approx(np.std(values), rel=0.35)


def test_linked_sets_are_left_out_together():
    x = torch.arange(20.0)
    seen = []

    def stat(a, b):
        seen.append((a.tolist(), b.tolist()))
        return float(a.sum() - b.sum())

    metrics.jackknife(stat, x, x.clone(), groups=5, link=[0, 0])
    assert all(a == b for a, b in seen[1:])  # row j of both sets in the same group: always equal
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.jackknife(stat, x, x[:10], link=[0, 0])


def _fd_score(a, ref):
    return metrics.Score(metrics.frechet_distance_from_features, (a,), (ref,))


def test_a_paired_difference_cancels_the_shared_reference_noise_and_matches_its_spread_over_draws():
    """Two samplers of one model (sample j of each from the same noise) scored against one small
    reference: the difference's jackknife standard error matches the spread of the difference over
    independent draws, and is far below the two scores' own standard errors combined."""
    g = torch.Generator().manual_seed(12)
    diffs, ses, separate = [], [], []
    for _ in range(80):
        z = torch.randn(300, 3, generator=g, dtype=torch.float64)
        a, b = z, z * torch.tensor([1.0, 1.0, 0.9], dtype=torch.float64)  # b: 10% less spread on one axis
        ref = torch.randn(60, 3, generator=g, dtype=torch.float64)
        d, se = metrics.score_difference(_fd_score(a, ref), _fd_score(b, ref), paired=True)
        assert d == pytest.approx(metrics.frechet_distance_from_features(a, ref)
                                  - metrics.frechet_distance_from_features(b, ref))
        diffs.append(d)
        ses.append(se)
        separate.append(math.hypot(metrics.score_value(_fd_score(a, ref))[1], metrics.score_value(_fd_score(b, ref))[1]))
    assert np.mean(ses) == pytest.approx(np.std(diffs), rel=0.35)
    assert np.mean(ses) < 0.25 * np.mean(separate)
    same = _fd_score(torch.randn(50, 2, generator=g), torch.randn(30, 2, generator=g))
    assert metrics.score_difference(same, same, paired=True) == (0.0, 0.0)


def test_jackknife_of_a_tuple_gives_arrays():
    g = torch.Generator().manual_seed(11)
    real, fake = torch.randn(50, 3, generator=g), torch.randn(40, 3, generator=g)
    value, se = metrics.jackknife(lambda f, r: metrics.precision_recall(r, f), fake, real)
    assert value.shape == se.shape == (2,) and (se > 0).all()
    assert tuple(value) == metrics.precision_recall(real, fake)


# -- classifier score and class coverage -------------------------------------------------------


def test_classifier_score_closed_forms():
    assert metrics.classifier_score(torch.full((30, 10), 0.1)) == pytest.approx(1.0)  # uniform
    assert metrics.classifier_score(torch.eye(10).repeat(3, 1)) == pytest.approx(10.0)  # one-hot, balanced
    assert metrics.classifier_score(torch.eye(10)[[4] * 20]) == pytest.approx(1.0)  # one class only
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # marginal (0.5, 0.5)
    assert metrics.classifier_score(p) == pytest.approx(math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2)))


def test_classifier_score_reads_low_on_few_samples_as_the_delta_method_says():
    """The plug-in marginal's entropy is biased low by about (1 / 2N) sum_k Var p_k(y|x) / p_k(y), so the
    score on N samples reads below the population's: compare scores only at equal N (the training
    log's 256-sample probe against a 2000-sample bench is not a comparison). Known population: ten
    balanced classes, p(y|x) = 0.98 on the own class, 0.02 / 9 on each other."""
    K, hit = 10, 0.98
    miss = (1 - hit) / (K - 1)
    population = math.exp(hit * math.log(hit * K) + (1 - hit) * math.log(miss * K))  # marginal uniform
    var_over_mean = K * ((hit**2 / K + (K - 1) * miss**2 / K) - 1 / K**2) / (1 / K)  # sum_k Var p_k / p_k
    g = torch.Generator().manual_seed(0)

    def mean_score(n: int, draws: int) -> float:
        out = []
        for _ in range(draws):
            y = torch.randint(0, K, (n,), generator=g)
            p = torch.full((n, K), miss, dtype=torch.float64)
            p[torch.arange(n), y] = hit
            out.append(metrics.classifier_score(p))
        return float(np.mean(out))

    small, large = mean_score(256, 200), mean_score(8000, 10)
    assert small == pytest.approx(population * math.exp(-var_over_mean / (2 * 256)), rel=3e-3)
    assert small < population * 0.985  # 1.7% low at 256
    assert large == pytest.approx(population, rel=1.5e-3)


def test_class_coverage():
    ref = np.repeat(np.arange(10), 20)  # balanced
    assert metrics.class_tv(ref, ref, 10) == 0.0 and metrics.classes_covered(ref, ref, 10) == 10
    single = np.full(50, 3)
    assert metrics.class_tv(single, ref, 10) == pytest.approx(0.9)
    assert metrics.classes_covered(single, ref, 10) == 1
    half = np.repeat(np.arange(5), 4)  # classes 0-4 only
    assert metrics.class_tv(half, ref, 10) == pytest.approx(0.5)
    assert metrics.classes_covered(half, ref, 10) == 5
    skewed = np.concatenate([np.repeat(np.arange(10), 2), np.zeros(100, dtype=int)])  # 1/60 of each other
    assert metrics.classes_covered(skewed, ref, 10) == 1  # below half their share (0.05)


def test_standard_errors_and_new_metrics_have_directions():
    assert metrics.direction("kid") == "lower" and metrics.direction("classifier_score") == "higher"
    assert metrics.direction("class_tv") == "lower" and metrics.direction("classes_covered") == "higher"
    key = metrics.result_key("classifier_score_se", num=10)
    assert metrics.direction(key) == "lower" and metrics.metric_name(key) == "classifier_score"
    assert metrics.metric_name("kid_floor_se/num:10") == "kid" and metrics.direction("kid_floor_se") == "lower"
    assert metrics.direction("recall_floor") == "higher"
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.direction("nope_se")


def test_a_differences_error_hardly_depends_on_how_rows_fall_into_groups():
    """Precision (a k-NN score, not smooth) of two paired sample sets against one small reference:
    the standard error score_difference gives varies with the jackknife's grouping seed, much less
    with the default 40 groups than with 10."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    a, b, ref = z, z * 1.1, torch.randn(180, 4, generator=g, dtype=torch.float64)

    def score(x):
        return metrics.Score(lambda fake, real: metrics.precision_recall(real, fake)[0], (x,), (ref,))

    def spread(**groups):
        ses = [metrics.score_difference(score(a), score(b), paired=True, seed=s, **groups)[1] for s in range(6)]
        return (max(ses) - min(ses)) / np.mean(ses)

    assert metrics.GROUPS == 40
    assert spread() < 0.5 * spread(groups=10)


def test_a_scores_error_hardly_depends_on_how_rows_fall_into_groups():
    """Precision of 500 samples against 360 reference rows (the digits yardstick's sizes), four
    draws: the standard error score_value gives varies with the grouping seed less with the default
    40 groups than with 10. The jackknife's error of its error falls as 1 / sqrt(G - 1), by 0.48
    from 10 groups to 40 (measured 0.31-0.85 on single draws of 10 seeds; pooled over four, the
    test's margin is about three times the pooled ratio's own noise)."""
    g = torch.Generator().manual_seed(5)
    draws = [(1.1 * torch.randn(500, 4, generator=g, dtype=torch.float64),
              torch.randn(360, 4, generator=g, dtype=torch.float64)) for _ in range(4)]

    def variation(**groups) -> float:  # root-mean-square over draws of the errors' coefficient of variation
        cv2 = []
        for x, ref in draws:
            score = metrics.Score(lambda fake, real: metrics.precision_recall(real, fake)[0], (x,), (ref,))
            ses = [metrics.score_value(score, seed=s, **groups)[1] for s in range(10)]
            cv2.append((np.std(ses) / np.mean(ses)) ** 2)
        return float(np.sqrt(np.mean(cv2)))

    assert variation() < 0.7 * variation(groups=10)
