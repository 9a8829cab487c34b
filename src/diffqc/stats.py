"""Statistical comparison of detectors: DeLong, corrected resampled t-test, Holm, effect size;
and the exact interval of a rate (:func:`binomial_interval`).

Two complementary tests compare method A with method B on one feature type:

* :func:`delong_test` on the pooled out-of-fold scores (both methods scored the same
  parts, so the two ROC curves are correlated; DeLong accounts for that).
* :func:`nadeau_bengio_ttest` on the per-fold metric differences. Fold results are not
  independent (training sets overlap), so the plain paired t-test is anti-conservative;
  Nadeau & Bengio (2003) inflate its variance by ``(1/k + n_test/n_train)``.

Why not the Wilcoxon signed-rank test over folds: with k = 5 folds the smallest
attainable exact two-sided p-value is 2 / 2**5 = 0.0625, so it can never reach p < 0.05
however large the difference. The corrected t-test has no such floor.

Across feature types the p-values of one comparison are corrected with :func:`holm`
(Holm's step-down procedure, not Holm-Sidak).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from diffqc.metrics import NAN, as_decisions, as_labels, as_scores, has_both_classes


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` interval of a rate seen as ``k`` of ``n`` (an FPR
    from the GOOD parts flagged, a recall from the defects caught): conservative, it holds its
    level for every n, where the normal approximation fails at the few parts and rates near 0
    that a line's test sets have. NaN, NaN for n = 0."""
    if n <= 0:
        return NAN, NAN
    tail = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(sps.beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k >= n else float(sps.beta.ppf(1.0 - tail, k + 1, n - k))
    return lo, hi


# fewer defective parts than this (per fold in `evaluate`, in all in `test`) make a type's recall
# and AUROC an anecdote: `evaluate` marks it UNRELIABLE, `test` names it with its intervals
MIN_DEFECTIVE_PER_FOLD = 5

# the rates a line acts on (:class:`diffqc.metrics.DecisionMetrics`' keys), given with their
# intervals by :func:`rate_intervals`
RATE_INTERVALS = ("fpr_reject", "fpr_flagged", "recall_reject", "recall_flagged")


def rate_intervals(labels: npt.ArrayLike, decisions: Sequence[object] | np.ndarray) -> dict[str, list[float]]:
    """The 95 % :func:`binomial_interval` of each of :data:`RATE_INTERVALS`, as the parts'
    decisions give them (labels 0 GOOD, 1 defective): how far a realised rate from these many parts
    says the line's rate (does a realised FPR of 3.8 % meet α = 5 %?)."""
    y, d = as_labels(labels), as_decisions(decisions)
    hits = {"reject": d == "REJECT", "flagged": d != "PASS"}
    out: dict[str, list[float]] = {}
    for key in RATE_INTERVALS:
        rate, _, level = key.partition("_")
        among = y == (0 if rate == "fpr" else 1)
        out[key] = list(binomial_interval(int(hits[level][among].sum()), int(among.sum())))
    return out


# --------------------------------------------------------------------------- DeLong


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]  # not np.diff: inf - inf is NaN
    ends = np.r_[starts[1:], n]
    mid = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranked = np.repeat(mid, ends - starts)
    out = np.empty(n, dtype=np.float64)
    out[order] = ranked
    return out


