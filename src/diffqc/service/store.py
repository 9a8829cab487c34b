"""Durable result store (SQLite or PostgreSQL through one code path) and artifact files.

One row per part. A row is committed (SQLite: WAL with ``synchronous=FULL``, i.e. fsync on
commit; PostgreSQL: ordinary synchronous commit) before the service acknowledges the part.
``(source, dedup_key)`` is unique, which makes ingestion idempotent: the folder watcher keys
each file by name and content hash, HTTP clients may send an ``Idempotency-Key``.

Heat maps and kept uploads are files under an artifact folder (``heatmaps/``, ``images/``)
with names the service generates; rows hold only those names. An operator's verdict is on the
row (the latest) and in ``diffqc_reviews`` (every one given, append-only).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import EllipsisType
from typing import Any, TypedDict, Unpack
from urllib.parse import SplitResult, quote, urlsplit

import numpy as np
from PIL import Image

from diffqc.calibration import PASS, REJECT, REVIEW
from diffqc.data import check_outside_datasets
from diffqc.errors import ConfigError, OutputError, StoreError, why_unwritable
from diffqc.output import sync_folder, write_atomic
from diffqc.recalibrate import EXPORT_SUMMARY_FILE, selection_note
from diffqc.service.security import is_artifact_name, safe_child

log = logging.getLogger("diffqc.service")

NOT_INSPECTED = "NOT_INSPECTED"
DECISIONS = ("PASS", "REVIEW", "REJECT", NOT_INSPECTED)
VERDICTS = ("GOOD", "BAD")
TABLE = "diffqc_results"
SUMMARY_KEYS = ("feature_type", "camera", "line", "station", "source")  # `results summary --by`
REVIEWS = "diffqc_reviews"  # every verdict given, oldest first: a changed one is not lost
META = "diffqc_meta"  # the service's state: drift alarms, the parts' watch, the schema's version
SCHEMA_VERSION = "1"
# The largest id a row can have (SQLite INTEGER and PostgreSQL BIGINT are signed 64-bit).
MAX_ROW_ID = 2**63 - 1
# A lost connection is re-opened this many times, waiting 0.05, 0.1, 0.2 ... s in between.
RECONNECT_ATTEMPTS = 5
# A pooled PostgreSQL connection idle for longer than this is checked (SELECT 1) before use.
PING_AFTER_IDLE_S = 1.0
# libpq's socket settings where the URL gives none: a connection attempt waits 10 s at most, and a
# host gone silent (a power cut, a switch down: no reset reaches the service) is given up in about
# 30 s (keepalives for an idle connection, the user timeout for unanswered data), not after the
# kernel's 15 retransmissions (over 10 minutes, drilled), which every part sent meanwhile waited
PG_SOCKET = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "15", "keepalives_interval": "5",
             "keepalives_count": "3", "tcp_user_timeout": "30000"}


@dataclass
class ResultRecord:
    """One stored decision. ``id`` is None until stored."""

    created_at: float
    source: str
    decision: str
    part_id: str | None = None
    feature_type: str | None = None
    predicted_type: str | None = None
    type_known: bool | None = None  # False: the type was not given and was predicted
    score: float | None = None
    p_value: float | None = None
    model_version: str = ""
    latency_ms: float | None = None
    heatmap: str | None = None
    image: str | None = None
    reason: str | None = None
    type_scores: dict[str, float] | None = None
    dedup_key: str | None = None
    body_hash: str | None = None  # SHA-256 of an HTTP request sent with an Idempotency-Key
    line: str | None = None  # where the part was inspected (upload fields / watcher options)
    station: str | None = None
    camera: str | None = None
    heatmap_expired_at: float | None = None  # retention deleted the heat map file then
    image_expired_at: float | None = None  # retention deleted the kept image then
    review: str | None = None
    reviewed_at: float | None = None
    reviewer: str | None = None
    review_note: str | None = None
    review_defect: str | None = None  # the defect's kind an operator named with a BAD verdict
    id: int | None = None
    # not persisted: True when the insert hit an existing (source, dedup_key) row
    duplicate: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The record as the API answers it (its fields in order, without the internal ones, the
        times also in ISO 8601). Field by field: ``dataclasses.asdict`` took 28 µs a record (a
        deep copy), nearly all of each answer's and of ``results list``'s time per record."""
        out = {name: getattr(self, name) for name in JSON_FIELDS}
        if self.type_scores is not None:  # the answer's own, as asdict's was
            out["type_scores"] = dict(self.type_scores)
        out["created"] = iso_time(self.created_at)
        out["reviewed"] = iso_time(self.reviewed_at) if self.reviewed_at else None
        return out


# what ResultRecord.to_json answers of its fields (the key and request hash are the client's own)
JSON_FIELDS = tuple(f.name for f in fields(ResultRecord)
                     if f.name not in ("duplicate", "dedup_key", "body_hash"))


def iso_time(ts: float) -> str:
    """Epoch seconds as the API writes times: UTC, milliseconds, ``2026-12-04T06:00:00.000Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


_COLUMNS = [f.name for f in fields(ResultRecord) if f.name not in ("id", "duplicate")]
# Columns newer than the first schema: (table, name, SQL type), added to an existing table on open.
_ADDED_COLUMNS = (
    (TABLE, "body_hash", "TEXT"),
    (TABLE, "line", "TEXT"),
    (TABLE, "station", "TEXT"),
    (TABLE, "camera", "TEXT"),
    (TABLE, "heatmap_expired_at", "DOUBLE PRECISION"),
    (TABLE, "image_expired_at", "DOUBLE PRECISION"),
    (TABLE, "review_defect", "TEXT"),
    (REVIEWS, "review_defect", "TEXT"),
)
_SELECT = "id, " + ", ".join(_COLUMNS)


def _added_columns_read_as_null(conn: Any, *, postgres: bool) -> None:
    """On a reading connection to a store an older diffqc wrote, which lacks some of
    :data:`_ADDED_COLUMNS` (a writing store adds them; a reader may not write), a temporary view
    of each such table, named as the table, that reads them as NULL: SQLite and PostgreSQL look a
    name up in the connection's temporary schema first. Nothing is written to the store; where
    the server refuses even a temporary view (a read-only standby), the reads fail as before."""
    for table in dict.fromkeys(t for t, _, _ in _ADDED_COLUMNS):
        if postgres:  # the name resolved now, before the view of that name exists
            rows = conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                                "AND attnum > 0 AND NOT attisdropped", (table,))
            have = {r[0] for r in rows}
            source = table
        else:
            have = {r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")}
            source = f"main.{table}"
        missing = [f"CAST(NULL AS {kind}) AS {name}" for t, name, kind in _ADDED_COLUMNS
                   if t == table and name not in have]
        if not have or not missing:
            continue
        try:
            conn.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {', '.join(missing)} FROM {source}")
            if postgres and not conn.autocommit:
                conn.commit()
        except _db_errors():
            with contextlib.suppress(Exception):
                conn.rollback()
            return


# A verdict, as the record holds its latest and the review history each one.
_REVIEW_FIELDS = ("review", "reviewed_at", "reviewer", "review_note", "review_defect")


class ReviewConflict(StoreError):
    """A verdict sent as replacing the one its reviewer saw (``replaces``) while the record holds
    another: a second reviewer's came first. Nothing was changed."""

    code = "review_conflict"

    def __init__(self, record_id: int, review: str | None, reviewed_at: float | None,
                 reviewer: str | None) -> None:
        if review is None:
            said = f"result {record_id} has no verdict; nothing changed (send \"replaces\": null to give one)"
        else:
            who = reviewer or "a reviewer without a name"
            said = (f"result {record_id} was reviewed meanwhile: {review} by {who} at "
                    f"{iso_time(reviewed_at or 0.0)}; nothing changed (send \"replaces\": \"{review}\" "
                    "to change it)")
        super().__init__(said)

# ``<table>_artifacts``: the rows that still name a kept image or heat map, what retention's pass
# reads every minute (a few thousand of a history of millions: an expired row leaves the index)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    id {pk},
    created_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    decision TEXT NOT NULL,
    part_id TEXT,
    feature_type TEXT,
    predicted_type TEXT,
    type_known INTEGER,
    score DOUBLE PRECISION,
    p_value DOUBLE PRECISION,
    model_version TEXT NOT NULL DEFAULT '',
    latency_ms DOUBLE PRECISION,
    heatmap TEXT,
    image TEXT,
    reason TEXT,
    type_scores TEXT,
    dedup_key TEXT,
    body_hash TEXT,
    line TEXT,
    station TEXT,
    camera TEXT,
    heatmap_expired_at DOUBLE PRECISION,
    image_expired_at DOUBLE PRECISION,
    review TEXT,
    reviewed_at DOUBLE PRECISION,
    reviewer TEXT,
    review_note TEXT,
    review_defect TEXT,
    UNIQUE (source, dedup_key)
);
CREATE INDEX IF NOT EXISTS {table}_created ON {table} (created_at);
CREATE INDEX IF NOT EXISTS {table}_queue ON {table} (decision, review);
CREATE INDEX IF NOT EXISTS {table}_part ON {table} (part_id);
CREATE INDEX IF NOT EXISTS {table}_artifacts ON {table} (id) WHERE heatmap IS NOT NULL OR image IS NOT NULL;
CREATE TABLE IF NOT EXISTS {meta} (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {reviews} (
    id {pk},
    record_id BIGINT NOT NULL,
    review TEXT NOT NULL,
    reviewed_at DOUBLE PRECISION,
    reviewer TEXT,
    review_note TEXT,
    review_defect TEXT
);
CREATE INDEX IF NOT EXISTS {reviews}_record ON {reviews} (record_id);
"""


def id_column(postgres: bool) -> str:
    """The type of a table's ``id``: numbered by the database, or as given (a copied history)."""
    return ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" if postgres
            else "INTEGER PRIMARY KEY AUTOINCREMENT")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


