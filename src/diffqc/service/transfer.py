"""A SQLite result store's whole history copied into a new store (``diffqc results copy``): a
pilot's store into the plant's PostgreSQL, where the station goes on.

Every record keeps its id (the dashboard, ``results list`` and the parts' verdicts order by it),
with every review given, the sinks' waiting messages and dead letters, and the service's state
(drift alarms, the parts' watch), copied in one transaction: the target holds all of it or
nothing. The target may hold no history yet: an older history copied after a station's first
parts there would read as the newest. The source is read, never changed; one that ``serve`` or
``watch`` holds open is refused, as what they store meanwhile would be left behind. Kept images
and heat maps are files, named in the records: they stay where they are (``--data-dir``).
"""

from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diffqc.service.sinks import DEAD_LETTERS, OUTBOX, create_outbox_tables
from diffqc.service.store import (
    META,
    REVIEWS,
    TABLE,
    ResultStore,
    StoreError,
    check_store_exists,
    is_postgres_url,
    not_a_store,
    open_alone,
    redact_url,
    sqlite_path,
    table_names,
)

HISTORY = (TABLE, REVIEWS, OUTBOX, DEAD_LETTERS)  # the tables whose rows keep their ids
_BATCH = 1000  # rows read and written at a time


def copy_history(source_url: str, target_url: str, *, progress: bool = False) -> dict[str, Any]:
    """Copy the SQLite store ``source_url`` into ``target_url`` (PostgreSQL or SQLite; its tables
    made where there are none), which must hold no history. Returns ``{"source", "target",
    "records", "reviews", "outbox", "dead_letters", "state", "kept_files", "seconds"}``
    (``kept_files``: the records naming kept images or heat maps, whose folder is said in a
    warning); every problem is a :class:`StoreError` and leaves the target as it was. With
    ``progress``, a bar of the records copied on stderr (819,200 took 67 s into PostgreSQL)."""
    t0 = time.perf_counter()
    if is_postgres_url(source_url):
        raise StoreError(f"{redact_url(source_url)} is a PostgreSQL store: copy it with PostgreSQL's own "
                         "tools (pg_dump, then pg_restore); results copy reads a SQLite store")
    check_store_exists(source_url, doing="copy")
    source = sqlite_path(source_url).absolute()
    if not is_postgres_url(target_url):
        into = sqlite_path(target_url).absolute()
        if into.exists() and into.samefile(source):
            raise StoreError(f"{into} is the store to copy: give the store to copy it into")
    src = _open_alone(source)
    try:
        (total,) = src.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()
        with ResultStore(target_url) as target, tqdm(total=total, desc="copying records", unit=" records",
                                                     disable=not progress) as bar:
            counts = _copy(src, target, bar)
        (kept,) = src.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE heatmap IS NOT NULL OR image IS NOT NULL"
                              ).fetchone()
    finally:
        src.close()
    if kept:
        warnings.warn(f"{kept} of the records copied name kept images or heat maps: their files stay in "
                      f"the pilot's --data-dir (by default the store's folder, {source.parent}); give the "
                      "service on the new store --data-dir that folder, or copy its images/ and heatmaps/ "
                      "into its own", stacklevel=2)
    return {"source": str(source), "target": redact_url(target_url), **counts, "kept_files": kept,
            "seconds": round(time.perf_counter() - t0, 3)}


def _open_alone(source: Path) -> sqlite3.Connection:
    """``source`` opened as the one connection to it (:func:`~diffqc.service.store.open_alone`:
    refused while ``serve`` or ``watch`` hold it open, as they would store parts the copy leaves
    behind; nothing written), and checked to be a result store."""
    try:
        conn = open_alone(source, then="copy (the parts it stores meanwhile would not be copied)")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {source}: {exc}") from None
    try:
        names = table_names(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot read {source}: {exc}") from None
    if TABLE not in names:
        conn.close()
        raise not_a_store(source, names)
    return conn


def _copy(src: sqlite3.Connection, target: ResultStore, bar: tqdm) -> dict[str, int]:
    """Every row of ``src``'s history and state into ``target``, in one of its transactions."""
    where = redact_url(target.url)
    present = set(table_names(src))
    with target._transaction() as conn:
        create_outbox_tables(target, conn)
        if target.postgres:  # a service starting on it meanwhile waits for the commit
            conn.execute(f"LOCK TABLE {', '.join(HISTORY)} IN EXCLUSIVE MODE")
        held = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in HISTORY}
        if any(held.values()):
            said = ", ".join(f"{t} {n}" for t, n in held.items() if n)
            raise StoreError(f"{where} holds a history already ({said}): results copy fills a store that "
                             "holds none, as records are ordered by id (an older history copied after "
                             "newer parts would read as the newest); copy before the station's first "
                             "part there, or into a new database")
        counts = {t: _copy_rows(src, conn, target, t, bar=bar if t == TABLE else None) if t in present else 0
                  for t in HISTORY}
        state = _copy_rows(src, conn, target, META, skip_key="schema_version")
        if target.postgres:  # the next ids follow the copied ones
            for t in HISTORY:
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT MAX(id) FROM {t}))")
    return {"records": counts[TABLE], "reviews": counts[REVIEWS], "outbox": counts[OUTBOX],
            "dead_letters": counts[DEAD_LETTERS], "state": state}


def _copy_rows(src: sqlite3.Connection, conn: Any, target: ResultStore, table: str, *,
               skip_key: str | None = None, bar: tqdm | None = None) -> int:
    """``table``'s rows from ``src`` into ``conn`` (``target``'s), in id order where it has ids;
    the columns both have (a store an older diffqc wrote lacks later ones: they stay empty)."""
    theirs = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
    if target.postgres:
        ours = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "AND table_schema = current_schema()", (table,))}
    else:
        ours = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    columns = [c for c in theirs if c in ours]
    order = "id" if "id" in columns else columns[0]
    rows = src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
    insert = target._q(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})")
    if skip_key is not None:
        insert += " ON CONFLICT (key) DO NOTHING"  # the target's own schema_version
    n = 0
    cursor = conn.cursor()
    while batch := rows.fetchmany(_BATCH):
        batch = [r for r in batch if skip_key is None or r[0] != skip_key]
        if batch:
            cursor.executemany(insert, batch)
        n += len(batch)
        if bar is not None:
            bar.update(len(batch))
    return n
