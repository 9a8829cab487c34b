"""``diffqc test MODEL DATA``: how a trained bundle, as it runs on the line, does on labelled
images it never saw.

``evaluate`` cross-validates *methods* (it refits on each fold); this scores one fixed bundle —
its runtime, precision and calibration — on DATA's GOOD and defective images: per type the image
AUROC, the share of GOOD parts flagged (the calibrated target is α_review) and of defects caught.
It is the check after training on a new folder of parts, and later on the defects the line's
operators found (``diffqc results export --defects``). Images the bundle was fit or calibrated
on are left out, by content: fit images score low, and calibration images set the thresholds, so
their flag rate is the target by construction.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffqc.calibration import (
    COUNTED_FLAGGED,
    PASS,
    REJECT,
    REVIEW,
    part_levels_text,
    suspect_images,
    suspects_note,
)
from diffqc.data import (
    DEFECTIVE,
    GOOD,
    DatasetWarning,
    Sample,
    feature_types,
    fingerprint,
    label_shortcuts,
    of_the_model,
    samples_of,
)
from diffqc.errors import DatasetError, NotFittedError, OutputError, first_few
from diffqc.inspection import Inspection, other_images
from diffqc.metrics import image_auroc, part_decision_metrics, types_per_part
from diffqc.output import check_output_file, is_csv_table, json_line, json_safe, path_text, write_atomic
from diffqc.recalibrate import export_selection_notes
from diffqc.stats import MIN_DEFECTIVE_PER_FOLD, rate_intervals


def decision_table(samples: Sequence[Sample], results: Sequence[Inspection]) -> list[dict[str, Any]]:
    """Rows ``{feature_type, n, defective, image_auroc, accuracy, fpr, recall, fpr_ci95,
    recall_ci95, pass, review, reject}`` per type, then ``mean/all`` (the mean of the types'
    AUROCs; the rest over all parts).

    A part is *flagged* when its decision is not PASS. ``accuracy``: flagged == defective;
    ``fpr``: the share of GOOD parts flagged (the calibrated target is α_review); ``recall``: the
    share of defective parts flagged; ``*_ci95``: their 95 % Clopper-Pearson intervals
    (:func:`diffqc.stats.rate_intervals`: how far a rate from so many parts can be trusted).
    NaN where a type has no GOOD (or no defective) part.
    """
    rows: list[dict[str, Any]] = []
    types = sorted({s.feature_type for s in samples})
    for t in [*types, "all"]:
        idx = [i for i, s in enumerate(samples) if t in ("all", s.feature_type)]
        labels = np.array([samples[i].label for i in idx])
        scores = np.array([results[i].score for i in idx])
        decisions = [results[i].decision for i in idx]
        flagged = np.array([d != PASS for d in decisions])
        good, bad = labels == GOOD, labels == DEFECTIVE
        intervals = rate_intervals(bad.astype(int), decisions)
        rows.append({
            "feature_type": t, "n": len(idx), "defective": int(bad.sum()),
            "image_auroc": image_auroc(labels, scores) if t != "all" else math.nan,
            "accuracy": float((flagged == bad).mean()),
            "fpr": float(flagged[good].mean()) if good.any() else math.nan,
            "recall": float(flagged[bad].mean()) if bad.any() else math.nan,
            "fpr_ci95": intervals["fpr_flagged"], "recall_ci95": intervals["recall_flagged"],
            "pass": decisions.count(PASS), "review": decisions.count(REVIEW),
            "reject": decisions.count(REJECT),
        })
    aurocs = [a for r in rows[:-1] if not math.isnan(a := float(r["image_auroc"]))]
    rows[-1]["image_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    rows[-1]["feature_type"] = "mean/all"
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`decision_table` as a fixed-width text table (NaN printed as "-")."""
    def num(value: float, width: int) -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.3f}"

    head = (f"{'feature_type':<13}{'n':>5}{'defect':>7}{'AUROC':>8}{'acc':>7}{'FPR':>7}{'recall':>7}"
            f"{'PASS':>6}{'REVIEW':>8}{'REJECT':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["feature_type"] == "mean/all":
            lines.append("-" * len(head))
        lines.append(f"{r['feature_type']:<13}{r['n']:>5}{r['defective']:>7}{num(r['image_auroc'], 8)}"
                     f"{num(r['accuracy'], 7)}{num(r['fpr'], 7)}{num(r['recall'], 7)}{r['pass']:>6}"
                     f"{r['review']:>8}{r['reject']:>8}")
    return "\n".join(lines)


def recall_by_kind(samples: Sequence[Sample], results: Sequence[Inspection]) -> dict[str, dict[str, Any]]:
    """Per type and defect kind (the folder a defect came from; ``defect`` without one): how many
    defective parts, and the share flagged (REVIEW or REJECT) — which defects the model lets pass."""
    out: dict[str, dict[str, Any]] = {}
    for s, r in zip(samples, results, strict=True):
        if s.label != DEFECTIVE:
            continue
        kind = out.setdefault(s.feature_type, {}).setdefault(s.defect or "defect", {"n": 0, "flagged": 0})
        kind["n"] += 1
        kind["flagged"] += r.decision != PASS
    for kinds in out.values():
        for counts in kinds.values():
            counts["recall"] = counts["flagged"] / counts["n"]
    return {t: dict(sorted(k.items())) for t, k in sorted(out.items())}


def part_note(parts: dict[str, Any], alpha_review: float, alpha_reject: float, model: Path | str) -> str:
    """``test``'s line on the parts (:func:`~diffqc.metrics.part_decision_metrics`), with what the
    levels per image mean for a part of the data's ``types_per_part`` types and the ``calibrate``
    command that keeps the defaults' shares per part (:func:`~diffqc.calibration.part_levels_text`)."""
    of = (f"{parts['types']} types" if parts["fewest_types"] == parts["types"]
          else f"{parts['fewest_types']} to {parts['types']} types")
    said = [f"{parts['good']} GOOD parts of {of}, {100 * parts['good_flagged']:.1f} % flagged, "
            f"{100 * parts['good_rejected']:.1f} % rejected" if parts["good"] else "no GOOD part"]
    if parts["defective"]:
        said.append(f"{parts['defective']} defective parts, {100 * parts['recall']:.1f} % flagged")
    levels = part_levels_text(parts["types_per_part"], alpha_review, alpha_reject, lambda review, reject: (
        f"`diffqc calibrate {path_text(model)} --alpha-review {review} --alpha-reject {reject}`"))
    return (f"parts (the data's part_id, each judged by the worst of its images, as the service judges "
            f"a part): {'; '.join(said)}. {levels}")


def unseen(meta: dict[str, Any], samples: Sequence[Sample]) -> tuple[list[Sample], dict[str, int]]:
    """The samples whose files the bundle was neither fit nor calibrated on (by content: the bundle
    keeps their fingerprints), and how many of each were left out. A bundle written before it
    kept the calibration images' is named in a warning (their flag rate is the target by
    construction)."""
    training = meta.get("training_data", {})
    fitted = set(training.get("fit_image_fingerprints") or ())
    calibrated = set(training.get("calibration_image_fingerprints") or ())
    unlisted = [what for what, key in (("fit", "fit_image_fingerprints"),
                                       ("calibrated", "calibration_image_fingerprints"))
                if key not in training]
    if unlisted:
        warnings.warn(f"this bundle does not list the images it was {' or '.join(unlisted)} on "
                      "(written before bundles did): GOOD images of DATA it was calibrated on would "
                      "be flagged at the target rate by construction, and those it was fit on less "
                      "often than new parts; test on parts it never saw", stacklevel=3)
    kept: list[Sample] = []
    left = {"fit": 0, "calibration": 0}
    for s in samples:
        digest = fingerprint(s.path) if s.path.is_file() else None
        if digest in fitted:
            left["fit"] += 1
        elif digest in calibrated:
            left["calibration"] += 1
        else:
            kept.append(s)
    return kept, left


def holdout_report(detector: Any, data: Sequence[Sample] | Path | str, *, type_known: bool = True,
                   skip_corrupt: bool = False, progress: bool = False, heatmaps: Path | None = None,
                   heatmap_size: int = 0) -> dict[str, Any]:
    """Score the labelled images of ``data`` that ``detector`` never saw; returns the report:
    ``rows`` (:func:`decision_table`), what was left out, ``type_accuracy`` when the type was
    withheld (``type_known=False``: the type router picks it) and ``images``, one entry per image.
    With ``heatmaps``, a heat map of each miss (:func:`draw_misses`), named in its entry.
    ``data``: a dataset's path or its :class:`~diffqc.data.Sample` s, as ``Detector.fit`` takes."""
    classes = list(detector.classes_)
    if not classes:  # before the data is read
        raise NotFittedError
    listed = samples_of(data, "holdout_report")
    folder = data if isinstance(data, str | Path) else None
    name = path_text(folder) if folder is not None else f"{len(listed)} samples given"
    if folder is not None and export_selection_notes(folder) is not None:
        warnings.warn(f"{name} is a `diffqc results export`: its parts are those operators reviewed, "
                      "chosen by their decision (the flagged ones, mostly), so the FPR and recall "
                      "below are not the line's rates: they say which of these parts the model "
                      "still flags", stacklevel=2)
    samples = [s for s in listed if s.label in (GOOD, DEFECTIVE)]
    if not samples:
        raise DatasetError(f"{name}: no labelled images (GOOD or defective) to test on")
    if not (ours := of_the_model(samples, classes, name)):
        raise DatasetError(f"{name}: none of its types ({', '.join(feature_types(samples))}) is the "
                           f"model's ({', '.join(classes)})")
    kept, left = unseen(detector.metadata, ours)
    if not kept:
        raise DatasetError(f"{name}: all {len(ours)} images are images the model was fit or calibrated "
                           "on; test on parts it never saw (a new folder of GOOD and defective parts)")
    for note in other_images(detector.metadata, kept):
        warnings.warn(f"test image {note}", stacklevel=2)
    for note in label_shortcuts(kept):
        warnings.warn(note, DatasetWarning, stacklevel=2)
    results, read = detector.inspect_samples(kept, type_known=type_known, all_types=False, maps=False,
                                             skip_corrupt=skip_corrupt, progress=progress)
    if not read:  # every one skipped as unreadable: an empty table of zeros was the report
        raise DatasetError(f"{name}: none of the {len(kept)} images could be read: "
                           f"{first_few([path_text(s.path) for s in kept])}")
    rows = decision_table(read, results)
    parts = part_decision_metrics([s.part_id for s in read], [s.feature_type for s in read],
                                  [s.label for s in read], [r.decision for r in results])
    if suspects := suspect_images((s.feature_type, r.score, path_text(s.path))
                                  for s, r in zip(read, results, strict=True) if s.label == GOOD):
        warnings.warn(suspects_note(suspects, images="GOOD image(s)", harm=COUNTED_FLAGGED,
                                    then="label them defective and test again"), DatasetWarning, stacklevel=2)
    report: dict[str, Any] = {
        "data": name, "type_known": type_known,
        "left_out": {"unlabelled": len(listed) - len(samples), "other_types": len(samples) - len(ours),
                     "fit_images": left["fit"], "calibration_images": left["calibration"],
                     "unreadable": len(kept) - len(read)},
        "rows": rows,
        # the levels the decisions were taken at: FPR's target is alpha_review
        "decision_rule": {"alpha_review": detector.calibration_.config.alpha_review,
                          "alpha_reject": detector.calibration_.config.alpha_reject},
        "images": [{"path": path_text(s.path), "feature_type": s.feature_type,
                    "label": "good" if s.label == GOOD else "defective", "defect": s.defect,
                    "score": r.score, "p_value": r.p_value, "decision": r.decision,
                    "predicted_type": r.predicted_type} for s, r in zip(read, results, strict=True)],
        "defect_kinds": recall_by_kind(read, results),
        "parts": parts and {**parts, "types_per_part": types_per_part(  # the line's: what the fit took too
            [s.part_id for s in ours], [s.feature_type for s in ours])},
    }
    if not type_known:
        report["type_accuracy"] = float(np.mean([r.predicted_type == s.feature_type
                                                 for s, r in zip(read, results, strict=True)]))
    if heatmaps is not None:
        report["heatmaps"] = draw_misses(detector, read, results, report["images"], heatmaps,
                                         type_known=type_known, max_side=heatmap_size)
    return report


def draw_misses(detector: Any, samples: Sequence[Sample], results: Sequence[Inspection],
                entries: list[dict[str, Any]], folder: Path, *, type_known: bool,
                max_side: int = 0) -> dict[str, Any]:
    """A heat map of each defect that passed (``folder/missed``) and of each GOOD part flagged
    (``folder/flagged``), named ``<type>_<kind>_<image>_heatmap.png`` and in its ``entries`` item
    (``heatmap``): what a QC engineer looks at first. The first pass scores without maps (memory);
    the misses are scored again, one by one, with them."""
    from diffqc.data import read_image
    from diffqc.visualize import write_heatmap

    summary = detector.calibration_.summary() if detector.calibration_ is not None else {}
    drawn = {"missed": 0, "flagged": 0}
    for s, r, entry in zip(samples, results, entries, strict=True):
        sort = ("missed" if s.label == DEFECTIVE and r.decision == PASS else
                "flagged" if s.label == GOOD and r.decision != PASS else None)
        if sort is None:
            continue
        image = read_image(s.path)
        (again,) = detector.inspect([image], [s.feature_type if type_known else None], check_images=False)
        if again.anomaly_map is None:  # a runtime without maps
            continue
        kind = s.defect or ("good" if s.label == GOOD else "defect")
        out = write_heatmap(folder / sort, Path(s.feature_type or "unknown", kind, s.path.name), image, again,
                            summary, gain=detector.config.backbone.input_gain, max_side=max_side)
        entry["heatmap"] = path_text(out)
        drawn[sort] += 1
    return {"folder": path_text(folder), **drawn}


def _summary(report: dict[str, Any], model: Path) -> str:
    left = report["left_out"]
    said = [f"{n} {what.replace('_', ' ')}" for what, n in left.items() if n]
    rule = report["decision_rule"]
    lines = [f"{model} on {report['data']} (feature type {'given' if report['type_known'] else 'withheld'}"
             f"; {report['runtime']}, {report['precision']}; FPR's target α_review="
             f"{rule['alpha_review']:g}, α_reject={rule['alpha_reject']:g})"
             + (f"; left out: {', '.join(said)}" if said else ""),
             format_table(report["rows"])]
    for t, kinds in report["defect_kinds"].items():
        if len(kinds) > 1:
            lines.append(f"recall by defect kind, {t}: " + ", ".join(
                f"{k} {c['recall']:.3f} ({c['flagged']}/{c['n']})" for k, c in kinds.items()))
    if "type_accuracy" in report:
        lines.append(f"type predicted correctly (type router): {report['type_accuracy']:.3f}")
    if drawn := report.get("heatmaps"):
        m, f = drawn["missed"], drawn["flagged"]
        lines.append(f"heat maps of the {m} defect{'s' * (m != 1)} that passed ({drawn['folder']}/missed) "
                     f"and the {f} GOOD part{'s' * (f != 1)} flagged ({drawn['folder']}/flagged)")
    rows = report["rows"][:-1]
    if lacking := [r["feature_type"] for r in rows if math.isnan(r["fpr"])]:
        lines.append(f"no GOOD image it never saw of {', '.join(lacking)}: its AUROC and FPR cannot be "
                     "measured (add GOOD parts the model never trained on)")
    if few := few_parts_note(rows, rule["alpha_review"]):
        lines.append(few)
    if report["parts"] is not None:
        lines.append(part_note(report["parts"], rule["alpha_review"], rule["alpha_reject"], model))
    return "\n".join(lines)


def few_parts_note(rows: Sequence[dict[str, Any]], alpha_review: float) -> str | None:
    """The types whose FPR rests on fewer GOOD parts than 1/α_review (one GOOD part flagged, or
    not, moves it by more than the calibration allows) or whose recall rests on fewer than
    :data:`~diffqc.stats.MIN_DEFECTIVE_PER_FOLD` defective ones (`evaluate`'s UNRELIABLE bound),
    with their rates' 95 % intervals; None when none."""
    need_good = math.ceil(1.0 / alpha_review - 1e-9)

    def rate(name: str, value: float, n: int, what: str, ci: Sequence[float]) -> str:
        return f"{name} {value:.3f} of {n} {what}, within [{ci[0]:.3f}, {ci[1]:.3f}]"

    said = []
    for r in rows:
        n_bad = int(r["defective"])
        n_good = int(r["n"]) - n_bad
        if (0 < n_good < need_good) or (0 < n_bad < MIN_DEFECTIVE_PER_FOLD):
            parts = ([rate("FPR", r["fpr"], n_good, "GOOD", r["fpr_ci95"])] if n_good else []) + (
                [rate("recall", r["recall"], n_bad, "defective", r["recall_ci95"])] if n_bad else [])
            said.append(f"{r['feature_type']} {', '.join(parts)}")
    if not said:
        return None
    return (f"few parts to measure a type by (a rate from fewer than {need_good} GOOD or "
            f"{MIN_DEFECTIVE_PER_FOLD} defective parts is known only roughly: 95 % Clopper-Pearson "
            f"intervals, the --json report's fpr_ci95 and recall_ci95): {first_few(said)}; test on more of "
            "its parts")


# ``test --csv``: one row per image, the report's image entries
CSV_COLUMNS = ("path", "feature_type", "label", "defect", "score", "p_value", "decision",
               "predicted_type", "heatmap")


def images_csv(images: Sequence[dict[str, Any]]) -> bytes:
    """The report's image entries as a CSV table (UTF-8, a header line first)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for entry in images:
        writer.writerow({k: "" if entry.get(k) is None else entry[k] for k in CSV_COLUMNS})
    return text.getvalue().encode("utf-8")


def is_test_report(path: Path) -> bool:
    """Whether the file is a report ``diffqc test --json`` wrote."""
    report = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(report, dict) and {"model", "data", "rows", "images"} <= set(report)


def cmd_test(args: argparse.Namespace) -> int:
    from diffqc.bundle import check_bundle_files
    from diffqc.runtime import runtime_from_args
    from diffqc.visualize import heatmap_folder

    check_bundle_files(args.model)
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        check_output_file(json_path, option="--json", is_ours=is_test_report,
                          what="`diffqc test` report", force=args.force)
    csv_path = Path(args.csv) if args.csv else None
    if csv_path is not None and json_path is not None and csv_path.resolve() == json_path.resolve():
        raise OutputError(f"--csv and --json are the same file {csv_path}; give two file names")
    if csv_path is not None:
        check_output_file(csv_path, option="--csv", is_ours=is_csv_table(CSV_COLUMNS),
                          what="`diffqc test` CSV table", force=args.force)
    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    if heatmaps is not None:
        heatmap_folder(heatmaps)
    det = runtime_from_args(args, args.model)
    report = holdout_report(det, args.data, type_known=not args.unknown_type,
                            skip_corrupt=args.skip_corrupt, progress=not args.quiet, heatmaps=heatmaps,
                            heatmap_size=args.heatmap_size)
    report = {"model": path_text(args.model), "runtime": getattr(det, "runtime", "torch"),
              "precision": getattr(det, "precision", "fp32"), **report}
    print(_summary(report, args.model))
    if json_path is not None:
        write_atomic(json_path, (json.dumps(json_safe(report), indent=2) + "\n").encode("utf-8"))
        print(json_line({"report": path_text(json_path)}))
    if csv_path is not None:
        write_atomic(csv_path, images_csv(report["images"]))
        print(json_line({"table": path_text(csv_path)}))
    return 0