def _delong_components(
    pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and structural components for score rows ``pos`` [r, m], ``neg`` [r, n].

    Fast midrank formulation (Sun & Xu 2014): returns ``auc`` [r], ``v10`` [r, m] (one
    component per positive) and ``v01`` [r, n] (one per negative).
    """
    m, n = pos.shape[1], neg.shape[1]
    r = pos.shape[0]
    v10 = np.empty((r, m))
    v01 = np.empty((r, n))
    auc = np.empty(r)
    for i in range(r):
        tz = _midranks(np.r_[pos[i], neg[i]])
        tx, ty = _midranks(pos[i]), _midranks(neg[i])
        auc[i] = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[i] = (tz[:m] - tx) / n
        v01[i] = 1.0 - (tz[m:] - ty) / m
    return auc, v10, v01


def delong_covariance(
    labels: npt.ArrayLike, *score_sets: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [r] and their DeLong covariance matrix [r, r] for r score vectors on one label set.

    Raises ValueError when a class has fewer than two samples (the covariance is undefined).
    """
    y = as_labels(labels)
    rows = np.stack([as_scores(s, y.size) for s in score_sets])
    m, n = int(y.sum()), int((y == 0).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 samples per class; got {m} defective, {n} GOOD")
    auc, v10, v01 = _delong_components(rows[:, y == 1], rows[:, y == 0])
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return auc, s10 / m + s01 / n


def _enough_for_delong(labels: npt.ArrayLike) -> bool:
    y = as_labels(labels)
    return has_both_classes(y) and int(y.sum()) >= 2 and int((y == 0).sum()) >= 2


def delong_test(
    labels: npt.ArrayLike, scores_a: npt.ArrayLike, scores_b: npt.ArrayLike
) -> tuple[float, float, float, float]:
    """DeLong's test for two correlated ROC curves: ``(auc_a, auc_b, z, p)`` (two-sided).

    ``z = (auc_a - auc_b) / sqrt(var_a + var_b - 2 cov_ab)``. When that variance is zero
    (e.g. both curves perfect), z = 0 and p = 1 for equal AUCs, else z = +/-inf and p = 0.
    All NaN when a class has fewer than two samples.
    """
    if not _enough_for_delong(labels):
        return NAN, NAN, NAN, NAN
    auc, cov = delong_covariance(labels, scores_a, scores_b)
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= 1e-15:
        if abs(diff) <= 1e-12:
            return float(auc[0]), float(auc[1]), 0.0, 1.0
        return float(auc[0]), float(auc[1]), math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(var)
    return float(auc[0]), float(auc[1]), z, float(2.0 * sps.norm.sf(abs(z)))


def delong_ci(
    labels: npt.ArrayLike, scores: npt.ArrayLike, alpha: float = 0.05
) -> tuple[float, float, float]:
    """``(auc, low, high)``: normal-approximation CI from the DeLong variance, clipped to [0, 1]."""
    if not _enough_for_delong(labels):
        return NAN, NAN, NAN
    auc, cov = delong_covariance(labels, scores)
    half = float(sps.norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(max(float(cov[0, 0]), 0.0))
    a = float(auc[0])
    return a, max(0.0, a - half), min(1.0, a + half)


# --------------------------------------------------------------------------- fold-level tests


def _finite(values: npt.ArrayLike) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[~np.isnan(v)]


def nadeau_bengio_ttest(
    diffs_per_fold: npt.ArrayLike, n_train: float, n_test: float
) -> tuple[float, float]:
    """Corrected resampled t-test (Nadeau & Bengio 2003): ``(t, p)``, two-sided.

    ``diffs_per_fold`` holds metric(A) - metric(B) per fold (NaN folds are dropped);
    ``n_train`` / ``n_test`` are the (average) training and test set sizes per fold.
    ``t = mean(d) / sqrt((1/k + n_test/n_train) * var(d))`` with ``var`` the sample
    variance (ddof=1) and k - 1 degrees of freedom.

    With k = 5 folds an exact two-sided Wilcoxon signed-rank test can never reach
    p < 0.05 (its minimum is 0.0625), which is why this t-test is used instead.
    Zero variance: t = 0, p = 1 for a zero mean, else t = +/-inf and p = 0.
    NaN when fewer than two folds remain.
    """
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive; got {n_train}, {n_test}")
    d = _finite(diffs_per_fold)
    k = d.size
    if k < 2:
        return NAN, NAN
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    if var <= 1e-15:
        if abs(mean) <= 1e-12:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), 0.0
    t = mean / math.sqrt((1.0 / k + n_test / n_train) * var)
    return t, float(2.0 * sps.t.sf(abs(t), df=k - 1))


def cohens_d(diffs_per_fold: npt.ArrayLike) -> float:
    """Effect size of paired fold differences: Cohen's d_z = mean(d) / sd(d) (ddof=1).

    NaN folds are dropped; NaN for fewer than two folds; 0 / +/-inf for zero spread.
    """
    d = _finite(diffs_per_fold)
    if d.size < 2:
        return NAN
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-15:
        return 0.0 if abs(mean) <= 1e-12 else math.copysign(math.inf, mean)
    return mean / sd


# --------------------------------------------------------------------------- multiplicity


def holm(pvalues: npt.ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, p_(i) is adjusted to
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))`` (1-based), which is monotone and capped
    at 1. NaN inputs stay NaN and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if (p[~np.isnan(p)] < 0).any() or (p[~np.isnan(p)] > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, NAN)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="mergesort")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
