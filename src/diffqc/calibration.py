"""Calibration on held-out GOOD parts: conformal p-values and PASS / REVIEW / REJECT.

For a type with calibration scores ``c_1..c_n`` (GOOD images never used to fit the model), a
new score ``s`` gets the conformal p-value ``p = (1 + #{c_i >= s}) / (n + 1)``. Under
exchangeability ``P(p <= α) <= α`` for GOOD parts, so α is the false-positive rate asked for.

With n calibration scores the smallest conformal p-value is ``1/(n+1)``: a REJECT at
α = 0.01 needs n >= 99. Beyond the largest calibration score, ``tail="exponential"``
extrapolates the survival function with an exponential tail fitted to the upper calibration
scores, so that a clear defect can still fall under a small α; inside the calibration range the
p-value is exactly the conformal one. ``tail="none"`` keeps the pure conformal value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffqc.config import CalibrationConfig

PASS, REVIEW, REJECT, NOT_INSPECTED = "PASS", "REVIEW", "REJECT", "NOT_INSPECTED"
DECISIONS = (PASS, REVIEW, REJECT)


class CalibrationWarning(UserWarning):
    """A type has too few calibration images for the α asked."""


def conformal_p_value(scores: np.ndarray, s: float) -> float:
    """``(1 + #{scores >= s}) / (n + 1)``."""
    n = scores.size
    return float((1 + np.count_nonzero(scores >= s)) / (n + 1))


def _tail_rate(sorted_scores: np.ndarray) -> float:
    """Rate of an exponential fitted to the excesses over the upper-quartile threshold."""
    n = sorted_scores.size
    m = max(2, n // 4)
    top = sorted_scores[-m:]
    excess = top - top[0]
    mean_excess = float(excess[1:].mean()) if m > 1 else 0.0
    spread = float(np.std(sorted_scores)) if n > 1 else 0.0
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
            raise ValueError("no calibration scores")
        if not np.all(np.isfinite(arr)):
            raise ValueError("calibration scores must be finite")
        return cls(arr, _tail_rate(arr))

    def p_value(self, s: float, tail: str) -> float:
        if math.isnan(s):
            return float("nan")
        p = conformal_p_value(self.scores, s)
        top = float(self.scores[-1])
        if tail == "exponential" and s > top:
            p = p * math.exp(-self.tail_rate * (s - top))
        return p

    def threshold(self, alpha: float) -> float:
        """Smallest score whose conformal p-value is <= α (inf when none can be, without tail)."""
        n = self.scores.size
        k = math.floor(alpha * (n + 1)) - 1  # need #{c >= s} <= k
        if k < 0:
            return math.inf
        # s must exceed all but k scores: s > the (n-k)-th smallest
        return float(np.nextafter(self.scores[n - k - 1], np.inf))


@dataclass
class Calibrator:
    """Per-type conformal calibration, for known-type and unknown-type scores."""

    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    known: dict[str, TypeCalibration] = field(default_factory=dict)
    unknown: dict[str, TypeCalibration] = field(default_factory=dict)

    def fit(
        self,
        known_scores: Mapping[str, np.ndarray | Sequence[float]],
        unknown_scores: Mapping[str, np.ndarray | Sequence[float]] | None = None,
    ) -> Calibrator:
        self.known = {t: TypeCalibration.from_scores(s) for t, s in known_scores.items()}
        self.unknown = {t: TypeCalibration.from_scores(s) for t, s in (unknown_scores or {}).items()}
        for t, cal in self.known.items():
            for msg in self.warnings_for(t, cal.scores.size):
                warnings.warn(msg, CalibrationWarning, stacklevel=2)
        return self

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

    def _table(self, type_known: bool) -> dict[str, TypeCalibration]:
        return self.known if type_known or not self.unknown else self.unknown

    def p_value(self, feature_type: str, score: float, *, type_known: bool = True) -> float:
        table = self._table(type_known)
        if feature_type not in table:
            raise KeyError(f"no calibration for feature type {feature_type!r}")
        return table[feature_type].p_value(score, self.config.tail)

    def decide(self, p_value: float) -> str:
        if math.isnan(p_value):
            return REJECT  # a score that cannot be computed is never passed
        if p_value <= self.config.alpha_reject:
            return REJECT
        if p_value <= self.config.alpha_review:
            return REVIEW
        return PASS

    def thresholds(self, feature_type: str, *, type_known: bool = True) -> dict[str, float]:
        """Score thresholds of the pure conformal rule (inf where a level is unreachable)."""
        cal = self._table(type_known)[feature_type]
        return {"review": cal.threshold(self.config.alpha_review),
                "reject": cal.threshold(self.config.alpha_reject)}

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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        cal = cls(CalibrationConfig(**data["config"]))
        cal.known = {t: TypeCalibration.from_scores(s) for t, s in data["known"].items()}
        cal.unknown = {t: TypeCalibration.from_scores(s) for t, s in data.get("unknown", {}).items()}
        return cal
