"""``diffqc demo`` end to end on a small synthetic set: one warning line at most, naming types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffqc.cli import main


def test_demo_prints_at_most_one_calibration_warning_line(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--parts", "64", "--method", "padim",
               "--set", "backbone.input_size=64", "--set", "padim.dims=20", "-q",
               "--json", str(tmp_path / "table.json")])
    assert rc == 0
    captured = capsys.readouterr()
    warning_lines = [x for x in captured.err.splitlines() if x.startswith("diffqc: warning:")]
    assert len(warning_lines) <= 1, warning_lines
    # 64 parts leave ~5 GOOD training images per type: far too few for α, and all 8 types are named
    (line,) = warning_lines
    assert "calibration:" in line and all(t in line for t in ("angle", "dots", "edge4"))
    assert "every one also calibrates" in captured.out  # the demo calibrates on every GOOD image
    assert (tmp_path / "demo" / "model" / "metadata.json").is_file()
    # the type, withheld, is named by the router (these 8 types look nothing alike)
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    # every part routed to its own type and scored under it alone: the same scores, the same AUROC
    assert timings["type_accuracy"] == 1.0
    table = json.loads((tmp_path / "table.json").read_text())
    assert timings["image_auroc_type_withheld"] == pytest.approx(table[-1]["image_auroc"])
    assert "mean image AUROC then" in captured.out
    # a second run replaces its own data, model and table, and refuses nothing
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", "64", "--method", "padim",
                 "--set", "backbone.input_size=64", "--set", "padim.dims=20", "-q",
                 "--json", str(tmp_path / "table.json")]) == 0
