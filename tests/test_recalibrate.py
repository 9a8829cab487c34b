"""``diffqc calibrate MODEL DATA``: recalibrate a bundle without retraining, atomically, keeping
the previous calibration; a running service picks the new one up without a restart."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)
from __future__ import annotations

import asyncio
import csv
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from diffqc.cli import main
from diffqc.inspection import sha256_file
from tests.conftest import full_disk, png_header_only, run_with_mount, write_clear_dataset
from tests.test_service_common import (  # noqa: F401 (fixtures)
    AUTH,
    detector,
    running_app,
    samples,
    service_model,
)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "model"))


def _n(path: Path) -> dict[str, int]:
    return {t: len(v) for t, v in json.loads(path.read_text())["known"].items()}


def test_calibration_scores_reproduce_the_fitted_calibration(tiny_model: Path, clear_dataset: Path) -> None:
    """Scoring the bundle's own calibration images again gives the stored calibration scores:
    recalibration computes exactly what fit computed."""
    from diffqc.data import good_training, load_dataset
    from diffqc.model import Detector, split_calibration
    from diffqc.recalibrate import calibration_scores

    det = Detector.load(tiny_model, device="cpu")
    good = good_training(load_dataset(clear_dataset))
    _, cal_idx = split_calibration(good, det.config.calibration.fraction, det.config.train.seed)
    known, unknown, _ = calibration_scores(det, [good[i] for i in cal_idx])
    assert det.calibration_ is not None
    for t in det.classes_:
        np.testing.assert_allclose(np.sort(known[t]), det.calibration_.known[t].scores, rtol=1e-5)
        np.testing.assert_allclose(np.sort(unknown[t]), det.calibration_.unknown[t].scores, rtol=1e-5)


def test_cli_calibrate_rewrites_atomically_and_keeps_the_previous(tiny_model: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from diffqc.model import Detector

    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)  # 9 GOOD per type
    shutil.rmtree(data / "dots")  # one type only: the other keeps its calibration
    before = (model / "calibration.json").read_bytes()
    old_n = _n(model / "calibration.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
    # strict JSON (jq, JavaScript): no Infinity token where a level has no conformal threshold
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {line}"))
    assert summary["images"] == {"stripes": 9}
    assert (model / "calibration.prev.json").read_bytes() == before
    assert _n(model / "calibration.json") == {"stripes": 9, "dots": old_n["dots"]}
    new = json.loads((model / "calibration.json").read_text())
    old = json.loads(before)
    assert new["known"]["dots"] == old["known"]["dots"] and new["config"] == old["config"]
    assert new["known"]["stripes"] != old["known"]["stripes"]
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["calibration_sha256"] == sha256_file(model / "calibration.json")
    assert meta["recalibrated"]["previous_sha256"]["calibration.json"] == sha256_file(
        model / "calibration.prev.json")
    assert meta["training_data"]["calibration_images"]["stripes"] == 9
    assert not [p.name for p in model.iterdir() if p.name.endswith(".tmp")]
    det = Detector.load(model, device="cpu")  # still a valid bundle (weights checksum intact)
    assert det.calibration_ is not None and det.calibration_.known["stripes"].scores.size == 9
    # 9 scores reach no conformal p-value <= 0.01; the printed REJECT threshold is where the
    # exponential tail, which decides there, sends a part to REJECT
    cal = det.calibration_
    reject = summary["thresholds"]["stripes"]["reject"]
    assert reject > cal.known["stripes"].scores[-1]
    assert cal.decide(cal.p_value("stripes", reject)) == "REJECT"
    assert cal.decide(cal.p_value("stripes", float(np.nextafter(reject, 0)))) == "REVIEW"


def test_cli_calibrate_names_good_images_that_score_as_no_good_part_does(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Defects among the GOOD images calibrated on raise the thresholds, and defects scoring
    below them pass: `calibrate` names the images that score far above their type's others, as
    `train` does, in a warning and in its summary and the bundle's record; the calibration is
    taken all the same (the user looks and decides)."""
    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=14, n_test=2, seed=5)
    shutil.rmtree(data / "dots")
    slipped = sorted((data / "stripes" / "test" / "blob").glob("*.png"))
    for p in slipped:  # two defects among the GOOD ones
        shutil.move(p, data / "stripes" / "train" / "good" / p.name)
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    named = summary["suspect_images"]
    assert named and {Path(e["path"]).name for e in named} <= {p.name for p in slipped}
    assert "GOOD calibration image(s) of stripes score far above the others of their type" in out.err
    assert "run calibrate again (the summary's suspect_images lists them)" in out.err
    assert summary["images"] == {"stripes": 18}
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["recalibrated"]["suspect_images"] == named


