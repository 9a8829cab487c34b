"""Build a TensorRT FP16 engine from a bundle's ONNX export and measure it, where a GPU exists.

    python scripts/build_tensorrt.py MODEL [--data DATA] [--runs 200] [--max-batch 8]

Needs an NVIDIA GPU and TensorRT (``pip install tensorrt``, or ``trtexec`` on PATH for the
build). Exports ``model.onnx`` first when the bundle has none. Prints the build time, the
latency of one part through the engine (pixels in host memory -> anomaly map and score back in
host memory; p50 / p99 after warm-up), the throughput with batches, and the parity of the FP16
engine with ONNX Runtime FP32 on the CPU (score error, decisions) on images of ``--data`` (else
synthetic). Exit status 2 when there is no GPU or no TensorRT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", default=None, help="images for the parity check (default: synthetic)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args(argv)

    import onnx
    import torch

    from diffqc.backends.ort import OnnxGraph
    from diffqc.backends.tensorrt import ENGINE_FILE as TENSORRT_ENGINE
    from diffqc.backends.tensorrt import TensorRTGraph, build_tensorrt_engine
    from diffqc.errors import RuntimeUnavailableError
    from diffqc.export import _read_samples, _stratified, _synthetic_images, export_bundle
    from diffqc.runtime import ONNX_FILES, preprocess, read_export_info

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to build", file=sys.stderr)
        return 2
    path: Path = args.model
    if not (path / ONNX_FILES["fp32"]).is_file():
        export_bundle(path, data=args.data)
    info = read_export_info(path)
    size = int(info["inputs"]["pixels"][2])
    classes = info["classes"]
    start = time.perf_counter()
    try:
        engine = build_tensorrt_engine(path / ONNX_FILES["fp32"], path / TENSORRT_ENGINE, input_size=size,
                                       max_batch=args.max_batch)
        trt_graph = TensorRTGraph(engine)
    except RuntimeUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build_s = time.perf_counter() - start

    if args.data:
        from diffqc.data import load_dataset

        samples = [s for s in load_dataset(args.data) if s.feature_type in classes]
        images, samples = _read_samples(_stratified(samples, args.images))
        types = np.array([classes.index(s.feature_type) for s in samples], dtype=np.int64)
    else:
        images = _synthetic_images(args.images, size)
        types = np.arange(len(images), dtype=np.int64) % len(classes)
    pixels = preprocess(images, size)

    times = []
    for i in range(args.warmup + args.runs):
        one = pixels[i % len(pixels)][None]
        t0 = time.perf_counter()
        trt_graph.run(one, types[i % len(types)][None])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * np.asarray(times)
    b = min(args.max_batch, len(pixels))
    t0 = time.perf_counter()
    n_batches = max(5, args.runs // b)
    for _ in range(n_batches):
        trt_graph.run(pixels[:b], types[:b])
    throughput = b * n_batches / (time.perf_counter() - t0)

    cpu = OnnxGraph(onnx.load(str(path / ONNX_FILES["fp32"])))
    ref = np.concatenate([cpu.run(pixels[i: i + b], types[i: i + b])[1] for i in range(0, len(pixels), b)])
    got = np.concatenate([trt_graph.run(pixels[i: i + b], types[i: i + b])[1]
                          for i in range(0, len(pixels), b)])
    from diffqc.calibration import Calibrator

    cal = Calibrator.from_dict(json.loads((path / "calibration.json").read_text()))
    dec_ref = [cal.decide(cal.p_value(classes[t], float(s))) for t, s in zip(types, ref, strict=True)]
    dec_got = [cal.decide(cal.p_value(classes[t], float(s))) for t, s in zip(types, got, strict=True)]
    result = {
        "engine": str(engine), "gpu": torch.cuda.get_device_name(), "build_s": round(build_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "throughput_per_s": round(throughput, 1), "batch": b,
        "max_rel_score_error_vs_onnx_cpu_fp32": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "decisions_equal": f"{sum(a == c for a, c in zip(dec_ref, dec_got, strict=True))}/{len(dec_ref)}",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
