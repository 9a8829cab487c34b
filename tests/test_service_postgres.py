"""The result store and the service against a real PostgreSQL server.

Needs ``DIFFQC_TEST_POSTGRES_URL`` (``scripts/start_postgres.sh`` starts a local cluster and
prints one); skipped when unset. Each test works in its own schema, dropped afterwards.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from diffqc.errors import StoreError
from diffqc.service.store import ResultStore
from tests.test_service_common import (  # noqa: F401
    AUTH,
    Samples,
    detector,
    private_cluster,
    running_app,
    samples,
    service_model,
)
from tests.test_service_parts import overdue_parts_contract, overdue_resume_contract
from tests.test_service_units import _rec, part_order_contract, store_contract

URL = os.environ.get("DIFFQC_TEST_POSTGRES_URL")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not URL, reason="DIFFQC_TEST_POSTGRES_URL is not set"),
]


@pytest.fixture
def pg_url() -> Iterator[str]:
    import psycopg

    assert URL
    schema = f"diffqc_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in URL else "?"
    yield f"{URL}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_postgres_a_report_reads_the_store_with_the_documented_sql(pg_url: str) -> None:
    """docs/API.md's "Reading the result store with SQL" as a plant's reporting tool runs it: the
    tables and columns it names are the store's, the role it creates reads them and writes
    nothing, and its queries answer what they say (the hourly share flagged as the summary
    counts it, the escapes, a record's verdicts in order)."""
    import datetime as dt
    import math
    import time

    import psycopg

    from diffqc.service.store import summarize
    from tests.test_api_doc import sql_blocks, store_columns_documented

    role_sql, hourly, escapes, trail = sql_blocks()
    now = time.time()
    h1 = math.floor(now / 3600) * 3600 - 3600  # the hour before this one, and the one before it
    h0 = h1 - 3600
    day = 86400.0
    rows = [("a1", "PASS", "a", h1 + 10), ("a2", "PASS", "a", h1 + 20), ("a3", "REVIEW", "a", h1 + 30),
            ("a4", "REJECT", "a", h1 + 40), ("b1", "REVIEW", "b", h1 + 50),
            ("b2", "NOT_INSPECTED", "b", h1 + 60), ("a0", "REVIEW", "a", h0 + 10),
            ("old", "REJECT", "a", now - 2 * day), ("older", "PASS", "a", now - 8 * day)]
    with ResultStore(pg_url) as store:
        ids = {r.part_id: r.id for r in store.insert_many(
            [_rec(part, decision, feature_type=t, created_at=at) for part, decision, t, at in rows])}
        store.set_review(ids["a1"], "BAD", "ann", "seen at the gate", "crack")  # an escape
        store.set_review(ids["older"], "BAD", "ann")  # an escape of last month: not this week's
        store.set_review(ids["a3"], "GOOD", "bob")
        store.set_review(ids["a3"], "BAD", "carl", defect="dent", replaces="GOOD")
        groups = dict(summarize(store.summary_counts(["feature_type"], since=h1, until=h1 + 3600), 1))
    schema = pg_url.split("search_path%3D", 1)[1]
    role = f"qc_reports_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        tables = ("diffqc_results", "diffqc_reviews")
        for table, documented in zip(tables, store_columns_documented(), strict=True):
            columns = conn.execute("SELECT column_name FROM information_schema.columns "
                                   "WHERE table_schema = %s AND table_name = %s", (schema, table)).fetchall()
            assert {c for (c,) in columns} == documented, table
        conn.execute(role_sql.replace("qc_reports", role).replace("SCHEMA public", f"SCHEMA {schema}"))
    try:
        reader = pg_url.replace("postgres@", f"{role}:change-me@", 1)
        with psycopg.connect(reader, autocommit=True) as conn:
            got = conn.execute(hourly).fetchall()
            assert [(t.timestamp(), ftype, share) for t, ftype, share in got] == [
                (h0, "a", 1.0), (h1, "a", 0.5), (h1, "b", 1.0)]  # b's part not inspected not counted
            assert got[1][0] == dt.datetime.fromtimestamp(h1, dt.UTC)
            assert [share for _, t, share in got[1:]] == [groups[(t,)]["flagged_share"] for t in ("a", "b")]
            found = conn.execute(escapes).fetchall()
            assert [(r[0], r[2], r[6], r[7], r[8]) for r in found] == [
                (ids["a1"], "a1", "ann", "crack", "seen at the gate")]
            verdicts = conn.execute(trail.replace("42", str(ids["a3"]))).fetchall()
            assert [(v[1], v[2], v[3]) for v in verdicts] == [("GOOD", "bob", None), ("BAD", "carl", "dent")]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE diffqc_results SET decision = 'PASS'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM diffqc_meta")  # the service's own
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_postgres_store_contract(pg_url: str) -> None:
    with ResultStore(pg_url) as store:
        assert store.postgres
        store_contract(store)
    with ResultStore(pg_url) as again:  # schema creation is idempotent
        assert again.count() == 7


def test_postgres_a_host_gone_silent_is_given_up_in_seconds_not_minutes(pg_url: str) -> None:
    """A database host that stops answering (power cut, a switch down: no reset reaches the
    service) held the service's store connection, and with it every part sent, until the kernel
    gave up on the unanswered packets: drilled with the database's replies dropped on a virtual
    link, a part waited more than 10 minutes (tcp_retries2's 15 retransmissions) for its 503, and
    the line with it. The store's connections now carry TCP keepalives and a TCP user timeout, so
    a silent host is given up within about half a minute; the URL's own values are kept."""
    with ResultStore(pg_url) as store:
        given = {o.keyword.decode(): (o.val or b"").decode() for o in store._writer.pgconn.info}
    assert {k: given[k] for k in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                                  "tcp_user_timeout")} == {
        "keepalives": "1", "keepalives_idle": "15", "keepalives_interval": "5", "keepalives_count": "3",
        "tcp_user_timeout": "30000"}
    with ResultStore(f"{pg_url}&keepalives_idle=60&tcp_user_timeout=0") as store:
        given = {o.keyword.decode(): (o.val or b"").decode() for o in store._writer.pgconn.info}
    assert (given["keepalives_idle"], given["tcp_user_timeout"], given["keepalives_count"]) == (
        "60", "0", "3")


