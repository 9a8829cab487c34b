"""Scoring speed of the diffusion scorer alone (after the backbone), per configuration.

Fits each configuration on random features of the default shape (152 x 32 x 32, 2 types; the
speed does not depend on the values) with one training step (so the network is not skipped) or
none, and times ``DiffusionScorer.score_maps`` at batch 1 and batch 32 (median of 7 runs).
Run it at two commits to compare implementations: the numbers are only comparable within one
machine state, so run both back to back.

    python benchmarks/scoring_speed.py
    python benchmarks/scoring_speed.py --threads 1 --config '{"diffusion.prior_dims": 48}'
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.scoring import DiffusionScorer

CONFIGS: list[dict[str, Any]] = [  # the likelihood scorer (issue 14): untrained, then trained
    {"train.steps": 0},
    {"scoring.quadrature_nodes": 2},
    {"scoring.quadrature_nodes": 3},
]


def time_config(overrides: dict[str, Any], batches: tuple[int, ...] = (1, 32),
                runs: int = 7) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 152, 32, 32, generator=gen)
    types = torch.arange(64) % 2
    quick = {"train.steps": 1, "train.batch_images": 2, "train.locations_per_image": 8}
    config = with_overrides(DetectorConfig(), quick | overrides)
    scorer = DiffusionScorer(config).fit(feats, types, 2)
    out: dict[str, Any] = {"config": overrides}
    for n in batches:
        x = torch.randn(n, 152, 32, 32, generator=gen)
        t = torch.zeros(n, dtype=torch.long)
        scorer.score_maps(x, t)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            scorer.score_maps(x, t)
            times.append(time.perf_counter() - t0)
        out[f"ms_per_image_batch{n}"] = round(sorted(times)[runs // 2] / n * 1000, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", action="append", default=None, metavar="JSON",
                   help="config overrides to time (repeatable; default: the built-in list)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = [json.loads(c) for c in args.config] if args.config else CONFIGS
    for overrides in configs:
        print(json.dumps(time_config(overrides)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
