"""The log of ``serve`` and ``watch``: text lines for a terminal, or one JSON object per line
for a log collector (Loki, Elasticsearch, Graylog, journald's JSON readers).

A traceback in a text log is many lines, which a collector reading line by line takes for many
entries; in JSON it is one object's ``exception`` field. The HTTP server's own lines (uvicorn's
start-up, errors and, with ``--access-log``, each request) come out in the same format: in JSON,
an access line also carries its ``client``, ``method``, ``path`` and ``status`` as fields.

Run as a systemd unit whose stderr is the journal (``deploy/diffqc.service``), each line begins
with its syslog priority (``<3>`` an error, sd-daemon(3)), which journald takes off and keeps as
the entry's priority: ``journalctl -p err`` and a syslog rule forwarding errors see diffqc's.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, TextIO

from diffqc.data import escaped

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_ENV = "DIFFQC_LOG_FORMAT"

# the attributes every LogRecord has (and those formatting adds): the rest came from `extra=`
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message", "taskName"}


def utc_minute(epoch: float) -> str:
    """A time as the log says it: ``2026-12-01 14:30 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def default_log_format() -> str:
    """``$DIFFQC_LOG_FORMAT`` (a container sets the format once for every command), else text."""
    value = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    return value if value else "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``message``; a logged exception's traceback in ``exception``; the fields given
    with ``extra=``; for uvicorn's access lines ``client``, ``method``, ``path``, ``status``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _version, status = record.args
            out.update(client=client, method=method, path=path, status=status)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, a record a line: a line break or other control character in a
    message's values (a file's name on a camera share) is written ``\\n``, ``\\xNN``, so whoever
    names a file cannot make a line of the log (nor clear a terminal); a logged exception's
    traceback follows on its own lines, as Python prints it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escaped(super().formatMessage(record), keep="\t")


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with the record's syslog priority for journald
    (:func:`for_journal`): a text traceback's lines at the level of the record they belong to."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return for_journal(self.inner.format(record), record.levelno)


# the syslog priorities of the logging levels (critical 2, error 3, warning 4, info 6; below, debug 7)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def on_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal's stream of a systemd unit: ``$JOURNAL_STREAM``
    names that stream's device and inode (systemd.exec(5)); a unit whose stderr is a file or a
    pipe, a container, a terminal, has another or none."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset or malformed; a stream without a descriptor
        return False


def for_journal(text: str, levelno: int) -> str:
    """``text`` with each line prefixed ``<N>``, ``levelno``'s syslog priority, which journald
    reads off a line on a unit's stream as the entry's priority (sd-daemon(3))."""
    prefix = f"<{next((p for level, p in _PRIORITIES if levelno >= level), 7)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


def json_log_line(level: str, message: str, logger: str = "diffqc") -> str:
    """One line of the JSON log made without the logging machinery: the CLI's last word (an
    error that ends the process, which it prints rather than logs) in a JSON log's format."""
    record = logging.LogRecord(logger, getattr(logging, level), "", 0, "%s", (message,), None)
    return JsonFormatter().format(record)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the process's log to stderr at ``level`` in ``fmt`` (:data:`LOG_FORMATS`). In JSON
    the root logger's handler is the only one: uvicorn is then started without its own
    (:func:`uvicorn_log_config`), so its lines pass through it too, and Python's warnings
    (``py.warnings``) are logged rather than printed."""
    if fmt not in LOG_FORMATS:
        from diffqc.errors import ConfigError

        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)} "
                          f"(--log-format, or ${LOG_FORMAT_ENV})")
    handler = logging.StreamHandler()
    inner = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    handler.setFormatter(JournalFormatter(inner) if on_journal(handler.stream) else inner)
    numeric = 5 if level.lower() == "trace" else getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, handlers=[handler])
    if fmt == "json":  # a Python warning (a model's too few calibration images) is a line as well
        warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """:func:`warnings.showwarning` for the JSON log: the warning's text as the message, its
    class and where it was raised as fields (Python's own prints them as a two-line text)."""
    logging.getLogger("py.warnings").warning("%s", message, extra={
        "category": category.__name__, "location": f"{filename}:{lineno}"})


def uvicorn_log_config(fmt: str) -> dict[str, Any] | None:
    """uvicorn's ``log_config``: its own (text, access lines on stdout) for text, none for JSON
    or on the journal, so that its loggers propagate to the root's handler. Each stream is
    coloured only when it is a terminal itself (uvicorn asks stdout for both: ``serve 2> log``
    run in a terminal wrote colour codes into the file), and never under ``NO_COLOR``."""
    if fmt == "json" or on_journal():
        return None
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    colour = not os.environ.get("NO_COLOR")  # no-color.org: set and not empty
    for formatter, stream in (("default", sys.stderr), ("access", sys.stdout)):
        config["formatters"][formatter]["use_colors"] = colour and _is_terminal(stream)
    return config


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no stream, or a closed one
        return False


class Seldom:
    """A line that would repeat with every request or part while its cause lasts, and has no end
    to say (the store refusing a dashboard's polls, a camera sending its last frame again): said
    at once, then at most once per ``every_s``, each saying how many went unsaid since the last.
    Thread-safe."""

    def __init__(self) -> None:
        self._said_at = float("-inf")  # monotonic time of the last line
        self._unsaid = 0
        self._lock = threading.Lock()

    def due(self, every_s: float = 60.0) -> int | None:
        """None: not now (counted); else say the line now, with this many unsaid since the last."""
        now = time.monotonic()
        with self._lock:
            if now - self._said_at < every_s:
                self._unsaid += 1
                return None
            unsaid, self._said_at, self._unsaid = self._unsaid, now, 0
            return unsaid


class Outage:
    """A failure that repeats with every part while it lasts (the store refusing writes, a
    folder that cannot be written): said once when it starts, the parts it cost counted, and
    said once more when it ends, so that hundreds of lines a minute do not bury the first one
    (nor pass journald's rate limit, which drops lines). Thread-safe."""

    def __init__(self, logger: logging.Logger, start: str, end: str, *, level: int = logging.ERROR) -> None:
        """``start``: the line's text before the reason ("cannot store parts"), at ``level``;
        ``end``: the recovery line's (INFO), a format of the count and seconds ("...; parts ...:
        %d, over %.0f s")."""
        self.logger = logger
        self.start = start
        self.end = end
        self.level = level
        self.count = 0
        self.since: float | None = None  # monotonic time of the first failure, None while it works
        self._lock = threading.Lock()

    def failed(self, reason: str, parts: int = 1) -> None:
        with self._lock:
            self.count += parts
            if self.since is not None:
                return
            self.since = time.monotonic()
        self.logger.log(self.level, "%s: %s (said once; counted until it works again)", self.start, reason)

    def worked(self) -> None:
        if self.since is None:  # the common case: nothing to say, no lock taken
            return
        with self._lock:
            if self.since is None:
                return
            count, seconds = self.count, time.monotonic() - self.since
            self.count, self.since = 0, None
        self.logger.info(self.end, count, seconds)