def test_postgres_a_statement_timeout_is_named_with_what_to_do(pg_url: str) -> None:
    """A DBA's ``statement_timeout`` for the role (30 s, say) stopping a long read (`results list`
    over months) was said in the server's words alone ("canceling statement due to statement
    timeout"); the reason now names the setting and what to do."""
    import psycopg

    from diffqc.service.store import _db_reason

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 50")
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            conn.execute("SELECT pg_sleep(2)")
    said = ("canceling statement due to statement timeout (the server's statement_timeout, a limit a "
            "DBA sets for a role or database, stopped the query: give diffqc's role a longer one, ALTER "
            "ROLE name SET statement_timeout = '5min', or read a shorter period, --since/--until)")
    assert _db_reason(err.value) == said
    with psycopg.connect(pg_url, autocommit=True) as conn, pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM no_such_table")
    assert _db_reason(err.value) == 'relation "no_such_table" does not exist'
    # `results list` on a server slow to answer its first catalog lookup (a function of this
    # schema in front of pg_catalog stands for a busy server): a psycopg traceback, before
    ResultStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        (schema,) = conn.execute("SELECT current_schema()").fetchone()
        conn.execute(f"CREATE FUNCTION {schema}.to_regclass(text) RETURNS regclass LANGUAGE sql AS "
                     "'SELECT pg_catalog.to_regclass($1) FROM pg_catalog.pg_sleep(1)'")
    slow = f"{URL}{'&' if '?' in (URL or '') else '?'}options=" + quote(
        f"-csearch_path={schema},pg_catalog -cstatement_timeout=100")
    with pytest.raises(StoreError) as caught:
        ResultStore(slow, read_only=True)
    assert str(caught.value) == f"cannot read the result store: {said}"


