"""`serve` under systemd's notify protocol: READY when it can inspect, watchdog pings while its
worker turns, STOPPING on its way out (the messages read from a socket as systemd reads them)."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffqc.service.systemd import STUCK_AFTER_S, notify, watchdog_interval, worker_problems
from tests.test_service_common import TOKEN, bench, detector, service_model  # noqa: F401 (fixtures)


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def _messages(sock: socket.socket, until: float) -> list[str]:
    out = []
    while time.monotonic() < until:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return out


def test_serve_tells_systemd_when_it_is_ready_alive_and_stopping(service_model: tuple[Path, Path],
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As a `Type=notify` unit with `WatchdogSec=` (deploy/diffqc.service) systemd counted the
    service started as soon as its process ran, before the model loaded, and could not tell a
    hung one: `serve` says READY=1 once it can inspect, WATCHDOG=1 while its worker turns (half
    the watchdog's period), and STOPPING=1 as it stops."""
    sock = _listen(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    srv = bench.start_server(service_model[0], str(tmp_path / "r.db"), workdir=tmp_path, token=TOKEN)
    try:
        running = _messages(sock, time.monotonic() + 1.5)
    finally:
        srv.stop()
    stopping = _messages(sock, time.monotonic() + 0.5)
    sock.close()
    assert running[0].startswith("READY=1\nSTATUS=inspecting with model "), running
    assert sum(m.startswith("WATCHDOG=1\n") for m in running) >= 4, running
    assert "STOPPING=1" in stopping, stopping


def test_the_watchdog_is_fed_only_while_the_worker_turns(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """A worker that stopped or hangs in one call starves the watchdog, so systemd restarts the
    service; a full buffer or a store that is down do not (a restart would not mend them)."""
    assert worker_problems(SimpleNamespace(stuck_for=lambda: 0.3)) == []
    stopped = ["the inspection worker is not running"]
    assert worker_problems(SimpleNamespace(stuck_for=lambda: None)) == stopped
    assert worker_problems(SimpleNamespace(stuck_for=lambda: STUCK_AFTER_S + 5)) == [
        f"the inspection worker has been in one call for {STUCK_AFTER_S + 5:.0f} s"]
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # not under systemd: nothing sent
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert watchdog_interval() is None


def test_a_worker_hung_in_an_inference_call_starves_the_watchdog(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real pipeline whose model hangs in a call (a driver's deadlock): the worker stops
    coming round its loop, and the watchdog sends the problem as the unit's status instead of
    its ping; once the call returns, the pings resume."""
    import threading

    import numpy as np

    from diffqc.service.buffer import InspectionPipeline, Job
    from diffqc.service.store import ArtifactStore, ResultStore
    from diffqc.service.systemd import Watchdog

    release = threading.Event()

    class Hanging:
        classes_ = ("edge",)
        version = "hangs"

        def inspect(self, images: list, types: list, all_types: bool = True,
                    check_images: bool = True) -> list:
            release.wait(30)
            raise RuntimeError("the driver gave up")

    sock = _listen(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setattr("diffqc.service.systemd.STUCK_AFTER_S", 0.5)
    store = ResultStore(str(tmp_path / "r.db"))
    pipe = InspectionPipeline(Hanging(), store, ArtifactStore(tmp_path))
    pipe.start()
    watchdog = Watchdog(lambda: worker_problems(pipe), "inspecting")
    watchdog.start()
    try:
        before = _messages(sock, time.monotonic() + 0.4)
        pipe.submit(Job(np.zeros((8, 8, 3), np.float32), "edge"))
        _messages(sock, time.monotonic() + 0.8)  # the call takes longer than STUCK_AFTER_S
        hung = _messages(sock, time.monotonic() + 0.5)
        release.set()
        after = _messages(sock, time.monotonic() + 0.5)
    finally:
        watchdog.stop()
        pipe.stop()
        store.close()
        sock.close()
    assert before and all(m == "WATCHDOG=1\nSTATUS=inspecting" for m in before), before
    said = "STATUS=the inspection worker has been in one call for "
    assert hung and all(m.startswith(said) for m in hung), hung
    assert "WATCHDOG=1\nSTATUS=inspecting" in after, after