_STORE_SCHEME = re.compile(r"(?i)(postgresql|postgres|sqlite)(\+\w+)?:")  # a URL's slashes lost
_LIBPQ_KEYS = frozenset({"host", "hostaddr", "port", "dbname", "user", "password", "service", "sslmode",
                         "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                         "target_session_attrs", "options"})


def _libpq_url(text: str) -> str | None:
    """The ``postgresql://`` URL of a libpq connection string (``host=db port=5432 dbname=qc``,
    as ``psql`` takes it), or None when ``text`` is not one (a file name with ``=`` in it)."""
    pairs = [token.partition("=") for token in text.split()]
    if not pairs or any(not sep or key not in _LIBPQ_KEYS for key, sep, _ in pairs):
        return None
    given = {key: value for key, _, value in pairs}
    if not given.keys() & {"host", "hostaddr", "dbname", "user", "service"}:
        return None
    user = quote(given.pop("user", ""), safe="") + (f":{quote(given.pop('password'), safe='')}"
                                                   if "password" in given else "")
    host = given.pop("host", given.pop("hostaddr", ""))
    port = f":{given.pop('port')}" if "port" in given else ""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in given.items() if k != "dbname")
    return (f"postgresql://{user + '@' if user else ''}{host}{port}/{quote(given.get('dbname', ''), safe='')}"
            + (f"?{query}" if query else ""))


def sqlite_path(url: str) -> Path:
    """``sqlite:////abs/path``, ``sqlite:///rel/path`` (three slashes and a relative path, as
    SQLAlchemy reads them), or a plain path. SQLite's own spellings are refused: ``:memory:``
    (each connection would hold its own store, lost at exit) and a ``file:`` URI (SQLite opens
    the file it names, while the data folder beside it and the checks of the store's file would
    read the text as a path); so is a relative path whose folder is not here where the absolute
    one's is (``sqlite:///srv/qc/r.db`` for ``/srv/qc/r.db``: it made ``srv/qc/`` here)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        rel, absolute = Path(path), Path("/" + path)
        if not rel.is_absolute() and not rel.parent.is_dir() and absolute.parent.is_dir():
            raise StoreError(f"the SQLite URL {url!r} is the relative path {path} (three slashes, as "
                             f"SQLAlchemy reads them), whose folder {rel.parent} is not in {Path.cwd()}: "
                             f"for {absolute} write sqlite:///{absolute}, or the path alone")
    elif url.startswith("sqlite://"):
        raise StoreError(f"unsupported SQLite URL {url!r}; use sqlite:///path/to/results.db")
    elif "://" in url:  # e.g. mysql://...: not a file name to create
        shown = redact_url(url)
        scheme, _, rest = shown.partition("://")
        driver = (f" (SQLAlchemy's {scheme}: libpq takes it as postgresql://{rest})"
                  if scheme.lower().startswith(("postgresql+", "postgres+")) else "")
        raise StoreError(f"unsupported result store {shown!r}{driver}; use a SQLite path, "
                         "sqlite:///path/to/results.db or postgresql://user@host/db")
    else:
        path = url
        if _STORE_SCHEME.match(url):
            raise StoreError(f"the result store {redact_url(url)!r} is not a URL: write "
                             "postgresql://user@host/db or sqlite:///path/to/results.db (two slashes "
                             "after the colon), or the SQLite file's path alone")
        if (meant := _libpq_url(url)) is not None:
            raise StoreError("the result store was given as a libpq connection string (key=value), which "
                             f"diffqc takes as a URL: {redact_url(meant)}")
    if path == ":memory:":
        raise StoreError("an in-memory SQLite store keeps nothing (each of the service's connections "
                         "would hold its own, and every record is lost at exit): give a file, such as "
                         "diffqc-results.db")
    if path.startswith("file:"):
        raise StoreError(f"{path} is a SQLite URI, which diffqc does not take: give the path, "
                         f"{urlsplit(path).path or path[len('file:'):]}")
    return Path(path)


def split_url(url: str, what: str) -> SplitResult:
    """``urlsplit`` of ``url``, or a ConfigError naming it as ``what`` (without its password):
    urllib raises a ValueError for a URL it cannot split (an IPv6 host without its ``]``)."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"{what} {redact_url(url)!r} is not a URL ({exc})") from None


# a URL's scheme, or one written with its slashes lost (``postgresql:/u:p@h``): not ``user:``
_SCHEME_PREFIX = re.compile(r"[A-Za-z][\w+.-]*:/+")


def redact_url(url: str) -> str:
    """The URL without its password (for logs, errors and /v1/model): the user's, and a
    ``password`` parameter's (libpq takes ``postgresql://u@h/db?password=...``) and an
    ``sslpassword``'s (a client key's passphrase); also where the
    URL's slashes were lost or it has no scheme (``u:p@host:1883``), as a refused URL is shown."""
    url = re.sub(r"([?&](?:ssl)?password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    if "@" not in url:
        return url
    prefix = found.group(0) if (found := _SCHEME_PREFIX.match(url)) else ""
    creds, host = url[len(prefix):].rsplit("@", 1)
    if ":" not in creds or (not prefix and "/" in creds):  # no password; a path with '@' in it
        return url
    return f"{prefix}{creds.split(':', 1)[0]}:***@{host}"


_ENCODE_HINT = ("; or leave the password out of the URL: libpq reads it from PGPASSWORD or "
                "~/.pgpass")


def postgres_url_problem(url: str) -> str | None:
    """What in a PostgreSQL URL libpq reads otherwise than its writer meant, as libpq parses it,
    without any part of its password: an ``@`` or a ``/`` in the user or password (a password
    as a DBA makes it, ``p@ss/1``: libpq reads the text after the ``@`` as the host, or the user
    and password as host and port, and its error shows that text), or a space; libpq's own reason
    where it quotes nothing of the user and password (a misspelled option); None if none."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - depends on the install; opening it names the extra
        return None
    try:
        parts = conninfo_to_dict(url)
    except Exception as exc:  # its message quotes the text around the fault: the password, maybe
        said = " ".join(str(exc).split())
        if "spaces" in said:
            return "a space in the URL: write it %20" + _ENCODE_HINT
        userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]  # "user:password", or ""
        quoted = re.findall(r'"([^"]*)"', said)
        if ":" in userinfo and any(q in userinfo or userinfo in q for q in quoted):  # the password's fault
            return "libpq cannot read it" + _ENCODE_HINT
        return f"libpq cannot read it: {said}"
    if "@" in str(parts.get("host", "")):
        return "'@' in the URL's user or password: write it %40" + _ENCODE_HINT
    if not all(p.strip().isdigit() or not p.strip() for p in str(parts.get("port", "")).split(",")):
        return "'/' in the URL's user or password: write it %2F (or the port is not a number)" + _ENCODE_HINT
    return None


def _db_errors() -> tuple[type[BaseException], ...]:
    """The exception types a database driver raises (sqlite3, and psycopg when installed)."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - depends on the install
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


# file systems on which SQLite's locks are not reliable and its WAL's shared memory is one host's
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre",
    "gpfs", "beegfs", "davfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
    "fuse.rclone", "fuse.davfs2", "fuse.gcsfuse", "fuse.juicefs",
})


