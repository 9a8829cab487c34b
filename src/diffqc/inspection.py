"""What an inspection returns, and the errors and checksums of a model bundle: plain Python and
NumPy, so that a runtime without PyTorch (ONNX Runtime, the service) can use them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_FILES = ("config.json", "weights.safetensors", "calibration.json", "metadata.json")
BUNDLE_FORMAT = 1


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class UnknownFeatureTypeError(ValueError):
    """A feature type the model was not trained on."""


class BundleError(RuntimeError):
    """A model bundle is missing, damaged, partial or does not match this code."""


@dataclass(frozen=True)
class Inspection:
    """The verdict on one image."""

    score: float  # anomaly score under ``feature_type`` (higher = more anomalous)
    p_value: float
    decision: str  # PASS / REVIEW / REJECT
    feature_type: str  # the type it was scored under (given, or predicted when unknown)
    predicted_type: str | None  # arg-min over types of the score (None when not computed)
    type_known: bool
    type_scores: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score, "p_value": self.p_value, "decision": self.decision,
            "feature_type": self.feature_type, "predicted_type": self.predicted_type,
            "type_known": self.type_known, "type_scores": self.type_scores,
        }

