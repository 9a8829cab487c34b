"""The HTTP connections ``serve`` keeps open: a deadline for a request's headers, and a cap.

uvicorn closes a connection left idle after an answer (its keep-alive, 5 s), but not one that
has sent no request yet, nor one that sends its headers a byte at a time (slowloris): 1100 such
connections, held by a scanner or a client that opens and never writes, took the 1024 file
descriptors a systemd unit gets by default. Then accept() failed in a loop that logged 110 MB
in 10 s, no part could be inspected, and the store, the model's files and the kept images could
not be opened (measured, 2026-12-05). Here a connection that has not sent a whole request's
headers within ``request_timeout_s`` of opening (or of its last answer) is closed, as nginx's
``client_header_timeout`` does (a request's body has its own timeout, ``--body-timeout``), and
connections beyond :func:`connection_cap` are closed as they come, said once in the log, so the
service keeps file descriptors for its own work (the same 1100, measured again: 640 held, the rest
refused, 761 bytes of log, and a part inspected once the held ones had passed the deadline).
With TLS the handshake is the protocol's (``loop.start_tls``), not the server's: asyncio's TLS
server tells a protocol of a connection only once its handshake is done, and gives a handshake
60 s, so connections that opened and sent nothing were neither counted nor closed (1100 of them
took every file descriptor again, measured 2026-12-07); here a connection is counted and has the
deadline from its accept, its handshake within it, as without TLS.
uvicorn's h11 protocol is always used (its httptools one, where installed, is not: it has other
internals).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from diffqc.service.logs import Outage
from diffqc.service.opcua import MAX_CONNECTIONS as OPCUA_CONNECTIONS

log = logging.getLogger("diffqc.service")

RESERVED_FDS = 256  # file descriptors kept from connections: the store, model files, images, sinks
# connections taken at once (uvicorn's backlog, 2048 by default): asyncio accepts up to this many
# in a row before any is told to a protocol, so they come on top of the cap
BACKLOG = 128
# with --opcua: its server's connections and the 100 asyncio may accept in a row for it (its default
# backlog, which asyncua keeps)
OPCUA_FDS = OPCUA_CONNECTIONS + 100


def connection_cap(opcua: bool = False) -> int:
    """The open connections the service takes: this process's soft limit of file descriptors
    less :data:`RESERVED_FDS` and :data:`BACKLOG` (640 under systemd's default 1024), and with
    an OPC UA server (``opcua``) less :data:`OPCUA_FDS` (476), at least 64."""
    try:
        import resource  # not on Windows
    except ImportError:
        return 4096
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(64, soft - RESERVED_FDS - BACKLOG - (OPCUA_FDS if opcua else 0))


def http_protocol(request_timeout_s: float, cap: int,
                  tls: ssl.SSLContext | None = None) -> type[asyncio.Protocol]:
    """uvicorn's ``http=``: its h11 protocol, with the request deadline and the cap; with ``tls``
    (the server then given no SSL context of its own) it makes each connection's TLS handshake."""
    refused = Outage(log, "refusing HTTP connections", "taking HTTP connections again; refused meanwhile: "
                     "%d, over %.0f s")
    handshaking: set[asyncio.Protocol] = set()

    class DeadlinedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _early: list[bytes] | None = None  # a request sent with the handshake's end, before it is told
        _tls_task: asyncio.Task[None] | None = None

        def connection_made(self, transport: Any) -> None:
            if len(self.connections) + len(handshaking) >= cap:
                refused.failed(f"{cap} are open (the file descriptors' limit, less those kept for the "
                               "store, files, connections coming and an OPC UA server): a client opens "
                               "connections and leaves them, or raise the limit (systemd: LimitNOFILE=)")
                transport.close()
                return
            refused.worked()
            if tls is None:
                super().connection_made(transport)
                self._arm()
                return
            handshaking.add(self)
            self._early = []
            self._deadline = self.loop.call_later(request_timeout_s, transport.close)
            self._tls_task = self.loop.create_task(self._handshake(transport, tls))  # held: not collected

        async def _handshake(self, transport: Any, context: ssl.SSLContext) -> None:
            try:
                secure = await self.loop.start_tls(transport, self, context, server_side=True,
                                                   ssl_handshake_timeout=request_timeout_s)
            except (OSError, ssl.SSLError, TimeoutError, RuntimeError):  # closed: a scanner, a bad client
                return
            finally:
                handshaking.discard(self)
            if secure is None or transport.is_closing():
                return
            super().connection_made(secure)
            self._arm()
            early, self._early = self._early or [], None
            for data in early:
                super().data_received(data)

        def data_received(self, data: bytes) -> None:
            if self._early is not None:  # the handshake done, its coroutine not yet resumed
                self._early.append(data)
            else:
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            handshaking.discard(self)
            if self.transport is not None:  # else closed before (or in) its handshake: never served
                super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout_s, self._expire)

        def _expire(self) -> None:
            """No whole request's headers in time: closed, unless a request is being served (its
            body and answer have their own timeouts; the deadline is armed again after it)."""
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return DeadlinedH11
