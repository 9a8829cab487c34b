"""The report: three files, offline HTML, and HTML numbers equal to the JSON numbers.

Run as a script to render a demo: ``python tests/test_report.py /tmp/report_demo``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from diffqc import report as R
from diffqc.errors import OutputError
from diffqc.folds import grouped_stratified_assignment
from tests.conftest import NEEDS_BROWSER, full_disk
from tests.html_numbers import assert_numbers_match

METHODS = ("diffusion", "patchcore")
ALPHA_REVIEW, ALPHA_REJECT = 0.05, 0.01
K = 5

# type -> (n_good parts, n_defective parts, separation, has masks)
TYPES = {
    "edge1": (120, 40, 2.2, True),
    "corner": (90, 30, 1.4, False),
    "rare": (40, 3, 1.0, False),  # too few defective samples -> unreliable
    "clean": (30, 0, 0.0, False),  # no defective samples at all
}


def _mask(rng: np.random.Generator, h: int = 32) -> np.ndarray:
    m = np.zeros((h, h), bool)
    r, c = rng.integers(2, h - 10, 2)
    m[r : r + rng.integers(3, 9), c : c + rng.integers(3, 9)] = True
    return m


def _simulate_type(rng: np.random.Generator, n_good: int, n_bad: int, sep: float,
                   masks: bool) -> dict[str, Any]:
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    # two crops per part; a defective part's crops are both defective
    groups = [f"good{i // 2}" for i in range(n_good)] + [f"bad{i // 2}" for i in range(n_bad)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold = grouped_stratified_assignment(labels, groups, K, seed=0)
    out: dict[str, Any] = {"labels": labels, "fold": fold, "methods": {}}
    out["masks"] = [_mask(rng) if (masks and y) else None for y in labels] if masks else None
    for j, _method in enumerate(METHODS):
        shift = sep * (1.0 - 0.25 * j)
        scores = rng.normal(size=labels.size) + shift * labels * rng.uniform(0.3, 1.7, labels.size)
        p = np.empty(labels.size)
        review_t, reject_t = [], []
        for f in range(K):
            cal = np.sort(rng.normal(size=150) + 0.05 * f)  # fold's calibration GOOD scores
            idx = fold == f
            p[idx] = (1 + (cal[None, :] >= scores[idx, None]).sum(1)) / (cal.size + 1)
            review_t.append(float(np.quantile(cal, 1 - ALPHA_REVIEW)))
            reject_t.append(float(np.quantile(cal, 1 - ALPHA_REJECT)))
        decisions = np.where(p <= ALPHA_REJECT, "REJECT",
                             np.where(p <= ALPHA_REVIEW, "REVIEW", "PASS"))
        maps = None
        if masks:
            maps = [rng.normal(size=(8, 8)) + (2.0 * _downsample(m) if m is not None else 0.0)
                    for m in out["masks"]]
        out["methods"][_method] = {"scores": scores, "p": p, "decisions": decisions,
                                   "review_t": review_t, "reject_t": reject_t, "maps": maps}
    return out


def _downsample(m: np.ndarray) -> np.ndarray:
    return m.reshape(8, 4, 8, 4).mean(axis=(1, 3))


def build_report(seed: int = 0, n_boot: int = 200) -> R.Report:
    """A synthetic report built with the public builders, as evaluate.py would."""
    rng = np.random.default_rng(seed)
    sims = {t: _simulate_type(rng, *spec) for t, spec in TYPES.items()}
    report = R.new_report(
        dataset=R.DatasetInfo(
            name="synthetic-inkjet", source="/data/synthetic/manifest.csv",
            feature_types={t: R.TypeCounts(n_good=int((s["labels"] == 0).sum()),
                                           n_defective=int(s["labels"].sum()),
                                           n_groups=(len(s["labels"]) + 1) // 2)
                           for t, s in sims.items()}),
        methods=list(METHODS),
        folds=R.FoldInfo(k=K, seed=0, grouping="part_id, else the source image"),
        decision_rule=R.DecisionRule(alpha_review=ALPHA_REVIEW, alpha_reject=ALPHA_REJECT),
    )
    plots = report["plots"]
    pooled: dict[str, dict[str, list[Any]]] = {m: {"y": [], "s": [], "f": [], "d": [], "p": []}
                                               for m in METHODS}
    for t, sim in sims.items():
        y, fold = sim["labels"], sim["fold"]
        report["results"][t] = {}
        for m in METHODS:
            r = sim["methods"][m]
            report["results"][t][m] = R.method_result(
                y, r["scores"], fold, r["decisions"], masks=sim["masks"], maps=r["maps"],
                k=K, n_boot=n_boot)
            plots["roc"].setdefault(t, {})[m] = R.roc_entry(y, r["scores"])
            plots["histograms"].setdefault(t, {})[m] = R.histogram_entry(
                y, r["scores"], r["review_t"], r["reject_t"])
            for key, v in (("y", y), ("s", r["scores"]), ("f", fold), ("d", r["decisions"]),
                           ("p", r["p"])):
                pooled[m][key].append(v)
            for idx, kind in R.worst_misses(y, r["scores"], r["decisions"], k=1):
                image = rng.uniform(0.2, 0.8, size=(32, 32, 3))
                amap = r["maps"][idx] if r["maps"] else rng.normal(size=(8, 8))
                plots["gallery"].append(R.GalleryItem(
                    feature_type=t, method=m, kind=kind, path=f"/data/{t}/{idx:04d}.png",
                    label=int(y[idx]), score=float(r["scores"][idx]),
                    decision=str(r["decisions"][idx]), p_value=float(r["p"][idx]),
                    overlay_png=R.overlay_png_base64(image, amap)))
            kinds = [("scratch" if i % 2 else "blob") if yi else None for i, yi in enumerate(y)]
            report.setdefault("by_defect", []).extend(R.defect_kind_results(
                t, m, y, r["scores"], kinds, r["decisions"], n_boot=n_boot))
        a, b = (sim["methods"][m]["scores"] for m in METHODS)
        report["comparisons"].append(R.compare_methods(t, *METHODS, y, a, b, fold, n_train=80, k=K))
    report["overall"] = {}
    for m in METHODS:
        y, s, f, d, p = (np.concatenate(pooled[m][key]) for key in ("y", "s", "f", "d", "p"))
        report["overall"][m] = R.method_result(y, s, f, d, k=K, n_boot=n_boot)
        plots["calibration"][m] = R.calibration_entry(y, ALPHA_REVIEW, ALPHA_REJECT,
                                                      p_values=p, decisions=d)
    report["comparisons"] = R.apply_holm(report["comparisons"])
    report["notes"] = ["Synthetic data: scores are random draws, not a real detector."]
    return report


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report")
    return R.write_report(build_report(0), out)


def test_three_files_and_strict_json(written: dict[str, Path]) -> None:
    assert set(written) == {"json", "md", "html"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in written.values())

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(written["json"].read_text(), parse_constant=no_constants)
    assert data["schema_version"] == R.SCHEMA_VERSION
    assert set(data["results"]) == set(TYPES) and data["methods"] == list(METHODS)
    for item in data["plots"]["gallery"]:
        assert "overlay_png" not in item
        assert (written["json"].parent / item["overlay_file"]).is_file()


def test_html_is_self_contained(written: dict[str, Path]) -> None:
    page = written["html"].read_text()
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_every_html_number_matches_json(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    found = assert_numbers_match(written["html"].read_text(), data)
    assert len(found) > 300
    keys = {k for k, _, _ in found}
    for t in TYPES:
        for m in METHODS:
            for metric in R.METRIC_KEYS:
                assert R.json_pointer("results", t, m, "pooled", metric) in keys
                if not metric.startswith("share_"):
                    assert R.json_pointer("results", t, m, "summary", metric, "mean") in keys
            for rate in ("fpr_flagged", "fpr_reject"):  # every type has GOOD parts
                assert R.json_pointer("results", t, m, "rate_ci", rate, 1) in keys
    for i in range(len(data["comparisons"])):
        for field in ("delong_p", "delong_p_holm", "nb_p", "nb_p_holm", "effect_size"):
            assert R.json_pointer("comparisons", i, field) in keys
    with_kinds = [t for t, spec in TYPES.items() if spec[1] >= 2]  # "clean" has no defects
    assert len(data["by_defect"]) == 2 * len(with_kinds) * len(METHODS)  # two kinds per type
    for i in range(len(data["by_defect"])):
        for field in ("auroc", "recall_flagged", "recall_reject", "n_defective"):
            assert R.json_pointer("by_defect", i, field) in keys


def test_table_cells_hold_no_unlisted_numbers(written: dict[str, Path]) -> None:
    page = written["html"].read_text()
    cells = re.findall(r'<td class="n">(.*?)</td>', page, re.DOTALL)
    assert cells
    for cell in cells:
        rest = re.sub(r'<span class="num"[^>]*>.*?</span>', "", cell)
        rest = re.sub(r"<[^>]+>|95% CI", "", rest)
        assert not re.search(r"\d", rest), cell


def test_unreliable_types_are_marked(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    clean = data["results"]["clean"]["diffusion"]
    assert clean["unreliable"] and "no defective" in clean["reason"]
    assert clean["pooled"]["auroc"] is None and clean["pooled"]["fpr_reject"] is not None
    rare = data["results"]["rare"]["patchcore"]
    assert rare["unreliable"] and "per fold" in rare["reason"]
    assert not data["results"]["edge1"]["diffusion"]["unreliable"]
    page = written["html"].read_text()
    rows = re.findall(r'<tr class="([^"]*)"><td class="type"><strong>([^<]+)</strong>', page)
    marked = {name for cls, name in rows if "unreliable" in cls}
    assert marked == {"rare", "clean"}
    assert page.count("UNRELIABLE") >= 4
    assert "clean (UNRELIABLE)" in written["md"].read_text()


def test_pixel_metrics_only_where_masks_exist(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    edge = data["results"]["edge1"]["diffusion"]["pooled"]
    assert 0.5 < edge["pixel_auroc"] <= 1.0 and 0.0 < edge["aupro"] <= 1.0
    assert data["results"]["corner"]["diffusion"]["pooled"]["pixel_auroc"] is None


def _holm_step_down(p: list[float]) -> list[float]:
    """Holm's step-down adjustment as the textbook states it, in plain Python (not diffqc.stats):
    the m finite p-values in ascending order, the j-th (0-based) times m - j, a running maximum,
    capped at 1; NaN stays NaN and does not count towards m."""
    finite = sorted((x, i) for i, x in enumerate(p) if not math.isnan(x))
    out = [math.nan] * len(p)
    running = 0.0
    for j, (x, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - j) * x))
        out[i] = running
    return out


def _comparison(feature_type: str, method_b: str, delong_p: float, nb_p: float) -> R.Comparison:
    nan = math.nan
    return R.Comparison(
        feature_type=feature_type, method_a="diffusion", method_b=method_b, metric="auroc",
        auroc_a=nan, auroc_b=nan, delta=nan, delong_z=nan, delong_p=delong_p, delong_p_holm=nan,
        fold_diffs=[], mean_diff=nan, nb_t=nan, nb_p=nb_p, nb_p_holm=nan, effect_size=nan,
        n_train=nan, n_test=nan)


def test_apply_holm_hand_worked_families() -> None:
    """One family per method pair (and metric), adjusted over feature types; the overall row is
    in no family. Expected values worked by hand (see the comments)."""
    comps = [
        # diffusion vs padim over 4 types. DeLong: sorted 0.005*4 = 0.02, 0.01*3 = 0.03,
        # 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06. NB: NaN leaves m = 3:
        # 0.01*3 = 0.03, 0.04*2 = 0.08, 0.2*1 = 0.2.
        _comparison("t1", "padim", 0.01, 0.2),
        _comparison("t2", "padim", 0.04, math.nan),
        _comparison("t3", "padim", 0.03, 0.01),
        _comparison("t4", "padim", 0.005, 0.04),
        _comparison(R.OVERALL, "padim", 0.001, 0.001),
        # diffusion vs patchcore over 2 types: 0.02*2 = 0.04, 0.5; tied 0.3*2 = 0.6 for both
        _comparison("t1", "patchcore", 0.02, 0.3),
        _comparison("t2", "patchcore", 0.5, 0.3),
    ]
    out = R.apply_holm(comps)
    expected_delong = [0.03, 0.06, 0.06, 0.02, math.nan, 0.04, 0.5]
    expected_nb = [0.2, math.nan, 0.03, 0.08, math.nan, 0.6, 0.6]
    np.testing.assert_allclose([c["delong_p_holm"] for c in out], expected_delong)
    np.testing.assert_allclose([c["nb_p_holm"] for c in out], expected_nb)
    assert [c["delong_p"] for c in out] == [c["delong_p"] for c in comps]  # raw p-values kept
    np.testing.assert_allclose(_holm_step_down([c["delong_p"] for c in comps[:4]]), expected_delong[:4])


def test_comparisons_holm_adjusted(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    comps = data["comparisons"]
    assert len({(c["method_a"], c["method_b"], c["metric"]) for c in comps}) == 1  # one family
    raw = [c["delong_p"] for c in comps]
    adjusted = _holm_step_down([math.nan if p is None else p for p in raw])
    for c, adj in zip(comps, adjusted, strict=True):
        assert (c["delong_p_holm"] is None) == math.isnan(adj)
        if c["delong_p_holm"] is not None:
            assert c["delong_p_holm"] == pytest.approx(adj)
            assert c["delong_p_holm"] >= c["delong_p"]


def test_markdown_numbers(written: dict[str, Path]) -> None:
    data = json.loads(written["json"].read_text())
    md = written["md"].read_text()
    auroc = data["results"]["edge1"]["diffusion"]["pooled"]["auroc"]
    assert f"{auroc:.3f}" in md and "## Method comparisons" in md
    fpr = data["results"]["edge1"]["diffusion"]
    low, high = fpr["rate_ci"]["fpr_flagged"]
    assert f"{100 * fpr['pooled']['fpr_flagged']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]" in md
    row = data["by_defect"][0]
    assert "## By defect kind" in md
    assert f"| {row['feature_type']} | {row['defect']} | {row['method']} |" in md
    # the notes (images and types left out, copies) belong with the numbers, as in report.html
    assert "## Notes\n\n- Synthetic data: scores are random draws, not a real detector.\n" in md


def test_defect_kinds_hand_worked() -> None:
    """Each kind against the type's GOOD parts: kind A lies above every GOOD score (AUROC 1),
    kind B interleaves (3 of 8 pairs ordered); recall counts that kind's decisions only."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 0.5, 1.5, 20.0])
    kinds = ["good", "good", "good", "good", "A", "A", "B", "B", None]
    d = ["PASS", "PASS", "REVIEW", "PASS", "REJECT", "REVIEW", "PASS", "REVIEW", "REJECT"]
    rows = R.defect_kind_results("edge1", "diffusion", y, s, kinds, d, n_boot=50)
    by = {r["defect"]: r for r in rows}
    assert list(by) == ["A", "B", "unnamed"]
    assert by["A"]["auroc"] == 1.0 and by["B"]["auroc"] == pytest.approx(3 / 8)
    assert (by["A"]["n_good"], by["A"]["n_defective"], by["unnamed"]["n_defective"]) == (4, 2, 1)
    assert by["A"]["recall_flagged"] == 1.0 and by["A"]["recall_reject"] == 0.5
    assert by["B"]["recall_flagged"] == 0.5 and by["B"]["recall_reject"] == 0.0
    assert all(r["feature_type"] == "edge1" and r["method"] == "diffusion" for r in rows)
    one_kind = ["good"] * 4 + ["A"] * 5
    assert R.defect_kind_results("edge1", "diffusion", y, s, one_kind, d, n_boot=50) == []
    with pytest.raises(ValueError, match="defect kinds"):
        R.defect_kind_results("edge1", "diffusion", y, s, kinds[:-1], d)


