"""Bounded ring buffer and the single inference worker that drains it in micro-batches.

Every source (HTTP requests, the folder watcher) submits :class:`Job` s to one
:class:`InspectionPipeline`. The pipeline owns a :class:`RingBuffer` and one worker thread
that takes whatever is waiting (up to ``max_batch``), runs the detector once on that
micro-batch, writes heat maps, stores every record in one transaction and only then
completes the jobs' futures. A lone part is never held back waiting for company.

Overflow is explicit: ``reject`` refuses the new part (:class:`BufferFull`, HTTP 503; a batch
of more parts than it holds at all, :class:`BatchTooLarge`, HTTP 413) and
``drop_oldest`` evicts the oldest waiting part, which is then stored as ``NOT_INSPECTED``
so that the line can divert it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from diffqc.errors import StoreError
from diffqc.inspection import ImageCheck
from diffqc.service.logs import Outage, Seldom
from diffqc.service.store import NOT_INSPECTED, ArtifactStore, ResultRecord, ResultStore
from diffqc.visualize import DEFAULT_HEATMAP_SIZE, as_read, fit_within

log = logging.getLogger("diffqc.service")

T = TypeVar("T")


class OverflowPolicy(StrEnum):
    REJECT = "reject"
    DROP_OLDEST = "drop_oldest"


class BufferFull(RuntimeError):
    """The buffer is full and the policy is ``reject``."""


class BatchTooLarge(BufferFull):
    """A batch of more items than the buffer holds at all, under ``reject``: it is never taken
    (a client's mistake: not counted in ``refused_total``, the parts a busy buffer refused)."""


class BufferClosed(RuntimeError):
    """The buffer no longer accepts items (the service is shutting down)."""


class RingBuffer(Generic[T]):
    """A bounded, thread-safe FIFO with an explicit overflow policy.

    Bounded twice: at most ``capacity`` items and at most ``max_bytes`` bytes (each item
    weighs ``size(item)``; a single item or batch heavier than ``max_bytes`` is accepted only
    into an empty buffer, so that it can still be served). ``put_many`` takes a batch whole or
    not at all: under ``drop_oldest`` it evicts items that waited before it (returned), never
    its own; under ``reject`` it raises :class:`BufferFull` and evicts nothing.
    ``get_batch`` blocks until at least one item is waiting and returns every waiting item up
    to ``max_items``.
    """

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy | str = OverflowPolicy.REJECT,
        *,
        max_bytes: int | None = None,
        size: Callable[[T], int] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be at least 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("buffer max_bytes must be at least 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.policy = OverflowPolicy(policy)
        self._size = size or (lambda item: 0)
        self._items: deque[tuple[T, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.bytes = 0
        self.accepted_total = 0
        self.refused_total = 0
        self.dropped_total = 0
        self.high_water = 0
        self.high_water_bytes = 0
        self.last_bytes = 0  # the heaviest item of the last put taken: what the next may weigh

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def backed_up(self) -> bool:
        """More than half of either bound is taken by parts waiting."""
        with self._cond:
            half_bytes = self.max_bytes is not None and 2 * self.bytes > self.max_bytes
            return 2 * len(self._items) > self.capacity or half_bytes

    def _over(self, n: int, nbytes: int) -> bool:
        """Would ``n`` more items weighing ``nbytes`` exceed a bound (given what waits)?"""
        if len(self._items) + n > self.capacity:
            return True
        if self.max_bytes is None or not self._items:
            return False
        return self.bytes + nbytes > self.max_bytes

    def room_for(self, nbytes: int) -> bool:
        """Whether one more item of ``nbytes`` would be taken now under ``reject`` (as
        :meth:`put_many` judges it: a free slot, and room for its bytes unless none waits)."""
        with self._cond:
            return not self._over(1, nbytes)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> T | None:
        evicted = self.put_many([item])
        return evicted[0] if evicted else None

    def put_many(self, items: Sequence[T]) -> list[T]:
        """Add items atomically, all of them (or none: ``reject``); the evicted older items."""
        with self._cond:
            if self._closed:
                raise BufferClosed("the service is shutting down")
            sized = [(item, int(self._size(item))) for item in items]
            total = sum(b for _, b in sized)
            if self.policy is OverflowPolicy.REJECT and self._over(len(sized), total):
                if len(sized) > self.capacity:  # the client's mistake, not a busy buffer: not counted
                    raise BatchTooLarge(f"{len(sized)} parts in one batch, more than the {self.capacity} "
                                        "that may wait: it can never be taken")
                self.refused_total += len(items)
                limit = f", {self.bytes}/{self.max_bytes} bytes" if self.max_bytes is not None else ""
                raise BufferFull(
                    f"buffer full ({len(self._items)}/{self.capacity} parts{limit} waiting); retry later"
                )
            # drop_oldest: parts that waited before make room, never the batch's own (under reject
            # it fits: nothing is evicted). A batch over a bound is taken whole once none wait.
            evicted: list[T] = []
            while self._items and self._over(len(sized), total):
                old, old_bytes = self._items.popleft()
                self.bytes -= old_bytes
                evicted.append(old)
            self._items.extend(sized)
            self.bytes += total
            self.accepted_total += len(items)
            self.dropped_total += len(evicted)
            self.high_water = max(self.high_water, len(self._items))
            self.high_water_bytes = max(self.high_water_bytes, self.bytes)
            self.last_bytes = max((b for _, b in sized), default=self.last_bytes)
            self._cond.notify()
            return evicted

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[T]:
        """Every waiting item up to ``max_items``; [] after ``timeout`` or once closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    return []
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
            n = min(max_items, len(self._items))
            out = [self._items.popleft() for _ in range(n)]
            self.bytes -= sum(b for _, b in out)
            return [item for item, _ in out]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ----------------------------------------------------------------------------- inspection
class InspectionLike(Protocol):
    """What the service reads of :class:`diffqc.model.Inspection`."""

    @property
    def score(self) -> float: ...
    @property
    def p_value(self) -> float: ...
    @property
    def decision(self) -> str: ...
    @property
    def feature_type(self) -> str | None: ...
    @property
    def predicted_type(self) -> str | None: ...
    @property
    def type_scores(self) -> dict[str, float]: ...
    @property
    def anomaly_map(self) -> np.ndarray | None: ...


class DetectorLike(Protocol):
    """What the service uses of :class:`diffqc.model.Detector`."""

    classes_: list[str]

    def inspect(
        self,
        images: Sequence[np.ndarray],
        feature_types: Sequence[str | None] | None = None,
        *,
        all_types: bool = True,
        check_images: bool = True,
    ) -> Sequence[InspectionLike]: ...


# (image, its inspection, the type's colour scale) -> the heat-map picture
OverlayFn = Callable[[np.ndarray, InspectionLike, "tuple[float, float] | None"], np.ndarray]


def default_overlay(
    image: np.ndarray, res: InspectionLike, scale: tuple[float, float] | None
) -> np.ndarray:
    """image | overlay with the score, p-value, decision and a colour bar (diffqc.visualize)."""
    from diffqc.visualize import panel

    assert res.anomaly_map is not None
    return panel(image, res.anomaly_map, score=res.score, p_value=res.p_value, decision=res.decision,
                 feature_type=res.feature_type, vmin=scale[0] if scale else None,
                 vmax=scale[1] if scale else None)


def _as_kept(image: np.ndarray) -> np.ndarray:
    """A decoded image (HxWx3 float in [0, 1]) as a PNG holds it, read back value for value: 8-bit
    where every value is one of 256 levels, else 16-bit grey (a 12-bit camera's TIFF: in 8 bits
    its 4096 levels became 17, and a retrain on the part exported read another part); a colour
    image of more than 8 bits stays 8-bit (a PNG of 16-bit colour has no Pillow array mode)."""
    image = np.clip(image, 0.0, 1.0)
    levels = image * 255.0
    if np.abs(levels - np.round(levels)).max(initial=0.0) < 1e-3:
        return (levels + 0.5).astype(np.uint8)
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
        return (image[..., 0] * 65535.0 + 0.5).astype(np.uint16)
    return (levels + 0.5).astype(np.uint8)


@dataclass
class Job:
    """One part waiting for inspection."""

    image: np.ndarray  # HxWx3 float32 in [0, 1]
    feature_type: str | None = None
    part_id: str | None = None
    source: str = "http"
    dedup_key: str | None = None
    encoded: bytes | None = None  # the upload as received (kept for review / export)
    encoded_ext: str | None = None  # "png", "jpg", ... when ``encoded`` is browser-viewable
    compression: str | None = None  # the upload's, lossy or lossless (diffqc.data.image_compression)
    received_at: float = field(default_factory=time.time)
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[ResultRecord] = field(default_factory=Future)
    body_hash: str | None = None  # SHA-256 of the request (with ``dedup_key``): see the HTTP API
    digest: str | None = None  # SHA-256 of the image file as received: names a repeated frame
    line: str | None = None  # where the part was inspected (stored on the record)
    station: str | None = None
    camera: str | None = None

    @property
    def nbytes(self) -> int:
        """Memory this job holds while it waits: the decoded image and the kept upload."""
        return int(self.image.nbytes) + len(self.encoded or b"")

    def release(self) -> None:
        """Let go of the image and the upload: the part is dropped, and its NOT_INSPECTED record
        takes neither (only what the job says of the part)."""
        self.image = _NO_IMAGE
        self.encoded = None


_NO_IMAGE = np.zeros((0, 0, 3), np.float32)  # a released job's (Job.release)
KEEP_IMAGES = ("none", "flagged", "all")
DEFAULT_BUFFER_BYTES = 512 * 1024 * 1024
# Readiness fails after this many inspections in a row raised (one odd part does not count).
FAILING_AFTER = 3
RECENT_PARTS = 256  # the last parts' images a new one is compared with (a stale camera frame)
# A stop inspects the parts in hand for this long (serve: from its signal, uvicorn's graceful
# shutdown included); those not stored by then are stored NOT_INSPECTED
STOP_S = 30
STOPPED = "service stopped before it was inspected"
DROPPED = "dropped: buffer full (drop_oldest policy)"


def _settle(future: Future[ResultRecord], outcome: ResultRecord | BaseException) -> None:
    """Complete a future unless its waiter is gone (cancelled) or it is already done."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


def _part_name(part_id: str | None) -> str:
    """A part as the log names it ("a part without id" for one sent without, not "part None")."""
    return f"part {part_id}" if part_id else "a part without id"


class InspectionPipeline:
    """The ring buffer, one inference worker and the durable store behind it.

    ``keep_images``: which uploads are kept on disk beside the record (``flagged`` =
    REVIEW and REJECT, needed by the review queue and ``results export``).
    ``heatmaps``: ``all``, ``flagged`` or ``none`` heat-map overlays written as PNG, drawn on
    the worker (their time is every part's), the image fitted within ``heatmap_size`` px
    (None or 0: its own size).
    """

    SAY_REPEATS_EVERY_S = 60.0  # a repeated image named in the log at most this often

    def __init__(
        self,
        detector: DetectorLike,
        store: ResultStore,
        artifacts: ArtifactStore | None,
        *,
        capacity: int = 64,
        policy: OverflowPolicy | str = OverflowPolicy.REJECT,
        max_bytes: int | None = DEFAULT_BUFFER_BYTES,
        max_batch: int = 8,
        model_version: str = "",
        keep_images: str = "flagged",
        heatmaps: str = "flagged",
        heatmap_size: int | None = DEFAULT_HEATMAP_SIZE,
        overlay: OverlayFn | None = None,
        overlay_scale: dict[str, tuple[float, float]] | None = None,
        all_types: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        for name, value in (("keep_images", keep_images), ("heatmaps", heatmaps)):
            if value not in KEEP_IMAGES:
                raise ValueError(f"{name} must be one of {', '.join(KEEP_IMAGES)}, got {value!r}")
        self.detector = detector
        self.image_check = ImageCheck(getattr(detector, "metadata", None) or {})
        self.store = store
        self.artifacts = artifacts
        self.buffer: RingBuffer[Job] = RingBuffer(
            capacity, policy, max_bytes=max_bytes, size=lambda job: job.nbytes
        )
        self.max_batch = max_batch
        self.model_version = model_version
        self.keep_images = keep_images
        self.heatmaps = heatmaps
        self.heatmap_size = heatmap_size
        self.overlay = overlay or default_overlay
        self.overlay_scale = overlay_scale or {}
        self.all_types = all_types
        self.listeners: list[Callable[[ResultRecord, float], None]] = []
        self.batch_listeners: list[Callable[[int, float], None]] = []
        self._dropped: deque[Job] = deque()
        self._dropped_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # the worker takes its parts and stores them under this lock; a stop whose time is up
        # takes it to store the parts in hand (batch, dropped) NOT_INSPECTED, and gives up
        self._store_lock = threading.Lock()
        self._in_hand: tuple[list[Job], list[Job]] = ([], [])
        self._given_up = False
        self.errors_total = 0
        self.last_batch_at = 0.0
        # health: inspections failing in a row, artifact writes that failed (the part is kept)
        self.failing_in_a_row = 0
        self.last_inspection_error: str | None = None
        self.artifact_errors_total = 0
        self.heatmaps_shed_total = 0  # heat maps not drawn while parts backed up
        self.last_artifact_error: str | None = None
        self.store_errors_total = 0
        # said once each while they last, not for every part (hundreds of lines a minute)
        self.store_outage = Outage(log, "cannot store parts", "the result store can write again; "
                                   "parts not stored meanwhile: %d, over %.0f s")
        self.inspect_outage = Outage(log, "inspection failed", "parts are inspected again; parts not "
                                     "inspected meanwhile: %d, over %.0f s")
        self.artifact_outages = {what: Outage(log, f"{what} not written",
                                              f"{what}s are written again; parts without one "
                                              "meanwhile: %d, over %.0f s")
                                 for what in ("heat map", "kept image")}
        self.repeated_images_total = 0  # parts whose image repeated a recent one byte for byte
        self._recent: dict[str, ResultRecord] = {}  # digest -> the last part with that image
        self._repeats_said = Seldom()  # a repeated image named in the log, the next ones counted
        self._turned_at = time.monotonic()  # the worker's last time round its loop
        self._next_model: tuple[Any, str, dict[str, tuple[float, float]]] | None = None
        self._model_lock = threading.Lock()

    def problems(self) -> list[str]:
        """Reasons the pipeline is not healthy now (empty when it is)."""
        out = []
        if not self.alive:
            out.append("the inference worker is not running")
        if self.failing_in_a_row >= FAILING_AFTER:
            out.append(
                f"the last {self.failing_in_a_row} inspections failed: {self.last_inspection_error}"
            )
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="diffqc-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_S) -> None:
        """Stop accepting, inspect and store the parts already accepted for up to ``timeout``
        seconds, stop the worker. Every part not stored by then (those waiting, and the batch
        in hand of a worker still inspecting it) is stored ``NOT_INSPECTED``, "service stopped
        before it was inspected", and the log says how many: none is left without a record.
        A worker still in its inference call stores nothing after that, so the store may be
        closed once this returns; a commit of the worker's already under way is waited for (the
        store's own timeout bounds it)."""
        self.buffer.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            self._thread = None
        self._give_up()

    def _give_up(self) -> None:
        """Store the parts the worker has not stored ``NOT_INSPECTED`` (its time is up). A
        commit of the worker's already under way is waited for (the store's own timeout bounds
        it); the listeners are told outside the lock."""
        with self._store_lock:
            self._given_up = True
            (batch, dropped), self._in_hand = self._in_hand, ([], [])
            batch = batch + self.buffer.get_batch(sys.maxsize, timeout=0)  # closed: every one waiting
            dropped = dropped + self._take_dropped()
            jobs = batch + dropped
            if not jobs:
                return
            records = ([self._not_inspected(job, STOPPED) for job in batch]
                       + [self._not_inspected(job, DROPPED) for job in dropped])
            try:
                stored = self.store.insert_many(records)
            except Exception as exc:
                self.store_errors_total += 1
                log.error("stopping: %d parts not inspected in the stop's time could not be stored "
                          "either: %s", len(jobs), exc)
                for job in jobs:
                    _settle(job.future, exc)
                return
        log.warning("stopping: %d parts not inspected in the stop's time were stored NOT_INSPECTED "
                    "(%s)", len(jobs), STOPPED)
        self._deliver(jobs, stored, time.monotonic())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self.buffer)

    @property
    def input_gain(self) -> float:
        """The served model's ``backbone.input_gain`` (1 for a detector without a config): its
        parts are drawn, and shown, as it reads them (:func:`diffqc.visualize.as_read`)."""
        config = getattr(self.detector, "config", None)
        return float(config.backbone.input_gain) if config is not None else 1.0

    # ------------------------------------------------------------------ submission
    def submit(self, job: Job) -> Future[ResultRecord]:
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Sequence[Job]) -> list[Future[ResultRecord]]:
        """Queue jobs; raises :class:`BufferFull` (reject policy) or :class:`BufferClosed`."""
        now = time.monotonic()
        for job in jobs:
            job.enqueued = now
        evicted = self.buffer.put_many(jobs)
        for job in evicted:  # out of --buffer-mb now: its record needs neither image nor upload
            job.release()
        if evicted:
            with self._dropped_lock:
                self._dropped.extend(evicted)
        return [job.future for job in jobs]

    # ------------------------------------------------------------------ worker
    def _take_dropped(self) -> list[Job]:
        with self._dropped_lock:
            out = list(self._dropped)
            self._dropped.clear()
            return out

    def use_model(self, detector: Any, model_version: str,
                  overlay_scale: dict[str, tuple[float, float]] | None = None) -> None:
        """Inspect with ``detector`` from the next batch on (a retrained model served without a
        restart): a batch is inspected by one model, and its records carry that model's
        version; the parts-unlike-training check takes the new model's training images."""
        with self._model_lock:
            self._next_model = (detector, model_version, overlay_scale or {})

    def _take_model(self) -> None:
        with self._model_lock:
            nxt, self._next_model = self._next_model, None
        if nxt is not None:
            self.detector, self.model_version, self.overlay_scale = nxt
            self.image_check = ImageCheck(getattr(self.detector, "metadata", None) or {})

    def stuck_for(self) -> float | None:
        """Seconds since the worker last came round its loop (it does so at least every quarter
        second when idle, and after each batch); None when it is not running. A worker hung in
        an inference call grows this without bound: systemd's watchdog is fed only while it is
        small (:mod:`diffqc.service.systemd`)."""
        if not self.alive:
            return None
        return time.monotonic() - self._turned_at

    def _run(self) -> None:
        while True:
            self._turned_at = time.monotonic()
            with self._store_lock:  # what it takes is in hand, where a stop that gives up finds it
                if self._given_up:
                    return
                batch = self.buffer.get_batch(self.max_batch, timeout=0.25)
                dropped = self._take_dropped()
                self._in_hand = (batch, dropped)
            self._take_model()
            if batch or dropped:
                try:
                    self.process(batch, dropped)
                except StoreError as exc:  # a database restart, a full disk: each part refused
                    self.store_outage.failed(str(exc), len(batch) + len(dropped))
                    for job in batch + dropped:
                        _settle(job.future, exc)
                except Exception as exc:  # keep the worker alive whatever happens
                    log.exception("inference batch failed")
                    for job in batch + dropped:
                        _settle(job.future, exc)
            elif self.buffer.closed:
                return

    def _detect(self, images: list[np.ndarray], types: list[str | None]) -> Sequence[InspectionLike]:
        # checked by the worker with each part's compression, counted for /v1/line: not twice
        return self.detector.inspect(images, types, all_types=self.all_types, check_images=False)

    def _inspect(self, jobs: list[Job]) -> list[InspectionLike | Exception]:
        if not jobs:
            return []
        try:
            return list(self._detect([j.image for j in jobs], [j.feature_type for j in jobs]))
        except Exception:
            if len(jobs) == 1:
                raise
        # isolate the part that breaks the batch
        out: list[InspectionLike | Exception] = []
        for job in jobs:
            try:
                out.append(self._detect([job.image], [job.feature_type])[0])
            except Exception as exc:
                out.append(exc)
        return out

    def process(self, batch: list[Job], dropped: Sequence[Job] = ()) -> None:
        """Inspect ``batch``, store it and every dropped job, then complete their futures."""
        started = time.monotonic()
        # parts back up (a lighting failure flags them all): decisions first, no heat maps
        shed = self.buffer.backed_up()
        try:
            results: list[InspectionLike | Exception] = self._inspect(batch)
        except Exception as exc:
            results = [exc] * len(batch)
        records: list[ResultRecord] = []
        jobs: list[Job] = []
        for job, res in zip(batch, results, strict=True):
            latency_ms = (time.monotonic() - job.enqueued) * 1000.0
            if isinstance(res, Exception):
                self.errors_total += 1
                self.failing_in_a_row += 1
                self.last_inspection_error = str(res) or type(res).__name__
                self.inspect_outage.failed(f"{_part_name(job.part_id)}: {res}")
                rec = self._not_inspected(job, f"inspection failed: {res}")
            else:
                self.failing_in_a_row = 0
                self.inspect_outage.worked()
                height, width = job.image.shape[:2]
                if note := self.image_check(res.feature_type, height, width, job.image, job.compression):
                    log.warning("%s", note)
                rec = self._record(job, res, latency_ms, shed_heatmap=shed)
            records.append(rec)
            jobs.append(job)
        for job in dropped:
            records.append(self._not_inspected(job, DROPPED))
            jobs.append(job)
        with self._store_lock:
            if self._given_up:  # the stop's time was up: it stored these parts NOT_INSPECTED
                self._remove_artifacts(records)
                return
            stored = self._commit(records)
        # told outside the lock: the line's listeners write to the store too, and a stop that
        # gives up waits for the lock
        self._remove_artifacts([new for new, kept in zip(records, stored, strict=True) if kept.duplicate])
        self._name_repeats(jobs, stored)
        self.last_batch_at = time.time()
        done = time.monotonic()
        for listener in self.batch_listeners:
            listener(len(batch), done - started)
        self._deliver(jobs, stored, done)

    def _commit(self, records: list[ResultRecord]) -> list[ResultRecord]:
        """Store the records of the parts in hand (under ``_store_lock``): the rows stored."""
        try:
            if self.artifacts is not None:
                self.artifacts.sync()  # the files the records name outlive a power cut as the rows do
            stored = self.store.insert_many(records)
        except Exception:
            self.store_errors_total += 1
            self._remove_artifacts(records)  # no heat map or image without its row
            raise
        self._in_hand = ([], [])
        self.store_outage.worked()
        return stored

    def _deliver(self, jobs: Sequence[Job], stored: Sequence[ResultRecord], now: float) -> None:
        """Tell the listeners of each stored record and complete its part's future."""
        for job, rec in zip(jobs, stored, strict=True):
            self.announce(rec, now - job.enqueued)
            _settle(job.future, rec)

    def announce(self, rec: ResultRecord, seconds: float = 0.0) -> None:
        """Tell the :attr:`listeners` (the line's OPC UA server and drift watch, the metrics) of
        a committed record: the pipeline's own, or one stored beside it (a watched folder's
        unreadable file, recorded NOT_INSPECTED)."""
        for fn in self.listeners:
            fn(rec, seconds)

    def _name_repeats(self, jobs: Sequence[Job], stored: Sequence[ResultRecord]) -> None:
        """Log a new part whose image file is byte for byte one of the last parts': two parts
        never give the same bytes, so a camera is sending a stale frame (its buffer not
        refreshed). The part is recorded as any other; ``repeated_images_total`` counts them.
        Named at most once per :attr:`SAY_REPEATS_EVERY_S` (a camera stuck on one frame repeats
        it for every part), the next line saying how many went unnamed."""
        for job, rec in zip(jobs, stored, strict=True):
            if job.digest is None or rec.duplicate:  # a client's retry is the same part
                continue
            if (earlier := self._recent.pop(job.digest, None)) is not None:
                self.repeated_images_total += 1
                if (more := self._repeats_said.due(self.SAY_REPEATS_EVERY_S)) is not None:
                    log.warning("%s (record %s) is the same image as %s (record %s), from %s: is the "
                                "camera repeating its last frame?%s", _part_name(rec.part_id), rec.id,
                                _part_name(earlier.part_id), earlier.id, rec.source,
                                f" ({more} more parts' images were repeats since the last such line)"
                                if more else "")
            self._recent[job.digest] = rec
            if len(self._recent) > RECENT_PARTS:
                del self._recent[next(iter(self._recent))]

    def _not_inspected(self, job: Job, reason: str) -> ResultRecord:
        return ResultRecord(
            created_at=time.time(),
            source=job.source,
            part_id=job.part_id,
            feature_type=job.feature_type,
            decision=NOT_INSPECTED,
            model_version=self.model_version,
            reason=reason,
            dedup_key=job.dedup_key,
            body_hash=job.body_hash,
            line=job.line,
            station=job.station,
            camera=job.camera,
            latency_ms=(time.monotonic() - job.enqueued) * 1000.0,
        )

    def _wants(self, setting: str, decision: str) -> bool:
        return setting == "all" or (setting == "flagged" and decision in ("REVIEW", "REJECT"))

    def _remove_artifacts(self, records: Sequence[ResultRecord]) -> None:
        if self.artifacts is None:
            return
        for rec in records:
            self.artifacts.remove("heatmaps", rec.heatmap)
            self.artifacts.remove("images", rec.image)

    def _artifact_failed(self, what: str, job: Job, exc: Exception) -> str:
        self.artifact_errors_total += 1
        self.last_artifact_error = f"{what}: {exc}"
        self.artifact_outages[what].failed(f"{_part_name(job.part_id)}: {exc}")
        return f"{what} not written: {exc}"

    def _record(self, job: Job, res: InspectionLike, latency_ms: float, *,
                shed_heatmap: bool = False) -> ResultRecord:
        """The record of one inspected part. A heat map or kept image that cannot be written
        (full disk, unwritable folder) fails only itself: the decision is stored without it and
        ``reason`` says which file is missing and why. ``shed_heatmap``: parts are backing up,
        so the heat map is not drawn (``reason`` says so)."""
        decision = str(res.decision)
        heatmap = image = None
        missing: list[str] = []
        if self.artifacts is not None:
            wanted = self._wants(self.heatmaps, decision) and res.anomaly_map is not None
            if wanted and shed_heatmap:
                self.heatmaps_shed_total += 1
                missing.append("heat map skipped: more than half of the buffer was waiting")
            elif wanted:
                try:
                    scale = self.overlay_scale.get(res.feature_type or "")
                    seen = as_read(job.image, self.input_gain)  # a model read at a gain is drawn so
                    picture = self.overlay(fit_within(seen, self.heatmap_size), res, scale)
                    heatmap = self.artifacts.save_png("heatmaps", picture)
                    self.artifact_outages["heat map"].worked()
                except Exception as exc:
                    missing.append(self._artifact_failed("heat map", job, exc))
            if self._wants(self.keep_images, decision):
                try:
                    if job.encoded is not None and job.encoded_ext is not None:
                        image = self.artifacts.save_bytes("images", job.encoded, job.encoded_ext)
                    else:
                        image = self.artifacts.save_png("images", _as_kept(job.image))
                    self.artifact_outages["kept image"].worked()
                except Exception as exc:
                    missing.append(self._artifact_failed("kept image", job, exc))
        type_scores: dict[str, Any] = {str(k): float(v) for k, v in (res.type_scores or {}).items()}
        return ResultRecord(
            created_at=time.time(),
            source=job.source,
            part_id=job.part_id,
            feature_type=res.feature_type or job.feature_type,
            predicted_type=res.predicted_type,
            type_known=job.feature_type is not None,
            score=float(res.score),
            p_value=float(res.p_value),
            decision=decision,
            model_version=self.model_version,
            latency_ms=latency_ms,
            heatmap=heatmap,
            image=image,
            reason="; ".join(missing) or None,
            type_scores=type_scores,
            dedup_key=job.dedup_key,
            body_hash=job.body_hash,
            line=job.line,
            station=job.station,
            camera=job.camera,
        )
