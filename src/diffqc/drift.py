"""Drift watch: are the line's parts still scored like the calibration set?

While a line runs as calibrated, the conformal p-value of a GOOD part is uniform on (0, 1]
(:mod:`diffqc.calibration`): ``P(p <= x) = x``. A lamp ageing, a new ink batch or a shifted
camera raises the scores of GOOD parts, and their p-values crowd towards 0 long before an
operator counts the extra REVIEWs. Per feature type, :class:`DriftMonitor` keeps the p-values
of the last ``window`` inspected parts and, after every part, computes the one-sided
Kolmogorov-Smirnov statistic against the uniform law

    D+ = max_x (F_window(x) - x) = max_i (i / m - p_(i)),

which grows when p-values are smaller than uniform (it ignores the harmless other direction).
All inspected parts enter the window, REVIEW and REJECT included: under a strong drift every
part is flagged and a PASS-only window would fall silent. A genuine defect rate d adds about d
to D+, so only a line that rejects a large share of its parts raises the alarm without drift,
which is worth an alarm too.

The alarm threshold is Massart's bound for the one-sided statistic,
``P(D+ > eps) <= exp(-2 m eps^2)``, solved for ``eps`` at a per-test level ``level``. The
monitor tests after every part, so over N parts the chance of any false alarm per type is at
most ``N * level`` (a union bound; overlapping windows make the true rate far smaller). The
alarm clears once ``D+`` falls below ``clear_fraction`` of the threshold (hysteresis, so that
it does not flap). Conformal p-values are discrete (steps of ``1/(n+1)`` for n calibration
images); the statistic taken at the sorted p-values is then conservative.

A type imaged by several cameras (the records' ``camera``) is also tested per camera, in a
window of its own: one camera of four whose lamp ages shifts only a quarter of the type's
window, which dilutes a moderate shift below the type's threshold, and the type's alarm would
not say which camera to look at. A camera's alarm names it. A type seen by one camera has no
camera windows (they would repeat the type's test). Each camera window is one more test per
part, so the union bound above grows by the number of cameras.

A new calibration empties the windows (old p-values no longer apply) and clears each raised
alarm aloud (an event per alarm). A restarted service refills the windows with the stored
parts of the model it serves (:meth:`DriftMonitor.refill`) and raises again the alarms its
predecessor left raised (:meth:`DriftMonitor.restore`, kept in the result store by the
service) until its own parts clear them: a restart is no remedy for drift. A kept alarm raised
before the calibration served was written, or of a type the model served lacks, is cleared
aloud instead, as a new calibration or model clears it.

A part whose predicted type (the type router's pick; for a model with layouts, tiled, padded
or cropped, the type of the largest known-type p-value over every type) differs from the type it was declared
as is *mis-routed* (a crop sent down the wrong lane): it is counted apart and kept out of the
window, since its p-value says nothing about drift.

The functions are pure; :class:`DriftMonitor` is the small, thread-safe state the service keeps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffqc.errors import ConfigError

NOT_INSPECTED = "NOT_INSPECTED"


def ks_below_uniform(p_values: Sequence[float] | np.ndarray) -> float:
    """One-sided KS statistic ``max_i (i/m - p_(i))`` (0 for an empty sample); large when the
    p-values are stochastically smaller than uniform."""
    p = np.sort(np.asarray(p_values, dtype=np.float64))
    m = p.size
    if m == 0:
        return 0.0
    return float(max(0.0, np.max(np.arange(1, m + 1) / m - p)))


def alarm_threshold(m: int, level: float) -> float:
    """The ``eps`` with ``exp(-2 m eps^2) = level``: ``P(D+ > eps) <= level`` for uniform p."""
    if m < 1:
        return math.inf
    if not 0.0 < level < 1.0:
        raise ConfigError(f"drift level must be in (0, 1), got {level}")
    return math.sqrt(math.log(1.0 / level) / (2.0 * m))


def scored(p_value: float | None, decision: str) -> bool:
    """A part with a p-value to test: inspected (not NOT_INSPECTED), its p-value finite."""
    return decision != NOT_INSPECTED and p_value is not None and math.isfinite(p_value)


def is_misrouted(feature_type: str | None, predicted_type: str | None, type_known: bool | None) -> bool:
    """A part declared as one type that the model finds closest to another."""
    return bool(type_known) and predicted_type is not None and feature_type is not None and (
        predicted_type != feature_type
    )


def prometheus_label(value: object) -> str:
    """``value`` as a Prometheus label value (backslash, quote and newline escaped)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass(frozen=True)