def test_cli_calibrate_writes_nothing_into_a_bundle_retrained_while_it_scored(
        tiny_model: Path, service_model: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`calibrate SERVED new-good/` scores its images for minutes; a nightly `train --out SERVED
    --force` that lands meanwhile got the old model's calibration written over its own (another
    model's score scale: the line's thresholds wrong, and the service took them at once). The
    bundle's model is checked again before anything is written: a retrained one is left as it
    is, and the command says so."""
    import diffqc.recalibrate as recal

    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)
    scored = recal._good_scores

    def retrained_meanwhile(*args: object, **kw: object) -> object:
        out = scored(*args, **kw)  # type: ignore[arg-type]
        for name in ("weights.safetensors", "config.json", "calibration.json", "metadata.json"):
            shutil.copyfile(service_model[0] / name, model / name)  # train DATA --out SERVED
        return out

    monkeypatch.setattr(recal, "_good_scores", retrained_meanwhile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 1
    assert ("was retrained while calibrate scored its images: nothing is written (its calibration is "
            "the new model's); run calibrate again") in capsys.readouterr().err
    for name in ("calibration.json", "metadata.json", "config.json"):
        assert (model / name).read_bytes() == (service_model[0] / name).read_bytes(), name
    assert not (model / "calibration.prev.json").exists()


def test_cli_calibrate_warns_of_too_few_images_for_the_types_it_recalibrates(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """9 GOOD images cannot reach p <= 0.05 conformally: calibrate says so, as train does, for
    the types it recalibrates (not for those whose calibration it keeps)."""
    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)  # 9 GOOD per type
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "too few GOOD calibration" in line]
    assert len(lines) == 1 and "stripes (9)" in lines[0] and "dots" not in lines[0]
    assert lines[0].startswith("diffqc: warning: calibration:")
    # and what to do: more GOOD images to calibrate on (20 reach 0.05 here, 100 reach 0.01)
    assert lines[0].endswith("for the calibration alone to decide, calibrate on more GOOD images of those "
                             "types (diffqc calibrate MODEL DATA: every GOOD image of DATA the model was not "
                             "fit on) (docs/METHOD.md)"), lines[0]


def test_cli_calibrate_refuses_a_calibration_that_could_flag_no_part(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One GOOD image of a type (a `results export` of the one part an operator reviewed): no
    tail can be fitted to one score, so under the new calibration every part of the type would
    PASS, and a running service takes it up at once. It was written with a warning, exit 0;
    now an error names the type, and no file of the bundle is touched."""
    model = _copy(tiny_model, tmp_path)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    data = write_clear_dataset(tmp_path / "fresh", n_train=1, n_test=0, seed=5)
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no part of stripes (1 GOOD image) could be flagged" in err
    assert "the calibration is unchanged" in err and "2 GOOD images or more" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    # two images fit a tail: flagged parts are possible, so it is written (with the warning)
    write_clear_dataset(tmp_path / "fresh", n_train=2, n_test=0, seed=6)
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    assert _n(model / "calibration.json")["stripes"] == 2


def _line_store(tmp_path: Path, images: list[Path], flagged: int) -> str:
    """A result store of parts of type stripes, the first ``flagged`` of them REVIEW and the
    rest PASS, each with its image kept (``serve --keep-images all``)."""
    import time

    from diffqc.service.store import ArtifactStore, ResultRecord, ResultStore

    db = str(tmp_path / "line" / "results.db")
    (tmp_path / "line").mkdir()
    kept = ArtifactStore(tmp_path / "line")
    with ResultStore(db) as store:
        store.insert_many([
            ResultRecord(created_at=time.time(), source="http", decision="REVIEW" if i < flagged else "PASS",
                         part_id=f"p{i}", feature_type="stripes", score=1.0, p_value=0.5,
                         image=kept.save_bytes("images", path.read_bytes(), "png"))
            for i, path in enumerate(images)])
    return db


def test_cli_calibrate_refuses_an_export_of_the_flagged_parts_reviewed_good(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Parts an operator reviewed GOOD are the flagged ones (the review queue): the GOOD parts the
    model scored highest. Calibrated on them the thresholds rose and defects passed (magnetic
    tile: defect recall at REVIEW 0.89 -> 0.64), as the module's docstring had advised. The
    export now says per type how many parts the line inspected and flagged in its period; an
    export whose parts over-represent flagged ones is named by `results export` and refused by
    `calibrate`. The same line with every part reviewed is a sample, and calibrates."""
    from diffqc.service.store import ResultStore

    model = _copy(tiny_model, tmp_path)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    data = write_clear_dataset(tmp_path / "fresh", n_train=20, n_test=20, seed=5)
    images = sorted((data / "stripes").glob("t*/good/*.png"))  # 40 GOOD parts
    db = _line_store(tmp_path, images, flagged=4)
    with ResultStore(db) as store:
        for i in range(1, 5):  # the review queue: the 4 flagged parts, all GOOD
            store.set_review(i, "GOOD", "ann", None)
    export = tmp_path / "export"
    assert main(["results", "export", "--db", db, str(export)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["types"] == {"stripes": {
        "inspected": 40, "flagged": 4, "exported": 4, "exported_flagged": 4}}
    assert "of type stripes, 4 of the 4 parts exported were flagged" in out.err
    assert "against 4 of the 40 parts the line inspected in the same period (10.0 %)" in out.err
    assert main(["calibrate", str(model), str(export), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no sample of the line's GOOD parts" in err and "the calibration is unchanged" in err
    assert main(["calibrate", str(model), str(export / "manifest.csv"), "-q"]) == 1  # the manifest alone
    assert "no sample of the line's GOOD parts" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    with ResultStore(db) as store:  # every part of the period reviewed: a sample of the line's
        for i in range(5, 41):
            store.set_review(i, "GOOD", "ann", None)
    assert main(["results", "export", "--db", db, str(export)]) == 0
    assert "were flagged" not in capsys.readouterr().err
    assert main(["calibrate", str(model), str(export), "-q"]) == 0
    assert _n(model / "calibration.json")["stripes"] == 40


def test_cli_calibrate_names_a_decompression_bomb_among_its_images(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose header claims 1.6 gigapixels: one error naming it (it was a traceback from
    the size check that reads the headers), the calibration unchanged."""
    model = _copy(tiny_model, tmp_path)
    before = (model / "calibration.json").read_bytes()
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)
    (data / "stripes" / "train" / "good" / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    assert main(["calibrate", str(model), str(data), "-q"]) == 1
    err = capsys.readouterr().err
    assert "bomb.png" in err and "decompression bomb" in err and "Traceback" not in err
    assert (model / "calibration.json").read_bytes() == before


def test_cli_calibrate_with_every_image_skipped_changes_nothing(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--skip-corrupt and not one readable GOOD image: it printed a summary with no images,
    exit 0, and rewrote the calibration (its previous copy replaced). Now an error; no file is
    touched."""
    model = _copy(tiny_model, tmp_path)
    (model / "calibration.prev.json").write_bytes((model / "calibration.json").read_bytes())
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    data = tmp_path / "junk" / "stripes" / "train" / "good"
    data.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"not an image")
    assert main(["calibrate", str(model), str(tmp_path / "junk"), "--skip-corrupt", "-q"]) == 1
    assert "none of the 2 GOOD images" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_cli_calibrate_on_a_full_disk_names_the_file_and_changes_nothing(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said a bare "File too large", without which file or whether the bundle was still whole."""
    from diffqc.model import Detector

    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    before = files["calibration.json"]
    with warnings.catch_warnings(), full_disk(512):
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 1
    assert f"cannot write {model / 'metadata.json'}: File too large" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    Detector.load(model, device="cpu")

    # a disk with room for the calibration as it is, not for the new one: the previous one was
    # replaced by the current one before the new one failed, and the calibration before it was
    # lost (`--undo` then refused). The new one is on disk before anything moves, and the
    # previous is kept by a link, which takes no room.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    more = write_clear_dataset(tmp_path / "more", n_train=24, n_test=6, seed=6)
    with warnings.catch_warnings(), full_disk(len(files["calibration.json"]) + 16):
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(more), "-q"]) == 1
    assert f"cannot write {model / 'metadata.json'}: File too large" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0
    assert (model / "calibration.json").read_bytes() == before


