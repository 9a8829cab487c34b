"""ONNX Runtime inference: sessions, the ONNX detector, a bring-your-own ONNX backbone, and
the choice of runtime.

``load_detector(path, runtime="auto" | "torch" | "onnx", threads=N)`` gives a
:class:`~diffqc.model.Detector` (PyTorch) or an :class:`OnnxDetector` (ONNX Runtime over the
``model.onnx`` / ``model.int8.onnx`` that ``diffqc export`` wrote into the bundle). Both have
``inspect(images, feature_types, all_types=..., maps=...) -> list[Inspection]`` and
``inspect_samples``, so the CLI, the service and the evaluation swap them freely.

The ONNX detector does no PyTorch work per image: decoding and resizing are numpy/Pillow (the
same antialiased bilinear resize as :func:`diffqc.backbone.to_pixels`), everything from the
pixels to the anomaly map and score runs in the ONNX graph, and the verdict comes from the same
:class:`~diffqc.calibration.Calibrator`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from diffqc.calibration import Calibrator
from diffqc.config import DetectorConfig
from diffqc.errors import RuntimeUnavailableError

if TYPE_CHECKING:
    import argparse

    import onnx

    from diffqc.data import Sample
    from diffqc.inspection import Inspection
    from diffqc.model import Detector

RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "int8")
EXPORT_FILE = "export.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
INT8_CALIBRATION_FILE = "calibration.int8.json"
EXPORT_FORMAT = 1
# Graph interface of an exported model.
PIXELS, TYPE_IDX, FEATURES, ANOMALY_MAP, SCORE = "pixels", "type_idx", "features", "anomaly_map", "score"
# (image, type) pairs per scorer call. One at a time measured fastest on a 2-core CPU (its
# activations stay in cache) and keeps ONNX Runtime's memory arena small: batch 8 took 1.06 GB
# peak and 15.0 parts/s on the demo model, batch 1 0.74 GB and 17.6 parts/s.
MAX_SCORER_BATCH = 1


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # an optional dependency
        raise RuntimeUnavailableError(
            "ONNX Runtime is not installed: pip install 'diffqc[export]'") from exc
    return onnxruntime


def import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "the onnx package is not installed: pip install 'diffqc[export]'") from exc
    return onnx


# --------------------------------------------------------------------------- sessions
def session_options(threads: int | None = None) -> Any:
    """Sequential execution, all graph optimisations, ``threads`` intra-op threads (None: ORT's
    default, one per physical core).

    Idle threads sleep instead of spin-waiting (``DIFFQC_ORT_SPINNING=1`` turns spinning back
    on): on a machine that also runs the camera, the service and anything else, spinning threads
    fight for the cores and measured twice as slow here; on an idle machine it gains little."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    spinning = "1" if os.environ.get("DIFFQC_ORT_SPINNING", "0") == "1" else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def make_session(model: onnx.ModelProto | bytes | str | Path, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> Any:
    """An ``InferenceSession`` on the CPU (or the ``providers`` given) for a model or file."""
    ort = import_onnxruntime()
    if not isinstance(model, (bytes, str, Path)):
        model = model.SerializeToString()
    if isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, session_options(threads),
                                providers=list(providers or ["CPUExecutionProvider"]))


EXTERNAL_THRESHOLD = 1 << 20  # constants from 1 MiB up are memory-mapped, not copied


