"""The log of serve and watch as a log collector reads it: one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffqc.errors import ConfigError
from diffqc.service.logs import (
    TEXT_FORMAT,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    default_log_format,
)


def _record(name: str = "diffqc.service", msg: str = "hello %s", args: object = ("line",),
            exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("the store went away\nsecond line")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    record.created = 1764806400.25  # 2025-12-04 00:00:00.250 UTC
    record.__dict__.update(extra)
    return record


def test_a_record_is_one_json_line_with_its_fields_and_traceback() -> None:
    line = JsonFormatter().format(_record(exc=True, camera="cam-b"))
    assert "\n" not in line  # a collector reading lines takes it as one entry
    out = json.loads(line)
    assert out["time"] == "2025-12-04T00:00:00.250Z"
    assert (out["level"], out["logger"], out["message"]) == ("WARNING", "diffqc.service", "hello line")
    assert out["camera"] == "cam-b"  # given with extra=
    assert out["exception"].startswith("Traceback")
    assert "RuntimeError: the store went away" in out["exception"]
    assert not {"args", "msg", "exc_info", "levelno", "pathname"} & set(out)


def test_a_text_record_is_one_line_whatever_its_values_hold() -> None:
    """A file's name from a camera share is a value of many lines (``not inspected: PATH``):
    a line break in it made a second line of the text log, which whoever names the files
    could make read as diffqc's own (``P-2\\n2026-12-05 ... ERROR ...``). A message is one line:
    its line breaks and other control characters are written ``\\n``, ``\\x1b``; a traceback
    still follows on its own lines, as Python prints it."""
    fmt = TextFormatter(TEXT_FORMAT)
    line = fmt.format(_record(msg="not inspected: %s", args=("/cam/P-2\n2026 ERROR forged\r\x1b[2J.png",)))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("not inspected: /cam/P-2\\n2026 ERROR forged\\r\\x1b[2J.png")
    with_traceback = fmt.format(_record(exc=True))
    assert with_traceback.splitlines()[1] == "Traceback (most recent call last):"


def test_an_access_line_carries_its_request_as_fields() -> None:
    rec = _record("uvicorn.access", '%s - "%s %s HTTP/%s" %d',
                  ("10.0.0.7:5012", "POST", "/v1/inspect?feature_type=edge", "1.1", 503))
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == '10.0.0.7:5012 - "POST /v1/inspect?feature_type=edge HTTP/1.1" 503'
    assert (out["client"], out["method"], out["path"], out["status"]) == (
        "10.0.0.7:5012", "POST", "/v1/inspect?feature_type=edge", 503)


def test_uvicorns_lines_are_coloured_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve 2> serve.log` run in a terminal wrote uvicorn's lines into the file with the
    terminal's colour codes (``\x1b[32mINFO\x1b[0m:``: a `grep '^INFO'` found none), as uvicorn
    colours its stderr lines when stdout is a terminal. Each stream is coloured only when it is
    a terminal itself, and never under ``NO_COLOR`` (no-color.org)."""
    import io

    from uvicorn.logging import AccessFormatter, DefaultFormatter

    from diffqc.service.logs import uvicorn_log_config

    master, slave = os.openpty()  # a real terminal
    terminal = os.fdopen(slave, "w")
    record = _record("uvicorn.error", "Started server process [%d]", (42,))
    record.levelno, record.levelname = logging.INFO, "INFO"
    access = _record("uvicorn.access", '%s - "%s %s HTTP/%s" %d',
                     ("127.0.0.1:5000", "GET", "/readyz", "1.1", 200))

    def lines() -> tuple[str, str]:
        config = uvicorn_log_config("text")
        assert config is not None
        default = DefaultFormatter(fmt="%(levelprefix)s %(message)s",
                                   use_colors=config["formatters"]["default"]["use_colors"])
        access_fmt = config["formatters"]["access"]
        acc = AccessFormatter(fmt=access_fmt["fmt"], use_colors=access_fmt.get("use_colors"))
        return default.format(record), acc.format(access)

    try:
        monkeypatch.delenv("NO_COLOR", raising=False)
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # 2> serve.log
        err, out = lines()
        assert err == "INFO:     Started server process [42]" and "\x1b[" in out
        monkeypatch.setattr(sys, "stderr", terminal)
        monkeypatch.setattr(sys, "stdout", io.StringIO())  # > access.log
        err, out = lines()
        assert "\x1b[" in err and "\x1b[" not in out
        monkeypatch.setenv("NO_COLOR", "1")
        assert not any("\x1b[" in line for line in lines())
    finally:
        terminal.close()
        os.close(master)


