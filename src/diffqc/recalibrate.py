"""Recalibrate a model bundle without retraining (``diffqc calibrate MODEL [DATA]``).

The scorer stays as trained; only the conformal calibration (``calibration.json``, and
``calibration.int8.json`` when the bundle has an INT8 export) is recomputed from the GOOD
images in DATA, which must be parts the model never trained on, taken as the line makes them
(a fresh folder of GOOD parts): byte-identical copies of an image (as ``train`` leaves them out)
and those it was fit on, found by content (the bundle's ``metadata.json`` keeps their
fingerprints), are left out with a warning, and a
``diffqc results export`` whose parts were chosen by their decision (flagged parts an operator
reviewed GOOD: the GOOD parts the model scored highest) is refused. Types absent from DATA keep
their current calibration, their unknown-type one included (the scores of DATA's images that the
type router takes for them are left out, and said). The deployed model scores DATA: the new
calibration is a split one (``calibration.scheme=split``), whatever the scheme it was trained with.

The levels it decides at (``--alpha-review``, ``--alpha-reject``: the target shares of GOOD parts
flagged) change without images: the calibration scores stay, the thresholds move, and
``config.json`` says the new levels.

The rewrite is atomic: everything is scored first, then each new file is written to a temporary
sibling and fsynced, the current one kept as ``calibration.prev.json``
(``calibration.int8.prev.json``; a hard link, which a full disk does not refuse), and the new
one renamed over it (``os.replace``): a failed write changes nothing, the previous included.
``metadata.json`` records the SHA-256 of the calibration files and what the recalibration used.
``--undo`` puts the previous calibration back the same way (a calibration on the wrong images,
levels that flag too many parts), the one it replaces kept as the previous: a second ``--undo``
redoes it.

A running service notices the new file (:class:`CalibrationReloader` compares the file's stat
signature once a second) and decides the next parts with it, without a restart, once the bundle's
own files stay as they are for one look (other files in its folder, a log, do not count).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffqc.arguments import QUIET, given_options, path_name, path_value, share
from diffqc.backends.tensorrt import ENGINE_FILE
from diffqc.bundle import check_not_retrained, named_model_id, previous_name, read_bundle
from diffqc.calibration import (
    RAISES_THRESHOLDS,
    SELECTED_BELOW,
    CalibrationWarning,
    Calibrator,
    TypeCalibration,
    flagged_excess_p,
    part_levels_warning,
    suspect_images,
    suspects_note,
)
from diffqc.config import CalibrationConfig
from diffqc.errors import BundleError, ConfigError, DatasetError, UnknownFeatureTypeError, did_you_mean
from diffqc.inspection import BUNDLE_FILES, other_images
from diffqc.output import check_writable, json_line, keep_file, path_text, read_json, replacing
from diffqc.runtime import EXPORT_FILE, ONNX_FILES

log = logging.getLogger("diffqc.recalibrate")

CALIBRATION_FILE = "calibration.json"
INT8_CALIBRATION_FILE = "calibration.int8.json"
CALIBRATION_FILES = frozenset({CALIBRATION_FILE, INT8_CALIBRATION_FILE})
INT8_MODEL_FILE = "model.int8.onnx"
# metadata.json's `recalibrated` record: the calibration images' fingerprints of the calibration the
# last `diffqc calibrate` replaced (`diffqc test` leaves out those of the calibration in force)
PREVIOUS_PRINTS = "previous_calibration_image_fingerprints"
# `diffqc results export` writes, beside its manifest.csv, per type: how many parts the line
# inspected in the export's period and how many were flagged, and how many of each it exported.
EXPORT_SUMMARY_FILE = "export.json"


def _content(path: Path) -> bytes | None:
    """A file's bytes, None when there is none."""
    return path.read_bytes() if path.is_file() else None


def _changes(path: Path, files: Mapping[str, bytes | None]) -> tuple[dict[str, bytes | None], dict[str, str]]:
    """The calibration files of bundle ``path`` that ``files`` changes, by name (None: none, the
    file moved aside; a file whose content is already ``files``' is left as it is: a calibration
    run again on the same images keeps the one before it as the previous), and the SHA-256 of the
    current content of each of them that has one (kept as its :func:`previous_name`)."""
    changed: dict[str, bytes | None] = {}
    previous: dict[str, str] = {}
    for name, data in files.items():  # each file read once: compared, and its checksum kept
        if (now := _content(path / name)) != data:
            changed[name] = data
            if now is not None:
                previous[name] = hashlib.sha256(now).hexdigest()
    return changed, previous


