"""Does a 10/12-bit camera's data saved in 16-bit files cost detection quality?

diffqc reads a 16-bit image on the 16-bit scale, so a 12-bit camera's white (4095) comes in at
6 % of white: the backbone sees dark, low-contrast images. This benchmark writes a dataset (the
embedded synthetic set, or ``--data``: an MVTec-layout folder) once in 8 bits and once as 12-bit
data in 16-bit PNGs (each gray value x 16, masks unchanged, the same parts), runs the same grouped
5-fold CV of ``diffqc evaluate`` on both (the same parts, so the same folds), the 12-bit copy also
at ``backbone.input_gain = 65535 / 4095`` (what ``train`` names for such files), and prints the
mean per-type image AUROC and the pooled pixel AUROC of each method.

    OMP_NUM_THREADS=2 python benchmarks/bit_depth.py [--data DIR] [--out /tmp/bit-depth]
        [--methods diffusion,padim]
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from diffqc.config import DetectorConfig, with_overrides
from diffqc.data import IMAGE_SUFFIXES, load_dataset
from diffqc.evaluate import evaluate
from diffqc.synth import write_synthetic_dataset


def as_twelve_bit(src: Path, dst: Path) -> Path:
    """``src`` (8-bit images; a synthetic set's manifest, or an MVTec layout) with every image's
    gray value x 16 in a 16-bit PNG of the same name (0-4080); masks copied as they are."""
    dst.mkdir(parents=True)
    if (src / "manifest.csv").is_file():
        shutil.copy(src / "manifest.csv", dst / "manifest.csv")  # relative paths: the same parts
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in p.parts:
            shutil.copy(p, q)
        else:
            grey = np.asarray(Image.open(p).convert("L"), dtype=np.uint16)
            Image.fromarray(grey * 16).save(q.with_suffix(".png"))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="an 8-bit MVTec-layout folder (default: the embedded synthetic set)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/diffqc-bit-depth"))
    ap.add_argument("--methods", default="diffusion,padim")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    eight = args.data or args.out / "eight-bit"
    if args.data is None and not (eight / ".diffqc-synth.json").is_file():
        write_synthetic_dataset(eight, progress=False)
    twelve = args.out / f"twelve-bit-{eight.name}"
    if not twelve.is_dir():
        as_twelve_bit(eight, twelve)
    gain = with_overrides(DetectorConfig(), {"backbone.input_gain": 65535 / 4095})
    rows = {}
    for name, root, config in (("8-bit", eight, None), ("12-bit in 16-bit files", twelve, None),
                               ("12-bit, gain 16.0037", twelve, gain)):
        samples = load_dataset(root)  # as diffqc evaluate reads a folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = evaluate(samples, folds=args.folds, methods=tuple(args.methods.split(",")),
                           base_config=config, progress=False,
                           out_dir=args.out / f"report-{root.name}-{'gain' if config else 'plain'}",
                           force=True)
        for m in args.methods.split(","):
            per_type = [rep["results"][t][m]["pooled"]["auroc"] for t in sorted(rep["results"])]
            rows[(name, m)] = (float(np.mean(per_type)), rep["overall"][m]["pooled"].get("pixel_auroc"))
    print(f"{'images':<24}{'method':<11}{'mean image AUROC':>18}{'pixel AUROC':>13}")
    for (name, m), (img, pix) in rows.items():
        print(f"{name:<24}{m:<11}{img:>18.4f}{pix:>13.4f}")
    print(json.dumps({f"{n} | {m}": v for (n, m), v in rows.items()}))


if __name__ == "__main__":
    main()
