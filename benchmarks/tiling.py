"""Any shape, any size (issue 13, item 1): squash vs pad vs tiling on a tall-crop set and a
large-image set built at run time from ../shared/datasets -> image AUROC, pixel AUROC, ms per part.

    python benchmarks/tiling.py                                   # every set, small subsets
    python benchmarks/tiling.py --sets magnetic_tile --train 100 --test-good 40 --test-bad 40
    python benchmarks/tiling.py --set method=padim --json out.json

Sets (nothing is written into the project; mosaics go to a temporary folder):
- ``magnetic_tile``: the tiles at their native, varying sizes (103-632 x 222-403 px, mostly tall).
- ``bottle512``: MVTec bottle at 512 x 512 (as stored in ../shared/datasets).
- ``mosaic1024``: 1024 x 1024 mosaics of four bottle images (2 x 2); a defective mosaic has the
  defect in one quadrant (its mask placed there), the other three are GOOD images not trained on.

Geometries: ``squash`` (the default: the whole image resized to the input), ``pad`` (letterbox,
aspect kept), ``tile`` (tiling.mode=auto at native resolution: input-sized tiles, 25 % overlap)
and for the mosaics also ``tile@0.5`` (tiles of the image at half size). Every geometry trains its
own model on the same GOOD images and is scored on the same test images, one part per call,
after an untimed warm-up call (``ms_per_part``: the median part's wall clock;
``cpu_ms_per_part``: the median part's process CPU time, all threads, which a busy machine
disturbs less). Pixel AUROC is computed on maps and masks resized to at most 256 px on
the long side (aspect kept).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import DEFECTIVE, GOOD, Sample, load_dataset, read_image, read_mask
from diffqc.metrics import image_auroc, pixel_auroc
from diffqc.model import Detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
GEOMETRIES: dict[str, dict[str, Any]] = {
    "squash": {},
    "pad": {"backbone.resize": "pad"},
    "tile": {"tiling.mode": "auto"},
    "tile@0.5": {"tiling.mode": "auto", "tiling.scale": 0.5},
}
EVAL_SIDE = 256


def _subset(samples: list[Sample], n_train: int, n_good: int, n_bad: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)

    def pick(xs: list[Sample], n: int) -> list[Sample]:
        return [xs[i] for i in sorted(rng.permutation(len(xs))[:n])]

    train = [s for s in samples if s.split == "train" and s.label == GOOD]
    good = [s for s in samples if s.split == "test" and s.label == GOOD]
    bad = [s for s in samples if s.split == "test" and s.label == DEFECTIVE]
    return pick(train, n_train) + pick(good, n_good) + pick(bad, n_bad)


def mosaics(bottle: list[Sample], out: Path, n_train: int, n_good: int, n_bad: int,
            seed: int) -> list[Sample]:
    """2 x 2 mosaics of 512 px bottle images: GOOD ones from GOOD images, defective ones with one
    defective image in a random quadrant; training mosaics never share an image with test ones."""
    rng = np.random.default_rng(seed)
    train_good = [s for s in bottle if s.split == "train" and s.label == GOOD]
    order = rng.permutation(len(train_good))
    fit_pool = [train_good[i] for i in order[: 4 * n_train]]
    spare = [train_good[i] for i in order[4 * n_train:]]
    test_pool = spare + [s for s in bottle if s.split == "test" and s.label == GOOD]
    bad = [s for s in bottle if s.split == "test" and s.label == DEFECTIVE]
    bad = [bad[i] for i in rng.permutation(len(bad))[:n_bad]]
    out.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []

    def write(name: str, parts: list[Sample], split: str, defect_at: int | None) -> None:
        tiles = [np.asarray(Image.open(p.path).convert("RGB").resize((512, 512))) for p in parts]
        img = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        Image.fromarray(img).save(out / f"{name}.png")
        mask_path = None
        if defect_at is not None:
            mask = np.zeros((1024, 1024), np.uint8)
            m = read_mask(parts[defect_at].mask_path, (512, 512))
            y, x = divmod(defect_at, 2)
            mask[512 * y: 512 * (y + 1), 512 * x: 512 * (x + 1)] = m * 255
            mask_path = out / f"{name}_mask.png"
            Image.fromarray(mask).save(mask_path)
        samples.append(Sample(out / f"{name}.png", "bottle", GOOD if defect_at is None else DEFECTIVE,
                              mask_path, split=split, defect="good" if defect_at is None else "mosaic"))

    for i in range(n_train):
        write(f"train_{i:03d}", fit_pool[4 * i: 4 * i + 4], "train", None)
    for i in range(n_good):
        write(f"good_{i:03d}", [test_pool[j] for j in rng.choice(len(test_pool), 4, replace=False)],
              "test", None)
    for i, b in enumerate(bad):
        fill = [test_pool[j] for j in rng.choice(len(test_pool), 3, replace=False)]
        at = int(rng.integers(4))
        write(f"bad_{i:03d}", [*fill[:at], b, *fill[at:]], "test", at)
    return samples


def _eval_size(h: int, w: int) -> tuple[int, int]:
    s = EVAL_SIDE / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def run_geometry(samples: list[Sample], config: DetectorConfig, device: str) -> dict[str, Any]:
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    t0 = time.perf_counter()
    det = Detector(config, device=device).fit(train, progress=False)
    fit_s = time.perf_counter() - t0
    scores, labels, masks, maps = [], [], [], []
    spent: list[float] = []
    cpu: list[float] = []
    det.inspect([read_image(test[0].path)], [test[0].feature_type], all_types=False)  # warm-up
    for s in test:
        img = read_image(s.path)
        t, c = time.perf_counter(), time.process_time()
        (res,) = det.inspect([img], [s.feature_type], all_types=False)
        spent.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        scores.append(res.score)
        labels.append(int(s.label == DEFECTIVE))
        if s.mask_path is not None or s.label == GOOD:
            assert res.anomaly_map is not None
            hw = _eval_size(*res.anomaly_map.shape)
            amap = np.asarray(Image.fromarray(res.anomaly_map.astype(np.float32)).resize(
                (hw[1], hw[0]), Image.Resampling.BILINEAR))
            maps.append(amap)
            masks.append(read_mask(s.mask_path, hw))
    return {"image_auroc": round(image_auroc(labels, scores), 4),
            "pixel_auroc": round(pixel_auroc(masks, maps), 4),
            "ms_per_part": round(1000 * float(np.median(spent)), 1),
            "cpu_ms_per_part": round(1000 * float(np.median(cpu)), 1), "fit_s": round(fit_s, 1),
            "train": len(train), "test_good": labels.count(0), "test_defective": labels.count(1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="magnetic_tile,bottle512,mosaic1024")
    ap.add_argument("--geometries", default=None, help="comma list (default: per set)")
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test-good", type=int, default=20)
    ap.add_argument("--test-bad", type=int, default=30)
    ap.add_argument("--mosaic-train", type=int, default=20)
    ap.add_argument("--mosaic-good", type=int, default=10)
    ap.add_argument("--mosaic-bad", type=int, default=15)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every model (default: method=padim)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = with_overrides(DetectorConfig(), {"method": "padim", **parse_overrides(args.set)})
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffqc-tiling-") as tmp:
        for name in args.sets.split(","):
            if name == "magnetic_tile":
                samples = _subset(load_dataset(SHARED / "magnetic_tile"), args.train, args.test_good,
                                  args.test_bad, args.seed)
                geos = ["squash", "pad", "tile"]
            elif name == "bottle512":
                samples = _subset(load_dataset(SHARED / "mvtec_bottle"), args.train, args.test_good,
                                  args.test_bad, args.seed)
                geos = ["squash", "tile"]
            elif name == "mosaic1024":
                samples = mosaics(load_dataset(SHARED / "mvtec_bottle"), Path(tmp) / "mosaic",
                                  args.mosaic_train, args.mosaic_good, args.mosaic_bad, args.seed)
                geos = ["squash", "tile@0.5", "tile"]
            else:
                raise SystemExit(f"unknown set {name!r}")
            for geo in (args.geometries.split(",") if args.geometries else geos):
                config = with_overrides(base, GEOMETRIES[geo])
                row = {"set": name, "geometry": geo, **run_geometry(samples, config, args.device)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": base.to_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
