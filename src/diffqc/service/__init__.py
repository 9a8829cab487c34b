"""HTTP inspection service, ring buffer, result store, dashboard and folder watcher, and what
they do for the line (sinks, OPC UA, drift and file watches, retention, logs, systemd).

Entry points (``diffqc serve``, ``diffqc watch``, ``diffqc results export``, ``list``,
``summary``, ``backup`` and ``restore``):
:func:`run_server`, :func:`run_watch`, :func:`export_reviewed_good`, :func:`list_results`, and
:func:`add_service_commands` which registers the sub-commands on an argparse
sub-parsers object (each sets ``func``: call ``args.func(args)`` to run it).

Importing this package is cheap: FastAPI, uvicorn and the model load only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from diffqc.arguments import NON_NEGATIVE, POSITIVE, POSITIVE_NUMBER, integer, names, number, path_name
from diffqc.calibration import DECISIONS, NOT_INSPECTED
from diffqc.data import MAX_IMAGE_PIXELS, MAX_NAME_LEN, MAX_SOURCE_LEN, unprintable
from diffqc.errors import ConfigError, OutputError, RuntimeUnavailableError
from diffqc.output import json_line, path_text, text_columns
from diffqc.runtime import add_runtime_arguments
from diffqc.visualize import DEFAULT_HEATMAP_SIZE

__all__ = ["add_service_commands", "export_reviewed_good", "list_results", "run_server", "run_watch"]


def run_server(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    db_url: str | None = None,
    token: str | list[str] | None = None,
    **opts: Any,
) -> int:
    """Serve a model over HTTP (see :func:`diffqc.service.app.run_server`)."""
    with _service_extra():
        from diffqc.service.app import run_server as _run

    return _run(model_path, host, port, db_url, token, **opts)


def run_watch(directory: str | Path, model_path: str | Path, db_url: str | None = None, **opts: Any) -> int:
    """Inspect images written into a folder (see :func:`diffqc.service.watch.run_watch`)."""
    from diffqc.service.watch import run_watch as _run

    return _run(directory, model_path, db_url, **opts)


def export_reviewed_good(db_url: str, out_dir: str | Path, **opts: Any) -> dict[str, Any]:
    """Export operator-approved parts as a dataset.

    See :func:`diffqc.service.store.export_reviewed_good`.
    """
    from diffqc.service.store import export_reviewed_good as _export

    return _export(db_url, out_dir, **opts)


# the service extra's packages (pip install 'diffqc[serve]') by the names they import as
_SERVE_PACKAGES = frozenset({"fastapi", "starlette", "pydantic", "uvicorn", "anyio", "multipart",
                             "python_multipart"})


@contextlib.contextmanager
def _service_extra() -> Iterator[None]:
    """A package of the service extra that is not installed: one line naming the extra (a
    ``pip install diffqc`` without ``[serve]``), not a traceback; other import errors pass."""
    try:
        yield
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in _SERVE_PACKAGES:
            raise
        raise RuntimeUnavailableError(f"the service needs {exc.name}, which is not installed: "
                                      "pip install 'diffqc[serve]'") from exc


def _spreadsheet_cell(value: Any) -> Any:
    """A CSV cell for a spreadsheet: text that it would run as a formula (=, +, -, @, a tab or
    a carriage return first: OWASP's CSV injection; part ids and notes come from clients) gets a
    leading apostrophe, which spreadsheets show as typed; numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def _xlsx_out(header: Sequence[str], rows: Iterable[Sequence[Any]], *, sheet: str,
              dates: Sequence[str] = (), percents: Sequence[str] = ()) -> int:
    """Write ``rows`` under ``header`` to stdout as an Excel workbook (:mod:`diffqc.service.xlsx`),
    whole once all are read (a zip is written seekable); refused to a terminal, as gzip refuses
    binary output there. Returns the rows written."""
    import shutil
    import tempfile

    from diffqc.service.xlsx import TooManyRows, write_xlsx

    if sys.stdout.isatty():
        raise ConfigError("--format xlsx writes a binary file: redirect it, such as > shift.xlsx")
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as book:
        try:
            n = write_xlsx(book, header, rows, sheet=sheet, dates=dates, percents=percents)
        except TooManyRows as exc:
            raise OutputError(f"cannot write the workbook: {exc}; narrow the period (--since, --until) or "
                              "use --format csv") from None
        book.seek(0)
        shutil.copyfileobj(book, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return n


def list_results(db_url: str, *, fmt: str = "jsonl", **filters: Any) -> int:
    """Write the stored decisions matching ``filters`` to stdout, oldest first: JSON lines (one
    record each, as ``/v1/results`` gives them), CSV (:data:`~diffqc.service.store.LIST_COLUMNS`;
    text that a spreadsheet would run as a formula gets a leading apostrophe) or an Excel
    workbook of the same columns (typed cells, times as dates in UTC). Each JSON or CSV row is
    flushed as it is written; returns the number of rows."""
    import csv

    from diffqc.service.store import LIST_COLUMNS, ResultStore, check_store_exists, stored_records

    check_store_exists(db_url, doing="list")
    writer = csv.DictWriter(sys.stdout, fieldnames=LIST_COLUMNS, extrasaction="ignore")
    if fmt == "csv":
        writer.writeheader()
    n = 0
    with ResultStore(db_url, read_only=True) as store:
        if fmt == "xlsx":
            rows = (rec.to_json() for rec in stored_records(store, **filters))
            cells = ([row.get(k) for k in LIST_COLUMNS] for row in rows)
            return _xlsx_out(LIST_COLUMNS, cells, sheet="results", dates=("created", "reviewed"))
        for rec in stored_records(store, **filters):
            row = rec.to_json()
            if fmt == "csv":
                writer.writerow({k: _spreadsheet_cell(row.get(k)) for k in LIST_COLUMNS})
            else:
                sys.stdout.write(json_line(row) + "\n")
            sys.stdout.flush()
            n += 1
    return n


PART_COLUMNS = ("part_id", "first", "last", "decision", "review", "pending_review", "images", "superseded",
                "complete", "missing", "types")


def list_parts(db_url: str, *, fmt: str = "jsonl", decision: str | None = None,
               types: Sequence[str] | None = None, incomplete: bool = False, window_s: float | None = None,
               **filters: Any) -> tuple[Counter[str], int, int]:
    """Write each part's verdict (:func:`~diffqc.service.parts.part_verdict`) from the stored
    images matching ``filters`` to stdout, in the order of part ids: JSON lines or CSV
    (:data:`PART_COLUMNS`; ``types`` as ``type=DECISION`` pairs, ``missing`` space-separated) or
    an Excel workbook of the same columns.
    ``decision``: only parts with this verdict; ``types``: those a part should have
    (``incomplete``: only parts without an image of some of them); ``window_s``: as
    :func:`~diffqc.service.parts.part_verdict` takes it (None: its default). Reads the
    store 500 parts at a time. Returns (the parts written, counted by verdict; images without a
    part id, which no part holds; the parts written that lack some of ``types``)."""
    import csv

    from diffqc.service.parts import PART_WINDOW_S, PartVerdict, part_verdict
    from diffqc.service.store import ResultStore, check_store_exists, records_by_part

    check_store_exists(db_url, doing="list")
    window = PART_WINDOW_S if window_s is None else window_s
    writer = csv.writer(sys.stdout)
    if fmt == "csv":
        writer.writerow(PART_COLUMNS)
    n: Counter[str] = Counter()
    lacking = 0  # parts written without an image of some of ``types``

    def cells(v: PartVerdict) -> list[Any]:  # a CSV or workbook row, in PART_COLUMNS' order
        row = {**v.to_json(), "missing": " ".join(v.missing or ()),
               "types": " ".join(f"{t}={d}" for t, d in v.types.items())}
        return [row[k] for k in PART_COLUMNS]

    def verdicts(store: ResultStore) -> Iterator[PartVerdict]:
        nonlocal lacking
        for pid, recs in records_by_part(store, **filters):
            v = part_verdict(pid, recs, types, window)
            if (decision is not None and v.decision != decision) or (incomplete and v.complete is not False):
                continue
            n[v.decision] += 1
            lacking += v.complete is False
            yield v

    with ResultStore(db_url, read_only=True) as store:
        if fmt == "xlsx":
            _xlsx_out(PART_COLUMNS, map(cells, verdicts(store)), sheet="parts", dates=("first", "last"))
        else:
            for v in verdicts(store):
                if fmt == "csv":
                    writer.writerow([_spreadsheet_cell(c) for c in cells(v)])
                else:
                    sys.stdout.write(json_line(v.to_json()) + "\n")
                sys.stdout.flush()
        loose = store.count(has_part=False, **filters)
    return n, loose, lacking


def summary_results(db_url: str, by: list[str], *, fmt: str = "table", since: float | None = None,
                    until: float | None = None, parts: bool = False, window_s: float | None = None) -> int:
    """Print :func:`summarize` of the store's images in ``[since, until)`` grouped by ``by``
    (``parts``: of its parts, each counted once by its verdict from its crops, grouped by its
    latest crop's values; ``window_s`` as :func:`~diffqc.service.parts.part_verdict` takes it):
    an aligned table, CSV, JSON lines or an Excel workbook (the share flagged a percentage);
    returns the number of groups (0: nothing in the period)."""
    import csv

    from diffqc.service.parts import PART_WINDOW_S, part_summary_counts
    from diffqc.service.store import SUMMARY_COLUMNS, ResultStore, check_store_exists, summarize

    check_store_exists(db_url, doing="summarize")
    with ResultStore(db_url, read_only=True) as store:
        if parts:
            window = PART_WINDOW_S if window_s is None else window_s
            counts, loose = part_summary_counts(store, by, since, until, window)
            if loose:
                print(f"diffqc: {loose} stored image{'s' if loose != 1 else ''} without a part id, in no "
                      "part: not counted", file=sys.stderr)
            rows = summarize(counts, len(by))
        else:
            rows = summarize(store.summary_counts(by, since, until), len(by))
    if not rows and fmt != "xlsx":  # a workbook is written, its header alone: a file a spreadsheet opens
        return 0
    header = [*by, *SUMMARY_COLUMNS]
    if fmt == "jsonl":
        for key, g in rows:
            sys.stdout.write(json_line({**dict(zip(by, key, strict=True)), **g}) + "\n")
    elif fmt == "xlsx":
        _xlsx_out(header, ([*key, *(g[c] for c in SUMMARY_COLUMNS)] for key, g in rows), sheet="summary",
                  percents=("flagged_share",))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        for key, g in rows:
            writer.writerow([_spreadsheet_cell(v) for v in [*key, *(g[c] for c in SUMMARY_COLUMNS)]])
    else:  # a shift's report says which shift: the period first
        def when(t: float | None, none: str) -> str:
            return none if t is None else _utc_and_here(t)

        unit = "parts, each judged from its crops," if parts else "parts"
        sys.stdout.write(f"{unit} inspected from {when(since, 'the first')} to {when(until, 'now')}\n")
        cells = [header] + [["" if v is None else str(v) for v in key]
                            + [("" if g[c] is None else f"{100 * g[c]:.1f}%") if c == "flagged_share"
                               else str(g[c]) for c in SUMMARY_COLUMNS] for key, g in rows]
        for line in text_columns(cells, right_from=len(by)):  # the groups' names left, the counts right
            sys.stdout.write(line + "\n")
    return len(rows)


# --------------------------------------------------------------------------- argparse glue
def _cmd_serve(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {
        "buffer_size": args.buffer_size,
        "buffer_max_bytes": args.buffer_mb * 1024 * 1024,
        "body_timeout_s": args.body_timeout,
        "max_batch": args.max_batch,
        "overflow": args.overflow,
        "retry_after_s": args.retry_after,
        "max_upload_bytes": args.max_upload_mb * 1024 * 1024,
        "max_image_pixels": args.max_image_pixels,
        "keep_images": args.keep_images,
        "heatmaps": args.heatmaps,
        "heatmap_size": args.heatmap_size,
        "all_types": not args.fast,
        "cors_origins": tuple(args.cors_origin or ()),
        "allow_no_token": args.no_auth,
        "watch_dirs": tuple(args.watch or ()),
        "watch_line": args.line,
        "watch_station": args.station,
        "watch_camera": None if not args.camera else args.camera[0] if len(args.camera) == 1
        else tuple(args.camera),
        "watch_part_id_pattern": args.part_id_pattern,
        "part_types": args.part_types,
        "push_parts": args.push_parts,
        "part_timeout_s": args.part_timeout,
        "part_window_s": args.part_window,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_warn_days": args.tls_warn_days,
        "root_path": args.root_path,
        "mqtt_url": args.mqtt,
        "mqtt_cert": args.mqtt_cert,
        "mqtt_key": args.mqtt_key,
        "mqtt_client_id": args.mqtt_client_id,
        "webhook_url": args.webhook,
        "webhook_timeout_s": args.webhook_timeout,
        "webhook_connections": args.webhook_connections,
        "webhook_headers": tuple(args.webhook_header or ()),
        "webhook_cert": args.webhook_cert,
        "webhook_key": args.webhook_key,
        "webhook_secrets": tuple(args.webhook_secret or ()),
        "opcua_url": args.opcua,
        "opcua_users": args.opcua_users,
        "opcua_trust": args.opcua_trust,
        **_artifact_settings(args),
        "log_level": args.log_level,
        "log_format": args.log_format,
        "access_log": args.access_log,
    }
    if args.data_dir:
        opts["data_dir"] = args.data_dir
    if args.threads:
        opts["torch_threads"] = args.threads
    opts["runtime"], opts["precision"] = args.runtime, args.precision
    return run_server(args.model, args.host, args.port, args.db, args.token, **opts)


def _artifact_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What :func:`_add_store_arguments` added, as the service's settings: ``--keep-days`` and
    ``--artifact-budget-mb`` its retention's, ``--disk-min-free-mb`` / ``--disk-min-free-percent``
    its disk watch's."""
    return {"retention_max_age_s": args.keep_days * 86400.0 if args.keep_days is not None else None,
            "retention_max_bytes": (int(args.artifact_budget_mb * 1024 * 1024)
                                    if args.artifact_budget_mb is not None else None),
            "disk_min_free_bytes": int(args.disk_min_free_mb * 1024 * 1024),
            "disk_min_free_ratio": args.disk_min_free_percent / 100.0}


def _cmd_watch(args: argparse.Namespace) -> int:
    return run_watch(
        args.dir,
        args.model,
        args.db,
        feature_type=args.feature_type,
        data_dir=args.data_dir,
        poll_s=args.poll,
        settle_s=args.settle,
        after="keep" if args.keep else "move",
        once=args.once,
        max_batch=args.max_batch,
        keep_images=args.keep_images,
        heatmaps=args.heatmaps,
        heatmap_size=args.heatmap_size,
        source=args.source,
        line=args.line,
        station=args.station,
        camera=args.camera,
        part_id_pattern=args.part_id_pattern,
        part_types=args.part_types,
        part_timeout_s=args.part_timeout,
        part_window_s=args.part_window,
        opcua_url=args.opcua,
        opcua_users=args.opcua_users,
        opcua_trust=args.opcua_trust,
        runtime=args.runtime,
        precision=args.precision,
        threads=args.threads,
        max_image_pixels=args.max_image_pixels,
        log_level=args.log_level,
        log_format=args.log_format,
        **_artifact_settings(args),
    )


_MIDNIGHTS = {"today": 0, "yesterday": 1}  # a period's words: this machine's midnight, days before
_CLOCK = re.compile(r"(?:(today|yesterday)\s+)?(\d{1,2}):(\d\d)(?::(\d\d))?")  # 06:00, yesterday 22:00


def _period_time(value: str | None, name: str) -> float | None:
    """A ``results`` command's ``--since``/``--until`` as the API reads it (a wall-clock time
    without a zone is UTC), or ``today``, ``yesterday`` (this machine's midnights), ``now``, and a
    time of day on this machine's clock (``06:00``: today's; ``yesterday 22:00``: a shift's start).
    Where this machine's clock is not UTC, a time without a zone is said, with how to write
    either (a shift's start typed in the line's clock was an hour or more off without a word);
    a ``--since`` in the future is said too."""
    import datetime as dt
    import warnings

    with _service_extra():
        from diffqc.service.app import parse_time, without_zone

    if value is not None and not value.strip():  # --since "$START" of a variable not set
        raise ConfigError(f"--{name} is empty: give a time (2026-12-07T06:00, 8h, today, 06:00)")
    word = (value or "").strip().lower()  # journalctl's words
    if word == "now":
        return time.time()
    if word in _MIDNIGHTS:
        day = dt.date.today() - dt.timedelta(days=_MIDNIGHTS[word])
        return dt.datetime.combine(day, dt.time()).astimezone().timestamp()
    if clock := _CLOCK.fullmatch(word):
        hour, minute, second = (int(clock[i] or 0) for i in (2, 3, 4))
        if hour > 23 or minute > 59 or second > 59:
            said = word.split()[-1]
            raise ConfigError(f"--{name} {value}: no clock shows {said}; a time of day is HH:MM or "
                              "HH:MM:SS, 00:00 to 23:59:59")
        day = dt.date.today() - dt.timedelta(days=_MIDNIGHTS[clock[1] or "today"])
        return dt.datetime.combine(day, dt.time(hour, minute, second)).astimezone().timestamp()
    seconds = parse_time(value, name)
    if seconds is None or value is None:
        return seconds
    wall, here = without_zone(value), None
    if wall is not None:
        with contextlib.suppress(ValueError, OverflowError, OSError):  # years 1 and 9999 near the edge
            here = dt.datetime.fromtimestamp(seconds).astimezone()
    if wall is not None and here is not None and here.utcoffset():
        offset = here.isoformat()[-6:]
        written = value if wall.time() != dt.time() or len(value) > 10 else f"{value}T00:00"
        shown = "%H:%M" if here.date() == wall.date() else "%Y-%m-%d %H:%M"
        warnings.warn(f"--{name} {value} has no time zone: read as UTC, {here.strftime(shown)} on this "
                      f"machine's clock (UTC{offset}); write {written}{offset} for "
                      f"{wall.strftime('%H:%M')} here, or {written}Z for UTC", stacklevel=2)
    if name == "since" and seconds > time.time() + 60:
        when = dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")
        warnings.warn(f"--since {value} lies in the future ({when}): nothing is stored after it yet",
                      stacklevel=2)
    return seconds


def _utc_and_here(t: float) -> str:
    """``t`` in UTC and, where this machine's clock is not UTC, on its clock (a shift's start
    typed as 06:00 reported as 05:00 UTC alone was read as the wrong shift)."""
    import datetime as dt

    utc = dt.datetime.fromtimestamp(t, dt.UTC)
    said = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        here = utc.astimezone()
    except (OverflowError, ValueError, OSError):  # the calendar's edge, past it here
        return said
    if not here.utcoffset():
        return said
    shown = here.strftime("%H:%M:%S" if here.date() == utc.date() else "%Y-%m-%d %H:%M:%S")
    return f"{said} ({shown} on this machine's clock, UTC{here.isoformat()[-6:]})"


def _period(args: argparse.Namespace) -> dict[str, float | None]:
    """``since``/``until`` of a ``results`` command (:func:`_period_time`); one given the wrong
    way round (``--since 8h --until 9h``) is said as such, not as a period without results."""
    import warnings

    since, until = _period_time(args.since, "since"), _period_time(args.until, "until")
    if since is not None and until is not None and since >= until:
        # two times of day, each today's: a night shift's (--since 22:00 --until 06:00)
        clocks = [_CLOCK.fullmatch(v.strip().lower()) for v in (args.since, args.until)]
        night = (f"; across midnight, write --since \"yesterday {args.since.strip()}\" --until {args.until} "
                 f"after it, or --since {args.since} alone before it (to now)"
                 if all(c is not None and c[1] is None for c in clocks) else "")
        warnings.warn(f"--since {args.since} is not before --until {args.until}: the period is empty "
                      f"(--since is its start, --until its end){night}", stacklevel=2)
    return {"since": since, "until": until}


def _cmd_backup(args: argparse.Namespace) -> int:
    from diffqc.service.store import backup_store, store_url

    print(json_line(backup_store(store_url(args.db), args.out, force=args.force)))
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    from diffqc.service.store import store_url
    from diffqc.service.transfer import copy_history

    print(json_line(copy_history(store_url(args.db), args.target, progress=not args.quiet)))
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from diffqc.service.store import restore_store, store_url

    print(json_line(restore_store(args.backup, store_url(args.db))))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    period = _period(args)
    since = period["since"]
    from diffqc.service.store import store_url

    summary = export_reviewed_good(store_url(args.db), args.out, data_dir=args.data_dir, defects=args.defects,
                                   **period, line=args.line, station=args.station, camera=args.camera,
                                   feature_type=args.feature_type)
    print(json_line(summary))
    if summary["exported"] == 0:
        which = "GOOD or BAD" if args.defects else "GOOD"
        print(f"diffqc: no part reviewed {which} with its image kept" + (" since then" if since else "")
              + ": operators mark flagged parts GOOD in the dashboard's review queue "
              "(POST /v1/review/ID); the images of REVIEW and REJECT parts are kept by default",
              file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    filters = {**_period(args), "feature_type": args.feature_type, "decision": args.decision,
               "review": args.review, "reviewed": False if args.unreviewed else None, "part_id": args.part_id,
               "line": args.line, "station": args.station, "camera": args.camera,
               "source": args.source}
    from diffqc.service.store import store_url

    n = list_results(store_url(args.db), fmt=args.format, **filters)
    if n == 0:
        print(f"diffqc: no stored results match{_absent_type(store_url(args.db), args.feature_type)}",
              file=sys.stderr)
    return 0


def _cmd_parts(args: argparse.Namespace) -> int:
    from diffqc.service.store import store_url

    filters = {**_period(args), "part_id": args.part_id, "line": args.line, "station": args.station,
               "camera": args.camera}
    types = list(args.part_types) or None
    if args.incomplete and types is None and args.model is None:
        raise ConfigError("--incomplete needs --model MODEL or --part-types TYPES (the types a part "
                          "should have)")
    if args.model is not None:
        from diffqc.bundle import read_bundle
        from diffqc.service.parts import check_part_types, part_types

        classes = read_bundle(args.model)[1]["classes"]
        check_part_types(args.part_types, classes)
        types = part_types(classes, args.part_types)
    counts, loose, incomplete = list_parts(store_url(args.db), fmt=args.format, decision=args.decision,
                                           types=types, incomplete=args.incomplete,
                                           window_s=args.part_window, **filters)
    if args.model is None:
        _say_unstored_part_types(store_url(args.db), args.part_types)
    if incomplete:
        print(f"diffqc: {incomplete} part{'s' if incomplete != 1 else ''} incomplete (without an image "
              f"of every type of the {'line' if args.part_types else 'model'})", file=sys.stderr)
    if loose:
        print(f"diffqc: stored images without a part id (in no part): {loose}", file=sys.stderr)
    total = sum(counts.values())
    if total == 0:
        print("diffqc: no part matches", file=sys.stderr)
    else:  # a shift's part-level count, beside the lines (stdout stays the parts alone)
        shares = ", ".join(f"{d} {counts[d]} ({100 * counts[d] / total:.1f} %)"
                           for d in ("PASS", "REVIEW", "REJECT", NOT_INSPECTED) if counts[d])
        print(f"diffqc: {total} part{'s' if total != 1 else ''}: {shares}", file=sys.stderr)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from diffqc.service.store import store_url

    by = list(dict.fromkeys(args.by or ())) or (["line"] if args.parts else ["feature_type"])  # each once
    n = summary_results(store_url(args.db), by, fmt=args.format, **_period(args), parts=args.parts,
                        window_s=args.part_window)
    if n == 0:
        print("diffqc: no stored results in this period", file=sys.stderr)
    return 0


def _stored_types(db_url: str) -> list[str]:
    from diffqc.service.store import ResultStore

    with ResultStore(db_url, read_only=True) as store:
        return sorted({t for t, _, _ in store.counts() if t})


def _held(types: list[str]) -> str:
    """The stored types, as a message names them."""
    held = ", ".join(types[:20]) + (f" and {len(types) - 20} more" if len(types) > 20 else "")
    return f"the store holds {held or 'no part of a known type'}"


def _absent_type(db_url: str, feature_type: str | None) -> str:
    """Where ``--feature-type`` names no stored part's type (types are matched exactly: ``Edge1``
    for ``edge1``), the types stored and a near miss."""
    if feature_type is None:
        return ""
    from diffqc.errors import did_you_mean

    types = _stored_types(db_url)
    if feature_type in types:
        return ""
    return f"; no part of type {feature_type!r} is stored{did_you_mean(feature_type, types)}: {_held(types)}"


def _say_unstored_part_types(db_url: str, chosen: Sequence[str]) -> None:
    """``results parts --part-types`` without ``--model`` to check the names by: a name no stored
    image has (a typo: ``dot`` for ``dots``) is said, with a near miss, as every part then lacks it."""
    if not chosen:
        return
    from diffqc.errors import did_you_mean

    types = _stored_types(db_url)
    for name in chosen:
        if name not in types:
            print(f"diffqc: --part-types names {name!r}, of which the store holds no image: every part "
                  f"lacks it{did_you_mean(name, types)}; {_held(types)}", file=sys.stderr)


def _add_store_arguments(p: argparse._ActionsContainer, db_help: str, *, served: bool) -> None:
    """Where ``serve`` and ``watch`` store their records, and what they keep beside each
    (``served``: ``serve``'s, with its HTTP API)."""
    p.add_argument("--db", type=path_name, default=None, help=db_help)
    p.add_argument("--data-dir", type=path_name, default=None,
                   help="folder for heat maps and kept images (default beside the SQLite file)")
    p.add_argument("--keep-images", choices=["none", "flagged", "all"], default="flagged",
                   help="which images to keep for review/export (flagged = REVIEW and REJECT)")
    p.add_argument("--heatmaps", choices=["none", "flagged", "all"], default="flagged",
                   help="which parts get a heat-map picture (flagged = REVIEW and REJECT, as the "
                   "dashboard shows them; drawing one takes the inference worker's time)")
    p.add_argument("--heatmap-size", type=NON_NEGATIVE, default=DEFAULT_HEATMAP_SIZE, metavar="PX",
                   help="the image's longer side in a heat-map picture (0 = its own size)")
    p.add_argument("--keep-days", type=POSITIVE_NUMBER, default=None,
                   help="delete kept images and heat maps older than this (records stay)")
    p.add_argument("--artifact-budget-mb", type=POSITIVE_NUMBER, default=None,
                   help="delete the oldest kept images and heat maps beyond this disk budget")
    p.add_argument("--disk-min-free-mb", type=number(0.0), default=1024.0, metavar="MB",
                   help="say a disk it writes to (the store's, the kept images') is nearly full below "
                   "this many MB free (" + ("log, /v1/line, /metrics, dashboard" if served else "in the log")
                   + "; default 1024; 0: no such floor)")
    p.add_argument("--disk-min-free-percent", type=number(0.0, maximum=100.0), default=5.0, metavar="P",
                   help="... or below this share of its size (default 5; 0: no such floor)")


def _add_image_limit_argument(p: argparse._ActionsContainer, *, buffered: bool) -> None:
    """The largest image ``serve`` and ``watch`` decode (a guard on memory and decompression
    bombs); the readers' own limit (``diffqc.data.MAX_IMAGE_PIXELS``) bounds it."""
    from diffqc.service.security import DEFAULT_MAX_IMAGE_PIXELS  # a submodule: not at import time

    # at least an 8 x 8 image's, the smallest inspected; rounded, not cut (2.039808 is 1536 x 1328)
    megapixels = number(64e-6, maximum=MAX_IMAGE_PIXELS / 1e6)
    p.add_argument("--max-image-mpx", dest="max_image_pixels",
                   type=lambda text: round(megapixels(text) * 1e6),
                   default=DEFAULT_MAX_IMAGE_PIXELS, metavar="MPX",
                   help="largest image in megapixels it decodes; a larger one is refused (413, or "
                   f"NOT_INSPECTED from a watched folder) (default {DEFAULT_MAX_IMAGE_PIXELS / 1e6:.1f}: "
                   "4096 x 4096; a 20 MP camera needs 20)" + (
                       ". A decoded part waiting in the buffer holds 12 bytes a pixel (240 MB at "
                       "20 MP): raise --buffer-mb with it" if buffered else ""))


def recorded_name(text: str, *, max_len: int = MAX_NAME_LEN) -> str:
    """An argparse ``type``: a name recorded with every part (``--line``, ``--station``,
    ``--camera``; ``--source`` up to 1000), as the API takes it to filter by: 1 to ``max_len``
    printable characters."""
    if not text:
        raise argparse.ArgumentTypeError("expected a name, got an empty one")
    if len(text) > max_len or any(unprintable(c) for c in text):
        raise argparse.ArgumentTypeError(
            f"expected at most {max_len} printable characters (no tab, line break or control "
            f"character), as the API takes it to filter by, got {path_text(text[:60])!r}")
    return text


def _origin(text: str) -> str:
    """``--cors-origin``: an origin as a browser sends it (``scheme://host[:port]``) or ``*``; one
    copied from the address bar (``http://hmi:3000/``) is taken without its slash. Another form
    never matches a browser's ``Origin``: every call from the page was refused without a word."""
    origin = text.strip().removesuffix("/")
    if origin != "*" and not re.fullmatch(r"https?://[^/\s?#@]+", origin):
        raise argparse.ArgumentTypeError(f"{text!r} is no origin a browser sends: write "
                                         "scheme://host[:port], without a path (http://hmi:3000)")
    return origin


def _recorded_source(text: str) -> str:
    return recorded_name(text, max_len=MAX_SOURCE_LEN)


def _add_line_arguments(p: argparse._ActionsContainer, window_help: str, *, served: bool) -> None:
    from diffqc.service.parts import PART_WINDOW_S

    p.add_argument("--line", type=recorded_name, default=None, help="line recorded on watched-folder parts")
    p.add_argument("--station", type=recorded_name, default=None,
                   help="station recorded on watched-folder parts; it also names this service's kept "
                        "drift alarms, its pushes (serve's --mqtt, --webhook) and its kept files "
                        "(--keep-days), apart from other services' on a shared store")
    if served:  # serve --watch A --watch B: one camera each
        p.add_argument("--camera", type=recorded_name, action="append", default=None,
                       help="camera recorded on watched-folder parts: once for every folder, or once "
                       "per --watch, in the same order (the drift watch tests each camera apart)")
    else:
        p.add_argument("--camera", type=recorded_name, default=None,
                       help="camera recorded on watched-folder parts")
    p.add_argument("--part-id-pattern", default=None, metavar="REGEX",
                   help="the part id in a watched file's name without its suffix: the regular "
                        "expression's group named part, its only group, or its match "
                        "(P-\\d+ finds P-0001 in P-0001_dots.png; default: the whole name). The crops "
                        "of one part, named alike, then share a part id (diffqc results parts)")
    p.add_argument("--part-types", type=names, default=(), metavar="TYPES",
                   help="the types a part of this line has, when fewer than the model's (dots,edge1): a "
                        "part is complete with an image of each (its verdict's complete and missing); "
                        "default: every type of the model")
    p.add_argument("--part-timeout", type=POSITIVE_NUMBER, default=None, metavar="SECONDS",
                   help="a part still incomplete this long after its latest image is overdue (its other "
                        "crops never came: a camera missing triggers): " + (
                            "counted per type it lacks (/metrics diffqc_parts_overdue_total, /v1/line), "
                            "logged, and with --push-parts pushed once more as it stands, overdue: true"
                            if served else "logged, with the types it lacks"))
    p.add_argument("--part-window", type=POSITIVE_NUMBER, default=PART_WINDOW_S, metavar="SECONDS",
                   help=window_help)


def _add_opcua_arguments(p: argparse._ActionsContainer) -> None:
    p.add_argument("--opcua", default=None, metavar="opc.tcp://HOST:PORT",
                   help="also serve the decisions as an OPC UA server on this address, for PLCs and "
                        "SCADA (e.g. opc.tcp://0.0.0.0:4840): the latest decision, and each type's "
                        "with its counts and drift alarm, read-only, anonymous, unencrypted (docs/API.md)")
    p.add_argument("--opcua-users", type=path_name, default=None, metavar="FILE",
                   help="OPC UA logins: a name:password a line (a secret's file); with it a client "
                        "must log in, over an encrypted channel (Basic256Sha256 and newer), with "
                        "the server's own certificate, made self-signed in --data-dir/opcua/ on the "
                        "first start (its thumbprint logged); without it, anonymous and unencrypted")
    p.add_argument("--opcua-trust", type=path_name, default=None, metavar="DIR",
                   help="with --opcua-users, only OPC UA clients whose application certificates "
                        "(DER or PEM) this folder holds; a refused one is kept in "
                        "--data-dir/opcua/rejected/ and logged, to be moved into DIR (read again "
                        "when it changes, no restart)")


def _add_log_arguments(p: argparse._ActionsContainer) -> None:
    from diffqc.service.logs import LOG_FORMAT_ENV, LOG_FORMATS, LOG_LEVELS, default_log_format

    p.add_argument("--log-level", type=str.lower, default="info", choices=LOG_LEVELS,
                   help="the log's least severe lines (default: info)")
    p.add_argument("--log-format", type=str.lower, default=default_log_format(), choices=LOG_FORMATS,
                   help="text lines (default), or one JSON object per line for a log collector "
                   "(time, level, logger, message, exception: a traceback stays one line; "
                   f"default ${LOG_FORMAT_ENV})")


def add_service_commands(subparsers: Any) -> None:
    """Register ``serve``, ``watch`` and ``results export`` on an argparse sub-parsers object.

    Each parser sets ``func``; the caller runs ``args.func(args)`` (an int exit code).
    """
    from diffqc.service.parts import PART_WINDOW_S
    from diffqc.service.sinks import PART_PUSHES  # no HTTP stack: the sinks need none

    window_help = (f"a part id's images more than SECONDS before its latest are an earlier part's (a "
                   f"counter that repeats) and do not count (default {PART_WINDOW_S:.0f}: a part's crops "
                   "come within an hour)")

    db_help = (
        "result store: SQLite path or sqlite:///path, or postgresql://user@host/db "
        "(default $DIFFQC_DB or diffqc-results.db)"
    )
    p = subparsers.add_parser("serve", help="serve a model over HTTP (inspection API + dashboard)")
    p.add_argument("model", type=path_name, help="model bundle folder (from diffqc train)")
    net = p.add_argument_group("where it listens and who may call")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: every "
                     "IPv4 network; :: every IPv6 one, not IPv4's)")
    net.add_argument("--port", type=integer(0, 65535), default=8000, help="TCP port (default 8000)")
    net.add_argument(
        "--token",
        action="append",
        help="accepted API token (repeatable; default $DIFFQC_TOKEN, comma-separated, or the file "
             "$DIFFQC_TOKEN_FILE names: a token here or in the environment is seen by those who may "
             "read this process's command line or environment)",
    )
    net.add_argument(
        "--no-auth",
        action="store_true",
        help="run without any token (trusted, isolated hosts only)",
    )
    net.add_argument("--tls-cert", type=path_name, default=None, metavar="PEM",
                     help="serve over HTTPS with this certificate (PEM, its chain after it): the API "
                          "token and the parts' images cross the network encrypted; a renewed file "
                          "(certbot, cert-manager) is served without a restart; named --tls-warn-days "
                          "before it expires")
    net.add_argument("--tls-key", type=path_name, default=None, metavar="PEM",
                     help="the certificate's private key (PEM, unencrypted; readable by this user "
                          "only); without it, the key is read from --tls-cert's file (one PEM)")
    net.add_argument("--tls-warn-days", type=number(0.0), default=14.0, metavar="DAYS",
                     help="say this many days before the --tls-cert certificate expires that it "
                     "does (log, /v1/line, /metrics, dashboard; default 14; 30 or more where a "
                     "restart waits for a maintenance window)")
    net.add_argument("--root-path", default="", metavar="/PATH",
                     help="the path a reverse proxy serves this service under (https://hmi/qc/ -> "
                          "/qc): the API's heatmap_url and image_url carry it; requests with or "
                          "without it are answered (a proxy that strips it, or one that does not)")
    net.add_argument("--cors-origin", action="append", type=_origin,
                     help="allow this browser origin, scheme://host[:port] as a browser sends it "
                          "(http://hmi:3000; repeatable)")
    store = p.add_argument_group("results and what is kept")
    _add_store_arguments(store, db_help, served=True)
    insp = p.add_argument_group("inspection")
    insp.add_argument("--buffer-size", type=POSITIVE, default=64, help="ring buffer capacity (parts)")
    insp.add_argument(
        "--buffer-mb",
        type=POSITIVE,
        default=512,
        help="ring buffer bound in MiB of decoded images (a full buffer answers 503 overloaded)",
    )
    insp.add_argument(
        "--body-timeout",
        type=POSITIVE_NUMBER,
        default=30.0,
        help="seconds an upload may send nothing before it is answered 408; also the seconds a "
        "connection has to send a request's headers (from its opening or its last answer) before it "
        "is closed",
    )
    insp.add_argument("--max-batch", type=POSITIVE, default=8, help="largest inference micro-batch")
    insp.add_argument(
        "--overflow",
        choices=["reject", "drop_oldest"],
        default="reject",
        help="full buffer: refuse with 503 + Retry-After, or drop the oldest part (stored as NOT_INSPECTED)",
    )
    insp.add_argument("--retry-after", type=NON_NEGATIVE, default=1, help="Retry-After seconds on 503")
    insp.add_argument("--max-upload-mb", type=POSITIVE, default=20,
                      help="largest upload in MiB; a larger one is answered 413 (default 20)")
    _add_image_limit_argument(insp, buffered=True)
    insp.add_argument(
        "--fast",
        action="store_true",
        help="score only the given type (no predicted type / type scores)",
    )
    add_runtime_arguments(insp)
    line = p.add_argument_group("the line")
    line.add_argument(
        "--watch",
        type=path_name,
        action="append",
        metavar="DIR",
        help="also ingest images written into DIR (repeatable)",
    )
    _add_line_arguments(line, window_help, served=True)
    push = p.add_argument_group("pushing decisions")
    push.add_argument("--mqtt", default=None, metavar="URL",
                      help="push every decision to an MQTT broker: mqtt://host:1883/topic-prefix (mqtts:// "
                           "for TLS; over WebSockets, a broker reached through port 443 only: "
                           "wss://host/mqtt?prefix=topic-prefix)")
    push.add_argument("--mqtt-cert", type=path_name, default=None, metavar="PEM",
                      help="the client certificate an mqtts:// broker lets in (its CA's: "
                           "require_certificate, AWS IoT Core), its chain after it; its key in the same "
                           "file or --mqtt-key")
    push.add_argument("--mqtt-key", type=path_name, default=None, metavar="PEM",
                      help="--mqtt-cert's private key (PEM, unencrypted; readable by this user only)")
    push.add_argument("--mqtt-client-id", type=recorded_name, default=None, metavar="ID",
                      help="the MQTT client id, when the broker's access list names it (pattern %%c, "
                           "AWS IoT's thing name; default: a random one); one per service: a second "
                           "client with it ends the first's connection")
    push.add_argument("--webhook", default=None, metavar="URL",
                      help="POST every decision as JSON to URL (https://USER:PASSWORD@host/... for HTTP "
                           "Basic authentication; through HTTP(S)_PROXY unless NO_PROXY names the host)")
    push.add_argument("--webhook-cert", type=path_name, default=None, metavar="PEM",
                      help="the client certificate an https:// endpoint behind mutual TLS lets in, its chain "
                           "after it; its key in the same file or --webhook-key")
    push.add_argument("--webhook-key", type=path_name, default=None, metavar="PEM",
                      help="--webhook-cert's private key (PEM, unencrypted; readable by this user only)")
    push.add_argument("--webhook-connections", type=POSITIVE, default=1, metavar="N",
                      help="push over N kept connections at once (an endpoint far away: one push per "
                           "round trip each; the order of arrival then not kept); default 1, one after "
                           "another, in order")
    push.add_argument("--webhook-timeout", type=POSITIVE_NUMBER, default=5.0, metavar="SECONDS",
                      help="how long a push waits for the endpoint's answer (default 5); a slower "
                           "answer is none, and the message is sent again: give a slow endpoint (an ERP "
                           "behind it) more")
    push.add_argument("--webhook-header", action="append", default=None, metavar="'NAME: VALUE' or @FILE",
                      help="a header sent with every push, e.g. 'Authorization: Bearer TOKEN' "
                           "(repeatable); @FILE reads header lines from a file (a secret's, kept off "
                           "the command line)")
    push.add_argument("--webhook-secret", action="append", default=None, metavar="whsec_KEY or @FILE",
                      help="sign every push as Standard Webhooks does (webhook-id, webhook-timestamp, "
                           "webhook-signature: HMAC-SHA256), so the receiver can check that this service "
                           "sent it, unchanged and recently; the key as whsec_ and base64, or @FILE "
                           "holding it (kept off the command line); repeatable, or a key a line in FILE: "
                           "signed with each, to replace a key without a gap")
    push.add_argument("--push-parts", nargs="?", const="each", default=None, choices=PART_PUSHES,
                      help="also push each part's verdict (its images sent with one part_id, one per "
                           "type: the worst of their decisions, GET /v1/parts/{part_id}) each time images "
                           "of it are stored (each, the default) or only then when it is complete (an "
                           "image of each of its types: --part-types, else the model's): MQTT "
                           "PREFIX/parts/<part_id>, a webhook POST of kind part")
    _add_opcua_arguments(push)
    log = p.add_argument_group("log")
    _add_log_arguments(log)
    log.add_argument("--access-log", action="store_true", help="log every HTTP request")

    p.set_defaults(func=_cmd_serve)

    w = subparsers.add_parser("watch", help="inspect images as a camera writes them into a folder")
    w.add_argument("dir", type=path_name,
                   help="folder the camera writes into (and its sub-folders, to any depth)")
    w.add_argument("model", type=path_name, help="model bundle folder")
    folder = w.add_argument_group("the folder")
    folder.add_argument(
        "--feature-type",
        default=None,
        help="type of every image (default: the nearest folder around it named as a type, "
        "DIR/<type>/2026-12-02/img.png, DIR itself included; else unknown)",
    )
    folder.add_argument("--poll", type=POSITIVE_NUMBER, default=0.5, help="seconds between scans")
    folder.add_argument(
        "--settle",
        type=number(0.0),
        default=1.0,
        help="a file is complete once unchanged for this many seconds",
    )
    folder.add_argument("--keep", action="store_true",
                        help="leave files in place (default: move to processed/); for a folder that "
                        "something else empties: every poll looks at every file there (20,000 files: "
                        "0.4 s per poll; BENCHMARKS.md \"Session 23\")")
    folder.add_argument("--once", action="store_true", help="process what is there, then exit")
    folder.add_argument("--source", type=_recorded_source, default=None,
                        help="idempotency namespace, the records' source (default: watch:<the folder's "
                             "absolute path>)")
    store = w.add_argument_group("results and what is kept")
    _add_store_arguments(store, db_help, served=False)
    insp = w.add_argument_group("inspection")
    insp.add_argument("--max-batch", type=POSITIVE, default=8, help="largest inference micro-batch")
    _add_image_limit_argument(insp, buffered=False)
    add_runtime_arguments(insp)
    line = w.add_argument_group("the line")
    _add_line_arguments(line, window_help, served=False)
    push = w.add_argument_group("pushing decisions")
    _add_opcua_arguments(push)
    log = w.add_argument_group("log")
    _add_log_arguments(log)

    w.set_defaults(func=_cmd_watch)

    r = subparsers.add_parser("results", help="work with stored results")
    rsub = r.add_subparsers(dest="results_command", metavar="ACTION")
    e = rsub.add_parser("export", help="export parts reviewed GOOD as a dataset (images to retrain on)")
    e.add_argument("out", type=path_name, help="output folder (images + manifest.csv)")
    e.add_argument("--db", type=path_name, default=None, help=db_help)
    e.add_argument("--data-dir", type=path_name, default=None,
                   help="the folder serve or watch kept the images in (default beside the SQLite file)")
    e.add_argument("--since", default=None,
                   help="only parts inspected since (ISO 8601, epoch seconds, a span back from now: 8h, "
                        "or today, yesterday, 06:00, yesterday 22:00: this machine's clock)")
    e.add_argument("--defects", action="store_true",
                   help="also export the parts reviewed BAD, labelled defect (the line's defects "
                        "found), to test a model on: diffqc test MODEL OUT (training reads only the "
                        "GOOD ones)")
    e.set_defaults(func=_cmd_export)
    when = ("(ISO 8601, UTC unless it has an offset such as +01:00, epoch seconds, a span back "
            "from now: 8h, 90m, 2d, 1w, or today, yesterday: this machine's midnights, a time of day "
            "on its clock: 06:00, yesterday 22:00, or now)")
    e.add_argument("--until", default=None, help=f"only parts inspected before {when}")
    e.add_argument("--feature-type", default=None, help="only parts of this type")
    for name in ("line", "station", "camera"):  # of a store several share: a model is retrained on its own
        e.add_argument(f"--{name}", default=None, help=f"only parts whose {name} is this")
    ls = rsub.add_parser("list", help="the stored decisions, oldest first, as JSON lines or CSV",
                         description="Print the decisions `serve` and `watch` stored, oldest first, "
                                     "filtered as /v1/results filters them; redirect to a file "
                                     "for a shift's report (--format csv opens in a spreadsheet).")

    def listing(sub: argparse.ArgumentParser, what: str) -> None:
        """The options of a listing: its store, format and period."""
        sub.add_argument("--db", type=path_name, default=None, help=db_help)
        sub.add_argument("--format", choices=["jsonl", "csv", "xlsx"], default="jsonl",
                         help="one JSON object per line (default), CSV with a header row, or an Excel "
                              "workbook (typed cells, times as dates in UTC: opens in any locale's "
                              "spreadsheet; redirect it, > shift.xlsx)")
        sub.add_argument("--since", default=None, help=f"{what} inspected at or after {when}")
        sub.add_argument("--until", default=None, help=f"{what} inspected before {when}")

    listing(ls, "parts")
    ls.add_argument("--feature-type", default=None, help="parts of this type")
    ls.add_argument("--decision", choices=[*DECISIONS, NOT_INSPECTED], default=None, type=str.upper,
                    help="parts given this decision")
    verdict = ls.add_mutually_exclusive_group()
    verdict.add_argument("--review", choices=["GOOD", "BAD"], default=None, type=str.upper,
                         help="parts an operator reviewed with this verdict")
    verdict.add_argument("--unreviewed", action="store_true", help="parts without a verdict")
    for name in ("part-id", "line", "station", "camera", "source"):
        ls.add_argument(f"--{name}", default=None, help=f"parts whose {name.replace('-', ' ')} is this")
    ls.set_defaults(func=_cmd_list)
    pt = rsub.add_parser("parts", help="each part's verdict from its images (one per feature type), "
                                       "as JSON lines or CSV",
                         description="Print each part's verdict, from the stored images sent with its "
                                     "part id (serve: part_id; watch: the file's name without its "
                                     "suffix): per feature type its latest image, the part's decision "
                                     "the worst of theirs (REJECT, NOT_INSPECTED, REVIEW, PASS), as "
                                     "GET /v1/parts/{part_id} gives it; in the order of part ids. "
                                     "Images of an id more than --part-window (an hour) before its "
                                     "latest are an earlier part's and not counted, nor listed: give "
                                     "a period shorter than the cycle of part ids that repeat (a "
                                     "counter reset each shift).")
    listing(pt, "images")
    pt.add_argument("--decision", choices=[*DECISIONS, NOT_INSPECTED], default=None, type=str.upper,
                    help="parts given this verdict")
    for name in ("part-id", "line", "station", "camera"):
        pt.add_argument(f"--{name}", default=None, help=f"images whose {name.replace('-', ' ')} is this")
    pt.add_argument("--model", type=path_name, default=None, metavar="MODEL",
                    help="the bundle whose types a part should have: each part's `complete` and `missing` "
                         "(the types without an image) and a count of the incomplete parts")
    pt.add_argument("--part-types", type=names, default=(), metavar="TYPES",
                    help="the types a part should have, when fewer than --model's or without it "
                         "(dots,edge1), as serve and watch take them")
    pt.add_argument("--part-window", type=POSITIVE_NUMBER, default=PART_WINDOW_S, metavar="SECONDS",
                    help=window_help)
    pt.add_argument("--incomplete", action="store_true",
                    help="only parts without an image of some of --model's types (or --part-types) (a "
                         "camera that missed crops)")
    pt.set_defaults(func=_cmd_parts)
    sm = rsub.add_parser("summary", help="a period's counts per type (or camera, line, ...): decisions, "
                                         "the share flagged, verdicts on them, escapes",
                         description="Count the parts `serve` and `watch` stored in a period, per "
                                     "type (--by): inspected and by decision, the share flagged "
                                     "(REVIEW or REJECT), of the flagged parts those an operator "
                                     "reviewed BAD (real defects) and GOOD (false alarms), REVIEW "
                                     "parts waiting for a verdict, and PASS parts reviewed BAD later "
                                     "(escapes); a last row of all.")
    sm.add_argument("--db", type=path_name, default=None, help=db_help)
    sm.add_argument("--since", default=None, help=f"parts inspected at or after {when}")
    sm.add_argument("--until", default=None, help=f"parts inspected before {when}")
    from diffqc.service.store import SUMMARY_KEYS  # a submodule: not at import time

    sm.add_argument("--by", action="append", choices=list(SUMMARY_KEYS), default=None,
                    help="group by this (repeatable, in order; default feature_type, with --parts line)")
    sm.add_argument("--parts", action="store_true",
                    help="count parts, not images: each part once, by its verdict from its crops (the "
                         "worst of its types' latest, as results parts gives it), grouped by its latest "
                         "crop's line, station, camera or source")
    sm.add_argument("--part-window", type=POSITIVE_NUMBER, default=PART_WINDOW_S, metavar="SECONDS",
                    help="with --parts: " + window_help)
    sm.add_argument("--format", choices=["table", "csv", "jsonl", "xlsx"], default="table",
                    help="an aligned table (default), CSV with a header row, one JSON object per group, "
                         "or an Excel workbook (redirect it, > shift.xlsx)")
    sm.set_defaults(func=_cmd_summary)
    bk = rsub.add_parser("backup", help="copy a SQLite result store while serve or watch write to it",
                         description="Copy a SQLite result store as of one commit, while `serve` or "
                                     "`watch` go on writing to it (a cp of a store being written can "
                                     "be torn, or miss the records still in its -wal file): one file, "
                                     "checked, written whole or not at all. Kept images and heat maps "
                                     "are files: copy --data-dir's folder beside it. A PostgreSQL store "
                                     "is backed up with pg_dump.")
    bk.add_argument("out", type=path_name,
                    help="the backup's file, or a folder (a file in it named by the store and "
                                "the UTC time: results-20261203-220000.db)")
    bk.add_argument("--db", type=path_name, default=None, help=db_help)
    bk.add_argument("--force", action="store_true", help="replace OUT when it is an earlier backup")
    bk.set_defaults(func=_cmd_backup)
    rs = rsub.add_parser("restore", help="put a backup back as the SQLite result store (serve and watch "
                                         "stopped)",
                         description="Put a `results backup` back as the result store, through SQLite (a "
                                     "cp of the backup over a store that a crash left with its -wal file "
                                     "is not the backup: SQLite applies that file over it). The store as "
                                     "it was is first copied beside it (STORE.before-restore-<UTC "
                                     "time>.db). Refused while serve or watch hold the store open: stop "
                                     "them first. A PostgreSQL store is restored with pg_restore.")
    rs.add_argument("backup", type=path_name, help="the backup's file")
    rs.add_argument("--db", type=path_name, default=None, help=db_help)
    rs.set_defaults(func=_cmd_restore)
    cp = rsub.add_parser("copy", help="copy a SQLite store's whole history into a new store (a pilot's "
                                      "into the plant's PostgreSQL; serve and watch stopped)",
                         description="Copy a SQLite result store's whole history into a store that "
                                     "holds none (a pilot's SQLite store into the plant's PostgreSQL, "
                                     "where the station goes on): every record with its id, its "
                                     "reviews, the sinks' waiting messages and dead letters, and the "
                                     "service's state, in one transaction (all or nothing). The source "
                                     "is read, never changed; stop serve and watch first (refused while "
                                     "they hold it open). Kept images and heat maps stay files: give "
                                     "the service on the new store the same --data-dir, or copy that "
                                     "folder to its own.")
    cp.add_argument("target", type=path_name,
                    help="the store to copy into: postgresql://user@host/db, or a SQLite path")
    cp.add_argument("--db", type=path_name, default=None,
                    help="the SQLite store to copy (default $DIFFQC_DB or diffqc-results.db)")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    cp.set_defaults(func=_cmd_copy)
