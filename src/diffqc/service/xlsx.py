"""A table as an Excel workbook (``.xlsx``, Office Open XML), for the ``results`` commands'
``--format xlsx``.

A CSV opened with a double click lands in one column in a spreadsheet whose list separator is
``;`` (a German, French or Italian Excel), shows non-ASCII text garbled without a byte order
mark, and reads ``0.25`` as a date or ``190.048`` as 190048 where ``,`` is the decimal mark; no
choice of separator, mark or encoding suits every locale. A workbook's cells carry their types:
a number is a number, a time a date (UTC), text text, whatever the reader's locale, and no text
is ever run as a formula.

Written by hand (a zip of five XML parts, the smallest package Excel, LibreOffice and openpyxl
open), so that no dependency is needed; the first row is the header, frozen.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import zipfile
from collections.abc import Collection, Iterable, Sequence
from typing import IO, Any
from xml.sax.saxutils import escape

MAX_ROWS = 1_048_576  # Excel's rows a sheet, the header's included
MAX_CELL_CHARS = 32_767  # Excel's characters a cell
_EPOCH_DAY = 25_569  # 1970-01-01 as an Excel date serial (the 1900 date system)
_DATE_STYLE, _PERCENT_STYLE = 1, 2  # cellXfs indices in _STYLES
# characters XML 1.0 cannot hold, and text that reads as OOXML's escape of one (_xHHHH_)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]|_(?=x[0-9A-Fa-f]{4}_)")

_CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">\
<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>\
<Default Extension="xml" ContentType="application/xml"/>\
<Override PartName="/xl/workbook.xml" \
ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>\
<Override PartName="/xl/worksheets/sheet1.xml" \
ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>\
<Override PartName="/xl/styles.xml" \
ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>\
</Types>"""
_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">\
<Relationship Id="rId1" \
Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" \
Target="xl/workbook.xml"/></Relationships>"""
_WORKBOOK_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">\
<Relationship Id="rId1" \
Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" \
Target="worksheets/sheet1.xml"/>\
<Relationship Id="rId2" \
Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/styles" \
Target="styles.xml"/></Relationships>"""
_WORKBOOK = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" \
xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">\
<sheets><sheet name="{name}" sheetId="1" r:id="rId1"/></sheets></workbook>"""
# cellXfs: 0 plain, 1 a date and time to the millisecond, 2 a percentage (built-in format 10)
_STYLES = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<styleSheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">\
<numFmts count="1"><numFmt numFmtId="164" formatCode="yyyy\\-mm\\-dd hh:mm:ss.000"/></numFmts>\
<fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>\
<fills count="2"><fill><patternFill patternType="none"/></fill>\
<fill><patternFill patternType="gray125"/></fill></fills>\
<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>\
<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>\
<cellXfs count="3"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>\
<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>\
<xf numFmtId="10" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/></cellXfs>\
<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>\
</styleSheet>"""
_SHEET_HEAD = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">\
<sheetViews><sheetView workbookViewId="0">\
<pane ySplit="1" topLeftCell="A2" activePane="bottomLeft" state="frozen"/></sheetView></sheetViews>\
<cols>{cols}</cols><sheetData>"""


class TooManyRows(ValueError):
    """The table has more rows than a sheet holds."""


def column_name(index: int) -> str:
    """Excel's name of the 0-based column ``index``: A ... Z, AA ..."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def _text(value: str) -> str:
    """Text as a cell's XML: characters XML cannot hold (and a literal ``_xHHHH_``'s underscore)
    written as OOXML's ``_xHHHH_``, cut to a cell's length."""
    value = _NOT_XML.sub(lambda m: f"_x{ord(m.group()):04X}_", value[:MAX_CELL_CHARS])
    return escape(value)


def _date_serial(value: Any) -> float | None:
    """An epoch time or an ISO 8601 text as an Excel date serial in UTC; None when neither."""
    if isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        value = (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return _EPOCH_DAY + float(value) / 86_400
    return None


def _cell(ref: str, value: Any, *, date: bool, percent: bool) -> str:
    if value is None or value == "":
        return ""
    if date and (serial := _date_serial(value)) is not None:
        return f'<c r="{ref}" s="{_DATE_STYLE}"><v>{serial!r}</v></c>'
    if isinstance(value, bool):
        return f'<c r="{ref}" t="b"><v>{int(value)}</v></c>'
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return f'<c r="{ref}" t="inlineStr"><is><t>{value}</t></is></c>'
        style = f' s="{_PERCENT_STYLE}"' if percent else ""
        return f'<c r="{ref}"{style}><v>{value!r}</v></c>'
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{_text(str(value))}</t></is></c>'


def write_xlsx(out: IO[bytes], header: Sequence[str], rows: Iterable[Sequence[Any]], *, sheet: str,
               dates: Collection[str] = (), percents: Collection[str] = ()) -> int:
    """Write a workbook of one sheet named ``sheet`` to the seekable ``out``: ``header``, then
    ``rows`` (values in the header's order; None empty). The columns named in ``dates`` hold
    times (epoch seconds or ISO 8601 text) written as dates in UTC; those in ``percents``,
    fractions shown as percentages. Returns the rows written; :class:`TooManyRows` when they
    exceed a sheet's (nothing usable is written then)."""
    names = [column_name(i) for i in range(len(header))]
    is_date = [h in dates for h in header]
    is_percent = [h in percents for h in header]
    widths = "".join(f'<col min="{i}" max="{i}" width="{max(10, min(len(h) + 2, 40))}" customWidth="1"/>'
                     for i, h in enumerate(header, 1))
    n = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as book:
        book.writestr("[Content_Types].xml", _CONTENT_TYPES)
        book.writestr("_rels/.rels", _RELS)
        book.writestr("xl/workbook.xml", _WORKBOOK.format(name=escape(sheet[:31], {'"': "&quot;"})))
        book.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
        book.writestr("xl/styles.xml", _STYLES)
        with book.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as part:
            part.write(_SHEET_HEAD.format(cols=widths).encode())
            titles = (_cell(f"{c}1", h, date=False, percent=False)
                      for c, h in zip(names, header, strict=True))
            part.write(f'<row r="1">{"".join(titles)}</row>'.encode())
            for n, row in enumerate(rows, 1):
                if n + 1 > MAX_ROWS:
                    raise TooManyRows(f"more than {MAX_ROWS - 1} rows, the most a sheet holds")
                r = n + 1
                cells = "".join(_cell(f"{c}{r}", v, date=d, percent=p)
                                for c, v, d, p in zip(names, row, is_date, is_percent, strict=True))
                part.write(f'<row r="{r}">{cells}</row>'.encode())
            part.write(b"</sheetData></worksheet>")
    return n
