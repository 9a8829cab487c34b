from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffqc.config import DetectorConfig
from diffqc.data import DEFECTIVE, DatasetWarning, load_dataset, read_image
from diffqc.errors import BundleError, ConfigError, DatasetError, OutputError, UnknownFeatureTypeError
from diffqc.inspection import BUNDLE_FILES
from diffqc.metrics import image_auroc
from diffqc.model import Detector, split_calibration
from diffqc.output import PARTIAL_PREFIX

from .conftest import CLEAR_TYPES, full_disk, run_with_mount, tiny_config


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
    # a Pillow image as Image.open gives it is read as its file is (it was an AttributeError,
    # 'PngImageFile' object has no attribute 'shape')
    from PIL import Image

    with Image.open(sample.path) as opened:
        (pil,) = det.inspect([opened], [sample.feature_type], all_types=False, maps=False)
    assert pil.score == fast.score


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


@pytest.mark.parametrize(("section", "field", "fitted", "today"), [
    ("diffusion", "prior_context", 0, 64), ("diffusion", "prior_storage", "float16", "int8")])
def test_bundle_from_before_a_field_scores_as_it_was_fitted(clear_dataset: Path, tmp_path: Path,
                                                           section: str, field: str, fitted: object,
                                                           today: object) -> None:
    """A bundle's config.json written before a field existed lacks the key; it loads with the
    value it was fitted with, not today's default, and scores the same:
    ``diffusion.prior_context`` (its weights have no context; today's default turns the context
    on) and ``diffusion.prior_storage`` (its tables float16, or float32 rounded to float16 when
    loaded; read as today's int8, its eigenbases would be rounded again and its calibration no
    longer its scores')."""
    from diffqc.config import DetectorConfig

    assert getattr(getattr(DetectorConfig(), section), field) == today
    det = Detector(tiny_config(**{"train.steps": 0, f"{section}.{field}": fitted}), device="cpu")
    det.fit(load_dataset(clear_dataset), progress=False)
    bundle = det.save(tmp_path / "old")
    config = json.loads((bundle / "config.json").read_text())
    del config[section][field]
    (bundle / "config.json").write_text(json.dumps(config))
    loaded = Detector.load(bundle, device="cpu")
    assert getattr(getattr(loaded.config, section), field) == fitted
    samples = _test_samples(clear_dataset)[:6]
    scores = [r.score for r in det.inspect_samples(samples)[0]]
    assert [r.score for r in loaded.inspect_samples(samples)[0]] == scores


def test_two_models_fitted_within_one_second_have_two_ids(clear_dataset: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's id was its method and the second its fit ended: two fits within one second (a
    script retraining, two stations training at once) got one id, and the service's model watch
    took the second bundle for the first recalibrated and went on serving the first."""
    import datetime as dt
    import types

    import diffqc.model

    class _Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> _Frozen:
            return cls(2026, 12, 8, 4, 0, 0, tzinfo=tz)

    monkeypatch.setattr(diffqc.model, "_dt", types.SimpleNamespace(datetime=_Frozen, UTC=dt.UTC))
    data = load_dataset(clear_dataset)
    first, second = (Detector(tiny_config(**{"train.steps": 0}), device="cpu").fit(data, progress=False)
                     for _ in range(2))
    assert first.metadata["created"] == second.metadata["created"] == "2026-12-08T04:00:00+00:00"
    assert first.version != second.version
    assert re.fullmatch(r"diffusion-20261208T040000Z-[0-9a-f]{6}", first.version), first.version


def test_a_detector_shows_what_it_is_in_a_notebook(tiny_model: Path) -> None:
    """A notebook's cell ending in the detector showed `<diffqc.model.Detector object at 0x7f..>`:
    which model was loaded, of which types, deciding at which levels, could be read only attribute
    by attribute. Its repr names them, as scikit-learn's estimators and PyTorch's modules show
    theirs; one not fitted says so."""
    det = Detector.load(tiny_model, device="cpu")
    assert det.calibration_ is not None
    assert repr(det) == (f"Detector(device='cpu', model_id={det.version!r}, method='diffusion', "
                         f"backbone={det.config.backbone.name!r}, types=['dots', 'stripes'], "
                         "alpha_review=0.05, alpha_reject=0.01)")
    assert repr(Detector(tiny_config(), device="cpu")) == (
        f"Detector(not fitted, device='cpu', method='diffusion', backbone={det.config.backbone.name!r})")


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


@pytest.mark.parametrize("field,value,message", [
    ("input_size", 96, r"config\.json was edited after training: backbone\.input_size is 96; the model was "
                       r"fitted and calibrated with backbone\.input_size 64 \(metadata\.json\)"),
    ("grid", [-1, 8], r"config\.json is damaged \(.*config\.json: backbone\.grid must be two positive "
                      r"integers \(h, w\), got \(-1, 8\)\)"),
    ("grid", [8, 8, 1], r"backbone\.grid must be two positive integers"),
    ("input_size", 10_000, r"config\.json is damaged \(.*config\.json: backbone\.input_size must be at most "
                           r"8192, got 10000: cut larger images into tiles"),
])
def test_a_config_edited_by_hand_is_a_bundle_error(tiny_model: Path, tmp_path: Path, field: str,
                                                   value: object, message: str) -> None:
    """A bundle's config.json edited by hand (the input size, "for the new camera", or the
    recorded feature grid) loaded and then failed on every image with a ValueError (features
    that do not match the model) or an overflow deep in PyTorch; it is refused as it loads."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    config = json.loads((bundle / "config.json").read_text())
    assert config["backbone"]["input_size"] == 64 and config["backbone"]["grid"] == [8, 8]
    config["backbone"][field] = value
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=message):
        Detector.load(bundle)


