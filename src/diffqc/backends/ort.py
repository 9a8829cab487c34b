"""ONNX Runtime: sessions, the exported graph as two sessions (:class:`OnnxGraph`) and any ONNX
model as a frozen feature extractor (:class:`OnnxBackbone`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffqc.backends.graph import (
    ANOMALY_MAP,
    FEATURES,
    PIXELS,
    SCORE,
    TYPE_IDX,
    SplitGraph,
    extract_subgraph,
    halves_on_disk,
    import_onnx,
)
from diffqc.errors import BackboneError, RuntimeUnavailableError
from diffqc.machine import env_flag

if TYPE_CHECKING:
    import onnx


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # an optional dependency
        raise RuntimeUnavailableError(
            "ONNX Runtime is not installed: pip install 'diffqc[export]'") from exc
    return onnxruntime


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
    so.add_session_config_entry("session.intra_op.allow_spinning", str(int(env_flag("DIFFQC_ORT_SPINNING"))))
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


class OnnxGraph(SplitGraph):
    """An exported graph as two ONNX Runtime sessions, its halves cut at ``features``. One
    session per half holds every constant once, memory-mapped from a temporary file (a session
    made from bytes holds every constant twice: the parsed model and its tensor; for the
    scorer's per-location eigenbases, 41 MB per type, that doubled the resident memory), and
    the model itself is not kept: memory is the sessions'."""

    runtime = "onnx"

    def __init__(self, model: onnx.ModelProto | Path | str, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        with halves_on_disk(model) as (backbone, scorer):
            self.backbone = make_session(backbone, threads, providers)
            self.scorer = make_session(scorer, threads, providers)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.backbone.run([FEATURES], {PIXELS: pixels})[0]
        return out

    def score_batch(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.scorer.run([ANOMALY_MAP, SCORE], {FEATURES: feats, TYPE_IDX: type_idx})
        return amap, score


# --------------------------------------------------------------------------- BYO backbone
# the ONNX element types of an input that takes pixels in [0, 1] (a half-precision export too)
FLOAT_INPUTS = {1: np.float32, 10: np.float16, 11: np.float64}  # FLOAT, FLOAT16, DOUBLE


class OnnxBackbone:
    """Any ONNX model as a frozen feature extractor: named intermediate tensors are the taps.

    ``layers`` name a tensor, a node (its first output) or a module scope of a PyTorch export
    such as ultralytics' YOLOv8 (``model.4`` -> the output of the last node under ``/model.4/``).
    The model is cut after the deepest tap, so a detection head costs nothing. Taps come back
    finest grid first (the grid the others are resized to), as float32. Pixels go in as they
    are, in [0, 1], in the input's float type (a half-precision export takes float16). A tap
    that is not floating point is refused at load, and one holding NaN or an infinity (a graph
    that overflows) when it does, naming it: the fit and the scores cannot use it.
    """

    def __init__(self, path: Path | str, layers: Sequence[str], input_size: int,
                 threads: int | None = None) -> None:
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
        elem = inputs[0].type.tensor_type.elem_type
        if elem not in FLOAT_INPUTS:
            kind = onnxlib.TensorProto.DataType.Name(elem).lower() if elem else "of no type"
            raise BackboneError(f"ONNX backbone input {self.input_name!r} is {kind}; diffqc gives it "
                                "pixels in [0, 1] as floating point (float32, float16 or float64): "
                                "export the graph with a float input")
        self.input_dtype = np.dtype(FLOAT_INPUTS[elem])
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
        black, white = (np.full((1, 3, input_size, input_size), v, dtype=self.input_dtype) for v in (0, 1))
        probe = self.session.run(names, {self.input_name: black})
        for name, arr, other in zip(names, probe, self.session.run(names, {self.input_name: white}),
                                    strict=True):
            if arr.ndim != 4:
                raise BackboneError(f"ONNX tensor {name!r} has shape {arr.shape}; taps must be NCHW")
            if not np.issubdtype(arr.dtype, np.floating):
                raise BackboneError(f"ONNX tensor {name!r} is {arr.dtype}; taps must be floating point "
                                    "(a feature map)")
            if np.array_equal(arr, other):  # a model fitted on it would pass every part
                raise BackboneError(f"ONNX tensor {name!r} is the same for a black and a white image: "
                                    "it does not depend on the image (a constant of the graph); tap "
                                    "another tensor (--layers)")
        # finest grid first; ties keep the order given
        order = sorted(range(len(names)), key=lambda i: -probe[i].shape[2] * probe[i].shape[3])
        self.tensors = [names[i] for i in order]
        self.shapes = [tuple(int(d) for d in probe[i].shape[1:]) for i in order]
        self.tap_dtypes = [probe[i].dtype for i in order]
        _float32(self.path, names, probe, "a black image")

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        pixels = np.ascontiguousarray(pixels, dtype=self.input_dtype)
        if self.static_batch in (None, pixels.shape[0]):
            outs: list[np.ndarray] = self.session.run(self.tensors, {self.input_name: pixels})
        else:
            per_image = [self.session.run(self.tensors, {self.input_name: pixels[i: i + 1]})
                         for i in range(pixels.shape[0])]
            outs = [np.concatenate([p[k] for p in per_image]) for k in range(len(self.tensors))]
        return _float32(self.path, self.tensors, outs, "this image")


def _float32(path: Path, names: Sequence[str], taps: Sequence[np.ndarray], given: str) -> list[np.ndarray]:
    """The taps as float32, each checked finite (a graph that overflows gives NaN or inf)."""
    out = [np.asarray(t, dtype=np.float32) for t in taps]
    for name, tap in zip(names, out, strict=True):
        if not np.isfinite(tap).all():
            raise BackboneError(f"ONNX backbone {path}: tensor {name!r} holds NaN or infinite values for "
                                f"{given}: the graph overflows or divides by zero there; tap another "
                                "tensor (--layers)")
    return out


def resolve_tensors(model: onnx.ModelProto, layers: Sequence[str]) -> list[str]:
    """Tensor names for layer names: a tensor, a node (its first output), or a module scope
    (``model.4``: the output of the last node named ``/model.4/...``, else ``.../model.4/...``)."""
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
