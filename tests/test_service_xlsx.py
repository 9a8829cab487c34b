"""`results list|parts|summary --format xlsx`: workbooks a spreadsheet in any locale opens with
typed cells, read back by openpyxl (an independent reader), as a shell's redirect writes them."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffqc.service.store import LIST_COLUMNS, SUMMARY_COLUMNS, ResultRecord, ResultStore
from diffqc.service.xlsx import MAX_ROWS, TooManyRows, column_name, write_xlsx

openpyxl = pytest.importorskip("openpyxl")

T0 = 1_796_000_000.25  # 2026-11-30T00:53:20.250Z


def _diffqc(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with its stdout redirected to ``out``, as ``> out`` in a shell."""
    with out.open("wb") as fh:
        return subprocess.run([sys.executable, "-m", "diffqc.cli", *args], stdout=fh, stderr=subprocess.PIPE,
                              text=True, timeout=120, check=False)


def _sheet(path: Path) -> tuple[Any, list[list[Any]]]:
    book = openpyxl.load_workbook(path)
    (sheet,) = book.worksheets
    return sheet, [[c.value for c in row] for row in sheet.iter_rows()]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    db = tmp_path / "line.db"
    with ResultStore(str(db)) as s:
        s.insert_many([
            ResultRecord(created_at=T0, source="cam/1.png", decision="PASS", part_id="Prüfling-1",
                         feature_type="kante", score=0.25, p_value=0.5, line="Linie Süd"),
            ResultRecord(created_at=T0 + 1, source="cam/2.png", decision="REJECT", part_id="Prüfling-1",
                         feature_type="punkte", score=190.048, p_value=0.001),
            ResultRecord(created_at=T0 + 2, source="cam/3.png", decision="REVIEW",
                         part_id='=HYPERLINK("http://evil.example","x")', feature_type="kante",
                         score=float("nan"), p_value=0.04),
        ])
        s.set_review(3, "BAD", "Jörg", "Kratzer _x0041_ am Rand\x0b")
    return db


def test_results_list_as_a_workbook_has_typed_cells_in_any_locale(store: Path, tmp_path: Path) -> None:
    """A German Excel opened the CSV in one column, umlauts garbled, 190.048 read as 190048: the
    workbook's numbers are numbers, its times dates (UTC), its text text (never a formula; a
    character XML cannot hold, or text that reads as OOXML's escape of one, kept as it was
    sent: OOXML's ``_xHHHH_``, which Excel and LibreOffice read back as the character and
    openpyxl shows as written), and its header row frozen."""
    out = tmp_path / "shift.xlsx"
    done = _diffqc("results", "list", "--db", str(store), "--format", "xlsx", out=out)
    assert done.returncode == 0, done.stderr
    sheet, rows = _sheet(out)
    assert sheet.title == "results" and sheet.freeze_panes == "A2"
    assert tuple(rows[0]) == LIST_COLUMNS and len(rows) == 4
    got = [dict(zip(LIST_COLUMNS, r, strict=True)) for r in rows[1:]]
    assert [g["part_id"] for g in got] == ["Prüfling-1", "Prüfling-1", '=HYPERLINK("http://evil.example","x")']
    assert got[0]["line"] == "Linie Süd" and got[0]["id"] == 1
    assert got[1]["score"] == 190.048 and got[0]["score"] == 0.25 and got[2]["score"] is None
    created = got[0]["created"]
    assert isinstance(created, dt.datetime) and sheet["B2"].is_date
    assert abs(created.replace(tzinfo=dt.UTC).timestamp() - T0) < 0.001
    assert [sheet.cell(r, 4).data_type for r in (2, 3, 4)] == ["s", "s", "s"]  # no formula
    assert got[2]["reviewer"] == "Jörg" and got[2]["review_note"] == "Kratzer _x005F_x0041_ am Rand_x000B_"
    assert isinstance(got[2]["reviewed"], dt.datetime) and got[0]["reviewed"] is None


def test_results_parts_and_summary_as_workbooks(store: Path, tmp_path: Path) -> None:
    from diffqc.service import PART_COLUMNS

    parts = tmp_path / "parts.xlsx"
    done = _diffqc("results", "parts", "--db", str(store), "--format", "xlsx", out=parts)
    assert done.returncode == 0, done.stderr
    assert "2 parts: REVIEW 1 (50.0 %), REJECT 1 (50.0 %)" in done.stderr  # the count still said
    sheet, rows = _sheet(parts)
    assert sheet.title == "parts" and tuple(rows[0]) == PART_COLUMNS
    first = dict(zip(PART_COLUMNS, rows[2], strict=True))  # in the order of part ids
    assert (first["part_id"], first["decision"], first["images"]) == ("Prüfling-1", "REJECT", 2)
    assert first["types"] == "kante=PASS punkte=REJECT" and isinstance(first["last"], dt.datetime)
    summary = tmp_path / "summary.xlsx"
    done = _diffqc("results", "summary", "--db", str(store), "--format", "xlsx", out=summary)
    assert done.returncode == 0, done.stderr
    sheet, rows = _sheet(summary)
    assert tuple(rows[0]) == ("feature_type", *SUMMARY_COLUMNS)
    table = {r[0]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert table["kante"]["inspected"] == 2 and table["kante"]["flagged_share"] == 0.5
    column = column_name(rows[0].index("flagged_share"))
    assert sheet[f"{column}2"].number_format == "0.00%"
    assert table["all"]["REJECT"] == 1
    # a period without parts: said, and still a workbook (its header), not an empty file
    done = _diffqc("results", "summary", "--db", str(store), "--since", "1h", "--format", "xlsx", out=summary)
    assert done.returncode == 0 and "no stored results in this period" in done.stderr
    assert _sheet(summary)[1] == [["feature_type", *SUMMARY_COLUMNS]]


def test_a_workbook_is_not_written_to_a_terminal(store: Path) -> None:
    """A binary file on a terminal fills it with noise: refused, as gzip refuses, with the fix."""
    main, side = os.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "diffqc.cli", "results", "list", "--db", str(store),
                               "--format", "xlsx"], stdout=side, stderr=subprocess.PIPE, text=True,
                              timeout=120, check=False)
    finally:
        os.close(side)
        os.close(main)
    assert done.returncode != 0
    assert "--format xlsx writes a binary file: redirect it, such as > shift.xlsx" in done.stderr


def test_more_rows_than_a_sheet_holds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Excel opens at most 1,048,576 rows and drops the rest with a warning a shift report's
    reader may click away: refused instead (the command says to narrow the period or use CSV)."""
    from diffqc.service import xlsx

    assert MAX_ROWS == 1_048_576
    monkeypatch.setattr(xlsx, "MAX_ROWS", 5)
    assert write_xlsx(io.BytesIO(), ["id"], ([i] for i in range(4)), sheet="results") == 4
    with pytest.raises(TooManyRows, match="more than 4 rows"):
        write_xlsx(io.BytesIO(), ["id"], ([i] for i in range(5)), sheet="results")
    assert [column_name(i) for i in (0, 25, 26, 27, 701, 702)] == ["A", "Z", "AA", "AB", "ZZ", "AAA"]