def test_builders_on_small_inputs() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.3, 0.2, 0.8])
    assert R.worst_misses(y, s, ["PASS", "REVIEW", "PASS", "PASS", "REJECT"], k=1) == [
        (3, "missed defect"), (1, "false alarm")]
    assert R.worst_misses(y, s, ["PASS", "PASS", "PASS", "REJECT", "REJECT"], k=1) == [
        (3, "defect caught"), (1, "GOOD passed")]
    p = np.array([0.5, 0.02, 0.2, 0.04, 0.001])
    cal = R.calibration_entry(y, 0.05, 0.01, p_values=p, grid=[0.01, 0.05, 0.5])
    assert cal["realised_fpr"] == pytest.approx([0.0, 1 / 3, 1.0])
    assert [lv["realised_fpr"] for lv in cal["levels"]] == pytest.approx([1 / 3, 0.0])
    decided = R.calibration_entry(y, 0.05, 0.01, decisions=["PASS", "REJECT", "PASS", "PASS",
                                                             "REJECT"])
    assert decided["alpha"] == [] and decided["levels"][1]["realised_fpr"] == pytest.approx(1 / 3)
    hist = R.histogram_entry(y, s, [0.5, math.inf], [0.95], bins=4)
    assert sum(hist["good"]) == 3 and sum(hist["defective"]) == 2 and hist["edges"][-1] == 0.95
    roc = R.roc_entry(np.r_[np.zeros(300), np.ones(300)], np.arange(600.0), max_points=50)
    assert len(roc["fpr"]) <= 50 and roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    # the pooled FPRs and recalls with their 95 % Clopper-Pearson intervals: 1 of 3 GOOD parts
    # flagged, none rejected; 1 of 2 defects flagged and rejected
    res = R.method_result(y, s, [0, 1, 0, 1, 0], ["PASS", "REVIEW", "PASS", "PASS", "REJECT"], k=2,
                          n_boot=20)
    assert res["rate_ci"]["fpr_flagged"] == pytest.approx([0.0084, 0.9057], abs=1e-4)
    assert res["rate_ci"]["fpr_reject"] == pytest.approx([0.0, 0.7076], abs=1e-4)
    assert res["rate_ci"]["recall_flagged"] == res["rate_ci"]["recall_reject"] == pytest.approx(
        [0.0126, 0.9874], abs=1e-4)
    assert R.method_result(y, s, [0, 1, 0, 1, 0], k=2, n_boot=20)["rate_ci"] == {}  # no decisions


