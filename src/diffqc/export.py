"""``diffqc export``: the whole inference path as one ONNX graph, INT8 with a parity report, and
a TensorRT FP16 engine built from the ONNX export.

The graph takes ``pixels`` float32 ``[N, 3, S, S]`` in [0, 1] (decoding and resizing stay in
numpy, outside it) and ``type_idx`` int64 ``[N]``, and gives ``anomaly_map`` ``[N, S, S]`` (the
smoothed map and the image score of :meth:`Detector.maps_and_scores`). Its two halves meet at
the tensor ``features`` ``[N, C, h, w]`` (standardised backbone features), so a runtime can run
the backbone once and the scorer under the types it needs. Everything learned is baked in as
constants: backbone weights, feature statistics, and the scorer's state: the denoiser and its
(t, ε) bank, or PaDiM's Gaussians, or PatchCore's memory banks (each image's per-type state
gathered by its type in the graph: :meth:`PaDiMScorer._maps_gathered`,
:meth:`PatchCoreScorer.padded_banks`). The type router stays outside the graph, in NumPy
(:mod:`diffqc.routing`), shared by every runtime.

The graph is traced from the very modules the :class:`~diffqc.model.Detector` runs
(:class:`InferenceGraph`), so a change to the scorer reaches the export without a second
implementation, and every export is checked against PyTorch on real images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffqc import __version__, routing
from diffqc.backends.graph import ANOMALY_MAP, FEATURES, PIXELS, SCORE, TYPE_IDX, SplitGraph, import_onnx
from diffqc.backends.openvino import OpenVinoGraph, openvino_version
from diffqc.backends.ort import OnnxBackbone, OnnxGraph, import_onnxruntime, make_session
from diffqc.backends.tensorrt import ENGINE_FILE as TENSORRT_ENGINE
from diffqc.backends.tensorrt import build_tensorrt_engine, check_tensorrt_builder
from diffqc.bundle import check_bundle_files, check_not_retrained
from diffqc.config import uses_layouts
from diffqc.errors import ConfigError, DatasetError, ExportError, NotFittedError
from diffqc.output import check_writable, json_line, read_json, scratch_folder, write_atomic
from diffqc.recalibrate import recalibration_text
from diffqc.runtime import (
    EXPORT_FILE,
    EXPORT_FORMAT,
    INT8_CALIBRATION_FILE,
    ONNX_FILES,
    OnnxDetector,
    available_cores,
    cpu_has_vnni,
    preprocess,
    read_export_info,
    usable_choices,
)

if TYPE_CHECKING:
    import onnx

    from diffqc.calibration import Calibrator
    from diffqc.data import Sample
    from diffqc.model import Detector

DEFAULT_OPSET = 17
# Stated FP32 tolerance: |ONNX - PyTorch| <= RTOL x the largest |value|, for maps and scores.
RTOL = 1e-4
# INT8 may lose at most this much image AUROC on any type (0.5 AUROC points).
MAX_AUROC_DROP = 0.005
# INT8 layer search: a layer whose quantization alone moves the scores by more than this many
# GOOD-score standard deviations (RMS) stays in float; then layers are put back in float, worst
# first, until the whole model is within MAX_SCORE_ERROR.
MAX_LAYER_ERROR = 0.05
MAX_SCORE_ERROR = 0.10
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


# --------------------------------------------------------------------------- the graph
class InferenceGraph(nn.Module):
    """The Detector's inference path as one module: ``(pixels, type_idx) -> (anomaly_map, score)``.

    It holds the Detector's own extractor and scorer modules (registered, so that tracing sees
    their weights as parameters) and calls :meth:`Detector.maps_and_scores`, so PyTorch and
    ONNX compute the same thing.
    """

    def __init__(self, det: Detector) -> None:
        super().__init__()
        if det.scorer_ is None:
            raise NotFittedError
        self.extractor = det.extractor
        self.scorer = nn.ModuleDict({name.strip("_"): m for name, m in vars(det.scorer_).items()
                                     if isinstance(m, nn.Module)})
        object.__setattr__(self, "detector", det)  # not a submodule: nothing registered twice
        self.requires_grad_(False).eval()

    @contextlib.contextmanager
    def packed(self) -> Iterator[None]:
        """The scorer's 8-bit tables (``prior_storage=int8``) packed for a trace within, as the
        graph's constants; released on leaving (eager scoring reads the float32 tables)."""
        with contextlib.ExitStack() as stack:
            for module in self.scorer.values():
                if callable(packed := getattr(module, "packed_storage", None)):
                    stack.enter_context(packed())
            yield

    def train(self, mode: bool = True) -> InferenceGraph:
        """Always in inference mode: the exporter restores the caller's mode afterwards, and a
        batch-norm layer in training mode would rewrite its statistics."""
        return super().train(False)

    def features(self, pixels: Tensor) -> Tensor:
        out: Tensor = self.extractor(pixels)
        return out

    def scores(self, features: Tensor, type_idx: Tensor) -> tuple[Tensor, Tensor]:
        det: Detector = self.__dict__["detector"]
        return det.maps_and_scores(features, type_idx)

    def forward(self, pixels: Tensor, type_idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.scores(self.features(pixels), type_idx)


class _Half(nn.Module):
    """One half of :class:`InferenceGraph`, as a module to trace."""

    def __init__(self, graph: InferenceGraph, part: str) -> None:
        super().__init__()
        self.g = graph
        self.part = part
        self.train(False)

    def forward(self, *args: Tensor) -> Any:
        if self.part == "features":
            return self.g.features(*args)
        if self.part == "taps":  # a bring-your-own ONNX backbone's taps -> standardised features
            fe = self.g.extractor
            return fe.standardise(fe.combine_taps(list(args)))
        return self.g.scores(*args)


def _trace(module: nn.Module, args: tuple[Tensor, ...], inputs: Sequence[str], outputs: Sequence[str],
           opset: int) -> onnx.ModelProto:
    onnxlib = import_onnx()
    with (scratch_folder("diffqc-trace-", what="the ONNX trace") as tmp, warnings.catch_warnings(),
          torch.inference_mode(False), torch.no_grad()):
        # Shapes other than the batch are constants of the graph on purpose.
        warnings.simplefilter("ignore")
        file = tmp / "part.onnx"
        torch.onnx.export(
            module, args, file, dynamo=False, opset_version=opset, input_names=list(inputs),
            output_names=list(outputs), dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)},
            do_constant_folding=True,
        )
        model: onnx.ModelProto = onnxlib.load(str(file))
    return model


