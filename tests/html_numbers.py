"""The report pages' numbers against report.json: shared by the report and evaluate tests."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from diffqc import report as R


class Spans(HTMLParser):
    """Collects <span class="num" data-key=... data-fmt=...>text</span>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str, str]] = []
        self._open: tuple[str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "span" and a.get("class") == "num":
            self._open = (a["data-key"] or "", a["data-fmt"] or "")
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            self.found.append((*self._open, self._text))
            self._open = None


def expected(value: Any, kind: str) -> str:
    """Independent restatement of the documented number formats."""
    if value is None:
        return "–"
    v = float(value)
    return {"num": f"{v:.3f}", "signed": f"{v:+.3f}", "pct": f"{100 * v:.1f}%",
            "p": "<0.001" if v < 0.001 else f"{v:.3f}", "int": str(int(v))}[kind]


def assert_numbers_match(page: str, data: Any) -> list[tuple[str, str, str]]:
    """Every number on ``page`` equals its JSON value in its documented format; returns the
    (key, format, text) of each number found."""
    spans = Spans()
    spans.feed(page)
    for key, kind, text in spans.found:
        assert text == expected(R.resolve_pointer(data, key), kind), key
    return spans.found
