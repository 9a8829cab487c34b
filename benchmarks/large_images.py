"""Peak memory and wall time of ``diffqc train``, ``calibrate`` and ``evaluate`` on camera-sized
images.

Industrial cameras deliver 5-20 megapixels; the model sees 256 px. This benchmark writes a seeded
synthetic set of such frames (default: 40 GOOD training, 10 GOOD and 10 defective test images of
4000 x 3000 px, JPEG) into ``--cache`` once, then runs each command in a fresh process for every
source tree given: ``--baseline SRC`` (an older checkout's ``src/``) beside this checkout, in the
same run and interleaved, ``--repeats`` times each, and prints the median wall time and the
median peak resident memory of each (command, tree).

    OMP_NUM_THREADS=2 python benchmarks/large_images.py [--baseline /tmp/old/src] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# run in the child: the command, then its own peak RSS (KiB on Linux) on the last stderr line
CHILD = ("import json, resource, sys\n"
         "from diffqc.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),"
         " file=sys.stderr)\n"
         "raise SystemExit(rc)\n")


def write_frames(root: Path, size: tuple[int, int], n_train: int, n_test: int, seed: int = 0) -> Path:
    """A one-type MVTec-layout set of ``size`` (H, W) frames: a lit gradient with row noise;
    defective frames carry a dark square. Written once (a marker names its parameters)."""
    from PIL import Image

    marker = root / "frames.json"
    meta = {"size": list(size), "n_train": n_train, "n_test": n_test, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return root
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.linspace(0, 127, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    folders = {"train/good": n_train, "test/good": n_test, "test/dark_spot": n_test}
    for folder, count in folders.items():
        (root / "part" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = base + 60 + rng.normal(0, 8, (h, 1, 1)).astype(np.float32)
            if folder == "test/dark_spot":
                y, x = int(rng.integers(h // 6, 5 * h // 6)), int(rng.integers(w // 6, 5 * w // 6))
                r = h // 15
                img[y - r : y + r, x - r : x + r] = 10
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "part" / folder / f"{i:03d}.jpg",
                                                                    quality=85)
    marker.write_text(json.dumps(meta))
    return root


def run_once(src: Path, argv: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "{}"
    try:
        info = json.loads(last)
    except ValueError:
        info = {}
    if proc.returncode != 0 or "maxrss_kb" not in info:
        raise RuntimeError(f"{' '.join(argv)} failed under {src}:\n{proc.stderr[-2000:]}")
    return {"seconds": seconds, "peak_mb": info["maxrss_kb"] / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path,
                   default=Path.home() / ".cache" / "diffqc" / "large-frames")
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--train", type=int, default=40, help="GOOD training frames")
    p.add_argument("--test", type=int, default=10, help="GOOD and defective test frames, each")
    p.add_argument("--baseline", type=Path, default=None, help="an older checkout's src/ to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    data = write_frames(args.cache, (args.height, args.width), args.train, args.test)
    trees = {"this checkout": REPO / "src"}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for tree, src in trees.items():  # interleaved: the machine's noise falls on both
            with tempfile.TemporaryDirectory() as tmp:
                commands = {
                    "train": ["train", str(data), "--out", f"{tmp}/model", "-q"],
                    "calibrate (the trained model)": ["calibrate", f"{tmp}/model", str(data), "-q"],
                    "evaluate (PaDiM, 2 folds)": ["evaluate", str(data), "--methods", "padim",
                                                  "--folds", "2", "--out", f"{tmp}/report", "-q"],
                }
                for name, command in commands.items():
                    runs.setdefault((name, tree), []).append(run_once(src, command))
    n_frames = args.train + 2 * args.test
    print(f"{n_frames} frames of {args.width} x {args.height} px ({args.train} GOOD for training), "
          f"{args.repeats} runs each, medians")
    print("| command | tree | wall time (s) | peak resident memory (MB) |")
    print("|---|---|---|---|")
    rows = []
    for (name, tree), rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        mb = statistics.median(r["peak_mb"] for r in rs)
        rows.append({"command": name, "tree": tree, "seconds": sec, "peak_mb": mb, "runs": rs})
        print(f"| {name} | {tree} | {sec:.1f} | {mb:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"frames": n_frames, "size": [args.height, args.width],
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
