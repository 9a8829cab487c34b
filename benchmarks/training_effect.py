"""What training the residual network does (issue 3): denoising error of fit, held-out GOOD,
test GOOD and test defective parts, and image AUROC with the raw map and with the map
normalised per location by the GOOD fit maps, for config variants on cached features.

    python benchmarks/training_effect.py --holdout 80 '{"train.steps": 0}' '{"train.steps": 1000}'
    python benchmarks/training_effect.py --holdout 0 '{"train.steps": 0}' '{"train.steps": 1000}'

Features: the magnetic-tile cache written by ``benchmarks/scorer_study.py`` (first 400 GOOD
training images, the dataset's test split). ``--holdout N``: N of the 400 (seeded) are held out
of the fit to measure held-out GOOD error; 0 fits on all 400.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.metrics import image_auroc
from diffqc.model import make_scorer
from diffqc.scoring import aggregate, upsample_and_smooth

DEFAULT_CACHE = Path("/tmp/diffqc-study-cache/magnetic_tile_efficientnet-lite0_400.pt")


def _maps(scorer: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([scorer.score_maps(x[i : i + 32], torch.zeros(len(x[i : i + 32]), dtype=torch.long))
                      for i in range(0, len(x), 32)])


def _image(maps: torch.Tensor, agg: str = "topk", k: float = 0.01) -> Any:
    return aggregate(upsample_and_smooth(maps, 256, 4.0), agg, k).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("variants", nargs="+", help="JSON objects of config overrides")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--holdout", type=int, default=80)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = torch.load(args.cache)
    tr, te = d["train"], d["test"]
    perm = torch.randperm(tr.shape[0], generator=torch.Generator().manual_seed(0))
    n_fit = tr.shape[0] - args.holdout
    fit, val = (tr[perm[:n_fit]], tr[perm[n_fit:]]) if args.holdout else (tr, tr[:0])
    c = tr.shape[1]
    flat = fit.transpose(0, 1).reshape(c, -1)
    mean, std = flat.mean(1).view(1, -1, 1, 1), flat.std(1).clamp_min(1e-6).view(1, -1, 1, 1)
    fit, val, te = (fit - mean) / std, (val - mean) / std, (te - mean) / std
    y = d["labels"].numpy()
    for v in args.variants:
        over = json.loads(v)
        scorer = make_scorer(with_overrides(DetectorConfig(), over)).fit(
            fit, torch.zeros(len(fit), dtype=torch.long), 1)
        fm, tm = _maps(scorer, fit), _maps(scorer, te)
        row: dict[str, Any] = {"variant": over, "fit_map_mean": round(float(fm.mean()), 4),
                               "test_good_map_mean": round(float(tm[y == 0].mean()), 4),
                               "test_defective_map_mean": round(float(tm[y == 1].mean()), 4)}
        if len(val):
            row["heldout_good_map_mean"] = round(float(_maps(scorer, val).mean()), 4)
        mu, sd = fm.mean(0), fm.std(0).clamp_min(1e-6)
        for name, m in {"raw": tm, "z": (tm - mu) / sd}.items():
            row[f"auroc_{name}_top1"] = round(image_auroc(y, _image(m)), 4)
            row[f"auroc_{name}_max"] = round(image_auroc(y, _image(m, "max", 0.0)), 4)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