def test_calibrate_that_cannot_write_its_record_changes_nothing(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A disk with room for the new calibration but not for metadata.json's record of it: the
    calibration was renamed into place (a running service took it up) and config.json said its
    levels before the record failed, so the bundle decided with a calibration its record did not
    name, and `--undo` refused it ("not the calibration the last calibrate replaced"). Every new
    file is on disk before any is renamed now: nothing changes, and the same command then works."""
    model = _copy(tiny_model, tmp_path)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert len(files["metadata.json"]) > len(files["calibration.json"]) + 64  # the limit falls between
    with warnings.catch_warnings(), full_disk(len(files["metadata.json"]) + 16):
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), "--alpha-review", "0.02", "-q"]) == 1
    assert f"cannot write {model / 'metadata.json'}: File too large" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    assert main(["calibrate", str(model), "--alpha-review", "0.02", "-q"]) == 0
    assert json.loads((model / "config.json").read_text())["calibration"]["alpha_review"] == 0.02
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0
    assert (model / "calibration.json").read_bytes() == files["calibration.json"]


def test_undo_of_a_damaged_record_moves_nothing(tiny_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """metadata.json's record of the last calibrate, damaged (edited by hand, or half copied),
    made `--undo` move whatever it named aside: the weights (``"files": ["weights.safetensors"]``,
    the bundle left without them) or the calibration itself (its checksums missing). Such a
    record is refused, naming it, and nothing moves."""
    model = _copy(tiny_model, tmp_path)
    meta_path = model / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for record in ({"files": ["weights.safetensors"], "previous_sha256": {}},
                   {"files": ["calibration.json"], "previous_sha256": None},
                   {"files": "calibration.json", "previous_sha256": {"calibration.json": "0" * 64}}):
        meta_path.write_text(json.dumps({**meta, "recalibrated": record}))
        files = {p.name: p.read_bytes() for p in model.iterdir()}
        assert main(["calibrate", str(model), "--undo", "-q"]) == 1
        err = capsys.readouterr().err
        assert f"{meta_path}: its record of the last `diffqc calibrate` (recalibrated) is damaged" in err, err
        assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_cli_calibrate_refuses_unknown_types_and_writes_nothing(tiny_model: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=2, n_test=1, seed=6)
    (data / "dots").rename(data / "squares")
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert main(["calibrate", str(model), str(data)]) == 1
    assert "squares" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_cli_calibrate_leaves_out_the_images_the_model_was_fit_on(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Calibrated on its own fit images (scores lower than a new GOOD part's), a model would flag
    too many GOOD parts on the line: the bundle keeps the fit images' fingerprints and calibrate
    leaves those out, found by content (copies under new names included); given nothing else,
    it refuses and writes nothing."""
    from diffqc.data import fingerprint, good_training, load_dataset
    from diffqc.model import Detector, split_calibration

    model = _copy(tiny_model, tmp_path)
    det = Detector.load(model, device="cpu")
    good = good_training(load_dataset(clear_dataset))
    fit_idx, cal_idx = split_calibration(good, det.config.calibration.fraction, det.config.train.seed)
    listed = det.metadata["training_data"]["fit_image_fingerprints"]
    assert sorted({fingerprint(good[i].path) for i in fit_idx}) == listed
    assert not {fingerprint(good[i].path) for i in cal_idx} & set(listed)

    fresh = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)  # 9 new GOOD per type
    shutil.rmtree(fresh / "dots")
    copies = [good[i].path for i in fit_idx if good[i].feature_type == "stripes"][:3]
    for k, src in enumerate(copies):
        shutil.copy(src, fresh / "stripes" / "train" / "good" / f"copied-{k}.png")
    assert main(["calibrate", str(model), str(fresh), "-q"]) == 0
    out = capsys.readouterr()
    assert "diffqc: warning: 3 of the 12 GOOD images in" in out.err
    assert "are images the model was fit on" in out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["images"] == {"stripes": 9} and summary["left_out_fit_images"] == 3

    only_fit = tmp_path / "only-fit" / "stripes" / "train" / "good"
    only_fit.mkdir(parents=True)
    for src in copies:
        shutil.copy(src, only_fit / src.name)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert main(["calibrate", str(model), str(tmp_path / "only-fit"), "-q"]) == 1
    assert "all 3 GOOD images are images the model was fit on" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_cli_calibrate_warns_when_a_bundle_cannot_say_what_it_was_fit_on(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tiny_model, tmp_path)
    meta = json.loads((model / "metadata.json").read_text())
    del meta["training_data"]["fit_image_fingerprints"]  # as bundles written before it was kept
    (model / "metadata.json").write_text(json.dumps(meta))
    data = write_clear_dataset(tmp_path / "fresh", n_train=2, n_test=1, seed=6)
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    out = capsys.readouterr()
    assert "diffqc: warning: this bundle does not list the images it was fit on" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["left_out_fit_images"] == 0


