"""Retention of kept images and heat maps: by age and by disk budget, never a record, never a
file the service did not write."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)
from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from diffqc.errors import ConfigError
from diffqc.service.retention import (
    ARTIFACT_ROWS,
    RetentionPolicy,
    RetentionWorker,
    apply_retention,
    artifact_sizes,
)
from diffqc.service.store import ArtifactStore, ResultRecord, ResultStore
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    detector,
    running_app,
    samples,
    service_model,
)


def _store_parts(store: ResultStore, artifacts: ArtifactStore, ages_s: list[float],
                 now: float, station: str | None = None) -> list[ResultRecord]:
    recs = []
    for i, age in enumerate(ages_s):
        heat = artifacts.save_png("heatmaps", np.full((16, 16, 3), i, np.uint8))
        image = artifacts.save_bytes("images", bytes(1000 + i), "png")
        recs.append(ResultRecord(created_at=now - age, source="t", decision="REJECT", part_id=f"p{i}",
                                 feature_type="stripes", heatmap=heat, image=image, station=station))
    return store.insert_many(recs)


@pytest.fixture
def stores(tmp_path: Path):  # type: ignore[no-untyped-def]
    with ResultStore(str(tmp_path / "r.db")) as store:
        yield store, ArtifactStore(tmp_path / "data")


def test_max_age_expires_files_and_keeps_records_with_a_note(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    old, young = _store_parts(store, artifacts, [10 * 86400, 60], now)
    foreign = tmp_path / "data" / "images" / "operator-notes.png"  # not written by the service
    foreign.write_bytes(b"keep me")
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=86400), now=now)
    assert out["expired"] == 2 and out["kept"] == 2
    assert store.count() == 2  # no record deleted
    got_old, got_young = store.get(old.id), store.get(young.id)  # type: ignore[arg-type]
    assert got_old is not None and got_young is not None
    assert got_old.heatmap is None and got_old.image is None
    assert got_old.heatmap_expired_at == pytest.approx(now) and got_old.image_expired_at == pytest.approx(now)
    assert got_young.heatmap == young.heatmap and got_young.heatmap_expired_at is None
    assert artifacts.path("heatmaps", old.heatmap) is None and artifacts.path("images", old.image) is None
    assert artifacts.path("heatmaps", young.heatmap) is not None
    assert foreign.read_bytes() == b"keep me"
    # a second pass finds nothing more to do
    assert apply_retention(store, artifacts, RetentionPolicy(max_age_s=86400), now=now)["expired"] == 0


def test_disk_budget_expires_the_oldest_first(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    recs = _store_parts(store, artifacts, [400, 300, 200, 100], now)
    sizes = {r.id: artifacts.path("heatmaps", r.heatmap).stat().st_size  # type: ignore[union-attr]
             + artifacts.path("images", r.image).stat().st_size for r in recs}  # type: ignore[union-attr]
    budget = sizes[recs[2].id] + sizes[recs[3].id]  # room for the two youngest parts exactly
    out = apply_retention(store, artifacts, RetentionPolicy(max_bytes=budget), now=now)
    assert out["kept_bytes"] <= budget and out["expired"] == 4
    kept = [store.get(r.id) for r in recs]  # type: ignore[arg-type]
    assert [k.image is not None for k in kept if k] == [False, False, True, True]
    assert [k.heatmap is not None for k in kept if k] == [False, False, True, True]
    assert store.count() == 4


def test_age_and_budget_together_expire_the_old_then_the_oldest(stores) -> None:  # type: ignore[no-untyped-def]
    """Both limits in one pass: the files of parts past the age go, then the oldest of the rest
    while they exceed the budget; a heat map goes before its part's image (its row's order)."""
    store, artifacts = stores
    now = time.time()
    recs = _store_parts(store, artifacts, [5000, 300, 200, 100], now)
    image_bytes = artifacts.path("images", recs[3].image).stat().st_size  # type: ignore[union-attr]
    heat_bytes = artifacts.path("heatmaps", recs[3].heatmap).stat().st_size  # type: ignore[union-attr]
    both = {r.id: artifacts.path("heatmaps", r.heatmap).stat().st_size  # type: ignore[union-attr]
            + artifacts.path("images", r.image).stat().st_size for r in recs}  # type: ignore[union-attr]
    budget = both[recs[2].id] + image_bytes + heat_bytes - 1  # the youngest, and part 2 less a byte
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=1000, max_bytes=budget), now=now)
    got = [store.get(r.id) for r in recs]  # type: ignore[arg-type]
    assert [(g.heatmap is not None, g.image is not None) for g in got if g] == [
        (False, False), (False, False), (False, True), (True, True)]
    assert out["expired"] == 5 and out["kept"] == 3 and out["kept_bytes"] <= budget


def test_parts_stored_while_the_clock_was_behind_keep_their_files_for_the_age(stores, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An edge box without a clock battery boots with its clock behind (at its last shutdown,
    or at systemd's build date) and stores parts so before NTP sets it: they were not inspected
    200 days ago, only said so, and they follow a part stored 5 days ago. Their files are kept
    for the age as that part's are; a first store with such a clock cannot know, and a time in the
    future (a clock ahead) holds back no later part's expiry."""
    store, artifacts = stores
    now = time.time()
    day = 86400.0
    recs = _store_parts(store, artifacts, [5 * day, 200 * day, 200 * day, 60], now)
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=30 * day), now=now)
    assert out["expired"] == 0
    assert all(g is not None and g.image is not None for g in (store.get(r.id) for r in recs))  # type: ignore[arg-type]
    # another store: its first part with the clock behind; a clock ahead by ten years for one
    # part, set right before the next, 40 days ago
    with ResultStore(str(tmp_path / "other.db")) as other:
        first, ahead, behind = _store_parts(other, artifacts, [200 * day, -3650 * day, 40 * day], now)
        apply_retention(other, artifacts, RetentionPolicy(max_age_s=30 * day), now=now)
        got = [other.get(r.id) for r in (first, ahead, behind)]  # type: ignore[arg-type]
    assert [g is not None and g.image is not None for g in got] == [False, True, False]


