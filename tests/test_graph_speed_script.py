"""``benchmarks/graph_speed.py`` at a tiny size: a model fitted on random features in each storage,
exported, and its graph's scorer half timed on each runtime asked for, run through its ``main``."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_benchmark

gs = load_benchmark("graph_speed")


def test_every_storage_and_runtime_is_timed(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["graph_speed.py", "--types", "2", "--per-type", "16", "--threads", "1", "--batch", "4",
            "--rounds", "1", "--runs", "1", "--runtimes", "onnx,openvino"]
    monkeypatch.setattr(sys, "argv", argv)
    assert gs.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| storage | runtime | batch 1 | batch 4 |"
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    assert [c[:2] for c in cells] == [["float16", "onnx"], ["float16", "openvino"],
                                      ["int8", "onnx"], ["int8", "openvino"]]
    assert all(float(ms) > 0 for c in cells for ms in c[2:])