class DriftConfig:
    window: int = 200  # p-values per type kept
    min_parts: int = 30  # no test before this many parts of a type
    level: float = 1e-4  # per-test false-alarm bound
    clear_fraction: float = 0.5  # the alarm clears below this share of the threshold
    max_cameras: int = 16  # camera windows per type (a camera is the client's free text)

    def validate(self) -> DriftConfig:
        if self.window < 2 or not 1 <= self.min_parts <= self.window:
            raise ConfigError(f"drift window must be >= 2 and 1 <= min_parts <= window, got "
                              f"window={self.window}, min_parts={self.min_parts}")
        alarm_threshold(1, self.level)
        if not 0.0 < self.clear_fraction <= 1.0:
            raise ConfigError(f"drift clear_fraction must be in (0, 1], got {self.clear_fraction}")
        if self.max_cameras < 0:
            raise ConfigError(f"drift max_cameras must be at least 0, got {self.max_cameras}")
        return self


@dataclass
class TypeState:
    """What the monitor knows of one feature type."""

    window: deque[float]
    statistic: float = 0.0
    threshold: float = math.inf
    alarm: bool = False
    alarms_total: int = 0
    parts_total: int = 0
    misrouted_total: int = 0
    untracked_camera_parts: int = 0  # parts of cameras beyond max_cameras (the type's window only)
    since: float | None = None  # when the current alarm was raised


@dataclass(frozen=True)
class DriftEvent:
    """An alarm raised or cleared for a type, or for one camera of a type."""

    feature_type: str
    alarm: bool
    statistic: float
    threshold: float
    parts: int  # p-values in the window
    at: float
    detail: dict[str, Any] = field(default_factory=dict)
    camera: str | None = None  # None: the type's window (all its cameras)

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "drift_alarm" if self.alarm else "drift_cleared",
            "feature_type": self.feature_type,
            "camera": self.camera,
            "alarm": self.alarm,
            "statistic": round(self.statistic, 6),
            "threshold": round(self.threshold, 6),
            "window_parts": self.parts,
            "at": self.at,
            **self.detail,
        }


