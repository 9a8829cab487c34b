"""The inspection service: FastAPI app, metrics, and the ``run_server`` entry point.

The model is loaded once in the lifespan. Upload decoding runs in the thread pool and
inference in the pipeline's own worker thread (:mod:`diffqc.service.buffer`), so the event
loop only moves bytes. A request is answered 200 only after its record is committed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import anyio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffqc import __version__
from diffqc.bundle import check_bundle_files, read_bundle
from diffqc.data import (
    DEFECTIVE,
    GOOD,
    MAX_NAME_LEN,
    MAX_SOURCE_LEN,
    decode_image,
    image_compression,
    label_of_word,
    unprintable,
)
from diffqc.drift import is_misrouted, prometheus_label
from diffqc.errors import ConfigError, DiffqcError, ImageReadError, did_you_mean_name, unknown_feature_type
from diffqc.machine import cgroup_memory_room
from diffqc.output import json_safe
from diffqc.service.buffer import (
    DEFAULT_BUFFER_BYTES,
    STOP_S,
    BatchTooLarge,
    BufferClosed,
    BufferFull,
    DetectorLike,
    InspectionPipeline,
    Job,
    OverflowPolicy,
)
from diffqc.service.line import LineServices
from diffqc.service.logs import Seldom
from diffqc.service.openapi import (
    FEATURE_TYPE_TEXT,
    PART_ID_TEXT,
    api_page,
    api_schema,
    asset_path,
    operation_id,
    upload_extra,
)
from diffqc.service.parts import (
    PART_WINDOW_S,
    check_part_types,
    latest_parts,
    part_summary_counts,
    part_types,
    part_verdict,
    stored_part,
)
from diffqc.service.security import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    ImageTooLarge,
    RefusedRequests,
    UploadStalled,
    UploadTooLarge,
    bearer_token,
    check_content_length,
    check_image_header,
    check_tls,
    kept_as_sent,
    reachable_from_others,
    read_limited,
    tls_reloader,
    token_matches,
    token_refusal,
    url_host,
)
from diffqc.service.sinks import (
    MAX_WEBHOOK_CONNECTIONS,
    PART_PUSHES,
    check_mqtt_client_cert,
    check_sink_urls,
    check_webhook_client_cert,
    webhook_auth,
    webhook_headers,
    webhook_secrets,
)
from diffqc.service.store import (
    DECISIONS,
    MAX_ROW_ID,
    NOT_INSPECTED,
    SUMMARY_KEYS,
    ArtifactStore,
    ResultRecord,
    ResultStore,
    ReviewConflict,
    StoreError,
    default_artifact_root,
    redact_url,
    store_url,
    summarize,
)
from diffqc.service.systemd import STOP_SIGNALS, Watchdog, notify, worker_problems
from diffqc.visualize import DEFAULT_HEATMAP_SIZE, as_read_png, overlay_scales

log = logging.getLogger("diffqc.service")
MIN_TOKEN_LENGTH = 16  # shorter, a token is said to be guessable at start (it is still taken)

STATIC_DIR = Path(__file__).parent / "static"
HTTP_SOURCE = "http"
MAX_ID_LEN = MAX_NAME_LEN


@dataclass
class ServiceSettings:
    """Everything ``create_app`` needs. ``tokens`` empty means no auth (``allow_no_token``)."""

    model_path: str | Path | None = None
    db_url: str = "diffqc-results.db"
    tokens: tuple[str, ...] = ()
    allow_no_token: bool = False
    data_dir: str | Path | None = None  # heat maps / kept images; default beside the DB
    buffer_size: int = 64
    buffer_max_bytes: int = DEFAULT_BUFFER_BYTES  # decoded images waiting, all parts together
    max_batch: int = 8
    overflow: str = OverflowPolicy.REJECT.value
    retry_after_s: int = 1
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_batch_upload_bytes: int = 64 * 1024 * 1024
    max_batch_items: int = 32
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    store_busy_timeout_s: float = 30.0  # SQLite: how long a write waits for another's lock
    body_timeout_s: float = 30.0  # an upload that sends nothing for this long gets 408
    decode_workers: int = 4  # uploads decoded at the same time (each holds its decoded image)
    keep_images: str = "flagged"
    heatmaps: str = "flagged"  # the dashboard shows them for REVIEW and REJECT parts
    heatmap_size: int = DEFAULT_HEATMAP_SIZE  # px, the image's longer side in a heat map; 0: its own
    all_types: bool = True  # score every type too (predicted type, type scores)
    part_types: tuple[str, ...] = ()  # the types a part of this line has (parts.part_types); (): the model's
    cors_origins: tuple[str, ...] = ()
    torch_threads: int | None = None  # CPU threads for inference (PyTorch or ONNX Runtime)
    runtime: str = "auto"  # torch | onnx | auto (see diffqc.runtime.choose_runtime)
    precision: str = "auto"  # ONNX model: fp32 | int8 | auto
    watch_dirs: tuple[str, ...] = ()  # folders fed into the same buffer
    watch_feature_type: str | None = None
    watch_line: str | None = None  # line / station / camera recorded for watched-folder parts
    watch_station: str | None = None
    watch_camera: str | tuple[str, ...] | None = None  # one for every folder, or one per folder
    watch_part_id_pattern: str | None = None  # the part id in a watched file's name

    def folder_camera(self, index: int) -> str | None:
        """The camera recorded on the parts of ``watch_dirs[index]``."""
        if isinstance(self.watch_camera, tuple):
            return self.watch_camera[index]
        return self.watch_camera
    # the line (diffqc.service.line): push sinks, drift watch, calibration reload, retention
    mqtt_url: str | None = None  # mqtt://host:port/prefix
    mqtt_cert: str | Path | None = None  # the client certificate an mqtts:// broker asks for (PEM)
    mqtt_key: str | Path | None = None  # its key, when not in mqtt_cert's file
    mqtt_client_id: str | None = None  # the one a broker's access list names; None: a random one
    webhook_url: str | None = None  # POST each decision as JSON
    webhook_max_attempts: int = 8  # then the message goes to the dead-letter table
    webhook_timeout_s: float = 5.0  # an answer slower than this is none (the message sent again)
    webhook_connections: int = 1  # above 1: pushes over that many kept connections at once, not in order
    webhook_headers: tuple[str, ...] = ()  # "Name: value" or "@FILE" (sinks.webhook_headers)
    webhook_cert: str | Path | None = None  # the client certificate an https:// endpoint asks for (PEM)
    webhook_key: str | Path | None = None  # its key, when not in webhook_cert's file
    push_parts: str | None = None  # the sinks also get a part's verdict: "each" time, or once "complete"
    part_timeout_s: float | None = None  # a part still incomplete this long after its latest image: overdue
    part_window_s: float = PART_WINDOW_S  # a part id's images this long before its latest: an earlier part's
    webhook_secrets: tuple[str, ...] = ()  # "whsec_..." or "@FILE": sign each push (sinks.webhook_secrets)
    opcua_url: str | None = None  # opc.tcp://host:port: an OPC UA server of the decisions (service.opcua)
    opcua_users: str | Path | None = None  # a name:password file: logins only, encrypted
    opcua_trust: str | Path | None = None  # with users: the trusted clients' certificates
    drift_window: int = 200  # p-values per type in the drift window
    drift_min_parts: int = 30
    drift_level: float = 1e-4  # false-alarm bound per drift test
    calibration_poll_s: float = 1.0  # how often the bundle's calibration file is stat'ed
    retention_max_age_s: float | None = None  # kept images / heat maps older than this go
    retention_max_bytes: int | None = None  # ... and the oldest beyond this disk budget
    retention_interval_s: float = 60.0
    disk_min_free_bytes: int = 1 << 30  # the store's or data folder's disk is low below this ...
    disk_min_free_ratio: float = 0.05  # ... or this share of its size (log, /v1/line, dashboard)
    tls_cert: str | Path | None = None  # serve over HTTPS: the certificate (PEM) ...
    tls_key: str | Path | None = None  # ... and its private key (PEM, unencrypted; else in tls_cert)
    tls_warn_days: float = 14.0  # the certificate is named as expiring this long before (log, /v1/line)
    root_path: str = ""  # the path a reverse proxy serves the service under ("/qc"): in the API's URLs

    def validate(self) -> None:
        if not self.tokens and not self.allow_no_token:
            raise ConfigError(
                "no API token: pass --token or set DIFFQC_TOKEN or DIFFQC_TOKEN_FILE (a file holding "
                "it) (or --no-auth on a trusted host)"
            )
        check_tls(self.tls_cert, self.tls_key)
        if self.root_path and not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", self.root_path):
            raise ConfigError(f"--root-path {self.root_path!r} must look like /qc or /line-1/qc (the path a "
                              "reverse proxy serves this service under; no trailing /)")
        policies = [p.value for p in OverflowPolicy]
        if self.overflow not in policies:
            raise ConfigError(f"overflow must be one of {', '.join(policies)}, got {self.overflow!r}")
        for name in ("buffer_size", "max_batch", "buffer_max_bytes", "decode_workers", "max_upload_bytes",
                     "max_batch_upload_bytes", "max_batch_items", "max_image_pixels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.retry_after_s) < 0:
            raise ConfigError(f"retry_after_s must be at least 0, got {self.retry_after_s}")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"body_timeout_s must be positive, got {self.body_timeout_s}")
        check_sink_urls(self.mqtt_url, self.webhook_url)
        check_mqtt_client_cert(self.mqtt_url, self.mqtt_cert, self.mqtt_key)
        if self.mqtt_client_id is not None and not self.mqtt_url:
            raise ConfigError("--mqtt-client-id needs --mqtt URL (the broker it names this service to)")
        if not self.webhook_timeout_s > 0:
            raise ConfigError(f"--webhook-timeout must be positive, got {self.webhook_timeout_s}")
        if not 1 <= self.webhook_connections <= MAX_WEBHOOK_CONNECTIONS:
            raise ConfigError(f"--webhook-connections must be 1 to {MAX_WEBHOOK_CONNECTIONS}, "
                              f"got {self.webhook_connections}")
        if self.webhook_headers and not self.webhook_url:
            raise ConfigError("--webhook-header needs --webhook URL (the endpoint it is sent to)")
        headers = webhook_headers(self.webhook_headers)
        if self.webhook_url:
            webhook_auth(self.webhook_url, headers)
        check_webhook_client_cert(self.webhook_url, self.webhook_cert, self.webhook_key)
        if self.opcua_url or self.opcua_users is not None or self.opcua_trust is not None:
            from diffqc.service.opcua import check_opcua_options

            check_opcua_options(self.opcua_url, self.opcua_users, self.opcua_trust)
        if self.push_parts is not None and self.push_parts not in PART_PUSHES:
            raise ConfigError(f"push_parts must be one of {', '.join(PART_PUSHES)}, got {self.push_parts!r}")
        if self.part_timeout_s is not None and not self.part_timeout_s > 0:
            raise ConfigError(f"part_timeout_s must be positive, got {self.part_timeout_s}")
        if not self.part_window_s > 0:
            raise ConfigError(f"part_window_s must be positive, got {self.part_window_s}")
        if self.push_parts and not (self.mqtt_url or self.webhook_url):
            raise ConfigError("--push-parts needs --mqtt or --webhook (the sinks it pushes to)")
        if self.webhook_secrets:
            if not self.webhook_url:
                raise ConfigError("--webhook-secret needs --webhook URL (the endpoint whose pushes it signs)")
            webhook_secrets(self.webhook_secrets)
        if isinstance(self.watch_camera, tuple) and len(self.watch_camera) != len(self.watch_dirs):
            raise ConfigError(f"--camera is given {len(self.watch_camera)} times for {len(self.watch_dirs)} "
                              "--watch folders: give it once (every folder's parts) or once per --watch, "
                              "in the same order")
        if self.watch_part_id_pattern is not None and not self.watch_dirs:
            raise ConfigError("--part-id-pattern needs --watch DIR (it reads the part id from a watched "
                              "file's name)")
        if self.watch_dirs:
            from diffqc.service.watch import (
                check_watch_folder,
                check_watch_folders_apart,
                compile_part_id_pattern,
            )

            if self.watch_part_id_pattern is not None:
                compile_part_id_pattern(self.watch_part_id_pattern)
            for folder in self.watch_dirs:  # serve moves the files it inspected
                check_watch_folder(folder, hint="serve --watch moves the files it inspected; for a "
                                   "folder this computer may only read, run `diffqc watch DIR MODEL "
                                   "--keep` beside the service")
            check_watch_folders_apart(self.watch_dirs)


# --------------------------------------------------------------------------- errors
class ServiceError(DiffqcError):
    """An error answered with ``status`` and a JSON body ``{"detail": ..., "code": ...}``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


