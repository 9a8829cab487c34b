"""Peak memory and time of one ``det.inspect(images)`` call given a whole test set at once, as
the README's Python API is used from a notebook.

Each measurement runs in a fresh Python process that loads the bundle with
``diffqc.runtime.load_detector``, makes ``--images`` random frames of ``--size`` pixels (types
given) and inspects them in one call, every type scored too (the call's default) unless
``--fast``. It reports the peak resident memory (``VmHWM``) and the call's time, in two ways in
the same run: ``batches`` (the bundle's ``batch_size`` images at a time, as ``inspect`` scores a
long list since session 34) and ``one pass`` (``batch_size`` raised to the list's length: every
image in one pass, as it scored before). Median of ``--repeats`` processes. Linux only.

    python benchmarks/api_memory.py MODEL [--images 200] [--size 256] [--runtime torch|onnx] [--fast]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

from serving_memory import run_fresh  # a sibling script: run as python benchmarks/api_memory.py

CHILD = r"""
import json, sys, time
from dataclasses import replace
import numpy as np
from diffqc.runtime import load_detector

model, runtime, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
one_pass, fast = sys.argv[5] == "1", sys.argv[6] == "1"
det = load_detector(model, runtime, threads=2, device="cpu")
if one_pass:
    det.config = replace(det.config, batch_size=n)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
t0 = time.perf_counter()
results = det.inspect(images, [det.classes_[i % len(det.classes_)] for i in range(n)], all_types=not fast)
seconds = time.perf_counter() - t0
with open("/proc/self/status") as fh:
    peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
print(json.dumps({"peak_mb": round(peak), "seconds": round(seconds, 1), "results": len(results),
                  "batch_size": det.config.batch_size}))
"""


def measure(model: Path, runtime: str, images: int, size: int, one_pass: bool, fast: bool) -> dict[str, Any]:
    """One fresh process's peak memory and call time (see the module docstring)."""
    return run_fresh(CHILD, [str(model), runtime, str(images), str(size), "1" if one_pass else "0",
                             "1" if fast else "0"], threads=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path, help="a model bundle (the README demo's: diffqc-demo/model)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256, help="frame side in pixels")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "openvino"])
    p.add_argument("--fast", action="store_true", help="score the given type only (all_types=False)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per way; the median is reported")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                              "model": str(args.model), "runtime": args.runtime, "images": args.images,
                              "size": args.size, "all_types": not args.fast}
    for way, one_pass in (("batches", False), ("one pass", True)):
        runs = [measure(args.model, args.runtime, args.images, args.size, one_pass, args.fast)
                for _ in range(args.repeats)]
        report[way] = {"peak_mb": statistics.median(r["peak_mb"] for r in runs),
                       "seconds": statistics.median(r["seconds"] for r in runs),
                       "batch_size": runs[0]["batch_size"]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
