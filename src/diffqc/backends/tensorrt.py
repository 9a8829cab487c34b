"""TensorRT: an FP16 engine built from the exported ``model.onnx`` (``diffqc export --format
tensorrt``) and run with CUDA buffers from PyTorch. Needs an NVIDIA GPU and the ``tensorrt``
package (or ``trtexec`` to build)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffqc.backends.graph import ANOMALY_MAP, PIXELS, SCORE, TYPE_IDX, import_onnx
from diffqc.errors import ExportError, RuntimeUnavailableError

if TYPE_CHECKING:
    import onnx

ENGINE_FILE = "model.fp16.engine"


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


def check_tensorrt_builder() -> None:
    """A :class:`RuntimeUnavailableError` unless an engine can be built here: TensorRT's Python
    package or ``trtexec`` on PATH (checked before any work, without importing TensorRT)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None and shutil.which("trtexec") is None:
        raise RuntimeUnavailableError("TensorRT is not installed (pip install tensorrt) and trtexec "
                                      "is not on PATH")


def widened_int8_tables(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` whose INT8 initializers (the 8-bit tables of
    ``diffusion.prior_storage=int8``, codes -127..127 that the graph gathers and widens) are
    FLOAT16 initializers of the same codes, exact in float16: TensorRT's networks take an INT8
    tensor only with a quantization scale of its own. The graph computes the same numbers.
    None when ``model`` has no INT8 initializer."""
    onnxlib = import_onnx()
    from onnx import numpy_helper

    if not any(t.data_type == onnxlib.TensorProto.INT8 for t in model.graph.initializer):
        return None
    out = onnxlib.ModelProto()
    out.CopyFrom(model)
    widened = set()
    for t in out.graph.initializer:
        if t.data_type == onnxlib.TensorProto.INT8:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
            widened.add(t.name)
    # the recorded types of what reads them change with them: left to the parser to infer
    retyped = {o for n in out.graph.node if widened & set(n.input) for o in n.output}
    kept = [v for v in out.graph.value_info if v.name not in retyped]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def build_tensorrt_engine(onnx_path: Path | str, engine_path: Path | str, *, input_size: int,
                          fp16: bool = True, max_batch: int = 8, workspace_mib: int = 2048) -> Path:
    """A TensorRT engine (FP16 by default) from an exported ``model.onnx`` (its 8-bit tables
    given as float16 codes: :func:`widened_int8_tables`), for batch 1 to ``max_batch``; with
    TensorRT's Python API, else ``trtexec``. Needs an NVIDIA GPU."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_tensorrt_builder()
    wide = widened_int8_tables(import_onnx().load(str(onnx_path)))
    if wide is None:
        return _build_engine(onnx_path, engine_path, input_size, fp16, max_batch, workspace_mib)
    fd, name = tempfile.mkstemp(prefix=".diffqc-tensorrt-", suffix=".onnx", dir=engine_path.parent)
    try:
        with open(fd, "wb") as fh:
            fh.write(wide.SerializeToString())
        return _build_engine(Path(name), engine_path, input_size, fp16, max_batch, workspace_mib)
    finally:
        Path(name).unlink(missing_ok=True)  # written just above


def _build_engine(onnx_path: Path, engine_path: Path, input_size: int, fp16: bool, max_batch: int,
                  workspace_mib: int) -> Path:
    s = input_size
    try:
        import tensorrt as trt
    except ImportError:
        import subprocess

        shapes = {"min": 1, "opt": 1, "max": max_batch}
        cmd = [str(shutil.which("trtexec")), f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
               f"--memPoolSize=workspace:{workspace_mib}M",
               *[f"--{k}Shapes={PIXELS}:{n}x3x{s}x{s},{TYPE_IDX}:{n}" for k, n in shapes.items()]]
        done = subprocess.run([*cmd, "--fp16"] if fp16 else cmd, check=False)
        if done.returncode != 0:
            raise ExportError(f"trtexec failed (exit {done.returncode}; its output is above): no "
                              f"engine written from {onnx_path}") from None
        return engine_path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(PIXELS, (1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s))
    profile.set_shape(TYPE_IDX, (1,), (1,), (max_batch,))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build an engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    return engine_path
