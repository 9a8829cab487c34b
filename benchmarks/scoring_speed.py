"""Scoring speed of the diffusion scorer alone (after the backbone), per configuration.

Fits each configuration on random features of the default shape (``--channels`` x 32 x 32:
128 for the default MobileNetV2, 152 for EfficientNet-Lite0; ``--types``
types; the speed does not depend on the values) with a few training steps (so the network is
not skipped) or none (``train.steps=0``: the Gaussian part alone), and times
``DiffusionScorer.score_maps`` at each ``--batches`` size (batch 32 with mixed types, every type
equally often; batch 1 with one), median of ``--runs`` runs. The machine's load average is
printed with each row: numbers taken while other jobs run are only comparable within one run.

``--against COMMIT`` also loads that commit's ``diffusion.py`` and ``scoring.py`` (beside the
current package, from ``git show``) with the same fitted state and times both alternately in the
same process, so that a change in load hits both alike; it prints the maximum relative
difference of their maps (the speed-ups must not change the results).

    python benchmarks/scoring_speed.py --threads 1
    python benchmarks/scoring_speed.py --threads 1 --against HEAD~3 --config '{"scoring.quadrature_nodes": 3}'
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffqc.config import DetectorConfig, with_overrides
from diffqc.scoring import DiffusionScorer

CONFIGS: list[dict[str, Any]] = [  # the likelihood scorer (issue 14): untrained, then trained
    {"train.steps": 0},
    {"scoring.quadrature_nodes": 1},
    {"scoring.quadrature_nodes": 2},
    {"scoring.quadrature_nodes": 3},
]
ROOT = Path(__file__).resolve().parents[1]


def load_baseline(commit: str, folder: Path) -> ModuleType:
    """``scoring.py`` of ``commit`` as a module (its ``diffusion.py`` beside it, under other
    names, so that it does not replace the current package's)."""
    for name in ("diffusion", "scoring"):
        text = subprocess.run(["git", "show", f"{commit}:src/diffqc/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from diffqc.diffusion import", "from baseline_diffusion import")
        (folder / f"baseline_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    for name in ("baseline_diffusion", "baseline_scoring"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["baseline_scoring"]


def fitted(overrides: dict[str, Any], n_types: int, channels: int, per_type: int = 8) -> DiffusionScorer:
    gen = torch.Generator().manual_seed(0)
    n = per_type * n_types
    feats = torch.randn(n, channels, 32, 32, generator=gen) * torch.rand(channels, 1, 1, generator=gen) * 3
    quick = {"train.steps": 3, "train.batch_images": 2, "train.locations_per_image": 8}
    config = with_overrides(DetectorConfig(), quick | overrides)
    return DiffusionScorer(config).fit(feats, torch.arange(n) % n_types, n_types)


def time_config(overrides: dict[str, Any], n_types: int, batches: list[int], runs: int,
                baseline: ModuleType | None, channels: int = 128, per_type: int = 8) -> list[dict[str, Any]]:
    scorer = fitted(overrides, n_types, channels, per_type)
    scorers: dict[str, Any] = {"current": scorer}
    if baseline is not None:
        scorers["baseline"] = baseline.DiffusionScorer.from_state(scorer.config, scorer.state_tensors(),
                                                                  n_types, channels)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in batches:
        x = torch.randn(n, channels, 32, 32, generator=gen) * 2
        types = torch.arange(n) % n_types
        maps = {name: s.score_maps(x, types) for name, s in scorers.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in scorers}
        load = os.getloadavg()[0]
        for _ in range(runs):
            for name, s in scorers.items():  # alternately: a change in load hits both alike
                t0 = time.perf_counter()
                s.score_maps(x, types)
                times[name].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"config": overrides, "batch": n, "types_in_batch": min(n, n_types)}
        for name, values in times.items():
            row[f"ms_per_image_{name}"] = round(statistics.median(values) / n * 1000, 2)
        if baseline is not None:
            ref = maps["baseline"]
            row["max_rel_diff"] = float(((maps["current"] - ref).abs() / ref.abs().clamp_min(1e-3)).max())
        row["load_avg"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", type=int, default=8)
    p.add_argument("--channels", type=int, default=128,
                   help="feature channels: 128 = the default MobileNetV2 taps, 152 = EfficientNet-Lite0")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--per-type", type=int, default=8,
                   help="random GOOD images per type (diffusion.prior_context uses one component per 8)")
    p.add_argument("--against", metavar="COMMIT", help="also time this commit's scorer, alternately")
    p.add_argument("--config", action="append", default=None, metavar="JSON",
                   help="config overrides to time (repeatable; default: the built-in list)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    configs = [json.loads(c) for c in args.config] if args.config else CONFIGS
    batches = [int(b) for b in args.batches.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"commit": commit, "threads": args.threads, "against": args.against,
                      "date": time.strftime("%Y-%m-%d %H:%M")}), flush=True)
    with tempfile.TemporaryDirectory(prefix="diffqc-baseline-") as tmp:
        baseline = load_baseline(args.against, Path(tmp)) if args.against else None
        for overrides in configs:
            for row in time_config(overrides, args.types, batches, args.runs, baseline, args.channels,
                                   args.per_type):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