def test_a_clock_that_jumps_ahead_between_passes_expires_nothing_early(
        stores, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A wall clock set 60 days ahead (a bad time source; or one behind, set right) made one
    pass expire every kept file younger than 60 days. The service's clock watch sees the step
    against the time since boot: the parts this run stored before it are aged from their time +
    the step, those after it as they are; an earlier run's keep the times the clock then gave."""
    from diffqc.service.line import ClockWatch

    store, artifacts = stores
    day = 86400.0
    now = time.time()
    wall, since_boot = [now], [1000.0]
    clock = ClockWatch(None, wall=lambda: wall[0], boot=lambda: since_boot[0])
    earlier = _store_parts(store, artifacts, [20 * day], now)  # stored by an earlier run
    worker = RetentionWorker(store, artifacts, RetentionPolicy(max_age_s=30 * day), clock=clock.read)
    before = _store_parts(store, artifacts, [5 * day, 3600], now)
    assert worker.run_once()["expired"] == 0
    wall[0], since_boot[0] = now + 60 * day + 60, 1060.0  # 60 s later, the clock 60 days ahead
    with caplog.at_level("WARNING", logger="diffqc"):
        assert worker.run_once()["expired"] == 2  # the earlier run's part, 80 days old by the clock
    assert "stepped forward by 5184000 s" in caplog.text
    after = _store_parts(store, artifacts, [0], now + 60 * day + 20 * day)
    # 26 days on: the part stored 5 days before the jump is 31 days old, the others younger
    wall[0], since_boot[0] = now + 60 * day + 26 * day, 1060.0 + 26 * day
    assert worker.run_once()["expired"] == 2
    got = [store.get(r.id) for r in (*earlier, *before, *after)]  # type: ignore[arg-type]
    assert [g is not None and g.image is not None for g in got] == [False, False, True, True]
    # the time since boot going on as the wall clock does: no jump, nothing said
    caplog.clear()
    wall[0], since_boot[0] = wall[0] + 60, since_boot[0] + 60
    with caplog.at_level("WARNING", logger="diffqc"):
        assert worker.run_once()["expired"] == 0
    assert "stepped" not in caplog.text


def test_a_file_already_gone_is_noted_and_nothing_else_breaks(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    now = time.time()
    (rec,) = _store_parts(store, artifacts, [5000], now)
    artifacts.path("images", rec.image).unlink()  # type: ignore[union-attr]
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=1000), now=now)
    assert out["expired"] == 2
    got = store.get(rec.id)  # type: ignore[arg-type]
    assert got is not None and got.image is None and got.image_expired_at is not None


