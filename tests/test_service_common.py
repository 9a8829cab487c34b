"""Shared fixtures and helpers of the service tests (no tests of its own).

The HTTP tests run against a real, tiny :class:`diffqc.model.Detector` trained once per
session on a small synthetic set (a few seconds on 2 CPU cores).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import load_benchmark

TOKEN = "test-token-abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


bench = load_benchmark("service_load")

_CACHE: dict[str, Any] = {}


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def tinted(body: bytes) -> bytes:
    """A grey part's image as a colour camera gives it: the red channel raised (PNG)."""
    rgb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(np.int16)
    rgb[..., 0] += 25
    return png(np.clip(rgb, 0, 255).astype(np.uint8))


@dataclass
class Samples:
    """Encoded test images of the synthetic set, sorted by the model's decision."""

    by_decision: dict[str, list[tuple[bytes, str]]]
    all: list[tuple[bytes, str]]

    def one(self, decision: str) -> tuple[bytes, str]:
        return self.by_decision[decision][0]


@pytest.fixture(scope="session")
def service_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model bundle, dataset) of a tiny detector trained once per session."""
    if "model" not in _CACHE:
        work = tmp_path_factory.mktemp("svc-model")
        _CACHE["model"] = bench.train_tiny_model(work)
    return _CACHE["model"]


@pytest.fixture(scope="session")
def detector(service_model: tuple[Path, Path]) -> Any:
    if "detector" not in _CACHE:
        from diffqc.model import Detector

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE["detector"] = Detector.load(service_model[0], device="cpu")
    return _CACHE["detector"]


@pytest.fixture(scope="session")
def samples(service_model: tuple[Path, Path], detector: Any) -> Samples:
    """Test images grouped by decision; REJECT examples include noise images."""
    if "samples" not in _CACHE:
        from diffqc.data import decode_image

        payloads = bench.payloads(service_model[1], n=40)
        for value in (0, 255):  # flat images are far from every GOOD type
            for ftype in detector.classes_:  # one of them is declared as the type it is closest to
                payloads.append((png(np.full((64, 64, 3), value, np.uint8)), ftype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = detector.inspect([decode_image(b) for b, _ in payloads], [t for _, t in payloads])
        by: dict[str, list[tuple[bytes, str]]] = {}
        # parts the model also finds closest to their declared type first: a mis-routed part is
        # counted as such and kept out of its type's drift window (diffqc.drift.is_misrouted)
        order = sorted(range(len(payloads)),
                       key=lambda i: results[i].predicted_type not in (None, payloads[i][1]))
        for i in order:
            by.setdefault(results[i].decision, []).append(payloads[i])
        counts = {k: len(v) for k, v in by.items()}
        assert {"PASS", "REVIEW", "REJECT"} <= set(by), f"tiny model decisions: {counts}"
        _CACHE["samples"] = Samples(by, payloads[:40])
    return _CACHE["samples"]


@asynccontextmanager
async def running_app(
    detector: Any, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan running, and an httpx client on its ASGI transport."""
    from diffqc.service.app import ServiceSettings, create_app

    settings.setdefault("db_url", str(tmp_path / "results.db"))
    settings.setdefault("tokens", (TOKEN,))
    app = create_app(ServiceSettings(**settings), detector=detector)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60.0)
    async with app.router.lifespan_context(app), client:
        yield client, app.state.diffqc


@contextmanager
def serving(app: Any, root_path: str = "", port: int = 0, **config: Any) -> Iterator[str]:
    """``app`` under a real uvicorn on 127.0.0.1 (on ``port``, else a free one), in a thread: its URL.
    ``config``: more of uvicorn's settings (``http=``, a protocol class)."""
    import uvicorn

    port = port or bench.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           root_path=root_path, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


@pytest.fixture
def private_cluster() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL cluster of this test alone (its own folder and port, started with
    ``scripts/start_postgres.sh``), so that stopping it disturbs no other test."""
    data = Path(f"/tmp/diffqc-pg-restart-{os.urandom(4).hex()}")
    env = {**os.environ, "DIFFQC_PG_DIR": str(data), "DIFFQC_PG_PORT": str(bench.free_port())}
    script = Path(__file__).resolve().parents[1] / "scripts" / "start_postgres.sh"

    def ctl(action: str = "start") -> str:
        argv = ["bash", str(script)] + (["stop"] if action == "stop" else [])
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=True)
        return out.stdout.strip()

    url = ctl("start")
    try:
        yield url, ctl
    finally:
        ctl("stop")
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def behind_nginx(upstream: str | list[str], folder: Path) -> Iterator[str]:
    """A real nginx on 127.0.0.1 running docs/API.md's ``location /qc/`` block as it stands there,
    its ``proxy_pass`` pointed at ``upstream`` (``/qc/x`` asked upstream as ``/x``; a list: each
    request to the next of them, nginx's round robin): its URL."""
    block = re.search(r"```nginx\n(.*?)```", API_DOC.read_text(encoding="utf-8"), re.S)
    assert block is not None and NGINX is not None
    servers = upstream if isinstance(upstream, list) else [upstream]
    balanced = "upstream diffqc {\n" + "".join(f"server {u.split('://')[1]};\n" for u in servers) + "}\n"
    location = block[1].replace("http://127.0.0.1:8000/", "http://diffqc/")
    port = bench.free_port()
    temp = "".join(f"{kind}_temp_path {folder / kind};\n" for kind in
                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    folder.mkdir(parents=True, exist_ok=True)
    # as root its workers would be nobody, who may not write the test's folders
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(
        f"daemon off;\n{user}worker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'};\nevents {{ worker_connections 64; }}\n"
        f"http {{\naccess_log off;\n{temp}{balanced}server {{\nlisten 127.0.0.1:{port};\n{location}}}\n}}\n")
    proc = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"").decode()
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
