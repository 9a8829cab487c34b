"""The exported detector and the choice of runtime.

``load_detector(path, runtime="auto" | "torch" | "onnx" | "openvino", threads=N)`` gives a
:class:`~diffqc.model.Detector` (PyTorch) or an :class:`OnnxDetector`: the ``model.onnx`` /
``model.int8.onnx`` that ``diffqc export`` wrote into the bundle, run by ONNX Runtime or
OpenVINO (:mod:`diffqc.backends`). Both have ``inspect(images, feature_types, all_types=...,
maps=..., check_images=...) -> list[Inspection]`` and ``inspect_samples``, so the CLI, the service and the
evaluation swap them freely. ``auto`` takes the fastest runtime and precision that passed its
parity check, as measured on this machine at export time and recorded in ``export.json``.

The ONNX detector does no PyTorch work per image: decoding and resizing are numpy/Pillow (the
same antialiased bilinear resize as :func:`diffqc.backbone.to_pixels`), everything from the
pixels to the anomaly map and score runs in the graph, and the verdict comes from the same
:class:`~diffqc.calibration.Calibrator`.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

from diffqc import __version__, routing
from diffqc.arguments import THREADS
from diffqc.backends.graph import SplitGraph
from diffqc.bundle import WEIGHTS_FILE, check_weights, read_bundle
from diffqc.calibration import Calibrator
from diffqc.config import DetectorConfig, uses_layouts
from diffqc.data import as_image
from diffqc.errors import (
    BundleError,
    ConfigError,
    RuntimeUnavailableError,
    check_device_name,
    unknown_feature_type,
)
from diffqc.inspection import (
    ImageCheck,
    as_arrays,
    detector_repr,
    in_batches,
    inspect_arguments,
    inspect_in_batches,
    newer_writer,
    sha256_file,
    verdicts,
    warn_outside,
)
from diffqc.output import path_text, read_json

if TYPE_CHECKING:
    import argparse

    import onnx
    from PIL import Image

    from diffqc.data import Sample
    from diffqc.inspection import Inspection
    from diffqc.model import Detector

RUNTIMES = ("auto", "torch", "onnx", "openvino")
GRAPH_RUNTIMES = ("onnx", "openvino")  # the runtimes of the exported graph
PRECISIONS = ("auto", "fp32", "int8")
EXPORT_FILE = "export.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# The INT8 model's own conformal calibration (its scores differ a little from FP32's), shared by
# the INT8 runtimes: OpenVINO's INT8 passes parity only when its scores equal ONNX Runtime's.
INT8_CALIBRATION_FILE = "calibration.int8.json"
EXPORT_FORMAT = 1


# --------------------------------------------------------------------------- image plumbing
def preprocess(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Images (as :func:`diffqc.data.as_image` reads arrays) -> ``[N, 3, size, size]`` float32,
    the antialiased bilinear resize of :func:`diffqc.backbone.to_pixels` (Pillow's, which
    PyTorch's reproduces), in numpy."""
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        img = np.ascontiguousarray(as_image(img), dtype=np.float32)
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


# --------------------------------------------------------------------------- the bundle's export
def read_export_info(path: Path | str) -> dict[str, Any]:
    """``export.json`` of a bundle (what ``diffqc export`` wrote), or a :class:`BundleError`."""
    f = Path(path) / EXPORT_FILE
    if not f.is_file():
        try:
            shaped = uses_layouts(DetectorConfig.from_json(Path(path) / "config.json"))
        except (OSError, ValueError):
            shaped = False  # the bundle's own check names a damaged config
        if shaped:  # `diffqc export` would refuse it: not the advice to give
            raise BundleError(f"model bundle {path} letterboxes, crops or tiles its images (pad, "
                              "crop or tiling.mode=auto), which only PyTorch runs: use --runtime "
                              "torch (or auto)")
        raise BundleError(f"model bundle {path} has no ONNX export: run `diffqc export {path}`")
    try:
        info: dict[str, Any] = read_json(f)
    except ValueError as exc:
        raise BundleError(f"model bundle {path}: damaged {EXPORT_FILE} ({exc})") from None
    if info.get("format") != EXPORT_FORMAT:  # a newer diffqc's export, copied with its bundle, say
        newer, by = newer_writer(info), info.get("diffqc_version", "unknown")
        raise BundleError(f"model bundle {path}: its ONNX export is of format {info.get('format')}, by "
                          f"diffqc {by}, and this diffqc {__version__} runs format {EXPORT_FORMAT}: export "
                          f"it again here (diffqc export {path_text(path)})"
                          + (f", or upgrade diffqc to {newer} or later" if newer else ""))
    return info