def _byo_features(graph: InferenceGraph, backbone: OnnxBackbone, opset: int) -> onnx.ModelProto:
    """A bring-your-own ONNX backbone cut at its taps, joined to the traced pooling/alignment/
    standardisation head: ``pixels -> features``."""
    onnxlib = import_onnx()
    from onnx import compose, version_converter

    if backbone.static_batch is not None:
        raise ExportError(f"the ONNX backbone {backbone.path} takes a batch of {backbone.static_batch} "
                          "image(s) only (its input's first dimension is fixed): the export runs "
                          "batches; export the backbone with a dynamic batch (ultralytics: "
                          "dynamic=True), or run this bundle with PyTorch (--runtime torch)")
    body = onnxlib.ModelProto()
    body.CopyFrom(backbone.model)
    taps = _float32_io(body, backbone)
    body_opset = next((o.version for o in body.opset_import if o.domain in ("", "ai.onnx")), opset)
    opset = max(opset, body_opset)
    if body_opset < opset:
        body = version_converter.convert_version(body, opset)
    zeros = [torch.zeros(2, *shape) for shape in backbone.shapes]
    tap_names = [f"tap{i}" for i in range(len(zeros))]
    head = _trace(_Half(graph, "taps"), tuple(zeros), tap_names, [FEATURES], opset)
    body = compose.add_prefix(body, "backbone/", rename_inputs=False, rename_outputs=False)
    head = compose.add_prefix(head, "head/", rename_inputs=False, rename_outputs=False)
    body.ir_version = head.ir_version = max(body.ir_version, head.ir_version)
    merged: onnx.ModelProto = compose.merge_models(
        body, head, io_map=list(zip(taps, tap_names, strict=True)),
        outputs=[FEATURES])
    for inp in merged.graph.input:
        if inp.name == backbone.input_name:
            old = inp.name
            inp.name = PIXELS
            for node in merged.graph.node:
                node.input[:] = [PIXELS if x == old else x for x in node.input]
    return merged


def _float32_io(body: onnx.ModelProto, backbone: OnnxBackbone) -> list[str]:
    """Casts in ``body`` (the backbone cut at its taps) so that it takes float32 pixels and gives
    float32 taps, as the head traced after it does (a half-precision export takes and gives
    float16); the names of the taps to join to the head."""
    onnxlib = import_onnx()
    helper, float32 = onnxlib.helper, onnxlib.TensorProto.FLOAT
    casts = []
    if backbone.input_dtype != np.float32:
        (given,) = [i for i in body.graph.input if i.name == backbone.input_name]
        inner = f"{given.name}/as_{backbone.input_dtype}"
        for node in body.graph.node:
            node.input[:] = [inner if x == given.name else x for x in node.input]
        casts.append(helper.make_node("Cast", [given.name], [inner], to=given.type.tensor_type.elem_type))
        given.type.tensor_type.elem_type = float32
    taps = []
    for name, dtype in zip(backbone.tensors, backbone.tap_dtypes, strict=True):
        if dtype == np.float32:
            taps.append(name)
            continue
        taps.append(f"{name}/as_float32")
        body.graph.node.append(helper.make_node("Cast", [name], [taps[-1]], to=float32))
        (out,) = [o for o in body.graph.output if o.name == name]
        out.name, out.type.tensor_type.elem_type = taps[-1], float32
    if casts:  # node order is topological: the input's cast first
        nodes = [*casts, *body.graph.node]
        del body.graph.node[:]
        body.graph.node.extend(nodes)
    return taps


