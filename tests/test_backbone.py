from __future__ import annotations

import numpy as np
import pytest
import torch

from diffqc.backbone import FeatureExtractor, to_pixels
from diffqc.config import BackboneConfig
from diffqc.errors import BackboneError, ConfigError


@pytest.mark.parametrize("name,channels", [("efficientnet-lite0", 152), ("efficientnet-lite1", 152),
                                           ("efficientnet-lite2", 168), ("mobilenet-v2", 128)])
def test_pretrained_features(name: str, channels: int) -> None:
    try:
        fe = FeatureExtractor(BackboneConfig(name=name, input_size=64))
    except BackboneError as exc:  # Lite1/Lite2/MobileNetV2 weights are optional installs
        pytest.skip(str(exc))
    assert fe.channels == channels and fe.grid == (8, 8) and len(fe.weights_sha256) == 64
    x = to_pixels([np.random.default_rng(0).random((50, 70, 3), dtype=np.float32)] * 2, 64)
    with torch.inference_mode():
        raw = fe.raw_features(x)
    assert raw.shape == (2, channels, 8, 8) and torch.isfinite(raw).all()
    fe.fit_standardisation(raw)
    z = fe.standardise(raw)
    assert abs(float(z.mean())) < 1e-3
    # Real ImageNet weights: features of a structured image differ from those of a flat one.
    flat = fe.raw_features(torch.full((1, 3, 64, 64), 0.5))
    assert not torch.allclose(flat[0], raw[0], atol=1e-2)


def test_weights_hash_mismatch_is_an_error() -> None:
    with pytest.raises(BackboneError, match="differ"):
        FeatureExtractor(BackboneConfig(input_size=64, weights_sha256="0" * 64))


def test_unknown_backbone() -> None:
    # Validated when the config is built, before any weights are looked for.
    with pytest.raises(ConfigError, match=r"backbone\.name must be one of .*got 'resnet50'"):
        FeatureExtractor(BackboneConfig(name="resnet50"))


def test_to_pixels_rejects_bad_shapes() -> None:
    for shape in [(8, 8, 2), (8, 8, 5), (2, 8, 8, 3)]:
        with pytest.raises(ValueError, match="HxWx3"):
            to_pixels([np.zeros(shape, np.float32)], 32)


def test_to_pixels_reads_arrays_as_image_files_are_read() -> None:
    """A uint8 array (cv2, Pillow) was clamped as floats: nearly white, every part REJECT."""
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    want = to_pixels([img8.astype(np.float32) / 255], 32)
    assert torch.equal(to_pixels([img8], 32), want)
    assert torch.allclose(to_pixels([img8.astype(np.uint16) * 257], 32), want, atol=1e-6)


def test_input_gain_scales_the_pixels_before_the_networks_normalisation() -> None:
    """backbone.input_gain g: the features of pixels x are those of g * x at gain 1."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    plain = FeatureExtractor(BackboneConfig(input_size=64))
    dim = FeatureExtractor(BackboneConfig(input_size=64, input_gain=0.0625))
    assert torch.allclose(dim.raw_features(x), plain.raw_features(x * 0.0625), atol=1e-6)
    assert not torch.allclose(dim.raw_features(x), plain.raw_features(x), atol=1e-3)
    # a gain above 1 (12-bit data in 16-bit files: 16) brightens, and saturates at white as a
    # camera does: what is white at gain 16 reads as white
    bright = FeatureExtractor(BackboneConfig(input_size=64, input_gain=16.0))
    assert torch.allclose(bright.raw_features(x / 16), plain.raw_features(x), atol=1e-5)
    assert torch.allclose(bright.raw_features(x), plain.raw_features(torch.ones_like(x).minimum(16 * x)),
                          atol=1e-5)
