"""``diffqc demo`` end to end on a small synthetic set: one warning line at most, naming types."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffqc.cli import main
from diffqc.config import DetectorConfig
from diffqc.visualize import DECISION_COLOURS


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
    # a second run replaces its own data, model and table, and refuses nothing; never a heat map
    # name a file has already (the first run's, here one a user put a note in)
    heatmaps = tmp_path / "demo" / "heatmaps"
    first = sorted(heatmaps.iterdir())
    # drawn as the commands draw them (each image over its type's fixed colour scale, which its
    # own range made GOOD parts look red): under a header in its decision's colour
    for path in first:
        with Image.open(path) as picture:
            corner = np.asarray(picture.convert("RGB"))[4:10, :24].reshape(-1, 3)
        colour = DECISION_COLOURS[path.stem.rsplit("_", 2)[-2]]
        assert (corner == colour).all(axis=1).any(), path.name
    first[0].write_bytes(b"my note")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", "64", "--method", "padim",
                 "--set", "backbone.input_size=64", "--set", "padim.dims=20", "-q",
                 "--json", str(tmp_path / "table.json")]) == 0
    assert first[0].read_bytes() == b"my note"
    assert len(list(heatmaps.iterdir())) == 2 * len(first)
    assert json.loads((tmp_path / "demo" / "timings.json").read_text())["type_accuracy"] == 1.0


def test_demo_names_the_fold_models_it_fits() -> None:
    """``demo --parts 40`` leaves 3 GOOD training parts a type: it said "scored by one of 5 fold
    models" and fitted 3 (empty folds are dropped). It names the folds it fits."""
    from diffqc.config import with_overrides
    from diffqc.data import GOOD, Sample
    from diffqc.demo import DEMO_DEFAULTS, calibration_text

    config = with_overrides(DetectorConfig(), DEMO_DEFAULTS)
    train = [Sample(Path(f"{t}/{i}.png"), t, GOOD, split="train")
             for t in ("dots", "edge1") for i in range(3)]
    assert "scored by one of 3 fold models" in calibration_text(config, train)
    many = [Sample(Path(f"dots/{i}.png"), "dots", GOOD, split="train") for i in range(12)]
    assert "scored by one of 5 fold models" in calibration_text(config, many)


# a small model: where a check is missing the demo runs through quickly, and the test fails
LIGHT = ["--method", "padim", "--set", "backbone.input_size=64", "--set", "padim.dims=20", "-q"]


@pytest.mark.parametrize("parts", ["24", "39"])
def test_demo_refuses_parts_that_leave_a_type_without_defects(parts: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --parts 24`` to ``39`` gave some types no defective test part: every such type's
    AUROC "-", "mean image AUROC then nan", exit 0, as if the demo had shown something."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--parts", parts, *LIGHT]) == 1
    err = capsys.readouterr().err
    assert "demo: --parts must be at least 40 (5 for each of the 8 types" in err and f"got {parts}" in err
    assert not (tmp_path / "demo" / "data").exists()  # said before any work


def test_demo_json_never_replaces_a_timings_file_it_did_not_write(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --json T`` wrote OUT/timings.json over any file of that name (a user's notes)."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "timings.json").write_text("my timings of the line\n")
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--parts", "64", *LIGHT,
               "--json", str(tmp_path / "table.json")])
    assert rc == 1
    assert "timings.json exists and is not an earlier demo's timings" in capsys.readouterr().err
    assert (tmp_path / "demo" / "timings.json").read_text() == "my timings of the line\n"
    assert not (tmp_path / "demo" / "data").exists()  # said before any work
