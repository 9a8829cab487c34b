"""Metric functions against scikit-learn and slow reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from diffqc import metrics as M


def _data(seed: int, n: int = 120, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_ranking_metrics_match_sklearn(seed: int, ties: bool) -> None:
    y, s = _data(seed, ties=ties)
    assert M.image_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.aupr(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    prec, rec, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * prec * rec / (prec + rec))
    assert M.f1_max(y, s) == pytest.approx(f1.max(), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    for target in (0.0, 0.05, 0.1, 0.5):
        assert M.tpr_at_fpr(y, s, target) == pytest.approx(tpr[fpr <= target].max(), abs=1e-12)
    rf, rt = M.roc_points(y, s)
    assert M.image_auroc(y, s) == pytest.approx(np.trapezoid(rt, rf), abs=1e-12)


def test_lists_accepted_and_known_values() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert M.image_auroc(y, s) == pytest.approx(0.75)
    assert M.aupr(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert M.f1_max(y, s) == pytest.approx(0.8)  # threshold 0.35: tp=2, fp=1
    assert M.tpr_at_fpr(y, s, 0.05) == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_missing_class_gives_nan(labels: list[int]) -> None:
    s = np.linspace(0, 1, len(labels))
    for fn in (M.image_auroc, M.aupr, M.f1_max, M.tpr_at_fpr):
        assert math.isnan(fn(labels, s))
    assert all(math.isnan(v) for v in M.bootstrap_ci(labels, s, n_boot=10))
    masks = [np.zeros((4, 4), bool)]
    assert math.isnan(M.pixel_auroc(masks, [np.ones((4, 4))]))
    assert math.isnan(M.aupro(masks, [np.ones((4, 4))]))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="labels"):
        M.image_auroc([0, -1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="scores"):
        M.aupr([0, 1], [0.1])
    with pytest.raises(ValueError, match="shape"):
        M.pixel_auroc([np.zeros((4, 4))], [np.zeros((2, 2))])


def _masks_maps(seed: int, n: int = 6, h: int = 24) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        m = np.zeros((h, h), bool)
        if i % 2:
            r, c = rng.integers(0, h - 8, 2)
            m[r : r + rng.integers(2, 8), c : c + rng.integers(2, 8)] = True
            m[1:3, 1:3] = i % 4 == 1  # a second, small region in some images
        amap = rng.normal(size=(h, h)) + 1.5 * m
        masks.append(m)
        maps.append(np.round(amap, 1) if i == 3 else amap)
    return masks, maps


def test_pixel_auroc_matches_sklearn_and_subsamples_deterministically() -> None:
    masks, maps = _masks_maps(0)
    y = np.concatenate([m.ravel() for m in masks]).astype(int)
    s = np.concatenate([a.ravel() for a in maps])
    assert M.pixel_auroc(masks, maps) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    arr_masks, arr_maps = np.stack(masks), np.stack(maps)
    assert M.pixel_auroc(arr_masks, arr_maps) == pytest.approx(skm.roc_auc_score(y, s))
    big_masks, big_maps = [np.kron(m, np.ones((8, 8), bool)) for m in masks], [
        np.kron(a, np.ones((8, 8))) + 0.1 * np.random.default_rng(1).normal(size=(192, 192))
        for a in maps]
    full = M.pixel_auroc(big_masks, big_maps)
    sub1 = M.pixel_auroc(big_masks, big_maps, max_pixels=50_000, seed=3)
    sub2 = M.pixel_auroc(big_masks, big_maps, max_pixels=50_000, seed=3)
    assert sub1 == sub2 != full
    assert sub1 == pytest.approx(full, abs=0.02)


def _aupro_reference(masks: list[np.ndarray], maps: list[np.ndarray], limit: float) -> float:
    """Slow: one pass over the images per distinct threshold, then a clipped trapezoid."""
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions.append([lab == r for r in range(1, n + 1)])
    neg = sum(int((~m).sum()) for m in masks)
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        hits = [a >= t for a in maps]
        fprs.append(sum(int((h & ~m).sum()) for h, m in zip(hits, masks, strict=True)) / neg)
        overlaps = [(h & r).sum() / r.sum()
                    for h, rs in zip(hits, regions, strict=True) for r in rs]
        pros.append(float(np.mean(overlaps)))
    f, p = np.array(fprs), np.array(pros)
    keep = f <= limit
    fk, pk = f[keep], p[keep]
    nxt = int(np.argmax(f > limit)) if (f > limit).any() else None
    if nxt is not None:
        p_at = np.interp(limit, [f[nxt - 1], f[nxt]], [p[nxt - 1], p[nxt]])
        fk, pk = np.r_[fk, limit], np.r_[pk, p_at]
    return float(np.trapezoid(pk, fk) / limit)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(seed: int, limit: float) -> None:
    masks, maps = _masks_maps(seed, n=4, h=16)
    assert M.aupro(masks, maps, limit) == pytest.approx(_aupro_reference(masks, maps, limit),
                                                        abs=1e-9)


def test_aupro_perfect_and_region_weighting() -> None:
    m = np.zeros((10, 10), bool)
    m[0:2, 0:2] = True  # small region: 4 pixels
    m[5:10, 5:10] = True  # large region: 25 pixels
    perfect = m.astype(float)
    assert M.aupro([m], [perfect]) == pytest.approx(1.0)
    # Detect only the large region: PRO is 0.5 (regions count equally), not 25/29.
    half = np.zeros((10, 10))
    half[5:10, 5:10] = 1.0
    fpr, pro = M.pro_curve([m], [half])
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_bootstrap_ci_stratified_and_deterministic() -> None:
    y, s = _data(4)
    seen: list[tuple[int, int]] = []

    def counting_auroc(labels: object, scores: object) -> float:
        lab = np.asarray(labels)
        seen.append((int(lab.sum()), lab.size))
        return M.image_auroc(lab, np.asarray(scores))

    est, lo, hi = M.bootstrap_ci(y, s, counting_auroc, n_boot=200, seed=1)
    assert est == pytest.approx(skm.roc_auc_score(y, s))
    assert lo < est < hi
    assert set(seen) == {(int(y.sum()), y.size)}  # every replicate keeps the class counts
    assert M.bootstrap_ci(y, s, n_boot=200, seed=1) == (est, lo, hi)
    assert M.bootstrap_ci(y, s, n_boot=200, seed=2) != (est, lo, hi)


def test_decision_metrics_hand_example() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1]
    decisions = ["PASS", "PASS", "review", "REJECT", "REJECT", "REVIEW", "PASS"]
    d = M.decision_metrics(labels, decisions)
    assert d["n"] == 7 and d["n_good"] == 4 and d["n_defective"] == 3
    assert d["fpr_reject"] == pytest.approx(1 / 4)
    assert d["fpr_flagged"] == pytest.approx(2 / 4)
    assert d["recall_reject"] == pytest.approx(1 / 3)
    assert d["recall_flagged"] == pytest.approx(2 / 3)
    assert d["accuracy_reject"] == pytest.approx((3 + 1) / 7)
    assert d["accuracy_flagged"] == pytest.approx((2 + 2) / 7)
    assert (d["share_pass"], d["share_review"], d["share_reject"]) == pytest.approx(
        (3 / 7, 2 / 7, 2 / 7))


def test_decision_metrics_missing_class_and_bad_decision() -> None:
    d = M.decision_metrics([0, 0], ["PASS", "REJECT"])
    assert math.isnan(d["recall_reject"]) and math.isnan(d["recall_flagged"])
    assert d["fpr_reject"] == 0.5 and d["accuracy_reject"] == 0.5
    empty = M.decision_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["share_pass"]) and math.isnan(empty["fpr_reject"])
    with pytest.raises(ValueError, match="unknown decision"):
        M.decision_metrics([0], ["MAYBE"])


def test_parts_of_several_types_are_judged_by_their_worst_image() -> None:
    """Where the data names parts (a manifest's part_id) seen as images of several types, a part
    is judged as the service judges it, by the worst of its images' decisions: a GOOD part is
    flagged when any of its images is, so more often than each type's GOOD images are."""
    rows = [  # part, type, label, decision
        ("P1", "a", 0, "PASS"), ("P1", "b", 0, "REVIEW"),
        ("P2", "a", 0, "REJECT"), ("P2", "b", 0, "PASS"),
        ("P3", "a", 0, "PASS"), ("P3", "b", 0, "PASS"),
        ("P4", "a", 0, "PASS"), ("P4", "b", 0, "PASS"),
        ("D1", "a", 0, "PASS"), ("D1", "b", 1, "REVIEW"),
        ("D2", "a", 1, "PASS"), ("D2", "b", 0, "PASS"),
    ]
    parts, types, labels, decisions = (list(c) for c in zip(*rows, strict=True))
    rates = M.part_decision_metrics(parts, types, labels, decisions)
    assert rates is not None
    assert (rates["good"], rates["defective"], rates["types"], rates["fewest_types"]) == (4, 2, 2, 2)
    assert (rates["good_flagged"], rates["good_rejected"], rates["recall"]) == (0.5, 0.25, 0.5)
    # images of one type each, or no part ids: nothing to say of parts
    assert M.part_decision_metrics(parts[::2], types[::2], labels[::2], decisions[::2]) is None
    assert M.part_decision_metrics([None] * len(rows), types, labels, decisions) is None
