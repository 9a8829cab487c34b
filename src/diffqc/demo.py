"""``diffqc demo``: synthesise -> train -> calibrate -> inspect the test set -> per-type table."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffqc.config import DetectorConfig, with_overrides
from diffqc.data import DEFECTIVE, GOOD, Sample, load_dataset, read_image
from diffqc.errors import ConfigError, OutputError
from diffqc.holdout import decision_table, format_table
from diffqc.model import Detector, Inspection, cross_folds
from diffqc.output import json_safe, write_atomic
from diffqc.visualize import write_heatmap

# The demo calibrates on every GOOD training image (cross-conformal, 5 folds): its ~108 GOOD
# images per type then reach α_reject = 1 % without the exponential tail (split calibration would
# hold out ~22 per type). It costs 5 extra fits of the scorer; docs/METHOD.md says what it
# guarantees.
DEMO_DEFAULTS: dict[str, Any] = {"calibration.scheme": "cross", "calibration.folds": 5}

def _write_heatmaps(det: Detector, samples: Sequence[Sample], results: Sequence[Inspection],
                    out: Path, per_type: int = 1) -> list[Path]:
    """Heat maps of the highest-scoring defective and GOOD part of each type, drawn as the
    commands draw them (:func:`~diffqc.visualize.write_heatmap`: on the type's fixed colour scale,
    with score, p-value and decision)."""
    written = []
    summary = det.calibration_.summary() if det.calibration_ is not None else {}
    for t in det.classes_:
        idx = [i for i, s in enumerate(samples) if s.feature_type == t]
        for label in (DEFECTIVE, GOOD):
            cand = sorted((i for i in idx if samples[i].label == label),
                          key=lambda i: -results[i].score)[:per_type]
            for i in cand:
                if results[i].anomaly_map is None:
                    continue
                image = read_image(samples[i].path)
                kind = samples[i].defect or ("good" if label == GOOD else "defect")
                name = Path(f"{t}_{kind}_{samples[i].path.stem}_{results[i].decision}.png")
                written.append(write_heatmap(out, name, image, results[i], summary,  # a new file
                                             gain=det.config.backbone.input_gain))
    return written


def calibration_text(config: DetectorConfig, train: Sequence[Sample]) -> str:
    """How the demo's model is calibrated on its ``train`` images: the fold models it fits (as
    many as there are non-empty folds: fewer GOOD parts of each type than ``calibration.folds``
    make fewer), or the share held out."""
    cal = config.calibration
    if cal.scheme != "cross":
        return f"{cal.fraction:.0%} held out to calibrate"
    folds = len(cross_folds(train, cal.folds, config.train.seed))
    return f"every one also calibrates, scored by one of {folds} fold models fitted without it"


def is_demo_table(path: Path) -> bool:
    """Whether the file is a table ``demo --json`` wrote."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and {"feature_type", "image_auroc"} <= set(r) for r in rows)


def is_demo_timings(path: Path) -> bool:
    """Whether the file is the timings ``demo --json`` wrote (``OUT/timings.json``)."""
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(facts, dict) and {"total_s", "type_accuracy"} <= set(facts)


def check_parts(n_parts: int) -> None:
    """A :class:`ConfigError` for a demo of too few parts to give every type a defective test part
    (its AUROC undefined: the table's mean was nan)."""
    from diffqc.synth import min_parts_with_defects

    if n_parts < (least := min_parts_with_defects()):
        raise ConfigError(f"demo: --parts must be at least {least} ({least // 8} for each of the 8 types: "
                          f"fewer leave a type no defective test part to score), got {n_parts}")


def run_demo(
    out: Path, *, config: DetectorConfig | None = None, n_parts: int = 1327, seed: int = 0,
    json_path: Path | None = None, progress: bool = True, device: str | None = None,
) -> list[dict[str, Any]]:
    from diffqc.synth import write_synthetic_dataset

    check_parts(n_parts)
    timings_path = out / "timings.json"  # written with --json; checked before any work
    if json_path is not None and timings_path.exists() and not is_demo_timings(timings_path):
        raise OutputError(f"demo: {timings_path} exists and is not an earlier demo's timings (nothing "
                          "is replaced); choose another --out")
    config = config or with_overrides(DetectorConfig(), DEMO_DEFAULTS)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data_dir = out / "data"
    print(f"[1/4] synthesising {n_parts} inkjet parts (8 feature types) into {data_dir}")
    # an earlier demo's data (it has synth's marker) is replaced; any other non-empty folder is refused
    write_synthetic_dataset(data_dir, n_parts=n_parts, seed=seed, overwrite=False, progress=progress)
    timings["synthesise_s"] = time.perf_counter() - t0
    samples = load_dataset(data_dir)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    how = calibration_text(config, train)
    if config.method == "diffusion":
        steps = config.train.steps
        how += (f"; network trained {steps} steps" if steps
                else "; the Gaussians alone, network not trained (train.steps=0)")
    print(f"[2/4] fitting the {config.method} model on {len(train)} GOOD images "
          f"({config.backbone.name} features; {how})")
    t1 = time.perf_counter()
    det = Detector(config, device=device).fit(train, progress=progress)
    det.save(out / "model")
    timings["train_s"] = time.perf_counter() - t1
    print(f"[3/4] inspecting {len(test)} test parts (feature type known)")
    t2 = time.perf_counter()
    # the line's fast path: each part scored under its own type only
    results, kept = det.inspect_samples(test, progress=progress, all_types=False)
    timings["inspect_s"] = time.perf_counter() - t2
    timings["inspect_ms_per_part"] = 1000 * timings["inspect_s"] / max(1, len(kept))
    rows = decision_table(kept, results)
    # the same parts again with the type withheld: the type router names it, one scoring pass
    unknown, _ = det.inspect_samples(kept, type_known=False, all_types=False, maps=False)
    type_acc = float(np.mean([r.predicted_type == s.feature_type
                              for r, s in zip(unknown, kept, strict=True)]))
    # each part scored under the type the router named: the mean per-type AUROC of those scores
    auroc_withheld = float(decision_table(kept, unknown)[-1]["image_auroc"])
    heat = _write_heatmaps(det, kept, results, out / "heatmaps")
    timings["total_s"] = time.perf_counter() - t0
    print("[4/4] results on the held-out test parts "
          f"(α_review={config.calibration.alpha_review}, α_reject={config.calibration.alpha_reject})")
    print(format_table(rows))
    print(f"type predicted correctly when withheld (type router): {type_acc:.3f}; mean image AUROC "
          f"then {auroc_withheld:.3f} (type given: {rows[-1]['image_auroc']:.3f})")
    print(f"heat maps: {len(heat)} in {out / 'heatmaps'}")
    print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    if json_path is not None:
        payload = [
            {k: r[k] for k in ("feature_type", "image_auroc", "accuracy", "fpr", "recall", "pass", "review",
                                 "reject")}
            for r in rows
        ]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, json.dumps(json_safe(payload), indent=2).encode("utf-8"))
        facts = dict(timings, type_accuracy=type_acc, image_auroc_type_withheld=auroc_withheld)
        write_atomic(timings_path, json.dumps(json_safe(facts), indent=2).encode("utf-8"))
    return rows
