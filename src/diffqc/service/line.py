"""What the service does for the line beyond answering requests: push decisions (sinks), watch
for drift, pick up a new calibration, expire old artifacts. :class:`LineServices` wires the four
into a running service (``create_app`` starts it before the inspection worker, stops it after).

Configured by :class:`diffqc.service.app.ServiceSettings` fields: ``mqtt_url``,
``webhook_url``, ``webhook_max_attempts``, ``drift_window``, ``drift_min_parts``,
``drift_level``, ``calibration_poll_s``, ``retention_max_age_s``, ``retention_max_bytes``,
``retention_interval_s``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffqc.drift import DriftConfig, DriftEvent, DriftMonitor
from diffqc.recalibrate import CalibrationReloader
from diffqc.service.retention import RetentionPolicy, RetentionWorker
from diffqc.service.sinks import Dispatcher, Outbox, build_sinks
from diffqc.service.store import ArtifactStore, ResultRecord, ResultStore

log = logging.getLogger("diffqc.service")


class LineServices:
    """Sinks + outbox, drift monitor, calibration reloader and retention worker of one service."""

    def __init__(self, settings: Any, store: ResultStore, artifacts: ArtifactStore | None,
                 detector: Any, *, on_calibration: Callable[[], None] | None = None) -> None:
        self.store = store
        sinks = build_sinks(getattr(settings, "mqtt_url", None), getattr(settings, "webhook_url", None),
                            max_attempts=int(getattr(settings, "webhook_max_attempts", 8)))
        self.outbox: Outbox | None = None
        self.dispatcher: Dispatcher | None = None
        if sinks:
            self.outbox = Outbox(store, [s.name for s in sinks])
            self.dispatcher = Dispatcher(self.outbox, sinks)
        self.drift = DriftMonitor(DriftConfig(
            window=int(getattr(settings, "drift_window", 200)),
            min_parts=int(getattr(settings, "drift_min_parts", 30)),
            level=float(getattr(settings, "drift_level", 1e-4)),
        ))
        self.drift.listeners.append(self._on_drift)
        bundle = getattr(settings, "model_path", None) or getattr(detector, "path", None)
        self.reloader = CalibrationReloader(detector, Path(bundle)) if bundle else None
        self.poll_s = float(getattr(settings, "calibration_poll_s", 1.0))
        self.on_calibration = on_calibration
        policy = RetentionPolicy(getattr(settings, "retention_max_age_s", None),
                                 getattr(settings, "retention_max_bytes", None),
                                 float(getattr(settings, "retention_interval_s", 60.0))).validate()
        self.retention = (RetentionWorker(store, artifacts, policy)
                          if policy.active and artifacts is not None else None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Before the inspection worker starts: the outbox hook must see the first record."""
        if self.outbox is not None and self.dispatcher is not None:
            self.store.insert_hooks.append(self.outbox.enqueue_records)
            self.dispatcher.start()
        if self.retention is not None:
            self.retention.start()
        if self.reloader is not None:
            self._thread = threading.Thread(target=self._watch_calibration, name="diffqc-calibration",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """After the inspection worker stopped; what is not delivered stays in the outbox."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.retention is not None:
            self.retention.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.outbox is not None:
            hooks = self.store.insert_hooks
            if self.outbox.enqueue_records in hooks:
                hooks.remove(self.outbox.enqueue_records)

    # ------------------------------------------------------------------ listeners
    def on_record(self, rec: ResultRecord, seconds: float) -> None:
        """A pipeline listener: called after each record was committed."""
        if self.dispatcher is not None:
            self.dispatcher.notify()
        if rec.duplicate:
            return
        self.drift.observe(rec.feature_type, rec.p_value, decision=rec.decision,
                           predicted_type=rec.predicted_type, type_known=rec.type_known)

    def _on_drift(self, event: DriftEvent) -> None:
        log.warning("drift %s for type %r: D+=%.3f (threshold %.3f, %d parts)",
                    "ALARM" if event.alarm else "cleared", event.feature_type, event.statistic,
                    event.threshold, event.parts)
        if self.outbox is not None:
            try:
                self.outbox.enqueue_alarm(event.feature_type, event.to_json())
            except Exception:  # the store is down: the alarm is still in /metrics and the log
                log.exception("could not queue the drift alarm for the sinks")

    def check_calibration(self) -> bool:
        """Reload a changed calibration file now; True when it was reloaded."""
        if self.reloader is None or not self.reloader.check():
            return False
        self.drift.reset()  # old p-values no longer describe the new calibration
        if self.on_calibration is not None:
            self.on_calibration()
        return True

    def _watch_calibration(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_calibration()
            except Exception:
                log.exception("calibration check failed")

    # ------------------------------------------------------------------ reporting
    def metrics_lines(self) -> list[str]:
        out = self.drift.metrics_lines()
        if self.dispatcher is not None:
            try:
                out += self.dispatcher.metrics_lines()
            except Exception as exc:  # the store is down; the rest of /metrics still answers
                log.warning("sink metrics unavailable: %s", exc)
        if self.retention is not None:
            out += self.retention.metrics_lines()
        if self.reloader is not None:
            out += ["# HELP diffqc_calibration_reloads_total Calibrations picked up without a restart.",
                    "# TYPE diffqc_calibration_reloads_total counter",
                    f"diffqc_calibration_reloads_total {self.reloader.reloads}"]
        return out

    def status(self) -> dict[str, Any]:
        return {
            "drift": self.drift.snapshot(),
            "sinks": self.dispatcher.status() if self.dispatcher is not None else {},
            "retention": None if self.retention is None else {
                "max_age_s": self.retention.policy.max_age_s,
                "max_bytes": self.retention.policy.max_bytes,
                "expired_total": self.retention.expired_total,
                "kept_bytes": self.retention.kept_bytes,
            },
            "calibration": None if self.reloader is None else {
                "file": str(self.reloader.file),
                "reloads": self.reloader.reloads,
                "last_error": self.reloader.last_error,
            },
        }
