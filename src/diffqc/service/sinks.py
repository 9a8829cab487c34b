"""Push decisions to the line: a durable outbox and its MQTT and webhook sinks.

Every stored decision is also written, **in the same transaction as its record**, as one row per
configured sink into the ``diffqc_outbox`` table of the result store (``Outbox.enqueue_records``
is a hook of :meth:`ResultStore.insert_many`). One delivery thread per sink sends due rows in id
order and deletes a row only once the receiver has acknowledged it (MQTT: the broker's PUBACK
for QoS 1; webhook: a 2xx answer). So a decision is pushed only after it is committed, a sink
that is down never blocks inspection (the worker only writes a row), and nothing is lost: the
rows wait, and the sink catches up when it returns, also across a restart of the service.

Each row is the service's ``station`` (``--station``; none by default), and a service delivers,
counts, dead-letters and requeues only its station's: services sharing a store (stations on one
PostgreSQL) each push their own parts to their own receivers, one's receiver down never holding
back another's. A row an older diffqc queued without a station is its record's station's.

Delivery is at-least-once: a crash between the receiver's acknowledgement and the row's delete
sends it again. Every message carries the ``record_id`` (unique in its store) and, to a webhook,
an ``Idempotency-Key`` header (unique across stores: :func:`message_key`) so that receivers can
drop duplicates.

A webhook message its endpoint still refuses after ``max_attempts`` (exponential backoff in
between; an endpoint that is away, :class:`Unavailable`, is waited for, not counted) is moved
to ``diffqc_dead_letters`` (kept, never dropped; :meth:`Outbox.requeue_dead` sends it again).
MQTT messages wait while the broker is unreachable; one the broker refuses (MQTT 5's
PUBACK: its access list) is dead-lettered after :data:`MAX_ATTEMPTS`, as a webhook's.

MQTT topics under the prefix (``mqtt://host:port/PREFIX``, ``wss://host/mqtt?prefix=PREFIX`` over
WebSockets; default ``diffqc``):
``PREFIX/status`` (retained, ``online``; ``offline`` by last will or on a clean stop),
``PREFIX/decisions/<feature_type>`` (QoS 1, one per decision) and
``PREFIX/alarms/<feature_type>`` (QoS 1, retained: the latest drift alarm state) and, for a
type seen by several cameras, ``PREFIX/alarms/<feature_type>/<camera>`` (one camera's); with
``parts`` (``serve --push-parts``), ``PREFIX/parts/<part_id>`` (QoS 1): a part's verdict
(:func:`diffqc.service.parts.part_verdict`) each time images of it are stored, from its stored
images, written in the same transaction as theirs.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import copy
import email.utils
import hashlib
import hmac
import http.client
import json
import logging
import os
import queue
import re
import select
import socket
import ssl
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qs, quote, unquote, urljoin, urlsplit

from diffqc import __version__
from diffqc.data import unprintable
from diffqc.drift import is_misrouted
from diffqc.errors import ConfigError
from diffqc.output import json_safe
from diffqc.service.logs import Outage, utc_minute
from diffqc.service.parts import PART_WINDOW_S, OverdueParts, PartVerdict, commit_verdicts
from diffqc.service.security import check_tls, read_secret_file
from diffqc.service.store import (
    TABLE,
    ResultRecord,
    ResultStore,
    id_column,
    iso_time,
    redact_url,
    split_url,
)

log = logging.getLogger("diffqc.service.sinks")

OUTBOX = "diffqc_outbox"
DEAD_LETTERS = "diffqc_dead_letters"
DECISION, ALARM, PART = "decision", "alarm", "part"
# --push-parts: a part's verdict after each commit holding images of it, or only once it is complete
PART_PUSHES = ("each", "complete")
UNKNOWN_TYPE = "unknown"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {outbox} (
    id {pk},
    sink TEXT NOT NULL,
    kind TEXT NOT NULL,
    record_id BIGINT,
    topic_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    station TEXT
);
CREATE INDEX IF NOT EXISTS {outbox}_due ON {outbox} (sink, id);
CREATE TABLE IF NOT EXISTS {dead} (
    id {pk},
    sink TEXT NOT NULL,
    kind TEXT NOT NULL,
    record_id BIGINT,
    topic_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    failed_at DOUBLE PRECISION NOT NULL,
    station TEXT
)
"""


def create_outbox_tables(store: ResultStore, conn: Any) -> None:
    """The outbox's and dead letters' tables in ``store`` (idempotent), on ``conn`` in its
    transaction: the sinks' :class:`Outbox`, and a history copied into a new store."""
    if store.postgres:
        conn.execute("SELECT pg_advisory_xact_lock(727173)")
    ddl = _SCHEMA.format(outbox=OUTBOX, dead=DEAD_LETTERS, pk=id_column(store.postgres))
    for stmt in (s.strip() for s in ddl.split(";")):
        if stmt:
            conn.execute(stmt)
    for table in (OUTBOX, DEAD_LETTERS):  # tables made before stations were kept apart
        store._add_column(conn, table, "station", "TEXT")


