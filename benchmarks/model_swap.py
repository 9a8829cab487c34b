"""A retrained model served without a restart: what the swap costs the parts inspected meanwhile.

Starts the real service (``python -m diffqc.service serve``) on a copy of the model (the tiny
model of ``benchmarks/service_load.py`` unless ``--model`` is given), sends parts one after
another from one client (a line's pace: as fast as answered), and after ``--before`` seconds
saves a retrained bundle into the served folder (the same weights under another model id, as
``diffqc train --out SERVED --force`` writes a bundle: files moved in, ``metadata.json`` last).
Per round: the parts answered by each model, any part not answered 200, and the latency of the
parts before the save and of those sent from the save until the new model answered (the load
runs beside inference, on the same cores). Medians over ``--rounds``. Then one service takes
``--swaps`` retrained models in turn: its resident memory after each (a replaced model that
stays in memory would add its size each time).

    python benchmarks/model_swap.py [--rounds 3] [--before 4] [--after 4] [--swaps 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import service_load as bench  # noqa: E402  (benchmarks/ is no package)


def _round(model: Path, parts: list[tuple[bytes, str]], work: Path, r: int, args: argparse.Namespace
           ) -> dict[str, float]:
    served = work / f"served-{r}"
    shutil.copytree(model, served)
    server = bench.start_server(served, str(work / f"r-{r}.db"), workdir=work)
    sent: list[tuple[float, float, int, str]] = []  # (sent at, ms, status, model version)
    new_id = f"retrained-{r}"
    saved_at: list[float] = []

    def save_later() -> None:
        time.sleep(args.before)
        saved_at.append(time.perf_counter())
        bench.retrain_into(served, model, new_id)

    saver = threading.Thread(target=save_later)
    headers = {"Authorization": f"Bearer {bench.TOKEN}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            http.post("/v1/inspect", content=parts[0][0], params={"feature_type": parts[0][1]})  # warm-up
            saver.start()
            t_end = time.perf_counter() + args.before + 60
            swapped_at: float | None = None
            i = 0
            while time.perf_counter() < t_end:
                body, ftype = parts[i % len(parts)]
                t = time.perf_counter()
                query = {"feature_type": ftype, "part_id": f"s{i}"}
                res = http.post("/v1/inspect", content=body, params=query)
                version = str(res.json().get("model_version", "")) if res.status_code == 200 else ""
                sent.append((t, (time.perf_counter() - t) * 1000.0, res.status_code, version))
                if version == new_id and swapped_at is None:
                    swapped_at = time.perf_counter()
                    t_end = swapped_at + args.after
                i += 1
        saver.join()
    finally:
        server.stop()
    if swapped_at is None:
        raise RuntimeError("the retrained model was not served within 60 s:\n"
                           + server.log.read_text()[-2000:])
    save = saved_at[0]
    before = [ms for t, ms, _, _ in sent if t < save]
    during = [ms for t, ms, _, _ in sent if save <= t < swapped_at]
    after = [ms for t, ms, _, v in sent if t >= swapped_at]
    return {"parts": len(sent), "not_200": sum(s != 200 for _, _, s, _ in sent),
            "old_model_after_swap": sum(v != new_id for t, _, s, v in sent if t > swapped_at and s == 200),
            "swap_s": swapped_at - save, "before_p50_ms": float(np.median(before)),
            "before_max_ms": max(before), "during_parts": len(during),
            "during_p50_ms": float(np.median(during)) if during else float("nan"),
            "during_max_ms": max(during) if during else float("nan"),
            "after_p50_ms": float(np.median(after))}


def memory_over_swaps(model: Path, parts: list[tuple[bytes, str]], work: Path, swaps: int) -> list[float]:
    """One service, ``swaps`` retrained models in turn: its resident memory (MB) once the first
    model served 20 parts, then after each swap and 20 parts (a model that stays in memory after
    it was replaced would add its size each time)."""
    served = work / "served-memory"
    shutil.copytree(model, served)
    server = bench.start_server(served, str(work / "memory.db"), workdir=work)
    headers = {"Authorization": f"Bearer {bench.TOKEN}"}
    rss: list[float] = []
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            def twenty() -> None:
                for i in range(20):
                    body, ftype = parts[i % len(parts)]
                    answer = http.post("/v1/inspect", content=body, params={"feature_type": ftype})
                    assert answer.status_code == 200, answer.text

            twenty()
            rss.append(server.rss() / 2**20)
            for k in range(swaps):
                bench.retrain_into(served, model, f"memory-{k}")
                deadline = time.monotonic() + 60
                while http.get("/v1/model").json()["version"] != f"memory-{k}":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the retrained model was not served within 60 s")
                    time.sleep(0.2)
                twenty()
                rss.append(server.rss() / 2**20)
    finally:
        server.stop()
    return rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: a tiny one)")
    ap.add_argument("--data", type=Path, default=None, help="dataset for request images (with --model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=float, default=4.0, help="seconds of parts before the retrain is saved")
    ap.add_argument("--after", type=float, default=4.0, help="seconds of parts after the new model answers")
    ap.add_argument("--swaps", type=int, default=5, help="retrained models in turn, for the memory")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="diffqc-swap-"))
    model, data = bench.model_and_data(ap, args.model, args.data, work)
    parts = bench.payloads(data)
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        rows.append(_round(model, parts, work, r, args))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in rows[-1].items()), flush=True)
    print(f"\nmedian of {args.rounds} rounds:")
    for key in rows[0]:
        print(f"  {key}: {statistics.median(row[key] for row in rows):.2f}")
    if args.swaps:
        rss = memory_over_swaps(model, parts, work, args.swaps)
        print(f"\nresident memory (MB) at the first model, then after each of {args.swaps} swaps: "
              + ", ".join(f"{v:.0f}" for v in rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