def test_postgres_records_by_part(pg_url: str) -> None:
    with ResultStore(pg_url) as store:
        part_order_contract(store)


def test_postgres_overdue_parts(pg_url: str) -> None:
    with ResultStore(pg_url) as store:
        overdue_parts_contract(store)


def test_postgres_overdue_parts_resumed_after_a_restart(pg_url: str) -> None:
    with ResultStore(pg_url) as store:
        overdue_resume_contract(store)


def test_postgres_concurrent_writers_and_two_processes_schema(pg_url: str) -> None:
    import threading

    stores = [ResultStore(pg_url), ResultStore(pg_url)]  # e.g. serve + watch on one database
    try:

        def work(k: int) -> None:
            for i in range(20):
                stores[k % 2].insert(_rec(f"w{k}-{i}"))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert stores[0].count() == 80
        dup = stores[1].insert(_rec("x", source="watch:d", dedup_key="k"))
        again = stores[0].insert(_rec("x", source="watch:d", dedup_key="k"))
        assert again.duplicate and again.id == dup.id
    finally:
        for s in stores:
            s.close()


def test_postgres_two_stations_reviewing_one_record_at_once_get_a_conflict(pg_url: str) -> None:
    """Two stations on one store, two reviewers on one record at the same moment, each having
    seen it unreviewed: both read it before either wrote (READ COMMITTED, no lock), both got
    200, and the later verdict replaced the first unseen, where the stale-screen guard promises
    a 409. The write is made only where the record still holds the verdict its reviewer saw:
    the second is refused with the first's, and nothing of it is stored."""
    import threading

    from diffqc.service.store import ReviewConflict

    stores = [ResultStore(pg_url), ResultStore(pg_url)]
    seen = threading.Barrier(2, timeout=3)
    try:
        rid = stores[0].insert(_rec("P1", decision="REVIEW")).id
        assert rid is not None
        for store in stores:  # each pauses once it has read the record, until the other has too
            make = store._writer_conn

            class Paused:
                def __init__(self, conn: Any) -> None:
                    self.conn = conn

                def __getattr__(self, name: str) -> Any:
                    return getattr(self.conn, name)

                def execute(self, sql: str, *args: Any) -> Any:
                    cursor = self.conn.execute(sql, *args)
                    if sql.startswith("SELECT review, reviewed_at"):
                        with contextlib.suppress(threading.BrokenBarrierError):
                            seen.wait()
                    return cursor

            store._writer_conn = lambda make=make: Paused(make())  # type: ignore[method-assign]
        said: dict[str, str] = {}

        def give(store: ResultStore, who: str, verdict: str) -> None:
            try:
                rec = store.set_review(rid, verdict, who, replaces=None)
                said[who] = f"stored {rec.review if rec else None}"
            except ReviewConflict as exc:
                said[who] = f"conflict: {exc}"

        threads = [threading.Thread(target=give, args=(s, who, v))
                   for s, who, v in ((stores[0], "ann", "GOOD"), (stores[1], "bob", "BAD"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first, second = ("ann", "bob") if said["ann"].startswith("stored") else ("bob", "ann")
        assert said[first].startswith("stored") and said[second].startswith("conflict"), said
        assert f"was reviewed meanwhile: {'GOOD' if first == 'ann' else 'BAD'} by {first}" in said[second]
        rec = stores[0].get(rid)
        assert rec is not None and rec.reviewer == first
        assert [h["reviewer"] for h in stores[0].review_history(rid)] == [first]
    finally:
        for s in stores:
            s.close()


PGBOUNCER_URL = os.environ.get("DIFFQC_TEST_PGBOUNCER_URL")  # scripts/start_pgbouncer.sh


@pytest.fixture
def pgbouncer_url() -> Iterator[str]:
    """A database of its own on the test server, reached through PgBouncer in transaction
    pooling (which takes no ``options=-csearch_path``, so no schema of its own)."""
    import psycopg

    if not PGBOUNCER_URL:
        pytest.skip("DIFFQC_TEST_PGBOUNCER_URL is not set (scripts/start_pgbouncer.sh)")
    assert URL
    name = f"diffqc_b_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{PGBOUNCER_URL.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")  # PgBouncer's server connections too


def test_postgres_through_pgbouncer_in_transaction_pooling(pgbouncer_url: str) -> None:
    """A plant's DBA gives a PgBouncer's address (transaction pooling: each transaction on any of
    its server connections). psycopg prepares a statement on the server after its fifth run, so
    a store's next run of it, on another server connection, failed: `cannot read the result
    store: prepared statement "_pg3_0" already exists` (or `does not exist`), for services
    sharing the store and for one service's writer beside its readers. Statements are no longer
    prepared on the server."""
    import threading

    with ResultStore(pgbouncer_url) as store:
        store_contract(store)
    stores = [ResultStore(pgbouncer_url) for _ in range(3)]  # serve, watch, results list
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            for i in range(30):
                stores[k].insert(_rec(f"b{k}-{i}"))
                stores[k].query(limit=5)
                stores[k].count()
        except Exception as exc:
            errors.append(str(exc))

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert stores[0].count() == 7 + 90
    finally:
        for s in stores:
            s.close()


def test_postgres_results_list_with_a_role_that_may_only_read(pg_url: str) -> None:
    """A QC engineer given a PostgreSQL role that may only read the line's results (a common
    grant for reporting) was refused by `results list`: it created the tables first ("cannot
    create the result tables ...: permission denied"). The reading commands create nothing."""
    import json
    import subprocess
    import sys

    with ResultStore(pg_url) as store:
        store.insert_many([_rec("r1"), _rec("r2")])
    with role_of(pg_url, "SELECT ON ALL TABLES IN SCHEMA {schema}") as (reader, _, _):
        proc = subprocess.run([sys.executable, "-m", "diffqc.cli", "results", "list", "--db", reader],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sorted(json.loads(row)["part_id"] for row in proc.stdout.splitlines()) == ["r1", "r2"]


@contextlib.contextmanager
def role_of(pg_url: str, *grants: str) -> Iterator[tuple[str, str, str]]:
    """A new login role that may use the test's schema, and what ``grants`` give it (``{schema}``
    in them is its name): ``pg_url`` as that role, the role and the schema; dropped after."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    schema = pg_url.rsplit("search_path%3D", 1)[-1]
    role = f"role_{uuid.uuid4().hex[:8]}"
    assert URL
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        for grant in (f"USAGE ON SCHEMA {schema}", *grants):
            conn.execute(f"GRANT {grant.format(schema=schema)} TO {role}")
    parts = urlsplit(pg_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}")), role, schema
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_postgres_a_database_without_a_store_or_a_schema_to_make_one_is_named(pg_url: str) -> None:
    """A new PostgreSQL database given to `serve` under a role of its own (PostgreSQL 15 lets
    only the database's owner create tables in ``public``) was refused with the server's words
    alone (``permission denied for schema public``), and `results list` of a database `serve`
    never wrote to answered ``relation "diffqc_results" does not exist`` and its SQL. The first
    says what to grant; the second that the database holds no result store."""
    from diffqc.errors import StoreError

    with pytest.raises(StoreError, match=r"holds no diffqc result store \(no diffqc_results table"):
        ResultStore(pg_url, read_only=True)
    with role_of(pg_url) as (line, role, schema), pytest.raises(StoreError) as info:
        ResultStore(line)
    assert "permission denied for schema" in str(info.value)
    assert f"GRANT CREATE ON SCHEMA {schema} TO {role}" in str(info.value)
    assert "\n" not in str(info.value) and "LINE 1" not in str(info.value)


def test_postgres_a_read_only_server_or_role_is_named_with_what_to_give(pg_url: str) -> None:
    """`serve` pointed at a read-only PostgreSQL, a replica the DBA named for reports or a role
    set read-only: it said ``cannot execute CREATE TABLE in a read-only transaction`` and no
    more. It now says the session is read-only and what to give instead (a hot standby, the
    same drill on a real one: that it is a standby, its primary or both hosts with
    ``target_session_attrs=read-write`` so that a failover is followed)."""
    from diffqc.errors import StoreError

    read_only = pg_url.replace("options=", "options=-cdefault_transaction_read_only%3Don%20", 1)
    with pytest.raises(StoreError) as info:
        ResultStore(read_only)
    assert "read-only transaction" in str(info.value)
    assert "the session is read-only (default_transaction_read_only" in str(info.value)
    assert "give --db a role and database that may write" in str(info.value)


def test_postgres_bad_url_is_a_clear_error() -> None:
    from diffqc.errors import StoreError

    with pytest.raises(StoreError, match="cannot connect"):
        ResultStore("postgresql://nobody:pw@127.0.0.1:1/none")


@pytest.mark.anyio
async def test_service_on_postgres(detector: Any, samples: Samples, pg_url: str, tmp_path: Path) -> None:
    body, ftype = samples.one("REVIEW")
    async with running_app(detector, tmp_path, db_url=pg_url, data_dir=str(tmp_path / "art")) as (client, _):
        ids = []
        for i in range(3):
            r = await client.post(
                "/v1/inspect",
                content=body,
                headers=AUTH,
                params={"feature_type": ftype, "part_id": f"pg-{i}"},
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = await client.post(f"/v1/review/{ids[0]}", headers=AUTH, json={"verdict": "GOOD"})
        assert r.json()["review"] == "GOOD"
        # a NUL (PostgreSQL stores none) is the client's 422, not a store outage's 503; a note's
        # line breaks are kept
        r = await client.post(f"/v1/review/{ids[1]}", headers=AUTH, json={"verdict": "BAD", "note": "a\x00"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_note")
        r = await client.get("/v1/results", headers=AUTH, params={"line": "l\x00"})
        assert (r.status_code, r.json()["code"]) == (422, "bad_line")
        r = await client.post(f"/v1/review/{ids[1]}", headers=AUTH,
                              json={"verdict": "GOOD", "reviewer": "ann", "note": "scratch,\nnot a crack"})
        assert r.json()["review_note"] == "scratch,\nnot a crack"
        res = (await client.get("/v1/results", headers=AUTH, params={"decision": "REVIEW"})).json()
        assert sorted(x["id"] for x in res["results"]) == ids
        assert (await client.get(f"/v1/results/{ids[1]}/heatmap", headers=AUTH)).status_code == 200
        model = (await client.get("/v1/model", headers=AUTH)).json()
        assert model["service"]["store"].startswith("postgresql://")
    with ResultStore(pg_url) as store:
        assert store.count() == 3 and store.pending_reviews() == 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- database restart
@pytest.mark.anyio
async def test_postgres_restart_the_service_reconnects_without_losing_an_ack(
    detector: Any, samples: Samples, private_cluster: tuple[str, Any], tmp_path: Path
) -> None:
    """The database stops under a running service: inspections get 503 with a code, read
    routes 503 (never 500), /readyz 503 with the reason; once it is back the same service
    stores again (no restart), and every acknowledged part is in the table."""
    from diffqc.errors import StoreError

    url, ctl = private_cluster
    body, ftype = samples.one("PASS")
    params = {"feature_type": ftype}
    async with running_app(detector, tmp_path, db_url=url, data_dir=str(tmp_path / "art")) as (client, state):
        acked = []
        r = await client.post(
            "/v1/inspect", content=body, headers=AUTH, params={**params, "part_id": "before"}
        )
        assert r.status_code == 200
        acked.append(r.json()["id"])
        ctl("stop")
        r = await client.post(
            "/v1/inspect", content=body, headers=AUTH, params={**params, "part_id": "during"}
        )
        assert r.status_code == 503 and r.json()["code"] == "store_unavailable", r.text
        for path in ("/v1/results", "/v1/stats", "/metrics"):
            r = await client.get(path, headers=AUTH)
            assert r.status_code == 503 and r.json()["code"] == "store_unavailable", (path, r.text)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store"] is False, ready.text
        with pytest.raises(StoreError):
            state.store.insert(_rec("direct"))
        ctl("start")
        r = await client.post(
            "/v1/inspect", content=body, headers=AUTH, params={**params, "part_id": "after"}
        )
        assert r.status_code == 200, r.text
        acked.append(r.json()["id"])
        assert (await client.get("/readyz")).status_code == 200
        assert state.store.reconnects >= 1
        listed = (await client.get("/v1/results", headers=AUTH, params={"order": "oldest"})).json()
        assert [x["part_id"] for x in listed["results"]] == ["before", "after"]
        assert [x["id"] for x in listed["results"]] == acked


def test_postgres_restart_the_push_sinks_say_it_once_and_catch_up(
    private_cluster: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The database stops under a running dispatcher: it warned "cannot read the outbox" every
    poll (twice a second per sink, for as long as the database was down). It says so once, once
    more when it can read again, and delivers what was committed."""
    import logging
    import time

    from diffqc.service.sinks import Dispatcher, WebhookSink
    from tests.test_sinks import Receiver, outbox_for, record, wait_for

    url, ctl = private_cluster
    receiver = Receiver()
    try:
        with ResultStore(url) as store, caplog.at_level(logging.INFO, logger="diffqc.service.sinks"):
            box = outbox_for(store, "webhook")
            disp = Dispatcher(box, [WebhookSink(receiver.url, backoff_base_s=0.01)], poll_s=0.05)
            disp.start()
            try:
                (first,) = store.insert_many([record(1)])
                wait_for(lambda: receiver.delivered_ids() == [first.id], what="the first delivery")
                ctl("stop")
                time.sleep(2.0)  # ~40 polls against a database that is down
                ctl("start")
                wait_for(lambda: store.check_write() is None, what="the store back")
                (second,) = store.insert_many([record(2)])
                wait_for(lambda: receiver.delivered_ids() == [first.id, second.id], what="the catch-up")
            finally:
                disp.stop()
    finally:
        receiver.close()
    down = [r for r in caplog.records if "cannot read the outbox" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]
    assert any("can be read again" in r.getMessage() for r in caplog.records)


def test_postgres_restart_overdue_parts_are_pushed_once_it_is_back(
    private_cluster: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``--part-timeout`` while the database is down: the line's loop says so once (not every
    second), keeps the incomplete part, and pushes it as overdue once the database is back."""
    import json
    import logging
    import time
    from types import SimpleNamespace

    from diffqc.service.line import LineServices
    from diffqc.service.store import ResultRecord
    from tests.test_sinks import wait_for

    url, ctl = private_cluster
    settings = SimpleNamespace(webhook_url="http://127.0.0.1:9/hook", push_parts="complete",
                               part_timeout_s=0.3, calibration_poll_s=0.05)
    with ResultStore(url) as store, caplog.at_level(logging.INFO, logger="diffqc"):
        line = LineServices(settings, store, None, SimpleNamespace(classes_=["edge", "dots"]))
        line.start()
        try:
            assert line.outbox is not None
            store.insert(ResultRecord(created_at=time.time(), source="test", decision="PASS", part_id="Q-1",
                                      feature_type="edge", type_known=True))
            ctl("stop")
            time.sleep(1.5)  # ~30 polls against a database that is down, the part overdue meanwhile
            ctl("start")

            def overdue() -> list[str]:
                rows = line.outbox.due("webhook", time.time() + 3600, limit=100) if line.outbox else []
                return [json.loads(m.payload)["part_id"] for m in rows if m.kind == "part"]

            wait_for(lambda: store.check_write() is None and overdue() == ["Q-1"], what="Q-1 pushed")
        finally:
            line.stop()
    down = [r for r in caplog.records if "cannot judge or push the overdue parts" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]
    assert any("the overdue parts can be judged and pushed again" in r.getMessage() for r in caplog.records)
    assert any("parts overdue (incomplete 0.3 s after their latest image), by the type they lack: dots 1"
               in r.getMessage()
               for r in caplog.records)


def test_postgres_restart_opcua_get_part_answers_bad_resource_unavailable(
    private_cluster: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The database stops under the OPC UA server: ``diffqc.GetPart`` answers
    ``BadResourceUnavailable`` (a PLC diverts the part), said once in the log; once the
    database is back it answers the part's verdict again."""
    import asyncio
    import logging
    import socket
    import time

    from asyncua import Client, ua

    from diffqc.service.opcua import NAMESPACE, OpcUaServer
    from diffqc.service.store import ResultRecord
    from tests.test_sinks import wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"opc.tcp://127.0.0.1:{s.getsockname()[1]}"
    url, ctl = private_cluster

    async def call(part: str) -> Any:
        async with Client(endpoint) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            try:
                return await client.get_node(f"ns={ns};s=diffqc").call_method(f"{ns}:GetPart", part)
            except ua.UaStatusCodeError as exc:
                return exc.code

    with ResultStore(url) as store, caplog.at_level(logging.INFO, logger="diffqc"):
        store.insert(ResultRecord(created_at=time.time(), source="test", decision="REJECT", part_id="G-1",
                                  feature_type="edge", type_known=True))
        server = OpcUaServer(endpoint, ["edge"], store=store)
        server.start()
        try:
            assert asyncio.run(call("G-1"))[:2] == ["REJECT", 1]
            ctl("stop")
            down = [asyncio.run(call("G-1")) for _ in range(3)]
            ctl("start")
            wait_for(lambda: store.check_write() is None, what="the store back")
            assert asyncio.run(call("G-1"))[:2] == ["REJECT", 1]
        finally:
            server.stop()
    assert down == [ua.StatusCodes.BadResourceUnavailable] * 3
    said = [r for r in caplog.records if "GetPart cannot read the result store" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    # and once when it reads again, with the calls it refused meanwhile
    assert "OPC UA GetPart reads the result store again; calls refused meanwhile: 3, over" in caplog.text


def test_a_reading_command_reads_a_postgres_store_an_older_diffqc_wrote(pg_url: str) -> None:
    """The QC office's diffqc upgraded before the line's: `results list` of the store the older
    one still writes failed with "column body_hash does not exist"; it reads such columns as
    empty, changing nothing in the store (a temporary view of its session)."""
    import psycopg

    from diffqc.service.store import _ADDED_COLUMNS

    with ResultStore(pg_url) as store:
        store.insert_many([_rec("p1", "PASS"), _rec("p2", "REJECT")])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for table, column, _ in _ADDED_COLUMNS:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column} CASCADE")
    with ResultStore(pg_url, read_only=True) as reader:
        assert [(r.decision, r.camera, r.body_hash) for r in reader.query(limit=None, oldest_first=True)] == [
            ("PASS", None, None), ("REJECT", None, None)]
        assert reader.count(camera="cam-a") == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:  # nothing was added by the reader
        names = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                            "table_name = 'diffqc_results' AND "
                                            "table_schema = current_schema()")}
    assert "body_hash" not in names and "decision" in names
    with ResultStore(pg_url) as store:  # as serve opens it: the columns added
        store.insert_many([_rec("p3", "REVIEW", camera="cam-a")])
        assert store.count(camera="cam-a") == 1


def test_postgres_services_sharing_a_store_each_deliver_their_stations_messages(pg_url: str) -> None:
    from tests.test_sinks import stations_kept_apart

    stations_kept_apart(pg_url)
