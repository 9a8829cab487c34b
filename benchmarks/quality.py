"""Quality benchmark (issue 3): dataset x feature type x method -> image AUROC, pixel AUROC,
TPR at 5% FPR, train time and per-image scoring time, on the same backbone features and splits.
Scoring time (``score_ms``): the test images are scored in batches of 32 after an untimed warm-up
call, each image's time is its batch's time over its size, and the median over the images is kept.

    python benchmarks/quality.py                         # every dataset that is available
    python benchmarks/quality.py --datasets synthetic,magnetic_tile --json out.json
    python benchmarks/quality.py --datasets /path/to/mvtec_category_root
    python benchmarks/quality.py --jitter                 # parts shifted (≤ 12 %) and rotated (≤ 15°)

Datasets: ``synthetic`` (embedded inkjet set, 8 types), ``elpv`` (PyPI ``elpv-dataset``:
types mono/poly; GOOD = defect probability 0, defective = probability 1, and also >= 0.67),
``mvtec_bottle`` and ``magnetic_tile`` from ``../shared/datasets`` (skipped with a message where
absent), or any MVTec-layout folder given as a path. Settings: ``multi`` (one model for all the
types of a dataset) and ``per-type`` (one model per type). Backbone features are extracted once
per dataset and shared by every method and setting, so the comparison isolates the scorer.
"""

from __future__ import annotations

import argparse
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

from diffqc.backbone import to_pixels
from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import GOOD, Sample, load_dataset, read_image, read_mask
from diffqc.inspection import Inspection
from diffqc.metrics import image_auroc, pixel_auroc, tpr_at_fpr
from diffqc.model import Detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MASK_SIDE = 128


# the defect probability from which an ELPV cell counts as defective (the labels hold 0.666…)
ELPV_DEFECTIVE = 2 / 3 - 1e-6


