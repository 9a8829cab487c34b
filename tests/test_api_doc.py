"""docs/API.md covers the HTTP service exactly: one section per route, no section for a route
that does not exist, and every error code the app raises by name.

The route table comes from ``create_app`` itself (no model is loaded: the lifespan, which loads
it, never runs), so a route added, renamed or removed in ``diffqc.service.app`` fails here until
the reference says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "API.md"
APP_SOURCE = ROOT / "src" / "diffqc" / "service" / "app.py"

# "### `POST /v1/inspect`": a route's section
HEADING = re.compile(r"^### `(?P<method>[A-Z]+) (?P<path>/[^`\s]*)`\s*$")
# the decorators that declare routes in app.py: @app.get("/healthz"...), @api.post("/v1/inspect"...)
DECORATOR = re.compile(r"@(?:app|api)\.(get|post|put|patch|delete)\(\s*\"([^\"]+)\"")
# ServiceError(422, "bad_time", ...): a literal code (f-strings such as f"bad_{name}" left out)
RAISED_CODE = re.compile(r"ServiceError\(\s*(\d{3}),\s*\"([a-z0-9_]+)\"")
IGNORED_METHODS = {"HEAD", "OPTIONS"}
CONVERTOR = re.compile(r":[a-z]+}")


def _walk(routes: Iterable[Any]) -> Iterable[tuple[str, str]]:
    """(method, path) of every endpoint, through included routers (FastAPI wraps those in an
    object that lists its routes under ``effective_candidates()``) and mounts (``routes``)."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _walk(candidates())
            continue
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is not None and methods:
            for method in methods:  # a parameter's convertor ({part_id:path}) is not in the docs
                yield method, CONVERTOR.sub("}", path)
        elif getattr(route, "routes", None):
            prefix = path or ""
            yield from ((m, prefix + p) for m, p in _walk(route.routes))


def app_routes() -> set[tuple[str, str]]:
    from diffqc.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(allow_no_token=True), detector=None)
    return {(m, p) for m, p in _walk(app.routes) if m not in IGNORED_METHODS}


def doc_headings(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("### `"):
            found = HEADING.match(line)
            assert found, f"docs/API.md: a route heading must read ### `METHOD /path`: {line!r}"
            out.append((found["method"], found["path"]))
    return out


def test_the_route_table_is_read_whole() -> None:
    """The walk finds every route app.py declares (else the checks below would pass on nothing)."""
    declared = {(m.upper(), CONVERTOR.sub("}", p))
                for m, p in DECORATOR.findall(APP_SOURCE.read_text(encoding="utf-8"))}
    assert declared, "no route decorators found in app.py"
    assert declared <= app_routes()


def test_every_route_has_its_section_and_every_section_a_route() -> None:
    routes = app_routes()
    headings = doc_headings(DOC.read_text(encoding="utf-8"))
    documented = set(headings)
    assert len(headings) == len(documented), "a route is described twice in docs/API.md"
    missing = sorted(routes - documented, key=lambda r: (r[1], r[0]))
    assert not missing, "routes without a section in docs/API.md: " + ", ".join(
        f"### `{m} {p}`" for m, p in missing)
    stale = sorted(documented - routes, key=lambda r: (r[1], r[0]))
    assert not stale, "docs/API.md describes routes the service does not have: " + ", ".join(
        f"{m} {p}" for m, p in stale)


def test_every_error_code_the_app_raises_is_documented() -> None:
    raised = {code for _, code in RAISED_CODE.findall(APP_SOURCE.read_text(encoding="utf-8"))}
    assert {"unauthorized", "overloaded", "not_inspected"} <= raised  # the pattern still matches
    doc = DOC.read_text(encoding="utf-8")
    undocumented = sorted(code for code in raised if f"`{code}`" not in doc)
    assert not undocumented, f"error codes missing from docs/API.md: {undocumented}"


def doc_section(title: str) -> str:
    """The text of docs/API.md's ``## title`` section."""
    return DOC.read_text(encoding="utf-8").split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def record_fields() -> set[str]:
    """The fields of "The result record"'s table (a row may name several: `line`, `station`, ...)."""
    return {name for row in doc_section("The result record").splitlines() if row.startswith("| `")
            for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


SQL_SECTION = "Reading the result store with SQL"


def store_columns_documented() -> tuple[set[str], set[str]]:
    """The SQL section's columns of ``diffqc_results`` and of ``diffqc_reviews``."""
    text = doc_section(SQL_SECTION)
    items = {key: set(re.findall(r"`([a-z_]+)`", item.split(":", 1)[1]))
             for item in re.split(r"\n- ", text.split("\n\n", 3)[2]) if ":" in item
             for key in ("not stored", "stored only") if key in item.split(":", 1)[0]}
    reviews = text.split("`diffqc_reviews` holds", 1)[1].split("\n\n", 1)[0]
    results = record_fields() - items["not stored"] | items["stored only"]
    return results, {"id"} | set(re.findall(r"`([a-z_]+)`", reviews.split(":", 1)[1]))


def sql_blocks() -> list[str]:
    """The SQL section's statements, in order."""
    return re.findall(r"```sql\n(.*?)```", doc_section(SQL_SECTION), flags=re.S)


def test_the_store_tables_a_report_reads_are_described_column_for_column(tmp_path: Path) -> None:
    """A plant's reporting tool (Grafana, Power BI) reads the result store's tables on the plant's
    PostgreSQL; the docs named none of them. The section says which two tables and columns it may
    read: those of a store, column for column (PostgreSQL's in tests/test_service_postgres.py)."""
    import sqlite3

    from diffqc.service.store import ResultStore

    with ResultStore(str(tmp_path / "r.db")):
        pass
    results, reviews = store_columns_documented()
    with sqlite3.connect(tmp_path / "r.db") as conn:
        columns = {t: {row[1] for row in conn.execute(f"PRAGMA table_info({t})")}
                   for t in ("diffqc_results", "diffqc_reviews")}
    assert columns == {"diffqc_results": results, "diffqc_reviews": reviews}
    assert len(sql_blocks()) == 4
