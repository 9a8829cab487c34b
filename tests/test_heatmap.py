"""The fused heat map (``scoring.heat_map=fused``): the likelihood's map plus the distance to the
nearest GOOD patch, on the likelihood's scale; the image score and the decisions unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffqc.baselines import PatchCoreScorer
from diffqc.config import with_overrides
from diffqc.data import DEFECTIVE, load_dataset, read_image, read_mask
from diffqc.diffusion import storage_dtype
from diffqc.errors import BundleError, ConfigError
from diffqc.metrics import pixel_auroc
from diffqc.model import Detector, split_calibration
from diffqc.scoring import upsample_and_smooth
from tests.conftest import tiny_config

FAST = {"train.steps": 0, "scoring.memory_ratio": 0.05}


@pytest.fixture(scope="module")
def pair(clear_dataset: Path) -> tuple[Detector, Detector]:
    """The same model with the likelihood's map and with the fused map."""
    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    plain = Detector(tiny_config(**FAST), device="cpu").fit(train, progress=False)
    fused_config = tiny_config(**FAST, **{"scoring.heat_map": "fused"})
    fused = Detector(fused_config, device="cpu").fit(train, progress=False)
    return plain, fused


def _test_set(clear_dataset: Path) -> tuple[list[np.ndarray], list[str], list[np.ndarray]]:
    test = [s for s in load_dataset(clear_dataset) if s.split == "test"]
    images = [read_image(s.path) for s in test]
    masks = [read_mask(s.mask_path, im.shape[:2]) if s.label == DEFECTIVE else np.zeros(im.shape[:2], bool)
             for s, im in zip(test, images, strict=True)]
    return images, [s.feature_type for s in test], masks


def test_only_the_map_changes(pair: tuple[Detector, Detector], clear_dataset: Path) -> None:
    plain, fused = pair
    images, types, _ = _test_set(clear_dataset)
    a = plain.inspect(images, types, all_types=False)
    b = fused.inspect(images, types, all_types=False)
    assert [r.score for r in a] == [r.score for r in b]
    assert [r.decision for r in a] == [r.decision for r in b]
    assert all(x.anomaly_map is not None and y.anomaly_map is not None
               and not np.allclose(x.anomaly_map, y.anomaly_map) for x, y in zip(a, b, strict=True))


