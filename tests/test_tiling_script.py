"""``benchmarks/tiling.py``'s per-part time at a tiny size: the first, cold call of a fitted model
is a warm-up, left out of ``ms_per_part`` and ``cpu_ms_per_part`` (medians of the parts' times),
and the AUROCs it reports beside them are real. The benchmark reads a fake clock here, which
only the scoring calls move (a cold first call by ``COLD_S``, every later one by ``WARM_MS``),
so that the test holds on a loaded machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffqc.data import load_dataset
from diffqc.model import Detector

from .conftest import FakeClock, load_benchmark, tiny_config

tiling = load_benchmark("tiling")
COLD_S, WARM_MS = 1.0, 20.0


def test_ms_per_part_leaves_the_cold_first_call_out(clear_dataset: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    samples = tiling._subset(load_dataset(clear_dataset), 12, 6, 6, 0)
    clock, real, calls = FakeClock(), Detector.inspect, []

    def timed(self: Detector, images: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        clock.now += COLD_S if len(calls) == 1 else WARM_MS / 1000 * len(images)
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(tiling, "time", clock)
    monkeypatch.setattr(Detector, "inspect", timed)
    row = tiling.run_geometry(samples, tiny_config("padim"), "cpu")
    assert (row["train"], row["test_good"], row["test_defective"]) == (12, 6, 6)
    assert 0.8 < row["image_auroc"] <= 1 and 0.5 < row["pixel_auroc"] <= 1
    assert set(calls) == {1}  # one part a call
    # a mean with the cold call in it: (1000 * COLD_S + 11 * WARM_MS) / 12 parts = 101.7 ms
    assert row["ms_per_part"] == row["cpu_ms_per_part"] == pytest.approx(WARM_MS)
