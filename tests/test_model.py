from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffqc.data import DEFECTIVE, load_dataset, read_image
from diffqc.errors import BundleError, UnknownFeatureTypeError
from diffqc.metrics import image_auroc
from diffqc.model import Detector, split_calibration

from .conftest import CLEAR_TYPES


def _test_samples(root: Path) -> list:
    return [s for s in load_dataset(root) if s.split == "test"]


def test_separates_good_from_clear_defects(tiny_model: Path, clear_dataset: Path) -> None:
    det = Detector.load(tiny_model)
    results, kept = det.inspect_samples(_test_samples(clear_dataset))
    for t in CLEAR_TYPES:
        idx = [i for i, s in enumerate(kept) if s.feature_type == t]
        auroc = image_auroc([kept[i].label for i in idx], [results[i].score for i in idx])
        assert auroc >= 0.9, (t, auroc)
    # The type of a GOOD part is recognised when unknown (arg-min over types).
    good = [s for s in kept if s.label == 0]
    unknown, _ = det.inspect_samples(good, type_known=False, maps=False)
    acc = np.mean([r.predicted_type == s.feature_type for r, s in zip(unknown, good, strict=True)])
    assert acc >= 0.9
    assert all(not r.type_known for r in unknown)


def test_inspection_contract(tiny_model: Path, clear_dataset: Path) -> None:
    det = Detector.load(tiny_model)
    sample = next(s for s in _test_samples(clear_dataset) if s.label == DEFECTIVE)
    img = read_image(sample.path)
    (r,) = det.inspect([img], [sample.feature_type])
    assert r.anomaly_map is not None and r.anomaly_map.shape == img.shape[:2]
    assert np.isfinite(r.anomaly_map).all() and np.isfinite(r.score)
    assert 0 < r.p_value <= 1 and r.decision in {"PASS", "REVIEW", "REJECT"}
    assert set(r.type_scores) == set(CLEAR_TYPES)
    assert r.type_scores[sample.feature_type] == pytest.approx(r.score, rel=1e-5)
    json.dumps(r.to_json())
    (fast,) = det.inspect([img], [sample.feature_type], all_types=False, maps=False)
    assert fast.score == pytest.approx(r.score, rel=1e-5) and fast.type_scores == {}
    # The map points at the defect.
    from diffqc.data import read_mask

    mask = read_mask(sample.mask_path, img.shape[:2])
    assert r.anomaly_map[mask].mean() > r.anomaly_map[~mask].mean()


def test_save_load_identical_scores(tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    a = Detector.load(tiny_model)
    samples = _test_samples(clear_dataset)[:6]
    ra, _ = a.inspect_samples(samples)
    a.save(tmp_path / "copy")
    b = Detector.load(tmp_path / "copy")
    rb, _ = b.inspect_samples(samples)
    assert [x.score for x in ra] == [y.score for y in rb]
    assert [x.p_value for x in ra] == [y.p_value for y in rb]
    files = {p.name for p in (tmp_path / "copy").iterdir()}
    assert files == {"config.json", "weights.safetensors", "calibration.json", "metadata.json"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp left over


def test_unknown_feature_type(tiny_model: Path) -> None:
    det = Detector.load(tiny_model)
    with pytest.raises(UnknownFeatureTypeError, match=r"unknown feature type 'edge9'.*stripes"):
        det.inspect([np.zeros((64, 64, 3), np.float32)], ["edge9"])


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_byte", "drop_calibration",
                                    "bad_json", "wrong_format", "mismatched_classes"])
def test_damaged_bundle(tiny_model: Path, tmp_path: Path, damage: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    w = bundle / "weights.safetensors"
    meta = json.loads((bundle / "metadata.json").read_text())
    if damage == "truncate_weights":
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "flip_byte":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "drop_calibration":
        (bundle / "calibration.json").unlink()
    elif damage == "bad_json":
        (bundle / "config.json").write_text("{not json")
    elif damage == "wrong_format":
        meta["format"] = 999
        (bundle / "metadata.json").write_text(json.dumps(meta))
    elif damage == "mismatched_classes":
        meta["classes"] = ["a", "b", "c"]
        (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        Detector.load(bundle)


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Detector.load(tmp_path / "nothing")


def test_calibration_split_grouped_and_disjoint(clear_dataset: Path) -> None:
    from dataclasses import replace

    good = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    good = [replace(s, part_id=f"part{i // 2}") for i, s in enumerate(good)]  # 2 crops per part
    fit, cal = split_calibration(good, 0.3, seed=0)
    assert set(fit).isdisjoint(cal) and len(fit) + len(cal) == len(good)
    assert {good[i].group for i in fit}.isdisjoint({good[i].group for i in cal})
    for t in CLEAR_TYPES:
        assert any(good[i].feature_type == t for i in cal)