class DriftMonitor:
    """Sliding-window drift test per feature type, plus the mis-routed counter."""

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = (config or DriftConfig()).validate()
        self._lock = threading.Lock()
        self._types: dict[str, TypeState] = {}
        self._cameras: dict[str, dict[str, TypeState]] = {}  # type -> camera -> its window
        self.misrouted: Counter[tuple[str, str]] = Counter()  # (declared, predicted) -> n
        self.listeners: list[Callable[[DriftEvent], None]] = []

    def _tell(self, events: Iterable[DriftEvent]) -> None:
        """Give each event to every listener (outside the lock)."""
        for event in events:
            for fn in self.listeners:
                fn(event)

    @staticmethod
    def _cleared(feature_type: str, camera: str | None, st: TypeState, reason: str) -> DriftEvent:
        """The event of ``st``'s alarm cleared for ``reason`` (the calibration or model changed)."""
        return DriftEvent(feature_type, False, st.statistic, st.threshold, len(st.window), time.time(),
                          {"reason": reason}, camera)

    def _new_window(self) -> TypeState:
        return TypeState(deque(maxlen=self.config.window))

    def _state(self, feature_type: str) -> TypeState:
        st = self._types.get(feature_type)
        if st is None:
            st = self._types[feature_type] = self._new_window()
        return st

    def observe(self, feature_type: str | None, p_value: float | None, *, decision: str = "",
                predicted_type: str | None = None, type_known: bool | None = True,
                camera: str | None = None) -> list[DriftEvent]:
        """Take one inspected part; returns the events it caused: its type's alarm raised or
        cleared, then its camera's (each also given to the listeners)."""
        if feature_type is None or p_value is None or not scored(p_value, decision):
            return []
        events: list[DriftEvent] = []
        with self._lock:
            st = self._state(feature_type)
            st.parts_total += 1
            if is_misrouted(feature_type, predicted_type, type_known):
                st.misrouted_total += 1
                self.misrouted[(feature_type, str(predicted_type))] += 1
                return []
            st.window.append(float(p_value))
            event = self._test(feature_type, st)
            if event is not None:
                events.append(event)
            cam = self._camera_state(feature_type, st, camera)
            if cam is not None and camera is not None:
                cam.parts_total += 1
                cam.window.append(float(p_value))
                # one camera alone is the type's own test; a restored alarm is tested by its camera
                if len(self._cameras[feature_type]) > 1 or cam.alarm:
                    event = self._test(feature_type, cam, camera)
                    if event is not None:
                        events.append(event)
        self._tell(events)
        return events

    def _camera_state(self, feature_type: str, st: TypeState, camera: str | None, *,
                      count: bool = True) -> TypeState | None:
        """``camera``'s window of the type (made on its first part); None without a camera, or
        for a camera beyond ``max_cameras`` (with ``count``, counted in the type's
        ``untracked_camera_parts``)."""
        if camera is None:
            return None
        cameras = self._cameras.setdefault(feature_type, {})
        cam = cameras.get(camera)
        if cam is None:
            if len(cameras) >= self.config.max_cameras:
                st.untracked_camera_parts += int(count)
                return None
            cam = cameras[camera] = self._new_window()
        return cam

    def _test(self, feature_type: str, st: TypeState, camera: str | None = None) -> DriftEvent | None:
        m = len(st.window)
        if m < self.config.min_parts:
            st.statistic, st.threshold = ks_below_uniform(st.window), math.inf
            return None
        st.statistic = ks_below_uniform(st.window)
        st.threshold = alarm_threshold(m, self.config.level)
        now = time.time()
        if not st.alarm and st.statistic > st.threshold:
            st.alarm, st.since = True, now
            st.alarms_total += 1
        elif st.alarm and st.statistic < self.config.clear_fraction * st.threshold:
            st.alarm, st.since = False, None
        else:
            return None
        flagged = float(np.mean(np.asarray(st.window) <= 0.05))
        return DriftEvent(feature_type, st.alarm, st.statistic, st.threshold, m, now,
                          {"share_p_below_0.05": round(flagged, 4)}, camera)

    def observe_many(self, parts: Iterable[tuple[str | None, float | None]]) -> list[DriftEvent]:
        """``observe`` each ``(feature_type, p_value)`` in order; the events that happened."""
        out: list[DriftEvent] = []
        for ftype, p in parts:
            out += self.observe(ftype, p)
        return out

    def _all_states(self) -> list[tuple[str, str | None, TypeState]]:
        """``(type, camera or None, state)`` of every window, the types' first."""
        return [(t, None, st) for t, st in sorted(self._types.items())] + [
            (t, c, st) for t, cams in sorted(self._cameras.items()) for c, st in sorted(cams.items())]

    def reset(self, reason: str = "calibration changed") -> list[DriftEvent]:
        """Forget every window (the calibration or the model changed: old p-values no longer
        apply). Each alarm that was raised is cleared aloud, with ``reason``: the events, also
        given to the listeners (a consumer holding the alarm's state, such as MQTT's retained
        message, would keep it)."""
        events = []
        with self._lock:
            for ftype, camera, st in self._all_states():
                if st.alarm:
                    events.append(self._cleared(ftype, camera, st, reason))
                st.window.clear()
                st.statistic, st.threshold = 0.0, math.inf
                st.alarm, st.since = False, None
        self._tell(events)
        return events

    def refill(self, parts: Iterable[tuple[str, float, str | None]]) -> None:
        """Put stored ``(feature_type, p_value, camera)`` back in the windows, oldest first (a
        restarted process): camera None into the type's window, a camera into that camera's
        (each window gets its own latest parts: a camera's share of the type's would be a
        fraction of its window). Neither tested nor counted as this process's parts; each
        window's statistic is measured, and the next part is tested against the whole window."""
        with self._lock:
            for ftype, p_value, camera in parts:
                st = self._state(ftype)
                if camera is None:
                    st.window.append(float(p_value))
                    continue
                cam = self._camera_state(ftype, st, camera, count=False)
                if cam is not None:
                    cam.window.append(float(p_value))
            for _, _, st in self._all_states():
                m = len(st.window)
                st.statistic = ks_below_uniform(st.window)
                st.threshold = (alarm_threshold(m, self.config.level) if m >= self.config.min_parts
                                else math.inf)

    def alarms(self) -> list[dict[str, Any]]:
        """The raised alarms, ``{"feature_type", "camera", "since"}`` each (camera None: the
        type's own), to keep across a restart (:meth:`restore`)."""
        with self._lock:
            return [{"feature_type": t, "camera": c, "since": st.since}
                    for t, c, st in self._all_states() if st.alarm]

    def restore(self, alarms: Iterable[dict[str, Any]], *, calibrated_at: float | None = None,
                types: Collection[str] | None = None, model_version: str | None = None) -> list[DriftEvent]:
        """Raise again the alarms a previous process had raised (:meth:`alarms`): each stays
        raised until its window (:meth:`refill`'s stored parts and the new ones, at least
        ``min_parts``) shows the line in order, then it is cleared, aloud; no second alarm.
        An alarm raised before ``calibrated_at`` (recalibrated while no process ran) or under
        another calibration file (its ``calibrated_at``: an undo put an earlier one back), under
        another model (its ``model_version``), or of a type not in ``types`` (the model now
        served has none: no part could clear it), is not raised but cleared aloud, as
        :meth:`reset` clears one ("calibration changed", "model changed"): the events, also
        given to the listeners. An alarm that names no model or file is not checked by them."""
        events = []
        with self._lock:
            for alarm in alarms:
                ftype, camera = str(alarm["feature_type"]), alarm.get("camera")
                if (reason := self._stale(ftype, alarm, calibrated_at, types, model_version)) is not None:
                    st = (self._types.get(ftype) if camera is None
                          else self._cameras.get(ftype, {}).get(str(camera)))
                    events.append(self._cleared(ftype, None if camera is None else str(camera),
                                                st or self._new_window(), reason))
                    continue
                if camera is None:
                    st = self._state(ftype)
                else:  # kept across the restart even beyond max_cameras: it was raised
                    self._state(ftype)
                    st = self._cameras.setdefault(ftype, {}).setdefault(str(camera), self._new_window())
                since = alarm.get("since")
                st.alarm, st.since = True, float(since) if since is not None else time.time()
        self._tell(events)
        return events

    @staticmethod
    def _stale(feature_type: str, alarm: dict[str, Any], calibrated_at: float | None,
               types: Collection[str] | None, model_version: str | None) -> str | None:
        """Why a kept alarm no longer holds (:meth:`restore`), or None."""
        if types is not None and feature_type not in types:
            return "model changed"
        if model_version and alarm.get("model_version") and alarm["model_version"] != model_version:
            return "model changed"
        if calibrated_at is None:
            return None
        since, raised_under = alarm.get("since"), alarm.get("calibrated_at")
        if (since is not None and float(since) < calibrated_at) or (
                raised_under is not None and float(raised_under) != calibrated_at):
            return "calibration changed"
        return None

    @staticmethod
    def _row(st: TypeState) -> dict[str, Any]:
        return {
            "statistic": st.statistic,
            "threshold": None if math.isinf(st.threshold) else st.threshold,
            "alarm": st.alarm,
            "alarm_since": st.since,
            "window_parts": len(st.window),
            "alarms_total": st.alarms_total,
            "parts_total": st.parts_total,
        }

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per type: its window's test, ``misrouted_total``, and ``cameras``: per camera, its
        own window's test (``{}`` unless the type was seen by two cameras or more, or a camera's
        alarm kept across a restart is raised)."""
        with self._lock:
            out = {}
            for t, st in sorted(self._types.items()):
                cameras = self._cameras.get(t, {})
                out[t] = {**self._row(st), "misrouted_total": st.misrouted_total,
                          "untracked_camera_parts": st.untracked_camera_parts,
                          "cameras": {c: self._row(cameras[c]) for c in sorted(cameras)}
                          if len(cameras) > 1 or any(c.alarm for c in cameras.values()) else {}}
            return out

    def metrics_lines(self) -> list[str]:
        """Prometheus text lines (same style as :class:`diffqc.service.app.Metrics`)."""
        snap = self.snapshot()
        with self._lock:
            misrouted = sorted(self.misrouted.items())
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        lab = prometheus_label
        head("diffqc_drift_statistic", "gauge",
             "One-sided KS statistic of the window's p-values against uniform, per type.")
        for t, row in snap.items():
            out.append(f'diffqc_drift_statistic{{feature_type="{lab(t)}"}} {row["statistic"]:.6f}')
        head("diffqc_drift_threshold", "gauge", "Alarm threshold for the current window size (+Inf: "
             "too few parts yet).")
        for t, row in snap.items():
            th = row["threshold"]
            out.append(f'diffqc_drift_threshold{{feature_type="{lab(t)}"}} '
                       + ("+Inf" if th is None else f"{th:.6f}"))
        head("diffqc_drift_alarm", "gauge", "1 while the type's drift alarm is raised.")
        for t, row in snap.items():
            out.append(f'diffqc_drift_alarm{{feature_type="{lab(t)}"}} {int(row["alarm"])}')
        head("diffqc_drift_window_parts", "gauge", "p-values in the type's window.")
        for t, row in snap.items():
            out.append(f'diffqc_drift_window_parts{{feature_type="{lab(t)}"}} {row["window_parts"]}')
        head("diffqc_drift_alarms_total", "counter", "Drift alarms raised per type.")
        for t, row in snap.items():
            out.append(f'diffqc_drift_alarms_total{{feature_type="{lab(t)}"}} {row["alarms_total"]}')
        cams = [(t, c, row) for t, type_row in snap.items() for c, row in type_row["cameras"].items()]
        head("diffqc_drift_camera_statistic", "gauge",
             "One-sided KS statistic of one camera's window, per type seen by several cameras.")
        for t, c, row in cams:
            out.append(f'diffqc_drift_camera_statistic{{feature_type="{lab(t)}",camera="{lab(c)}"}} '
                       f'{row["statistic"]:.6f}')
        head("diffqc_drift_camera_alarm", "gauge", "1 while one camera's drift alarm for a type is raised.")
        for t, c, row in cams:
            out.append(f'diffqc_drift_camera_alarm{{feature_type="{lab(t)}",camera="{lab(c)}"}} '
                       f'{int(row["alarm"])}')
        head("diffqc_misrouted_total", "counter",
             "Parts whose predicted type differs from the declared one.")
        for (declared, predicted), n in misrouted:
            out.append(f'diffqc_misrouted_total{{feature_type="{lab(declared)}",'
                       f'predicted_type="{lab(predicted)}"}} {n}')
        return out
