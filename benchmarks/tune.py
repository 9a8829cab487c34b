"""Hyper-parameter selection without the test splits (issue 14, hygiene): k-fold cross-validation
on each dataset's TRAINING GOOD images only, with synthetic anomalies.

    python benchmarks/tune.py --datasets magnetic_tile,synthetic,elpv \
        --variant gauss:train.steps=0 --variant full152:train.steps=0,diffusion.prior_dims=152 \
        --methods padim --feature-cache /tmp/select-feats --json out.json

Per dataset, the GOOD images of the ``train`` split are dealt into ``--folds`` folds (per type,
seed 0). For every fold a model is fitted on the other folds and scores the fold's GOOD images
and, for each of them, one synthetic defective copy made from it (:func:`synthetic_anomaly`:
cut-paste of a patch of another GOOD image of the same type, a scratch, a noise patch or a
brightness spot; 2–6 % of the image, seeded by the image index). The figures of merit are the
image AUROC per type, averaged over types and folds, and the pixel AUROC of the anomaly maps
against the synthetic defects' masks (all held-out maps of a fold pooled, then averaged over
folds), which chooses the map's settings. No image of a ``test`` split is read, so a choice made
on this table leaves the test splits for the one final report.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import apply_jitter, dataset_samples, jitter_transform

from diffqc.backbone import to_pixels
from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import GOOD, Sample, read_image
from diffqc.evaluate import parse_setting
from diffqc.metrics import image_auroc, pixel_auroc
from diffqc.model import Detector

KINDS = ("cutpaste", "scratch", "noise", "spot")


def _ellipse(s: int, rng: np.random.Generator, area: float) -> np.ndarray:
    """A random ellipse mask ``[s, s]`` covering about ``area`` of the image, fully inside it."""
    aspect = rng.uniform(0.4, 2.5)
    ry = s * np.sqrt(area * aspect / np.pi)
    rx = s * np.sqrt(area / aspect / np.pi)
    cy, cx = rng.uniform(ry + 1, s - ry - 1), rng.uniform(rx + 1, s - rx - 1)
    yy, xx = np.mgrid[0:s, 0:s]
    a = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    return np.asarray((u / rx) ** 2 + (v / ry) ** 2 <= 1.0)


def synthetic_anomaly(image: np.ndarray, donor: np.ndarray, index: int, seed: int = 0,
                      strength: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A defective copy of ``image [S, S, 3]`` (float in [0, 1]) and the defect's region
    ``[S, S]`` (bool, the pixel-level ground truth): kind ``KINDS[index % 4]``, the
    rest drawn from a generator seeded by (seed, index). ``donor`` is another GOOD image of the
    same type and size (the source of a cut-paste patch). ``strength`` in (0, 1] scales the
    defect's area and contrast: 1 gives large obvious defects (2–6 % of the image), 0.5 (the
    default) small and faint ones, so that the scores do not saturate at AUROC 1."""
    rng = np.random.default_rng([seed, index])
    s = image.shape[0]
    out = image.copy()
    kind = KINDS[index % len(KINDS)]
    area = rng.uniform(0.02, 0.06) * strength**2
    if kind == "scratch":
        y0, x0 = rng.uniform(0.15 * s, 0.85 * s, size=2)
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5) * s * strength
        width = max(1.0, rng.uniform(0.01, 0.025) * s * strength)
        yy, xx = np.mgrid[0:s, 0:s]
        ux, uy = np.cos(ang), np.sin(ang)
        along = (xx - x0) * ux + (yy - y0) * uy
        across = -(xx - x0) * uy + (yy - y0) * ux
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width)
        level = 1.0 - image[mask].mean(axis=0) if mask.any() else np.ones(3)
        mixed = (1 - strength) * image[mask] + strength * level
        out[mask] = np.clip(mixed + rng.normal(0, 0.05, size=(int(mask.sum()), 3)), 0, 1)
        return out, mask
    mask = _ellipse(s, rng, area)
    if kind == "cutpaste":
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        sy, sx = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        patch = donor[sy : sy + h, sx : sx + w]
        patch = np.rot90(patch, k=int(rng.integers(1, 4))) if h == w else patch[::-1, ::-1]
        region = out[ys.min() : ys.min() + h, xs.min() : xs.min() + w]
        m = mask[ys.min() : ys.min() + h, xs.min() : xs.min() + w]
        region[m] = (1 - strength) * region[m] + strength * patch[: region.shape[0], : region.shape[1]][m]
    elif kind == "noise":
        noise = rng.normal(image[mask].mean(axis=0), 0.2 * strength, size=(int(mask.sum()), 3))
        out[mask] = np.clip(noise, 0, 1)
    else:  # spot: a local brightness / colour change (ink blot, stain, glare)
        shift = (rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4) + rng.normal(0, 0.05, size=3)) * strength
        out[mask] = np.clip(out[mask] + shift, 0, 1)
    return out, mask