class Choice(NamedTuple):
    """A runtime and precision that passed parity, with its latency measured at export."""

    runtime: str
    precision: str
    latency_ms: float


def _runtime_entry(info: dict[str, Any], runtime: str, precision: str) -> dict[str, Any] | None:
    """The export record of one (graph runtime, precision), or None."""
    section = info if runtime == "onnx" else info.get(runtime)
    entry = section.get(precision) if isinstance(section, dict) else None
    return entry if isinstance(entry, dict) else None


def _passed(entry: dict[str, Any], precision: str) -> bool:
    """FP32 passed its check against PyTorch (an ONNX Runtime FP32 model is only written when it
    did); INT8 passed its parity report (was accepted)."""
    if precision == "int8":
        return bool(entry.get("accepted", False))
    check = entry.get("parity_vs_torch")
    return not isinstance(check, dict) or bool(check.get("passed", False))


def usable_choices(path: Path | str, info: dict[str, Any] | None = None) -> list[Choice]:
    """Every runtime and precision of a bundle that passed its parity check and has its file,
    fastest first (PyTorch included when the export measured it). A model that failed parity
    is only run when asked for by name."""
    info = info if info is not None else read_export_info(path)
    out = []
    if info.get("torch_latency_ms") is not None:
        out.append(Choice("torch", "fp32", float(info["torch_latency_ms"])))
    for runtime, precision, entry in _passed_graphs(info):
        if (Path(path) / ONNX_FILES[precision]).is_file():
            out.append(Choice(runtime, precision, float(entry.get("latency_ms") or math.inf)))
    return sorted(out, key=lambda c: c.latency_ms)


