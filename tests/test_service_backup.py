"""`diffqc results backup`: a copy of a SQLite store taken while the line writes to it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from diffqc.cli import main
from diffqc.errors import StoreError
from diffqc.service.store import ResultRecord, ResultStore, backup_store
from tests.conftest import full_disk


def _part(i: int) -> ResultRecord:
    return ResultRecord(created_at=time.time(), source="line", decision="PASS", feature_type="edge",
                        p_value=0.5, part_id=f"p{i}", camera="cam-a")


def _ids(path: Path) -> list[int]:
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file
        return [r[0] for r in conn.execute("SELECT id FROM diffqc_results ORDER BY id")]
    finally:
        conn.close()


def test_a_backup_taken_while_the_line_writes_is_the_store_as_of_one_commit(tmp_path: Path) -> None:
    """A store being written is in two files (the database and its -wal): a `cp` of the first
    misses the latest records, and a copy of either mid-write can be torn. `results backup`
    copies it as of one commit while a writer goes on: a single file, every record committed
    before the backup began and no half of a later batch (each batch of 10 whole), readable by
    `results list`."""
    db = tmp_path / "line" / "results.db"
    line = ResultStore(str(db))
    line.insert_many([_part(i) for i in range(500)])
    stop, written = threading.Event(), [500]

    def keep_writing() -> None:  # the service's worker: a batch of 10 parts per commit
        while not stop.is_set():
            line.insert_many([_part(written[0] + k) for k in range(10)])
            written[0] += 10

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.2)
        before = written[0]
        out = backup_store(str(db), tmp_path / "copy.db")
        time.sleep(0.2)
    finally:
        stop.set()
        writer.join()
        line.close()
    ids = _ids(tmp_path / "copy.db")
    assert before <= out["records"] == len(ids) < written[0]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) % 10 == 0  # whole batches, none lost
    assert out["backup"] == str(tmp_path / "copy.db")
    assert out["bytes"] == (tmp_path / "copy.db").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "line"]  # no -wal, nothing left over


def test_results_backup_names_replaces_and_refuses(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A folder gets a file named by the store and the time (a cron job's nightly copy); an
    existing file is replaced only with --force and only when it is an earlier backup; the
    store itself, a missing folder and a PostgreSQL store are refused with what to do."""
    db = tmp_path / "results.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_part(i) for i in range(3)])
    nightly = tmp_path / "nas"
    nightly.mkdir()
    assert main(["results", "backup", str(nightly), "--db", str(db)]) == 0
    said = json.loads(capsys.readouterr().out)
    [made] = list(nightly.iterdir())
    assert said["backup"] == str(made) and said["records"] == 3
    assert made.name.startswith("results-") and made.suffix == ".db" and len(_ids(made)) == 3

    copy = tmp_path / "copy.db"
    assert main(["results", "backup", str(copy), "--db", str(db)]) == 0
    with ResultStore(str(db)) as store:
        store.insert_many([_part(3)])
    capsys.readouterr()
    assert main(["results", "backup", str(copy), "--db", str(db)]) == 1
    assert f"{copy} exists: give another path (a folder names each backup by its time), or --force" \
        in capsys.readouterr().err
    assert main(["results", "backup", str(copy), "--db", str(db), "--force"]) == 0
    assert len(_ids(copy)) == 4

    notes = tmp_path / "notes.db"
    notes.write_bytes(b"the shift's notes, not a result store")
    assert main(["results", "backup", str(notes), "--db", str(db), "--force"]) == 1
    said = capsys.readouterr().err
    assert f"{notes} is not a diffqc result store: --force replaces an earlier backup only" in said
    assert notes.read_bytes() == b"the shift's notes, not a result store"

    for out, needle in [(db, "is the store itself"),
                        (tmp_path / "no" / "copy.db", f"its folder {tmp_path / 'no'} does not exist")]:
        assert main(["results", "backup", str(out), "--db", str(db), "--force"]) == 1
        assert needle in capsys.readouterr().err
    with pytest.raises(StoreError) as refused:
        backup_store("postgresql://qc:secret@db/line", tmp_path / "pg.db")
    assert str(refused.value).startswith("postgresql://qc:***@db/line is a PostgreSQL store: back it up "
                                         "with PostgreSQL's own tools, e.g. pg_dump")
    assert main(["results", "backup", str(tmp_path / "x.db"), "--db", str(tmp_path / "typo.db")]) == 1
    assert "does not exist: nothing to back up" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()