def _error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail, "code": exc.code}, status_code=exc.status, headers=exc.headers)


# --------------------------------------------------------------------------- metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            cumulative += c
            lines.append(f'{name}_bucket{{le="{b:g}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.n}")
        return lines


# /metrics' last decision per (type, camera): at most this many series, seeded from this far back
LAST_SERIES = 256
LAST_SEED_S = 7 * 86400.0


class Metrics:
    """Counters kept in memory (they restart at zero with the process, as Prometheus expects)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.inference_seconds = 0.0
        self.responses: Counter[int] = Counter()
        self.rejected_uploads: Counter[str] = Counter()
        self.refused = RefusedRequests()  # requests refused for their token, said in the log
        # (feature type, camera) -> when its latest decision was stored: a camera gone silent
        self.last_at: dict[tuple[str, str], float] = {}

    def _note_last(self, ftype: str | None, camera: str | None, at: float) -> None:
        key = (ftype or "", camera or "")
        if key not in self.last_at and len(self.last_at) >= LAST_SERIES:
            return  # a client's camera names are its own text: the series are bounded
        self.last_at[key] = max(at, self.last_at.get(key, at))

    def seed_last(self, rows: Iterable[tuple[str | None, str | None, float]]) -> None:
        """The stored latest decision of each (type, camera), read at start (a restart would
        otherwise drop the series of a camera already silent)."""
        with self._lock:
            for ftype, camera, at in rows:
                self._note_last(ftype, camera, at)

    def on_record(self, rec: ResultRecord, seconds: float) -> None:
        with self._lock:
            self.decisions[(rec.feature_type or "", rec.decision)] += 1
            self._note_last(rec.feature_type, rec.camera, rec.created_at)
            if rec.decision != NOT_INSPECTED:
                self.latency.observe(seconds)

    def on_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            if size:
                self.batch.observe(size)
            self.inference_seconds += seconds

    def on_response(self, status: int) -> None:
        with self._lock:
            self.responses[status] += 1

    def on_bad_upload(self, code: str) -> None:
        with self._lock:
            self.rejected_uploads[code] += 1

    def render(self, pipeline: InspectionPipeline | None, model_version: str, pending: int) -> str:
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("diffqc_decisions_total", "counter", "Stored decisions per feature type.")
            for (ftype, decision), n in sorted(self.decisions.items()):
                labels = f'feature_type="{prometheus_label(ftype)}",decision="{decision}"'
                out.append(f"diffqc_decisions_total{{{labels}}} {n}")
            head("diffqc_last_decision_timestamp_seconds", "gauge",
                 "When the latest decision of a feature type and camera was stored (epoch seconds).")
            for (ftype, camera), at in sorted(self.last_at.items()):
                labels = f'feature_type="{prometheus_label(ftype)}",camera="{prometheus_label(camera)}"'
                out.append(f"diffqc_last_decision_timestamp_seconds{{{labels}}} {at:.3f}")
            head(
                "diffqc_inspection_latency_seconds",
                "histogram",
                "Time from enqueue to stored record, per inspected part.",
            )
            out += self.latency.render("diffqc_inspection_latency_seconds")
            head("diffqc_batch_size", "histogram", "Parts per inference micro-batch.")
            out += self.batch.render("diffqc_batch_size")
            head(
                "diffqc_inference_busy_seconds_total",
                "counter",
                "Time the worker spent on batches.",
            )
            out.append(f"diffqc_inference_busy_seconds_total {self.inference_seconds:.6f}")
            head("diffqc_http_responses_total", "counter", "HTTP responses per status code.")
            for code, n in sorted(self.responses.items()):
                out.append(f'diffqc_http_responses_total{{code="{code}"}} {n}')
            head(
                "diffqc_bad_uploads_total",
                "counter",
                "Uploads refused before inspection, by reason.",
            )
            for reason, n in sorted(self.rejected_uploads.items()):
                out.append(f'diffqc_bad_uploads_total{{reason="{prometheus_label(reason)}"}} {n}')
        head("diffqc_auth_refused_total", "counter", "Requests refused for their API token, by reason.")
        for reason, n in sorted(self.refused.totals.items()):
            out.append(f'diffqc_auth_refused_total{{reason="{reason}"}} {n}')
        if pipeline is not None:
            buf = pipeline.buffer
            head("diffqc_queue_depth", "gauge", "Parts waiting in the ring buffer.")
            out.append(f"diffqc_queue_depth {len(buf)}")
            head("diffqc_queue_capacity", "gauge", "Ring buffer capacity.")
            out.append(f"diffqc_queue_capacity {buf.capacity}")
            head("diffqc_queue_high_water", "gauge", "Largest queue depth seen.")
            out.append(f"diffqc_queue_high_water {buf.high_water}")
            head(
                "diffqc_parts_dropped_total",
                "counter",
                "Parts evicted by the drop_oldest policy (stored as NOT_INSPECTED).",
            )
            out.append(f"diffqc_parts_dropped_total {buf.dropped_total}")
            head("diffqc_parts_refused_total", "counter", "Parts refused with 503 (reject policy).")
            out.append(f"diffqc_parts_refused_total {buf.refused_total}")
            head("diffqc_inference_errors_total", "counter", "Parts whose inspection raised.")
            out.append(f"diffqc_inference_errors_total {pipeline.errors_total}")
            head("diffqc_queue_bytes", "gauge", "Bytes held by the parts waiting in the buffer.")
            out.append(f"diffqc_queue_bytes {buf.bytes}")
            head("diffqc_queue_max_bytes", "gauge", "Byte bound of the ring buffer.")
            out.append(f"diffqc_queue_max_bytes {buf.max_bytes or 0}")
            head(
                "diffqc_artifact_errors_total",
                "counter",
                "Heat maps or kept images that could not be written (the decision was stored).",
            )
            out.append(f"diffqc_artifact_errors_total {pipeline.artifact_errors_total}")
            head("diffqc_heatmaps_shed_total", "counter",
                 "Heat maps not drawn while more than half of the buffer waited (decisions first).")
            out.append(f"diffqc_heatmaps_shed_total {pipeline.heatmaps_shed_total}")
            head("diffqc_store_errors_total", "counter", "Micro-batches the store could not commit.")
            out.append(f"diffqc_store_errors_total {pipeline.store_errors_total}")
            head("diffqc_repeated_images_total", "counter",
                 "Parts whose image repeated a recent part's byte for byte (a stale camera frame).")
            out.append(f"diffqc_repeated_images_total {pipeline.repeated_images_total}")
            head("diffqc_parts_unlike_training_total", "counter",
                 "Parts of a type whose image came at another size, colour, compression or "
                 "brightness (dark, or clipped at white) than its training images (a changed camera).")
            for seen in pipeline.image_check.snapshot():
                labels = f'feature_type="{prometheus_label(seen["feature_type"])}",check="{seen["check"]}"'
                out.append(f"diffqc_parts_unlike_training_total{{{labels}}} {seen['parts']}")
        head("diffqc_review_pending", "gauge", "REVIEW decisions without an operator verdict.")
        out.append(f"diffqc_review_pending {pending}")
        head("diffqc_model_info", "gauge", "The loaded model.")
        out.append(f'diffqc_model_info{{version="{prometheus_label(model_version)}"}} 1')
        head("diffqc_build_info", "gauge", "The diffqc this service runs (a bundle a newer one wrote may "
             "hold settings it does not read).")
        out.append(f'diffqc_build_info{{version="{prometheus_label(__version__)}"}} 1')
        rss = resident_memory_bytes()
        if rss is not None:
            head("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
            out.append(f"process_resident_memory_bytes {rss}")
        return "\n".join(out) + "\n"


def page_url(host: str, port: int, scheme: str = "http", page: str = "dashboard") -> str:
    """Where this machine's browser finds a page (the dashboard, ``docs``) of a service bound to
    ``host``: a service on every address (``0.0.0.0``, ``::``) answers on ``localhost`` too."""
    host = {"0.0.0.0": "localhost", "::": "localhost", "": "localhost"}.get(host, host)
    return f"{scheme}://{url_host(host)}:{port}/{page}"


def listening_line(scheme: str, host: str, port: int) -> str:
    """The start's word of where the service listens and its dashboard and API page are; on a
    loopback address (the default), that no other machine reaches it (a tablet on the line found
    nothing there)."""
    here = ("" if reachable_from_others(host)
            else "only this computer reaches it: --host 0.0.0.0 serves the network too; ")
    return (f"listening on {scheme}://{url_host(host)}:{port}, dashboard at "
            f"{page_url(host, port, scheme)}, API at {page_url(host, port, scheme, 'docs')} "
            f"({here}Ctrl+C to stop)")


def resident_memory_bytes(pid: int | str = "self") -> int | None:
    """VmRSS from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


DRAIN_BYTES = 64 * 1024 * 1024  # the most of a request's body read and dropped to answer it


class _RequestBody:
    """Pure ASGI middleware over a request's body as its connection carries it. A body that
    stalls (no chunk for ``timeout_s`` seconds while more is announced) raises
    :class:`UploadStalled`, answered 408 ``body_timeout``; so a slow or stuck client cannot hold
    a connection and a worker forever. Once the body is complete, ``receive`` is left alone (it
    then only reports a disconnect). An answer that comes before the body was read whole (a
    413 of a body too large, a 401, a 503 while the store is down) is sent once the rest is read and
    dropped (up to :data:`DRAIN_BYTES` in all, within the timeout; one declared larger is
    answered at once): a connection closed with a body unread is reset, and a proxy that sends
    a body on once it has it whole (nginx) answered its client 502 instead. A client that asks
    before it sends (``Expect: 100-continue``) answered before anything was read is not let
    send it."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        done = asked = False
        received = reading = 0  # bytes so far; receives under way (a streamed answer's own)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        waits = headers.get(b"expect", b"").lower() == b"100-continue"  # to be let send it
        declared = headers.get(b"content-length", b"")
        has_body = b"transfer-encoding" in headers or (declared.isdigit() and int(declared) > 0)
        too_long = declared.isdigit() and int(declared) > DRAIN_BYTES

        async def timed_receive() -> Message:
            nonlocal done, received, asked, reading
            asked = True
            if done:
                return await receive()
            reading += 1
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise UploadStalled(self.timeout_s, received) from None
            finally:
                reading -= 1
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def drained_send(message: Message) -> None:
            # a streamed answer (a file, the dashboard) listens for a disconnect with its own receive
            unread = has_body and not done and not too_long and not reading and (asked or not waits)
            if message["type"] == "http.response.start" and unread:
                with contextlib.suppress(Exception):  # it stalls, the client is gone: answered as it can
                    while not done and received <= DRAIN_BYTES:
                        await timed_receive()
            await send(message)

        await self.app(scope, timed_receive, drained_send)


class _HeadAsGet:
    """Pure ASGI middleware answering a HEAD request as its GET is (status, headers, the token
    asked for alike) without the body: HTTP has a server take HEAD wherever it takes GET (an
    uptime monitor's check, ``curl -I`` of a kept image), and FastAPI's routes take only the
    methods they name. A route that takes no GET answers HEAD 405, as it answers GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless_send)


class _StatusCounter:
    """Pure ASGI middleware counting responses per status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.on_response(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


# --------------------------------------------------------------------------- JSON helpers
def _batch_parts(recs: Sequence[ResultRecord], types: Sequence[str]) -> list[dict[str, Any]]:
    """The verdict of each part id of a batch from the batch's images, in order of first image;
    ``types``: those a part should have (:func:`~diffqc.service.parts.part_types`)."""
    by_part: dict[str, list[ResultRecord]] = {}
    for rec in recs:
        if rec.part_id is not None:
            by_part.setdefault(rec.part_id, []).append(rec)
    return [part_verdict(pid, group, types).to_json() for pid, group in by_part.items()]


def record_json(rec: ResultRecord, root_path: str = "") -> dict[str, Any]:
    """A record as the API answers it; its pictures' URLs are paths under ``root_path`` (the
    path a proxy serves the service under, ``--root-path``)."""
    out = rec.to_json()
    rid = rec.id
    out["heatmap_url"] = f"{root_path}/v1/results/{rid}/heatmap" if rec.heatmap else None
    out["image_url"] = f"{root_path}/v1/results/{rid}/image" if rec.image else None
    out["misrouted"] = is_misrouted(rec.feature_type, rec.predicted_type, rec.type_known)
    out.pop("heatmap")
    out.pop("image")
    return json_safe(out)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last time ISO 8601 and Python write
_SPACED_OFFSET = re.compile(r"\d \d\d(:?\d\d)?$")  # 18:00+01:00 sent unescaped: "18:00 01:00"


def parse_time(value: str | None, name: str) -> float | None:
    """Epoch seconds, ISO 8601 (UTC when no offset; ``20251205``, its basic form of a date, too:
    no record is of 1970, which those digits are as seconds) or a span back from now (``8h``:
    eight hours ago; ``s``, ``m``, ``h``, ``d``, ``w``) -> epoch seconds."""
    if value is None or value == "":
        return None
    if span := _SPAN.fullmatch(value):
        return time.time() - float(span[1]) * _SPAN_SECONDS[span[2]]
    try:
        if re.fullmatch(r"\d{8}", value):  # a date, YYYYMMDD
            raise ValueError(value)
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):  # "nan", "inf": float() takes them, no time is one
            raise ServiceError(422, "bad_time", f"{name}={value!r} is not a time")
        if seconds > LAST_SECOND:  # JavaScript's Date.now(): no record's time, an empty answer
            raise ServiceError(422, "bad_time", f"{name}={value} lies past the year 9999 as epoch seconds: "
                               f"milliseconds? give seconds ({seconds / 1000:.0f})")
        return seconds
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        plus = "; a + in a URL's query reads as a space: write it %2B" if _SPACED_OFFSET.search(value) else ""
        raise ServiceError(
            422, "bad_time", f"{name}={value!r} is neither epoch seconds nor ISO 8601 nor a span "
            f"back from now such as 8h{plus}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def without_zone(value: str) -> dt.datetime | None:
    """The wall-clock time of an ISO 8601 ``value`` that names no zone (which :func:`parse_time`
    reads as UTC); None for any other form."""
    try:
        float(value)
        return None  # epoch seconds
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is None else None


# --------------------------------------------------------------------------- state
@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: Metrics = field(default_factory=Metrics)
    detector: DetectorLike | None = None
    store: ResultStore | None = None
    artifacts: ArtifactStore | None = None
    pipeline: InspectionPipeline | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    classes: list[str] = field(default_factory=list)
    part_types: list[str] = field(default_factory=list)  # those a part should have (parts.part_types)
    started: float = field(default_factory=time.time)
    watchers: list[Any] = field(default_factory=list)
    line: LineServices | None = None  # sinks, drift watch, calibration reload, retention
    tls_context: Any = None  # the SSL context uvicorn serves with (serve --tls-cert), set before it starts
    stop_signalled: float | None = None  # time.monotonic() of serve's first stop signal
    start_error: DiffqcError | None = None  # the start's failure of the user's input, said by the CLI

    def require(self) -> tuple[InspectionPipeline, ResultStore]:
        if self.pipeline is None or self.store is None:
            raise self.not_ready()
        return self.pipeline, self.store

    def not_ready(self) -> ServiceError:
        """The 503 of a request that comes while the service starts or stops, with the
        Retry-After its other 503s carry."""
        return ServiceError(503, "not_ready", "the service is starting or stopping",
                            headers={"Retry-After": str(self.settings.retry_after_s)})


def _model_info(det: Any) -> dict[str, Any]:
    meta = dict(getattr(det, "metadata", {}) or {})
    summary: dict[str, Any] = {}
    cal = getattr(det, "calibration_", None)
    if cal is not None and hasattr(cal, "summary"):
        summary = cal.summary()
    config = getattr(det, "config", None)
    thresholds: dict[str, Any] = {
        "alpha_review": summary.get("alpha_review"),
        "alpha_reject": summary.get("alpha_reject"),
        "types": {
            t: {"review": v.get("review_threshold"), "reject": v.get("reject_threshold")}
            for t, v in (summary.get("types") or {}).items()
        },
    }
    version = str(getattr(det, "version", "") or meta.get("model_id") or meta.get("version") or "")
    return json_safe(
        {
            "classes": list(getattr(det, "classes_", [])),
            "version": version,
            "model_id": meta.get("model_id"),
            "created": meta.get("created"),
            "method": meta.get("method"),
            "runtime": getattr(det, "runtime", "torch"),
            "precision": getattr(det, "precision", "fp32"),
            "diffqc_version": meta.get("diffqc_version"),
            "thresholds": thresholds,
            "calibration": summary,
            "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
        }
    )


def load_detector(model_path: str | Path, runtime: str = "auto", *, precision: str = "auto",
                  threads: int | None = None) -> DetectorLike:
    """The bundle on the CPU with PyTorch or ONNX Runtime (``auto``: the faster one that the
    export measured; see :func:`diffqc.runtime.load_detector`)."""
    from diffqc.runtime import load_detector as _load

    det: DetectorLike = _load(model_path, runtime, threads=threads, device="cpu", precision=precision)
    return det


# --------------------------------------------------------------------------- uploads
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 when larger, its rest read and dropped before the
    answer; a stalled body: see :class:`_RequestBody`)."""
    try:
        check_content_length(request.headers.get("content-length"), limit)
        return await read_limited(request.stream(), limit)
    except UploadTooLarge as exc:
        raise ServiceError(413, "upload_too_large", str(exc)) from None


