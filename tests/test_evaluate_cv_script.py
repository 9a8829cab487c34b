"""benchmarks/evaluate_cv.py --jitter: the jittered copy it evaluates (issue 14's robustness set)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffqc.data import DEFECTIVE, GOOD, Sample, load_dataset, read_image, read_mask
from diffqc.errors import OutputError

from .conftest import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def cv(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports quality.py from beside it
    return load_benchmark("evaluate_cv")


def _samples(root: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    root.mkdir()
    out = []
    for i, (label, part) in enumerate([(GOOD, "p0"), (GOOD, "p0"), (DEFECTIVE, "p1")]):
        img = (rng.uniform(0, 1, (40, 60, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        mask = None
        if label == DEFECTIVE:
            m = np.zeros((40, 60), np.uint8)
            m[10:30, 20:40] = 255
            Image.fromarray(m).save(root / "m.png")
            mask = root / "m.png"
        out.append(Sample(root / f"{i}.png", "edge", label, mask, part_id=part,
                          defect="good" if label == GOOD else "scratch",
                          split="train" if i == 0 else "test"))
    return out


def test_jittered_copy_keeps_labels_parts_and_moves_images_like_quality(cv, tmp_path: Path) -> None:
    quality = load_benchmark("quality")
    samples = _samples(tmp_path / "src")
    dest = cv.jittered_copy(samples, tmp_path / "jit", seed=3, size=32)
    copied = load_dataset(dest / "manifest.csv")
    assert [(s.feature_type, s.label, s.part_id, s.split, s.defect) for s in copied] == [
        (s.feature_type, s.label, s.part_id, s.split, s.defect) for s in samples]
    from diffqc.backbone import to_pixels

    for i, (orig, new) in enumerate(zip(samples, copied, strict=True)):
        expected = quality.apply_jitter(to_pixels([read_image(orig.path)], 32)[0],
                                        quality.jitter_transform(i, 3), "bilinear")
        got = read_image(new.path)
        assert got.shape == (32, 32, 3)
        assert np.abs(got - expected.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    moved = read_mask(copied[2].mask_path, (32, 32))
    unmoved = read_mask(samples[2].mask_path, (32, 32))
    assert moved.any() and not np.array_equal(moved, unmoved)  # the mask went with its image
    assert copied[0].mask_path is None


def test_jittered_copy_is_reused_and_never_writes_into_a_foreign_folder(cv, tmp_path: Path) -> None:
    samples = _samples(tmp_path / "src")
    dest = cv.jittered_copy(samples, tmp_path / "jit", seed=0, size=32)
    first = (dest / "images" / "00000.png").stat().st_mtime_ns
    cv.jittered_copy(samples, dest, seed=0, size=32)
    assert (dest / "images" / "00000.png").stat().st_mtime_ns == first
    renamed = [*samples[:2], replace(samples[2], defect="crack")]  # a kind renamed in the source
    cv.jittered_copy(renamed, dest, seed=0, size=32)
    assert [s.defect for s in load_dataset(dest / "manifest.csv")] == ["good", "good", "crack"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not written by --jitter"):
        cv.jittered_copy(samples, foreign, seed=0, size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_benchmark_tables_give_pixel_metrics_where_masks_exist(cv, clear_dataset: Path) -> None:
    import re
    import warnings

    from diffqc import report as R
    from diffqc.evaluate import evaluate

    from .conftest import tiny_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(load_dataset(clear_dataset), folds=2, methods=("padim",),
                          base_config=tiny_config(), progress=False, n_boot=20, gallery=0,
                          device="cpu")
    lines = cv.markdown_tables(report).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    pixel, aupro = header.index("pixel AUROC"), header.index("AUPRO (0.3)")
    assert re.fullmatch(r"\|(---\|)+", lines[1]) and lines[1].count("---") == len(header)
    for ftype, per in report["results"].items():
        cells = next([c.strip() for c in line.strip("|").split("|")] for line in lines[2:]
                     if re.match(rf"\| {ftype}( \(unreliable\))? \|", line))
        assert len(cells) == len(header)
        assert cells[pixel] == R.fmt(per["padim"]["pooled"]["pixel_auroc"]) != "–"
        assert cells[aupro] == R.fmt(per["padim"]["pooled"]["aupro"]) != "–"