def test_a_file_that_cannot_be_deleted_stays_named_and_is_tried_again(  # type: ignore[no-untyped-def]
        stores, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A kept file that could not be deleted (a read-only images/ folder; tests run as root, so
    the refusal is raised as the OS raises it) lost its row's name all the same and was counted
    as freed: left on the disk for good, no pass to see it again, the budget overrun unseen. Its
    row keeps naming it, it is not counted, the log says it, and the next pass deletes it."""
    import logging

    store, artifacts = stores
    now = time.time()
    (rec,) = _store_parts(store, artifacts, [5000], now)
    image, heat = artifacts.path("images", rec.image), artifacts.path("heatmaps", rec.heatmap)
    assert image is not None and heat is not None
    heat_size = heat.stat().st_size
    unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:
        if self == image:
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level(logging.WARNING, logger="diffqc.service"):
        out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=1000), now=now)
    assert out["expired"] == 1 and out["freed_bytes"] == heat_size and not heat.exists()
    got = store.get(rec.id)  # type: ignore[arg-type]
    assert got is not None and got.heatmap is None and got.image == rec.image and got.image_expired_at is None
    assert image.exists() and out["kept"] == 1 and out["kept_bytes"] == image.stat().st_size
    assert f"{rec.image}: Permission denied" in caplog.text and "tried again" in caplog.text
    monkeypatch.undo()
    out = apply_retention(store, artifacts, RetentionPolicy(max_age_s=1000), now=now)
    got = store.get(rec.id)  # type: ignore[arg-type]
    assert out["expired"] == 1 and not image.exists() and got is not None and got.image is None


def test_a_station_on_a_shared_store_expires_only_its_own_files(tmp_path: Path) -> None:
    """Two stations' services on one store (a plant's PostgreSQL), each keeping its files in its
    own data folder: a service's retention expired every row naming a file, the other station's
    too, whose files it cannot see, so their rows lost their pictures, and the files, which no
    row named any more, stayed on the other station's disk for ever (its own retention no longer
    saw them). With its ``--station`` a service expires the rows whose files are in its folder,
    and those of its station (a file of its own already gone is noted, as before)."""
    now = time.time()
    with ResultStore(str(tmp_path / "shared.db")) as store:
        here, there = ArtifactStore(tmp_path / "a"), ArtifactStore(tmp_path / "b")
        (mine,) = _store_parts(store, here, [10 * 86400], now)  # sent without a station
        (gone,) = _store_parts(store, here, [10 * 86400], now, station="A")
        here.path("images", gone.image).unlink()  # type: ignore[union-attr]
        old_b, _ = _store_parts(store, there, [10 * 86400, 60], now)
        out = apply_retention(store, here, RetentionPolicy(max_age_s=86400), now=now, station="A")
        assert out["expired"] == 4  # its two records' heat maps and images
        for rec, expired in ((mine, True), (gone, True), (old_b, False)):
            got = store.get(rec.id)  # type: ignore[arg-type]
            assert got is not None and (got.image is None) == expired, rec
        assert there.path("images", old_b.image) is not None  # station B's file, still named
        out = apply_retention(store, here, RetentionPolicy(max_bytes=1), now=now, station="A")
        assert out["expired"] == 0 and out["kept_bytes"] == 0  # none of B's counted in A's budget
        out = apply_retention(store, there, RetentionPolicy(max_age_s=86400), now=now, station="B")
        assert out["expired"] == 2 and there.path("images", old_b.image) is None


def test_the_retention_pass_reads_the_rows_naming_files_through_their_index(stores) -> None:  # type: ignore[no-untyped-def]
    """Records are never deleted: a month on the line holds millions of rows, a few thousand of
    them naming a kept image or heat map. The retention pass (every 60 s) read the whole table
    to find those (100 ms at 1M rows, growing with the history; BENCHMARKS.md "Session 33"):
    SQLite's plan for it now searches their partial index, which an expired row leaves."""
    store, _ = stores
    with store._reader() as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + ARTIFACT_ROWS))
    assert plan == "SCAN diffqc_results USING INDEX diffqc_results_artifacts"


def test_sizes_come_from_one_listing_of_the_files_the_service_wrote(tmp_path: Path) -> None:
    """The budget's sizes are read from one listing of each folder (a path resolved per file
    took 8 s a pass for 200,000 kept files): only generated names count, a symlink named as one
    is not followed (a file outside, of no size to us), a missing folder is empty."""
    art = ArtifactStore(tmp_path / "data")
    name = art.save_bytes("images", b"x" * 10, "png")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"y" * 1000)
    (tmp_path / "data" / "images" / f"{'a' * 32}.png").symlink_to(outside)
    (tmp_path / "data" / "images" / "notes.txt").write_text("the operator's")
    assert artifact_sizes(art, "images") == {name: 10}
    assert artifact_sizes(art, "heatmaps") == {}
    assert artifact_sizes(ArtifactStore(tmp_path / "nothing"), "images") == {}


