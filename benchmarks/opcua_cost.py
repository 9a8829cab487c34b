"""What `serve --opcua` costs inspection: latency and throughput with and without the OPC UA server.

The OPC UA server (asyncua) runs in a thread of the service's process and writes about 20
variables a decision; on a small edge box's cores it competes with inference for the CPU (and
Python's GIL). This starts the real service (``python -m diffqc.service serve``) on loopback,
with the tiny model of ``benchmarks/service_load.py`` unless ``--model`` is given, in rounds that
alternate the two ways (without; with ``--opcua`` and a client subscribed to every decision, as
a PLC is): per round single-part p50/p99 (one client, ``--single`` requests) and throughput under
load (``--clients`` clients, ``--requests`` requests). Medians over ``--rounds``.

    python benchmarks/opcua_cost.py [--rounds 3] [--single 200] [--requests 600] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import service_load as bench  # noqa: E402  (benchmarks/ is no package)


class Subscriber:
    """An OPC UA client subscribed to the latest decision's record id (a PLC), in its own thread;
    ``seen``: the notifications it got."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"no OPC UA subscription on {url}")

    async def _run(self) -> None:
        from asyncua import Client

        from diffqc.service.opcua import NAMESPACE

        outer = self

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                outer.seen += 1

        async with Client(self.url) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            sub = await client.create_subscription(50, Handler())
            await sub.subscribe_data_change(client.get_node(f"ns={ns};s=diffqc.Last.RecordId"))
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _round(model: Path, parts: list[tuple[bytes, str]], work: Path, opcua: bool, args: argparse.Namespace
           ) -> dict[str, float]:
    url = f"opc.tcp://127.0.0.1:{bench.free_port()}"
    db = str(work / f"r-{time.monotonic_ns()}.db")
    server = bench.start_server(model, db, workdir=work, extra=("--opcua", url) if opcua else ())
    subscriber = Subscriber(url) if opcua else None
    try:
        bench.single_part(server, parts, 20)  # warm-up
        single = bench.single_part(server, parts, args.single)
        loaded = bench.load(server, parts, args.requests, args.clients)
    finally:
        if subscriber is not None:
            subscriber.stop()
        server.stop()
    return {"p50_ms": single.pct(50), "p99_ms": single.pct(99),
            "throughput_per_s": loaded["throughput_per_s"],
            "notifications": float(subscriber.seen if subscriber else 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: a tiny one)")
    ap.add_argument("--data", type=Path, default=None, help="dataset for request images (with --model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="diffqc-opcua-"))
    model, data = bench.model_and_data(ap, args.model, args.data, work)
    parts = bench.payloads(data)
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with --opcua + a subscriber": []}
    for r in range(args.rounds):
        for name, opcua in (("without", False), ("with --opcua + a subscriber", True)):
            runs[name].append(_round(model, parts, work, opcua, args))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    print(f"\n| median of {args.rounds} rounds | single part p50 ms | p99 ms | throughput parts/s "
          f"({args.clients} clients) |")
    print("|---|---:|---:|---:|")
    for name, rows in runs.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"| {name} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {med['throughput_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