def network_file_system(path: Path, mounts: str | None = None) -> str | None:
    """The type of the network file system holding ``path`` (``nfs4``, ``cifs``, ...), or None
    for a local one (or where the mount table cannot be read: not Linux). ``mounts``: the text of
    ``/proc/self/mounts`` (read when None); the longest mount point above ``path`` holds it, the
    last of a stack of mounts on one point."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text(errors="replace")
        except OSError:
            return None
    where = os.path.realpath(path.absolute().parent)
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILE_SYSTEMS else None


def _unwritable_folder(path: Path) -> str | None:
    """Why SQLite cannot write beside ``path`` (the store and its ``-wal`` file live in one
    folder), where its folder is the cause: a read-only file system (a container's read-only
    root) or permissions; None otherwise."""
    folder = path.absolute().parent
    if os.access(folder, os.W_OK):
        return None
    return f"its folder {folder} is not writable ({why_unwritable(folder)})"


def _writable_store_hint(path: Path) -> str | None:
    """:func:`_unwritable_folder` with what to do about it, for a store that must be written."""
    why = _unwritable_folder(path)
    return None if why is None else f"{why}: give --db a file in a writable folder (or set $DIFFQC_DB)"


def _where(conditions: Sequence[tuple[str, Any]]) -> tuple[list[str], list[Any]]:
    """The SQL conditions whose value is given (not None), and their values, in order."""
    given = [(cond, value) for cond, value in conditions if value is not None]
    return [c for c, _ in given], [v for _, v in given]


class Filters(TypedDict, total=False):
    """The filters of :meth:`ResultStore.query`: each given one must match. ``has_part``: rows
    with (True) or without (False) a part id; ``parts``: rows of these part ids;
    ``station_or_none``: rows of this station or of none."""

    since: float | None
    until: float | None
    feature_type: str | None
    decision: str | None
    reviewed: bool | None
    review: str | None
    source: str | None
    part_id: str | None
    line: str | None
    station: str | None
    station_or_none: str | None
    camera: str | None
    model_version: str | None
    after_id: int | None
    before_id: int | None
    has_part: bool | None
    parts: Sequence[str] | None


def _conditions(filters: Filters) -> tuple[str, list[Any]]:
    """`` WHERE ...`` of the given filters (or ""), and its values in order."""
    get = filters.get
    where, args = _where([
        ("created_at >= ?", get("since")),
        ("created_at < ?", get("until")),
        ("feature_type = ?", get("feature_type")),
        ("decision = ?", get("decision")),
        ("review = ?", get("review")),
        ("source = ?", get("source")),
        ("part_id = ?", get("part_id")),
        ("line = ?", get("line")),
        ("station = ?", get("station")),
        ("(station = ? OR station IS NULL)", get("station_or_none")),
        ("camera = ?", get("camera")),
        ("model_version = ?", get("model_version")),
        ("id > ?", get("after_id")),
        ("id < ?", get("before_id")),
    ])
    if (reviewed := filters.get("reviewed")) is not None:
        where.append("review IS NOT NULL" if reviewed else "review IS NULL")
    if (has_part := filters.get("has_part")) is not None:
        where.append("part_id IS NOT NULL" if has_part else "part_id IS NULL")
    if (parts := filters.get("parts")) is not None:
        where.append(f"part_id IN ({', '.join('?' * len(parts)) or 'NULL'})")
        args += list(parts)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _sqlite_tables(path: Path) -> list[str]:
    """The tables of the SQLite file at ``path``, read without writing to it (SQLite's own left
    out); sqlite3's errors as they come."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return table_names(conn)
    finally:
        conn.close()


