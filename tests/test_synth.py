"""Tests of the embedded synthetic inkjet dataset (diffqc.synth)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffqc.data import DEFECTIVE, GOOD, load_dataset, read_image, read_mask
from diffqc.errors import OutputError
from diffqc.synth import DEFECT_KINDS, FEATURE_TYPES, render_image, write_synthetic_dataset

from .conftest import full_disk

MANIFEST_HEADER = ["path", "feature_type", "label", "mask", "part_id", "split", "defect"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = write_synthetic_dataset(out, n_parts=70, seed=3, image_size=64, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_medium") / "set"
    summary = write_synthetic_dataset(out, n_parts=320, seed=0, image_size=64, progress=False)
    return out, summary


def _manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == MANIFEST_HEADER
        return list(reader)


def _key(s):  # everything but part_id, which only the manifest knows
    return (s.path.resolve(), s.feature_type, s.label,
            s.mask_path.resolve() if s.mask_path else None, s.split, s.defect)


def test_public_constants() -> None:
    assert FEATURE_TYPES == ("angle", "dist1", "dist6", "dots", "edge1", "edge2", "edge3", "edge4")
    assert set(DEFECT_KINDS) == set(FEATURE_TYPES)
    for kinds in DEFECT_KINDS.values():
        assert 2 <= len(kinds) <= 4
        assert len(set(kinds)) == len(kinds) and "good" not in kinds


@pytest.mark.parametrize("size", [64, 128])
def test_every_defect_kind_renders_with_a_mask(size: int) -> None:
    for ft in FEATURE_TYPES:
        good, no_mask = render_image(ft, None, 0, 0, size)
        assert good.shape == (size, size) and good.dtype == np.uint8 and no_mask is None
        assert good.std() > 10  # a printed pattern, not a blank frame
        for i, kind in enumerate(DEFECT_KINDS[ft]):
            img, mask = render_image(ft, kind, 0, i, size)
            again, mask2 = render_image(ft, kind, 0, i, size)
            assert mask is not None and mask2 is not None
            assert mask.shape == img.shape == (size, size) and mask.any()
            assert np.array_equal(img, again) and np.array_equal(mask, mask2)
    with pytest.raises(ValueError):
        render_image("edge1", "nozzle_out", 0, 0, 64)
    with pytest.raises(ValueError):
        render_image("edge9", None, 0, 0, 64)


def test_layout_manifest_and_summary(small: tuple[Path, dict]) -> None:
    out, summary = small
    rows = _manifest(out)
    assert len(rows) == 70
    assert len({r["part_id"] for r in rows}) == 70
    assert all(r["part_id"].startswith("p") for r in rows)
    # 70 = 8 * 8 + 6: the first six types get one more image
    per_type = {ft: sum(r["feature_type"] == ft for r in rows) for ft in FEATURE_TYPES}
    assert per_type == {ft: 9 if i < 6 else 8 for i, ft in enumerate(FEATURE_TYPES)}
    for r in rows:
        p = out / r["path"]
        assert p.is_file() and not Path(r["path"]).is_absolute()
        parts = Path(r["path"]).parts
        assert parts[0] == r["feature_type"]
        if r["split"] == "train":
            assert parts[1:3] == ("train", "good") and r["label"] == "good" and not r["mask"]
        else:
            assert parts[1] == "test" and parts[2] == r["defect"]
        if r["label"] == "defect":
            assert r["defect"] in DEFECT_KINDS[r["feature_type"]]
            assert r["mask"] == f"{r['feature_type']}/ground_truth/{r['defect']}/{p.stem}_mask.png"
        else:
            assert r["label"] == "good" and r["defect"] == "good" and r["mask"] == ""
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (64, 64)
    for ft in FEATURE_TYPES:
        t = summary["types"][ft]
        assert t["total"] == per_type[ft] == t["train_good"] + t["test_good"] + t["test_defect"]
        assert t["test_defect"] == sum(t["defects"].values()) >= 1
        assert t["test_good"] >= 1
        assert t["train_good"] == sum(
            r["feature_type"] == ft and r["split"] == "train" for r in rows
        )
    assert summary["seed"] == 3 and summary["image_size"] == 64 and summary["n_parts"] == 70
    assert summary["splits"]["train"] + summary["splits"]["test"] == 70
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "seed 3" in readme and all(ft in readme for ft in FEATURE_TYPES)


def test_folder_and_manifest_load_the_same_samples(small: tuple[Path, dict]) -> None:
    out, _ = small
    from_folder = load_dataset(out)
    from_manifest = load_dataset(out / "manifest.csv")
    assert len(from_folder) == len(from_manifest) == 70
    assert sorted(map(_key, from_folder), key=str) == sorted(map(_key, from_manifest), key=str)
    assert all(s.part_id for s in from_manifest)
    assert {s.label for s in from_manifest} == {GOOD, DEFECTIVE}


def test_masks_exist_nonempty_and_match_images(small: tuple[Path, dict]) -> None:
    out, _ = small
    samples = load_dataset(out / "manifest.csv")
    defective = [s for s in samples if s.label == DEFECTIVE]
    assert defective
    for s in samples:
        if s.label == GOOD:
            assert s.mask_path is None
            continue
        assert s.mask_path is not None and s.mask_path.is_file()
        with Image.open(s.mask_path) as m:
            assert m.mode == "L" and m.size == (64, 64)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values <= {0, 255}
        img = read_image(s.path)
        mask = read_mask(s.mask_path, img.shape[:2])
        assert 0 < mask.sum() < mask.size // 2


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    kw = {"n_parts": 24, "image_size": 64, "progress": False}
    a = write_synthetic_dataset(tmp_path / "a", seed=11, **kw)
    b = write_synthetic_dataset(tmp_path / "b", seed=11, **kw)
    c = write_synthetic_dataset(tmp_path / "c", seed=12, **kw)
    assert a["types"] == b["types"]
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    pngs = [r for r in files_a if r.suffix == ".png" and "ground_truth" not in r.parts]
    same = sum(
        (tmp_path / "c" / r).is_file()
        and (tmp_path / "a" / r).read_bytes() == (tmp_path / "c" / r).read_bytes()
        for r in pngs
    )
    assert same == 0 and c["seed"] == 12


def test_defect_fraction_and_split_sizes(medium: tuple[Path, dict]) -> None:
    _, summary = medium
    for ft in FEATURE_TYPES:
        t = summary["types"][ft]
        test = t["test_good"] + t["test_defect"]
        assert 0.6 <= t["train_good"] / t["total"] <= 0.7
        assert 0.2 <= t["test_defect"] / test <= 0.3
        counts = list(t["defects"].values())
        assert max(counts) - min(counts) <= 1  # spread over the type's kinds


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_dataset(out, n_parts=24, image_size=64, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    write_synthetic_dataset(out, n_parts=24, image_size=64, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(load_dataset(out)) == 24
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(a_file, n_parts=24, image_size=64, progress=False)


def test_rewrites_a_previous_synthetic_set(tmp_path: Path) -> None:
    out = tmp_path / "set"
    write_synthetic_dataset(out, n_parts=32, image_size=64, progress=False)
    (out / "dots" / "my-notes.txt").write_text("keep me")  # a user's file inside the earlier set
    (out / "edge1" / "extra").mkdir()
    write_synthetic_dataset(out, n_parts=24, image_size=64, seed=5, progress=False)
    assert len(load_dataset(out)) == 24  # no stale images of the first set
    assert len(_manifest(out)) == 24
    assert (out / "dots" / "my-notes.txt").read_text() == "keep me"  # only the set's own files go


def test_a_set_cut_short_is_named_and_replaced_by_the_next_run(tmp_path: Path) -> None:
    """A full disk (or Ctrl-C) mid-way left a folder without the marker, which every later run
    refused as foreign ("not empty and holds no earlier synthetic dataset"), the user's to clean."""
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with full_disk(3000), pytest.raises(OutputError, match="incomplete: the same command, run again"):
        write_synthetic_dataset(out, n_parts=48, image_size=64, seed=3, progress=False, overwrite=True)
    assert any(out.rglob("*.png")) and not (out / "manifest.csv").exists()  # cut short
    write_synthetic_dataset(out, n_parts=24, image_size=64, seed=5, progress=False)  # no --overwrite
    write_synthetic_dataset(tmp_path / "fresh", n_parts=24, image_size=64, seed=5, progress=False)
    assert set(_files(out)) - {Path("notes.txt")} == set(_files(tmp_path / "fresh"))  # none of the 1st run's
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs",
    [{"n_parts": 5}, {"image_size": 16}, {"image_size": 40}, {"image_size": 100_000},
     {"defect_fraction": 1.0}, {"defect_fraction": -0.1}],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "x", progress=False, **kwargs)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # rank (Mann-Whitney) formula, ties counted half
        pos, neg = scores[labels == 1], scores[labels == 0]
        greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        return float(greater / (pos.size * neg.size))
    return float(roc_auc_score(labels, scores))


def test_naive_pixel_difference_is_informative_but_not_perfect(
    medium: tuple[Path, dict],
) -> None:
    out, _ = medium
    samples = load_dataset(out)
    top_auc, max_auc = {}, {}
    for ft in FEATURE_TYPES:
        train = [s for s in samples if s.feature_type == ft and s.split == "train"]
        test = [s for s in samples if s.feature_type == ft and s.split == "test"]
        mean = np.mean([read_image(s.path)[..., 0] for s in train], axis=0)
        diffs = [np.abs(read_image(s.path)[..., 0] - mean).ravel() for s in test]
        labels = np.array([s.label for s in test])
        n_top = max(1, diffs[0].size // 100)
        top_auc[ft] = _auroc(np.array([np.sort(d)[-n_top:].mean() for d in diffs]), labels)
        max_auc[ft] = _auroc(np.array([d.max() for d in diffs]), labels)
    for aucs in (top_auc, max_auc):
        assert not all(a >= 1.0 for a in aucs.values()), aucs
        assert np.mean(list(aucs.values())) > 0.6, aucs