def fold_ids(samples: Sequence[Sample], k: int, seed: int = 0) -> np.ndarray:
    """Fold of every sample: per type, a seeded permutation dealt round-robin into ``k`` folds."""
    ids = np.zeros(len(samples), dtype=int)
    rng = np.random.default_rng(seed)
    for t in sorted({s.feature_type for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.feature_type == t]
        for rank, i in enumerate(rng.permutation(idx)):
            ids[i] = rank % k
    return ids


def features(det: Detector, samples: Sequence[Sample], jitter: int | None,
             cache: Path | None, strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw features of every GOOD training image and of its synthetic defective copy (the donor
    of a cut-paste is the next image of the same type), and the copies' defect masks ``[N, S, S]``
    (bool), cached under a key of the backbone, the jitter seed and the sample list."""
    key = json.dumps([asdict(det.config.backbone), jitter, [str(s.path) for s in samples], "select-v1",
                      strength])
    path = None if cache is None else cache / f"select-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path is not None and path.is_file():
        data = torch.load(path, weights_only=True)
        if "mask" in data:  # caches written before the masks were kept are re-extracted
            return data["good"], data["bad"], data["mask"]
    size = det.config.backbone.input_size
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.feature_type, []).append(i)
    donor = {}
    for idx in by_type.values():
        for j, i in enumerate(idx):
            donor[i] = idx[(j + 1) % len(idx)]

    @functools.lru_cache(maxsize=64)  # each image is read once: as itself and as the previous one's donor
    def pixels(i: int) -> np.ndarray:
        px = to_pixels([read_image(samples[i].path)], size)[0]
        if jitter is not None:
            px = apply_jitter(px, jitter_transform(i, jitter), "bilinear")
        return px.permute(1, 2, 0).numpy()

    good, bad, masks = [], [], []
    for start in range(0, len(samples), 32):
        chunk = range(start, min(start + 32, len(samples)))
        imgs = [pixels(i) for i in chunk]
        defects = [synthetic_anomaly(img, pixels(donor[i]), i, strength=strength)
                   for i, img in zip(chunk, imgs, strict=True)]
        good.append(det.extract(imgs, raw=True))
        bad.append(det.extract([d for d, _ in defects], raw=True))
        masks += [torch.from_numpy(m) for _, m in defects]
    g, b, m = torch.cat(good), torch.cat(bad), torch.stack(masks)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"good": g, "bad": b, "mask": m}, path)
    return g, b, m


def print_variants(title: str, results: dict[str, list[tuple[float, float]]], *, folds: bool = False) -> None:
    """Image and pixel AUROC of each variant (one ``(image, pixel)`` pair per fold): mean ± sd over
    the folds and, with ``folds``, each fold's image AUROC."""
    print(title)
    for name, rows in results.items():
        img, pix = np.asarray(rows).T
        per_fold = "   " + " ".join(f"{a:.3f}" for a in img) if folds else ""
        print(f"{name:<12} {img.mean():.4f} ± {img.std(ddof=1):.4f}   "
              f"{pix.mean():.4f} ± {pix.std(ddof=1):.4f}{per_fold}", flush=True)


def mean_type_auroc(labels: np.ndarray, scores: np.ndarray, types: np.ndarray) -> float:
    """Image AUROC per type, averaged over the types."""
    return float(np.mean([image_auroc(labels[types == t], scores[types == t]) for t in np.unique(types)]))


def cross_validate(config: DetectorConfig, samples: Sequence[Sample], good: torch.Tensor, bad: torch.Tensor,
                   masks: torch.Tensor, folds: np.ndarray) -> dict[str, Any]:
    """Mean image AUROC over types, per fold, of ``config`` on GOOD-vs-synthetic held-out images,
    and per fold the pixel AUROC of their maps against the defect masks (GOOD maps all negative)."""
    per_fold, pixel, fit_s = [], [], []
    size = int(masks.shape[-1])
    types = [s.feature_type for s in samples]
    for f in sorted(set(folds.tolist())):
        train = np.nonzero(folds != f)[0]
        held = np.nonzero(folds == f)[0]
        torch.manual_seed(0)
        det = Detector(config, device="cpu")
        t0 = time.perf_counter()
        det.fit_features(good[train], [samples[int(i)] for i in train])
        fit_s.append(time.perf_counter() - t0)
        raw = torch.cat([good[held], bad[held]])
        held_types = [types[i] for i in held] * 2
        truth = np.concatenate([np.zeros((len(held), size, size), dtype=bool), masks[held].numpy()])
        scores, maps = [], []
        for j in range(0, raw.shape[0], 32):
            batch_types = held_types[j : j + 32]
            res = det.inspect_features(raw[j : j + 32], batch_types, [(size, size)] * len(batch_types),
                                       all_types=False)
            scores += [r.score for r in res]
            maps += [np.asarray(r.anomaly_map) for r in res]
        pixel.append(pixel_auroc(truth, maps))
        labels = np.r_[np.zeros(len(held)), np.ones(len(held))]
        per_fold.append(mean_type_auroc(labels, np.asarray(scores), np.asarray(held_types)))
    return {"auroc_folds": per_fold, "auroc": float(np.mean(per_fold)),
            "auroc_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else 0.0,
            "pixel_folds": pixel, "pixel_auroc": float(np.mean(pixel)),
            "pixel_sd": float(np.std(pixel, ddof=1)) if len(pixel) > 1 else 0.0,
            "fit_s": float(np.median(fit_s))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--datasets", default="synthetic,magnetic_tile,elpv")
    p.add_argument("--methods", default="", help="baselines to run beside the variants, e.g. padim,patchcore")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--max-per-type", type=int, default=None,
                   help="at most this many GOOD training images per type (seeded), to save time")
    p.add_argument("--jitter", type=int, nargs="?", const=0, default=None, metavar="SEED")
    p.add_argument("--strength", type=float, default=0.5, help="synthetic defects' size and contrast, (0, 1]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-cache", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-quality")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    base = with_overrides(DetectorConfig(), parse_overrides(args.set))
    configs = {m: replace(base, method=m) for m in args.methods.split(",") if m}
    for name, over in (parse_setting(v) for v in args.variant):
        configs[name] = with_overrides(replace(base, method="diffusion"), over)
        if configs[name].backbone != base.backbone:  # the features are extracted once, with base's
            p.error(f"variant {name!r} changes the backbone; pass backbone settings with --set, one "
                    "run per backbone")
    rows: list[dict[str, Any]] = []
    for ds in args.datasets.split(","):
        samples = dataset_samples(ds, args.work)
        if not samples:
            continue
        samples = [s for s in samples if s.split == "train" and s.label == GOOD]
        if args.max_per_type:
            rng = np.random.default_rng(0)
            keep: list[Sample] = []
            for t in sorted({s.feature_type for s in samples}):
                of_t = [s for s in samples if s.feature_type == t]
                keep += [of_t[i] for i in sorted(rng.permutation(len(of_t))[: args.max_per_type])]
            samples = keep
        t0 = time.perf_counter()
        good, bad, masks = features(Detector(base, device="cpu"), samples, args.jitter, args.feature_cache,
                                    args.strength)
        name = ds + ("+jitter" if args.jitter is not None else "")
        print(f"# {name}: {len(samples)} GOOD training images (+ as many synthetic defects), "
              f"features in {time.perf_counter() - t0:.0f} s", flush=True)
        folds = fold_ids(samples, args.folds)
        for label, config in configs.items():
            r = cross_validate(config, samples, good, bad, masks, folds)
            r.update(dataset=name, variant=label)
            rows.append(r)
            print(f"{name:<22}{label:<28}image {r['auroc']:.4f} ± {r['auroc_sd']:.4f}  "
                  f"pixel {r['pixel_auroc']:.4f} ± {r['pixel_sd']:.4f}  "
                  f"folds {' '.join(f'{a:.3f}' for a in r['auroc_folds'])}  fit {r['fit_s']:.1f} s",
                  flush=True)
    print("\nmean over datasets (image, pixel AUROC)")
    for label in configs:
        vals = [(r["auroc"], r["pixel_auroc"]) for r in rows if r["variant"] == label]
        if vals:
            img, pix = np.mean(vals, axis=0)
            print(f"{label:<28}{img:.4f}  {pix:.4f}  ({len(vals)} datasets)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
