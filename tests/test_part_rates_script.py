"""``benchmarks/part_rates.py``'s manifest, which the README's and METHOD.md's part-level flag
rates were measured on (before it, built by hand and by no script): the i-th GOOD image of every
type one part, as many parts as the type with the fewest GOOD images has, each defective image a
part of its own; ``load_dataset`` reads it back with those parts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from diffqc.data import GOOD, load_dataset
from diffqc.synth import write_synthetic_dataset

from .conftest import load_benchmark

part_rates = load_benchmark("part_rates")


def test_the_manifest_makes_parts_of_every_type(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "synth", n_parts=44, image_size=64, progress=False)
    counts = part_rates.parts_manifest(tmp_path / "synth", tmp_path / "parts.csv")
    samples = load_dataset(tmp_path / "parts.csv")
    good = [s for s in samples if s.label == GOOD]
    bad = [s for s in samples if s.label != GOOD]
    per_good_part = Counter(s.part_id for s in good)
    assert set(per_good_part.values()) == {8} and len(per_good_part) == counts["good_parts"] > 0
    # each GOOD part holds one image of each of the 8 types, the i-th of each in file-name order
    for part in per_good_part:
        assert len({s.feature_type for s in good if s.part_id == part}) == 8
    first = sorted((s for s in good if s.part_id == "P0000"), key=lambda s: s.feature_type)
    every = sorted(load_dataset(tmp_path / "synth"), key=lambda s: (s.feature_type, s.path.name))
    assert [s.path.name for s in first] == [
        next(e for e in every if e.feature_type == s.feature_type and e.label == GOOD).path.name
        for s in first]
    # each defective image is a part of its own, and none is left out
    assert len({s.part_id for s in bad}) == len(bad) == counts["defective_parts"] > 0
    written = len(load_dataset(tmp_path / "synth"))
    assert len(samples) + counts["good_images_left_out"] == written
