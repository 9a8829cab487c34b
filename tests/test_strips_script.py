"""``benchmarks/strips.py``: the long thin crops that measure squash against pad on images far
from square (BENCHMARKS.md "Session 59")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import load_benchmark, write_clear_dataset

strips = load_benchmark("strips")


def test_strips_keep_each_images_central_band_and_its_defect(tmp_path: Path) -> None:
    from diffqc.data import DEFECTIVE, GOOD, load_dataset

    source = write_clear_dataset(tmp_path / "src", n_train=6, n_test=8)
    out = tmp_path / "strips"
    counts = strips.write_strips(source, out, ratio=8)
    before = load_dataset(source)
    after = load_dataset(out)
    # a 64 x 64 image's band: rows 28..36
    bands = {(s.feature_type, s.path.name): s for s in after}
    dropped = 0
    for s in before:
        key = (s.feature_type, s.path.name)
        if s.label == DEFECTIVE:
            full = np.asarray(Image.open(s.mask_path)) > 0
            if not full[28:36].any():  # its defect outside the band: left out, not labelled defective
                assert key not in bands
                dropped += 1
                continue
            assert np.array_equal(np.asarray(Image.open(bands[key].mask_path)) > 0, full[28:36])
        kept = bands[key]
        assert (kept.label, kept.split, kept.defect) == (s.label, s.split, s.defect)
        assert np.array_equal(np.asarray(Image.open(kept.path)), np.asarray(Image.open(s.path))[28:36])
    assert counts == {"written": len(after), "defective_left_out": dropped}
    assert sum(s.label == GOOD for s in after) == sum(s.label == GOOD for s in before)
    assert dropped > 0 and sum(s.label == DEFECTIVE for s in after) > 0