def _int8_constants_as_initializers(model: onnx.ModelProto) -> None:
    """The tracer writes a module's non-persistent buffers as Constant nodes: the 8-bit tables
    packed for the graph (``diffusion.prior_storage=int8``), INT8 Constant nodes (not graph
    outputs), become initializers of the same name, as every other table is."""
    onnxlib = import_onnx()
    outputs = {o.name for o in model.graph.output}
    keep = []
    for node in model.graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if (value is None or value.name != "value" or value.t.data_type != onnxlib.TensorProto.INT8
                or node.output[0] in outputs):
            keep.append(node)
            continue
        tensor = onnxlib.TensorProto()
        tensor.CopyFrom(value.t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _tidy(model: onnx.ModelProto) -> None:
    """One import per opset domain, 8-bit tables as initializers, and no Identity nodes through
    which the tracer shares a weight between calls: every weight is an initializer its consumers
    read directly (and quantize as one)."""
    versions: dict[str, int] = {}
    for o in model.opset_import:  # merging repeats the opset imports
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del model.opset_import[:]
    for domain, version in versions.items():
        model.opset_import.add(domain=domain, version=version)
    _int8_constants_as_initializers(model)
    init = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in init and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        node.input[:] = [alias.get(x, x) for x in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def build_onnx(det: Detector, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The Detector's whole inference path as one ONNX model (see the module docstring)."""
    if uses_layouts(det.config):  # the graph takes one squashed S x S image per part
        raise ExportError(f"ONNX export covers backbone.resize=squash without tiling; this model uses "
                          f"resize={det.config.backbone.resize}, tiling.mode={det.config.tiling.mode}: "
                          "run it with PyTorch (--runtime torch)")
    onnxlib = import_onnx()
    from onnx import compose

    graph = InferenceGraph(det)
    size = det.config.backbone.input_size
    n_types = len(det.classes_)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, size, size, generator=gen)
    type_idx = torch.tensor([0, min(1, n_types - 1)], dtype=torch.long)
    fe = det.extractor
    if fe.onnx is not None:
        features_part = _byo_features(graph, fe.onnx, opset)
        opset = max(opset, next(o.version for o in features_part.opset_import if o.domain in ("", "ai.onnx")))
    else:
        features_part = _trace(_Half(graph, "features"), (pixels,), [PIXELS], [FEATURES], opset)
    with torch.no_grad():
        feats = fe(pixels)
    with graph.packed():
        scorer_part = _trace(_Half(graph, "scores"), (feats, type_idx), [FEATURES, TYPE_IDX],
                             [ANOMALY_MAP, SCORE], opset)
    features_part = compose.add_prefix(features_part, "features/", rename_inputs=False, rename_outputs=False)
    scorer_part = compose.add_prefix(scorer_part, "scorer/", rename_inputs=False, rename_outputs=False)
    features_part.ir_version = scorer_part.ir_version = max(features_part.ir_version, scorer_part.ir_version)
    model: onnx.ModelProto = compose.merge_models(features_part, scorer_part, io_map=[(FEATURES, FEATURES)])
    _tidy(model)
    model.producer_name = "diffqc"
    model.producer_version = __version__
    meta = {
        "diffqc.model_id": str(det.metadata.get("model_id", "")),
        "diffqc.classes": json.dumps(det.classes_),
        "diffqc.input_size": str(size),
        "diffqc.method": det.config.method,
    }
    if det.calibration_ is not None:
        meta["diffqc.calibration"] = json.dumps(det.calibration_.to_dict())
    onnxlib.helper.set_model_props(model, meta)
    onnxlib.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- checks
def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _median_ms(fn: Callable[[], object], *, warmup: int = 2, runs: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_fp32(det: Detector, model: onnx.ModelProto | None, graph: SplitGraph,
               images: Sequence[np.ndarray], type_idx: np.ndarray, *, threads: int | None = None,
               rtol: float = RTOL, table_images: int = 4, batch: int = 4) -> dict[str, Any]:
    """A runtime against PyTorch on ``images``, end to end from the decoded image (numpy vs
    PyTorch resizing included): maps and scores under the given types from the whole ``model``
    in one ONNX Runtime session (from ``graph`` when no model is given), and every type's score
    of the first ``table_images`` images from ``graph`` (its halves, as diffqc runs them); and
    the PASS/REVIEW/REJECT each gives."""
    from diffqc.backbone import to_pixels

    whole = make_session(model, threads) if model is not None else None
    module = InferenceGraph(det)
    size = det.config.backbone.input_size
    ref_maps, ref_scores, maps, scores = [], [], [], []
    for sl in _chunks(len(images), batch):
        with torch.inference_mode():
            m, s = module(to_pixels(images[sl], size), torch.from_numpy(type_idx[sl]))
        ref_maps.append(m.numpy())
        ref_scores.append(s.numpy())
        px = preprocess(images[sl], size)
        m2, s2 = (whole.run([ANOMALY_MAP, SCORE], {PIXELS: px, TYPE_IDX: type_idx[sl]}) if whole is not None
                  else graph.run(px, type_idx[sl]))
        maps.append(m2)
        scores.append(s2)
    rm, rs, om, os_ = (np.concatenate(x) for x in (ref_maps, ref_scores, maps, scores))
    n_types = len(det.classes_)
    k = min(table_images, len(images))
    rep = np.repeat(preprocess(images[:k], size), n_types, axis=0)
    idx = np.tile(np.arange(n_types), k)
    with torch.inference_mode():
        ref_table = module(torch.from_numpy(rep), torch.from_numpy(idx))[1].numpy().reshape(k, n_types)
    table = graph.score_features(graph.features(rep), idx)[1].reshape(k, n_types)
    cal = det.calibration_
    assert cal is not None
    names = [det.classes_[int(t)] for t in type_idx]
    ref_dec = [cal.decide(cal.p_value(t, float(s))) for t, s in zip(names, rs, strict=True)]
    dec = [cal.decide(cal.p_value(t, float(s))) for t, s in zip(names, os_, strict=True)]
    map_err = float(np.abs(om - rm).max())
    score_err = float(max(np.abs(os_ - rs).max(), np.abs(table - ref_table).max()))
    map_scale = float(np.abs(rm).max())
    score_scale = float(max(np.abs(rs).max(), np.abs(ref_table).max()))
    return {
        "images": len(images), "table_images": k, "rtol": rtol,
        "max_abs_map_error": map_err, "max_abs_score_error": score_err,
        "max_rel_map_error": map_err / max(map_scale, 1e-12),
        "max_rel_score_error": score_err / max(score_scale, 1e-12),
        "decisions_equal": int(sum(a == b for a, b in zip(ref_dec, dec, strict=True))),
        "type_argmin_equal": int((table.argmin(1) == ref_table.argmin(1)).sum()),
        "passed": bool(map_err <= rtol * map_scale and score_err <= rtol * score_scale
                       and ref_dec == dec),
    }


def measure_latency(det: Detector, graphs: dict[str, SplitGraph], image: np.ndarray, type_index: int, *,
                    threads: int | None, runs: int = 10) -> dict[str, float]:
    """Median milliseconds of one image through the graph (pixels -> map and score), batch 1:
    PyTorch and each runtime's graph given."""
    size = det.config.backbone.input_size
    pixels = preprocess([image], size)
    idx = np.array([type_index], dtype=np.int64)
    out: dict[str, float] = {}
    module = InferenceGraph(det)
    px, ti = torch.from_numpy(pixels), torch.from_numpy(idx)
    with torch_threads(threads), torch.inference_mode():
        out["torch"] = _median_ms(lambda: module(px, ti), runs=max(3, runs // 2))
    for name, graph in graphs.items():
        out[name] = _median_ms(lambda g=graph: g.run(pixels, idx), runs=runs)  # type: ignore[misc]
    return {k: round(v, 2) for k, v in out.items()}


# --------------------------------------------------------------------------- INT8
def _layer_of(node_name: str) -> str | None:
    """The layer a weight node belongs to, for the sensitivity search: a backbone block, or one
    layer of the scorer (all of its calls together: the bank unrolls it). ``None`` for the
    post-processing (upsampling, smoothing), which stays in float."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 3 or parts[0] not in ("features", "scorer"):
        return None
    scope = [re.sub(r"_\d+$", "", p) for p in parts[1:-1]]  # "fc1_2": the 3rd call of fc1
    if scope[0] == "backbone":  # a bring-your-own ONNX backbone
        return "/".join(scope[:2]) if len(scope) > 1 else f"backbone/{parts[-1]}"
    if scope[0] == "extractor":
        return "/".join(scope[:2])
    if parts[0] == "scorer" and scope[0] != "":
        return "/".join(scope)
    return None


def quantizable_layers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Layer -> names of its Conv / MatMul / Gemm nodes with constant weights, in graph order."""
    init = {t.name for t in model.graph.initializer}
    layers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and len(node.input) > 1 and node.input[1] in init:
            layer = _layer_of(node.name)
            if layer is not None:
                layers.setdefault(layer, []).append(node.name)
    return layers


def _feeds_reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    return _Reader()


@dataclass
class Int8Result:
    model: onnx.ModelProto
    float_layers: dict[str, str]  # layer -> why it stayed in float
    layer_errors: dict[str, float]  # layer -> RMS score error when only it is quantized
    score_error: float  # RMS score error of the final model, in GOOD-score standard deviations
    settings: dict[str, Any]


def quantize_int8(
    fp32_path: Path, calib_feeds: Sequence[dict[str, np.ndarray]], check_pixels: np.ndarray,
    check_types: np.ndarray, score_scale: np.ndarray, *, threads: int | None = None, search: bool = True,
    max_layer_error: float = MAX_LAYER_ERROR, max_score_error: float = MAX_SCORE_ERROR,
    progress: bool = False,
) -> Int8Result:
    """Static QDQ quantization (per-channel INT8 weights, UINT8 activations calibrated on
    ``calib_feeds``), keeping in float the layers that measurably move the scores.

    The search measures, for each layer alone, the RMS change of the image scores of
    ``check_pixels`` in units of ``score_scale`` (the GOOD-score standard deviation of each
    image's type); layers over ``max_layer_error`` stay in float, then the worst of the others
    too until the whole model is within ``max_score_error``. Non-weight operations
    (normalisation, the noise arithmetic, upsampling, smoothing, aggregation) are never
    quantized."""
    onnxlib = import_onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnxlib.load(str(fp32_path))
    layers = quantizable_layers(model)
    reduce_range = not cpu_has_vnni()
    settings = {"format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8",
                "reduce_range": reduce_range, "calibration": "minmax", "calibration_images": len(calib_feeds),
                "quantized_ops": list(QUANTIZED_OPS), "check_images": len(check_pixels)}
    ref = _whole_scores(model, check_pixels, check_types, threads)

    with scratch_folder("diffqc-int8-", what="the INT8 quantisation") as tmp:
        cache = tmp / "ranges.json"
        out = tmp / "q.onnx"
        reader = _feeds_reader(calib_feeds)

        def quantized(layer_names: Sequence[str]) -> tuple[onnx.ModelProto, float]:
            nonlocal reader
            nodes = [n for name in layer_names for n in layers[name]]
            with warnings.catch_warnings(), _quiet_logging():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(fp32_path), str(out), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    # an empty list would mean "all": name a node that does not exist instead
                    nodes_to_quantize=nodes or ["-"], calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache),
                    extra_options={"MatMulConstBOnly": True,
                                   # float outputs, no requantization: a MatMul runs as one
                                   # MatMulIntegerToFloat (measured 2x faster than QLinearMatMul)
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
                )
            reader = None  # ranges are cached after the first call
            q = onnxlib.load(str(out))
            scores = _whole_scores(q, check_pixels, check_types, threads)
            err = float(np.sqrt(np.mean(((scores - ref) / score_scale) ** 2)))
            return q, err

        names = list(layers)
        q_all, err_all = quantized(names)
        layer_errors: dict[str, float] = {}
        float_layers: dict[str, str] = {}
        if search:
            for name in tqdm(names, desc="INT8 layer sensitivity", disable=not progress, unit="layer"):
                layer_errors[name] = quantized([name])[1]
            for name in names:
                if layer_errors[name] > max_layer_error:
                    float_layers[name] = (f"alone it moves the scores by {layer_errors[name]:.3f} "
                                          f"GOOD-score SD (> {max_layer_error})")
        kept = [n for n in names if n not in float_layers]
        q, err = (q_all, err_all) if not float_layers else quantized(kept)
        by_harm = sorted(kept, key=lambda n: -layer_errors.get(n, 0.0))
        while search and err > max_score_error and kept:
            worst = by_harm.pop(0)
            float_layers[worst] = (f"put back in float (alone {layer_errors[worst]:.3f} SD) to bring "
                                   f"the model within {max_score_error} SD")
            kept.remove(worst)
            q, err = quantized(kept)
    settings["all_layers_int8_score_error"] = round(err_all, 5)
    return Int8Result(q, float_layers, {k: round(v, 5) for k, v in layer_errors.items()}, err, settings)


def _whole_scores(model: onnx.ModelProto, pixels: np.ndarray, type_idx: np.ndarray,
                  threads: int | None, batch: int = 8) -> np.ndarray:
    session = make_session(model, threads)
    return np.concatenate([session.run([SCORE], {PIXELS: pixels[sl], TYPE_IDX: type_idx[sl]})[0]
                           for sl in _chunks(len(pixels), batch)])


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on every call
    try:
        yield
    finally:
        root.setLevel(level)



# --------------------------------------------------------------------------- parity report
def _scores(graph: SplitGraph, images: Sequence[np.ndarray], type_idx: np.ndarray, size: int,
            batch: int = 8) -> np.ndarray:
    return np.concatenate([graph.run(preprocess(images[sl], size), type_idx[sl])[1]
                           for sl in _chunks(len(images), batch)])


def parity_report(
    fp32: SplitGraph, int8: SplitGraph, samples: Sequence[Sample], images: Sequence[np.ndarray],
    classes: Sequence[str], cal_fp32: Calibrator, cal_int8: Calibrator, size: int,
) -> dict[str, Any]:
    """INT8 against FP32 on held-out images, each scored under its own type: per-type image
    AUROC, Spearman rank correlation of the scores, agreement of PASS/REVIEW/REJECT."""
    from scipy.stats import spearmanr

    from diffqc.data import GOOD
    from diffqc.metrics import image_auroc

    type_idx = np.array([classes.index(s.feature_type) for s in samples], dtype=np.int64)
    labels = np.array([0 if s.label == GOOD else 1 for s in samples])
    s32 = _scores(fp32, images, type_idx, size)
    s8 = _scores(int8, images, type_idx, size)
    names = [s.feature_type for s in samples]
    d32 = [cal_fp32.decide(cal_fp32.p_value(t, float(v))) for t, v in zip(names, s32, strict=True)]
    d8 = [cal_int8.decide(cal_int8.p_value(t, float(v))) for t, v in zip(names, s8, strict=True)]
    per_type: dict[str, dict[str, Any]] = {}
    for t in sorted(set(names)):
        sel = np.array([n == t for n in names])
        a32, a8 = image_auroc(labels[sel], s32[sel]), image_auroc(labels[sel], s8[sel])
        rho = float(spearmanr(s32[sel], s8[sel]).statistic) if sel.sum() > 2 else math.nan
        per_type[t] = {
            "n_good": int((labels[sel] == 0).sum()), "n_defective": int(labels[sel].sum()),
            "auroc_fp32": _num(a32), "auroc_int8": _num(a8),
            "auroc_drop": _num(a32 - a8), "spearman": _num(rho),
            "decision_agreement": _num(float(np.mean([a == b for a, b, k in zip(d32, d8, sel, strict=True)
                                                      if k]))),
        }
    confusion: dict[str, int] = {}
    for a, b in zip(d32, d8, strict=True):
        confusion[f"{a}->{b}"] = confusion.get(f"{a}->{b}", 0) + 1
    drops = [v["auroc_drop"] for v in per_type.values() if v["auroc_drop"] is not None]
    worst = max(drops) if drops else None
    # every type of the model must be measured: one without GOOD and defective held-out images
    # (or absent) could lose any AUROC unseen, so the gate does not pass on the others alone
    unmeasured = sorted(t for t in classes if t not in per_type or per_type[t]["auroc_drop"] is None)
    return {
        "images": len(samples),
        "per_type": per_type,
        "spearman": _num(float(spearmanr(s32, s8).statistic)) if len(samples) > 2 else None,
        "decision_agreement": float(np.mean([a == b for a, b in zip(d32, d8, strict=True)])),
        "decisions_fp32_to_int8": dict(sorted(confusion.items())),
        "max_auroc_drop": worst,
        "auroc_tolerance": MAX_AUROC_DROP,
        "auroc_measured": bool(drops) and not unmeasured,
        "passed": bool(drops) and not unmeasured and worst is not None and worst <= MAX_AUROC_DROP,
        "types_without_auroc": unmeasured,
    }


def _num(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def parity_failure(report: dict[str, Any]) -> str:
    """Why a parity report did not pass, in words."""
    worst, tol = report["max_auroc_drop"], report["auroc_tolerance"]
    lost = f"it loses {worst:+.4f} AUROC on a type (> {tol})" if worst is not None and worst > tol else ""
    missing = report["types_without_auroc"]
    unmeasured = (f"its AUROC could not be measured on type(s) {', '.join(missing)} (each needs GOOD "
                  "and defective held-out images)" if missing else "")
    return "; ".join(x for x in (lost, unmeasured) if x) or "its AUROC could not be measured"


def format_parity_report(report: dict[str, Any]) -> str:
    def f(x: float | None, spec: str = ".4f") -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"INT8 vs FP32 parity on {report['images']} held-out images "
             f"(refused when any type loses > {report['auroc_tolerance']} AUROC):",
             f"{'type':<16}{'good':>6}{'defect':>8}{'AUROC fp32':>12}{'AUROC int8':>12}{'drop':>9}"
             f"{'spearman':>10}{'decisions':>11}"]
    for t, v in report["per_type"].items():
        lines.append(f"{t:<16}{v['n_good']:>6}{v['n_defective']:>8}{f(v['auroc_fp32']):>12}"
                     f"{f(v['auroc_int8']):>12}{f(v['auroc_drop'], '+.4f'):>9}{f(v['spearman'], '.3f'):>10}"
                     f"{f(v['decision_agreement'], '.3f'):>11}")
    moves = ", ".join(f"{k} {n}" for k, n in report["decisions_fp32_to_int8"].items())
    lines.append(f"all: spearman {f(report['spearman'], '.4f')}, decisions agree "
                 f"{report['decision_agreement']:.3f} ({moves})")
    verdict = "PASSED" if report["passed"] else f"FAILED: {parity_failure(report)}"
    lines.append(f"parity: {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data for the checks
def _stratified(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """Up to ``n`` samples spread evenly over feature types (and labels), reproducibly."""
    if len(samples) <= n:
        return list(samples)
    rng = np.random.default_rng(seed)
    by_key: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        by_key.setdefault((s.feature_type, s.label), []).append(s)
    pools = [list(rng.permutation(len(v))) for v in by_key.values()]
    groups = list(by_key.values())
    out: list[Sample] = []
    while len(out) < n:
        for g, pool in zip(groups, pools, strict=True):
            if pool and len(out) < n:
                out.append(g[pool.pop()])
    return out


def _synthetic_images(n: int, size: int) -> list[np.ndarray]:
    """``n`` images of the synthetic set (it needs at least 3 parts per type to be written)."""
    from diffqc.data import load_dataset, read_images
    from diffqc.synth import FEATURE_TYPES, write_synthetic_dataset

    with scratch_folder("diffqc-synth-", what="the synthetic check images") as tmp:
        write_synthetic_dataset(tmp, n_parts=max(n, 3 * len(FEATURE_TYPES)), seed=7, image_size=size,
                                progress=False)
        images, _, _ = read_images(load_dataset(tmp)[:n])
    return images


def _recalibrate(det: Detector, fp32: SplitGraph, int8: SplitGraph, good: Sequence[Sample]
                 ) -> tuple[Calibrator | None, str]:
    """The INT8 model's own conformal calibration, on the very images the bundle was calibrated
    on, when ``good`` holds them (the FP32 scores must reproduce the bundle's; a bundle
    recalibrated since its training was calibrated on other images)."""
    from diffqc.calibration import Calibrator
    from diffqc.data import read_images
    from diffqc.model import split_calibration

    cal = det.calibration_
    assert cal is not None
    done = det.metadata.get("recalibrated")
    # its images are not the training data's; one put back by --undo may be (scored below to tell)
    if isinstance(done, dict) and not done.get("undo"):
        return None, (f"the bundle was recalibrated by `diffqc calibrate` ({recalibration_text(done)}), so "
                      "INT8 is decided with that FP32 calibration; `diffqc calibrate MODEL DATA` run "
                      "again after this export gives INT8 its own")
    if sorted({s.feature_type for s in good}) != det.classes_:
        return None, "the data given lacks some of the model's types"
    if det.config.calibration.scheme == "cross":  # its fold models are not kept in the bundle
        return None, "the bundle is calibrated cross-conformally; INT8 keeps the FP32 calibration"
    _, cal_idx = split_calibration(good, det.config.calibration.fraction, det.config.train.seed)
    samples = [good[i] for i in cal_idx]
    images, samples, _ = read_images(samples, skip_corrupt=True)
    size = det.config.backbone.input_size
    own = np.array([det.classes_.index(s.feature_type) for s in samples], dtype=np.int64)
    s32 = _scores(fp32, images, own, size)
    for t in det.classes_:
        mine = np.sort(s32[own == det.classes_.index(t)])
        theirs = cal.known[t].scores
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=1e-3, atol=1e-6):
            if done is not None:  # an earlier recalibration's, put back
                return None, ("the calibration `diffqc calibrate --undo` put back is a recalibration's, not "
                              "the training's, so INT8 is decided with that FP32 calibration; `diffqc "
                              "calibrate MODEL DATA` run again after this export gives INT8 its own")
            return None, ("the data given does not reproduce the bundle's calibration scores "
                          "(not the training data?)")
    known: dict[str, list[float]] = {t: [] for t in det.classes_}
    cands, cand_scores = [], []
    router, m = det.router_, det.config.scoring.type_candidates
    for sl in _chunks(len(images), 8):
        feats = int8.features(preprocess(images[sl], size))  # the router reads INT8's, as at inference
        cand = router.candidates(feats, m) if router is not None else np.zeros((len(feats), 0), np.int64)
        pairs = zip(own[sl].tolist(), cand.tolist(), strict=True)
        image, kind, at = routing.rows([[k, *c] for k, c in pairs])
        scores = int8.score_features(feats[image], kind)[1]
        for j, k in enumerate(own[sl].tolist()):
            known[det.classes_[k]].append(float(scores[at[j][k]]))
        cands.append(cand)
        cand_scores.append(np.array([[scores[at[j][c]] for c in row] for j, row in enumerate(cand.tolist())],
                                    dtype=np.float64).reshape(cand.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same warnings as at training time
        known_only = Calibrator(cal.config).fit(known)
        unknown = (routing.unknown_scores(det.classes_, np.concatenate(cands), np.concatenate(cand_scores),
                                          known_only) if router is not None else None)
        recomputed = Calibrator(cal.config).fit(known, unknown)
    return recomputed, f"recomputed on the {len(samples)} calibration images"


# --------------------------------------------------------------------------- the bundle
def _read_samples(samples: Sequence[Sample]) -> tuple[list[np.ndarray], list[Sample]]:
    from diffqc.data import read_images

    images, kept, _ = read_images(samples, skip_corrupt=True)
    return images, kept


def export_bundle(
    path: Path | str, *, data: Path | str | None = None, int8: bool = False,
    calibration_data: Path | str | None = None, held_out: Path | str | None = None, force: bool = False,
    threads: int | None = None, opset: int = DEFAULT_OPSET, check_images: int = 16,
    calibration_images: int = 64, sensitivity_images: int = 16, max_held_out: int = 1000,
    search: bool = True, progress: bool = False, log: Callable[[str], None] = print,
    openvino: bool = True,
) -> dict[str, Any]:
    """Export a bundle to ``model.onnx`` (and ``model.int8.onnx``), verify it, and record it all
    in ``export.json``; returns that record. An INT8 model that fails its parity check is not
    kept unless ``force`` (and is then never chosen automatically); ``record["int8"]["accepted"]``
    says which. With ``openvino`` (and OpenVINO installed) the same models are checked on
    OpenVINO too (``record["openvino"]``). Each runtime's latency on this machine is measured
    and ``record["fastest_first"]`` lists the runtimes that passed parity, fastest first: what
    ``--runtime auto`` chooses from."""
    from diffqc.data import load_dataset, of_the_model
    from diffqc.inspection import sha256_file
    from diffqc.model import Detector

    import_onnx()
    import_onnxruntime()
    if int8 and calibration_data is None:
        raise ConfigError("--int8 needs --calibration-data DATA (GOOD images of the model's types)")
    path = Path(path)
    det = Detector.load(path, device="cpu")
    check_writable(path / ONNX_FILES["fp32"])  # a read-only bundle: before the checks and timings
    classes, size = det.classes_, det.config.backbone.input_size
    threads = threads or available_cores()
    source = data or calibration_data
    pool = of_the_model(load_dataset(source), classes, source) if source else []
    preferred = [s for s in pool if s.split == "test"] or pool
    images, picked = _read_samples(_stratified(preferred, check_images))
    if source and not images:  # the user asked for their own images: not synthetic ones instead
        raise DatasetError(f"{source}: no readable image of the model's types ({', '.join(classes)}) "
                           "to check the export on")
    start = time.perf_counter()
    model = build_onnx(det, opset=opset)
    export_s = time.perf_counter() - start
    graph = OnnxGraph(model, threads)

    if images:
        types = np.array([classes.index(s.feature_type) for s in picked], dtype=np.int64)
        where = f"{len(images)} images of {source}"
    else:
        images = _synthetic_images(check_images, size)
        types = np.arange(len(images), dtype=np.int64) % len(classes)
        where = f"{len(images)} synthetic images (give --data for the model's own)"
    check = check_fp32(det, model, graph, images, types, threads=threads)
    check["source"] = where
    log(f"FP32 ONNX vs PyTorch on {where}: max |Δscore| {check['max_abs_score_error']:.3g} "
        f"(relative {check['max_rel_score_error']:.2g}), max |Δmap| {check['max_abs_map_error']:.3g} "
        f"(relative {check['max_rel_map_error']:.2g}), tolerance {RTOL:g} relative; decisions equal "
        f"{check['decisions_equal']}/{check['images']}")
    if not check["passed"]:
        raise ExportError(f"the ONNX export does not reproduce PyTorch within {RTOL:g}: {json.dumps(check)}")
    blob = model.SerializeToString()
    write_atomic(path / ONNX_FILES["fp32"], blob)
    meta = read_json(path / "metadata.json")
    previous = _previous_export(path, meta)
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT, "diffqc_version": __version__, "model_id": det.metadata.get("model_id"),
        "weights_file_sha256": det.metadata.get("weights_file_sha256"), "opset": opset,  # the graph's
        "exporter": f"torch.onnx (TorchScript tracer), torch {torch.__version__}",
        "inputs": {PIXELS: ["N", 3, size, size], TYPE_IDX: ["N"]},
        "outputs": {ANOMALY_MAP: ["N", size, size], SCORE: ["N"]},
        "classes": classes, "threads": threads,
        "fp32": {"file": ONNX_FILES["fp32"], "sha256": sha256_file(path / ONNX_FILES["fp32"]),
                 "export_seconds": round(export_s, 2), "parity_vs_torch": check},
    }
    graphs: dict[str, SplitGraph] = {"onnx fp32": graph}
    ov_graph: OpenVinoGraph | None = None
    if openvino:
        info["openvino"], ov_graph = _openvino_fp32(det, path / ONNX_FILES["fp32"], images, types,
                                                    threads=threads, log=log)
        if ov_graph is not None:
            graphs["openvino fp32"] = ov_graph
    if int8:
        outcome = _export_int8(
            det, path, graph, calibration_data, held_out, force=force, threads=threads,
            calibration_images=calibration_images, sensitivity_images=sensitivity_images,
            max_held_out=max_held_out, search=search, progress=progress, log=log, openvino=ov_graph,
            data_named=source == calibration_data)
        info["int8"] = outcome.entry
        if outcome.graph is not None:
            graphs["onnx int8"] = outcome.graph
        if outcome.openvino_entry is not None and ov_graph is not None:
            info["openvino"]["int8"] = outcome.openvino_entry
        if outcome.openvino_graph is not None:
            graphs["openvino int8"] = outcome.openvino_graph
    elif previous is not None:
        info["int8"], old_ov_int8 = previous
        graphs["onnx int8"] = OnnxGraph(path / ONNX_FILES["int8"], threads)
        if old_ov_int8 is not None and ov_graph is not None:
            info["openvino"]["int8"] = old_ov_int8
            graphs["openvino int8"] = OpenVinoGraph(path / ONNX_FILES["int8"], threads)
    latency = measure_latency(det, graphs, images[0], int(types[0]), threads=threads)
    info["torch_latency_ms"] = latency.pop("torch")
    for name, ms in latency.items():
        runtime, precision = name.split()
        (info if runtime == "onnx" else info[runtime])[precision]["latency_ms"] = ms
    log(f"latency per image (graph only, batch 1, {threads} threads): torch {info['torch_latency_ms']} ms, "
        + ", ".join(f"{k} {v} ms" for k, v in latency.items()))
    info["fastest_first"] = [c._asdict() for c in usable_choices(path, info)]
    log("runtimes that passed parity, fastest first (--runtime auto takes the first installed): "
        + ", ".join(f"{c['runtime']} {c['precision']}" for c in info["fastest_first"]))
    check_not_retrained(path, det.metadata, "export ran: export.json is not written (model.onnx is the "
                        "old model's, which no runtime takes); run export again")
    write_atomic(path / EXPORT_FILE, json.dumps(info, indent=2).encode())
    return info


def _openvino_fp32(det: Detector, file: Path, images: Sequence[np.ndarray], types: np.ndarray, *,
                   threads: int, log: Callable[[str], None]) -> tuple[dict[str, Any], OpenVinoGraph | None]:
    """The FP32 model compiled by OpenVINO and checked against PyTorch like ONNX Runtime's; a
    model that fails is recorded (never chosen automatically), not an error."""
    version = openvino_version()
    if version is None:
        log("OpenVINO is not installed: the export is checked on ONNX Runtime only "
            "(pip install 'diffqc[openvino]' and export again to add it)")
        return {"unavailable": "OpenVINO is not installed"}, None
    graph = OpenVinoGraph(file, threads)
    check = check_fp32(det, None, graph, images, types, threads=threads)
    log(f"FP32 OpenVINO {version} vs PyTorch: max |Δscore| {check['max_abs_score_error']:.3g} (relative "
        f"{check['max_rel_score_error']:.2g}), decisions equal {check['decisions_equal']}/{check['images']}: "
        + ("passed" if check["passed"] else f"FAILED (tolerance {RTOL:g}); OpenVINO is not offered"))
    return {"version": version, "fp32": {"file": ONNX_FILES["fp32"], "parity_vs_torch": check}}, graph


def onnx_detector(det: Detector, *, threads: int | None = None, runtime: str = "onnx") -> OnnxDetector:
    """A fitted (PyTorch) Detector exported in memory and run by ONNX Runtime or OpenVINO, FP32;
    for code that fits models itself, such as a cross-validation, and wants their speed."""
    if det.calibration_ is None:
        raise NotFittedError
    fe = det.extractor
    stats = (fe.feat_mean.detach().cpu().numpy(), fe.feat_std.detach().cpu().numpy())
    return OnnxDetector.from_model(build_onnx(det), config=det.config, metadata=det.metadata,
                                   calibration=det.calibration_, classes=det.classes_,
                                   feature_stats=stats, router=det.router_, threads=threads,
                                   runtime=runtime)


def _previous_export(path: Path, meta: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """The INT8 entries (ONNX Runtime, OpenVINO) of an earlier export of the same weights, when
    its file is still there."""
    try:
        old = read_json(path / EXPORT_FILE)
    except (OSError, ValueError):
        return None
    entry = old.get("int8")
    if (old.get("weights_file_sha256") == meta.get("weights_file_sha256") and isinstance(entry, dict)
            and entry.get("file") and (path / ONNX_FILES["int8"]).is_file()):
        ov = old.get("openvino", {}).get("int8") if isinstance(old.get("openvino"), dict) else None
        return dict(entry), (dict(ov) if isinstance(ov, dict) else None)
    return None


@dataclass
class _Int8Outcome:
    entry: dict[str, Any]  # export.json's "int8"
    graph: OnnxGraph | None  # when kept
    openvino_entry: dict[str, Any] | None = None  # export.json's "openvino"/"int8"
    openvino_graph: OpenVinoGraph | None = None


def _export_int8(
    det: Detector, path: Path, fp32: OnnxGraph, calibration_data: Path | str | None,
    held_out: Path | str | None, *, force: bool, threads: int, calibration_images: int,
    sensitivity_images: int, max_held_out: int, search: bool, progress: bool, log: Callable[[str], None],
    openvino: OpenVinoGraph | None = None, data_named: bool = False,
) -> _Int8Outcome:
    from diffqc.data import DEFECTIVE, GOOD, good_training, load_dataset, of_the_model
    from diffqc.inspection import sha256_file
    from diffqc.model import split_calibration

    assert calibration_data is not None
    classes, size = det.classes_, det.config.backbone.input_size
    samples = of_the_model(load_dataset(calibration_data), classes,
                           None if data_named else calibration_data)
    good = good_training(samples)
    if not good:
        raise DatasetError(f"no GOOD images of the model's types ({', '.join(classes)}) "
                           f"in {calibration_data}")
    fit_idx, cal_idx = split_calibration(good, det.config.calibration.fraction, det.config.train.seed)
    calib_images, calib = _read_samples(_stratified([good[i] for i in fit_idx] or good, calibration_images))
    check_images, check = _read_samples(_stratified([good[i] for i in cal_idx] or good, sensitivity_images))
    if not calib_images or not check_images:
        raise DatasetError(f"{calibration_data}: too few readable GOOD images of the model's types to "
                           "calibrate INT8 on (the unreadable ones are named above)")
    held = (of_the_model(load_dataset(held_out), classes, held_out) if held_out
            else [s for s in samples if s.split == "test"])
    held_note = str(held_out) if held_out else f"the test split of {calibration_data}"
    if not held:
        held, held_note = [good[i] for i in cal_idx], "the GOOD calibration images (no test split given)"
    elif not held_out:  # labelled folders, a manifest without a split: GOOD images all train
        tested = {s.feature_type for s in held}
        lacking = sorted(tested - {s.feature_type for s in held if s.label == GOOD})
        if lacking:
            held += [good[i] for i in cal_idx if good[i].feature_type in lacking]
            held_note += (f" and the GOOD calibration images of {', '.join(lacking)} (the test split "
                          "has no GOOD image of it)")
    unmeasurable = [t for t in classes
                    if not {GOOD, DEFECTIVE} <= {s.label for s in held if s.feature_type == t}]
    if unmeasurable and not force:  # the parity gate would refuse it: said before the quantization
        raise DatasetError(f"INT8's parity check needs GOOD and defective held-out images of each type, "
                           f"and {held_note} lacks them for {', '.join(unmeasurable)}: give --held-out "
                           "labelled images of every type, or --force to keep INT8 unmeasured (never "
                           "chosen automatically)")
    calib_feeds = [{PIXELS: preprocess([img], size),
                    TYPE_IDX: np.array([classes.index(s.feature_type)], dtype=np.int64)}
                   for img, s in zip(calib_images, calib, strict=True)]
    check_types = np.array([classes.index(s.feature_type) for s in check], dtype=np.int64)
    cal = det.calibration_
    assert cal is not None
    spread = {t: float(np.std(cal.known[t].scores, ddof=1)) if cal.known[t].scores.size > 1 else 0.0
              for t in classes}
    fallback = float(np.median([v for v in spread.values() if v > 0] or [1.0]))
    scale = np.array([spread[classes[k]] or fallback for k in check_types], dtype=np.float32)
    log(f"INT8: calibrating activations on {len(calib_feeds)} GOOD images, "
        + ("searching for layers to keep in float" if search else "every layer quantized")
        + f" ({len(check_images)} GOOD check images)")
    result = quantize_int8(path / ONNX_FILES["fp32"], calib_feeds, preprocess(check_images, size),
                           check_types, scale, threads=threads, search=search, progress=progress)
    int8 = OnnxGraph(result.model, threads)
    if result.float_layers:
        log("INT8: kept in float: " + "; ".join(f"{k} ({v})" for k, v in result.float_layers.items()))
    log(f"INT8: score change on the check images {result.score_error:.4f} GOOD-score SD (RMS)")

    held_images, held = _read_samples(_stratified(held, max_held_out))
    cal8, cal_note = _recalibrate(det, fp32, int8, good)
    report = parity_report(fp32, int8, held, held_images, classes, cal, cal8 or cal, size)
    report["held_out"] = held_note
    log(format_parity_report(report))
    accepted = bool(report["passed"])
    entry: dict[str, Any] = {
        "file": None, "accepted": accepted, "settings": result.settings,
        "float_layers": result.float_layers, "layer_errors": result.layer_errors,
        "score_error_sd": round(result.score_error, 5),
        "calibration": cal_note if cal8 is not None else f"the FP32 calibration is used: {cal_note}",
        "parity": report,
    }
    target = path / ONNX_FILES["int8"]
    if accepted or force:
        write_atomic(target, result.model.SerializeToString())
        entry["file"] = target.name
        entry["sha256"] = sha256_file(target)
        if cal8 is not None:
            write_atomic(path / INT8_CALIBRATION_FILE, json.dumps(cal8.to_dict()).encode())
        else:
            (path / INT8_CALIBRATION_FILE).unlink(missing_ok=True)
    else:
        target.unlink(missing_ok=True)
        (path / INT8_CALIBRATION_FILE).unlink(missing_ok=True)
    if not accepted:
        why = parity_failure(report)
        log("!" * 78 + f"\nINT8 {'KEPT BECAUSE OF --force' if force else 'REFUSED'}: {why}.\n"
            + ("It is never chosen automatically; --precision int8 runs it.\n" if force else
               "Run again with --force to keep it anyway.\n") + "!" * 78)
    outcome = _Int8Outcome(entry, int8 if (accepted or force) else None)
    if openvino is not None and outcome.graph is not None:
        outcome.openvino_graph = OpenVinoGraph(result.model, threads)
        outcome.openvino_entry = _openvino_int8_parity(
            outcome.openvino_graph, openvino, int8, held, held_images, classes, cal, cal8 or cal, size,
            spread, fallback, log=log)
        outcome.openvino_entry["parity"]["held_out"] = held_note
    return outcome


def _openvino_int8_parity(
    ov_int8: OpenVinoGraph, ov_fp32: OpenVinoGraph, ort_int8: OnnxGraph, samples: Sequence[Sample],
    images: Sequence[np.ndarray], classes: Sequence[str], cal_fp32: Calibrator, cal_int8: Calibrator,
    size: int, spread: dict[str, float], fallback: float, *, log: Callable[[str], None],
) -> dict[str, Any]:
    """OpenVINO's INT8 (the same QDQ model) under the same parity report as ONNX Runtime's, plus
    its score difference from ONNX Runtime's INT8: the two share ``calibration.int8.json``, so
    OpenVINO INT8 passes only when it loses at most ``MAX_AUROC_DROP`` AUROC on every type and
    its scores are within ``MAX_SCORE_ERROR`` GOOD-score SD (RMS) of ONNX Runtime's."""
    report = parity_report(ov_fp32, ov_int8, samples, images, classes, cal_fp32, cal_int8, size)
    own = np.array([classes.index(s.feature_type) for s in samples], dtype=np.int64)
    scale = np.array([spread[classes[k]] or fallback for k in own], dtype=np.float64)
    diff = (_scores(ov_int8, images, own, size) - _scores(ort_int8, images, own, size)) / scale
    vs_ort = float(np.sqrt(np.mean(diff ** 2))) if len(diff) else math.nan
    accepted = bool(report["passed"]) and math.isfinite(vs_ort) and vs_ort <= MAX_SCORE_ERROR
    log("OpenVINO " + format_parity_report(report).replace("\n", "\nOpenVINO "))
    log(f"OpenVINO INT8 vs ONNX Runtime INT8: {vs_ort:.4f} GOOD-score SD (RMS, tolerance {MAX_SCORE_ERROR}); "
        f"OpenVINO INT8 {'accepted' if accepted else 'NOT offered (never chosen automatically)'}")
    return {"file": ONNX_FILES["int8"], "accepted": accepted, "parity": report,
            "score_difference_vs_onnx_int8_sd": _num(vs_ort), "score_tolerance_sd": MAX_SCORE_ERROR,
            "calibration": INT8_CALIBRATION_FILE}


# --------------------------------------------------------------------------- the command
# `export`'s options that only the INT8 export uses, and those that `--format tensorrt` does not
# take (it builds an FP16 engine from model.onnx, exporting that first with --data, --threads, --opset)
INT8_OPTIONS = ("held_out", "no_search", "calibration_images", "sensitivity_images")
NOT_TENSORRT_OPTIONS = ("int8", "calibration_data", *INT8_OPTIONS, "check_images", "no_openvino")


def _refuse_unused_options(args: argparse.Namespace) -> None:
    """A :class:`ConfigError` naming the options given that this export would not use (the INT8
    export's without ``--int8``; :data:`NOT_TENSORRT_OPTIONS` with ``--format tensorrt``), before
    any work: a parity report asked for and not made is not left for the user to find."""
    tensorrt = args.format == "tensorrt"
    names = NOT_TENSORRT_OPTIONS if tensorrt else () if args.int8 else INT8_OPTIONS
    unused = ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]
    if not unused:
        return
    one = len(unused) == 1
    them = "it" if one else "them"
    if tensorrt:
        raise ConfigError(f"{', '.join(unused)} {'is not an option' if one else 'are not options'} of "
                          "--format tensorrt (an FP16 engine built from model.onnx; it takes --data, "
                          f"--threads, --opset): leave {them} out")
    raise ConfigError(f"{', '.join(unused)} {'is an option' if one else 'are options'} of the INT8 "
                      f"export: give --int8 too, or leave {them} out")


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr)

    # errors go to the CLI's one error boundary (diffqc.cli.main)
    _refuse_unused_options(args)
    if args.format == "tensorrt":
        return _cmd_tensorrt(args, log)
    counts = {k: getattr(args, k) for k in ("check_images", "calibration_images", "sensitivity_images")
              if getattr(args, k) is not None}  # else export_bundle's defaults
    info = export_bundle(
        args.model, data=args.data, int8=args.int8, calibration_data=args.calibration_data,
        held_out=args.held_out, force=args.force, threads=args.threads, opset=args.opset or DEFAULT_OPSET,
        search=not args.no_search, progress=not args.quiet, log=log, openvino=not args.no_openvino,
        **counts)
    int8 = info.get("int8") if args.int8 else None
    files = [info["fp32"]["file"]] + ([int8["file"]] if int8 and int8["file"] else [])
    summary: dict[str, Any] = {"model": str(args.model), "files": files,
               "fp32_max_rel_score_error": info["fp32"]["parity_vs_torch"]["max_rel_score_error"],
               "latency_ms": {"torch": info["torch_latency_ms"],
                              **{k: info[k]["latency_ms"] for k in ("fp32", "int8")
                                 if "latency_ms" in info.get(k, {})},  # none for a refused INT8
                              **{f"openvino_{k}": v["latency_ms"] for k, v in info.get("openvino", {}).items()
                                 if isinstance(v, dict) and "latency_ms" in v}},
               "fastest_first": [f"{c['runtime']} {c['precision']}" for c in info["fastest_first"]]}
    if int8 is not None:
        summary.update(int8_accepted=int8["accepted"], int8_float_layers=list(int8["float_layers"]),
                       int8_max_auroc_drop=int8["parity"]["max_auroc_drop"])
        if not int8["accepted"]:  # why, for a script and under -q, which leaves out the banner above
            summary["int8_parity_failed"] = parity_failure(int8["parity"])
            if args.quiet:
                print(f"diffqc: INT8 kept by --force: {summary['int8_parity_failed']} (never chosen "
                      "automatically; --precision int8 runs it)" if args.force else
                      f"diffqc: INT8 refused: {summary['int8_parity_failed']} (--force keeps it, never "
                      "chosen automatically)", file=sys.stderr)
    print(json_line(summary))
    return 1 if int8 is not None and not int8["accepted"] and not args.force else 0


def _cmd_tensorrt(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    path = Path(args.model)
    check_tensorrt_builder()  # before the ONNX export it needs, which takes a while
    check_writable(check_bundle_files(path) / TENSORRT_ENGINE)  # a read-only bundle: before the export
    if not (path / ONNX_FILES["fp32"]).is_file():
        export_bundle(path, data=args.data, threads=args.threads, opset=args.opset or DEFAULT_OPSET, log=log)
    info = read_export_info(path)
    size = int(info["inputs"][PIXELS][2])
    engine = build_tensorrt_engine(path / ONNX_FILES["fp32"], path / TENSORRT_ENGINE, input_size=size)
    log(f"TensorRT FP16 engine: {engine} (measure it with scripts/build_tensorrt.py)")
    print(json_line({"model": str(path), "engine": str(engine)}))
    return 0