def _passed_graphs(info: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(runtime, precision, entry) of every exported graph that passed its parity check."""
    return [(runtime, precision, entry) for runtime in GRAPH_RUNTIMES for precision in ("fp32", "int8")
            if (entry := _runtime_entry(info, runtime, precision)) is not None and _passed(entry, precision)]


def usable_precisions(path: Path | str, info: dict[str, Any] | None = None,
                      runtime: str = "onnx") -> list[str]:
    """The exported precisions ``runtime`` can run, fastest measured first."""
    return [c.precision for c in usable_choices(path, info) if c.runtime == runtime]


def _installed(runtime: str) -> bool:
    try:
        if runtime == "onnx":
            from diffqc.backends.ort import import_onnxruntime

            import_onnxruntime()
        elif runtime == "openvino":
            from diffqc.backends.openvino import import_openvino

            import_openvino()
    except RuntimeUnavailableError:
        return False
    return True


def _graph(runtime: str, file: Path, threads: int | None,
           providers: Sequence[str] | None = None) -> SplitGraph:
    if runtime == "openvino":
        from diffqc.backends.openvino import OpenVinoGraph

        return OpenVinoGraph(file, threads)
    from diffqc.backends.ort import OnnxGraph

    return OnnxGraph(file, threads, providers)


# --------------------------------------------------------------------------- the exported detector
class OnnxDetector:
    """A fitted bundle's exported graph run by ONNX Runtime (``runtime="onnx"``) or OpenVINO
    (``"openvino"``); the same ``inspect`` as :class:`~diffqc.model.Detector`.

    ``precision``: ``fp32`` (``model.onnx``), ``int8`` (``model.int8.onnx``, with the INT8
    calibration when the export could recompute it) or ``auto`` (the fastest exported
    model that passed its parity check on this runtime).
    """

    def __init__(self, path: Path | str, *, precision: str = "auto", threads: int | None = None,
                 providers: Sequence[str] | None = None, runtime: str = "onnx") -> None:
        if runtime not in GRAPH_RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(GRAPH_RUNTIMES)}, got {runtime!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.path: Path | None = Path(path)
        self.runtime = runtime
        self._image_check: ImageCheck | None = None  # inspect's
        self.config, self.metadata, self.calibration_ = read_bundle(self.path)
        check_weights(self.path, self.metadata)  # the type router and feature statistics are read there
        self.classes_: list[str] = list(self.metadata["classes"])
        info = read_export_info(self.path)
        if info.get("weights_file_sha256") != self.metadata.get("weights_file_sha256"):
            raise BundleError(f"model bundle {self.path}: the ONNX export is older than the model; "
                              f"run `diffqc export {self.path}` again")
        inputs = info.get("inputs")
        pixels = inputs.get("pixels") if isinstance(inputs, dict) else None
        exported = pixels[-1] if isinstance(pixels, list) and pixels else None
        if exported not in (None, self.config.backbone.input_size):  # config.json edited by hand
            raise BundleError(f"model bundle {self.path}: backbone.input_size "
                              f"{self.config.backbone.input_size} differs from its ONNX export's input, "
                              f"{exported} px (config.json was edited after the export)")
        if precision == "auto":
            usable = usable_precisions(self.path, info, runtime)
            if not usable:
                raise BundleError(f"model bundle {self.path}: no {runtime} model passed its parity "
                                  f"check; run `diffqc export {self.path}`"
                                  + (" with OpenVINO installed" if runtime == "openvino" else ""))
            precision = usable[0]
        file = self.path / ONNX_FILES[precision]
        if _runtime_entry(info, "onnx", precision) is None or not file.is_file():
            raise BundleError(f"model bundle {self.path} has no {precision.upper()} ONNX model "
                              f"({ONNX_FILES[precision]}); run `diffqc export`"
                              + (" --int8 --calibration-data DATA" if precision == "int8" else ""))
        entry = _runtime_entry(info, runtime, precision)
        if entry is None:
            raise BundleError(f"model bundle {self.path}: the export did not check the {precision.upper()} "
                              f"model on {runtime}; run `diffqc export {self.path}` again with {runtime} "
                              "installed")
        if precision == "fp32" and not _passed(entry, "fp32"):
            raise BundleError(f"model bundle {self.path}: {runtime} does not reproduce PyTorch with "
                              f"{file.name} (see export.json); use --runtime onnx or torch")
        sha = info["int8" if precision == "int8" else "fp32"].get("sha256")
        if sha and sha256_file(file) != sha:
            raise BundleError(f"model bundle {self.path}: {file.name} is damaged (checksum mismatch)")
        if precision == "int8":
            cal_file = self.path / INT8_CALIBRATION_FILE
            if cal_file.is_file():
                try:
                    self.calibration_ = Calibrator.from_dict(read_json(cal_file))
                except (ValueError, KeyError, TypeError) as exc:
                    raise BundleError(f"model bundle {self.path}: damaged {cal_file.name} ({exc})") from None
        self.precision = precision
        self._feat_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.router_ = self._read_router()
        try:
            self.graph = _graph(runtime, file, threads, providers)
        except Exception as exc:  # the runtime's own (ONNX Runtime's Fail): a graph newer than it
            raise BundleError(f"model bundle {self.path}: {runtime} cannot load {file.name} ({exc}); run "
                              f"`diffqc export {self.path}` again with this diffqc") from None
        self.input_size = self.config.backbone.input_size

    @classmethod
    def from_model(
        cls, model: onnx.ModelProto, *, config: DetectorConfig, metadata: dict[str, Any],
        calibration: Calibrator, classes: Sequence[str], feature_stats: tuple[np.ndarray, np.ndarray],
        router: routing.TypeRouter | None = None, threads: int | None = None, runtime: str = "onnx",
    ) -> OnnxDetector:
        """An FP32 graph built in memory (:func:`diffqc.export.onnx_detector` builds it from a
        fitted PyTorch Detector), with the model's settings, calibration, feature statistics
        (per-channel mean and std of the raw backbone features, for :meth:`inspect_features`)
        and type router."""
        if runtime not in GRAPH_RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(GRAPH_RUNTIMES)}, got {runtime!r}")
        self = cls.__new__(cls)
        self.path = None
        self.runtime = runtime
        self._image_check = None
        self.config, self.metadata, self.calibration_ = config, dict(metadata), calibration
        self.classes_ = list(classes)
        self.precision = "fp32"
        mean, std = feature_stats
        self._feat_stats = (np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1),
                            np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1))
        self.router_ = router
        if runtime == "openvino":
            from diffqc.backends.openvino import OpenVinoGraph

            self.graph = OpenVinoGraph(model, threads)
        else:
            from diffqc.backends.ort import OnnxGraph

            self.graph = OnnxGraph(model, threads)
        self.input_size = config.backbone.input_size
        return self

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_id", "unfitted"))

    def __repr__(self) -> str:
        where = [f"{str(self.path)!r}"] if self.path is not None else []
        return detector_repr(self, *where, f"runtime={self.runtime!r}", f"precision={self.precision!r}")

    def type_index(self, feature_type: str) -> int:
        try:
            return self.classes_.index(feature_type)
        except ValueError:
            raise unknown_feature_type(feature_type, self.classes_) from None

    # ------------------------------------------------------------------ inspection
    def inspect(
        self,
        images: Sequence[np.ndarray | Image.Image],
        feature_types: Sequence[str | None] | None = None,
        *,
        all_types: bool = True,
        maps: bool = True,
        check_images: bool = True,
    ) -> list[Inspection]:
        """As :meth:`diffqc.model.Detector.inspect`."""
        types = inspect_arguments(images, feature_types)
        given = [None if t is None else self.type_index(t) for t in types]
        if not images:
            return []
        if len(images) > self.config.batch_size:
            return in_batches(self.inspect, images, types, self.config.batch_size, all_types=all_types,
                              maps=maps, check_images=check_images)
        images = as_arrays(images)  # a batch's Pillow images, decoded
        pixels = preprocess(images, self.input_size)
        sizes = [(int(img.shape[0]), int(img.shape[1])) for img in images] if maps else None
        results = self.inspect_pixels(pixels, given, sizes, all_types=all_types)
        if check_images:
            self._image_check = warn_outside(self._image_check, self.metadata, images, results)
        return results

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
        ``[N, C, h, w]`` (NumPy or a CPU tensor), standardised here and scored by the graph."""
        mean, std = self._standardisation()
        feats = ((np.asarray(raw, dtype=np.float32) - mean) / std).astype(np.float32)
        given = [None if t is None else self.type_index(t) for t in feature_types]
        return self._inspect_standardised(feats, given, map_sizes, all_types=all_types)

    def _weights(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The named tensors of the bundle's weights that are there (only those are read)."""
        from safetensors import SafetensorError, safe_open

        assert self.path is not None
        try:
            with safe_open(str(self.path / WEIGHTS_FILE), framework="numpy") as fh:
                return {k: fh.get_tensor(k) for k in keys if k in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"model bundle {self.path}: {WEIGHTS_FILE} unreadable ({exc})") from None

    def _read_router(self) -> routing.TypeRouter | None:
        mean = self._weights(["features.mean"]).get("features.mean")
        if mean is None:
            raise BundleError(f"model bundle {self.path}: {WEIGHTS_FILE} lacks features.mean")
        try:
            return routing.TypeRouter.from_state(self._weights(routing.STATE_KEYS), len(self.classes_),
                                                 int(mean.size))
        except ValueError as exc:
            raise BundleError(f"model bundle {self.path} does not match its config: {exc}") from None

    def _standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        if self._feat_stats is None:
            t = self._weights(["features.mean", "features.std"])
            self._feat_stats = (t["features.mean"].reshape(1, -1, 1, 1),
                                t["features.std"].reshape(1, -1, 1, 1))
        return self._feat_stats

    def _inspect_standardised(
        self, feats: np.ndarray, given: Sequence[int | None],
        map_sizes: Sequence[tuple[int, int]] | None = None, *, all_types: bool = True,
    ) -> list[Inspection]:
        def score(image: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self.graph.score_features(feats[image], kind)

        routed, row_maps = routing.route_and_score(
            given, lambda: feats, self.router_, self.config.scoring.type_candidates, len(self.classes_),
            score, self.calibration_, self.classes_, all_types=all_types, where=self.path or "(in memory)")
        maps = None if map_sizes is None else [resize_map(row_maps[r], *map_sizes[i])
                                               for i, r in enumerate(routed.own_rows)]
        return verdicts(self.classes_, self.calibration_, given, routed.own, routed.scores, routed.table,
                        maps, predicted=routed.predicted)

    def inspect_samples(
        self, samples: Sequence[Sample], *, type_known: bool = True, progress: bool = False,
        all_types: bool = True, maps: bool = True, skip_corrupt: bool = False,
    ) -> tuple[list[Inspection], list[Sample]]:
        """As :meth:`diffqc.model.Detector.inspect_samples`."""

        def shrink(image: np.ndarray) -> np.ndarray:  # the resize inspect() would make
            return preprocess([image], self.input_size)[0].transpose(1, 2, 0)

        return inspect_in_batches(self.inspect, samples, self.config.batch_size, type_known=type_known,
                                  progress=progress, all_types=all_types, maps=maps,
                                  skip_corrupt=skip_corrupt, shrink=None if maps else shrink)


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


def choose_runtime(path: Path | str, device: str | None = None, precision: str = "auto") -> Choice:
    """The fastest installed runtime and precision that passed parity, as the export measured
    them on this machine (``precision`` restricts the choice); PyTorch without a valid export,
    and on a GPU (where PyTorch runs the model on it)."""
    torch_choice = Choice("torch", "fp32", math.inf)
    if precision == "auto" and _cuda_requested(device):
        return torch_choice
    if not (Path(path) / EXPORT_FILE).is_file():  # not exported: PyTorch
        return torch_choice
    try:
        info = read_export_info(path)
        _, meta, _ = read_bundle(path)
    except Exception as exc:  # a damaged export (or bundle): PyTorch can still run the bundle
        warnings.warn(f"{exc}; using PyTorch", stacklevel=2)
        return torch_choice
    missing = sorted({ONNX_FILES[graph] for _, graph, _ in _passed_graphs(info)
                      if not (Path(path) / ONNX_FILES[graph]).is_file()})
    if missing:  # deleted or not copied with the bundle: said, not silently slower
        warnings.warn(f"model bundle {path}: {', '.join(missing)}, which its export lists, "
                      f"{'is' if len(missing) == 1 else 'are'} missing; choosing among the rest "
                      f"(run `diffqc export {path}` again)", stacklevel=2)
    if info.get("weights_file_sha256") != meta.get("weights_file_sha256"):
        warnings.warn(f"model bundle {path}: the ONNX export is stale; using PyTorch "
                      f"(run `diffqc export {path}` again)", stacklevel=2)
        return torch_choice
    for c in usable_choices(path, info):
        if (precision in ("auto", c.precision) and (c.runtime != "torch" or precision != "int8")
                and (c.runtime == "torch" or _installed(c.runtime))):
            return c
    return torch_choice


def load_detector(path: Path | str, runtime: str = "auto", *, threads: int | None = None,
                  device: str | None = None, precision: str = "auto") -> Detector | OnnxDetector:
    """Load a bundle for inference with PyTorch, ONNX Runtime or OpenVINO (``auto``: see
    :func:`choose_runtime`)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_device_name(device)  # the graph runtimes take none, but `gpu` is not the CPU either
    if threads and threads > (cores := available_cores()):
        warnings.warn(f"--threads {threads} is more than the {cores} core{'s' if cores > 1 else ''} "
                      "this process may use: the threads take turns on them", stacklevel=2)
    by_auto = runtime == "auto" and precision == "auto"  # a graph auto chose, not one asked for
    if runtime == "auto":
        chosen = choose_runtime(path, device, precision)
        if chosen.runtime == "torch" and precision == "int8":
            runtime = "onnx"  # no usable INT8 model: let the ONNX detector say why
        else:
            runtime = chosen.runtime
            precision = chosen.precision if runtime != "torch" else precision
    if runtime in GRAPH_RUNTIMES:
        if device is not None and device.startswith("cuda"):
            engine = "ONNX Runtime" if runtime == "onnx" else "OpenVINO"
            raise ConfigError(f"{engine} runs the exported model on the CPU; --device {device} runs "
                              "PyTorch (--runtime torch or auto, --precision fp32 or auto)")
        try:
            onnx = OnnxDetector(path, precision=precision, threads=threads, runtime=runtime)
        except BundleError as exc:  # a damaged graph auto chose: PyTorch runs the bundle, as for
            if not by_auto:         # a damaged export.json (choose_runtime)
                raise
            warnings.warn(f"{exc}; using PyTorch (run `diffqc export {path}` again)", stacklevel=2)
            precision = "auto"
        else:
            _name_unflaggable(onnx, path)
            return onnx
    if precision == "int8":
        raise ConfigError("INT8 runs on ONNX Runtime or OpenVINO: use --runtime onnx, openvino or auto")
    from diffqc.model import Detector

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    det = Detector.load(path, device=device)
    _name_unflaggable(det, path)
    return det


def _name_unflaggable(det: Detector | OnnxDetector, path: Path | str) -> None:
    """A bundle with a type under which no part can be flagged (calibrated on a single GOOD image)
    passes every part of it: `inspect`, `serve` and `watch` say so as they load it (`train` did,
    once, when it wrote the bundle)."""
    if det.calibration_ is not None and (dead := det.calibration_.unflaggable()):
        n = {t: int(det.calibration_.known[t].scores.size) for t in dead}
        scores = {t: det.calibration_.known[t].scores for t in dead}
        alike = {t for t in dead if n[t] > 1 and scores[t].min() == scores[t].max()}
        named = ", ".join(f"{t} ({k} GOOD calibration image{'s' if k != 1 else ''}"
                          f"{', all scoring alike' if t in alike else ''})" for t, k in n.items())
        warnings.warn(f"model bundle {path}: no part of {named} can be flagged: every part of "
                      f"{'it' if len(dead) == 1 else 'them'} PASSes; recalibrate on "
                      f"{det.calibration_.images_to_flag()} different GOOD images or more "
                      f"(`diffqc calibrate {path} DATA`) or retrain on 3 or more", stacklevel=3)


def add_runtime_arguments(parser: argparse._ActionsContainer, *, threads: bool = True) -> None:
    """``--runtime``, ``--precision`` and (unless the command has its own) ``--threads``, for the
    commands that run a model."""
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="torch, onnx (ONNX Runtime), openvino (both run the bundle's ONNX export) "
                             "or auto (default: the fastest that passed parity when exported)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="exported model: fp32, int8 or auto (the fastest that passed parity)")
    if threads:
        parser.add_argument("--threads", type=THREADS, default=None,
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
