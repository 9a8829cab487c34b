from __future__ import annotations

import json
import math
from pathlib import Path

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
    far_above,
)
from diffqc.config import CalibrationConfig
from diffqc.errors import BundleError


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


@pytest.mark.parametrize("alpha", [0.29, 0.036, 0.175])
def test_the_threshold_is_where_the_p_value_reaches_alpha_when_alpha_n_is_whole(alpha: float) -> None:
    """With 99 calibration scores at α = 0.29, α(n + 1) is 29 but rounds below it in floating
    point: the threshold shown (dashboard, calibrate) was one calibration score too high, a score
    below it already decided at p = 0.29 <= α. It is where the p-value, as the decision takes it,
    reaches α."""
    from diffqc.calibration import TypeCalibration

    cal = TypeCalibration.from_scores(np.arange(1.0, 100.0))
    th = cal.threshold(alpha)
    assert cal.p_value(th, "none") <= alpha < cal.p_value(float(np.nextafter(th, -np.inf)), "none")


@pytest.mark.parametrize("tail", ["exponential", "none"])
@pytest.mark.parametrize("n_cal", [2, 9, 30, 300])
def test_thresholds_are_where_the_decision_changes(n_cal: int, tail: str) -> None:
    """``thresholds`` are what the decision rule does, not only its conformal part: with few
    calibration scores and the exponential tail, REJECT is reached beyond the largest score (a
    service's dashboard draws it; ``calibrate`` prints it); without the tail it never is."""
    scores = np.random.default_rng(n_cal).gamma(2.0, size=n_cal)
    c = Calibrator(CalibrationConfig(tail=tail)).fit({"a": scores}, warn=False)
    th = c.thresholds("a")
    for level, at in (("review", REVIEW), ("reject", REJECT)):
        t = th[level]
        severity = {PASS: 0, REVIEW: 1, REJECT: 2}
        if math.isinf(t):  # no score reaches this level
            assert tail == "none", (level, n_cal)
            assert severity[c.decide(c.p_value("a", float(scores.max()) * 1e6))] < severity[at]
            continue
        assert severity[c.decide(c.p_value("a", t))] >= severity[at]
        assert severity[c.decide(c.p_value("a", float(np.nextafter(t, -np.inf))))] < severity[at]
    conformal_reachable = n_cal + 1 >= 1 / 0.01
    assert math.isfinite(th["reject"]) == (conformal_reachable or tail == "exponential")
    if tail == "exponential" and not conformal_reachable:  # the tail's p-value is α there
        assert c.p_value("a", th["reject"]) == pytest.approx(0.01)


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


def test_single_calibration_score_gives_no_nan() -> None:
    one = TypeCalibration.from_scores([0.5])
    for s in (0.1, 0.5, 0.9, 50.0):
        p = one.p_value(s, "exponential")
        assert not math.isnan(p)
    assert one.p_value(0.9, "exponential") == pytest.approx(1 / 2)  # no tail from one score
    assert one.p_value(0.4, "exponential") == 1.0


def test_a_single_calibration_score_is_named_as_never_flagging() -> None:
    """One calibration score: no tail, so every p-value >= 0.5 and the type flags nothing (a lens
    cap included); the warning says so instead of promising the tail."""
    with pytest.warns(CalibrationWarning) as record:
        cal = Calibrator(CalibrationConfig()).fit({"dots": [1.0], "edge": [1.0, 2.0]})
    text = str(record[0].message)
    assert "but dots has a single calibration image" in text and "no part of it can be flagged" in text
    assert "edge has" not in text
    assert cal.decide(cal.p_value("dots", 1e9)) == "PASS"
    assert cal.decide(cal.p_value("edge", 1e9)) == "REJECT"  # two scores: a tail decides


def test_one_warning_line_names_every_short_type() -> None:
    scores = {f"t{i}": list(np.linspace(0, 1, 22)) for i in range(8)}
    with pytest.warns(CalibrationWarning) as record:
        Calibrator(CalibrationConfig()).fit(scores)
    assert len(record) == 1
    text = str(record[0].message)
    assert "\n" not in text and all(f"t{i} (22)" in text for i in range(8))
    assert "1/(n+1)" in text
    # cross-fitted calibration (the demo's) has no such bound: fold models scored the calibration
    # parts, and at 8 GOOD parts per type the deployed model flagged 25-33 % of GOOD test parts
    with pytest.warns(CalibrationWarning) as record:
        Calibrator(CalibrationConfig(scheme="cross")).fit(scores)
    text = str(record[0].message)
    assert "1/(n+1)" not in text and "without even that bound under calibration.scheme=cross" in text


def test_unknown_type_calibration_is_keyed_by_predicted_type() -> None:
    # calibration images of true type a: two are predicted a, one is predicted b (score 2.0 there)
    known = {"a": [1.0, 1.2, 4.0], "b": [0.8, 0.7]}
    unknown = {"a": [1.0, 1.2], "b": [2.0, 0.8, 0.7]}
    cal = Calibrator(CalibrationConfig(tail="none"))
    with pytest.warns(CalibrationWarning):
        cal.fit(known, unknown)
    # looked up by the predicted type: b's table holds 2.0, so 1.5 is inside it
    assert cal.p_value("b", 1.5, type_known=False) == pytest.approx((1 + 1) / 4)
    assert cal.p_value("a", 1.5, type_known=False) == pytest.approx(1 / 3)


