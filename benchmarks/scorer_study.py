"""Scorer study (issue 3): many scorer variants on one dataset's cached backbone features.

Extracts raw features once (cached under ``--cache``), then fits and scores each variant given
as a JSON object of config overrides, printing one JSON line per variant: fit time, scoring
ms/image, image AUROC (max, mean of top 1 %, top 5 %; the mean over types for several types),
pixel AUROC.

    python benchmarks/scorer_study.py ../shared/datasets/magnetic_tile --train-good 400 \\
        '{"train.steps": 0}' '{"train.steps": 1000}' '{"method": "padim"}' '{"method": "patchcore"}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.data import load_dataset, read_image, read_mask
from diffqc.metrics import image_auroc, pixel_auroc
from diffqc.model import Detector, make_scorer
from diffqc.scoring import aggregate, upsample_and_smooth


def cached_features(root: Path, backbone: str, train_good: int, cache: Path) -> dict[str, Any]:
    path = cache / f"{root.name}_{backbone}_{train_good}.pt"
    if path.is_file():
        return dict(torch.load(path))
    samples = load_dataset(root)
    train = [s for s in samples if s.split == "train"][:train_good]
    test = [s for s in samples if s.split == "test"]
    det = Detector(with_overrides(DetectorConfig(), {"backbone.name": backbone}), device="cpu")

    def feats(ss: list[Any]) -> torch.Tensor:
        return torch.cat([det.extract([read_image(s.path) for s in ss[i : i + 16]], raw=True)
                          for i in range(0, len(ss), 16)])

    data = {"train": feats(train), "test": feats(test),
            "labels": torch.tensor([s.label for s in test]),
            "types_train": [s.feature_type for s in train], "types_test": [s.feature_type for s in test],
            "masks64": torch.from_numpy(np.stack([read_mask(s.mask_path, (64, 64)) for s in test]))}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def run_variant(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    tr, te = data["train"], data["test"]
    c = tr.shape[1]
    flat = tr.transpose(0, 1).reshape(c, -1)
    mean, std = flat.mean(1).view(1, -1, 1, 1), flat.std(1).clamp_min(1e-6).view(1, -1, 1, 1)
    tr, te = (tr - mean) / std, (te - mean) / std
    types = sorted(set(data["types_train"]))
    ytr = torch.tensor([types.index(t) for t in data["types_train"]])
    yte = torch.tensor([types.index(t) for t in data["types_test"]])
    cfg = with_overrides(DetectorConfig(), overrides)
    t0 = time.perf_counter()
    scorer = make_scorer(cfg).fit(tr, ytr, len(types))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps = torch.cat([scorer.score_maps(te[i : i + 32], yte[i : i + 32]) for i in range(0, len(te), 32)])
    score_ms = 1000 * (time.perf_counter() - t0) / len(te)
    up = upsample_and_smooth(maps, cfg.backbone.input_size, cfg.scoring.smooth_sigma)
    labels = data["labels"].numpy()
    tt = np.array(data["types_test"])
    out: dict[str, Any] = {"variant": overrides, "fit_s": round(fit_s, 1), "score_ms": round(score_ms, 1)}
    for name, (agg, k) in {"max": ("max", 0.0), "top1": ("topk", 0.01), "top5": ("topk", 0.05)}.items():
        s = aggregate(up, agg, k).numpy()
        per = {t: image_auroc(labels[tt == t], s[tt == t]) for t in types}
        out[name] = round(float(np.nanmean(list(per.values()))), 4)
        if name == "top1" and len(types) > 1:
            out["per_type_top1"] = {t: round(v, 3) for t, v in per.items()}
    small = torch.nn.functional.interpolate(up[:, None], size=(64, 64), mode="bilinear")[:, 0].numpy()
    out["pixel_auroc"] = round(pixel_auroc(data["masks64"].numpy(), small), 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("dataset", type=Path)
    p.add_argument("variants", nargs="+", help="JSON objects of config overrides")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--train-good", type=int, default=400)
    p.add_argument("--cache", type=Path, default=Path("/tmp/diffqc-study-cache"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = cached_features(args.dataset, args.backbone, args.train_good, args.cache)
    for v in args.variants:
        print(json.dumps(run_variant(data, json.loads(v))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
