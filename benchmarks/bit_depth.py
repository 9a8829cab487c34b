"""Does a 10/12-bit camera's data saved in 16-bit files cost detection quality?

diffqc reads a 16-bit image on the 16-bit scale, so a 12-bit camera's white (4095) comes in at
6 % of white: the backbone sees dark, low-contrast images. This benchmark writes the embedded
synthetic set once in 8 bits and once as 12-bit data in 16-bit PNGs (each gray value x 16, masks
unchanged, the same manifest), runs the same grouped 5-fold CV of ``diffqc evaluate`` on both
(the same parts, so the same folds), and prints the mean per-type image AUROC and the pooled pixel
AUROC of each method.

    OMP_NUM_THREADS=2 python benchmarks/bit_depth.py [--out /tmp/bit-depth] [--methods diffusion,padim]
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from diffqc.data import load_manifest
from diffqc.evaluate import evaluate
from diffqc.synth import write_synthetic_dataset


def as_twelve_bit(src: Path, dst: Path) -> Path:
    """``src`` (8-bit PNGs) with every image's gray value x 16 in a 16-bit PNG (0-4080)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "manifest.csv", dst / "manifest.csv")  # relative paths: the same parts
    for p in sorted(src.rglob("*.png")):
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in p.parts:
            shutil.copy(p, q)
        else:
            Image.fromarray(np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16).save(q)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/diffqc-bit-depth"))
    ap.add_argument("--methods", default="diffusion,padim")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    eight = args.out / "eight-bit"
    if not (eight / ".diffqc-synth.json").is_file():
        write_synthetic_dataset(eight, progress=False)
    twelve = args.out / "twelve-bit"
    if not twelve.is_dir():
        as_twelve_bit(eight, twelve)
    rows = {}
    for name, root in (("8-bit", eight), ("12-bit in 16-bit files", twelve)):
        samples = load_manifest(root / "manifest.csv")  # as diffqc evaluate reads a folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = evaluate(samples, folds=args.folds, methods=tuple(args.methods.split(",")),
                           progress=False, out_dir=args.out / f"report-{root.name}", force=True)
        for m in args.methods.split(","):
            per_type = [rep["results"][t][m]["pooled"]["auroc"] for t in sorted(rep["results"])]
            rows[(name, m)] = (float(np.mean(per_type)), rep["overall"][m]["pooled"].get("pixel_auroc"))
    print(f"{'images':<24}{'method':<11}{'mean image AUROC':>18}{'pixel AUROC':>13}")
    for (name, m), (img, pix) in rows.items():
        print(f"{name:<24}{m:<11}{img:>18.4f}{pix:>13.4f}")
    print(json.dumps({f"{n} | {m}": v for (n, m), v in rows.items()}))


if __name__ == "__main__":
    main()
