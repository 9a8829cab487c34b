"""A fit's peak memory after the backbone: a model fitted (``Detector.fit_features``, the
default config and ``--set``'s settings) on random raw features of N GOOD images of each of T
types (``--sizes TxN,...``), each size in a process of its own; the peak resident memory above
the features, beside the per-location tables that the fit's memory check counts with them
(:func:`diffqc.model.fit_bytes`).

    python benchmarks/fit_memory.py --sizes 1x600,8x150 [--set calibration.scheme=cross]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import GOOD, Sample
from diffqc.model import Detector, fit_bytes

MIB = 2**20


def peak_rss() -> int:
    """This process's peak resident memory so far, bytes (Linux's ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(types: int, per_type: int, settings: list[str], seed: int = 0) -> dict[str, float]:
    """Fit once in this process; MiB and seconds."""
    det = Detector(with_overrides(DetectorConfig(), parse_overrides(settings)), device="cpu")
    c, grid = det.extractor.channels, det.extractor.grid
    n = types * per_type
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, c, *grid, generator=gen).mul_(torch.rand(c, 1, 1, generator=gen) * 3)  # in place:
    # the peak before the fit is then the features' and the process's own
    good = [Sample(Path(f"t{i % types}_{i}.png"), f"type{i % types}", GOOD, part_id=str(i), split="train")
            for i in range(n)]
    before = peak_rss()
    t0 = time.perf_counter()
    det.fit_features(raw, good)
    seconds = time.perf_counter() - t0
    _, model = fit_bytes(det.config, grid, c, types, n)
    return {"features_mib": raw.numel() * 4 / MIB, "before_mib": before / MIB,
            "peak_above_mib": (peak_rss() - before) / MIB, "bound_model_mib": model / MIB,
            "fit_s": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1x600,8x150", help="TYPESxPER_TYPE, comma-separated")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config setting")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a size, measured in this process
    args = ap.parse_args()
    if args.one:
        types, per_type = (int(v) for v in args.one.split("x"))
        print(json.dumps(measure(types, per_type, args.set)))
        return 0
    print("| types x GOOD images | features MiB | fit's peak above them, MiB | the check's Gaussians, MiB "
          "| fit s |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        settings = [f"--set={s}" for s in args.set]
        out = subprocess.run([sys.executable, __file__, "--one", size, *settings], capture_output=True,
                             text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {size} | {got['features_mib']:.0f} | {got['peak_above_mib']:.0f} | "
              f"{got['bound_model_mib']:.0f} | {got['fit_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
