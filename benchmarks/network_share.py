"""What the trained network adds to the Gaussian path, and why (issue 14, "the network carries
weight"): on training GOOD images only, with synthetic defects, no test split read.

    python benchmarks/network_share.py --cache CACHE/select-XXXX.pt \
        '{"train.steps": 1000}' '{"train.steps": 1000, "diffusion.context": "image"}'

``--cache`` is a feature cache written by ``benchmarks/tune.py`` (the GOOD training images of one
dataset and one synthetic defective copy of each; one feature type). A seeded quarter of them is
held out; the model of each variant (JSON config overrides) is fitted on the other three
quarters (channels standardised on them), and for the held-out GOOD images and their defective
copies it reports:

* the spread (sd over all locations) of the Gaussian path's part of the map, ½ δᵀΣ⁻¹δ, and of the
  network's correction (the map minus that part), and the correction's mean on GOOD and on
  defective images;
* the image AUROC (top 1 % of the upsampled, smoothed map) of the Gaussian part alone, of the
  whole bound (Gaussian + network) and of the correction alone;
* the held-out GOOD ε-prediction error per timestep, of the Gaussian path's exact posterior mean
  and of it plus the network: how much better than the Gaussian the network denoises.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffqc.backbone import channel_moments
from diffqc.config import DetectorConfig, with_overrides
from diffqc.metrics import image_auroc
from diffqc.scoring import DiffusionScorer, aggregate, upsample_and_smooth

TIMESTEPS = (50, 100, 200, 400, 800)


def split(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded indices: three quarters to fit, one quarter held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: 3 * n // 4], perm[3 * n // 4 :]


def gaussian_part(scorer: DiffusionScorer) -> DiffusionScorer:
    """A copy of ``scorer`` whose network's output layer is zero: its maps are the Gaussian
    path's ½ δᵀΣ⁻¹δ alone (an untrained network adds exactly zero)."""
    out = copy.deepcopy(scorer)
    assert out.denoiser_ is not None
    with torch.no_grad():
        out.denoiser_.out.weight.zero_()
        out.denoiser_.out.bias.zero_()
    return out


def maps(scorer: DiffusionScorer, x: Tensor) -> Tensor:
    types = torch.zeros(len(x), dtype=torch.long)
    return torch.cat([scorer.score_maps(x[i : i + 32], types[i : i + 32]) for i in range(0, len(x), 32)])


def image_scores(config: DetectorConfig, m: Tensor) -> np.ndarray:
    """Image scores of the feature-grid maps ``m`` by ``config``'s rule (upsampled to the input
    size, smoothed, aggregated), as the detector scores them."""
    sc = config.scoring
    smoothed = upsample_and_smooth(m, config.backbone.input_size, sc.smooth_sigma)
    return np.asarray(aggregate(smoothed, sc.aggregation, sc.topk).numpy())


@torch.no_grad()
def denoising_errors(scorer: DiffusionScorer, x: Tensor, timesteps: tuple[int, ...],
                     seed: int = 1) -> list[tuple[int, float, float]]:
    """``(t, Gaussian ε-MSE, Gaussian + network ε-MSE)`` on feature maps ``x`` (one type)."""
    den = scorer.denoiser_
    assert den is not None
    types = torch.zeros(len(x), dtype=torch.long)
    z = scorer._network_context(x, types)
    if scorer.context_ is not None:
        x = scorer.context_.remove(x, types)
    tokens = x.permute(0, 2, 3, 1).reshape(len(x), -1, x.shape[1])
    pos = torch.arange(tokens.shape[1]).expand(len(x), -1)
    prior = den.gather_prior(types, pos)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        tt = torch.full((len(x),), t)
        eps = torch.randn(tokens.shape, generator=gen)
        x_t = scorer.schedule.q_sample(tokens, tt, eps)
        eps_g = den.gaussian_eps(x_t, tt, prior)
        f = den.residual(x_t, tt, types, pos, context=z)
        rows.append((t, float((eps - eps_g).pow(2).mean()), float((eps - eps_g - f).pow(2).mean())))
    return rows


def measure(over: dict[str, Any], good: Tensor, bad: Tensor) -> dict[str, Any]:
    """Fit the variant on three quarters of ``good``; measure on the held-out quarter."""
    fit_i, held_i = split(len(good))
    mean, std = (m.view(1, -1, 1, 1) for m in channel_moments(good[fit_i]))
    fit, held_good, held_bad = ((v - mean) / std for v in (good[fit_i], good[held_i], bad[held_i]))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = with_overrides(DetectorConfig(), over)
    scorer = DiffusionScorer(config).fit(fit, torch.zeros(len(fit), dtype=torch.long), 1)
    fit_s = time.perf_counter() - t0
    gauss = gaussian_part(scorer)
    whole_g, whole_b = maps(scorer, held_good), maps(scorer, held_bad)
    gauss_g, gauss_b = maps(gauss, held_good), maps(gauss, held_bad)
    corr_g, corr_b = whole_g - gauss_g, whole_b - gauss_b
    labels = np.r_[np.zeros(len(held_good)), np.ones(len(held_bad))]

    def auroc(g: Tensor, b: Tensor) -> float:
        return image_auroc(labels, np.r_[image_scores(config, g), image_scores(config, b)])

    t_min = scorer.config.train.t_min
    return {
        "variant": over, "fit_s": fit_s,
        "sd_gaussian": float(torch.cat([gauss_g, gauss_b]).std()),
        "sd_correction": float(torch.cat([corr_g, corr_b]).std()),
        "correction_mean_good": float(corr_g.mean()), "correction_mean_defective": float(corr_b.mean()),
        "auroc_gaussian": auroc(gauss_g, gauss_b), "auroc_whole": auroc(whole_g, whole_b),
        "auroc_correction": auroc(corr_g, corr_b),
        "eps_mse": denoising_errors(scorer, held_good[:64], tuple(sorted({t_min, *TIMESTEPS}))),
    }


def report(r: dict[str, Any]) -> str:
    mse = "; ".join(f"t={t}: {g:.4f} -> {n:.4f} ({100 * (n / g - 1):+.1f} %)" for t, g, n in r["eps_mse"])
    return (f"{json.dumps(r['variant'])}  (fit {r['fit_s']:.0f} s)\n"
            f"  map sd: Gaussian part {r['sd_gaussian']:.3f}, network correction {r['sd_correction']:.3f}; "
            f"correction mean GOOD {r['correction_mean_good']:+.3f}, "
            f"defective {r['correction_mean_defective']:+.3f}\n"
            f"  image AUROC: Gaussian part {r['auroc_gaussian']:.4f}, "
            f"Gaussian + network {r['auroc_whole']:.4f}, "
            f"correction alone {r['auroc_correction']:.4f}\n"
            f"  held-out GOOD ε-MSE, Gaussian -> Gaussian + network: {mse}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("variants", nargs="*", help="JSON objects of config overrides (default: the "
                   "network trained 1,000 steps, without and with the image's context as input)")
    p.add_argument("--cache", type=Path, required=True, help="a feature cache of benchmarks/tune.py")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = torch.load(args.cache, weights_only=True)
    variants = [json.loads(v) for v in args.variants] or [
        {"train.steps": 1000}, {"train.steps": 1000, "diffusion.context": "image"}]
    rows = []
    for over in variants:
        rows.append(measure(over, data["good"], data["bad"]))
        print(report(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
