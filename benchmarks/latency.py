"""Per-part latency of diffqc on this machine: PyTorch FP32, ONNX Runtime FP32 and INT8, OpenVINO
FP32 and INT8 (the same exported graphs), beside the built-in PaDiM and PatchCore baselines
trained on the same data and exported the same way (PyTorch, ONNX Runtime and OpenVINO, FP32),
all measured in the same run, with the compute floor.

For each (method, runtime), in a fresh process (so that peak memory is its own), batch 1,
``--threads`` threads, median and p99 of ``--runs`` runs after ``--warmup``:

* end to end per part: PNG bytes -> decode -> preprocess -> backbone -> scoring -> decision
  (p-value, PASS/REVIEW/REJECT, the anomaly map at the image size), the feature type known;
* for the diffusion models, the same end to end with the feature type NOT given (the type
  router picks it: ``inspect(images, [None])``), and unknown p50 / known p50;
* each stage on its own (type known);
* throughput with batches of ``--batch`` parts (type known); peak resident memory.

Threads sleep when idle in both runtimes (``OMP_WAIT_POLICY=PASSIVE`` for PyTorch; ONNX
Runtime sessions of diffqc do not spin): spin-waiting threads on a busy 2-core machine measured
up to 100x slower for PyTorch and 2x for ONNX Runtime.

The floor: the backbone's and the scorer's multiply-adds per image over this machine's measured
matrix-multiply rate (FP32 from a large PyTorch matmul, INT8 from ONNX Runtime's MatMulInteger,
both on ``--threads`` threads), and how far each runtime is from it.

Without ``--model`` it fits the default diffusion model (the shipped config: the Gaussians
alone, ``train.steps=0``; ``--steps N`` trains its network N steps, ``--diffusion-set
KEY=VALUE`` changes any other field) on a small synthetic set. ``--variant NAME:KEY=VALUE,...``
trains a further model from that model's config with the overrides, on the same data, exports
it the same way and times it as method NAME (``--variant trained:train.steps=30``: with the
network, trained a few steps, since latency does not depend on training length). PaDiM and
PatchCore are always trained on the same data, with the diffusion
model's backbone, in the same run (``--reuse-baseline``: those of an earlier run in ``--work``).

    python benchmarks/latency.py --json latency.json
    python benchmarks/latency.py --model runs/bottle --data ../shared/datasets/mvtec_bottle
    python benchmarks/latency.py --variant trained:train.steps=30
    python benchmarks/latency.py --variant q1:train.steps=30,scoring.quadrature_nodes=1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

STAGES = ("decode", "preprocess", "backbone", "scoring", "decision")
DIFFUSION_RUNTIMES = ("torch-fp32", "onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8")
BASELINES = ("padim", "patchcore")
BASELINE_RUNTIMES = ("torch-fp32", "onnx-fp32", "openvino-fp32")  # baselines are exported FP32 here
GRAPH_RUNTIMES = ("onnx", "openvino")  # run the exported graph, without PyTorch in the process
DEFAULT = "diffusion"  # the method name of the default model: issue 12's targets are about it


class Bundle(NamedTuple):
    """One model timed in this run: its name in the method column, its folder, and whether it is
    a diffusion model (INT8 rows and the unknown-type path are timed for those)."""

    name: str
    path: Path
    diffusion: bool


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
    stage on its own and then the whole path (and, with ``spec["unknown"]``, the whole path with
    the feature type not given), so that all see the same machine load."""
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

    def end_to_end_unknown(i: int) -> None:  # the type router picks the type
        det.inspect([decode_image(blobs[i])], [None], all_types=False, maps=True)

    paths: dict[str, Callable[[int], object]] = {**stages, "end_to_end": end_to_end}
    if spec.get("unknown"):
        paths["end_to_end_unknown"] = end_to_end_unknown
    times: dict[str, list[float]] = {k: [] for k in paths}
    with no_grad:
        for i in range(warmup + runs):
            for name, fn in paths.items():
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
    """One row from the rounds of one (method, runtime): percentiles of the pooled times. The
    end-to-end columns ``p50_ms``/``p99_ms`` are the type-known path; ``p50_unknown_ms``,
    ``p99_unknown_ms`` and ``unknown_over_known_p50`` the path without the type (None when it
    was not timed)."""
    pooled: dict[str, list[float]] = {}
    for r in results:
        for k, v in r["times_ms"].items():
            pooled.setdefault(k, []).extend(v)
    e2e = np.asarray(pooled.pop("end_to_end"))
    unknown = pooled.pop("end_to_end_unknown", None)
    p50 = round(float(np.percentile(e2e, 50)), 2)
    u50 = round(float(np.percentile(unknown, 50)), 2) if unknown else None
    return {
        "method": results[0]["method"], "runtime": results[0]["runtime"],
        "p50_ms": p50, "p99_ms": round(float(np.percentile(e2e, 99)), 2),
        "p50_unknown_ms": u50,
        "p99_unknown_ms": round(float(np.percentile(unknown, 99)), 2) if unknown else None,
        "unknown_over_known_p50": round(u50 / p50, 2) if u50 is not None and p50 > 0 else None,
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


def baseline_macs(model_path: Path) -> int:
    """Multiply-adds of a baseline's scoring of one image, type known (PaDiM's Mahalanobis
    distances, PatchCore's nearest-neighbour search; ``FlopCounterMode``)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffqc.model import Detector

    det = Detector.load(model_path, device="cpu")
    fe = det.extractor
    feats = torch.randn(1, fe.channels, *fe.grid)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        det.score_maps(feats, torch.tensor([0]))
    return int(fc.get_total_flops() // 2)


def bundle_floor(bundle: Bundle, info: dict[str, Any], backbone_macs: int | None = None) -> dict[str, Any]:
    """The multiply-adds of one image with ``bundle`` (type known): backbone and scorer, and for
    a diffusion model those its INT8 export keeps in float. A baseline's backbone is the default
    model's (``backbone_macs``: the baselines are trained on its backbone)."""
    if not bundle.diffusion:
        assert backbone_macs is not None
        return {"backbone_macs": backbone_macs, "scorer_macs": baseline_macs(bundle.path)}
    macs = count_macs(bundle.path)
    layers = list((info.get("int8") or {}).get("float_layers", {}))
    return {"backbone_macs": macs["backbone_macs"], "scorer_macs": macs["scorer_macs"],
            "int8_float_layers": layers, "int8_float_macs": _float_macs(macs["per_module"], layers)}


def floor_ms(runtime: str, floor: dict[str, Any], rates: dict[str, float]) -> float:
    """The compute floor of one row: its multiply-adds over the measured matmul rate (INT8 rows:
    the layers kept in float at the FP32 rate, the rest at the INT8 rate)."""
    fp32_rate, int8_rate = rates["fp32_gmac_s"] * 1e9, rates["int8_gmac_s"] * 1e9
    total = floor["backbone_macs"] + floor["scorer_macs"]
    if runtime.endswith("-int8"):
        float_macs = floor.get("int8_float_macs") or 0
        return 1000 * (float_macs / fp32_rate + (total - float_macs) / int8_rate)
    return 1000 * total / fp32_rate


# --------------------------------------------------------------------------- setup
def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` (``--variant``) -> (NAME, config overrides), read as ``diffqc
    evaluate --compare-setting`` reads it (:func:`diffqc.evaluate.parse_setting`: commas inside
    brackets stay in their value); NAME also names a folder and must not be a row's own name."""
    import re

    from diffqc.errors import ConfigError
    from diffqc.evaluate import parse_setting

    try:
        name, overrides = parse_setting(text)
    except ValueError as exc:  # the format; a bad key or value is already a ConfigError
        raise ConfigError(str(exc).replace("--compare-setting", "--variant")) from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--variant name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
    if name in (DEFAULT, *BASELINES):
        raise ConfigError(f"--variant name {name!r} is taken by the {name} rows; choose another")
    return name, overrides


def parse_variants(texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every ``--variant``, by name (a name given twice is an error)."""
    from diffqc.errors import ConfigError

    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        name, overrides = parse_variant(text)
        if name in out:
            raise ConfigError(f"--variant name {name!r} is given twice")
        out[name] = overrides
    return out


def default_config(steps: int | None, diffusion_set: dict[str, Any]) -> Any:
    """The config of the default model as this script trains it: the defaults with ``train.steps``
    (None: the default's) and then the ``--diffusion-set`` overrides."""
    from diffqc.config import DetectorConfig, with_overrides

    return with_overrides(DetectorConfig(), _steps(steps) | diffusion_set)


def _steps(steps: int | None) -> dict[str, Any]:
    return {} if steps is None else {"train.steps": steps}


def _same_backbone(path: Path, config: Any) -> bool:
    """Whether ``path`` holds a bundle on ``config``'s backbone (a baseline that may be reused)."""
    from diffqc.bundle import read_bundle
    from diffqc.errors import DiffqcError

    if not (path / "metadata.json").is_file():
        return False
    try:
        old = read_bundle(path)[0].backbone
    except DiffqcError:
        return False
    new = config.backbone
    return (old.name, list(old.layers), old.input_size) == (new.name, list(new.layers), new.input_size)


def prepare(args: argparse.Namespace, work: Path, diffusion_set: dict[str, Any],
            variants: dict[str, dict[str, Any]]) -> tuple[Path, list[Bundle]]:
    """(data, the models to time): the default diffusion model, each variant (its config: the
    default model's with the variant's overrides), PaDiM and PatchCore (the default model's
    backbone); all trained on the same images."""
    from diffqc.config import DetectorConfig, with_overrides
    from diffqc.data import load_dataset
    from diffqc.errors import ConfigError
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
        config = default_config(args.steps, diffusion_set)
        print(f"fitting the default diffusion model (train.steps={config.train.steps}"
              + "".join(f", {k}={v}" for k, v in diffusion_set.items()) + f") on {len(train)} images",
              file=sys.stderr)
        default = Detector(config, device="cpu")
        default.fit(train, progress=False).save(model)
    base = Detector.load(model, device="cpu").config
    if base.method != "diffusion":
        raise ConfigError(f"--model {model} is a {base.method} model; give a diffusion model (the "
                          "baselines are trained here)")
    bundles = [Bundle(DEFAULT, model, True)]
    for name, overrides in variants.items():
        config = with_overrides(base, overrides)
        path = work / f"variant-{name}"
        print(f"training variant {name} (" + ", ".join(f"{k}={v}" for k, v in overrides.items())
              + f") on the same {len(train)} images", file=sys.stderr)
        Detector(config, device="cpu").fit(train, progress=False).save(path)
        bundles.append(Bundle(name, path, config.method == "diffusion"))
    for method in BASELINES:
        path = work / method
        bundles.append(Bundle(method, path, False))
        if args.reuse_baseline and _same_backbone(path, base):
            print(f"reusing the {method} baseline in {path}", file=sys.stderr)
            continue
        print(f"training the {method} baseline on the same data", file=sys.stderr)
        config = with_overrides(DetectorConfig(), {"method": method, "backbone.name": base.backbone.name,
                                                   "backbone.layers": list(base.backbone.layers),
                                                   "backbone.input_size": base.backbone.input_size})
        Detector(config, device="cpu").fit(train, progress=False).save(path)
    return data, bundles


def export(bundle: Bundle, data: Path, threads: int, search: bool = True,
           reuse: bool = False) -> dict[str, Any]:
    """Export ``bundle`` (a diffusion model FP32 + INT8 with its parity report, a baseline FP32),
    checked on ONNX Runtime and OpenVINO; with ``reuse``, an export of the same weights already
    in the bundle is read instead."""
    from diffqc.errors import DiffqcError
    from diffqc.export import export_bundle
    from diffqc.runtime import read_export_info

    if reuse:
        try:
            info = read_export_info(bundle.path)
            meta = json.loads((bundle.path / "metadata.json").read_text())
            if info.get("weights_file_sha256") == meta.get("weights_file_sha256"):
                print(f"reusing the export of {bundle.name}", file=sys.stderr)
                return info
        except (DiffqcError, OSError, ValueError):
            pass
    print(f"exporting {bundle.name} to ONNX (" + ("FP32 + INT8 with parity report" if bundle.diffusion
                                                  else "FP32") + ", checked on ONNX Runtime and OpenVINO)",
          file=sys.stderr)
    return export_bundle(bundle.path, data=data, int8=bundle.diffusion,
                         calibration_data=data if bundle.diffusion else None, force=True, threads=threads,
                         search=search, log=lambda m: print(m, file=sys.stderr))


def plan(bundles: Sequence[Bundle]) -> list[tuple[str, str]]:
    """Every (method, runtime) row of the run, in table order."""
    return [(b.name, rt) for b in bundles
            for rt in (DIFFUSION_RUNTIMES if b.diffusion else BASELINE_RUNTIMES)]


def run_facts() -> dict[str, Any]:
    """Date, the repository's commit (and whether src/ or benchmarks/ had uncommitted changes)
    and the machine's load, for the report."""
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(dirty),
            "cpus": os.cpu_count(), "load_average_start": list(os.getloadavg())}


# --------------------------------------------------------------------------- report
def _ms(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: Sequence[dict[str, Any]], failed: dict[tuple[str, str], str], threads: int,
          batch: int) -> str:
    """The per-row table: end to end with the type known and unknown, the stages, throughput,
    memory and floor; a row that failed says so in place of its numbers, and a runtime whose
    export failed its parity gate (timed all the same) is marked refused."""
    lines = [f"per part, batch 1, {threads} threads, ms. End to end: the feature type KNOWN (given) and "
             "UNKNOWN (not given: the type router picks it; timed for diffusion models, '-' elsewhere); "
             f"stages (p50 / p99) and throughput (batches of {batch}) with the type known.",
             "| method | runtime | known p50 | known p99 | unknown p50 | unknown p99 | unknown/known p50 | "
             + " | ".join(STAGES) + " | parts/s (batched) | peak RSS MB | floor ms | × floor |",
             "|---|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|---|"]
    for r in rows:
        st = " | ".join(f"{r['stages'][s][0]:.2f} / {r['stages'][s][1]:.2f}" for s in STAGES)
        fl = r["floor_ms"]
        runtime = r["runtime"] + ("" if r.get("offered", True) else " (refused at export)")
        lines.append(f"| {r['method']} | {runtime} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{_ms(r['p50_unknown_ms'])} | {_ms(r['p99_unknown_ms'])} | "
                     f"{_ms(r['unknown_over_known_p50'], '.2f')} | {st} | {r['throughput_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {fl:.1f} | {r['p50_ms'] / fl:.1f} |")
    for (method, runtime), why in failed.items():
        lines.append(f"| {method} | {runtime} | FAILED: {why} |")
    return "\n".join(lines)


def verdicts(rows: Sequence[dict[str, Any]], batch: int) -> list[str]:
    """Issue 12's targets on the default model's fastest runtime that passed its parity gate
    (type known), its unknown-type ratio there, and the comparison with the baselines' fastest
    offered runtimes in the same run. A faster runtime refused by its gate is named, not used."""
    offered = [r for r in rows if r.get("offered", True)]
    mine = [r for r in offered if r["method"] == DEFAULT]
    if not mine:
        return [f"no {DEFAULT} row that passed its parity gate was measured: no target can be judged"]

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    best = min(mine, key=lambda r: r["p50_ms"])
    ratio = best["unknown_over_known_p50"]
    out = [f"best CPU runtime that passed parity ({DEFAULT}, type known): {best['runtime']}: p50 "
           f"{best['p50_ms']:.1f} ms "
           f"(target ≤ 15: {met(best['p50_ms'] <= 15)}), p99 {best['p99_ms']:.1f} ms (target ≤ 25: "
           f"{met(best['p99_ms'] <= 25)}), {best['throughput_per_s']:.1f} parts/s at batch {batch} "
           f"(target ≥ 80: {met(best['throughput_per_s'] >= 80)}); unknown type there: p50 "
           f"{_ms(best['p50_unknown_ms'])} ms, {_ms(ratio, '.2f')}× known (target ≤ 2: "
           f"{'-' if ratio is None else met(ratio <= 2)})"]
    refused = [r for r in rows
               if r["method"] == DEFAULT and r not in offered and r["p50_ms"] < best["p50_ms"]]
    if refused:
        out.append("faster but refused by their parity gate (not offered): "
                   + ", ".join(f"{r['runtime']} {r['p50_ms']:.1f} ms" for r in refused))
    for method in BASELINES:
        theirs = [r for r in offered if r["method"] == method]
        exported = [r for r in theirs if r["runtime"].split("-")[0] in GRAPH_RUNTIMES]
        for label, pool in (("fastest exported runtime", exported), ("PyTorch", [r for r in theirs
                                                                             if r not in exported])):
            if pool:
                b = min(pool, key=lambda r: r["p50_ms"])
                out.append(f"{method} {label}: {b['runtime']} p50 {b['p50_ms']:.1f} ms: {DEFAULT} "
                           f"{'faster' if best['p50_ms'] < b['p50_ms'] else 'NOT faster'} "
                           f"({DEFAULT} takes {best['p50_ms'] / b['p50_ms']:.2f}× its time)")
    return out


def comparisons(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per model: INT8 against FP32 on each graph runtime, and OpenVINO against ONNX Runtime."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {r["runtime"]: r for r in rows if r["method"] == method}
        for rt in GRAPH_RUNTIMES:
            if f"{rt}-fp32" in by and f"{rt}-int8" in by:
                i8, fp32 = by[f"{rt}-int8"], by[f"{rt}-fp32"]
                out.append(f"{method}: INT8 vs FP32 ({rt}): {i8['p50_ms']:.1f} vs {fp32['p50_ms']:.1f} ms "
                           f"({'faster' if i8['p50_ms'] < fp32['p50_ms'] else 'NOT faster'})")
        for p in ("fp32", "int8"):
            if f"openvino-{p}" in by and f"onnx-{p}" in by:
                ov, ort = by[f"openvino-{p}"], by[f"onnx-{p}"]
                out.append(f"{method}: OpenVINO vs ONNX Runtime {p.upper()}: {ov['p50_ms']:.1f} vs "
                           f"{ort['p50_ms']:.1f} ms p50 ({ort['p50_ms'] / ov['p50_ms']:.2f}x)")
    return out


def gates(name: str, info: dict[str, Any]) -> str:
    """The parity gates a model's export passed, and what ``--runtime auto`` takes."""
    ov = info.get("openvino", {})
    checks = {"onnx fp32": info.get("fp32", {}).get("parity_vs_torch", {}).get("passed"),
              "openvino fp32": ov.get("fp32", {}).get("parity_vs_torch", {}).get("passed")}
    if info.get("int8"):
        checks |= {"onnx int8": info["int8"].get("accepted"),
                   "openvino int8": ov.get("int8", {}).get("accepted")}
    verdict = {k: "passed" if v else "FAILED" if v is False else "-" for k, v in checks.items()}
    first = info.get("fastest_first", [])[:1]
    auto = ", ".join(f"{c['runtime']} {c['precision']}" for c in first) or "-"
    return (f"{name}: parity gates at export: " + ", ".join(f"{k} {v}" for k, v in verdict.items())
            + f"; --runtime auto takes: {auto}")


def report(rows: list[dict[str, Any]], failed: dict[tuple[str, str], str], floors: dict[str, dict[str, Any]],
           rates: dict[str, float], infos: dict[str, dict[str, Any]], candidates: dict[str, int],
           threads: int, batch: int) -> str:
    lines = [table(rows, failed, threads, batch), ""]
    def gmac(key: str) -> str:
        return ", ".join(f"{n} {f[key] / 1e9:.3f}" for n, f in floors.items())

    lines.append(f"floor: backbone {gmac('backbone_macs')} GMAC per image; scorer {gmac('scorer_macs')} "
                 f"GMAC per image (type known); measured matmul rate {rates['fp32_gmac_s']:.1f} GMAC/s "
                 f"FP32, {rates['int8_gmac_s']:.1f} GMAC/s INT8 on {threads} threads")
    for name, f in floors.items():
        if f.get("int8_float_macs") is not None:
            lines.append(f"{name}: INT8 export keeps {f['int8_float_macs'] / 1e9:.3f} GMAC in float "
                         f"({', '.join(f['int8_float_layers']) or 'none'})")
    lines.append("unknown type: the router's best scoring.type_candidates types are scored: "
                 + ", ".join(f"{n} {k}" for n, k in candidates.items()))
    lines += ["", *verdicts(rows, batch), *comparisons(rows)]
    no_torch = [r for r in rows if r["runtime"].split("-")[0] in GRAPH_RUNTIMES]
    if rows and no_torch:
        lines.append(f"peak RSS {max(r['peak_rss_mb'] for r in rows):.0f} MB; processes without PyTorch "
                     f"(ONNX Runtime, OpenVINO): {max(r['peak_rss_mb'] for r in no_torch):.0f} MB at most, "
                     f"torch imported in none: {not any(r['torch_imported'] for r in no_torch)}")
    lines += [gates(name, info) for name, info in infos.items()]
    return "\n".join(lines)


def _loads(loads: Sequence[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in loads)


def measure(keys: Sequence[tuple[str, str]], bundles: dict[str, Bundle], test: Sequence[Any],
            args: argparse.Namespace) -> tuple[dict[tuple[str, str], list[dict[str, Any]]],
                                               dict[tuple[str, str], str]]:
    """Every row, each in its own fresh process, in rounds over all rows, pooled: a slow spell of
    a shared machine hits them alike. A row that fails is reported as such (its error's last line)
    and not tried again; the others go on."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in keys}
    failed: dict[tuple[str, str], str] = {}
    for round_ in range(args.rounds):
        for method, runtime in keys:
            if (method, runtime) in failed:
                continue
            b = bundles[method]
            spec = {"method": method, "runtime": runtime, "model": str(b.path), "unknown": b.diffusion,
                    "images": [str(s.path) for s in test], "types": [s.feature_type for s in test],
                    "threads": args.threads, "runs": max(1, args.runs // args.rounds),
                    "warmup": args.warmup, "batch": args.batch}
            print(f"round {round_ + 1}/{args.rounds}: measuring {method} {runtime}", file=sys.stderr)
            try:
                results[(method, runtime)].append(run_worker(spec))
            except RuntimeError as exc:
                last = [line for line in str(exc).splitlines() if line.strip()][-1:]
                failed[(method, runtime)] = " ".join(last).strip()[:300]
                print(str(exc), file=sys.stderr)
    return results, failed


def first_decisions(model: Path, image: Path, feature_type: str, threads: int) -> dict[str, float | None]:
    """:func:`first_decision_s` per runtime, printed; None where the command failed."""
    first: dict[str, float | None] = {}
    for rt in ("torch", "onnx", "openvino", "auto"):
        try:
            first[rt] = round(first_decision_s(model, image, feature_type, rt, threads), 2)
        except RuntimeError as exc:
            first[rt] = None
            print(str(exc), file=sys.stderr)
    print(f"time to first decision, `diffqc inspect MODEL IMAGE --runtime R` on the {DEFAULT} model, "
          "type known, in a fresh process (median of 3, s): "
          + ", ".join(f"{rt} {_ms(s, '.2f')}" for rt, s in first.items()))
    return first


def write_json(path: Path, facts: dict[str, Any], args: argparse.Namespace, bundles: Sequence[Bundle],
               overrides: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
               failed: dict[tuple[str, str], str], floors: dict[str, dict[str, Any]],
               rates: dict[str, float], candidates: dict[str, int],
               first: dict[str, float | None]) -> None:
    columns = {"p50_ms": "end to end p50, feature type known", "p99_ms": "end to end p99, type known",
               "p50_unknown_ms": "end to end p50, type not given (the router picks it)",
               "p99_unknown_ms": "end to end p99, type not given",
               "unknown_over_known_p50": "p50_unknown_ms / p50_ms",
               "offered": "the runtime passed its parity gate at export (torch: the reference)",
               "stages": "[p50, p99] ms of each stage, type known"}
    path.write_text(json.dumps({
        **facts, "command": [sys.executable, *sys.argv], "threads": args.threads, "batch": args.batch,
        "columns": columns,
        "models_overrides": "the default model: what it was trained with here on top of DetectorConfig() "
                            "(empty with --model); a variant: its overrides on the default model's config",
        "models": {b.name: {"path": str(b.path), "diffusion": b.diffusion, "overrides": overrides[b.name]}
                   for b in bundles},
        "rows": rows, "failed": [{"method": m, "runtime": rt, "error": e} for (m, rt), e in failed.items()],
        "floor": {"rates": rates, "per_model": {n: {k: v for k, v in f.items() if k != "per_module"}
                                                for n, f in floors.items()}},
        "type_candidates": candidates, "first_decision_s": first}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusion model bundle (default: train one)")
    parser.add_argument("--data", default=None, help="dataset for the baselines, INT8 calibration and the "
                                                     "test images (default: synthetic)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--parts", type=int, default=160, help="synthetic parts when no --data")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the default model's network (default: the config's, 0)")
    parser.add_argument("--diffusion-set", action="append", metavar="KEY=VALUE", default=[],
                        help="config field of the default model this script trains (not with --model), "
                             "e.g. --diffusion-set scoring.quadrature_nodes=1 (repeatable)")
    parser.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...", default=[],
                        help="also train, export and time a model with the default model's config and these "
                             "fields, on the same data, as method NAME, e.g. "
                             "--variant trained:train.steps=30 (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds over all runtimes, --runs split among them")
    parser.add_argument("--images", type=int, default=16, help="distinct test images cycled through")
    parser.add_argument("--no-export", action="store_true", help="use the default model's existing export")
    parser.add_argument("--no-search", action="store_true",
                        help="INT8 with every layer quantized (skip the export's search for float layers)")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="reuse the PaDiM and PatchCore models (and their exports) of an earlier run in "
                             "--work when they are on the default model's backbone")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from diffqc.bundle import read_bundle
    from diffqc.config import parse_overrides, with_overrides
    from diffqc.data import load_dataset
    from diffqc.errors import ConfigError, DiffqcError
    from diffqc.runtime import read_export_info, usable_choices

    if args.model and args.diffusion_set:
        parser.error("--diffusion-set applies to the model this script trains; it has no effect with --model")
    try:  # every override is checked before any work
        diffusion_set = parse_overrides(args.diffusion_set)
        base = default_config(args.steps, diffusion_set)
        variants = parse_variants(args.variant)
        for overrides in variants.values():
            with_overrides(base, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    facts = run_facts()

    with tempfile.TemporaryDirectory(prefix="diffqc-latency-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, bundles = prepare(args, work, diffusion_set, variants)
        infos: dict[str, dict[str, Any]] = {}
        unexported: dict[tuple[str, str], str] = {}  # a variant's or baseline's failed export: its rows
        for b in bundles:
            if b.name == DEFAULT and args.no_export:
                infos[b.name] = read_export_info(b.path)
                continue
            try:
                infos[b.name] = export(b, data, args.threads, search=not args.no_search,
                                       reuse=args.reuse_baseline and b.name in BASELINES)
            except (DiffqcError, RuntimeError, ValueError) as exc:
                if b.name == DEFAULT:
                    raise
                why = " ".join(str(exc).split())[:300]
                print(f"the export of {b.name} failed; its rows are reported as failed: {why}",
                      file=sys.stderr)
                unexported |= {key: f"export failed: {type(exc).__name__}: {why}" for key in plan([b])}
        bundles = [b for b in bundles if b.name in infos]
        classes = infos[DEFAULT]["classes"]
        test = [s for s in load_dataset(data) if s.split == "test" and s.feature_type in classes]
        test = test[:: max(1, len(test) // args.images)][: args.images]
        rates = matmul_rates(args.threads)
        floors: dict[str, dict[str, Any]] = {}
        for b in bundles:  # the default comes first; the baselines take its backbone
            floors[b.name] = bundle_floor(b, infos[b.name], floors.get(DEFAULT, {}).get("backbone_macs"))
        candidates = {b.name: read_bundle(b.path)[0].scoring.type_candidates for b in bundles if b.diffusion}
        keys = plan(bundles)
        results, failed = measure(keys, {b.name: b for b in bundles}, test, args)
        failed = {**unexported, **failed}
        rows = [summarise(results[key]) for key in keys if key not in failed]
        offered = {(b.name, f"{c.runtime}-{c.precision}") for b in bundles
                   for c in usable_choices(b.path, infos[b.name])}
        for r in rows:
            r["floor_ms"] = round(floor_ms(r["runtime"], floors[r["method"]], rates), 2)
            r["offered"] = r["runtime"] == "torch-fp32" or (r["method"], r["runtime"]) in offered
        text = report(rows, failed, floors, rates, infos, candidates, args.threads, args.batch)
        print(text, flush=True)
        default = next(b for b in bundles if b.name == DEFAULT)
        first = first_decisions(default.path, test[0].path, test[0].feature_type, args.threads)
        facts["load_average_end"] = list(os.getloadavg())
        print(f"run {facts['date']}, commit {facts['git_commit']}"
              + (" (with uncommitted changes in src/ or benchmarks/)" if facts["git_dirty"] else "")
              + "; load average (1, 5, 15 min) at start " + _loads(facts["load_average_start"])
              + ", at end " + _loads(facts["load_average_end"]) + f" on {facts['cpus']} CPUs")
        if args.json:
            trained = _steps(args.steps) | diffusion_set  # the default model's, when trained here
            overrides = {b.name: trained if b.name == DEFAULT and not args.model
                         else variants.get(b.name, {}) for b in bundles}
            write_json(Path(args.json), facts, args, bundles, overrides, rows, failed, floors, rates,
                       candidates, first)
    return 1 if failed or any(v is None for v in first.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
