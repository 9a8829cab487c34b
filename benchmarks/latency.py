"""Per-part latency of diffqc on this machine: PyTorch FP32, ONNX Runtime FP32 and INT8, OpenVINO
FP32 and INT8 (the same exported graphs), beside the PatchCore baseline measured in the same run,
with the compute floor.

For each runtime, in a fresh process (so that peak memory is its own), batch 1, ``--threads``
threads, median and p99 of ``--runs`` runs after ``--warmup``:

* end to end per part: PNG bytes -> decode -> preprocess -> backbone -> scoring -> decision
  (p-value, PASS/REVIEW/REJECT, the anomaly map at the image size), the feature type known;
* each of those stages on its own;
* throughput with batches of ``--batch`` parts; peak resident memory.

Threads sleep when idle in both runtimes (``OMP_WAIT_POLICY=PASSIVE`` for PyTorch; ONNX
Runtime sessions of diffqc do not spin): spin-waiting threads on a busy 2-core machine measured
up to 100x slower for PyTorch and 2x for ONNX Runtime.

The floor: the backbone's and the scorer's multiply-adds per image over this machine's measured
matrix-multiply rate (FP32 from a large PyTorch matmul, INT8 from ONNX Runtime's MatMulInteger,
both on ``--threads`` threads), and how far each runtime is from it.

Without ``--model`` it trains the default-sized diffusion model (default network and input
size, few training steps: latency does not depend on training length) on a small synthetic set;
the PatchCore baseline is always trained on the same data in the same run. The diffusion model
is exported (FP32 and INT8) into its bundle.

    python benchmarks/latency.py --json latency.json
    python benchmarks/latency.py --model runs/bottle --data ../shared/datasets/mvtec_bottle
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

STAGES = ("decode", "preprocess", "backbone", "scoring", "decision")
ROWS = (("diffusion", "torch-fp32"), ("diffusion", "onnx-fp32"), ("diffusion", "onnx-int8"),
        ("diffusion", "openvino-fp32"), ("diffusion", "openvino-int8"), ("patchcore", "torch-fp32"))
GRAPH_RUNTIMES = ("onnx", "openvino")  # run the exported graph, without PyTorch in the process


# --------------------------------------------------------------------------- timing helpers
def _timed(fn: Callable[[int], object], runs: int, warmup: int) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


# --------------------------------------------------------------------------- one runtime (worker)
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, runtime) in this process: raw times in ms. Each iteration times every
    stage on its own and then the whole path, so that both see the same machine load."""
    import contextlib

    threads = int(spec["threads"])
    from diffqc.data import decode_image
    from diffqc.runtime import OnnxDetector, preprocess, resize_map

    blobs = [Path(p).read_bytes() for p in spec["images"]]
    types: list[str] = spec["types"]
    runs, warmup, batch = int(spec["runs"]), int(spec["warmup"]), int(spec["batch"])
    n = len(blobs)
    decoded = [decode_image(b) for b in blobs]

    runtime, precision = spec["runtime"].split("-")
    no_grad: Any = contextlib.nullcontext()
    if runtime in GRAPH_RUNTIMES:  # PyTorch stays out of the process (and of its peak memory)
        det: Any = OnnxDetector(spec["model"], precision=precision, threads=threads, runtime=runtime)
        size = det.input_size
        pix = [preprocess([img], size) for img in decoded]
        feats = [det.graph.features(p) for p in pix]
        idx = [np.array([det.type_index(t)], dtype=np.int64) for t in types]
        maps = [det.graph.score_features(feats[i], idx[i]) for i in range(n)]
        stages: dict[str, Callable[[int], object]] = {
            "preprocess": lambda i: preprocess([decoded[i]], size),
            "backbone": lambda i: det.graph.features(pix[i]),
            "scoring": lambda i: det.graph.score_features(feats[i], idx[i]),
            "decision": lambda i: (
                det.calibration_.decide(det.calibration_.p_value(types[i], float(maps[i][1][0]))),
                resize_map(maps[i][0][0], *decoded[i].shape[:2])),
        }
    else:
        import torch

        from diffqc.backbone import to_pixels
        from diffqc.model import Detector, _resize_map

        torch.set_num_threads(threads)
        no_grad = torch.inference_mode()
        det = Detector.load(spec["model"], device="cpu")
        size = det.config.backbone.input_size
        tpix = [to_pixels([img], size) for img in decoded]
        tidx = [torch.tensor([det.type_index(t)]) for t in types]

        def score(i: int) -> tuple[Any, Any]:
            # each method's own image score (PatchCore's re-weighted max reads its patch maps)
            return det.maps_and_scores(tfeats[i], tidx[i])

        with torch.inference_mode():
            tfeats = [det.extractor(p) for p in tpix]
            tmaps = [score(i) for i in range(n)]
        stages = {
            "preprocess": lambda i: to_pixels([decoded[i]], size),
            "backbone": lambda i: det.extractor(tpix[i]),
            "scoring": score,
            "decision": lambda i: (
                det.calibration_.decide(det.calibration_.p_value(types[i], float(tmaps[i][1][0]))),
                _resize_map(tmaps[i][0][0], *decoded[i].shape[:2])),
        }
    stages = {"decode": lambda i: decode_image(blobs[i]), **stages}

    def end_to_end(i: int) -> None:
        det.inspect([decode_image(blobs[i])], [types[i]], all_types=False, maps=True)

    times: dict[str, list[float]] = {k: [] for k in (*STAGES, "end_to_end")}
    with no_grad:
        for i in range(warmup + runs):
            for name, fn in (*stages.items(), ("end_to_end", end_to_end)):
                start = time.perf_counter()
                fn(i % n)
                if i >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))

    def batched(i: int) -> None:
        chunk = [(i * batch + j) % n for j in range(batch)]
        det.inspect([decode_image(blobs[k]) for k in chunk], [types[k] for k in chunk], all_types=False)

    batch_runs = max(3, runs // (2 * batch))
    bt = _timed(batched, batch_runs, 1)
    return {"method": spec["method"], "runtime": spec["runtime"], "times_ms": times,
            "parts": batch * batch_runs, "batched_s": sum(bt), "peak_rss_mb": round(peak_rss_mb(), 1),
            "torch_imported": "torch" in sys.modules}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one (method, runtime): percentiles of the pooled times."""
    pooled: dict[str, list[float]] = {}
    for r in results:
        for k, v in r["times_ms"].items():
            pooled.setdefault(k, []).extend(v)
    e2e = np.asarray(pooled.pop("end_to_end"))
    return {
        "method": results[0]["method"], "runtime": results[0]["runtime"],
        "p50_ms": round(float(np.percentile(e2e, 50)), 2), "p99_ms": round(float(np.percentile(e2e, 99)), 2),
        "throughput_per_s": round(sum(r["parts"] for r in results) / sum(r["batched_s"] for r in results), 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "torch_imported": any(r.get("torch_imported", True) for r in results),
        "stages": {k: [round(float(np.percentile(v, q)), 2) for q in (50, 99)] for k, v in pooled.items()},
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss``
    would carry the parent's peak over."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    # No spin-waiting in either runtime (ONNX Runtime's default in diffqc, OpenMP's here): on a
    # shared machine spinning threads fight for the cores.
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} {spec['runtime']} failed:\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def first_decision_s(model: Path, image: Path, feature_type: str, runtime: str, threads: int,
                     repeats: int = 3) -> float:
    """Median wall-clock seconds of ``diffqc inspect MODEL IMAGE`` in a fresh process, from the
    command's start to its exit after printing the decision (imports, loading, one image)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "diffqc.cli", "inspect", str(model), str(image), "--feature-type",
           feature_type, "--runtime", runtime, "--threads", str(threads)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0 or '"decision"' not in proc.stdout:
            raise RuntimeError(f"diffqc inspect --runtime {runtime} failed:\n{proc.stderr[-2000:]}")
    return float(np.median(times))


# --------------------------------------------------------------------------- the floor
def matmul_rates(threads: int) -> dict[str, float]:
    """Multiply-adds per second of a large FP32 matmul (PyTorch) and INT8 matmul (ONNX Runtime
    MatMulInteger, uint8 x int8), on ``threads`` threads: the machine's practical peak."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    from diffqc.backends.ort import make_session

    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = min(_timed(lambda _: a @ b, 10, 3))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = make_session(model, threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8),
             "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    int8 = min(_timed(lambda _: sess.run(None, feeds), 10, 3))
    return {"fp32_gmac_s": n**3 / fp32 / 1e9, "int8_gmac_s": n**3 / int8 / 1e9}


def count_macs(model_path: Path) -> dict[str, Any]:
    """Multiply-adds of one image, type known: per Conv2d / Linear module (forward hooks) and in
    all (``FlopCounterMode``: it also sees the batched matmuls of the Gaussian prior)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffqc.export import InferenceGraph
    from diffqc.model import Detector

    det = Detector.load(model_path, device="cpu")
    graph = InferenceGraph(det)
    size = det.config.backbone.input_size
    per_module: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, torch.nn.Conv2d):
                k = module.weight[0].numel()  # in/groups * kh * kw
                per_module[name] = per_module.get(name, 0) + output.numel() * k
            elif isinstance(module, torch.nn.Linear):
                per_module[name] = per_module.get(name, 0) + output.numel() * module.in_features
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in graph.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    pixels = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc_backbone:
            feats = graph.features(pixels)
        with FlopCounterMode(display=False) as fc_scorer:
            graph.scores(feats, torch.tensor([0]))
    for h in handles:
        h.remove()
    backbone = sum(v for k, v in per_module.items() if k.startswith("extractor"))
    scorer = sum(v for k, v in per_module.items() if k.startswith("scorer"))
    return {
        "backbone_macs": max(backbone, fc_backbone.get_total_flops() // 2),
        "scorer_macs": max(scorer, fc_scorer.get_total_flops() // 2),
        "per_module": per_module,
    }


def _float_macs(per_module: dict[str, int], float_layers: list[str]) -> int:
    """Multiply-adds of the modules an INT8 export kept in float (layer names as in export.json)."""
    def key(fqn: str) -> str:
        return fqn.replace(".net.", ".").removeprefix("scorer.")

    prefixes = [layer.replace("/", ".") for layer in float_layers]
    return sum(v for k, v in per_module.items() if any(key(k) == p or key(k).startswith(p + ".")
                                                       for p in prefixes))


def patchcore_macs(model_path: Path) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffqc.model import Detector

    det = Detector.load(model_path, device="cpu")
    fe = det.extractor
    feats = torch.randn(1, fe.channels, *fe.grid)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        det.score_maps(feats, torch.tensor([0]))
    return int(fc.get_total_flops() // 2)


# --------------------------------------------------------------------------- setup
def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(data, diffusion bundle, patchcore bundle)."""
    from diffqc.config import DetectorConfig, with_overrides
    from diffqc.data import load_dataset
    from diffqc.model import Detector
    from diffqc.synth import write_synthetic_dataset

    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        print(f"synthesising {args.parts} parts into {data}", file=sys.stderr)
        write_synthetic_dataset(data, n_parts=args.parts, seed=0, overwrite=True, progress=False)
    samples = load_dataset(data)
    train = [s for s in samples if s.split == "train"] or samples
    model = Path(args.model) if args.model else work / "diffusion"
    if not args.model:
        print(f"training the default-sized diffusion model ({args.steps} steps) on {len(train)} images",
              file=sys.stderr)
        config = with_overrides(DetectorConfig(), {"train.steps": args.steps})
        Detector(config, device="cpu").fit(train, progress=False).save(model)
    baseline = work / "patchcore"
    if args.reuse_baseline and (baseline / "metadata.json").is_file():
        return data, model, baseline
    cfg = Detector.load(model, device="cpu").config
    print("training the PatchCore baseline on the same data", file=sys.stderr)
    pc_config = with_overrides(DetectorConfig(), {"method": "patchcore",
                                                  "backbone.name": cfg.backbone.name,
                                                  "backbone.layers": list(cfg.backbone.layers),
                                                  "backbone.input_size": cfg.backbone.input_size})
    Detector(pc_config, device="cpu").fit(train, progress=False).save(baseline)
    return data, model, baseline


def export(model: Path, data: Path, threads: int, search: bool = True) -> dict[str, Any]:
    from diffqc.export import export_bundle

    print("exporting to ONNX (FP32 + INT8 with parity report, checked on ONNX Runtime and OpenVINO)",
          file=sys.stderr)
    return export_bundle(model, int8=True, calibration_data=data, force=True, threads=threads,
                         search=search, log=lambda m: print(m, file=sys.stderr))


# --------------------------------------------------------------------------- report
def report(rows: list[dict[str, Any]], floor: dict[str, Any], threads: int, batch: int,
           info: dict[str, Any]) -> str:
    lines = [f"per part, batch 1, {threads} threads (ms, p50 / p99); throughput with batches of {batch}",
             "| method | runtime | end to end p50 | p99 | " + " | ".join(STAGES)
             + " | parts/s (batched) | peak RSS MB | floor ms | × floor |",
             "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|"]
    for r in rows:
        st = " | ".join(f"{r['stages'][s][0]:.2f} / {r['stages'][s][1]:.2f}" for s in STAGES)
        fl = r["floor_ms"]
        lines.append(f"| {r['method']} | {r['runtime']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {st} | "
                     f"{r['throughput_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {fl:.1f} | "
                     f"{r['p50_ms'] / fl:.1f} |")
    lines.append("")
    lines.append(f"floor: backbone {floor['backbone_macs'] / 1e9:.3f} GMAC + diffusion scorer "
                 f"{floor['scorer_macs'] / 1e9:.3f} GMAC per image (PatchCore search "
                 f"{floor['patchcore_macs'] / 1e9:.3f} GMAC); measured matmul rate "
                 f"{floor['fp32_gmac_s']:.1f} GMAC/s FP32, {floor['int8_gmac_s']:.1f} GMAC/s INT8 "
                 f"on {threads} threads")
    if floor.get("int8_float_macs") is not None:
        lines.append(f"INT8 export keeps {floor['int8_float_macs'] / 1e9:.3f} GMAC in float "
                     f"({', '.join(floor['int8_float_layers']) or 'none'})")
    best = min((r for r in rows if r["method"] == "diffusion"), key=lambda r: r["p50_ms"])
    pc = next(r for r in rows if r["method"] == "patchcore")
    by = {r["runtime"]: r for r in rows if r["method"] == "diffusion"}
    lines += [
        "",
        f"best CPU runtime: {best['runtime']}: p50 {best['p50_ms']:.1f} ms (target ≤ 15: "
        f"{'met' if best['p50_ms'] <= 15 else 'NOT met'}), p99 {best['p99_ms']:.1f} ms (target ≤ 25: "
        f"{'met' if best['p99_ms'] <= 25 else 'NOT met'}), {best['throughput_per_s']:.1f} parts/s at batch "
        f"{batch} (target ≥ 80: {'met' if best['throughput_per_s'] >= 80 else 'NOT met'}); PatchCore "
        f"{pc['p50_ms']:.1f} ms ({'faster' if best['p50_ms'] < pc['p50_ms'] else 'NOT faster'} "
        "than PatchCore)",
    ]
    for rt in GRAPH_RUNTIMES:
        if f"{rt}-fp32" in by and f"{rt}-int8" in by:
            i8, fp32 = by[f"{rt}-int8"], by[f"{rt}-fp32"]
            lines.append(f"INT8 vs FP32 ({rt}): {i8['p50_ms']:.1f} vs {fp32['p50_ms']:.1f} ms "
                         f"({'faster' if i8['p50_ms'] < fp32['p50_ms'] else 'NOT faster'})")
    for p in ("fp32", "int8"):
        if f"openvino-{p}" in by and f"onnx-{p}" in by:
            ov, ort = by[f"openvino-{p}"], by[f"onnx-{p}"]
            lines.append(f"OpenVINO vs ONNX Runtime {p.upper()}: {ov['p50_ms']:.1f} vs "
                         f"{ort['p50_ms']:.1f} ms p50 ({ort['p50_ms'] / ov['p50_ms']:.2f}x)")
    no_torch = [r for r in rows if r["runtime"].split("-")[0] in GRAPH_RUNTIMES]
    lines.append(f"peak RSS {max(r['peak_rss_mb'] for r in rows):.0f} MB; processes without PyTorch "
                 f"(ONNX Runtime, OpenVINO): {max(r['peak_rss_mb'] for r in no_torch):.0f} MB at most, "
                 f"torch imported in none: {not any(r['torch_imported'] for r in no_torch)}")
    ov = info.get("openvino", {})
    gates = {"onnx int8": info.get("int8", {}).get("accepted"),
             "openvino fp32": ov.get("fp32", {}).get("parity_vs_torch", {}).get("passed"),
             "openvino int8": ov.get("int8", {}).get("accepted")}
    verdicts = {k: "passed" if v else "FAILED" if v is False else "-" for k, v in gates.items()}
    first = info.get("fastest_first", [])[:1]
    lines.append("parity gates at export: " + ", ".join(f"{k} {v}" for k, v in verdicts.items())
                 + "; --runtime auto takes: " + ", ".join(f"{c['runtime']} {c['precision']}" for c in first))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusion model bundle (default: train one)")
    parser.add_argument("--data", default=None, help="dataset for PatchCore, INT8 calibration and the "
                                                     "test images (default: synthetic)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--parts", type=int, default=160, help="synthetic parts when no --data")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds over all runtimes, --runs split among them")
    parser.add_argument("--images", type=int, default=16, help="distinct test images cycled through")
    parser.add_argument("--no-export", action="store_true", help="use the bundle's existing export")
    parser.add_argument("--no-search", action="store_true",
                        help="INT8 with every layer quantized (skip the export's search for float layers)")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="reuse the PatchCore model of an earlier run in --work")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from diffqc.data import load_dataset
    from diffqc.runtime import read_export_info

    with tempfile.TemporaryDirectory(prefix="diffqc-latency-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, model, baseline = prepare(args, work)
        info = (read_export_info(model) if args.no_export
                else export(model, data, args.threads, search=not args.no_search))
        classes = info["classes"]
        test = [s for s in load_dataset(data) if s.split == "test" and s.feature_type in classes]
        test = test[:: max(1, len(test) // args.images)][: args.images]
        rates = matmul_rates(args.threads)
        macs = count_macs(model)
        floor: dict[str, Any] = {**rates, "backbone_macs": macs["backbone_macs"],
                                 "scorer_macs": macs["scorer_macs"],
                                 "patchcore_macs": patchcore_macs(baseline)}
        int8 = info.get("int8") or {}
        floor["int8_float_layers"] = list(int8.get("float_layers", {}))
        floor["int8_float_macs"] = _float_macs(macs["per_module"], floor["int8_float_layers"])
        # Rounds over all runtimes, pooled: a slow spell of a shared machine hits them alike.
        results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in ROWS}
        for round_ in range(args.rounds):
            for method, runtime in ROWS:
                bundle = model if method == "diffusion" else baseline
                spec = {"method": method, "runtime": runtime, "model": str(bundle),
                        "images": [str(s.path) for s in test], "types": [s.feature_type for s in test],
                        "threads": args.threads, "runs": max(1, args.runs // args.rounds),
                        "warmup": args.warmup, "batch": args.batch}
                print(f"round {round_ + 1}/{args.rounds}: measuring {method} {runtime}", file=sys.stderr)
                results[(method, runtime)].append(run_worker(spec))
        rows = [summarise(results[key]) for key in ROWS]
        total = floor["backbone_macs"] + floor["scorer_macs"]
        fp32_rate, int8_rate = floor["fp32_gmac_s"] * 1e9, floor["int8_gmac_s"] * 1e9
        for r in rows:
            if r["method"] == "patchcore":
                r["floor_ms"] = 1000 * (floor["backbone_macs"] + floor["patchcore_macs"]) / fp32_rate
            elif r["runtime"].endswith("-int8"):
                float_macs = floor["int8_float_macs"]
                r["floor_ms"] = 1000 * (float_macs / fp32_rate + (total - float_macs) / int8_rate)
            else:
                r["floor_ms"] = 1000 * total / fp32_rate
        text = report(rows, floor, args.threads, args.batch, info)
        first = {rt: first_decision_s(model, test[0].path, test[0].feature_type, rt, args.threads)
                 for rt in ("torch", "onnx", "openvino", "auto")}
        text += ("\ntime to first decision, `diffqc inspect MODEL IMAGE --runtime R` in a fresh process "
                 "(median of 3, s): " + ", ".join(f"{rt} {s:.2f}" for rt, s in first.items()))
        print(text)
        print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        if args.json:
            keys = ("method", "runtime", "p50_ms", "p99_ms", "throughput_per_s", "peak_rss_mb",
                    "torch_imported")
            Path(args.json).write_text(json.dumps({"rows": [{k: r[k] for k in keys} for r in rows],
                                                   "first_decision_s": first,
                                                   "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