def _content_type(request: Request) -> str:
    """The request's media type, without its parameters, in lower case."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _is_multipart(request: Request) -> bool:
    return _content_type(request) == "multipart/form-data"


def _is_json(request: Request) -> bool:
    return _content_type(request) == "application/json"


def _is_form(request: Request) -> bool:
    """Sent as an HTML form's fields: curl's ``-d``, which drops a file's line breaks."""
    return _content_type(request) == "application/x-www-form-urlencoded"


def _base64_body_limit(limit: int) -> int:
    """The largest JSON body that carries ``limit`` bytes of images: base64 is 4/3 their bytes,
    wrapped in lines of 76 with ``\\r\\n`` (4 characters in JSON) 80/76 of that, 1.40 in all;
    the other fields a few more."""
    return limit * 3 // 2 + 64 * 1024


_BASE64_LINE_BREAKS = str.maketrans("", "", " \t\r\n")


def _base64_bytes(text: str) -> bytes:
    """Base64 as encoders write it: wrapped in lines (MIME, GNU ``base64``, .NET's
    ``InsertLineBreaks``) or not, in the standard alphabet or the URL-safe one (``-_``), padded
    or not; anything else (another character, the two alphabets mixed) a ``binascii.Error``."""
    text = text.translate(_BASE64_LINE_BREAKS)
    if "-" in text or "_" in text:
        if "+" in text or "/" in text:
            raise binascii.Error("both base64 alphabets")
        text = text.translate(str.maketrans("-_", "+/"))
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _json_with_names(body: bytes) -> tuple[Any, list[str]]:
    """A JSON body and, when it is an object, its names as given, a name twice included (json
    keeps the last value, in silence)."""
    names: list[list[str]] = []  # each object's, the outer one last

    def keep_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names.append([name for name, _ in pairs])
        return dict(pairs)

    try:
        obj = json.loads(body, object_pairs_hook=keep_names)
    except ValueError as exc:
        raise ServiceError(422, "bad_request", f"the body is not valid JSON ({exc})") from None
    except RecursionError:  # [[[...]]] deeper than Python's parser goes (a 500 before)
        raise ServiceError(422, "bad_request", "the body's JSON is nested too deep to read") from None
    return obj, names[-1] if isinstance(obj, dict) else []


def _json_object(body: bytes, route: str) -> dict[str, Any]:
    """An upload's JSON object, its names those of a form (a misspelled one is a 422)."""
    obj, names = _json_with_names(body)
    if not isinstance(obj, dict):
        raise ServiceError(422, "bad_request", 'a JSON upload is an object: {"image": "<base64 of the '
                           'image file>", "feature_type": "...", "part_id": "..."}')
    _refuse_unknown(obj.keys(), UPLOAD_FIELDS, "JSON field", f"{route} takes the fields", "unknown_field")
    _refuse_repeated(names, UPLOAD_FIELDS, "JSON field", "repeated_field")
    return obj


