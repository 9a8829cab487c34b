"""Evaluation metrics for good-only inspection: image-level, pixel-level and decision-level.

Conventions shared by every function here:

* ``labels`` are 0 (GOOD) / 1 (defective); any other value raises :class:`ValueError`.
* ``scores`` are anomaly scores, higher = more anomalous. NaN scores raise.
* Inputs may be numpy arrays or plain lists.
* A metric that needs both classes returns ``float('nan')`` when one is missing (or the
  input is empty) instead of raising, so a feature type without defective samples can be
  reported (and marked unreliable) rather than crash an evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.stats import rankdata

NAN = float("nan")

# Pixel metrics subsample (deterministically) above this many pixels.
MAX_PIXELS = 4_000_000

DECISIONS = ("PASS", "REVIEW", "REJECT")

Metric = Callable[[npt.ArrayLike, npt.ArrayLike], float]


# --------------------------------------------------------------------------- input checks


def as_labels(labels: npt.ArrayLike) -> np.ndarray:
    """Labels as an int64 vector of 0/1; raises on anything else (e.g. -1 = unknown)."""
    y = np.asarray(labels).reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted({str(v) for v in np.unique(y[~np.isin(y, (0, 1))])})
        raise ValueError(f"labels must be 0 (GOOD) or 1 (defective); got {', '.join(bad[:5])}")
    return y.astype(np.int64)


def as_scores(scores: npt.ArrayLike, n: int | None = None) -> np.ndarray:
    """Scores as a float64 vector; raises on NaN or a length mismatch."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if n is not None and s.size != n:
        raise ValueError(f"got {s.size} scores for {n} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _prepare(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(labels)
    return y, as_scores(scores, y.size)


def has_both_classes(labels: npt.ArrayLike) -> bool:
    """True when at least one GOOD and one defective label are present."""
    y = as_labels(labels)
    return bool(y.size) and 0 < int(y.sum()) < y.size


# --------------------------------------------------------------------------- image level


def _curve_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, threshold) at each distinct score.

    Thresholds run from the highest score down; a sample counts as positive when its
    score is >= the threshold, so tied scores enter together.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]  # inf - inf: NaN
    tps = np.cumsum(y_sorted)[ends].astype(np.float64)
    fps = (ends + 1).astype(np.float64) - tps
    return fps, tps, s_sorted[ends]


