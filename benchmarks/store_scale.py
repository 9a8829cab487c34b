"""What the result store's reads cost as it grows: after a month on the line.

Records are never deleted ("every decision stored"), so a line inspecting a part a second for a
month holds millions of rows. This fills a SQLite store (a temporary folder) through the
service's own insert path, in steps up to ``--records``, as a line would (8 types, 95 % PASS, 4
% REVIEW, 1 % REJECT, a part id on each 8 images, one of each type (since session 37; one per
image before), one part in 5 of the flagged ones reviewed, a kept image
named on each flagged part), and after each step times each read the service makes again and
again: the dashboard's polls (latest decisions, decisions after the last one seen, the rates and
score histograms of the last hour, the review queue, the defect kinds, a part found by its id),
`results list --since 8h` and a past period's (a day ago), the retention pass (every 60 s,
keeping a day of kept images: the first pass expires the older ones), opening the store (a
restart), a restart's refill of the drift windows from the stored parts (since session 35: each
type's latest 200 of the last week, one type with none; since session 36 also each camera's own
latest 200, the parts coming from 4 cameras a type in turn, beside the types' windows alone, as
session 35 read them: ``before:``), `results backup` of the whole store (since session 36), a
part's verdict from its images and `results parts --since 8h` (since session 37), the latest parts'
verdicts, `GET /v1/parts` (since session 38: all, the rejected, the incomplete), a shift's
summary of images and of parts (`GET /v1/summary`, `?parts=true`: since session 39), `results list
--since 8h` written as JSON lines (since session 38, beside the record's JSON form as it was made
before: ``before:``) and storing one more part (since session 37 also with a sink's outbox row,
and with `--push-parts`' part verdict; since session 39 with `--part-timeout`'s hook, and its
sweep), and a restart's resume of `--part-timeout` (since session 40: the parts stored after the
mark the previous run kept judged again, the mark a minute and an hour old). Median of
``--rounds``, in milliseconds. The read session 33 gave an index, the rows naming a file, is
also timed as it ran before (``before:``, the table scanned),
in the same run on the same rows; so are the retention pass's sizes of kept files on disk
(``--kept-files``: every row naming one, as ``--keep-images all`` for days leaves them), read
one file path at a time before session 34, by one listing per folder since, and since session 37
by the worker's later passes from the sizes it kept, reading the new files' only.

    python benchmarks/store_scale.py [--steps 10000,100000,1000000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from diffqc.output import json_line
from diffqc.service.line import LineServices
from diffqc.service.parts import (
    OVERDUE_KEY,
    OverdueParts,
    latest_parts,
    part_summary_counts,
    part_verdict,
)
from diffqc.service.retention import (
    ARTIFACT_ROWS,
    Artifact,
    RetentionPolicy,
    apply_retention,
)
from diffqc.service.sinks import OUTBOX, Outbox
from diffqc.service.store import (
    TABLE,
    ArtifactStore,
    ResultRecord,
    ResultStore,
    backup_store,
    iso_time,
    records_by_part,
    summarize,
)

TYPES = ("angle", "dist1", "dist6", "dots", "edge1", "edge2", "edge3", "edge4")
PER_SECOND = 1.0  # one part a second: the step's records end now
CAMERAS = 4  # each type's parts come from 4 cameras in turn (since session 36)


def _records(rng: np.random.Generator, first: int, n: int, end: float) -> list[ResultRecord]:
    u = rng.uniform(size=n)
    decisions = np.where(u < 0.95, "PASS", np.where(u < 0.99, "REVIEW", "REJECT"))
    out = []
    for i in range(n):
        k = first + i
        flagged = decisions[i] != "PASS"
        out.append(ResultRecord(
            created_at=end - (n - i) / PER_SECOND, source="http", decision=str(decisions[i]),
            part_id=f"P{k // len(TYPES):09d}", feature_type=TYPES[k % len(TYPES)],
            predicted_type=TYPES[k % len(TYPES)],
            camera=f"cam-{(k // len(TYPES)) % CAMERAS}",
            type_known=True, score=float(rng.normal(100, 10)), p_value=float(rng.uniform()),
            model_version="bench", latency_ms=5.0, image=f"{k}.png" if flagged else None,
            dedup_key=f"K{k}"))
    return out


def _rows(store: ResultStore, sql: str, args: list[object]) -> list[Any]:
    with store._reader() as conn:
        return list(conn.execute(sql, args).fetchall())


def _asdict_json(rec: ResultRecord) -> dict[str, Any]:
    """``ResultRecord.to_json`` as it was before session 38 (a deep copy of every field)."""
    out = dataclasses.asdict(rec)
    for name in ("duplicate", "dedup_key", "body_hash"):
        out.pop(name)
    out["created"] = iso_time(rec.created_at)
    out["reviewed"] = iso_time(rec.reviewed_at) if rec.reviewed_at else None
    return out


def _median_ms(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _measure(store: ResultStore, artifacts: ArtifactStore, url: str, rounds: int) -> dict[str, float]:
    """Each repeated read's median milliseconds on the store as it is now."""
    last = store.query(limit=1)[0].id or 0
    part = f"P{last // 2 // len(TYPES):09d}"
    now = time.time()
    day = RetentionPolicy(max_age_s=86400)
    table_scan = ARTIFACT_ROWS.replace(f"FROM {TABLE}", f"FROM {TABLE} NOT INDEXED")
    calls: dict[str, Callable[[], object]] = {
        "dashboard: latest 100 decisions": lambda: store.query(limit=100),
        "dashboard: decisions after the last seen": lambda: store.query(
            after_id=last - 1, oldest_first=True, limit=500),
        "dashboard: rates + histograms, last hour": lambda: (
            store.counts(since=now - 3600), store.query(since=now - 3600, limit=1000),
            store.pending_reviews()),
        "dashboard: review queue (20)": lambda: store.review_queue(20),
        "dashboard: defect kinds": lambda: store.defect_kinds(),
        "dashboard: a part by its id": lambda: store.query(part_id=part, limit=1),
        "results list --since 8h": lambda: store.query(since=now - 8 * 3600, limit=None),
        "results list --since 8h, as JSON lines (each record's to_json)": lambda: [
            json_line(r.to_json()) for r in store.query(since=now - 8 * 3600, limit=None)],
        "before: the same through dataclasses.asdict (to_json before session 38)": lambda: [
            json_line(_asdict_json(r)) for r in store.query(since=now - 8 * 3600, limit=None)],
        "results list, a day ago (8 h)": lambda: store.query(
            since=now - 32 * 3600, until=now - 24 * 3600, limit=None),
        "retention pass (a day of kept images)": lambda: apply_retention(store, artifacts, day),
        "retention: rows naming files (their index)": lambda: _rows(store, ARTIFACT_ROWS, []),
        "before: rows naming files (table scan)": lambda: _rows(store, table_scan, []),
        "GET /v1/parts/{id} (a part of 8 images)": lambda: part_verdict(
            part, store.query(part_id=part, limit=1001)),
        "GET /v1/parts (the latest 50 parts)": lambda: latest_parts(store, limit=50, types=TYPES),
        "GET /v1/parts?decision=REJECT (the latest 50 rejected)": lambda: latest_parts(
            store, limit=50, types=TYPES, verdict="REJECT"),
        "GET /v1/parts?complete=false (none: reads its 10,000 rows)": lambda: latest_parts(
            store, limit=50, types=TYPES, complete=False),
        "results parts --since 8h (every part's verdict)": lambda: [
            part_verdict(pid, rows) for pid, rows in records_by_part(store, since=now - 8 * 3600)],
        "GET /v1/summary, 8 h (images per type)": lambda: summarize(
            store.summary_counts(["feature_type"], now - 8 * 3600, None), 1),
        "GET /v1/summary?parts=true, 8 h (parts per line)": lambda: summarize(
            part_summary_counts(store, ["line"], now - 8 * 3600, None)[0], 1),
        "open the store (a restart)": lambda: ResultStore(url).close(),
        "results backup (the whole store, a copy)": lambda: backup_store(
            url, Path(url).with_name("backup.db"), force=True),
        "a restart's drift windows (8 types + 1 absent)": lambda: LineServices(
            SimpleNamespace(), store, None, SimpleNamespace(classes_=[*TYPES, "absent"])),
        "before: the types' windows only (no camera's own)": lambda: [
            store.query(feature_type=t, since=now - 7 * 86400, limit=200) for t in [*TYPES, "absent"]],
    }
    out = {name: _median_ms(call, rounds) for name, call in calls.items()}
    rng = np.random.default_rng(1)
    k = [last]

    def one_more() -> None:
        k[0] += 1
        store.insert(_records(rng, k[0], 1, time.time())[0])

    out["store one more part"] = _median_ms(one_more, rounds)
    # with a sink's outbox row written in its transaction, and with --push-parts the part's
    # verdict too (since session 37); the outbox emptied after, so later steps start without it
    for name, parts in (("store one more part, with a sink's outbox", None),
                        ("store one more part, with a sink's outbox and --push-parts", "each")):
        box = Outbox(store, ["bench"], parts=parts)
        store.insert_hooks.append(box.enqueue_records)
        out[name] = _median_ms(one_more, rounds)
        store.insert_hooks.clear()
        with store._transaction() as conn:
            conn.execute(f"DELETE FROM {OUTBOX}")
    # with --part-timeout and no sink: the part's verdict judged in the commit by its own hook
    # (since session 39), then a sweep of the parts still incomplete 30 s after their latest
    overdue = OverdueParts(store, 30.0, TYPES)
    store.insert_hooks.append(overdue.on_insert)
    out["store one more part, with --part-timeout (no sink)"] = _median_ms(one_more, rounds)
    store.insert_hooks.clear()
    out["--part-timeout's sweep, once a second (nothing due)"] = _median_ms(
        lambda: overdue.sweep(time.time()), rounds)
    # a restart with --part-timeout (since session 40): the parts stored after the kept mark
    # judged again, the previous run's mark a minute old (a crash) and an hour old (down an hour)
    for name, age in (("a restart's resume of --part-timeout, its mark a minute old", 60.0),
                      ("a restart's resume of --part-timeout, its mark an hour old", 3600.0)):
        store.set_meta(OVERDUE_KEY, repr(now - age))
        out[name] = _median_ms(lambda: OverdueParts(store, 30.0, TYPES).resume(now), rounds)
    store.set_meta(OVERDUE_KEY, None)
    return out


