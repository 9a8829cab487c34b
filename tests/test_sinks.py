"""Push sinks: the durable outbox, the webhook sink against a real local HTTP server and the
MQTT sink against a real Mosquitto broker (marker ``mqtt``: DIFFQC_TEST_MQTT_URL, started by
``scripts/start_mosquitto.sh``; the broker stop/start test runs its own ``mosquitto``)."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from diffqc.errors import ConfigError
from diffqc.service.parts import OverdueParts
from diffqc.service.sinks import (
    DEAD_LETTERS,
    OUTBOX,
    OWN_HEADERS,
    Dispatcher,
    MqttSink,
    Outbox,
    Unavailable,
    WebhookSink,
    check_sink_urls,
    message_key,
    parse_mqtt_url,
    webhook_headers,
    webhook_secrets,
)
from diffqc.service.store import ResultRecord, ResultStore
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    detector,
    running_app,
    samples,
    service_model,
)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def record(i: int, decision: str = "REJECT", ftype: str = "stripes", key: str | None = None) -> ResultRecord:
    return ResultRecord(created_at=time.time(), source="test", decision=decision, part_id=f"p{i}",
                        feature_type=ftype, score=1.0 + i, p_value=0.001, dedup_key=key)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    with ResultStore(str(tmp_path / "results.db")) as s:
        yield s


def outbox_for(store: ResultStore, *sinks: str) -> Outbox:
    box = Outbox(store, sinks)
    store.insert_hooks.append(box.enqueue_records)
    return box


# --------------------------------------------------------------------------- a real HTTP receiver
class Receiver:
    """A webhook receiver on 127.0.0.1 that answers ``status`` (503) to its first ``fail_first``
    requests (or all, ``always_fail``). ``keep_alive``: it speaks HTTP/1.1 and keeps a connection
    open between requests (as nginx, uvicorn and IIS do), and with ``drop_every`` closes it after
    every that many requests without saying so (an idle timeout's close, racing the next push);
    ``peers`` is each request's client address."""

    def __init__(self, fail_first: int = 0, port: int = 0, always_fail: bool = False,
                 tls: Any = None, status: int = 503, keep_alive: bool = False, drop_every: int = 0,
                 client_ca: Any = None, answer: bytes = b"",
                 answer_headers: dict[str, str] | None = None, delay_s: float = 0.0,
                 fail_once: Collection[int] = ()) -> None:
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.status = status
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.raw: list[bytes] = []  # each request's body as received (a signature covers it)
        self.peers: list[tuple[str, int]] = []
        self.paths: list[str] = []  # each request's target as it arrived
        self.in_flight = self.most_in_flight = 0  # requests being answered at once (each ``delay_s``)
        self.fail_once = set(fail_once)  # record ids whose first push is answered ``status``
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with outer.lock:
                    outer.in_flight += 1
                    outer.most_in_flight = max(outer.most_in_flight, outer.in_flight)
                time.sleep(delay_s)
                with outer.lock:
                    outer.in_flight -= 1
                    n = len(outer.requests)
                    outer.raw.append(raw)
                    outer.peers.append(self.client_address)
                    outer.paths.append(self.path)
                    if drop_every and (n + 1) % drop_every == 0:
                        self.close_connection = True  # after this answer, with no "Connection: close"
                    once = body.get("record_id") in outer.fail_once
                    outer.fail_once.discard(body.get("record_id"))
                    status = outer.status if outer.always_fail or n < outer.fail_first or once else 200
                    outer.requests.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                for name, value in (answer_headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:  # a trustme certificate: answer over HTTPS
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.configure_cert(context)
            if client_ca is not None:  # mutual TLS: only a client with a certificate this CA signed
                context.verify_mode = ssl.CERT_REQUIRED
                client_ca.configure_trust(context)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered_ids(self) -> list[int]:
        """Record ids of the decisions delivered, in order (alarms, which carry none, interleave)."""
        with self.lock:
            return [body["record_id"] for status, _, body in self.requests
                    if status == 200 and body.get("kind") == "decision"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- outbox
def test_outbox_row_is_written_in_the_records_transaction(store: ResultStore) -> None:
    box = outbox_for(store, "webhook", "mqtt")
    stored = store.insert_many([record(1), record(2, "PASS", "dots")])
    assert box.pending("webhook") == 2 and box.pending("mqtt") == 2
    due = box.due("webhook", time.time())
    assert [m.record_id for m in due] == [r.id for r in stored]
    assert [m.topic_key for m in due] == ["stripes", "dots"]
    payload = json.loads(due[0].payload)
    assert payload["record_id"] == stored[0].id and payload["decision"] == "REJECT"
    # a batch that fails to commit leaves neither records nor outbox rows
    bad = record(3)
    bad.source = None  # type: ignore[assignment]  # NOT NULL column: the insert fails
    with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error, wrapped or not
        store.insert_many([record(4), bad])
    assert store.count() == 2 and box.pending("webhook") == 2


def push_parts_contract(store: ResultStore) -> None:
    """``--push-parts``: after each commit, a part's verdict from its stored images (those of
    earlier commits too), once per part, in the same transaction; nothing without it (also run
    against PostgreSQL)."""
    store.insert_hooks.clear()
    box = Outbox(store, ["hook-parts"], parts="each", types=["edge", "dots"])
    store.insert_hooks.append(box.enqueue_records)

    def crop(part: str, ftype: str, decision: str) -> ResultRecord:
        return ResultRecord(created_at=time.time(), source="test", decision=decision, part_id=part,
                            feature_type=ftype, type_known=True, line="L1")

    first = store.insert_many([crop("A/1", "edge", "PASS"), crop("A/1", "dots", "REVIEW"),
                               crop("B", "edge", "PASS"),
                               ResultRecord(created_at=time.time(), source="test", decision="PASS")])
    due = box.due("hook-parts", time.time())
    assert [m.kind for m in due] == ["decision"] * 4 + ["part", "part"]
    parts = [json.loads(m.payload) for m in due[4:]]
    assert [(p["part_id"], p["decision"], p["images"], p["record_id"]) for p in parts] == [
        ("A/1", "REVIEW", 2, first[1].id), ("B", "PASS", 1, first[2].id)]
    assert parts[0]["types"] == {"edge": "PASS", "dots": "REVIEW"} and parts[0]["line"] == "L1"
    assert [(p["complete"], p["missing"]) for p in parts] == [(True, []), (False, ["dots"])]
    assert due[4].topic_key == "A_1"  # one MQTT topic level
    again = store.insert(crop("A/1", "dots", "PASS"))  # the flagged crop sent again, a commit later
    part = json.loads(box.due("hook-parts", time.time(), limit=100)[-1].payload)
    assert (part["decision"], part["images"], part["superseded"]) == ("PASS", 2, 1)
    assert part["record_id"] == again.id
    store.insert_hooks.clear()
    plain = outbox_for(store, "plain")  # without --push-parts: decisions only
    store.insert(crop("A/1", "edge", "PASS"))
    assert [m.kind for m in plain.due("plain", time.time())] == ["decision"]
    # --push-parts complete: a part once each of its types came, not its crops before
    store.insert_hooks.clear()
    done = Outbox(store, ["hook-done"], parts="complete", types=["edge", "dots"])
    store.insert_hooks.append(done.enqueue_records)
    store.insert(crop("C", "edge", "PASS"))
    last = store.insert(crop("C", "dots", "PASS"))
    pushed = [json.loads(m.payload) for m in done.due("hook-done", time.time()) if m.kind == "part"]
    assert [(p["part_id"], p["complete"], p["record_id"]) for p in pushed] == [("C", True, last.id)]
    with pytest.raises(ValueError, match="parts must be one of each, complete"):
        Outbox(store, ["x"], parts="yes")
    # --part-timeout: a part still incomplete that long after its latest image is pushed once,
    # as it stands (`overdue`), so a MES hears of each part: complete, or overdue
    store.insert_hooks.clear()
    late = Outbox(store, ["hook-late"], parts="complete", types=["edge", "dots"])
    late.overdue = OverdueParts(store, 30.0, ["edge", "dots"])  # noted from the outbox's verdicts
    store.insert_hooks.append(late.enqueue_records)
    half = store.insert(crop("D", "edge", "REVIEW"))  # its dots never comes
    store.insert(crop("E", "edge", "PASS"))
    store.insert(crop("E", "dots", "PASS"))  # complete in time: pushed as complete, never overdue
    assert late.overdue.sweep(half.created_at + 29.0) == []  # not overdue yet
    ((verdict, latest),) = late.overdue.sweep(half.created_at + 31.0)
    assert late.overdue.sweep(half.created_at + 3600.0) == []  # once
    assert late.overdue.lacking == {"dots": 1} and late.overdue.overdue_total == 1
    late.enqueue_overdue(verdict, latest)
    rows = late.due("hook-late", time.time() + 60, limit=100)
    pushed = [json.loads(m.payload) for m in rows if m.kind == "part"]
    assert [(p["part_id"], p["complete"], p["overdue"]) for p in pushed] == [("E", True, False),
                                                                               ("D", False, True)]
    assert pushed[1]["missing"] == ["dots"] and pushed[1]["decision"] == "REVIEW"
    assert pushed[1]["record_id"] == half.id


def test_push_parts_writes_each_parts_verdict_with_its_images(store: ResultStore) -> None:
    push_parts_contract(store)


def test_an_overdue_part_reaches_a_webhook_as_a_message_of_its_own(store: ResultStore) -> None:
    """With ``--push-parts`` (each) a part's verdict after its latest crop and its overdue
    verdict later name the same latest record: a receiver dropping repeats by their
    Idempotency-Key (or Standard Webhooks' webhook-id) must not take the second for a repeat."""
    from diffqc.service.sinks import WebhookSink

    box = Outbox(store, ["webhook"], parts="each", types=["edge", "dots"])
    box.overdue = OverdueParts(store, 1.0, ["edge", "dots"])
    store.insert_hooks.append(box.enqueue_records)
    rec = store.insert(ResultRecord(created_at=time.time(), source="test", decision="PASS", part_id="F",
                                    feature_type="edge", type_known=True))
    for verdict, latest in box.overdue.sweep(rec.created_at + 2.0):
        box.enqueue_overdue(verdict, latest)
    receiver = Receiver()
    try:
        sink = WebhookSink(receiver.url, secrets=[b"k" * 32])
        for message in box.due("webhook", time.time() + 60):
            sink.send(message)
    finally:
        receiver.close()
    parts = [(body, {k.lower(): v for k, v in headers.items()}) for _, headers, body in receiver.requests
             if body["kind"] == "part"]
    assert [(p["overdue"], p["record_id"]) for p, _ in parts] == [(False, rec.id), (True, rec.id)]
    for header in ("idempotency-key", "webhook-id"):
        assert parts[0][1][header] != parts[1][1][header], header


def test_services_sharing_a_store_each_deliver_only_their_stations_messages(tmp_path: Path) -> None:
    stations_kept_apart(str(tmp_path / "shared.db"))


def stations_kept_apart(db: str) -> None:
    """Two stations' services on one store (a plant's PostgreSQL), each with its own webhook:
    the outbox was one queue per sink name, so station B's decisions waited behind station A's
    while A's endpoint was down (B's up), and were B's to send to its endpoint. Each service's
    messages are now its ``--station``'s: B's arrive while A's wait, none of A's reach B, and
    each counts, dead-letters and requeues its own. A message waiting in an outbox made before
    (no station column) is its record's station's (a diffqc before 9f9a463 given ``--station A``
    queued it: after the upgrade no service sent it, and none counted it), or, without a record
    of a station, a service's without ``--station``, as it was."""
    with ResultStore(db) as store:
        a_old, none_old = store.insert_many([replace(record(0), station="A"), record(0)])
        pk = ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" if store.postgres
              else "INTEGER PRIMARY KEY AUTOINCREMENT")
        with store._transaction() as conn:
            conn.execute(f"CREATE TABLE diffqc_outbox (id {pk}, sink TEXT NOT NULL, kind TEXT NOT NULL, "
                         "record_id BIGINT, topic_key TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER "
                         "NOT NULL DEFAULT 0, next_at DOUBLE PRECISION NOT NULL DEFAULT 0, last_error TEXT, "
                         "created_at DOUBLE PRECISION NOT NULL)")
            for record_id in (None, a_old.id, none_old.id):
                conn.execute(store._q("INSERT INTO diffqc_outbox (sink, kind, record_id, topic_key, payload, "
                                      "created_at) VALUES (?, ?, ?, ?, ?, ?)"),
                             ("webhook", "decision", record_id, "dots", "{}", 1.0))
    a_down = f"http://127.0.0.1:{free_port()}/mes-a"  # nothing listens: station A's endpoint is down
    receiver_b = Receiver()
    with ResultStore(db) as store_a, ResultStore(db) as store_b:
        box_a, box_b = Outbox(store_a, ["webhook"], station="A"), Outbox(store_b, ["webhook"], station="B")
        store_a.insert_hooks.append(box_a.enqueue_records)
        store_b.insert_hooks.append(box_b.enqueue_records)
        sink_a = WebhookSink(a_down, backoff_base_s=0.01, backoff_cap_s=0.05)
        disp_a = Dispatcher(box_a, [sink_a], poll_s=0.02)
        disp_b = Dispatcher(box_b, [WebhookSink(receiver_b.url)], poll_s=0.02)
        disp_a.start()
        disp_b.start()
        try:
            store_a.insert_many([record(1), record(2)])
            time.sleep(0.2)  # A's first message backing off at the head of the table
            (b_rec,) = store_b.insert_many([record(3)])
            wait_for(lambda: receiver_b.delivered_ids() == [b_rec.id], 10, "station B's decision delivered")
            time.sleep(0.5)
            assert receiver_b.delivered_ids() == [b_rec.id]  # none of A's
            assert (box_a.pending("webhook"), box_b.pending("webhook")) == (3, 0)  # A's old one too
        finally:
            disp_a.stop()
            disp_b.stop()
            receiver_b.close()
        box_a.dead_letter(box_a.due("webhook", time.time() + 3600)[0], "kept for the test")
        assert (box_a.dead("webhook"), box_b.dead("webhook")) == (1, 0)
        assert box_b.requeue_dead("webhook") == 0 and box_a.requeue_dead("webhook") == 1
        assert Outbox(store_a, ["webhook"]).pending("webhook") == 2  # the two from before without A


def test_a_service_given_a_station_says_what_a_service_without_one_left_queued(
        store: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    """A service run without ``--station`` queued decisions while its MES was down, then was
    restarted with ``--station S1``: they are a service's without a station (the records say no
    other), which it does not send, and it said nothing; now it names them and what sends them."""
    outbox_for(store, "webhook")
    store.insert_many([record(1), record(2)])
    store.insert_hooks.clear()
    caplog.set_level("WARNING", logger="diffqc")
    box = Outbox(store, ["webhook"], station="S1")
    assert box.pending("webhook") == 0
    (said,) = [r.getMessage() for r in caplog.records if "without --station" in r.getMessage()]
    assert "2 messages" in said and "--station 'S1'" in said, said
    caplog.clear()
    Outbox(store, ["webhook"])  # the service without a station sends them: nothing to say
    assert not caplog.records


def test_a_renamed_station_is_told_of_the_messages_left_under_its_former_name(
        store: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    """A station renamed (``--station S1`` to ``--station L1-S1``) while its MES was down left its
    waiting decisions under the former name, sent by no service and said by none. A service now
    names the stations whose messages have waited in its store's outbox for more than 5 minutes
    and that it does not send (each with its count and oldest), and how to send them; another
    station's messages queued just now (its MES up, on a shared store) are not said."""
    import datetime as dt

    old = outbox_for(store, "webhook")
    old.station = "S1"  # as the service run with --station S1 queued them
    store.insert_many([replace(record(1), station="S1"), replace(record(2), station="S1")])
    store.insert_hooks.clear()
    then = dt.datetime(2026, 12, 5, 6, 30, tzinfo=dt.UTC).timestamp()
    with store._transaction() as conn:
        conn.execute("UPDATE diffqc_outbox SET created_at = ?", (then,))
    busy = outbox_for(store, "webhook")
    busy.station = "B"  # another station on the store, its message queued now
    store.insert_many([replace(record(3), station="B")])
    caplog.set_level("WARNING", logger="diffqc")
    for station in ("L1-S1", None):
        caplog.clear()
        Outbox(store, ["webhook"], station=station)
        said = [r.getMessage() for r in caplog.records if "outbox" in r.getMessage()]
        this = "without --station" if station is None else f"--station {station!r}"
        assert said == [f"2 messages of station 'S1' have waited in this store's outbox since 2026-12-05 "
                        f"06:30 UTC, which this service ({this}) does not send: the service run with "
                        "--station 'S1' sends them (a station renamed: run it once under its former name "
                        "until they are sent)"], said
    caplog.clear()
    Outbox(store, ["webhook"], station="S1")  # the station itself: nothing to say
    assert not [r for r in caplog.records if "outbox" in r.getMessage()]


def test_a_duplicate_record_is_not_pushed_twice(store: ResultStore) -> None:
    box = outbox_for(store, "webhook")
    first = store.insert(record(1, key="k1"))
    again = store.insert(record(1, key="k1"))
    assert again.duplicate and again.id == first.id
    assert box.pending("webhook") == 1


# --------------------------------------------------------------------------- webhook
def test_webhook_retries_until_the_receiver_answers(store: ResultStore,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A receiver refusing (down, overloaded) is said once in the log as it starts, not at the
    first dead letter minutes later, and once more when it takes messages again."""
    caplog.set_level("INFO", logger="diffqc")
    receiver = Receiver(fail_first=3)
    box = outbox_for(store, "webhook")
    sink = WebhookSink(receiver.url, backoff_base_s=0.01, backoff_cap_s=0.05, max_attempts=10)
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    try:
        ids = [r.id for r in store.insert_many([record(i) for i in range(3)])]
        wait_for(lambda: receiver.delivered_ids() == ids, what="all three records delivered in order")
        wait_for(lambda: box.pending("webhook") == 0, what="the outbox to drain")
    finally:
        disp.stop()
        receiver.close()
    assert len(receiver.requests) == 3 + 3  # three refused attempts of the first, then each once
    statuses = [s for s, _, _ in receiver.requests]
    assert statuses == [503, 503, 503, 200, 200, 200]
    _, headers, body = receiver.requests[-1]
    assert headers["Idempotency-Key"].startswith(f"decision-{ids[-1]}-")
    assert headers["X-Diffqc-Record-Id"] == str(ids[-1]) and body["record_id"] == ids[-1]
    assert box.dead("webhook") == 0 and disp.failures_total["webhook"] == 3
    said = [r.getMessage() for r in caplog.records if "sink webhook" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("sink webhook: cannot deliver: ") and "503" in said[0]
    assert said[1].startswith("sink webhook: delivering again; failed attempts meanwhile: 3, over")


def test_a_signed_webhook_is_verified_by_a_standard_webhooks_receiver(store: ResultStore,
                                                                     tmp_path: Path) -> None:
    """A MES took any POST to its webhook URL as diffqc's decision: anyone on the plant network
    could post a PASS, and a replayed push could not be told from a new one. With a secret each
    push carries Standard Webhooks' signature headers, which that standard's own receiver library
    verifies (the body unchanged, sent recently); a retry keeps its webhook-id; a changed body
    or another key is refused by the receiver. While a key is replaced, pushes are signed with
    the old and the new one: a receiver holding either accepts them."""
    import base64
    import secrets

    from standardwebhooks import Webhook, WebhookVerificationError

    secret, successor = ("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    (tmp_path / "secret").write_text(f"{secret}\n\n{successor}\n")  # a key a line
    receiver = Receiver(fail_first=1)
    box = outbox_for(store, "webhook")
    sink = WebhookSink(receiver.url, backoff_base_s=0.01, backoff_cap_s=0.02,
                       secrets=webhook_secrets([f"@{tmp_path / 'secret'}"]))
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    try:
        ids = [r.id for r in store.insert_many([record(i) for i in range(2)])]
        wait_for(lambda: receiver.delivered_ids() == ids, what="both records delivered")
    finally:
        disp.stop()
        receiver.close()
    verifier = Webhook(secret)
    for (_, headers, body), raw in zip(receiver.requests, receiver.raw, strict=True):
        assert verifier.verify(raw, headers) == body
        assert Webhook(successor).verify(raw, headers) == body
        forged = raw.replace(b'"REJECT"', b'"PASS"')  # a rejected part passed off as good
        assert forged != raw
        with pytest.raises(WebhookVerificationError):
            verifier.verify(forged, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(base64.b64encode(secrets.token_bytes(32)).decode()).verify(raw, headers)
    first, retried = ({k.lower(): v for k, v in receiver.requests[i][1].items()} for i in (0, 1))
    assert first["webhook-id"] == retried["webhook-id"] == first["idempotency-key"]
    assert first["webhook-id"].startswith(f"decision-{ids[0]}-")


def test_two_stores_record_one_reach_one_receiver_under_different_keys(tmp_path: Path) -> None:
    """Two stations with a store each (or one store made anew after a disk swap, or put back from
    an older backup) number their records from 1 again: the push's Idempotency-Key and
    Standard Webhooks' webhook-id were ``decision-<record_id>``, so a MES dropping repeats by
    them (what those headers are for; Standard Webhooks has the id unique across all messages)
    dropped the second station's decision 1 as a repeat of the first's. The two now differ, and
    a message sent again (a retry, a dead letter requeued: an alarm's key named its outbox row,
    new on requeue) keeps its key."""
    receiver = Receiver()
    try:
        sink = WebhookSink(receiver.url, secrets=[b"k" * 32])
        for name, attempts in (("station-a.db", 2), ("station-b.db", 1)):
            with ResultStore(str(tmp_path / name)) as store:
                box = outbox_for(store, "webhook")
                assert store.insert(record(1)).id == 1
                (message,) = box.due("webhook", time.time() + 60)
                for _ in range(attempts):
                    sink.send(message)
    finally:
        receiver.close()
    sent = [({k.lower(): v for k, v in headers.items()}, body) for _, headers, body in receiver.requests]
    assert [body["record_id"] for _, body in sent] == [1, 1, 1]
    (a, _), (again, _), (b, _) = sent
    assert a["idempotency-key"] == again["idempotency-key"] == a["webhook-id"] == again["webhook-id"]
    assert a["idempotency-key"] != b["idempotency-key"] and a["webhook-id"] != b["webhook-id"]
    assert a["idempotency-key"].startswith("decision-1-") and b["idempotency-key"].startswith("decision-1-")


def test_a_requeued_alarm_keeps_its_key(store: ResultStore) -> None:
    box = outbox_for(store, "webhook")
    box.enqueue_alarm("stripes", {"event": "drift_alarm", "statistic": 0.4})
    (message,) = box.due("webhook", time.time() + 60)
    box.dead_letter(message, "refused")
    box.enqueue_alarm("stripes", {"event": "drift_alarm", "statistic": 0.4})  # the next, as like as can be
    assert box.requeue_dead("webhook") == 1
    later, requeued = box.due("webhook", time.time() + 60)
    assert requeued.id != message.id and requeued.payload == message.payload
    assert message_key(requeued) == message_key(message) != message_key(later)
    assert message_key(message).startswith("alarm-") and len(message_key(message)) == len("alarm-") + 16


def test_a_webhook_secret_is_read_and_checked_without_being_shown(tmp_path: Path) -> None:
    import base64

    from diffqc.service.app import ServiceSettings

    key = bytes(range(32))
    assert webhook_secrets(["whsec_" + base64.b64encode(key).decode()]) == [key]
    assert webhook_secrets([base64.b64encode(key).decode().rstrip("=")]) == [key]  # no prefix, no padding
    (tmp_path / "empty").write_text("\n")
    how = "make one: python -c \"import base64, secrets; print('whsec_' + "
    short = "whsec_" + base64.b64encode(b"short").decode()
    for value, said in [("whsec_not base64!", f"--webhook-secret is not whsec_ and base64 (the Standard "
                                              f"Webhooks form): {how}"),
                        (short, f"--webhook-secret holds 5 bytes: a signing key needs at least 24: {how}"),
                        (f"@{tmp_path / 'gone'}", f"cannot read --webhook-secret @{tmp_path / 'gone'}"),
                        (f"@{tmp_path / 'empty'}",
                         f"--webhook-secret @{tmp_path / 'empty'} holds no key: {how}")]:
        with pytest.raises(ConfigError) as info:
            webhook_secrets([value])
        assert str(info.value).startswith(said), str(info.value)
        assert "not base64!" not in str(info.value) and short not in str(info.value)  # never shown
    with pytest.raises(ConfigError, match="--webhook-secret needs --webhook URL"):
        ServiceSettings(allow_no_token=True, webhook_secrets=(base64.b64encode(key).decode(),)).validate()


def test_webhook_to_an_endpoint_whose_certificate_an_internal_ca_signed(
        store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line's MES over HTTPS with a certificate its own CA signed: every push failed, retried
    and dead-lettered with "certificate verify failed", and nothing said how to trust that CA.
    The failure names the way (OpenSSL's SSL_CERT_FILE in the service's environment), and with
    it set the push arrives."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    receiver = Receiver(tls=ca.issue_cert("127.0.0.1"))
    box = outbox_for(store, "webhook")
    sink = WebhookSink(receiver.url, timeout_s=10)
    try:
        (stored,) = store.insert_many([record(1)])
        (message,) = box.due("webhook", time.time())
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(RuntimeError) as info:
            sink.send(message)
        assert "certificate verify failed" in str(info.value)
        assert "SSL_CERT_FILE=" in str(info.value) and "the endpoint's CA" in str(info.value)
        assert receiver.requests == []
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        sink.send(message)
        assert receiver.delivered_ids() == [stored.id]
    finally:
        receiver.close()


def test_a_certificate_for_another_name_or_expired_is_named_as_that_not_an_untrusted_ca(
        store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line's CA trusted (SSL_CERT_FILE set), but the endpoint's certificate names another
    host (issued for mes.plant.local, the URL gives its IP address) or has expired: the error
    said to trust the endpoint's CA, which was trusted, so the user looked in the wrong place.
    Each is now named as what it is, with what to do."""
    import datetime as dt

    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    box = outbox_for(store, "webhook")
    store.insert_many([record(1)])
    (message,) = box.due("webhook", time.time())
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    for cert, said in [(ca.issue_cert("mes.plant.local"), "the certificate is not for this host (127.0.0.1)"),
                       (ca.issue_cert("127.0.0.1", not_after=past, not_before=past - dt.timedelta(days=9)),
                        "the certificate has expired")]:
        receiver = Receiver(tls=cert)
        try:
            with pytest.raises(RuntimeError) as info:
                WebhookSink(receiver.url, timeout_s=10).send(message)
        finally:
            receiver.close()
        assert said in str(info.value) and "SSL_CERT_FILE" not in str(info.value)


def test_webhook_dead_letters_after_max_attempts_and_requeues(store: ResultStore) -> None:
    receiver = Receiver(always_fail=True, status=500)  # the receiver fails on this message
    box = outbox_for(store, "webhook")
    sink = WebhookSink(receiver.url, backoff_base_s=0.01, backoff_cap_s=0.02, max_attempts=3)
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    try:
        rec = store.insert(record(1))
        wait_for(lambda: box.dead("webhook") == 1, what="the dead letter")
        assert box.pending("webhook") == 0 and len(receiver.requests) == 3
        (dead,) = box.dead_letters("webhook")
        assert dead["record_id"] == rec.id and dead["attempts"] == 3 and "500" in dead["last_error"]
        receiver.always_fail = False
        assert box.requeue_dead("webhook") == 1
        wait_for(lambda: receiver.delivered_ids() == [rec.id], what="the requeued message")
    finally:
        disp.stop()
        receiver.close()
    assert box.dead("webhook") == 0 and box.pending("webhook") == 0


def _message(record_id: int = 7) -> Any:
    from diffqc.service.sinks import Message

    return Message(1, "webhook", "decision", record_id, "edge", '{"kind": "decision"}', 0, time.time())


class _OddReceiver:
    """A receiver behind a redirect (``/hook`` answers 301 to ``/moved``, which answers any GET
    200: a reverse proxy's http-to-https rule, a login page) and one that answers 200 and then
    sends its body a byte every 0.2 s for 20 s (a stream: a camera's MJPEG URL given by
    mistake); ``hung_up`` is set when the client closes before that body ends."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.hung_up = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path == "/slow":  # a MES that takes its time (an ERP call behind it)
                    time.sleep(1.0)
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/hook":
                    self.send_response(301)
                    self.send_header("Location", f"http://127.0.0.1:{outer.port}/moved")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    outer.hung_up.set()

            def do_GET(self) -> None:
                outer.seen.append(("GET", self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_redirect_is_not_delivered_and_a_response_body_is_not_waited_for(store: ResultStore) -> None:
    """A webhook URL that redirects: urllib followed a POST's 301 with a GET to the new URL,
    without the body, and counted its 200 as delivered (the decision lost), the
    ``Authorization`` header sent along to wherever it pointed. A redirect now fails the push,
    named with where it leads, so it is retried and dead-lettered. A receiver's response body
    is not read: one that streams it (a camera's stream URL) held the sink for as long as it
    sent."""
    odd = _OddReceiver()
    message = _message()
    try:
        sink = WebhookSink(f"http://127.0.0.1:{odd.port}/hook", headers={"Authorization": "Bearer T"})
        with pytest.raises(RuntimeError, match=rf"webhook answered 301: a redirect to "
                                               rf"http://127.0.0.1:{odd.port}/moved"):
            sink.send(message)
        assert odd.seen == [("POST", "/hook", "Bearer T")]  # no GET, the token sent nowhere else
        WebhookSink(f"http://127.0.0.1:{odd.port}/stream").send(message)  # its 200: delivered
        assert odd.hung_up.wait(10), "the sink read the receiver's body to its end"
    finally:
        odd.server.shutdown()
        odd.server.server_close()


def test_an_endpoint_slower_than_the_timeout_is_named_so_and_the_timeout_can_be_raised() -> None:
    """A MES that answers in 7 s (an ERP call behind it) with the sink's 5 s timeout: each push
    was taken by the endpoint, given up on, said as ``webhook unreachable: timed out``, and sent
    again, for ever (a drill: one decision five times in 45 s, none counted delivered, the next
    never sent). The log says the endpoint did not answer in time, naming ``--webhook-timeout``,
    which a slow endpoint is given. A connection not made in that time (a TLS handshake no one
    answers: a wrong port, a host gone) is said as unreachable: no push was sent on it."""
    from diffqc.service.app import ServiceSettings

    odd = _OddReceiver()
    message = _message()
    try:
        with pytest.raises(Unavailable, match=r"webhook did not answer within 0\.3 s \(--webhook-timeout\)"):
            WebhookSink(f"http://127.0.0.1:{odd.port}/slow", timeout_s=0.3).send(message)
        WebhookSink(f"http://127.0.0.1:{odd.port}/slow", timeout_s=5.0).send(message)  # delivered
    finally:
        odd.server.shutdown()
        odd.server.server_close()
    with (socket.create_server(("127.0.0.1", 0)) as silent,  # takes connections, never says a word
          pytest.raises(Unavailable, match=r"webhook unreachable: no connection made within 0\.3 s")):
        WebhookSink(f"https://127.0.0.1:{silent.getsockname()[1]}/hook", timeout_s=0.3).send(message)
    with pytest.raises(ConfigError, match="--webhook-timeout must be positive"):
        ServiceSettings(webhook_url="http://mes/hook", webhook_timeout_s=0, allow_no_token=True).validate()


def test_a_user_and_password_in_the_webhook_url_are_sent_as_basic_auth() -> None:
    """A MES whose endpoint takes HTTP Basic authentication, given as curl, requests and
    browsers take it (``https://user:password@mes/hook``): urllib read the user and password as
    part of the host name, every push failed as ``Name or service not known`` (a DNS problem
    to the user reading the log) and waited for ever. They are now sent as the request's
    ``Authorization: Basic`` header, percent-escapes decoded, and not shown in any error; an
    ``Authorization`` header given as well (``--webhook-header``) is refused at start."""
    receiver = Receiver()
    url = receiver.url.replace("http://", "http://line%2D1:p%40ss%3Aw@")
    try:
        WebhookSink(url).send(_message())
        WebhookSink(receiver.url, headers={"user-agent": "line-1"}).send(_message())
    finally:
        receiver.close()
    (_, headers, _), (_, given, _) = receiver.requests
    assert [v for k, v in given.items() if k.lower() == "user-agent"] == ["line-1"]
    assert "Authorization" not in given
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"line-1:p@ss:w").decode()
    # a User-Agent, as urllib sent one (a cloud WAF's rule set refuses a request without: AWS's
    # NoUserAgent_HEADER); one given with --webhook-header is sent instead
    from diffqc import __version__

    assert headers["User-Agent"] == f"diffqc/{__version__}"
    from diffqc.service.app import ServiceSettings

    with pytest.raises(ConfigError, match=r"gives a user and password.*--webhook-header.*Authorization"):
        ServiceSettings(webhook_url=url, webhook_headers=("authorization: Bearer T",),
                        allow_no_token=True).validate()  # at start, before the model loads
    with pytest.raises(Unavailable) as info:
        WebhookSink(f"http://mes:secret@127.0.0.1:{free_port()}/hook").send(_message())
    assert "secret" not in str(info.value) and "Name or service" not in str(info.value)
    assert "webhook unreachable" in str(info.value)


def test_a_webhook_url_with_a_space_or_umlaut_is_sent_escaped() -> None:
    """A MES path as its integrator wrote it down (``/qs/prüfung``, ``/my hook``, ``?station=Halle 2``):
    a space failed every push as ``URL can't contain control characters`` (waited for ever), an
    umlaut as ``'ascii' codec can't encode character`` (dead-lettered after 8). They are sent
    percent-encoded (UTF-8), as browsers and requests send them; escapes already written stay."""
    receiver = Receiver()
    try:
        for path in ["/qs/prüfung", "/my hook?station=Halle 2", "/a%20b?x=%C3%A4"]:
            WebhookSink(receiver.url.replace("/hook", path)).send(_message())
    finally:
        receiver.close()
    assert receiver.paths == ["/qs/pr%C3%BCfung", "/my%20hook?station=Halle%202", "/a%20b?x=%C3%A4"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_webhook_pushes_share_one_connection_and_outlive_the_endpoints_idle_close(
        store: ResultStore, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each push opened a connection of its own (and for https:// made a TLS handshake): an
    endpoint 50 ms away took 18.5 pushes a second over http and 9.1 over https (measured, 60
    decisions through a proxy delaying each direction 25 ms), fewer than a line of 8 types
    makes at a part a second. Pushes now go over one kept connection, as HTTP/1.1 clients do;
    one the endpoint closed while idle (an idle timeout, racing the next push) is opened again
    without a failure, also where its close arrives only after the push was sent on it (the
    race's other side: the check before sending made blind)."""
    import trustme

    tls = None
    if scheme == "https":
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        tls = ca.issue_cert("127.0.0.1")
    for drop_every, connections, blind in [(0, 1, False), (2, 3, False), (2, 3, True)]:
        if blind:
            monkeypatch.setattr("diffqc.service.sinks._closed_by_peer", lambda conn: conn.sock is None)
        receiver = Receiver(keep_alive=True, drop_every=drop_every, tls=tls)
        with ResultStore(str(tmp_path / f"outbox-{drop_every}-{blind}.db")) as own:
            box = outbox_for(own, "webhook")
            disp = Dispatcher(box, [WebhookSink(receiver.url)], poll_s=0.02)
            disp.start()
            try:
                ids = [r.id for r in own.insert_many([record(i) for i in range(6)])]
                wait_for(lambda r=receiver, want=ids: r.delivered_ids() == want, 20,
                         "six decisions delivered in order")
            finally:
                disp.stop()
                receiver.close()
        assert len(set(receiver.peers)) == connections, receiver.peers
        assert disp.failures_total["webhook"] == 0, disp.last_error


@pytest.mark.parametrize("keep_alive", [False, True])
def test_a_refused_push_says_what_the_endpoint_answered(store: ResultStore, keep_alive: bool) -> None:
    """A MES that refuses a push says why in its answer's body (a 422's ``{"detail": "part_id is
    required"}``, nginx's ``400 No required SSL certificate was sent`` page): the log, the dead
    letter and ``GET /v1/line`` said only ``webhook answered 422``, so whoever wires the MES
    could not tell what it wanted. The error now carries what the answer says, on one line (an
    HTML page's title), up to 200 characters."""
    receiver = Receiver(always_fail=True, status=422, keep_alive=keep_alive,
                        answer=b'{"detail": "part_id is required",\n "type": "missing"}')
    page = (b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n<body>\r\n"
            b"<center><h1>400 Bad Request</h1></center>\r\n" + b"x" * 3000 + b"</body></html>")
    html = Receiver(always_fail=True, status=400, keep_alive=keep_alive, answer=page)
    long = Receiver(always_fail=True, status=500, keep_alive=keep_alive, answer=b"Traceback: " + b"y" * 500)
    try:
        with pytest.raises(RuntimeError) as info:
            WebhookSink(receiver.url).send(_message())
        assert str(info.value) == 'webhook answered 422: {"detail": "part_id is required", "type": "missing"}'
        with pytest.raises(RuntimeError) as info:
            WebhookSink(html.url).send(_message())
        assert str(info.value) == "webhook answered 400: 400 No required SSL certificate was sent"
        with pytest.raises(RuntimeError) as info:
            WebhookSink(long.url).send(_message())
        assert str(info.value) == "webhook answered 500: Traceback: " + "y" * 188 + "…"
    finally:
        for each in (receiver, html, long):
            each.close()


@pytest.mark.parametrize("retry_after", ["30", "{http_date}"])
def test_a_rate_limited_push_waits_as_long_as_the_endpoint_asks(store: ResultStore, retry_after: str) -> None:
    """A MES behind an API gateway that throttles (``429``) or is in maintenance (``503``) says
    when to come back (``Retry-After: 30``, or an HTTP date): the sink tried again after 1, 2, 4
    s, as for any endpoint away, each try refused and counted. It now waits at least as long as
    asked (at most an hour), and the error says so."""
    import email.utils

    value = retry_after.format(http_date=email.utils.formatdate(time.time() + 30, usegmt=True))
    receiver = Receiver(fail_first=1, status=429, answer_headers={"Retry-After": value})
    box = outbox_for(store, "webhook")
    disp = Dispatcher(box, [WebhookSink(receiver.url, backoff_base_s=0.01)], poll_s=0.02)
    try:
        store.insert_many([record(1)])
        started = time.time()
        assert disp.deliver_due(disp.sinks[0])  # refused: it waits
        assert box.due("webhook", started + 25) == [] and len(box.due("webhook", started + 32)) == 1
        said = disp.last_error["webhook"]
        assert said is not None and said.startswith("webhook answered 429") and "(Retry-After)" in said
    finally:
        receiver.close()


def test_webhook_presents_the_client_certificate_an_endpoint_requires(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A MES behind mutual TLS (its gateway lets in only clients with a certificate the plant's
    CA signed, as zero-trust networks and cloud API gateways do): the webhook sink had no way to
    present one (MQTT's ``--mqtt-cert`` had): every push failed as ``tlsv13 alert certificate
    required`` and waited for ever. ``--webhook-cert`` (``--webhook-key``) presents it; without
    one the failure says the endpoint asks for one, and a certificate the endpoint does not
    trust is said as that; the files are checked at start, as ``--mqtt-cert``'s are."""
    import trustme

    from diffqc.service.app import ServiceSettings

    ca, plant = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    for signer, name in [(plant, "line.pem"), (trustme.CA(), "other.pem")]:
        signer.issue_cert("line-1.plant").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / name))
    receiver = Receiver(tls=ca.issue_cert("127.0.0.1"), client_ca=plant)
    try:
        with pytest.raises(Unavailable, match=r"client certificate \(mutual TLS\).*give --webhook-cert"):
            WebhookSink(receiver.url).send(_message())
        with pytest.raises(Unavailable, match=r"not trust the certificate --webhook-cert gives"):
            WebhookSink(receiver.url, client_cert=tmp_path / "other.pem").send(_message())
        assert receiver.requests == []
        WebhookSink(receiver.url, client_cert=tmp_path / "line.pem").send(_message())
        assert len(receiver.requests) == 1
    finally:
        receiver.close()
    with pytest.raises(ConfigError, match=r"--webhook-cert needs an https:// endpoint"):
        ServiceSettings(webhook_url="http://mes/hook", webhook_cert=tmp_path / "line.pem",
                        allow_no_token=True).validate()
    with pytest.raises(ConfigError, match=r"ca.pem holds no private key: give --webhook-key"):
        ServiceSettings(webhook_url=receiver.url, webhook_cert=tmp_path / "ca.pem",
                        allow_no_token=True).validate()


def test_webhook_connections_send_pushes_at_once(store: ResultStore, tmp_path: Path) -> None:
    """An endpoint far away takes one push per round trip over one connection (9.6 a second at
    100 ms: BENCHMARKS.md "Session 47"), fewer than a fast line makes. ``--webhook-connections
    4`` sends over four kept connections at once (the order of arrival then not kept: each
    push carries its record id and Idempotency-Key), each outcome kept."""
    receiver = Receiver(keep_alive=True, delay_s=0.2)
    box = outbox_for(store, "webhook")
    disp = Dispatcher(box, [WebhookSink(receiver.url, connections=4)], poll_s=0.02)
    disp.start()
    try:
        ids = [r.id for r in store.insert_many([record(i) for i in range(12)])]
        wait_for(lambda: sorted(receiver.delivered_ids()) == ids, 30, "twelve decisions delivered")
        wait_for(lambda: box.pending("webhook") == 0, 10, "the outbox to drain")
    finally:
        disp.stop()
        receiver.close()
    assert receiver.most_in_flight == 4 and len(set(receiver.peers)) == 4, receiver.peers
    assert disp.failures_total["webhook"] == 0 and disp.delivered_total["webhook"] == 12
    from diffqc.service.app import ServiceSettings

    # a receiver away for one message of a pass: the others it took are delivered, not sent again;
    # away for all: those sent wait their backoff (they were sent again at every poll, 63 at a
    # time), the rest behind them, untried (a pass stops at an endpoint away)
    for fail, messages, expected in [({"once": [1]}, 4, 5), ({"always": True}, 8, 4)]:
        with ResultStore(str(tmp_path / f"outbox-{messages}.db")) as own:
            receiver = Receiver(keep_alive=True, fail_once=fail.get("once", ()),  # each pass's 4 sent at once
                                always_fail=bool(fail.get("always")), delay_s=0.2)
            box = outbox_for(own, "webhook")
            backoff = 60.0 if fail.get("always") else 0.01
            disp = Dispatcher(box, [WebhookSink(receiver.url, connections=4, backoff_base_s=backoff)],
                              poll_s=0.02)
            disp.start()
            try:
                ids = [r.id for r in own.insert_many([record(i) for i in range(messages)])]
                wait_for(lambda r=receiver, n=expected: len(r.requests) >= n, 20, "the pushes answered")
                time.sleep(0.5)  # 25 polls: a message sent again would be seen
            finally:
                disp.stop()
                receiver.close()
            assert len(receiver.requests) == expected, [b["record_id"] for _, _, b in receiver.requests]
            if not fail.get("always"):
                assert sorted(receiver.delivered_ids()) == ids
    with pytest.raises(ConfigError, match="--webhook-connections must be 1 to 64, got 65"):
        ServiceSettings(webhook_url=receiver.url, webhook_connections=65, allow_no_token=True).validate()


def test_webhook_connections_stop_a_pass_at_an_endpoint_away(store: ResultStore) -> None:
    """An endpoint that takes connections and answers nothing (a MES hung, a host gone): with
    ``--webhook-connections`` above 1 a delivery pass tried every due message, N at a time, each
    waiting ``--webhook-timeout`` (64 messages over 4 connections at 5 s: 80 s, the endpoint
    back meanwhile unseen), where one connection stops at its first failure. A pass now stops
    when a push finds the endpoint away: the pushes under way end, the rest wait, untried."""
    receiver = Receiver(keep_alive=True, delay_s=1.0)  # answers after the sink gave up
    box = outbox_for(store, "webhook")
    sink = WebhookSink(receiver.url, connections=2, timeout_s=0.3)
    disp = Dispatcher(box, [sink])
    try:
        store.insert_many([record(i) for i in range(10)])
        assert disp.deliver_due(sink) is True  # the endpoint away: idle until the next poll
        wait_for(lambda: receiver.in_flight == 0, 10, "the receiver's late answers")
    finally:
        disp.stop()
        receiver.close()
    assert len(receiver.requests) == 2, [b["record_id"] for _, _, b in receiver.requests]
    assert disp.failures_total["webhook"] == 2 and box.pending("webhook") == 10  # 8 untried: no failure


class _ForwardProxy:
    """An HTTP proxy on 127.0.0.1, as a plant's outbound proxy (squid) is: a request for an
    ``http://`` URL arrives naming the whole URL and is forwarded; for an ``https://`` one the
    client asks ``CONNECT host:port`` and the bytes are passed through. ``seen`` is each request's
    method, target and ``Proxy-Authorization``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        outer = self

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self) -> None:
                outer.seen.append(("CONNECT", self.path, self.headers.get("Proxy-Authorization")))
                host, port = self.path.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=10) as upstream:
                    self.send_response(200)
                    self.end_headers()
                    back = threading.Thread(target=pump, args=(upstream, self.connection), daemon=True)
                    back.start()
                    pump(self.connection, upstream)
                    back.join(10)
                self.close_connection = True

            def do_POST(self) -> None:
                outer.seen.append(("POST", self.path, self.headers.get("Proxy-Authorization")))
                body = self.rfile.read(int(self.headers["Content-Length"]))
                target = urlsplit(self.path)
                conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
                hop = ("proxy-authorization", "proxy-connection", "connection", "host")
                conn.request("POST", target.path, body, {k: v for k, v in self.headers.items()
                                                         if k.lower() not in hop})
                status = conn.getresponse().status
                conn.close()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_goes_through_the_proxy_the_environment_names(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A plant whose machines reach a MES in the cloud only through its outbound proxy, named
    in the service's environment as curl, pip and urllib read it (``HTTP_PROXY``,
    ``HTTPS_PROXY``, with a user and password, and ``NO_PROXY`` for the plant's own hosts):
    an http:// push is sent to the proxy naming its URL, an https:// one through a ``CONNECT``
    tunnel (the proxy sees neither the body nor the headers), the proxy's password as
    ``Proxy-Authorization`` and never to the endpoint; a host in ``NO_PROXY`` is reached
    directly. The environment is read as the service starts."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    proxy = _ForwardProxy()
    plain, secure = Receiver(), Receiver(tls=ca.issue_cert("127.0.0.1"))
    creds = "Basic " + base64.b64encode(b"plant:pr@xy").decode()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://plant:pr%40xy@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("HTTPS_PROXY", f"http://plant:pr%40xy@127.0.0.1:{proxy.port}")
        WebhookSink(plain.url).send(_message())
        WebhookSink(secure.url).send(_message())
        assert proxy.seen == [("POST", plain.url, creds), ("CONNECT", f"127.0.0.1:{secure.port}", creds)]
        assert [len(plain.requests), len(secure.requests)] == [1, 1]
        assert "Proxy-Authorization" not in plain.requests[0][1] | secure.requests[0][1]
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        WebhookSink(plain.url).send(_message())
        WebhookSink(secure.url).send(_message())
        assert len(proxy.seen) == 2 and [len(plain.requests), len(secure.requests)] == [2, 2]
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
        with pytest.raises(ConfigError, match=r"HTTP_PROXY 'socks5://127.0.0.1:1080' must be http://host:port"):
            check_sink_urls(None, plain.url)  # at start
        monkeypatch.setenv("HTTPS_PROXY", "socks5h://127.0.0.1:1080")
        with pytest.raises(ConfigError, match=r"HTTPS_PROXY 'socks5h://127.0.0.1:1080' must be http://host:port"):
            check_sink_urls(None, secure.url)
    finally:
        proxy.close()
        plain.close()
        secure.close()


@pytest.mark.parametrize("away", ["503", "unreachable"])
def test_a_receiver_away_for_longer_than_the_retries_makes_no_dead_letter(store: ResultStore,
                                                                          away: str) -> None:
    """A MES restarted for ten minutes (its proxy answering 503, or nothing listening): each
    message in turn burnt its 8 attempts in about two minutes and became a dead letter, to be
    resent by hand. A receiver that is away (unreachable, 502/503/504, 429, a wrong URL or
    token: what it would answer every message) is waited for however long, as an MQTT broker
    is; the messages arrive, in order, once it answers; none is a dead letter."""
    port = free_port()
    receiver = Receiver(always_fail=True, port=port) if away == "503" else None
    box = outbox_for(store, "webhook")
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook", backoff_base_s=0.01, backoff_cap_s=0.02,
                       max_attempts=2, timeout_s=1.0)
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    try:
        ids = [r.id for r in store.insert_many([record(i) for i in range(3)])]
        wait_for(lambda: disp.failures_total["webhook"] >= 10, what="ten failed attempts")
        assert box.dead("webhook") == 0 and box.pending("webhook") == 3
        # not up (/metrics' diffqc_sink_up 0: the DiffqcSinkDown alert), as no dead letter says it
        assert disp.status()["webhook"]["ready"] is False
        assert 'diffqc_sink_up{sink="webhook"} 0' in disp.metrics_lines()
        if receiver is None:
            receiver = Receiver(port=port)
        receiver.always_fail = False
        wait_for(lambda: receiver is not None and receiver.delivered_ids() == ids, what="the backlog")
        assert disp.status()["webhook"]["ready"] is True
    finally:
        disp.stop()
        if receiver is not None:
            receiver.close()
    assert box.dead("webhook") == 0


def test_webhook_down_never_blocks_and_catches_up_after_a_restart(tmp_path: Path) -> None:
    """Records keep being stored while the receiver is unreachable; after a restart of the
    service (new store, outbox and dispatcher) and of the receiver, every message arrives."""
    port = free_port()
    db = str(tmp_path / "results.db")
    with ResultStore(db) as store:
        box = outbox_for(store, "webhook")
        sink = WebhookSink(f"http://127.0.0.1:{port}/hook", backoff_base_s=0.01, backoff_cap_s=0.05,
                           max_attempts=1000, timeout_s=1.0)
        disp = Dispatcher(box, [sink], poll_s=0.02)
        disp.start()
        ids = [store.insert(record(i)).id for i in range(5)]  # returns although nobody listens
        wait_for(lambda: disp.failures_total["webhook"] >= 2, what="failed attempts")
        disp.stop()
        assert box.pending("webhook") == 5
    receiver = Receiver(port=port)
    try:
        with ResultStore(db) as store:
            box = outbox_for(store, "webhook")
            disp = Dispatcher(box, [WebhookSink(receiver.url, backoff_base_s=0.01)], poll_s=0.02)
            disp.start()
            try:
                ids.append(store.insert(record(5)).id)
                wait_for(lambda: receiver.delivered_ids() == ids, what="the backlog and the new record")
            finally:
                disp.stop()
    finally:
        receiver.close()


def test_sink_configuration_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="webhook URL"):
        WebhookSink("ftp://x/y")
    with pytest.raises(ConfigError, match="mqtt://"):
        parse_mqtt_url("http://broker:1883")
    target = parse_mqtt_url("mqtt://user:pw@broker:1884/plant1/line3")
    assert (target.host, target.port, target.prefix) == ("broker", 1884, "plant1/line3")
    assert target.username == "user" and target.password == "pw"
    assert parse_mqtt_url("mqtt://broker").prefix == "diffqc"
    for bad in ("mqtt://broker/a/#", "mqtt://broker/a/+"):
        with pytest.raises(ConfigError, match="prefix"):
            parse_mqtt_url(bad)
    # ?prefix= is the WebSocket URL's form: on mqtt:// it was dropped, decisions sent elsewhere
    with pytest.raises(ConfigError, match=r"takes no query \(\?prefix=line1\): its topic prefix is its "
                                          r"path, mqtt://broker:1883/line1"):
        parse_mqtt_url("mqtt://broker:1883/?prefix=line1")


# --------------------------------------------------------------------------- MQTT (real broker)
def mqtt_url() -> str:
    url = os.environ.get("DIFFQC_TEST_MQTT_URL")
    if not url:
        pytest.skip("DIFFQC_TEST_MQTT_URL is unset: start a broker with "
                    "`export DIFFQC_TEST_MQTT_URL=$(scripts/start_mosquitto.sh)`")
    return url


class Subscriber:
    """A paho client collecting every message under ``prefix/#`` (QoS 1)."""

    def __init__(self, host: str, port: int, prefix: str, client_id: str | None = None,
                 clean: bool = True) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  clean_session=clean)
        self.prefix = prefix

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            client.subscribe(f"{prefix}/#", qos=1)

        def on_subscribe(*args: Any) -> None:
            self.subscribed.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(15), "subscriber could not subscribe"

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def record_ids(self) -> set[int]:
        with self.lock:
            return {json.loads(p)["record_id"] for t, p, _ in self.messages
                    if t.startswith(f"{self.prefix}/decisions/")}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _unique_prefix(tag: str) -> str:
    return f"diffqc-test/{tag}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.mqtt
def test_mqtt_publishes_decisions_and_a_retained_status(store: ResultStore) -> None:
    base = parse_mqtt_url(mqtt_url())
    prefix = _unique_prefix("pub")
    url = f"mqtt://{base.host}:{base.port}/{prefix}"
    sub = Subscriber(base.host, base.port, prefix)
    box = outbox_for(store, "mqtt")
    sink = MqttSink(url)
    disp = Dispatcher(box, [sink], poll_s=0.05)
    disp.start()
    try:
        wait_for(sink.ready, 15, "the MQTT sink to connect")
        stored = store.insert_many([record(1, "REJECT", "stripes"), record(2, "PASS", "a/b")])
        wait_for(lambda: sub.record_ids() == {r.id for r in stored}, what="both decisions")
        wait_for(lambda: box.pending("mqtt") == 0, what="the outbox to drain")
        assert sub.on(f"{prefix}/status")[-1] == b"online"
        (rej,) = sub.on(f"{prefix}/decisions/stripes")
        assert json.loads(rej)["record_id"] == stored[0].id and json.loads(rej)["decision"] == "REJECT"
        assert len(sub.on(f"{prefix}/decisions/a_b")) == 1  # '/' in a type is one topic level
        box.enqueue_alarm("stripes", {"event": "drift_alarm", "statistic": 0.4})
        wait_for(lambda: len(sub.on(f"{prefix}/alarms/stripes")) == 1, what="the drift alarm")
        box.enqueue_alarm("stripes", {"event": "drift_alarm", "camera": "cam/2"}, camera="cam/2")
        wait_for(lambda: len(sub.on(f"{prefix}/alarms/stripes/cam_2")) == 1, what="one camera's drift alarm")
        assert len(sub.on(f"{prefix}/alarms/stripes")) == 1  # the type's retained state is its own
    finally:
        disp.stop()
        sub.close()
    # the retained status after a clean stop is "offline", and the alarm state is retained
    late = Subscriber(base.host, base.port, prefix)
    try:
        wait_for(lambda: late.on(f"{prefix}/status") == [b"offline"], 10, "the retained offline status")
        wait_for(lambda: len(late.on(f"{prefix}/alarms/stripes")) == 1, 10, "the retained alarm")
    finally:
        late.client.publish(f"{prefix}/alarms/stripes", b"", qos=1, retain=True).wait_for_publish(5)
        late.client.publish(f"{prefix}/alarms/stripes/cam_2", b"", qos=1, retain=True).wait_for_publish(5)
        late.client.publish(f"{prefix}/status", b"", qos=1, retain=True).wait_for_publish(5)
        late.close()


_CRASHING_CLIENT = """
import sys, time
from diffqc.service.sinks import MqttSink
sink = MqttSink(sys.argv[1])
sink.start()
while not sink.ready():
    time.sleep(0.05)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.mqtt
def test_mqtt_last_will_says_offline_when_the_process_dies() -> None:
    base = parse_mqtt_url(mqtt_url())
    prefix = _unique_prefix("will")
    sub = Subscriber(base.host, base.port, prefix)
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_CLIENT, f"mqtt://{base.host}:{base.port}/{prefix}"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_for(lambda: sub.on(f"{prefix}/status") == [b"online"], 10, "online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: sub.on(f"{prefix}/status") == [b"online", b"offline"], 15, "the last will")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.client.publish(f"{prefix}/status", b"", qos=1, retain=True).wait_for_publish(5)
        sub.close()


class Broker:
    """A private Mosquitto (persistent sessions, so that a subscriber misses nothing)."""

    def __init__(self, folder: Path, tls: Any = None, users: dict[str, str] | None = None,
                 acl: str | None = None, extra: str = "") -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        # as root, mosquitto would drop to its own user, which cannot write the session file here
        user = "user root\n" if os.geteuid() == 0 else ""
        if tls is not None:  # a trustme certificate: the listener speaks TLS (mqtts://)
            tls.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
            tls.private_key_pem.write_to_path(str(folder / "key.pem"))
            user += f"certfile {folder}/cert.pem\nkeyfile {folder}/key.pem\n"
        if users:  # a user and password to connect (mosquitto_passwd hashes them)
            passwd = folder / "passwd"
            for name, password in users.items():
                create = [] if passwd.exists() else ["-c"]
                subprocess.run(["mosquitto_passwd", "-b", *create, str(passwd), name, password],
                               check=True, capture_output=True)
            user += f"password_file {passwd}\n"
        if acl is not None:  # mosquitto's access list: what each user may publish
            (folder / "acl").write_text(acl)
            user += f"acl_file {folder}/acl\n"
        user += extra  # more of mosquitto's options, one a line
        anonymous = "false" if users else "true"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous {anonymous}\n"
                             f"persistence true\npersistence_location {folder}/\n"
                             f"log_dest file {folder}/broker.log\n{user}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), 10, "the broker to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its sessions
            self.proc.wait(10)
            self.proc = None


@pytest.mark.mqtt
def test_mqtt_broker_down_inspection_goes_on_and_every_message_arrives(store: ResultStore,
                                                                      tmp_path: Path) -> None:
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker")
    broker.start()
    prefix = "line"
    sub = Subscriber("127.0.0.1", broker.port, prefix, client_id=f"sub-{os.getpid()}", clean=False)
    box = outbox_for(store, "mqtt")
    sink = MqttSink(f"mqtt://127.0.0.1:{broker.port}/{prefix}")
    disp = Dispatcher(box, [sink], poll_s=0.05)
    disp.start()
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        before = {r.id for r in store.insert_many([record(i) for i in range(5)])}
        wait_for(lambda: sub.record_ids() == before, what="the first five")
        broker.stop()
        wait_for(lambda: not sink.ready(), 15, "the sink to notice the broker is gone")
        during = {store.insert(record(10 + i)).id for i in range(10)}  # inspection goes on
        assert store.count() == 15 and box.pending("mqtt") == 10
        broker.start()
        wait_for(lambda: sub.record_ids() == before | during, 60,
                 f"every message after the restart (sink ready {sink.ready()}, "
                 f"outbox {box.pending('mqtt')}, seen {sorted(sub.record_ids())}, "
                 f"errors {disp.last_error})")
        wait_for(lambda: box.pending("mqtt") == 0, 10, "the outbox to drain")
    finally:
        disp.stop()
        sub.close()
        broker.stop()
    with store._reader() as conn:
        assert conn.execute(f"SELECT COUNT(*) FROM {DEAD_LETTERS}").fetchone()[0] == 0
        assert conn.execute(f"SELECT COUNT(*) FROM {OUTBOX}").fetchone()[0] == 0


# --------------------------------------------------------------------------- through the HTTP service
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_service_pushes_each_decision_and_a_drift_alarm_to_the_webhook(detector: Any, samples: Any,
                                                                              tmp_path: Path) -> None:
    receiver = Receiver(fail_first=1)
    data, ftype = samples.one("REJECT")
    try:
        async with running_app(detector, tmp_path, webhook_url=receiver.url, drift_window=5,
                               drift_min_parts=5, drift_level=0.01) as (client, state):
            ids = []
            for i in range(5):
                r = await client.post("/v1/inspect", params={"feature_type": ftype, "part_id": f"p{i}",
                                                             "line": "L1", "station": "S2"},
                                      content=data, headers=AUTH)
                assert r.status_code == 200 and r.json()["decision"] == "REJECT" and r.json()["line"] == "L1"
                ids.append(r.json()["id"])
            await asyncio.to_thread(wait_for, lambda: receiver.delivered_ids()[:5] == ids,
                                    30, "five decisions at the webhook")
            bodies = [b for s, _, b in receiver.requests if s == 200]
            assert all(b["line"] == "L1" and b["station"] == "S2" for b in bodies[:5])
            # five REJECTs in a window of five: the drift alarm for that type, pushed too
            await asyncio.to_thread(wait_for, lambda: any(b.get("kind") == "alarm" for _, _, b in
                                                          receiver.requests), 30, "the drift alarm")
            alarm = next(b for _, _, b in receiver.requests if b.get("kind") == "alarm")
            assert alarm["event"] == "drift_alarm" and alarm["feature_type"] == ftype
            line = (await client.get("/v1/line", headers=AUTH)).json()
            assert line["sinks"]["webhook"]["dead_letters"] == 0
            assert line["drift"][ftype]["alarm"] is True
            await asyncio.to_thread(wait_for, lambda: state.line.outbox.pending("webhook") == 0, 30, "drain")
            metrics = (await client.get("/metrics", headers=AUTH)).text
            assert 'diffqc_sink_delivered_total{sink="webhook"} 6' in metrics
            assert f'diffqc_drift_alarm{{feature_type="{ftype}"}} 1' in metrics
            assert (await client.post("/v1/sinks/nope/requeue", headers=AUTH)).status_code == 404
    finally:
        receiver.close()


@pytest.mark.anyio
async def test_the_described_webhooks_are_what_the_endpoint_receives(detector: Any, samples: Any,
                                                                    tmp_path: Path) -> None:
    """A MES developer writing the endpoint for `--webhook` had the messages' fields in docs/API.md
    only: the OpenAPI description now has them as `webhooks` (decision, part, alarm), which
    Swagger UI shows and a generator makes models of. Each message a service pushes (decisions, a
    part's verdict with `--push-parts`, a drift alarm; signed) conforms to its kind's schema with
    no field undescribed, and every header diffqc sets on it is described."""
    from tests.test_service_api import _conforms

    receiver = Receiver()
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    data, ftype = samples.one("REJECT")
    try:
        async with running_app(detector, tmp_path, webhook_url=receiver.url, push_parts="each",
                               webhook_secrets=(secret,), drift_window=5, drift_min_parts=5,
                               drift_level=0.01) as (client, _):
            for i in range(5):
                r = await client.post("/v1/inspect", params={"feature_type": ftype, "part_id": f"p{i}",
                                                             "camera": "c1"}, content=data, headers=AUTH)
                assert r.status_code == 200
            kinds = {"decision", "part", "alarm"}
            await asyncio.to_thread(wait_for, lambda: kinds <= {b["kind"] for _, _, b in receiver.requests},
                                    30, "a message of each kind")
            schema = (await client.get("/openapi.json")).json()
    finally:
        receiver.close()
    assert set(schema["webhooks"]) == kinds
    components = schema["components"]["schemas"]
    for _, headers, body in receiver.requests:
        hook = schema["webhooks"][headers["X-Diffqc-Kind"]]["post"]
        assert hook["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            {"decision": "DecisionMessage", "part": "PartMessage", "alarm": "AlarmMessage"}[body["kind"]])
        answer = hook["requestBody"]["content"]["application/json"]["schema"]
        assert _conforms(body, answer, components) == [], body
        described = {p["name"].lower() for p in hook["parameters"]}
        own = {h.lower() for h in headers} & {h.lower() for h in OWN_HEADERS} - {"content-type"}
        assert "webhook-signature" in own and own <= described, own - described
    assert _conforms({**body, "kind": "other"}, answer, components)  # the check finds a wrong value


def test_webhook_headers_as_given_or_read_from_a_file(tmp_path: Path) -> None:
    """`--webhook-header 'Authorization: Bearer ...'` (repeatable), or `@FILE` for header lines
    kept in a secret file (curl's -H @file); a malformed one is named by its place, never by
    its value (a secret), and diffqc's own headers are not replaced."""
    secret = tmp_path / "mes_headers"
    secret.write_text("Authorization: Bearer s3cr3t-token\n\nX-Plant:  Hall 4 \n")
    assert webhook_headers(["X-Line: L1", f"@{secret}"]) == {
        "X-Line": "L1", "Authorization": "Bearer s3cr3t-token", "X-Plant": "Hall 4"}
    assert webhook_headers([]) == {}
    for bad, message in (("Authorization Bearer s3cr3t", "--webhook-header 1 is not 'Name: value'"),
                         (": s3cr3t", "--webhook-header 1 is not 'Name: value'"),
                         ("Bad Name: s3cr3t", "--webhook-header 1 is not 'Name: value'"),
                         ("Content-Type: text/plain", "Content-Type is set by diffqc"),
                         ("idempotency-key: 1", "Idempotency-Key is set by diffqc"),
                         ("X-Diffqc-Kind: x", "X-Diffqc-Kind is set by diffqc"),
                         # an en dash pasted from a document: HTTP sends Latin-1 only, and every
                         # push failed on it, each decision dead-lettered after 8 tries
                         ("X-Line: Linie 3 \u2013 s3cr3t", "--webhook-header 1 holds a character HTTP "
                                                           "headers cannot carry (not Latin-1:"),
                         (f"@{tmp_path / 'missing'}", "cannot read --webhook-header @")):
        with pytest.raises(ConfigError) as info:
            webhook_headers([bad])
        assert message in str(info.value) and "s3cr3t" not in str(info.value), (bad, info.value)
    secret.write_text("Authorization: Bearer s3cr3t\nnot a header line\n")
    with pytest.raises(ConfigError, match="line 2 of") as info:
        webhook_headers([f"@{secret}"])
    assert "s3cr3t" not in str(info.value)


@pytest.mark.anyio
async def test_service_sends_the_webhook_headers_given(detector: Any, samples: Any, tmp_path: Path) -> None:
    """A MES endpoint wants its token in a header: every push carries the headers given."""
    receiver = Receiver()
    data, ftype = samples.one("PASS")
    try:
        headers = ("Authorization: Bearer mes-token-0123456789",)
        async with running_app(detector, tmp_path, webhook_url=receiver.url,
                               webhook_headers=headers) as (client, _):
            r = await client.post("/v1/inspect", params={"feature_type": ftype}, content=data, headers=AUTH)
            assert r.status_code == 200
            await asyncio.to_thread(wait_for, lambda: receiver.delivered_ids() == [r.json()["id"]],
                                    30, "the decision at the webhook")
    finally:
        receiver.close()
    _, headers, _ = receiver.requests[0]
    assert headers["Authorization"] == "Bearer mes-token-0123456789"
    assert headers["Content-Type"] == "application/json"


@pytest.mark.anyio
@pytest.mark.mqtt
async def test_service_publishes_each_decision_over_mqtt(detector: Any, samples: Any, tmp_path: Path) -> None:
    base = parse_mqtt_url(mqtt_url())
    prefix = _unique_prefix("svc")
    sub = await asyncio.to_thread(Subscriber, base.host, base.port, prefix)
    data, ftype = samples.one("PASS")
    try:
        async with running_app(detector, tmp_path, mqtt_url=f"mqtt://{base.host}:{base.port}/{prefix}",
                               push_parts="each") as (client, _):
            r = await client.post("/v1/inspect", params={"feature_type": ftype, "camera": "c1"}, content=data,
                                  headers=AUTH)
            assert r.status_code == 200
            rid = r.json()["id"]
            await asyncio.to_thread(wait_for, lambda: sub.record_ids() == {rid}, 30, "the decision over MQTT")
            # --push-parts: a part's two crops in one batch, its verdict once under parts/<part id>
            b = await client.post("/v1/inspect/batch", headers=AUTH,
                                  data={"part_id": "P-9", "feature_type": ftype},
                                  files=[("image", (f"{i}.png", data, "image/png")) for i in range(2)])
            assert b.status_code == 200, b.text
            await asyncio.to_thread(wait_for, lambda: len(sub.on(f"{prefix}/parts/P-9")) == 1, 30,
                                    "the part's verdict over MQTT")
        payload, *batch = sub.on(f"{prefix}/decisions/{ftype}")
        assert len(batch) == 2  # the batch's two crops
        body = json.loads(payload)
        assert body["record_id"] == rid and body["decision"] == r.json()["decision"]
        assert body["camera"] == "c1" and body["kind"] == "decision"
        part = json.loads(sub.on(f"{prefix}/parts/P-9")[0])
        crops = b.json()["results"]
        assert (part["kind"], part["part_id"], part["record_id"]) == ("part", "P-9", crops[1]["id"])
        assert {k: part[k] for k in b.json()["parts"][0]} == b.json()["parts"][0]  # as the answer's
        await asyncio.to_thread(wait_for, lambda: sub.on(f"{prefix}/status")[-1:] == [b"offline"], 10,
                                "offline after the service stopped")
    finally:
        sub.client.publish(f"{prefix}/status", b"", qos=1, retain=True).wait_for_publish(5)
        sub.close()


# --------------------------------------------------------------------------- PostgreSQL
@pytest.mark.postgres
def test_outbox_dead_letters_retention_and_migration_on_postgres(tmp_path: Path) -> None:
    """The same SQL on PostgreSQL: an old table gains the new columns, the outbox commits with
    the records, a webhook delivers and dead-letters, retention notes an expiry."""
    import uuid
    from urllib.parse import quote

    import numpy as np

    from diffqc.service.retention import RetentionPolicy, apply_retention
    from diffqc.service.store import ArtifactStore

    url = os.environ.get("DIFFQC_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DIFFQC_TEST_POSTGRES_URL is unset: start one with scripts/start_postgres.sh")
    import psycopg

    schema = f"diffqc_h5_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.diffqc_results (id BIGINT GENERATED BY DEFAULT AS IDENTITY "
                     "PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, source TEXT NOT NULL, decision TEXT "
                     "NOT NULL, part_id TEXT, feature_type TEXT, predicted_type TEXT, type_known INTEGER, "
                     "score DOUBLE PRECISION, p_value DOUBLE PRECISION, "
                     "model_version TEXT NOT NULL DEFAULT '', "
                     "latency_ms DOUBLE PRECISION, heatmap TEXT, image TEXT, reason TEXT, type_scores TEXT, "
                     "dedup_key TEXT, review TEXT, reviewed_at DOUBLE PRECISION, reviewer TEXT, "
                     "review_note TEXT, UNIQUE (source, dedup_key))")
        conn.execute(f"INSERT INTO {schema}.diffqc_results (created_at, source, decision) "
                     "VALUES (1, 'old', 'PASS')")
    sep = "&" if "?" in url else "?"
    pg = f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    receiver = Receiver(fail_first=1)
    bad = Receiver(always_fail=True, status=500)
    try:
        with ResultStore(pg) as store:
            assert store.query(source="old")[0].line is None  # migrated, old row intact
            box = outbox_for(store, "webhook")
            disp = Dispatcher(box, [WebhookSink(receiver.url, backoff_base_s=0.01)], poll_s=0.02)
            disp.start()
            try:
                rec = store.insert(record(1))
                wait_for(lambda: receiver.delivered_ids() == [rec.id], what="delivery from PostgreSQL")
            finally:
                disp.stop()
            store.insert_hooks.clear()
            box2 = outbox_for(store, "webhook")
            disp = Dispatcher(box2, [WebhookSink(bad.url, backoff_base_s=0.01, max_attempts=2)], poll_s=0.02)
            disp.start()
            try:
                store.insert(record(2))
                wait_for(lambda: box2.dead("webhook") == 1, what="a dead letter in PostgreSQL")
            finally:
                disp.stop()
            artifacts = ArtifactStore(tmp_path / "data")
            heat = artifacts.save_png("heatmaps", np.zeros((8, 8, 3), np.uint8))
            kept = store.insert(ResultRecord(created_at=time.time() - 1000, source="t", decision="REJECT",
                                             heatmap=heat, line="L1"))
            assert apply_retention(store, artifacts, RetentionPolicy(max_age_s=10))["expired"] == 1
            got = store.get(kept.id)  # type: ignore[arg-type]
            assert got is not None and got.heatmap is None and got.heatmap_expired_at is not None
            assert [r.id for r in store.query(line="L1")] == [kept.id]
            push_parts_contract(store)
    finally:
        receiver.close()
        bad.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.mqtt
def test_mqtts_to_a_broker_whose_certificate_an_internal_ca_signed(
        store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A line's broker on mqtts:// with a certificate its own CA signed: the sink never
    connected and the log said nothing of why (paho retries the handshake in silence). Each
    reason a connection fails is logged once, the certificate's with the way to trust its CA
    (OpenSSL's SSL_CERT_FILE), and with it set the messages arrive."""
    import logging

    import trustme

    mqtt_url()  # the same switch as the other broker tests
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    broker = Broker(tmp_path / "broker", tls=ca.issue_cert("127.0.0.1"))
    broker.start()
    box = outbox_for(store, "mqtt")
    url = f"mqtts://127.0.0.1:{broker.port}/line"
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        sink = MqttSink(url)
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            sink.start()
            try:
                wait_for(lambda: "unreachable" in caplog.text, 15, "the failed handshake logged")
                time.sleep(3)  # the client retries every 1 to 5 s
            finally:
                sink.stop()
        failures = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(failures) == 1, failures  # once, not at every retry
        assert "certificate verify failed" in failures[0] and "SSL_CERT_FILE=" in failures[0]
        assert not sink.ready()
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        _one_message_acknowledged(store, box, url)
    finally:
        broker.stop()


@pytest.mark.mqtt
def test_mqtts_with_the_client_certificate_a_broker_requires(
        store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that lets in only clients with a certificate its CA signed (Mosquitto's
    ``require_certificate``, AWS IoT Core, a plant's PKI): the sink had no way to present one and
    never connected. ``--mqtt-cert`` (and ``--mqtt-key``) give it, checked before anything
    starts: an mqtt:// URL, a key not the certificate's, an encrypted key are named. The same over
    MQTT over WebSockets (wss://, the broker's WebSocket listener requiring one too)."""
    import trustme

    mqtt_url()  # the same switch as the other broker tests
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    ws = free_port()
    required = f"cafile {tmp_path}/ca.pem\nrequire_certificate true\n"
    broker = Broker(tmp_path / "broker", tls=ca.issue_cert("127.0.0.1"), extra=(
        f"{required}listener {ws} 127.0.0.1\nprotocol websockets\ncertfile {tmp_path}/broker/cert.pem\n"
        f"keyfile {tmp_path}/broker/key.pem\n{required}"))
    broker.start()
    client, other = ca.issue_cert("line-3"), ca.issue_cert("line-4")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "line.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "line.key"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    url = f"mqtts://127.0.0.1:{broker.port}/line"
    over_ws = f"wss://127.0.0.1:{ws}/mqtt?prefix=line"
    try:
        without = [MqttSink(url), MqttSink(over_ws)]
        for sink in without:
            sink.start()
        try:
            time.sleep(3)
            assert not any(sink.ready() for sink in without)  # the broker ends the handshake
        finally:
            for sink in without:
                sink.stop()
        box = outbox_for(store, "mqtt")
        for each in (url, over_ws):
            _one_message_acknowledged(store, box, each, client_cert=tmp_path / "line.pem",
                                      client_key=tmp_path / "line.key")
    finally:
        broker.stop()
    with pytest.raises(ConfigError, match=r"--mqtt-cert needs an mqtts:// \(or wss://\) broker URL"):
        MqttSink(f"mqtt://127.0.0.1:{broker.port}/line", client_cert=tmp_path / "line.pem")
    with pytest.raises(ConfigError, match=f"{tmp_path}/other.key is not the key of {tmp_path}/line.pem"):
        MqttSink(url, client_cert=tmp_path / "line.pem", client_key=tmp_path / "other.key")
    from diffqc.service.app import ServiceSettings  # serve's options, checked before the model loads

    with pytest.raises(ConfigError, match=r"present a certificate to the MQTT broker: .*line\.key holds no"):
        ServiceSettings(mqtt_url=url, mqtt_cert=tmp_path / "line.key", allow_no_token=True).validate()


def _one_message_acknowledged(store: ResultStore, box: Outbox, url: str, *,
                              settled: Callable[[], bool] | None = None, **sink_opts: Any) -> None:
    """A sink on ``url`` connects, and a stored part's message is acknowledged by the broker (or
    ``settled`` holds), its eight tries at once."""
    sink = MqttSink(url, **sink_opts)
    sink.backoff = lambda attempts: 0.01  # type: ignore[method-assign]
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        store.insert_many([record(1)])
        wait_for(settled or (lambda: box.pending("mqtt") == 0), 30, "the message acknowledged or refused")
    finally:
        disp.stop()


@pytest.mark.mqtt
def test_mqtt_over_websockets_as_a_broker_behind_port_443_takes_it(store: ResultStore, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A plant whose firewall lets only HTTPS out reaches its cloud broker by MQTT over WebSockets
    (``wss://broker:443/mqtt``, the URL the broker's console gives): `--mqtt wss://...` was
    refused at start as no mqtt:// or mqtts:// URL. ``ws://`` and ``wss://`` URLs are taken as
    the broker gives them, the path the WebSocket's (default ``/mqtt``), the topic prefix in
    ``?prefix=``: the decisions arrive under it, over TLS too (a real Mosquitto's WebSocket
    listeners; a subscriber on its MQTT port)."""
    import trustme

    mqtt_url()  # the same switch as the other broker tests
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "ws.pem"))
    ws, wss = free_port(), free_port()
    pem = tmp_path / "ws.pem"
    broker = Broker(tmp_path / "broker", extra=(
        f"listener {ws} 127.0.0.1\nprotocol websockets\n"
        f"listener {wss} 127.0.0.1\nprotocol websockets\ncertfile {pem}\nkeyfile {pem}\n"))
    broker.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    target = parse_mqtt_url("wss://u@127.0.0.1/?prefix=/plant/line-1/")
    assert (target.websocket_path, target.prefix, target.username) == ("/", "plant/line-1", "u")
    target = parse_mqtt_url("wss://broker.example.com/mqtt")
    assert (target.port, target.tls, target.websocket_path, target.prefix) == (443, True, "/mqtt", "diffqc")
    assert parse_mqtt_url("ws://broker.example.com").websocket_path == "/mqtt"
    with pytest.raises(ConfigError, match=r"takes no query parameter 'topic' \(only prefix="):
        parse_mqtt_url("wss://broker.example.com/mqtt?topic=plant")
    with pytest.raises(ConfigError, match=r"may not contain '\+' or '#'"):  # not read as a space
        parse_mqtt_url("wss://broker.example.com/mqtt?prefix=plant+1")
    assert parse_mqtt_url("wss://h/mqtt?prefix=plant%2Fline%201").prefix == "plant/line 1"
    sub = Subscriber("127.0.0.1", broker.port, "plant/line-1")
    box = outbox_for(store, "mqtt")
    try:
        for url in (f"ws://127.0.0.1:{ws}/mqtt?prefix=plant/line-1",
                    f"wss://127.0.0.1:{wss}/mqtt?prefix=plant/line-1"):
            _one_message_acknowledged(store, box, url)
        wait_for(lambda: len(sub.on("plant/line-1/decisions/stripes")) == 2, 15, "both decisions")
        assert {json.loads(p)["record_id"] for p in sub.on("plant/line-1/decisions/stripes")} == {1, 2}
    finally:
        sub.close()
        broker.stop()


@pytest.mark.mqtt
def test_mqtt_password_from_a_secret_file(store: ResultStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A broker that wants a user and a password: in the --mqtt URL the password is read by
    anyone who may run `ps`. DIFFQC_MQTT_PASSWORD_FILE gives it from a file (a Docker secret)
    for the user the URL names; a wrong one is the broker's refusal in the log, once however
    often the sink tries again (it was said at every retry, 720 lines an hour), the password
    itself in no message; the sink's own stop is not logged as the broker disconnecting."""
    import logging

    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", users={"line": "s3cr3t-pw"})
    broker.start()
    secret = tmp_path / "mqtt_password"
    secret.write_text("s3cr3t-pw\n")
    monkeypatch.setenv("DIFFQC_MQTT_PASSWORD_FILE", str(secret))
    url = f"mqtt://line@127.0.0.1:{broker.port}/line"
    assert parse_mqtt_url(url).password == "s3cr3t-pw"
    box = outbox_for(store, "mqtt")
    try:
        _one_message_acknowledged(store, box, url)
        secret.write_text("wrong-pw\n")
        sink = MqttSink(url)
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            sink.start()
            try:
                wait_for(lambda: "refused the connection" in caplog.text, 15, "the refusal logged")
                log = broker.folder / "broker.log"
                wait_for(lambda: log.read_text().count("not authorised") >= 3, 30, "two more tries")
            finally:
                sink.stop()
        assert not sink.ready() and "wrong-pw" not in caplog.text
        assert caplog.text.count("refused the connection") == 1
        assert "disconnected" not in caplog.text  # a sink's own stop is no outage (was a warning)
    finally:
        broker.stop()
    monkeypatch.setenv("DIFFQC_MQTT_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read DIFFQC_MQTT_PASSWORD_FILE"):
        parse_mqtt_url(url)
    monkeypatch.setenv("DIFFQC_MQTT_PASSWORD_FILE", str(secret))
    with pytest.raises(ConfigError, match="needs the user name in the MQTT URL"):
        parse_mqtt_url(f"mqtt://127.0.0.1:{broker.port}/line")
    with pytest.raises(ConfigError) as info:  # a URL's own password is not echoed in its error
        parse_mqtt_url("mqtt://line:s3cr3t-pw@127.0.0.1:bad/line")
    assert "s3cr3t-pw" not in str(info.value)


def _retrying_at_once(store: ResultStore, url: str, **sink_opts: Any) -> tuple[Outbox, MqttSink, Dispatcher]:
    """A started delivery of ``store``'s messages to the broker at ``url``, its eight tries at once."""
    box = outbox_for(store, "mqtt")
    sink = MqttSink(url, **sink_opts)
    sink.backoff = lambda attempts: 0.01  # type: ignore[method-assign]
    disp = Dispatcher(box, [sink], poll_s=0.02)
    disp.start()
    return box, sink, disp


@pytest.mark.mqtt
def test_a_message_the_brokers_access_list_refuses_is_dead_lettered_not_lost(
        store: ResultStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker whose access list lets the line's user publish its status but not its
    decisions: over MQTT 3.1.1 the broker acknowledged each decision and dropped it, and the
    sink counted it delivered. Over MQTT 5 its PUBACK says ``Not authorized``: the message is
    retried, dead-lettered (kept, named in the log with the topic) and resent once requeued."""
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", users={"line": "pw"},
                    acl="user line\ntopic readwrite line/status\n")
    broker.start()
    box, sink, disp = _retrying_at_once(store, f"mqtt://line:pw@127.0.0.1:{broker.port}/line")
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        rec = store.insert(record(1))
        wait_for(lambda: box.dead("mqtt") == 1, 30, "the refused message dead-lettered")
        (dead,) = box.dead_letters("mqtt")
        assert dead["record_id"] == rec.id and dead["attempts"] == 8
        assert "refused the message on line/decisions/stripes: Not authorized" in dead["last_error"]
        assert disp.delivered_total["mqtt"] == 0 and box.pending("mqtt") == 0
    finally:
        disp.stop()
        broker.stop()
    assert "Not authorized" in caplog.text


@pytest.mark.mqtt
def test_a_message_larger_than_the_broker_takes_is_dead_lettered_and_the_others_go_on(
        store: ResultStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that takes packets up to a size (Mosquitto's ``max_packet_size``, an edge
    broker's guard) says so in its CONNACK. A message larger than that was sent anyway: the
    broker dropped the connection, and paho sent it again at every reconnect, so no message
    after it arrived, ever, and the log said the disconnect every second. It is refused before
    it is sent, retried, dead-lettered naming both sizes; the line's other messages arrive."""
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", extra="max_packet_size 600\n")
    broker.start()
    box, sink, disp = _retrying_at_once(store, f"mqtt://127.0.0.1:{broker.port}/line")
    big = record(1)
    big.part_id = "p" * 200  # about 700 bytes of JSON: a part id as long as one may be
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        rec = store.insert(big)
        store.insert_many([record(2), record(3)])
        wait_for(lambda: disp.delivered_total["mqtt"] == 2, 30, "the messages after the large one")
        wait_for(lambda: box.dead("mqtt") == 1, 30, "the large message dead-lettered")
        (dead,) = box.dead_letters("mqtt")
        assert dead["record_id"] == rec.id and dead["attempts"] == 8
        assert "the broker takes packets of up to 600 bytes" in dead["last_error"]
        assert box.pending("mqtt") == 0 and sink.ready()
    finally:
        disp.stop()
        broker.stop()
    assert "oversize" not in (broker.folder / "broker.log").read_text()
    assert "disconnected" not in caplog.text


@pytest.mark.mqtt
def test_the_client_id_a_brokers_access_list_names_is_given(store: ResultStore, tmp_path: Path) -> None:
    """A broker whose access list lets a client publish under its own client id (Mosquitto's
    ``pattern write %c/#``; AWS IoT Core's policies name the thing's client id): the sink's was
    random, so every message was refused. ``--mqtt-client-id`` gives the one the broker knows."""
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", users={"line": "pw"}, acl="pattern readwrite %c/#\n")
    broker.start()
    url = f"mqtt://line:pw@127.0.0.1:{broker.port}/line-3"
    box = outbox_for(store, "mqtt")
    try:  # a random client id: refused, dead-lettered
        _one_message_acknowledged(store, box, url, settled=lambda: box.dead("mqtt") == 1)
        assert box.requeue_dead("mqtt") == 1
        _one_message_acknowledged(store, box, url, client_id="line-3")  # it and the requeued one
        assert box.dead("mqtt") == 0
    finally:
        broker.stop()
    from diffqc.service.app import ServiceSettings  # serve's option, checked before the model loads

    with pytest.raises(ConfigError, match="--mqtt-client-id needs --mqtt"):
        ServiceSettings(mqtt_client_id="line-3", allow_no_token=True).validate()


@pytest.mark.mqtt
def test_two_services_given_one_client_id_are_said_once_not_every_second(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two services given the same ``--mqtt-client-id`` (a unit file copied to a second
    station): the broker ends one's connection when the other connects, each reconnects within a
    second, and each disconnect was a warning: one a second, for ever. The first is said, then,
    at the third connection ended within seconds of being made, what the likely cause is."""
    import logging

    base = parse_mqtt_url(mqtt_url())
    url = f"mqtt://{base.host}:{base.port}/{_unique_prefix('twin')}"
    first, second = MqttSink(url, client_id="line-3"), MqttSink(url, client_id="line-3")
    with caplog.at_level(logging.WARNING, logger="diffqc"):
        first.start()
        try:
            wait_for(first.ready, 15, "the first to connect")
            second.start()
            wait_for(lambda: "client id 'line-3'" in caplog.text, 20, "the likely cause said")
            time.sleep(3)
        finally:
            first.stop()
            second.stop()
    said = [r.getMessage() for r in caplog.records]
    assert sum("disconnected" in m for m in said) <= 2, said  # each sink's first, not one a second
    assert sum("client id 'line-3'" in m for m in said) <= 2, said  # once per sink


class _GatedProxy:
    """A TCP proxy in front of the broker that, once :meth:`hold_answers` is called, holds the
    broker's bytes to the client until the client has sent ``until`` more bytes (or 30 s): the
    acknowledgements of a far broker, on their way while later messages already are."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = (host, port)
        self.sent = 0  # the client's bytes since the hold began
        self.until: int | None = None
        self.changed = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_answers(self, until: int) -> None:
        with self.changed:
            self.sent, self.until = 0, until

    def release(self) -> None:
        with self.changed:
            self.until = None
            self.changed.notify_all()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                broker = socket.create_connection(self.target)
                threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(broker, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self.changed:
                    if upstream:
                        self.sent += len(data)
                        self.changed.notify_all()
                    else:
                        self.changed.wait_for(lambda: self.until is None or self.sent >= self.until, 30)
                        self.until = None
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.mqtt
def test_mqtt_messages_go_out_without_waiting_for_each_ones_acknowledgement(store: ResultStore) -> None:
    """Each message waited for its acknowledgement before the next was sent: one message per
    round trip, so a broker 50 ms away took 19 a second (measured, 200 through a proxy delaying
    25 ms each way), fewer than a line of 8 types at 2 parts a second makes, and the outbox grew
    without end. Messages now go out together (up to the broker's in-flight window) and their
    acknowledgements are waited for as they come. Here the broker's answers are held until ten
    messages have passed: one at a time, the first waited in vain, failed and was sent again."""
    base = parse_mqtt_url(mqtt_url())
    proxy = _GatedProxy(base.host, base.port)
    box, sink, disp = _retrying_at_once(store, f"mqtt://127.0.0.1:{proxy.port}/{_unique_prefix('window')}")
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        proxy.hold_answers(until=10 * 300)  # ten decisions' bytes (each is more)
        store.insert_many([record(i) for i in range(20)])
        wait_for(lambda: box.pending("mqtt") == 0 and disp.delivered_total["mqtt"] == 20, 20,
                 "the twenty messages acknowledged")  # counted just after the outbox marks them
        assert disp.failures_total["mqtt"] == 0
    finally:
        disp.stop()
        proxy.close()


@pytest.mark.mqtt
def test_mqtt_messages_on_their_way_are_no_more_than_the_broker_takes(
        store: ResultStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that takes fewer messages on their way at once than paho sends (MQTT 5's Receive
    Maximum, said in its acknowledgement of the connection: Mosquitto's ``max_inflight_messages
    3``; HiveMQ's default is 10) may end a connection that sends more (a protocol error): the
    sink keeps to the broker's window, less one for its status. Here the broker's answers are
    held: the sink sends two messages and waits, then all forty arrive."""
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", extra="max_inflight_messages 3\n")
    broker.start()
    proxy = _GatedProxy("127.0.0.1", broker.port)
    try:
        box, sink, disp = _retrying_at_once(store, f"mqtt://127.0.0.1:{proxy.port}/line")
        try:
            wait_for(sink.ready, 15, "the sink to connect")
            proxy.hold_answers(until=1 << 30)
            store.insert_many([record(i) for i in range(40)])
            wait_for(lambda: proxy.sent > 0, 10, "the first messages sent")
            time.sleep(1.0)  # time to send more, were it to
            assert proxy.sent < 3 * 500, proxy.sent  # two messages of about 510 bytes, not nineteen
            proxy.release()
            wait_for(lambda: box.pending("mqtt") == 0, 20, "the forty messages acknowledged")
            assert disp.failures_total["mqtt"] == 0
        finally:
            disp.stop()
    finally:
        proxy.close()
        broker.stop()
    assert "disconnected" not in caplog.text


@pytest.mark.mqtt
def test_a_broker_that_keeps_no_retained_messages_is_published_to(
        store: ResultStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broker that keeps no retained messages (Mosquitto's ``retain_available false``, as
    some cloud and SCADA brokers run) refuses a connection whose last will is retained: the
    sink's was, so it never connected, and every decision waited in the outbox for good. It
    connects with a will not retained, says so once, and publishes its status, decisions and
    alarms without the retain flag (which such a broker refuses)."""
    mqtt_url()  # the same switch as the other broker tests
    broker = Broker(tmp_path / "broker", extra="retain_available false\n")
    broker.start()
    sub = Subscriber("127.0.0.1", broker.port, "line")
    box, sink, disp = _retrying_at_once(store, f"mqtt://127.0.0.1:{broker.port}/line")
    try:
        wait_for(sink.ready, 15, "the sink to connect")
        (rec,) = store.insert_many([record(1)])
        box.enqueue_alarm("stripes", {"alarm": True})
        wait_for(lambda: sub.on("line/alarms/stripes") != [], 15, "the alarm")
        assert sub.record_ids() == {rec.id} and sub.on("line/status") == [b"online"]
        # the broker forwards a message to subscribers before its PUBACK reaches the sink, and
        # the dispatcher counts a message just after the outbox marks it delivered
        wait_for(lambda: box.pending("mqtt") == 0 and disp.delivered_total["mqtt"] == 2, 15,
                 "the messages acknowledged")
    finally:
        disp.stop()
        sub.close()
        broker.stop()
    assert caplog.text.count("keeps no retained messages") == 1


@pytest.mark.mqtt
def test_a_broker_that_speaks_mqtt_3_1_1_only_is_published_to(store: ResultStore, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """amqtt, a broker that speaks MQTT 3.1.1 only (and, given a version 5 CONNECT with a will,
    waits instead of refusing the version): the sink tries 3.1.1 once a connection ends
    unaccepted, says once that a refused message cannot be told there, and every message
    arrives."""
    mqtt_url()  # the same switch as the other broker tests
    port = free_port()
    conf = tmp_path / "amqtt.yaml"
    conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                    "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n")
    amqtt = shutil.which("amqtt", path=str(Path(sys.executable).parent)) or shutil.which("amqtt")
    if amqtt is None:
        pytest.skip("amqtt is not installed (pip install -e '.[dev]')")
    proc = subprocess.Popen([amqtt, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    box = outbox_for(store, "mqtt")
    sink = MqttSink(f"mqtt://127.0.0.1:{port}/line", keepalive_s=2)  # a stalled try ends in seconds
    disp = Dispatcher(box, [sink], poll_s=0.05)
    try:
        wait_for(lambda: _listening(port), 30, "amqtt to listen")
        subscriber = Subscriber("127.0.0.1", port, "line", client_id="reader")
        with caplog.at_level(logging.INFO, logger="diffqc"):
            disp.start()
            wait_for(sink.ready, 60, "the sink to connect")
            store.insert_many([record(i) for i in range(3)])
            wait_for(lambda: box.pending("mqtt") == 0, 15, "the messages acknowledged")
        wait_for(lambda: len(subscriber.record_ids()) == 3, 15, "the messages to arrive")
        subscriber.close()
    finally:
        disp.stop()
        proc.terminate()
        proc.wait(10)
    assert caplog.text.count("speaks MQTT 3.1.1, not 5") == 1


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.anyio
async def test_pushed_parts_follow_a_retrained_models_types(service_model: tuple[Path, Path], samples: Any,
                                                            tiny_model: Path, clear_dataset: Path,
                                                            tmp_path: Path) -> None:
    """A part's `missing` in the pushes names the types of the model the service inspects with:
    after a retrained bundle of other types is served (no restart), those of the new model."""
    from tests.test_service_common import bench

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    data, ftype = samples.one("PASS")
    async with running_app(None, tmp_path, model_path=served, webhook_url="http://127.0.0.1:9/hook",
                           push_parts="each") as (client, state):
        outbox = state.line.outbox
        first_types = list(state.classes)

        async def pushed_part(body: bytes, feature_type: str, part: str) -> dict[str, Any]:
            r = await client.post("/v1/inspect", content=body, headers=AUTH,
                                  params={"feature_type": feature_type, "part_id": part})
            assert r.status_code == 200, r.text
            rows = outbox.due(outbox.sinks[0], time.time() + 3600, limit=1000)
            return dict(json.loads([m for m in rows if m.kind == "part"][-1].payload))

        part = await pushed_part(data, ftype, "P-1")
        assert part["missing"] == [t for t in first_types if t != ftype]
        bench.retrain_into(served, tiny_model, "other-types")
        for _ in range(3):  # changed, settled, loaded
            state.line.check_model()
        assert state.classes == ["dots", "stripes"] != first_types
        stripes = next((clear_dataset / "stripes" / "test" / "good").iterdir()).read_bytes()
        part = await pushed_part(stripes, "stripes", "P-2")
        assert (part["missing"], part["complete"]) == (["dots"], False)


@pytest.mark.anyio
async def test_a_retrained_model_without_a_type_the_line_sends_is_said(
        service_model: tuple[Path, Path], samples: Any, tiny_model: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A model retrained without one of the types it inspected (a dataset folder left out) was
    served without a word: the line's images of that type were refused from then on (and
    `watch` took a folder of that name for no type). The log names the types it lost."""
    from tests.test_service_common import bench

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    data, ftype = samples.one("PASS")
    async with running_app(None, tmp_path, model_path=served) as (client, state):
        before = list(state.classes)
        bench.retrain_into(served, tiny_model, "other-types")
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            for _ in range(3):  # changed, settled, loaded
                state.line.check_model()
        lost = [t for t in before if t not in state.classes]
        assert ftype in lost
        said = [r.getMessage() for r in caplog.records if "types the model before it" in r.getMessage()]
        assert len(said) == 1 and all(t in said[0] for t in lost), said
        r = await client.post("/v1/inspect", content=data, headers=AUTH, params={"feature_type": ftype})
        assert r.status_code == 422 and r.json()["code"] == "unknown_feature_type"


@pytest.mark.anyio
async def test_a_lines_part_types_outlive_a_retrained_model(service_model: tuple[Path, Path], samples: Any,
                                                            tiny_model: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """With ``--part-types`` a part's `missing` in the pushes names the line's types, not the
    model's; a retrained model that lacks one of them is said in the log, and its parts still
    read it missing (the line still sends it)."""
    from tests.test_service_common import bench

    served = tmp_path / "model"
    shutil.copytree(service_model[0], served)
    data, ftype = samples.one("PASS")
    async with running_app(None, tmp_path, model_path=served, webhook_url="http://127.0.0.1:9/hook",
                           push_parts="each", part_types=(ftype,)) as (client, state):
        outbox = state.line.outbox
        r = await client.post("/v1/inspect", content=data, headers=AUTH,
                              params={"feature_type": ftype, "part_id": "P-1"})
        assert r.status_code == 200, r.text
        (part,) = [json.loads(m.payload) for m in outbox.due(outbox.sinks[0], time.time() + 3600, limit=1000)
                   if m.kind == "part"]
        assert (part["complete"], part["missing"]) == (True, [])  # not the model's other types
        bench.retrain_into(served, tiny_model, "other-types")
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            for _ in range(3):  # changed, settled, loaded
                state.line.check_model()
        assert ftype not in state.classes
        assert f"the model now served does not know {ftype} of --part-types" in caplog.text
        assert outbox.types == [ftype] and state.part_types == [ftype]