def roc_points(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct score.

    Empty arrays when a class is missing.
    """
    y, s = _prepare(labels, scores)
    if not has_both_classes(y):
        return np.zeros(0), np.zeros(0)
    fps, tps, _ = _curve_counts(y, s)
    n_pos = float(y.sum())
    return np.r_[0.0, fps / (y.size - n_pos)], np.r_[0.0, tps / n_pos]


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney statistic with midranks for ties)."""
    y, s = _prepare(labels, scores)
    if not has_both_classes(y):
        return NAN
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def aupr(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    y, s = _prepare(labels, scores)
    if not has_both_classes(y):
        return NAN
    fps, tps, _ = _curve_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Best F1 score over all thresholds (``score >= t`` counts as defective)."""
    y, s = _prepare(labels, scores)
    if not has_both_classes(y):
        return NAN
    fps, tps, _ = _curve_counts(y, s)
    f1 = 2.0 * tps / (tps + fps + float(y.sum()))
    return float(f1.max())


def tpr_at_fpr(labels: npt.ArrayLike, scores: npt.ArrayLike, fpr: float = 0.05) -> float:
    """Highest true-positive rate among thresholds whose false-positive rate is <= ``fpr``.

    No interpolation between ROC points: the value is achievable by an actual threshold.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    fprs, tprs = roc_points(labels, scores)
    if fprs.size == 0:
        return NAN
    return float(tprs[fprs <= fpr + 1e-12].max())


# --------------------------------------------------------------------------- pixel level


def _pixel_pairs(
    masks: Sequence[npt.ArrayLike] | np.ndarray, maps: Sequence[npt.ArrayLike] | np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks for {len(maps)} anomaly maps")
    pairs = []
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(m).astype(bool, copy=False)
        amap = np.asarray(a)  # no copy; converted per image when flattened
        if mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} != anomaly map shape {amap.shape} "
                "(resize the map to the mask first)"
            )
        if np.isnan(amap).any():
            raise ValueError(f"image {i}: anomaly map contains NaN")
        pairs.append((mask, amap))
    return pairs


def _keep_fraction(n_pixels: int, max_pixels: int) -> float:
    return 1.0 if n_pixels <= max_pixels else max_pixels / n_pixels


def _subsample(rng: np.random.Generator, size: int, rate: float) -> np.ndarray | slice:
    return slice(None) if rate >= 1.0 else np.flatnonzero(rng.random(size) < rate)


def pixel_auroc(
    masks: Sequence[npt.ArrayLike] | np.ndarray,
    maps: Sequence[npt.ArrayLike] | np.ndarray,
    *,
    max_pixels: int = MAX_PIXELS,
    seed: int = 0,
) -> float:
    """Pixel-level AUROC over all pixels of all images (masks: bool H x W, maps: H x W).

    Above ``max_pixels`` pixels in total, a seeded uniform subsample of about
    ``max_pixels`` pixels is used (same input and seed -> same value).
    NaN when no pixel (or every pixel) is defective.
    """
    pairs = _pixel_pairs(masks, maps)
    rate = _keep_fraction(sum(m.size for m, _ in pairs), max_pixels)
    rng = np.random.default_rng(seed)
    ys, ss = [], []
    for mask, amap in pairs:
        keep = _subsample(rng, mask.size, rate)
        ys.append(mask.reshape(-1)[keep])
        ss.append(amap.reshape(-1)[keep].astype(np.float64))
    if not ys:
        return NAN
    return image_auroc(np.concatenate(ys).astype(np.int64), np.concatenate(ss))


def _region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1 / (size of its ground-truth region), 0 outside; and the region count.

    Regions are 8-connected components of the mask.
    """
    regions, n_regions = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.reshape(-1), minlength=n_regions + 1).astype(np.float64)
    inv = np.zeros_like(sizes)
    inv[1:] = 1.0 / np.maximum(sizes[1:], 1.0)
    return inv[regions], n_regions


def pro_curve(
    masks: Sequence[npt.ArrayLike] | np.ndarray,
    maps: Sequence[npt.ArrayLike] | np.ndarray,
    *,
    max_pixels: int = MAX_PIXELS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve ``(fpr, pro)`` over all thresholds, from (0, 0).

    At a threshold t, PRO is the mean over every ground-truth region (8-connected
    component, pooled over all images) of the fraction of its pixels with map >= t; FPR is
    the fraction of defect-free pixels with map >= t. Empty arrays when there is no region
    or no defect-free pixel.
    """
    pairs = _pixel_pairs(masks, maps)
    rate = _keep_fraction(sum(m.size for m, _ in pairs), max_pixels)
    rng = np.random.default_rng(seed)
    scores, pro_w, neg_w = [], [], []
    for mask, amap in pairs:
        weights, _ = _region_weights(mask)
        keep = _subsample(rng, mask.size, rate)
        scores.append(amap.reshape(-1)[keep].astype(np.float64))
        pro_w.append(weights.reshape(-1)[keep])
        neg_w.append((~mask).reshape(-1)[keep].astype(np.float64))
    if not scores:
        return np.zeros(0), np.zeros(0)
    s, wp, wn = np.concatenate(scores), np.concatenate(pro_w), np.concatenate(neg_w)
    if wp.sum() <= 0 or wn.sum() <= 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    ends = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1]  # inf - inf: NaN
    fpr = np.cumsum(wn[order])[ends] / wn.sum()
    pro = np.cumsum(wp[order])[ends] / wp.sum()
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x ascending) on [x[0], x_max]."""
    k = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:k], y[:k]
    if k < x.size and xs.size:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    if xs.size < 2:
        return 0.0
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(
    masks: Sequence[npt.ArrayLike] | np.ndarray,
    maps: Sequence[npt.ArrayLike] | np.ndarray,
    fpr_limit: float = 0.3,
    *,
    max_pixels: int = MAX_PIXELS,
    seed: int = 0,
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (MVTec AD style).

    1.0 is perfect; NaN when the masks contain no defect region or no defect-free pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, max_pixels=max_pixels, seed=seed)
    if fpr.size == 0:
        return NAN
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    metric: Metric = image_auroc,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: percentile bootstrap CI of ``metric`` at level ``1 - alpha``.

    Stratified by class: GOOD and defective samples are resampled separately (with
    replacement) so every replicate keeps the original class counts. Deterministic for a
    given ``seed``. All three are NaN when a class is missing.
    """
    y, s = _prepare(labels, scores)
    if not has_both_classes(y):
        return NAN, NAN, NAN
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1; got {n_boot}, {alpha}")
    estimate = float(metric(y, s))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    y_boot = np.r_[np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)]
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        values[b] = metric(y_boot, s[idx])
    lo, hi = np.nanquantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(lo), float(hi)


# --------------------------------------------------------------------------- decision level


