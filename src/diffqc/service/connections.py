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
uvicorn's h11 protocol is always used (its httptools one, where installed, is not: it has other
internals).
"""

from __future__ import annotations

import asyncio
import logging
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


def http_protocol(request_timeout_s: float, cap: int) -> type[asyncio.Protocol]:
    """uvicorn's ``http=``: its h11 protocol, with the request deadline and the cap."""
    refused = Outage(log, "refusing HTTP connections", "taking HTTP connections again; refused meanwhile: "
                     "%d, over %.0f s")

    class DeadlinedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > cap:
                refused.failed(f"{cap} are open (the file descriptors' limit, less {RESERVED_FDS + BACKLOG} "
                               "kept for the store, files and connections coming): a client opens "
                               "connections and leaves them, or raise the limit (systemd: LimitNOFILE=)")
                transport.close()
                return
            refused.worked()
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
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
