"""Drift watch: the one-sided KS statistic, its threshold, the monitor, mis-routed crops, and
the acceptance test through the real detector (calibrated GOOD parts, then a brightness shift)."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from diffqc.drift import (
    DriftConfig,
    DriftMonitor,
    alarm_threshold,
    is_misrouted,
    ks_below_uniform,
)
from diffqc.errors import ConfigError
from tests.conftest import write_clear_dataset


def test_ks_below_uniform_matches_the_definition() -> None:
    assert ks_below_uniform([]) == 0.0
    # D+ = max_i (i/m - p_(i)) on sorted p
    assert ks_below_uniform([0.9, 0.1, 0.5]) == pytest.approx(max(1 / 3 - 0.1, 2 / 3 - 0.5, 1 - 0.9))
    assert ks_below_uniform([0.999, 0.998]) == pytest.approx(0.001)  # larger than uniform: no drift
    grid = (np.arange(1, 101) - 0.5) / 100  # as uniform as 100 points get
    assert ks_below_uniform(grid) == pytest.approx(0.005)
    assert ks_below_uniform(np.full(50, 0.01)) == pytest.approx(0.99)


def test_alarm_threshold_is_massarts_bound() -> None:
    eps = alarm_threshold(200, 1e-4)
    assert math.exp(-2 * 200 * eps**2) == pytest.approx(1e-4)
    assert alarm_threshold(50, 1e-4) > eps  # fewer parts, wider band
    assert math.isinf(alarm_threshold(0, 1e-4))
    with pytest.raises(ConfigError, match="level"):
        alarm_threshold(10, 1.5)
    with pytest.raises(ConfigError, match="window"):
        DriftConfig(window=10, min_parts=20).validate()


def test_uniform_p_values_raise_no_alarm_and_small_ones_do() -> None:
    """Simulated exact-uniform p-values: no alarm in 20 000 parts (level 1e-4 per test, so the
    union bound allows 2 on average); a stream of p-values squeezed towards 0 alarms."""
    rng = np.random.default_rng(0)
    mon = DriftMonitor(DriftConfig(window=200, min_parts=30, level=1e-4))
    events = mon.observe_many(("a", float(p)) for p in rng.uniform(0, 1, 20000))
    assert events == []
    snap = mon.snapshot()["a"]
    assert snap["alarm"] is False and snap["window_parts"] == 200
    events = mon.observe_many(("a", float(p)) for p in rng.uniform(0, 1, 200) ** 3)
    assert len(events) == 1 and events[0].alarm and events[0].feature_type == "a"
    assert events[0].statistic > events[0].threshold
    # back to uniform: the alarm clears once the window has refilled
    events = mon.observe_many(("a", float(p)) for p in rng.uniform(0, 1, 400))
    assert len(events) == 1 and not events[0].alarm
    assert mon.snapshot()["a"]["alarms_total"] == 1


def test_no_test_before_min_parts_and_types_are_separate() -> None:
    mon = DriftMonitor(DriftConfig(window=100, min_parts=20, level=1e-3))
    assert mon.observe_many(("a", 0.001) for _ in range(19)) == []
    assert mon.snapshot()["a"]["threshold"] is None
    (event,) = mon.observe_many([("a", 0.001)])
    assert event.alarm and event.parts == 20
    spread = np.random.default_rng(1).permutation((np.arange(50) + 0.5) / 50)
    assert mon.observe_many(("b", float(p)) for p in spread) == []
    assert mon.snapshot()["b"]["alarm"] is False
    lines = "\n".join(mon.metrics_lines())
    assert 'diffqc_drift_alarm{feature_type="a"} 1' in lines
    assert 'diffqc_drift_alarm{feature_type="b"} 0' in lines
    mon.reset()
    assert mon.snapshot()["a"]["alarm"] is False and mon.snapshot()["a"]["window_parts"] == 0


def test_misrouted_parts_are_counted_and_kept_out_of_the_window() -> None:
    assert is_misrouted("a", "b", True)
    assert not is_misrouted("a", "a", True)
    assert not is_misrouted("a", "b", False)  # the type was predicted, not declared
    assert not is_misrouted("a", None, True)
    mon = DriftMonitor(DriftConfig(window=50, min_parts=10))
    for _ in range(30):
        assert mon.observe("a", 0.0001, predicted_type="b", type_known=True) is None
    snap = mon.snapshot()["a"]
    assert snap["misrouted_total"] == 30 and snap["window_parts"] == 0 and not snap["alarm"]
    assert 'diffqc_misrouted_total{feature_type="a",predicted_type="b"} 30' in mon.metrics_lines()
    assert mon.observe("a", 0.5, decision="NOT_INSPECTED") is None
    assert mon.observe("a", float("nan")) is None
    assert mon.snapshot()["a"]["parts_total"] == 30