class DecisionMetrics(TypedDict):
    """Realised rates of the PASS / REVIEW / REJECT rule on labelled parts.

    Two readings of "flagged as defective", because REVIEW sends a part to a human:

    * ``*_reject``: only REJECT counts as a positive call.
    * ``*_flagged``: anything not PASS (REVIEW or REJECT) counts as a positive call.

    ``fpr_*`` = GOOD parts called positive / GOOD parts (NaN without GOOD parts);
    ``recall_*`` = defective parts called positive / defective parts (NaN without
    defective parts); ``accuracy_*`` = correct calls / all parts; ``share_*`` = fraction
    of all parts receiving that decision (NaN for an empty input).
    """

    n: int
    n_good: int
    n_defective: int
    fpr_reject: float
    fpr_flagged: float
    recall_reject: float
    recall_flagged: float
    accuracy_reject: float
    accuracy_flagged: float
    share_pass: float
    share_review: float
    share_reject: float


def as_decisions(decisions: Sequence[object] | np.ndarray) -> np.ndarray:
    """Decisions (strings, case-insensitive, or enums with a string ``value``) as 'PASS' etc."""
    out = np.asarray([str(getattr(d, "value", d)).strip().upper() for d in decisions], dtype=object)
    bad = sorted({str(d) for d in out if d not in DECISIONS})
    if bad:
        raise ValueError(f"unknown decision(s) {', '.join(bad[:5])}; expected PASS/REVIEW/REJECT")
    return out


def _rate(hits: np.ndarray, among: np.ndarray) -> float:
    n = int(among.sum())
    return float(hits[among].sum() / n) if n else NAN


def decision_metrics(
    labels: npt.ArrayLike, decisions: Sequence[object] | np.ndarray
) -> DecisionMetrics:
    """Realised FPR, recall, accuracy and decision shares; see :class:`DecisionMetrics`."""
    y = as_labels(labels)
    d = as_decisions(decisions)
    if d.size != y.size:
        raise ValueError(f"got {d.size} decisions for {y.size} labels")
    good, bad = y == 0, y == 1
    reject, flagged = d == "REJECT", d != "PASS"
    n = int(y.size)

    def share(word: str) -> float:
        return float(np.mean(d == word)) if n else NAN

    return DecisionMetrics(
        n=n,
        n_good=int(good.sum()),
        n_defective=int(bad.sum()),
        fpr_reject=_rate(reject, good),
        fpr_flagged=_rate(flagged, good),
        recall_reject=_rate(reject, bad),
        recall_flagged=_rate(flagged, bad),
        accuracy_reject=float(np.mean(reject == bad)) if n else NAN,
        accuracy_flagged=float(np.mean(flagged == bad)) if n else NAN,
        share_pass=share("PASS"),
        share_review=share("REVIEW"),
        share_reject=share("REJECT"),
    )


class PartRates(TypedDict):
    """Parts seen as images of several types, each judged by the worst of its images' decisions
    (the service's rule: a part is flagged when any of its images is)."""

    good: int  # parts all of whose images are GOOD
    defective: int  # parts with a defective image
    types: int  # the most types a part has images of
    fewest_types: int
    good_flagged: float  # share of GOOD parts with an image not PASSed (NaN without GOOD parts)
    good_rejected: float  # share of GOOD parts with an image REJECTed
    recall: float  # share of defective parts with an image not PASSed


def _parts(part_ids: Sequence[str | None]) -> dict[str, list[int]]:
    """Each part id's image indices (images without one left out)."""
    parts: dict[str, list[int]] = {}
    for i, part in enumerate(part_ids):
        if part:
            parts.setdefault(part, []).append(i)
    return parts


def types_per_part(part_ids: Sequence[str | None], types: Sequence[str]) -> int:
    """The most types a part has images of (0 without part ids)."""
    return max((len({types[i] for i in ids}) for ids in _parts(part_ids).values()), default=0)


def part_decision_metrics(
    part_ids: Sequence[str | None], types: Sequence[str], labels: npt.ArrayLike,
    decisions: Sequence[object] | np.ndarray,
) -> PartRates | None:
    """The images' ``decisions`` judged per part (:class:`PartRates`); images without a part id
    are left out. None where no part has images of two types (each image is then its own part,
    and :func:`decision_metrics` says it)."""
    y, d = as_labels(labels), as_decisions(decisions)
    if not len(part_ids) == len(types) == y.size == d.size:
        raise ValueError(f"got {len(part_ids)} part ids, {len(types)} types, {y.size} labels and "
                         f"{d.size} decisions")
    parts = _parts(part_ids)
    counts = [len({types[i] for i in ids}) for ids in parts.values()]
    if max(counts, default=0) < 2:
        return None
    good = [ids for ids in parts.values() if not y[ids].any()]
    bad = [ids for ids in parts.values() if y[ids].any()]

    def share(of: list[list[int]], hit: np.ndarray) -> float:
        return float(np.mean([hit[ids].any() for ids in of])) if of else NAN

    return PartRates(good=len(good), defective=len(bad), types=max(counts), fewest_types=min(counts),
                     good_flagged=share(good, d != "PASS"), good_rejected=share(good, d == "REJECT"),
                     recall=share(bad, d != "PASS"))
