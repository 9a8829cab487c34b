"""What defects among the GOOD training images, and defects saved otherwise than the GOOD parts,
do to a model and its measurement, and what diffqc names of them.

On the embedded synthetic set (``data synth --seed 11``: 108 GOOD training images per type), 5 of
each type's defects are moved into ``train/good`` (a pass bin's escapes copied into the GOOD
folder); a clean twin has the same 5 deleted. A model is fit on each (default settings) and
tested on the same held-out images. Printed: recall at REVIEW (defective parts flagged), FPR
(GOOD parts flagged, 5 % target) and mean per-type image AUROC of each; the images ``train``
names (``metadata.json``'s ``training_data.suspect_images``) and how many are the planted
defects; the same after moving the named defects out and fitting again. ``--cross`` also fits
with ``calibration.scheme=cross`` (every GOOD image scored out of fold: 4-5 times the fit time),
``--evaluate`` runs a 5-fold ``evaluate`` of the contaminated set and counts what it names. Last,
the clean model tested with the test split's defect images saved as JPEG (quality 90) beside
PNG GOOD parts: the AUROC a score gains from telling the files apart, which ``data info``,
``evaluate`` and ``test`` name (``data.label_shortcuts``).

    OMP_NUM_THREADS=2 python benchmarks/training_data.py [--out /tmp/diffqc-training-data] [--json PATH]
                                                         [--cross] [--evaluate]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from diffqc.config import DetectorConfig, with_overrides
from diffqc.data import label_shortcuts, load_dataset
from diffqc.evaluate import evaluate
from diffqc.holdout import holdout_report
from diffqc.model import Detector
from diffqc.synth import write_synthetic_dataset

PLANTED = "defect_"  # the name prefix of a defect moved among the GOOD training images


def _contaminate(root: Path, dirty: Path, clean: Path) -> int:
    """Copies of ``root``: ``dirty`` with every third defect of each type moved into its
    ``train/good`` (renamed ``defect_<kind>_<name>``), ``clean`` with them deleted; neither keeps
    the manifest (every command reads the folders). Returns how many were moved."""
    for copy in (dirty, clean):
        shutil.copytree(root, copy)
        (copy / "manifest.csv").unlink()
    moved = 0
    for type_root in sorted(p for p in root.iterdir() if p.is_dir()):
        defects = sorted(p for p in (type_root / "test").glob("*/*.png") if p.parent.name != "good")
        for p in defects[::3]:
            rel = p.relative_to(root)
            good = dirty / type_root.name / "train" / "good"
            shutil.move(dirty / rel, good / f"{PLANTED}{p.parent.name}_{p.name}")
            (clean / rel).unlink()
            for copy in (dirty, clean):
                for mask in (copy / type_root.name / "ground_truth" / p.parent.name).glob(f"{p.stem}*"):
                    mask.unlink()
            moved += 1
    return moved


def _fit(data: Path, config: DetectorConfig) -> tuple[Detector, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector(config, device="cpu").fit(data, progress=False)
    return det, time.perf_counter() - start


def _tested(det: Detector, data: Path) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = holdout_report(det, data)["rows"][-1]
    return {k: round(float(row[k]), 3) for k in ("recall", "fpr", "image_auroc")}


def _named(det: Detector) -> dict[str, Any]:
    suspects = det.metadata["training_data"]["suspect_images"]
    return {"named": len(suspects), "planted": sum(PLANTED in e["path"] for e in suspects),
            "by_set": {among: sum(e["among"] == among for e in suspects)
                       for among in sorted({e["among"] for e in suspects})}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/diffqc-training-data"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cross", action="store_true", help="also fit with calibration.scheme=cross")
    parser.add_argument("--evaluate", action="store_true",
                        help="also evaluate the contaminated set (5 folds)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    root, dirty, clean = args.out / "synth", args.out / "contaminated", args.out / "clean"
    write_synthetic_dataset(root, seed=11, progress=False)
    moved = _contaminate(root, dirty, clean)
    config = DetectorConfig()
    out: dict[str, Any] = {"planted": moved}

    clean_model, seconds = _fit(clean, config)
    out["clean"] = {**_tested(clean_model, clean), "fit_seconds": round(seconds, 1),
                    **_named(clean_model)}
    dirty_model, seconds = _fit(dirty, config)
    out["contaminated"] = {**_tested(dirty_model, clean), "fit_seconds": round(seconds, 1),
                           **_named(dirty_model)}
    mended = args.out / "mended"  # the named images that are defects moved out, as a user would
    shutil.copytree(dirty, mended)
    for e in dirty_model.metadata["training_data"]["suspect_images"]:
        if PLANTED in e["path"]:
            (mended / Path(e["path"]).relative_to(dirty)).unlink()
    mended_model, seconds = _fit(mended, config)
    out["named_moved_out"] = {**_tested(mended_model, clean), "fit_seconds": round(seconds, 1)}
    if args.cross:
        cross_model, seconds = _fit(dirty, with_overrides(config, {"calibration.scheme": "cross"}))
        out["contaminated_cross"] = {**_tested(cross_model, clean), "fit_seconds": round(seconds, 1),
                                     **_named(cross_model)}
    if args.evaluate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = evaluate(load_dataset(dirty), folds=5, methods=("diffusion",), base_config=config,
                              progress=False, gallery=0, device="cpu")
        note = next((n for n in report["notes"] if "score far above" in n), "")
        out["evaluate_contaminated"] = {"named": int(note.split(" ", 1)[0]) if note else 0,
                                        "note": note[:300]}

    jpeg = args.out / "jpeg_defects"  # the clean set, its test defects saved as JPEG
    shutil.copytree(clean, jpeg)
    for p in sorted(jpeg.glob("*/test/*/*.png")):
        if p.parent.name != "good":
            with Image.open(p) as img:
                img.save(p.with_suffix(".jpg"), quality=90)
            p.unlink()
    out["jpeg_defects"] = {"png": _tested(clean_model, clean)["image_auroc"],
                           "jpeg_q90": _tested(clean_model, jpeg)["image_auroc"],
                           "named": label_shortcuts(load_dataset(jpeg))[:1]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
