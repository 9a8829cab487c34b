"""Evaluation report: schema, builders for its parts, and writers (JSON, Markdown, HTML).

The report is one plain dict (:class:`Report`). ``evaluate.py`` fills it with the
builders below and :func:`write_report` writes three files into a folder:

* ``report.json``: the dict itself; every number the pages show. Non-finite numbers
  (NaN = undefined, e.g. AUROC of a type without defective samples) are stored as ``null``.
* ``report.md``: the tables and the notes as Markdown.
* ``report.html``: one self-contained page (inline CSS, plots as base64 PNG, no scripts,
  no external URL) that opens offline.

Every number in the HTML tables is rendered from the JSON-ready dict through
:func:`fmt` and sits in ``<span class="num" data-key="/json/pointer" data-fmt="kind">``,
so a test (or a reader) can check it against ``report.json``.

Schema (see the TypedDicts for the fields)::

    Report
      schema_version, title, created (ISO time)
      dataset: {name, source, feature_types: {type: {n_good, n_defective, n_groups}}}
      methods: [method, ...]
      folds: {k, seed, grouping}
      decision_rule: {alpha_review, alpha_reject}
      results: {type: {method: MethodResult}}
      overall: {method: MethodResult}           # all types pooled (optional)
      comparisons: [Comparison, ...]
      plots: {roc: {type: {method: RocCurve}},
              histograms: {type: {method: Histogram}},
              calibration: {method: Calibration},
              gallery: [GalleryItem, ...]}
      notes: [str, ...]

``MethodResult.pooled`` / ``folds[i]`` / ``summary`` use the keys of :data:`METRIC_KEYS`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from diffqc import metrics as M
from diffqc import stats as S
from diffqc.calibration import part_levels_text
from diffqc.data import check_outside_datasets
from diffqc.errors import OutputError
from diffqc.output import check_output_folder, path_text, write_atomic
from diffqc.visualize import is_strip

SCHEMA_VERSION = 1
OVERALL = "all types"

# metric key -> (column title, format kind)
METRICS: dict[str, tuple[str, str]] = {
    "auroc": ("AUROC", "num"),
    "aupr": ("AUPR", "num"),
    "f1_max": ("F1-max", "num"),
    "tpr_at_5fpr": ("TPR @ 5% FPR", "num"),
    "pixel_auroc": ("Pixel AUROC", "num"),
    "aupro": ("AUPRO (0.3)", "num"),
    "fpr_reject": ("FPR (REJECT)", "pct"),
    "fpr_flagged": ("FPR (not PASS)", "pct"),
    "recall_reject": ("Recall (REJECT)", "pct"),
    "recall_flagged": ("Recall (not PASS)", "pct"),
    "accuracy_reject": ("Accuracy (REJECT)", "pct"),
    "accuracy_flagged": ("Accuracy (not PASS)", "pct"),
    "share_pass": ("PASS", "pct"),
    "share_review": ("REVIEW", "pct"),
    "share_reject": ("REJECT", "pct"),
}
METRIC_KEYS: tuple[str, ...] = tuple(METRICS)
RANKING_KEYS = ("auroc", "aupr", "f1_max", "tpr_at_5fpr", "pixel_auroc", "aupro")
DECISION_KEYS = tuple(k for k in METRIC_KEYS if k not in RANKING_KEYS)
RATE_KEYS = tuple(k for k in DECISION_KEYS if not k.startswith("share_"))


# =========================================================================== schema


class TypeCounts(TypedDict):
    n_good: int
    n_defective: int
    n_groups: int


class DatasetInfo(TypedDict):
    name: str
    source: str
    feature_types: dict[str, TypeCounts]


class FoldInfo(TypedDict):
    k: int
    seed: int
    grouping: str  # e.g. "part_id from the manifest, else the source image"


class DecisionRule(TypedDict):
    alpha_review: float  # target FPR of "not PASS" (REVIEW or REJECT)
    alpha_reject: float  # target FPR of REJECT


class Summary(TypedDict):
    mean: float  # over folds where the metric is defined
    sd: float  # sample sd (ddof=1); NaN with fewer than 2 such folds
    n: int  # folds where the metric is defined


class MethodResult(TypedDict):
    """One method on one feature type (or on all types pooled)."""

    n_good: int
    n_defective: int
    defective_per_fold: list[int]
    unreliable: bool
    reason: str  # why it is unreliable; "" otherwise
    pooled: dict[str, float]  # METRIC_KEYS on the pooled out-of-fold scores / decisions
    auroc_ci: list[float]  # [low, high], stratified bootstrap 95% CI of pooled AUROC
    rate_ci: dict[str, list[float]]  # stats.RATE_INTERVALS: [low, high], 95% Clopper-Pearson; {} undecided
    folds: list[dict[str, float]]  # METRIC_KEYS per fold
    summary: dict[str, Summary]  # METRIC_KEYS: mean +- sd over folds


class Comparison(TypedDict):
    """Method A vs method B on one feature type; positive delta = A better."""

    feature_type: str
    method_a: str
    method_b: str
    metric: str  # fold metric compared by the t-test ("auroc")
    auroc_a: float  # pooled out-of-fold
    auroc_b: float
    delta: float  # auroc_a - auroc_b (pooled)
    delong_z: float
    delong_p: float
    delong_p_holm: float  # Holm over feature types, per (method_a, method_b, metric)
    fold_diffs: list[float]  # metric(A) - metric(B) per fold
    mean_diff: float
    nb_t: float
    nb_p: float
    nb_p_holm: float
    effect_size: float  # Cohen's d_z of fold_diffs
    n_train: float
    n_test: float


class DefectKindResult(TypedDict):
    """One method on one feature type's GOOD parts against one kind of its defects."""

    feature_type: str
    defect: str  # the manifest's defect name (MVTec layout: the test folder)
    method: str
    n_good: int
    n_defective: int
    auroc: float  # pooled out-of-fold scores: the type's GOOD parts vs this kind
    auroc_ci: list[float]  # [low, high], stratified bootstrap 95% CI
    recall_flagged: float  # share of this kind not PASSed at the decision rule
    recall_reject: float  # share of this kind REJECTed


class RocCurve(TypedDict):
    fpr: list[float]
    tpr: list[float]
    auroc: float


class Histogram(TypedDict):
    edges: list[float]  # bins + 1 edges
    good: list[int]  # counts of GOOD scores per bin
    defective: list[int]
    review_thresholds: list[float]  # score threshold of REVIEW, one per fold (may be empty)
    reject_thresholds: list[float]


class CalibrationLevel(TypedDict):
    name: str  # "REVIEW or REJECT (not PASS)" / "REJECT"
    alpha: float  # target FPR
    realised_fpr: float


class Calibration(TypedDict):
    alpha: list[float]  # target alpha grid (may be empty when no p-values were given)
    realised_fpr: list[float]  # fraction of GOOD parts with p <= alpha
    levels: list[CalibrationLevel]


class GalleryItem(TypedDict):
    feature_type: str
    method: str
    kind: str  # "missed defect" | "defect caught" | "false alarm" | "GOOD passed" (worst_misses)
    path: str
    label: int
    score: float
    decision: NotRequired[str]
    p_value: NotRequired[float]
    overlay_png: NotRequired[str]  # base64 PNG; write_report moves it to gallery/NNN.png
    overlay_path: NotRequired[str]  # or a PNG on disk (embedded into the HTML)
    overlay_file: NotRequired[str]  # set by write_report: path relative to the report folder


class Plots(TypedDict):
    roc: dict[str, dict[str, RocCurve]]
    histograms: dict[str, dict[str, Histogram]]
    calibration: dict[str, Calibration]
    gallery: list[GalleryItem]


class Report(TypedDict):
    schema_version: int
    title: str
    created: str
    dataset: DatasetInfo
    methods: list[str]
    folds: FoldInfo
    decision_rule: DecisionRule
    results: dict[str, dict[str, MethodResult]]
    overall: NotRequired[dict[str, MethodResult]]
    comparisons: list[Comparison]
    by_defect: NotRequired[list[DefectKindResult]]  # types with two or more defect kinds
    parts: NotRequired[dict[str, M.PartRates]]  # per method, where parts have images of several types
    plots: Plots
    notes: NotRequired[list[str]]


# =========================================================================== builders

MaskList = Sequence[np.ndarray | None]