STRANDED_S = 300.0  # another station's messages waiting longer are named at start (a renamed station's)
_INSERT = (f"INSERT INTO {OUTBOX} (sink, kind, record_id, topic_key, payload, created_at, station) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True)
class Message:
    """One outbox row: what a sink sends."""

    id: int
    sink: str
    kind: str  # "decision", "alarm" or "part"
    record_id: int | None
    topic_key: str  # the feature type (topic suffix)
    payload: str  # JSON text
    attempts: int
    created_at: float


def message_key(message: Message) -> str:
    """A webhook push's ``Idempotency-Key`` and Standard Webhooks' ``webhook-id``: the same on
    each attempt at one message, and another for any other message, from this store or any other
    (``decision-<record_id>`` alone was the same for record 1 of two stations' stores, or of a store
    made anew, and a MES dropping repeats dropped the second): its kind, its record id for a
    reader (none for an alarm or an overdue part), and a digest of its body and the time it was
    queued, which a dead letter sent again keeps (an alarm's key named its outbox row, a new one
    on ``requeue``)."""
    digest = hashlib.sha256(f"{message.created_at!r}\n{message.payload}".encode()).hexdigest()[:16]
    return "-".join((message.kind, *([] if message.record_id is None else [str(message.record_id)]), digest))


# a record's fields a decision's push leaves out: its review (none yet) and its files' names
NOT_PUSHED = ("review", "reviewed_at", "reviewer", "review_note", "review_defect", "reviewed", "heatmap",
              "image")


def decision_payload(rec: ResultRecord) -> dict[str, Any]:
    """What a receiver gets for one stored decision (the record without review fields)."""
    out = rec.to_json()
    for key in NOT_PUSHED:
        out.pop(key, None)
    out["record_id"] = out.pop("id")
    out["kind"] = DECISION
    out["misrouted"] = is_misrouted(rec.feature_type, rec.predicted_type, rec.type_known)
    return json_safe(out)


def part_payload(verdict: PartVerdict, latest: ResultRecord, *, overdue: bool = False) -> dict[str, Any]:
    """What a receiver gets for a part's verdict, as its image ``latest`` is stored (or, when
    ``overdue``, as it stands once the part's other crops are overdue: ``--part-timeout``)."""
    return json_safe({
        "kind": PART, **verdict.to_json(), "overdue": overdue, "record_id": latest.id,
        "created_at": latest.created_at, "created": iso_time(latest.created_at), "line": latest.line,
        "station": latest.station,
    })


def topic_key(feature_type: str | None) -> str:
    """A feature type (or a camera) as one MQTT topic level (no ``/``, ``+``, ``#``)."""
    if not feature_type:
        return UNKNOWN_TYPE
    return "".join("_" if c in "/+#\x00" else c for c in feature_type)


# --------------------------------------------------------------------------- the outbox
class Outbox:
    """Outbox and dead-letter tables in the result store, for the sinks named ``sinks``."""

    def __init__(self, store: ResultStore, sinks: Sequence[str], *, parts: str | None = None,
                 types: Sequence[str] | None = None, window_s: float = PART_WINDOW_S,
                 station: str | None = None) -> None:
        """``parts`` (:data:`PART_PUSHES`): also a part's verdict, ``"each"`` time images of it
        are stored or only when it is ``"complete"`` then; ``types``: those a part should have
        (:func:`~diffqc.service.parts.part_types`) and ``window_s`` as
        :func:`~diffqc.service.parts.part_verdict` takes them. With ``overdue`` set, the verdicts it makes
        are noted there too (``--part-timeout``: :meth:`enqueue_overdue`). ``station``: the
        service's (``--station``): the rows this outbox writes and reads, apart from other
        services' on a shared store."""
        if parts is not None and parts not in PART_PUSHES:
            raise ValueError(f"parts must be one of {', '.join(PART_PUSHES)} or None, got {parts!r}")
        self.store = store
        self.sinks = tuple(sinks)
        self.parts = parts
        self.window_s = window_s
        self.overdue: OverdueParts | None = None
        self.types = None if types is None else list(types)
        self.station = station
        self.wakeup = threading.Event()
        with store._transaction() as conn:
            create_outbox_tables(store, conn)
            if station is not None:
                left = self._adopt(conn)
            elsewhere = self._waiting_elsewhere(conn, time.time() - STRANDED_S)
        if station is not None and left:
            log.warning("%d messages queued by a service on this store without --station wait in its "
                        "outbox: this service (--station %r) does not send them; the service run "
                        "without --station does", left, station)
        this = "without --station" if station is None else f"--station {station!r}"
        for other, n, since in elsewhere:
            log.warning("%d messages of station %r have waited in this store's outbox since %s, which this "
                        "service (%s) does not send: the service run with --station %r sends them (a "
                        "station renamed: run it once under its former name until they are sent)",
                        n, other, utc_minute(since), this, other)

    def _waiting_elsewhere(self, conn: Any, before: float) -> list[tuple[str, int, float]]:
        """Other stations' rows queued before ``before`` (station, count, the oldest's time), the
        oldest first, at most 10 stations: messages a station renamed left under its former name,
        sent by no service, or a station's whose receiver is down."""
        mine, args = (("", (before,)) if self.station is None
                      else (" AND station <> ?", (before, self.station)))
        rows = conn.execute(self.store._q(
            f"SELECT station, COUNT(*), MIN(created_at) FROM {OUTBOX} WHERE station IS NOT NULL AND "
            f"created_at < ?{mine} GROUP BY station ORDER BY MIN(created_at) LIMIT 10"), args).fetchall()
        return [(str(s), int(n), float(t)) for s, n, t in rows]

    def _adopt(self, conn: Any) -> int:
        """Take the rows of this station's records that a diffqc before 9f9a463 queued (it kept no
        station in its rows, and so no service sent them after the upgrade); return how many
        rows of no station are left, a service's without ``--station``."""
        for table in (OUTBOX, DEAD_LETTERS):
            conn.execute(self.store._q(
                f"UPDATE {table} SET station = ? WHERE station IS NULL AND record_id IS NOT NULL AND "
                f"EXISTS (SELECT 1 FROM {TABLE} r WHERE r.id = {table}.record_id AND r.station = ?)"),
                (self.station, self.station))
        row = conn.execute(f"SELECT COUNT(*) FROM {OUTBOX} WHERE station IS NULL").fetchone()
        return int(row[0])

    def _mine(self, sink: str) -> tuple[str, tuple[Any, ...]]:
        """The SQL condition (and its parameters) of this service's rows of ``sink``."""
        if self.station is None:
            return "sink = ? AND station IS NULL", (sink,)
        return "sink = ? AND station = ?", (sink, self.station)

    # ------------------------------------------------------------------ writing
    def _insert(self, conn: Any, kind: str, record_id: int | None, key: str, payload: str) -> None:
        sql = self.store._q(_INSERT)
        now = time.time()
        for sink in self.sinks:
            conn.execute(sql, (sink, kind, record_id, key, payload, now, self.station))

    def enqueue_records(self, conn: Any, records: Sequence[ResultRecord]) -> None:
        """The store's insert hook: one row per sink for each newly stored record, on the
        store's own connection inside its transaction (so both commit or neither)."""
        new = [rec for rec in records if not rec.duplicate and rec.id is not None]
        for rec in new:
            payload = json.dumps(decision_payload(rec), allow_nan=False, sort_keys=True)
            self._insert(conn, DECISION, rec.id, topic_key(rec.feature_type), payload)
        if self.parts is not None:  # each part once, after all of its images of this commit
            for verdict, rec in commit_verdicts(self.store, conn, new, self.types, self.window_s):
                if self.overdue is not None:
                    self.overdue.note(verdict, rec.created_at)
                if self.parts == "complete" and verdict.complete is not True:
                    continue  # its other crops are still to come
                body = json.dumps(part_payload(verdict, rec), allow_nan=False, sort_keys=True)
                self._insert(conn, PART, rec.id, topic_key(verdict.part_id), body)

    def enqueue_overdue(self, verdict: PartVerdict, latest: ResultRecord) -> None:
        """A part whose other crops are overdue (:class:`~diffqc.service.parts.OverdueParts`),
        as it stands, in its own transaction."""
        body = json.dumps(part_payload(verdict, latest, overdue=True), allow_nan=False, sort_keys=True)
        with self.store._transaction() as conn:
            # no record id of its own: its key (message_key) is not that of the push its latest
            # record already made, which a receiver dropping repeats would take it for
            self._insert(conn, PART, None, topic_key(verdict.part_id), body)
        self.wakeup.set()

    def enqueue_alarm(self, feature_type: str | None, payload: dict[str, Any], *,
                      camera: str | None = None) -> None:
        """An event that is not a record (a drift alarm: a type's, or one camera's of a type,
        under ``alarms/<type>/<camera>``), in its own transaction."""
        body = json.dumps(json_safe({**payload, "kind": ALARM}), allow_nan=False, sort_keys=True)
        key = topic_key(feature_type) + ("" if camera is None else "/" + topic_key(camera))
        with self.store._transaction() as conn:
            self._insert(conn, ALARM, None, key, body)
        self.wakeup.set()

    # ------------------------------------------------------------------ delivery bookkeeping
    def due(self, sink: str, now: float, limit: int = 64) -> list[Message]:
        """The oldest waiting rows of ``sink``, in id order, up to the first not yet due."""
        mine, args = self._mine(sink)
        sql = self.store._q(
            f"SELECT id, sink, kind, record_id, topic_key, payload, attempts, created_at, next_at "
            f"FROM {OUTBOX} WHERE {mine} ORDER BY id LIMIT ?"
        )
        with self.store._reader() as conn:
            rows = conn.execute(sql, (*args, limit)).fetchall()
        out = []
        for row in rows:
            if float(row[8]) > now:  # keep the order: nothing overtakes a message backing off
                break
            out.append(
                Message(int(row[0]), str(row[1]), str(row[2]), None if row[3] is None else int(row[3]),
                        str(row[4]), str(row[5]), int(row[6]), float(row[7]))
            )
        return out

    def delivered(self, message: Message) -> None:
        with self.store._transaction() as conn:
            conn.execute(self.store._q(f"DELETE FROM {OUTBOX} WHERE id = ?"), (message.id,))

    def failed(self, message: Message, error: str, retry_at: float, *, attempt: bool = True) -> None:
        """Try ``message`` again at ``retry_at``; ``attempt``: it counts towards its dead letter
        (not when the receiver was away: :class:`Unavailable`)."""
        with self.store._transaction() as conn:
            conn.execute(
                self.store._q(f"UPDATE {OUTBOX} SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?"),
                (message.attempts + int(attempt), retry_at, error[:2000], message.id),
            )

    def dead_letter(self, message: Message, error: str) -> None:
        """Move a message that exhausted its retries to the dead-letter table."""
        with self.store._transaction() as conn:
            conn.execute(
                self.store._q(
                    f"INSERT INTO {DEAD_LETTERS} (sink, kind, record_id, topic_key, payload, attempts, "
                    "last_error, created_at, failed_at, station) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (message.sink, message.kind, message.record_id, message.topic_key, message.payload,
                 message.attempts + 1, error[:2000], message.created_at, time.time(), self.station),
            )
            conn.execute(self.store._q(f"DELETE FROM {OUTBOX} WHERE id = ?"), (message.id,))

    def requeue_dead(self, sink: str) -> int:
        """Put every dead letter of ``sink`` (this station's) back into the outbox; returns how many."""
        mine, args = self._mine(sink)
        with self.store._transaction() as conn:
            rows = conn.execute(
                self.store._q(
                    f"SELECT id, kind, record_id, topic_key, payload, created_at FROM {DEAD_LETTERS} "
                    f"WHERE {mine} ORDER BY id"
                ),
                args,
            ).fetchall()
            for row in rows:
                conn.execute(self.store._q(_INSERT), (sink, *row[1:6], self.station))
                conn.execute(self.store._q(f"DELETE FROM {DEAD_LETTERS} WHERE id = ?"), (row[0],))
        self.wakeup.set()
        return len(rows)

    def _count(self, table: str, sink: str) -> int:
        mine, args = self._mine(sink)
        with self.store._reader() as conn:
            row = conn.execute(self.store._q(f"SELECT COUNT(*) FROM {table} WHERE {mine}"), args).fetchone()
        return int(row[0])

    def pending(self, sink: str) -> int:
        return self._count(OUTBOX, sink)

    def dead(self, sink: str) -> int:
        return self._count(DEAD_LETTERS, sink)

    def dead_letters(self, sink: str, limit: int = 100) -> list[dict[str, Any]]:
        mine, args = self._mine(sink)
        with self.store._reader() as conn:
            rows = conn.execute(
                self.store._q(
                    f"SELECT id, kind, record_id, attempts, last_error, failed_at FROM {DEAD_LETTERS} "
                    f"WHERE {mine} ORDER BY id LIMIT ?"
                ),
                (*args, limit),
            ).fetchall()
        return [dict(zip(("id", "kind", "record_id", "attempts", "last_error", "failed_at"), r, strict=True))
                for r in rows]


# --------------------------------------------------------------------------- sinks
MAX_ATTEMPTS = 8  # a webhook's by default, and an MQTT message's the broker refuses
RETAIN_NOT_SUPPORTED = 0x9A  # MQTT 5's reason code: a retained will or publish refused
MAX_IN_FLIGHT = 20  # MQTT messages sent and not yet acknowledged, at most (paho's own limit)
SHORT_LIVED_S = 10.0  # an MQTT connection the broker ends sooner: said once, not each time


class Refused(RuntimeError):
    """The receiver took the message and refused it (an MQTT broker's access list): waiting for
    the receiver will not change that, so it is dead-lettered after :data:`MAX_ATTEMPTS`."""


class Unavailable(RuntimeError):
    """The receiver, not the message: it cannot be reached, or answers what it answers every
    message (down behind its proxy, a wrong URL or token, a rate limit). The message waits, as
    an unreachable MQTT broker's do, however long, and is not a dead letter: a MES restarted
    for ten minutes dead-lettered a message every two. ``retry_after_s``: how long the receiver
    asked to be left alone (``Retry-After``), the least wait before the next try."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotSent(RuntimeError):
    """A message a sink sending many at once left unsent, its receiver found away by another of
    them (``send_many``): it stays due, no attempt counted, as one after a failure over one
    connection does."""


RETRY_AFTER_MAX_S = 3600.0  # a Retry-After longer than this is read as this
MAX_WEBHOOK_CONNECTIONS = 64  # --webhook-connections: at most as many as a delivery pass takes


def retry_after(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header's wait in seconds (its delay, or its HTTP date less ``now``), at
    most :data:`RETRY_AFTER_MAX_S`; None for none or one that cannot be read."""
    if not value or not (value := value.strip()):
        return None
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


# a webhook's answers about the receiver (its URL, its login, its load), not about one message
RECEIVER_STATUSES = frozenset({301, 302, 303, 307, 308, 401, 403, 404, 405, 407, 408, 410, 429, 502,
                               503, 504})


class Sink(Protocol):
    name: str
    max_attempts: int | None  # None: never dead-letter (wait for the receiver)

    def ready(self) -> bool: ...
    def send(self, message: Message) -> None: ...  # raises on failure
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def backoff(self, attempts: int) -> float: ...


def _backoff(base: float, cap: float, attempts: int) -> float:
    return float(min(cap, base * 2.0 ** max(0, attempts - 1)))


def trust_hint(peer: str, exc: ssl.SSLCertVerificationError, host: str) -> str:
    """What to do about a certificate this process would not verify: by OpenSSL's reason, as
    trusting a CA is not the remedy for a certificate that names another host (62, 64), has
    expired (10) or is not valid yet (9); otherwise no CA this process trusts signed it (a
    line's own CA)."""
    if exc.verify_code in (62, 64):
        return (f"the certificate is not for this host ({host}): give the {peer}'s URL a name its "
                f"certificate was issued for, or have the {peer} a certificate issued for {host}")
    if exc.verify_code == 10:
        return f"the certificate has expired: renew the {peer}'s certificate"
    if exc.verify_code == 9:
        return f"the certificate is not valid yet: are this machine's clock and the {peer}'s right?"
    return (f"trust the {peer}'s CA with SSL_CERT_FILE=/path/ca.pem in the service's environment "
            "(or add it to the system's certificate store)")


@dataclass(frozen=True)
class _Route:
    """Where a webhook's requests go: to the endpoint, or to the proxy the service's environment
    names for it (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``, read as urllib and curl read them)."""

    tls: bool  # the endpoint is https://
    host: str  # the endpoint's
    port: int
    target: str  # the request line's: the path, or the whole URL to a proxy of an http:// endpoint
    proxy: tuple[str, int] | None = None
    proxy_headers: dict[str, str] | None = None  # its Proxy-Authorization: the CONNECT's, or each request's
    shown: str = ""  # " through the proxy host:port", for errors


def _basic(user: str | None, password: str | None) -> str:
    """An ``Authorization: Basic`` value of a URL's user and password (percent-escapes decoded)."""
    return "Basic " + base64.b64encode(f"{unquote(user or '')}:{unquote(password or '')}".encode()).decode()


def _route(url: str) -> _Route:
    """Where a webhook URL's pushes go, the URL and the environment's proxy for it checked."""
    check_webhook_url(url)
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port or (443 if tls else 80)
    netloc = parts.netloc.rpartition("@")[2]
    # a space or an umlaut as written (/qs/prüfung): percent-encoded, UTF-8, as browsers send them
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~") + (
        f"?{quote(parts.query, safe='/?%:@!$&()*+,;=~')}" if parts.query else "")
    proxy_url = urllib.request.getproxies().get(parts.scheme)
    if not proxy_url or urllib.request.proxy_bypass(netloc):
        return _Route(tls, host, port, path)
    proxy = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    named = f"{parts.scheme.upper()}_PROXY {redact_url(proxy_url)!r}"
    if not proxy.hostname or proxy.scheme not in ("http", "https") or (proxy.scheme == "https" and not tls):
        raise ConfigError(f"{named} must be http://host:port (a proxy this webhook reaches over plain HTTP)")
    proxy_port = _checked_port(proxy, named) or 80
    auth = {"Proxy-Authorization": _basic(proxy.username, proxy.password)} if proxy.username else {}
    return _Route(tls, host, port, path if tls else f"http://{netloc}{path}", (proxy.hostname, proxy_port),
                  auth, f" through the proxy {proxy.hostname}:{proxy_port}")