def extract_subgraph(model: onnx.ModelProto, inputs: Sequence[str],
                     outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (names of tensors): the
    nodes and constants they need, nothing else (no shape inference, no copy of the rest, which
    matters for a model with 100 MB of constants)."""
    onnxlib = import_onnx()
    from onnx import helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    given, needed, nodes = set(inputs), set(), set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in given or name in needed or not name:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in nodes:
            nodes.add(id(node))
            stack.extend(node.input)
    missing = [i.name for i in graph.input if i.name in needed]
    if missing:
        raise ValueError(f"{', '.join(outputs)} need the input(s) {', '.join(missing)}, not given")
    declared = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}

    def value_info(name: str) -> Any:
        if name in declared:
            return declared[name]
        return helper.make_tensor_value_info(name, onnxlib.TensorProto.FLOAT, None)

    sub = helper.make_graph(
        [node for node in graph.node if id(node) in nodes], graph.name,
        [value_info(n) for n in inputs], [value_info(n) for n in outputs],
        initializer=[t for t in graph.initializer if t.name in needed])
    part: onnx.ModelProto = helper.make_model(sub, opset_imports=list(model.opset_import),
                                              ir_version=model.ir_version,
                                              producer_name=model.producer_name)
    return part


# --------------------------------------------------------------------------- image plumbing
def preprocess(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """HxWx3 float32 images in [0, 1] -> ``[N, 3, size, size]`` float32, the antialiased bilinear
    resize of :func:`diffqc.backbone.to_pixels` (Pillow's, which PyTorch's reproduces), in numpy."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
        img = np.ascontiguousarray(img, dtype=np.float32)
        for c in range(3):
            if img.shape[:2] == (size, size):
                out[i, c] = img[:, :, c]
            else:
                channel = Image.fromarray(img[:, :, c])  # mode "F": float32, resized as such
                out[i, c] = np.asarray(channel.resize((size, size), Image.Resampling.BILINEAR))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resampling with ``align_corners=False``."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, None)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    return lo, hi, w


def resize_map(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of an anomaly map to the image size (as ``torch.nn.functional.interpolate``
    with ``align_corners=False``, no antialiasing)."""
    if m.shape == (h, w):
        return m.astype(np.float32, copy=False)
    r0, r1, rw = _bilinear_axis(m.shape[0], h)
    rows = m[r0] * (1 - rw)[:, None] + m[r1] * rw[:, None]
    c0, c1, cw = _bilinear_axis(m.shape[1], w)
    out: np.ndarray = (rows[:, c0] * (1 - cw) + rows[:, c1] * cw).astype(np.float32)
    return out


# --------------------------------------------------------------------------- BYO backbone
class OnnxBackbone:
    """Any ONNX model as a frozen feature extractor: named intermediate tensors are the taps.

    ``layers`` name a tensor, a node (its first output) or a module scope of a PyTorch export
    such as ultralytics' YOLOv8 (``model.4`` -> the output of the last node under ``/model.4/``).
    The model is cut after the deepest tap, so a detection head costs nothing. Taps come back
    finest grid first (the grid the others are resized to). Pixels go in as they are, in [0, 1].
    """

    def __init__(self, path: Path | str, layers: Sequence[str], input_size: int,
                 threads: int | None = None) -> None:
        from diffqc.errors import BackboneError

        onnxlib = import_onnx()
        self.path = Path(path)
        if not layers:
            raise BackboneError("an ONNX backbone needs the tensors to tap: --layers NAME,... "
                                "(tensor, node or module names of the ONNX graph)")
        try:
            model = onnxlib.load(str(self.path))
        except Exception as exc:  # onnx raises several types for a bad file
            raise BackboneError(f"cannot read the ONNX backbone {self.path}: {exc}") from None
        init = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in init]
        if len(inputs) != 1:
            raise BackboneError(f"ONNX backbone {self.path} has {len(inputs)} inputs; "
                                "it needs one image input")
        self.input_name = inputs[0].name
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4:
            raise BackboneError(f"ONNX backbone input {self.input_name!r} has rank {len(dims)}, "
                                "expected NCHW")
        if dims[1] not in (None, 3):
            raise BackboneError(f"ONNX backbone input {self.input_name!r} has {dims[1]} channels, expected 3")
        for d in dims[2:]:
            if d is not None and d != input_size:
                raise BackboneError(f"ONNX backbone {self.path} takes {dims[2]}x{dims[3]} images; "
                                    f"train with --set backbone.input_size={d}")
        self.static_batch = dims[0]
        self.requested = tuple(layers)
        names = resolve_tensors(model, layers)
        self.model = extract_subgraph(model, [self.input_name], names)
        self.session = make_session(self.model, threads)
        probe = self.session.run(names, {self.input_name: np.zeros((1, 3, input_size, input_size),
                                                                   dtype=np.float32)})
        for name, arr in zip(names, probe, strict=True):
            if arr.ndim != 4:
                raise BackboneError(f"ONNX tensor {name!r} has shape {arr.shape}; taps must be NCHW")
        # finest grid first; ties keep the order given
        order = sorted(range(len(names)), key=lambda i: -probe[i].shape[2] * probe[i].shape[3])
        self.tensors = [names[i] for i in order]
        self.shapes = [tuple(int(d) for d in probe[i].shape[1:]) for i in order]

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.static_batch in (None, pixels.shape[0]):
            outs: list[np.ndarray] = self.session.run(self.tensors, {self.input_name: pixels})
            return outs
        per_image = [self.session.run(self.tensors, {self.input_name: pixels[i: i + 1]})
                     for i in range(pixels.shape[0])]
        return [np.concatenate([p[k] for p in per_image]) for k in range(len(self.tensors))]


def resolve_tensors(model: onnx.ModelProto, layers: Sequence[str]) -> list[str]:
    """Tensor names for layer names: a tensor, a node (its first output), or a module scope
    (``model.4``: the output of the last node named ``/model.4/...``, else ``.../model.4/...``)."""
    from diffqc.errors import BackboneError

    produced = {out for node in model.graph.node for out in node.output}
    by_node = {node.name: node for node in model.graph.node if node.name}
    names = []
    for layer in layers:
        if layer in produced:
            names.append(layer)
            continue
        if layer in by_node:
            names.append(by_node[layer].output[0])
            continue
        scope = "/" + layer.strip("/") + "/"
        scoped = ([node for node in model.graph.node if node.name.startswith(scope)]
                  or [node for node in model.graph.node if scope in node.name])
        if scoped:
            names.append(scoped[-1].output[0])  # nodes are stored in topological order
            continue
        scopes = dict.fromkeys(part for n in model.graph.node for part in n.name.split("/")[1:-1] if part)
        hint = ", ".join(list(scopes)[:16]) or ", ".join(sorted(produced)[:16])
        raise BackboneError(f"layer {layer!r} is neither a tensor, a node nor a module of the ONNX "
                            f"backbone; some names: {hint}")
    return names


# --------------------------------------------------------------------------- the ONNX detector
class OnnxGraph:
    """An exported graph as two sessions, its halves cut at ``features``: the backbone once per
    image, then the scorer under one type or several. One session per half holds every
    constant once, and the model itself is not kept (given as a file, it is freed before the
    sessions are made): memory is the sessions'."""

    def __init__(self, model: onnx.ModelProto | Path | str, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        onnxlib = import_onnx()
        if isinstance(model, (str, Path)):
            whole: onnx.ModelProto = onnxlib.load(str(model))
        else:  # the caller's model stays as it is (saving below moves the constants out)
            whole = onnxlib.ModelProto()
            whole.CopyFrom(model)
        del model
        # Large constants go to a temporary file that ONNX Runtime memory-maps (a session made
        # from bytes holds every constant twice: the parsed model and its tensor; for the
        # scorer's per-location eigenbases, 41 MB per type, that doubled the resident memory).
        # Saving moves them out of the in-memory model, so the halves below are small copies.
        tmp = Path(tempfile.mkdtemp(prefix="diffqc-ort-"))
        try:
            onnxlib.save_model(whole, str(tmp / "whole.onnx"), save_as_external_data=True,
                               all_tensors_to_one_file=True, location="constants.bin",
                               size_threshold=EXTERNAL_THRESHOLD)
            halves = [extract_subgraph(whole, [PIXELS], [FEATURES]),
                      extract_subgraph(whole, [FEATURES, TYPE_IDX], [ANOMALY_MAP, SCORE])]
            del whole
            sessions = []
            for i, half in enumerate(halves):
                path = tmp / f"half{i}.onnx"
                onnxlib.save_model(half, str(path))  # refers to constants.bin beside it
                sessions.append(make_session(path, threads, providers))
            self.backbone, self.scorer = sessions
        finally:  # the mapping outlives the file where the platform allows removing it
            shutil.rmtree(tmp, ignore_errors=True)

    def run(self, pixels: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``[N, 3, S, S]`` and types ``[N]`` -> maps ``[N, S, S]`` and scores ``[N]``."""
        return self.score_features(self.features(pixels), type_idx)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Standardised backbone features ``[N, C, h, w]``."""
        out: np.ndarray = self.backbone.run([FEATURES], {PIXELS: pixels})[0]
        return out

    def score_features(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``[N, S, S]`` and scores ``[N]`` of features under the types given (in chunks of
        ``MAX_SCORER_BATCH``)."""
        type_idx = type_idx.astype(np.int64)
        if feats.shape[0] <= MAX_SCORER_BATCH:
            amap, score = self.scorer.run([ANOMALY_MAP, SCORE], {FEATURES: feats, TYPE_IDX: type_idx})
            return amap, score
        parts = [self.score_features(feats[i: i + MAX_SCORER_BATCH], type_idx[i: i + MAX_SCORER_BATCH])
                 for i in range(0, feats.shape[0], MAX_SCORER_BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class TensorRTGraph:
    """A TensorRT engine built from the ONNX export (``diffqc export --format tensorrt``), run
    with CUDA buffers from PyTorch: the same ``run`` as :class:`OnnxGraph`. Needs an NVIDIA GPU
    and the ``tensorrt`` package."""

    def __init__(self, engine_path: Path | str) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise RuntimeUnavailableError("TensorRT is not installed: pip install tensorrt") from exc
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError("TensorRT needs a CUDA GPU")
        self._torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeUnavailableError(f"cannot load the TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run(self, pixels: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            feeds = {PIXELS: torch.from_numpy(np.ascontiguousarray(pixels)).cuda(non_blocking=True),
                     TYPE_IDX: torch.from_numpy(type_idx.astype(np.int64)).cuda(non_blocking=True)}
            for name, t in feeds.items():
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in (ANOMALY_MAP, SCORE):
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return outs[ANOMALY_MAP].cpu().numpy(), outs[SCORE].cpu().numpy()


def read_export_info(path: Path | str) -> dict[str, Any]:
    """``export.json`` of a bundle (what ``diffqc export`` wrote), or a :class:`BundleError`."""
    from diffqc.errors import BundleError

    f = Path(path) / EXPORT_FILE
    if not f.is_file():
        raise BundleError(f"model bundle {path} has no ONNX export: run `diffqc export {path}`")
    try:
        info: dict[str, Any] = json.loads(f.read_text())
    except ValueError as exc:
        raise BundleError(f"model bundle {path}: damaged {EXPORT_FILE} ({exc})") from None
    if info.get("format") != EXPORT_FORMAT:
        raise BundleError(f"model bundle {path}: {EXPORT_FILE} format {info.get('format')} "
                          f"is not {EXPORT_FORMAT}")
    return info


def _read_bundle(path: Path) -> tuple[DetectorConfig, dict[str, Any], Calibrator]:
    from diffqc.errors import BundleError
    from diffqc.inspection import BUNDLE_FILES, BUNDLE_FORMAT

    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist or is not a folder")
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    if missing:
        raise BundleError(f"model bundle {path} is incomplete: missing {', '.join(missing)}")
    try:
        config = DetectorConfig.from_json(path / "config.json")
        meta: dict[str, Any] = json.loads((path / "metadata.json").read_text())
        cal = Calibrator.from_dict(json.loads((path / "calibration.json").read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"model bundle {path}: damaged JSON ({exc})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"model bundle {path}: format {meta.get('format')} is not {BUNDLE_FORMAT}")
    return config, meta, cal


def usable_precisions(path: Path | str, info: dict[str, Any] | None = None) -> list[str]:
    """The exported precisions a bundle can run, fastest measured first; an INT8 model that
    failed its parity check is only run when asked for by name."""
    info = info if info is not None else read_export_info(path)
    out = [p for p in ("fp32", "int8")
           if isinstance(info.get(p), dict) and (Path(path) / ONNX_FILES[p]).is_file()
           and (p == "fp32" or info[p].get("accepted", False))]
    return sorted(out, key=lambda p: float(info[p].get("latency_ms", math.inf) or math.inf))


class OnnxDetector:
    """A fitted bundle run by ONNX Runtime; the same ``inspect`` as :class:`~diffqc.model.Detector`.

    ``precision``: ``fp32`` (``model.onnx``), ``int8`` (``model.int8.onnx``, with the INT8
    calibration when the export could recompute it) or ``auto`` (the fastest exported model
    that passed its parity check).
    """

    runtime = "onnx"

    def __init__(self, path: Path | str, *, precision: str = "auto", threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        from diffqc.errors import BundleError
        from diffqc.inspection import sha256_file

        self.path: Path | None = Path(path)
        self.config, self.metadata, self.calibration_ = _read_bundle(self.path)
        self.classes_: list[str] = list(self.metadata["classes"])
        info = read_export_info(self.path)
        if info.get("weights_file_sha256") != self.metadata.get("weights_file_sha256"):
            raise BundleError(f"model bundle {self.path}: the ONNX export is older than the model; "
                              f"run `diffqc export {self.path}` again")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "auto":
            usable = usable_precisions(self.path, info)
            if not usable:
                raise BundleError(f"model bundle {self.path}: no usable ONNX model; run `diffqc export`")
            precision = usable[0]
        entry = info.get(precision)
        file = self.path / ONNX_FILES[precision]
        if not isinstance(entry, dict) or not file.is_file():
            raise BundleError(f"model bundle {self.path} has no {precision.upper()} ONNX model "
                              f"({ONNX_FILES[precision]}); run `diffqc export`"
                              + (" --int8 --calibration-data DATA" if precision == "int8" else ""))
        if entry.get("sha256") and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"model bundle {self.path}: {file.name} is damaged (checksum mismatch)")
        if precision == "int8" and (self.path / INT8_CALIBRATION_FILE).is_file():
            int8_cal = json.loads((self.path / INT8_CALIBRATION_FILE).read_text())
            self.calibration_ = Calibrator.from_dict(int8_cal)
        self.precision = precision
        self._feat_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.graph = OnnxGraph(file, threads, providers)
        self.input_size = self.config.backbone.input_size

    @classmethod
    def from_detector(cls, det: Detector, *, threads: int | None = None) -> OnnxDetector:
        """A fitted (PyTorch) Detector exported in memory and run by ONNX Runtime, FP32; for code
        that fits models itself, such as a cross-validation, and wants ONNX Runtime's speed."""
        from diffqc.export import build_onnx

        if det.calibration_ is None:
            raise RuntimeError("the detector is not fitted; call fit() or Detector.load()")
        self = cls.__new__(cls)
        self.path = None
        self.config, self.metadata, self.calibration_ = det.config, dict(det.metadata), det.calibration_
        self.classes_ = list(det.classes_)
        self.precision = "fp32"
        fe = det.extractor
        self._feat_stats = (fe.feat_mean.detach().cpu().numpy().reshape(1, -1, 1, 1),
                            fe.feat_std.detach().cpu().numpy().reshape(1, -1, 1, 1))
        self.graph = OnnxGraph(build_onnx(det), threads)
        self.input_size = det.config.backbone.input_size
        return self

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_id", "unfitted"))

    def type_index(self, feature_type: str) -> int:
        from diffqc.errors import UnknownFeatureTypeError

        try:
            return self.classes_.index(feature_type)
        except ValueError:
            raise UnknownFeatureTypeError(
                f"unknown feature type {feature_type!r}; this model knows {', '.join(self.classes_)}"
            ) from None

    # ------------------------------------------------------------------ inspection
    def inspect(
        self,
        images: Sequence[np.ndarray],
        feature_types: Sequence[str | None] | None = None,
        *,
        all_types: bool = True,
        maps: bool = True,
    ) -> list[Inspection]:
        """As :meth:`diffqc.model.Detector.inspect`."""
        types = list(feature_types) if feature_types is not None else [None] * len(images)
        if len(types) != len(images):
            raise ValueError(f"{len(images)} images but {len(types)} feature types")
        given = [None if t is None else self.type_index(t) for t in types]
        if not images:
            return []
        pixels = preprocess(images, self.input_size)
        sizes = [(int(img.shape[0]), int(img.shape[1])) for img in images] if maps else None
        return self.inspect_pixels(pixels, given, sizes, all_types=all_types)

    def inspect_pixels(
        self, pixels: np.ndarray, given: Sequence[int | None],
        map_sizes: Sequence[tuple[int, int]] | None = None, *, all_types: bool = True,
    ) -> list[Inspection]:
        """:meth:`inspect` from preprocessed pixels and type indices (None = unknown)."""

        return self._inspect_standardised(self.graph.features(pixels), given, map_sizes, all_types=all_types)

    def inspect_features(
        self, raw: np.ndarray | Any, feature_types: Sequence[str | None],
        map_sizes: Sequence[tuple[int, int]] | None = None, *, all_types: bool = True,
    ) -> list[Inspection]:
        """As :meth:`diffqc.model.Detector.inspect_features`: from raw backbone features
        ``[N, C, h, w]`` (NumPy or a CPU tensor), standardised here and scored by ONNX Runtime."""
        mean, std = self._standardisation()
        feats = ((np.asarray(raw, dtype=np.float32) - mean) / std).astype(np.float32)
        given = [None if t is None else self.type_index(t) for t in feature_types]
        return self._inspect_standardised(feats, given, map_sizes, all_types=all_types)

    def _standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        if self._feat_stats is None:
            from safetensors.numpy import load_file

            assert self.path is not None
            t = load_file(str(self.path / "weights.safetensors"))
            self._feat_stats = (t["features.mean"].reshape(1, -1, 1, 1),
                                t["features.std"].reshape(1, -1, 1, 1))
        return self._feat_stats

    def _inspect_standardised(
        self, feats: np.ndarray, given: Sequence[int | None],
        map_sizes: Sequence[tuple[int, int]] | None = None, *, all_types: bool = True,
    ) -> list[Inspection]:
        from diffqc.inspection import verdicts

        n, n_types = len(given), len(self.classes_)
        table: np.ndarray | None = None
        if all_types or any(g is None for g in given):
            table = np.empty((n, n_types), dtype=np.float32)
            own = np.empty(n, dtype=np.int64)
            own_maps = np.empty((n, self.input_size, self.input_size), dtype=np.float32)
            for i in range(n):
                m, table[i] = self.graph.score_features(np.repeat(feats[i: i + 1], n_types, axis=0),
                                                        np.arange(n_types))
                g = given[i]
                own[i] = int(table[i].argmin()) if g is None else g
                own_maps[i] = m[own[i]]
            own_scores = table[np.arange(n), own]
        else:
            own = np.array(given, dtype=np.int64)
            own_maps, own_scores = self.graph.score_features(feats, own)
        maps = None if map_sizes is None else [resize_map(own_maps[i], *map_sizes[i]) for i in range(n)]
        return verdicts(self.classes_, self.calibration_, given, [int(k) for k in own],
                        [float(x) for x in own_scores], table, maps)

    def inspect_samples(
        self, samples: Sequence[Sample], *, type_known: bool = True, progress: bool = False,
        all_types: bool = True, maps: bool = True, skip_corrupt: bool = False,
    ) -> tuple[list[Inspection], list[Sample]]:
        """As :meth:`diffqc.model.Detector.inspect_samples`."""
        from diffqc.inspection import inspect_in_batches

        return inspect_in_batches(self.inspect, samples, self.config.batch_size, type_known=type_known,
                                  progress=progress, all_types=all_types, maps=maps,
                                  skip_corrupt=skip_corrupt)


# --------------------------------------------------------------------------- runtime choice
def _nvidia_driver_loaded() -> bool:
    """Whether an NVIDIA driver is loaded (Linux): without one CUDA cannot be available, and
    asking PyTorch would cost an ONNX-only process the ~270 MB of importing it."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _cuda_requested(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    if sys.platform.startswith("linux") and not _nvidia_driver_loaded():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_runtime(path: Path | str, device: str | None = None) -> str:
    """``onnx`` when the bundle has a valid ONNX export that measured faster than PyTorch on the
    CPU at export time, else ``torch`` (also on a GPU, where PyTorch runs the model on it)."""
    if _cuda_requested(device):
        return "torch"
    try:
        info = read_export_info(path)
        _, meta, _ = _read_bundle(Path(path))
    except Exception:  # no export, or a damaged one: PyTorch can still run the bundle
        return "torch"
    if info.get("weights_file_sha256") != meta.get("weights_file_sha256"):
        warnings.warn(f"model bundle {path}: the ONNX export is stale; using PyTorch "
                      f"(run `diffqc export {path}` again)", stacklevel=2)
        return "torch"
    usable = usable_precisions(path, info)
    torch_ms = info.get("torch_latency_ms")
    if not usable or (torch_ms is not None and float(info[usable[0]]["latency_ms"]) >= float(torch_ms)):
        return "torch"
    try:
        import_onnxruntime()
    except RuntimeUnavailableError:
        return "torch"
    return "onnx"


def load_detector(path: Path | str, runtime: str = "auto", *, threads: int | None = None,
                  device: str | None = None, precision: str = "auto") -> Detector | OnnxDetector:
    """Load a bundle for inference with PyTorch or ONNX Runtime (``auto``: see :func:`choose_runtime`)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        runtime = "onnx" if precision != "auto" else choose_runtime(path, device)
    if runtime == "onnx":
        return OnnxDetector(path, precision=precision, threads=threads)
    if precision == "int8":
        raise ValueError("INT8 runs on ONNX Runtime: use --runtime onnx (or auto)")
    from diffqc.model import Detector

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return Detector.load(path, device=device)


def add_runtime_arguments(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """``--runtime``, ``--precision`` and (unless the command has its own) ``--threads``, for the
    commands that run a model."""
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="torch, onnx (the bundle's ONNX export) or auto (default: ONNX Runtime "
                             "on a CPU when the export measured faster)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="ONNX model: fp32, int8 or auto (the fastest that passed parity)")
    if threads:
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads for inference (default: all cores)")


def runtime_from_args(args: argparse.Namespace, path: Path | str) -> Detector | OnnxDetector:
    """:func:`load_detector` with the options of :func:`add_runtime_arguments`."""
    return load_detector(path, getattr(args, "runtime", "auto"), threads=getattr(args, "threads", None),
                         device=getattr(args, "device", None), precision=getattr(args, "precision", "auto"))


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has the VNNI dot-product instructions (8-bit products do not
    saturate, so INT8 weights need no range reduction)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags) is not None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