def test_pixel_metrics_resize_maps_and_skip_unknown_masks() -> None:
    rng = np.random.default_rng(0)
    defect = _mask(rng)
    masks: list[np.ndarray | None] = [None, None, defect, None]  # last: defective, no mask
    maps = [rng.normal(size=(8, 8)) for _ in masks]
    maps[2] = maps[2] + 3.0 * _downsample(defect)
    out = R.compute_metrics([0, 0, 1, 1], [0.1, 0.2, 0.9, 0.8], masks=masks, maps=maps)
    assert out["pixel_auroc"] > 0.8 and 0.0 < out["aupro"] <= 1.0
    assert math.isnan(R.compute_metrics([0, 1], [0.1, 0.9], masks=[None, None],
                                        maps=maps[:2])["pixel_auroc"])


def test_single_method_report_with_overlay_file(tmp_path: Path) -> None:
    """... and an image whose name is not UTF-8 (Latin-1 from an older share, ``b"caf\\xe9.png"``:
    evaluate's report ended in a ``UnicodeEncodeError`` after the whole run) is named with
    ``\\xNN`` in all three files."""
    y = np.r_[np.zeros(20, int), np.ones(10, int)]
    s = np.random.default_rng(1).normal(size=30) + y
    fold = np.arange(30) % 5
    overlay = tmp_path / "overlay.png"
    overlay.write_bytes(R.base64.b64decode(R.overlay_png_base64(np.ones((16, 16, 3)) / 2,
                                                                np.eye(4))))
    rep = R.new_report(
        dataset=R.DatasetInfo(name="tiny", source="-", feature_types={}),
        methods=["padim"], folds=R.FoldInfo(k=5, seed=0, grouping="image"),
        decision_rule=R.DecisionRule(alpha_review=0.05, alpha_reject=0.01))
    rep["results"]["t"] = {"padim": R.method_result(y, s, fold, n_boot=50)}
    rep["plots"]["gallery"].append(R.GalleryItem(
        feature_type="t", method="padim", kind="missed defect", path=os.fsdecode(b"caf\xe9.png"), label=1,
        score=0.5, overlay_path=str(overlay)))
    paths = R.write_report(rep, tmp_path / "out")
    page = paths["html"].read_text()
    assert "No comparisons" in page and page.count("data:image/png;base64,") == 1
    data = json.loads(paths["json"].read_text())
    assert data["results"]["t"]["padim"]["pooled"]["fpr_reject"] is None  # no decisions given
    assert data["results"]["t"]["padim"]["unreliable"]  # 2 defective per fold < 5
    assert data["plots"]["gallery"][0]["path"] == "caf\\xe9.png"
    assert "caf\\xe9.png" in paths["md"].read_text(encoding="utf-8") + page


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_report_target_never_replaces_a_file_it_did_not_write(written: dict[str, Path],
                                                              tmp_path: Path) -> None:
    from diffqc.errors import OutputError

    assert R.check_report_target(tmp_path / "new") == tmp_path / "new"  # new: fine
    (tmp_path / "empty").mkdir()
    R.check_report_target(tmp_path / "empty")
    assert R.is_report(written["json"].parent)
    R.check_report_target(written["json"].parent)  # an earlier report: its files are replaced
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "report.md").write_text("the line's own report")
    (foreign / "photo.jpg").write_bytes(b"precious")
    before = _tree(foreign)
    with pytest.raises(OutputError, match=r"holds no diffqc report.*--force"):
        R.check_report_target(foreign)
    with pytest.raises(OutputError, match=r"already holds report\.md.*never replaces"):
        R.check_report_target(foreign, force=True)
    (foreign / "report.md").unlink()
    R.check_report_target(foreign, force=True)  # beside photo.jpg: allowed
    assert not R.is_report(foreign)
    (foreign / "report.json").write_text('{"title": "not ours"}')
    assert not R.is_report(foreign)  # a report.json without a diffqc report's keys
    with pytest.raises(OutputError, match="not a folder"):
        R.check_report_target(foreign / "photo.jpg")
    assert {k: v for k, v in _tree(foreign).items() if k != "report.json"} == {
        k: v for k, v in before.items() if k != "report.md"}


