"""The pure helpers of ``benchmarks/tune.py`` and ``benchmarks/map_variants.py``: the synthetic
defects' masks (the pixel-level truth that chooses map settings), the neighbour shift and the
null model of the type-vs-null ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import load_benchmark

tune = load_benchmark("tune")
variants = load_benchmark("map_variants")


@pytest.mark.parametrize("index", range(8))  # two of each kind: cut-paste, scratch, noise, spot
def test_synthetic_defect_changes_only_inside_its_mask(index: int) -> None:
    rng = np.random.default_rng(index)
    image = rng.uniform(0.2, 0.8, size=(64, 64, 3))
    donor = rng.uniform(0.2, 0.8, size=(64, 64, 3))
    out, mask = tune.synthetic_anomaly(image, donor, index, strength=1.0)
    assert mask.shape == (64, 64) and mask.dtype == bool and mask.any()
    changed = np.any(out != image, axis=-1)
    assert not (changed & ~mask).any(), "a pixel outside the mask was changed"
    assert changed[mask].mean() > 0.9, "the mask is larger than the defect"
    assert np.array_equal(out, tune.synthetic_anomaly(image, donor, index, strength=1.0)[0])  # seeded


def test_shifted_moves_the_grid_by_the_offset_and_replicates_the_border() -> None:
    x = torch.arange(20.0).view(1, 1, 4, 5)
    down = variants.shifted(x, 1, 0)  # out[p] = x[p - (1, 0)]
    assert torch.equal(down[..., 1:, :], x[..., :-1, :])
    assert torch.equal(down[..., 0, :], x[..., 0, :])
    left = variants.shifted(x, 0, -1)  # out[p] = x[p + (0, 1)]
    assert torch.equal(left[..., :, :-1], x[..., :, 1:])
    assert torch.equal(left[..., :, -1], x[..., :, -1])
    assert torch.equal(variants.shifted(x, 0, 0), x)


def test_print_variants_gives_mean_and_sd_over_folds(capsys: pytest.CaptureFixture[str]) -> None:
    tune.print_variants("title", {"a": [(0.9, 0.8), (0.7, 0.6)]}, folds=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["a", "0.8000", "±", "0.1414", "0.7000", "±", "0.1414", "0.900", "0.700"]
    tune.print_variants("t", {"b": [(1.0, 0.5), (1.0, 0.5)]})
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["b", "1.0000", "±", "0.0000", "0.5000", "±", "0.0000"]  # no per-fold column


def test_null_model_of_one_type_is_the_type_s_own_and_pools_several(clear_dataset: Path) -> None:
    """The null model of ``map_variants.py``'s type-vs-null ratio: with one type it is fitted on
    the same images as the type's model, so its maps are that model's (the ratio at L = 1 is 0);
    with two types it is one Gaussian per location over both, and differs from each type's."""
    from diffqc.data import load_dataset, read_images
    from diffqc.model import Detector

    from .conftest import tiny_config

    cfg = tiny_config(**{"train.steps": 0, "calibration.folds": 2})
    good = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    images, good, _ = read_images(good)
    det = Detector(cfg, device="cpu")
    raw = det.extract(images, raw=True)
    stripes = torch.tensor([s.feature_type == "stripes" for s in good])
    one = [s for s in good if s.feature_type == "stripes"]
    with pytest.warns(UserWarning):  # too few calibration images for α_reject
        det.fit_features(raw[stripes], one)
        null = variants.null_maps(cfg, raw[stripes], one, raw[stripes])
        assert det.scorer_ is not None
        with torch.inference_mode():
            own = det.scorer_.score_maps(det.extractor.standardise(raw[stripes]),
                                         torch.zeros(len(one), dtype=torch.long))
        assert torch.allclose(null, own)
        both = Detector(cfg, device="cpu").fit_features(raw, good)
        pooled = variants.null_maps(cfg, raw, good, raw)
    assert both.scorer_ is not None
    with torch.inference_mode():
        typed = both.scorer_.score_maps(both.extractor.standardise(raw),
                                        torch.tensor([both.type_index(s.feature_type) for s in good]))
    assert pooled.shape == typed.shape
    assert (pooled - typed).abs().mean() > 0.1 * typed.abs().mean()


def test_a_variant_that_changes_the_backbone_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """The proxy extracts the features once, with --set's backbone: a variant's backbone setting
    would be silently ignored (identical rows), so it is refused with the way to run it."""
    with pytest.raises(SystemExit) as exc:
        tune.main(["--datasets", "synthetic", "--variant", "dim:backbone.input_gain=0.5"])
    assert exc.value.code == 2
    assert "changes the backbone; pass backbone settings with --set" in capsys.readouterr().err