def test_fused_map_is_the_likelihood_plus_the_scaled_distance(
        pair: tuple[Detector, Detector], clear_dataset: Path) -> None:
    """The memory is PatchCore's coreset of the fit images at memory_ratio, rounded to float16; its
    constants are the median of its GOOD calibration image scores and the ratio of the two maps'
    interquartile ranges."""
    plain, fused = pair
    assert fused.memory_ is not None and plain.memory_ is None
    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    fit_idx, cal_idx = split_calibration(train, fused.config.calibration.fraction, fused.config.train.seed)
    feats = fused.extract([read_image(train[i].path) for i in range(len(train))])
    types = torch.tensor([fused.classes_.index(s.feature_type) for s in train])
    cfg = fused.config
    memory = PatchCoreScorer(with_overrides(cfg, {"patchcore.coreset_ratio": 0.05}).patchcore)
    memory.fit(feats[fit_idx], types[fit_idx], 2)
    # the memory is stored, and so rounded, as the Gaussians' float tables are (float16 by default)
    assert storage_dtype(cfg.diffusion) == torch.float16
    memory.banks = [b.half().float() for b in memory.banks or []]
    bank_sizes = [b.shape[0] for b in fused.memory_.nearest.banks or []]
    assert bank_sizes == [b.shape[0] for b in memory.banks or []]
    assert 0 < bank_sizes[0] < 0.06 * len(fit_idx) / 2 * 16 * 16  # a 5 % coreset, not every patch

    def distance_maps(rows: list[int]) -> torch.Tensor:
        return upsample_and_smooth(memory.score_maps(feats[rows], types[rows]),
                                   cfg.backbone.input_size, cfg.scoring.smooth_sigma)

    cal_dist = distance_maps(cal_idx).flatten(1)
    k = max(1, round(cfg.scoring.topk * cal_dist.shape[1]))
    cal_scores = cal_dist.topk(k, dim=1).values.mean(1).numpy()
    for t, name in enumerate(fused.classes_):
        mem = cal_scores[types[cal_idx].numpy() == t]
        lik = np.asarray(fused.calibration_.known[name].scores)
        iqr = lambda x: float(np.subtract(*np.quantile(x, [0.75, 0.25])))  # noqa: E731
        assert float(fused.memory_.centre[t]) == pytest.approx(float(np.median(mem)), rel=1e-5)
        assert float(fused.memory_.weight[t]) == pytest.approx(iqr(lik) / iqr(mem), rel=1e-4)
    rows = list(range(4))
    with torch.inference_mode():
        lik_maps = plain.score_maps(feats[rows], types[rows])
        got, _ = fused.maps_and_scores(feats[rows], types[rows])
    w, c = fused.memory_.weight[types[rows]], fused.memory_.centre[types[rows]]
    expected = lik_maps + w.view(-1, 1, 1) * (distance_maps(rows) - c.view(-1, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fused_map_finds_the_defects(pair: tuple[Detector, Detector], clear_dataset: Path) -> None:
    _, fused = pair
    images, types, masks = _test_set(clear_dataset)
    maps = [r.anomaly_map for r in fused.inspect(images, types, all_types=False)]
    assert pixel_auroc(masks, maps) > 0.8  # measured 0.870 (the likelihood's map alone: 0.872)


def test_save_load_keeps_the_memory(pair: tuple[Detector, Detector], clear_dataset: Path,
                                    tmp_path: Path) -> None:
    _, fused = pair
    images, types, _ = _test_set(clear_dataset)
    bundle = fused.save(tmp_path / "fused")
    stored = load_file(str(bundle / "weights.safetensors"))
    assert stored["memory.bank"].dtype == torch.float16  # as the Gaussians' float tables
    assert fused.memory_ is not None and fused.memory_.nearest.banks is not None
    assert stored["memory.bank"].shape[0] == sum(b.shape[0] for b in fused.memory_.nearest.banks)
    loaded = Detector.load(bundle, device="cpu")
    assert loaded.memory_ is not None and loaded.memory_.storage == torch.float16
    for a, b in zip(fused.inspect(images[:6], types[:6]), loaded.inspect(images[:6], types[:6]), strict=True):
        assert a.score == b.score and a.decision == b.decision
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_a_bundle_without_its_memory_is_refused(pair: tuple[Detector, Detector], tmp_path: Path) -> None:
    plain, _ = pair
    bundle = plain.save(tmp_path / "plain")
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["scoring"]["heat_map"] = "fused"
    (bundle / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"config\.json was edited after training: scoring\.heat_map is "
                                          r"fused"):
        Detector.load(bundle, device="cpu")
    meta = json.loads((bundle / "metadata.json").read_text())
    del meta["fitted_settings"]  # a bundle from before the record: its weights tell
    (bundle / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="memory"):
        Detector.load(bundle, device="cpu")


@pytest.mark.parametrize("over", [{"calibration.scheme": "cross"}, {"tiling.mode": "auto"}])
def test_settings_the_fused_map_cannot_serve(clear_dataset: Path, over: dict[str, str]) -> None:
    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    cfg = tiny_config(**{**FAST, "scoring.heat_map": "fused", **over})
    with pytest.raises(ConfigError, match="heat_map=fused"):
        Detector(cfg, device="cpu").fit(train, progress=False)


def test_the_baselines_ignore_the_setting(clear_dataset: Path) -> None:
    """``diffqc evaluate --set scoring.heat_map=fused`` with PaDiM beside: the diffusion detector's
    setting, like ``scoring.aggregation``; PaDiM fits without a memory."""
    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    det = Detector(tiny_config("padim", **FAST, **{"scoring.heat_map": "fused"}), device="cpu")
    assert det.fit(train, progress=False).memory_ is None


def test_heat_map_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="heat_map"):
        tiny_config(**{"scoring.heat_map": "nearest"})
    with pytest.raises(ConfigError, match="memory_ratio"):
        tiny_config(**{"scoring.memory_ratio": 0.0})
