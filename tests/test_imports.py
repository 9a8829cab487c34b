"""No import cycles in ``src/diffqc``, read from the source with ``ast`` (nothing is imported).

Two graphs are checked:

- at import time: the imports a module runs when it is imported (module level, including
  ``if``/``try``/``with`` blocks and class bodies, not ``if TYPE_CHECKING:``), plus the package
  ``__init__`` that importing a submodule runs first;
- every import anywhere, also those inside functions (lazy ones): a lazy import hides a cycle
  from the interpreter but not from the design, so the layers stay one-way (export depends on
  the detector, never the reverse; the watcher on the runtime, not on the HTTP app).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "diffqc"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    return "TYPE_CHECKING" in names


def _statements(body: Iterable[ast.stmt], *, lazy: bool) -> Iterator[ast.stmt]:
    """Statements that run: at import time (``lazy=False``: not inside functions) or at all."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _statements(stmt.body, lazy=lazy)
            yield from _statements(stmt.orelse, lazy=lazy)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                yield from _statements(block, lazy=lazy)
        elif isinstance(stmt, (ast.With, ast.ClassDef, ast.For, ast.While)) or (
                lazy and isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))):
            yield from _statements(stmt.body, lazy=lazy)


def imported_modules(path: Path, name: str, modules: set[str], *, lazy: bool) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for stmt in _statements(tree.body, lazy=lazy):
        if isinstance(stmt, ast.Import):
            out.update(a.name for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            if stmt.level:
                base = package.split(".")[: len(package.split(".")) - (stmt.level - 1)]
                source = ".".join(base + ([stmt.module] if stmt.module else []))
            else:
                source = stmt.module or ""
            out.add(source)
            out.update(f"{source}.{a.name}" for a in stmt.names)  # `from pkg import module`
    return {m for m in out if m in modules and m != name}


def import_graph(root: Path, package: str, *, lazy: bool) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    graph = {name: imported_modules(path, name, modules, lazy=lazy) for name, path in files.items()}
    if not lazy:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        for name in graph:
            parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
            graph[name] |= {p for p in parents if p in modules and p != name}
            for dep in list(graph[name]):
                graph[name] |= {".".join(dep.split(".")[:i]) for i in range(1, dep.count(".") + 1)
                                if ".".join(dep.split(".")[:i]) in modules}
            graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    """The check can fail: a lazy cycle and an import-time one in a throwaway package."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg import c\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom pkg import b\n"
                              "if TYPE_CHECKING:\n    from pkg.c import C\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from pkg.sub import d\n")
    (pkg / "sub" / "d.py").write_text("X = 1\n")
    assert find_cycle(import_graph(tmp_path, "pkg", lazy=False)) == ["pkg.c", "pkg.sub", "pkg.c"]
    assert find_cycle(import_graph(tmp_path, "pkg", lazy=True)) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    assert find_cycle(import_graph(tmp_path, "pkg", lazy=False)) is None
    assert find_cycle(import_graph(tmp_path, "pkg", lazy=True)) is None  # TYPE_CHECKING is no import


@pytest.mark.parametrize("lazy", [False, True], ids=["import-time", "with-lazy-imports"])
def test_no_import_cycles(lazy: bool) -> None:
    graph = import_graph(SRC, PACKAGE, lazy=lazy)
    assert len(graph) > 20 and "diffqc.model" in graph["diffqc.evaluate"]  # it reads the real tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_point_one_way() -> None:
    graph = import_graph(SRC, PACKAGE, lazy=True)
    leaves = {"diffqc.errors", "diffqc.output", "diffqc.machine"}  # below everything: errors at most
    assert graph["diffqc.output"] <= {"diffqc.errors"} and not graph["diffqc.errors"]
    assert graph["diffqc.machine"] <= {"diffqc.errors"}
    for name, deps in graph.items():
        if name.startswith("diffqc.backends"):  # below every detector
            assert deps <= {*leaves, *(d for d in graph if d.startswith("diffqc.backends"))}, name
        if name not in ("diffqc.cli", "diffqc.service.__main__"):  # the entry points, above all
            assert "diffqc.cli" not in deps, f"{name} imports the CLI"
    for low in ("diffqc.model", "diffqc.runtime", "diffqc.backbone", "diffqc.scoring", "diffqc.diffusion"):
        assert "diffqc.export" not in graph[low], f"{low} imports export (export depends on it)"
    assert "diffqc.service.app" not in graph["diffqc.service.watch"]
    assert "diffqc.baselines" not in graph["diffqc.diffusion"]


def test_the_api_asked_of_the_package_names_the_module_that_has_it() -> None:
    """`from diffqc import Detector` (as `from anomalib.models import Padim`, `from sklearn import
    ...` lead a user to try) was Python's bare "cannot import name 'Detector' from 'diffqc'": the
    package re-exports nothing (the model module imports the package: a re-export would be a
    cycle). The error now names the import that works; other names stay plain misses."""
    import diffqc

    for name, module in [("Detector", "diffqc.model"), ("DetectorConfig", "diffqc.config"),
                         ("load_dataset", "diffqc.data"), ("read_image", "diffqc.data"),
                         ("holdout_report", "diffqc.holdout"), ("overlay", "diffqc.visualize")]:
        with pytest.raises(ImportError, match=rf"^{name} is in {module}: from {module} import {name} "):
            exec(f"from diffqc import {name}", {})  # the statement a user types
        assert name in dir(__import__(module, fromlist=[name]))
    assert not hasattr(diffqc, "Detectr") and hasattr(diffqc, "__version__")
    with pytest.raises(ImportError, match="cannot import name 'Detectr'"):
        exec("from diffqc import Detectr", {})