def webhook_auth(url: str, headers: dict[str, str]) -> dict[str, str]:
    """The headers given (``--webhook-header``) and, for a URL with a user and password, their
    ``Authorization: Basic`` (as curl sends them); both is a :class:`ConfigError`."""
    parts = urlsplit(url)
    if parts.username is None:
        return dict(headers)
    if any(name.lower() == "authorization" for name in headers):
        raise ConfigError(f"webhook URL {redact_url(url)!r} gives a user and password, and "
                          "--webhook-header an Authorization header: give one of them")
    return {**headers, "Authorization": _basic(parts.username, parts.password)}


def _drained(resp: http.client.HTTPResponse, deadline: float) -> bytes | None:
    """The rest of a short answer's body, read so that its connection can carry the next push
    (and a refusal can say why); None, leaving it, for one longer than 64 KiB or still coming at
    ``deadline`` (a stream's URL, whose body never ends, would hold the sink)."""
    body = b""
    while chunk := resp.read1(65536):
        body += chunk
        if len(body) > 65536 or time.monotonic() > deadline:
            return None
    resp.read()  # at its end: marks it read (read1 leaves a body of known length open at its end)
    return body


def _said(body: bytes, limit: int = 200) -> str:
    """What an endpoint's answer says, on one line: an HTML page's title (or its text), any
    other body as it is; at most ``limit`` characters."""
    text = body.decode("utf-8", "replace")
    if title := re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL):
        text = title.group(1)
    elif text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join("".join(" " if unprintable(c) else c for c in text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class WebhookSink:
    """POST each message as JSON to ``url``, over one kept connection (HTTP/1.1 keep-alive,
    through the environment's proxy when it names one); 2xx is success, anything else is
    retried (a redirect too: it is not followed, as a POST followed is a GET without the body):
    an answer about the receiver (:data:`RECEIVER_STATUSES`, no answer) as :class:`Unavailable`.
    A user and password in the URL are sent as HTTP Basic authentication. The response's body
    is read only when short (:func:`_drained`), else the connection is closed: its status is
    the answer."""

    name = "webhook"

    def __init__(self, url: str, *, timeout_s: float = 5.0, max_attempts: int = MAX_ATTEMPTS,
                 backoff_base_s: float = 1.0, backoff_cap_s: float = 60.0,
                 headers: dict[str, str] | None = None, secrets: Sequence[bytes] = (),
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 connections: int = 1) -> None:
        """``secrets``: sign each push with each key as Standard Webhooks does
        (:func:`webhook_secrets`), so a receiver can tell that diffqc sent it, unchanged and
        recently. ``client_cert`` (``--webhook-cert``, its key in it or ``client_key``): the
        certificate an https:// endpoint behind mutual TLS asks for, read at each connection
        (a renewed one is presented without a restart). ``connections`` (``--webhook-connections``):
        above 1, pushes go over that many kept connections at once (:meth:`_send_at_once`),
        their order of arrival not kept; 1 sends them one after another, in order."""
        self._route = _route(url)
        if max_attempts < 1:
            raise ConfigError(f"webhook max_attempts must be at least 1, got {max_attempts}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts: int | None = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.headers = webhook_auth(url, headers or {})
        if not any(name.lower() == "user-agent" for name in self.headers):  # as urllib sent one
            self.headers = {"User-Agent": f"diffqc/{__version__}", **self.headers}
        self.secrets = list(secrets)
        check_webhook_client_cert(url, client_cert, client_key)
        self.client_cert, self.client_key = client_cert, client_key
        if not 1 <= connections <= MAX_WEBHOOK_CONNECTIONS:
            raise ConfigError(f"webhook connections must be 1 to {MAX_WEBHOOK_CONNECTIONS}, "
                              f"got {connections}")
        self._conn: http.client.HTTPConnection | None = None
        # the delivery thread's way for more than one connection (Dispatcher.deliver_due)
        self.send_many: Callable[[Sequence[Message]], list[Exception | None]] | None = None
        self._lanes: list[WebhookSink] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # the lanes' threads, while sending
        if connections > 1:
            self._lanes = [copy.copy(self) for _ in range(connections)]  # each keeps a connection of its own
            self._free: queue.SimpleQueue[WebhookSink] = queue.SimpleQueue()
            for lane in self._lanes:
                self._free.put(lane)
            self.send_many = self._send_at_once

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._close()
        for lane in self._lanes:
            lane._close()

    def backoff(self, attempts: int) -> float:
        return _backoff(self.backoff_base_s, self.backoff_cap_s, attempts)

    def _send_at_once(self, messages: Sequence[Message]) -> list[Exception | None]:
        """Each message's outcome, sent over the kept connections at once, each on the first free
        one (so not in order). Once one finds the endpoint away (:class:`Unavailable`: a timeout,
        a refusal of every push), those not yet sent are not (:class:`NotSent`): a pass over an
        endpoint that answers nothing ends with the pushes under way, not every due one's timeout."""
        away = threading.Event()

        def one(message: Message) -> Exception | None:
            lane = self._free.get()
            try:
                if away.is_set():
                    return NotSent("not sent: the endpoint was found away")
                outcome = _outcome(lane, message)
                if isinstance(outcome, Unavailable):
                    away.set()
                return outcome
            finally:
                self._free.put(lane)

        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(len(self._lanes),
                                                               thread_name_prefix="diffqc-webhook")
        return list(self._pool.map(one, messages))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> http.client.HTTPConnection:
        """A new connection, made (TCP's, a proxy's ``CONNECT`` and TLS's handshakes): one not
        made within the timeout is the endpoint unreachable (no push went on it), not one it may
        have taken."""
        route = self._route
        host, port = route.proxy or (route.host, route.port)
        conn = (http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._tls())
                if route.tls else http.client.HTTPConnection(host, port, timeout=self.timeout_s))
        if route.tls and route.proxy is not None:
            conn.set_tunnel(route.host, route.port, headers=route.proxy_headers)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise Unavailable(f"webhook unreachable{route.shown}: no connection made within "
                              f"{self.timeout_s:g} s (--webhook-timeout)") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _tls(self) -> ssl.SSLContext:
        """The TLS settings of a new connection: the default trust (``SSL_CERT_FILE`` as it is
        now), HTTP/1.1 named, and the client certificate when one is given."""
        context = ssl.create_default_context()
        context.set_alpn_protocols(["http/1.1"])
        if self.client_cert is not None:
            key = None if self.client_key is None else str(self.client_key)
            context.load_cert_chain(str(self.client_cert), key)
        return context

    def _answer(self, body: bytes, headers: dict[str, str]) -> tuple[int, str | None, str | None, bytes]:
        """POST over the kept connection: the answer's status, ``Location``, ``Retry-After`` and
        body (read unless a success's on a connection that ends, or too long: then empty). A kept
        connection the endpoint has closed since (its idle timeout) is opened again, and a push
        it took as it closed is sent once more on the new one (the same Idempotency-Key)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            kept = self._conn is not None and not _closed_by_peer(self._conn)
            if not kept:
                self._close()
                self._conn = self._connect()
            conn = self._conn
            assert conn is not None
            try:
                conn.request("POST", self._route.target, body=body, headers=headers if self._route.tls
                             else {**headers, **(self._route.proxy_headers or {})})
                resp = conn.getresponse()
                status = resp.status
                said = None if resp.will_close and 200 <= status < 300 else _drained(resp, deadline)
                if resp.will_close or said is None:
                    self._close()
                return status, resp.getheader("Location"), resp.getheader("Retry-After"), said or b""
            except (OSError, http.client.HTTPException) as exc:  # a kept one closed under the push: again
                self._close()
                if not kept or isinstance(exc, TimeoutError):
                    raise
            except BaseException:
                self._close()
                raise

    def send(self, message: Message) -> None:
        key = message_key(message)
        body = message.payload.encode("utf-8")
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Diffqc-Kind": message.kind,
            **({"X-Diffqc-Record-Id": str(message.record_id)} if message.record_id is not None else {}),
            **(signature_headers(self.secrets, key, body) if self.secrets else {}),
        }
        try:
            status, location, wait, answer = self._answer(body, headers)
        except TimeoutError:  # sent, and no answer in time: the endpoint may have taken it
            raise Unavailable(f"webhook did not answer within {self.timeout_s:g} s (--webhook-timeout): it "
                              "may have taken the message, which is sent again (the same Idempotency-Key); "
                              "give a slow endpoint a longer --webhook-timeout") from None
        except ssl.SSLCertVerificationError as exc:
            hint = trust_hint("endpoint", exc, self._route.host)
            raise Unavailable(f"webhook unreachable{self._route.shown}: {exc}: {hint}") from None
        except (OSError, http.client.HTTPException) as exc:
            said = str(exc) or type(exc).__name__
            hint = self._client_hint(exc)
            raise Unavailable(f"webhook unreachable{self._route.shown}: {said}{hint}") from None
        if 200 <= status < 300:
            return
        error = Unavailable if status in RECEIVER_STATUSES else RuntimeError
        if 300 <= status < 400 and location:
            raise error(
                f"webhook answered {status}: a redirect to {redact_url(urljoin(self.url, location))}, "
                "not followed (the decision would arrive as a GET, without its body): give "
                "--webhook the URL it leads to")
        said = _said(answer)
        text = f"webhook answered {status}{': ' if said else ''}{said}"
        if error is Unavailable and (seconds := retry_after(wait, time.time())) is not None:
            raise Unavailable(f"{text}; it asks for the next try in {seconds:.0f} s (Retry-After)",
                              retry_after_s=seconds)
        raise error(text)

    def _client_hint(self, exc: BaseException) -> str:
        """What to do about an endpoint that refused the TLS client (mutual TLS). One that ends
        the connection may do so before its alert saying why arrives: then the likely why."""
        reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
        ended = isinstance(exc, ssl.SSLEOFError)
        if self.client_cert is None:
            if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE"):
                return (": the endpoint asks for a client certificate (mutual TLS): give --webhook-cert "
                        "(and --webhook-key)")
            return (": the endpoint ended the TLS connection: if it asks for a client certificate (mutual "
                    "TLS), give --webhook-cert (and --webhook-key)") if ended else ""
        if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                      "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
            return (": the endpoint does not trust the certificate --webhook-cert gives (have it signed by "
                    "the CA the endpoint trusts)")
        return (": the endpoint ended the TLS connection: if it does not trust the certificate "
                "--webhook-cert gives, have it signed by the CA the endpoint trusts") if ended else ""


def check_webhook_client_cert(url: str | None, cert: str | Path | None, key: str | Path | None) -> None:
    """``--webhook-cert`` (``--webhook-key``): for an https:// endpoint, a certificate and its
    key (:func:`~diffqc.service.security.check_tls`), checked before anything starts."""
    if cert is None and key is None:
        return
    if url is None or urlsplit(url).scheme != "https":
        raise ConfigError("--webhook-cert needs an https:// endpoint (a certificate is presented over TLS)")
    check_tls(cert, key, options="--webhook", doing="present a certificate to the webhook endpoint")


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """A kept connection the other end has closed (or sent on unasked) since its last answer."""
    sock = conn.sock
    return sock is None or bool(select.select([sock], [], [], 0)[0])


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    prefix: str
    tls: bool
    username: str | None
    password: str | None
    websocket_path: str | None = None  # MQTT over WebSockets (ws://, wss://): the path


def check_webhook_url(url: str) -> None:
    """The webhook URL's form; errors show it without its password."""
    parts = split_url(url, "webhook URL")
    shown = redact_url(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL {shown!r} must be http:// or https://host/...")
    _checked_port(parts, f"webhook URL {shown!r}")


def _checked_port(parts: SplitResult, named: str) -> int | None:
    """A URL's port (None when it names none), checked to be 1 to 65535 (urllib parses it only
    when asked, and takes 0)."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{named} has a bad port")
    return port


# the headers diffqc sets on every push itself (a receiver's deduplication and parsing rest on them)
OWN_HEADERS = ("Content-Type", "Idempotency-Key", "X-Diffqc-Kind", "X-Diffqc-Record-Id", "webhook-id",
               "webhook-timestamp", "webhook-signature")
WEBHOOK_SECRET_MIN_BYTES = 24  # Standard Webhooks: 24 to 64 bytes


def webhook_secrets(values: Sequence[str]) -> list[bytes]:
    """``--webhook-secret``'s keys (repeatable: a key being replaced and its successor, each push
    signed with both while receivers move over): each ``whsec_`` and base64 (the Standard
    Webhooks form, as the receiver's library or the MES generates it), or ``@FILE`` holding one
    a line (a Docker secret). A malformed or short one is a :class:`ConfigError` that never
    shows it."""
    how = ("make one: python -c \"import base64, secrets; print('whsec_' + "
           "base64.b64encode(secrets.token_bytes(32)).decode())\"")
    keys: list[bytes] = []
    for value in values:
        what, texts = "--webhook-secret", [value]
        if value.startswith("@"):
            what = f"--webhook-secret {value}"
            texts = [line for line in read_secret_file(value[1:], what).splitlines() if line.strip()]
            if not texts:
                raise ConfigError(f"{what} holds no key: {how}")
        for text in (t.strip().removeprefix("whsec_") for t in texts):
            try:
                key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except ValueError:
                raise ConfigError(f"{what} is not whsec_ and base64 (the Standard Webhooks form): "
                                  f"{how}") from None
            if len(key) < WEBHOOK_SECRET_MIN_BYTES:
                raise ConfigError(f"{what} holds {len(key)} bytes: a signing key needs at least "
                                  f"{WEBHOOK_SECRET_MIN_BYTES}: {how}")
            keys.append(key)
    return keys


def signature_headers(secrets: Sequence[bytes], message_id: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks' headers of one push (https://www.standardwebhooks.com): ``webhook-id``
    (the message's key, the same on every retry), ``webhook-timestamp`` (this attempt's, epoch
    seconds) and ``webhook-signature`` (``v1,`` and base64 of HMAC-SHA256 over
    ``id.timestamp.body``, one such with each key, space-separated), which its receiver
    libraries verify (a receiver holding either key accepts)."""
    stamp = str(int(time.time()))
    signed = f"{message_id}.{stamp}.".encode() + body
    signatures = ["v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
                  for key in secrets]
    return {"webhook-id": message_id, "webhook-timestamp": stamp, "webhook-signature": " ".join(signatures)}


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110's token


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def webhook_headers(items: Sequence[str]) -> dict[str, str]:
    """``--webhook-header`` values as headers: ``Name: value``, or ``@FILE`` whose lines are
    such headers (curl's ``-H @file``: a token kept in a secret file, not on the command line).
    A malformed one is a :class:`ConfigError` that names its place, never its value (a
    secret); diffqc's own headers (:data:`OWN_HEADERS`) are not replaced."""
    headers: dict[str, str] = {}
    for i, item in enumerate(items, 1):
        where, lines = f"--webhook-header {i}", [item]
        if item.startswith("@"):
            lines = read_secret_file(item[1:], f"--webhook-header {item}").splitlines()
        for n, line in enumerate(lines, 1):
            if item.startswith("@") and not line.strip():
                continue
            name, colon, value = line.partition(":")
            name, value = name.strip(), value.strip()
            if not colon or not _HEADER_NAME.match(name) or "\r" in value or "\n" in value:
                place = f"line {n} of {item}" if item.startswith("@") else where
                raise ConfigError(f"{place} is not 'Name: value' (a header such as "
                                  "'Authorization: Bearer TOKEN')")
            if not _latin1(value):  # http.client sends Latin-1 only
                place = f"line {n} of {item}" if item.startswith("@") else where
                raise ConfigError(f"{place} holds a character HTTP headers cannot carry (not Latin-1: "
                                  "a dash or quote pasted from a document?)")
            own = next((h for h in OWN_HEADERS if h.lower() == name.lower()), None)
            if own is not None:
                raise ConfigError(f"{where}: {own} is set by diffqc on every push")
            headers[name] = value
    return headers


def check_mqtt_client_cert(url: str | None, cert: str | Path | None, key: str | Path | None) -> None:
    """``--mqtt-cert`` (``--mqtt-key``): for an mqtts:// broker, a certificate and its key
    (:func:`~diffqc.service.security.check_tls`), checked before anything starts."""
    if cert is None and key is None:
        return
    if url is None or not parse_mqtt_url(url).tls:
        raise ConfigError("--mqtt-cert needs an mqtts:// (or wss://) broker URL (a certificate is presented "
                          "over TLS)")
    check_tls(cert, key, options="--mqtt", doing="present a certificate to the MQTT broker")


def check_sink_urls(mqtt_url: str | None, webhook_url: str | None) -> None:
    """The push targets as given, checked before the service loads its model (a typo is one
    line, not a failed application start): the URLs' form, and paho-mqtt for MQTT."""
    if mqtt_url:
        parse_mqtt_url(mqtt_url)
        _paho()
    if webhook_url:
        _route(webhook_url)  # the environment's proxy for it too


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:  # depends on the install
        raise ConfigError("MQTT needs paho-mqtt: pip install 'diffqc[serve]'") from exc
    return mqtt


MQTT_PASSWORD_FILE_ENV = "DIFFQC_MQTT_PASSWORD_FILE"  # the broker password, kept off the command line
_MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}  # an MQTT URL's schemes, default ports


_PAHO_SCHEMES = {"tcp": "mqtt", "ssl": "mqtts"}  # Paho's Java and C clients' names for them


def _mqtt_url_meant(shown: str) -> str:
    """The MQTT URL a refused one likely meant: Paho's ``tcp://``/``ssl://`` written as
    ``mqtt://``/``mqtts://``, a bare ``host:port`` as ``mqtt://host:port``; else ``""``."""
    scheme, sep, rest = shown.partition("://")
    if sep and scheme.lower() in _PAHO_SCHEMES:
        ours = _PAHO_SCHEMES[scheme.lower()]
        return f": {scheme}://, as Paho's Java and C clients write it, is {ours}:// here: {ours}://{rest}"
    if not sep and shown and ":/" not in shown and not any(c.isspace() for c in shown):
        return f": write it as a URL: mqtt://{shown}"
    return ""


def parse_mqtt_url(url: str) -> MqttTarget:
    """``mqtt://[user[:password]@]host[:port][/prefix]`` (``mqtts://`` for TLS); MQTT over
    WebSockets (a broker reached through an HTTPS port only) as the broker gives its URL,
    ``wss://[user@]host[:port][/path][?prefix=PREFIX]`` (``ws://`` without TLS; the path
    ``/mqtt`` when none). Without a password in the URL, the file
    ``$DIFFQC_MQTT_PASSWORD_FILE`` names holds the user's (a Docker secret: a URL's password is
    read by anyone who may run ``ps``). Errors show the URL without its password."""
    parts = split_url(url, "MQTT URL")
    shown = redact_url(url)
    if parts.scheme not in _MQTT_PORTS or not parts.hostname:
        raise ConfigError(f"MQTT URL {shown!r} must look like mqtt://host:1883/prefix (or mqtts://; over "
                          f"WebSockets, wss://host/mqtt?prefix=PREFIX){_mqtt_url_meant(shown)}")
    tls = parts.scheme in ("mqtts", "wss")
    websocket_path = None
    if parts.scheme in ("ws", "wss"):  # the path is the WebSocket's: the prefix is a parameter
        query = parse_qs(parts.query.replace("+", "%2B"), keep_blank_values=True)  # a '+' is one
        if unknown := sorted(set(query) - {"prefix"}):
            raise ConfigError(f"MQTT URL {shown!r} takes no query parameter {unknown[0]!r} (only prefix=, "
                              "the topic prefix)")
        websocket_path = parts.path or "/mqtt"
        prefix = (query.get("prefix") or [""])[-1].strip("/") or "diffqc"
    else:
        if parts.query:  # wss://'s ?prefix= form: dropped here, the decisions went elsewhere
            raise ConfigError(f"MQTT URL {shown!r} takes no query (?{parts.query}): its topic prefix is "
                              f"its path, {parts.scheme}://{parts.netloc.rpartition('@')[2]}/"
                              f"{(parse_qs(parts.query).get('prefix') or ['PREFIX'])[-1].strip('/')}")
        prefix = parts.path.strip("/") or "diffqc"
    if any(c in prefix for c in "+#") or parts.fragment or "#" in url:  # '#' ends a URL's path
        raise ConfigError(f"MQTT topic prefix of {shown!r} may not contain '+' or '#'")
    if any(unprintable(c) for c in prefix):  # MQTT forbids U+0000 in a topic; the rest, a typo
        raise ConfigError(f"MQTT topic prefix {prefix!r} may not hold a control character")
    port = _checked_port(parts, f"MQTT URL {shown!r}") or _MQTT_PORTS[parts.scheme]
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if password is None and (path := os.environ.get(MQTT_PASSWORD_FILE_ENV)):
        if user is None:
            raise ConfigError(f"{MQTT_PASSWORD_FILE_ENV} needs the user name in the MQTT URL "
                              f"(mqtt://USER@{parts.hostname}/...)")
        password = read_secret_file(path, f"{MQTT_PASSWORD_FILE_ENV} {path}").strip("\r\n")
    return MqttTarget(parts.hostname, port, prefix, tls, user, password, websocket_path)


class MqttSink:
    """Publish with QoS 1 through paho-mqtt; a message counts as sent on the broker's PUBACK.

    MQTT 5, whose PUBACK says whether the broker took the message: a broker's access list that
    does not let the user publish to the prefix refuses each (``Not authorized``), where MQTT
    3.1.1 acknowledges it and drops it, so a decision was counted delivered and lost. Until a
    broker has accepted a connection, one it ends unaccepted (a 3.1.1 broker refuses version 5,
    or, not all as the standard says, closes or stalls) is tried again with the other version;
    one accepted with 3.1.1 is said once."""

    name = "mqtt"
    max_attempts: int | None = None

    def __init__(self, url: str, *, client_id: str | None = None, keepalive_s: int = 30,
                 publish_timeout_s: float = 5.0, client_cert: str | Path | None = None,
                 client_key: str | Path | None = None) -> None:
        """``client_cert`` (``--mqtt-cert``, its key in it or ``client_key``): the certificate
        presented to a broker that lets in only clients its CA signed (mqtts:// only)."""
        mqtt = _paho()
        self._mqtt = mqtt
        self.target = parse_mqtt_url(url)
        self.url = url
        self.prefix = self.target.prefix
        self.publish_timeout_s = publish_timeout_s
        self.keepalive_s = keepalive_s
        self.status_topic = f"{self.prefix}/status"
        self._connected = threading.Event()
        websocket = self.target.websocket_path is not None
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                             client_id=client_id or f"diffqc-{uuid.uuid4().hex[:12]}",
                             transport="websockets" if websocket else "tcp")
        if websocket:
            client.ws_set_options(path=self.target.websocket_path)
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        check_mqtt_client_cert(url, client_cert, client_key)
        if self.target.tls:
            client.tls_set(certfile=None if client_cert is None else str(client_cert),
                           keyfile=None if client_key is None else str(client_key))
        self._retain = True  # until a broker keeps no retained messages (MQTT 5 says so)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._refused: dict[int, str] = {}  # a publish's message id -> why the broker refused it
        self._said: set[str] = set()  # why connections failed since the last one that worked
        self._accepted = False  # a broker accepted a connection (its MQTT version is kept)
        self._stopping = False  # stop()'s own disconnect is not an outage to log
        self._max_packet: int | None = None  # the broker's Maximum Packet Size (its CONNACK)
        self.client_id = client_id
        self._window = MAX_IN_FLIGHT - 1  # messages sent at once (the broker's CONNACK may say fewer)
        self._connected_at = 0.0  # monotonic, of the latest connection
        self._short = 0  # connections in a row the broker ended within SHORT_LIVED_S

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        refused = getattr(reason, "is_failure", False)
        no_retain = getattr(reason, "value", None) == RETAIN_NOT_SUPPORTED
        if no_retain or getattr(props, "RetainAvailable", 1) == 0:
            self._no_retain(client)  # refused for the will's retain flag: the next try has none
        elif refused and str(reason) != "Unsupported protocol version":  # the next try speaks the other
            self._failed(f"refused the connection: {reason}")  # a wrong password: at every retry
        if refused:
            return
        if not self._accepted and client.protocol != self._mqtt.MQTTv5:
            log.warning("MQTT broker %s:%s speaks MQTT 3.1.1, not 5: a message it refuses (its access "
                        "list) is acknowledged as taken, and counted delivered", self.target.host,
                        self.target.port)
        self._accepted = True
        self._max_packet = getattr(props, "MaximumPacketSize", None)  # MQTT 5 only
        # messages sent unacknowledged at once: paho's 20, fewer where the broker takes fewer (MQTT
        # 5's Receive Maximum: more is a protocol error that ends the connection), one kept for the status
        self._window = max(1, min(MAX_IN_FLIGHT, int(getattr(props, "ReceiveMaximum", MAX_IN_FLIGHT))) - 1)
        with contextlib.suppress(OSError, AttributeError):  # a window's packets not held back (Nagle)
            client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.publish(self.status_topic, "online", qos=1, retain=self._retain)
        self._said.clear()  # a later outage is said again
        self._connected_at = time.monotonic()
        self._connected.set()
        if self._short == 0:  # not each time in a run of connections the broker ends at once
            log.info("MQTT connected to %s:%s", self.target.host, self.target.port)

    def _no_retain(self, client: Any) -> None:
        """A broker that keeps no retained messages refuses a retained will or publish (MQTT 5):
        the status, its will and the alarms go without the retain flag from now on."""
        if self._retain:
            self._retain = False
            client.will_set(self.status_topic, "offline", qos=1, retain=False)
            log.warning("MQTT broker %s:%s keeps no retained messages: the status and drift alarms are "
                        "published without the retain flag (a subscriber that comes later does not get "
                        "the latest)", self.target.host, self.target.port)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        """paho retries a connection that fails (refused, a TLS handshake) in silence, and calls
        this from the ``except`` that caught it: each reason is logged once (not every retry)."""
        exc = sys.exc_info()[1]
        reason = str(exc or "the connection failed")
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason += f": {trust_hint('broker', exc, self.target.host)}"
        self._failed(f"unreachable: {reason}")

    def _failed(self, said: str) -> None:
        """Each reason a connection fails for is logged once, not at every retry."""
        if said not in self._said:
            self._said.add(said)
            log.warning("MQTT broker %s:%s %s (retrying; decisions wait in the outbox)",
                        self.target.host, self.target.port, said)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set() and not self._stopping:
            short = time.monotonic() - self._connected_at < SHORT_LIVED_S
            if not short or self._short == 0:  # a connection ended within seconds again: said below
                log.warning("MQTT broker %s:%s disconnected: %s", self.target.host, self.target.port, reason)
            self._short = self._short + 1 if short else 0
            if self._short == 3:
                twin = (f": does another client connect with client id {self.client_id!r} (--mqtt-client-id "
                        "given to two services)? Each takes the connection from the other"
                        if self.client_id else "")
                log.warning("MQTT broker %s:%s ends this connection within seconds of making it, 3 times in "
                            "a row (%s); said again once a connection lasts%s", self.target.host,
                            self.target.port, reason, twin)
        self._connected.clear()
        if not self._accepted and not self._stopping:
            # paho reconnects with the version set here (it has no setter); 3.1.1's session
            # clean, as MQTT 5's is by the connect's clean_start
            v5 = client.protocol == self._mqtt.MQTTv5
            client._protocol, client._clean_session = (self._mqtt.MQTTv311 if v5 else self._mqtt.MQTTv5), True

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        """Called before the publish counts as done: :meth:`send` then reads why it was refused
        (an id is reused after 65,535 publishes: a refusal nobody read, the status's, is dropped)."""
        if getattr(reason, "is_failure", False):
            self._refused[mid] = str(reason)
        else:
            self._refused.pop(mid, None)

    def start(self) -> None:
        self._client.connect_async(self.target.host, self.target.port, keepalive=self.keepalive_s,
                                   clean_start=True)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        if self._connected.is_set():
            try:
                info = self._client.publish(self.status_topic, "offline", qos=1, retain=self._retain)
                info.wait_for_publish(timeout=2.0)
            except Exception:  # the broker went away meanwhile: the last will says it
                pass
        self._client.disconnect()
        self._client.loop_stop()

    def ready(self) -> bool:
        return self._connected.is_set()

    def backoff(self, attempts: int) -> float:
        return _backoff(0.5, 5.0, attempts)

    def topic(self, message: Message) -> str:
        level = {ALARM: "alarms", PART: "parts"}.get(message.kind, "decisions")
        return f"{self.prefix}/{level}/{message.topic_key}"

    def send(self, message: Message) -> None:
        if (error := self.send_many([message])[0]) is not None:
            raise error

    def send_many(self, messages: Sequence[Message]) -> list[Exception | None]:
        """Publish ``messages`` with a window of them on the way at once (the broker's Receive
        Maximum, less one), the next sent as the oldest's acknowledgement comes back: one at a
        time, each waited for before the next, a broker a round trip of 50 ms away took 19 a
        second. Each one's outcome, in order: None when the broker took it, else why not (as
        :meth:`send` raises it)."""
        out: list[Exception | None] = [None] * len(messages)
        on_the_way: collections.deque[tuple[int, str, Any, float]] = collections.deque()

        def settle() -> None:  # the oldest on its way: acknowledged, refused or timed out
            i, topic, info, deadline = on_the_way.popleft()
            out[i] = self._acknowledged(topic, info, deadline)

        for i, message in enumerate(messages):
            if len(on_the_way) >= self._window:  # the window full: the next goes as one comes back
                settle()
            try:
                topic, info = self._publish(message)
            except Exception as exc:
                out[i] = exc
                continue
            on_the_way.append((i, topic, info, time.monotonic() + self.publish_timeout_s))
        while on_the_way:
            settle()
        return out

    def _publish(self, message: Message) -> tuple[str, Any]:
        if not self._connected.is_set():
            raise RuntimeError("MQTT broker not connected")
        topic, payload = self.topic(message), message.payload.encode()
        size = publish_size(topic, payload, v5=self._client.protocol == self._mqtt.MQTTv5)
        if self._max_packet is not None and size > self._max_packet:
            # sent, it would end the connection, and paho would send it again at each reconnect
            raise Refused(f"MQTT message on {topic} is {size} bytes: the broker takes packets of up "
                          f"to {self._max_packet} bytes (its max_packet_size)")
        info = self._client.publish(topic, payload, qos=1, retain=message.kind == ALARM and self._retain)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"MQTT publish failed: {self._mqtt.error_string(info.rc)}")
        return topic, info

    def _acknowledged(self, topic: str, info: Any, deadline: float) -> Exception | None:
        try:
            info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            return RuntimeError(f"MQTT publish failed: {exc}")
        if not info.is_published():
            return RuntimeError("MQTT broker did not acknowledge the message in time")
        if (refused := self._refused.pop(info.mid, None)) is not None:
            return Refused(f"MQTT broker refused the message on {topic}: {refused} "
                           "(does its access list let this user publish there?)")
        return None