def test_the_format_is_text_or_json_defaulting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFQC_LOG_FORMAT", raising=False)
    assert default_log_format() == "text"
    monkeypatch.setenv("DIFFQC_LOG_FORMAT", "JSON")
    assert default_log_format() == "json"
    with pytest.raises(ConfigError, match="log format 'xml' is not one of text, json"):
        configure_logging("info", "xml")


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import diffqc

    src = str(Path(diffqc.__file__).resolve().parents[1])
    full = {**os.environ, "PYTHONPATH": src, **(env or {})}
    if env is None:
        full.pop("DIFFQC_LOG_FORMAT", None)
    return subprocess.run([sys.executable, "-m", "diffqc.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300)


@pytest.mark.parametrize("how", ["--log-format json", "DIFFQC_LOG_FORMAT=json"])
def test_watch_logs_json_lines(tiny_model: Path, tmp_path: Path, how: str) -> None:
    """`watch` logged text lines only (a traceback many lines), which a log collector reads as
    many entries. With --log-format json (or $DIFFQC_LOG_FORMAT, a container's setting) every
    line it writes is one JSON object: a file it cannot decode is one warning among them, and a
    Python warning (here a damaged export, for which it runs PyTorch) is logged, not printed."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "export.json").write_text("{ damaged")
    cam = tmp_path / "cam" / "good"
    cam.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(cam / "0.png")
    (cam / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    args = ["watch", str(tmp_path / "cam"), str(model), "--db", str(tmp_path / "r.db"), "--once",
            "--settle", "0"]
    if how.startswith("--"):
        proc = _cli([*args, *how.split()])
    else:
        proc = _cli(args, env={"DIFFQC_LOG_FORMAT": "json"})
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    assert any(x["level"] == "WARNING" and "1.png" in x["message"] for x in lines), lines
    said = [x for x in lines if x["logger"] == "py.warnings"]
    assert len(said) == 1 and said[0]["message"].startswith(f"model bundle {model}: damaged export.json")
    assert said[0]["message"].endswith("; using PyTorch") and said[0]["category"] == "UserWarning"


def test_watch_logs_text_by_default(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "cam").mkdir()
    proc = _cli(["watch", str(tmp_path / "cam"), str(tiny_model), "--db", str(tmp_path / "r.db"), "--once"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() and not proc.stderr.lstrip().startswith("{")
    assert " INFO diffqc." in proc.stderr


def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    from diffqc.service.logs import Outage

    outage = Outage(logging.getLogger("diffqc.test"), "cannot store parts",
                    "the store can write again; parts not stored meanwhile: %d, over %.0f s")
    outage.worked()  # nothing failed: nothing said
    with caplog.at_level(logging.INFO, logger="diffqc"):
        outage.failed("disk full", 2)
        outage.failed("disk full")
        outage.failed("another reason")
        outage.worked()
        outage.worked()
        outage.failed("disk full again")
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == ["ERROR", "INFO", "ERROR"], said
    assert said[0][1].startswith("cannot store parts: disk full (said once")
    assert said[1][1] == "the store can write again; parts not stored meanwhile: 4, over 0 s"
    assert "disk full again" in said[2][1] and outage.count == 1


def test_a_line_without_end_is_said_at_once_then_seldom_with_what_went_unsaid() -> None:
    from diffqc.service.logs import Seldom

    seldom = Seldom()
    assert seldom.due() == 0  # the first at once
    assert [seldom.due(), seldom.due()] == [None, None]  # within the minute: counted
    assert seldom.due(every_s=0.0) == 2  # a minute on: said, with the two unsaid
    assert seldom.due(every_s=0.0) == 0


def _journal_run(args: list[str], tmp_path: Path, *, on_journal: bool, fmt: str) -> list[str]:
    """The lines ``diffqc ARGS`` writes to stderr, a file that ``$JOURNAL_STREAM`` names (as
    systemd names a unit's journal stream: its device and inode) or, ``on_journal`` false, names
    another (a unit whose StandardError= is a file, a pipe)."""
    import diffqc

    err, other = tmp_path / f"stderr-{fmt}-{on_journal}", tmp_path / "other"
    other.touch()
    with err.open("w") as stream:
        named = os.fstat(stream.fileno()) if on_journal else os.stat(other)
        env = {**os.environ, "PYTHONPATH": str(Path(diffqc.__file__).resolve().parents[1]),
               "JOURNAL_STREAM": f"{named.st_dev}:{named.st_ino}", "DIFFQC_LOG_FORMAT": fmt}
        subprocess.run([sys.executable, "-m", "diffqc.cli", *args], stdout=subprocess.DEVNULL,
                       stderr=stream, env=env, timeout=300, check=False)
    return [line for line in err.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_under_systemd_each_line_reaches_the_journal_at_its_level(tiny_model: Path, tmp_path: Path,
                                                                  fmt: str) -> None:
    """deploy/diffqc.service logs to the journal, which stored every line of diffqc at priority 6
    (info), an error as well: `journalctl -u diffqc -p err` showed nothing, and a syslog rule
    that forwards errors (rsyslog's `*.err`) forwarded none. A line on the journal's stream
    (``$JOURNAL_STREAM``, systemd.exec(5)) now begins with its syslog priority, ``<3>`` an error,
    ``<4>`` a warning, ``<6>`` info (sd-daemon(3), which journald reads), each line of a text
    traceback too; written anywhere else, a line is as it was."""
    cam = tmp_path / "cam"
    cam.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(cam / "0.png")
    (cam / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    watch = ["watch", str(cam), str(tiny_model), "--db", str(tmp_path / f"r-{fmt}.db"), "--once",
             "--settle", "0"]
    lines = _journal_run(watch, tmp_path, on_journal=True, fmt=fmt)
    assert lines and all(line[:3] in ("<4>", "<6>") for line in lines), lines
    assert any(line.startswith("<4>") and "1.png" in line for line in lines), lines
    assert any(line.startswith("<6>") and "INFO" in line for line in lines), lines
    if fmt == "json":
        levels = {"<4>": "WARNING", "<6>": "INFO"}
        assert all(json.loads(line[3:])["level"] == levels[line[:3]] for line in lines), lines
    fatal = _journal_run(["watch", str(cam), str(tmp_path / "no-model")], tmp_path, on_journal=True, fmt=fmt)
    assert fatal and all(line.startswith("<3>") for line in fatal), fatal
    elsewhere = _journal_run(watch, tmp_path, on_journal=False, fmt=fmt)
    assert elsewhere and not any(line.startswith("<") for line in elsewhere), elsewhere


def test_a_text_traceback_reaches_the_journal_at_its_records_level() -> None:
    from diffqc.service.logs import JournalFormatter

    record = _record(exc=True)
    record.levelno, record.levelname = logging.ERROR, "ERROR"
    lines = JournalFormatter(TextFormatter(TEXT_FORMAT)).format(record).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert lines[1] == "<3>Traceback (most recent call last):"
