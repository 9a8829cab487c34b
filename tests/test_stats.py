"""DeLong against a slow structural-components reference; Holm by hand; the t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from diffqc import stats as S


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _delong_reference(
    labels: np.ndarray, score_sets: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """O(m n) DeLong (1988): structural components V10 / V01 from the kernel psi."""
    pos_idx = np.flatnonzero(labels == 1)
    neg_idx = np.flatnonzero(labels == 0)
    m, n = pos_idx.size, neg_idx.size
    r = len(score_sets)
    v10 = np.zeros((r, m))
    v01 = np.zeros((r, n))
    for k, s in enumerate(score_sets):
        for i, pi in enumerate(pos_idx):
            for j, nj in enumerate(neg_idx):
                v = _psi(s[pi], s[nj])
                v10[k, i] += v / n
                v01[k, j] += v / m
    auc = v10.mean(axis=1)
    s10 = np.zeros((r, r))
    s01 = np.zeros((r, r))
    for a in range(r):
        for b in range(r):
            s10[a, b] = np.sum((v10[a] - auc[a]) * (v10[b] - auc[b])) / (m - 1)
            s01[a, b] = np.sum((v01[a] - auc[a]) * (v01[b] - auc[b])) / (n - 1)
    return auc, s10 / m + s01 / n


def _pair(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(40, int), np.ones(25, int)]
    a = rng.normal(size=y.size) + 1.0 * y
    b = 0.6 * a + 0.8 * rng.normal(size=y.size) + 0.3 * y  # correlated with a
    if ties:
        a, b = np.round(a), np.round(b, 1)
    return y, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_slow_reference(seed: int, ties: bool) -> None:
    y, a, b = _pair(seed, ties)
    auc_ref, cov_ref = _delong_reference(y, [a, b])
    auc, cov = S.delong_covariance(y, a, b)
    np.testing.assert_allclose(auc, auc_ref, atol=1e-12)
    np.testing.assert_allclose(cov, cov_ref, atol=1e-12)
    auc_a, auc_b, z, p = S.delong_test(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a))
    assert auc_b == pytest.approx(roc_auc_score(y, b))
    var = cov_ref[0, 0] + cov_ref[1, 1] - 2 * cov_ref[0, 1]
    z_ref = (auc_ref[0] - auc_ref[1]) / math.sqrt(var)
    assert z == pytest.approx(z_ref, rel=1e-9)
    assert p == pytest.approx(2 * sps.norm.sf(abs(z_ref)), rel=1e-9)


def test_delong_known_case_and_symmetry() -> None:
    y, a, b = _pair(5, False)
    _, _, z_ab, p_ab = S.delong_test(y, a, b)
    _, _, z_ba, p_ba = S.delong_test(list(y), list(b), list(a))
    assert z_ab == pytest.approx(-z_ba) and p_ab == pytest.approx(p_ba)
    assert S.delong_test(y, a, a)[2:] == (0.0, 1.0)
    perfect = y.astype(float)
    assert S.delong_test(y, perfect, perfect + 1.0)[2:] == (0.0, 1.0)


def test_delong_ci_and_degenerate_inputs() -> None:
    y, a, _ = _pair(3, False)
    auc_ref, cov_ref = _delong_reference(y, [a])
    auc, lo, hi = S.delong_ci(y, a)
    half = 1.959963984540054 * math.sqrt(cov_ref[0, 0])
    assert auc == pytest.approx(auc_ref[0])
    assert (lo, hi) == pytest.approx((auc_ref[0] - half, min(1.0, auc_ref[0] + half)))
    assert all(math.isnan(v) for v in S.delong_test([0, 0, 1], [1, 2, 3], [3, 2, 1]))
    assert all(math.isnan(v) for v in S.delong_ci([0, 0, 0], [1, 2, 3]))


def test_holm_hand_worked_example() -> None:
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone max 0.06
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(S.holm(p), [0.03, 0.06, 0.06, 0.02])


def test_holm_nan_cap_and_ties() -> None:
    p = [0.02, float("nan"), 0.5, 0.02]  # m = 3: 0.02*3=0.06, 0.02*2=0.04->0.06, 0.5*1 -> 0.5
    out = S.holm(p)
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], [0.06, 0.5, 0.06])
    np.testing.assert_allclose(S.holm([0.4, 0.6]), [0.8, 0.8])  # 0.6*1 < 0.8 -> monotone 0.8
    np.testing.assert_allclose(S.holm([0.7, 0.9, 0.8]), [1.0, 1.0, 1.0])  # capped
    assert S.holm([]).size == 0
    assert np.isnan(S.holm([float("nan")])).all()
    with pytest.raises(ValueError):
        S.holm([1.2])


def test_nadeau_bengio_hand_computation() -> None:
    d = np.array([0.02, 0.03, 0.01, 0.04, 0.025])
    k, n_train, n_test = 5, 400.0, 100.0
    t, p = S.nadeau_bengio_ttest(d, n_train, n_test)
    t_ref = d.mean() / math.sqrt((1 / k + n_test / n_train) * d.var(ddof=1))
    assert t == pytest.approx(t_ref)
    assert p == pytest.approx(2 * sps.t.sf(abs(t_ref), k - 1))
    plain = sps.ttest_1samp(d, 0.0)
    assert abs(t) < abs(plain.statistic) and p > plain.pvalue  # the correction is conservative
    assert t == pytest.approx(plain.statistic * math.sqrt((1 / k) / (1 / k + n_test / n_train)))


def test_nadeau_bengio_edge_cases() -> None:
    t, p = S.nadeau_bengio_ttest([0.1, float("nan"), 0.2, 0.15], 100, 25)  # NaN fold dropped
    t3, p3 = S.nadeau_bengio_ttest([0.1, 0.2, 0.15], 100, 25)
    assert (t, p) == (t3, p3)
    assert all(math.isnan(v) for v in S.nadeau_bengio_ttest([0.1], 100, 25))
    assert S.nadeau_bengio_ttest([0.0, 0.0, 0.0], 100, 25) == (0.0, 1.0)
    assert S.nadeau_bengio_ttest([0.1, 0.1, 0.1], 100, 25) == (math.inf, 0.0)
    with pytest.raises(ValueError):
        S.nadeau_bengio_ttest([0.1, 0.2], 0, 25)


def test_wilcoxon_cannot_reach_005_with_five_folds() -> None:
    """The reason the docstrings give for using the t-test."""
    res = sps.wilcoxon([0.1, 0.2, 0.3, 0.4, 0.5], method="exact")
    assert res.pvalue == pytest.approx(0.0625)


def test_cohens_d() -> None:
    d = [0.1, 0.3, 0.2, 0.4]
    assert S.cohens_d(d) == pytest.approx(np.mean(d) / np.std(d, ddof=1))
    assert math.isnan(S.cohens_d([0.1]))
    assert S.cohens_d([0.0, 0.0]) == 0.0


def test_binomial_interval_is_clopper_pearsons() -> None:
    """The exact (Clopper-Pearson) interval of a rate from k of n, against published values
    (Clopper & Pearson 1934; e.g. 5 of 10: 0.187-0.813), and its edges: 0 of n starts at 0,
    n of n ends at 1, 0 of 0 says nothing."""
    from diffqc.stats import binomial_interval

    assert binomial_interval(5, 10) == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert binomial_interval(0, 1) == pytest.approx((0.0, 0.975))
    assert binomial_interval(1, 1) == pytest.approx((0.025, 1.0))
    assert binomial_interval(0, 20) == pytest.approx((0.0, 0.1684), abs=1e-4)  # a clean day of 20 GOOD
    assert binomial_interval(3, 100, level=0.9) == pytest.approx((0.0082, 0.0757), abs=1e-4)
    lo, hi = binomial_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


def test_tied_infinite_scores_are_one_tie() -> None:
    """Tie blocks were found by the differences of sorted scores, and inf - inf is NaN: tied
    infinite scores (a scorer's overflow, or a "certainly defective" given as inf) were ranked
    apart, so the DeLong AUROC, the precision-recall curve and the ROC points disagreed with the
    same ranking given in finite scores (0.667 against 0.778)."""
    from diffqc.metrics import aupr, image_auroc, roc_points

    y = np.array([0, 0, 0, 1, 1, 1])
    a = np.array([0.0, 1.0, np.inf, np.inf, np.inf, 2.0])
    f = np.where(np.isinf(a), 1e300, a)  # the same ranking, finite
    auc_a, auc_b, _, p = S.delong_test(y, a, f)
    assert auc_a == pytest.approx(roc_auc_score(y, f)) == pytest.approx(auc_b) and p == 1.0
    assert image_auroc(y, a) == pytest.approx(roc_auc_score(y, f))
    assert aupr(y, a) == pytest.approx(aupr(y, f))
    assert all(np.allclose(p, q) for p, q in zip(roc_points(y, a), roc_points(y, f), strict=True))
