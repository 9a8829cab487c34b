"""What the service does for the line beyond answering requests: push decisions (sinks, and an
OPC UA server), watch for drift, pick up a new calibration or a retrained model, expire old
artifacts. :class:`LineServices` wires them into a running service (``create_app`` starts it
before the inspection worker, stops it after).

Configured by :class:`diffqc.service.app.ServiceSettings` fields: ``mqtt_url``,
``webhook_url``, ``webhook_max_attempts``, ``webhook_headers``, ``webhook_secrets``,
``opcua_url``, ``opcua_users``, ``opcua_trust``, ``drift_window``, ``drift_min_parts``,
``drift_level``, ``calibration_poll_s``, ``retention_max_age_s``, ``retention_max_bytes``,
``retention_interval_s``, ``disk_min_free_bytes``, ``disk_min_free_ratio``, ``tls_cert``,
``tls_key``, ``tls_warn_days``, ``push_parts``, ``part_types``, ``part_timeout_s`` (the
overdue parts: :class:`~diffqc.service.parts.OverdueParts`) and ``part_window_s``. It also
watches the free space of the disks it writes to (:class:`DiskWatch`), the TLS certificate it
serves (:class:`CertificateWatch`: its expiry, and renewed files served), the system clock
(:class:`ClockWatch`) and the bundle (:class:`ModelWatch`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffqc.bundle import check_weights, metadata_text, named_model_id, read_bundle
from diffqc.drift import DriftConfig, DriftEvent, DriftMonitor, is_misrouted, prometheus_label, scored
from diffqc.errors import BundleError
from diffqc.recalibrate import BundleChange, CalibrationReloader, FileChange, file_signature
from diffqc.runtime import EXPORT_FILE
from diffqc.service.logs import Outage, utc_minute
from diffqc.service.parts import PART_WINDOW_S, OverdueParts, PartVerdict, part_types
from diffqc.service.retention import RetentionPolicy, RetentionWorker
from diffqc.service.security import certificate_expiry
from diffqc.service.sinks import Dispatcher, Outbox, build_sinks, webhook_headers, webhook_secrets
from diffqc.service.store import ArtifactStore, ResultRecord, ResultStore, StoreError

log = logging.getLogger("diffqc.service")
ALARM_KEY = "drift_alarm/"  # the store's entries of raised drift alarms: + [type, camera(, station)]


class DiskWatch:
    """The free space of the file systems a service writes to: the SQLite store's folder and
    the kept images' and heat maps' folder. Records are never deleted, so a line's store grows
    until its disk is full, and then no part can be stored; a file system is ``low`` below
    ``min_free_bytes`` or ``min_free_ratio`` of its size, said in the log once each time it
    turns low and once when it has room again."""

    def __init__(self, folders: list[Path], *, min_free_bytes: int = 1 << 30,
                 min_free_ratio: float = 0.05) -> None:
        self.folders = folders
        self.min_free_bytes = min_free_bytes
        self.min_free_ratio = min_free_ratio
        self._low: dict[str, bool] = {}

    @staticmethod
    def _existing(folder: Path) -> Path:
        """``folder``, or the nearest parent that exists (a store not made yet)."""
        folder = folder.resolve()
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        return folder

    def check(self) -> list[dict[str, Any]]:
        """Per file system (the first of the folders on it): ``path``, ``free_bytes``,
        ``total_bytes``, ``free_ratio``, ``low``."""
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        for folder in (self._existing(f) for f in self.folders):
            try:
                device = os.stat(folder).st_dev
                usage = shutil.disk_usage(folder)
            except OSError:  # a share that dropped: the store says so itself
                continue
            if device in seen:
                continue
            seen.add(device)
            ratio = usage.free / usage.total if usage.total else 1.0
            low = usage.free < self.min_free_bytes or ratio < self.min_free_ratio
            path = str(folder)
            if low != self._low.get(path, False):
                if low:
                    log.warning("the disk of %s is nearly full: %.1f GB free (%.1f %%); records are never "
                                "deleted, and once it is full no part can be stored: free space, or move "
                                "the store (--db) or the kept images (--data-dir, --keep-days)",
                                path, usage.free / 1e9, 100 * ratio)
                else:
                    log.info("the disk of %s has room again: %.1f GB free", path, usage.free / 1e9)
            self._low[path] = low
            out.append({"path": path, "free_bytes": usage.free, "total_bytes": usage.total,
                        "free_ratio": round(ratio, 4), "low": low})
        return out

    def metrics_lines(self) -> list[str]:
        disks, lab = self.check(), prometheus_label
        out = ["# HELP diffqc_disk_free_bytes Free bytes on the file systems the service writes to.",
               "# TYPE diffqc_disk_free_bytes gauge"]
        out += [f'diffqc_disk_free_bytes{{path="{lab(d["path"])}"}} {d["free_bytes"]}' for d in disks]
        out += ["# HELP diffqc_disk_low 1 when a file system the service writes to is nearly full.",
                "# TYPE diffqc_disk_low gauge"]
        out += [f'diffqc_disk_low{{path="{lab(d["path"])}"}} {int(d["low"])}' for d in disks]
        return out




class ModelWatch:
    """The bundle a service serves. `diffqc train DATA --out SERVED` writes its files one by
    one, the weights first and ``metadata.json`` last; `diffqc export SERVED` writes
    ``export.json`` last; a bundle copied over it (``cp -r``, ``scp``, ``rsync``) comes in the
    copier's order. Once any of its files changed and all stayed as they are for one look, the
    bundle is loaded again (``load``: as at start, the runtime and precision chosen again, so a
    new export's faster runtime is taken) and :meth:`check` returns it, with whether it is
    another model (another ``model_id``); one that cannot be loaded (a damaged bundle, one
    copied in part) is said once, and the model served so far stays until the bundle changes
    again."""

    def __init__(self, bundle: Path, model_id: str, load: Callable[[], Any]) -> None:
        self.bundle = bundle
        self.model_id = model_id
        self.load = load
        self.reloads = 0
        self.last_error: str | None = None
        self._files = BundleChange(bundle)
        self._export = file_signature(bundle / EXPORT_FILE)  # as last loaded
        self._created = metadata_text(bundle, "created")  # when the model served was trained (ISO 8601, UTC)


    def check(self) -> tuple[Any, bool] | None:
        """``(detector, another model)`` when the bundle changed and was loaded; else None."""
        if not self._files.settled():
            return None
        export_now = file_signature(self.bundle / EXPORT_FILE)
        export = export_now != self._export
        try:
            model_id = named_model_id(self.bundle)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._failed(f"its metadata.json cannot be read ({exc})")
            return None
        if model_id == self.model_id and not export:  # `diffqc calibrate` rewrote it (the calibration's
            self._check_served()  # own watch takes the new calibration), or a hand edit
            return None
        t0 = time.perf_counter()
        try:
            detector = self.load()
        except Exception as exc:  # a damaged bundle, a failed export check: keep serving
            self._failed(str(exc))
            return None
        retrained = model_id != self.model_id
        runtime = f"{getattr(detector, 'runtime', 'torch')}, {getattr(detector, 'precision', 'fp32')}"
        created, served = metadata_text(self.bundle, "created"), self._created
        if retrained:  # one trained before the model it replaces: `train --undo` put it back
            earlier = created is not None and served is not None and created < served
            log.info("serving the %s model %s from %s without a restart (%s; loaded in %.1f s; it "
                     "replaces %s): drift windows start again", "earlier" if earlier else "retrained",
                     model_id, self.bundle, runtime, time.perf_counter() - t0, self.model_id)
        else:
            log.info("serving model %s from %s again, as its files changed (%s; loaded in %.1f s)",
                     model_id, self.bundle, runtime, time.perf_counter() - t0)
        self.model_id, self.last_error, self._created = model_id, None, created
        self._export = export_now
        self.reloads += 1
        return detector, retrained

    def _check_served(self) -> None:
        """The bundle changed under the served model's id: what the next start would refuse in it
        (a setting of the scores edited into config.json, a damaged file or weights) is said now, not when a
        restart after a power cut stops the line; the model served so far stays."""
        try:
            check_weights(self.bundle, read_bundle(self.bundle)[1])
        except (BundleError, OSError, ValueError) as exc:
            self._failed(f"{exc}; a restart would refuse this bundle")
        else:
            self.last_error = None

    def _failed(self, why: str) -> None:
        self.last_error = why
        log.error("the model in %s changed but cannot be served: %s; the service goes on serving model %s",
                  self.bundle, why, self.model_id)


class CertificateWatch:
    """The TLS certificate ``serve --tls-cert`` serves, until it expires, when every client that
    checks certificates (browsers, the MES) refuses the service. It is ``expiring`` within
    ``warn_days`` of its notAfter; the log says so once, and once that it ``expired``.

    With ``reload`` (the served SSL context's, :func:`diffqc.service.security.tls_reloader`),
    files changed on disk (certbot, cert-manager: ``renew`` looks at them every poll) are served
    without a restart; a change that cannot be served (a key that is not the certificate's) is
    said once, and the certificate served so far stays. Without it (or while a change cannot be
    served) the log says once that the file on disk was renewed while the service still serves
    the one it read."""

    def __init__(self, path: Path, *, warn_days: float = 14.0, key: Path | None = None,
                 reload: Callable[[], None] | None = None) -> None:
        self.path = path
        self.key = key
        self.warn_days = warn_days
        self.reload = reload
        self.not_after = certificate_expiry(path)  # the certificate being served
        self.reloads = 0
        self._files = FileChange(path, key)  # certbot moves a symbolic link, cert-manager a folder's
        self._said: set[str] = set()

    def renew(self) -> bool:
        """Serve the files anew when they changed and then stayed as they are for one look (a
        renewal that writes the certificate and the key one after the other is over), with
        ``reload``; True when the service now serves what they hold."""
        if self.reload is None or not self._files.settled():
            return False
        try:
            self.reload()
        except Exception as exc:
            log.warning("the TLS certificate %s changed on disk but cannot be served: %s; the service "
                        "goes on serving the one it had (it expires on %s)", self.path, exc,
                        utc_minute(self.not_after) if self.not_after is not None else "?")
            return False
        before, self.not_after = self.not_after, certificate_expiry(self.path)
        self.reloads += 1
        self._said -= {"expiring", "expired"}  # the new one is named in its own time
        log.info("serving the renewed TLS certificate %s (it expires on %s; the one before on %s) to new "
                 "connections, without a restart", self.path,
                 utc_minute(self.not_after) if self.not_after is not None else "?",
                 utc_minute(before) if before is not None else "?")
        return True

    def _say(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, message, *args)

    def check(self) -> dict[str, Any]:
        """``file``, ``not_after`` (epoch s), ``days_left``, ``expiring``, ``expired``,
        ``file_not_after`` (the file's certificate now), ``renewed_on_disk`` (a later one there
        than the one served) and ``reloads`` (renewed files served without a restart)."""
        on_disk = certificate_expiry(self.path)
        out: dict[str, Any] = {"file": str(self.path), "not_after": self.not_after, "days_left": None,
                               "expiring": False, "expired": False, "file_not_after": on_disk,
                               "renewed_on_disk": False, "reloads": self.reloads}
        if self.not_after is None:
            return out
        days = (self.not_after - time.time()) / 86400.0
        expired = days <= 0
        expiring = days < self.warn_days
        renewed = on_disk is not None and on_disk > self.not_after
        out.update(days_left=round(days, 2), expiring=expiring, expired=expired, renewed_on_disk=renewed)
        where = self.path, utc_minute(self.not_after)
        then = ("renew the file: the service serves a renewed one within seconds" if self.reload is not None
                else "renew it and restart the service (it reads the certificate at start)")
        if expired:
            self._say("expired", logging.ERROR, "the TLS certificate %s expired on %s: clients that check "
                      "certificates (browsers, the MES) refuse the service: %s", *where, then)
        elif expiring:
            self._say("expiring", logging.WARNING, "the TLS certificate %s expires on %s (in %.0f days): "
                      "%s; once it expires, clients that check certificates (browsers, the MES) refuse "
                      "the service", *where, days, then)
        if renewed and on_disk is not None and self.reload is None:
            self._say(f"renewed {on_disk}", logging.WARNING, "the TLS certificate %s was renewed on disk "
                      "(it expires on %s) but the service still serves the one it read at start (it "
                      "expires on %s): restart the service to serve the new one", self.path,
                      utc_minute(on_disk), utc_minute(self.not_after))
        return out

    def metrics_lines(self) -> list[str]:
        status, lab = self.check(), prometheus_label
        if status["not_after"] is None:
            return []
        file = lab(status["file"])
        return ["# HELP diffqc_tls_certificate_not_after_seconds When the served TLS certificate "
                "expires (seconds since the epoch).",
                "# TYPE diffqc_tls_certificate_not_after_seconds gauge",
                f'diffqc_tls_certificate_not_after_seconds{{file="{file}"}} {status["not_after"]:.0f}',
                "# HELP diffqc_tls_certificate_expiring 1 when the served TLS certificate expires soon "
                "or has expired.",
                "# TYPE diffqc_tls_certificate_expiring gauge",
                f'diffqc_tls_certificate_expiring{{file="{file}"}} {int(status["expiring"])}',
                "# HELP diffqc_tls_certificate_reloads_total Renewed certificate files served without a "
                "restart.",
                "# TYPE diffqc_tls_certificate_reloads_total counter",
                f'diffqc_tls_certificate_reloads_total{{file="{file}"}} {status["reloads"]}']


def _boot_clock() -> float:
    """Seconds since boot, suspend included where the system counts it (Linux's BOOTTIME)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class ClockWatch:
    """The wall clock every record's time is read from. An edge box without a clock battery
    boots at a date long past until NTP is reached, then steps; an operator sets it by hand.
    Records on either side of a step are that far apart, and ``--since`` and the dashboard's
    rates count by their times. A step of more than ``step_s`` against the boot-time clock is
    logged and counted, and the retention worker ages the parts this run stored before a step
    forward from their time plus the step (:meth:`read`: none of their files expires early); a clock that
    reads more than a day before the model was trained is named once (each time it turns so)."""

    def __init__(self, trained_at: float | None, *, step_s: float = 60.0,
                 wall: Callable[[], float] = time.time, boot: Callable[[], float] = _boot_clock) -> None:
        self.trained_at = trained_at
        self.step_s = step_s
        self._wall, self._boot = wall, boot
        self._offset: float | None = None
        self.steps_total = 0
        self.last_step_s: float | None = None
        self.ahead_s = 0.0  # the steps forward seen, in all
        self._behind = False
        self._lock = threading.Lock()  # the line's thread, /v1/line and /metrics check it

    def check(self) -> dict[str, Any]:
        """``steps_total``, ``last_step_s`` (signed: back is negative) and ``behind_model``."""
        with self._lock:
            return self._check(self._wall())

    def read(self) -> tuple[float, float]:
        """The wall clock's time, checked as :meth:`check` does, and the seconds it stepped forward
        so far (what the retention worker ages the parts stored before a step by)."""
        with self._lock:
            now = self._wall()
            self._check(now)
            return now, self.ahead_s

    def _check(self, now: float) -> dict[str, Any]:
        offset = now - self._boot()
        if self._offset is not None and abs(offset - self._offset) > self.step_s:
            step = offset - self._offset
            self.steps_total += 1
            self.last_step_s = step
            self.ahead_s += max(step, 0.0)
            log.warning("the system clock stepped %s by %.0f s (NTP reached, or set by hand): the times of "
                        "parts stored before it are that far %s those after it, and --since and the "
                        "dashboard's rates count by them", "forward" if step > 0 else "back", abs(step),
                        "behind" if step > 0 else "ahead of")
        self._offset = offset
        behind = self.trained_at is not None and now < self.trained_at - 86400.0
        if behind and not self._behind and self.trained_at is not None:
            log.warning("the system clock reads %s, before this model was trained (%s): it was not set (an "
                        "edge box without a clock battery, NTP not reached), and every record's time is "
                        "wrong until it is", utc_minute(now), utc_minute(self.trained_at))
        self._behind = behind
        return {"steps_total": self.steps_total, "last_step_s": self.last_step_s, "behind_model": behind}

    def metrics_lines(self) -> list[str]:
        status = self.check()
        return ["# HELP diffqc_clock_steps_total Steps of the system clock seen (more than a minute).",
                "# TYPE diffqc_clock_steps_total counter",
                f"diffqc_clock_steps_total {status['steps_total']}",
                "# HELP diffqc_clock_behind_model 1 while the system clock reads before the model was "
                "trained.",
                "# TYPE diffqc_clock_behind_model gauge",
                f"diffqc_clock_behind_model {int(status['behind_model'])}"]


def _trained_at(bundle: Path | None) -> float | None:
    """When the bundle's model was trained (metadata.json's ``created``), or None."""
    created = None if bundle is None else metadata_text(bundle, "created")
    try:
        return None if created is None else datetime.datetime.fromisoformat(created).timestamp()
    except ValueError:
        return None


class LineServices:
    """Sinks + outbox, OPC UA server, drift monitor, calibration and model reloaders, retention
    worker, and the disk, clock and certificate watches of one service."""

    def __init__(self, settings: Any, store: ResultStore, artifacts: ArtifactStore | None,
                 detector: Any, *, on_calibration: Callable[[], None] | None = None,
                 tls_reload: Callable[[], None] | None = None,
                 load_model: Callable[[], Any] | None = None,
                 on_model: Callable[[Any], None] | None = None) -> None:
        """``tls_reload``: serves renewed certificate files without a restart (the server's SSL
        context's, :func:`diffqc.service.security.tls_reloader`). ``load_model``: loads the
        bundle as the service did at start; with it a retrained bundle is served without a
        restart (:class:`ModelWatch`), handed to ``on_model`` to inspect with."""
        self.store = store
        sinks = build_sinks(getattr(settings, "mqtt_url", None), getattr(settings, "webhook_url", None),
                            mqtt_cert=getattr(settings, "mqtt_cert", None),
                            mqtt_key=getattr(settings, "mqtt_key", None),
                            mqtt_client_id=getattr(settings, "mqtt_client_id", None),
                            max_attempts=int(getattr(settings, "webhook_max_attempts", 8)),
                            timeout_s=float(getattr(settings, "webhook_timeout_s", 5.0)),
                            connections=int(getattr(settings, "webhook_connections", 1)),
                            headers=webhook_headers(getattr(settings, "webhook_headers", ())),
                            client_cert=getattr(settings, "webhook_cert", None),
                            client_key=getattr(settings, "webhook_key", None),
                            secrets=webhook_secrets(getattr(settings, "webhook_secrets", ())))
        self.outbox: Outbox | None = None
        self.dispatcher: Dispatcher | None = None
        # those a part of this line has (--part-types), when fewer than the model's
        self.chosen_part_types = tuple(getattr(settings, "part_types", None) or ())
        expected = part_types(list(getattr(detector, "classes_", None) or ()), self.chosen_part_types)
        window = float(getattr(settings, "part_window_s", PART_WINDOW_S))  # --part-window
        # names this service's kept drift alarms, its parts left waiting and its pushes, on a
        # store that several services share
        self.station: str | None = (getattr(settings, "watch_station", None)
                                    or getattr(settings, "station", None))
        if sinks:
            self.outbox = Outbox(store, [s.name for s in sinks], parts=getattr(settings, "push_parts", None),
                                 types=expected, window_s=window, station=self.station)
            self.dispatcher = Dispatcher(self.outbox, sinks)
        timeout = getattr(settings, "part_timeout_s", None)  # --part-timeout: the parts overdue
        self.overdue = (OverdueParts(store, float(timeout), expected, window_s=window, station=self.station)
                        if timeout is not None else None)
        self._overdue_saved = time.monotonic()  # how far its sweeps got, last kept in the store
        # overdue parts judged whose push the store refused (a full disk): pushed, in order, when it can write
        self._overdue_unpushed: list[tuple[PartVerdict, ResultRecord]] = []
        # the overdue parts not logged yet, by the types they lack, and when they were last (once a minute)
        self._overdue_said: tuple[float, Counter[str]] = (float("-inf"), Counter())
        self.drift = DriftMonitor(DriftConfig(
            window=int(getattr(settings, "drift_window", 200)),
            min_parts=int(getattr(settings, "drift_min_parts", 30)),
            level=float(getattr(settings, "drift_level", 1e-4)),
        ))
        bundle = getattr(settings, "model_path", None) or getattr(detector, "path", None)
        self.bundle = Path(bundle) if bundle else None
        self.model_watch = (ModelWatch(self.bundle, str(getattr(detector, "version", "") or ""), load_model)
                            if self.bundle is not None and load_model is not None else None)
        self.on_model = on_model
        follows = self.model_watch is not None
        self.reloader = (CalibrationReloader(detector, self.bundle, follows_retrain=follows)
                         if self.bundle is not None else None)
        self.opcua: Any = None  # the OPC UA server of the decisions (serve --opcua), made below
        types = list(getattr(detector, "classes_", None) or ())
        self._refill_windows(types, str(getattr(detector, "version", "") or ""))
        self.drift.listeners.append(self._on_drift)
        self._restore_alarms(types, str(getattr(detector, "version", "") or ""))
        self.poll_s = float(getattr(settings, "calibration_poll_s", 1.0))
        self.on_calibration = on_calibration
        policy = RetentionPolicy(getattr(settings, "retention_max_age_s", None),
                                 getattr(settings, "retention_max_bytes", None),
                                 float(getattr(settings, "retention_interval_s", 60.0))).validate()
        self.clock = ClockWatch(_trained_at(Path(bundle) if bundle else None))
        self.retention = (RetentionWorker(store, artifacts, policy, station=self.station,
                                          clock=self.clock.read)
                          if policy.active and artifacts is not None else None)
        folders = [store.path] if store.path is not None else []  # PostgreSQL's disk is its server's
        self.disk = DiskWatch(folders + ([artifacts.root] if artifacts is not None else []),
                              min_free_bytes=int(getattr(settings, "disk_min_free_bytes", 1 << 30)),
                              min_free_ratio=float(getattr(settings, "disk_min_free_ratio", 0.05)))
        cert = getattr(settings, "tls_cert", None)
        warn_days = float(getattr(settings, "tls_warn_days", 14.0))
        key = getattr(settings, "tls_key", None)
        self.certificate = (CertificateWatch(Path(cert).absolute(), warn_days=warn_days,
                                             key=Path(key).absolute() if key is not None else None,
                                             reload=tls_reload)
                            if cert is not None else None)  # the log names it wherever serve ran
        if getattr(settings, "opcua_url", None):
            from diffqc.service.opcua import OpcUaServer, read_users

            users_file = getattr(settings, "opcua_users", None)
            trust = getattr(settings, "opcua_trust", None)
            self.opcua = OpcUaServer(settings.opcua_url, list(getattr(detector, "classes_", None) or ()),
                                     model_version=str(getattr(detector, "version", "") or ""),
                                     users=None if users_file is None else read_users(users_file),
                                     certificate_dir=None if artifacts is None else artifacts.root / "opcua",
                                     trust_dir=None if trust is None else Path(trust).absolute(),
                                     chosen_part_types=self.chosen_part_types, store=store,
                                     part_window_s=window)
        self.disk_poll_s = 60.0
        # the overdue parts could not be judged or pushed: said once
        self._overdue_outage = Outage(
            log, "cannot judge or push the overdue parts",
            "the overdue parts can be judged and pushed again; checks failed meanwhile: %d, over %.0f s",
            level=logging.WARNING)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Before the inspection worker starts: the outbox hook must see the first record."""
        if self.outbox is not None and self.dispatcher is not None:
            self.store.insert_hooks.append(self.outbox.enqueue_records)
            self.dispatcher.start()
        if self.overdue is not None:  # the outbox's part verdicts, or a hook of its own
            if self.outbox is not None and self.outbox.parts is not None:
                self.outbox.overdue = self.overdue
            else:
                self.store.insert_hooks.append(self.overdue.on_insert)
            log.info("parts: complete with an image of each of %s; overdue %g s after their latest image "
                     "while incomplete", ", ".join(self.overdue.types or ()), self.overdue.timeout_s)
            self._resume_overdue()
        elif self.chosen_part_types:
            log.info("parts: complete with an image of each of %s", ", ".join(self.chosen_part_types))
        if self.retention is not None:
            self.retention.start()
        if self.opcua is not None:
            self.opcua.start()
            for alarm in self.drift.alarms():  # raised before a restart: still raised
                if alarm["camera"] is None:
                    self.opcua.alarm(alarm["feature_type"], True)
        self._thread = threading.Thread(target=self._watch, name="diffqc-line", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """After the inspection worker stopped; what is not delivered stays in the outbox, how
        far the overdue parts were judged in the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.overdue is not None:
            try:
                self._save_overdue()
            except Exception as exc:  # the next run judges again the parts since the last kept
                log.warning("cannot keep how far the overdue parts were judged: %s", exc)
        if self.retention is not None:
            self.retention.stop()
        if self.opcua is not None:
            self.opcua.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        hooks = self.store.insert_hooks
        for hook in (getattr(self.outbox, "enqueue_records", None), getattr(self.overdue, "on_insert", None)):
            if hook is not None and hook in hooks:
                hooks.remove(hook)

    # ------------------------------------------------------------------ listeners
    def on_record(self, rec: ResultRecord, seconds: float) -> None:
        """A pipeline listener: called after each record was committed."""
        if self.dispatcher is not None:
            self.dispatcher.notify()
        if rec.duplicate:
            return
        if self.opcua is not None:
            self.opcua.publish(rec)
        self.drift.observe(rec.feature_type, rec.p_value, decision=rec.decision,
                           predicted_type=rec.predicted_type, type_known=rec.type_known, camera=rec.camera)

    def _calibrated_at(self) -> float | None:
        """When the calibration file served was written; None without a bundle or that file."""
        if self.reloader is None:
            return None
        try:
            return self.reloader.file.stat().st_mtime
        except OSError:
            return None

    def _refill_windows(self, types: list[str], version: str) -> None:
        """Each type's drift windows from the store's latest parts of it (a restart, or a cron
        job's `watch --once`, would otherwise test nothing until ``min_parts`` new parts came):
        parts the model served (``version``, the records' ``model_version``) inspected since the
        calibration file was written, at most a week ago, neither NOT_INSPECTED nor mis-routed;
        the type's window from its latest parts, and each camera among them (up to
        ``max_cameras``, the latest seen first) from that camera's own. With a ``station``, its
        parts and those without one (a shared store holds other stations'). The file's date
        alone does not tell another model's parts (`train --undo` puts an older file back, a
        bundle copied with its dates keeps them): their p-values say nothing of this model's."""
        since = max(time.time() - 7 * 86400.0, self._calibrated_at() or 0.0)  # no file: the week
        config = self.drift.config

        def latest(ftype: str, camera: str | None = None) -> list[ResultRecord]:
            return self.store.query(feature_type=ftype, camera=camera, since=since, limit=config.window,
                                    station_or_none=self.station, model_version=version)

        def window(rows: list[ResultRecord], camera: str | None) -> list[tuple[str, float, str | None]]:
            return [(str(r.feature_type), float(r.p_value), camera) for r in reversed(rows)  # oldest first
                    if r.p_value is not None and scored(r.p_value, r.decision)
                    and not is_misrouted(r.feature_type, r.predicted_type, r.type_known)]

        parts: list[tuple[str, float, str | None]] = []
        try:
            for ftype in types:
                recent = latest(ftype)
                parts += window(recent, None)
                cameras = dict.fromkeys(r.camera for r in recent if r.camera is not None)
                for camera in list(cameras)[:config.max_cameras]:
                    parts += window(latest(ftype, camera), camera)
        except StoreError as exc:
            log.warning("the drift windows cannot be refilled from the store: %s", exc)
            return
        self.drift.refill(parts)

    def _restore_alarms(self, types: list[str], version: str) -> None:
        """Raise again the drift alarms a previous process left raised in the store: a restart
        must not clear an alarm that no parts have cleared (nor leave a consumer's copy of it,
        MQTT's retained message, raised for ever). One raised before the calibration file was
        written (recalibrated while stopped), under another calibration file or model than the
        one served (``version``; an undo puts the earlier ones back with their dates), or of a
        type the model served lacks (``types``; none named: not checked), is cleared aloud
        instead, as a new calibration or model clears it (:meth:`_on_drift`: the sinks told, its
        kept entry removed)."""
        try:
            kept = [json.loads(v) for v in self.store.meta_items(ALARM_KEY).values()]
        except (StoreError, ValueError) as exc:
            log.warning("the drift alarms raised before the restart cannot be read: %s", exc)
            return
        kept = [a for a in kept if a.get("station") == self.station]  # this service's, on a shared store
        events = self.drift.restore(kept, calibrated_at=self._calibrated_at(), types=types or None,
                                    model_version=version or None)
        cleared = {(e.feature_type, e.camera): e.detail["reason"] for e in events}
        for alarm in kept:
            where = "" if alarm.get("camera") is None else f" on camera {alarm['camera']!r}"
            if (reason := cleared.get((str(alarm["feature_type"]), alarm.get("camera")))) is not None:
                log.info("drift alarm for type %r%s, raised before the restart, cleared: %s since",
                         alarm["feature_type"], where, reason)
                continue
            log.warning("drift alarm for type %r%s, raised before the restart (%s), stays raised until "
                        "its parts show the line in order", alarm["feature_type"], where,
                        utc_minute(float(alarm.get("since") or time.time())))

    def _keep_alarm(self, event: DriftEvent) -> None:
        """The alarm's state in the store (raised: kept; cleared: removed), for a restart, with
        the model and calibration file it was raised under; under this service's ``station``, so
        that services sharing a store (stations on one PostgreSQL) keep their alarms apart."""
        scope = [event.feature_type, event.camera] + ([self.station] if self.station is not None else [])
        version = str(getattr(getattr(self.reloader, "detector", None), "version", "") or "")
        self.store.set_meta(ALARM_KEY + json.dumps(scope), json.dumps(
            {"feature_type": event.feature_type, "camera": event.camera, "since": event.at,
             "model_version": version or None, "calibrated_at": self._calibrated_at(),
             **({"station": self.station} if self.station is not None else {})}) if event.alarm else None)

    def _on_drift(self, event: DriftEvent) -> None:
        where = "" if event.camera is None else f" on camera {event.camera!r}"
        log.warning("drift %s for type %r%s: D+=%.3f (threshold %.3f, %d parts)",
                    "ALARM" if event.alarm else "cleared", event.feature_type, where, event.statistic,
                    event.threshold, event.parts)
        try:
            self._keep_alarm(event)
        except StoreError as exc:  # the alarm still reaches the log, /metrics and the sinks
            log.warning("could not keep the drift alarm's state in the store: %s", exc)
        if self.opcua is not None and event.camera is None:
            self.opcua.alarm(event.feature_type, event.alarm)
        if self.outbox is not None:
            try:
                self.outbox.enqueue_alarm(event.feature_type, event.to_json(), camera=event.camera)
            except Exception:  # the store is down: the alarm is still in /metrics and the log
                log.exception("could not queue the drift alarm for the sinks")

    def check_model(self) -> bool:
        """Serve a retrained bundle now, when there is one complete (:class:`ModelWatch`); True
        when the service now inspects with it."""
        if self.model_watch is None or self.bundle is None:
            return False
        loaded = self.model_watch.check()
        if loaded is None:
            return False
        detector, retrained = loaded
        before = getattr(self.reloader, "detector", None)  # the model served until now
        self.reloader = CalibrationReloader(detector, self.bundle, follows_retrain=True)
        if retrained:
            self.drift.reset("model changed")  # its p-values are the new model's
        types = list(getattr(detector, "classes_", None) or ())
        if lost := [t for t in getattr(before, "classes_", None) or () if t not in types]:
            log.warning("the model now served does not know %s, types the model before it inspected (its "
                        "types: %s): images sent as one are refused, and watch takes a folder of that name "
                        "for no type (scored under every type); was a type's folder left out of the "
                        "training data?", ", ".join(lost), ", ".join(types))
        unknown = [t for t in self.chosen_part_types if t not in types]
        if unknown:  # its parts cannot be complete: said, and the line's parts still need them
            log.warning("the model now served does not know %s of --part-types (its types: %s): parts "
                        "read them missing until a model that knows them is served", ", ".join(unknown),
                        ", ".join(types))
        expected = part_types(types, self.chosen_part_types)
        for judge in (self.outbox, self.overdue):
            if judge is not None:
                judge.types = expected
        if self.opcua is not None:
            self.opcua = self.opcua.use_model(types, str(getattr(detector, "version", "") or ""))
        if self.on_model is not None:
            self.on_model(detector)
        return True

    def _save_overdue(self) -> None:
        """Keep how far the overdue parts were judged, before any whose push waits: a restart
        judges those again."""
        assert self.overdue is not None
        self.overdue.save(before=min((rec.created_at for _, rec in self._overdue_unpushed), default=None))
        self._overdue_saved = time.monotonic()

    def _resume_overdue(self) -> None:
        """At start: the parts the previous run left waiting (a restart must not lose a part
        whose other crops never came), said when there are any."""
        assert self.overdue is not None
        try:
            resumed = self.overdue.resume(time.time())
        except Exception as exc:  # served all the same: the parts it stores are judged
            log.warning("cannot read the parts a previous run left waiting for their crops: %s", exc)
            return
        if resumed:
            log.info("parts a previous run left incomplete wait for their crops again: %d (overdue when "
                     "still incomplete in %g s)", resumed, self.overdue.timeout_s)

    def check_overdue(self) -> None:
        """--part-timeout: the parts whose other crops are overdue, counted (``/metrics``,
        ``/v1/line``), logged at most once a minute by the types they lack, and pushed with
        ``--push-parts``; the store down is said once, and once more when they can be judged
        and pushed again."""
        if self.overdue is None:
            return
        found = self.overdue.sweep(time.time())
        error = self.overdue.last_error
        unpushed = self._overdue_unpushed
        if self.outbox is not None and self.outbox.parts is not None:
            unpushed += found
            del unpushed[:-self.overdue.capacity]  # the oldest forgotten, as the parts waiting are
        pushed = 0
        try:
            while unpushed and self.outbox is not None:
                self.outbox.enqueue_overdue(*unpushed[0])
                del unpushed[0]
                pushed += 1
            if error is None and (found or pushed or time.monotonic() - self._overdue_saved >= 60.0):
                # at once after overdue parts were judged (a crash must not judge them again), and
                # once a minute (a restart then reads little of the store again)
                self._save_overdue()
        except Exception as exc:  # judged and counted; the rest pushed once the store can write
            error = str(exc) or type(exc).__name__
        if error is not None:
            self._overdue_outage.failed(f"{error}; trying again every {self.poll_s:g} s")
        else:
            self._overdue_outage.worked()
        said_at, lacking = self._overdue_said
        for verdict, _ in found:
            lacking.update(verdict.missing or ())
        if lacking and time.monotonic() - said_at >= 60.0:
            log.warning("parts overdue (incomplete %g s after their latest image), by the type they lack: "
                        "%s (a camera missing triggers?)", self.overdue.timeout_s,
                        ", ".join(f"{t} {n}" for t, n in lacking.most_common()))
            self._overdue_said = (time.monotonic(), Counter())

    def check_calibration(self) -> bool:
        """Reload a changed calibration file now; True when it was reloaded."""
        if self.reloader is None or not self.reloader.check():
            return False
        self.drift.reset()  # old p-values no longer describe the new calibration
        if self.on_calibration is not None:
            self.on_calibration()
        return True

    def _watch(self) -> None:
        """The clock, the certificate's files (renewed?), the bundle (retrained?) and its
        calibration file every ``poll_s``, the disks and the certificate's expiry every
        ``disk_poll_s`` (first now); one failing check does not stop the others."""
        disk_due = 0.0
        while True:
            if time.monotonic() >= disk_due:
                disk_due = time.monotonic() + self.disk_poll_s
                try:
                    self.disk.check()
                except Exception:
                    log.exception("disk check failed")
                try:
                    if self.certificate is not None:
                        self.certificate.check()
                except Exception:
                    log.exception("certificate check failed")
            try:
                self.clock.check()
            except Exception:
                log.exception("clock check failed")
            try:  # a renewed certificate is served within a poll (a stat of its files)
                if self.certificate is not None and self.certificate.renew():
                    self.certificate.check()
            except Exception:
                log.exception("certificate renewal failed")
            if self._stop.wait(self.poll_s):
                return
            try:
                self.check_overdue()
            except Exception:
                log.exception("overdue parts check failed")
            try:
                self.check_model()
            except Exception:
                log.exception("model check failed")
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
        if self.overdue is not None:
            out += ["# HELP diffqc_parts_overdue_total Parts without an image of this type --part-timeout "
                    "after their latest (a camera missing triggers).",
                    "# TYPE diffqc_parts_overdue_total counter"]
            out += [f'diffqc_parts_overdue_total{{feature_type="{prometheus_label(t)}"}} '
                    f'{self.overdue.lacking.get(t, 0)}'
                    for t in sorted({*(self.overdue.types or ()), *self.overdue.lacking})]
        out += self.disk.metrics_lines()
        out += self.clock.metrics_lines()
        if self.certificate is not None:
            out += self.certificate.metrics_lines()
        if self.reloader is not None:
            out += ["# HELP diffqc_calibration_reloads_total Calibrations picked up without a restart.",
                    "# TYPE diffqc_calibration_reloads_total counter",
                    f"diffqc_calibration_reloads_total {self.reloader.reloads}"]
        watches = [("model", self.model_watch), ("calibration", self.reloader)]
        if any(w is not None for _, w in watches):
            out += ["# HELP diffqc_bundle_change_refused 1 while a change to the served bundle cannot be "
                    "served (GET /v1/line's last_error says why): the model served so far stays, and a "
                    "restart may refuse the bundle.",
                    "# TYPE diffqc_bundle_change_refused gauge"]
            out += [f'diffqc_bundle_change_refused{{watch="{name}"}} {int(w.last_error is not None)}'
                    for name, w in watches if w is not None]
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
            "disk": self.disk.check(),
            "clock": self.clock.check(),
            "tls": None if self.certificate is None else self.certificate.check(),
            "opcua": None if self.opcua is None else self.opcua.status(),
            "parts": None if self.overdue is None else {
                "types": self.overdue.types,
                "timeout_s": self.overdue.timeout_s,
                "waiting": self.overdue.waiting(),
                "overdue_total": self.overdue.overdue_total,
                "lacking": dict(self.overdue.lacking),
                "last_at": dict(self.overdue.last_at),
            },
            "model": None if self.model_watch is None else {
                "bundle": str(self.model_watch.bundle),
                "model_id": self.model_watch.model_id,
                "reloads": self.model_watch.reloads,
                "last_error": self.model_watch.last_error,
            },
            "calibration": None if self.reloader is None else {
                "file": str(self.reloader.file),
                "reloads": self.reloader.reloads,
                "last_error": self.reloader.last_error,
            },
        }