def test_later_passes_read_only_the_files_new_since_the_last(stores, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass listed both folders every minute (1.2 s for 200,000 kept files, a burst beside
    inspection on an edge box's cores; BENCHMARKS.md "Session 34"). The worker keeps the sizes
    between passes: a kept file is written whole before its row and never changed, so a later
    pass reads only the new files' sizes (a symlink among them not followed) and forgets the
    expired ones; the bytes kept are the same as a listing's."""
    from diffqc.service import retention

    store, artifacts = stores
    now = time.time()
    listings: list[str] = []
    real = retention.artifact_sizes

    def counted(art: ArtifactStore, kind: str) -> dict[str, int]:
        listings.append(kind)
        return real(art, kind)

    monkeypatch.setattr(retention, "artifact_sizes", counted)
    worker = RetentionWorker(store, artifacts, RetentionPolicy(max_age_s=1000))
    _store_parts(store, artifacts, [5000, 10], now)
    first = worker.run_once()
    assert listings == ["heatmaps", "images"] and first["expired"] == 2
    new = _store_parts(store, artifacts, [5], now)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"y" * 5000)
    link = f"{'b' * 32}.png"
    (artifacts.root / "images" / link).symlink_to(outside)
    store.insert(ResultRecord(created_at=now, source="t", decision="REJECT", image=link))
    second = worker.run_once()
    assert listings == ["heatmaps", "images"]  # no listing again
    fresh: dict[str, dict[str, int]] = {}  # what a pass without the kept sizes reads
    listed = apply_retention(store, artifacts, RetentionPolicy(), known=fresh)
    assert second["kept_bytes"] == listed["kept_bytes"]
    on_disk = sum(artifacts.path(k, n).stat().st_size  # type: ignore[union-attr]
                  for r in store.query(limit=None) if r.image != link
                  for k, n in (("heatmaps", r.heatmap), ("images", r.image)) if n)
    assert second["kept_bytes"] == on_disk  # the symlink counts 0
    assert {k: set(v) for k, v in worker._sizes.items()} == {k: set(v) for k, v in fresh.items()}
    assert new[0].image in worker._sizes["images"] and new[0].heatmap in worker._sizes["heatmaps"]


def test_worker_and_policy_validation(stores) -> None:  # type: ignore[no-untyped-def]
    store, artifacts = stores
    with pytest.raises(ConfigError, match="max age"):
        RetentionPolicy(max_age_s=0).validate()
    with pytest.raises(ConfigError, match="budget"):
        RetentionPolicy(max_bytes=-1).validate()
    _store_parts(store, artifacts, [10, 20], time.time())
    worker = RetentionWorker(store, artifacts, RetentionPolicy(max_bytes=0))
    assert worker.run_once()["expired"] == 4
    assert "diffqc_artifacts_expired_total 4" in worker.metrics_lines()
    assert "diffqc_artifacts_kept_bytes 0" in worker.metrics_lines()


# --------------------------------------------------------------------------- line metadata
_OLD_SCHEMA = """CREATE TABLE diffqc_results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DOUBLE PRECISION NOT NULL, source TEXT NOT NULL,
    decision TEXT NOT NULL, part_id TEXT, feature_type TEXT, predicted_type TEXT, type_known INTEGER,
    score DOUBLE PRECISION, p_value DOUBLE PRECISION, model_version TEXT NOT NULL DEFAULT '',
    latency_ms DOUBLE PRECISION, heatmap TEXT, image TEXT, reason TEXT, type_scores TEXT,
    dedup_key TEXT, review TEXT, reviewed_at DOUBLE PRECISION, reviewer TEXT, review_note TEXT,
    UNIQUE (source, dedup_key))"""


def test_an_old_store_gains_the_line_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # a store written before line metadata existed
        conn.execute(_OLD_SCHEMA)
        conn.execute("INSERT INTO diffqc_results (created_at, source, decision, part_id, review) "
                     "VALUES (1.0, 'http', 'PASS', 'old-part', 'BAD')")
        # and its review history before verdicts named a defect's kind
        conn.execute("CREATE TABLE diffqc_reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, record_id BIGINT "
                     "NOT NULL, review TEXT NOT NULL, reviewed_at DOUBLE PRECISION, reviewer TEXT, "
                     "review_note TEXT)")
        conn.execute("INSERT INTO diffqc_reviews (record_id, review, reviewed_at) VALUES (1, 'BAD', 1.5)")
    with ResultStore(str(db)) as store:
        (old,) = store.query()
        assert old.part_id == "old-part" and old.line is None and old.heatmap_expired_at is None
        assert old.review == "BAD" and old.review_defect is None
        store.set_review(1, "BAD", "ann", defect="scratch")
        assert [(h["review"], h["review_defect"]) for h in store.review_history(1)] == [
            ("BAD", None), ("BAD", "scratch")]
        store.insert(ResultRecord(created_at=2.0, source="http", decision="REJECT", part_id="new",
                                  line="L1", station="S1", camera="C1"))
        assert [r.part_id for r in store.query(line="L1")] == ["new"]
        assert [r.part_id for r in store.query(station="S1", camera="C1")] == ["new"]
        assert store.query(line="L2") == []
    with sqlite3.connect(db) as conn:
        cols = {row[1] for row in conn.execute("PRAGMA table_info(diffqc_results)")}
    assert {"line", "station", "camera", "heatmap_expired_at", "image_expired_at", "review_defect"} <= cols


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_line_fields_are_stored_filterable_and_artifacts_expire_through_http(
        detector, samples, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data, ftype = samples.one("REJECT")
    async with running_app(detector, tmp_path, keep_images="all", heatmaps="all", retention_max_bytes=0,
                           retention_interval_s=0.2) as (client, state):
        r = await client.post("/v1/inspect", params={"feature_type": ftype, "line": "L1", "camera": "cam-7"},
                              content=data, headers=AUTH)
        assert r.status_code == 200
        rec = r.json()
        assert (rec["line"], rec["station"], rec["camera"]) == ("L1", None, "cam-7")
        files = {"image": ("part.png", data, "image/png")}
        form = {"feature_type": ftype, "line": "L2", "station": "S9"}
        r2 = await client.post("/v1/inspect", files=files, data=form, headers=AUTH)
        assert r2.status_code == 200 and (r2.json()["line"], r2.json()["station"]) == ("L2", "S9")
        got = (await client.get("/v1/results", params={"line": "L1"}, headers=AUTH)).json()
        assert [x["id"] for x in got["results"]] == [rec["id"]]
        got = (await client.get("/v1/results", params={"station": "S9"}, headers=AUTH)).json()
        assert [x["id"] for x in got["results"]] == [r2.json()["id"]]
        bad = await client.post("/v1/inspect", params={"feature_type": ftype, "line": "a\x00b"},
                                content=data, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["code"] == "bad_line"

        async def expired() -> dict:  # type: ignore[type-arg]
            for _ in range(300):
                row = (await client.get(f"/v1/results/{rec['id']}", headers=AUTH)).json()
                if row["heatmap_expired_at"] is not None and row["image_expired_at"] is not None:
                    return dict(row)
                await asyncio.sleep(0.1)
            raise AssertionError("the retention worker did not expire the artifacts")

        row = await expired()
        assert row["heatmap_url"] is None and row["image_url"] is None and row["decision"] == "REJECT"
        assert (await client.get(f"/v1/results/{rec['id']}/heatmap", headers=AUTH)).status_code == 404
        assert state.store.count() == 2
        assert "diffqc_artifacts_expired_total" in (await client.get("/metrics", headers=AUTH)).text


def test_watch_cli_records_line_station_camera(service_model, samples, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``diffqc watch --line --station --camera`` stores them on every part, also on an
    unreadable file's NOT_INSPECTED record."""
    from diffqc.cli import main

    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "a.png").write_bytes(samples.all[0][0])
    (folder / "bad.png").write_bytes(b"garbage")
    db = tmp_path / "w.db"
    assert main(["watch", str(folder), str(service_model[0]), "--db", str(db), "--once", "--settle", "0",
                 "--poll", "0.05", "--line", "L3", "--station", "S1", "--camera", "cam-2"]) == 0
    with ResultStore(str(db)) as store:
        recs = store.query(line="L3", station="S1", camera="cam-2", limit=None)
    assert sorted(r.part_id or "" for r in recs) == ["a", "bad"]
