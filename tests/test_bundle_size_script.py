"""``benchmarks/bundle_size.py`` at a tiny size: the size table (a float32, a float16 and an int8
bundle of each configuration, saved and measured, and the scoring timed) and ``--parity`` (a
float16 and an int8 bundle against a float32 one), run through its ``main`` as its commands are
(no dataset: random features, as the size table's own)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from .conftest import load_benchmark

bs = load_benchmark("bundle_size")


def test_size_table_has_both_storages_sizes_and_scoring_times(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bundle_size.py", "--types", "1,2", "--dims", "16", "--ranks", "4", "--per-type", "3",
            "--time-types", "2", "--batch", "4", "--repeats", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bs.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| types | prior_dims | rank |")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    assert [c[:3] for c in cells] == [["1", "16", "4"], ["2", "16", "4"]]
    for c in cells:
        fp32, fp16, int8 = float(c[3]), float(c[4]), float(c[5])
        assert 0 < int8 < fp16 < fp32  # the Gaussians halved, the eigenbases halved again
    # more types, more Gaussians: a bigger bundle
    assert float(cells[1][3]) > float(cells[0][3])
    # the 2-type model's scoring timed, trained and untrained; the 1-type one not asked for
    assert cells[0][9] == cells[0][10] == ""
    assert float(cells[1][9]) > 0 and float(cells[1][10]) > 0


def _random_set(n_types: int = 2, train: int = 4, test: int = 4) -> tuple[list, torch.Tensor]:
    from diffqc.data import DEFECTIVE, GOOD, Sample

    samples = []
    for t in range(n_types):
        samples += [Sample(Path(f"t{t}_train{i}.png"), f"type{t}", GOOD, split="train")
                    for i in range(train)]
        samples += [Sample(Path(f"t{t}_test{i}.png"), f"type{t}", GOOD if i % 2 else DEFECTIVE,
                           split="test") for i in range(test)]
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(len(samples), 128, 32, 32, generator=gen)
    for k, s in enumerate(samples):  # the defective ones stand out
        if s.label != GOOD:
            raw[k, :, 10:20, 10:20] += 4
    return samples, raw


def test_parity_compares_float16_and_int8_bundles_with_a_float32_one(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    monkeypatch.setattr(bs, "synthetic_features", lambda work, cache: _random_set())
    argv = ["bundle_size.py", "--parity", "--work", str(tmp_path), "--threads", "1",
            "--set", "diffusion.prior_dims=16", "--set", "diffusion.prior_rank=4",
            "--set", "diffusion.prior_context=0"]
    monkeypatch.setattr(sys, "argv", argv)
    assert bs.main() == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["test_images"] == 8
    assert 0 < result["bundle_mb_int8"] < result["bundle_mb_float16"] < result["bundle_mb_float32"]
    assert 0.5 < result["mean_auroc_float32"] <= 1.0
    for storage in ("float16", "int8"):
        got = result[storage]
        # the rounding moves the maps and scores a little, not at all or wildly
        assert 0 < got["map_max_rel_to_map_max"] < 0.05
        assert 0 < got["score_max_rel"] < 0.05
        assert got["order_flips"].endswith("of 12 same-type pairs")
        assert set(got["auroc_fp32_and_this"]) == {"type0", "type1"}
        assert 0.5 < got["mean_auroc"] <= 1.0
