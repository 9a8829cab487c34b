"""``diffqc evaluate``: cross-validated evaluation end to end on a tiny dataset (seconds on a CPU)."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffqc import evaluate as E
from diffqc import report as R
from diffqc.calibration import standardiser
from diffqc.config import DetectorConfig
from diffqc.data import DEFECTIVE, GOOD, Sample, load_dataset
from diffqc.errors import ConfigError, DatasetError
from diffqc.model import Detector
from tests.conftest import (
    MONO12_GAIN,
    drawn_part_brightness,
    full_disk,
    png_header_only,
    tiny_config,
    write_mono12_dataset,
)
from tests.html_numbers import assert_numbers_match

FOLDS = 2
METHODS = ("diffusion", "padim")


def _with_parts(samples: list[Sample]) -> list[Sample]:
    """Two crops per physical part (same type and label), as a manifest's part_id would say;
    the blobs named by kind, dark (odd index) or bright (conftest.write_clear_dataset)."""
    out, seen = [], {}
    for s in samples:
        key = (s.feature_type, s.label)
        i = seen.get(key, 0)
        seen[key] = i + 1
        kind = ("dark" if int(s.path.stem[-3:]) % 2 else "bright") if s.label == DEFECTIVE else s.defect
        out.append(replace(s, part_id=f"{s.feature_type}-{s.label}-{i // 2}", defect=kind))
    return out


@pytest.fixture(scope="module")
def run(clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One evaluation (diffusion vs PaDiM, 2 folds) with a spy on what each fold model fits."""
    samples = _with_parts(load_dataset(clear_dataset))
    fitted: list[list[Sample]] = []
    original = Detector.fit_features

    def spy(self: Detector, raw: Any, good: Any, **kw: Any) -> Detector:
        fitted.append(list(good))
        return original(self, raw, good, **kw)

    out = tmp_path_factory.mktemp("evaluation")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(Detector, "fit_features", spy)
        report = E.evaluate(samples, folds=FOLDS, methods=METHODS,
                            base_config=tiny_config(**{"train.steps": 20}), progress=False,
                            out_dir=out, gallery=4, n_boot=100, device="cpu")
    return {"report": report, "out": out, "fitted": fitted, "samples": samples}


def test_writes_three_files_and_html_numbers_match_json(run: dict[str, Any]) -> None:
    out = run["out"]
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    data = json.loads((out / "report.json").read_text())
    assert data["methods"] == list(METHODS) and set(data["results"]) == {"dots", "stripes"}
    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page) and "<script" not in page.lower()
    assert len(assert_numbers_match(page, data)) > 200
    # the things the issue asks for are all there
    r = data["results"]["stripes"]["diffusion"]
    assert r["pooled"]["auroc"] > 0.9 and len(r["folds"]) == FOLDS
    assert r["pooled"]["pixel_auroc"] is not None and r["pooled"]["aupro"] is not None
    assert r["auroc_ci"][0] <= r["pooled"]["auroc"] <= r["auroc_ci"][1]
    assert data["plots"]["gallery"] and all("overlay_file" in g for g in data["plots"]["gallery"])
    # a gallery part is a "missed defect" or a "false alarm" only where its decision was wrong
    # (the lowest-scored defects were called missed though flagged, the top GOOD parts false
    # alarms though passed)
    for g in data["plots"]["gallery"]:
        wrong = (g["decision"] == "PASS") == (g["label"] == 1)
        assert (g["kind"] in ("missed defect", "false alarm")) == wrong, g
    assert {g["kind"] for g in data["plots"]["gallery"]} >= {"defect caught", "false alarm"}
    hist = data["plots"]["histograms"]["stripes"]["padim"]
    assert len(hist["review_thresholds"]) == FOLDS
    assert set(data["plots"]["calibration"]) == set(METHODS)
    assert data["run"]["seconds"]["fit"]["diffusion"] and len(data["out_of_fold"]) == 80
    assert "## Method comparisons" in (out / "report.md").read_text()
    # each kind of defect of each type, against that type's GOOD parts
    rows = {(r["feature_type"], r["defect"], r["method"]): r for r in data["by_defect"]}
    assert set(rows) == {(t, k, m) for t in ("dots", "stripes") for k in ("bright", "dark")
                         for m in METHODS}
    for t in ("dots", "stripes"):
        n_bad = data["results"][t]["padim"]["n_defective"]
        assert sum(rows[t, k, "padim"]["n_defective"] for k in ("bright", "dark")) == n_bad
    kinds = {row["defect"] for row in data["out_of_fold"] if row["label"] == DEFECTIVE}
    assert kinds == {"bright", "dark"}


def test_terminal_table_gives_the_pixel_auroc_where_masks_exist(run: dict[str, Any]) -> None:
    import copy

    report = run["report"]
    lines = E.summary_lines(report)
    header = re.split(r"\s{2,}", lines[0])
    col = header.index("pixel AUROC")
    checked = 0
    for line in lines[1:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line)
        per = report["overall"] if cells[0] == R.OVERALL else report["results"][cells[0]]
        pooled = per[cells[1]]["pooled"]
        assert cells[col] == R.fmt(pooled["pixel_auroc"])
        checked += math.isfinite(pooled["pixel_auroc"])
    assert checked >= 2  # a number, not only dashes
    no_masks = copy.deepcopy(report)
    for r in [r for per in no_masks["results"].values() for r in per.values()]:
        r["pooled"]["pixel_auroc"] = float("nan")
    assert "pixel AUROC" not in E.summary_lines(no_masks)[0]