def _install(path: Path, changed: Mapping[str, bytes | None], previous: Collection[str],
             record: Mapping[str, bytes]) -> None:
    """Write the ``changed`` calibration files of bundle ``path`` (:func:`_changes`), each one's
    current content (those named in ``previous``) kept first as its :func:`previous_name`, and the
    ``record`` files that say so, renamed after them in their order (``config.json``'s levels,
    then ``metadata.json``), each atomically. Every new file is on disk before any previous one is
    kept or any file renamed (a full disk changes nothing, the previous included), and a previous
    one is kept by a hard link, which takes no room."""
    with contextlib.ExitStack() as renames:  # each new file renamed into place as it closes: the last first
        for name, data in [*reversed(list(record.items())), *changed.items()]:
            if data is not None:
                renames.enter_context(replacing(path / name, data))
        for name in previous:
            if changed[name] is None:
                os.replace(path / name, path / previous_name(name))
            else:
                keep_file(path / name, path / previous_name(name))


def calibration_scores(detector: Any, samples: Sequence[Any], *, skip_corrupt: bool = False,
                       progress: bool = False
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[Any]]:
    """Scores of GOOD ``samples`` as the detector's calibration needs them: per type, the score
    under the part's own type (known-type table) and, keyed by the type unknown-type mode picks
    (the type router, :mod:`diffqc.routing`), the score under that type (unknown-type table), as
    :meth:`diffqc.model.Detector.fit` computes them; and the samples scored (the readable ones),
    in the order of each type's known-type scores."""
    results, kept = detector.inspect_samples(samples, type_known=True, all_types=True, maps=False,
                                             skip_corrupt=skip_corrupt, progress=progress)
    known: dict[str, list[float]] = {}
    unknown: dict[str, list[float]] = {}
    for res, sample in zip(results, kept, strict=True):
        known.setdefault(sample.feature_type, []).append(float(res.score))
        if res.predicted_type is not None:  # None: a bundle without a type router
            unknown.setdefault(res.predicted_type, []).append(float(res.type_scores[res.predicted_type]))
    return known, unknown, list(kept)


def _merged(old: Calibrator, known: dict[str, list[float]], unknown: dict[str, list[float]],
            config: CalibrationConfig) -> Calibrator:
    """A calibrator under ``config`` with the new scores for the types given (``known``: DATA's)
    and the old ones for the rest. The unknown-type scores are keyed by the type the router takes
    an image for: those of DATA's types replace theirs, and those taken for a type DATA does not
    hold are left out (:func:`routed_elsewhere_note`); every other type keeps the unknown-type
    calibration it decides with (an old bundle's pooled one included)."""
    renewed = {t: v for t, v in unknown.items() if t in known}
    keep_known = {t: c.scores.tolist() for t, c in old.known.items() if t not in known}
    keep_unknown = {t: c.scores.tolist() for t in old.known
                    if t not in renewed and (c := old.unknown_calibration(t)) is not None}
    return Calibrator(config).fit({**keep_known, **known}, {**keep_unknown, **renewed}, warn=False)


def routed_elsewhere_note(known: Collection[str], unknown: Mapping[str, Sequence[float]]) -> str | None:
    """What says that some of DATA's GOOD images were taken by the type router for types DATA
    does not hold (their scores left out by :func:`_merged`), None when none were."""
    elsewhere = {t: len(v) for t, v in sorted(unknown.items()) if t not in known and v}
    if not elsewhere:
        return None
    n, one = sum(elsewhere.values()), len(elsewhere) == 1
    named = ", ".join(elsewhere) if one else ", ".join(f"{t} ({k})" for t, k in elsewhere.items())
    was, scores = (("image of DATA was", "its score is") if n == 1
                   else ("images of DATA were", "their scores are"))
    return (f"calibration: {n} GOOD {was} taken for {named} by the type router (unknown-type "
            f"mode): {', '.join(elsewhere)} {'is' if one else 'are'} not recalibrated, so {scores} left "
            f"out, and {'it keeps its' if one else 'they keep their'} unknown-type calibration (an "
            f"image of {'that type' if one else 'those types'} among the GOOD images of "
            f"{', '.join(sorted(known))}? look at them)")


def _refuse_unflaggable(old: Calibrator, new: Calibrator, known: Collection[str], routed: Collection[str],
                        source: str) -> None:
    """A recalibration under which a type could flag no part (one GOOD image, or scores all alike:
    no tail can be fitted; ``calibration.tail=none`` with fewer images than 1/α_review needs) is
    refused, in known-type mode or in unknown-type mode (the parts the type router takes for it):
    a running service would take it up at once and pass every part of that type. ``known``: the
    types calibrated on new images; ``routed``: those whose unknown-type calibration is new; a
    type that keeps its scores and flagged no part before is not this recalibration's doing
    (``train`` and every load warn of it)."""
    was_dead = set(old.unflaggable())
    dead = [t for t in new.unflaggable() if t in known or t not in was_dead]
    was_dead_routed = set(old.unflaggable(type_known=False))
    dead_routed = [t for t in new.unflaggable(type_known=False)
                   if t not in dead and (t in routed or t not in was_dead_routed)]
    if not dead and not dead_routed:
        return
    alpha = new.config.alpha_review
    exponential = new.config.tail == "exponential"
    why = " (the exponential tail is fitted to two different scores at least)" if exponential else ""
    give = f"{new.images_to_flag()} GOOD images or more{why}"
    said = []
    if dead:
        said.append(f"no part of {_sizes({t: new.known[t] for t in dead}, '')}")
    if dead_routed:
        cals = {t: c for t in dead_routed if (c := new.unknown_calibration(t)) is not None}
        said.append("in unknown-type mode (no type given), no part the type router takes for "
                    f"{_sizes(cals, ' taken for it')}")
    raise DatasetError(f"{source}, {' and '.join(said)} could be flagged (no score "
                       f"reaches p <= α_review={alpha} with calibration.tail={new.config.tail}); "
                       f"the calibration is unchanged: give each such type {give}")


