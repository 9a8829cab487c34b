"""TensorRT: an FP16 engine built from the exported ``model.onnx`` (``diffqc export --format
tensorrt``) and run with CUDA buffers from PyTorch. Needs an NVIDIA GPU and the ``tensorrt``
package (or ``trtexec`` to build)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from diffqc.backends.graph import ANOMALY_MAP, PIXELS, SCORE, TYPE_IDX
from diffqc.errors import ExportError, RuntimeUnavailableError

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


def build_tensorrt_engine(onnx_path: Path | str, engine_path: Path | str, *, input_size: int,
                          fp16: bool = True, max_batch: int = 8, workspace_mib: int = 2048) -> Path:
    """A TensorRT engine (FP16 by default) from an exported ``model.onnx``, for batch 1 to
    ``max_batch``; with TensorRT's Python API, else ``trtexec``. Needs an NVIDIA GPU."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    s = input_size
    check_tensorrt_builder()
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
