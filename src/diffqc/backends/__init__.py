"""Inference backends that run the exported ONNX graph (``diffqc export``).

- :mod:`diffqc.backends.graph`: the graph's interface (tensor names), cutting it at
  ``features`` into a backbone half and a scorer half, and what every backend shares.
- :mod:`diffqc.backends.ort`: ONNX Runtime sessions, :class:`~diffqc.backends.ort.OnnxGraph` and
  a bring-your-own ONNX backbone.
- :mod:`diffqc.backends.openvino`: :class:`~diffqc.backends.openvino.OpenVinoGraph`, the same
  graph (FP32 or the QDQ INT8 model) compiled by OpenVINO.
- :mod:`diffqc.backends.tensorrt`: a TensorRT FP16 engine (NVIDIA GPU only).

Nothing here imports PyTorch (TensorRT borrows its CUDA buffers, imported when used) or any
other part of diffqc than :mod:`diffqc.errors`: the detectors sit above the backends.
"""
