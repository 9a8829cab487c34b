"""``diffqc results copy``: a SQLite store's whole history into a new store (a pilot's into the
plant's PostgreSQL). The PostgreSQL test needs ``DIFFQC_TEST_POSTGRES_URL`` (skipped without it,
a failure under ``CI=true``)."""

# ruff: noqa: F811  (the pg_url fixture imported from tests.test_service_postgres is re-bound as an argument)
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffqc.errors import StoreError
from diffqc.service.sinks import DEAD_LETTERS, OUTBOX, create_outbox_tables
from diffqc.service.store import META, REVIEWS, TABLE, ResultStore
from diffqc.service.transfer import copy_history
from tests.test_service_postgres import URL, pg_url  # noqa: F401
from tests.test_service_units import _rec

TABLES = (TABLE, REVIEWS, OUTBOX, DEAD_LETTERS)


def _pilot(db: Path) -> None:
    """A pilot station's store: records with gaps in their ids (a retried key's), a review
    changed once, a waiting MQTT message, a dead letter, a drift alarm kept."""
    with ResultStore(str(db)) as store:
        t0 = 1_796_000_000.0
        store.insert_many([_rec(f"P-{i}", "REJECT" if i == 3 else "PASS", created_at=t0 + i,
                                feature_type="dots", type_known=True, station="S1") for i in range(6)])
        store.insert_many([_rec("P-9", created_at=t0 + 9, feature_type="edge1", type_known=True,
                                heatmap=f"{'a' * 32}.png", image=f"{'b' * 32}.png")])
        store.set_review(4, "BAD", reviewer="ana", defect="crack")
        store.set_review(4, "GOOD", reviewer="ben", replaces="BAD")
        store.set_meta('drift_alarm:{"feature_type": "dots"}', json.dumps({"raised_at": t0}))
        with store._transaction() as conn:
            conn.execute(f"DELETE FROM {TABLE} WHERE id = 2")  # a gap in the ids: kept as it is
            create_outbox_tables(store, conn)
            conn.execute(f"INSERT INTO {OUTBOX} (sink, kind, record_id, topic_key, payload, created_at) "
                         "VALUES ('mqtt', 'decision', 7, 'dots', '{}', ?)", (t0 + 9,))
            conn.execute(f"INSERT INTO {DEAD_LETTERS} (sink, kind, record_id, topic_key, payload, attempts, "
                         "created_at, failed_at) VALUES ('webhook', 'decision', 5, 'dots', '{}', 8, ?, ?)",
                         (t0 + 5, t0 + 6))


def _rows(store: ResultStore, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table``, by id (the state by key), as the store reads it."""
    with store._reader() as conn:
        order = "key" if table == META else "id"
        return [tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()]


def _same_history(source: Path, target_url: str) -> None:
    with ResultStore(str(source), read_only=True) as old, ResultStore(target_url, read_only=True) as new:
        for table in TABLES:
            assert _rows(new, table) == _rows(old, table), table
        assert _rows(new, META) == _rows(old, META)
        assert [r.to_json() for r in new.query(limit=None)] == [r.to_json() for r in old.query(limit=None)]
        assert new.review_history(4) == old.review_history(4)


def _next_id(url: str) -> int:
    with ResultStore(url) as store:
        return int(store.insert(_rec("P-new", created_at=1_796_000_100.0)).id or 0)


def test_a_pilots_sqlite_history_is_copied_whole_into_a_new_store(tmp_path: Path) -> None:
    """Every record with its id, its reviews, the sinks' waiting message and dead letter, and the
    kept state, in a new SQLite store; the source unchanged; the next part numbered after the
    copied ones."""
    source, target = tmp_path / "pilot.db", tmp_path / "plant.db"
    _pilot(source)
    before = source.read_bytes()
    with pytest.warns(UserWarning, match=(rf"1 of the records copied name kept images or heat maps: their "
                                          rf"files stay in the pilot's --data-dir \(by default the store's "
                                          rf"folder, {tmp_path}\); give the service on the new store")):
        said = copy_history(str(source), str(target))
    assert {k: said[k] for k in ("records", "reviews", "outbox", "dead_letters", "state")} == {
        "records": 6, "reviews": 2, "outbox": 1, "dead_letters": 1, "state": 1}
    assert said["kept_files"] == 1
    _same_history(source, str(target))
    assert source.read_bytes() == before
    assert _next_id(str(target)) == 8


def test_a_copy_is_refused_where_it_would_mix_or_lose_history(tmp_path: Path) -> None:
    """Into a store that holds a history already (an older one copied after newer parts would read
    as the newest), from a store serve holds open (what it stores meanwhile would be left
    behind), from a store into itself, from a file that is no store: refused, nothing changed."""
    source, target = tmp_path / "pilot.db", tmp_path / "plant.db"
    _pilot(source)
    with ResultStore(str(target)) as store:
        store.insert(_rec("P-first-at-plant", created_at=1_796_000_200.0))
    with pytest.raises(StoreError, match=r"plant\.db holds a history already \(diffqc_results 1\): results "
                                         r"copy fills a store that holds none"):
        copy_history(str(source), str(target))
    with ResultStore(str(target), read_only=True) as store:
        assert [r.part_id for r in store.query(limit=None)] == ["P-first-at-plant"]
    with pytest.raises(StoreError, match="is the store to copy"):
        copy_history(str(source), str(source))
    other = tmp_path / "orders.db"
    sqlite3.connect(other).execute("CREATE TABLE orders (id INTEGER)").connection.commit()
    with pytest.raises(StoreError, match=r"orders\.db holds no diffqc result store \(its tables: orders\)"):
        copy_history(str(other), str(tmp_path / "new.db"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from diffqc.service.store import "
                               "ResultStore; s = ResultStore(sys.argv[1]); print('open', flush=True); "
                               "time.sleep(60)", str(source)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"  # as serve holds it
        with pytest.raises(StoreError, match=r"pilot\.db is open in another process \(serve or watch\?\): "
                                             "stop it, then copy"):
            copy_history(str(source), str(tmp_path / "new.db"))
    finally:
        holder.kill()
        holder.wait()
    if (tmp_path / "new.db").exists():  # made empty by the first refusal's store, never filled
        with ResultStore(str(tmp_path / "new.db"), read_only=True) as store:
            assert store.count() == 0


def test_the_command_prints_what_it_copied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffqc.cli import main

    source = tmp_path / "pilot.db"
    _pilot(source)
    assert main(["results", "copy", str(tmp_path / "plant.db"), "--db", str(source)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["records"] == 6 and said["target"] == str(tmp_path / "plant.db")


@pytest.mark.postgres
@pytest.mark.skipif(not URL, reason="DIFFQC_TEST_POSTGRES_URL is not set")
def test_a_pilots_sqlite_history_is_copied_into_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The plant's PostgreSQL: the same rows and ids, and the next part numbered after them (the
    identity sequences moved past the copied ids, else the next insert collides with id 1)."""
    source = tmp_path / "pilot.db"
    _pilot(source)
    with pytest.warns(UserWarning, match="name kept images or heat maps"):
        said = copy_history(str(source), pg_url)
    assert (said["records"], said["reviews"], said["outbox"], said["dead_letters"]) == (6, 2, 1, 1)
    _same_history(source, pg_url)
    assert _next_id(pg_url) == 8
    with pytest.raises(StoreError, match="holds a history already"):
        copy_history(str(source), pg_url)
