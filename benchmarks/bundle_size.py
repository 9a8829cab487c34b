"""Model bundle size and scoring speed per number of types, prior channels, rank and storage.

Sizes are real: each configuration is fitted with ``Detector.fit_features`` on random features of
the default backbone's shape (channels x 32 x 32: MobileNetV2 128, EfficientNet-Lite0 152 with
``--set backbone.name=efficientnet-lite0``; one training step, so that the network is not skipped when
timed) once per storage dtype (``diffusion.prior_storage``, which rounds the Gaussians when
fitted) and written with ``Detector.save``, and the bundle folder is measured on disk, then
deleted. Neither the bytes nor the time depend on the values, so by default the per-location
Gaussians keep their initial values (``fit_prior`` is skipped: an eigendecomposition per location
and type is most of a fit); ``--fit-prior`` fits them. Scoring is timed on the float16 fit.
Timing: ``Detector.maps_and_scores`` on standardised features (the scoring after the backbone:
Gaussian part, network correction, upsampling, smoothing, aggregation), batch 32 with mixed
types, median of ``--repeats`` runs, with the trained network and again with its output layer
zeroed (the untrained model, which skips the network). The machine's load is printed: timings
taken while other jobs run are indicative only.

``--parity`` instead measures what float16 and 8-bit storage (``int8``: the eigenbases and the
context's effect in 8 bits) change on the embedded synthetic set (one 8-type model,
``train.steps=0``, fitted once per storage on the same features): maps and image scores of the
test images from a float16 and an int8 bundle against a float32 one, and each type's image
AUROC from each.

    python benchmarks/bundle_size.py
    python benchmarks/bundle_size.py --types 8 --dims 152 --ranks 32
    python benchmarks/bundle_size.py --types 1,8 --dims 128 --ranks 64 --time-types 0 --onnx  # + model.onnx
    python benchmarks/bundle_size.py --parity --work /tmp/diffqc-quality --feature-cache /tmp/feats
    python benchmarks/bundle_size.py --parity --set diffusion.prior_dims=152 --set diffusion.prior_rank=32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from diffqc.config import DetectorConfig, parse_overrides, with_overrides
from diffqc.data import GOOD, Sample
from diffqc.diffusion import Denoiser
from diffqc.metrics import image_auroc
from diffqc.model import Detector

STORAGES = ("float32", "float16", "int8")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def random_detector(n_types: int, overrides: dict[str, Any], per_type: int, seed: int = 0,
                    fit_prior: bool = True) -> tuple[Detector, torch.Tensor]:
    """A detector fitted on random raw features (``per_type`` GOOD images per type); without
    ``fit_prior`` the Gaussians keep their initial values (same shapes, bytes and cost)."""
    gen = torch.Generator().manual_seed(seed)
    n = n_types * per_type
    quick = {"train.steps": 1, "train.batch_images": 2, "train.locations_per_image": 8}
    det = Detector(with_overrides(DetectorConfig(), quick | overrides), device="cpu")
    c, (h, w) = det.extractor.channels, det.extractor.grid
    raw = torch.randn(n, c, h, w, generator=gen) * torch.rand(c, 1, 1, generator=gen) * 3
    good = [Sample(Path(f"t{i % n_types}_{i}.png"), f"type{i % n_types}", GOOD, part_id=str(i),
                   split="train") for i in range(n)]
    with contextlib.ExitStack() as stack:
        if not fit_prior:
            stack.enter_context(mock.patch.object(Denoiser, "fit_prior", lambda *_a, **_k: None))
        det.fit_features(raw, good)
    return det, raw


def time_scoring(det: Detector, raw: torch.Tensor, n_types: int, batch: int, repeats: int) -> float:
    """Median ms per image of ``maps_and_scores`` on a batch of standardised features."""
    idx = torch.arange(batch) % len(raw)
    feats = det.extractor.standardise(raw[idx])
    types = idx % n_types  # the fitted images' types (image i is of type i mod n_types)
    with torch.inference_mode():
        det.maps_and_scores(feats, types)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            det.maps_and_scores(feats, types)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def onnx_mb(bundle: Path) -> float:
    """Size of the bundle's FP32 ONNX export (``diffqc export``, verified against PyTorch on a few
    synthetic images; no INT8, no runtime search)."""
    from diffqc.export import export_bundle

    export_bundle(bundle, threads=1, check_images=2, search=False, openvino=False,
                  log=lambda _: None)
    return (bundle / "model.onnx").stat().st_size / 1e6


def size_rows(types: list[int], dims: list[int], ranks: list[int], batch: int, repeats: int,
              per_type: int, work: Path, time_types: set[int], fit_prior: bool,
              base: dict[str, Any] | None = None, onnx: bool = False) -> list[dict[str, Any]]:
    rows = []
    for d in dims:
        for r in ranks:
            for n in types:
                row: dict[str, Any] = {"types": n, "prior_dims": d, "rank": r or "full"}
                timed = None
                for storage in STORAGES:  # fitted in each (a fitted model's storage is its own)
                    det, raw = random_detector(n, (base or {}) | {"diffusion.prior_dims": d,
                                                                   "diffusion.prior_rank": r,
                                                                   "diffusion.prior_storage": storage},
                                               per_type, fit_prior=fit_prior)
                    path = det.save(work / f"b{n}-{d}-{r}-{storage}")
                    row[f"mb_{storage}"] = folder_bytes(path) / 1e6
                    row[f"onnx_mb_{storage}"] = onnx_mb(path) if onnx else None
                    shutil.rmtree(path)  # written by this script just above
                    if storage == "float16":  # scoring computes in float32 from any storage
                        timed = det
                row["ms_trained"] = row["ms_untrained"] = None
                if n in time_types and timed is not None:  # the float16 fit's
                    row["ms_trained"] = time_scoring(timed, raw, n, batch, repeats)
                    denoiser = timed.scorer_.denoiser_  # type: ignore[union-attr]
                    with torch.no_grad():
                        denoiser.out.weight.zero_()
                        denoiser.out.bias.zero_()
                    row["ms_untrained"] = time_scoring(timed, raw, n, batch, repeats)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


def size_table(rows: list[dict[str, Any]]) -> str:
    out = ["| types | prior_dims | rank | bundle MB (fp32) | bundle MB (fp16) | bundle MB (int8) | "
           "ONNX MB (fp32) | ONNX MB (fp16) | ONNX MB (int8) | ms/img trained | ms/img untrained |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        keys = ("onnx_mb_float32", "onnx_mb_float16", "onnx_mb_int8", "ms_trained", "ms_untrained")
        cells = [("" if r.get(k) is None else f"{r[k]:.1f}") for k in keys]
        out.append(f"| {r['types']} | {r['prior_dims']} | {r['rank']} | {r['mb_float32']:.1f} | "
                   f"{r['mb_float16']:.1f} | {r['mb_int8']:.1f} | {' | '.join(cells)} |")
    return "\n".join(out)


def interleaved_gaussian_ms(dims_ranks: list[tuple[int, int]], n_types: int, batch: int,
                            rounds: int) -> dict[str, float]:
    """Median ms per image of the Gaussian path's closed form (``Denoiser.mahalanobis``, all a
    ``train.steps=0`` model computes before upsampling) per (prior_dims, rank), the
    configurations timed in turn in each round, so that a changing machine load hits them alike."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1024, 152, generator=gen)
    types = torch.arange(batch) % n_types
    models = {f"{d}/{r or 'full'}": Denoiser(152, n_types, 1024, replace(
        DetectorConfig().diffusion, prior_dims=d, prior_rank=r)).eval() for d, r in dims_ranks}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for key, m in models.items():
                t0 = time.perf_counter()
                m.mahalanobis(x, types)
                times[key].append(time.perf_counter() - t0)
    return {k: round(1000 * statistics.median(v[1:]) / batch, 2) for k, v in times.items()}


