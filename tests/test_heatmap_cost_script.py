"""``benchmarks/heatmap_cost.py`` at a tiny size (a small PaDiM model, 64 x 64 parts, one round), run
as its command is, from another folder than the repository: its table has real rates and sizes
and it names the repository's commit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_config, write_clear_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "heatmap_cost.py"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PaDiM model bundle of a small clear set (no training steps: seconds)."""
    import warnings

    from diffqc.data import load_dataset
    from diffqc.model import Detector

    data = write_clear_dataset(tmp_path_factory.mktemp("small"), n_train=8, n_test=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few calibration images for the levels: a tiny set's
        det = Detector(tiny_config("padim"), device="cpu").fit(load_dataset(data), progress=False)
    return det.save(tmp_path_factory.mktemp("models") / "small")


def test_rates_and_sizes_are_printed_under_the_repositorys_commit(small_model: Path,
                                                                   tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(small_model), "--sizes", "64x64",
                           "--heatmap-sizes", "0", "--parts", "2", "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    head = re.match(r"commit (\S*), \d{4}-\d\d-\d\d \d\d:\d\d UTC, 1 threads, 2 parts x 1 rounds", lines[0])
    assert head, lines[0]
    # the repository's commit, not the current folder's (none here)
    kind = subprocess.run(["git", "-C", str(SCRIPT.parent), "cat-file", "-t", head[1] or "-"],
                          capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{7,40}", head[1]) and kind == "commit", head[1]
    rows = [line for line in lines if line.startswith("| 64 x 64 |")]
    assert len(rows) == 2
    for row, drawn in zip(rows, (False, True), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        rates = re.fullmatch(r"(\d+\.\d) \((\d+\.\d)\)", cells[2])  # median (the one round)
        assert rates, row
        assert float(rates[1]) == float(rates[2]) > 0
        kb = float(cells[3].removesuffix(" KB"))
        assert (kb > 0) if drawn else (kb == 0)
        assert cells[4] == "0%"