def test_a_backup_beside_a_stale_journal_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A store deleted without its ``-wal`` (or one a crash left so, given with --force): the
    backup renamed into its place was read through that file, as the old store, its own records
    gone at the first read, while the command said it was written. Refused, naming the file;
    nothing is written or removed."""
    db = tmp_path / "results.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_part(i) for i in range(3)])
    out = tmp_path / "b.db"
    for ending in ("-wal", "-journal"):
        stale = Path(f"{out}{ending}")
        stale.write_bytes(b"an older store's pages")
        assert main(["results", "backup", str(out), "--db", str(db), "--force"]) == 1
        said = capsys.readouterr().err
        assert f"{stale} lies beside {out}" in said, said
        assert stale.read_bytes() == b"an older store's pages" and not out.exists()
        stale.unlink()
    assert main(["results", "backup", str(out), "--db", str(db)]) == 0 and len(_ids(out)) == 3


def test_a_backup_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    """A full disk mid-copy: the error names the backup, and no partial file is left behind (an
    earlier backup at the path stays as it was)."""
    db = tmp_path / "results.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_part(i) for i in range(2000)])
    out = tmp_path / "out"
    out.mkdir()
    earlier = backup_store(str(db), out / "copy.db")
    before = (out / "copy.db").read_bytes()
    with full_disk(64 * 1024), pytest.raises(StoreError, match=f"cannot write the backup {out / 'copy.db'}"):
        backup_store(str(db), out / "copy.db", force=True)
    assert [p.name for p in out.iterdir()] == ["copy.db"] and (out / "copy.db").read_bytes() == before
    assert earlier["records"] == 2000


def test_results_restore_puts_the_backup_back_whatever_wal_a_crash_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A backup put back with `cp` over a store that a crash (a power cut, kill -9) left with its
    -wal file is not the backup: SQLite applies that file's pages over it (here the backup's 50
    records read as 80, the 30 it was taken to undo among them). `results restore BACKUP` puts
    it back through SQLite, the store's own -wal applied first and then every page replaced,
    after a copy of the store as it was, kept beside it; it is refused while another process
    holds the store open (serve, watch), and for a backup that is not a result store."""
    import os
    import shutil
    import subprocess
    import sys

    db = tmp_path / "results.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_part(i) for i in range(50)])
    backup_store(str(db), tmp_path / "b.db")
    crash = ("import os, sys, time; from diffqc.service.store import ResultRecord, ResultStore; "
             "s = ResultStore(sys.argv[1]); s.insert_many([ResultRecord(created_at=time.time(), "
             "source='line', decision='PASS', feature_type='edge') for _ in range(30)]); os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(db)], check=True, timeout=60)
    assert (tmp_path / "results.db-wal").exists()  # what the crash left
    shutil.copy(tmp_path / "results.db-wal", tmp_path / "wal.saved")
    shutil.copy(db, tmp_path / "db.saved")
    shutil.copy(tmp_path / "b.db", db)  # the cp a user would do
    with ResultStore(str(db), read_only=True) as store:
        assert len(store.query(limit=None)) == 80  # not the backup
    shutil.copy(tmp_path / "db.saved", db)
    shutil.copy(tmp_path / "wal.saved", tmp_path / "results.db-wal")

    assert main(["results", "restore", str(tmp_path / "b.db"), "--db", str(db)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["store"], out["records"]) == (str(db), 50)
    assert [r.id for r in ResultStore(str(db), read_only=True).query(limit=None, oldest_first=True)] == \
        list(range(1, 51))
    kept = Path(out["kept"])
    assert kept.parent == tmp_path and kept.name.startswith("results.db.before-restore-")
    assert len(_ids(kept)) == 80  # the store as it was, with what the crash had committed

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from diffqc.service.store import "
                               "ResultStore; s = ResultStore(sys.argv[1]); print('open', flush=True); "
                               "time.sleep(60)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"  # as serve holds it
        assert main(["results", "restore", str(kept), "--db", str(db)]) == 1
        err = capsys.readouterr().err
        assert f"{db} is open in another process (serve or watch?): stop it, then restore" in err
    finally:
        holder.kill()
        holder.wait()
    assert len(ResultStore(str(db), read_only=True).query(limit=None)) == 50  # unchanged
    (tmp_path / "notes.txt").write_text("not a store")
    for backup, why in [(tmp_path / "notes.txt", "is not a diffqc result store"),
                        (tmp_path / "missing.db", "does not exist"), (db, "is the store itself")]:
        assert main(["results", "restore", str(backup), "--db", str(db)]) == 1
        assert why in capsys.readouterr().err
    for store, why in [("postgresql://line@127.0.0.1:1/qc", "restore it with PostgreSQL's own tools"),
                       (str(tmp_path / "notes.txt"), "notes.txt is not a diffqc result store; nothing is")]:
        assert main(["results", "restore", str(kept), "--db", store]) == 1
        assert why in capsys.readouterr().err
    with full_disk(40_000):  # no room for the copy of the store as it is: nothing restored
        assert main(["results", "restore", str(kept), "--db", str(db)]) == 1
    assert f"cannot keep a copy of {db} as {db}.before-restore-" in capsys.readouterr().err
    with full_disk(4096):  # nor to read the store (SQLite's -shm): said, not "not a result store"
        assert main(["results", "restore", str(kept), "--db", str(db)]) == 1
    assert f"cannot read {db}: disk I/O error" in capsys.readouterr().err
    assert len(ResultStore(str(db), read_only=True).query(limit=None)) == 50
    assert main(["results", "restore", str(kept), "--db", str(tmp_path / "new.db")]) == 0  # a new store
    assert "kept" not in json.loads(capsys.readouterr().out)
    assert len(ResultStore(str(tmp_path / "new.db"), read_only=True).query(limit=None)) == 80
    assert os.path.exists(kept)


def _as_an_older_diffqc_wrote_it(conn: sqlite3.Connection) -> None:
    """The columns added to the store since its first release dropped (with their indexes)."""
    from diffqc.service.store import _ADDED_COLUMNS

    for table, column, _ in _ADDED_COLUMNS:
        for (index,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                                     "AND sql LIKE ?", (table, f"%{column}%")).fetchall():
            conn.execute(f"DROP INDEX {index}")
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.commit()


def test_the_results_commands_read_a_store_an_older_diffqc_wrote(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """After an upgrade, `results list` (or `parts`, `export`, `summary --by camera`) of a store the
    line's older diffqc still writes (or a copy of it) failed with "no such column: body_hash": a
    reading command may not add the columns, as serve and watch do. It reads them as empty, and
    the store is left as it was."""
    db = tmp_path / "results.db"
    with ResultStore(str(db)) as store:
        store.insert_many([_part(i) for i in range(3)])
    conn = sqlite3.connect(db)
    _as_an_older_diffqc_wrote_it(conn)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    before = db.read_bytes()
    assert main(["results", "list", "--db", str(db)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["part_id"], r["camera"], r["line"]) for r in rows] == [("p0", None, None), ("p1", None, None),
                                                                      ("p2", None, None)]
    assert main(["results", "list", "--db", str(db), "--camera", "cam-a"]) == 0
    assert capsys.readouterr().out == ""  # no record names a camera
    assert main(["results", "parts", "--db", str(db)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["results", "summary", "--db", str(db), "--by", "camera"]) == 0
    assert main(["results", "export", str(tmp_path / "out"), "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["exported"] == 0
    assert db.read_bytes() == before
    with ResultStore(str(db)) as store:  # as serve opens it: the columns added
        assert store.query(limit=None)[0].camera is None
        store.insert_many([_part(3)])
    assert [r.camera for r in ResultStore(str(db), read_only=True).query(limit=None)] == ["cam-a", None, None,
                                                                                          None]
