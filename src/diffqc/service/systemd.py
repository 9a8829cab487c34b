"""systemd's notify protocol (``sd_notify``), for `serve` and `watch` run as a ``Type=notify``
unit on an edge box (``deploy/diffqc.service``), and the signals that stop them.

A unit of ``Type=notify`` is started when the service says ``READY=1`` (the model loaded, the
store open: not when the process began), and with ``WatchdogSec=`` systemd restarts a service
that stopped saying ``WATCHDOG=1``: the pings are sent only while the inspection worker is
healthy, so a hung worker gets the service restarted. Without ``$NOTIFY_SOCKET`` (not under
systemd) nothing is sent. The protocol is a datagram on a Unix socket; no library is needed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("diffqc.service")

# What stops `serve` and `watch` gracefully (the parts in hand inspected and stored, the last
# lines logged): Ctrl-C, the SIGTERM of systemd, docker and kill, and the SIGHUP the kernel sends
# when the terminal they run in closes (an SSH session dropped), which ended them at once.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``, lines) to
    systemd; False when not run under it (no ``$NOTIFY_SOCKET``) or when it cannot be sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket name
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC`` (systemd's advice), when it is
    set for this process (``$WATCHDOG_PID``, when set, is its pid); None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


STUCK_AFTER_S = 120.0  # a worker not round its loop for this long is hung (a batch takes seconds)


def worker_problems(pipeline: Any) -> list[str]:
    """What stops the inspection worker, for the watchdog: not running, or hung in a call for
    :data:`STUCK_AFTER_S` (a full buffer or a store that is down are not the worker's: a restart
    would not mend them)."""
    stuck = None if pipeline is None else pipeline.stuck_for()
    if stuck is None:
        return ["the inspection worker is not running"]
    if stuck > STUCK_AFTER_S:
        return [f"the inspection worker has been in one call for {stuck:.0f} s"]
    return []


class Watchdog:
    """Pings systemd's watchdog every :func:`watchdog_interval` while ``healthy()`` says the
    service works (an empty list of problems), with ``status`` as the unit's status line; while
    it does not, no ping is sent and the problems are the status line, so systemd restarts a
    service that stays unhealthy for ``WatchdogSec``."""

    def __init__(self, healthy: Callable[[], list[str]], status: str = "") -> None:
        self.healthy = healthy
        self.status = status
        self.interval = watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval is None:
            return
        self._thread = threading.Thread(target=self._run, name="diffqc-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            try:
                problems = self.healthy()
            except Exception as exc:  # a check that fails is a problem, not a dead watchdog thread
                problems = [f"health check failed: {exc}"]
            notify(f"WATCHDOG=1\nSTATUS={self.status}" if not problems else "STATUS=" + "; ".join(problems))
