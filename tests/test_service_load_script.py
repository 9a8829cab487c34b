"""``benchmarks/service_load.py``'s ``model_and_data``, which the service benchmarks
(``service_load``, ``model_swap``, ``service_faults``, ``opcua_cost``) read ``--model`` and
``--data`` through: given relative to the current folder, as a command line gives them, they are
made absolute, because each benchmark starts its service in a working folder of its own, where a
relative ``--model`` named another (absent) folder and the service refused to start."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from .conftest import load_benchmark

service_load = load_benchmark("service_load")


def test_relative_model_and_data_are_made_absolute_from_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    model, data = service_load.model_and_data(argparse.ArgumentParser(), Path("model"), Path("data"),
                                              tmp_path / "work")
    assert (model, data) == ((tmp_path / "model").resolve(), (tmp_path / "data").resolve())


def test_model_without_data_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        service_load.model_and_data(argparse.ArgumentParser(), Path("model"), None, tmp_path)
    assert exc.value.code == 2