PIXEL_MAX_SIDE = 256


def _resize_map(amap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``shape`` (H, W), as float32."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == shape:
        return amap
    if amap.ndim != 2 or len(shape) != 2:
        raise ValueError(f"cannot resize a map of shape {amap.shape} to {shape}")
    img = Image.fromarray(amap)  # float32 -> mode "F"
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _cap_mask(mask: np.ndarray, max_side: int | None) -> np.ndarray:
    """Nearest-neighbour downsizing of a bool mask so its long side is <= ``max_side``."""
    h, w = mask.shape
    if max_side is None or max(h, w) <= max_side:
        return mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(small) > 127


def _pixel_metrics(
    labels: np.ndarray,
    masks: MaskList | None,
    maps: Sequence[np.ndarray] | None,
    max_side: int | None = PIXEL_MAX_SIDE,
) -> tuple[float, float]:
    """Pixel AUROC and AUPRO over the images with a known mask (GOOD: all clean).

    A defective image whose mask is None is skipped; a GOOD one counts as all clean at
    the size of the first given mask (better: pass all-False masks of the image size,
    e.g. ``read_mask(None, (H, W))``). Masks larger than ``max_side`` on
    the long side are downsized (nearest) first, and each map is resized (bilinear) to its
    mask. NaN when no defective mask is left.
    """
    if masks is None or maps is None:
        return M.NAN, M.NAN
    known = [np.shape(m) for m in masks if m is not None]
    if not known:
        return M.NAN, M.NAN
    clean_shape = known[0]  # GOOD parts without a mask: all clean, at the masks' size
    ms, mps = [], []
    for y, mask, amap in zip(labels, masks, maps, strict=True):
        if mask is None and y == 1:
            continue
        if mask is None:
            mask = np.zeros(clean_shape, dtype=bool)
        mask = _cap_mask(np.asarray(mask, dtype=bool), max_side)
        ms.append(mask)
        mps.append(_resize_map(amap, mask.shape))
    if not any(m.any() for m in ms):
        return M.NAN, M.NAN
    return M.pixel_auroc(ms, mps), M.aupro(ms, mps)


def compute_metrics(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    decisions: Sequence[object] | np.ndarray | None = None,
    masks: MaskList | None = None,
    maps: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """All :data:`METRIC_KEYS` for one set of parts; NaN where undefined or not given.

    ``masks``/``maps`` (optional, per part): bool H x W masks (None = unknown for a
    defective part, all clean for a GOOD one) and anomaly maps (any size; resized to the
    mask). Pixel metrics are computed at most :data:`PIXEL_MAX_SIDE` px on the long side.
    """
    y, s = M.as_labels(labels), M.as_scores(scores)
    out = dict.fromkeys(METRIC_KEYS, M.NAN)
    out["auroc"] = M.image_auroc(y, s)
    out["aupr"] = M.aupr(y, s)
    out["f1_max"] = M.f1_max(y, s)
    out["tpr_at_5fpr"] = M.tpr_at_fpr(y, s, 0.05)
    if decisions is not None:
        dm = M.decision_metrics(y, decisions)
        for key in DECISION_KEYS:
            out[key] = float(dm[key])  # type: ignore[literal-required]
    out["pixel_auroc"], out["aupro"] = _pixel_metrics(y, masks, maps)
    return out


def summarise(per_fold: Sequence[dict[str, float]]) -> dict[str, Summary]:
    """Mean +- sd (ddof=1) over the folds where each metric is defined."""
    out: dict[str, Summary] = {}
    for key in METRIC_KEYS:
        v = np.array([f.get(key, M.NAN) for f in per_fold], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[key] = Summary(
            mean=float(v.mean()) if v.size else M.NAN,
            sd=float(v.std(ddof=1)) if v.size >= 2 else M.NAN,
            n=int(v.size),
        )
    return out


def reliability(
    n_good: int, defective_per_fold: Sequence[int], min_per_fold: int = S.MIN_DEFECTIVE_PER_FOLD
) -> tuple[bool, str]:
    """``(unreliable, reason)`` for a type given its GOOD count and defectives per fold."""
    n_def = int(sum(defective_per_fold))
    if n_def == 0:
        return True, ("no defective samples: AUROC, recall and all defect-based metrics "
                      "are undefined")
    if n_good == 0:
        return True, "no GOOD samples: FPR and AUROC are undefined"
    low = min(defective_per_fold) if defective_per_fold else 0
    if low < min_per_fold:
        return True, (
            f"only {n_def} defective samples ({low}-{max(defective_per_fold)} per fold; "
            f"fewer than {min_per_fold} in some folds): numbers are unstable"
        )
    return False, ""


def _fold_ids(fold_of: np.ndarray, k: int | None) -> list[int]:
    if k is not None:
        return list(range(k))
    return sorted(int(f) for f in np.unique(fold_of[fold_of >= 0]))


def _take(seq: Sequence[Any] | None, idx: np.ndarray) -> list[Any] | None:
    return None if seq is None else [seq[i] for i in idx]


def method_result(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    fold_of: npt.ArrayLike,
    decisions: Sequence[object] | np.ndarray | None = None,
    *,
    masks: MaskList | None = None,
    maps: Sequence[np.ndarray] | None = None,
    k: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_defective_per_fold: int = S.MIN_DEFECTIVE_PER_FOLD,
) -> MethodResult:
    """Per-fold, mean +- sd and pooled metrics of one method on one type's out-of-fold scores.

    ``fold_of`` gives each part's test fold (-1 = not evaluated). Pooled scores are only
    meaningful when scores from different folds are on one scale (e.g. calibrated).
    """
    y, s = M.as_labels(labels), M.as_scores(scores)
    f = np.asarray(fold_of, dtype=np.int64).reshape(-1)
    if f.size != y.size:
        raise ValueError(f"got {f.size} fold ids for {y.size} labels")
    d = None if decisions is None else M.as_decisions(decisions)
    per_fold = []
    for i in _fold_ids(f, k):
        idx = np.flatnonzero(f == i)
        per_fold.append(compute_metrics(
            y[idx], s[idx], None if d is None else d[idx], _take(masks, idx), _take(maps, idx)
        ))
    inside = np.flatnonzero(f >= 0)
    yi = y[inside]
    pooled = compute_metrics(
        yi, s[inside], None if d is None else d[inside], _take(masks, inside), _take(maps, inside)
    )
    _, lo, hi = M.bootstrap_ci(yi, s[inside], M.image_auroc, n_boot=n_boot, seed=seed)
    n_good = int((yi == 0).sum())
    def_per_fold = [int(((f == i) & (y == 1)).sum()) for i in _fold_ids(f, k)]
    unreliable, reason = reliability(n_good, def_per_fold, min_defective_per_fold)
    return MethodResult(
        n_good=n_good,
        n_defective=int(yi.sum()),
        defective_per_fold=def_per_fold,
        unreliable=unreliable,
        reason=reason,
        pooled=pooled,
        auroc_ci=[lo, hi],
        rate_ci={} if d is None else S.rate_intervals(yi, d[inside]),
        folds=per_fold,
        summary=summarise(per_fold),
    )


def defect_kind_results(
    feature_type: str,
    method: str,
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    defects: Sequence[str | None],
    decisions: Sequence[object] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[DefectKindResult]:
    """Per kind of defect of one type (``defects``: each defective part's kind, None unnamed;
    ignored for GOOD parts): the AUROC of the type's GOOD parts against that kind and its
    recall at the decision rule. Empty when the defective parts are of fewer than two kinds
    (one kind is the type's own result)."""
    y, s = M.as_labels(labels), M.as_scores(scores)
    if len(defects) != y.size:
        raise ValueError(f"got {len(defects)} defect kinds for {y.size} labels")
    d = None if decisions is None else M.as_decisions(decisions)
    kind = np.array(["unnamed" if k is None else str(k) for k in defects], dtype=object)
    kinds = sorted(set(kind[y == 1]))
    if len(kinds) < 2:
        return []
    good = y == 0
    out = []
    for name in kinds:
        idx = np.flatnonzero(good | ((y == 1) & (kind == name)))
        _, lo, hi = M.bootstrap_ci(y[idx], s[idx], M.image_auroc, n_boot=n_boot, seed=seed)
        rates = M.decision_metrics(y[idx], d[idx]) if d is not None else None
        out.append(DefectKindResult(
            feature_type=feature_type, defect=name, method=method, n_good=int(good.sum()),
            n_defective=int(idx.size - good.sum()), auroc=M.image_auroc(y[idx], s[idx]),
            auroc_ci=[lo, hi],
            recall_flagged=rates["recall_flagged"] if rates is not None else M.NAN,
            recall_reject=rates["recall_reject"] if rates is not None else M.NAN,
        ))
    return out


def compare_methods(
    feature_type: str,
    method_a: str,
    method_b: str,
    labels: npt.ArrayLike,
    scores_a: npt.ArrayLike,
    scores_b: npt.ArrayLike,
    fold_of: npt.ArrayLike,
    *,
    n_train: float | None = None,
    k: int | None = None,
    metric: M.Metric = M.image_auroc,
    metric_name: str = "auroc",
) -> Comparison:
    """DeLong on the pooled scores + Nadeau-Bengio over per-fold metric differences.

    ``n_train``: mean number of images each fold's model was fitted on (default: the
    other folds' size). Holm fields are NaN until :func:`apply_holm`.
    """
    y = M.as_labels(labels)
    a, b = M.as_scores(scores_a, y.size), M.as_scores(scores_b, y.size)
    f = np.asarray(fold_of, dtype=np.int64).reshape(-1)
    inside = f >= 0
    auc_a, auc_b, z, p = S.delong_test(y[inside], a[inside], b[inside])
    diffs, sizes = [], []
    for i in _fold_ids(f, k):
        idx = f == i
        sizes.append(int(idx.sum()))
        diffs.append(float(metric(y[idx], a[idx]) - metric(y[idx], b[idx])))
    n_test = float(np.mean(sizes)) if sizes else M.NAN
    if n_train is None:
        n_train = float(inside.sum()) - n_test
    t, p_nb = (M.NAN, M.NAN) if not sizes or n_train <= 0 else S.nadeau_bengio_ttest(
        diffs, n_train, n_test
    )
    finite = np.array(diffs, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return Comparison(
        feature_type=feature_type,
        method_a=method_a,
        method_b=method_b,
        metric=metric_name,
        auroc_a=auc_a,
        auroc_b=auc_b,
        delta=auc_a - auc_b,
        delong_z=z,
        delong_p=p,
        delong_p_holm=M.NAN,
        fold_diffs=diffs,
        mean_diff=float(finite.mean()) if finite.size else M.NAN,
        nb_t=t,
        nb_p=p_nb,
        nb_p_holm=M.NAN,
        effect_size=S.cohens_d(diffs),
        n_train=float(n_train),
        n_test=n_test,
    )


def apply_holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Holm-adjust DeLong and Nadeau-Bengio p-values across feature types.

    One family per (method_a, method_b, metric) pair; comparisons on :data:`OVERALL`
    are not part of any family and keep NaN adjusted p-values. Returns new dicts.
    """
    out = [Comparison(**c) for c in comparisons]
    families: dict[tuple[str, str, str], list[int]] = {}
    for i, c in enumerate(out):
        if c["feature_type"] != OVERALL:
            families.setdefault((c["method_a"], c["method_b"], c["metric"]), []).append(i)
    for members in families.values():
        for raw, adj in (("delong_p", "delong_p_holm"), ("nb_p", "nb_p_holm")):
            adjusted = S.holm([out[i][raw] for i in members])  # type: ignore[literal-required]
            for i, v in zip(members, adjusted, strict=True):
                out[i][adj] = float(v)  # type: ignore[literal-required]
    return out


def roc_entry(labels: npt.ArrayLike, scores: npt.ArrayLike, max_points: int = 200) -> RocCurve:
    """ROC points for plotting (thinned to about ``max_points``, endpoints kept) and the AUROC."""
    fpr, tpr = M.roc_points(labels, scores)
    if fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return RocCurve(fpr=fpr.tolist(), tpr=tpr.tolist(), auroc=M.image_auroc(labels, scores))


def histogram_entry(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    review_thresholds: Sequence[float] = (),
    reject_thresholds: Sequence[float] = (),
    bins: int = 30,
) -> Histogram:
    """Score histogram of GOOD vs defective parts on shared bins (covering the thresholds)."""
    y = M.as_labels(labels)
    s = M.as_scores(scores, y.size)
    marks = [float(t) for t in (*review_thresholds, *reject_thresholds) if math.isfinite(t)]
    values = np.r_[s, marks]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    return Histogram(
        edges=edges.tolist(),
        good=np.histogram(s[y == 0], edges)[0].tolist(),
        defective=np.histogram(s[y == 1], edges)[0].tolist(),
        review_thresholds=[float(t) for t in review_thresholds],
        reject_thresholds=[float(t) for t in reject_thresholds],
    )


def calibration_entry(
    labels: npt.ArrayLike,
    alpha_review: float,
    alpha_reject: float,
    *,
    p_values: npt.ArrayLike | None = None,
    decisions: Sequence[object] | np.ndarray | None = None,
    grid: Sequence[float] | None = None,
) -> Calibration:
    """Target alpha vs realised FPR on GOOD parts.

    The curve (needs ``p_values``): fraction of GOOD parts with ``p <= alpha`` over a grid.
    The two levels come from the actual ``decisions`` when given (authoritative), else
    from the p-values.
    """
    y = M.as_labels(labels)
    good = y == 0
    alphas = np.asarray(
        grid if grid is not None else np.round(np.linspace(0.0, 0.2, 41), 6), dtype=np.float64
    )
    curve: list[float] = []
    p = None
    if p_values is not None:
        p = np.asarray(p_values, dtype=np.float64).reshape(-1)
        pg = p[good]
        curve = [float(np.mean(pg <= a)) if pg.size else M.NAN for a in alphas]

    def realised(alpha: float, key: str) -> float:
        if decisions is not None:
            return float(M.decision_metrics(y, decisions)[key])  # type: ignore[literal-required]
        if p is not None and good.any():
            return float(np.mean(p[good] <= alpha))
        return M.NAN

    return Calibration(
        alpha=alphas.tolist() if p is not None else [],
        realised_fpr=curve,
        levels=[
            CalibrationLevel(name="REVIEW or REJECT (not PASS)", alpha=alpha_review,
                             realised_fpr=realised(alpha_review, "fpr_flagged")),
            CalibrationLevel(name="REJECT", alpha=alpha_reject,
                             realised_fpr=realised(alpha_reject, "fpr_reject")),
        ],
    )


def worst_misses(labels: npt.ArrayLike, scores: npt.ArrayLike, decisions: Sequence[str],
                 k: int = 4) -> list[tuple[int, str]]:
    """Indices of the ``k`` lowest-scored defective parts and the ``k`` highest-scored GOOD
    parts, worst first, each named by its decision: a "missed defect" passed, a "false alarm"
    was flagged; a "defect caught" or a "GOOD passed" is where the method's worst was right."""
    y = M.as_labels(labels)
    s = M.as_scores(scores, y.size)
    bad = np.flatnonzero(y == 1)
    good = np.flatnonzero(y == 0)
    missed = bad[np.argsort(s[bad], kind="mergesort")][:k]
    alarms = good[np.argsort(-s[good], kind="mergesort")][:k]
    return ([(int(i), "missed defect" if decisions[i] == "PASS" else "defect caught") for i in missed]
            + [(int(i), "GOOD passed" if decisions[i] == "PASS" else "false alarm") for i in alarms])


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_png_base64(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    opacity: float = 0.5,
    max_side: int = 256,
) -> str:
    """Base64 PNG of the image (H x W x 3 in [0, 1]) beside its heat-map overlay (a strip above
    it, :func:`diffqc.visualize.is_strip`).

    The image is first reduced to ``max_side`` on its long side (a camera's full frame would
    otherwise be coloured at full resolution, gigabytes for a 12-megapixel image); the map is
    resized to it and scaled to [vmin, vmax] (default: its own range; pass shared limits to make a
    gallery comparable).
    """
    from matplotlib import colormaps

    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        small = Image.fromarray((img * 255).round().astype(np.uint8)).resize(
            (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
            Image.Resampling.LANCZOS)
        img = (np.asarray(small, dtype=np.float32) / 255).astype(np.float32)
    amap = _resize_map(np.asarray(anomaly_map, dtype=np.float64), img.shape[:2])
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    norm = np.clip((amap - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    heat = colormaps["inferno"](norm)[:, :, :3]
    blend = (1.0 - opacity) * img + opacity * heat
    h, w = img.shape[:2]
    if is_strip(h, w):
        both = np.concatenate([img, np.ones((max(2, h // 8), w, 3)), blend], axis=0)
    else:
        both = np.concatenate([img, np.ones((h, max(2, w // 40), 3)), blend], axis=1)
    both = (both * 255).round().astype(np.uint8)
    return base64.b64encode(_png_bytes(both)).decode("ascii")


def new_report(
    *,
    dataset: DatasetInfo,
    methods: Sequence[str],
    folds: FoldInfo,
    decision_rule: DecisionRule,
    title: str = "diffqc evaluation report",
) -> Report:
    """An empty report with the required top-level keys filled in."""
    return Report(
        schema_version=SCHEMA_VERSION,
        title=title,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        dataset=dataset,
        methods=list(methods),
        folds=folds,
        decision_rule=decision_rule,
        results={},
        overall={},
        comparisons=[],
        plots=Plots(roc={}, histograms={}, calibration={}, gallery=[]),
        notes=[],
    )


# =========================================================================== serialisation

REQUIRED_KEYS = ("dataset", "methods", "folds", "decision_rule", "results", "comparisons", "plots")


def to_jsonable(obj: Any) -> Any:
    """Deep copy with numpy scalars/arrays and Paths converted; NaN and +-inf become None; text
    holding a file name that is not UTF-8 gets ``\\xNN`` for its undecodable bytes
    (:func:`diffqc.output.path_text`)."""
    if isinstance(obj, dict):
        return {path_text(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path | str):
        return path_text(obj)
    if obj is None:
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in report.json")


def has_pixel_metrics(report: Mapping[str, Any]) -> bool:
    """Whether some result of ``report`` has a pixel AUROC (some type had defect masks): the
    tables that quote it add its columns only then."""
    return any(isinstance(x := r["pooled"].get("pixel_auroc"), float) and math.isfinite(x)
               for per in report["results"].values() for r in per.values())


def fmt(value: Any, kind: str = "num") -> str:
    """The one number format of the report pages.

    ``num``: 3 decimals; ``signed``: 3 decimals with sign; ``p``: 3 decimals, below 0.001
    as ``<0.001``; ``pct``: percent with 1 decimal; ``int``: integer. None/NaN/inf: ``–``.
    """
    if value is None or isinstance(value, str):
        return "–" if value is None else value
    x = float(value)
    if not math.isfinite(x):
        return "–"
    if kind == "num":
        return f"{x:.3f}"
    if kind == "signed":
        return f"{x:+.3f}"
    if kind == "p":
        return "<0.001" if x < 0.001 else f"{x:.3f}"
    if kind == "pct":
        return f"{100.0 * x:.1f}%"
    if kind == "int":
        return str(round(x))
    raise ValueError(f"unknown number format {kind!r}")


def json_pointer(*parts: object) -> str:
    """RFC 6901 pointer to a value of report.json."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve_pointer(data: Any, pointer: str) -> Any:
    """The value at an RFC 6901 pointer (inverse of :func:`json_pointer`)."""
    node = data
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


# =========================================================================== plots

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
C_GOOD, C_DEFECT, C_REVIEW, C_REJECT = "#64748b", "#dc2626", "#d97706", "#7f1d1d"


def _style_axes(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)


def _figure_b64(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _color(methods: Sequence[str], method: str) -> str:
    i = list(methods).index(method) if method in methods else len(methods)
    return PALETTE[i % len(PALETTE)]


def plot_roc(title: str, curves: dict[str, Any], methods: Sequence[str]) -> str:
    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#9ca3af", linestyle=":", linewidth=1)
    for method, c in curves.items():
        if c["fpr"]:
            ax.plot(c["fpr"], c["tpr"], color=_color(methods, method), linewidth=1.6,
                    label=f"{method} ({fmt(c['auroc'])})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_title(title, fontsize=10, loc="left")
    _style_axes(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right", frameon=False, title="AUROC", title_fontsize=7)
    else:
        ax.text(0.5, 0.55, "no ROC curve:\nneeds GOOD and defective parts", ha="center",
                va="center", fontsize=8, color="#6b7280")
    return _figure_b64(fig)


def plot_histograms(title: str, hists: dict[str, Any]) -> str:
    n = max(1, len(hists))
    fig = Figure(figsize=(3.4 * n, 2.7))
    axes = [fig.add_subplot(1, n, j + 1) for j in range(n)]
    for j, (ax, (method, h)) in enumerate(zip(axes, hists.items(), strict=False)):
        edges = np.asarray(h["edges"], dtype=np.float64)
        good = np.asarray(h["good"], dtype=np.float64)
        bad = np.asarray(h["defective"], dtype=np.float64)
        ax.stairs(good, edges, fill=True, color=C_GOOD, alpha=0.45, label="GOOD")
        ax.stairs(bad, edges, color=C_DEFECT, linewidth=1.5, label="defective")
        for i, t in enumerate(h["review_thresholds"]):
            if t is not None:
                ax.axvline(t, color=C_REVIEW, linestyle="--", linewidth=0.9, alpha=0.8,
                           label="REVIEW threshold (per fold)" if i == 0 else None)
        for i, t in enumerate(h["reject_thresholds"]):
            if t is not None:
                ax.axvline(t, color=C_REJECT, linestyle="-", linewidth=0.9, alpha=0.8,
                           label="REJECT threshold (per fold)" if i == 0 else None)
        ax.set_title(f"{title} · {method}  (GOOD {int(good.sum())}, defective "
                     f"{int(bad.sum())})", fontsize=8.5, loc="left")
        ax.set_xlabel("anomaly score", fontsize=8)
        if j == 0:
            ax.set_ylabel("parts", fontsize=8)
        _style_axes(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _figure_b64(fig)


def plot_calibration(calib: dict[str, Any], methods: Sequence[str]) -> str:
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_subplot()
    top = 0.0
    for method, c in calib.items():
        color = _color(methods, method)
        pairs = [(a, r) for a, r in zip(c["alpha"], c["realised_fpr"], strict=True)
                 if r is not None]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            ax.plot(xs, ys, color=color, linewidth=1.5, label=f"{method}: p ≤ α")
            top = max(top, *xs, *ys)
        for level, marker in zip(c["levels"], ("o", "s"), strict=False):
            if level["alpha"] is not None and level["realised_fpr"] is not None:
                ax.plot(level["alpha"], level["realised_fpr"], marker=marker, markersize=7,
                        color=color, markeredgecolor="white", linestyle="none",
                        label=f"{method}: {level['name']}")
                top = max(top, level["alpha"], level["realised_fpr"])
    top = top * 1.1 if top > 0 else 0.2
    ax.plot([0, top], [0, top], color="#9ca3af", linestyle=":", linewidth=1, label="ideal")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="target α (false-positive rate)",
           ylabel="realised FPR on GOOD parts")
    _style_axes(ax)
    # beside the plot: curves above the diagonal (GOOD parts flagged too often) fill its upper left
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return _figure_b64(fig)


# =========================================================================== page rendering

CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;--accent:#1d4ed8;
--warn-bg:#fff7e6;--warn:#9a5b00;--bad:#b91c1c;--ok:#047857}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#0f172a;color:#f8fafc;padding:22px 32px 18px}
header h1{margin:0 0 6px;font-size:22px;font-weight:600;letter-spacing:.2px}
header .meta{color:#cbd5e1;font-size:13px}
header .meta span.item{margin-right:18px;white-space:nowrap}
nav{background:#1e293b;padding:8px 32px;font-size:13px}
nav a{color:#cbd5e1;text-decoration:none;margin-right:18px}
nav a:hover{color:#fff}
main{max-width:1400px;margin:0 auto;padding:20px 32px 40px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:18px 22px;margin:0 0 20px}
h2{font-size:17px;margin:0 0 4px;font-weight:600}
p.lead{color:var(--muted);margin:0 0 12px;font-size:13px}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top;text-align:left}
th{background:#f8fafc;color:#334155;font-weight:600;font-size:12px;position:sticky;top:0;
vertical-align:bottom}
th.n{text-align:right;white-space:normal}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover{background:#f8fafc}
tr.group-start td{border-top:2px solid #cbd5e1}
td .sub{display:block;color:var(--muted);font-size:11px}
tr.unreliable td{background:var(--warn-bg);color:#6b5b3e}
tr.overall td{background:#eef2ff}
.badge{display:inline-block;font-size:10.5px;font-weight:700;letter-spacing:.4px;
padding:1px 6px;border-radius:4px;margin-left:6px;vertical-align:1px}
.badge.warn{background:#f59e0b;color:#fff}
.badge.miss{background:var(--bad);color:#fff}
.badge.alarm{background:#d97706;color:#fff}
.badge.right{background:#64748b;color:#fff}
td.type{white-space:nowrap}
.sig{font-weight:700;color:var(--ok)}
.callout{border-left:4px solid #f59e0b;background:var(--warn-bg);padding:10px 14px;
margin:0 0 14px;border-radius:4px;font-size:13px}
.callout ul{margin:4px 0 0 18px;padding:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.grid.wide{grid-template-columns:repeat(auto-fill,minmax(min(100%,1120px),1fr))}
td.pair{white-space:nowrap}
figure{margin:0;text-align:center}
figure img{max-width:100%;height:auto}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.card{border:1px solid var(--line);border-radius:6px;overflow:hidden;background:#fff}
.card img{display:block;width:100%;height:auto;background:#111;image-rendering:auto}
.card .noimg{height:120px;display:flex;align-items:center;justify-content:center;
color:var(--muted);background:#f1f5f9;font-size:12px}
.card .cap{padding:8px 10px;font-size:12px}
.card .path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11px;
color:var(--muted);word-break:break-all}
dl.defs{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:12.5px;
margin:8px 0 0}
dl.defs dt{font-weight:600}
dl.defs dd{margin:0;color:#374151}
footer{color:var(--muted);font-size:12px;text-align:center;padding:10px 0 30px}
@media print{nav{display:none}section{break-inside:avoid}body{background:#fff}}
"""


class _Page:
    """Renders numbers of the JSON-ready report dict, in HTML spans or plain Markdown text."""

    def __init__(self, data: dict[str, Any], markdown: bool = False) -> None:
        self.data = data
        self.markdown = markdown

    def num(self, kind: str, *path: object) -> str:
        pointer = json_pointer(*path)
        text = fmt(resolve_pointer(self.data, pointer), kind)
        if self.markdown:
            return text
        return (f'<span class="num" data-key="{html.escape(pointer)}" data-fmt="{kind}">'
                f"{html.escape(text)}</span>")

    def pm(self, kind: str, *path: object) -> str:
        """``mean ± sd`` of a Summary at ``path``."""
        return f"{self.num(kind, *path, 'mean')} ± {self.num(kind, *path, 'sd')}"


def _esc(text: object) -> str:
    return html.escape(str(text))


def _rows(data: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(type, method, json path prefix) for every summary row: types, then all types."""
    rows: list[tuple[str, str, tuple[str, ...]]] = []
    for ftype, per_method in data["results"].items():
        for method in data["methods"]:
            if method in per_method:
                rows.append((ftype, method, ("results", ftype, method)))
    for method in data["methods"]:
        if method in (data.get("overall") or {}):
            rows.append((OVERALL, method, ("overall", method)))
    return rows


def _metric_cell(page: _Page, prefix: tuple[str, ...], key: str, kind: str) -> str:
    main = page.num(kind, *prefix, "pooled", key)
    extra = ""
    if key == "auroc":
        ci = resolve_pointer(page.data, json_pointer(*prefix, "auroc_ci"))
        interval = (f'{page.num(kind, *prefix, "auroc_ci", 0)}–'
                    f'{page.num(kind, *prefix, "auroc_ci", 1)}' if ci[0] is not None
                    else page.num(kind, *prefix, "auroc_ci", 0))
        extra = f'<span class="sub">95% CI {interval}</span>'
    rates = resolve_pointer(page.data, json_pointer(*prefix)).get("rate_ci") or {}
    if rates.get(key, [None])[0] is not None:  # not in reports from before it
        extra = (f'<span class="sub">95% CI {page.num(kind, *prefix, "rate_ci", key, 0)}–'
                 f'{page.num(kind, *prefix, "rate_ci", key, 1)}</span>')
    summary = resolve_pointer(page.data, json_pointer(*prefix, "summary", key))
    spread = (page.pm(kind, *prefix, "summary", key) if summary["mean"] is not None
              else page.num(kind, *prefix, "summary", key, "mean"))
    return f'<td class="n">{main}{extra}<span class="sub">folds {spread}</span></td>'


def _shares_cell(page: _Page, prefix: tuple[str, ...]) -> str:
    parts = [page.num("pct", *prefix, "pooled", f"share_{w}") for w in ("pass", "review", "reject")]
    return f'<td class="n">{" / ".join(parts)}</td>'


def _badge(reason: str) -> str:
    return f'<span class="badge warn" title="{_esc(reason)}">UNRELIABLE</span>'


def _label_cells(data: dict[str, Any], ftype: str, method: str, prefix: tuple[str, ...],
                 page: _Page, first: bool) -> str:
    r = resolve_pointer(data, json_pointer(*prefix))
    name = ""
    if first:
        name = f"<strong>{_esc(ftype)}</strong>" + (_badge(r["reason"]) if r["unreliable"] else "")
    counts = (f'{page.num("int", *prefix, "n_good")} / {page.num("int", *prefix, "n_defective")}')
    return (f'<td class="type">{name}</td><td>{_esc(method)}</td>'
            f'<td class="n">{counts}</td>')


def _row_class(data: dict[str, Any], ftype: str, prefix: tuple[str, ...], first: bool) -> str:
    r = resolve_pointer(data, json_pointer(*prefix))
    classes = ["unreliable" if r["unreliable"] else "", "overall" if ftype == OVERALL else "",
               "group-start" if first else ""]
    joined = " ".join(c for c in classes if c)
    return f' class="{joined}"' if joined else ""


def _metrics_table(data: dict[str, Any], page: _Page, keys: Sequence[str],
                   shares: bool = False) -> str:
    """Rows = type x method; one column per metric key (+ the decision shares)."""
    head = "".join(f'<th class="n">{_esc(METRICS[k][0])}</th>' for k in keys)
    if shares:
        head += '<th class="n">Decisions<br>PASS / REVIEW / REJECT</th>'
    body = []
    previous = None
    for ftype, method, prefix in _rows(data):
        first = ftype != previous
        cells = "".join(_metric_cell(page, prefix, k, METRICS[k][1]) for k in keys)
        if shares:
            cells += _shares_cell(page, prefix)
        label = _label_cells(data, ftype, method, prefix, page, first)
        body.append(f"<tr{_row_class(data, ftype, prefix, first)}>{label}{cells}</tr>")
        previous = ftype
    return (f'<div class="tablewrap"><table><thead><tr><th>Feature type</th><th>Method</th>'
            f'<th class="n">GOOD / defective</th>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>')


def _defect_cells(page: _Page, i: int) -> list[str]:
    """GOOD / defective, AUROC [CI], recall (not PASS), recall (REJECT) of ``by_defect[i]``,
    formatted: the numeric cells of its row in both the HTML and the Markdown table."""
    counts = (f'{page.num("int", "by_defect", i, "n_good")} / '
              f'{page.num("int", "by_defect", i, "n_defective")}')
    cell = page.num("num", "by_defect", i, "auroc")
    if page.data["by_defect"][i]["auroc_ci"][0] is not None:
        cell += (f" [{page.num('num', 'by_defect', i, 'auroc_ci', 0)}, "
                 f"{page.num('num', 'by_defect', i, 'auroc_ci', 1)}]")
    return [counts, cell, page.num("pct", "by_defect", i, "recall_flagged"),
            page.num("pct", "by_defect", i, "recall_reject")]


DEFECT_HEADER = ("Feature type", "Defect kind", "Method", "GOOD / defective", "AUROC [95% CI]",
                 "Recall (not PASS)", "Recall (REJECT)")


def _defect_table(data: dict[str, Any], page: _Page) -> str:
    head = "".join((f'<th class="n">{_esc(h)}</th>' if i > 2 else f"<th>{_esc(h)}</th>")
                   for i, h in enumerate(DEFECT_HEADER))
    body = []
    for i, r in enumerate(data["by_defect"]):
        cells = "".join(f'<td class="n">{c}</td>' for c in _defect_cells(page, i))
        body.append(f'<tr><td class="type"><strong>{_esc(r["feature_type"])}</strong></td>'
                    f'<td>{_esc(r["defect"])}</td><td>{_esc(r["method"])}</td>{cells}</tr>')
    return (f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>')


PARTS_HEADER = ("Method", "GOOD parts", "GOOD flagged (not PASS)", "GOOD rejected", "Defective parts",
                "Recall (not PASS)")


def parts_lead(data: dict[str, Any]) -> str:
    """What the parts table says, and the level per image that bounds a part's share at α."""
    rule, parts = data["decision_rule"], next(iter(data["parts"].values()))
    k = parts["types"]
    of = f"{k}" if parts["fewest_types"] == k else f"{parts['fewest_types']} to {k}"
    levels = part_levels_text(k, rule["alpha_review"], rule["alpha_reject"], lambda review, reject: (
        f"`diffqc calibrate MODEL --alpha-review {review} --alpha-reject {reject}`, or at train `--set "
        f"calibration.alpha_review={review} --set calibration.alpha_reject={reject}`"))
    return (f"Parts (each judged by the worst of its images, as the service judges a part) seen as "
            f"images of {of} types, from the same out-of-fold decisions. {levels}.")


def _part_cells(page: _Page, method: str) -> list[str]:
    return [page.num("int", "parts", method, "good"), page.num("pct", "parts", method, "good_flagged"),
            page.num("pct", "parts", method, "good_rejected"),
            page.num("int", "parts", method, "defective"), page.num("pct", "parts", method, "recall")]


def part_rows(data: dict[str, Any]) -> list[list[str]]:
    """The parts table's rows as text (Markdown, the terminal)."""
    page = _Page(data, markdown=True)
    return [[m, *_part_cells(page, m)] for m in data["parts"]]


def _parts_table(data: dict[str, Any], page: _Page) -> str:
    head = "".join((f'<th class="n">{_esc(h)}</th>' if i else f"<th>{_esc(h)}</th>")
                   for i, h in enumerate(PARTS_HEADER))
    body = "".join(f"<tr><td>{_esc(m)}</td>" + "".join(f'<td class="n">{c}</td>'
                                                       for c in _part_cells(page, m)) + "</tr>"
                   for m in data["parts"])
    return (f'<p class="lead">{_esc(parts_lead(data))}</p><div class="tablewrap"><table style="width:auto">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _type_unreliable(data: dict[str, Any], ftype: str) -> str:
    """The reason of the first unreliable method result of a type ("" when none)."""
    for r in (data["results"].get(ftype) or {}).values():
        if r["unreliable"]:
            return str(r["reason"])
    return ""


def _comparison_table(data: dict[str, Any], page: _Page) -> str:
    if not data["comparisons"]:
        return '<p class="lead">No comparisons (only one method was evaluated).</p>'
    body = []
    for i, c in enumerate(data["comparisons"]):
        def n(kind: str, key: str, i: int = i) -> str:
            return page.num(kind, "comparisons", i, key)

        def p(key: str, adjusted: bool, c: dict[str, Any] = c, i: int = i) -> str:
            cell = n("p", key, i)
            significant = adjusted and c[key] is not None and c[key] < 0.05
            return f'<span class="sig">{cell}</span>' if significant else cell

        reason = _type_unreliable(data, c["feature_type"])
        badge = _badge(reason) if reason else ""
        row_class = ' class="unreliable"' if reason else ""

        body.append(
            f"<tr{row_class}><td class=\"type\"><strong>{_esc(c['feature_type'])}</strong>"
            f"{badge}</td>"
            f"<td class=\"pair\">{_esc(c['method_a'])} vs {_esc(c['method_b'])}</td>"
            f'<td class="n">{n("num", "auroc_a")}</td><td class="n">{n("num", "auroc_b")}</td>'
            f'<td class="n">{n("signed", "delta")}</td><td class="n">{n("num", "delong_z")}</td>'
            f'<td class="n">{p("delong_p", False)}</td>'
            f'<td class="n">{p("delong_p_holm", True)}</td>'
            f'<td class="n">{n("signed", "mean_diff")}</td><td class="n">{n("num", "nb_t")}</td>'
            f'<td class="n">{p("nb_p", False)}</td><td class="n">{p("nb_p_holm", True)}</td>'
            f'<td class="n">{n("num", "effect_size")}</td></tr>'
        )
    head = ("<th>Feature type</th><th>A vs B</th><th class='n'>AUROC A</th><th class='n'>AUROC B"
            "</th><th class='n'>Δ AUROC</th><th class='n'>DeLong z</th><th class='n'>DeLong p</th>"
            "<th class='n'>DeLong p (Holm)</th><th class='n'>mean Δ over folds</th>"
            "<th class='n'>NB t</th><th class='n'>NB p</th><th class='n'>NB p (Holm)</th>"
            "<th class='n'>effect d<sub>z</sub></th>")
    return (f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _dataset_table(data: dict[str, Any], page: _Page) -> str:
    body = []
    for ftype in data["dataset"]["feature_types"]:
        base = ("dataset", "feature_types", ftype)
        body.append(f"<tr><td><strong>{_esc(ftype)}</strong></td>"
                    f'<td class="n">{page.num("int", *base, "n_good")}</td>'
                    f'<td class="n">{page.num("int", *base, "n_defective")}</td>'
                    f'<td class="n">{page.num("int", *base, "n_groups")}</td></tr>')
    return ('<div class="tablewrap"><table style="width:auto"><thead><tr><th>Feature type</th>'
            '<th class="n">GOOD</th><th class="n">defective</th><th class="n">parts (groups)</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _unreliable_list(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (ftype, method, r["reason"])
        for ftype, per_method in data["results"].items()
        for method, r in per_method.items()
        if r["unreliable"]
    ]


def _callout(data: dict[str, Any]) -> str:
    items = _unreliable_list(data)
    if not items:
        return ""
    seen: dict[str, str] = {}
    for ftype, _, reason in items:
        seen.setdefault(ftype, reason)
    lis = "".join(f"<li><strong>{_esc(t)}</strong>: {_esc(r)}</li>" for t, r in seen.items())
    return (f'<div class="callout"><strong>Unreliable feature types.</strong> Their rows are '
            "marked and shaded; do not read their numbers as stable estimates."
            f"<ul>{lis}</ul></div>")


DEFINITIONS = (
    ("pooled", "metric on all out-of-fold scores together; below it the mean ± sd over folds"),
    ("AUROC CI", "stratified bootstrap 95% interval of the pooled AUROC"),
    ("FPR (REJECT)", "GOOD parts rejected / GOOD parts; target α(reject)"),
    ("FPR (not PASS)", "GOOD parts sent to REVIEW or REJECT / GOOD parts; target α(review)"),
    ("Recall", "defective parts rejected (or not passed) / defective parts"),
    ("AUPRO (0.3)", "per-region overlap integrated to 30% pixel FPR, normalised to 1"),
    ("DeLong", "test of two correlated AUROCs on the pooled out-of-fold scores"),
    ("NB", "Nadeau–Bengio corrected resampled t-test over per-fold AUROC differences"),
    ("Holm", "step-down correction across feature types, per pair of methods"),
    ("effect dz", "mean fold difference / sd of fold differences (Cohen's d_z)"),
)


def _header(data: dict[str, Any], page: _Page) -> str:
    ds = data["dataset"]
    meta = [
        f"dataset <strong>{_esc(ds['name'])}</strong>",
        f"methods <strong>{_esc(', '.join(data['methods']))}</strong>",
        f"{page.num('int', 'folds', 'k')} folds (seed {page.num('int', 'folds', 'seed')})",
        f"α review {page.num('num', 'decision_rule', 'alpha_review')} · α reject "
        f"{page.num('num', 'decision_rule', 'alpha_reject')}",
        f"generated {_esc(data.get('created', ''))}",
    ]
    items = "".join(f'<span class="item">{m}</span>' for m in meta)
    return (f"<header><h1>{_esc(data.get('title', 'diffqc evaluation report'))}</h1>"
            f'<div class="meta">{items}</div></header>'
            '<nav><a href="#overview">Overview</a><a href="#detection">Detection</a>'
            '<a href="#decisions">Decisions</a><a href="#comparisons">Comparisons</a>'
            '<a href="#roc">ROC</a><a href="#histograms">Histograms</a>'
            '<a href="#calibration">Calibration</a><a href="#gallery">Worst misses</a></nav>')


def _section(anchor: str, title: str, lead: str, body: str) -> str:
    return (f'<section id="{anchor}"><h2>{_esc(title)}</h2>'
            f'<p class="lead">{lead}</p>{body}</section>')


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{b64}"></figure>'


def _plots_html(data: dict[str, Any]) -> tuple[str, str, str]:
    plots, methods = data["plots"], data["methods"]
    roc = "".join(_img(plot_roc(t, curves, methods), f"ROC {t}")
                  for t, curves in plots.get("roc", {}).items())
    hist = "".join(_img(plot_histograms(t, h), f"score histogram {t}")
                   for t, h in plots.get("histograms", {}).items())
    calib = plots.get("calibration", {})
    cal = _img(plot_calibration(calib, methods), "calibration") if calib else ""
    return roc, hist, cal


def _gallery_html(data: dict[str, Any], images: dict[int, str], page: _Page) -> str:
    cards = []
    for i, g in enumerate(data["plots"].get("gallery", [])):
        kind = str(g.get("kind", ""))
        badge = {"missed defect": "miss", "false alarm": "alarm"}.get(kind, "right")
        img = (f'<img alt="{_esc(g.get("path", ""))}" src="data:image/png;base64,{images[i]}">'
               if i in images else '<div class="noimg">no heat map</div>')
        extra = ""
        if "decision" in g:
            extra += f" · {_esc(g['decision'])}"
        if "p_value" in g:
            extra += f" · p {page.num('p', 'plots', 'gallery', i, 'p_value')}"
        cards.append(
            f'<div class="card">{img}<div class="cap"><span class="badge {badge}" '
            f'style="margin-left:0">{_esc(kind.upper())}</span> '
            f"<strong>{_esc(g.get('feature_type', ''))}</strong> · {_esc(g.get('method', ''))}"
            f"<br>score {page.num('num', 'plots', 'gallery', i, 'score')}{extra}"
            f'<div class="path" title="{_esc(g.get("path", ""))}">{_esc(g.get("path", ""))}'
            "</div></div></div>"
        )
    if not cards:
        return '<p class="lead">No misses to show.</p>'
    return f'<div class="gallery">{"".join(cards)}</div>'


def render_html(data: dict[str, Any], images: dict[int, str] | None = None) -> str:
    """The self-contained HTML page for a JSON-ready report dict (see :func:`to_jsonable`).

    ``images``: base64 PNG per gallery index.
    """
    page = _Page(data)
    rule = data["decision_rule"]
    roc, hist, cal = _plots_html(data)
    defs = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in DEFINITIONS)
    notes = "".join(f"<li>{_esc(n)}</li>" for n in data.get("notes", []))
    overview = (
        f"{_callout(data)}{_dataset_table(data, page)}"
        f'<dl class="defs">{defs}</dl>'
        + (f'<ul style="font-size:13px;margin-top:12px">{notes}</ul>' if notes else "")
    )
    alpha_text = (f"target FPR: α(review) = {fmt(rule['alpha_review'])}, "
                  f"α(reject) = {fmt(rule['alpha_reject'])}")
    sections = [
        _section("overview", "Overview",
                 f"{_esc(data['dataset'].get('source', ''))} · folds grouped by "
                 f"{_esc(data['folds'].get('grouping', 'part'))}", overview),
        _section("detection", "Detection performance (threshold-free)",
                 "Pooled out-of-fold value; below: mean ± sd over folds. "
                 "Pixel metrics need ground-truth masks.",
                 _metrics_table(data, page, RANKING_KEYS)),
        *([_section("defects", "By defect kind",
                    "Each kind of defect of a type against the type's GOOD parts: pooled "
                    "out-of-fold AUROC and the share of that kind flagged at the decision rule.",
                    _defect_table(data, page))] if data.get("by_defect") else []),
        _section("decisions", "At the calibrated decision rule",
                 f"Realised rates of PASS / REVIEW / REJECT on held-out parts ({alpha_text}).",
                 _metrics_table(data, page, RATE_KEYS, shares=True)
                 + (_parts_table(data, page) if data.get("parts") else "")),
        _section("comparisons", "Method comparisons",
                 "Two-sided tests; adjusted p-values use Holm's step-down correction across "
                 "feature types. Green: adjusted p &lt; 0.05.",
                 _comparison_table(data, page)),
        _section("roc", "ROC curves", "Pooled out-of-fold scores per feature type.",
                 f'<div class="grid">{roc}</div>'),
        _section("histograms", "Score distributions",
                 "GOOD vs defective out-of-fold scores; vertical lines: REVIEW (dashed) and "
                 "REJECT (solid) score thresholds, one per fold.",
                 f'<div class="grid wide">{hist}</div>'),
        _section("calibration", "Calibration",
                 "Target α vs realised false-positive rate on GOOD parts; markers: the two "
                 "decision levels. On the dotted line, calibration is exact.",
                 cal or '<p class="lead">No calibration data.</p>'),
        _section("gallery", "Worst misses",
                 "Lowest-scored defective parts and highest-scored GOOD parts, each named by "
                 "its decision: a missed defect passed, a false alarm was flagged (left: image, "
                 "right: heat-map overlay).",
                 _gallery_html(data, images or {}, page)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(data.get('title', 'diffqc evaluation report'))}</title>"
        f"<style>{CSS}</style></head><body>{_header(data, page)}<main>{''.join(sections)}"
        "</main><footer>Every number on this page is stored in report.json "
        "(null = undefined).</footer></body></html>\n"
    )


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def render_markdown(data: dict[str, Any]) -> str:
    """The Markdown version of the report tables and notes (same numbers and formats as the HTML)."""
    page = _Page(data, markdown=True)
    rule = data["decision_rule"]
    out = [f"# {data.get('title', 'diffqc evaluation report')}", "",
           f"Dataset **{data['dataset']['name']}** ({data['dataset'].get('source', '')}); "
           f"methods {', '.join(data['methods'])}; {page.num('int', 'folds', 'k')} folds "
           f"(seed {page.num('int', 'folds', 'seed')}); α review "
           f"{page.num('num', 'decision_rule', 'alpha_review')}, α reject "
           f"{page.num('num', 'decision_rule', 'alpha_reject')}; "
           f"generated {data.get('created', '')}.",
           ""]
    unreliable = _unreliable_list(data)
    if unreliable:
        out += ["**Unreliable:**", ""]
        out += [f"- {t} / {m}: {r}" for t, m, r in unreliable]
        out.append("")
    for title, keys in (("Detection performance (pooled; folds mean ± sd)", RANKING_KEYS),
                        ("At the calibrated decision rule", DECISION_KEYS)):
        rows = []
        for ftype, method, prefix in _rows(data):
            unreliable_row = resolve_pointer(data, json_pointer(*prefix, "unreliable"))
            flag = " (UNRELIABLE)" if unreliable_row else ""
            counts = (f"{page.num('int', *prefix, 'n_good')} / "
                      f"{page.num('int', *prefix, 'n_defective')}")
            cells = [f"{ftype}{flag}", method, counts]
            for k in keys:
                kind = METRICS[k][1]
                cell = page.num(kind, *prefix, "pooled", k)
                result = resolve_pointer(data, json_pointer(*prefix))
                if k == "auroc" and result["auroc_ci"][0] is not None:
                    cell += (f" [{page.num(kind, *prefix, 'auroc_ci', 0)}, "
                             f"{page.num(kind, *prefix, 'auroc_ci', 1)}]")
                if (result.get("rate_ci") or {}).get(k, [None])[0] is not None:  # not in older reports
                    cell += (f" [{page.num(kind, *prefix, 'rate_ci', k, 0)}, "
                             f"{page.num(kind, *prefix, 'rate_ci', k, 1)}]")
                if result["summary"][k]["mean"] is not None:
                    cell += f" ({page.pm(kind, *prefix, 'summary', k)})"
                cells.append(cell)
            rows.append(cells)
        header = ["type", "method", "GOOD / defective", *(METRICS[k][0] for k in keys)]
        out += [f"## {title}", "", _md_table(header, rows), ""]
    if data.get("by_defect"):
        rows = [[r["feature_type"], r["defect"], r["method"], *_defect_cells(page, i)]
                for i, r in enumerate(data["by_defect"])]
        out += ["## By defect kind (each kind against the type's GOOD parts)", "",
                _md_table(DEFECT_HEADER, rows), ""]
    if data.get("parts"):
        out += ["## Parts", "", parts_lead(data), "",
                _md_table(PARTS_HEADER, part_rows(data)), ""]
    if data["comparisons"]:
        rows = []
        for i, c in enumerate(data["comparisons"]):
            def n(kind: str, key: str, i: int = i) -> str:
                return page.num(kind, "comparisons", i, key)

            rows.append([c["feature_type"], f"{c['method_a']} vs {c['method_b']}",
                         n("num", "auroc_a"), n("num", "auroc_b"), n("signed", "delta"),
                         n("p", "delong_p"), n("p", "delong_p_holm"), n("signed", "mean_diff"),
                         n("p", "nb_p"), n("p", "nb_p_holm"), n("num", "effect_size")])
        header = ["type", "A vs B", "AUROC A", "AUROC B", "Δ AUROC", "DeLong p",
                  "DeLong p (Holm)", "mean Δ folds", "NB p", "NB p (Holm)", "effect d_z"]
        out += ["## Method comparisons", "", _md_table(header, rows), ""]
    gallery = data["plots"].get("gallery", [])
    if gallery:
        out += ["## Worst misses", ""]
        for i, g in enumerate(gallery):
            score = page.num("num", "plots", "gallery", i, "score")
            decided = f", {g['decision']}" if "decision" in g else ""
            line = (f"- {g.get('kind', '')}: {g.get('feature_type', '')} / {g.get('method', '')}"
                    f"{decided}, score {score}, `{g.get('path', '')}`")
            if "overlay_file" in g:
                line += f" ![overlay]({g['overlay_file']})"
            out.append(line)
        out.append("")
    if data.get("notes"):  # what was left out (unreadable images, copies, types): read with the numbers
        out += ["## Notes", "", *(f"- {note}" for note in data["notes"]), ""]
    out += [f"Decision targets: α(review) = {fmt(rule['alpha_review'])}, "
            f"α(reject) = {fmt(rule['alpha_reject'])}. Plots: see report.html.", ""]
    return "\n".join(out)


def _gallery_images(data: dict[str, Any]) -> tuple[dict[int, str], dict[str, bytes]]:
    """Base64 overlays become gallery/NNN.png files (the JSON keeps the file name), overlay_path
    ones are read: ({gallery index: base64 PNG} for the HTML, {relative path: PNG} to write)."""
    images: dict[int, str] = {}
    files: dict[str, bytes] = {}
    for i, g in enumerate(data["plots"].get("gallery", [])):
        b64 = g.pop("overlay_png", None)
        if b64:
            rel = f"gallery/{i:03d}.png"
            files[rel] = base64.b64decode(b64)
            g["overlay_file"] = rel
            images[i] = b64
        elif g.get("overlay_path"):
            try:
                images[i] = base64.b64encode(Path(g["overlay_path"]).read_bytes()).decode("ascii")
            except OSError as exc:
                warnings.warn(f"gallery overlay {g['overlay_path']} unreadable: {exc}",
                              stacklevel=3)
    return images, files


_GALLERY_FILE = re.compile(r"gallery/\d{3}\.png")  # the names _gallery_images gives


def _earlier_gallery(out: Path) -> set[str]:
    """The gallery files (``gallery/NNN.png``) that an earlier report in ``out`` names: the
    program's own, which a new report there replaces; none when ``out`` holds no report."""
    if not is_report(out):
        return set()
    try:
        items = json.loads((out / "report.json").read_text(encoding="utf-8"))["plots"]["gallery"]
        names = {g.get("overlay_file") for g in items}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not as this program writes it
        return set()
    return {n for n in names if isinstance(n, str) and _GALLERY_FILE.fullmatch(n)}


def _drop_stale_gallery(out: Path, earlier: set[str], kept: set[str]) -> None:
    """Remove the earlier report's gallery files the new report does not name (its count was
    larger: they stayed, parts of another run shown as this one's); nothing else is deleted."""
    for rel in sorted(earlier - kept):
        try:
            (out / rel).unlink(missing_ok=True)
        except OSError as exc:
            warnings.warn(f"an earlier report's {out / rel} is left: {exc.strerror or exc}", stacklevel=3)


def check_report(report: dict[str, Any]) -> None:
    """Raise ValueError naming what is missing from a report dict."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"report lacks key(s): {', '.join(missing)}")
    for ftype, per_method in report["results"].items():
        for method, r in per_method.items():
            lacking = [k for k in ("pooled", "summary", "unreliable", "auroc_ci") if k not in r]
            if lacking:
                raise ValueError(f"results[{ftype!r}][{method!r}] lacks {', '.join(lacking)}")


REPORT_FILES = ("report.json", "report.md", "report.html", "gallery")


def is_report(path: Path) -> bool:
    """Whether ``path`` is a folder that diffqc wrote an evaluation report into."""
    try:
        data = json.loads((path / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"schema_version", "results", "methods"} <= set(data)


def check_report_target(path: Path | str, *, force: bool = False) -> Path:
    """``path`` if a report may be written there: a new or empty folder, or an earlier report
    (whose own files are replaced); any other folder only with ``force``, beside what is there
    and replacing nothing (:func:`diffqc.output.check_output_folder`); never in a dataset's folder
    of images, where its gallery would be read as parts (:func:`diffqc.data.check_outside_datasets`)."""
    check_outside_datasets(path, "--out", "the report's gallery images")
    return check_output_folder(path, what="report", names=REPORT_FILES, is_ours=is_report,
                               foreign="holds no diffqc report", force=force)


def write_report(report: Report | dict[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """Write report.json, report.md and a self-contained report.html into ``out_dir``.

    Returns ``{"json": path, "md": path, "html": path}``. Gallery overlays given as base64
    are also written to ``out_dir/gallery/``. Each file is written whole or not at all,
    report.json first; a write that fails (full disk, unwritable folder) is an
    :class:`OutputError` naming the file and the files written before it. Over an earlier
    report, its gallery files the new report does not name are removed once it is written.
    """
    check_report(dict(report))
    out = Path(out_dir)
    earlier = _earlier_gallery(out)
    data: dict[str, Any] = to_jsonable(dict(report))
    data.setdefault("schema_version", SCHEMA_VERSION)
    data.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    images, gallery = _gallery_images(data)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    files = {paths["json"]: (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8"),
             paths["md"]: render_markdown(data).encode("utf-8"),
             paths["html"]: render_html(data, images).encode("utf-8"),
             **{out / rel: png for rel, png in gallery.items()}}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    written: list[str] = []
    for path, blob in files.items():
        try:  # gallery/ only after report.json: a folder holding it marks an earlier report
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, blob)
        except OSError as exc:
            done = ", ".join(written[:3]) + (" ..." if len(written) > 3 else "")
            reason = exc if isinstance(exc, OutputError) else f"cannot write {path}: {exc.strerror or exc}"
            raise OutputError(f"the report in {out} is incomplete: {reason}; "
                              f"{'written before it: ' + done if written else 'nothing was written'}"
                              ) from None
        written.append(str(path.relative_to(out)))
    _drop_stale_gallery(out, earlier, set(gallery))
    return paths


__all__ = [
    "METRIC_KEYS", "OVERALL", "REPORT_FILES", "Calibration", "CalibrationLevel", "Comparison",
    "DatasetInfo", "DecisionRule", "DefectKindResult", "FoldInfo", "GalleryItem", "Histogram",
    "MethodResult", "Plots", "Report", "RocCurve", "Summary", "TypeCounts", "apply_holm",
    "calibration_entry", "check_report_target", "compare_methods", "compute_metrics",
    "defect_kind_results", "fmt", "has_pixel_metrics", "histogram_entry", "is_report",
    "json_pointer", "method_result", "new_report", "overlay_png_base64", "reliability",
    "render_html", "render_markdown", "resolve_pointer", "roc_entry", "summarise", "to_jsonable",
    "worst_misses", "write_report",
]
