"""Calibration on held-out GOOD parts: conformal p-values and PASS / REVIEW / REJECT.

For a type with calibration scores ``c_1..c_n`` (GOOD images never used to fit the model), a
new score ``s`` gets the conformal p-value ``p = (1 + #{c_i >= s}) / (n + 1)``. Under
exchangeability ``P(p <= α) <= α`` for GOOD parts, so α is the false-positive rate asked for.

With n calibration scores the smallest conformal p-value is ``1/(n+1)``: a REJECT at
α = 0.01 needs n >= 99. Beyond the largest calibration score, ``tail="exponential"``
extrapolates the survival function with an exponential tail fitted to the upper calibration
scores, so that a clear defect can still fall under a small α; inside the calibration range the
p-value is exactly the conformal one. ``tail="none"`` keeps the pure conformal value. The
tail is a fitted model, not a conformal guarantee: for GOOD parts ``P(p <= α)`` is at most α only
for ``α >= 1/(n+1)``; below that it is at most ``1/(n+1)`` (the chance of a GOOD score beyond the
largest calibration score), whatever α. With a single calibration score (or scores all alike:
copies of one image) no tail can be fitted and the p-value stays conformal.

Unknown-type mode: an image is scored under the type it is predicted as (the type router's pick,
:mod:`diffqc.routing`; a model with layouts: the type of the largest known-type p-value). Its
calibration is keyed by that predicted type at calibration and at inference alike (a Mondrian
split on a function of the image, so the per-type guarantee holds); a type that no calibration
image was predicted as falls back to the pooled unknown-type scores of all types (a marginal
guarantee only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffqc.config import CalibrationConfig
from diffqc.errors import BundleError, DatasetError, first_few
from diffqc.output import read_json

PASS, REVIEW, REJECT, NOT_INSPECTED = "PASS", "REVIEW", "REJECT", "NOT_INSPECTED"
DECISIONS = (PASS, REVIEW, REJECT)


class CalibrationWarning(UserWarning):
    """The levels asked may not hold as meant: a type has too few calibration images for its α,
    or the levels per image let GOOD parts of several types be flagged more often than asked."""


def part_levels_text(k: int, alpha_review: float, alpha_reject: float,
                     command: Callable[[str, str], str]) -> str:
    """What the levels per image mean for a part judged by the worst of its images of ``k``
    types (Bonferroni: it is flagged when any image is, at most the sum of their chances whatever
    their dependence), and the levels per image that keep the defaults' shares per part, A/k,
    given as ``command(review, reject)`` says them where the levels now do not
    (:func:`part_levels_kept`)."""
    default = CalibrationConfig()
    bound = f"{100 * min(1.0, k * alpha_review):.3g} %"
    said = (f"A GOOD part of {k} types is flagged when any of its images is: at α_review = "
            f"{alpha_review:g} per image, in at most {k} × {alpha_review:g} = {bound} of GOOD parts "
            f"where each type's calibration holds its level (Bonferroni, whatever the images' "
            f"dependence); for at most a share A, decide each image at A/{k}: ")
    if part_levels_kept(k, alpha_review):
        return said + (f"the levels now keep a GOOD part within the defaults' share flagged "
                       f"({default.alpha_review:g})")
    review, reject = f"{default.alpha_review / k:.3g}", f"{default.alpha_reject / k:.3g}"
    return (said + f"for the defaults' shares ({default.alpha_review:g} flagged, {default.alpha_reject:g} "
            f"rejected), {command(review, reject)}")


def part_levels_kept(k: int, alpha_review: float) -> bool:
    """Whether ``alpha_review`` per image keeps a GOOD part of ``k`` types within the defaults'
    share flagged (k × α_review at most 0.05, up to α/k's rounding to the 3 digits it is written
    with: 0.0167 for 0.05/3)."""
    return k * alpha_review <= CalibrationConfig().alpha_review * (1 + 5e-3)


def part_levels_warning(k: int, config: CalibrationConfig, command: Callable[[str, str], str]) -> str | None:
    """:func:`part_levels_text` where ``config``'s levels let a GOOD part of ``k`` types be flagged
    more often than the defaults' share (``train`` and ``calibrate`` say it before a line runs at
    them); None where they do not, or parts have one type."""
    if k < 2 or part_levels_kept(k, config.alpha_review):
        return None
    return part_levels_text(k, config.alpha_review, config.alpha_reject, command)


def conformal_p_value(scores: np.ndarray, s: float) -> float:
    """``(1 + #{scores >= s}) / (n + 1)``."""
    n = scores.size
    return float((1 + np.count_nonzero(scores >= s)) / (n + 1))


def _tail_rate(sorted_scores: np.ndarray) -> float:
    """Rate of an exponential fitted to the excesses over the upper-quartile threshold; 0 (no
    tail: the conformal p-value is kept) when there is a single score to fit it to, or scores all
    alike (copies of one image: a tail of no width would send any score above them to p = 0)."""
    n = sorted_scores.size
    if n < 2 or sorted_scores[0] == sorted_scores[-1]:
        return 0.0
    m = min(n, max(2, n // 4))
    top = sorted_scores[-m:]
    excess = top - top[0]
    mean_excess = float(excess[1:].mean())
    spread = float(np.std(sorted_scores))
    scale = max(mean_excess, 0.1 * spread, 1e-12)
    return 1.0 / scale


@dataclass
class TypeCalibration:
    scores: np.ndarray  # sorted ascending
    tail_rate: float = 0.0

    @classmethod
    def from_scores(cls, scores: np.ndarray | Sequence[float]) -> TypeCalibration:
        arr = np.sort(np.asarray(scores, dtype=np.float64))
        if arr.size == 0:
            raise DatasetError("no calibration scores")
        if not np.all(np.isfinite(arr)):
            raise DatasetError("calibration scores must be finite")
        return cls(arr, _tail_rate(arr))

    def p_value(self, s: float, tail: str) -> float:
        if math.isnan(s):
            return float("nan")
        p = conformal_p_value(self.scores, s)
        top = float(self.scores[-1])
        if tail == "exponential" and s > top and self.tail_rate > 0:
            p = p * math.exp(-self.tail_rate * (s - top))
        return p

    def threshold(self, alpha: float) -> float:
        """Smallest score whose conformal p-value is <= α (inf when none can be, without tail)."""
        n = self.scores.size
        k = math.floor(alpha * (n + 1)) - 1  # need #{c >= s} <= k, as p_value computes p:
        while (k + 2) / (n + 1) <= alpha:  # α(n + 1) whole but rounded below it (0.29 · 100)
            k += 1
        if k < 0:
            return math.inf
        # s must exceed all but k scores: s > the (n-k)-th smallest
        return float(np.nextafter(self.scores[n - k - 1], np.inf))

    def decision_threshold(self, alpha: float, tail: str) -> float:
        """Smallest score the decision rule in use sends to p <= α: the conformal threshold where
        one exists; otherwise, with the exponential tail, the score beyond the largest calibration
        score where the tail's p-value reaches α; inf where no score can (``tail="none"``, or a
        single calibration score, or scores all alike)."""
        t = self.threshold(alpha)
        if math.isfinite(t) or tail != "exponential" or not 0 < self.tail_rate < math.inf:
            return t
        n = self.scores.size
        t = float(self.scores[-1]) + math.log(1.0 / ((n + 1) * alpha)) / self.tail_rate
        while self.p_value(t, tail) > alpha:  # the closed form may land a rounding step short
            t = float(np.nextafter(t, math.inf))
        return t


# a calibration score more robust standard deviations than this above its type's median (on a log
# scale) is named by far_above; a type with fewer GOOD images' scores than FAR_ABOVE_MIN is not
# judged (its median and spread too uncertain): chosen on GOOD scores simulated as gamma and
# log-normal draws (named in under 0.5 % of types of 22) and on synthetic types with defects among
# their GOOD images (tests/test_calibration.py; README, under `diffqc evaluate`)
FAR_ABOVE_Z = 5.0
FAR_ABOVE_MIN = 10


def far_above(scores: np.ndarray | Sequence[float]) -> list[int]:
    """Indices of the ``scores`` that lie far above the others, highest first: more than
    :data:`FAR_ABOVE_Z` robust standard deviations (1.4826 times the median absolute deviation)
    above the median, on a log scale (a score's spread grows with it). The median and that
    spread are the bulk's, which a few defects among a type's GOOD images do not move, where the
    largest score and the tail fitted to the top quarter are theirs. ``[]`` for fewer than
    :data:`FAR_ABOVE_MIN` scores, or scores without spread."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < FAR_ABOVE_MIN or not np.all(np.isfinite(s)):
        return []
    if np.all(s > 0):
        s = np.log(s)
    median = float(np.median(s))
    spread = 1.4826 * float(np.median(np.abs(s - median)))
    if spread <= 0:
        return []
    z = (s - median) / spread
    return [int(i) for i in np.argsort(-z, kind="stable") if z[i] > FAR_ABOVE_Z]


def suspect_images(scored: Iterable[tuple[str, float, str]], *, among: str | None = None
                   ) -> list[dict[str, Any]]:
    """Of GOOD images given as (type, score, path), those that score far above
    their type's others (:func:`far_above`: defects among the GOOD images, most likely), per
    type highest first: path, type, score and how many times the type's median score it is; and,
    given ``among``, which images they were judged among ("calibration images")."""
    by_type: dict[str, list[tuple[float, str]]] = {}
    for t, score, path in scored:
        by_type.setdefault(t, []).append((float(score), path))
    out = []
    for t, mine in sorted(by_type.items()):
        median = float(np.median([s for s, _ in mine]))
        out += [{"path": mine[i][1], "feature_type": t, "score": mine[i][0],
                 "times_median": round(mine[i][0] / median, 1) if median > 0 else None,
                 **({"among": among} if among else {})}
                for i in far_above([s for s, _ in mine])]
    return out


# what a defect among the GOOD calibration images does, as `train` and `calibrate` say it
RAISES_THRESHOLDS = ("each raises its type's REVIEW and REJECT thresholds, so defects that score "
                     "below it pass")

# and among the GOOD training images, as `train` says it
LEARNT_OR_RAISED = ("one among the fit images is learnt as GOOD, one among the calibration images "
                    "raises its type's REVIEW and REJECT thresholds: defects like it, or scoring below "
                    "it, pass")

# what a defect labelled GOOD does to a measurement, as `evaluate` and `test` say it
COUNTED_FLAGGED = ("each counts as a GOOD part flagged, so the AUROC and FPR below are worse than "
                   "the detector's")


def suspects_note(suspects: Sequence[Mapping[str, Any]], *, images: str, harm: str, then: str,
                  scored_by: str = "") -> str:
    """What a user is told of :func:`suspect_images`' ``images`` (as "GOOD calibration
    image(s)"), ``scored_by`` what: the first few, what they do (``harm``) and what to do
    ``then``."""
    types = ", ".join(dict.fromkeys(e["feature_type"] for e in suspects))
    named = first_few([f"{e['path']} {e['times_median']}x the median"
                       + (f" of the {e['among']}" if "among" in e else "") for e in suspects], 3)
    by = f", {scored_by}," if scored_by else ""
    return (f"{len(suspects)} {images} of {types}{by} score far above the others of their type, as "
            f"defects among the GOOD images would ({named}): {harm}; look at them, and if they "
            f"show defects, {then}")


# GOOD parts whose share of flagged ones a random draw from the line's parts reaches less often
# than this were chosen by their decision (see flagged_excess_p).
SELECTED_BELOW = 0.01


def flagged_excess_p(inspected: int, flagged: int, taken: int, taken_flagged: int) -> float:
    """How often ``taken`` parts drawn at random from ``inspected`` parts, ``flagged`` of them
    REVIEW or REJECT, hold ``taken_flagged`` flagged parts or more (the hypergeometric upper tail).

    Conformal calibration needs GOOD parts drawn as the line makes them. Parts an operator
    reviewed GOOD are mostly flagged ones (the review queue): the GOOD parts the model scored
    highest. A small value says the parts were chosen by their decision, and calibrated on them
    the thresholds would rise and defects pass."""
    if taken <= 0 or taken_flagged <= 0:
        return 1.0
    from scipy.stats import hypergeom

    inspected, flagged = max(inspected, taken), max(flagged, taken_flagged)  # the line holds them
    return float(hypergeom.sf(taken_flagged - 1, inspected, flagged, taken))


@dataclass
class Calibrator:
    """Per-type conformal calibration, for known-type and unknown-type scores (the latter keyed
    by the predicted type; see the module docstring)."""

    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    known: dict[str, TypeCalibration] = field(default_factory=dict)
    unknown: dict[str, TypeCalibration] = field(default_factory=dict)
    pooled_unknown: TypeCalibration | None = None

    def fit(
        self,
        known_scores: Mapping[str, np.ndarray | Sequence[float]],
        unknown_scores: Mapping[str, np.ndarray | Sequence[float]] | None = None,
        *, warn: bool = True,
    ) -> Calibrator:
        """``known_scores`` by true type (every type needs one); ``unknown_scores`` by predicted
        type (a type may have none). One :class:`CalibrationWarning` line names the types whose
        calibration set is too small for the α asked."""
        empty = sorted(t for t, v in known_scores.items() if len(v) == 0)
        if empty:
            raise DatasetError(f"no calibration images for type(s) {', '.join(map(repr, empty))}: "
                               "each type needs GOOD training images (parts) to calibrate on")
        self.known = {t: TypeCalibration.from_scores(s) for t, s in known_scores.items()}
        unknown = {t: s for t, s in (unknown_scores or {}).items() if len(s)}
        self.unknown = {t: TypeCalibration.from_scores(s) for t, s in unknown.items()}
        pooled = [float(x) for v in unknown.values() for x in v]
        self.pooled_unknown = TypeCalibration.from_scores(pooled) if pooled else None
        message = self.warning_line()
        if warn and message:
            warnings.warn(message, CalibrationWarning, stacklevel=2)
        return self

    def warning_line(self, types: Collection[str] | None = None) -> str:
        """One line naming the types (of ``types``, default all) whose calibration set is too
        small ("" when none is)."""
        cfg = self.config
        known = {t: c for t, c in sorted(self.known.items()) if types is None or t in types}
        parts = []
        for name, alpha in (("REJECT", cfg.alpha_reject), ("REVIEW", cfg.alpha_review)):
            need = math.ceil(1 / alpha - 1)
            short = [f"{t} ({c.scores.size})" for t, c in known.items() if c.scores.size < need]
            if short:
                parts.append(f"{name} at α={alpha} needs at least {need}, fewer in {', '.join(short)}")
        few = [t for t, c in known.items() if c.scores.size < cfg.min_per_type]
        if few:
            parts.append(f"fewer than calibration.min_per_type={cfg.min_per_type} in {', '.join(few)}")
        if not parts:
            return ""
        bound = ("whose GOOD flag rate is bounded by 1/(n+1), not α" if cfg.scheme != "cross" else
                 "without even that bound under calibration.scheme=cross, where fold models, not the "
                 "deployed one, scored the calibration parts (the demo with 8 GOOD parts per type "
                 "flagged 25-33 % of its GOOD test parts)")
        how = (f"there the exponential tail decides beyond the largest calibration score, a fitted "
               f"model {bound}" if cfg.tail == "exponential"
               else "there that level can never be reached (calibration.tail=none)")
        dead, said = self._untailed(known)
        if dead and cfg.tail == "exponential":
            how += (f"; but {said}, from which no tail can be fitted: no part of "
                    f"{'it' if len(dead) == 1 else 'them'} can be flagged (every p-value is at least "
                    "1/(n+1)) — give such a type 3 GOOD parts or more")
        more = ("train on more GOOD images of those types (every one calibrates under "
                "calibration.scheme=cross)" if cfg.scheme == "cross" else
                "calibrate on more GOOD images of those types (diffqc calibrate MODEL DATA: every GOOD "
                "image of DATA the model was not fit on)")
        return (f"calibration: too few GOOD calibration images: {'; '.join(parts)}; {how}; for the "
                f"calibration alone to decide, {more} (docs/METHOD.md)")

    def _untailed(self, known: Mapping[str, TypeCalibration]) -> tuple[list[str], str]:
        """Of ``known``, the types that flag no part for want of a tail (one score, or scores all
        alike), and what they have, said ("a has a single calibration image")."""
        alpha, tail = self.config.alpha_review, self.config.tail
        dead = {t: c.scores.size for t, c in known.items()
                if c.tail_rate == 0 and math.isinf(c.decision_threshold(alpha, tail))}
        said = []
        for what, types in (("a single calibration image", [t for t, n in dead.items() if n < 2]),
                            ("calibration scores all alike (copies of one image?)",
                             [t for t, n in dead.items() if n >= 2])):
            if types:
                said.append(f"{', '.join(types)} {'has' if len(types) == 1 else 'have'} {what}")
        return list(dead), ", and ".join(said)

    def warnings_for(self, feature_type: str, n: int) -> list[str]:
        out = []
        cfg = self.config
        for name, alpha in (("REJECT", cfg.alpha_reject), ("REVIEW", cfg.alpha_review)):
            if 1.0 / (n + 1) > alpha:
                need = math.ceil(1 / alpha - 1)
                how = ("beyond the largest calibration score the exponential tail decides"
                       if cfg.tail == "exponential" else f"{name} can never be reached")
                out.append(
                    f"type {feature_type!r}: {n} calibration images, so the smallest conformal "
                    f"p-value is {1 / (n + 1):.3f} > α_{name.lower()}={alpha}; {how}. "
                    f"At least {need} GOOD calibration images are needed for that α."
                )
        if n < cfg.min_per_type:
            out.append(f"type {feature_type!r}: only {n} calibration images (< {cfg.min_per_type})")
        return out

    def _lookup(self, feature_type: str, type_known: bool) -> TypeCalibration:
        if type_known or (not self.unknown and self.pooled_unknown is None):
            if feature_type not in self.known:
                raise KeyError(f"no calibration for feature type {feature_type!r}")
            return self.known[feature_type]
        found = self.unknown.get(feature_type, self.pooled_unknown)
        if found is None:
            raise KeyError(f"no unknown-type calibration for feature type {feature_type!r}")
        return found

    def p_value(self, feature_type: str, score: float, *, type_known: bool = True) -> float:
        """``feature_type``: the given type, or in unknown-type mode the predicted one."""
        return self._lookup(feature_type, type_known).p_value(score, self.config.tail)

    def decide(self, p_value: float) -> str:
        if math.isnan(p_value):
            return REJECT  # a score that cannot be computed is never passed
        if p_value <= self.config.alpha_reject:
            return REJECT
        if p_value <= self.config.alpha_review:
            return REVIEW
        return PASS

    def thresholds(self, feature_type: str, *, type_known: bool = True) -> dict[str, float]:
        """Score thresholds of the decision rule in use: a score at or above ``review`` is REVIEW
        or REJECT, at or above ``reject`` REJECT (with the exponential tail, beyond the largest
        calibration score, where the tail decides); inf where a level cannot be reached."""
        cal = self._lookup(feature_type, type_known)
        return {"review": cal.decision_threshold(self.config.alpha_review, self.config.tail),
                "reject": cal.decision_threshold(self.config.alpha_reject, self.config.tail)}

    def unflaggable(self, *, type_known: bool = True) -> list[str]:
        """The types under which no score reaches REVIEW, so every part of them PASSes (a single
        calibration score, or scores all alike: no tail can be fitted; ``tail=none`` with fewer
        than ``1/α - 1``); with ``type_known=False``, those under whose unknown-type calibration
        no part the type router takes for them is flagged."""
        return [t for t in sorted(self.known)
                if math.isinf(self.thresholds(t, type_known=type_known)["review"])]

    def unknown_calibration(self, feature_type: str) -> TypeCalibration | None:
        """The unknown-type calibration that decides the parts the type router takes for
        ``feature_type`` (its own, else the pooled one); None without any (no type router)."""
        if not self.unknown and self.pooled_unknown is None:
            return None
        return self.unknown.get(feature_type, self.pooled_unknown)

    def images_to_flag(self) -> int:
        """The fewest calibration scores under which a type can flag a part: 2 with the
        exponential tail (fitted to two different scores at least), else ``⌈1/α_review − 1⌉``."""
        if self.config.tail == "exponential":
            return 2
        return math.ceil(1 / self.config.alpha_review - 1)

    def summary(self) -> dict[str, Any]:
        per_type = {}
        for t, cal in self.known.items():
            th = self.thresholds(t)
            per_type[t] = {
                "n": int(cal.scores.size),
                "min": float(cal.scores[0]), "median": float(np.median(cal.scores)),
                "max": float(cal.scores[-1]),
                "review_threshold": None if math.isinf(th["review"]) else th["review"],
                "reject_threshold": None if math.isinf(th["reject"]) else th["reject"],
                "warnings": self.warnings_for(t, cal.scores.size),
            }
        return {"alpha_reject": self.config.alpha_reject, "alpha_review": self.config.alpha_review,
                "tail": self.config.tail, "types": per_type}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "known": {t: c.scores.tolist() for t, c in self.known.items()},
            "unknown": {t: c.scores.tolist() for t, c in self.unknown.items()},
            "unknown_key": "predicted_type",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Rebuild a fitted calibrator. Files written before the unknown-type scores were keyed
        by the predicted type (no ``unknown_key``) keyed them by the true type: their scores are
        used pooled, so that the look-up by predicted type stays consistent."""
        cal = cls(CalibrationConfig(**data["config"]))
        legacy = data.get("unknown_key") != "predicted_type"
        cal.fit(data["known"], None if legacy else data.get("unknown"), warn=False)
        if legacy:
            pooled = [float(x) for v in data.get("unknown", {}).values() for x in v]
            cal.pooled_unknown = TypeCalibration.from_scores(pooled) if pooled else None
        return cal

    @classmethod
    def from_file(cls, path: Path | str) -> Calibrator:
        """:meth:`from_dict` of a JSON file; a missing or damaged file is a BundleError naming it."""
        path = Path(path)
        try:
            data = read_json(path)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls.from_dict(data)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # AttributeError: a value of another kind where an object is ("known": [])
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BundleError(f"{path} is damaged or unreadable ({detail})") from None


def standardiser(cal_scores: np.ndarray) -> tuple[float, float]:
    """``(centre, scale)`` of GOOD calibration scores: the median and the interquartile range.
    :mod:`diffqc.evaluate` maps each fold model's scores with it onto one pooled scale, and the
    fused heat map (``scoring.heat_map``) its two maps onto one another's.

    Why this and not ``-log10(p)``: the scores of different fold models are not on one scale,
    so they must be mapped before they are pooled. The conformal p-value is the obvious common
    scale, but it is coarse: every score below the smallest calibration score gets p = 1 (GOOD
    parts become ties), inside the calibration range it moves in steps of 1/(n+1), and beyond
    the largest calibration score it depends on the fitted exponential tail. Subtracting the
    median of the fold's GOOD calibration scores and dividing by their interquartile range is a
    strictly increasing affine map per fold and type: it keeps every tie and order inside a fold
    (so per-fold AUROC and the decisions are untouched), needs no tail model, is robust to a few
    outlying calibration parts, and makes "how far above a typical GOOD part" comparable across
    folds. The scale falls back to the standard deviation, then to 1, when the IQR is zero.
    """
    c = np.asarray(cal_scores, dtype=np.float64)
    centre = float(np.median(c))
    q1, q3 = np.quantile(c, [0.25, 0.75])
    scale = float(q3 - q1)
    if not scale > 1e-12:
        scale = float(c.std()) if c.size > 1 and c.std() > 1e-12 else 1.0
    return centre, scale
