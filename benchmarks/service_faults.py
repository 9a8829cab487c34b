"""Fault table of ``diffqc serve``: what the client gets, what /readyz says, and whether anything
acknowledged is lost, when the disk fills, a folder becomes unwritable, the database restarts or
the process is killed under load.

Each scenario starts the real server (``python -m diffqc.service serve`` on loopback, tiny model),
runs a light load (4 clients, unique part ids), injects the fault for a few seconds, removes it,
and then compares the acknowledged record ids with the rows in the store.

Faults, and how each is made (honestly, on the real process):

* ``disk_full``: ``prlimit --fsize=4096:`` (soft limit) on the server process: every write past 4 KiB of any
  file fails with EFBIG, as on a full disk (SQLite WAL, heat maps, kept images alike).
  Python ignores SIGXFSZ, so the write returns an error instead of killing the process.
* ``artifacts_unwritable``: the heat-map and kept-image folders replaced by regular files
  (this fails as root too, unlike chmod).
* ``sqlite_locked``: another process holds an EXCLUSIVE lock on the SQLite file for 3 s
  (a backup tool, a VACUUM); the server waits on the lock (busy timeout).
* ``sqlite_replaced``: the SQLite file (with -wal, -shm) moved away and nothing put in place,
  as an operator rotating the store would; the server must write into a new file.
* ``postgres_restart``: a private PostgreSQL cluster (``scripts/start_postgres.sh``, own folder
  and port) stopped for 3 s and started again.
* ``kill9``: ``kill -9`` of the server under load, then a restart on the same store.

    python benchmarks/service_faults.py [--skip postgres_restart] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("diffqc_bench_service_load", HERE / "service_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
CLIENTS = 4
FAULT_S = 3.0
WARM_ACKS = 8  # acknowledged parts before the fault is injected


@dataclass
class Tally:
    """Answers per phase (``status code`` or ``status code`` + error code) and acknowledged ids."""

    phases: dict[str, Counter[str]] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    ready: dict[str, Counter[str]] = field(default_factory=dict)
    phase: str = "before"

    def answer(self, what: str) -> None:
        self.phases.setdefault(self.phase, Counter())[what] += 1

    def readyz(self, what: str) -> None:
        self.ready.setdefault(self.phase, Counter())[what] += 1


async def _client(
    url: str, parts: list[tuple[bytes, str]], prefix: str, tally: Tally, stop: asyncio.Event, counter: Any
) -> None:
    headers = {"Authorization": f"Bearer {bench.TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers) as http:
        while not stop.is_set():
            i = next(counter)
            body, ftype = parts[i % len(parts)]
            pid = f"{prefix}-{i}"
            try:
                r = await http.post(
                    "/v1/inspect", content=body, params={"feature_type": ftype, "part_id": pid}
                )
            except httpx.HTTPError as exc:
                tally.answer(f"no answer ({type(exc).__name__})")
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 200:
                tally.acked[pid] = int(r.json()["id"])
                tally.answer("200")
            else:
                try:
                    code = r.json().get("code", "?")
                except ValueError:
                    code = "no JSON"
                tally.answer(f"{r.status_code} {code}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.02)  # light load


async def _until_acked(tally: Tally, n: int, limit_s: float = 60.0) -> None:
    """Wait until ``n`` parts are acknowledged (the fault then hits a service under load)."""
    t0 = time.monotonic()
    while len(tally.acked) < n and time.monotonic() - t0 < limit_s:
        await asyncio.sleep(0.05)


async def _readyz(url: str, tally: Tally) -> int:
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            r = await http.get(url + "/readyz")
    except httpx.HTTPError as exc:
        tally.readyz(f"no answer in 5 s ({type(exc).__name__})")
        return 0
    body = r.json()
    reason = body.get("reason") or (
        "degraded: " + "; ".join(body["degraded"]) if body.get("degraded") else ""
    )
    tally.readyz(f"{r.status_code} {reason[:90]}".strip())
    return r.status_code


async def run_fault(
    url: str,
    parts: list[tuple[bytes, str]],
    prefix: str,
    inject: Callable[[], object],
    recover: Callable[[], object],
    fault_s: float = FAULT_S,
) -> tuple[Tally, float]:
    """Load before, during and after a fault; returns the tally and the seconds from removing
    the fault until /readyz was 200 again."""
    tally = Tally()
    stop = asyncio.Event()
    counter = iter(range(10**9))
    clients = [asyncio.create_task(_client(url, parts, prefix, tally, stop, counter)) for _ in range(CLIENTS)]
    await _until_acked(tally, WARM_ACKS)
    tally.phase = "during"
    await asyncio.to_thread(inject)
    t_end = time.monotonic() + fault_s
    while time.monotonic() < t_end:
        await _readyz(url, tally)
        await asyncio.sleep(0.5)
    tally.phase = "after"
    await asyncio.to_thread(recover)
    t0 = time.monotonic()
    recovered = float("nan")
    while time.monotonic() - t0 < 30:
        if await _readyz(url, tally) == 200:
            recovered = time.monotonic() - t0
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*clients)
    return tally, recovered


def stored_ids(db_urls: list[str], prefix: str) -> dict[str, list[int]]:
    """Record ids per part id over one or more stores."""
    out: dict[str, list[int]] = {}
    for db in db_urls:
        for pid, ids in bench.stored_by_part(db, prefix).items():
            out.setdefault(pid, []).extend(ids)
    return out


def lost(tally: Tally, stored: dict[str, list[int]]) -> dict[str, int]:
    missing = [p for p in tally.acked if p not in stored]
    wrong = [p for p, rid in tally.acked.items() if p in stored and rid not in stored[p]]
    return {
        "acknowledged": len(tally.acked),
        "stored": sum(len(v) for v in stored.values()),
        "acknowledged_missing": len(missing),
        "wrong_id": len(wrong),
        "stored_twice": sum(1 for v in stored.values() if len(v) > 1),
    }


def _row(name: str, how: str, tally: Tally, recovered: float, check: dict[str, int]) -> dict[str, Any]:
    return {
        "fault": name,
        "how": how,
        "client": {k: dict(v) for k, v in tally.phases.items()},
        "readyz": {k: dict(v) for k, v in tally.ready.items()},
        "ready_again_s": None if recovered != recovered else round(recovered, 2),
        **check,
    }


# --------------------------------------------------------------------------- scenarios
def disk_full(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    db = str(work / "disk_full.db")
    server = bench.start_server(model, db, workdir=work, extra=("--data-dir", str(work / "disk_full-art")))
    pid = str(server.proc.pid)
    try:
        tally, rec = asyncio.run(
            run_fault(
                server.url,
                parts,
                "full",
                lambda: subprocess.run(["prlimit", "--pid", pid, "--fsize=4096:"], check=True),
                lambda: subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited:"], check=True),
            )
        )
    finally:
        server.stop()
    how = "prlimit --fsize=4096 on the server (every write past 4 KiB fails with EFBIG)"
    return _row("disk full", how, tally, rec, lost(tally, stored_ids([db], "full")))


def artifacts_unwritable(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    db = str(work / "unwritable.db")
    art = work / "unwritable-art"
    server = bench.start_server(
        model, db, workdir=work, extra=("--data-dir", str(art), "--keep-images", "all", "--heatmaps", "all")
    )

    def inject() -> None:
        for kind in ("heatmaps", "images"):
            (art / kind).rename(art / f"{kind}.saved")
            (art / kind).write_bytes(b"not a folder")

    def recover() -> None:
        for kind in ("heatmaps", "images"):
            (art / kind).unlink()
            (art / f"{kind}.saved").rename(art / kind)

    try:
        tally, rec = asyncio.run(run_fault(server.url, parts, "unw", inject, recover))
    finally:
        server.stop()
    with sqlite3.connect(db) as conn:
        no_files = conn.execute(
            "SELECT COUNT(*) FROM diffqc_results WHERE reason LIKE '%not written%'"
        ).fetchone()[0]
    row = _row(
        "unwritable artifact folders",
        "heatmaps/ and images/ replaced by regular files",
        tally,
        rec,
        lost(tally, stored_ids([db], "unw")),
    )
    row["stored_without_files"] = int(no_files)
    return row


def sqlite_locked(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    db = str(work / "locked.db")
    server = bench.start_server(model, db, workdir=work)
    holder: dict[str, sqlite3.Connection] = {}

    def inject() -> None:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        holder["c"] = conn

    def recover() -> None:
        holder["c"].execute("ROLLBACK")
        holder["c"].close()

    try:
        tally, rec = asyncio.run(run_fault(server.url, parts, "lock", inject, recover))
    finally:
        server.stop()
    how = "another process holds BEGIN EXCLUSIVE on the file for 3 s"
    return _row("SQLite locked (backup, VACUUM)", how, tally, rec, lost(tally, stored_ids([db], "lock")))


def sqlite_replaced(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    db = work / "replaced.db"
    old = work / "replaced-old.db"
    server = bench.start_server(model, str(db), workdir=work)

    def inject() -> None:
        for suffix in ("", "-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                Path(f"{db}{suffix}").rename(f"{old}{suffix}")

    try:
        tally, rec = asyncio.run(run_fault(server.url, parts, "repl", inject, lambda: None, fault_s=1.0))
    finally:
        server.stop()
    check = lost(tally, stored_ids([str(old), str(db)], "repl"))
    with sqlite3.connect(db) as conn:
        check["rows_in_new_file"] = int(conn.execute("SELECT COUNT(*) FROM diffqc_results").fetchone()[0])
    how = "the file (+ -wal, -shm) moved away under the server; acked ids counted over both files"
    return _row("SQLite file replaced", how, tally, rec, check)


def postgres_restart(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(f"/tmp/diffqc-pg-fault-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, "DIFFQC_PG_DIR": str(data), "DIFFQC_PG_PORT": str(port)}
    script = REPO / "scripts" / "start_postgres.sh"

    def ctl(*args: str) -> str:
        out = subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    url = ctl()
    try:
        server = bench.start_server(model, url, workdir=work, extra=("--data-dir", str(work / "pg-art")))
        try:
            tally, rec = asyncio.run(run_fault(server.url, parts, "pg", lambda: ctl("stop"), lambda: ctl()))
        finally:
            server.stop()
        check = lost(tally, stored_ids([url], "pg"))
    finally:
        ctl("stop")
        shutil.rmtree(data, ignore_errors=True)
    how = "pg_ctl stop -m fast, 3 s down, start (scripts/start_postgres.sh on a private cluster)"
    return _row("PostgreSQL restart", how, tally, rec, check)


def kill9(model: Path, parts: list[tuple[bytes, str]], work: Path) -> dict[str, Any]:
    db = str(work / "kill9.db")
    server = bench.start_server(model, db, workdir=work)
    tally = Tally()

    async def scenario() -> None:
        stop = asyncio.Event()
        counter = iter(range(10**9))
        clients = [
            asyncio.create_task(_client(server.url, parts, "k9", tally, stop, counter))
            for _ in range(CLIENTS)
        ]
        await _until_acked(tally, WARM_ACKS)
        tally.phase = "during"
        server.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait, 10)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(scenario())
    t0 = time.monotonic()
    restarted = bench.start_server(model, db, workdir=work)
    ready_s = time.monotonic() - t0
    tally.phase = "after"
    try:
        asyncio.run(_readyz(restarted.url, tally))
    finally:
        restarted.stop()
    row = _row(
        "kill -9 under load",
        "SIGKILL to the server, restart on the same store",
        tally,
        ready_s,
        lost(tally, stored_ids([db], "k9")),
    )
    row["ready_again_s_note"] = "includes the restart (model load) of a new process"
    return row


SCENARIOS = {
    "disk_full": disk_full,
    "artifacts_unwritable": artifacts_unwritable,
    "sqlite_locked": sqlite_locked,
    "sqlite_replaced": sqlite_replaced,
    "postgres_restart": postgres_restart,
    "kill9": kill9,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: train a tiny one)")
    ap.add_argument("--data", type=Path, default=None, help="dataset for request images")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(SCENARIOS))
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(SCENARIOS))
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffqc-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = bench.model_and_data(ap, args.model, args.data, work)
    parts = bench.payloads(data)
    run_dir = work / time.strftime("run-%Y%m%d-%H%M%S")  # fresh stores: counts are this run's only
    run_dir.mkdir()
    rows = []
    for name, fn in SCENARIOS.items():
        if name in args.skip or (args.only is not None and name not in args.only):
            continue
        t0 = time.perf_counter()
        row = fn(model, parts, run_dir)
        row["scenario_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    bad = [r["fault"] for r in rows if r["acknowledged_missing"] or r["wrong_id"]]
    if bad:
        print(f"acknowledged parts lost in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