def _json_text(name: str, value: object) -> str | None:
    """A JSON upload's value as text: a string, or a number's digits (a PLC's part id)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ServiceError(422, "bad_request", f"JSON field {name!r} must be a string")
    return str(value)


def _base64_image(value: object, where: str, limit: int | None) -> bytes:
    """The bytes of an image sent as base64 text or a data URL (at most ``limit``)."""
    if value is not None and value != "" and not isinstance(value, str):
        raise ServiceError(422, "bad_request", f"JSON field {where} must be one base64 string (or a data "
                           f"URL), got {type(value).__name__}"
                           + ("; several images: POST /v1/inspect/batch" if isinstance(value, list) else ""))
    if not value:
        raise ServiceError(400, "missing_image", f"the JSON body has no {where}: the image file's bytes "
                           "in base64, or a data URL (data:image/png;base64,...)")
    text = value.partition(",")[2] if value.startswith("data:") else value
    try:
        data = _base64_bytes(text)
    except (binascii.Error, ValueError):
        raise ServiceError(422, "unreadable_image", f"JSON field {where} is not base64 (nor a data URL): "
                           "the image file's bytes, base64-encoded") from None
    if limit is not None and len(data) > limit:
        raise ServiceError(413, "upload_too_large", str(UploadTooLarge(limit)))
    return data


def _json_upload(body: bytes, limit: int) -> tuple[bytes, dict[str, str]]:
    """An upload sent as JSON (a PLC's HTTP block, a JavaScript client that sends text):
    ``{"image": base64 of the file or a data URL, "feature_type", "part_id", "line", "station",
    "camera"}``. The image's bytes (at most ``limit``) and the other fields as strings (a number
    for a part id is taken as its digits); each fault is a :class:`ServiceError` naming it."""
    obj = _json_object(body, "/v1/inspect")
    fields = {name: text for name, value in obj.items()
              if name != "image" and (text := _json_text(name, value)) is not None}
    return _base64_image(obj.get("image"), "'image'", limit), fields


def _json_batch(body: bytes, max_items: int) -> tuple[list[bytes], list[str], list[str], dict[str, str]]:
    """A batch sent as JSON, the form's fields as lists: ``{"image": [base64, ...],
    "feature_type": one or a list, "part_id": [...], "line", "station", "camera"}``. The images'
    bytes, the types and part ids given (as the form's repeated fields) and the line fields."""
    obj = _json_object(body, "/v1/inspect/batch")
    images = obj.get("image")
    if not isinstance(images, list) or not images:
        raise ServiceError(400, "missing_image", "the JSON body has no 'image' list: each image file's "
                           "bytes in base64, or a data URL")
    if len(images) > max_items:
        raise ServiceError(413, "batch_too_large", f"{len(images)} images; at most {max_items}")
    datas = [_base64_image(v, f"'image' {i}", None) for i, v in enumerate(images)]

    def texts(name: str) -> list[str]:
        value = obj.get(name)
        items = value if isinstance(value, list) else [] if value is None else [value]
        return [_json_text(name, v) or "" for v in items]  # a null keeps its place: none, as "" in a form

    fields = {name: text for name in LINE_FIELDS if (text := _json_text(name, obj.get(name))) is not None}
    return datas, texts("feature_type"), texts("part_id"), fields


async def _parse_form(request: Request, body: bytes, max_files: int, spare_files: int = 0) -> Any:
    """Parse an already-read (size-limited) multipart body: up to ``max_files`` files, each
    with its ``feature_type`` and ``part_id``, and the line fields once (a few more spare);
    ``spare_files`` files more (text fields sent as files, named by :func:`_refuse_file_fields`)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(
            max_files=max_files + spare_files, max_fields=2 * max_files + len(LINE_FIELDS) + 8)
    except Exception as exc:
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ServiceError(400, "bad_multipart", f"cannot parse the multipart body: {detail}") from None


def _check_id(value: str | None, name: str, *, max_len: int = MAX_ID_LEN, breaks: bool = False,
              allow_empty: bool = True) -> str | None:
    """``value``; None for None or an empty one (no value, as a form's empty field sends it;
    with ``allow_empty=False``, a key that must name something, a 422 instead); or a 422
    ``bad_<name>`` when over ``max_len`` characters or holding a character :func:`unprintable`
    names (with ``breaks``, line breaks and tabs are let through: a note). PostgreSQL refuses a
    NUL in any text, so one would otherwise reach the store and read as the store being down."""
    if value is None or (value == "" and allow_empty):
        return None
    allowed = "\n\r\t" if breaks else ""
    if not value or len(value) > max_len or any(unprintable(c) and c not in allowed for c in value):
        but = " but line breaks and tabs" if breaks else ""
        raise ServiceError(
            422,
            f"bad_{name}",
            f"{name} must be 1..{max_len} printable characters of valid UTF-8 "
            f"(no control characters{but}, DEL or line separators)",
        )
    return value


LINE_FIELDS = ("line", "station", "camera")
# the fields of an upload's multipart form, and the query parameters a route reads by hand (the
# line fields, from the query or the form) beside those it declares
UPLOAD_FIELDS = ("image", "feature_type", "part_id", *LINE_FIELDS)
_QUERY_READ_BY_HAND = {"/v1/inspect": LINE_FIELDS, "/v1/inspect/batch": LINE_FIELDS}


def _refuse_unknown(names: Iterable[str], known: Collection[str], what: str, where: str,
                    code: str) -> None:
    """A 422 ``code`` for the first of ``names`` not ``known`` (``where`` says whose they are): a
    misspelled parameter or field (``featureType``, ``partid``) is not ignored, for ignored it
    loses a part id or a type, or a filter."""
    if unknown := sorted(set(names) - set(known)):
        near = did_you_mean_name(unknown[0], sorted(known), "_")
        names_known = ", ".join(sorted(known)) or "none"
        raise ServiceError(422, code, f"unknown {what} {unknown[0]!r}{near}; {where} {names_known}")


def _refuse_repeated(names: Iterable[str], once: Collection[str], what: str, code: str) -> None:
    """A 422 ``code`` for the first of ``names`` in ``once`` given more than once: the last was
    taken, in silence (a form built from a template and appended to), a part scored under
    another type or filed under another part id."""
    counts = Counter(names)
    if repeated := [name for name in counts if name in once and counts[name] > 1]:
        raise ServiceError(422, code, f"{what} {repeated[0]!r} given {counts[repeated[0]]} times: "
                           "it takes one value; give it once")


def _query_names(dependant: Any) -> dict[str, bool]:
    """The query parameters a route declares, its dependencies' included, each with whether it
    takes a list (``?by=line&by=camera``) rather than one value."""
    names = {p.alias: any(get_origin(a) in (list, tuple, set)
                          for a in (p.field_info.annotation, *get_args(p.field_info.annotation)))
             for p in dependant.query_params}
    for dependency in dependant.dependencies:
        names.update(_query_names(dependency))
    return names


async def _known_query_only(request: Request) -> None:
    """Every ``/v1/`` route's dependency: a query parameter it does not take, or one that takes
    a value given more than once, is a 422."""
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        by_hand = set(_QUERY_READ_BY_HAND.get(route.path, ()))
        declared = _query_names(route.dependant)
        known = set(declared) | by_hand
        body = body_model(request)
        if body is not None and (field := next((k for k in request.query_params
                                                 if k not in known and k in body.model_fields), None)):
            raise ServiceError(422, "unknown_parameter", f"{field!r} is a field of {route.path}'s JSON body, "
                               f"not a query parameter: send {_body_example(body)} (Content-Type: "
                               "application/json)")
        _refuse_unknown(request.query_params.keys(), known, "query parameter", f"{route.path} takes",
                        "unknown_parameter")
        _refuse_repeated([k for k, _ in request.query_params.multi_items()],
                         {name for name, is_list in declared.items() if not is_list} | by_hand,
                         "query parameter", "repeated_parameter")


def _line_meta(request: Request, form: Any | None = None) -> dict[str, str | None]:
    """``line``, ``station``, ``camera`` of an upload: query parameters, else form fields."""
    out: dict[str, str | None] = {}
    for name in LINE_FIELDS:
        value = request.query_params.get(name) or (_form_str(form, name) if form is not None else None)
        out[name] = _check_id(value, name)
    return out


def request_hash(data: bytes, feature_type: str | None, part_id: str | None) -> str:
    """SHA-256 of what an inspection request asks: the image, its type and its part id."""
    h = hashlib.sha256()
    for piece in (feature_type or "", part_id or ""):
        h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    h.update(data)
    return h.hexdigest()


def _check_replay(rec: ResultRecord, body_hash: str | None) -> None:
    """A stored decision may answer a replayed Idempotency-Key only for the same request."""
    if body_hash is not None and rec.body_hash is not None and rec.body_hash != body_hash:
        raise ServiceError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request (image, feature_type "
            "or part_id differ); send a new key for a new part",
        )


def _stored_answers(store: ResultStore, keys: Sequence[str], digests: Sequence[str | None], *,
                    batch: bool = False) -> dict[int, ResultRecord]:
    """The records a retry is answered with, by the index of the part: part ``i`` stored before
    under ``keys[i]``, asking the same (else ``409``, with ``batch`` naming the image). A part
    stored under its key ``NOT_INSPECTED`` is not done: it is absent, and inspected again."""
    done: dict[int, ResultRecord] = {}
    for i, (key, digest) in enumerate(zip(keys, digests, strict=True)):
        if (existing := store.find_key(HTTP_SOURCE, key)) is None:
            continue
        try:
            _check_replay(existing, digest)
        except ServiceError as exc:
            if not batch:
                raise
            raise ServiceError(exc.status, exc.code, f"image {i}: {exc.detail}") from None
        if existing.decision != NOT_INSPECTED:
            done[i] = existing
    return done


def build_job(
    data: bytes,
    feature_type: str | None,
    part_id: str | None,
    settings: ServiceSettings,
    *,
    source: str = HTTP_SOURCE,
    dedup_key: str | None = None,
    body_hash: str | None = None,
    line: str | None = None,
    station: str | None = None,
    camera: str | None = None,
    form: bool = False,
) -> Job:
    """Validate and decode one upload into a job (CPU work: call it off the event loop);
    ``form``: the body came as a form's fields (:func:`_is_form`)."""
    if not data:
        raise ServiceError(
            400,
            "empty_body",
            "empty body: send the image as the request body or as multipart field 'image'",
        )
    try:
        _, _, fmt = check_image_header(data, settings.max_image_pixels)
    except ImageTooLarge as exc:
        raise ServiceError(413, "image_too_large", str(exc)) from None
    try:
        image = decode_image(data, source=part_id or "upload")
    except ImageReadError as exc:
        hint = _FORM_BODY if form else _encoded_body(data)
        raise ServiceError(422, "unreadable_image", str(exc) + hint) from None
    ext = kept_as_sent(data, fmt)
    return Job(
        image=image,
        feature_type=feature_type,
        part_id=part_id,
        source=source,
        dedup_key=dedup_key,
        body_hash=body_hash,
        line=line,
        station=station,
        camera=camera,
        encoded=data if ext else None,
        encoded_ext=ext,
        compression=image_compression(data),
        digest=hashlib.sha256(data).hexdigest(),
    )


def _check_type(state: ServiceState, feature_type: str | None) -> str | None:
    if feature_type is None or feature_type == "":
        return None
    if feature_type not in state.classes:
        raise ServiceError(422, "unknown_feature_type",
                           str(unknown_feature_type(feature_type, state.classes)))
    return feature_type


async def _submit(state: ServiceState, jobs: list[Job]) -> list[ResultRecord]:
    pipeline, _ = state.require()
    try:
        futures = pipeline.submit_many(jobs)
    except BatchTooLarge as exc:  # not busy: no retry takes it
        room = state.settings.buffer_size
        raise ServiceError(413, "batch_too_large", f"{exc} (--buffer-size); send at most {room} a request, "
                           "or raise --buffer-size") from None
    except BufferFull as exc:
        raise ServiceError(
            503, "overloaded", str(exc), headers={"Retry-After": str(state.settings.retry_after_s)}
        ) from None
    except BufferClosed as exc:
        raise ServiceError(503, "shutting_down", str(exc), headers={"Retry-After": "5"}) from None
    try:
        # shield: a client that hangs up does not cancel the part; it is still stored
        recs = list(await asyncio.shield(asyncio.gather(*(asyncio.wrap_future(f) for f in futures))))
    except asyncio.CancelledError:  # uvicorn's, for the requests still open when a stop's time is up
        raise ServiceError(503, "shutting_down", "the service stopped before the part was answered; it may "
                           "have been stored (NOT_INSPECTED where it was not inspected in time): retry with "
                           "the same Idempotency-Key", headers={"Retry-After": "5"}) from None
    except Exception as exc:  # said by the pipeline's worker (once while the store refuses writes)
        raise ServiceError(
            503,
            "store_unavailable",
            f"the part could not be stored: {exc}",
            headers={"Retry-After": str(state.settings.retry_after_s)},
        ) from None
    for job, rec in zip(jobs, recs, strict=True):
        if rec.duplicate:  # a concurrent request with the same key won the insert
            _check_replay(rec, job.body_hash)
    return recs


# --------------------------------------------------------------------------- validation
HTTP_CODES = {400: "bad_request", 404: "no_such_route", 405: "method_not_allowed", 413: "upload_too_large"}
RECORD_ID = PathParam(ge=1, le=MAX_ROW_ID, description="a result id")
# query parameters several routes take, described once (docs/API.md, Times)
_TIMES = ("epoch seconds, ISO 8601 (`2026-12-03T08:00:00Z`; UTC without an offset), or a span back "
          "from now (`8h`)")
SINCE = Query(default=None, description=f"at or after this time: {_TIMES}")
UNTIL = Query(default=None, description=f"before this time: {_TIMES}")
PLACE = {name: Query(default=None, max_length=MAX_ID_LEN, description=f"seen at this {name} (exact match)")
         for name in LINE_FIELDS}
DECISION = Query(default=None, description="PASS, REVIEW, REJECT or NOT_INSPECTED (any case)")


def _route_told(request: Request, status: int, allow: str | None) -> str | None:
    """A 405's methods, and a 404's route that is there with the API's prefix (``POST /inspect``,
    a URL typed from memory), named; else None."""
    method, root = request.method, request.scope.get("root_path", "")
    path = request.scope["path"].removeprefix(root) if root else request.scope["path"]
    if status == 405 and allow:
        return f"{method} {root}{path}: this route takes {allow}"
    if status != 404 or path.startswith("/v1/"):
        return None
    scope = {**request.scope, "path": f"{root}/v1{path}"}
    for route in request.app.routes:  # the API's routes take GET or POST
        methods = [m for m in (method, "GET", "POST")
                   if route.matches({**scope, "method": m})[0] is Match.FULL]
        if methods:
            return f"no route {method} {root}{path}; the API's is {methods[0]} {root}/v1{path}"
    return None


def _header(request: Request, name: str) -> str | None:
    """A header as text; its raw bytes decoded as UTF-8 (U+FFFD where invalid, then refused)."""
    for key, value in request.headers.raw:
        if key.decode("latin-1").lower() == name:
            return value.decode("utf-8", "replace")
    return None


def body_model(request: Request) -> type[BaseModel] | None:
    """The JSON body model of the route ``request`` reached (``ReviewIn``), if it has one."""
    route = request.scope.get("route")
    for param in getattr(getattr(route, "dependant", None), "body_params", ()):
        model = param.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model
    return None


def _body_example(model: type[BaseModel]) -> str:
    """A JSON object of ``model``'s required fields (a literal's first value): ``{"verdict": "GOOD"}``."""
    example = {name: (get_args(f.annotation) or ("...",))[0] for name, f in model.model_fields.items()
               if f.is_required()}
    return json.dumps(example)


def _decision_filter(value: str | None) -> str | None:
    """A ``decision`` query parameter, in any case (``reject``), as stored; a 422 ``bad_decision``
    for another word."""
    decision = None if value is None else value.upper()
    if decision is not None and decision not in DECISIONS:
        raise ServiceError(422, "bad_decision", f"decision must be one of {', '.join(DECISIONS)}")
    return decision


def _verdict_meant(word: str) -> str:
    """`` (did you mean 'BAD'?)`` for a verdict in another word a line labels parts with
    (``good``, ``OK``, ``NOK``, ``i.O.``, ``fail``: :func:`~diffqc.data.label_of_word`), else
    ``""``: the verdict stays GOOD or BAD, as stored and exported."""
    label = label_of_word(word)
    meant = "GOOD" if label == GOOD else "BAD" if label == DEFECTIVE else None
    return f" (did you mean {meant!r}?)" if meant else ""


def validation_error(exc: RequestValidationError, *, route: str = "the route",
                     body: type[BaseModel] | None = None) -> ServiceError:
    """FastAPI's request-validation error in the service's own shape, ``{"detail", "code"}``:
    ``code`` is ``bad_<parameter>`` (e.g. ``bad_record_id``), ``detail`` one sentence per problem.
    With the route's JSON ``body`` model: a field it does not take is ``unknown_field`` (with the
    near miss), and a body that is no JSON object (a form, none, a string) says what to send."""
    problems: list[str] = []
    names: list[str] = []
    fields = sorted(body.model_fields) if body is not None else []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":  # its loc is ("body", <offset>): not a parameter
            names.append("json")
            problems.append(f"body: not valid JSON ({err.get('msg', 'invalid')})")
            continue
        if body is not None and err.get("type") == "extra_forbidden" and len(loc) == 2:
            try:
                _refuse_unknown([str(loc[1])], fields, "JSON field", f"{route} takes the fields",
                                "unknown_field")
            except ServiceError as refused:
                return refused
        if body is not None and loc == ("body",):  # missing, or not an object
            return ServiceError(422, "bad_request", "the body must be a JSON object (Content-Type: "
                                f"application/json), such as {_body_example(body)}; {route} takes the "
                                f"fields {', '.join(fields)}")
        names_at = [str(x) for x in loc if x not in ("path", "query", "body", "header")]
        name = names_at[0] if names_at else "request"
        names.append(name)
        value = err.get("input")
        if isinstance(value, str) and len(value) > 80:
            value = value[:80] + "…"
        got = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        if names_at and names_at[0] in ("verdict", "replaces") and isinstance(value, str):
            got += _verdict_meant(value)
        problems.append(f"{'.'.join(names_at) or 'request'}: {err.get('msg', 'invalid')}{got}")
    code = f"bad_{names[0]}" if len(set(names)) == 1 else "bad_request"
    return ServiceError(422, code, "; ".join(problems) or "invalid request")


def readiness_problems(state: ServiceState) -> tuple[dict[str, str], dict[str, str]]:
    """``(not ready, degraded)``: reasons per check (both empty: healthy). Writes to the store
    and the artifact folders, so call it off the event loop."""
    out: dict[str, str] = {}
    degraded: dict[str, str] = {}
    pipeline, store = state.pipeline, state.store
    if state.detector is None:
        out["model"] = "the model is not loaded"
    if pipeline is None:
        out["worker"] = "the service is starting or stopping"
    else:
        problems = pipeline.problems()
        if problems:
            out["worker"] = "; ".join(problems)
        buffer = pipeline.buffer
        if len(buffer) >= buffer.capacity:
            out["buffer"] = f"the buffer is full ({len(buffer)} parts waiting)"
        elif not buffer.room_for(buffer.last_bytes):
            out["buffer"] = (f"the buffer is full by bytes ({buffer.bytes} of {buffer.max_bytes} bytes "
                             f"waiting): no room for a part of {buffer.last_bytes} bytes, as the last")
    if store is None:
        out["store"] = "the result store is not open"
    else:
        reason = store.check_write()
        if reason is not None:
            out["store"] = reason
    if state.artifacts is not None:
        reason = state.artifacts.check_write()
        if reason is not None:
            degraded["artifacts"] = f"heat maps and kept images are not being written: {reason}"
    if unread := [w.problem for w in state.watchers if w.problem is not None]:
        degraded["watch"] = "; ".join(unread)  # posted parts are still inspected
    return out, degraded


READY_CHECKS = ("model", "worker", "store", "buffer")


# --------------------------------------------------------------------------- request models
class ReviewIn(BaseModel):
    # a misspelled "reviewr" is refused, not dropped. The example is the body Swagger UI's "Try
    # it out" starts from: without it, it sent every field as "string" (a defect kind with GOOD,
    # refused) and "replaces" as a verdict the part never had (a conflict)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"verdict": "BAD", "reviewer": "ann", "defect": "crack", "note": "at the left edge"}]})

    verdict: Literal["GOOD", "BAD"] = Field(description="the operator's verdict on the part")
    reviewer: str | None = Field(default=None, max_length=MAX_ID_LEN, description="who gives it")
    note: str | None = Field(default=None, max_length=2000, description="stored as `review_note`")
    defect: str | None = Field(default=None, max_length=MAX_ID_LEN,
                               description="with BAD only: the defect's kind (`GET /v1/defects`)")
    replaces: Literal["GOOD", "BAD"] | None = Field(
        default=None, description="the verdict the reviewer saw (null: none): refused (409) if another "
                                  "came first; left out, the latest verdict wins")


# --------------------------------------------------------------------------- the app
def create_app(settings: ServiceSettings, *, detector: DetectorLike | None = None) -> FastAPI:
    """The FastAPI app. ``detector``: an already loaded model (else ``settings.model_path``)."""
    settings.validate()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reload = None
        if state.tls_context is not None and settings.tls_cert is not None:  # renewed files served
            reload = tls_reloader(state.tls_context, settings.tls_cert, settings.tls_key,
                                  asyncio.get_running_loop())
        try:
            await run_in_threadpool(_start, state, detector, reload)
        except DiffqcError as exc:  # the command line's one line (serve_until_stopped), not a traceback
            state.start_error = exc
            raise
        status = f"inspecting with model {state.model_version}"
        watchdog = Watchdog(lambda: worker_problems(state.pipeline), status)
        watchdog.start()
        notify(f"READY=1\nSTATUS={status}")  # systemd's Type=notify: started now, not at exec
        try:
            yield
        finally:
            notify("STOPPING=1")
            watchdog.stop()
            await run_in_threadpool(_stop, state)

    app = FastAPI(
        title="diffqc inspection service",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.diffqc = state

    def _count_refused_upload(request: Request, code: str) -> None:
        """An upload refused before inspection (the inspect routes only: a bad query of
        /v1/results is no upload)."""
        path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))  # /qc/v1/...
        if path.startswith("/v1/inspect"):
            state.metrics.on_bad_upload(code)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status in (400, 408, 409, 413, 415, 422):
            _count_refused_upload(request, exc.code)
        return _error_response(exc)

    @app.exception_handler(UploadStalled)
    async def _stalled(request: Request, exc: UploadStalled) -> JSONResponse:
        _count_refused_upload(request, "body_timeout")
        return _error_response(ServiceError(408, "body_timeout", str(exc), headers={"Connection": "close"}))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own errors (unknown route, wrong method, a body FastAPI
        could not read) in the service's shape; a body that stalled while FastAPI read it: 408."""
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, UploadStalled):
            return await _stalled(request, cause)
        if isinstance(cause, UnicodeDecodeError):  # a JSON body FastAPI read (a review's) in cp1252
            return _error_response(ServiceError(422, "bad_json", f"the body is not UTF-8 text (byte "
                                                f"{cause.start}): send JSON in UTF-8"))
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = dict(exc.headers or {})
        if "GET" in headers.get("Allow", "").split(", "):  # answered as GET is (_HeadAsGet)
            headers["Allow"] += ", HEAD"
        detail = _route_told(request, exc.status_code, headers.get("Allow")) or str(exc.detail)
        return _error_response(ServiceError(exc.status_code, code, detail, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = getattr(request.scope.get("route"), "path", request.url.path)  # /v1/review/{record_id}
        err = validation_error(exc, route=path, body=body_model(request))
        _count_refused_upload(request, err.code)
        return _error_response(err)

    # requests refused by the store since its last line: said at most once a minute (a dashboard,
    # an HMI and a MES polling a database that is down would log a line each request)
    store_errors = Seldom()

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        if (more := store_errors.due()) is not None:
            since = f" ({more} more requests refused by the store since the last such line)" if more else ""
            log.error("result store error on %s: %s%s", request.url.path, exc, since)
        return _error_response(
            ServiceError(
                503,
                "store_unavailable",
                f"the result store is not available: {exc}",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        )

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            # a page of another origin is handed only the headers exposed to it: a 503's when to retry
            expose_headers=["Retry-After"],
        )
    app.add_middleware(_RequestBody, timeout_s=settings.body_timeout_s)
    app.add_middleware(_StatusCounter, metrics=state.metrics)
    app.add_middleware(_HeadAsGet)

    async def require_token(request: Request) -> None:
        if not settings.tokens:
            return
        given = bearer_token(request.headers.get("authorization"))
        if not token_matches(given, settings.tokens):
            client = request.client.host if request.client is not None else "an unknown address"
            reason, detail = token_refusal(given, request.headers, request.query_params.keys())
            said = state.metrics.refused.refuse(client, reason, time.time())
            if said is not None:
                log.warning("%s", said)
            raise ServiceError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(dependencies=[Depends(require_token), Depends(_known_query_only)])
    decode_limiter = anyio.CapacityLimiter(settings.decode_workers)

    # ---------------------------------------------------------------- health
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Ready when a part sent now would be inspected and stored: the model is loaded, the
        worker runs and its inspections are not failing, the store commits a write and the
        buffer has room (a free slot, and room for the bytes of a part as heavy as the last one
        taken: as an upload is refused under ``--overflow reject``); else 503 with ``reason``.
        Artifact folders that take no file (full disk, unwritable) and watched folders that
        cannot be read (a share that dropped) leave it ready, since posted parts are still
        inspected and stored, and are reported under ``degraded``."""
        reasons, degraded = await run_in_threadpool(readiness_problems, state)
        ok = not reasons
        body: dict[str, Any] = {"ready": ok, "checks": {k: k not in reasons for k in READY_CHECKS}}
        if not ok:
            body.update(code="not_ready", reason="; ".join(reasons.values()))
        if degraded:
            body["degraded"] = degraded
        return JSONResponse(body, status_code=200 if ok else 503)

    # ---------------------------------------------------------------- dashboard
    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        # relative: a proxy that serves the service under a path of its own (/qc/) keeps it
        return Response(status_code=307, headers={"Location": "dashboard"})

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        # The page holds no data; it asks the operator for a token and sends it with every call.
        html = (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(
            html,
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
            },
        )

    # ---------------------------------------------------------------- the API's description
    # no token: they hold no data (the routes they describe ask for it)
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> JSONResponse:
        root = request.scope.get("root_path", "") or settings.root_path
        return JSONResponse(api_schema(app, token=bool(settings.tokens), root_path=root))

    @app.get("/docs", include_in_schema=False)
    async def docs_page() -> HTMLResponse:
        return api_page()

    @app.get("/docs/{asset}", include_in_schema=False)
    async def docs_asset(asset: str) -> FileResponse:
        path = asset_path(asset)
        if path is None:
            raise ServiceError(404, "no_such_route", f"the API page has no file {asset!r}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    # ---------------------------------------------------------------- metrics
    @api.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        pending = await run_in_threadpool(state.store.pending_reviews) if state.store else 0
        text = state.metrics.render(state.pipeline, state.model_version, pending)
        if state.line is not None:
            text += "\n".join(await run_in_threadpool(state.line.metrics_lines)) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- the line
    @api.get("/v1/line", tags=["Model and status"])
    async def line_status() -> dict[str, Any]:
        """Drift watch per type, push sinks (pending, dead letters), retention, calibration, and
        the types whose parts came unlike their training images (size, colour)."""
        if state.line is None:
            raise state.not_ready()
        status = dict(await run_in_threadpool(state.line.status))
        status["started"] = state.started
        status["images"] = state.pipeline.image_check.snapshot() if state.pipeline is not None else []
        return dict(json_safe(status))

    @api.post("/v1/sinks/{name}/requeue", tags=["Sinks"])
    async def requeue_dead_letters(
        name: str = PathParam(max_length=MAX_ID_LEN, description="`webhook` or `mqtt`"),
    ) -> dict[str, Any]:
        """Send a sink's dead letters again (after its receiver was fixed)."""
        outbox = state.line.outbox if state.line is not None else None
        if outbox is None or name not in outbox.sinks:
            raise ServiceError(404, "not_found", f"no sink {name!r} is configured")
        return {"sink": name, "requeued": await run_in_threadpool(outbox.requeue_dead, name)}

    # ---------------------------------------------------------------- inspect
    @api.post("/v1/inspect", openapi_extra=upload_extra(LINE_FIELDS, batch=False), tags=["Inspection"])
    async def inspect(
        request: Request,
        feature_type: str | None = Query(default=None, max_length=MAX_ID_LEN, description=FEATURE_TYPE_TEXT),
        part_id: str | None = Query(default=None, max_length=MAX_ID_LEN, description=PART_ID_TEXT),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        ftype = _check_type(state, feature_type)
        part = _check_id(part_id, "part_id")
        key = _check_id(_header(request, "idempotency-key"), "idempotency_key", allow_empty=False)
        _, store = state.require()
        as_json = _is_json(request)
        body = await _read_body(request, _base64_body_limit(settings.max_upload_bytes) if as_json
                                else settings.max_upload_bytes)
        meta = _line_meta(request)
        fields: dict[str, str] | None = None  # the upload's own values, beside the image
        if as_json:  # base64 decoded off the event loop, as a form's images are
            data, fields = await anyio.to_thread.run_sync(_json_upload, body, settings.max_upload_bytes,
                                                          limiter=decode_limiter)
        elif _is_multipart(request):
            form = await _parse_form(request, body, max_files=1, spare_files=len(UPLOAD_FIELDS) - 1)
            try:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise _missing_image(form, "file field 'image'")
                _refuse_unknown(form.keys(), UPLOAD_FIELDS, "form field", "/v1/inspect takes the fields",
                                "unknown_field")
                _refuse_repeated([k for k, _ in form.multi_items()], UPLOAD_FIELDS, "form field",
                                 "repeated_field")
                _refuse_file_fields(form)
                data = await upload.read()
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
            finally:
                await form.close()
        else:
            data = body
        if fields is not None:  # the query wins
            ftype = _check_type(state, ftype or _form_str(fields, "feature_type"))
            part = part or _check_id(_form_str(fields, "part_id"), "part_id")
            meta = _line_meta(request, fields)
        digest = request_hash(data, ftype, part) if key is not None else None
        if key is not None and (done := await run_in_threadpool(_stored_answers, store, [key], [digest])):
            return _inspect_response(done[0], t0, duplicate=True)
        job = await decode(data, ftype, part, dedup_key=key, body_hash=digest, form=_is_form(request), **meta)
        (rec,) = await _submit(state, [job])
        return _inspect_response(rec, t0, duplicate=rec.duplicate)

    async def decode(data: bytes, ftype: str | None, part: str | None, **kw: Any) -> Job:
        """``build_job`` in the thread pool, at most ``decode_workers`` at a time (each holds a
        decoded image until it enters the byte-bounded buffer)."""
        return await anyio.to_thread.run_sync(
            lambda: build_job(data, ftype, part, settings, **kw), limiter=decode_limiter
        )

    @api.post("/v1/inspect/batch", openapi_extra=upload_extra(LINE_FIELDS, batch=True), tags=["Inspection"])
    async def inspect_batch(
        request: Request,
        feature_type: str | None = Query(default=None, max_length=MAX_ID_LEN,
                                         description="every image's type, where the body gives none"),
    ) -> JSONResponse:
        """Multipart: repeated file fields ``image``; optional repeated ``part_id`` and
        ``feature_type`` fields (one per image, or one ``feature_type`` for all); or JSON, the
        same fields as lists (``{"image": [base64, ...], "part_id": [...]}``). An
        ``Idempotency-Key`` K keys image i as ``K/i``: a retried batch gets its records back."""
        t0 = time.perf_counter()
        default_type = _check_type(state, feature_type)
        key = _check_id(_header(request, "idempotency-key"), "idempotency_key", allow_empty=False)
        _, store = state.require()
        as_json = _is_json(request)
        if not as_json and not _is_multipart(request):
            raise ServiceError(
                415,
                "multipart_required",
                "the batch route takes multipart/form-data with 'image' files, or JSON "
                '(Content-Type: application/json; {"image": ["<base64>", ...]})',
            )
        limit = settings.max_batch_items
        if as_json:
            body = await _read_body(request, _base64_body_limit(settings.max_batch_upload_bytes))
            datas, types, parts, fields = await anyio.to_thread.run_sync(_json_batch, body, limit,
                                                                         limiter=decode_limiter)
            meta = _line_meta(request, fields)
        else:
            body = await _read_body(request, settings.max_batch_upload_bytes)
            # one file more than allowed is read, so that too many is answered as such (413 below)
            try:
                form = await _parse_form(request, body, max_files=limit + 1)
            except ServiceError as exc:  # the parser stops at the (limit + 2)-th file
                if "Too many files" not in exc.detail:
                    raise
                raise ServiceError(413, "batch_too_large",
                                   f"more than {limit + 1} images; at most {limit}") from None
            try:
                uploads = form.getlist("image")
                if not uploads or not all(isinstance(u, UploadFile) for u in uploads):
                    raise _missing_image(form, "file fields 'image'")
                _refuse_unknown(form.keys(), UPLOAD_FIELDS, "form field",
                                "/v1/inspect/batch takes the fields", "unknown_field")
                _refuse_repeated([k for k, _ in form.multi_items()], LINE_FIELDS, "form field",
                                 "repeated_field")
                _refuse_file_fields(form)
                if len(uploads) > limit:
                    raise ServiceError(
                        413,
                        "batch_too_large",
                        f"{len(uploads)} images; at most {limit}",
                    )
                types = [str(t) for t in form.getlist("feature_type")]
                parts = [str(p) for p in form.getlist("part_id")]
                meta = _line_meta(request, form)
                datas = [await u.read() for u in uploads]
            finally:
                await form.close()
        n = len(datas)
        if types and len(types) not in (1, n):
            raise ServiceError(422, "bad_feature_types", f"{len(types)} feature_type fields for {n} images")
        if parts and len(parts) not in (1, n):  # one: every image is a crop of that part
            raise ServiceError(422, "bad_part_ids", f"{len(parts)} part_id fields for {n} images")
        # an empty field is none (as on /v1/inspect): the query's type, if any, is that image's
        given = types * n if len(types) == 1 else types
        ftypes = [_check_type(state, t) or default_type for t in given] or [default_type] * n
        pids = [_check_id(p, "part_id") for p in (parts * n if len(parts) == 1 else parts)] or [None] * n
        keys = [None if key is None else f"{key}/{i}" for i in range(n)]
        digests = [None if k is None else request_hash(d, t, p)
                   for k, d, t, p in zip(keys, datas, ftypes, pids, strict=True)]
        done = {} if key is None else await run_in_threadpool(  # stored before: answered as they are
            lambda: _stored_answers(store, [k for k in keys if k], digests, batch=True))
        todo = [i for i in range(n) if i not in done]
        jobs = []
        for i in todo:
            try:
                jobs.append(await decode(datas[i], ftypes[i], pids[i], dedup_key=keys[i],
                                         body_hash=digests[i], **meta))
            except ServiceError as exc:
                raise ServiceError(exc.status, exc.code, f"image {i}: {exc.detail}") from None
        new = dict(zip(todo, await _submit(state, jobs) if jobs else [], strict=True))
        results, recs = [], [done.get(i) or new[i] for i in range(n)]
        for i, rec in enumerate(recs):
            results.append({**record_json(rec, settings.root_path), "duplicate": i in done or rec.duplicate})
        return JSONResponse({"results": results, "parts": _batch_parts(recs, state.part_types),
                             "total_ms": round((time.perf_counter() - t0) * 1000.0, 3)})

    def _inspect_response(rec: ResultRecord, t0: float, *, duplicate: bool) -> JSONResponse:
        body = record_json(rec, settings.root_path)
        body["total_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        body["duplicate"] = duplicate
        return JSONResponse(body)

    # ---------------------------------------------------------------- results
    @api.get("/v1/results", tags=["Results"])
    async def list_results(
        since: str | None = SINCE,
        until: str | None = UNTIL,
        feature_type: str | None = Query(default=None, max_length=MAX_ID_LEN, description="of this type"),
        decision: str | None = DECISION,
        reviewed: bool | None = Query(default=None, description="with (true) or without (false) a verdict"),
        review: Literal["GOOD", "BAD"] | None = Query(default=None, description="whose verdict is this"),
        part_id: str | None = Query(default=None, max_length=MAX_ID_LEN, description="of this part"),
        line: str | None = PLACE["line"],
        station: str | None = PLACE["station"],
        camera: str | None = PLACE["camera"],
        source: str | None = Query(default=None, max_length=MAX_SOURCE_LEN,
                                   description="`http`, or `watch:<folder>` for a watched folder's parts"),
        after_id: int | None = Query(default=None, ge=0, le=MAX_ROW_ID,
                                     description="ids above this: poll with order=oldest for new decisions"),
        before_id: int | None = Query(default=None, ge=0, le=MAX_ROW_ID,
                                      description="ids below this: page back from a page's smallest id"),
        limit: int = Query(default=100, ge=1, le=1000, description="at most this many records"),
        order: Literal["newest", "oldest"] = Query(default="newest", description="by id"),
    ) -> dict[str, Any]:
        """Stored records, filtered: every parameter given must match."""
        decision = _decision_filter(decision)
        # an empty value (a form's empty field) is no filter, as on an upload it is no value
        given = (("feature_type", feature_type), ("part_id", part_id), ("line", line), ("station", station),
                 ("camera", camera), ("source", source))
        text: dict[str, Any] = {
            name: _check_id(value, name, max_len=MAX_SOURCE_LEN if name == "source" else MAX_ID_LEN)
            for name, value in given}
        _, store = state.require()
        recs = await run_in_threadpool(
            lambda: store.query(
                since=parse_time(since, "since"),
                until=parse_time(until, "until"),
                decision=decision,
                reviewed=reviewed,
                review=review,
                **text,
                after_id=after_id,
                before_id=before_id,
                limit=limit,
                oldest_first=order == "oldest",
            )
        )
        return {"results": [record_json(r, settings.root_path) for r in recs], "count": len(recs)}

    async def _get_record(record_id: int) -> ResultRecord:
        _, store = state.require()
        rec = await run_in_threadpool(store.get, record_id)
        if rec is None:
            raise ServiceError(404, "not_found", f"no result with id {record_id}")
        return rec

    @api.get("/v1/results/{record_id}", tags=["Results"])
    async def get_result(record_id: int = RECORD_ID) -> dict[str, Any]:
        rec = await _get_record(record_id)
        _, store = state.require()
        history = await run_in_threadpool(store.review_history, record_id)
        return {**record_json(rec, settings.root_path), "review_history": history}

    async def _artifact(record_id: int, kind: str) -> FileResponse:
        rec = await _get_record(record_id)
        name = rec.heatmap if kind == "heatmaps" else rec.image
        path = state.artifacts.path(kind, name) if state.artifacts else None
        if path is None and name and state.artifacts is not None:  # named, not expired: its file is elsewhere
            raise ServiceError(404, "not_found", (
                f"result {record_id}'s {kind[:-1]} {name} is not in {state.artifacts.root.resolve() / kind}, "
                "where this service keeps its files (--data-dir): a history copied from another store "
                "(results copy) names the files of that service's --data-dir; give it"))
        if path is None:
            raise ServiceError(404, "not_found", f"result {record_id} has no stored {kind[:-1]}")
        media = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "webp": "image/webp"}
        return FileResponse(
            path,
            media_type=media.get(path.suffix.lstrip("."), "application/octet-stream"),
            headers={
                "Cache-Control": "private, max-age=86400",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @api.get("/v1/results/{record_id}/heatmap", tags=["Results"])
    async def get_heatmap(record_id: int = RECORD_ID) -> FileResponse:
        return await _artifact(record_id, "heatmaps")

    @api.get("/v1/results/{record_id}/image", tags=["Results"])
    async def get_image(record_id: int = RECORD_ID, view: Literal["model"] | None = Query(
            default=None, description="`model`: as the model served now reads it")) -> Response:
        """The kept image as it was kept; ``view=model``: as the model served now reads it, where
        that differs from what a browser draws of the file (a model read at a gain, a 12-bit
        camera's: an 8-bit PNG at its ``backbone.input_gain``), for the dashboard."""
        kept = await _artifact(record_id, "images")
        gain = state.pipeline.input_gain if state.pipeline is not None else 1.0
        if view is None or gain == 1.0:
            return kept
        png = await run_in_threadpool(as_read_png, Path(kept.path), gain)
        return Response(png, media_type="image/png",  # the model served now's: not kept by a cache
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    # ---------------------------------------------------------------- parts
    @api.get("/v1/parts", tags=["Parts"])
    async def list_parts(
        since: str | None = SINCE,
        until: str | None = UNTIL,
        line: str | None = PLACE["line"],
        station: str | None = PLACE["station"],
        camera: str | None = PLACE["camera"],
        decision: str | None = DECISION,
        complete: bool | None = Query(default=None, description="with an image of each type (true) or not"),
        limit: int = Query(default=50, ge=1, le=500, description="at most this many parts"),
    ) -> dict[str, Any]:
        """The latest parts' verdicts, newest first (:func:`diffqc.service.parts.latest_parts`)."""
        verdict = _decision_filter(decision)
        place = (_check_id(line, "line"), _check_id(station, "station"), _check_id(camera, "camera"))
        period = (parse_time(since, "since"), parse_time(until, "until"))
        _, store = state.require()
        found, truncated = await run_in_threadpool(
            lambda: latest_parts(store, limit=limit, types=state.part_types, window_s=settings.part_window_s,
                                 verdict=verdict,
                                 complete=complete, since=period[0], until=period[1], line=place[0],
                                 station=place[1], camera=place[2]))
        return {"parts": [v.to_json() for v in found], "truncated": truncated}

    @api.get("/v1/parts/{part_id:path}", tags=["Parts"])
    async def get_part(
        part_id: str = PathParam(description="the part's id (it may hold `/`)"),
        since: str | None = SINCE,
        until: str | None = UNTIL,
        line: str | None = PLACE["line"],
        station: str | None = PLACE["station"],
        camera: str | None = PLACE["camera"],
    ) -> dict[str, Any]:
        """The part's verdict from the decisions on its images (one per feature type, each
        type's latest: :func:`diffqc.service.parts.part_verdict`)."""
        pid = str(_check_id(part_id, "part_id", allow_empty=False))
        place = (_check_id(line, "line"), _check_id(station, "station"), _check_id(camera, "camera"))
        _, store = state.require()
        period = (parse_time(since, "since"), parse_time(until, "until"))
        stored = await run_in_threadpool(
            lambda: stored_part(store, pid, state.part_types, window_s=settings.part_window_s,
                                since=period[0], until=period[1], line=place[0], station=place[1],
                                camera=place[2])
        )
        if stored is None:
            narrowed = " in the period or place given" if since or until or any(place) else ""
            raise ServiceError(404, "not_found", f"no result with part id {pid!r}{narrowed}")
        verdict, truncated = stored
        return {**verdict.to_json(), "truncated": truncated,
                "results": [record_json(r, settings.root_path) for r in verdict.counted]}

    # ---------------------------------------------------------------- review
    @api.get("/v1/review", tags=["Review"])
    async def review_queue(
        limit: int = Query(default=50, ge=1, le=500, description="at most this many records"),
    ) -> dict[str, Any]:
        """The review queue: REVIEW decisions without an operator verdict, oldest first."""
        _, store = state.require()
        recs = await run_in_threadpool(store.review_queue, limit)
        pending = await run_in_threadpool(store.pending_reviews)
        return {"queue": [record_json(r, settings.root_path) for r in recs], "pending": pending}

    @api.get("/v1/defects", tags=["Review"])
    async def defect_kinds(
        limit: int = Query(default=200, ge=1, le=1000, description="at most this many kinds"),
    ) -> dict[str, Any]:
        """The defect kinds given with BAD verdicts, the most given first (the dashboard offers
        them as the reviewer types)."""
        _, store = state.require()
        kinds = await run_in_threadpool(store.defect_kinds, limit)
        return {"defects": [{"defect": kind, "verdicts": n} for kind, n in kinds]}

    @api.post("/v1/review/{record_id}", tags=["Review"])
    async def review(request: Request, body: ReviewIn, record_id: int = RECORD_ID) -> dict[str, Any]:
        _, given = _json_with_names(await request.body())  # as ReviewIn took it: read once, kept
        _refuse_repeated(given, ReviewIn.model_fields, "JSON field", "repeated_field")
        reviewer = _check_id(body.reviewer, "reviewer")  # "" (an empty form field): none
        note = _check_id(body.note, "note", max_len=2000, breaks=True)
        defect = _check_id(body.defect.strip() if body.defect else None, "defect")  # " crack" is "crack"
        if defect is not None and body.verdict != "BAD":
            raise ServiceError(422, "bad_defect", "a defect kind goes with a BAD verdict")
        rec = await _get_record(record_id)
        if rec.decision == NOT_INSPECTED:
            raise ServiceError(409, "not_inspected", f"result {record_id} was not inspected")
        _, store = state.require()
        replaces = body.replaces if "replaces" in body.model_fields_set else ...
        try:
            updated = await run_in_threadpool(lambda: store.set_review(
                record_id, body.verdict, reviewer, note, defect, replaces=replaces))
        except ReviewConflict as exc:
            raise ServiceError(409, exc.code, str(exc)) from None
        if updated is None:  # pragma: no cover - deleted in between
            raise ServiceError(404, "not_found", f"no result with id {record_id}")
        return record_json(updated, settings.root_path)

    # ---------------------------------------------------------------- model / stats
    @api.get("/v1/model", tags=["Model and status"])
    async def get_model() -> dict[str, Any]:
        info = dict(state.model_info)
        pipeline = state.pipeline
        info["service"] = {
            "buffer_size": settings.buffer_size,
            "max_batch": settings.max_batch,
            "overflow": settings.overflow,
            "store": redact_url(settings.db_url),
            "queue_depth": len(pipeline.buffer) if pipeline else None,
            "part_types": state.part_types,
        }
        return info

    @api.get("/v1/summary", tags=["Model and status"])
    async def summary(
        *,
        since: str | None = SINCE,
        until: str | None = UNTIL,
        # the names listed for Swagger UI (a choice, where it added an item "string"); read by hand
        by: Annotated[list[str], Query(
            default_factory=list, description="group by (repeatable, in order)",
            json_schema_extra={"items": {"type": "string", "enum": list(SUMMARY_KEYS)}})],
        parts: bool = Query(default=False, description="count parts, not images"),
    ) -> dict[str, Any]:
        """A period's counts per group (``results summary``), the last group all of them;
        ``parts``: each part counted once by its verdict (``results summary --parts``)."""
        by = list(dict.fromkeys(by)) or (["line"] if parts else ["feature_type"])  # twice: once
        if unknown := [k for k in by if k not in SUMMARY_KEYS]:
            raise ServiceError(422, "bad_by", f"cannot group by {unknown[0]!r}: by is one of "
                               f"{', '.join(SUMMARY_KEYS)} (repeatable)")
        start, end = parse_time(since, "since"), parse_time(until, "until")
        _, store = state.require()
        extra: dict[str, Any] = {}
        if parts:
            try:
                counts, extra["images_without_part"] = await run_in_threadpool(
                    part_summary_counts, store, by, start, end, settings.part_window_s)
            except ConfigError as exc:
                raise ServiceError(422, "bad_by", str(exc)) from None
        else:
            counts = await run_in_threadpool(store.summary_counts, by, start, end)
        groups = [{**dict(zip(by, key, strict=True)), **row} for key, row in summarize(counts, len(by))]
        return json_safe({"by": by, "since": start, "until": end, "parts": parts, **extra, "groups": groups})

    @api.get("/v1/stats", tags=["Model and status"])
    async def stats(
        window_s: float = Query(default=3600.0, gt=0, le=30 * 86400, description="the window: seconds back"),
    ) -> dict[str, Any]:
        """Rates per type and recent scores (for the dashboard)."""
        pipeline, store = state.require()
        since = time.time() - window_s

        def collect() -> dict[str, Any]:
            per_type: dict[str, dict[str, Any]] = {}
            for ftype, decision, n in store.counts(since=since):
                row = per_type.setdefault(ftype or "", {d: 0 for d in DECISIONS})
                row[decision] = row.get(decision, 0) + n
            for row in per_type.values():
                row["total"] = sum(row[d] for d in DECISIONS)
                row["per_minute"] = round(row["total"] / (window_s / 60.0), 3)
            recent = store.query(since=since, limit=1000)
            scores: dict[str, list[float]] = {}
            for r in recent:
                if r.score is not None and math.isfinite(r.score):
                    scores.setdefault(r.feature_type or "", []).append(r.score)
            return {"types": per_type, "scores": scores, "pending_reviews": store.pending_reviews()}

        out = await run_in_threadpool(collect)
        buf = pipeline.buffer
        out.update(
            window_s=window_s,
            thresholds=state.model_info.get("thresholds", {}),
            queue={
                "depth": len(buf),
                "capacity": buf.capacity,
                "dropped": buf.dropped_total,
                "refused": buf.refused_total,
                "policy": buf.policy.value,
            },
        )
        return json_safe(out)

    app.include_router(api)
    return app


# the first bytes of base64 text of an image file: PNG, JPEG, BMP, TIFF (both orders), WebP
_BASE64_IMAGE_STARTS = (b"iVBORw0KGgo", b"/9j/", b"Qk", b"SUkq", b"TU0A", b"UklGR")


_FORM_BODY = ("; the body was sent as a form (Content-Type: application/x-www-form-urlencoded, as curl -d "
              "sends a file, without its line breaks, and so without bytes of the image): send the "
              "image file's own bytes (curl --data-binary @part.png) or as the multipart file field "
              "'image' (curl -F image=@part.png)")


def _encoded_body(data: bytes) -> str:
    """What an upload that is no image is, where it is an image sent as text (base64, bare, as a
    data URL or in JSON, as JavaScript clients and PLC HTTP blocks send one), and what to send."""
    head = data[:64].lstrip()
    if head.startswith((b"{", b"[")):
        what = "JSON"
    elif head.startswith(b"data:image/"):
        what = "base64 text (a data URL)"
    elif head.startswith(_BASE64_IMAGE_STARTS):
        what = "base64 text"
    else:
        return ""
    return (f"; the body is {what}: send the image file's own bytes as the body (curl --data-binary "
            "@part.png) or as the multipart file field 'image', or as JSON with Content-Type: "
            'application/json ({"image": "<base64>", "feature_type": ...})')


def _missing_image(form: Any, wanted: str) -> ServiceError:
    """A multipart body without its image: what it holds instead (``file``, the name most HTTP
    examples use) and what to send."""
    items = list(form.multi_items())
    files = list(dict.fromkeys(k for k, v in items if isinstance(v, UploadFile)))
    fields = list(dict.fromkeys(k for k, v in items if not isinstance(v, UploadFile)))
    held = [f"{kind}{'s' * (len(names) > 1)} {', '.join(repr(n) for n in names)}"
            for kind, names in (("file", files), ("field", fields)) if names]
    if "image" in fields:  # a part without a filename is text to a multipart parser
        return ServiceError(400, "missing_image",
                            f"multipart body has no {wanted}: its part 'image' has no filename in its "
                            "Content-Disposition, which makes it a text field; give it one (curl -F "
                            'image=@part.png; .NET: content.Add(bytes, "image", "part.png"); Node-RED: '
                            '{image: {value: buffer, options: {filename: "part.png"}}})')
    return ServiceError(400, "missing_image",
                        f"multipart body has no {wanted} (it has {' and '.join(held) or 'nothing'}): "
                        "send the image as the file field 'image' (curl -F image=@part.png)")


def _refuse_file_fields(form: Any) -> None:
    """A 422 ``bad_<name>`` for a text field sent as a file part (``curl -F part_id=@id.txt``):
    it was filed as ``UploadFile(filename='id.txt', ...)``, or dropped without a word."""
    for name, value in form.multi_items():
        if name != "image" and isinstance(value, UploadFile):
            raise ServiceError(422, f"bad_{name}", f"form field {name!r} is a file ({value.filename!r}), "
                               f"not text: send its value as a text field (curl -F {name}=VALUE, or "
                               f"-F '{name}=<FILE' for a file's text)")


def _form_str(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value else None


def _start(state: ServiceState, detector: DetectorLike | None,
           tls_reload: Callable[[], None] | None = None) -> None:
    """``tls_reload``: serves renewed certificate files (:func:`tls_reloader`), with TLS."""
    s = state.settings
    if s.torch_threads and "torch" in sys.modules:  # an ONNX-only service never imports torch
        import torch

        torch.set_num_threads(s.torch_threads)
    if detector is None:
        if s.model_path is None:
            raise ValueError("no model: give model_path")
        t0 = time.perf_counter()
        detector = load_detector(s.model_path, s.runtime, precision=s.precision, threads=s.torch_threads)
        log.info("model %s loaded in %.1f s", s.model_path, time.perf_counter() - t0)
    state.detector = detector
    state.model_info = _model_info(detector)
    state.model_version = str(state.model_info.get("version") or "")
    state.classes = list(detector.classes_)
    check_part_types(s.part_types, state.classes)
    state.part_types = part_types(state.classes, s.part_types)
    state.store = ResultStore(s.db_url, busy_timeout_s=s.store_busy_timeout_s)
    state.artifacts = ArtifactStore(s.data_dir or default_artifact_root(s.db_url))
    pipeline = InspectionPipeline(
        detector,
        state.store,
        state.artifacts,
        capacity=s.buffer_size,
        policy=s.overflow,
        max_bytes=s.buffer_max_bytes,
        max_batch=s.max_batch,
        model_version=state.model_version,
        keep_images=s.keep_images,
        heatmaps=s.heatmaps,
        heatmap_size=s.heatmap_size,
        all_types=s.all_types,
        overlay_scale=overlay_scales(state.model_info.get("calibration") or {}),
    )
    pipeline.listeners.append(state.metrics.on_record)
    pipeline.batch_listeners.append(state.metrics.on_batch)
    try:  # the latest stored decision of each type and camera of the last week
        state.metrics.seed_last(state.store.latest_times(time.time() - LAST_SEED_S))
    except StoreError as exc:  # a store down at start: the series start with the first parts
        log.warning("the latest decisions per type and camera could not be read: %s", exc)
    _check_buffer_memory(s.buffer_max_bytes)
    # before the worker starts: the sinks' outbox hook must see the first record
    load = None
    if (bundle := s.model_path) is not None:  # a retrained bundle in its folder: loaded as this one was
        def load() -> Any:
            return load_detector(bundle, s.runtime, precision=s.precision, threads=s.torch_threads)

    state.line = LineServices(s, state.store, state.artifacts, detector, tls_reload=tls_reload,
                              on_calibration=lambda: _calibration_changed(state),
                              load_model=load, on_model=lambda new: _model_changed(state, new))
    pipeline.listeners.append(state.line.on_record)
    state.line.start()
    pipeline.start()
    state.pipeline = pipeline
    if s.watch_dirs:
        from diffqc.service.watch import FolderWatcher, WatchSettings

        if len(s.watch_dirs) > 1 and not isinstance(s.watch_camera, tuple):
            log.info("the %d watched folders' parts are recorded as %s: the drift watch tests them "
                     "as one camera (give --camera once per --watch, in order, to tell them apart)",
                     len(s.watch_dirs), f"camera {s.watch_camera!r}" if s.watch_camera else "no camera")
        for index, folder in enumerate(s.watch_dirs):
            watcher = FolderWatcher(
                WatchSettings(Path(folder), feature_type=s.watch_feature_type, line=s.watch_line,
                              station=s.watch_station, camera=s.folder_camera(index),
                              part_id_pattern=s.watch_part_id_pattern, max_image_pixels=s.max_image_pixels),
                pipeline,
                state.store,
            )
            watcher.start_thread()
            state.watchers.append(watcher)


def _check_buffer_memory(buffer_bytes: int) -> None:
    """With the model loaded: a memory cgroup (a container's limit) with less room than the
    buffer may fill would get the service killed for memory by a burst of parts."""
    room = cgroup_memory_room()
    if room is not None and room < buffer_bytes:
        log.warning("with the model loaded this service may take %.0f MB more memory (its container's "
                    "limit), and its buffer holds up to %.0f MB of decoded parts waiting (--buffer-mb): "
                    "a burst of parts would get it killed for memory: give the container more memory, "
                    "or lower --buffer-mb", room / 2**20, buffer_bytes / 2**20)


def _calibration_changed(state: ServiceState) -> None:
    """A new calibration file was loaded (``diffqc calibrate``): refresh what derives from it."""
    if state.detector is None:
        return
    state.model_info = _model_info(state.detector)
    if state.pipeline is not None:
        state.pipeline.overlay_scale = overlay_scales(state.model_info.get("calibration") or {})


def _model_changed(state: ServiceState, detector: Any) -> None:
    """A retrained bundle was loaded (:class:`~diffqc.service.line.ModelWatch`): the API's model,
    types and version are its, and the worker inspects with it from its next batch on."""
    state.detector = detector
    state.model_info = _model_info(detector)
    state.model_version = str(state.model_info.get("version") or "")
    state.classes = list(detector.classes_)
    state.part_types = part_types(state.classes, state.settings.part_types)
    if state.pipeline is not None:
        state.pipeline.use_model(detector, state.model_version,
                                 overlay_scales(state.model_info.get("calibration") or {}))


def _stop(state: ServiceState) -> None:
    """Stop the watchers, the pipeline, the line's services and the store. The pipeline inspects
    the parts in hand until :data:`STOP_S` after serve's stop signal (uvicorn's graceful shutdown,
    as long, is part of it), else after now; it stores those left NOT_INSPECTED."""
    for watcher in state.watchers:
        watcher.stop()
    if state.pipeline is not None:
        began = time.monotonic() if state.stop_signalled is None else state.stop_signalled
        state.pipeline.stop(began + STOP_S - time.monotonic())
    if state.line is not None:  # after the worker: undelivered messages stay in the outbox
        state.line.stop()
        state.line = None
    if state.store is not None:
        state.store.close()
    state.pipeline = None
    state.store = None


# --------------------------------------------------------------------------- entry point
def run_server(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    db_url: str | None = None,
    token: str | Sequence[str] | None = None,
    **opts: Any,
) -> int:
    """Serve ``model_path`` over HTTP until interrupted (``diffqc serve``).

    ``db_url``: a SQLite path / ``sqlite:///path`` (default ``diffqc-results.db``) or a
    ``postgresql://`` URL. ``token``: accepted API token(s); default ``$DIFFQC_TOKEN``
    (comma-separated for several). Other options are :class:`ServiceSettings` fields
    (``buffer_size``, ``max_batch``, ``overflow``, ``data_dir``, ``cors_origins``, ...) plus
    ``log_level``, ``log_format`` (:mod:`diffqc.service.logs`) and ``access_log``. Returns the
    process exit code.
    """
    from diffqc.service.logs import configure_logging
    from diffqc.service.security import tokens_from_env

    log_level = str(opts.pop("log_level", "info"))
    log_format = str(opts.pop("log_format", "text"))
    access_log = bool(opts.pop("access_log", False))
    settings = ServiceSettings(
        model_path=model_path,
        db_url=store_url(db_url),
        tokens=tokens_from_env(token),
        **opts,
    )
    configure_logging(log_level, log_format)
    settings.validate()
    for length in sorted({len(t) for t in settings.tokens if len(t) < MIN_TOKEN_LENGTH}):
        log.warning("an API token of %d characters can be guessed by anyone on the network: use %d "
                    "or more (python -c \"import secrets; print(secrets.token_urlsafe(32))\")",
                    length, MIN_TOKEN_LENGTH)
    if not settings.tokens and reachable_from_others(host):
        log.warning("serving without an API token (--no-auth) on %s:%s, which other machines can reach: "
                    "anyone on the network can read the parts' images and results and record verdicts; "
                    "give --token (or $DIFFQC_TOKEN_FILE), or --host 127.0.0.1", host, port)
    # the port first: a second `serve` on a port in use must not start its watchers, open its
    # store or announce itself on the sinks (a retained MQTT "offline" over the running one's)
    sockets = listening_sockets(host, port)
    try:
        _serve(model_path, settings, sockets, host, log_level=log_level, log_format=log_format,
               access_log=access_log)
    finally:
        for sock in sockets:
            sock.close()
    return 0


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (every address the name resolves to, as asyncio's server does) before
    the model loads. A port in use is one line: :class:`ConfigError` naming the address."""
    from diffqc.service.connections import BACKLOG

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name IDNA refuses (192.168..10)
        said = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot listen on {host}:{port}: {said}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # unique, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                hint = " (is another diffqc serve running?)" if exc.errno == errno.EADDRINUSE else ""
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
            # listening now: Linux lets a second socket bind the port (SO_REUSEADDR) until one listens,
            # so a second serve started while the first loaded its model got past this check
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


SAME_PRESS_S = 1.0  # a second Ctrl-C this soon after the first is the same press


def _server(config: Any, state: ServiceState | None = None) -> Any:
    """uvicorn's server, stopped gracefully by each of :data:`STOP_SIGNALS`, where uvicorn's takes
    SIGINT and SIGTERM only (a SIGHUP, the terminal closed, ended the service at once). A second
    Ctrl-C within :data:`SAME_PRESS_S` of the first is the same press (a double tap skipped the
    drain and ended in uvicorn's traceback); one later stops at once, as uvicorn's does. The
    first signal's time is ``state.stop_signalled``: the stop's :data:`STOP_S` run from it."""
    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    class Server(uvicorn.Server):
        first_stop = -math.inf

        def handle_exit(self, sig: int, frame: Any) -> None:
            again = time.monotonic() - self.first_stop < SAME_PRESS_S
            if sig == signal.SIGINT and self.should_exit and again:  # the same press: the drain goes on
                return
            if not self.should_exit:
                self.first_stop = time.monotonic()
                if state is not None:
                    state.stop_signalled = self.first_stop
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                more = [s for s in STOP_SIGNALS if s not in HANDLED_SIGNALS]
                main = threading.current_thread() is threading.main_thread()  # where signals are told
                previous = {s: signal.signal(s, self.handle_exit) for s in more} if main else {}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

    return Server(config)


def _serve(model_path: str | Path, settings: ServiceSettings, sockets: list[socket.socket], host: str, *,
           log_level: str, log_format: str, access_log: bool) -> None:
    import uvicorn

    from diffqc.service.connections import BACKLOG, connection_cap, http_protocol
    from diffqc.service.logs import uvicorn_log_config

    # fail fast, with a clear message, before the server takes a request: a model path that is
    # no bundle, then the store (a typo in --db is one line, not one after the model loaded; a
    # new store is made only for a model that can be served), then the model itself
    check_bundle_files(model_path)
    if settings.part_types:
        check_part_types(settings.part_types, read_bundle(model_path)[1]["classes"])
    ResultStore(settings.db_url).close()  # StoreError: one line at the CLI's error boundary
    ArtifactStore(settings.data_dir or default_artifact_root(settings.db_url))
    t0 = time.perf_counter()
    detector = load_detector(model_path, settings.runtime, precision=settings.precision,
                             threads=settings.torch_threads)
    log.info("model %s loaded in %.1f s (%s runtime)", model_path, time.perf_counter() - t0,
             getattr(detector, "runtime", "torch"))
    if settings.watch_dirs:
        from diffqc.service.watch import check_feature_type

        check_feature_type(settings.watch_feature_type, detector.classes_)
    app = create_app(settings, detector=detector)
    port = sockets[0].getsockname()[1]
    tls = settings.tls_cert is not None
    config = uvicorn.Config(_start_error_said_once(app), host=host, port=port, log_level=log_level,
                            root_path=settings.root_path,
                            log_config=uvicorn_log_config(log_format),
                            access_log=access_log, timeout_graceful_shutdown=STOP_S,
                            server_header=False, backlog=BACKLOG,
                            http=http_protocol(settings.body_timeout_s,
                                               connection_cap(opcua=settings.opcua_url is not None)),
                            ssl_certfile=str(settings.tls_cert) if tls else None,
                            ssl_keyfile=None if settings.tls_key is None else str(settings.tls_key))
    config.load()  # makes its SSL context now: renewed certificate files are loaded into it later
    if tls and config.ssl is not None:
        app.state.diffqc.tls_context = config.ssl
        # the handshake is the protocol's, counted and deadlined from the accept (connections.py)
        config.http_protocol_class = http_protocol(settings.body_timeout_s,
                                                   connection_cap(opcua=settings.opcua_url is not None),
                                                   tls=config.ssl)
        config.ssl = None
    server = _server(config, app.state.diffqc)
    scheme = "https" if tls else "http"
    log.info("%s", listening_line(scheme, host, port))
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's exit of a failed start
        if (error := app.state.diffqc.start_error) is not None:
            raise error from None
        raise


def _start_error_said_once(app: Any) -> Any:
    """``app`` for uvicorn, where a failed start of the user's input (a :class:`DiffqcError`,
    kept as ``start_error``) is not also logged as Starlette's traceback: the command line says
    it, one line, as it says every error of the user's input."""
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def told(message: Any) -> None:
            if message.get("type") == "lifespan.startup.failed" and app.state.diffqc.start_error is not None:
                message = {**message, "message": ""}
            await send(message)

        await app(scope, receive, told if scope["type"] == "lifespan" else send)

    return asgi
