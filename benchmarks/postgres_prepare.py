"""What a PostgreSQL store's statements cost unprepared (session 48), beside psycopg's default.

psycopg prepares a statement on the server after its fifth run; through a PgBouncer in
transaction pooling the next run, on another server connection, failed, so since session 48 the
store prepares none (``prepare_threshold=None``): each run is parsed and planned again. This
fills a schema of its own on the server (``--db``, default ``$DIFFQC_TEST_POSTGRES_URL``) with
``--records`` decisions through the store's own insert path, then times, on one store opened
each way in turn (``before``: psycopg's default, statements prepared after five runs; ``now``:
none prepared), the calls a line makes again and again: storing one decision, the dashboard's
latest 50, a count of the last hour's, a part's images by its id. Median of ``--rounds``, in
milliseconds, both ways in the same run, round after round in turn.

    python benchmarks/postgres_prepare.py [--db postgresql://...] [--records 20000] [--rounds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import psycopg

from diffqc.service.store import ResultRecord, ResultStore

TYPES = ("dots", "edge1", "edge2", "dist1", "dist2", "angle1", "angle2", "angle3")


def _record(i: int, now: float) -> ResultRecord:
    return ResultRecord(created_at=now - i, source="http", decision="PASS" if i % 20 else "REVIEW",
                        part_id=f"P-{i // 8:07d}", feature_type=TYPES[i % 8], predicted_type=TYPES[i % 8],
                        type_known=True, score=0.1, p_value=0.5, model_version="bench")


@contextmanager
def _prepared_after(threshold: int | None) -> Iterator[None]:
    """The store's connections opened with psycopg's ``prepare_threshold`` ``threshold``."""
    connect = psycopg.connect

    def opened(*args: Any, **kwargs: Any) -> Any:
        return connect(*args, **{**kwargs, "prepare_threshold": threshold})

    psycopg.connect = opened
    try:
        yield
    finally:
        psycopg.connect = connect


def _ms(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=os.environ.get("DIFFQC_TEST_POSTGRES_URL"))
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    if not args.db:
        sys.exit("give --db postgresql://... (or set DIFFQC_TEST_POSTGRES_URL)")
    schema = f"diffqc_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.db, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{args.db}{'&' if '?' in args.db else '?'}options={quote(f'-csearch_path={schema}')}"
    try:
        now = time.time()
        with ResultStore(url) as store:
            for first in range(0, args.records, 5000):
                store.insert_many([_record(i, now) for i in range(first, min(first + 5000, args.records))])
        calls: dict[str, Callable[[ResultStore], object]] = {
            "store one decision": lambda s: s.insert(_record(0, time.time())),
            "latest 50 (dashboard)": lambda s: s.query(limit=50),
            "count of the last hour": lambda s: s.count(since=time.time() - 3600),
            "a part's images by id": lambda s: s.query(part_id="P-0000100", limit=64),
        }
        ways = {"before": 5, "now": None}
        stores = {}
        for way, threshold in ways.items():
            with _prepared_after(threshold):
                stores[way] = ResultStore(url)
        times: dict[str, dict[str, list[float]]] = {w: {c: [] for c in calls} for w in ways}
        for _ in range(args.rounds):
            for way, store in stores.items():
                for name, call in calls.items():
                    times[way][name].append(_ms(lambda c=call, s=store: c(s)))  # type: ignore[misc]
        for store in stores.values():
            store.close()
    finally:
        with psycopg.connect(args.db, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    out = {name: {way: round(statistics.median(times[way][name]), 3) for way in ways} for name in calls}
    print(json.dumps({"records": args.records, "rounds": args.rounds, "median_ms": out}, indent=2))


if __name__ == "__main__":
    main()
