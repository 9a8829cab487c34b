"""``benchmarks/opcua_cost.py``'s ``--model`` and ``--data`` given relative to the current folder,
as a command line gives them: the service it starts (in a working folder of its own) is given the
bundle that was named. No service is started here: ``_round`` is replaced by one that looks for
the bundle as the service would (from its working folder) and returns fixed numbers, which the
table then reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from .conftest import load_benchmark, write_clear_dataset

opcua_cost = load_benchmark("opcua_cost")


def test_relative_model_and_data_are_read_from_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "metadata.json").write_text("{}")  # what the service looks for first
    write_clear_dataset(tmp_path / "data", n_train=2, n_test=1)
    served: list[Path] = []

    def fake_round(model: Path, parts: list[tuple[bytes, str]], work: Path, opcua: bool,
                   args: argparse.Namespace) -> dict[str, Any]:
        where = work / model  # the service runs in `work`: a relative path is read from there
        if not (where / "metadata.json").is_file():
            raise RuntimeError(f"model bundle {model} does not exist")
        served.append(where.resolve())
        assert len(parts) == 4  # the data's test images, read as given
        return {"p50_ms": 10.0 + opcua, "p99_ms": 20.0 + opcua, "throughput_per_s": 5.0,
                "notifications": 4.0 if opcua else 0.0}

    monkeypatch.setattr(opcua_cost, "_round", fake_round)
    monkeypatch.chdir(tmp_path)
    assert opcua_cost.main(["--model", "model", "--data", "data", "--rounds", "1"]) == 0
    assert served == [bundle.resolve()] * 2
    out = capsys.readouterr().out
    assert "| without | 10.00 | 20.00 | 5.0 |" in out
    assert "| with --opcua + a subscriber | 11.00 | 21.00 | 5.0 |" in out
