"""Reliability benchmarks of ``diffqc serve`` on loopback: latency, load, overload, crash, soak.

Starts the real server (``python -m diffqc.service serve``) as a subprocess on a free
127.0.0.1 port, with a tiny model trained on the synthetic set unless ``--model`` is given,
and prints:

* single part: p50 / p99 latency of sequential requests (one client);
* load: ``--clients`` concurrent clients, ``--requests`` requests: p50 / p99, throughput,
  number of 5xx, and that every acknowledged part has exactly one stored record;
* overload: a burst larger than the buffer under ``reject`` and ``drop_oldest``: every part
  is answered 200 (stored) or 503 (refused), dropped parts are stored as NOT_INSPECTED, and
  the counts match the server's metrics;
* crash: ``kill -9`` during load, restart: every acknowledged part is stored, none twice;
* soak: ``--soak`` requests; resident memory (RSS) of the server before/after.

The tests (``tests/test_service_process.py``) import these helpers for bounded-size runs.

    python benchmarks/service_load.py --requests 2000 --soak 20000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

TOKEN = "bench-token-0123456789"


# --------------------------------------------------------------------------- model + data
def tiny_config(input_size: int = 64) -> Any:
    """A deliberately small detector config: trains in seconds on 2 CPU cores."""
    from diffqc.config import DetectorConfig, with_overrides

    return with_overrides(
        DetectorConfig(),
        {
            "train.steps": 30,
            "train.batch_images": 8,
            "diffusion.hidden": 64,
            "diffusion.depth": 1,
            "backbone.input_size": input_size,
            "scoring.noises_per_timestep": 2,
            "calibration.min_per_type": 1,
            # a wide REVIEW band so that a tiny model yields all three decisions
            "calibration.alpha_review": 0.5,
            "calibration.alpha_reject": 0.001,
        },
    )


def train_tiny_model(work: Path, n_parts: int = 96, image_size: int = 64) -> tuple[Path, Path]:
    """Write a small synthetic set under ``work/data`` and save a tiny model to ``work/model``."""
    import warnings

    from diffqc.data import load_dataset
    from diffqc.model import Detector
    from diffqc.synth import write_synthetic_dataset

    data, model = work / "data", work / "model"
    if (model / "metadata.json").is_file():
        return model, data
    write_synthetic_dataset(data, n_parts=n_parts, image_size=image_size, progress=False, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector(tiny_config(image_size), device="cpu")
        det.fit(load_dataset(data), progress=False)
    det.save(model)
    return model, data


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    arr = image if image.dtype != np.float32 else (np.clip(image, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def model_and_data(ap: argparse.ArgumentParser, model: Path | None, data: Path | None,
                   work: Path) -> tuple[Path, Path]:
    """A benchmark's ``--model`` and ``--data`` as absolute paths (given relative, they are read
    from the current folder, not from the service's working folder), or without ``--model`` the
    tiny model trained here under ``work`` and its data (``--model`` needs ``--data``: argparse's
    usage error)."""
    if model is None:
        t0 = time.perf_counter()
        model, data = train_tiny_model(work / "tiny")
        print(f"trained tiny model in {time.perf_counter() - t0:.1f} s -> {model}", flush=True)
    elif data is None:
        ap.error("--data is needed with --model")
    return model.resolve(), data.resolve()


def retrain_into(folder: Path, source: Path, model_id: str) -> None:
    """`diffqc train --out FOLDER --force` as a service serving FOLDER sees it: the bundle at
    ``source`` under another model id saved into FOLDER, its files moved in one by one,
    ``metadata.json`` last."""
    import warnings

    from diffqc.model import Detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retrained = Detector.load(source, device="cpu")
    retrained.metadata = {**retrained.metadata, "model_id": model_id}
    retrained.save(folder, force=True)


def payloads(data: Path, n: int = 16) -> list[tuple[bytes, str]]:
    """PNG bytes and feature type of up to ``n`` test images of the synthetic set."""
    from diffqc.data import load_dataset

    samples = [s for s in load_dataset(data) if s.split == "test"] or load_dataset(data)
    out = []
    for s in samples[:n]:
        out.append((Path(s.path).read_bytes(), s.feature_type))
    return out


# --------------------------------------------------------------------------- server process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    db: str
    log: Path
    ca: str | None = None  # served over TLS (serve --tls-cert): the CA file a client trusts

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)


def start_server(
    model: Path,
    db: str,
    *,
    workdir: Path,
    token: str = TOKEN,
    port: int | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 120.0,
    ca: str | None = None,
    prefix: tuple[str, ...] = (),
) -> Server:
    """Start ``python -m diffqc.service serve`` on 127.0.0.1 and wait until /readyz is 200
    (over TLS, trusting ``ca``, when ``extra`` gives ``--tls-cert`` and ``--tls-key``);
    ``prefix``: a command that runs it (``sh -c '...; exec "$@"' sh``, say)."""
    import diffqc

    port = port or free_port()
    env = dict(os.environ)
    src = str(Path(diffqc.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DIFFQC_TOKEN"] = token
    log = workdir / f"server-{port}.log"
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "diffqc.service",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        db,
        "--log-level",
        "warning",
        *extra,
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = Server(proc, port, db, log, ca)
    trust = ssl.create_default_context(cafile=ca) if ca else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1.0, verify=trust).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


# --------------------------------------------------------------------------- load client
@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    acked: dict[str, int] = field(default_factory=dict)  # part id -> record id
    decisions: Counter[str] = field(default_factory=Counter)
    transport_errors: int = 0
    elapsed_s: float = 0.0
    retry_after: set[str] = field(default_factory=set)

    @property
    def n_5xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def throughput(self) -> float:
        return len(self.acked) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": sum(self.statuses.values()) + self.transport_errors,
            "ok": len(self.acked),
            "statuses": dict(self.statuses),
            "transport_errors": self.transport_errors,
            "p50_ms": round(self.pct(50), 2),
            "p99_ms": round(self.pct(99), 2),
            "throughput_per_s": round(self.throughput, 1),
            "decisions": dict(self.decisions),
        }


async def run_load(
    url: str,
    parts: list[tuple[bytes, str]],
    n_requests: int,
    clients: int,
    *,
    token: str = TOKEN,
    prefix: str = "p",
    stop_after_s: float | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """``clients`` concurrent clients send ``n_requests`` parts in total (unique part ids).

    Pass ``result`` to watch progress from another task.
    """
    result = result if result is not None else LoadResult()
    counter = iter(range(n_requests))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    t0 = time.perf_counter()

    async def client(cid: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30.0, headers=headers) as http:
            for i in counter:
                if stop_after_s is not None and time.perf_counter() - t0 > stop_after_s:
                    return
                body, ftype = parts[i % len(parts)]
                pid = f"{prefix}-{i}"
                t = time.perf_counter()
                try:
                    r = await http.post(
                        "/v1/inspect", content=body, params={"feature_type": ftype, "part_id": pid}
                    )
                except httpx.HTTPError:
                    result.transport_errors += 1
                    continue
                result.statuses[r.status_code] += 1
                if r.status_code == 200:
                    result.latencies_ms.append((time.perf_counter() - t) * 1000.0)
                    rec = r.json()
                    result.acked[pid] = int(rec["id"])
                    result.decisions[rec["decision"]] += 1
                elif r.status_code == 503 and "retry-after" in r.headers:
                    result.retry_after.add(r.headers["retry-after"])

    await asyncio.gather(*(client(c) for c in range(clients)))
    result.elapsed_s = time.perf_counter() - t0
    return result


def stored_by_part(db: str, prefix: str) -> dict[str, list[int]]:
    """The record ids of each part id (with ``prefix``) in the store."""
    from diffqc.service.store import ResultStore

    ids: dict[str, list[int]] = {}
    with ResultStore(db) as store:
        after = None
        while True:
            batch = store.query(after_id=after, limit=1000, oldest_first=True)
            if not batch:
                break
            after = batch[-1].id
            for rec in batch:
                if rec.part_id and rec.part_id.startswith(prefix + "-") and rec.id is not None:
                    ids.setdefault(rec.part_id, []).append(rec.id)
    return ids


def check_acked(db: str, result: LoadResult, prefix: str) -> dict[str, int]:
    """Every acknowledged part stored once, under the id it was acknowledged with."""
    stored = stored_by_part(db, prefix)
    missing = [p for p in result.acked if p not in stored]
    twice = [p for p, ids in stored.items() if len(ids) > 1]
    wrong_id = [p for p, rid in result.acked.items() if p in stored and stored[p] != [rid]]
    return {
        "acked": len(result.acked),
        "stored": sum(len(v) for v in stored.values()),
        "missing": len(missing),
        "duplicates": len(twice),
        "wrong_id": len(wrong_id),
    }


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def get_metrics(url: str, token: str = TOKEN) -> str:
    return httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}).text


# --------------------------------------------------------------------------- scenarios
def single_part(server: Server, parts: list[tuple[bytes, str]], n: int = 100) -> LoadResult:
    return asyncio.run(run_load(server.url, parts, n, 1, prefix="single"))


def load(server: Server, parts: list[tuple[bytes, str]], n: int, clients: int) -> dict[str, Any]:
    res = asyncio.run(run_load(server.url, parts, n, clients, prefix="load"))
    return {**res.summary(), "store": check_acked(server.db, res, "load")}


def overload(
    model: Path,
    parts: list[tuple[bytes, str]],
    workdir: Path,
    policy: str,
    burst: int = 48,
    buffer_size: int = 2,
) -> dict[str, Any]:
    """A burst of ``burst`` concurrent parts into a buffer of ``buffer_size``."""
    db = str(workdir / f"overload-{policy}.db")
    server = start_server(
        model,
        db,
        workdir=workdir,
        extra=(
            "--buffer-size",
            str(buffer_size),
            "--max-batch",
            "1",
            "--overflow",
            policy,
            "--heatmaps",
            "none",
        ),
    )
    try:
        res = asyncio.run(run_load(server.url, parts, burst, burst, prefix=f"burst-{policy}"))
        text = get_metrics(server.url)
    finally:
        server.stop()
    stored = stored_by_part(db, f"burst-{policy}")
    return {
        "policy": policy,
        "burst": burst,
        "buffer": buffer_size,
        "ok": len(res.acked),
        "refused_503": res.statuses.get(503, 0),
        "other_status": {k: v for k, v in res.statuses.items() if k not in (200, 503)},
        "transport_errors": res.transport_errors,
        "not_inspected": res.decisions.get("NOT_INSPECTED", 0),
        "metrics_refused": int(metric(text, "diffqc_parts_refused_total")),
        "metrics_dropped": int(metric(text, "diffqc_parts_dropped_total")),
        "stored": sum(len(v) for v in stored.values()),
        "duplicates": sum(1 for v in stored.values() if len(v) > 1),
        "retry_after": sorted(res.retry_after),
    }


def kill_during_load(
    server: Server,
    parts: list[tuple[bytes, str]],
    n: int = 400,
    clients: int = 8,
    kill_after_acks: int = 100,
) -> LoadResult:
    """Run load and ``kill -9`` the server once ``kill_after_acks`` parts are acknowledged."""

    async def scenario() -> LoadResult:
        res = LoadResult()
        task = asyncio.create_task(run_load(server.url, parts, n, clients, prefix="crash", result=res))
        while len(res.acked) < kill_after_acks and not task.done():
            await asyncio.sleep(0.005)
        server.kill9()
        return await task

    return asyncio.run(scenario())


def crash(
    model: Path,
    parts: list[tuple[bytes, str]],
    workdir: Path,
    n: int = 400,
    clients: int = 8,
) -> dict[str, Any]:
    """kill -9 the server during load, restart it, check the store."""
    db = str(workdir / "crash.db")
    server = start_server(model, db, workdir=workdir)
    res = kill_during_load(server, parts, n, clients, kill_after_acks=n // 4)
    restarted = start_server(model, db, workdir=workdir)
    try:
        after = asyncio.run(run_load(restarted.url, parts, 20, 2, prefix="after"))
    finally:
        restarted.stop()
    check = check_acked(db, res, "crash")
    return {
        **check,
        "sent_before_kill": sum(res.statuses.values()),
        "transport_errors": res.transport_errors,
        "after_restart_ok": len(after.acked),
    }


def soak(server: Server, parts: list[tuple[bytes, str]], n: int, clients: int) -> dict[str, Any]:
    """RSS after a warm-up vs after ``n`` more requests."""
    asyncio.run(run_load(server.url, parts, min(500, n // 10 + 50), clients, prefix="warm"))
    rss0 = server.rss()
    samples = [rss0]
    done = 0
    chunk = max(1000, n // 10)
    t0 = time.perf_counter()
    errors = 0
    while done < n:
        k = min(chunk, n - done)
        res = asyncio.run(run_load(server.url, parts, k, clients, prefix=f"soak{done}"))
        errors += res.n_5xx + res.transport_errors
        done += k
        samples.append(server.rss())
    return {
        "requests": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "errors": errors,
        "rss_start_mb": round(rss0 / 2**20, 1),
        "rss_end_mb": round(samples[-1] / 2**20, 1),
        "rss_growth_mb": round((samples[-1] - rss0) / 2**20, 1),
        "rss_samples_mb": [round(s / 2**20, 1) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model bundle (default: train a tiny one)")
    ap.add_argument("--data", type=Path, default=None, help="dataset for request images")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--soak", type=int, default=20000)
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "load", "overload", "crash", "soak"])
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffqc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = model_and_data(ap, args.model, args.data, work)
    parts = payloads(data)
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "workdir": str(work)}
    server = start_server(model, str(work / "results.db"), workdir=work)
    try:
        if "single" not in args.skip:
            res = single_part(server, parts, args.single)
            report["single_part"] = res.summary()
            print("single part:", json.dumps(report["single_part"]), flush=True)
        if "load" not in args.skip:
            report["load"] = load(server, parts, args.requests, args.clients)
            print("load:", json.dumps(report["load"]), flush=True)
        if "soak" not in args.skip and args.soak:
            report["soak"] = soak(server, parts, args.soak, args.clients)
            print("soak:", json.dumps(report["soak"]), flush=True)
    finally:
        server.stop()
    if "overload" not in args.skip:
        for policy in ("reject", "drop_oldest"):
            report[f"overload_{policy}"] = overload(model, parts, work, policy, burst=args.burst)
            print(f"overload {policy}:", json.dumps(report[f"overload_{policy}"]), flush=True)
    if "crash" not in args.skip:
        report["crash"] = crash(model, parts, work)
        print("crash:", json.dumps(report["crash"]), flush=True)
    print(json.dumps(report, indent=2))
    lat = report.get("single_part", {})
    if lat:
        print(
            f"\nsingle part p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms; "
            f"load {report.get('load', {}).get('throughput_per_s')} parts/s; "
            f"soak RSS growth {report.get('soak', {}).get('rss_growth_mb')} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
