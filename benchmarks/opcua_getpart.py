"""What a reject gate's PLC waits for when it asks the OPC UA server for a part by its id.

``diffqc.GetPart(PartId)`` (since session 39) reads the part's images from the result store on
each call (in asyncua's worker threads), where reading ``diffqc.Part.Decision`` reads a value
the server holds. This fills a SQLite store as ``benchmarks/store_scale.py`` does (a part a
second, 8 crops a part) to each ``--steps`` size, serves it with the OPC UA server on loopback
and times, from one connected client (a PLC keeps its session open), ``--calls`` calls of
``GetPart`` for parts spread over the store beside as many reads of ``diffqc.Part.Decision`` in
the same run: median and p99 milliseconds, the round trip a PLC sees.

    python benchmarks/opcua_getpart.py [--steps 10000,1000000] [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import service_load as bench  # noqa: E402  (benchmarks/ is no package)
from store_scale import TYPES, _records  # noqa: E402

from diffqc.service.opcua import NAMESPACE, OpcUaServer  # noqa: E402
from diffqc.service.store import ResultStore  # noqa: E402


def _ms(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def _time_calls(url: str, parts: list[str]) -> tuple[list[float], list[float]]:
    from asyncua import Client

    async with Client(url) as client:
        ns = await client.get_namespace_index(NAMESPACE)
        root = client.get_node(f"ns={ns};s=diffqc")
        decision = client.get_node(f"ns={ns};s=diffqc.Part.Decision")
        calls, reads = [], []
        for part in parts:
            t0 = time.perf_counter()
            verdict = await root.call_method(f"{ns}:GetPart", part)
            calls.append((time.perf_counter() - t0) * 1000)
            if verdict[1] != len(TYPES):
                raise RuntimeError(f"part {part}: {verdict}")
            t0 = time.perf_counter()
            await decision.read_value()
            reads.append((time.perf_counter() - t0) * 1000)
    return calls, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10000,1000000", help="store sizes (rows), comma-separated")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| median / p99 ms | GetPart(PartId) | read diffqc.Part.Decision |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, ResultStore(str(Path(tmp) / "results.db")) as store:
        stored = 0
        for size in (int(s) for s in args.steps.split(",")):
            while stored < size:
                n = min(5000, size - stored)
                store.insert_many(_records(rng, stored, n, time.time() - (size - stored - n)))
                stored += n
            whole = stored // len(TYPES) - 1  # the last part may have fewer crops
            parts = [f"P{int(k):09d}" for k in rng.integers(0, whole, size=args.calls)]
            url = f"opc.tcp://127.0.0.1:{bench.free_port()}"
            server = OpcUaServer(url, list(TYPES), store=store)
            server.start()
            try:
                calls, reads = asyncio.run(_time_calls(url, parts))
            finally:
                server.stop()
            (c50, c99), (r50, r99) = _ms(calls), _ms(reads)
            print(f"| {size:,} rows | {c50:.2f} / {c99:.2f} | {r50:.2f} / {r99:.2f} |", flush=True)


if __name__ == "__main__":
    main()