def elpv_labels() -> list[tuple[Path, float, str]]:
    """Every ELPV image of PyPI ``elpv-dataset``: (path, defect probability, type mono/poly)."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("elpv: pip install elpv-dataset==1.0.0.post1") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    rows = [line.split() for line in labels.read_text().splitlines() if line.strip()]
    return [(labels.parent / r[0], float(r[1]), r[2]) for r in rows]


def elpv_samples(cache: Path, train_per_type: int = 200, test_good_per_type: int = 151,
                 seed: int = 0) -> list[Sample]:
    """ELPV as samples with a fixed split: per type, GOOD (p = 0) shuffled with ``seed``; the
    first ``train_per_type`` train, the next ``test_good_per_type`` test; all p >= 0.67 test.
    ``defect`` holds the probability so that p = 1 and p >= 0.67 can be reported apart."""
    rows = elpv_labels()
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for t in ("mono", "poly"):
        good = sorted(path for path, p, kind in rows if kind == t and p == 0.0)
        order = rng.permutation(len(good))
        for rank, i in enumerate(order[: train_per_type + test_good_per_type]):
            split = "train" if rank < train_per_type else "test"
            samples.append(Sample(good[i], t, GOOD, split=split, defect="good"))
        for path, p, kind in rows:
            if kind == t and p >= ELPV_DEFECTIVE:
                samples.append(Sample(path, t, 1, split="test", defect=f"p={p:.2f}"))
    return samples


def dataset_samples(name: str, work: Path) -> list[Sample] | None:
    if name == "synthetic":
        from diffqc.synth import write_synthetic_dataset

        root = work / "synthetic"
        if not (root / "manifest.csv").is_file():
            write_synthetic_dataset(root, overwrite=True, progress=False)
        return load_dataset(root)
    if name == "elpv":
        return elpv_samples(work)
    if name in ("mvtec_bottle", "magnetic_tile"):
        root = SHARED / name
        if not root.is_dir():
            print(f"[skip] {name}: {root} not found", file=sys.stderr)
            return None
        samples = load_dataset(root)
        if len({s.feature_type for s in samples}) == 1:
            samples = [replace(s, feature_type=name) for s in samples]
        return samples
    path = Path(name)
    if path.exists():
        return load_dataset(path)
    print(f"[skip] {name}: unknown dataset", file=sys.stderr)
    return None


JITTER_SHIFT = 0.12  # of the image side, at most, in x and y
JITTER_DEGREES = 15.0  # rotation, at most


def jitter_transform(index: int, seed: int) -> torch.Tensor:
    """The 2x3 affine (normalised coordinates, as ``affine_grid`` takes it) of sample ``index``:
    a shift of up to 12 % of the side in x and y and a rotation of up to 15°, drawn from a
    generator seeded by (seed, index), so every method and run sees the same jitter."""
    rng = np.random.default_rng([seed, index])
    dx, dy = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, size=2) * 2  # normalised: the side is 2
    a = np.deg2rad(rng.uniform(-JITTER_DEGREES, JITTER_DEGREES))
    return torch.tensor([[np.cos(a), -np.sin(a), dx], [np.sin(a), np.cos(a), dy]], dtype=torch.float32)


def apply_jitter(image: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """``image [C, S, S]`` moved by ``theta``; the border pixels fill what comes into view (a
    part shifted on a plain conveyor), nearest-neighbour for masks."""
    grid = torch.nn.functional.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    return torch.nn.functional.grid_sample(image[None], grid, mode=mode, padding_mode="border",
                                           align_corners=False)[0]


def extract(det: Detector, samples: Sequence[Sample], jitter: int | None = None,
            ) -> tuple[torch.Tensor, np.ndarray | None]:
    """Raw features of every sample and its masks at MASK_SIDE; with ``jitter`` (a seed) each
    image (train and test alike) and its mask is first resized to the backbone's square input
    and moved by :func:`jitter_transform`."""
    feats, masks = [], []
    any_mask = any(s.mask_path is not None for s in samples)
    size = det.config.backbone.input_size
    for i in range(0, len(samples), 32):
        chunk = samples[i : i + 32]
        images = [read_image(s.path) for s in chunk]
        chunk_masks = ([read_mask(s.mask_path, (MASK_SIDE, MASK_SIDE)) for s in chunk]
                       if any_mask else [])
        if jitter is not None:
            pixels = to_pixels(images, size)
            thetas = [jitter_transform(i + j, jitter) for j in range(len(chunk))]
            images = [apply_jitter(p, th, "bilinear").permute(1, 2, 0).numpy()
                      for p, th in zip(pixels, thetas, strict=True)]
            chunk_masks = [apply_jitter(torch.from_numpy(m.astype(np.float32))[None], th, "nearest")[0]
                           .numpy() > 0.5 for m, th in zip(chunk_masks, thetas, strict=False)]
        feats.append(det.extract(images, raw=True))
        masks += chunk_masks
    return torch.cat(feats), (np.stack(masks) if any_mask else None)


def evaluate_setting(
    config: DetectorConfig, raw: torch.Tensor, samples: Sequence[Sample], masks: np.ndarray | None,
    groups: list[list[int]],
) -> list[dict[str, Any]]:
    """Fit one detector per index group (the types it covers), score its test samples."""
    rows = []
    for group in groups:
        train_idx = [i for i in group if samples[i].split == "train" and samples[i].label == GOOD]
        test_idx = [i for i in group if samples[i].split == "test"]
        torch.manual_seed(0)
        det = Detector(config, device="cpu")
        t0 = time.perf_counter()
        det.fit_features(raw[train_idx], [samples[i] for i in train_idx])
        train_s = time.perf_counter() - t0
        types = [samples[i].feature_type for i in test_idx]
        want_maps = masks is not None
        batches = [test_idx[j : j + 32] for j in range(0, len(test_idx), 32)]
        results: list[Inspection] = []
        per_image_ms: list[float] = []
        for k, part in enumerate(batches[:1] + batches):  # the first batch twice: a warm-up, untimed
            t1 = time.perf_counter()
            batch = det.inspect_features(raw[part], [samples[i].feature_type for i in part],
                                         [(MASK_SIDE, MASK_SIDE)] * len(part) if want_maps else None,
                                         all_types=False)
            seconds = time.perf_counter() - t1
            if k > 0:
                per_image_ms += [1000 * seconds / len(part)] * len(part)
                results += batch
        # the median over the test images of their batch's time per image
        score_ms = float(np.median(per_image_ms)) if per_image_ms else 0.0
        for t in sorted(set(types)):
            idx = [k for k, ti in enumerate(types) if ti == t]
            labels = np.array([samples[test_idx[k]].label for k in idx])
            scores = np.array([results[k].score for k in idx])
            row: dict[str, Any] = {
                "feature_type": t, "image_auroc": image_auroc(labels, scores),
                "tpr_at_5fpr": tpr_at_fpr(labels, scores, 0.05), "pixel_auroc": None,
                "train_s": train_s, "score_ms": score_ms, "n_test": len(idx),
                "n_defective": int(labels.sum()),
            }
            if masks is not None:
                maps = np.stack([results[k].anomaly_map for k in idx])  # type: ignore[misc]
                row["pixel_auroc"] = pixel_auroc(masks[[test_idx[k] for k in idx]], maps)
            defects = [samples[test_idx[k]].defect or "" for k in idx]
            if any(d.startswith("p=") for d in defects):  # ELPV: p = 1 only, beside p >= 0.67
                keep = [k for k, d in enumerate(defects) if d in ("good", "p=1.00")]
                row["image_auroc_p1"] = image_auroc(labels[keep], scores[keep])
            rows.append(row)
    return rows


def cached_extract(det: Detector, samples: Sequence[Sample], jitter: int | None, cache: Path | None,
                   ) -> tuple[torch.Tensor, np.ndarray | None]:
    """:func:`extract`, kept in ``cache`` under a key of the backbone settings, the jitter seed
    and the sample list, so that a re-run with other scorers does not run the backbone again."""
    if cache is None:
        return extract(det, samples, jitter)
    import hashlib

    key = json.dumps([asdict(det.config.backbone), jitter, [str(s.path) for s in samples]])
    from safetensors.torch import load_file, save_file

    path = cache / f"features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():  # safetensors, never pickle
        data = load_file(str(path))
        return data["raw"], (data["masks"].numpy() if "masks" in data else None)
    raw, masks = extract(det, samples, jitter)
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {"raw": raw.contiguous()}
    if masks is not None:
        tensors["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return raw, masks


BASELINES = ("patchcore", "padim")


def run(datasets: Sequence[str], methods: Sequence[str], settings: Sequence[str],
        overrides: dict[str, Any], work: Path,
        variants: dict[str, dict[str, Any]] | None = None,
        jitter: int | None = None, cache: Path | None = None) -> list[dict[str, Any]]:
    """``variants``: extra rows named by their key, the diffusion config with those overrides
    (a ``method`` override picks another method). ``jitter``: a seed; every image is shifted and
    rotated (:func:`jitter_transform`) before the backbone, and datasets are named ``NAME+jitter``."""
    table: list[dict[str, Any]] = []
    base = with_overrides(DetectorConfig(), overrides)
    configs = {m: replace(base, method=m) for m in methods}
    for label, over in (variants or {}).items():
        configs[label] = with_overrides(replace(base, method="diffusion"), over)
    for name in datasets:
        samples = dataset_samples(name, work)
        if not samples:
            continue
        samples = [s for s in samples if s.split in ("train", "test") and s.label in (0, 1)]
        t0 = time.perf_counter()
        raw, masks = cached_extract(Detector(base, device="cpu"), samples, jitter, cache)
        print(f"# {name}: {len(samples)} images, features {tuple(raw.shape[1:])} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        types = sorted({s.feature_type for s in samples})
        for setting in settings:
            if setting == "multi":
                groups = [list(range(len(samples)))]
            elif len(types) == 1:
                print(f"# {name}: one feature type, so per-type = multi (not run twice)", flush=True)
                continue
            else:
                groups = [[i for i, s in enumerate(samples) if s.feature_type == t] for t in types]
            for method, config in configs.items():
                for row in evaluate_setting(config, raw, samples, masks, groups):
                    row.update(dataset=Path(name).name + ("+jitter" if jitter is not None else ""),
                               method=method, setting=setting)
                    table.append(row)
                    print(format_row(row), flush=True)
    return table


def format_row(r: dict[str, Any]) -> str:
    pix = "   -  " if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}"
    return (f"{r['dataset']:<14}{r['feature_type']:<15}{r['method']:<10} {r['setting']:<9}"
            f"{r['image_auroc']:>7.3f} {pix:>7}{r['tpr_at_5fpr']:>7.3f}{r['train_s']:>8.1f}"
            f"{r['score_ms']:>8.1f}"
            + (f"   (p = 1 only: {r['image_auroc_p1']:.3f})" if "image_auroc_p1" in r else ""))


def summarise(table: list[dict[str, Any]]) -> str:
    lines = ["", "mean image AUROC per dataset x method x setting "
                 "(and the worst per-type gap to the best baseline)"]
    keys = sorted({(r["dataset"], r["setting"]) for r in table})
    for ds, setting in keys:
        rows = [r for r in table if r["dataset"] == ds and r["setting"] == setting]
        by_method: dict[str, dict[str, float]] = {}
        for r in rows:
            by_method.setdefault(r["method"], {})[r["feature_type"]] = r["image_auroc"]
        means = {m: float(np.nanmean(list(v.values()))) for m, v in by_method.items()}
        parts = [f"{m}={means[m]:.3f}" for m in sorted(means)]
        baselines = [m for m in by_method if m in BASELINES]
        for m in sorted(by_method):
            if m in BASELINES or not baselines:
                continue
            gaps = []
            for t, v in by_method[m].items():
                best = max((by_method[b].get(t, float("nan")) for b in baselines), default=float("nan"))
                gaps.append(v - best)
            if gaps and not np.isnan(gaps).all():
                parts.append(f"worst {m}-minus-best-baseline per type={np.nanmin(gaps):+.3f}")
        lines.append(f"{ds:<14}{setting:<9} " + "  ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--datasets", default="synthetic,elpv,mvtec_bottle,magnetic_tile")
    p.add_argument("--methods", default="diffusion,patchcore,padim")
    p.add_argument("--settings", default="multi,per-type")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra diffusion variant, e.g. trained:train.steps=1000 (repeatable)")
    p.add_argument("--json", default=None)
    p.add_argument("--work", default=None, help="cache folder for generated data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feature-cache", type=Path, default=None,
                   help="keep raw backbone features here between runs")
    p.add_argument("--jitter", type=int, nargs="?", const=0, default=None, metavar="SEED",
                   help="shift every image (train and test) by up to 12 %% and rotate it by up to "
                        "15° (seeded, default seed 0) before the backbone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "diffqc-quality"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"{'dataset':<14}{'type':<15}{'method':<10} {'setting':<9}{'AUROC':>7} {'pixAUC':>7}"
          f"{'TPR@5':>7}{'train_s':>8}{'ms/img':>8}")
    from diffqc.evaluate import parse_setting

    variants = dict(parse_setting(v) for v in args.variant)
    table = run(args.datasets.split(","), [m for m in args.methods.split(",") if m], args.settings.split(","),
                parse_overrides(args.set), work, variants, args.jitter, args.feature_cache)
    print(summarise(table))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        keys = ("dataset", "feature_type", "method", "setting", "image_auroc", "pixel_auroc",
                "tpr_at_5fpr", "score_ms")
        rows = [{k: r[k] for k in keys} | {"train_s": r["train_s"]}
                | ({"image_auroc_p1": r["image_auroc_p1"]} if "image_auroc_p1" in r else {})
                for r in table]
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