def _sizes(cals: Mapping[str, TypeCalibration], taken: str) -> str:
    """``stripes (1 GOOD image), dots (2 GOOD images, all of one score)``: each type's calibration
    images (``taken``: what they are, said after them), and whether they all score alike."""
    said = []
    for t, c in cals.items():
        n = c.scores.size
        alike = ", all of one score" if n > 1 and c.scores[0] == c.scores[-1] else ""
        said.append(f"{t} ({n} GOOD image{'s' if n != 1 else ''}{taken}{alike})")
    return ", ".join(said)


def selection_note(feature_type: str, counts: dict[str, int]) -> str | None:
    """What says that the exported GOOD parts of a type were chosen by their decision (see
    :func:`diffqc.calibration.flagged_excess_p`), or None when a random draw of the line's parts
    would hold as many flagged ones. ``counts``: an :data:`EXPORT_SUMMARY_FILE` type entry."""
    n, m = counts["exported"], counts["exported_flagged"]
    big_n, big_f = counts["inspected"], counts["flagged"]
    if flagged_excess_p(big_n, big_f, n, m) >= SELECTED_BELOW:
        return None
    return (f"of type {feature_type}, {m} of the {n} parts exported were flagged (REVIEW or REJECT) "
            f"before an operator reviewed them GOOD, against {big_f} of the {big_n} parts the line "
            f"inspected in the same period ({100 * big_f / max(big_n, 1):.1f} %): they are the GOOD "
            "parts the model scored highest, not a sample of the line's")


