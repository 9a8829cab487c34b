"""The exported scorer's time per image at a line's table sizes, by the bundle's storage: the
graph's scorer half (features -> map and score, as ``inspect --runtime onnx|openvino`` runs it
after the backbone) on ONNX Runtime and OpenVINO, for a model fitted on random features of
``--per-type`` GOOD images per type (the size of its tables, and of the image context's
``k = min(64, n / 8)`` components, is what the time depends on; ``benchmarks/latency.py`` times
a trained model end to end, but its small synthetic set gives the context one component).

Each storage is fitted and exported in turn; every graph is then timed in interleaved rounds in
one process (``--rounds`` rounds of ``--runs`` calls each, median), at batch 1 and ``--batch``,
with ``--threads`` threads, each image under the type given.

    python benchmarks/graph_speed.py --types 2 --per-type 600 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffqc.backends.graph import SplitGraph
from diffqc.backends.ort import OnnxGraph
from diffqc.export import build_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_size import random_detector

STORAGES = ("float16", "int8")


def graphs(types: int, per_type: int, threads: int, runtimes: list[str]) -> tuple[dict[str, SplitGraph], Any]:
    """``{"STORAGE RUNTIME": graph}`` of a model fitted at each storage, and a few raw features."""
    out: dict[str, SplitGraph] = {}
    feats = None
    for storage in STORAGES:
        det, raw = random_detector(types, {"train.steps": 0, "diffusion.prior_storage": storage}, per_type)
        model = build_onnx(det)
        if feats is None:
            feats = det.extractor.standardise(raw[:32]).numpy()
        for runtime in runtimes:
            if runtime == "onnx":
                out[f"{storage} onnx"] = OnnxGraph(model, threads=threads)
            else:
                from diffqc.backends.openvino import OpenVinoGraph

                out[f"{storage} openvino"] = OpenVinoGraph(model, threads=threads)
        context = getattr(det.scorer_, "context_", None)
        print(f"{storage}: context k {context.components if context is not None else 0}",
              file=sys.stderr, flush=True)
    return out, feats


def timed(graphs: dict[str, SplitGraph], feats: np.ndarray, types: int, batches: list[int],
          rounds: int, runs: int) -> dict[tuple[str, int], float]:
    """Median ms per image of each graph at each batch size, over interleaved rounds."""
    times: dict[tuple[str, int], list[float]] = {(g, b): [] for g in graphs for b in batches}
    for _ in range(rounds):
        for b in batches:
            x, idx = feats[:b], np.arange(b, dtype=np.int64) % types
            for name, graph in graphs.items():
                graph.score_features(x, idx)  # warm
                for _ in range(runs):
                    start = time.perf_counter()
                    graph.score_features(x, idx)
                    times[(name, b)].append((time.perf_counter() - start) * 1e3 / b)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", type=int, default=2)
    p.add_argument("--per-type", type=int, default=600, help="GOOD images per type the model is fitted on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--runtimes", default="onnx,openvino")
    args = p.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    found, feats = graphs(args.types, args.per_type, args.threads, runtimes)
    batches = sorted({1, args.batch})
    ms = timed(found, feats, args.types, batches, args.rounds, args.runs)
    print(f"scorer half of the exported graph, ms per image (median of {args.rounds} x {args.runs} "
          f"runs), {args.types} types at {args.per_type} GOOD images each, {args.threads} threads")
    print("| storage | runtime | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for name in found:
        storage, runtime = name.split()
        print(f"| {storage} | {runtime} | " + " | ".join(f"{ms[(name, b)]:.2f}" for b in batches) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
