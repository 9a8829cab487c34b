"""``diffqc test MODEL DATA``: one trained bundle scored on labelled images it never saw."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from diffqc.cli import main
from diffqc.data import DEFECTIVE, GOOD, Sample
from diffqc.holdout import decision_table, format_table, recall_by_kind
from diffqc.inspection import Inspection
from tests.conftest import tiny_config, write_clear_dataset


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_decision_table_counts_flagged_good_parts_and_caught_defects() -> None:
    labels = [GOOD, GOOD, GOOD, GOOD, DEFECTIVE, DEFECTIVE, GOOD]
    decisions = ["PASS", "PASS", "PASS", "REVIEW", "REJECT", "PASS", "PASS"]
    types = ["a"] * 6 + ["b"]
    samples = [Sample(Path(f"{i}.png"), t, y) for i, (t, y) in enumerate(zip(types, labels, strict=True))]
    results = [Inspection(score=float(i), p_value=0.5, decision=d, feature_type=t, predicted_type=None,
                          type_known=True) for i, (d, t) in enumerate(zip(decisions, types, strict=True))]
    rows = {r["feature_type"]: r for r in decision_table(samples, results)}
    a, b, both = rows["a"], rows["b"], rows["mean/all"]
    assert (a["n"], a["defective"], a["fpr"], a["recall"]) == (6, 2, 0.25, 0.5)
    assert (a["pass"], a["review"], a["reject"]) == (4, 1, 1)
    assert a["accuracy"] == pytest.approx(4 / 6)
    assert math.isnan(b["image_auroc"]) and math.isnan(b["recall"]) and b["fpr"] == 0.0
    assert both["image_auroc"] == a["image_auroc"]  # the mean over the types that have both labels
    assert both["fpr"] == pytest.approx(1 / 5) and both["recall"] == 0.5
    # how far each rate can be trusted, from so few parts (95 % Clopper-Pearson)
    assert a["fpr_ci95"] == pytest.approx([0.0063, 0.8059], abs=1e-4)  # 1 of 4 GOOD flagged
    assert a["recall_ci95"] == pytest.approx([0.0126, 0.9874], abs=1e-4)  # 1 of 2 defects
    assert b["fpr_ci95"] == pytest.approx([0.0, 0.975], abs=1e-4) and all(map(math.isnan, b["recall_ci95"]))
    text = format_table(list(rows.values()))
    assert "recall" in text.splitlines()[0] and "nan" not in text


def test_cli_test_of_enough_parts_says_nothing_of_their_number(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """20 GOOD and 20 defective parts of each type (at α_review 0.05, one GOOD part in 20 is what
    the calibration allows): no note of few parts."""
    data = write_clear_dataset(tmp_path / "more", n_train=2, n_test=20, seed=3)
    assert main(["test", str(tiny_model), str(data), "-q"]) == 0
    out = capsys.readouterr().out
    assert "dots" in out and "few parts" not in out, out


def test_recall_by_defect_kind_names_the_defects_that_pass() -> None:
    kinds = ["crack", "crack", "crack", "hole", None]
    decisions = ["REJECT", "PASS", "PASS", "REVIEW", "PASS"]
    samples = [Sample(Path(f"{i}.png"), "a", DEFECTIVE, defect=k) for i, k in enumerate(kinds)]
    samples.append(Sample(Path("g.png"), "a", GOOD, defect="good"))
    results = [Inspection(score=0.0, p_value=0.5, decision=d, feature_type="a", predicted_type=None,
                          type_known=True) for d in [*decisions, "REVIEW"]]
    got = recall_by_kind(samples, results)["a"]
    assert list(got) == ["crack", "defect", "hole"]  # GOOD parts are not a kind
    assert (got["crack"]["n"], got["crack"]["flagged"]) == (3, 1)
    assert got["crack"]["recall"] == pytest.approx(1 / 3) and got["hole"]["recall"] == 1.0
    assert got["defect"]["recall"] == 0.0


def test_cli_test_scores_only_the_images_the_model_never_saw(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the folder it was trained on, every GOOD training image is left out (fit or calibrated
    on, by content) and the test split is scored: the clear blobs are told from GOOD parts."""
    report_path = tmp_path / "report.json"
    assert main(["test", str(tiny_model), str(clear_dataset), "--json", str(report_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "feature_type" in out and "recall" in out and "left out: " in out
    assert "FPR's target α_review=0.05, α_reject=0.01" in out  # what its FPR column is held to
    # 8 GOOD parts of a type: one flagged or not moves its FPR by 0.125, more than α_review
    assert re.search(r"few parts to measure a type by \(.*\): dots FPR \d\.\d{3} of 8 GOOD, within "
                     r"\[\d\.\d{3}, \d\.\d{3}\], recall \d\.\d{3} of 8 defective, within", out), out
    report = _strict_json(report_path)
    assert report["decision_rule"] == {"alpha_review": 0.05, "alpha_reject": 0.01}
    left = report["left_out"]
    meta = json.loads((tiny_model / "metadata.json").read_text())["training_data"]
    assert left["fit_images"] == sum(meta["fit_images"].values())
    assert left["calibration_images"] == sum(meta["calibration_images"].values()) > 0
    assert left["fit_images"] + left["calibration_images"] == 2 * 24  # every train/good image
    rows = {r["feature_type"]: r for r in report["rows"]}
    for t in ("stripes", "dots"):
        assert (rows[t]["n"], rows[t]["defective"]) == (16, 8)
        assert rows[t]["image_auroc"] > 0.9
    assert len(report["images"]) == 32 and {i["label"] for i in report["images"]} == {"good", "defective"}
    assert (report["runtime"], report["type_known"]) == ("torch", True)
    assert {t: list(k) for t, k in report["defect_kinds"].items()} == {"dots": ["blob"], "stripes": ["blob"]}
    assert report["defect_kinds"]["dots"]["blob"]["n"] == 8

    # an existing --json is not overwritten without --force (refused before anything is scored)
    before = report_path.read_bytes()
    assert main(["test", str(tiny_model), str(clear_dataset), "--json", str(report_path), "-q"]) == 1
    assert "--force" in capsys.readouterr().err and report_path.read_bytes() == before
    # --force replaces an earlier report only: never a file diffqc did not write as one (the
    # bundle's metadata.json, a typo'd manifest), nor a folder; refused before anything is scored
    meta_path = tiny_model / "metadata.json"
    meta_before = meta_path.read_bytes()
    test = ["test", str(tiny_model), str(clear_dataset), "--force", "-q", "--json"]
    for target in (meta_path, tmp_path):
        assert main([*test, str(target)]) == 1
        err = capsys.readouterr()
        assert "--json" in err.err and err.out == ""  # nothing scored
    assert meta_path.read_bytes() == meta_before
    assert main([*test, str(report_path)]) == 0  # an earlier report: replaced


def test_cli_test_makes_its_reports_folder_and_refuses_an_unwritable_one_before_scoring(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--json reports/2026-12/run.json`` whose folder did not exist failed after every image
    was scored ("cannot write ...: No such file or directory"), the run's scores lost; the folder
    is made now, as ``demo --json`` and ``evaluate --out`` make theirs. A folder that takes no
    file (a read-only volume) is refused before the first image is scored."""
    import sys

    from tests.conftest import run_with_mount

    report = tmp_path / "reports" / "2026-12" / "run.json"
    table = tmp_path / "tables" / "run.csv"
    assert main(["test", str(tiny_model), str(clear_dataset), "--json", str(report),
                 "--csv", str(table), "-q"]) == 0
    assert len(_strict_json(report)["images"]) == 32
    assert table.read_text().count("\n") == 33
    capsys.readouterr()

    volume, mounted = tmp_path / "volume", tmp_path / "mounted"
    volume.mkdir()
    mounted.mkdir()
    for option in ("--json", "--csv"):
        proc = run_with_mount(volume, mounted, [sys.executable, "-m", "diffqc.cli", "test", str(tiny_model),
                                                str(clear_dataset), option, str(mounted / "run.out")],
                              read_only=True)
        assert proc.returncode == 1
        assert f"diffqc: error: cannot write {mounted}/run.out: Read-only file system" in proc.stderr
        assert "feature_type" not in proc.stdout and "scoring" not in proc.stderr  # nothing scored
    assert list(volume.iterdir()) == []


def test_cli_test_names_images_of_another_size_or_colour_than_the_training(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test set from a camera set otherwise (its region of interest twice as wide, saved as JPEG;
    colour where the model learned grey) was scored without a word, as `inspect`, `serve` and `calibrate` name
    such parts: the table measured the model on another scale than it learned. Named once per
    type and check, each naming one of its images; the images are scored all the same."""
    import numpy as np
    from PIL import Image

    data = write_clear_dataset(tmp_path / "fresh", n_train=1, n_test=4, seed=8)
    meta = json.loads((tiny_model / "metadata.json").read_text())["training_data"]
    (h0, _), (w0, _) = meta["image_sizes"]["dots"]
    assert meta["image_colours"]["stripes"] == "grey"
    for p in sorted((data / "dots" / "test").rglob("*.png")):  # and saved as JPEG
        with Image.open(p) as img:
            img.resize((2 * w0, h0)).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    for p in sorted((data / "stripes" / "test").rglob("*.png")):
        with Image.open(p) as img:
            rgb = np.asarray(img.convert("RGB")).astype(np.int16)
        rgb[..., 2] += 30
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(p)
    report = tmp_path / "report.json"
    assert main(["test", str(tiny_model), str(data), "--json", str(report), "-q"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "image of type" in x]
    assert len(warned) == 2, warned
    size = next(x for x in warned if "'dots'" in x)
    assert f"a {2 * w0}x{h0} px image of type 'dots'" in size and f"{data}/dots/test/" in size
    assert "a lossy (JPEG or WebP) image of type 'dots', whose training images were lossless" in size
    colour = next(x for x in warned if "'stripes'" in x)
    assert "a colour image of type 'stripes', whose training images were grey" in colour
    assert len(_strict_json(report)["images"]) == 2 * (1 + 8)  # scored all the same


def test_cli_test_names_defects_saved_otherwise_than_its_good_parts(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test set whose defects were saved as JPEG and its GOOD parts as PNG: the AUROC in the
    table tells the files apart as much as the defects (0.887 -> 0.940 on the synthetic set), and
    nothing said so. The type is named once; its images are scored all the same."""
    from PIL import Image

    data = write_clear_dataset(tmp_path / "fresh", n_train=1, n_test=4, seed=8)
    for p in sorted((data / "dots" / "test" / "blob").glob("*.png")):
        with Image.open(p) as img:
            img.save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    assert main(["test", str(tiny_model), str(data), "-q"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "(JPEG or WebP) in other shares" in x]
    assert len(warned) == 1, warned
    assert "1 type(s) are lossy (JPEG or WebP) in other shares (dots: 4 of 4 defective, 0 of 5 GOOD;" \
        in warned[0]


def test_cli_test_names_good_images_that_score_as_defects(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Defects labelled GOOD in a test set count as GOOD parts flagged: the FPR and AUROC in the
    table are worse than the model's, and nothing said why. Those far above their type's other
    GOOD images are named (as `evaluate` names them), and still counted as labelled."""
    data = write_clear_dataset(tmp_path / "fresh", n_train=8, n_test=4, seed=8)
    slipped = sorted((data / "dots" / "test" / "blob").glob("*.png"))[:2]
    for p in slipped:
        shutil.move(p, data / "dots" / "test" / "good" / p.name)
    report = tmp_path / "report.json"
    assert main(["test", str(tiny_model), str(data), "-q", "--json", str(report)]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "score far above" in x]
    assert len(warned) == 1, warned
    assert "GOOD image(s) of dots score far above the others of their type" in warned[0]
    assert any(p.name in warned[0] for p in slipped)
    assert "dots_train_good_" not in warned[0] and "dots_test_good_" not in warned[0]  # no GOOD part
    assert "label them defective and test again" in warned[0]
    assert sum(e["label"] == "good" for e in _strict_json(report)["images"]) == 2 * 12 + 2


def test_holdout_report_takes_samples_as_fit_does(tiny_model: Path, clear_dataset: Path) -> None:
    """The Python API: `Detector.fit` takes a dataset's path or its Samples (load_dataset, then
    filtered), `holdout_report` took a path only (a list of Samples was pathlib's TypeError,
    "expected str, bytes or os.PathLike object, not list"); it takes both, with the same rows."""
    from diffqc.data import load_dataset
    from diffqc.holdout import holdout_report
    from diffqc.model import Detector

    det = Detector.load(tiny_model)
    samples = [s for s in load_dataset(clear_dataset) if s.feature_type == "dots"]
    by_path = holdout_report(det, clear_dataset)
    given = holdout_report(det, samples)
    assert given["rows"][0] == next(r for r in by_path["rows"] if r["feature_type"] == "dots")
    assert given["data"] == f"{len(samples)} samples given" and given["left_out"]["fit_images"] > 0
    with pytest.raises(TypeError, match=r"holdout_report takes Samples .* or a dataset's path, got int"):
        holdout_report(det, [5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"holdout_report takes Samples .* or a dataset's path, got int$"):
        holdout_report(det, 5)  # type: ignore[arg-type]  # was "'int' object is not iterable"


def test_holdout_report_of_an_unfitted_detector_says_so(clear_dataset: Path) -> None:
    """It said "none of its types (dots, stripes) is the model's ()"."""
    from diffqc.errors import NotFittedError
    from diffqc.holdout import holdout_report
    from diffqc.model import Detector

    with pytest.raises(NotFittedError, match=r"detector is not fitted; call fit\(\) or Detector.load\(\)"):
        holdout_report(Detector(tiny_config()), clear_dataset)


def test_cli_test_writes_every_image_as_a_csv_row(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--csv`: the report's image entries as a table a QC engineer sorts in a spreadsheet; the
    same rules as --json for what may be replaced."""
    import csv

    table, report_path = tmp_path / "images.csv", tmp_path / "report.json"
    assert main(["test", str(tiny_model), str(clear_dataset), "-q", "--csv", str(table),
                 "--json", str(report_path)]) == 0
    assert '"table"' in capsys.readouterr().out
    with open(table, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    images = json.loads(report_path.read_text())["images"]
    assert len(rows) == len(images) == 32
    assert [r["path"] for r in rows] == [i["path"] for i in images]
    assert [float(r["score"]) for r in rows] == pytest.approx([i["score"] for i in images])
    assert {(r["label"], r["defect"]) for r in rows} == {("good", "good"), ("defective", "blob")}
    assert list(rows[0]) == ["path", "feature_type", "label", "defect", "score", "p_value", "decision",
                             "predicted_type", "heatmap"] and rows[0]["heatmap"] == ""
    # an earlier table needs --force; a file diffqc did not write, the same file as --json or a
    # folder is refused before anything is scored
    test = ["test", str(tiny_model), str(clear_dataset), "-q"]
    assert main([*test, "--csv", str(table)]) == 1 and "--force" in capsys.readouterr().err
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,feature_type,label\n")
    for argv in (["--csv", str(manifest)], ["--csv", str(tmp_path)],
                 ["--csv", str(tmp_path / "x.csv"), "--json", str(tmp_path / "x.csv")]):
        assert main([*test, "--force", *argv]) == 1
        err = capsys.readouterr()
        assert "--csv" in err.err and err.out == "", argv
    assert manifest.read_text() == "path,feature_type,label\n" and not (tmp_path / "x.csv").exists()
    assert main([*test, "--force", "--csv", str(table)]) == 0  # an earlier table: replaced


def test_cli_test_finds_copies_of_training_images_by_content(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of a training image under another name, in labelled folders, is left out too; a
    set of nothing else is refused, naming why."""
    trained = sorted((clear_dataset / "stripes" / "train" / "good").iterdir())[:3]
    data = tmp_path / "line" / "stripes"
    (data / "good").mkdir(parents=True)
    (data / "bad").mkdir()
    for k, src in enumerate(trained):
        shutil.copy(src, data / "good" / f"renamed-{k}.png")
    assert main(["test", str(tiny_model), str(tmp_path / "line"), "-q"]) == 1
    assert "all 3 images are images the model was fit or calibrated on" in capsys.readouterr().err

    fresh = write_clear_dataset(tmp_path / "fresh", n_train=1, n_test=4, seed=9)
    for kind in ("good", "blob"):
        for p in (fresh / "stripes" / "test" / kind).iterdir():
            shutil.copy(p, data / ("good" if kind == "good" else "bad") / p.name)
    report_path = tmp_path / "r.json"
    assert main(["test", str(tiny_model), str(tmp_path / "line"), "--json", str(report_path), "-q"]) == 0
    report = _strict_json(report_path)
    assert report["left_out"]["fit_images"] + report["left_out"]["calibration_images"] == 3
    assert report["rows"][0]["n"] == 8 and report["rows"][0]["defective"] == 4

    # a manifest's rows without a label are not scored, and counted
    label = {"good": "good", "bad": ""}
    rows = ["path,feature_type,label"] + [f"{p.as_posix()},stripes,{label[p.parent.name]}"
                                           for p in sorted(data.rglob("*.png"))]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert main(["test", str(tiny_model), str(tmp_path / "m.csv"), "--json", str(report_path), "--force",
                 "-q"]) == 0
    assert _strict_json(report_path)["left_out"]["unlabelled"] == 4
    assert "4 unlabelled" in capsys.readouterr().out


def test_cli_test_with_the_type_withheld_reports_the_routers_accuracy(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    assert main(["test", str(tiny_model), str(clear_dataset), "--unknown-type", "--json",
                 str(report_path), "-q"]) == 0
    report = _strict_json(report_path)
    assert report["type_known"] is False and report["type_accuracy"] > 0.9
    assert {i["predicted_type"] for i in report["images"]} == {"stripes", "dots"}


def test_cli_test_names_types_the_model_does_not_know(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_clear_dataset(tmp_path / "fresh", n_train=1, n_test=3, seed=7)
    (data / "dots").rename(data / "squares")
    assert main(["test", str(tiny_model), str(data), "-q"]) == 0
    err = capsys.readouterr().err
    assert "images of types the model does not know are left out (squares" in err
    shutil.rmtree(data / "stripes")
    assert main(["test", str(tiny_model), str(data), "-q"]) == 1
    assert "none of its types (squares) is the model's" in capsys.readouterr().err


def test_cli_test_warns_when_a_bundle_cannot_say_what_it_was_calibrated_on(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    meta = json.loads((model / "metadata.json").read_text())
    del meta["training_data"]["calibration_image_fingerprints"]  # as bundles written before
    (model / "metadata.json").write_text(json.dumps(meta))
    report_path = tmp_path / "r.json"
    assert main(["test", str(model), str(clear_dataset), "--json", str(report_path), "-q"]) == 0
    assert "does not list the images it was calibrated on" in capsys.readouterr().err
    assert _strict_json(report_path)["left_out"]["calibration_images"] == 0


def test_images_a_model_was_recalibrated_on_are_left_out_of_its_test(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=2, seed=5)
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    report_path = tmp_path / "r.json"
    assert main(["test", str(model), str(data), "--json", str(report_path), "-q"]) == 0
    report = _strict_json(report_path)
    assert report["left_out"]["calibration_images"] == 2 * (6 + 2)  # every GOOD image it was given
    assert len(report["images"]) == 2 * 2 and {i["label"] for i in report["images"]} == {"defective"}
    assert "its AUROC and FPR cannot be measured" in capsys.readouterr().out


def test_cli_test_draws_heat_maps_of_its_misses(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--heatmaps DIR: a heat map of each defect that passed (DIR/missed) and of each GOOD part
    flagged (DIR/flagged), none of the parts the model got right. Labelled folders with some
    images under the wrong label make misses of both sorts."""
    good = sorted((clear_dataset / "dots" / "test" / "good").iterdir())
    blobs = sorted((clear_dataset / "dots" / "test" / "blob").iterdir())
    data = tmp_path / "line"
    for folder, images in (("good", good[:4] + blobs[:3]), ("crack", good[4:7] + blobs[3:6])):
        (data / "dots" / folder).mkdir(parents=True)
        for p in images:
            shutil.copy(p, data / "dots" / folder / p.name)
    hm, report_path = tmp_path / "hm", tmp_path / "r.json"
    assert main(["test", str(tiny_model), str(data), "--heatmaps", str(hm), "--json", str(report_path),
                 "-q"]) == 0
    out = capsys.readouterr().out
    images = _strict_json(report_path)["images"]
    missed = [i for i in images if i["label"] == "defective" and i["decision"] == "PASS"]
    flagged = [i for i in images if i["label"] == "good" and i["decision"] != "PASS"]
    assert missed and flagged  # both sorts happen here
    assert {i["path"] for i in images if i.get("heatmap")} == {i["path"] for i in missed + flagged}
    for sort, which in (("missed", missed), ("flagged", flagged)):
        drawn = sorted(p.name for p in (hm / sort).iterdir())
        assert drawn == sorted(Path(i["heatmap"]).name for i in which)
        assert all(Path(i["heatmap"]).parent == hm / sort for i in which)
    assert f"{len(missed)} defects that passed" in out and f"{len(flagged)} GOOD parts flagged" in out
    # a file named as the folder: refused before any image is scored
    assert main(["test", str(tiny_model), str(data), "--heatmaps", str(report_path), "-q"]) == 1
    captured = capsys.readouterr()
    assert "--heatmaps" in captured.err and captured.out == ""


def test_cli_test_of_images_none_of_which_can_be_read_says_so(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc test --skip-corrupt` on a folder whose every image was unreadable (a share that
    dropped, files of another kind) skipped them all and ended with exit 0: an empty table, a
    "mean/all" row of zeros and numpy's warnings. It is an error that says so, as evaluate's is."""
    data = tmp_path / "line"
    for folder in ("good", "crack"):
        (data / "dots" / folder).mkdir(parents=True)
        for i in range(2):
            (data / "dots" / folder / f"{i:03d}.png").write_bytes(b"\x89PNG garbage")
    report_path = tmp_path / "r.json"
    code = main(["test", str(tiny_model), str(data), "--skip-corrupt", "--json", str(report_path), "-q"])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "none of the 4 images could be read" in captured.err and "000.png" in captured.err, captured
    assert not report_path.exists()


def test_cli_test_of_parts_says_how_often_a_good_part_is_flagged_and_the_level_for_a_part(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A QC engineer who set α_review = 5 % reads it as the share of GOOD parts sent to review;
    a part seen as images of k types, each flagged at 5 % of its type's GOOD images, is flagged
    up to k times as often. `test` on data that names its parts says the parts' share, and the
    level per image that bounds a part's at α (α/k: valid whatever the images' dependence)."""
    rows = ["path,feature_type,label,part_id"]
    for kind, label in (("good", "good"), ("blob", "defect")):
        for i in range(8):
            for t in ("dots", "stripes"):
                path = clear_dataset / t / "test" / kind / f"{t}_test_{kind}_{i:03d}.png"
                rows.append(f"{path},{t},{label},{kind}-{i}")
    manifest = tmp_path / "parts.csv"
    manifest.write_text("\n".join(rows) + "\n")
    assert main(["test", str(tiny_model), str(manifest), "-q", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    parts = _strict_json(tmp_path / "r.json")["parts"]
    assert (parts["good"], parts["defective"], parts["types"]) == (8, 8, 2)
    images = {r["feature_type"]: r for r in _strict_json(tmp_path / "r.json")["rows"]}
    assert parts["good_flagged"] >= images["mean/all"]["fpr"]
    line = next(x for x in out.splitlines() if x.startswith("parts "))
    assert f"8 GOOD parts of 2 types, {100 * parts['good_flagged']:.1f} % flagged" in line, line
    assert parts["types_per_part"] == 2  # the data's, whatever of it the model was fit on
    assert ("A GOOD part of 2 types is flagged when any of its images is: at α_review = 0.05 per image, in "
            "at most 2 × 0.05 = 10 % of GOOD parts where each type's calibration holds its level "
            "(Bonferroni, whatever the images' dependence); for at most a share A, decide each image at "
            "A/2: for the defaults' shares (0.05 flagged, 0.01 "
            f"rejected), `diffqc calibrate {tiny_model} --alpha-review 0.025 --alpha-reject 0.005`"
            ) in line, line
    # the advice taken, or stricter levels: the line says they keep a part within the share, and
    # neither divides them again nor advises looser ones (as train and calibrate say nothing there)
    model = shutil.copytree(tiny_model, tmp_path / "model")
    for review, bound in (("0.025", "5 %"), ("0.01", "2 %")):
        assert main(["calibrate", str(model), "--alpha-review", review, "--alpha-reject", "0.005", "-q"]) == 0
        assert main(["test", str(model), str(manifest), "-q"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("parts "))
        assert (f"at α_review = {review} per image, in at most 2 × {review} = {bound} of GOOD parts" in line
                and line.endswith("decide each image at A/2: the levels now keep a GOOD part within the "
                                  "defaults' share flagged (0.05)")), line
    # the same images without part ids: nothing said of parts
    (tmp_path / "images.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    assert main(["test", str(tiny_model), str(tmp_path / "images.csv"), "-q"]) == 0
    assert not [x for x in capsys.readouterr().out.splitlines() if x.startswith("parts ")]
