"""``benchmarks/quality.py``'s scoring time at a tiny size: the first, cold call of a fitted model
is a warm-up, left out of ``score_ms`` (a median of the images' times), and the AUROCs it reports
beside it are real. The benchmark reads a fake clock here, which only the scoring calls move (a
cold first call by ``COLD_S``, every later one by ``WARM_MS`` an image), so that the test holds
on a loaded machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffqc.data import load_dataset
from diffqc.model import Detector

from .conftest import FakeClock, load_benchmark, tiny_config

quality = load_benchmark("quality")
COLD_S, WARM_MS = 1.0, 2.0


def test_score_ms_leaves_the_cold_first_call_out(clear_dataset: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    samples = load_dataset(clear_dataset)
    config = tiny_config("padim")
    raw, masks = quality.extract(Detector(config, device="cpu"), samples)
    clock, real, calls = FakeClock(), Detector.inspect_features, []

    def timed(self: Detector, raw: Any, types: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(types))
        clock.now += COLD_S if len(calls) == 1 else WARM_MS / 1000 * len(types)
        return real(self, raw, types, *args, **kwargs)

    monkeypatch.setattr(quality, "time", clock)
    monkeypatch.setattr(Detector, "inspect_features", timed)
    rows = quality.evaluate_setting(config, raw, samples, masks, [list(range(len(samples)))])
    n_test = sum(s.split == "test" for s in samples)
    assert {r["feature_type"] for r in rows} == {"dots", "stripes"}
    assert sum(r["n_test"] for r in rows) == n_test == 32
    for r in rows:
        assert 0.8 < r["image_auroc"] <= 1 and 0.5 < r["pixel_auroc"] <= 1
        # a mean with the cold call in it: at least 1000 * COLD_S / 32 images = 31.25 ms
        assert r["score_ms"] == pytest.approx(WARM_MS)
    assert len(calls) >= 2  # a warm-up call, then the timed ones
