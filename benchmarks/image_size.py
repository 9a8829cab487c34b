"""What a change of the camera's image size, colour, file format or exposure does to a
calibrated model (why diffqc names it).

Every image is scaled to the model's input, so a part seen at another size or aspect than the
training images (a new region of interest, another lens or resolution) is scored on another
scale than the calibration. This benchmark fits the default model on the embedded synthetic set's
GOOD training parts, then inspects its test parts as they are and as a changed camera would
deliver them, and prints per variant the GOOD parts flagged (REVIEW + REJECT, 5 % target), the
defective parts flagged, the mean per-type image AUROC, and how many types diffqc's image check
(``inspection.ImageCheck``: size, colour, compression, brightness, clipping) names; last, what
the whole check costs a part (median of 200 calls, at the test images' size and at 2048 x 2048),
and what it adds to the Python API's ``Detector.inspect`` of one part given as a camera's uint8
array (``check_images`` on and off, alternating, median of 30 calls each; ``--costs-only``: the
fit and these costs alone).

    OMP_NUM_THREADS=2 python benchmarks/image_size.py [--out /tmp/diffqc-image-size] [--json PATH]
                                                      [--costs-only]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from diffqc.config import DetectorConfig
from diffqc.data import GOOD, load_manifest, read_image
from diffqc.inspection import ImageCheck
from diffqc.model import Detector
from diffqc.recalibrate import recalibrate
from diffqc.synth import write_synthetic_dataset


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    pil = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255.0


def _jpeg(img: np.ndarray, quality: int = 75) -> np.ndarray:  # saved as JPEG (Pillow's default)
    buf = io.BytesIO()
    pixels = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def _wider_field(img: np.ndarray) -> np.ndarray:  # 1.25x the field at the same scale
    h, w = img.shape[:2]
    dh, dw = h // 8, w // 8
    return np.pad(img, ((dh, dh), (dw, dw), (0, 0)), mode="reflect")


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as trained": lambda img: img,
    "field of view 1.25x, same scale": _wider_field,
    "the same field at 1.25x resolution": lambda img: _resize(img, img.shape[1] * 5 // 4,
                                                              img.shape[0] * 5 // 4),
    "aspect 1.25 : 1": lambda img: _resize(img, img.shape[1] * 5 // 4, img.shape[0]),
    # a mono camera replaced by a colour one (or its pixel format changed): a slight warm cast
    "colour camera, warm cast (R +3 %, B -3 %)": lambda img: np.clip(img * np.array([1.03, 1.0, 0.97],
                                                                                   np.float32), 0, 1),
    # the camera set to save JPEG (to spare its disk), at Pillow's default quality
    "saved as JPEG, quality 75": _jpeg,
    # a Mono12 pixel format: 12-bit values in 16-bit files, read against 65535 as white
    "12-bit data in 16-bit files (Mono12)": lambda img: img * np.float32(16 * 255 / 65535),
    # a longer exposure or a higher gain: 1.5 times as bright, clipped at white
    "exposure 1.5x, clipped at white": lambda img: np.clip(img * 1.5, 0, 1),
}
# the file's compression each variant's images came in (the others: as trained, lossless PNG)
COMPRESSION = {"saved as JPEG, quality 75": "lossy"}


def _check_cost_us(check: ImageCheck, feature_type: str, image: np.ndarray, calls: int = 200) -> float:
    """Median microseconds of one image check (``inspection.ImageCheck``, every check) of ``image``."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        check(feature_type, image.shape[0], image.shape[1], image, "lossless")
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def _inspect_ms(det: Detector, feature_type: str, image: np.ndarray, calls: int = 30) -> dict[str, float]:
    """Median milliseconds of ``det.inspect([image])`` with the image check and without it (the
    two alternating, after a warm-up call of each, in one process)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(2 * calls + 2):
            checked = i % 2 == 0
            t0 = time.perf_counter()
            det.inspect([image], [feature_type], all_types=False, check_images=checked)
            if i >= 2:
                times[checked].append(time.perf_counter() - t0)
    return {"checked": float(np.median(times[True]) * 1e3), "unchecked": float(np.median(times[False]) * 1e3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/diffqc-image-size"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--costs-only", action="store_true", help="fit, then the check's costs alone")
    args = ap.parse_args()
    data = args.out / "data"
    if not (data / ".diffqc-synth.json").is_file():
        write_synthetic_dataset(data, progress=False)
    samples = load_manifest(data / "manifest.csv")
    test = [s for s in samples if s.split == "test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = Detector(DetectorConfig(), device="cpu").fit(samples, progress=False)
    y = np.array([s.label != GOOD for s in test])
    types = np.array([s.feature_type for s in test])

    def measure(det: Detector, change: Callable[[np.ndarray], np.ndarray],
                compression: str = "lossless") -> dict[str, Any]:
        images = [change(read_image(s.path)) for s in test]
        check = ImageCheck(det.metadata)
        named = sum(check(s.feature_type, img.shape[0], img.shape[1], img, compression) is not None
                    for s, img in zip(test, images, strict=True))
        res = det.inspect(images, [s.feature_type for s in test], check_images=False)  # counted above
        flagged = np.array([r.decision != "PASS" for r in res])
        scores = np.array([r.score for r in res])
        aurocs = [roc_auc_score(y[types == t], scores[types == t]) for t in det.classes_
                  if 0 < y[types == t].sum() < (types == t).sum()]
        return {"size": f"{images[0].shape[1]}x{images[0].shape[0]}",
                "good_flagged": float(flagged[~y].mean()), "defects_flagged": float(flagged[y].mean()),
                "mean_image_auroc": float(np.mean(aurocs)), "types_named": named,
                "n_good": int((~y).sum()), "n_defective": int(y.sum())}

    rows = {} if args.costs_only else {name: measure(det, change, COMPRESSION.get(name, "lossless"))
                                       for name, change in VARIANTS.items()}
    if not args.costs_only:
        # the camera changed on purpose, recalibrated (not retrained): `diffqc calibrate` on GOOD
        # images of another synthetic set (seed 1), stretched as the test parts are
        stretch = VARIANTS["aspect 1.25 : 1"]
        recal = args.out / "recalibration"
        if recal.exists():
            shutil.rmtree(recal)
        write_synthetic_dataset(recal / "source", seed=1, progress=False)
        for s in load_manifest(recal / "source" / "manifest.csv"):
            if s.label == GOOD and s.split == "train":
                target = recal / "data" / s.feature_type / "train" / "good" / s.path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(stretch(read_image(s.path)), 0, 1) * 255 + 0.5
                Image.fromarray(pixels.astype(np.uint8)).save(target)
        det.save(recal / "model")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recalibrate(recal / "model", recal / "data")
        rows["aspect 1.25 : 1, recalibrated"] = measure(Detector.load(recal / "model", device="cpu"), stretch)
    print(f"{'images':<44}{'size':>9}{'GOOD flagged':>14}{'defects flagged':>17}{'mean AUROC':>12}"
          f"{'types named':>13}")
    for name, r in rows.items():
        print(f"{name:<44}{r['size']:>9}{r['good_flagged']:>14.1%}{r['defects_flagged']:>17.1%}"
              f"{r['mean_image_auroc']:>12.3f}{r['types_named']:>10} / {len(det.classes_)}")
    image = read_image(test[0].path)
    check = ImageCheck(det.metadata)
    cost = {f"{image.shape[1]}x{image.shape[0]}": _check_cost_us(check, test[0].feature_type, image),
            "2048x2048": _check_cost_us(check, test[0].feature_type, _resize(image, 2048, 2048))}
    print("image check per part (median of 200): " + ", ".join(f"{k} {v:.0f} µs" for k, v in cost.items()))

    def camera(img: np.ndarray) -> np.ndarray:  # a camera SDK's frame, as the Python API is given it
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    api = {"256x256": _inspect_ms(det, test[0].feature_type, camera(image)),
           "2048x2048": _inspect_ms(det, test[0].feature_type, camera(_resize(image, 2048, 2048)))}
    print("Detector.inspect of one uint8 part (median of 30), checked / unchecked: "
          + ", ".join(f"{k} {v['checked']:.1f} / {v['unchecked']:.1f} ms" for k, v in api.items()))
    if args.json:
        args.json.write_text(json.dumps({**rows, "image_check_us": cost, "inspect_ms": api}, indent=1))


if __name__ == "__main__":
    main()
