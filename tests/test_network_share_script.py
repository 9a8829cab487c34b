"""``benchmarks/network_share.py``: the diagnostic that splits the bound into the Gaussian part
and the network's correction, and compares their denoising errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffqc.diffusion import cosine_alpha_bar

from .conftest import load_benchmark

share = load_benchmark("network_share")


def test_untrained_network_adds_nothing_and_the_gaussian_error_is_the_closed_form(tmp_path: Path) -> None:
    """On white features (each channel N(0, 1), independent) the Gaussian path's posterior mean
    has ε-MSE ᾱ_t per channel; an untrained network adds exactly nothing, so its correction is
    zero and the whole bound scores as the Gaussian part does. A trained one moves the map."""
    g = torch.Generator().manual_seed(0)
    good = torch.randn(48, 6, 4, 4, generator=g)
    bad = good.clone()
    bad[:, :, 1, 1] += 4.0
    cache = tmp_path / "select.pt"
    torch.save({"good": good, "bad": bad, "mask": torch.zeros(48, 8, 8, dtype=torch.bool)}, cache)
    out = tmp_path / "share.json"
    small = {"diffusion.prior_context": 0, "diffusion.hidden": 16, "diffusion.depth": 1,
             "diffusion.embed_dim": 8, "train.batch_images": 8, "train.locations_per_image": 8}
    assert share.main([json.dumps({**small, "train.steps": 0}), json.dumps({**small, "train.steps": 40}),
                       "--cache", str(cache), "--threads", "1", "--json", str(out)]) == 0
    untrained, trained = json.loads(out.read_text())
    assert untrained["sd_correction"] == 0.0 and untrained["auroc_whole"] == untrained["auroc_gaussian"]
    assert untrained["auroc_gaussian"] > 0.95  # the bump at one location is found
    alpha_bar = cosine_alpha_bar(1000)
    for t, gauss, whole in untrained["eps_mse"]:
        assert whole == gauss
        assert abs(gauss - float(alpha_bar[t])) < 0.1 * float(alpha_bar[t]) + 0.01, (t, gauss)
    assert trained["sd_correction"] > 0
    assert trained["sd_gaussian"] == untrained["sd_gaussian"]  # same Gaussians: the seed and the fit