# ------------------------------------------------------------------------------ parity
def _of_type(scores: np.ndarray, samples: list[Sample], test: list[int], t: str) -> np.ndarray:
    return scores[[k for k, i in enumerate(test) if samples[i].feature_type == t]]


def _compared(ref_maps: torch.Tensor, maps: torch.Tensor, ref_scores: np.ndarray, scores: np.ndarray,
              samples: list[Sample], test: list[int], labels: dict[str, np.ndarray],
              ref_auroc: dict[str, float]) -> dict[str, Any]:
    """What a storage changes against float32 (``ref_auroc``: its AUROC per type): the maps and
    scores, the order of the image scores within each type (what AUROC and calibration see),
    each type's image AUROC."""
    ref_m, new_m = ref_maps.double(), maps.double()
    ref_s, new_s = ref_scores.astype(np.float64), scores.astype(np.float64)
    per_map = (new_m - ref_m).abs().amax((1, 2)) / ref_m.abs().amax((1, 2))
    out: dict[str, Any] = {
        "map_max_abs": float((new_m - ref_m).abs().max()),
        "map_max_rel_to_map_max": float(per_map.max()),
        "score_max_abs": float(np.abs(new_s - ref_s).max()),
        "score_max_rel": float((np.abs(new_s - ref_s) / np.abs(ref_s)).max()),
    }
    flips = pairs = 0
    aurocs: dict[str, float] = {}
    for t, y in labels.items():
        a, b = _of_type(ref_s, samples, test, t), _of_type(new_s, samples, test, t)
        da, db = a[:, None] - a[None, :], b[:, None] - b[None, :]
        flips += int((np.sign(da) != np.sign(db)).sum() // 2)
        pairs += len(a) * (len(a) - 1) // 2
        aurocs[t] = image_auroc(y, b)
    out["order_flips"] = f"{flips} of {pairs} same-type pairs"
    out["auroc_fp32_and_this"] = {t: (round(ref_auroc[t], 4), round(b, 4)) for t, b in aurocs.items()}
    out["mean_auroc"] = round(float(np.mean(list(aurocs.values()))), 4)
    return out


def synthetic_features(work: Path, cache: Path | None) -> tuple[list[Sample], torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import cached_extract, dataset_samples

    samples = dataset_samples("synthetic", work)
    assert samples is not None
    raw, _ = cached_extract(Detector(DetectorConfig(), device="cpu"), samples, None, cache)
    return samples, raw


def parity(overrides: dict[str, Any], work: Path, cache: Path | None) -> dict[str, Any]:
    """Maps and image scores of a float16 and an int8 bundle against a float32 bundle of one
    8-type model (``train.steps=0``, fitted once per storage) on the synthetic test images."""
    samples, raw = synthetic_features(work, cache)
    train = [i for i, s in enumerate(samples) if s.split == "train" and s.label == GOOD]
    test = [i for i, s in enumerate(samples) if s.split == "test"]
    out: dict[str, Any] = {"overrides": overrides, "test_images": len(test)}
    maps: dict[str, torch.Tensor] = {}
    scores: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="diffqc-parity-") as tmp:
        for storage in STORAGES:
            # fitted (and calibrated) in each storage on the same features: with train.steps=0 the
            # same model but for the rounding of its tables
            fit = {"train.steps": 0} | overrides | {"diffusion.prior_storage": storage}
            torch.manual_seed(0)
            det = Detector(with_overrides(DetectorConfig(), fit), device="cpu")
            det.fit_features(raw[train], [samples[i] for i in train])
            path = det.save(Path(tmp) / storage)
            out[f"bundle_mb_{storage}"] = round(folder_bytes(path) / 1e6, 1)
            loaded = Detector.load(path, device="cpu")
            types = torch.tensor([loaded.classes_.index(samples[i].feature_type) for i in test])
            m_all, s_all = [], []
            with torch.inference_mode():
                for j in range(0, len(test), 32):
                    feats = loaded.extractor.standardise(raw[test[j : j + 32]])
                    m, s = loaded.maps_and_scores(feats, types[j : j + 32])
                    m_all.append(m)
                    s_all.append(s)
            maps[storage], scores[storage] = torch.cat(m_all), torch.cat(s_all).numpy()
    labels = {t: np.array([samples[i].label for i in test if samples[i].feature_type == t])
              for t in sorted({samples[i].feature_type for i in test})}
    fp32 = {t: image_auroc(y, _of_type(scores["float32"], samples, test, t)) for t, y in labels.items()}
    out["mean_auroc_float32"] = round(float(np.mean(list(fp32.values()))), 4)
    for storage in STORAGES[1:]:
        out[storage] = _compared(maps["float32"], maps[storage], scores["float32"], scores[storage],
                                 samples, test, labels, fp32)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--types", default="1,2,4,8")
    p.add_argument("--dims", default="100,152", help="diffusion.prior_dims values")
    p.add_argument("--ranks", default="0,64,32", help="diffusion.prior_rank values (0: full)")
    p.add_argument("--time-types", default="8", help="type counts whose scoring is timed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per-type", type=int, default=8, help="random GOOD images per type")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--onnx", action="store_true",
                   help="also export each bundle (diffqc export) and report model.onnx's size")
    p.add_argument("--fit-prior", action="store_true", help="fit the Gaussians (slow; same bytes and time)")
    p.add_argument("--parity", action="store_true", help="float16 parity on the synthetic set instead")
    p.add_argument("--gaussian-timing", action="store_true",
                   help="instead: the Gaussian closed form's ms per image, configurations interleaved")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (sizes and parity)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-quality")
    p.add_argument("--feature-cache", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# load: {os.getloadavg()}; threads {args.threads}", flush=True)
    if args.parity:
        import json

        args.work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(parity(parse_overrides(args.set), args.work, args.feature_cache), indent=1))
        return 0
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v]

    if args.gaussian_timing:
        pairs = [(d, r) for d in ints(args.dims) for r in ints(args.ranks)]
        n_types = max(ints(args.types))
        print(f"# Denoiser.mahalanobis, {n_types} types, batch {args.batch}, median of {args.repeats}")
        for key, ms in interleaved_gaussian_ms(pairs, n_types, args.batch, args.repeats).items():
            print(f"prior_dims/rank {key}: {ms} ms/image")
        print(f"# load after: {os.getloadavg()}", flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="diffqc-bundles-") as tmp:
        rows = size_rows(ints(args.types), ints(args.dims), ints(args.ranks), batch=args.batch,
                         repeats=args.repeats, per_type=args.per_type, work=Path(tmp),
                         time_types=set(ints(args.time_types)), fit_prior=args.fit_prior,
                         base=parse_overrides(args.set), onnx=args.onnx)
    print(size_table(rows))
    print(f"# load after: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