def _partition_ms(n: int) -> tuple[float, float]:
    """The first retention pass's split of ``n`` artifacts into those to expire (9 in 10, a
    backlog) and those kept: as it was before session 33 (``a not in doomed``, a list: quadratic)
    and as it is (by age, one pass)."""
    items = [Artifact(i, "images", f"{i}.png", float(i), 1000) for i in range(n)]
    cutoff = 0.9 * n
    t0 = time.perf_counter()
    doomed = [a for a in items if a.created_at < cutoff]
    before = [a for a in items if a not in doomed]
    t1 = time.perf_counter()
    kept = [a for a in items if a.created_at >= cutoff]
    t2 = time.perf_counter()
    assert kept == before
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def _kept_files_ms(n: int, rounds: int) -> tuple[float, float, float]:
    """The sizes the retention pass reads when every one of ``n`` rows names a kept image on
    disk (``--keep-images all`` for days): as before session 34 (each named file's path
    resolved, then stat'ed), a first pass (one listing per folder) and a later pass of the worker
    (since session 37: the sizes kept from the pass before, 60 new files read; since session 38
    the whole pass, :func:`apply_retention`, in plain loops); median milliseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = ArtifactStore(Path(tmp) / "data")
        with ResultStore(str(Path(tmp) / "kept.db")) as store:
            rng = np.random.default_rng(2)
            for first in range(0, n, 5000):
                records = _records(rng, first, min(5000, n - first), time.time())
                for rec in records:
                    rec.image = artifacts.save_bytes("images", b"x" * 100, "png")
                store.insert_many(records)

            def before() -> int:
                total = 0
                for _, _, _, image in _rows(store, ARTIFACT_ROWS, []):
                    path = artifacts.path("images", image)
                    total += path.stat().st_size if path is not None else 0
                return total

            def now() -> int:
                return int(apply_retention(store, artifacts, RetentionPolicy())["kept_bytes"])

            known: dict[str, dict[str, int]] = {}
            apply_retention(store, artifacts, RetentionPolicy(), known=known)  # the first pass
            k = [n]

            def later() -> int:  # a minute's new parts at a part a second, each with its image
                records = _records(rng, k[0], 60, time.time())
                for rec in records:
                    rec.image = artifacts.save_bytes("images", b"x" * 100, "png")
                store.insert_many(records)
                k[0] += 60
                t0 = time.perf_counter()
                apply_retention(store, artifacts, RetentionPolicy(), known=known)
                return int((time.perf_counter() - t0) * 1e6)

            assert before() == now() == 100 * n
            later_us = statistics.median(later() for _ in range(rounds))
            return _median_ms(before, rounds), _median_ms(now, rounds), later_us / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10000,100000,1000000",
                    help="store sizes to measure at, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partition", default="1000,5000,20000",
                    help="artifact counts at which to time the first pass's split, before and now")
    ap.add_argument("--kept-files", default="20000,200000",
                    help="files on disk, each named by a row, at which to time the pass's sizes, "
                         "before and now (0: skip)")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    rng = np.random.default_rng(args.seed)
    fill_s: list[float] = []
    first_pass: list[float] = []
    cols: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "results.db")
        artifacts = ArtifactStore(Path(tmp) / "data")
        with ResultStore(url) as store:
            for size in steps:
                t0 = time.perf_counter()
                stored = store.count()
                while stored < size:
                    n = min(5000, size - stored)
                    # the step's last part is inspected now: the last hour holds 3600 parts
                    end = time.time() - (size - stored - n) / PER_SECOND
                    store.insert_many(_records(rng, stored, n, end))
                    stored += n
                queue = store.query(decision="REVIEW", reviewed=False, limit=None, oldest_first=True)
                for rec in queue[: len(queue) // 5]:  # one in 5 reviewed, as an operator keeps up
                    bad = (rec.id or 0) % 3 == 0
                    store.set_review(rec.id or 0, "BAD" if bad else "GOOD", reviewer="bench",
                                     defect="crack" if bad else None)
                fill_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                apply_retention(store, artifacts, RetentionPolicy(max_age_s=86400))
                first_pass.append((time.perf_counter() - t0) * 1000)
                for name, ms in _measure(store, artifacts, url, args.rounds).items():
                    cols.setdefault(name, []).append(ms)
    print(f"fill time per step (s): {', '.join(f'{s:.0f}' for s in fill_s)}")
    print(f"first retention pass per step, expiring what is older than a day (ms): "
          f"{', '.join(f'{s:.0f}' for s in first_pass)}")
    for n in (int(x) for x in args.partition.split(",")):
        old, new = _partition_ms(n)
        print(f"first pass's split of {n:,} kept files, 9 in 10 expired: before {old:.0f} ms, "
              f"now {new:.1f} ms")
    for n in (int(x) for x in args.kept_files.split(",") if int(x) > 0):
        old, new, later = _kept_files_ms(n, min(args.rounds, 3))
        print(f"retention pass's sizes of {n:,} kept files on disk: before {old:.0f} ms, a first pass "
              f"{new:.0f} ms, a later pass of the worker (60 new files) {later:.0f} ms")
    print("| median ms | " + " | ".join(f"{s:,} rows" for s in steps) + " |")
    print("|---|" + "---:|" * len(steps))
    for name, values in cols.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
