"""The exported graph's interface and the cut at ``features`` that every backend runs.

The graph takes ``pixels`` float32 ``[N, 3, S, S]`` in [0, 1] and ``type_idx`` int64 ``[N]``
and gives ``anomaly_map`` ``[N, S, S]`` and ``score`` ``[N]``; its halves meet at ``features``
``[N, C, h, w]`` (standardised backbone features), so a backend runs the backbone once per
image and the scorer under one type or several.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffqc.errors import RuntimeUnavailableError
from diffqc.output import scratch_folder

if TYPE_CHECKING:
    import onnx

PIXELS, TYPE_IDX, FEATURES, ANOMALY_MAP, SCORE = "pixels", "type_idx", "features", "anomaly_map", "score"
# (image, type) pairs per scorer call. One at a time measured fastest on a 2-core CPU (its
# activations stay in cache) and keeps ONNX Runtime's memory arena small: batch 8 took 1.06 GB
# peak and 15.0 parts/s on the demo model, batch 1 0.74 GB and 17.6 parts/s.
MAX_SCORER_BATCH = 1
EXTERNAL_THRESHOLD = 1 << 20  # constants from 1 MiB up are memory-mapped, not copied


def import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "the onnx package is not installed: pip install 'diffqc[export]'") from exc
    return onnx


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
        return onnxlib.ValueInfoProto(name=name)  # its type as inferred (a float16 tap is float16)

    sub = helper.make_graph(
        [node for node in graph.node if id(node) in nodes], graph.name,
        [value_info(n) for n in inputs], [value_info(n) for n in outputs],
        initializer=[t for t in graph.initializer if t.name in needed])
    part: onnx.ModelProto = helper.make_model(sub, opset_imports=list(model.opset_import),
                                              ir_version=model.ir_version,
                                              producer_name=model.producer_name)
    return part


@contextmanager
def halves_on_disk(model: onnx.ModelProto | Path | str) -> Iterator[tuple[Path, Path]]:
    """The graph's two halves (``pixels -> features``, ``features, type_idx -> anomaly_map,
    score``) as ONNX files in a temporary folder, sharing one file of large constants that a
    backend can memory-map; the folder is removed on exit (a mapping outlives the file where
    the platform allows it). The caller's model stays as it is."""
    onnxlib = import_onnx()
    if isinstance(model, (str, Path)):
        whole: onnx.ModelProto = onnxlib.load(str(model))
    else:  # saving below moves the constants out of the model: work on a copy
        whole = onnxlib.ModelProto()
        whole.CopyFrom(model)
    del model
    with scratch_folder("diffqc-graph-", what="the model's graph") as folder:
        onnxlib.save_model(whole, str(folder / "whole.onnx"), save_as_external_data=True,
                           all_tensors_to_one_file=True, location="constants.bin",
                           size_threshold=EXTERNAL_THRESHOLD)
        halves = [extract_subgraph(whole, [PIXELS], [FEATURES]),
                  extract_subgraph(whole, [FEATURES, TYPE_IDX], [ANOMALY_MAP, SCORE])]
        del whole
        paths = (folder / "half0.onnx", folder / "half1.onnx")
        for half, path in zip(halves, paths, strict=True):
            onnxlib.save_model(half, str(path))  # refers to constants.bin beside it
        del halves
        yield paths


class SplitGraph:
    """What every backend's graph does with its two halves; a backend gives :meth:`features`
    and :meth:`score_batch`."""

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Standardised backbone features ``[N, C, h, w]`` of pixels ``[N, 3, S, S]``."""
        raise NotImplementedError

    def score_batch(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``[N, S, S]`` and scores ``[N]`` of features under int64 types, in one call."""
        raise NotImplementedError

    def run(self, pixels: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``[N, 3, S, S]`` and types ``[N]`` -> maps ``[N, S, S]`` and scores ``[N]``."""
        return self.score_features(self.features(pixels), type_idx)

    def score_features(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps ``[N, S, S]`` and scores ``[N]`` of features under the types given (in chunks of
        ``MAX_SCORER_BATCH``)."""
        type_idx = type_idx.astype(np.int64)
        if feats.shape[0] <= MAX_SCORER_BATCH:
            return self.score_batch(feats, type_idx)
        parts = [self.score_batch(feats[i: i + MAX_SCORER_BATCH], type_idx[i: i + MAX_SCORER_BATCH])
                 for i in range(0, feats.shape[0], MAX_SCORER_BATCH)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
