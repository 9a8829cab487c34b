"""Ways to turn the Gaussian's per-location scores into an anomaly map, judged without the test
splits (issue 14, pixel AUROC): the cross-validation of ``benchmarks/tune.py`` (each dataset's
TRAINING GOOD images, ``--folds`` folds per type, one synthetic defect per held-out image, its
mask the pixel-level truth), image and pixel AUROC per variant.

    python benchmarks/map_variants.py --datasets mvtec_bottle,magnetic_tile [--jitter] \
        --feature-cache CACHE

Variants, all from one fitted default model per fold (``train.steps=0``):
- ``sigma=S``: the map as shipped, smoothed with σ = S input pixels (the default is 4);
- ``sqrt``, ``log``: a monotone transform of each location's score before upsampling (they
  change how the smoothing mixes a peak into its neighbours);
- ``offset``, ``zscore``: each location's score minus the mean (and divided by the standard
  deviation) of that location's scores on the fold's GOOD calibration images, which the model
  holds out of its fit;
- ``min_cross``, ``min_3x3``: each location scored by the best-fitting Gaussian among its own and
  its 4 or 8 neighbours' (a shift-tolerant score: the best component of a mixture over nearby
  positions; the log-determinants left out, as in the shipped map);
- ``fused@R``: ``scoring.heat_map=fused`` at ``scoring.memory_ratio=R`` (``--memory-ratios``;
  :mod:`diffqc.heatmap`): the map plus the distance to the nearest GOOD patch of a per-type
  coreset, both scaled by their GOOD calibration image scores (its image score is the
  likelihood's own, so only its pixel AUROC can differ from ``sigma=4``).
- ``null_ratio@L`` (``--null-ratios``; sets of several types only): the type-vs-null likelihood
  ratio, the map minus L × the map of the *null* model — the same configuration fitted on the
  GOOD images of every type pooled as one type (:func:`null_maps`; the Gaussian path's
  counterpart of the denoiser's learned null type). On a set of one type the null model is the
  type's own, so the ratio is (1 − L) × the map: nothing to measure there.

``--set KEY=VALUE`` changes the configuration of every variant (e.g. ``calibration.folds=2``,
which fits fewer calibration models and changes no AUROC).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import dataset_samples
from tune import features, fold_ids, mean_type_auroc, print_variants

from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import GOOD, Sample
from diffqc.metrics import pixel_auroc
from diffqc.model import Detector, split_calibration
from diffqc.scoring import aggregate, upsample_and_smooth

CROSS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
SQUARE = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., p] = x[..., p - (dy, dx)]`` on the last two axes, the border replicated."""
    h, w = x.shape[-2:]
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return pad[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def neighbour_maps(det: Detector, feats: Tensor, types: Tensor) -> dict[tuple[int, int], Tensor]:
    """For each offset o of the 3 × 3 square, the map ``s(x[p] | Gaussian[p + o])`` ``[N, h, w]``."""
    assert det.scorer_ is not None
    out = {}
    for dy, dx in SQUARE:
        m = det.scorer_.score_maps(shifted(feats, dy, dx), types)  # s(x[l - o] | G[l])
        out[(dy, dx)] = shifted(m[:, None], -dy, -dx)[:, 0]  # at p = l - o
    return out


def null_maps(config: DetectorConfig, fit_raw: Tensor, fit_samples: Sequence[Sample], raw: Tensor) -> Tensor:
    """Maps ``[N, h, w]`` of the raw features ``raw`` under the *null* model: ``config`` fitted on
    ``fit_raw``, the GOOD images ``fit_samples`` of every type pooled as one type."""
    pooled = [replace(s, feature_type="null") for s in fit_samples]
    null = Detector(config, device="cpu").fit_features(fit_raw, pooled)
    assert null.scorer_ is not None
    with torch.inference_mode():
        zeros = torch.zeros(len(raw), dtype=torch.long)
        return null.scorer_.score_maps(null.extractor.standardise(raw), zeros)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--datasets", default="mvtec_bottle,magnetic_tile")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--jitter", type=int, nargs="?", const=0, default=None, metavar="SEED")
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-cache", type=Path, default=None)
    p.add_argument("--memory-ratios", default="0.01,0.1", help="scoring.memory_ratio of the fused variants")
    p.add_argument("--null-ratios", default="", help="L of the null_ratio@L variants, e.g. 0.25,0.5,1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-quality")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = with_overrides(DetectorConfig(), {"train.steps": 0, **parse_overrides(args.set)})
    fused_configs = {
        f"fused@{r}": with_overrides(config, {"scoring.heat_map": "fused", "scoring.memory_ratio": float(r)})
        for r in args.memory_ratios.split(",") if r}
    ratios = [float(r) for r in args.null_ratios.split(",") if r]
    for ds in args.datasets.split(","):
        samples = [s for s in dataset_samples(ds, args.work) or [] if s.split == "train" and s.label == GOOD]
        if not samples:
            continue
        good, bad, masks = features(Detector(config, device="cpu"), samples, args.jitter,
                                    args.feature_cache, args.strength)
        size = int(masks.shape[-1])
        folds = fold_ids(samples, args.folds)
        classes = sorted({s.feature_type for s in samples})
        results: dict[str, list[tuple[float, float]]] = {}
        for f in range(args.folds):
            train, held = np.nonzero(folds != f)[0], np.nonzero(folds == f)[0]
            fit_samples = [samples[int(i)] for i in train]
            det = Detector(config, device="cpu").fit_features(good[train], fit_samples)
            _, cal = split_calibration(fit_samples, config.calibration.fraction, config.train.seed)
            kind = torch.tensor([classes.index(samples[int(i)].feature_type) for i in held])
            kind_cal = torch.tensor([classes.index(fit_samples[i].feature_type) for i in cal])
            with torch.inference_mode():
                assert det.scorer_ is not None
                cal_maps = det.scorer_.score_maps(det.extractor.standardise(good[train][cal]), kind_cal)
                types = torch.cat([kind, kind])
                near = neighbour_maps(det, det.extractor.standardise(torch.cat([good[held], bad[held]])),
                                      types)
            centre = near[(0, 0)]
            # per type and location, from the GOOD calibration maps of that type
            mu = torch.stack([cal_maps[kind_cal == k].mean(0) for k in range(len(classes))])[types]
            sd = torch.stack([cal_maps[kind_cal == k].std(0) for k in range(len(classes))])[types]
            variants: dict[str, tuple[Tensor, float]] = {
                **{f"sigma={s:g}": (centre, s) for s in (2.0, 4.0, 8.0)},
                "sqrt": (centre.clamp_min(0).sqrt(), 4.0),
                "log": (centre.clamp_min(1e-6).log(), 4.0),
                "offset": (centre - mu, 4.0),
                "zscore": ((centre - mu) / sd.clamp_min(1e-6), 4.0),
                "min_cross": (torch.stack([near[o] for o in CROSS]).min(0).values, 4.0),
                "min_3x3": (torch.stack([near[o] for o in SQUARE]).min(0).values, 4.0),
            }
            if ratios and len(classes) > 1:
                null = null_maps(config, good[train], fit_samples, torch.cat([good[held], bad[held]]))
                variants.update({f"null_ratio@{r:g}": (centre - r * null, 4.0) for r in ratios})
            truth = np.concatenate([np.zeros((len(held), size, size), dtype=bool), masks[held].numpy()])
            labels = np.r_[np.zeros(len(held)), np.ones(len(held))]
            for name, (m, sigma) in variants.items():
                maps = upsample_and_smooth(m, size, sigma)
                scores = aggregate(maps, "topk", config.scoring.topk).numpy()
                results.setdefault(name, []).append(
                    (mean_type_auroc(labels, scores, types.numpy()), pixel_auroc(truth, maps.numpy())))
            for name, cfg in fused_configs.items():
                fused = Detector(cfg, device="cpu").fit_features(good[train], fit_samples)
                with torch.inference_mode():
                    fused_maps, fused_scores = fused.maps_and_scores(
                        fused.extractor.standardise(torch.cat([good[held], bad[held]])), types)
                results.setdefault(name, []).append(
                    (mean_type_auroc(labels, fused_scores.numpy(), types.numpy()),
                     pixel_auroc(truth, F.interpolate(fused_maps[:, None], size=(size, size))[:, 0].numpy())))
        label = ds + ("+jitter" if args.jitter is not None else "")
        print_variants(f"\n{label}: {len(samples)} GOOD training images, {args.folds} folds "
                       "(image AUROC, pixel AUROC: mean ± sd over folds)", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