def publish_size(topic: str, payload: bytes, *, v5: bool) -> int:
    """Bytes of a QoS 1 PUBLISH packet without properties, as MQTT 5's Maximum Packet Size
    counts them: fixed header, topic, message id, (MQTT 5) property length, payload (Mosquitto
    2.0 leaves out the remaining length's bytes, so it takes up to 3 more: this side is safe)."""
    remaining = 2 + len(topic.encode()) + 2 + (1 if v5 else 0) + len(payload)
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining


# --------------------------------------------------------------------------- delivery
def _outcome(sink: Sink, message: Message) -> Exception | None:
    """One message sent: None when the receiver took it, else why not."""
    try:
        sink.send(message)
    except Exception as exc:
        return exc
    return None


class Dispatcher:
    """One delivery thread per sink over one :class:`Outbox`."""

    def __init__(self, outbox: Outbox, sinks: Sequence[Sink], *, poll_s: float = 0.5) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names) or tuple(names) != outbox.sinks:
            raise ConfigError(f"sinks {names} do not match the outbox's {list(outbox.sinks)}")
        self.outbox = outbox
        self.sinks = list(sinks)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.delivered_total: dict[str, int] = {s.name: 0 for s in sinks}
        self.failures_total: dict[str, int] = {s.name: 0 for s in sinks}
        # a receiver refusing is said as it starts (not at the first dead letter, minutes on), once
        self.outages = {s.name: Outage(
            log, f"sink {s.name}: cannot deliver",
            f"sink {s.name}: delivering again; failed attempts meanwhile: %d, over %.0f s") for s in sinks}
        # the store itself down (its outbox unreadable): said once, and once when it is back
        self.outbox_outages = {s.name: Outage(
            log, f"sink {s.name}: cannot read the outbox",
            f"sink {s.name}: the outbox can be read again; reads failed meanwhile: %d, over %.0f s",
            level=logging.WARNING) for s in sinks}
        self.dead_total: dict[str, int] = {s.name: 0 for s in sinks}
        self._away: dict[str, int] = {s.name: 0 for s in sinks}  # failures in a row of an away receiver
        self.last_error: dict[str, str | None] = {s.name: None for s in sinks}

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()
            thread = threading.Thread(target=self._run, args=(sink,), name=f"diffqc-sink-{sink.name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.outbox.wakeup.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        for sink in self.sinks:
            try:
                sink.stop()
            except Exception:
                log.exception("stopping sink %s", sink.name)

    def notify(self, *_: object) -> None:
        """Something was committed: look at the outbox now (a pipeline listener)."""
        self.outbox.wakeup.set()

    def _wait(self, seconds: float) -> None:
        self.outbox.wakeup.wait(seconds)
        self.outbox.wakeup.clear()

    def _run(self, sink: Sink) -> None:
        while not self._stop.is_set():
            try:
                idle = self.deliver_due(sink)
            except Exception as exc:  # the store itself is down: try again later, said once
                self.last_error[sink.name] = str(exc)
                self.outbox_outages[sink.name].failed(f"{exc}; trying again every {self.poll_s:g} s")
                idle = True
            else:
                self.outbox_outages[sink.name].worked()
            if idle:
                self._wait(self.poll_s)

    def deliver_due(self, sink: Sink) -> bool:
        """Send what is due, in order, stopping at the first failure; True when idle. A sink
        that sends many at once (``send_many``: MQTT's in-flight window, the webhook's
        connections) has each one's outcome kept: those the receiver took are delivered, a failed
        one waits (a receiver away: each of its messages backs off, the sink's away count once)."""
        if not sink.ready():
            return True
        due = self.outbox.due(sink.name, time.time())
        send_many = getattr(sink, "send_many", None)
        outcomes = send_many(due) if send_many is not None and due else None
        away = False  # the receiver was away for a message of this pass
        for i, message in enumerate(due):
            if self._stop.is_set():
                return True
            exc = outcomes[i] if outcomes is not None else _outcome(sink, message)
            if isinstance(exc, NotSent):  # due again at the next pass
                continue
            if exc is not None:
                error = str(exc) or type(exc).__name__
                self.failures_total[sink.name] += 1
                self.last_error[sink.name] = error
                self.outages[sink.name].failed(f"{error} (retrying; messages wait in the outbox)")
                if isinstance(exc, Unavailable):  # backing off by the sink's failures, not the message's
                    if not away:  # once a pass; and for as long as the receiver asked (Retry-After)
                        self._away[sink.name] += 1
                        away = True
                    wait = max(sink.backoff(self._away[sink.name]), exc.retry_after_s or 0.0)
                    self.outbox.failed(message, error, time.time() + wait, attempt=False)
                    if outcomes is None:  # the later ones were not sent
                        return True
                    continue
                limit = sink.max_attempts or (MAX_ATTEMPTS if isinstance(exc, Refused) else None)
                if limit is not None and message.attempts + 1 >= limit:
                    log.error("sink %s: message %s (record %s) dead-lettered after %d attempts: %s",
                              sink.name, message.id, message.record_id, message.attempts + 1, error)
                    self.outbox.dead_letter(message, error)
                    self.dead_total[sink.name] += 1
                    continue
                self.outbox.failed(message, error, time.time() + sink.backoff(message.attempts + 1))
                if outcomes is None:  # the later ones were not sent
                    return True
                continue
            self.outbox.delivered(message)
            self.delivered_total[sink.name] += 1
            if not away:
                self._away[sink.name] = 0
                self.outages[sink.name].worked()
                self.last_error[sink.name] = None
        return away or len(due) == 0

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for sink in self.sinks:
            out[sink.name] = {  # a webhook is tried whenever due: away, it is not ready
                "ready": sink.ready() and not self._away[sink.name],
                "pending": self.outbox.pending(sink.name),
                "dead_letters": self.outbox.dead(sink.name),
                "delivered_total": self.delivered_total[sink.name],
                "failures_total": self.failures_total[sink.name],
                "last_error": self.last_error[sink.name],
            }
        return out

    def metrics_lines(self) -> list[str]:
        """Prometheus text lines (same style as :class:`diffqc.service.app.Metrics`)."""
        status = self.status()
        out: list[str] = []
        for name, kind, text, key in (
            ("diffqc_sink_up", "gauge", "1 when the sink's receiver is reachable.", "ready"),
            ("diffqc_sink_pending", "gauge", "Messages waiting in the outbox.", "pending"),
            ("diffqc_sink_dead_letters", "gauge", "Messages that exhausted their retries.", "dead_letters"),
            ("diffqc_sink_delivered_total", "counter", "Messages acknowledged by the receiver.",
             "delivered_total"),
            ("diffqc_sink_failures_total", "counter", "Failed delivery attempts.", "failures_total"),
        ):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for sink, row in status.items():
                out.append(f'{name}{{sink="{sink}"}} {int(row[key])}')
        return out


def build_sinks(mqtt_url: str | None, webhook_url: str | None, *, mqtt_cert: str | Path | None = None,
                mqtt_key: str | Path | None = None, mqtt_client_id: str | None = None,
                **webhook_opts: Any) -> list[Sink]:
    """The sinks a service is configured with (none, MQTT, webhook or both)."""
    sinks: list[Sink] = []
    if mqtt_url:
        sinks.append(MqttSink(mqtt_url, client_id=mqtt_client_id, client_cert=mqtt_cert, client_key=mqtt_key))
    if webhook_url:
        sinks.append(WebhookSink(webhook_url, **webhook_opts))
    return sinks