def test_cli_calibrate_names_images_of_another_size_than_the_training(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GOOD images from a changed camera: calibrated on all the same (the flag rate comes back),
    and named once per type, since the model learned the parts at the old scale."""
    from PIL import Image

    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=3, n_test=1, seed=7)
    meta = json.loads((model / "metadata.json").read_text())
    (h0, _), (w0, _) = meta["training_data"]["image_sizes"]["dots"]
    for p in (data / "dots" / "train" / "good").iterdir():
        with Image.open(p) as img:
            img.resize((2 * w0, h0)).save(p)
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "px image of type" in x]
    assert len(warned) == 1 and f"a {2 * w0}x{h0} px image of type 'dots'" in warned[0], warned


def test_cli_calibrate_names_images_of_another_colour_than_the_training(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A camera switched to colour (the model learned grey parts): calibrated all the same, and
    named once per type, as a changed size is."""
    import numpy as np
    from PIL import Image

    model = _copy(tiny_model, tmp_path)
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["training_data"]["image_colours"]["dots"] == "grey"
    data = write_clear_dataset(tmp_path / "fresh", n_train=3, n_test=1, seed=7)
    for p in (data / "dots" / "train" / "good").iterdir():
        with Image.open(p) as img:
            rgb = np.asarray(img.convert("RGB")).astype(np.int16)
        rgb[..., 0] += 25
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(p)
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if "image of type" in x]
    assert len(warned) == 1 and "a colour image of type 'dots', whose training images were grey" in warned[0]