def test_overlay_of_a_camera_frame_is_small_and_shows_the_map_where_it_is() -> None:
    """A full camera frame is reduced before it is coloured (the overlay is max_side high), and
    the hot corner of the map lands in the same corner of the overlay's right half."""
    import base64
    import io

    from PIL import Image

    frame = np.full((1500, 2000, 3), 0.5, np.float32)
    amap = np.zeros((30, 40), np.float32)
    amap[:10, :10] = 1.0  # hot top-left corner
    png = Image.open(io.BytesIO(base64.b64decode(R.overlay_png_base64(frame, amap, max_side=200))))
    rgb = np.asarray(png.convert("RGB"), np.float32)
    assert rgb.shape[0] == 150 and 2 * 200 < rgb.shape[1] < 2 * 200 + 20
    right = rgb[:, rgb.shape[1] - 200:]
    assert np.allclose(rgb[:, :200], 0.5 * 255, atol=1.5)  # the image half: the grey frame
    hot, cold = right[10:30, 10:40].mean(axis=(0, 1)), right[100:140, 150:190].mean(axis=(0, 1))
    assert hot[0] > cold[0] + 60  # inferno: the hot corner is much redder


def test_missing_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="comparisons"):
        R.write_report({"dataset": {}, "methods": [], "folds": {}, "decision_rule": {},
                        "results": {}, "plots": {}}, tmp_path)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/report_demo")
    print(R.write_report(build_report(0, n_boot=1000), target))