def test_type_never_predicted_falls_back_to_pooled_unknown_scores() -> None:
    cal = Calibrator(CalibrationConfig(tail="none"))
    with pytest.warns(CalibrationWarning):
        cal.fit({"a": [1.0, 2.0], "b": [1.0, 2.0]}, {"a": [1.0, 2.0, 3.0], "b": []})
    assert "b" not in cal.unknown
    assert cal.p_value("b", 2.5, type_known=False) == pytest.approx((1 + 1) / 4)  # pooled a's 3


def test_legacy_unknown_scores_are_pooled() -> None:
    legacy = {"config": {}, "known": {"a": [1.0, 2.0], "b": [1.0, 2.0]},
              "unknown": {"a": [0.5, 0.6], "b": [5.0]}}  # keyed by true type (old bundles)
    cal = Calibrator.from_dict(legacy)
    assert cal.unknown == {} and cal.pooled_unknown is not None
    assert cal.p_value("a", 1.0, type_known=False) == cal.p_value("b", 1.0, type_known=False)


def test_damaged_calibration_file_is_a_bundle_error_naming_it(tmp_path: Path) -> None:
    good = Calibrator(CalibrationConfig()).fit({"a": list(range(120))}, warn=False)
    f = tmp_path / "calibration.int8.json"
    f.write_text(json.dumps(good.to_dict()))
    assert Calibrator.from_file(f).p_value("a", 200.0) == good.p_value("a", 200.0)
    bad_config = json.dumps({**good.to_dict(), "config": {"tail": "exp"}})
    for damage in ("{", "[]", json.dumps({"known": {}}), bad_config):
        f.write_text(damage)
        with pytest.raises(BundleError, match=r"calibration\.int8\.json"):
            Calibrator.from_file(f)
    with pytest.raises(BundleError, match=r"missing\.json"):
        Calibrator.from_file(tmp_path / "missing.json")


def test_flagged_excess_p_is_the_hypergeometric_upper_tail() -> None:
    """How often a random draw of the line's parts holds as many flagged ones as an export: the
    sum over C(F, k) C(N - F, n - k) / C(N, n), counted here with integers."""
    from math import comb

    from diffqc.calibration import flagged_excess_p

    def tail(big_n: int, big_f: int, n: int, m: int) -> float:
        return sum(comb(big_f, k) * comb(big_n - big_f, n - k) for k in range(m, n + 1)) / comb(big_n, n)

    for args in ((40, 4, 4, 4), (584, 13, 60, 2), (388, 163, 14, 14), (100, 50, 10, 3)):
        assert flagged_excess_p(*args) == pytest.approx(tail(*args), rel=1e-9)
    assert flagged_excess_p(40, 4, 4, 4) == pytest.approx(1 / 91390)
    assert flagged_excess_p(40, 4, 0, 0) == 1.0 and flagged_excess_p(40, 4, 10, 0) == 1.0


def test_far_above_names_the_few_scores_beyond_the_bulk_and_rarely_a_good_one() -> None:
    """Defects among a type's GOOD calibration images score far above the rest (11x, 3.4x and 3.3x
    the median in a synthetic type with 3 of 23 so): each is named, highest first, while the
    median and spread of the bulk stay the GOOD images'. GOOD scores alone (gamma or log-normal
    draws of 22, as a type's calibration set) are named in well under 1 % of types, and fewer
    than 10 scores are never judged."""
    rng = np.random.default_rng(0)
    good = np.exp(rng.normal(0.0, 0.2, 20)) * 100
    scores = np.concatenate([good[:7], [1145.0], good[7:14], [335.0, 329.0], good[14:]])
    assert far_above(scores) == [7, 15, 16]
    assert far_above(good) == []
    assert far_above(scores[:9]) == []  # too few to judge
    named = [bool(far_above(draw)) for draw in (*(rng.gamma(k, 1.0, 22) for k in (1, 2, 5, 20)
                                                  for _ in range(250)),
                                                *(np.exp(rng.normal(0, 0.3, 22)) for _ in range(1000)))]
    assert np.mean(named) < 0.01


def test_calibration_scores_all_alike_are_named_as_never_flagging_not_a_tail_of_no_width() -> None:
    """Two copies of one GOOD image calibrated a type: its two equal scores gave an exponential
    tail of no width (a scale of 1e-12), so a GOOD part scoring a hair above them got p = 0 and
    REJECT. Scores all alike fit no tail, as a single score does: the type is named as one that
    flags no part (`calibrate` refuses it), not one that rejects every part above them."""
    with pytest.warns(CalibrationWarning) as record:
        cal = Calibrator(CalibrationConfig()).fit({"stripes": [57.3, 57.3], "edge": [1.0, 2.0]})
    assert cal.decide(cal.p_value("stripes", 57.31)) == "PASS"
    assert cal.p_value("stripes", 1e9) == pytest.approx(1 / 3)  # conformal: no tail
    assert cal.unflaggable() == ["stripes"]
    text = str(record[0].message)
    assert "but stripes has calibration scores all alike" in text and "no part of it can be flagged" in text
    assert cal.decide(cal.p_value("edge", 1e9)) == "REJECT"  # two scores apart: a tail decides
