"""Does a per-location Gaussian gain from knowing the whole image? Issue 14, item 2 ("normal
variation with several modes", "context"), judged without the test splits: the cross-validation
of ``benchmarks/tune.py`` (each dataset's TRAINING GOOD images, ``--folds`` folds per type, one
synthetic defect per held-out image), image and pixel AUROC per variant.

    python benchmarks/context_study.py --datasets magnetic_tile,elpv,synthetic,mvtec_bottle \
        --context 16,64 --modes 4,8 --feature-cache CACHE

Each variant changes the features only, then fits and scores the per-type, per-location
Gaussians without their own context (``train.steps=0, diffusion.prior_context=0,
diffusion.prior_rank=64``: the default detector of session 12, when this study ran) on what is left:

- ``none``: the features as they are (the session-12 default detector);
- ``linear@K``: :mod:`diffqc.context` (``diffusion.prior_context``) with ``K`` components for
  every type, without the option's cap of one component per 8 fit images: the *context* of an
  image is its global descriptor (each channel's mean over all locations), whitened by the type's
  first ``K`` principal components on the fold's GOOD fit images; each location's features are
  regressed on it and the fitted context part is subtracted, so the Gaussians model
  p(x_l | context, type), a conditional Gaussian whose mean moves with the image. ``--set
  diffusion.prior_context=K`` with ``benchmarks/tune.py`` measures the setting itself (capped; the
  default since session 13 at K = 64, rank 56);
- ``modes@M``: the same descriptor (16 components) clustered into ``M`` modes by k-means per type;
  each location's mean per mode (shrunk toward the type's mean with weight n / (n + 50)) is
  subtracted: a mixture whose components differ in their means only, the mode picked by the
  image's descriptor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import dataset_samples
from tune import features, fold_ids, mean_type_auroc, print_variants

from diffqc.config import DetectorConfig, with_overrides
from diffqc.context import ImageContext, descriptor, whitening
from diffqc.data import GOOD
from diffqc.metrics import pixel_auroc
from diffqc.model import Detector


def fit_linear(raw: Tensor, k: int) -> Callable[[Tensor], Tensor]:
    """``linear@K``: :class:`diffqc.context.ImageContext` of one type on its fit images ``raw``,
    ``k`` components whatever the number of images (no n / 8 cap), computed in float32."""
    one = torch.zeros(raw.shape[0], dtype=torch.long)
    ctx = ImageContext.fit(raw, one, 1, k, torch.float32, per_component=0)
    return lambda x: ctx.remove(x, torch.zeros(x.shape[0], dtype=torch.long))


def fit_modes(raw: Tensor, m: int, k: int = 16, iters: int = 50, prior: float = 50.0,
              seed: int = 0) -> Callable[[Tensor], Tensor]:
    """``modes@M``: k-means of the fit images' whitened descriptors (``k`` components) into ``m``
    modes; per mode, each location's mean offset from the type's mean, shrunk by n / (n + ``prior``).
    Returns what subtracts an image's mode offset (its mode: the nearest centre)."""
    g = descriptor(raw)
    centre, basis = whitening(g, k)
    z = (g - centre) @ basis
    gen = torch.Generator().manual_seed(seed)
    modes = z[torch.randperm(len(z), generator=gen)[:m]].clone()
    for _ in range(iters):
        label = torch.cdist(z, modes).argmin(dim=1)
        modes = torch.stack([z[label == j].mean(0) if (label == j).any() else modes[j]
                             for j in range(len(modes))])
    label = torch.cdist(z, modes).argmin(dim=1)
    flat = raw.flatten(1)
    mean = flat.mean(dim=0)
    offsets = []
    for j in range(len(modes)):
        n = int((label == j).sum())
        off = flat[label == j].mean(0) - mean if n else torch.zeros_like(mean)
        offsets.append(off * n / (n + prior))
    table = torch.stack(offsets)

    def remove(x: Tensor) -> Tensor:
        mode = torch.cdist((descriptor(x) - centre) @ basis, modes).argmin(dim=1)
        return x - table[mode].view_as(x)

    return remove


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--datasets", default="magnetic_tile,elpv,synthetic,mvtec_bottle")
    p.add_argument("--context", default="16,64", help="K of the linear@K variants")
    p.add_argument("--modes", default="4,8", help="M of the modes@M variants")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-cache", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-quality")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = with_overrides(DetectorConfig(), {"train.steps": 0, "diffusion.prior_context": 0,
                                               "diffusion.prior_rank": 64})
    fits = {"none": None,
            **{f"linear@{k}": (fit_linear, int(k)) for k in args.context.split(",") if k},
            **{f"modes@{m}": (fit_modes, int(m)) for m in args.modes.split(",") if m}}
    for ds in args.datasets.split(","):
        samples = [s for s in dataset_samples(ds, args.work) or [] if s.split == "train" and s.label == GOOD]
        if not samples:
            continue
        good, bad, masks = features(Detector(config, device="cpu"), samples, None, args.feature_cache,
                                    args.strength)
        size = int(masks.shape[-1])
        folds = fold_ids(samples, args.folds)
        kinds = np.asarray([s.feature_type for s in samples])
        results: dict[str, list[tuple[float, float]]] = {}
        for f in range(args.folds):
            train, held = np.nonzero(folds != f)[0], np.nonzero(folds == f)[0]
            truth = np.concatenate([np.zeros((len(held), size, size), dtype=bool), masks[held].numpy()])
            labels = np.r_[np.zeros(len(held)), np.ones(len(held))]
            types = np.r_[kinds[held], kinds[held]]
            for name, how in fits.items():
                fit_raw, test_raw = good[train].clone(), torch.cat([good[held], bad[held]])
                if how is not None:
                    for t in np.unique(kinds):
                        tr, te = kinds[train] == t, types == t
                        remove = how[0](good[train][tr], how[1])
                        fit_raw[tr], test_raw[te] = remove(good[train][tr]), remove(test_raw[te])
                det = Detector(config, device="cpu").fit_features(fit_raw, [samples[int(i)] for i in train])
                idx = torch.tensor([det.type_index(t) for t in types])
                with torch.inference_mode():
                    maps, scores = det.maps_and_scores(det.extractor.standardise(test_raw), idx)
                results.setdefault(name, []).append(
                    (mean_type_auroc(labels, scores.numpy(), types), pixel_auroc(truth, maps.numpy())))
                print(f"  {ds} fold {f} {name:<12} image {results[name][-1][0]:.4f} "
                      f"pixel {results[name][-1][1]:.4f}", flush=True)
        print_variants(f"\n{ds}: {len(samples)} GOOD training images, {args.folds} folds "
                       "(image AUROC, pixel AUROC: mean ± sd over folds; image AUROC per fold)",
                       results, folds=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