def table_names(conn: sqlite3.Connection) -> list[str]:
    """The tables of an open SQLite database, SQLite's own left out."""
    return [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite%' ORDER BY name")]


def _foreign_tables(path: Path) -> list[str]:
    """The tables of an existing SQLite file at ``path`` when none is diffqc's (another program's
    database); [] for a diffqc store, a new or empty file, or one SQLite cannot read (its own
    error says so when the store opens it)."""
    try:
        names = _sqlite_tables(path) if path.is_file() and path.stat().st_size else []
    except (OSError, sqlite3.Error):
        return []
    return [] if TABLE in names else names


class ResultStore:
    """Result rows in SQLite (default) or PostgreSQL, same SQL for both.

    Thread-safe: one writer connection behind a lock, a small pool of reader connections.
    Every driver error leaves as a :class:`StoreError`. A connection that was lost (a database
    restart, a SQLite file replaced under the service) is found before it is used (PostgreSQL:
    ``SELECT 1`` on a connection idle for a while, or always for the writer; SQLite: the file's
    inode) and re-opened with backoff, so the store recovers without a restart of the service.
    ``last_write_error`` holds the reason of the last failed write (None after a good one).
    """

    def __init__(self, url: str, *, pool_size: int = 4, busy_timeout_s: float = 30.0,
                 read_only: bool = False) -> None:
        """``read_only``: the reading commands' store (`results list`, `results export`): it
        creates no table or folder, and a SQLite store is opened read-only, so that a copy on a
        read-only share (or a PostgreSQL role that may only read) is read as it is."""
        self.url = url
        self.read_only = read_only
        self.busy_timeout_s = busy_timeout_s  # SQLite: how long a write waits for a lock
        self.postgres = is_postgres_url(url)
        if self.postgres and (problem := postgres_url_problem(url)):  # before any connection is tried
            raise StoreError(f"PostgreSQL URL {redact_url(url)}: {problem}")
        self.path: Path | None = None if self.postgres else sqlite_path(url)
        self._pool_size = pool_size
        self._pool: list[tuple[Any, Any, float]] = []  # (connection, file identity, last used)
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        # Called as hook(connection, new_records) inside insert_many's transaction, so that what
        # a hook writes (the sinks' outbox) commits with the records or not at all.
        self.insert_hooks: list[Callable[[Any, list[ResultRecord]], None]] = []
        self.last_write_error: str | None = None
        self.reconnects = 0
        if self.path is not None and not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of SQLite store {self.path}: {exc}") from None
            if kind := network_file_system(self.path):
                log.warning("the SQLite store %s is on a network file system (%s): SQLite's locks are not "
                            "reliable there and its WAL needs the shared memory of one host, so the store "
                            "can be corrupted ('database disk image is malformed'): keep it on a local "
                            "disk (--db), and give others PostgreSQL (--db postgresql://...) or a copy "
                            "(results list reads one)", self.path.absolute(), kind)
        self._writer: Any = None
        self._writer_identity: Any = None
        if self.path is not None and not read_only and (foreign := _foreign_tables(Path(self.path))):
            raise StoreError(f"{Path(self.path).absolute()} is a SQLite database of another program (its "
                             f"tables: {', '.join(foreign[:5])}), not a diffqc result store; nothing was "
                             "written to it: give --db a new file or a diffqc store")
        self._writer = self._connect(autocommit=False)
        self._writer_identity = self._identity()
        if read_only:
            if self.postgres:  # a database serve never wrote to: said so, not a query's SQL error
                try:
                    (found,) = self._writer.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
                    self._writer.rollback()
                except _db_errors() as exc:
                    self._writer.close()
                    raise StoreError(f"cannot read the result store: {_db_reason(exc)}") from None
                if found is None:
                    self._writer.close()
                    raise StoreError(f"{redact_url(url)} holds no diffqc result store (no {TABLE} table in "
                                     "the schemas of its search path): give the --db that `diffqc serve` "
                                     "or `watch` write to")
                return
            assert self.path is not None
            try:  # an empty file or another program's database: said so, not a query's "no such table"
                names = table_names(self._writer)
            except sqlite3.Error:  # a file SQLite cannot read: its own error, where it is read
                return
            if TABLE not in names:
                self._writer.close()
                raise not_a_store(Path(self.path), names)
            return
        try:
            self._create_schema()
        except BaseException:
            self._writer.close()
            raise

    # ------------------------------------------------------------------ connections
    def _connect(self, *, autocommit: bool) -> Any:
        conn = self._open(autocommit=autocommit)
        if self.read_only:  # a store an older diffqc wrote, which a reader may not add columns to
            try:
                _added_columns_read_as_null(conn, postgres=self.postgres)
            except _db_errors() as exc:  # a statement timeout of 1 ms: a traceback, before
                conn.close()
                raise StoreError(f"cannot read the result store: {_db_reason(exc)}") from None
        return conn

    def _open(self, *, autocommit: bool) -> Any:
        if self.postgres:
            try:
                import psycopg
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise StoreError("PostgreSQL needs psycopg: pip install 'diffqc[serve]'") from exc
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            try:
                given = conninfo_to_dict(self.url)
                conninfo = make_conninfo(self.url, **{k: v for k, v in PG_SOCKET.items() if k not in given})
                # no statement prepared on the server: through PgBouncer's transaction pooling (as
                # DBAs run it) the next run of one, on another server connection, failed
                return psycopg.connect(conninfo, autocommit=autocommit, prepare_threshold=None)
            except psycopg.Error as exc:  # libpq's message spans lines, and has no primary message
                raise StoreError(f"cannot connect to {redact_url(self.url)}: {_db_reason(exc)}") from None
        assert self.path is not None
        if Path(self.path).is_dir():  # `--db data/` for `--db data/results.db`
            raise StoreError(f"cannot open SQLite store {self.path}: it is a folder; give a file "
                             f"path, such as {Path(self.path) / 'diffqc-results.db'}")
        if self.read_only:
            return self._connect_read_only(Path(self.path).absolute())
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {Path(self.path).absolute()}: "
                             f"{_writable_store_hint(Path(self.path)) or exc}") from None
        return conn

    def _connect_read_only(self, path: Path) -> Any:
        """SQLite opened read-only. In WAL mode SQLite reads the ``-wal`` file through the
        ``-shm`` beside it, which it must write when it is absent: where the folder cannot be
        written, a store whose ``-wal`` holds nothing is opened as immutable, and one whose
        ``-wal`` holds records is refused with what to copy."""
        uri = path.as_uri()
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=self.busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as exc:
            first = exc
        folder = _unwritable_folder(path)
        wal = Path(f"{path}-wal")
        if folder is None or not path.is_file():
            raise StoreError(f"cannot open SQLite store {path}: {first}") from None
        if wal.is_file() and wal.stat().st_size > 0:
            raise StoreError(f"cannot read SQLite store {path}: {wal.name} holds records not yet in the "
                             f"database file, which SQLite reads through a {path.name}-shm file it cannot "
                             f"write here ({folder}): copy {path.name}, {wal.name} and "
                             f"{path.name}-shm together (or stop the service first, which folds them into "
                             f"{path.name})")
        try:
            conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from None
        return conn

    def _identity(self) -> Any:
        """SQLite: (device, inode) of the database file, None when it is gone; PostgreSQL: None."""
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _alive(self, conn: Any, identity: Any, last_used: float | None) -> bool:
        """Pre-ping: is this connection still connected to the store's database?"""
        if not self.postgres:
            return identity is not None and identity == self._identity()
        if conn.closed or getattr(conn, "broken", False):
            return False
        if last_used is not None and time.monotonic() - last_used < PING_AFTER_IDLE_S:
            return True
        try:
            conn.execute("SELECT 1").fetchone()
            if not conn.autocommit:
                conn.rollback()
            return True
        except Exception:
            return False

    def _reconnect(self, *, autocommit: bool) -> Any:
        """A new connection, retried with exponential backoff; StoreError when all fail."""
        delay = 0.05
        for attempt in range(RECONNECT_ATTEMPTS):
            try:
                conn = self._connect(autocommit=autocommit)
                self.reconnects += 1
                return conn
            except StoreError:
                if attempt == RECONNECT_ATTEMPTS - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _writer_conn(self) -> Any:
        """The writer connection, re-opened (schema included) when it was lost. Hold _write_lock."""
        if self._writer is not None and self._alive(self._writer, self._writer_identity, None):
            return self._writer
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        log.warning("result store connection lost; reconnecting to %s", redact_url(self.url))
        conn = self._reconnect(autocommit=False)
        try:
            self._schema_in(conn)
        except BaseException:
            conn.close()
            raise
        self._writer, self._writer_identity = conn, self._identity()
        log.info("result store reconnected")
        return conn

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """The writer connection inside one committed transaction; driver errors -> StoreError."""
        errors = _db_errors()
        with self._write_lock:
            if self._closed:
                raise StoreError("the store is closed")
            try:
                conn = self._writer_conn()
                if not self.postgres:
                    conn.execute("BEGIN IMMEDIATE")
            except errors as exc:
                self.last_write_error = f"cannot write to the result store: {_db_reason(exc)}"
                raise StoreError(self.last_write_error) from None
            except StoreError as exc:
                self.last_write_error = str(exc)
                raise
            try:
                yield conn
                conn.commit()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    conn.rollback()
                if isinstance(exc, errors):
                    self.last_write_error = f"cannot write to the result store: {_db_reason(exc)}"
                    raise StoreError(self.last_write_error) from None
                raise
            self.last_write_error = None

    @contextmanager
    def _reader(self) -> Iterator[Any]:
        """A pooled reader connection (checked before use); driver errors -> StoreError."""
        with self._pool_lock:
            if self._closed:
                raise StoreError("the store is closed")
            entry = self._pool.pop() if self._pool else None
        conn = None
        if entry is not None:
            if self._alive(*entry):
                conn = entry[0]
            else:
                with contextlib.suppress(Exception):
                    entry[0].close()
        if conn is None:
            conn = self._reconnect(autocommit=True) if entry is not None else self._connect(autocommit=True)
        identity = self._identity()
        ok = False
        try:
            yield conn
            ok = True
        except _db_errors() as exc:
            raise StoreError(f"cannot read the result store: {_db_reason(exc)}") from None
        finally:
            with self._pool_lock:
                if ok and not self._closed and len(self._pool) < self._pool_size:
                    self._pool.append((conn, identity, time.monotonic()))
                    conn = None
            if conn is not None:
                conn.close()

    def _schema_in(self, conn: Any) -> None:
        """Create the tables (idempotent) on a writer connection, in one transaction."""
        ddl = _SCHEMA.format(table=TABLE, reviews=REVIEWS, meta=META, pk=id_column(self.postgres))
        statements = [s.strip() for s in ddl.split(";") if s.strip()]
        if not self.postgres:
            conn.execute("BEGIN IMMEDIATE")
        try:
            if self.postgres:  # serve and watch may create the schema at the same time
                conn.execute("SELECT pg_advisory_xact_lock(727172)")
            for stmt in statements:
                conn.execute(stmt)
            self._add_missing_columns(conn)
            conn.execute(
                self._q(f"INSERT INTO {META} (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"),
                ("schema_version", SCHEMA_VERSION),
            )
            conn.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                conn.rollback()
            if isinstance(exc, _db_errors()):
                where = redact_url(self.url)
                raise StoreError(f"cannot create the result tables in {where}: {_db_reason(exc)}"
                                 f"{self._write_hint(conn, exc)}") from None
            raise

    def _write_hint(self, conn: Any, exc: BaseException) -> str:
        """What to give a PostgreSQL store that may not create its tables: what to grant a role
        that may not create them in its schema (PostgreSQL 15 lets only a database's owner create
        them in ``public``); for a read-only session (a standby, a role or database set
        read-only), a server and role that may write."""
        state = getattr(exc, "sqlstate", None)
        if state not in ("42501", "25006"):  # insufficient_privilege, read_only_sql_transaction
            return ""
        try:
            if state == "25006":
                (standby,) = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            else:
                schema, role = conn.execute("SELECT current_schema(), current_user").fetchone()
        except Exception:
            return ""
        if state == "25006" and standby:
            return (": the server is a standby (a read-only replica): give --db its primary, or both "
                    "hosts (postgresql://primary,standby/db?target_session_attrs=read-write) so that a "
                    "failover is followed")
        if state == "25006":
            return (": the session is read-only (default_transaction_read_only, set for this role or "
                    "database): give --db a role and database that may write")
        if schema is None:  # no schema of its search path exists
            return f": create a schema for role {role} (CREATE SCHEMA diffqc AUTHORIZATION {role})"
        return (f": let role {role} create the store's tables (GRANT CREATE ON SCHEMA {schema} TO {role}, "
                f"or make it the database's owner), or give --db a role that may")

    def _add_missing_columns(self, conn: Any) -> None:
        """Columns added after a store was created: add them to old tables."""
        for table, name, kind in _ADDED_COLUMNS:
            self._add_column(conn, table, name, kind)

    def _add_column(self, conn: Any, table: str, name: str, kind: str) -> None:
        """Add a column to ``table`` (on ``conn``, in its transaction) unless it has one so named."""
        if self.postgres:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
        elif name not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _create_schema(self) -> None:
        with self._write_lock:
            self._schema_in(self._writer)

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for conn, _, _ in pool:
            conn.close()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ rows
    @staticmethod
    def _values(rec: ResultRecord) -> list[Any]:
        vals: list[Any] = []
        for name in _COLUMNS:
            v = getattr(rec, name)
            if name == "type_scores":
                v = None if v is None else json.dumps(v, sort_keys=True)
            elif name == "type_known":
                v = None if v is None else int(bool(v))
            elif isinstance(v, float | np.floating):
                v = float(v) if math.isfinite(v) else None  # NaN/inf: NULL in every backend
            vals.append(v)
        return vals

    @staticmethod
    def _row(row: Sequence[Any]) -> ResultRecord:
        data = dict(zip(["id", *_COLUMNS], row, strict=True))
        if data["type_scores"] is not None:
            data["type_scores"] = json.loads(data["type_scores"])
        if data["type_known"] is not None:
            data["type_known"] = bool(data["type_known"])
        return ResultRecord(**data)

    def insert_many(self, records: Sequence[ResultRecord]) -> list[ResultRecord]:
        """Store records in one transaction; returns them with ids.

        A record whose ``(source, dedup_key)`` is already stored is not inserted again: the
        stored row comes back instead, flagged ``duplicate``. A key stored with a
        ``NOT_INSPECTED`` record (dropped under overload, its inspection failed, unreadable) is
        not done: that record keeps its row and gives up its key, suffixed ``#<its id>``, to the
        new attempt's (keys stored before this call only: one call stores one record per key).
        """
        if not records:
            return []
        retire = self._q(
            f"UPDATE {TABLE} SET dedup_key = dedup_key || '#' || CAST(id AS TEXT) "
            "WHERE source = ? AND dedup_key = ? AND decision = ?"
        )
        keyed = {(r.source, r.dedup_key) for r in records if r.dedup_key is not None}
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        ins = self._q(
            f"INSERT INTO {TABLE} ({cols}) VALUES ({marks}) "
            "ON CONFLICT (source, dedup_key) DO NOTHING RETURNING id"
        )
        sel = self._q(f"SELECT {_SELECT} FROM {TABLE} WHERE source = ? AND dedup_key = ?")
        out: list[ResultRecord] = []
        with self._transaction() as conn:
            for source, key in keyed:
                conn.execute(retire, (source, key, NOT_INSPECTED))
            for rec in records:
                row = conn.execute(ins, self._values(rec)).fetchone()
                if row is not None:
                    stored = replace(rec, id=int(row[0]))
                    out.append(stored)
                    continue
                existing = conn.execute(sel, (rec.source, rec.dedup_key)).fetchone()
                if existing is None:  # pragma: no cover - conflict without a row
                    raise StoreError("insert conflicted but no row found")
                dup = self._row(existing)
                dup.duplicate = True
                out.append(dup)
            for hook in self.insert_hooks:
                hook(conn, [r for r in out if not r.duplicate])
        return out

    def insert(self, record: ResultRecord) -> ResultRecord:
        return self.insert_many([record])[0]

    def get(self, record_id: int) -> ResultRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                self._q(f"SELECT {_SELECT} FROM {TABLE} WHERE id = ?"), (record_id,)
            ).fetchone()
        return None if row is None else self._row(row)

    def find_key(self, source: str, dedup_key: str) -> ResultRecord | None:
        with self._reader() as conn:
            row = conn.execute(
                self._q(f"SELECT {_SELECT} FROM {TABLE} WHERE source = ? AND dedup_key = ?"),
                (source, dedup_key),
            ).fetchone()
        return None if row is None else self._row(row)

    def inspected_keys(self, source: str, keys: Sequence[str]) -> dict[str, float]:
        """Those of ``keys`` stored for ``source`` with a decision (not ``NOT_INSPECTED``: such a
        part is tried again), each with the time of its latest record."""
        found: dict[str, float] = {}
        with self._reader() as conn:
            for start in range(0, len(keys), 200):
                chunk = list(keys[start : start + 200])
                marks = ", ".join("?" for _ in chunk)
                rows = conn.execute(
                    self._q(f"SELECT dedup_key, MAX(created_at) FROM {TABLE} WHERE source = ? AND "
                            f"decision <> ? AND dedup_key IN ({marks}) GROUP BY dedup_key"),
                    [source, NOT_INSPECTED, *chunk],
                ).fetchall()
                found.update((r[0], float(r[1])) for r in rows)
        return found

    def query(self, *, limit: int | None = 100, oldest_first: bool = False,
              **filters: Unpack[Filters]) -> list[ResultRecord]:
        """Rows matching every given filter (:class:`Filters`), newest first unless
        ``oldest_first``; with ``parts``, in the order of (part id, id): each part's rows
        together."""
        where, args = _conditions(filters)
        sql = f"SELECT {_SELECT} FROM {TABLE}{where}"
        if filters.get("parts") is not None:
            sql += " ORDER BY part_id, id"
        else:
            sql += " ORDER BY id " + ("ASC" if oldest_first else "DESC")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._reader() as conn:
            rows = conn.execute(self._q(sql), args).fetchall()
        return [self._row(r) for r in rows]

    def part_records(self, part_id: str, *, conn: Any, limit: int) -> list[ResultRecord]:
        """The latest ``limit`` rows of a part, newest first, on ``conn`` (an insert hook's
        transaction, which sees the rows it inserted; a reader's is :meth:`query`)."""
        sql = self._q(f"SELECT {_SELECT} FROM {TABLE} WHERE part_id = ? ORDER BY id DESC LIMIT ?")
        return [self._row(r) for r in conn.execute(sql, (part_id, limit)).fetchall()]

    def recent_part_rows(self, limit: int, **filters: Unpack[Filters]) -> list[tuple[int, str]]:
        """``(id, part_id)`` of the newest ``limit`` rows with a part id matching ``filters``,
        newest first (``before_id`` pages back through them)."""
        where, args = _conditions({**filters, "has_part": True})
        sql = self._q(f"SELECT id, part_id FROM {TABLE}{where} ORDER BY id DESC LIMIT ?")
        with self._reader() as conn:
            return [(int(i), str(p)) for i, p in conn.execute(sql, [*args, int(limit)]).fetchall()]

    def part_ids(self, **filters: Unpack[Filters]) -> list[str]:
        """The part ids of the rows matching ``filters``, each once, sorted."""
        where, args = _conditions({**filters, "has_part": True})
        with self._reader() as conn:
            rows = conn.execute(self._q(f"SELECT DISTINCT part_id FROM {TABLE}{where} ORDER BY part_id"),
                                args).fetchall()
        return [str(r[0]) for r in rows]

    def review_queue(self, limit: int = 50) -> list[ResultRecord]:
        """REVIEW decisions without an operator verdict, oldest first."""
        return self.query(decision="REVIEW", reviewed=False, limit=limit, oldest_first=True)

    def set_review(
        self, record_id: int, verdict: str, reviewer: str | None = None, note: str | None = None,
        defect: str | None = None, *, replaces: str | EllipsisType | None = ...,
    ) -> ResultRecord | None:
        """Record an operator's GOOD/BAD verdict beside the model's decision, with a BAD one the
        defect's kind (``defect``: "crack"; `results export --defects` labels the part with it).
        The record holds the latest; :meth:`review_history` every one given (a verdict given
        before the history was kept enters it when it is first changed). ``replaces``: the
        verdict the reviewer saw (None: none); where the record holds another (a second
        reviewer's came first), :class:`ReviewConflict` and nothing changes. Not given: the
        latest verdict wins. The verdict the record holds, sent again (its reviewer, note and
        kind the same: a retry whose answer was lost), is the one given: nothing changes."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be GOOD or BAD, got {verdict!r}")
        if defect is not None and verdict != "BAD":
            raise ValueError("a defect kind goes with a BAD verdict")
        log_row = self._q(f"INSERT INTO {REVIEWS} (record_id, {', '.join(_REVIEW_FIELDS)}) "
                          "VALUES (?, ?, ?, ?, ?, ?)")
        read = self._q(f"SELECT {', '.join(_REVIEW_FIELDS)} FROM {TABLE} WHERE id = ?")
        with self._transaction() as conn:
            before = conn.execute(read, (record_id,)).fetchone()
            if before is None:
                return None
            if (before[0], *before[2:]) == (verdict, reviewer, note, defect):
                return self.get(record_id)
            if replaces is not ... and before[0] != replaces:
                raise ReviewConflict(record_id, before[0], before[1], before[2])
            logged = self._q(f"SELECT COUNT(*) FROM {REVIEWS} WHERE record_id = ?")
            if before[0] is not None and not conn.execute(logged, (record_id,)).fetchone()[0]:
                conn.execute(log_row, (record_id, *before))  # a verdict from before the history
            at = time.time()
            # only where the record still holds the verdict read: another service on the store
            # (PostgreSQL reads without locking) may have given one since, which its UPDATE,
            # waited for, shows here as no row changed
            same = ("" if replaces is ... else
                    f" AND review {'IS NOT DISTINCT FROM' if self.postgres else 'IS'} ?")
            fields = ", ".join(f"{c} = ?" for c in _REVIEW_FIELDS)
            changed = conn.execute(
                self._q(f"UPDATE {TABLE} SET {fields} WHERE id = ?{same}"),
                (verdict, at, reviewer, note, defect, record_id, *(() if replaces is ... else (before[0],))),
            ).rowcount
            if changed == 0:
                now = conn.execute(read, (record_id,)).fetchone()
                raise ReviewConflict(record_id, now[0], now[1], now[2])
            conn.execute(log_row, (record_id, verdict, at, reviewer, note, defect))
        return self.get(record_id)

    def review_history(self, record_id: int) -> list[dict[str, Any]]:
        """Every verdict given to a record, oldest first (``reviewed_at`` in epoch seconds,
        ``reviewed`` the same time in ISO 8601 UTC, as a record gives them)."""
        with self._reader() as conn:
            rows = conn.execute(
                self._q(f"SELECT {', '.join(_REVIEW_FIELDS)} FROM {REVIEWS} "
                        "WHERE record_id = ? ORDER BY id"), (record_id,)).fetchall()
        return [{**dict(zip(_REVIEW_FIELDS, r, strict=True)), "reviewed": iso_time(r[1])} for r in rows]

    def defect_kinds(self, limit: int = 200) -> list[tuple[str, int]]:
        """``(kind, verdicts)``: the defect kinds given with BAD verdicts (the review history,
        corrected ones included), the most given first, then by name; what the dashboard offers
        as the reviewer types, so that one kind keeps one spelling."""
        sql = (f"SELECT review_defect, COUNT(*) FROM {REVIEWS} WHERE review_defect IS NOT NULL "
               "GROUP BY review_defect ORDER BY COUNT(*) DESC, review_defect LIMIT ?")
        with self._reader() as conn:
            rows = conn.execute(self._q(sql), (int(limit),)).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def counts(self, **filters: Unpack[Filters]) -> list[tuple[str | None, str, int]]:
        """``(feature_type, decision, count)`` of the rows matching ``filters``."""
        where, args = _conditions(filters)
        sql = f"SELECT feature_type, decision, COUNT(*) FROM {TABLE}{where} GROUP BY feature_type, decision"
        with self._reader() as conn:
            rows = conn.execute(self._q(sql), args).fetchall()
        return [(r[0], str(r[1]), int(r[2])) for r in rows]

    def summary_counts(self, by: Sequence[str], since: float | None = None,
                       until: float | None = None) -> list[tuple[Any, ...]]:
        """``(*by values, decision, review, count)`` of the parts inspected in ``[since, until)``,
        grouped by the columns ``by`` (of :data:`SUMMARY_KEYS`)."""
        unknown = [k for k in by if k not in SUMMARY_KEYS]
        if unknown:
            raise ValueError(f"cannot group by {unknown[0]!r}: one of {', '.join(SUMMARY_KEYS)}")
        keys = ", ".join([*by, "decision", "review"])
        sql = f"SELECT {keys}, COUNT(*) FROM {TABLE}"
        where, args = _where([("created_at >= ?", since), ("created_at < ?", until)])
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" GROUP BY {keys}"
        with self._reader() as conn:
            return [tuple(r) for r in conn.execute(self._q(sql), args).fetchall()]

    def latest_times(self, since: float) -> list[tuple[str | None, str | None, float]]:
        """``(feature_type, camera, created_at of its latest record)`` of each pair with a record
        created at or after ``since`` (read through the creation-time index)."""
        sql = (f"SELECT feature_type, camera, MAX(created_at) FROM {TABLE} WHERE created_at >= ? "
               "GROUP BY feature_type, camera")
        with self._reader() as conn:
            return [(t, c, float(at)) for t, c, at in conn.execute(self._q(sql), (since,)).fetchall()]

    def pending_reviews(self) -> int:
        with self._reader() as conn:
            row = conn.execute(
                self._q(f"SELECT COUNT(*) FROM {TABLE} WHERE decision = ? AND review IS NULL"),
                ("REVIEW",),
            ).fetchone()
        return int(row[0])

    def count(self, **filters: Unpack[Filters]) -> int:
        """How many rows match ``filters`` (every row without)."""
        where, args = _conditions(filters)
        with self._reader() as conn:
            row = conn.execute(self._q(f"SELECT COUNT(*) FROM {TABLE}{where}"), args).fetchone()
        return int(row[0])

    def ping(self) -> bool:
        """True when the store answers a read."""
        try:
            with self._reader() as conn:
                conn.execute("SELECT 1").fetchone()
            return True
        except StoreError:
            return False

    def meta_items(self, prefix: str) -> dict[str, str]:
        """The store's own key-value entries whose key starts with ``prefix`` (a few rows)."""
        with self._reader() as conn:
            rows = conn.execute(f"SELECT key, value FROM {META}").fetchall()
        return {str(k): str(v) for k, v in rows if str(k).startswith(prefix)}

    def set_meta(self, key: str, value: str | None) -> None:
        """Write the key-value entry ``key`` (``None``: delete it), in its own transaction."""
        with self._transaction() as conn:
            if value is None:
                conn.execute(self._q(f"DELETE FROM {META} WHERE key = ?"), (key,))
            else:
                conn.execute(self._q(f"INSERT INTO {META} (key, value) VALUES (?, ?) "
                                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), (key, value))

    def check_write(self) -> str | None:
        """Commit a heartbeat row: None when the store can write, else the reason it cannot."""
        try:
            with self._transaction() as conn:
                conn.execute(
                    self._q(
                        f"INSERT INTO {META} (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                    ),
                    ("heartbeat", repr(time.time())),
                )
        except StoreError as exc:
            return str(exc)
        return None


SUMMARY_COLUMNS = ("inspected", PASS, REVIEW, REJECT, NOT_INSPECTED, "flagged_share",
                   "flagged_reviewed", "flagged_bad", "flagged_good", "review_pending", "passed_found_bad")


def summarize(counts: list[tuple[Any, ...]], n_keys: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Per group (the first ``n_keys`` values of each count row, then a total, ``("all", None,
    ...)``): parts inspected and by decision, the share flagged (REVIEW or REJECT), of the flagged
    ones those an operator reviewed, found BAD (real defects) and GOOD (false alarms), REVIEW parts
    waiting for a verdict, and PASS parts reviewed BAD (escapes)."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    total: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, 0)  # apart: a group may be named "all" too
    for row in counts:
        key, decision, review, n = tuple(row[:n_keys]), row[n_keys], row[n_keys + 1], int(row[n_keys + 2])
        for g in (groups.setdefault(key, dict.fromkeys(SUMMARY_COLUMNS, 0)), total):
            g[decision] = g.get(decision, 0) + n
            flagged = decision in ("REVIEW", "REJECT")
            g["flagged_reviewed"] += n if flagged and review is not None else 0
            g["flagged_bad"] += n if flagged and review == "BAD" else 0
            g["flagged_good"] += n if flagged and review == "GOOD" else 0
            g["review_pending"] += n if decision == "REVIEW" and review is None else 0
            g["passed_found_bad"] += n if decision == "PASS" and review == "BAD" else 0
    for g in [*groups.values(), total]:
        g["inspected"] = g["PASS"] + g["REVIEW"] + g["REJECT"]
        flagged = g["REVIEW"] + g["REJECT"]
        g["flagged_share"] = round(flagged / g["inspected"], 4) if g["inspected"] else None
    def text(key: tuple[Any, ...]) -> tuple[str, ...]:
        return tuple("" if v is None else str(v) for v in key)

    rows = [(k, groups[k]) for k in sorted(groups, key=text)]
    return [*rows, (("all", *([None] * (n_keys - 1))), total)] if rows else []


# --------------------------------------------------------------------------- artifact files
ARTIFACT_KINDS = ("heatmaps", "images")


class ArtifactStore:
    """Heat-map overlays and kept uploads as files with generated names under ``root``. Each file
    is fsynced before its rename, and :meth:`sync` flushes the renames before the records naming
    them are committed: a power cut leaves no record whose file came back empty or missing."""

    STALE_TMP_S = 3600.0  # a half-written file this old was left by a crash: no writer holds it

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        """``create=False``: read what is there (``results export``), making no folder. Never
        in a dataset's folder of images, where the next train would read what it keeps. A start
        removes the half-written files a crash left, those older than :attr:`STALE_TMP_S` only:
        a younger one may be another service's on the same folder (a second `serve` or `watch`),
        being written now."""
        self.root = Path(root)
        self._unsynced: set[Path] = set()  # folders with files renamed in since the last sync()
        self._lock = threading.Lock()
        if create:
            check_outside_datasets(self.root, "the data folder (--data-dir; by default the store's folder)",
                                   "the kept images and heat maps")
        for kind in ARTIFACT_KINDS if create else ():
            folder = self.root / kind
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for tmp in folder.glob("*.tmp"):  # left by a crash mid-write
                    if is_artifact_name(tmp.name[: -len(".tmp")]) and self._stale(tmp):  # this store's
                        tmp.unlink(missing_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot use the artifact folder {folder}: {exc}") from None

    def _stale(self, tmp: Path) -> bool:
        try:
            return time.time() - tmp.stat().st_mtime > self.STALE_TMP_S
        except FileNotFoundError:  # its writer renamed it meanwhile
            return False

    def _write(self, kind: str, data: bytes, ext: str) -> str:
        """Write via a temporary file and rename; OutputError (and no file left) on failure."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        name = f"{uuid.uuid4().hex}.{ext}"
        final = self.root / kind / name
        tmp = final.with_name(name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # its bytes on the disk before its name
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OutputError(f"cannot write {kind[:-1]} {final}: {exc}") from None
        with self._lock:
            self._unsynced.add(final.parent)
        return name

    def sync(self) -> None:
        """Flush the renames of the files written since the last call to the disk: called before
        their records are committed."""
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        for folder in folders:
            sync_folder(folder)

    def remove(self, kind: str, name: str | None) -> OSError | None:
        """Delete a file this store wrote (a generated name under ``root/kind``); else nothing.
        Returns why it could not be deleted (None where it is gone, or not this store's)."""
        path = self.path(kind, name)
        try:
            if path is not None:
                path.unlink(missing_ok=True)
        except OSError as exc:
            return exc
        return None

    def check_write(self) -> str | None:
        """Write and remove a small probe file in each folder: None when both work, else why."""
        for kind in ARTIFACT_KINDS:
            try:
                name = self._write(kind, b"diffqc write probe\n" * 64, "png")
            except OutputError as exc:
                return str(exc)
            self.remove(kind, name)
        return None

    def save_png(self, kind: str, image: np.ndarray) -> str:
        """Write an HxWx3 (or HxW) uint8 array, or an HxW uint16 one (16-bit grey), as PNG;
        returns the generated name."""
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
        return self._write(kind, buf.getvalue(), "png")

    def save_bytes(self, kind: str, data: bytes, ext: str) -> str:
        return self._write(kind, data, ext)

    def path(self, kind: str, name: str | None) -> Path | None:
        """The file of a stored artifact, or None (never outside ``root/kind``)."""
        if kind not in ARTIFACT_KINDS or not name:
            return None
        path = safe_child(self.root / kind, name)
        return path if path is not None and path.is_file() else None


def default_artifact_root(db_url: str) -> Path:
    """Beside the SQLite file; ``./diffqc-data`` for PostgreSQL."""
    if is_postgres_url(db_url):
        return Path("diffqc-data")
    return sqlite_path(db_url).resolve().parent


def store_url(db_url: str | None) -> str:
    """The result store a command uses: ``--db``, else ``$DIFFQC_DB`` (blank is unset, as an
    empty one is: it named a store " "), else ``diffqc-results.db`` (the same for `serve`,
    `watch` and `results`)."""
    env = os.environ.get("DIFFQC_DB", "")
    return db_url or (env if env.strip() else "diffqc-results.db")


def _db_reason(exc: BaseException) -> str:
    """A database error in one line: PostgreSQL's primary message (not the SQL it quotes), and for
    a query the server's ``statement_timeout`` stopped, what to do."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    said = str(primary) if primary else " ".join(str(exc).split())
    if getattr(diag, "sqlstate", None) == "57014" and "statement timeout" in said:  # query_canceled
        said += (" (the server's statement_timeout, a limit a DBA sets for a role or database, stopped "
                 "the query: give diffqc's role a longer one, ALTER ROLE name SET statement_timeout = "
                 "'5min', or read a shorter period, --since/--until)")
    return said


def check_store_exists(db_url: str, *, doing: str) -> None:
    """A SQLite store that does not exist is refused for reading (opening it would create an
    empty one, and a mistyped ``--db`` would read as a line with no parts); PostgreSQL says so
    itself when opened."""
    if is_postgres_url(db_url) or sqlite_path(db_url).is_file():
        return
    path = sqlite_path(db_url)
    if path.is_dir():  # `--db data/` for `--db data/results.db`
        held = sorted(str(p) for p in path.glob("*.db") if p.is_file())[:3]
        raise StoreError(f"result store {path} is a folder, not a store's file: give the --db that "
                         "`diffqc serve` or `watch` wrote"
                         + (f" ({', '.join(held)}?)" if held else " (it holds no .db file)"))
    raise StoreError(f"result store {path} does not exist: nothing to {doing} "
                     "(give the --db that `diffqc serve` or `watch` wrote)")


def backup_store(db_url: str, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Copy a SQLite result store to ``out`` while `serve` or `watch` go on writing to it
    (``diffqc results backup``): SQLite's online backup in one step, one read transaction, so the
    copy is the store as of one commit (a ``cp`` of a store being written, or of its file without
    its ``-wal``, can be torn or miss the latest records). The copy is a single file (rollback
    journal, not WAL), checked (``PRAGMA integrity_check``) and then renamed into place: ``out``
    is the whole copy or nothing. ``out`` a folder: a file in it named by the store and the UTC
    time. An existing ``out`` is replaced only with ``force`` and only when it is a result store
    (an earlier backup). Returns ``{"backup", "records", "bytes", "seconds"}``. PostgreSQL is
    backed up with its own tools (``pg_dump``)."""
    if is_postgres_url(db_url):
        raise StoreError(f"{redact_url(db_url)} is a PostgreSQL store: back it up with PostgreSQL's own "
                         "tools, e.g. pg_dump --format=custom --file=results.dump URL (pg_restore reads "
                         "it back); results backup copies a SQLite store")
    check_store_exists(db_url, doing="back up")
    t0 = time.perf_counter()
    source = sqlite_path(db_url).absolute()
    target = Path(out).absolute()
    if target.is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = target / f"{source.stem}-{stamp}{source.suffix or '.db'}"
    if not target.parent.is_dir():
        raise StoreError(f"cannot write the backup {target}: its folder {target.parent} does not exist")
    if target.exists():
        if target.samefile(source):
            raise StoreError(f"{target} is the store itself: give the backup another path")
        if not force:
            raise StoreError(f"{target} exists: give another path (a folder names each backup by its "
                             "time), or --force to replace an earlier backup")
        if not _holds_results(target):
            raise StoreError(f"{target} is not a diffqc result store: --force replaces an earlier "
                             "backup only; give another path")
    try:
        with ResultStore(str(source), read_only=True) as store:
            records = _copy_store(store._writer, source, target)
    except (sqlite3.Error, OSError) as exc:
        why = _why(exc)
        if isinstance(exc, OSError) or why in ("disk I/O error", "database or disk is full"):
            raise StoreError(f"cannot write the backup {target}: {why}") from None
        raise StoreError(f"cannot back up {source}: {why}") from None
    return {"backup": str(target), "records": records, "bytes": target.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3)}


def _why(exc: sqlite3.Error | OSError) -> str:
    """The OS's or SQLite's words for a failure (not the file's name twice)."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def restore_store(backup: str | Path, db_url: str) -> dict[str, Any]:
    """Put a backup (:func:`backup_store`) back as the SQLite result store ``db_url`` (``diffqc
    results restore``), through SQLite's backup API into the store itself: the store's own -wal
    is applied first and then every page replaced (a ``cp`` of the backup over a store that a
    crash left with its -wal gives the backup plus that file's pages, not the backup). The store
    as it was is first copied beside it, ``<store>.before-restore-<UTC time>.db``: nothing is
    lost. Refused while another process holds the store open (``serve``, ``watch``), and for a
    backup that is not a result store or fails SQLite's integrity check. A store that does not
    exist is made from the backup. Returns ``{"store", "records", "kept", "seconds"}`` (``kept``
    only where there was a store)."""
    t0 = time.perf_counter()
    source, target, had_store = _restore_paths(backup, db_url)
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)
    try:
        problems = [r[0] for r in src.execute("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"the backup {source} fails SQLite's integrity check: {'; '.join(problems[:3])}")
        conn = open_alone(target, then="restore")
        try:
            result: dict[str, Any] = {"store": str(target)}
            if had_store:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                kept = target.with_name(f"{target.name}.before-restore-{stamp}.db")
                n = 1
                while kept.exists():  # a second restore within the second
                    n += 1
                    kept = target.with_name(f"{target.name}.before-restore-{stamp}-{n}.db")
                try:
                    _copy_store(conn, target, kept)
                except (sqlite3.Error, OSError) as exc:
                    why = _why(exc)
                    raise StoreError(f"cannot keep a copy of {target} as {kept} ({why}); nothing was "
                                     "restored") from None
                result["kept"] = str(kept)
            src.backup(conn)
            if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":  # pragma: no cover
                raise StoreError(f"{target} fails SQLite's integrity check after the restore; the store "
                                 f"as it was is {result.get('kept')}")
            result["records"] = int(conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        why = _why(exc)
        raise StoreError(f"cannot restore {source} to {target}: {why}") from None
    finally:
        src.close()
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}


def open_alone(path: Path, *, then: str) -> sqlite3.Connection:
    """The SQLite file ``path`` opened as the one connection to it, its locks held until it is
    closed (no process opens it meanwhile) and its -wal applied; refused (:class:`StoreError`)
    while another process holds it open (``serve``, ``watch``): "... stop it, then ``then``".
    sqlite3's other errors as they come."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # held until closed
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # its -wal applied
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise StoreError(f"{path} is open in another process (serve or watch?): stop it, then "
                         f"{then}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def not_a_store(path: Path, names: Sequence[str]) -> StoreError:
    """The error for a SQLite file at ``path`` whose tables (``names``) hold no result store: an
    empty file, or another program's database given as ``--db``."""
    holds = f"its tables: {', '.join(names[:5])}" if names else "it holds no table"
    return StoreError(f"{path.absolute()} holds no diffqc result store ({holds}): give the --db that "
                      "`diffqc serve` or `watch` write to")


def _restore_paths(backup: str | Path, db_url: str) -> tuple[Path, Path, bool]:
    """The backup and the store of :func:`restore_store`, checked, and whether the store holds
    anything (a copy of it is then kept)."""
    if is_postgres_url(db_url):
        raise StoreError(f"{redact_url(db_url)} is a PostgreSQL store: restore it with PostgreSQL's own "
                         "tools (pg_restore); results restore puts back a SQLite store")
    source, target = Path(backup).absolute(), sqlite_path(db_url).absolute()
    if not source.is_file():
        raise StoreError(f"the backup {source} does not exist or is not a file")
    if target.exists() and target.samefile(source):
        raise StoreError(f"{source} is the store itself: give the backup to put back")
    if not _holds_results(source):
        raise StoreError(f"{source} is not a diffqc result store (a `diffqc results backup`)")
    if not target.parent.is_dir():
        raise StoreError(f"cannot restore to {target}: its folder {target.parent} does not exist")
    had_store = target.exists() and target.stat().st_size > 0
    if had_store and not _holds_results(target):
        raise StoreError(f"{target} is not a diffqc result store; nothing is replaced: give --db the store")
    return source, target, had_store


def _copy_store(conn: sqlite3.Connection, source: Path, out: Path) -> int:
    """Copy the store ``conn`` holds (``source``) to ``out`` as one self-contained file (rollback
    journal, not WAL), in one step (one read transaction: the store as of one commit), checked
    (``PRAGMA integrity_check``), then renamed into place: ``out`` is the whole copy or nothing.
    Returns its records. Refused where ``out`` has a ``-wal`` or ``-journal`` beside it (a store
    deleted without it, or a crash's): SQLite would read the copy through it, as that store."""
    for stale in (Path(f"{out}-wal"), Path(f"{out}-journal")):
        if stale.exists():
            raise StoreError(f"{stale} lies beside {out}: SQLite would read a copy written there through it, "
                             "as the store that left it, and the copy's records would be lost; move it away "
                             "or give another path; nothing is written")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        copy = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
            problems = [r[0] for r in copy.execute("PRAGMA integrity_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(f"the copy of {source} fails SQLite's integrity check: "
                                 f"{'; '.join(problems[:3])}; the store may be damaged "
                                 "(sqlite3 STORE '.recover' reads what it can)")
            records = int(copy.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])
        finally:
            copy.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        for leftover in (tmp, Path(f"{tmp}-journal"), Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(OSError):  # ours: written by this call
                leftover.unlink(missing_ok=True)
        raise
    sync_folder(out.parent)  # the rename outlives a power cut
    return records


def _holds_results(path: Path) -> bool:
    """Is ``path`` a SQLite file with diffqc's results table (an earlier backup)? One SQLite
    cannot read for want of room or rights (a full disk) is a :class:`StoreError` saying so,
    not "no"."""
    try:
        return TABLE in _sqlite_tables(path)
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            return False
        raise StoreError(f"cannot read {path}: {exc}") from None
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def stored_records(store: ResultStore, *, batch: int = 500, **filters: Any) -> Iterator[ResultRecord]:
    """Every record matching ``filters`` (those of :meth:`ResultStore.query`), oldest first, read
    ``batch`` at a time: memory stays flat however many parts the store holds."""
    after: int | None = None
    while True:
        found = store.query(**filters, after_id=after, limit=batch, oldest_first=True)
        yield from found
        if len(found) < batch:
            return
        after = found[-1].id


def records_by_part(store: ResultStore, *, batch: int = 500,
                    **filters: Unpack[Filters]) -> Iterator[tuple[str, list[ResultRecord]]]:
    """(part id, its rows matching ``filters``, oldest first) of every part with such a row, in
    the order of part ids: the part ids first (through the filters' indexes: a period's, not the
    whole store's), then ``batch`` parts' rows at a time, so memory holds their rows."""
    ids = store.part_ids(**filters)
    for i in range(0, len(ids), batch):
        rows: dict[str, list[ResultRecord]] = {}
        chunk: Filters = {**filters, "parts": ids[i:i + batch]}
        for rec in store.query(**chunk, limit=None):
            rows.setdefault(str(rec.part_id), []).append(rec)
        yield from rows.items()


# What `diffqc results list --format csv` writes per record (JSON lines add type_scores).
LIST_COLUMNS = ("id", "created", "source", "part_id", "feature_type", "predicted_type", "type_known",
                "score", "p_value", "decision", "reason", "model_version", "latency_ms", "line",
                "station", "camera", "review", "reviewed", "reviewer", "review_note", "review_defect")


def export_reviewed_good(
    db_url: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    since: float | None = None,
    defects: bool = False,
    until: float | None = None,
    line: str | None = None,
    station: str | None = None,
    camera: str | None = None,
    feature_type: str | None = None,
) -> dict[str, Any]:
    """Export parts an operator reviewed as GOOD as a dataset (``diffqc results export``), and
    with ``defects`` those reviewed BAD too (the line's defects found, a PASSed one included);
    of the period, line, station, camera and type given (one station's of a store stations
    share); an export of several stations' or lines' parts without one is said.

    Writes ``out_dir/<feature_type>/<id>.<ext>`` and ``out_dir/manifest.csv`` with columns
    ``path, feature_type, label, part_id, record_id, score, p_value, decision, type_known, defect``
    (``label`` is ``good``, or ``defect`` for a part reviewed BAD; ``defect`` the kind the
    operator named with the verdict, if any), readable by
    :func:`diffqc.data.load_dataset`: GOOD images to retrain on, defects to test a model on
    (``diffqc test``; training reads only the GOOD ones). Parts whose upload was not kept (or has
    expired) are counted as ``missing_image`` and named in a warning. ``out_dir/export.json``
    holds, per type, the parts the line inspected in the period and how many were flagged,
    beside how many GOOD ones of each were exported: parts reviewed
    GOOD are mostly flagged ones, the GOOD parts the model scored highest, and ``diffqc
    calibrate`` refuses an export chosen so (a warning says so here already).
    Returns ``{"exported": n, "defects": d, "missing_image": m, "manifest": path, "types": {...}}``
    (``exported`` counts the defects too; ``types`` the GOOD parts only).
    """
    import csv

    check_store_exists(db_url, doing="export")
    out = _export_target(Path(out_dir))
    artifacts = ArtifactStore(data_dir or default_artifact_root(db_url), create=False)
    if not (artifacts.root / "images").is_dir():
        warnings.warn(f"no kept images under {artifacts.root} (no images/ folder): parts reviewed "
                      "are counted as missing_image; give the --data-dir the service used",
                      stacklevel=2)
    manifest = out / "manifest.csv"
    header = io.StringIO()
    csv.DictWriter(header, fieldnames=list(EXPORT_COLUMNS)).writeheader()
    try:  # the header first: an export cut short (full disk, Ctrl-C) is still known as one
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(manifest, header.getvalue().encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot export to {out}: {exc}") from None
    exported = n_defects = 0
    missing = {"not kept": 0, "expired": 0, "not found": 0}
    taken: dict[str, list[int]] = {}  # type -> [exported, of them flagged]
    rows: list[dict[str, Any]] = []
    chosen: Filters = {"since": since, "until": until, "line": line, "station": station, "camera": camera,
                       "feature_type": feature_type}
    places: dict[str, set[str]] = {"station": set(), "line": set()}  # of the parts exported
    with ResultStore(db_url, read_only=True) as store:
        for rec in stored_records(store, **chosen, review=None if defects else "GOOD", reviewed=True):
            src = artifacts.path("images", rec.image)
            if src is None or rec.feature_type is None:
                why = ("not kept" if rec.image is None and rec.image_expired_at is None else
                       "expired" if rec.image_expired_at is not None else "not found")
                missing[why] += 1
                continue
            ftype = rec.feature_type
            rel = Path(_safe_dirname(ftype)) / f"{rec.id}{src.suffix}"
            try:
                (out / rel.parent).mkdir(parents=True, exist_ok=True)
                write_atomic(out / rel, src.read_bytes(), sync=False)
            except OSError as exc:
                raise OutputError(f"{exc}; the export in {out} is incomplete: the same "
                                  "command, run again, replaces it") from None
            rows.append(
                {
                    "path": rel.as_posix(),
                    "feature_type": ftype,
                    "label": "good" if rec.review == "GOOD" else "defect",
                    "part_id": rec.part_id or f"record-{rec.id}",
                    "record_id": rec.id,
                    "score": rec.score,
                    "p_value": rec.p_value,
                    "decision": rec.decision,
                    "type_known": rec.type_known,
                    "defect": rec.review_defect if rec.review == "BAD" else None,
                }
            )
            exported += 1
            for key, seen in places.items():
                if (value := getattr(rec, key)) is not None:
                    seen.add(value)
            if rec.review != "GOOD":
                n_defects += 1
                continue
            counts = taken.setdefault(ftype, [0, 0])
            counts[0] += 1
            counts[1] += rec.decision in (REVIEW, REJECT)
        inspected = store.counts(**chosen)  # after the export: a part stored meanwhile only adds to it
    types = _export_summary(taken, inspected)
    _warn_export(missing, types, artifacts.root)
    for key, seen in places.items():
        if len(seen) > 1 and chosen.get(key) is None:
            warnings.warn(f"the export holds parts of {len(seen)} {key}s ({', '.join(sorted(seen))}), a "
                          f"store they share: a model is retrained on its own {key}'s parts; give --{key} "
                          f"to export one {key}'s", stacklevel=2)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(EXPORT_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    held = {k: v for k, v in chosen.items() if v is not None or k == "since"}  # the parts it holds
    summary = json.dumps({**held, "types": types}, indent=2).encode("utf-8")
    try:
        write_atomic(out / EXPORT_SUMMARY_FILE, summary)
        write_atomic(manifest, table.getvalue().encode("utf-8"))
    except OutputError as exc:
        raise OutputError(f"{exc}; the export in {out} is incomplete: the same command, run "
                          "again, replaces it") from None
    return {"exported": exported, "defects": n_defects, "missing_image": sum(missing.values()),
            "manifest": str(manifest),
            "types": types}


def _export_summary(taken: dict[str, list[int]], line: list[tuple[str | None, str, int]]
                    ) -> dict[str, dict[str, int]]:
    """Per exported type: the parts the line inspected in the period and how many were flagged
    (``store.counts``), and how many of each were exported."""
    out = {t: {"inspected": 0, "flagged": 0, "exported": n, "exported_flagged": m}
           for t, (n, m) in sorted(taken.items())}
    for ftype, decision, n in line:
        if ftype in out and decision in (PASS, REVIEW, REJECT):
            out[ftype]["inspected"] += n
            out[ftype]["flagged"] += n if decision != PASS else 0
    return out


def _warn_export(missing: dict[str, int], types: dict[str, dict[str, int]], root: Path) -> None:
    """Reviewed parts left out for want of their image, and why; types whose exported parts
    were chosen by their decision."""
    if sum(missing.values()):
        why = {"not kept": "not kept (serve and watch keep the images --keep-images names: "
                           "flagged parts' by default, every part's with all)",
               "expired": "expired (--keep-days, --artifact-budget-mb)",
               "not found": f"not found under {root} (--data-dir: the folder serve or watch kept them in)"}
        said = ", ".join(f"{n} {why[k]}" for k, n in missing.items() if n)
        total = sum(missing.values())
        warnings.warn(f"{total} reviewed part{'s' if total != 1 else ''} not exported, the "
                      f"image being {said}", stacklevel=3)
    for t, counts in types.items():
        if note := selection_note(t, counts):
            warnings.warn(f"{note}. Retrain on them (add them to the type's "
                          "training images); calibrated on them the thresholds would rise and "
                          "defects pass, and `diffqc calibrate` refuses them", stacklevel=3)


EXPORT_COLUMNS = ("path", "feature_type", "label", "part_id", "record_id", "score", "p_value",
                  "decision", "type_known", "defect")
# the manifest's first line, of this and of an earlier version (before the defect kind)
_EXPORT_HEADERS = (",".join(EXPORT_COLUMNS), ",".join(EXPORT_COLUMNS[:-1]))


def _export_target(out: Path) -> Path:
    """``out`` if an export may be written there: a new or empty folder, or an earlier export
    (its manifest.csv has the export's columns; its files are replaced). Any other folder is
    refused before the store is opened: an export never writes over files it did not write (a
    dataset's own manifest.csv, say)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot export to {out}: it exists and is not a folder")
    check_outside_datasets(out, "results export OUT", "the exported images")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    try:
        with (out / "manifest.csv").open(encoding="utf-8") as fh:
            header = fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        header = ""
    if header not in _EXPORT_HEADERS:
        raise OutputError(f"{out} is not empty and holds no earlier `diffqc results export`; "
                          "choose a new or empty folder (an export never writes over other files)")
    return out


def _safe_dirname(name: str) -> str:
    """A feature type as one path component (no separators, no dot-names)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "_"