def test_cli_calibrate_decides_at_other_levels_without_images(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The line's manager wants 20 % of GOOD parts reviewed, not 5 %: the levels were set at train
    time only (`--set calibration.alpha_review=...`, a retrain), while the calibration scores they
    apply to are in the bundle. `calibrate MODEL --alpha-review A` decides at the new levels on
    the same scores, as atomically as with images, and a running service takes them up."""
    from diffqc.model import Detector
    from diffqc.recalibrate import CalibrationReloader

    model = _copy(tiny_model, tmp_path)
    served = Detector.load(model, device="cpu")
    reloader = CalibrationReloader(served, model)
    before = (model / "calibration.json").read_bytes()
    old = served.calibration_
    assert old is not None and old.config.alpha_review == 0.05
    assert main(["calibrate", str(model), "--alpha-review", "0.2", "--alpha-reject", "0.02", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["alpha_review"], summary["alpha_reject"], summary["images"]) == (0.2, 0.02, {})
    assert sorted(summary["thresholds"]) == ["dots", "stripes"]
    assert (model / "calibration.prev.json").read_bytes() == before
    new = json.loads((model / "calibration.json").read_text())
    assert new["known"] == json.loads(before)["known"]  # the same GOOD scores
    assert (new["config"]["alpha_review"], new["config"]["alpha_reject"]) == (0.2, 0.02)
    config = json.loads((model / "config.json").read_text())["calibration"]
    assert (config["alpha_review"], config["alpha_reject"]) == (0.2, 0.02)
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["recalibrated"]["data"] is None and meta["recalibrated"]["alpha_review"] == 0.2
    assert meta["calibration_sha256"] == sha256_file(model / "calibration.json")

    assert (reloader.check() or reloader.check()) and served.calibration_ is not None  # seen, then settled
    assert served.config.calibration.alpha_review == 0.2  # what /v1/model says of its config
    cal = served.calibration_
    for t in ("dots", "stripes"):  # a score between the two REVIEW thresholds: PASS before, REVIEW now
        assert cal.thresholds(t)["review"] < old.thresholds(t)["review"]
        between = (cal.thresholds(t)["review"] + old.thresholds(t)["review"]) / 2
        assert old.decide(old.p_value(t, between)) == "PASS"
        assert cal.decide(cal.p_value(t, between)) == "REVIEW"
    assert Detector.load(model, device="cpu").config.calibration.alpha_review == 0.2

    # bad levels, or nothing to do: one error line, and no file of the bundle touched
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    for argv, says in [([], "give DATA"),
                       (["--alpha-reject", "0.3"], "--alpha-reject 0.3 is above the bundle's α_review "
                                                   "0.2: give --alpha-review too, at least 0.3"),
                       (["--alpha-review", "0.01"], "--alpha-review 0.01 is below the bundle's α_reject "
                                                    "0.02: give --alpha-reject too, at most 0.01"),
                       (["--alpha-review", "0.01", "--alpha-reject", "0.02"],
                        "--alpha-reject 0.02 is above --alpha-review 0.01"),
                       ]:
        assert main(["calibrate", str(model), *argv, "-q"]) == 1
        assert says in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    # a level out of (0, 1) is a usage error naming the option; 5 meant as 5 % is told how to write it
    for argv, says in [(["--alpha-review", "1.5"], "--alpha-review: must be a share of GOOD parts "
                                                   "between 0 and 1 (0.05, or 5%), got 1.5"),
                       (["--alpha-review", "5"], "(0.05, or 5%), got 5: for 5 % write 0.05 or 5%"),
                       (["--alpha-reject", "0"], "--alpha-reject: must be a share"),
                       (["--alpha-review", "nan"], "--alpha-review: must be a share"),
                       (["--alpha-review", "five"], "--alpha-review: must be a share")]:
        with pytest.raises(SystemExit) as exit_:
            main(["calibrate", str(model), *argv, "-q"])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    # a percentage is read as one
    assert main(["calibrate", str(model), "--alpha-review", "10%", "--alpha-reject", "2.5 %", "-q"]) == 0
    cal = Detector.load(model, device="cpu").config.calibration
    assert (cal.alpha_review, cal.alpha_reject) == (0.1, 0.025)


def test_cli_calibrate_undo_puts_the_previous_calibration_back_and_again_redoes_it(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A recalibration that flags too many parts (levels set wrong, the wrong folder of GOOD
    parts) was undone by hand: calibration.prev.json copied back left config.json at the new
    levels (the bundle then warns as it loads) and metadata.json naming a calibration that is not
    there. `calibrate --undo` puts the previous one back with its levels, keeps the one it
    replaces as the previous (a second --undo redoes it), and a running service takes it up."""
    from diffqc.model import Detector
    from diffqc.recalibrate import CalibrationReloader

    model = _copy(tiny_model, tmp_path)
    trained = {name: (model / name).read_bytes() for name in ("calibration.json", "config.json")}
    served = Detector.load(model, device="cpu")
    reloader = CalibrationReloader(served, model)
    assert main(["calibrate", str(model), "--alpha-review", "0.2", "--alpha-reject", "0.02", "-q"]) == 0
    at_02 = (model / "calibration.json").read_bytes()
    assert (reloader.check() or reloader.check()) and served.config.calibration.alpha_review == 0.2
    capsys.readouterr()

    assert main(["calibrate", str(model), "--undo"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["undo"], summary["alpha_review"], summary["alpha_reject"]) == (True, 0.05, 0.01)
    assert summary["calibration_images"] == {"dots": 8, "stripes": 8}  # the calibration's, none scored now
    assert summary["kept_previous"] == ["calibration.prev.json"] and summary["files"] == ["calibration.json"]
    assert (model / "calibration.json").read_bytes() == trained["calibration.json"]
    assert (model / "calibration.prev.json").read_bytes() == at_02
    config = json.loads((model / "config.json").read_text())
    assert config == json.loads(trained["config.json"])
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["calibration_sha256"] == sha256_file(model / "calibration.json")
    assert meta["recalibrated"]["undo"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "config.json's calibration.alpha_review 0.2 is not ..."
        assert Detector.load(model, device="cpu").config.calibration.alpha_review == 0.05
    with caplog.at_level("INFO", logger="diffqc.recalibrate"):
        assert (reloader.check() or reloader.check()) and served.config.calibration.alpha_review == 0.05
    assert served.calibration_ is not None and served.calibration_.config.alpha_reject == 0.01
    # the service's log says which calibration it decides with now
    said = f"calibration reloaded from {model / 'calibration.json'}: α_review 0.05, α_reject 0.01"
    assert said in caplog.text, caplog.text

    assert main(["calibrate", str(model), "--undo", "-q"]) == 0  # redo
    assert (model / "calibration.json").read_bytes() == at_02
    assert (model / "calibration.prev.json").read_bytes() == trained["calibration.json"]
    assert json.loads((model / "config.json").read_text())["calibration"]["alpha_review"] == 0.2
    assert (reloader.check() or reloader.check()) and served.config.calibration.alpha_review == 0.2
    capsys.readouterr()

    # refused, one error line and no file touched: with what a calibration is made of; a previous
    # calibration that is not the one replaced (copied in); a bundle never recalibrated
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    for argv, says in [([str(tmp_path)], "give it without DATA"),
                       (["--alpha-review", "0.1"], "give it without --alpha-review"),
                       (["--skip-corrupt"], "give it without --skip-corrupt")]:  # it scores nothing
        assert main(["calibrate", str(model), *argv, "--undo", "-q"]) == 1
        assert says in capsys.readouterr().err
    (model / "calibration.prev.json").write_bytes(at_02)
    assert main(["calibrate", str(model), "--undo", "-q"]) == 1
    assert (f"{model / 'calibration.prev.json'} is not the calibration the last `diffqc calibrate` of "
            "this bundle replaced (another file") in capsys.readouterr().err
    files["calibration.prev.json"] = at_02
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    # what was done, as `export --int8` names it (it said "on None" of new levels)
    from diffqc.recalibrate import recalibration_text
    assert recalibration_text(json.loads((model / "metadata.json").read_text())["recalibrated"]) == (
        "a calibration put back by --undo")
    assert recalibration_text({"data": None, "alpha_review": 0.2, "alpha_reject": 0.02}) == (
        "at α_review 0.2, α_reject 0.02")
    fresh = Path(shutil.copytree(tiny_model, tmp_path / "fresh"))
    assert main(["calibrate", str(fresh), "--undo", "-q"]) == 1
    assert (f"{fresh} has no previous calibration to put back: it was not recalibrated since it was "
            "trained") in capsys.readouterr().err


def test_cli_calibrate_run_again_on_the_same_images_keeps_the_one_before(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`calibrate MODEL DATA` run again as it was (its output scrolled away, a script's retry)
    gave the same calibration and kept it as the previous too: the one before, the train-time
    calibration, was gone, and `--undo` put back what was already there. A calibration the bundle
    already holds is written nowhere and said so; the previous stays the one before."""
    model = _copy(tiny_model, tmp_path)
    trained = (model / "calibration.json").read_bytes()
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
        first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        files = {p.name: p.read_bytes() for p in model.iterdir()}
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
    out, err = capsys.readouterr()
    again = json.loads(out.strip().splitlines()[-1])
    assert again["unchanged"] is True and again["files"] == [] and again["kept_previous"] == []
    assert (again["thresholds"], again["sha256"]) == (first["thresholds"], first["sha256"])
    assert (f"{model}: the calibration is the bundle's as it stands (the same scores, the same levels): "
            "nothing is written, and calibration.prev.json keeps the one before it") in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files  # metadata.json's record too
    assert (model / "calibration.prev.json").read_bytes() == trained
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0
    assert (model / "calibration.json").read_bytes() == trained

    # a bundle whose previous is the calibration as it stands (run twice by a diffqc before this
    # one): nothing to put back, said so, not a swap of two equal files
    meta = json.loads((model / "metadata.json").read_text())
    (model / "calibration.prev.json").write_bytes(trained)
    meta["recalibrated"]["previous_sha256"]["calibration.json"] = sha256_file(model / "calibration.json")
    (model / "metadata.json").write_text(json.dumps(meta))
    assert main(["calibrate", str(model), "--undo", "-q"]) == 1
    assert (f"{model / 'calibration.prev.json'} holds the calibration as it stands: nothing to put back "
            "(the one before it is not kept)") in capsys.readouterr().err


def test_cli_calibrate_refuses_levels_under_which_a_type_could_flag_no_part(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a fitted tail (`calibration.tail=none`) 8 GOOD scores reach p = 1/9 at best: at
    α_review = 0.1 no part of either type could be flagged, so those levels are refused; levels
    that leave a type as unflaggable as it was (its scores kept) are not this change's doing."""
    model = _copy(tiny_model, tmp_path)
    cal = json.loads((model / "calibration.json").read_text())
    cal["config"]["tail"] = "none"  # as trained with --set calibration.tail=none
    (model / "calibration.json").write_text(json.dumps(cal))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bundle flags nothing at 0.05: warned at every load
        assert main(["calibrate", str(model), "--alpha-reject", "0.001", "-q"]) == 0
        assert main(["calibrate", str(model), "--alpha-review", "0.2", "-q"]) == 0
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert main(["calibrate", str(model), "--alpha-review", "0.1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "at α_review=0.1, no part of dots (8 GOOD images), stripes (8 GOOD images) could be flagged" in err
    assert "the calibration is unchanged" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_a_retrained_bundle_is_not_half_loaded_by_a_running_service(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    """`diffqc train --out` into the folder a service serves writes new weights and a new
    calibration: the calibration is the new model's, and the service, still holding the old
    weights, must not take it (its p-values would be another model's); it says to restart.
    A recalibration (same weights) is still taken."""
    from diffqc.data import load_dataset
    from diffqc.model import Detector
    from diffqc.recalibrate import CalibrationReloader
    from tests.conftest import tiny_config

    model = _copy(tiny_model, tmp_path)
    served = Detector.load(model, device="cpu")
    reloader = CalibrationReloader(served, model)
    before = served.calibration_
    data = write_clear_dataset(tmp_path / "fresh", n_train=4, n_test=1, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
    assert (reloader.check() or reloader.check()) and served.calibration_ is not before  # seen, then settled
    assert reloader.last_error is None
    recalibrated = served.calibration_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Detector(tiny_config(**{"train.seed": 3}), device="cpu").fit(
            load_dataset(clear_dataset), progress=False).save(model)
    assert not (reloader.check() or reloader.check())
    assert served.calibration_ is recalibrated
    assert reloader.last_error is not None and "retrained" in reloader.last_error
    assert "restart" in reloader.last_error


def test_another_models_calibration_copied_before_its_weights_is_not_taken(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    """A retrained bundle copied over the served one (`cp -r`, `scp`) comes file by file in the
    copier's order: its calibration.json before its weights and metadata.json was taken by the
    running service at once (the weights looked unchanged), so the old model decided with
    another model's thresholds until the new one was served. A new calibration is taken once
    the bundle's files have stopped changing, and only when they are still the served model's."""
    from diffqc.data import load_dataset
    from diffqc.model import Detector
    from diffqc.recalibrate import CalibrationReloader
    from tests.conftest import tiny_config

    model = _copy(tiny_model, tmp_path)
    served = Detector.load(model, device="cpu")
    before = served.calibration_
    new = tmp_path / "retrained"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Detector(tiny_config(**{"train.seed": 3}), device="cpu").fit(
            load_dataset(clear_dataset), progress=False).save(new)
    reloader = CalibrationReloader(served, model, follows_retrain=True)  # as serve runs it
    names = ["calibration.json", "weights.safetensors", "config.json", "metadata.json"]
    for name in names:  # the copier's order, a look between files
        shutil.copy2(new / name, model / name)
        assert not reloader.check() and served.calibration_ is before, name
    assert not reloader.check() and served.calibration_ is before  # settled: the model watch's
    assert reloader.last_error is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_service_picks_up_a_new_calibration_without_a_restart(
        service_model, samples, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Serve a copy of the bundle, run ``diffqc calibrate`` on it, and the same part is decided
    with the new calibration by the running service (it stats the file once a second)."""
    from diffqc.calibration import Calibrator
    from diffqc.data import GOOD, load_dataset
    from diffqc.model import Detector

    model = _copy(service_model[0], tmp_path)
    det = Detector.load(model, device="cpu")
    good = [s for s in load_dataset(service_model[1]) if s.label == GOOD and s.split == "test"]
    manifest = tmp_path / "good.csv"
    with manifest.open("w", newline="") as fh:  # a few GOOD parts per type
        w = csv.writer(fh)
        w.writerow(["path", "feature_type", "label"])
        for t in det.classes_:
            for s in [s for s in good if s.feature_type == t][:6]:
                w.writerow([s.path, t, "good"])
    data, ftype = samples.one("REVIEW")
    async with running_app(det, tmp_path, model_path=model, calibration_poll_s=0.1) as (client, _state):
        first = (await client.post("/v1/inspect", params={"feature_type": ftype}, content=data,
                                   headers=AUTH)).json()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert await asyncio.to_thread(main, ["calibrate", str(model), str(manifest), "-q"]) == 0
        new = Calibrator.from_dict(json.loads((model / "calibration.json").read_text()))
        for _ in range(300):
            info = (await client.get("/v1/model", headers=AUTH)).json()
            if info["calibration"]["types"][ftype]["n"] == new.known[ftype].scores.size:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the service did not pick up the new calibration")
        second = (await client.post("/v1/inspect", params={"feature_type": ftype}, content=data,
                                    headers=AUTH)).json()
        line = (await client.get("/v1/line", headers=AUTH)).json()
        metrics = (await client.get("/metrics", headers=AUTH)).text
    assert second["score"] == pytest.approx(first["score"], rel=1e-5)
    assert second["p_value"] == pytest.approx(new.p_value(ftype, second["score"]))
    assert second["p_value"] != first["p_value"]
    assert line["calibration"]["reloads"] == 1 and "diffqc_calibration_reloads_total 1" in metrics


def test_calibrate_a_bundle_on_a_read_only_volume_names_the_bundle_file(tiny_model: Path,
                                                                        tmp_path: Path) -> None:
    """A bundle on a read-only volume (a container's ``:ro`` mount): `calibrate` said
    "<bundle>/.calibration.prev.json.<pid>.tmp: Read-only file system", a file the user never
    made (removing the temporary file it could not write failed too, and that error won). It
    names the bundle's file now, changes nothing, and the bundle is read as before."""
    volume, mounted = _copy(tiny_model, tmp_path), tmp_path / "mounted"
    mounted.mkdir()
    before = {p.name: p.read_bytes() for p in volume.iterdir()}
    cli = [sys.executable, "-m", "diffqc.cli"]
    proc = run_with_mount(volume, mounted, [*cli, "calibrate", str(mounted), "--alpha-review", "0.02"],
                          read_only=True)
    assert proc.returncode == 1
    assert f"diffqc: error: cannot write {mounted}/calibration" in proc.stderr
    assert "Read-only file system" in proc.stderr and ".tmp" not in proc.stderr
    assert {p.name: p.read_bytes() for p in volume.iterdir()} == before
    image = next((write_clear_dataset(tmp_path / "data") / "dots" / "test" / "good").iterdir())
    proc = run_with_mount(volume, mounted, [*cli, "inspect", str(mounted), str(image),
                                            "--feature-type", "dots"], read_only=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["decision"] in ("PASS", "REVIEW", "REJECT")


def test_calibrate_at_levels_of_images_says_what_they_mean_for_a_models_parts(
        clear_dataset: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`calibrate --alpha-review` is where a QC engineer sets the line's levels, read as the
    share of parts sent to review. A model trained on parts seen as crops of k types keeps k
    (metadata.json), and calibrate says what its levels per image mean for such a part, with the
    levels that keep the defaults' shares per part; nothing at those, nor for parts of one type."""
    rows = ["path,feature_type,label,part_id"]
    for t in ("dots", "stripes"):
        rows += [f"{p},{t},good,{p.stem.replace(t, 'part')}"
                 for p in sorted((clear_dataset / t / "train" / "good").iterdir())]
    (tmp_path / "parts.csv").write_text("\n".join(rows) + "\n")
    model = tmp_path / "m"
    fit = ["-q", "--method", "padim", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35",
           "--set", "calibration.alpha_review=0.02", "--set", "calibration.alpha_reject=0.005"]
    assert main(["train", str(tmp_path / "parts.csv"), "--out", str(model), *fit]) == 0
    assert json.loads((model / "metadata.json").read_text())["training_data"]["types_per_part"] == 2
    capsys.readouterr()
    assert main(["calibrate", str(model), "--alpha-review", "0.04", "-q"]) == 0
    err = capsys.readouterr().err
    assert (f"diffqc: warning: {model} was trained on parts seen as images of 2 types, and a part is "
            "judged by the worst of its images: A GOOD part of 2 types is flagged when any of its images "
            "is: at α_review = 0.04 per image, in at most 2 × 0.04 = 8 % of GOOD parts") in err, err
    assert f"`diffqc calibrate {model} --alpha-review 0.025 --alpha-reject 0.005`" in err
    assert main(["calibrate", str(model), "--alpha-review", "0.025", "-q"]) == 0
    assert "was trained on parts" not in capsys.readouterr().err
    other = _copy(tiny_model, tmp_path)  # trained on images without part ids
    assert main(["calibrate", str(other), "--alpha-review", "0.04", "-q"]) == 0
    assert "was trained on parts" not in capsys.readouterr().err


def test_cli_calibrate_of_one_type_keeps_the_others_unknown_type_calibration(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`calibrate MODEL DATA` with GOOD images of stripes only, one dots image among them by
    mistake: the unknown-type calibration is keyed by the type the router picks, so dots' (its 8
    scores) was replaced by that one image's score; every part taken for dots then got p >= 0.5,
    `inspect` without a type passed all of dots' defects, and the summary said nothing of dots.
    A type DATA does not recalibrate keeps its unknown-type calibration (an old bundle's pooled
    one too); the scores routed to it are left out, and said."""
    from diffqc.model import Detector

    model = _copy(tiny_model, tmp_path)
    old = Detector.load(model, device="cpu").calibration_
    assert old is not None
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)  # 9 GOOD per type
    shutil.move(data / "dots" / "train" / "good" / "dots_train_good_000.png",
                data / "stripes" / "train" / "good" / "zz_dots_by_mistake.png")
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    err = capsys.readouterr().err
    assert ("diffqc: warning: calibration: 1 GOOD image of DATA was taken for dots by the type router "
            "(unknown-type mode): dots is not recalibrated, so its score is left out") in err, err
    new = Detector.load(model, device="cpu").calibration_
    assert new is not None
    np.testing.assert_array_equal(new.unknown["dots"].scores, old.unknown["dots"].scores)
    assert new.thresholds("dots", type_known=False) == old.thresholds("dots", type_known=False)
    assert new.unknown["stripes"].scores.size == 9  # stripes' own, from its new images

    # a bundle written before the unknown-type scores were keyed by the routed type: they are used
    # pooled, and dots decided with the new stripes scores alone once stripes was recalibrated
    legacy = _copy(tiny_model, tmp_path / "legacy")
    cal = json.loads((legacy / "calibration.json").read_text())
    del cal["unknown_key"]
    (legacy / "calibration.json").write_text(json.dumps(cal))
    pooled = Detector.load(legacy, device="cpu").calibration_
    assert pooled is not None and pooled.unknown == {}
    (data / "stripes" / "train" / "good" / "zz_dots_by_mistake.png").unlink()
    assert main(["calibrate", str(legacy), str(data), "-q"]) == 0
    after = Detector.load(legacy, device="cpu").calibration_
    assert after is not None
    assert after.thresholds("dots", type_known=False) == pooled.thresholds("dots", type_known=False)


def test_cli_calibrate_refuses_an_unknown_type_calibration_that_could_flag_no_part(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stripes/good of one stripes image and three dots images (a folder mixed up): the known-type
    calibration of stripes has four scores, but the type router takes one part only for stripes,
    and from its one score no tail can be fitted: without a type given, every part taken for
    stripes would PASS, and a running service takes it up at once. It was written, exit 0; now
    it is refused as a one-image type is, and no file of the bundle is touched."""
    model = _copy(tiny_model, tmp_path)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    data = write_clear_dataset(tmp_path / "fresh", n_train=3, n_test=0, seed=5)
    good = data / "stripes" / "train" / "good"
    for p in sorted(good.iterdir())[1:]:
        p.unlink()
    for p in sorted((data / "dots" / "train" / "good").iterdir()):
        shutil.move(p, good / p.name)
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 1
    err = capsys.readouterr().err
    assert ("in unknown-type mode (no type given), no part the type router takes for stripes (1 GOOD "
            "image taken for it) could be flagged") in err, err
    assert "the calibration is unchanged" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_a_running_service_takes_a_new_calibration_while_a_log_in_the_bundle_folder_grows(
        tiny_model: Path, tmp_path: Path) -> None:
    """`diffqc serve MODEL 2>>MODEL/serve.log`: the service waits until the bundle's files stay as
    they are for one look before it takes a new calibration, and it counted every file of the
    folder: with the log appended between looks, `diffqc calibrate` was never taken, and nothing
    said so (the model watch, likewise, took the log for a changed bundle). Only the bundle's own
    files count."""
    from diffqc.model import Detector
    from diffqc.recalibrate import BundleChange, CalibrationReloader

    model = _copy(tiny_model, tmp_path)
    served = Detector.load(model, device="cpu")
    reloader = CalibrationReloader(served, model, follows_retrain=True)  # as serve runs it
    bundle = BundleChange(model)
    log = model / "serve.log"

    def logged() -> None:
        with log.open("a") as fh:
            fh.write("a line the service logged\n")

    logged()
    assert not bundle.settled()
    assert not bundle.settled()  # the log stopped growing: no bundle file changed
    assert main(["calibrate", str(model), "--alpha-review", "0.1", "-q"]) == 0
    taken = False
    for _ in range(3):  # a line logged between every two looks
        logged()
        taken = taken or reloader.check()
    assert taken and served.config.calibration.alpha_review == 0.1 and reloader.last_error is None


def test_cli_calibrate_leaves_out_copies_and_refuses_scores_all_alike(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two byte-identical copies of one image were calibrated on as two parts (`train` leaves
    copies out): their two equal scores gave an exponential tail of zero width, the thresholds
    57.32289123535346 (REVIEW) and 57.32289123535507 (REJECT), and every new GOOD part of the type
    scoring above them REJECT (p = 0). Copies are left out as `train` leaves them, and said; a
    type whose calibration scores are all one (the same picture saved twice) is refused as a
    one-image type is."""
    from PIL import Image, PngImagePlugin

    model = _copy(tiny_model, tmp_path)
    data = write_clear_dataset(tmp_path / "fresh", n_train=3, n_test=0, seed=5)
    shutil.rmtree(data / "dots")
    good = data / "stripes" / "train" / "good"
    first = sorted(good.iterdir())[0]
    shutil.copy(first, good / "copy.png")
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    out = capsys.readouterr()
    assert ("diffqc: warning: 1 image(s) are byte-identical copies of another image of the same type and "
            "label, left out") in out.err, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["images"] == {"stripes": 3}

    files = {p.name: p.read_bytes() for p in model.iterdir()}
    for p in sorted(good.iterdir()):
        if p != first:
            p.unlink()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "saved again")  # other bytes, the same picture
    Image.open(first).save(good / "again.png", pnginfo=info)
    assert main(["calibrate", str(model), str(data), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no part of stripes (2 GOOD images, all of one score) could be flagged" in err, err
    assert "the calibration is unchanged" in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files


def test_cli_calibrate_undo_puts_back_the_images_test_leaves_out(
        tiny_model: Path, tmp_path: Path) -> None:
    """`diffqc test` leaves out the images the bundle was calibrated on (their flag rate is the
    target by construction). After `calibrate --undo` it still left out the undone calibration's
    images, as calibration images, though the calibration in force never saw them: the images
    listed go with their calibration, put back by --undo and again by the redo."""
    from diffqc.data import GOOD, load_dataset
    from diffqc.holdout import unseen

    def listed() -> list[str]:
        return json.loads((model / "metadata.json").read_text())["training_data"][
            "calibration_image_fingerprints"]

    model = _copy(tiny_model, tmp_path)
    trained = listed()
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)
    fresh = [s for s in load_dataset(data) if s.label == GOOD]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), str(data), "-q"]) == 0
    recalibrated = listed()
    meta = json.loads((model / "metadata.json").read_text())
    assert unseen(meta, fresh)[1]["calibration"] == len(fresh)
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0
    assert listed() == trained
    meta = json.loads((model / "metadata.json").read_text())
    assert unseen(meta, fresh)[1]["calibration"] == 0  # the calibration put back never saw them
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0  # redo
    assert listed() == recalibrated


def test_cli_calibrate_of_a_cross_calibrated_bundle_advises_as_its_new_calibration_is(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle calibrated cross-conformally (`calibration.scheme=cross`, the demo's) recalibrated
    on new GOOD images: the deployed model scored them, yet the warning said fold models had, and
    advised to train on more GOOD images. The new calibration records that it is a split one
    (config.json and calibration.json say calibration.scheme=split, and the bundle loads without
    a word), so the warning and advice fit it; --undo puts the cross one back."""
    from diffqc.model import Detector

    model = _copy(tiny_model, tmp_path)
    for name, section in (("config.json", "calibration"), ("calibration.json", "config")):
        doc = json.loads((model / name).read_text())
        doc[section]["scheme"] = "cross"  # as trained with --set calibration.scheme=cross
        (model / name).write_text(json.dumps(doc))
    data = write_clear_dataset(tmp_path / "fresh", n_train=6, n_test=3, seed=5)  # 9 GOOD per type
    shutil.rmtree(data / "dots")
    assert main(["calibrate", str(model), str(data), "-q"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "too few GOOD calibration" in line]
    assert len(lines) == 1 and "stripes (9)" in lines[0] and "dots" not in lines[0]
    assert "fold models" not in lines[0] and "bounded by 1/(n+1)" in lines[0]
    assert lines[0].endswith("calibrate on more GOOD images of those types (diffqc calibrate MODEL DATA: "
                             "every GOOD image of DATA the model was not fit on) (docs/METHOD.md)"), lines[0]
    for name, section in (("config.json", "calibration"), ("calibration.json", "config")):
        assert json.loads((model / name).read_text())[section]["scheme"] == "split", name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # config.json and calibration.json agree
        assert Detector.load(model, device="cpu").config.calibration.scheme == "split"
    assert main(["calibrate", str(model), "--undo", "-q"]) == 0
    for name, section in (("config.json", "calibration"), ("calibration.json", "config")):
        assert json.loads((model / name).read_text())[section]["scheme"] == "cross", name
