"""Long thin crops (an edge's strip, 4:1 or 8:1) from an MVTec-layout set, for `diffqc evaluate`
to measure squash against pad on images far from square (BENCHMARKS.md "Session 59").

    python benchmarks/strips.py ../shared/datasets/mvtec_bottle /tmp/strips/r4 --ratio 4
    diffqc evaluate /tmp/strips/r4 --methods diffusion,padim \\
        --compare-setting diffusion_pad:backbone.resize=pad \\
        --compare-setting padim_pad:method=padim,backbone.resize=pad

Each image becomes its central horizontal band, as wide as the image and 1/RATIO as tall; its
mask the same band. A defective image whose defect lies outside its band is left out (it would
be a GOOD image labelled defective). Nothing is written into the project: OUT is a new folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from diffqc.data import DEFECTIVE, load_dataset


def band(size: tuple[int, int], ratio: int) -> tuple[int, int, int, int]:
    """The central horizontal band of an image of ``size`` (width, height), 1/ratio as tall."""
    width, height = size
    tall = max(1, height // ratio)
    top = (height - tall) // 2
    return (0, top, width, top + tall)


def write_strips(data: Path, out: Path, ratio: int) -> dict[str, int]:
    """Write the strips of every image of ``data`` under ``out`` in MVTec layout; returns how many
    images were written and how many defective ones were left out."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    written = left_out = 0
    for s in load_dataset(data):
        image = Image.open(s.path)
        box = band(image.size, ratio)
        kind = s.defect or "good"
        folder = out / s.feature_type / s.split / kind
        if s.label == DEFECTIVE:
            if s.mask_path is None:
                raise SystemExit(f"{s.path} has no mask: its strip cannot be labelled")
            mask = Image.open(s.mask_path).crop(box)
            if not np.asarray(mask).any():
                left_out += 1
                continue
            masks = out / s.feature_type / "ground_truth" / kind
            masks.mkdir(parents=True, exist_ok=True)
            mask.save(masks / f"{Path(s.path).stem}_mask.png")
        folder.mkdir(parents=True, exist_ok=True)
        image.crop(box).save(folder / f"{Path(s.path).stem}.png")
        written += 1
    return {"written": written, "defective_left_out": left_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="an MVTec-layout dataset (with masks)")
    ap.add_argument("out", type=Path, help="a new folder")
    ap.add_argument("--ratio", type=int, default=4, help="width : height of the strips (default 4)")
    args = ap.parse_args()
    print(write_strips(args.data, args.out, args.ratio))


if __name__ == "__main__":
    main()