def test_folds_never_leak_a_part(run: dict[str, Any]) -> None:
    oof = run["report"]["out_of_fold"]
    fold_of_group: dict[str, set[int]] = {}
    for row in oof:
        fold_of_group.setdefault(row["group"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert len(fold_of_group) == 40  # two crops per part
    test_groups = [{row["group"] for row in oof if row["fold"] == f} for f in range(FOLDS)]
    # each (fold, method) fit saw only GOOD parts of the other folds; all methods the same ones
    fits = run["fitted"]
    assert len(fits) == FOLDS * len(METHODS)
    for j, good in enumerate(fits):
        fold = j // len(METHODS)
        groups = {s.group for s in good}
        assert all(s.label == GOOD for s in good)
        assert not groups & test_groups[fold]
        assert groups == {s.group for s in fits[fold * len(METHODS)]}


def _holm_family_of_two(p: list[float]) -> list[float]:
    """Holm's adjustment for a family of two p-values, written out by hand: the smaller is
    doubled, the larger kept, both capped at 1 and the larger never below the smaller's; a NaN
    (no test) leaves a family of one, which is not adjusted."""
    a, b = p
    if math.isnan(a) or math.isnan(b):
        return [x if math.isnan(x) else min(1.0, x) for x in p]
    lo, hi = min(a, b), max(a, b)
    adj_lo = min(1.0, 2 * lo)
    adj_hi = max(adj_lo, min(1.0, hi))
    return [adj_lo if x == lo else adj_hi for x in p]


def test_holm_family_of_two_by_hand() -> None:
    assert _holm_family_of_two([0.01, 0.3]) == [0.02, 0.3]
    assert _holm_family_of_two([0.3, 0.2]) == [0.4, 0.4]  # 0.2 * 2 = 0.4 > 0.3 -> 0.4 for both
    assert _holm_family_of_two([0.7, 0.9]) == [1.0, 1.0]
    assert _holm_family_of_two([math.nan, 0.04])[1] == 0.04


def test_comparisons_have_holm_adjusted_p_values(run: dict[str, Any]) -> None:
    comps = run["report"]["comparisons"]
    per_type = [c for c in comps if c["feature_type"] != R.OVERALL]
    assert {c["feature_type"] for c in per_type} == {"dots", "stripes"}
    assert all((c["method_a"], c["method_b"]) == METHODS for c in comps)
    for raw, adj in (("delong_p", "delong_p_holm"), ("nb_p", "nb_p_holm")):
        expected = _holm_family_of_two([c[raw] for c in per_type])
        for c, e in zip(per_type, expected, strict=True):
            if math.isnan(e):
                assert math.isnan(c[adj])
            else:
                assert c[adj] == pytest.approx(e) and c[adj] >= c[raw]
    assert any(math.isfinite(c["delong_p_holm"]) for c in per_type)
    for c in comps:  # Cohen's d_z of the reported fold differences, from its definition
        d = [x for x in c["fold_diffs"] if math.isfinite(x)]
        if len(d) < 2:
            assert math.isnan(c["effect_size"])
            continue
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        if sd > 1e-12:
            assert c["effect_size"] == pytest.approx(mean / sd)
        else:  # no spread: 0 for no difference, else an infinite effect with the sign of the mean
            assert c["effect_size"] == (0.0 if abs(mean) <= 1e-12 else math.copysign(math.inf, mean))
    assert [c for c in comps if c["feature_type"] == R.OVERALL]


def test_pooled_scores_are_the_fold_scores_standardised(run: dict[str, Any]) -> None:
    rows = run["report"]["out_of_fold"]
    for f in range(FOLDS):
        of = [r for r in rows if r["fold"] == f and r["feature_type"] == "stripes"]
        raw = np.array([r["raw_score"]["padim"] for r in of])
        z = np.array([r["score"]["padim"] for r in of])
        slope = np.polyfit(raw, z, 1)[0]
        assert slope > 0 and np.allclose(z, np.polyval(np.polyfit(raw, z, 1), raw), atol=1e-6)


def test_standardiser() -> None:
    centre, scale = standardiser(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert (centre, scale) == (3.0, 2.0)
    assert standardiser(np.ones(4)) == (1.0, 1.0)


def _manifest_without_dots_defects(clear_dataset: Path, path: Path) -> Path:
    """A manifest (with part_id) of the clear dataset where type "dots" has no defective
    sample, plus a type "tiny" with too few parts for 2 folds."""
    rows = ["path,feature_type,label,mask,part_id"]
    for s in load_dataset(clear_dataset):
        if s.feature_type == "dots" and s.label == DEFECTIVE:
            continue
        label = "good" if s.label == GOOD else "defect"
        rows.append(f"{s.path},{s.feature_type},{label},{s.mask_path or ''},{s.path.stem}")
    goods = [s for s in load_dataset(clear_dataset) if s.feature_type == "dots" and s.label == GOOD]
    rows += [f"{s.path},tiny,good,,tiny{i}" for i, s in enumerate(goods[:3])]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_type_without_defects_and_a_setting(clear_dataset: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from diffqc.cli import main

    manifest = _manifest_without_dots_defects(clear_dataset, tmp_path / "manifest.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["evaluate", str(manifest), "--folds", "2", "--methods", "padim",
                     "--compare-setting", "padim20:padim.dims=20", "--out", str(tmp_path / "r"),
                     "--set", "backbone.input_size=64", "--n-boot", "50", "--gallery", "2",
                     "--device", "cpu", "-q", "--fit", "pad", "--seed", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "padim vs padim20" in out and "report.html" in out and "UNRELIABLE" in out
    # the terminal says why, as the report's badge does: a type without defects has no AUROC
    assert "UNRELIABLE (dots): no defective samples: AUROC, recall and all defect-based metrics" in out
    r = tmp_path / "r"
    assert all((r / f"report.{ext}").is_file() for ext in ("html", "md", "json"))
    data = json.loads((r / "report.json").read_text())
    assert data["methods"] == ["padim", "padim20"]
    assert "unknown_type" not in data  # only with --unknown-type
    assert data["run"]["variants"]["padim20"]["padim"]["dims"] == 20
    assert data["run"]["variants"]["padim20"]["method"] == "padim"
    # train's model options apply to every evaluated variant (--fit pad as `train --fit pad`);
    # evaluate's --seed is the folds', not the training seed
    assert {v["backbone"]["resize"] for v in data["run"]["variants"].values()} == {"pad"}
    assert {v["train"]["seed"] for v in data["run"]["variants"].values()} == {DetectorConfig().train.seed}
    assert data["folds"]["grouping"].startswith("part_id")
    # the type without defective samples: reported, marked, its GOOD-only numbers kept
    dots = data["results"]["dots"]["padim"]
    assert dots["unreliable"] and "no defective" in dots["reason"]
    assert dots["pooled"]["auroc"] is None and dots["n_defective"] == 0
    assert dots["pooled"]["fpr_flagged"] is not None
    assert data["results"]["stripes"]["padim"]["n_defective"] == 8
    dots_cmp = [c for c in data["comparisons"] if c["feature_type"] == "dots"]
    assert dots_cmp and dots_cmp[0]["delong_p"] is None and dots_cmp[0]["delong_p_holm"] is None
    # the type with too few parts is left out, and the report says so
    assert "tiny" not in data["results"] and any("'tiny' left out" in n for n in data["notes"])
    assert "dots" in (r / "report.md").read_text() and "UNRELIABLE" in (r / "report.html").read_text()
    with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
        E.parse_setting("no-colon")


def test_unreadable_images_are_left_out_and_named(clear_dataset: Path, tmp_path: Path) -> None:
    """An unreadable file does not stop an evaluation: it is left out, and both the terminal (a
    DatasetWarning) and the report's notes name it."""

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    samples.append(replace(samples[0], path=broken))
    _assert_left_out(samples, 1, r"1 unreadable image\(s\) left out .*broken\.png", "broken.png")


def _assert_left_out(samples: list[Sample], n: int, warning: str, note: str) -> None:
    """``n`` of ``samples`` (type stripes) are left out of an evaluation, with a DatasetWarning
    that matches ``warning`` and a note in the report that holds ``note``."""
    from diffqc.data import DatasetWarning

    with pytest.warns(DatasetWarning, match=warning):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    assert any(note in text for text in report["notes"])
    results = report["results"]["stripes"]["padim"]
    assert results["n_good"] + results["n_defective"] == len(samples) - n


def test_copies_of_an_image_are_evaluated_once(clear_dataset: Path, tmp_path: Path) -> None:
    """A GOOD image copied under other names (a dataset put together by copying folders) went
    into the folds as parts of their own: a copy in another fold was scored by a model fit on
    itself. The copies are left out, and the terminal and the report's notes say so."""

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    good = next(s for s in samples if s.label == GOOD)
    for name in ("copy-1.png", "copy-2.png"):
        shutil.copyfile(good.path, tmp_path / name)
        samples.append(replace(good, path=tmp_path / name))
    _assert_left_out(samples, 2, r"2 image\(s\) are byte-identical copies .*copy-1\.png = ", "copy-2.png")


def test_defects_saved_otherwise_than_the_good_parts_are_named(clear_dataset: Path, tmp_path: Path) -> None:
    """Defects saved as JPEG beside GOOD parts saved as PNG: a score tells the files apart, and
    the cross-validated AUROC says so as much as it says how defects are found. The terminal and
    the report's notes name the type; its images are evaluated all the same."""
    from PIL import Image

    from diffqc.data import DatasetWarning

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    for i, s in enumerate(samples):
        if s.label == DEFECTIVE:
            with Image.open(s.path) as img:
                img.save(tmp_path / f"{s.path.stem}.jpg", quality=90)
            samples[i] = replace(s, path=tmp_path / f"{s.path.stem}.jpg")
    with pytest.warns(DatasetWarning, match=r"are lossy .* \(stripes: 8 of 8 defective, 0 of 32 GOOD"):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    assert any("stripes: 8 of 8 defective, 0 of 32 GOOD" in note for note in report["notes"])
    assert report["results"]["stripes"]["padim"]["n_defective"] == 8


def test_good_images_that_score_as_defects_out_of_fold_are_named(clear_dataset: Path) -> None:
    """Defects labelled GOOD (escapes among a line's GOOD images) count as GOOD parts flagged and
    lower the AUROC without a word. Every GOOD image is scored out of fold once: those far above
    their type's others are named in a warning and the report's notes; with none, no note."""
    from diffqc.data import DatasetWarning

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    defects = [i for i, s in enumerate(samples) if s.label == DEFECTIVE]
    for i in defects[:2]:
        samples[i] = replace(samples[i], label=GOOD, defect=None, mask_path=None)
    with pytest.warns(DatasetWarning, match=r"2 GOOD image\(s\) of stripes, scored out of fold by padim, "
                                            r"score far above the others of their type"):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    note = next(n for n in report["notes"] if "score far above" in n)
    assert all(samples[i].path.name in note for i in defects[:2])
    clean = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    report = E.evaluate(clean, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                        progress=False, n_boot=20, gallery=0, device="cpu")
    assert not [n for n in report["notes"] if "score far above" in n]


def test_a_folders_manifest_that_leaves_out_its_new_images_is_named(clear_dataset: Path,
                                                                   tmp_path: Path) -> None:
    """evaluate reads a folder's manifest.csv (its part ids group the folds) where train, test and
    data info read the folder: images added to the folder after the manifest was written were
    left out of the evaluation without a word. They are named, with the way to take them in."""
    from diffqc.data import DatasetWarning

    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    rows = ["path,feature_type,label,split"] + [
        f"{s.path.relative_to(data)},{s.feature_type},{'good' if s.label == GOOD else 'defect'},{s.split}"
        for s in load_dataset(data)]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the manifest lists the folder's images: nothing to say
        assert len(E.load_evaluation_data(data)[0]) == len(rows) - 1
    new = data / "dots" / "train" / "good" / "added-later.png"
    shutil.copyfile(next((data / "dots" / "train" / "good").glob("*.png")), new)
    with pytest.warns(DatasetWarning, match=r"manifest.csv does not list 1 image\(s\) of its folder "
                                            r"\(.*added-later\.png\)"):
        samples, source = E.load_evaluation_data(data)
    assert source == str(data / "manifest.csv") and len(samples) == len(rows) - 1


def test_an_evaluation_whose_images_are_all_unreadable_says_so(clear_dataset: Path, tmp_path: Path) -> None:
    """Every file unreadable (a folder of the wrong files, a share that dropped): one error that
    says so and names some; it was a KeyError traceback after the extraction."""
    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    for i, s in enumerate(samples):
        broken = tmp_path / f"broken-{i}.png"
        broken.write_bytes(b"\x89PNG garbage")
        samples[i] = replace(s, path=broken)
    with pytest.raises(DatasetError, match=r"none of the \d+ images could be read.*broken-0\.png"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                   progress=False, n_boot=20, gallery=0, device="cpu")


def test_an_unreadable_mask_leaves_its_image_out_of_the_pixel_metrics_only(clear_dataset: Path,
                                                                          tmp_path: Path) -> None:
    """A defect's mask missing or not an image stopped the evaluation after every fold was fitted
    ("mask unreadable"); now it is found first, named, and that image counts in the image metrics
    but not in the pixel metrics."""
    from diffqc.data import DatasetWarning

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    defects = [i for i, s in enumerate(samples) if s.mask_path is not None]
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("not a mask")
    bomb = tmp_path / "bomb_mask.png"  # a header claiming 1.6 gigapixels: was a traceback
    bomb.write_bytes(png_header_only(40_000, 40_000))
    samples[defects[0]] = replace(samples[defects[0]], mask_path=tmp_path / "gone_mask.png")
    samples[defects[1]] = replace(samples[defects[1]], mask_path=not_an_image)
    samples[defects[2]] = replace(samples[defects[2]], mask_path=bomb)
    with pytest.warns(DatasetWarning, match=r"3 defect mask\(s\) unreadable.*gone_mask\.png \(No such file"):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    assert any("mask.png (not an image)" in note for note in report["notes"])
    assert any("bomb_mask.png (" in note for note in report["notes"])
    results = report["results"]["stripes"]["padim"]
    assert results["n_good"] + results["n_defective"] == len(samples)
    assert results["pooled"]["pixel_auroc"] is not None


def test_a_truncated_mask_leaves_its_image_out_of_the_pixel_metrics_only(clear_dataset: Path,
                                                                        tmp_path: Path) -> None:
    """A mask cut short (a copy stopped half-way) has a whole header, which was all the check
    before the work read: it failed when the report was built, after every fold of every method
    was fitted ("mask unreadable ... image file is truncated"), and no report was written. It is
    found first, as a missing mask is: named, and its image left out of the pixel metrics only."""
    from diffqc.data import DatasetWarning

    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "stripes"]
    i = next(i for i, s in enumerate(samples) if s.mask_path is not None)
    whole = samples[i].mask_path.read_bytes()  # type: ignore[union-attr]
    half = tmp_path / "half_mask.png"
    half.write_bytes(whole[: len(whole) // 2])
    samples[i] = replace(samples[i], mask_path=half)
    with pytest.warns(DatasetWarning, match=r"1 defect mask\(s\) unreadable.*half_mask\.png \(.*truncated"):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    results = report["results"]["stripes"]["padim"]
    assert results["n_good"] + results["n_defective"] == len(samples)
    assert results["pooled"]["pixel_auroc"] is not None


def test_parse_setting_keeps_list_values_whole() -> None:
    name, over = E.parse_setting("big:diffusion.prior_dims=100,scoring.bank_timesteps=[100,200]")
    assert name == "big"
    assert over == {"diffusion.prior_dims": 100, "scoring.bank_timesteps": [100, 200]}


def test_feature_cache_skips_the_second_extraction(clear_dataset: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    samples = load_dataset(clear_dataset)[:6]
    dets = {"b": Detector(tiny_config(), device="cpu")}
    broken = replace(samples[0], path=tmp_path / "broken.png")
    broken.path.write_bytes(b"\x89PNG garbage")
    samples = [*samples, broken]
    kept, shapes, raw, errors = E._extract_cached(samples, dets, False, tmp_path)
    assert len(kept) == 6 and len(errors) == 1 and raw["b"].shape[0] == 6
    (cache,) = tmp_path.glob("features-*.safetensors")  # safetensors, never pickle
    assert safe_open(str(cache), framework="pt").metadata()["errors"] == json.dumps(errors)

    def no_extraction(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("extracted again")

    monkeypatch.setattr(E, "_extract_all", no_extraction)
    kept2, shapes2, raw2, errors2 = E._extract_cached(samples, dets, False, tmp_path)
    assert kept2 == kept and shapes2 == shapes and torch.equal(raw2["b"], raw["b"]) and errors2 == errors
    with pytest.raises(AssertionError, match="extracted again"):  # other images: a new entry
        E._extract_cached(samples[:5], dets, False, tmp_path)
    monkeypatch.undo()
    cache.write_bytes(cache.read_bytes()[:100])  # a damaged cache: a warning, then extracted again
    with pytest.warns(UserWarning, match="unreadable"):
        kept3, _, raw3, _ = E._extract_cached(samples, dets, False, tmp_path)
    assert kept3 == kept and torch.equal(raw3["b"], raw["b"])


def test_a_feature_cache_that_cannot_be_written_costs_a_warning_not_the_run(
        clear_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    samples = load_dataset(clear_dataset)[:3]
    with pytest.warns(UserWarning, match="feature cache not written"):
        kept, _, raw, _ = E._extract_cached(samples, {"b": Detector(tiny_config(), device="cpu")}, False,
                                            blocker / "cache")
    assert len(kept) == 3 and raw["b"].shape[0] == 3 and blocker.read_text() == "x"


def test_pad_and_tiled_models_are_cross_validated_as_train_and_inspect_run_them(
        clear_dataset: Path, tmp_path: Path) -> None:
    """``evaluate --fit pad`` / ``--tile`` (it refused them: a line with rectangular or large
    images could not cross-validate its geometry): a fold's out-of-fold scores are those of a
    model fitted on the fold's GOOD images through ``Detector.fit`` and scored by ``inspect``; the
    feature cache (which keeps the views' features) gives the same evaluation again."""
    from diffqc.config import with_overrides
    from diffqc.data import read_image

    samples = load_dataset(clear_dataset)
    base = tiny_config(**{"method": "padim", "train.steps": 0, "backbone.input_size": 32})
    tile = with_overrides(base, {"tiling.mode": "auto"})  # 64 px images: 3 x 3 tiles of 32 px
    pad = with_overrides(base, {"backbone.resize": "pad"})
    runs = []
    for _ in range(2):  # the second from the cache
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(E.evaluate(samples, folds=FOLDS, methods=(), settings={"tile": tile, "pad": pad},
                                   base_config=base, progress=False, n_boot=20, device="cpu",
                                   feature_cache=tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 1
    rows = runs[0]["out_of_fold"]
    assert [r["raw_score"] for r in runs[1]["out_of_fold"]] == [r["raw_score"] for r in rows]
    by_path = {str(s.path): s for s in samples}
    # the fold's GOOD images, test split's included, as the folds take them
    train = [replace(by_path[r["path"]], split="train") for r in rows
             if r["fold"] not in (0, -1) and r["label"] == GOOD]
    held = [r for r in rows if r["fold"] == 0]
    for name, cfg in (("tile", tile), ("pad", pad)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = Detector(cfg, device="cpu").fit(train)
        got = det.inspect([read_image(r["path"]) for r in held], [r["feature_type"] for r in held])
        np.testing.assert_allclose([g.score for g in got], [r["raw_score"][name] for r in held], rtol=1e-4)
        assert runs[0]["results"]["dots"][name]["pooled"]["pixel_auroc"] is not None
    with pytest.raises(ConfigError, match="PyTorch only"):
        E.evaluate(samples, folds=FOLDS, methods=(), settings={"tile": tile}, base_config=base,
                   runtime="onnx")


def test_fold_warnings_are_grouped_by_type() -> None:
    msgs = ["feature type 'a': only 1 defective group(s)", "feature type 'b': only 1 defective group(s)",
            "something else"]
    assert E._grouped_by_type(msgs) == ["feature types a, b: only 1 defective group(s)",
                                        "something else"]


def test_onnx_runtime_scores_the_folds_as_torch_does(clear_dataset: Path) -> None:
    pytest.importorskip("onnxruntime")
    samples = load_dataset(clear_dataset)
    cfg = tiny_config(**{"train.steps": 10})
    reports = {}
    for runtime in ("torch", "onnx"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports[runtime] = E.evaluate(samples, folds=FOLDS, methods=("diffusion",), base_config=cfg,
                                          progress=False, n_boot=20, device="cpu", runtime=runtime,
                                          threads=1)
    rows = {rt: reports[rt]["out_of_fold"] for rt in reports}
    assert [r["path"] for r in rows["onnx"]] == [r["path"] for r in rows["torch"]]
    np.testing.assert_allclose([r["raw_score"]["diffusion"] for r in rows["onnx"]],
                               [r["raw_score"]["diffusion"] for r in rows["torch"]], rtol=1e-4)
    assert [r["decision"]["diffusion"] for r in rows["onnx"]] == \
        [r["decision"]["diffusion"] for r in rows["torch"]]
    with pytest.raises(ValueError, match="runtime"):
        E.evaluate(samples, folds=FOLDS, methods=("diffusion",), base_config=cfg, runtime="tensorrt")


def test_unknown_type_summary_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    true = ["a", "a", "a", "a", "b", "b"]
    routed = ["a", "b", "a", "a", "b", "a"]
    known = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    withheld = np.array([0.1, 0.95, 0.8, 0.9, 0.3, 0.7])  # the GOOD 'a' image routed to 'b' scores high
    u = E.unknown_type_summary(y, true, routed, withheld, known)
    assert u["type_accuracy"] == pytest.approx(4 / 6)
    assert u["type_accuracy_good"] == pytest.approx(2 / 3)
    assert u["type_accuracy_defective"] == pytest.approx(2 / 3)
    a = u["per_type"]["a"]
    assert a["auroc_type_given"] == 1.0 and a["auroc_type_withheld"] == pytest.approx(0.5)
    assert a["type_accuracy"] == 0.75 and u["per_type"]["b"]["type_accuracy"] == 0.5
    assert u["mean_auroc_type_withheld"] == pytest.approx((0.5 + 1.0) / 2)


def test_unknown_type_scores_under_the_routed_type(clear_dataset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``diffqc evaluate --unknown-type``: every held-out image is also scored under the router's
    type; where the router is right the score is the type-given one, so perfect routing gives
    equal AUROCs."""
    from diffqc.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["evaluate", str(clear_dataset), "--folds", "2", "--methods", "diffusion",
                     "--unknown-type", "--out", str(tmp_path / "r"), "--set", "backbone.input_size=64",
                     "--n-boot", "20", "--gallery", "0", "--device", "cpu", "-q"])
    assert code == 0
    assert "type withheld: accuracy" in capsys.readouterr().out
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    u = data["unknown_type"]["diffusion"]
    assert set(u["per_type"]) == {s.feature_type for s in load_dataset(clear_dataset)}
    assert sum(r["images"] for r in u["per_type"].values()) == len(data["out_of_fold"])
    assert u["type_accuracy"] == 1.0  # the clear set's types look nothing alike
    assert u["mean_auroc_type_withheld"] == pytest.approx(u["mean_auroc_type_given"])


def test_cli_full_disk_prints_the_results_before_the_report_fails(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A report that cannot be written (full disk) lost the whole evaluation with a bare "File too
    large"; the table now comes first, and the error names the report file."""
    from diffqc.cli import main

    with warnings.catch_warnings(), full_disk(4096):
        warnings.simplefilter("ignore")
        code = main(["evaluate", str(clear_dataset), "--folds", "2", "--methods", "padim",
                     "--out", str(tmp_path / "r"), "--set", "backbone.input_size=64", "--n-boot", "50",
                     "--device", "cpu", "-q"])
    assert code == 1
    out, err = capsys.readouterr()
    assert re.search(r"^stripes\s+padim\s+\d+/\d+\s+\d\.\d{3}", out, re.M), out
    assert f"cannot write {tmp_path / 'r' / 'report.json'}" in err and "nothing was written" in err
    assert not (tmp_path / "r" / "report.json").exists()
    assert list((tmp_path / "r").iterdir()) == []  # an empty gallery/ made the next run refuse it
    assert R.check_report_target(tmp_path / "r") == tmp_path / "r"


def test_gallery_draws_a_12_bit_cameras_parts_as_the_model_reads_them(tmp_path: Path) -> None:
    """The report's gallery of a 12-bit camera's parts, evaluated with the gain train names
    (backbone.input_gain), drew them as read, nearly black; as the model reads them now."""
    data = write_mono12_dataset(tmp_path / "mono12")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.evaluate(load_dataset(data), folds=FOLDS, methods=("diffusion",),
                   base_config=tiny_config(**{"backbone.input_gain": MONO12_GAIN}), progress=False,
                   out_dir=tmp_path / "report", gallery=4, n_boot=20, device="cpu")
    drawn = sorted((tmp_path / "report" / "gallery").glob("*.png"))
    bright = [drawn_part_brightness(p) for p in drawn]
    assert drawn and min(bright) > 100, bright


def test_evaluate_names_a_gain_that_clips_the_good_images(clear_dataset: Path, tmp_path: Path) -> None:
    """`train` says when backbone.input_gain reads a type's GOOD images above white (the gain for
    a 12-bit camera's files set for 8-bit ones: clipped, bright defects passed); `evaluate --set
    backbone.input_gain=16` on 8-bit images measured the clipped images without a word. It says
    so too, in the report's notes as well; at gain 1 it says nothing of it."""
    samples = load_dataset(clear_dataset)
    with pytest.warns(UserWarning, match=r"backbone.input_gain 16 reads 1/16 of white as white.*GOOD "
                                         r"images of .* are on average brighter"):
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",),
                            base_config=tiny_config(**{"backbone.input_gain": 16.0}), progress=False,
                            out_dir=tmp_path / "gain", gallery=0, n_boot=20, device="cpu")
    assert any("input_gain 16 reads" in note for note in report["notes"])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, out_dir=tmp_path / "plain", gallery=0, n_boot=20, device="cpu")
    assert not [w for w in said if "input_gain" in str(w.message)]
    assert not any("input_gain" in note for note in report["notes"])


def test_evaluate_names_16_bit_images_that_hold_12_bit_data(tmp_path: Path) -> None:
    """`train` named a 12-bit camera's 16-bit files (nearly black as read) and the gain that reads
    them right; `evaluate`, which a QC engineer runs first, measured them at gain 1 without a word
    (magnetic tile so: 0.896 against 0.975). It says so too, in the report's notes as well."""
    data = write_mono12_dataset(tmp_path / "mono12")
    with pytest.warns(UserWarning, match=r"16-bit files whose values stay within 0..4095 \(12-bit data\).*"
                                         r"--set backbone.input_gain=16.0037"):
        report = E.evaluate(load_dataset(data), folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, out_dir=tmp_path / "report", gallery=0, n_boot=20, device="cpu")
    assert any("12-bit data" in note for note in report["notes"])


def test_parts_of_several_types_are_rated_as_the_service_judges_them(clear_dataset: Path,
                                                                      tmp_path: Path) -> None:
    """A QC engineer choosing α before a line starts reads `evaluate`'s FPR per type; a part seen
    as crops of k types is flagged when any crop is (the service's worst-of rule), up to k times
    as often. Where the data names parts of several types, the report rates the parts, from the
    same out-of-fold decisions as the table, and says the level per image for a part's α."""
    samples = [replace(s, part_id=s.path.stem.replace(s.feature_type, "part"))
               for s in load_dataset(clear_dataset)]  # dots_test_good_003 and stripes_... : one part
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, out_dir=tmp_path / "r", gallery=0, n_boot=50, device="cpu")
    held: dict[str, list[dict[str, Any]]] = {}
    for row in report["out_of_fold"]:  # type: ignore[typeddict-item]
        held.setdefault(Path(row["path"]).stem.replace(row["feature_type"], "part"), []).append(row)
    good = [p for p in held.values() if not any(r["label"] for r in p)]
    bad = [p for p in held.values() if any(r["label"] for r in p)]
    parts = report["parts"]["padim"]  # type: ignore[typeddict-item]
    assert (parts["good"], parts["defective"], parts["types"]) == (len(good), len(bad), 2) == (32, 8, 2)
    assert parts["good_flagged"] == np.mean([any(r["decision"]["padim"] != "PASS" for r in p) for p in good])
    assert parts["recall"] == np.mean([any(r["decision"]["padim"] != "PASS" for r in p) for p in bad])
    lines = E.summary_lines(report)
    lead = next(i for i, x in enumerate(lines) if x.startswith("Parts (each judged by the worst of its"))
    assert ("images of 2 types, from the same out-of-fold decisions. A GOOD part of 2 types is flagged when "
            "any of its images is: at α_review = 0.05 per image, in at most 2 × 0.05 = 10 % of GOOD parts "
            "where each type's calibration holds its level (Bonferroni, whatever the images' dependence); "
            "for at most a share A, decide each image at A/2: "
            "for the defaults' shares (0.05 flagged, 0.01 rejected), `diffqc calibrate MODEL --alpha-review "
            "0.025 --alpha-reject 0.005`, or at train `--set calibration.alpha_review=0.025 --set "
            "calibration.alpha_reject=0.005`.") in lines[lead], lines[lead]
    pct = {k: f"{100 * parts[k]:.1f}%" for k in ("good_flagged", "good_rejected", "recall")}
    assert lines[lead + 2].split() == ["padim", "32", pct["good_flagged"], pct["good_rejected"], "8",
                                       pct["recall"]]
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"## Parts\n\n{lines[lead]}" in md and f"| padim | 32 | {100 * parts['good_flagged']:.1f}%" in md
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Parts (each judged by the worst of its images" in html
    assert ("/parts/padim/good_flagged", "pct", pct["good_flagged"]) in assert_numbers_match(
        html, json.loads((tmp_path / "r" / "report.json").read_text()))
    # images of one type per part: nothing said of parts
    assert "parts" not in E.evaluate([replace(s, part_id=f"{s.feature_type}{s.path.stem}") for s in samples],
                                     folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                                     progress=False, gallery=0, n_boot=50, device="cpu")


def test_a_setting_of_other_levels_is_refused_saying_how_to_see_them(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A QC engineer weighing α/k for parts tries `--compare-setting strict:calibration.alpha_review=..`:
    a report has one decision rule, so it is refused, saying how to see the rates at those levels."""
    from diffqc.cli import main

    assert main(["evaluate", str(clear_dataset), "--compare-setting", "strict:calibration.alpha_review=0.01",
                 "--out", str(tmp_path / "r"), "-q"]) != 0
    err = capsys.readouterr().err
    assert ("variant 'strict' sets other α levels (calibration.alpha_review 0.01) than the others (0.05): a "
            "report has one decision rule; for the rates at those levels evaluate again with --set "
            "calibration.alpha_review=0.01 (every method; --feature-cache DIR spares the second run the "
            "backbone), or read the realised FPR at α up to 0.2 in the report's calibration plot "
            "(report.json keeps every out-of-fold p-value)") in err, err
    assert not (tmp_path / "r").exists()


def _left_out_types(samples: list[Sample]) -> tuple[R.Report, list[str]]:
    """A 2-fold PaDiM evaluation of ``samples`` and the notes that leave a type out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = E.evaluate(samples, folds=FOLDS, methods=("padim",), base_config=tiny_config(),
                            progress=False, n_boot=20, gallery=0, device="cpu")
    return report, [n for n in report["notes"] if "left out:" in n]


def test_a_type_whose_one_big_part_is_a_folds_training_set_is_left_out(clear_dataset: Path) -> None:
    """Folds balance images, not parts: a type with one GOOD part photographed 5 times and three
    parts photographed once passed the check of parts, then one fold's model was fit on the big
    part alone and the run died after the features were extracted ("too few GOOD training parts
    to calibrate"), naming neither the fold nor a fix. The folds are made and checked first: the
    type is left out with a note that names the fold and what to do; the others are evaluated."""
    data = load_dataset(clear_dataset)
    good = [s for s in data if s.feature_type == "dots" and s.label == GOOD]
    bad = [s for s in data if s.feature_type == "dots" and s.label == DEFECTIVE]
    bulky = ([replace(s, feature_type="bulky", part_id="big") for s in good[:5]]
             + [replace(s, feature_type="bulky", part_id=f"g{i}") for i, s in enumerate(good[5:8])]
             + [replace(s, feature_type="bulky", part_id=f"d{i}") for i, s in enumerate(bad[:4])])
    stripes = [s for s in data if s.feature_type == "stripes"]
    report, notes = _left_out_types(stripes + bulky)
    assert set(report["results"]) == {"stripes"}
    assert len(notes) == 1 and notes[0].startswith("feature type 'bulky' left out: fold 2 of 2 would be "
                                                   "fit on 1 GOOD part(s) of it"), notes
    assert "--folds" in notes[0] and "more GOOD parts" in notes[0]
    with pytest.raises(DatasetError, match=r"no feature type .*'bulky' left out: fold 2 of 2"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.evaluate(bulky, folds=FOLDS, methods=("padim",), base_config=tiny_config(), progress=False,
                   n_boot=20, gallery=0, device="cpu")


def test_a_type_short_of_good_parts_once_its_unreadable_images_are_dropped_is_left_out(
        clear_dataset: Path, tmp_path: Path) -> None:
    """A type of 4 GOOD images, one of them unreadable, passed the check of parts made before the
    images were read; then one fold's model had a single GOOD image to fit and calibrate on and
    the run died. The parts and folds are checked again once the images are read: the type is
    left out with a note, the other type evaluated."""
    data = load_dataset(clear_dataset)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    good = [s for s in data if s.feature_type == "stripes" and s.label == GOOD][:4]
    bad = [s for s in data if s.feature_type == "stripes" and s.label == DEFECTIVE][:4]
    short = [*good[:3], replace(good[3], path=broken), *bad]
    report, notes = _left_out_types([s for s in data if s.feature_type == "dots"] + short)
    assert set(report["results"]) == {"dots"}
    assert len(notes) == 1 and notes[0].startswith("feature type 'stripes' left out: "), notes
    assert "3 of them GOOD, too few for 2 folds" in notes[0]
    assert any("1 unreadable image(s) left out" in n and "broken.png" in n for n in report["notes"])


def test_parts_of_several_types_whose_good_images_of_a_type_fall_in_one_fold(clear_dataset: Path) -> None:
    """Parts seen as images of several types (a manifest's part_id across types) are split into
    folds by part across the types: all four GOOD parts of type C fell in one fold, and the run
    ended in a ``KeyError: 'C'`` traceback after the first fold was fitted. C is left out with a
    note naming the fold; the types its parts share are evaluated."""
    data = load_dataset(clear_dataset)
    pool = {(t, label): [s for s in data if s.feature_type == src and s.label == label]
            for t, src in (("A", "dots"), ("B", "stripes"), ("C", "dots")) for label in (GOOD, DEFECTIVE)}
    pool["C", GOOD], pool["C", DEFECTIVE] = pool["C", GOOD][20:], pool["C", DEFECTIVE][6:]  # not A's
    spec = ("p0 A 0 1;p0 B 0 2;p1 A 1 2;p1 B 1 2;p2 A 0 2;p2 B 0 2;p3 A 1 1;p3 B 1 2;p4 A 0 2;p5 A 0 1;"
            "p6 A 0 1;p6 B 0 1;p7 A 1 1;p8 A 0 2;p8 B 0 1;p9 B 0 1;c0 C 1 1;c1 C 1 1;c2 C 0 1;c3 C 0 1;"
            "c4 C 0 1;c5 C 0 1")  # part, type, label, images
    samples = []
    for item in spec.split(";"):
        part, t, label, n = item.split()
        for _ in range(int(n)):
            s = pool[t, int(label)].pop(0)
            samples.append(replace(s, feature_type=t, part_id=part, mask_path=None))
    report, notes = _left_out_types(samples)
    assert set(report["results"]) == {"A", "B"}
    assert len(notes) == 1 and re.match(r"feature type 'C' left out: fold [12] of 2 would be fit on 0 GOOD "
                                        r"part\(s\) of it", notes[0]), notes


def test_unknown_type_given_is_the_tables_auroc(tmp_path: Path) -> None:
    """``--unknown-type``'s "given" AUROC pooled the fold models' raw scores, which are not on one
    scale, where the table pools the calibration-standardised ones: PatchCore on stripes read
    0.929 in the table and 1.000 "given" in the same printout. Both are now the pooled AUROC of
    the standardised scores, and the withheld one is on that scale too: where the router names
    every type, withheld and given agree type by type."""
    from tests.conftest import write_clear_dataset

    data = write_clear_dataset(tmp_path / "small", n_train=8, n_test=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = E.evaluate(load_dataset(data), folds=FOLDS, methods=("padim", "patchcore"),
                            base_config=tiny_config(), progress=False, n_boot=20, gallery=0, device="cpu",
                            unknown_type=True)
    for name in ("padim", "patchcore"):
        u = report["unknown_type"][name]  # type: ignore[typeddict-item]
        assert u["type_accuracy"] == 1.0
        for t in ("dots", "stripes"):
            table = report["results"][t][name]["pooled"]["auroc"]
            assert u["per_type"][t]["auroc_type_given"] == pytest.approx(table), (name, t)
            assert u["per_type"][t]["auroc_type_withheld"] == pytest.approx(table), (name, t)
