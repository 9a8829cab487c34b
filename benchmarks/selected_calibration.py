"""What calibrating on the parts an operator reviewed GOOD does to a line's decisions.

An operator reviews the parts the model flagged (the review queue), so the parts reviewed GOOD,
what ``diffqc results export`` writes, are the GOOD parts the model scored highest. This
benchmark scores a bundle's test split (``DATA/<type>/test``) and, per type, compares the
decision rule at REVIEW (p <= α_review) under three calibrations:

* ``bundle``: the bundle's own (GOOD training images held out of the fit);
* ``flagged``: the test split's GOOD parts the bundle flagged, as if reviewed GOOD and exported;
* ``random half``: a random half of the test split's GOOD parts (the flag rate is measured on
  the other half; median of ``--draws`` draws).

It prints each one's REVIEW threshold (null: no score reaches it), GOOD flag rate and defect
recall as JSON lines.

    diffqc train DATA --out MODEL
    OMP_NUM_THREADS=2 python benchmarks/selected_calibration.py MODEL DATA [--draws 5]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from diffqc.calibration import Calibrator
from diffqc.config import CalibrationConfig
from diffqc.data import GOOD, load_dataset
from diffqc.model import Detector


def _review_threshold(config: CalibrationConfig, ftype: str, scores: np.ndarray) -> float:
    """The REVIEW threshold of a calibration on ``scores`` alone."""
    return Calibrator(config).fit({ftype: scores}, warn=False).thresholds(ftype)["review"]


def _row(ftype: str, name: str, n_cal: int, threshold: float, good_flag: float, recall: float) -> str:
    return json.dumps({"type": ftype, "calibration": name, "calibration_images": n_cal,
                       "review_threshold": round(threshold, 2) if np.isfinite(threshold) else None,
                       "good_flag_rate": round(good_flag, 3), "defect_recall": round(recall, 3)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a bundle trained on DATA's train/good")
    ap.add_argument("data", help="MVTec-layout folder with a test split")
    ap.add_argument("--draws", type=int, default=5, help="random halves drawn (median reported)")
    args = ap.parse_args()

    det = Detector.load(args.model, device="cpu")
    assert det.calibration_ is not None
    config = det.calibration_.config
    samples = [s for s in load_dataset(args.data) if s.path.parent.parent.name.lower() == "test"]
    results, kept = det.inspect_samples(samples, type_known=True, all_types=False, maps=False)
    for ftype in sorted({s.feature_type for s in kept}):
        mine = [i for i, s in enumerate(kept) if s.feature_type == ftype]
        scores = np.array([results[i].score for i in mine], dtype=np.float64)
        good = np.array([kept[i].label == GOOD for i in mine])
        defects = scores[~good]

        def rates(t: float, good_scores: np.ndarray, d: np.ndarray = defects) -> tuple[float, float]:
            return float((good_scores >= t).mean()), float((d >= t).mean())

        own = det.calibration_.thresholds(ftype)["review"]
        print(_row(ftype, "bundle", int(det.calibration_.known[ftype].scores.size), own,
                   *rates(own, scores[good])))
        flagged = scores[good & (scores >= own)]
        if flagged.size:
            t = _review_threshold(config, ftype, flagged)
            print(_row(ftype, "flagged", int(flagged.size), t, *rates(t, scores[good])))
        idx = np.flatnonzero(good)
        halves = []
        for draw in range(args.draws):
            order = np.random.default_rng(draw).permutation(idx)
            t = _review_threshold(config, ftype, scores[order[: order.size // 2]])
            halves.append((t, *rates(t, scores[order[order.size // 2:]])))
        t, flag, recall = (float(np.median([h[i] for h in halves])) for i in range(3))
        print(_row(ftype, f"random half (median of {args.draws})", int(idx.size // 2), t, flag, recall))


if __name__ == "__main__":
    main()
