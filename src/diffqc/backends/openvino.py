"""OpenVINO: the exported graph (``model.onnx``, or the QDQ ``model.int8.onnx``, which OpenVINO
runs in INT8 as it is) compiled for the CPU, cut at ``features`` like :class:`OnnxGraph`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffqc.backends.graph import ANOMALY_MAP, FEATURES, PIXELS, SCORE, TYPE_IDX, SplitGraph, halves_on_disk
from diffqc.errors import RuntimeUnavailableError

if TYPE_CHECKING:
    import onnx


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:  # an optional dependency
        raise RuntimeUnavailableError("OpenVINO is not installed: pip install 'diffqc[openvino]'") from exc
    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None."""
    try:
        return str(import_openvino().__version__).split("-", 1)[0]
    except RuntimeUnavailableError:
        return None


def compile_config(threads: int | None = None) -> dict[str, Any]:
    """One stream, latency first, FP32 arithmetic outside the quantized layers: on CPUs with
    AVX512-BF16 or AMX, OpenVINO otherwise runs float layers in bfloat16, which does not
    reproduce PyTorch within the FP32 parity tolerance."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoGraph(SplitGraph):
    """An exported graph as two OpenVINO compiled models (backbone half, scorer half) on the CPU;
    the same ``run`` / ``features`` / ``score_features`` as :class:`~diffqc.backends.ort.OnnxGraph`."""

    runtime = "openvino"

    def __init__(self, model: onnx.ModelProto | Path | str, threads: int | None = None) -> None:
        ov = import_openvino()
        core = ov.Core()
        config = compile_config(threads)
        with halves_on_disk(model) as (backbone, scorer):
            self._backbone = core.compile_model(core.read_model(str(backbone)), "CPU", config)
            self._scorer = core.compile_model(core.read_model(str(scorer)), "CPU", config)
        self._backbone_request = self._backbone.create_infer_request()
        self._scorer_request = self._scorer.create_infer_request()
        self._features = self._backbone.output(FEATURES)
        self._map, self._score = self._scorer.output(ANOMALY_MAP), self._scorer.output(SCORE)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        out = self._backbone_request.infer({PIXELS: np.ascontiguousarray(pixels, dtype=np.float32)})
        return np.array(out[self._features], copy=True)  # the request reuses its output buffers

    def score_batch(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._scorer_request.infer({FEATURES: np.ascontiguousarray(feats, dtype=np.float32),
                                          TYPE_IDX: np.ascontiguousarray(type_idx, dtype=np.int64)})
        return np.array(out[self._map], copy=True), np.array(out[self._score], copy=True)
