"""``benchmarks/fit_memory.py`` at a tiny size: each size fitted in a process of its own, its
peak memory above the features and the check's lower bound printed as a table row."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_benchmark

fm = load_benchmark("fit_memory")


def test_each_size_is_measured_in_a_process_of_its_own(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["fit_memory.py", "--sizes", "1x8,2x8"])
    assert fm.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| types x GOOD images | features MiB |")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    assert [c[0] for c in cells] == ["1x8", "2x8"]
    assert all(len(c) == 5 and all(float(v) >= 0 for v in c[1:]) for c in cells)
