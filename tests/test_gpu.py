"""The CUDA path end to end: train, inspect (API and CLI), evaluate, demo and export on a GPU,
and the scores against the CPU's.

Deselected by default (marker ``gpu``); run with ``pytest -m gpu`` on a machine with CUDA
(``.ci/run`` does so when it finds one). Skipped when PyTorch sees no CUDA device.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from diffqc.cli import main
from diffqc.data import GOOD, load_dataset, read_images
from diffqc.metrics import image_auroc
from diffqc.model import Detector
from diffqc.scoring import DiffusionScorer

from .conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """cuDNN convolutions in full FP32 (not TF32), so CUDA and CPU can be compared closely."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def test_set(clear_dataset: Path) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"]
    images, samples, _ = read_images(samples)
    return images, [s.feature_type for s in samples], np.array([s.label != GOOD for s in samples])


@pytest.fixture(scope="module")
def cuda_bundle(clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model of tests/conftest.py, trained on the GPU."""
    det = Detector(tiny_config(), device="cuda").fit(load_dataset(clear_dataset), progress=False)
    assert det.device.type == "cuda"
    scorer = det.scorer_
    assert isinstance(scorer, DiffusionScorer) and scorer.denoiser_ is not None
    on = {t.device.type for t in (*scorer.denoiser_.parameters(), *scorer.denoiser_.buffers(),
                                  *det.extractor.buffers())}
    assert on == {"cuda"}, "the denoiser was trained (and the statistics kept) on the GPU"
    return det.save(tmp_path_factory.mktemp("gpu") / "tiny-cuda")


def _scores(det: Detector, images: list[np.ndarray], types: list[str | None]) -> np.ndarray:
    return np.array([r.score for r in det.inspect(images, types)])


def test_cuda_and_cpu_score_the_same_bundle_alike(cuda_bundle: Path, test_set: tuple,
                                                  exact_fp32: None) -> None:
    images, types, _ = test_set
    gpu, cpu = Detector.load(cuda_bundle, device="cuda"), Detector.load(cuda_bundle, device="cpu")
    for given in (types, [None] * len(types)):  # known type, and unknown-type arg-min
        rg, rc = gpu.inspect(images, given), cpu.inspect(images, given)
        np.testing.assert_allclose([r.score for r in rg], [r.score for r in rc], rtol=1e-3, atol=1e-4)
        assert [r.feature_type for r in rg] == [r.feature_type for r in rc]
        np.testing.assert_allclose([r.p_value for r in rg], [r.p_value for r in rc], rtol=1e-2, atol=1e-3)
        for a, b in zip(rg, rc, strict=True):
            assert a.anomaly_map is not None and b.anomaly_map is not None
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-3, atol=1e-3)


def test_training_on_cuda_matches_training_on_the_cpu(cuda_bundle: Path, tiny_model: Path,
                                                      test_set: tuple) -> None:
    """Same data, config and random draws; only floating-point rounding differs."""
    images, types, defective = test_set
    s_gpu = _scores(Detector.load(cuda_bundle, device="cuda"), images, types)
    s_cpu = _scores(Detector.load(tiny_model, device="cpu"), images, types)
    for s in (s_gpu, s_cpu):
        assert image_auroc(defective.astype(int), s) >= 0.95
    assert spearmanr(s_gpu, s_cpu).statistic >= 0.95


def test_cli_inspect_on_cuda(cuda_bundle: Path, clear_dataset: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = clear_dataset / "dots" / "test" / "blob"
    rc = main(["inspect", str(cuda_bundle), str(folder), "--feature-type", "dots", "--runtime", "torch",
               "--device", "cuda", "--heatmaps", str(tmp_path / "maps")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == len(list(folder.iterdir()))
    assert all(r["feature_type"] == "dots" and r["score"] > 0 for r in rows)
    assert any((tmp_path / "maps").iterdir())


def test_a_gpu_without_room_is_one_error_line(cuda_bundle: Path, clear_dataset: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CUDA's allocator says it has no room with ``torch.OutOfMemoryError``, no MemoryError (a GPU
    another process holds; here this process's share of it cut to a few hundred kB): `inspect
    --device cuda` says out of memory on the GPU and how much was asked, in one line. It was a
    traceback, or, from the bundle's load, a bundle that "does not match its config"."""
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6)
    try:
        rc = main(["inspect", str(cuda_bundle), str(clear_dataset / "dots" / "test" / "blob"),
                   "--feature-type", "dots", "--runtime", "torch", "--device", "cuda"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert re.fullmatch(r"diffqc: error: out of memory on the GPU: it tried to allocate [\d.]+ [KMG]iB at "
                        r"once; DIFFQC_TRACEBACK=1 shows where", err[-1]), err


def test_export_of_a_cuda_trained_bundle(cuda_bundle: Path, clear_dataset: Path, tmp_path: Path,
                                         test_set: tuple, exact_fp32: None) -> None:
    from diffqc.runtime import OnnxDetector

    bundle = tmp_path / "exported"
    shutil.copytree(cuda_bundle, bundle)
    assert main(["export", str(bundle), "--data", str(clear_dataset), "--threads", "2"]) == 0
    images, types, _ = test_set
    onnx = np.array([r.score for r in OnnxDetector(bundle, threads=2).inspect(images, types)])
    np.testing.assert_allclose(onnx, _scores(Detector.load(bundle, device="cuda"), images, types),
                               rtol=1e-2, atol=1e-3)


def test_evaluate_on_cuda(clear_dataset: Path) -> None:
    from diffqc.evaluate import evaluate

    report = evaluate(load_dataset(clear_dataset), folds=2, methods=("diffusion", "padim"),
                      base_config=tiny_config(), device="cuda", progress=False, n_boot=50, gallery=0)
    for t in ("dots", "stripes"):  # the clear defects are found out of fold, by both methods
        for method in ("diffusion", "padim"):
            assert report["results"][t][method]["pooled"]["auroc"] >= 0.9


def test_demo_on_cuda(tmp_path: Path) -> None:
    from diffqc.demo import run_demo

    rows = run_demo(tmp_path / "demo", config=tiny_config(), n_parts=240, progress=False, device="cuda")
    assert len(rows) == 9 and rows[-1]["feature_type"] == "mean/all"  # 8 types and the summary
    assert rows[-1]["image_auroc"] > 0.5  # mean over the types whose AUROC is defined
