"""Device placement on a machine without a GPU: the device is resolved once (a clear
DeviceError for one that is not usable here), and fitting, training and scoring all happen on
the detector's device, with results back on the CPU as NumPy / Python values.

With only a CPU these tests cannot catch a tensor left on the wrong device (there is only one);
they check that the device is passed and used everywhere. tests/test_gpu.py runs the same path
on CUDA where a GPU is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffqc import scoring
from diffqc.backbone import resolve_device
from diffqc.data import load_dataset, read_images
from diffqc.errors import DeviceError
from diffqc.model import Detector
from diffqc.runtime import load_detector

from .conftest import tiny_config

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(("name", "expected"), [(None, "cpu"), ("auto", "cpu"), ("cpu", "cpu")])
@no_cuda
def test_device_resolution_without_cuda(name: str | None, expected: str) -> None:
    assert resolve_device(name) == torch.device(expected)


@pytest.mark.parametrize(("name", "message"), [
    ("cuda", r"'cuda' requested but CUDA is not available .*use --device cpu \(device='cpu' from Python\)"),
    ("cuda:1", r"'cuda:1' requested but CUDA is not available"),
    ("tpu", r"device 'tpu' is not supported; use cpu, cuda or cuda:N"),
    ("mps", r"device 'mps' is not supported; use cpu, cuda or cuda:N"),
])
@no_cuda
def test_unusable_device_is_a_clear_error(name: str, message: str, tiny_model: Path) -> None:
    with pytest.raises(DeviceError, match=message) as info:
        Detector(tiny_config(), device=name)
    assert info.value.code == "device_unavailable"
    with pytest.raises(DeviceError, match=message):
        Detector.load(tiny_model, device=name)
    # `inspect --runtime auto|torch --device cuda` goes to PyTorch, which says why it cannot
    for runtime in ("auto", "torch"):
        with pytest.raises(DeviceError, match=message):
            load_detector(tiny_model, runtime, device=name)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor a module or scorer holds (parameters, buffers, plain tensor attributes)."""
    out: list[torch.Tensor] = []
    for value in vars(obj).values():
        if isinstance(value, torch.nn.Module):
            out += list(value.parameters()) + list(value.buffers())
        elif isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, scoring.ScoreBank):
            out += [value.timesteps, value.noise, value.weights]
    return out


def test_fit_trains_and_scores_on_the_detectors_device(clear_dataset: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = scoring.train_denoiser

    def spy(features: torch.Tensor, type_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append({"features": features.device, "types": type_idx.device, **kwargs})
        denoiser, history = real(features, type_idx, *args, **kwargs)
        calls[-1]["trained_on"] = {t.device for t in (*denoiser.parameters(), *denoiser.buffers())}
        return denoiser, history

    monkeypatch.setattr(scoring, "train_denoiser", spy)
    samples = load_dataset(clear_dataset)
    det = Detector(tiny_config(**{"train.steps": 20}), device="cpu").fit(samples, progress=False)
    assert len(calls) == 1, "the denoiser is trained exactly once"
    call = calls[0]
    assert call["device"] == det.device, "train_denoiser is told the detector's device"
    assert call["features"] == call["types"] == det.device
    assert call["trained_on"] == {det.device}
    scorer = det.scorer_
    assert isinstance(scorer, scoring.DiffusionScorer)
    held = _tensors(scorer) + _tensors(det.extractor) + list(det.extractor.buffers())
    assert held and {t.device for t in held} == {det.device}

    images, kept, _ = read_images([s for s in samples if s.split == "test"][:3])
    assert det.extract(images, raw=True).device == det.device
    results = det.inspect(images, [None, kept[1].feature_type, kept[2].feature_type])
    for r in results:  # back on the CPU, as plain values
        assert isinstance(r.score, float) and isinstance(r.anomaly_map, np.ndarray)
        assert r.type_scores and all(isinstance(v, float) for v in r.type_scores.values())


def test_loaded_scorer_lives_on_the_requested_device(tiny_model: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    assert det.device == torch.device("cpu")
    scorer = det.scorer_
    assert isinstance(scorer, scoring.DiffusionScorer)
    held = _tensors(scorer) + list(det.extractor.buffers()) + list(det.extractor.parameters())
    assert {t.device for t in held} == {det.device}


@no_cuda
def test_cli_device_cuda_without_cuda_is_one_line(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from diffqc.cli import main

    image = next((clear_dataset / "dots" / "test" / "good").iterdir())
    out = tmp_path / "model"
    for argv in (["inspect", str(tiny_model), str(image), "--runtime", "torch", "--device", "cuda"],
                 ["train", str(clear_dataset), "--out", str(out), "--device", "cuda", "-q"]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "device 'cuda' requested but CUDA is not available" in err and "Traceback" not in err
    assert not out.exists()  # refused before training, nothing written