def test_an_input_size_edited_into_a_bundle_without_the_record_is_refused(tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    """A bundle written before metadata.json recorded its fitted settings: an input size edited
    into its config.json is still told by the feature grid it gives. A record that is not an
    object is named as damaged."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    del meta["fitted_settings"]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    _edit_config(bundle, **{"backbone.input_size": 96})
    with pytest.raises(BundleError, match=r"does not match its config: backbone\.input_size 96 gives a "
                                          r"12 x 12 feature grid, the model was fitted on 8 x 8"):
        Detector.load(bundle)
    meta["fitted_settings"] = ["scoring.topk"]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"metadata\.json is damaged "
                                          r"\(fitted_settings: \['scoring\.topk'\]\)"):
        Detector.load(bundle)


def _edit_config(bundle: Path, **edits: Any) -> None:
    """Set dotted keys of ``bundle``'s config.json, as a hand edit does."""
    config = json.loads((bundle / "config.json").read_text())
    for key, value in edits.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    (bundle / "config.json").write_text(json.dumps(config, indent=2))


def test_a_scoring_setting_edited_after_training_is_refused(tiny_model: Path, clear_dataset: Path,
                                                            tmp_path: Path) -> None:
    """A setting of the scores edited into config.json after training (``scoring.topk`` "to make
    it less sensitive") changed every score's scale while the calibration's thresholds stayed
    those of the old one: drilled on the synthetic set, a dots part with a missing dot went from
    REJECT (389, scored as fitted) to PASS (149), without a word. Refused as the bundle loads,
    naming each setting and the value the model was fitted and calibrated with; the batch size
    and PatchCore's search block (memory only: the same scores) may still be edited."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    _edit_config(bundle, **{"scoring.topk": 0.5, "scoring.smooth_sigma": 0.0})
    with pytest.raises(BundleError, match=(
            r"config\.json was edited after training: scoring\.smooth_sigma is 0\.0, scoring\.topk is 0\.5; "
            r"the model was fitted and calibrated with scoring\.smooth_sigma 2\.0, scoring\.topk 0\.05 "
            r"\(metadata\.json\), and its calibration's thresholds hold for those alone: put them back, "
            r"or train again with the new ones \(diffqc train DATA --out NEW --set "
            r"scoring\.smooth_sigma=0\.0 --set scoring\.topk=0\.5\)")):
        Detector.load(bundle)
    samples = _test_samples(clear_dataset)[:4]
    before = [r.score for r in Detector.load(tiny_model).inspect_samples(samples)[0]]
    _edit_config(bundle, **{"scoring.topk": 0.05, "scoring.smooth_sigma": 2.0, "batch_size": 1,
                            "patchcore.chunk": 4096})
    after = [r.score for r in Detector.load(bundle).inspect_samples(samples)[0]]
    assert after == pytest.approx(before, rel=1e-5)


def test_a_scoring_setting_replaced_in_memory_after_fit_is_refused(tiny_model: Path, clear_dataset: Path,
                                                                   tmp_path: Path) -> None:
    """The Python user's form of the edit above: ``det.config`` replaced after the fit (a notebook's
    ``det.config = with_overrides(det.config, {"scoring.topk": 0.5})``) and the detector saved.
    Its parts were scored on another scale under the old thresholds (drilled on the synthetic set:
    8 of the 10 defects flagged passed, a nozzle-out dots part 1377 -> 424), and ``save`` recorded the
    replaced settings as those fitted with, so the bundle loaded so too. ``inspect`` and ``save``
    refuse, naming the setting; the batch size (memory only) may still be replaced."""
    from diffqc.config import with_overrides

    det = Detector.load(tiny_model)
    image = read_image(next((clear_dataset / "dots" / "test" / "good").iterdir()))
    (before,) = det.inspect([image], ["dots"])
    det.config = with_overrides(det.config, {"scoring.topk": 0.5})
    with pytest.raises(ConfigError, match=r"config was replaced after fit: scoring\.topk is 0\.5"):
        det.inspect([image], ["dots"])
    with pytest.raises(ConfigError, match=(
            r"the detector's config was replaced after fit: scoring\.topk is 0\.5; the model was fitted "
            r"and calibrated with scoring\.topk 0\.05, and its calibration's thresholds hold for those "
            r"alone: put them back, or fit again with the new ones")):
        det.save(tmp_path / "replaced")
    assert not (tmp_path / "replaced").exists()
    det.config = with_overrides(det.config, {"scoring.topk": 0.05, "batch_size": 2})
    assert det.inspect([image], ["dots"])[0].score == before.score
    # a level replaced so changes no decision (the calibration decides, with its own): said, as
    # for config.json, with the command that sets it
    from diffqc.calibration import CalibrationWarning

    det.config = with_overrides(det.config, {"calibration.alpha_review": 0.3})
    with pytest.warns(CalibrationWarning, match=(
            r"the detector's config's calibration\.alpha_review 0\.3 is not its calibration's \(0\.05, "
            r"Detector\.calibration_, which decides\); an edit of the detector's config changes no decision: "
            r"to change it, diffqc calibrate SAVED_BUNDLE --alpha-review 0\.3")):
        assert det.inspect([image], ["dots"])[0].decision == before.decision
    det.config = with_overrides(det.config, {"calibration.alpha_review": 0.05})
    assert Detector.load(det.save(tmp_path / "again")).config.batch_size == 2


def test_a_level_edited_into_config_json_is_said(tiny_model: Path, tmp_path: Path) -> None:
    """``calibration.alpha_review`` edited into config.json (a wish for fewer REVIEWs) changed no
    decision and said nothing: calibration.json decides, and ``/v1/model`` showed the edited level
    it did not decide at. The bundle loads deciding as its calibration does, saying so with the
    command that sets the level; that command then makes both files agree."""
    from diffqc.calibration import CalibrationWarning
    from diffqc.recalibrate import recalibrate

    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    _edit_config(bundle, **{"calibration.alpha_review": 0.2})
    with pytest.warns(CalibrationWarning, match=(
            r"config\.json's calibration\.alpha_review 0\.2 is not its calibration's "
            r"\(0\.05, calibration\.json, which decides\); an edit of config\.json changes no decision: "
            rf"to change it, diffqc calibrate {re.escape(str(bundle))} --alpha-review 0\.2$")):
        loaded = Detector.load(bundle)
    assert loaded.config.calibration.alpha_review == 0.05
    recalibrate(bundle, alpha_review=0.2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert Detector.load(bundle).config.calibration.alpha_review == 0.2
    assert not [w for w in said if "config.json" in str(w.message)]
    # a level and a setting of train's split
    _edit_config(bundle, **{"calibration.fraction": 0.5, "calibration.alpha_reject": 0.02})
    with pytest.warns(CalibrationWarning, match=(
            r"config\.json's calibration\.alpha_reject 0\.02, calibration\.fraction 0\.5 are not its "
            r"calibration's \(0\.01, 0\.35, calibration\.json, which decides\); an edit of config\.json "
            rf"changes no decision: to change them, diffqc calibrate {re.escape(str(bundle))} --alpha-reject "
            r"0\.02 and diffqc train DATA --out NEW --set calibration\.fraction=0\.5$")):
        Detector.load(bundle)


@pytest.mark.parametrize("file,edit,message", [
    ("metadata.json", {"training_data": "x"}, r"metadata\.json is damaged \(training_data: 'x'\)"),
    ("metadata.json", {"training_data": {"image_sizes": {"dots": 5}}},
     r"metadata\.json is damaged \(training_data\.image_sizes\.dots: 5\)"),
    ("metadata.json", {"training_data": {"image_colours": []}},
     r"metadata\.json is damaged \(training_data\.image_colours: \[\]\)"),
    ("metadata.json", {"training_data": {"tiled_above": {"dots": "64"}}},
     r"metadata\.json is damaged \(training_data\.tiled_above\.dots: '64'\)"),
    ("calibration.json", {"known": []}, r"calibration\.json is damaged or unreadable"),
    ("config.json", {"diffusion": {"hidden": 10**30}},
     r"config\.json is damaged \(.*diffusion\.hidden must be an integer of at most 2\^53, got 10+\)"),
    ("config.json", {"diffusion": {"depth": 10**15}},
     r"config\.json is damaged \(.*diffusion\.depth must be in \[1, 64\], got 10+\)"),
])
def test_a_bundle_file_of_the_wrong_shape_is_a_bundle_error(tiny_model: Path, tmp_path: Path, file: str,
                                                           edit: dict[str, Any], message: str) -> None:
    """A bundle's JSON with a value of the wrong kind (a hand edit, two versions merged): the
    bundle loaded, and every inspection ended in a TypeError or AttributeError traceback (found by
    a fuzz of the bundle's three JSON files); it is refused as it loads, naming the file and key."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    data = json.loads((bundle / file).read_text())
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    (bundle / file).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
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


@pytest.mark.parametrize("parts,calibrating", [(2, 1), (3, 2), (7, 2), (12, 2), (13, 3), (100, 20)])
def test_calibration_split_keeps_two_to_calibrate_where_it_can(clear_dataset: Path, parts: int,
                                                               calibrating: int) -> None:
    """A type of 3 to 7 GOOD parts got a single calibration part (0.2 x 7 rounds to 1), from which
    no tail can be fitted: none of its parts could ever be flagged. Now 2 where there are 3."""
    from dataclasses import replace

    one = next(s for s in load_dataset(clear_dataset) if s.split == "train")
    good = [replace(one, part_id=f"p{i}") for i in range(parts)]
    fit, cal = split_calibration(good, 0.2, seed=0)
    assert len(cal) == calibrating and len(fit) == parts - calibrating


def test_read_features_is_extract_one_image_at_a_time(clear_dataset: Path, tmp_path: Path) -> None:
    """fit's reader decodes one image at a time; its features are Detector.extract's on the
    images read all at once, and an unreadable file is named (with every other) or skipped."""
    from dataclasses import replace

    from diffqc.data import load_dataset, read_images
    from diffqc.errors import ImageReadError, UnreadableImagesError

    from .conftest import tiny_config

    samples = load_dataset(clear_dataset)[:7]
    det = Detector(tiny_config(**{"batch_size": 3}), device="cpu")
    raw, layouts, kept, errors = det.read_features(samples)
    images, _, _ = read_images(samples)
    assert layouts is None and kept == samples and not errors
    assert torch.equal(raw, det.extract(images, raw=True))
    broken = [replace(samples[0], path=tmp_path / f"broken{i}.png") for i in range(2)]
    for b in broken:
        b.path.write_bytes(b"\x89PNG garbage")
    mixed = [samples[0], broken[0], samples[1], broken[1], samples[2]]
    with pytest.raises(UnreadableImagesError) as caught:
        det.read_features(mixed)
    assert [e.source for e in caught.value.errors] == [str(b.path) for b in broken]
    with pytest.raises(ImageReadError, match="broken0"):
        det.read_features(mixed[:2])
    with pytest.warns(UserWarning, match="skipped"):
        raw2, _, kept2, errors2 = det.read_features(mixed, skip_corrupt=True)
    assert kept2 == samples[:3] and len(errors2) == 2 and torch.equal(raw2, raw[:3])
    # `fit` in a notebook raised the file's error alone; the command line's says --skip-corrupt
    with pytest.raises(ImageReadError) as caught_fit:
        det.fit(mixed, progress=False)
    assert "fit(..., skip_corrupt=True) leaves unreadable images out" in caught_fit.value.__notes__


# ---------------------------------------------------------------------- saving never loses files
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_refuses_a_foreign_folder_and_force_deletes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    out = tmp_path / "photos"
    (out / "sub").mkdir(parents=True)
    (out / "holiday.jpg").write_bytes(b"precious")
    (out / "sub" / "notes.txt").write_text("keep me")
    before = _tree(out)
    # the way to write beside them named as Python spells it too (it named the CLI's --force alone)
    with pytest.raises(OutputError, match=r"not empty and is not a diffqc model bundle.*force=True from Py"):
        det.save(out)
    assert _tree(out) == before
    det.save(out, force=True)
    after = _tree(out)
    assert {k: after[k] for k in before} == before  # nothing there before is touched
    assert set(after) - set(before) == {"config.json", "weights.safetensors", "calibration.json",
                                        "metadata.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no temporary folder left
    assert Detector.load(out, device="cpu").classes_ == det.classes_


def test_force_never_replaces_a_foreign_file_of_a_bundle_files_name(tiny_model: Path,
                                                                     tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"camera": "line 3"}')  # the user's own config
    before = _tree(out)
    with pytest.raises(OutputError, match=r"already holds config\.json.*never replaces"):
        det.save(out, force=True)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"]
    # a name a bundle keeps, not writes: the first save wrote beside it, and a later one (the
    # folder then a bundle) moved it into previous/ as the calibration its last calibrate
    # replaced, where the save after that replaced it
    (out / "config.json").unlink()
    (out / "calibration.prev.json").write_text('{"the user": "notes"}')
    before = _tree(out)
    with pytest.raises(OutputError, match=r"already holds calibration\.prev\.json.*never replaces"):
        det.save(out, force=True)
    assert _tree(out) == before


def test_save_over_a_bundle_replaces_only_its_files(tiny_model: Path, tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    out = det.save(tmp_path / "m")
    (out / "README.txt").write_text("the operator's note")
    (out / "weights.safetensors").write_bytes(b"old")  # an earlier bundle's own file
    det.save(out)  # a bundle: no --force needed
    assert (out / "README.txt").read_text() == "the operator's note"
    assert (out / "weights.safetensors").read_bytes() == (tiny_model / "weights.safetensors").read_bytes()
    Detector.load(out, device="cpu")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_saved_bundle_is_readable_as_the_umask_says(tiny_model: Path, tmp_path: Path, umask: int) -> None:
    """A new bundle's folder was 0700 and its weights 0600 whatever the umask (a temporary
    folder renamed into place; safetensors writes 0600): `sudo diffqc train ... --out
    /opt/diffqc/models/edge` gave a bundle that deploy/diffqc.service (DynamicUser) or the
    container's user could not read. The folder and every file now have the modes the umask
    gives any other file, a new folder or one saved into alike."""
    import os
    import stat

    det = Detector.load(tiny_model, device="cpu")
    old = os.umask(umask)
    try:
        new = det.save(tmp_path / "new")
        (tmp_path / "existing").mkdir()
        into = det.save(tmp_path / "existing")
    finally:
        os.umask(old)
    for folder in (new, into):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
            name: 0o666 & ~umask for name in ("weights.safetensors", "config.json", "calibration.json",
                                             "metadata.json")}


def test_full_disk_on_save_is_an_output_error_and_keeps_the_previous_bundle(
        tiny_model: Path, tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    out = det.save(tmp_path / "m")
    (out / "extra.txt").write_text("mine")
    before = _tree(out)
    with full_disk(64 * 1024):
        with pytest.raises(OutputError, match=str(out)):
            det.save(out)
        with pytest.raises(OutputError, match="new"):
            det.save(tmp_path / "new")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial bundle, no temp folder
    Detector.load(out, device="cpu")


def test_save_into_a_bundle_folder_that_is_a_mount_point(tiny_model: Path, tmp_path: Path) -> None:
    """A volume mounted at the bundle's folder (``-v ./models/edge:/models/edge``, a Kubernetes
    volume): retraining into it failed with "Invalid cross-device link" (the new files were
    written beside the folder, in its parent, and a rename cannot leave a mount). They are
    written inside it now; the previous bundle's other files stay. On a read-only volume the
    error says so, not the name of a temporary folder."""
    volume, mounted = tmp_path / "volume", tmp_path / "models" / "edge"
    shutil.copytree(tiny_model, volume)
    (volume / "README.txt").write_text("the operator's note")
    (volume / "weights.safetensors").write_bytes(b"an earlier bundle's")
    mounted.mkdir(parents=True)
    save = f"from diffqc.model import Detector; Detector.load({str(tiny_model)!r}).save({str(mounted)!r})"
    proc = run_with_mount(volume, mounted, [sys.executable, "-c", save])
    assert proc.returncode == 0, proc.stderr
    assert (volume / "weights.safetensors").read_bytes() == (tiny_model / "weights.safetensors").read_bytes()
    # the bundle it replaced was not whole (its weights not the ones its metadata names): not kept
    assert sorted(p.name for p in volume.iterdir()) == sorted(["README.txt", *BUNDLE_FILES])
    assert "holds no whole bundle" in proc.stderr
    assert not any(mounted.iterdir())  # the mount is gone with the command
    Detector.load(volume, device="cpu")
    proc = run_with_mount(volume, mounted, [sys.executable, "-c", save])  # a whole one now: kept
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in volume.iterdir()) == sorted(["README.txt", "previous", *BUNDLE_FILES])
    Detector.load(volume / "previous", device="cpu")
    before = _tree(volume)
    proc = run_with_mount(volume, mounted, [sys.executable, "-c", save], read_only=True)
    assert proc.returncode == 1
    assert (f"OutputError: cannot write the model bundle to {mounted}: {mounted} is not writable "
            "(Read-only file system)") in proc.stderr
    assert ".partial" not in proc.stderr and _tree(volume) == before


def test_train_into_a_folder_it_cannot_write_is_refused_before_it_trains(clear_dataset: Path,
                                                                         tmp_path: Path) -> None:
    """A read-only volume as `train --out` (a container's `:ro` mount) was refused only once the
    model was trained, its time lost: it is refused before any image is read."""
    volume, mounted = tmp_path / "volume", tmp_path / "models"
    volume.mkdir()
    mounted.mkdir()
    train = [sys.executable, "-m", "diffqc.cli", "train", str(clear_dataset), "--out", str(mounted / "m"),
             "--method", "padim", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"]
    proc = run_with_mount(volume, mounted, train, read_only=True)
    assert proc.returncode == 1
    assert (f"cannot write the model bundle to {mounted / 'm'}: {mounted} is not writable (Read-only file "
            "system)") in proc.stderr, proc.stderr
    assert "reading + extracting features" not in proc.stderr and not any(volume.iterdir())
    proc = run_with_mount(volume, mounted, train)  # writable: it reads the images, then writes
    assert proc.returncode == 0 and "reading + extracting features" in proc.stderr, proc.stderr



def test_a_save_killed_in_an_empty_folder_leaves_it_usable(tiny_model: Path, tmp_path: Path) -> None:
    """A bundle is written inside an existing folder first (a mount point's moves cannot leave
    it): a run killed there leaves its hidden partial folder, and the folder, empty to `ls`, was
    then refused as "not empty and not a diffqc model bundle". It still counts as empty; the
    leftover is not deleted (another run may be writing it)."""
    import os
    import time
    import warnings

    out = tmp_path / "edge"
    leftover = out / f"{PARTIAL_PREFIX}abc123"
    leftover.mkdir(parents=True)
    (leftover / "weights.safetensors").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leftover of a minute ago may be a save running now
        Detector.load(tiny_model, device="cpu").save(out)
    Detector.load(out, device="cpu")
    assert (leftover / "weights.safetensors").read_bytes() == b"half"
    # an hour old, and one beside a new bundle's folder: named, so that its room is not lost
    # unseen (retrains on an edge device cut by power), and still not deleted
    beside = tmp_path / ".edge2.partial-xyz"
    beside.mkdir()
    hour_ago = time.time() - 3600
    for folder in (leftover, beside):
        os.utime(folder, (hour_ago, hour_ago))
    with pytest.warns(UserWarning, match=r"left by a save that was interrupted") as seen:
        Detector.load(tiny_model, device="cpu").save(out)
    assert str(leftover) in str(seen[0].message) and "delete it" in str(seen[0].message)
    with pytest.warns(UserWarning, match=str(beside)):
        Detector.load(tiny_model, device="cpu").save(tmp_path / "edge2")
    assert (leftover / "weights.safetensors").read_bytes() == b"half" and beside.is_dir()


def test_unwritable_destination_is_an_output_error(tiny_model: Path, tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a-file"):
        det.save(blocker / "model")  # its parent is a file: the OS refuses (even for root)
    with pytest.raises(OutputError, match="not a folder"):
        det.save(blocker)
    assert blocker.read_text() == "x"


def test_bundle_version_checked_on_load(tiny_model: Path, tmp_path: Path) -> None:
    from diffqc import __version__

    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["diffqc_version"] = "0.0.1"  # an older diffqc, same format: fine
    (bundle / "metadata.json").write_text(json.dumps(meta))
    Detector.load(bundle, device="cpu")
    meta["diffqc_version"] = "7.0.0"
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"7\.0\.0.*{__version__}"):
        Detector.load(bundle, device="cpu")
    meta["diffqc_version"], meta["format"] = __version__, meta["format"] + 1
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="is newer than format"):
        Detector.load(bundle, device="cpu")


def test_damaged_calibration_names_the_file(tiny_model: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    (bundle / "calibration.json").write_text('{"config": {}, "known": {"dots": []}}')
    with pytest.raises(BundleError, match=r"calibration\.json"):
        Detector.load(bundle, device="cpu")


def test_fit_names_16_bit_images_that_hold_12_bit_data(clear_dataset: Path, tmp_path: Path) -> None:
    """A Mono12 camera's images saved as 16-bit files (values 0..4095) read nearly black (1/16 of
    white): magnetic tile stored so lost 7.9 points of image AUROC. fit says so, with the gain that
    reads 4095 as white; at that gain the warning is not given, nor for 8-bit images."""
    from dataclasses import replace

    from PIL import Image

    from diffqc.data import good_training

    samples = [s for s in good_training(load_dataset(clear_dataset)) if s.feature_type == "dots"]
    twelve = []
    for s in samples:
        grey = np.asarray(Image.open(s.path).convert("L"), dtype=np.uint32)
        path = tmp_path / s.path.name
        Image.fromarray((grey * 4095 // 255).astype(np.uint16)).save(path)
        twelve.append(replace(s, path=path))
    with pytest.warns(UserWarning, match=r"16-bit files whose values stay within 0..4095 \(12-bit data\).*"
                                         r"--set backbone.input_gain=16.0037 reads 4095 as white "
                                         r"\(in Python: with_overrides\(config, "
                                         r"\{'backbone.input_gain': 16.0037\}\), diffqc.config\)"):
        Detector(tiny_config()).fit(twelve, progress=False)
    import warnings

    for config, data in ((tiny_config(**{"backbone.input_gain": 16.0037}), twelve), (tiny_config(), samples)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Detector(config).fit(data, progress=False)
        assert not [w for w in caught if "16-bit" in str(w.message)]


def test_fit_on_parts_of_several_types_says_what_the_levels_mean_for_a_part(clear_dataset: Path) -> None:
    """A notebook fitting a new line's GOOD parts, each named by its crops of every type (their
    part_id), was told nothing of what the levels per image mean for a part judged by the worst
    of its crops (8 types at the defaults: 33 % of GOOD parts flagged on the synthetic set);
    `train` said it. ``fit`` says it now, before it reads an image, with the levels that keep the
    defaults' shares per part in both forms; nothing at those levels, nor for parts of one type."""
    from dataclasses import replace

    from diffqc.calibration import CalibrationWarning
    from diffqc.data import good_training

    good = good_training(load_dataset(clear_dataset))
    parts = [replace(s, part_id=s.path.stem.replace(s.feature_type, "part")) for s in good]
    assert len({s.part_id for s in parts}) < len(parts)  # the same part's crops of both types
    with pytest.warns(CalibrationWarning) as caught:
        Detector(tiny_config("padim")).fit(parts, progress=False)
    said = [str(w.message) for w in caught if "names parts" in str(w.message)]
    assert said == [
        "the training data names parts seen as images of 2 types (its part_id), and a part is judged by "
        "the worst of its images: A GOOD part of 2 types is flagged when any of its images is: at "
        "α_review = 0.05 per image, in at most 2 × 0.05 = 10 % of GOOD parts where each type's calibration "
        "holds its level (Bonferroni, whatever the images' dependence); for at most a share A, decide each "
        "image at A/2: for the defaults' shares (0.05 flagged, 0.01 rejected), train with `--set "
        "calibration.alpha_review=0.025 --set calibration.alpha_reject=0.005` (in Python: "
        "with_overrides(config, {'calibration.alpha_review': 0.025, 'calibration.alpha_reject': 0.005}), "
        "diffqc.config; once trained, `diffqc calibrate MODEL --alpha-review 0.025 --alpha-reject "
        "0.005`)"], said
    halved = tiny_config("padim", **{"calibration.alpha_review": 0.025, "calibration.alpha_reject": 0.005})
    single = [replace(s, part_id=s.path.stem) for s in good]  # each part of one type
    for config, data in ((halved, parts), (tiny_config("padim"), single)):
        with warnings.catch_warnings(record=True) as caught_now:
            warnings.simplefilter("always")
            Detector(config).fit(data, progress=False)
        assert not [w for w in caught_now if "names parts" in str(w.message)]


def test_fit_names_a_gain_that_reads_its_images_white(clear_dataset: Path) -> None:
    """The gain for a 12-bit camera's 16-bit files (backbone.input_gain=16.0037, as train and the
    README name it) set for 8-bit images, as bright as white at a sixteenth: most of their pixels
    saturated and the model saw nothing of what was clipped, without a word (the drill's tiny
    model of the clear set: held-out AUROC 0.750, its bright defects all passed, against 1.000 at
    gain 1). fit says so, naming the types; a gain that leaves them below white is not named."""
    import warnings

    from diffqc.data import good_training

    samples = [s for s in good_training(load_dataset(clear_dataset)) if s.feature_type == "dots"]
    with pytest.warns(UserWarning, match=r"backbone.input_gain 16.0037 reads .* as white.* dots "
                                         r"\(mean brightness up to 0\.[0-9]+"):
        Detector(tiny_config(**{"backbone.input_gain": 16.0037})).fit(samples, progress=False)
    for gain in (1.0, 1.1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Detector(tiny_config(**{"backbone.input_gain": gain})).fit(samples, progress=False)
        assert not [w for w in caught if "as white" in str(w.message)]


def test_fit_leaves_out_copies_of_its_images(clear_dataset: Path, tmp_path: Path) -> None:
    """A GOOD image copied under another name could land on the calibration side of its
    original: scored as a fit image, it set the calibration's cut too low. fit leaves it out and
    says so; the model counts the images once."""
    import shutil
    from dataclasses import replace

    from diffqc.data import DatasetWarning, good_training

    samples = [s for s in good_training(load_dataset(clear_dataset)) if s.feature_type == "dots"]
    copies = [replace(s, path=tmp_path / f"copy-{s.path.name}") for s in samples[:3]]
    for s, copy in zip(samples, copies, strict=False):
        shutil.copyfile(s.path, copy.path)
    with pytest.warns(DatasetWarning, match=r"3 image\(s\) are byte-identical copies .*copy-"):
        det = Detector(tiny_config()).fit(samples + copies, progress=False)
    training = det.metadata["training_data"]
    assert training["fit_images"]["dots"] + training["calibration_images"]["dots"] == len(samples)


def test_fit_names_calibration_images_that_score_as_no_good_part_does(clear_dataset: Path) -> None:
    """Defects among the GOOD training images (a pass bin's escapes copied into train/good): those
    drawn for calibration raise the type's thresholds, and defects scoring below them pass (5
    defects per type among 108 synthetic GOOD ones: recall at REVIEW 0.850 -> 0.625). fit names
    the calibration images that score far above their type's others, in a warning and the
    bundle's metadata; a set of GOOD images alone, none."""
    import warnings
    from dataclasses import replace

    from diffqc.data import GOOD, DatasetWarning

    dots = [s for s in load_dataset(clear_dataset) if s.feature_type == "dots"]
    good = [replace(s, split="train") for s in dots if s.label == GOOD]
    slipped = [replace(s, label=GOOD, defect=None, mask_path=None, split="train")
               for s in dots if s.label == DEFECTIVE]
    with pytest.warns(DatasetWarning, match=r"GOOD training image\(s\) of dots score far above the "
                                            r"others.*blob_00\d\.png \d+\.\dx the median of the calibration"):
        det = Detector(tiny_config(), device="cpu").fit(good + slipped[:3], progress=False)
    named = det.metadata["training_data"]["suspect_images"]
    assert named and {e["path"] for e in named} <= {str(s.path) for s in slipped[:3]}
    assert all(e["feature_type"] == "dots" and e["times_median"] > 2 for e in named)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean = Detector(tiny_config(), device="cpu").fit(good, progress=False)
    assert clean.metadata["training_data"]["suspect_images"] == []
    assert not [w for w in caught if "score far above" in str(w.message)]


def test_fit_names_fit_images_that_score_far_above_the_others_in_sample(tmp_path: Path) -> None:
    """A defect drawn among the fit images is learnt as GOOD (defects like it pass): the fit
    images are judged too, each scored by the model fit on them against the others. A synthetic
    type at the default settings, 4 of its defects among 46 GOOD images: the 2 drawn for fitting
    stand 6.7 and 7.0 robust deviations out (the next, a GOOD one, 2.4) and are named."""
    from dataclasses import replace

    from diffqc.data import GOOD
    from diffqc.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "syn", n_parts=400, seed=3, progress=False)
    edge1 = [s for s in load_dataset(tmp_path / "syn") if s.feature_type == "edge1"]
    good = [replace(s, split="train") for s in edge1 if s.label == GOOD]
    slipped = [replace(s, label=GOOD, defect=None, mask_path=None, split="train")
               for s in edge1 if s.label == DEFECTIVE][:4]
    with pytest.warns(DatasetWarning, match=r"x the median of the fit images \(in sample\)"):
        det = Detector(DetectorConfig(), device="cpu").fit(good + slipped, progress=False)
    named = [e for e in det.metadata["training_data"]["suspect_images"]
             if e["among"] == "fit images (in sample)"]
    assert len(named) == 2 and {e["path"] for e in named} <= {str(s.path) for s in slipped}


def test_type_with_one_good_part_fails_before_training(clear_dataset: Path) -> None:
    samples = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    samples = [s for s in samples if s.feature_type == "stripes"] + \
        [s for s in samples if s.feature_type == "dots"][:1]
    det = Detector(device="cpu")
    with pytest.raises(DatasetError, match=r"'dots' \(1\)"):
        det.fit(samples, progress=False)
    assert det.extractor_ is None  # failed before any feature was extracted


def test_cross_conformal_calibrates_every_good_image_out_of_fold(clear_dataset: Path) -> None:
    from diffqc.data import read_images
    from diffqc.model import cross_folds

    from .conftest import tiny_config

    good = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    folds = cross_folds(good, 3, seed=0)
    assert sorted(i for f in folds for i in f) == list(range(len(good)))  # each image in one fold
    cfg = tiny_config("padim", **{"calibration.scheme": "cross", "calibration.folds": 3})
    det = Detector(cfg, device="cpu")
    images, good, _ = read_images(good)
    raw = det.extract(images, raw=True)
    with pytest.warns(UserWarning):  # 24 per type is still short of α_reject
        det.fit_features(raw, good)
    cal = det.calibration_
    assert cal is not None
    for t in CLEAR_TYPES:
        assert cal.known[t].scores.size == sum(s.feature_type == t for s in good)  # all of them
    # the final model is fitted on every image: its standardisation is that of all of them
    flat = raw.transpose(0, 1).reshape(raw.shape[1], -1).double()
    assert torch.allclose(det.extractor.feat_mean, flat.mean(1).float(), atol=1e-5)
    # out of fold: the calibration scores are those of models that never saw the image, larger
    # than the final model's own (in-sample) scores of the same images
    in_sample = [r.score for r in det.inspect_features(raw, [s.feature_type for s in good])]
    for t in CLEAR_TYPES:
        own = np.mean([x for x, s in zip(in_sample, good, strict=True) if s.feature_type == t])
        assert np.mean(cal.known[t].scores) > own, t


def test_fit_refuses_a_type_name_the_service_could_not_take(clear_dataset: Path) -> None:
    """A type named by a 250-character folder, or holding a control character (a manifest's
    cell), was trained; `watch` stored its parts, but `POST /v1/inspect` and `GET /v1/results`
    refuse such a name (422 bad_feature_type): a type the service can never be asked about. A
    folder named in Latin-1 (``\xd6se``, from a Windows share) trained too, and `watch
    --feature-type` of it ended in a UnicodeEncodeError traceback."""
    from dataclasses import replace

    from diffqc.data import MAX_NAME_LEN, load_dataset

    samples = load_dataset(clear_dataset)
    for bad, why in [("y" * (MAX_NAME_LEN + 1), "is 201 characters: at most 200"),
                     ("dots\x01", "holds a control character"),
                     ("\udcd6se", "holds a control character or bytes that are not UTF-8")]:  # Latin-1 "Öse"
        renamed = [replace(s, feature_type=bad) if s.feature_type == "dots" else s for s in samples]
        with pytest.raises(DatasetError, match=f"feature type .* {why}"):
            Detector(tiny_config(), device="cpu").fit(renamed, progress=False)


def test_fit_takes_a_dataset_path_or_samples(clear_dataset: Path) -> None:
    """`Detector(cfg).fit("data/")` was "'str' object has no attribute 'label'" (a Path: "not
    iterable"); a path is now read with load_dataset, and anything else that is not Samples is
    named."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector(tiny_config(), device="cpu").fit(clear_dataset / "dots", progress=False)
    assert det.classes_ == ["dots"]
    with pytest.raises(TypeError, match=r"fit takes Samples .* got str items"):
        Detector(tiny_config(), device="cpu").fit([str(clear_dataset / "dots")], progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        Detector(tiny_config(), device="cpu").fit(str(clear_dataset / "nope"), progress=False)


def test_the_python_api_and_evaluate_refuse_the_plain_network_untrained(clear_dataset: Path) -> None:
    """`diffusion.prior=none` without training steps scores with a random network (AUROC 0.48
    on the synthetic set, a session-70 review's measure): `train` refuses it, but
    `Detector(config).fit(...)`, `fit_features` and `evaluate` fitted it and scored with it. Each
    refuses it before any image is read."""
    import torch

    from diffqc.data import load_dataset
    from diffqc.errors import ConfigError
    from diffqc.evaluate import evaluate

    plain = tiny_config(**{"diffusion.prior": "none", "train.steps": 0})
    samples = load_dataset(clear_dataset)
    with pytest.raises(ConfigError, match=r"diffusion\.prior=none .* give --steps N"):
        Detector(plain, device="cpu").fit(samples, progress=False)
    with pytest.raises(ConfigError, match=r"diffusion\.prior=none"):
        Detector(plain, device="cpu").fit_features(torch.zeros(0, 1, 1, 1), [], progress=False)
    with pytest.raises(ConfigError, match=r"diffusion\.prior=none"):
        evaluate(samples, folds=2, methods=[], settings={"plain": plain}, progress=False)


def test_a_config_that_is_not_a_detector_config_is_named_at_once() -> None:
    """`Detector({"method": "padim"})`, as a dict of settings is given elsewhere, was taken and
    failed at fit, after the images were read ("'dict' object has no attribute
    'calibration'"); it is named when the detector is made, with the call that reads a dict."""
    with pytest.raises(TypeError, match=r"got a dict: pass DetectorConfig.from_dict\(config\)"):
        Detector({"method": "padim"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a str: pass DetectorConfig\(...\)"):
        Detector("padim")  # type: ignore[arg-type]
    assert DetectorConfig.from_dict({"method": "padim"}).method == "padim"


def test_a_fit_that_cannot_fit_in_memory_is_refused_before_any_image_is_read() -> None:
    """`--set backbone.input_size=2000` held 21.6 GB after 5 minutes on 40 images, still fitting
    (8 types, a 24 GB machine); 3000 is now refused in seconds, naming what to change. The bound
    is measured against this machine's real available memory."""
    import warnings

    from diffqc.config import DetectorConfig
    from diffqc.model import available_memory, check_fit_memory, fit_bytes

    free = available_memory("cpu")
    if free is None:
        pytest.skip("no /proc/meminfo: the check cannot tell the available memory here")
    cfg, channels, types = DetectorConfig(), 128, 8
    per_location = sum(fit_bytes(cfg, (1, 1), channels, types, 24))
    assert fit_bytes(cfg, (32, 32), channels, types, 24)[1] == 9 * 1024 * (2 * 128 + 128 * 56 + 56 + 1) * 4

    def side(share: float) -> int:  # a square grid whose bound is `share` of the free memory
        return int((share * free / per_location) ** 0.5)

    with pytest.raises(ConfigError, match=r"this fit needs at least .* GB of memory: .* for the "
                                          r"features of 24 images at \d+ x \d+ locations, .* for the "
                                          r"per-location Gaussians of 8 types, and .* GB is available; "
                                          r"lower backbone.input_size \(now 256"):
        check_fit_memory(cfg, (side(4.0), side(4.0)), channels, types, 24, "cpu")
    with pytest.warns(UserWarning, match="more than half of the .* available: it may run out of memory"):
        check_fit_memory(cfg, (side(0.75), side(0.75)), channels, types, 24, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_fit_memory(cfg, (32, 32), channels, types, 24, "cpu")


def test_a_fit_is_bounded_by_the_copies_of_its_features_it_holds(clear_dataset: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory check counted a fit's features once, though a fit holds them at least three
    times at once (as read, standardised and its own: benchmarks/fit_memory.py measured 4.2-5.6
    times them at the peak), so a fit that needed more than the machine had was refused only past
    three times that: it was killed for memory instead, without a word. Here the machine has room
    for the features once, with the tables, but not three times over."""
    import diffqc.model
    from diffqc.model import FIT_FEATURE_COPIES, fit_bytes

    config = tiny_config(**{"train.steps": 0})
    det = Detector(config, device="cpu")
    good = [s for s in load_dataset(clear_dataset) if s.label == 0 and s.split == "train"]
    fe = det.extractor
    types = len({s.feature_type for s in good})
    held, model = fit_bytes(config, fe.grid, fe.channels, types, len(good), FIT_FEATURE_COPIES)
    room = held + model - 1  # the features once and the tables fit, three times over do not
    monkeypatch.setattr(diffqc.model, "available_memory", lambda device: room)
    with pytest.raises(ConfigError, match=rf"features of {len(good)} images at .* locations \(held about 3 "
                                          r"times at once: as read, standardised and the fit's own\)"):
        det.fit(good, progress=False)


def test_a_tiled_fit_is_bounded_by_its_tiles_not_its_images(tmp_path: Path) -> None:
    """``train --tile`` holds a feature map per tile (a 4000 x 3000 px frame: 336 at 256 px), but
    the memory check counted one per image, and even advised tiling. The tiles are now counted
    from the files' headers, as many as the fit then holds, and the advice is about tiles."""
    import numpy as np
    from PIL import Image

    from diffqc.config import DetectorConfig, with_overrides
    from diffqc.data import GOOD, Sample
    from diffqc.errors import ConfigError
    from diffqc.model import Detector, available_memory, check_fit_memory, fit_bytes, views_to_fit

    paths = []
    for i, (h, w) in enumerate([(64, 64), (130, 250), (300, 90)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((h, w, 3), 100 + i, np.uint8)).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    tiled = tiny_config(**{"backbone.input_size": 32, "tiling.mode": "auto"})
    untiled = with_overrides(tiled, {"tiling.mode": "off"})
    assert views_to_fit(tiled, paths) > 3 and views_to_fit(untiled, paths) == 3
    assert views_to_fit(tiled, [*paths, tmp_path / "broken.png"]) == views_to_fit(tiled, paths) + 1
    det = Detector(tiled, device="cpu")
    raw, layouts, _, _ = det.read_features([Sample(p, "a", GOOD) for p in paths])
    assert raw.shape[0] == views_to_fit(tiled, paths) and layouts is not None
    Image.new("RGB", (4000, 3000)).save(tmp_path / "frame.png")
    default_tiled = with_overrides(DetectorConfig(), {"tiling.mode": "auto"})
    assert views_to_fit(default_tiled, [tmp_path / "frame.png"]) == 336

    free = available_memory("cpu")
    if free is None:
        pytest.skip("no /proc/meminfo: the check cannot tell the available memory here")
    per_input = fit_bytes(tiled, (8, 8), 128, 1, 1)[0]
    too_many = 2 * free // per_input
    expected = rf"features of 40 images \({too_many} tiles\) .*\(tiling\.scale, now 1"
    with pytest.raises(ConfigError, match=expected):
        check_fit_memory(tiled, (8, 8), 128, 1, 40, "cpu", views=too_many)
    check_fit_memory(tiled, (8, 8), 128, 1, 40, "cpu")  # what it counted before: 40 maps


def test_a_refit_interrupted_leaves_the_detector_as_it_was(tiny_model: Path, clear_dataset: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A refit in a notebook stopped with Ctrl-C (or failing: out of memory) after its scorer
    was fitted left the new types and standardisation over the old scorer and calibration:
    GOOD parts of one type went from PASS to REJECT without a word, and `save` wrote a bundle
    `load` refused. An interrupted fit changes nothing: the same scores after it."""
    det = Detector.load(tiny_model)
    samples = _test_samples(clear_dataset)[:6]
    before = [r.score for r in det.inspect_samples(samples, maps=False)[0]]
    classes, calibration, scorer, mean = det.classes_, det.calibration_, det.scorer_, \
        det.extractor.feat_mean.clone()
    one_type = [s for s in load_dataset(clear_dataset)
                if s.split == "train" and s.feature_type == CLEAR_TYPES[0]]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # Ctrl-C while the calibration images are scored

    monkeypatch.setattr(Detector, "_calibration_scores", interrupted)
    monkeypatch.setattr(Detector, "_cross_fold_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        det.fit(one_type, progress=False)
    assert det.classes_ == classes and det.calibration_ is calibration and det.scorer_ is scorer
    assert torch.equal(det.extractor.feat_mean, mean)
    assert [r.score for r in det.inspect_samples(samples, maps=False)[0]] == before


def test_the_lower_level_api_says_what_it_was_given_wrong(tiny_model: Path) -> None:
    """``inspect_features`` of no rows raised "cannot reshape a tensor of 0 elements" (``inspect``
    of none returns none), one of rows and types that differ in number an IndexError;
    ``extract_pixels`` of float64 pixels (numpy's default) a dtype error deep in the network, and
    of uint8 pixels (0 to 255) features far off without a word."""
    det = Detector.load(tiny_model)
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    raw = det.extract([image], raw=True)
    assert det.inspect_features(raw[:0], []) == []
    with pytest.raises(ValueError, match="1 feature maps for 2 feature types: give one of each per image"):
        det.inspect_features(raw, [CLEAR_TYPES[0]] * 2)
    with pytest.raises(ValueError, match="1 feature maps for 1 feature types, 0 map sizes"):
        det.inspect_features(raw, [CLEAR_TYPES[0]], [])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    torch.testing.assert_close(det.extract_pixels(pixels.double()), det.extract_pixels(pixels))
    with pytest.raises(TypeError, match=r"pixels are torch\.uint8: give floating point in \[0, 1\]"):
        det.extract_pixels((pixels * 255).to(torch.uint8))