def export_selection_notes(data: Path | str) -> list[str] | None:
    """None when DATA is not a `diffqc results export` (no readable :data:`EXPORT_SUMMARY_FILE`
    beside its manifest); else the :func:`selection_note` of each type that has one."""
    src = Path(data)
    folder = src.parent if src.suffix.lower() == ".csv" and src.name == "manifest.csv" else src
    try:
        types = json.loads((folder / EXPORT_SUMMARY_FILE).read_text(encoding="utf-8"))["types"]
        return [note for t, c in sorted(types.items()) if (note := selection_note(t, c))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or not an export's
        return None


def _refuse_selected(data: Path | str) -> None:
    """DATA, a `diffqc results export` whose parts of a type were chosen by their decision, is
    refused: calibrated on them, the thresholds rise and defects pass."""
    if notes := export_selection_notes(data):
        raise DatasetError(f"{data} is a `diffqc results export` whose parts are no sample of the "
                           f"line's GOOD parts: {'; '.join(notes)}. Calibrated on them, the "
                           "thresholds would rise and defects pass (magnetic tile: defect recall at "
                           "REVIEW 0.89 -> 0.64, BENCHMARKS.md \"Session 26\"); the calibration is "
                           "unchanged. Calibrate on GOOD parts taken whatever their decision (a "
                           "folder of them; or, with serve/watch --keep-images all, an export of a "
                           "period whose every part was reviewed: --since); to have the model score "
                           "parts like these lower, add them to its training images and retrain")


def _not_fitted_on(meta: dict[str, Any], samples: list[Any], data: Path | str
                   ) -> tuple[list[Any], int, list[str]]:
    """The samples whose files are not images the model was fit on (by content: the bundle keeps
    their fingerprints), how many were left out, and the kept ones' fingerprints (none for such a
    bundle, below). A fit image scores lower than a new GOOD part of the line would, so
    calibrated on it the thresholds would flag too many GOOD parts.
    A bundle written before the fingerprints were kept cannot be checked: a warning says so."""
    from diffqc.data import fingerprint

    fitted = meta.get("training_data", {}).get("fit_image_fingerprints")
    if fitted is None:
        warnings.warn("this bundle does not list the images it was fit on (it was written before "
                      "bundles did): make sure DATA holds only parts the model never trained on",
                      CalibrationWarning, stacklevel=3)
        return samples, 0, []
    fitted = set(fitted)
    prints = {s.path: fingerprint(s.path) for s in samples if s.path.is_file()}
    kept = [s for s in samples if prints.get(s.path) not in fitted]
    left_out = len(samples) - len(kept)
    if not kept:
        raise DatasetError(f"{data}: all {left_out} GOOD images are images the model was fit on; "
                           "calibrate on GOOD parts it never trained on, taken as the line makes "
                           "them (a fresh folder of them)")
    if left_out:
        warnings.warn(f"{left_out} of the {len(samples)} GOOD images in {data} are images the model "
                      "was fit on (the same file contents); they are left out: their scores are "
                      "lower than new GOOD parts' and would set the thresholds too low",
                      CalibrationWarning, stacklevel=3)
    return kept, left_out, [prints[s.path] for s in kept if s.path in prints]


def _good_scores(det: Any, data: Path | str, *, skip_corrupt: bool, progress: bool
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[Any], int, list[str],
                            list[dict[str, Any]]]:
    """The calibration scores of DATA's GOOD images (byte-identical copies and those the model was
    fit on left out), the images scored, the fit images left out, the fingerprints of those kept,
    and those that score far above their type's others
    (:func:`~diffqc.calibration.suspect_images`, named in a warning)."""
    from diffqc.data import GOOD, DatasetWarning, load_dataset, without_copies

    samples = [s for s in load_dataset(data) if s.label == GOOD]
    # as train leaves them out: copies' equal scores would count one part twice (two alone, a tail
    # of no width: every part above them REJECT)
    samples, copy_notes = without_copies(samples)
    for note in copy_notes:
        warnings.warn(note, DatasetWarning, stacklevel=3)
    if not samples:
        raise DatasetError(f"{data}: no GOOD images to calibrate on")
    unknown_types = sorted({s.feature_type for s in samples} - set(det.classes_))
    if unknown_types:
        named = ", ".join(t + did_you_mean(t, det.classes_) for t in unknown_types)
        raise UnknownFeatureTypeError(f"{data}: types {named} are not in the model "
                                      f"({', '.join(det.classes_)})")
    samples, left_out, kept_prints = _not_fitted_on(det.metadata, samples, data)
    for note in other_images(det.metadata, samples):
        warnings.warn(f"calibration image {note}", CalibrationWarning, stacklevel=3)
    known, unknown, scored = calibration_scores(det, samples, skip_corrupt=skip_corrupt, progress=progress)
    if not known:  # every one skipped as unreadable
        raise DatasetError(f"{data}: none of the {len(samples)} GOOD images could be read; the "
                           "calibration is unchanged")
    in_order = {t: iter(v) for t, v in known.items()}
    suspects = suspect_images((s.feature_type, next(in_order[s.feature_type]), path_text(s.path))
                              for s in scored)
    if suspects:
        warnings.warn(suspects_note(suspects, images="GOOD calibration image(s)", harm=RAISES_THRESHOLDS,
                                    then="move them out of the GOOD images and run calibrate again "
                                    "(the summary's suspect_images lists them)"),
                      CalibrationWarning, stacklevel=3)
    return known, unknown, samples, left_out, kept_prints, suspects


def _check_levels(old: CalibrationConfig, alpha_review: float | None, alpha_reject: float | None) -> None:
    """A :class:`ConfigError` when the new levels put REJECT's above REVIEW's, in the options'
    words: one level given against the bundle's other, or both given."""
    review = old.alpha_review if alpha_review is None else alpha_review
    reject = old.alpha_reject if alpha_reject is None else alpha_reject
    if reject <= review:
        return
    if alpha_review is None:
        raise ConfigError(f"--alpha-reject {reject:g} is above the bundle's α_review {review:g}: give "
                          f"--alpha-review too, at least {reject:g}")
    if alpha_reject is None:
        raise ConfigError(f"--alpha-review {review:g} is below the bundle's α_reject {reject:g}: give "
                          f"--alpha-reject too, at most {review:g}")
    raise ConfigError(f"--alpha-reject {reject:g} is above --alpha-review {review:g}: REJECT's share of "
                      "GOOD parts is part of REVIEW's")


def _part_levels_note(meta: dict[str, Any], config: CalibrationConfig, model: Path) -> str | None:
    """Where the model was trained on parts seen as images of k types (``metadata.json``'s
    ``training_data.types_per_part``), :func:`~diffqc.calibration.part_levels_warning` for its
    new levels; None otherwise."""
    k = meta.get("training_data", {}).get("types_per_part")
    said = part_levels_warning(k if isinstance(k, int) else 0, config, lambda review, reject: (
        f"`diffqc calibrate {path_text(model)} --alpha-review {review} --alpha-reject {reject}`"))
    return said and (f"{path_text(model)} was trained on parts seen as images of {k} types, and a part "
                     f"is judged by the worst of its images: {said}")


def recalibrate(model: Path | str, data: Path | str | None = None, *, alpha_review: float | None = None,
                alpha_reject: float | None = None, skip_corrupt: bool = False, progress: bool = False,
                threads: int | None = None) -> dict[str, Any]:
    """Recompute the calibration of bundle ``model`` from the GOOD images of ``data``, and/or
    decide at other levels (``alpha_review``, ``alpha_reject``: the target share of GOOD parts
    flagged REVIEW or REJECT, and REJECT) on the scores it holds; returns a summary (images per
    type, levels, thresholds, files written, checksums)."""
    from diffqc.model import Detector

    if data is None and alpha_review is None and alpha_reject is None:
        raise ConfigError("give DATA (GOOD images to calibrate on), --alpha-review or --alpha-reject")
    if data is not None:
        _refuse_selected(data)
    path = Path(model)
    det = Detector.load(path, device="cpu")
    check_writable(path / CALIBRATION_FILE)  # a read-only bundle: before the images are scored
    assert det.calibration_ is not None
    old = det.calibration_
    _check_levels(old.config, alpha_review, alpha_reject)
    at_levels = replace(old.config,  # a ConfigError for a level outside (0, 1)
                        alpha_review=old.config.alpha_review if alpha_review is None else alpha_review,
                        alpha_reject=old.config.alpha_reject if alpha_reject is None else alpha_reject)
    # GOOD images of DATA scored by the deployed model: a split calibration, whatever train's scheme
    # (under calibration.scheme=cross fold models scored them: its warning and advice are not this one's)
    config = at_levels if data is None else replace(at_levels, scheme="split")
    known, unknown, samples, left_out, kept_prints, suspects = (
        ({}, {}, [], 0, [], []) if data is None
        else _good_scores(det, data, skip_corrupt=skip_corrupt, progress=progress))
    if note := routed_elsewhere_note(known, unknown):
        warnings.warn(note, CalibrationWarning, stacklevel=2)
    new = {CALIBRATION_FILE: _merged(old, known, unknown, config)}
    source = f"{data}: calibrated on it" if data is not None else f"at α_review={config.alpha_review}"
    _refuse_unflaggable(old, new[CALIBRATION_FILE], known, [t for t in unknown if t in known], source)
    renewed = old.known.keys() if at_levels != old.config else known.keys()
    if message := new[CALIBRATION_FILE].warning_line(renewed):  # the types recalibrated now, as train says it
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    if alpha_review is not None and (note := _part_levels_note(det.metadata, config, path)):
        warnings.warn(note, CalibrationWarning, stacklevel=2)
    if (path / INT8_MODEL_FILE).is_file():  # its own calibration, or one now where export kept FP32's
        from diffqc.runtime import OnnxDetector

        try:
            int8 = OnnxDetector(path, precision="int8", threads=threads)
        except BundleError as exc:  # a retrain made the export stale: no runtime runs it now
            warnings.warn(f"{exc}; its INT8 calibration is not recomputed", CalibrationWarning, stacklevel=2)
        else:
            k8, u8, _ = ({}, {}, []) if data is None else calibration_scores(
                int8, samples, skip_corrupt=skip_corrupt, progress=progress)
            if data is not None or (path / INT8_CALIBRATION_FILE).is_file():  # else it decides with FP32's
                new[INT8_CALIBRATION_FILE] = _merged(int8.calibration_, k8, u8, config)

    meta_path = path / "metadata.json"
    meta = check_not_retrained(path, det.metadata, "calibrate scored its images: nothing is written (its "
                               "calibration is the new model's); run calibrate again")
    files = {name: json.dumps(cal.to_dict()).encode("utf-8") for name, cal in new.items()}
    changed, previous = _changes(path, files)
    written = sorted(changed)
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    counts = {t: len(v) for t, v in sorted(known.items())}
    levels = {"alpha_review": config.alpha_review, "alpha_reject": config.alpha_reject}
    summary = {"model": str(path), "images": counts, **levels, "left_out_fit_images": left_out,
               "suspect_images": suspects, "files": written,
               "kept_previous": sorted(previous_name(n) for n in previous), "sha256": checksums,
               "thresholds": {t: new[CALIBRATION_FILE].thresholds(t) for t in sorted(renewed)}}
    if not written:  # the same images again (a command run twice), the same levels: as it was
        return {**summary, "unchanged": True}
    record: dict[str, bytes] = {}
    if config != old.config:  # the bundle's config says the levels it decides at
        record["config.json"] = replace(det.config, calibration=config).json_bytes()
    _record_checksums(meta, checksums, written)
    training = meta.setdefault("training_data", {})
    training["calibration_images"] = {**training.get("calibration_images", {}), **counts}
    prints = training.get("calibration_image_fingerprints")
    if prints is not None:  # `diffqc test` leaves these out too
        training["calibration_image_fingerprints"] = sorted({*prints, *kept_prints})
    meta["recalibrated"] = {
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "data": None if data is None else str(data),
        "images": counts,
        **levels,
        "left_out_fit_images": left_out,
        "suspect_images": suspects,
        "previous_sha256": previous,
        "files": written,
        # those of the calibration it replaces, which --undo puts back with it
        **({} if prints is None else {PREVIOUS_PRINTS: prints}),
    }
    record[meta_path.name] = json.dumps(meta, indent=2).encode("utf-8")
    _install(path, changed, previous, record)
    return summary


def _record_checksums(meta: dict[str, Any], checksums: dict[str, str], written: Collection[str]) -> None:
    """``metadata.json``'s SHA-256 of the calibration files (``checksums``: of those there now);
    an INT8 calibration among those ``written`` and not there now was moved aside."""
    meta["calibration_sha256"] = checksums[CALIBRATION_FILE]
    if INT8_CALIBRATION_FILE in checksums:
        meta["calibration_int8_sha256"] = checksums[INT8_CALIBRATION_FILE]
    elif INT8_CALIBRATION_FILE in written:
        meta.pop("calibration_int8_sha256", None)


def recalibration_text(done: dict[str, Any]) -> str:
    """What a bundle's ``metadata.json`` ``recalibrated`` record says was done, for a message:
    ``on DATA``, ``at α_review 0.02, α_reject 0.01`` or ``a calibration put back by --undo``."""
    if done.get("undo"):
        return "a calibration put back by --undo"
    if done.get("data") is not None:
        return f"on {done['data']}"
    return f"at α_review {done.get('alpha_review')}, α_reject {done.get('alpha_reject')}"


def undo_recalibration(model: Path | str) -> dict[str, Any]:
    """Put back the calibration the last ``diffqc calibrate`` of bundle ``model`` replaced
    (``calibration.prev.json``, and INT8's), with the levels it decided at; the one it replaces
    becomes the previous, so that a second undo redoes it. Refused, nothing changed, when the
    bundle keeps no previous calibration or the one kept is not what its last calibrate replaced
    (a retrain into the folder since, a file copied in); returns a summary as
    :func:`recalibrate` does."""

    path = Path(model)
    config, loaded, current = read_bundle(path)  # no weights: a calibration is put back, nothing scored
    check_writable(path / CALIBRATION_FILE)
    done = loaded.get("recalibrated")
    done = done if isinstance(done, dict) else {}
    kept = done.get("previous_sha256", {})
    # those it wrote (a record from before names none: those it kept)
    files = done.get("files", sorted(kept) if isinstance(kept, dict) else None)
    whole = (isinstance(kept, dict) and isinstance(files, list)
             and all(isinstance(name, str) and name in CALIBRATION_FILES for name in files)
             and (CALIBRATION_FILE in kept or CALIBRATION_FILE not in files))
    if not whole:  # what it names is moved aside or replaced: never the weights, nor FP32's unkept
        raise BundleError(f"{path_text(path / 'metadata.json')}: its record of the last `diffqc calibrate` "
                          f"(recalibrated) is damaged (files {files!r}, previous_sha256 {kept!r}); nothing "
                          "is changed: calibrate on GOOD images instead (diffqc calibrate MODEL DATA)")
    if not files:
        raise ConfigError(f"{path_text(path)} has no previous calibration to put back: it was not "
                          "recalibrated since it was trained (`diffqc calibrate` keeps the calibration "
                          "it replaces as calibration.prev.json)")
    restore: dict[str, bytes | None] = {}
    for name in files:
        prev = path / previous_name(name)
        if name not in kept:  # calibrate wrote INT8's own where it had none: it decides with FP32's again
            restore[name] = None
            continue
        data = _content(prev)
        if data is None or hashlib.sha256(data).hexdigest() != kept[name]:
            raise BundleError(f"{path_text(prev)} is not the calibration the last `diffqc calibrate` of "
                              f"this bundle replaced ({'gone' if data is None else 'another file'}: "
                              "retrained into this folder since, or copied in); nothing is changed")
        restore[name] = data
    fp32 = restore.get(CALIBRATION_FILE)
    cal = current if fp32 is None else Calibrator.from_dict(json.loads(fp32))
    if sorted(cal.known) != (classes := sorted(loaded["classes"])):
        raise BundleError(f"{path_text(path / previous_name(CALIBRATION_FILE))} calibrates types "
                          f"{sorted(cal.known)}, the model's are {classes}; nothing is changed")
    meta = check_not_retrained(path, loaded, "calibrate --undo read it: nothing is changed (its "
                               "calibration is the new model's)")
    changed, previous = _changes(path, restore)
    written = sorted(changed)
    if not written:  # each file already what it would put back
        raise ConfigError(f"{path_text(path / previous_name(CALIBRATION_FILE))} holds the calibration as it "
                          "stands: nothing to put back (the one before it is not kept)")
    record: dict[str, bytes] = {}
    if cal.config != config.calibration:
        record["config.json"] = replace(config, calibration=cal.config).json_bytes()
    checksums = {}
    for name in (CALIBRATION_FILE, INT8_CALIBRATION_FILE):  # of the files there once it is done
        if (data := changed[name] if name in changed else _content(path / name)) is not None:
            checksums[name] = hashlib.sha256(data).hexdigest()
    _record_checksums(meta, checksums, written)
    counts = {t: int(c.scores.size) for t, c in sorted(cal.known.items())}
    training = meta.setdefault("training_data", {})
    training["calibration_images"] = counts
    swapped: dict[str, Any] = {}  # the images `diffqc test` leaves out: those of the calibration put back
    put_back, prints = done.get(PREVIOUS_PRINTS), training.get("calibration_image_fingerprints")
    if isinstance(put_back, list) and prints is not None:
        training["calibration_image_fingerprints"], swapped = put_back, {PREVIOUS_PRINTS: prints}
    levels = {"alpha_review": cal.config.alpha_review, "alpha_reject": cal.config.alpha_reject}
    meta["recalibrated"] = {"at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "undo": True,
                            "data": None, "images": {}, **levels, "previous_sha256": previous,
                            "files": written, **swapped}
    record["metadata.json"] = json.dumps(meta, indent=2).encode("utf-8")
    _install(path, changed, previous, record)
    return {"model": str(path), "undo": True, "calibration_images": counts, **levels, "files": written,
            "kept_previous": sorted(previous_name(n) for n in previous), "sha256": checksums,
            "thresholds": {t: cal.thresholds(t) for t in sorted(cal.known)}}


# --------------------------------------------------------------------------- the service side
def file_signature(path: Path) -> tuple[int, int, int] | None:
    """A file's (mtime, size, inode), None when it is gone: a file rewritten or moved into
    place changes it (the calibration's and the service's file watches)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# the files a bundle is made of (`train`'s, `calibrate`'s and `export`'s), and a writer's temporary
# ones of their names (rsync's `.weights.safetensors.Xy12Ab`, diffqc's own `.calibration.json.<pid>.tmp`)
BUNDLE_OWN_FILES = (*BUNDLE_FILES, previous_name(CALIBRATION_FILE), INT8_CALIBRATION_FILE,
                    previous_name(INT8_CALIBRATION_FILE), EXPORT_FILE, *ONNX_FILES.values(), ENGINE_FILE)
_BUNDLE_FILE = re.compile(r"\.?(?:" + "|".join(map(re.escape, BUNDLE_OWN_FILES)) + r")(?:\..+)?")


def bundle_signature(folder: Path) -> tuple[tuple[str, tuple[int, int, int] | None], ...]:
    """Each of a bundle's own files' :func:`file_signature` in its ``folder`` by name
    (:data:`BUNDLE_OWN_FILES`, and a copier's temporary ones: they lie in it, not below it), empty
    when it cannot be read: a file that comes, goes or changes changes it. Any other file kept in
    the folder (a result store, a log appended as the service runs) is left out: it would hold
    back a new calibration or model for as long as it keeps changing."""
    with contextlib.suppress(OSError):
        return tuple(sorted((p.name, file_signature(p)) for p in folder.iterdir()
                            if _BUNDLE_FILE.fullmatch(p.name) and p.is_file()))
    return ()


class FileChange:
    """Whether files changed on disk and are complete: ``settled()`` is True once, when they
    differ from when last taken (inode, size, mtime: a new file moved into place changes them)
    and stayed as they are for one look since (a certificate written before its key, a bundle's
    files one after another, are then all written)."""

    def __init__(self, *paths: Path | None) -> None:
        self.paths = paths
        self._seen = self._pending = self._now()

    def _now(self) -> tuple[Any, ...]:
        return tuple(None if path is None else file_signature(path) for path in self.paths)

    def settled(self) -> bool:
        now = self._now()
        if now == self._seen:
            return False
        if now != self._pending:  # changed since the last look: let it finish
            self._pending = now
            return False
        self._seen = now
        return True


class BundleChange(FileChange):
    """:class:`FileChange` of a bundle's files (:func:`bundle_signature`:
    files come and go)."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        super().__init__()

    def _now(self) -> tuple[Any, ...]:
        return bundle_signature(self.bundle)


class CalibrationReloader:
    """Swap a loaded detector's calibration when its bundle file changes on disk.

    ``check()`` is cheap while nothing changed (one ``stat``); once the file changed, it waits
    until none of the bundle's files changed since the last look (a bundle copied over the served
    one comes file by file, in the copier's order: another model's calibration may come before
    its weights and metadata), then loads it if the bundle is still the served model's (its
    weights, its ``model_id``), and keeps the current calibration when the new file is unusable.
    """

    def __init__(self, detector: Any, bundle: Path | str, *, follows_retrain: bool = False) -> None:
        """``follows_retrain``: a retrain into the bundle's folder is served whole by another
        watch (the service's :class:`~diffqc.service.line.ModelWatch`), so new weights are no
        error here: their calibration comes with them."""
        self.detector = detector
        self.follows_retrain = follows_retrain
        self.bundle = Path(bundle)
        self.int8 = getattr(detector, "precision", "fp32") == "int8"
        self.file = self.bundle / CALIBRATION_FILE
        self._take_int8_file()
        self._signature = file_signature(self.file)
        self._files = BundleChange(self.bundle)
        # `diffqc train --out` into the served folder replaces the weights before the calibration:
        # the new calibration is then the new model's, whose scores the loaded one does not give
        self._weights = file_signature(self.bundle / "weights.safetensors")
        self.model_id = str(getattr(detector, "version", "") or "")
        self.reloads = 0
        self.last_error: str | None = None

    def _another_model(self) -> bool:
        """The bundle's metadata.json names a model other than the one served."""
        try:
            named = named_model_id(self.bundle)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # none named: the weights' signature decides
        return bool(self.model_id) and named != self.model_id

    def _take_int8_file(self) -> bool:
        """An INT8 detector decides with the INT8 calibration wherever the bundle has one (else
        with the FP32 one): True when ``file`` moved to it now, or back to the FP32 one (its own
        moved aside by ``calibrate --undo``)."""
        own = self.bundle / INT8_CALIBRATION_FILE
        if not self.int8:
            return False
        if self.file == own:
            if own.is_file():
                return False
            self.file = self.bundle / CALIBRATION_FILE
            return True
        if not own.is_file():
            return False
        self.file = own
        return True

    def check(self) -> bool:
        """True when a new calibration was loaded now."""
        if self._take_int8_file():  # `calibrate` gave INT8 its own calibration now, or --undo took it
            self._signature = None
        sig = file_signature(self.file)
        if sig is None or sig == self._signature:
            return False
        if not self._files.settled():  # still being written: look again
            return False
        self._signature = sig
        if file_signature(self.bundle / "weights.safetensors") != self._weights or self._another_model():
            if self.follows_retrain:  # the new model is loaded with its calibration
                return False
            self.last_error = (f"{self.bundle} was retrained while this service runs: its new calibration "
                               "belongs to the new weights, so the current one stays; restart the service "
                               "to serve the new model")
            log.error("new calibration not loaded: %s", self.last_error)
            return False
        try:
            cal = Calibrator.from_dict(read_json(self.file))
            classes = list(self.detector.classes_)
            if set(cal.known) != set(classes):
                raise BundleError(f"calibration types {sorted(cal.known)} != model classes {classes}")
        except (OSError, ValueError, KeyError, TypeError, BundleError) as exc:
            self.last_error = f"{self.file}: {exc}"
            log.error("new calibration not loaded, keeping the current one: %s", self.last_error)
            return False
        self.detector.calibration_ = cal  # one attribute store: a batch uses the old or the new
        if (config := getattr(self.detector, "config", None)) is not None:  # /v1/model's config: its levels
            self.detector.config = replace(config, calibration=cal.config)
        self.reloads += 1
        self.last_error = None
        log.info("calibration reloaded from %s: α_review %g, α_reject %g", self.file, cal.config.alpha_review,
                 cal.config.alpha_reject)  # which one, after an --undo
        return True


# --------------------------------------------------------------------------- CLI
def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.undo:
        given = (["DATA"] if args.data is not None else []) + given_options(
            args, ("--alpha-review", "--alpha-reject", "--skip-corrupt"))
        if given:
            raise ConfigError(f"--undo puts the previous calibration back as it was: give it without "
                              f"{' and '.join(given)}")
        print(json_line(undo_recalibration(args.model)))
        return 0
    summary = recalibrate(args.model, args.data, alpha_review=args.alpha_review,
                          alpha_reject=args.alpha_reject, skip_corrupt=args.skip_corrupt,
                          progress=not args.quiet)
    if summary.get("unchanged"):
        print(f"diffqc: {args.model}: the calibration is the bundle's as it stands (the same scores, the "
              f"same levels): nothing is written, and {previous_name(CALIBRATION_FILE)} keeps the one "
              "before it", file=sys.stderr)
    print(json_line(summary))
    return 0


def add_calibrate_command(subparsers: Any) -> None:
    """Register ``diffqc calibrate MODEL [DATA]`` on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "calibrate",
        help="recompute a bundle's calibration from GOOD images, or decide at other levels, without "
        "retraining",
        description="Recompute the conformal calibration of MODEL from the GOOD images in DATA "
        "(parts the model never trained on: images it was fit on are left out), and/or decide at "
        "other levels (--alpha-review, --alpha-reject) on the GOOD scores the bundle holds. The "
        "previous calibration is kept as calibration.prev.json (--undo puts it back); a running "
        "service picks the new one up without a restart.",
    )
    p.add_argument("model", type=path_value, help="model bundle folder")
    p.add_argument("data", nargs="?", type=path_name,
                   help="dataset folder (MVTec layout, or <type>/good folders) or CSV "
                   "manifest with GOOD images (default: keep the bundle's GOOD scores)")
    p.add_argument("--alpha-review", type=share, metavar="A",
                   help="target share of a type's GOOD images flagged REVIEW or REJECT (e.g. 0.02 or "
                   "2%%; a part judged by its images of k types is flagged up to k times as often: A/k "
                   "keeps a part's within A; default: the bundle's, 0.05 from train)")
    p.add_argument("--alpha-reject", type=share, metavar="A",
                   help="target share of a type's GOOD images flagged REJECT, at most --alpha-review "
                   "(default: the bundle's, 0.01 from train)")
    p.add_argument("--undo", action="store_true",
                   help="put back the calibration the last calibrate replaced, with its levels (the "
                   "current one is kept as the previous: --undo again redoes it)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images")
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=_cmd_calibrate)