def test_write_report_on_a_full_disk_names_the_file_and_keeps_the_earlier_report(
        written: dict[str, Path], tmp_path: Path) -> None:
    """Each file is written whole or not at all, report.json first: a full disk leaves an earlier
    report's files as they were and says which file failed (it was a bare "File too large" and a
    truncated gallery PNG)."""
    out = tmp_path / "r"
    shutil.copytree(written["json"].parent, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with full_disk(4096), pytest.raises(OutputError) as err:
        R.write_report(build_report(1), out)
    assert f"the report in {out} is incomplete: cannot write {out / 'report.json'}" in str(err.value)
    assert "nothing was written" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_report_written_over_an_earlier_one_leaves_none_of_its_gallery(tmp_path: Path) -> None:
    """Writing over an earlier report replaced its gallery/NNN.png files one by one, and the ones
    beyond the new report's count stayed: a first run's 000-013.png, a second's with two gallery
    parts left all fourteen while its report.json named 000-001, and the folder showed parts of
    another run as this one's. An earlier report's gallery files the new one does not name are
    removed; a file it did not name (someone's own, in its gallery folder) is kept."""
    import copy

    first = build_report(0, n_boot=20)
    second = copy.deepcopy(first)
    second["plots"]["gallery"] = second["plots"]["gallery"][:2]
    out = tmp_path / "r"
    R.write_report(first, out)
    assert len(list((out / "gallery").glob("*.png"))) == len(first["plots"]["gallery"]) > 2
    (out / "gallery" / "099.png").write_bytes(b"someone's own picture")
    (out / "gallery" / "notes.txt").write_text("about the gallery")
    R.write_report(second, out)
    named = [g["overlay_file"] for g in json.loads((out / "report.json").read_text())["plots"]["gallery"]]
    assert named == ["gallery/000.png", "gallery/001.png"]
    left = sorted(p.name for p in (out / "gallery").iterdir())
    assert left == ["000.png", "001.png", "099.png", "notes.txt"]
    assert (out / "gallery" / "099.png").read_bytes() == b"someone's own picture"


def test_the_calibration_plots_legend_leaves_its_curves_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small or shifted set's realised false-positive rates lie above the diagonal, in the
    plot's upper left, where its legend was drawn over them (evaluate on a 40-part set): the
    legend is beside the plot."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    monkeypatch.setattr(R, "_figure_b64", lambda fig: drawn.append(fig) or "")
    y = np.r_[np.zeros(64, dtype=np.int64), np.ones(16, dtype=np.int64)]
    p = np.r_[np.linspace(0.001, 1.0, 64), np.full(16, 1e-4)] ** 2  # GOOD parts flagged too often
    calib = {m: R.calibration_entry(y, ALPHA_REVIEW, ALPHA_REJECT, p_values=p) for m in METHODS}
    assert calib["diffusion"]["realised_fpr"][-1] > 0.2 * 2  # above the diagonal
    R.plot_calibration(calib, METHODS)
    (fig,) = drawn
    renderer = FigureCanvasAgg(fig).get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend()
    assert legend is not None
    box, plot = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not box.overlaps(plot), (box, plot)


@pytest.mark.browser
@NEEDS_BROWSER
def test_the_score_histograms_are_drawn_at_a_readable_size(written: dict[str, Path], browser: Any) -> None:
    """Two types' histograms side by side on a 1366 px laptop screen each drew a 1111 px figure
    of three methods in 613 px: its axis numbers about 7 px high, unreadable. Each is drawn at
    its own size where the page is as wide."""
    browser.set_window_size(1366, 768)
    browser.get(written["html"].resolve().as_uri())
    scales = browser.execute_script(
        "return [...document.querySelectorAll('#histograms img')].map("
        "i => [i.getBoundingClientRect().width, i.naturalWidth, i.parentElement.parentElement.clientWidth]);")
    assert scales
    for width, natural, room in scales:
        assert width >= 0.95 * min(natural, room), (width, natural, room)


def test_a_strips_gallery_picture_stacks_the_part_over_its_overlay() -> None:
    """The report's gallery drew a 512 x 64 edge crop beside its overlay, 514 x 32 px in a card
    about 300 px wide: a thin line. A strip is drawn above its overlay, as the heat maps are."""
    import base64
    import io

    from PIL import Image

    img = np.random.default_rng(2).random((64, 512, 3)).astype(np.float32)
    amap = np.zeros((64, 512))
    amap[20:40, 300:360] = 1.0
    png = base64.b64decode(R.overlay_png_base64(img, amap))
    w, h = Image.open(io.BytesIO(png)).size
    assert w == 256 and h > 2 * 32, (w, h)
    square = base64.b64decode(R.overlay_png_base64(img[:, :64], amap[:, :64]))
    w, h = Image.open(io.BytesIO(square)).size
    assert w > 2 * h - 10, (w, h)  # a square part: beside its overlay, as before
