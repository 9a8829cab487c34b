"""Resident memory of a serving process: an exported bundle on ONNX Runtime or OpenVINO, no torch.

Runs each measurement in a fresh Python process (so that nothing else is resident) that loads
the bundle with ``diffqc.runtime.load_detector``, inspects ``--images`` random images (type given,
or withheld with ``--unknown``; every type scored too, as the service does unless ``--fast``) and
reports, from ``/proc/self/status``, the resident memory
after loading and after inspecting (``VmRSS``, split into anonymous memory and file pages: the
graph's constants are memory-mapped), the peak (``VmHWM``), the median time of an inspection and
whether torch was imported. Linux only.

    python benchmarks/serving_memory.py MODEL [--runtime onnx|openvino] [--unknown] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import json, statistics, sys, time
import numpy as np

def status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out

from diffqc.runtime import load_detector

model, runtime = sys.argv[1], sys.argv[2]
threads, n, unknown, fast = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1"
det = load_detector(model, runtime, threads=threads)
loaded = status()
rng = np.random.default_rng(0)
ftype = None if unknown else det.classes_[0]
times = []
for _ in range(n):
    image = rng.uniform(0, 1, (256, 256, 3)).astype(np.float32)
    t0 = time.perf_counter()
    det.inspect([image], [ftype], all_types=not fast)
    times.append(time.perf_counter() - t0)
print(json.dumps({"loaded": loaded, "inspected": status(),
                  "median_ms": round(1000 * statistics.median(times), 1),
                  "torch_imported": "torch" in sys.modules}))
"""


def run_fresh(child: str, argv: list[str], threads: int) -> dict[str, Any]:
    """The JSON object that a fresh Python process running ``child`` with ``argv`` (and
    ``threads`` OpenMP threads) prints last; a process that fails ends the benchmark with its
    error output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"the measured process failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(model: Path, runtime: str, threads: int, images: int, unknown: bool,
            fast: bool) -> dict[str, Any]:
    """One fresh process's memory and inspection time (see the module docstring)."""
    return run_fresh(CHILD, [str(model), runtime, str(threads), str(images), "1" if unknown else "0",
                             "1" if fast else "0"], threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path, help="an exported bundle (diffqc export)")
    p.add_argument("--runtime", default="onnx", choices=["onnx", "openvino"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--unknown", action="store_true", help="withhold the type (the router names it)")
    p.add_argument("--fast", action="store_true",
                   help="score the given type only, as `diffqc serve --fast` (default: every type too)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes; the median is reported")
    args = p.parse_args(argv)
    runs = [measure(args.model, args.runtime, args.threads, args.images, args.unknown, args.fast)
            for _ in range(args.repeats)]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]  # a measured run's value, not an average of two

    def memory(stage: str, key: str) -> float:
        return median([r[stage][key] for r in runs])

    onnx = args.model / "model.onnx"
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "model": str(args.model),
        "onnx_mb": round(onnx.stat().st_size / 1e6, 1) if onnx.is_file() else None,
        "runtime": args.runtime, "threads": args.threads, "unknown_type": args.unknown, "fast": args.fast,
        "load": os.getloadavg(), "torch_imported": any(r["torch_imported"] for r in runs),
        "rss_loaded_mb": memory("loaded", "VmRSS"), "rss_mb": memory("inspected", "VmRSS"),
        "anon_mb": memory("inspected", "RssAnon"), "file_mb": memory("inspected", "RssFile"),
        "peak_mb": memory("inspected", "VmHWM"),
        "median_ms": median([r["median_ms"] for r in runs]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
