from __future__ import annotations

import math

import numpy as np
import pytest

from diffqc.calibration import (
    PASS,
    REJECT,
    REVIEW,
    CalibrationWarning,
    Calibrator,
    TypeCalibration,
    conformal_p_value,
)
from diffqc.config import CalibrationConfig


def test_conformal_formula_and_ties() -> None:
    cal = np.array([1.0, 2.0, 2.0, 3.0])
    assert conformal_p_value(cal, 2.0) == pytest.approx((1 + 3) / 5)  # ties count as >=
    assert conformal_p_value(cal, 0.0) == 1.0
    assert conformal_p_value(cal, 3.5) == pytest.approx(1 / 5)


def test_decisions() -> None:
    c = Calibrator(CalibrationConfig(alpha_reject=0.01, alpha_review=0.05))
    assert c.decide(0.5) == PASS and c.decide(0.05) == REVIEW and c.decide(0.01) == REJECT
    assert c.decide(float("nan")) == REJECT


def test_tiny_set_warns_and_tail_extrapolates() -> None:
    with pytest.warns(CalibrationWarning, match="at least 99|At least 99"):
        c = Calibrator(CalibrationConfig(tail="exponential")).fit({"a": [1.0, 1.1, 1.2]})
    assert c.p_value("a", 1.15) == pytest.approx(2 / 4)
    far = c.p_value("a", 10.0)
    assert far < 0.01 and c.decide(far) == REJECT
    with pytest.warns(CalibrationWarning):
        pure = Calibrator(CalibrationConfig(tail="none")).fit({"a": [1.0, 1.1, 1.2]})
    assert pure.p_value("a", 10.0) == pytest.approx(1 / 4)
    assert math.isinf(pure.thresholds("a")["reject"])


def test_all_equal_scores() -> None:
    c = Calibrator(CalibrationConfig()).fit({"a": [0.5] * 200})
    assert c.p_value("a", 0.5) == 1.0
    assert c.p_value("a", 0.5000001) < 0.01  # above a degenerate set: tail keeps it finite
    assert np.isfinite(c.p_value("a", 0.6))


def test_threshold_matches_p_value() -> None:
    rng = np.random.default_rng(0)
    c = Calibrator(CalibrationConfig()).fit({"a": rng.normal(size=300)})
    th = c.thresholds("a")["review"]
    assert c.p_value("a", th) <= 0.05 < c.p_value("a", np.nextafter(th, -np.inf) - 1e-9)


@pytest.mark.parametrize("n_cal", [20, 100, 400])
def test_empirical_fpr_near_alpha(n_cal: int) -> None:
    """Fresh GOOD scores from the calibration distribution are flagged at about α."""
    rng = np.random.default_rng(n_cal)
    flagged = []
    for _ in range(200):
        cal = rng.gamma(2.0, size=n_cal)
        c = Calibrator(CalibrationConfig(alpha_review=0.05, alpha_reject=0.01))
        c.fit({"a": cal})
        fresh = rng.gamma(2.0, size=50)
        flagged += [c.decide(c.p_value("a", s)) != PASS for s in fresh]
    rate = float(np.mean(flagged))
    assert 0.03 <= rate <= 0.07, rate


def test_round_trip() -> None:
    c = Calibrator(CalibrationConfig()).fit({"a": [1, 2, 3.5] * 40}, {"a": [0.5, 1, 2] * 40})
    d = Calibrator.from_dict(c.to_dict())
    for s in (0.0, 2.0, 9.0):
        assert d.p_value("a", s) == c.p_value("a", s)
        assert d.p_value("a", s, type_known=False) == c.p_value("a", s, type_known=False)
    assert "a" in d.summary()["types"]


def test_empty_or_nonfinite_rejected() -> None:
    with pytest.raises(ValueError):
        TypeCalibration.from_scores([])
    with pytest.raises(ValueError):
        TypeCalibration.from_scores([1.0, float("nan")])
