"""The HTTP connections serve keeps: a request's headers' deadline and a cap on open connections,
under a real uvicorn over real sockets."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from diffqc.service.connections import BACKLOG, OPCUA_FDS, RESERVED_FDS, http_protocol
from tests.test_service_common import serving


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _server(timeout_s: float, cap: int) -> Iterator[int]:
    with serving(_hello, lifespan="off", http=http_protocol(timeout_s, cap)) as url:
        yield int(url.rsplit(":", 1)[1])


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (None: still open after ``seconds``)."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return time.monotonic() - t0
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - t0


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(4096)


def test_a_connection_that_sends_no_request_or_trickles_its_headers_is_closed() -> None:
    """uvicorn kept a connection that never sent a request, and one sending its headers a byte
    at a time, open for ever: enough of them took every file descriptor of the service. Each is
    closed once the deadline passes without a whole request's headers; a client that asks in
    time is answered, and its kept connection gets the deadline again after the answer."""
    with _server(timeout_s=1.0, cap=100) as port:
        idle = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")  # answered; kept alive after it
        stop = threading.Event()

        def drip() -> None:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.1):
                    return
                try:
                    trickle.send(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=drip, daemon=True).start()
        try:
            waits = [_closed_within(s, 6.0) for s in (idle, trickle, kept)]
        finally:
            stop.set()
        assert all(w is not None and w < 4.0 for w in waits), waits  # ~1 s; kept: its 1 s after the answer
        assert _get(port).startswith(b"HTTP/1.1 200")
        for s in (idle, trickle, kept):
            s.close()


def test_connections_beyond_the_cap_are_closed_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """Past the cap a new connection is closed as it comes, said once in the log (not at every
    refusal), and taken again once the held ones are gone."""
    caplog.set_level(logging.INFO, logger="diffqc.service")
    with _server(timeout_s=1.5, cap=3) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert all(w is not None and w < 1.0 for w in (_closed_within(s, 1.4) for s in extra))
        for s in held:
            assert _closed_within(s, 4.0) is not None  # the deadline frees them
            s.close()
        time.sleep(0.2)
        assert _get(port).startswith(b"HTTP/1.1 200")
        for s in extra:
            s.close()
    said = [r.getMessage() for r in caplog.records if "HTTP connections" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("refusing HTTP connections: 3 are open") and "LimitNOFILE=" in said[0]
    assert said[1].startswith("taking HTTP connections again; refused meanwhile: 3")


def test_the_cap_leaves_file_descriptors_for_the_service() -> None:
    """Under systemd's default soft limit, 1024, the service takes 640 connections, keeping 256
    descriptors for its store and files and 128 for connections accepted in a row (476 beside an
    OPC UA server, whose connections it leaves room for); a lower limit still takes 64."""
    import subprocess
    import sys

    def cap(limit: int, opcua: bool = False) -> int:
        probe = f"from diffqc.service.connections import connection_cap; print(connection_cap({opcua}))"
        out = subprocess.run(["sh", "-c", f'ulimit -n {limit} && exec "$0" -c "$1"', sys.executable, probe],
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert cap(1024) == 1024 - RESERVED_FDS - BACKLOG == 640
    assert cap(1024, opcua=True) == 640 - OPCUA_FDS == 476  # its server's connections beside
    assert cap(200) == 64


async def _scheme(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = scope["scheme"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_with_tls_a_connection_is_capped_and_deadlined_before_its_handshake() -> None:
    """With ``--tls-cert`` asyncio tells a protocol of a connection only once its TLS handshake
    is done, and gives a handshake 60 s: connections that opened and sent nothing were neither
    counted nor closed, and 1100 of them took every file descriptor (a request timed out; 15 MB
    of accept() errors in 17 s, measured). The handshake is the protocol's now: a connection is
    counted and has the headers' deadline from its accept, as without TLS, and a client that
    shakes hands in time is served over TLS."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_side)
    client_side = ssl.create_default_context()
    ca.configure_trust(client_side)
    with serving(_scheme, lifespan="off", http=http_protocol(1.0, 3, tls=server_side)) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        assert all(w is not None and w < 1.0 for w in (_closed_within(s, 0.9) for s in extra))
        assert all(w is not None and w < 3.0 for w in (_closed_within(s, 4.0) for s in held))
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              client_side.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"https"), answer
        for s in held + extra:
            s.close()
