"""Cross-validated evaluation of detectors: ``diffqc evaluate`` (issue 4).

The backbone is frozen, so the features of every labelled image are extracted once and reused by
every fold and every method. For each fold of a grouped, stratified k-fold split (made per feature
type, see :func:`diffqc.folds.per_type_folds`), each method (``diffusion``, ``patchcore``,
``padim``, or a named setting such as "separation loss on") is fitted on the GOOD images of the
other folds (:meth:`Detector.fit_features` holds out its own calibration slice), calibrated, and
scores the held-out fold. Every method sees identical folds, so their out-of-fold scores are
paired and can be compared with DeLong's test and the corrected resampled t-test.

The result is a :class:`diffqc.report.Report`: per-type and overall metrics (pooled and
mean ± sd over folds), comparisons with Holm-adjusted p-values, plots, and a gallery of the worst
misses; :func:`evaluate` writes it as report.json / report.md / report.html.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffqc import metrics as M
from diffqc import report as R
from diffqc import tiling
from diffqc.backbone import raw_features_in_batches, to_pixels
from diffqc.calibration import (
    COUNTED_FLAGGED,
    CalibrationWarning,
    Calibrator,
    standardiser,
    suspect_images,
    suspects_note,
)
from diffqc.config import (
    METHODS,
    DetectorConfig,
    check_trainable,
    parse_overrides,
    uses_layouts,
    with_overrides,
)
from diffqc.data import (
    DEFECTIVE,
    GOOD,
    DatasetWarning,
    Sample,
    label_shortcuts,
    read_image,
    read_mask,
    without_copies,
)
from diffqc.errors import ConfigError, DatasetError, ImageReadError, first_few
from diffqc.folds import per_type_folds
from diffqc.inspection import brightness, image_brightness
from diffqc.metrics import has_both_classes, image_auroc
from diffqc.model import Detector, check_fit_memory, gain_clips_note, twelve_bit_note, views_to_fit
from diffqc.output import path_text, text_columns
from diffqc.visualize import as_read

DEFAULT_METHODS = ("diffusion", "patchcore", "padim")
MAP_SIDE = 128  # anomaly maps are kept at most this many pixels on the long side
READ_CHUNK = 64  # images read and passed through the backbone at a time
INSPECT_CHUNK = 64  # held-out images scored at a time

POOLING_NOTE = (
    "Out-of-fold scores are pooled on a calibration-standardised scale: (score - median of the "
    "fold's GOOD calibration scores) / their IQR, per fold and feature type. Per-fold metrics "
    "are unchanged by it; pooled AUROC, histograms, ROC curves and DeLong use it."
)


# =========================================================================== scores on one scale


# =========================================================================== run state


@dataclass
class _Variant:
    """Out-of-fold results of one method / setting, indexed like the evaluated samples."""

    name: str
    config: DetectorConfig
    z: np.ndarray  # standardised score (NaN: not evaluated yet)
    raw: np.ndarray  # the fold model's own score
    p: np.ndarray
    decision: np.ndarray  # object: PASS / REVIEW / REJECT
    maps: list[np.ndarray | None]  # standardised anomaly maps (float16), at most MAP_SIDE px
    review_z: dict[str, list[float]] = field(default_factory=dict)  # type -> per-fold threshold
    reject_z: dict[str, list[float]] = field(default_factory=dict)
    fit_seconds: list[float] = field(default_factory=list)
    inspect_seconds: list[float] = field(default_factory=list)
    train_images: dict[str, list[int]] = field(default_factory=dict)  # type -> per fold
    # type withheld (``unknown_type=True``): the routed type and the score under it, standardised
    # as the routed type's scores are (the fold model routes among the evaluated types only)
    routed_type: list[str | None] = field(default_factory=list)
    routed_z: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def empty(cls, name: str, config: DetectorConfig, n: int) -> _Variant:
        return cls(name, config, np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
                   np.full(n, "PASS", dtype=object), [None] * n)


def _backbone_key(config: DetectorConfig) -> str:
    """What the raw features depend on: the backbone and, for pad / crop / tiled models, the
    geometry of their views (:mod:`diffqc.tiling`)."""
    b = repr(replace(config.backbone, weights_sha256=""))
    return b + repr(config.tiling) if config.tiling.mode != "off" else b


def _layouts(config: DetectorConfig, shapes: Sequence[tuple[int, int]]) -> list[tiling.Layout] | None:
    """Each image's views under ``config`` (None for the plain one map per image): they follow
    from the image's shape, so the feature cache needs to keep only the shapes."""
    return [tiling.plan(sh, config) for sh in shapes] if uses_layouts(config) else None


def _copy_extractor(det: Detector) -> Any:
    """A copy of an already built frozen backbone (skips reloading and hashing the weights per
    fold), or None (the fold detector builds its own) when it cannot be copied, e.g. ONNX."""
    try:
        return copy.deepcopy(det.extractor)
    except (TypeError, RuntimeError):
        return None


def _map_size(shape: tuple[int, int], side: int) -> tuple[int, int]:
    h, w = shape
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _chunks(n: int, size: int) -> Iterator[np.ndarray]:
    for i in range(0, n, size):
        yield np.arange(i, min(n, i + size))


def _grouped_by_type(messages: Sequence[str]) -> list[str]:
    """"feature type 'a': X" and "feature type 'b': X" -> "feature types a, b: X"."""
    by_text: dict[str, list[str]] = {}
    for m in messages:
        head, sep, text = m.partition("': ")
        if sep and head.startswith("feature type '"):
            by_text.setdefault(text, []).append(head.removeprefix("feature type '"))
        else:
            by_text.setdefault(m, [])
    out = []
    for text, types in by_text.items():
        if not types:
            out.append(text)
        else:
            word = "type" if len(types) == 1 else "types"
            out.append(f"feature {word} {', '.join(sorted(set(types)))}: {text}")
    return out


def _eligible_types(samples: Sequence[Sample], k: int) -> tuple[list[str], list[str]]:
    """Types that can be cross-validated with k folds, and a note per type that cannot."""
    ok, notes = [], []
    for t in sorted({s.feature_type for s in samples}):
        of_type = [s for s in samples if s.feature_type == t]
        groups = {s.group for s in of_type}
        good_groups = {s.group for s in of_type if s.label == GOOD}
        # some fold holds at least ceil(G / k) GOOD groups: below 2 left, no split can fit +
        # calibrate (a split that can is checked once the folds are made, _trainable_types)
        left = len(good_groups) - math.ceil(len(good_groups) / k)
        if len(groups) < k or left < 2:
            notes.append(
                f"feature type {t!r} left out: {len(groups)} part(s), {len(good_groups)} of them "
                f"GOOD, too few for {k} folds (each fold's training set needs >= 2 GOOD parts "
                "of every type)"
            )
        else:
            ok.append(t)
    return ok, notes


def _trainable_types(samples: Sequence[Sample], k: int, seed: int) -> tuple[list[str], list[str]]:
    """Types of ``samples`` (each with enough parts, :func:`_eligible_types`) whose folds leave
    >= 2 GOOD parts of them in every fold's training set, and a note per type that they do not:
    the folds balance images, not parts, so one big part can be a fold's whole training set.
    Folds made across types (:func:`~diffqc.folds.per_type_folds`) change with the types in
    them, so they are made again until every type left passes."""
    types = sorted({s.feature_type for s in samples})
    notes: list[str] = []
    while types:
        kept = [s for s in samples if s.feature_type in types]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said when the run makes its folds
            fold_of = per_type_folds(kept, k, seed)
        short = {t: few for t in types if (few := _fewest_training_parts(kept, fold_of, t, k))[1] < 2}
        if not short:
            break
        notes += [f"feature type {t!r} left out: fold {f + 1} of {k} would be fit on {n} GOOD part(s) "
                  "of it (the folds balance images, not parts; each fold's training set needs >= 2 "
                  "GOOD parts of every type): evaluate with fewer --folds, or add more GOOD parts"
                  for t, (f, n) in short.items()]
        types = [t for t in types if t not in short]
    return types, notes


def _fewest_training_parts(samples: Sequence[Sample], fold_of: np.ndarray, ftype: str,
                           k: int) -> tuple[int, int]:
    """The fold whose training set holds the fewest GOOD parts of ``ftype``, and how many."""
    fold_of_part = {s.group: int(f) for s, f in zip(samples, fold_of, strict=True)
                    if s.feature_type == ftype and s.label == GOOD and f >= 0}
    held = np.bincount(np.array(list(fold_of_part.values()), dtype=np.int64), minlength=k)
    f = int(np.argmax(held))
    return f, len(fold_of_part) - int(held[f])


def _only_types(ev: Sequence[Sample], shapes: Sequence[tuple[int, int]],
                raw_by_backbone: Mapping[str, torch.Tensor], extractors: Mapping[str, Detector],
                types: Sequence[str]
                ) -> tuple[list[Sample], list[tuple[int, int]], dict[str, torch.Tensor]]:
    """The read samples of ``types``, their shapes and their rows of the raw features (a pad /
    crop / tiled model's: their views', :func:`_layouts`)."""
    keep = [i for i, s in enumerate(ev) if s.feature_type in types]
    raw = {}
    for key, feats in raw_by_backbone.items():
        lays = _layouts(extractors[key].config, shapes)
        raw[key] = feats[keep] if lays is None else feats[tiling.rows_of(lays, keep)]
    return [ev[i] for i in keep], [shapes[i] for i in keep], raw


# how image files become arrays, for the feature cache: a change here invalidates caches written
# before it (session 23: images are turned upright as their EXIF Orientation tag says)
IMAGE_READING = "upright by EXIF orientation"


def _cache_file(cache_dir: Path, samples: Sequence[Sample], detectors: Mapping[str, Detector]) -> Path:
    """Cache file name: a hash of how images are read, of the backbones (config and weights) and
    of every image file (path, size, modification time), so that any change means a new
    extraction."""
    h = hashlib.sha256()
    h.update(IMAGE_READING.encode())
    for key, det in sorted(detectors.items()):
        h.update(f"{key}|{det.extractor.weights_sha256}|".encode())
    for s in samples:
        try:
            st = s.path.stat()
            h.update(f"{s.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{s.path}|missing\n".encode())
    return cache_dir / f"features-{h.hexdigest()[:20]}.safetensors"


def _read_cache(path: Path, samples: Sequence[Sample]
                ) -> tuple[list[Sample], list[tuple[int, int]], dict[str, torch.Tensor], list[str]]:
    with safe_open(str(path), framework="pt") as fh:
        errors = json.loads((fh.metadata() or {})["errors"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (a safetensors handle)
    kept = [samples[int(i)] for i in tensors["kept"]]
    shapes = [(int(h), int(w)) for h, w in tensors["shapes"].tolist()]
    raw = {k.removeprefix("raw/"): v for k, v in tensors.items() if k.startswith("raw/")}
    return kept, shapes, raw, [str(e) for e in errors]


def _write_cache(path: Path, kept: list[int], shapes: list[tuple[int, int]],
                 raw: Mapping[str, torch.Tensor], errors: list[str]) -> None:
    """The raw features as safetensors (never pickle), written beside and renamed into place; a
    cache that cannot be written (full disk, unwritable folder) costs a warning, not the run."""
    tensors = {"kept": torch.tensor(kept, dtype=torch.int64),
               "shapes": torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2),
               **{f"raw/{k}": v.contiguous() for k, v in raw.items()}}
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"errors": json.dumps(errors)})
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(f"feature cache not written ({exc}); the evaluation goes on without it",
                      stacklevel=3)


def _gain_notes(configs: Iterable[DetectorConfig], good: Sequence[Sample]) -> list[str]:
    """:func:`~diffqc.model.gain_clips_note` of each ``backbone.input_gain`` other than 1 among
    the settings, as ``fit`` says it: its GOOD images read once more for their brightness (only
    then; an unreadable one is left to the extraction to name)."""
    gains = sorted({cfg.backbone.input_gain for cfg in configs} - {1.0})
    if not gains:
        return []
    seen = []
    for sample in good:
        with contextlib.suppress(ImageReadError):
            seen.append((sample.feature_type, brightness(read_image(sample.path))))
    lights = image_brightness(seen)
    return [note for gain in gains if (note := gain_clips_note(gain, lights))]


def _extract_cached(
    samples: Sequence[Sample], detectors: Mapping[str, Detector], progress: bool,
    cache_dir: Path | None,
) -> tuple[list[Sample], list[tuple[int, int]], dict[str, torch.Tensor], list[str]]:
    """:func:`_extract_all`, through an optional on-disk cache of the raw features."""
    if cache_dir is None:
        return _extract_all(samples, detectors, progress)
    path = _cache_file(cache_dir, samples, detectors)
    if path.is_file():
        try:
            cached = _read_cache(path, samples)
        except (OSError, SafetensorError, ValueError, KeyError, IndexError) as exc:
            warnings.warn(f"feature cache {path} unreadable ({exc}); extracting the features again",
                          stacklevel=2)
        else:
            if progress:
                print(f"raw features loaded from {path}", file=sys.stderr)
            return cached
    kept, shapes, raw, errors = _extract_all(samples, detectors, progress)
    index = {id(s): i for i, s in enumerate(samples)}
    _write_cache(path, [index[id(s)] for s in kept], shapes, raw, errors)
    return kept, shapes, raw, errors


def _extract_all(
    samples: Sequence[Sample], detectors: Mapping[str, Detector], progress: bool,
) -> tuple[list[Sample], list[tuple[int, int]], dict[str, torch.Tensor], list[str]]:
    """Read every image once and extract raw features for each distinct backbone: each image is
    cut to every backbone's input as soon as it is read, so memory holds one full-size image and
    a chunk of model inputs, whatever the camera's resolution. A pad / crop / tiled model's rows
    are its views, image after image (:func:`_layouts`).

    Returns the samples read, their image shapes, raw features per backbone key, and the errors.
    """
    plain = {key for key, det in detectors.items() if not uses_layouts(det.config)}
    feats: dict[str, torch.Tensor] = {}  # plain: one row per image, filled in place
    view_feats: dict[str, list[torch.Tensor]] = {key: [] for key in detectors if key not in plain}
    kept: list[Sample] = []
    shapes: list[tuple[int, int]] = []
    errors: list[str] = []
    pixels: dict[str, list[torch.Tensor]] = {key: [] for key in detectors}
    rows = dict.fromkeys(plain, 0)

    def flush(key: str) -> None:
        if not pixels[key]:
            return
        det = detectors[key]
        out = raw_features_in_batches(det.extractor, [torch.cat(pixels[key])], det.config.batch_size,
                                      det.device).cpu()
        pixels[key] = []
        if key not in plain:
            view_feats[key].append(out)
            return
        if key not in feats:
            feats[key] = torch.empty((len(samples), *out.shape[1:]), dtype=out.dtype)
        feats[key][rows[key]: rows[key] + out.shape[0]] = out
        rows[key] += out.shape[0]

    bar = tqdm(total=len(samples), desc="reading + extracting features", unit="img",
               disable=not progress)
    for sample in samples:
        try:
            img = read_image(sample.path)
        except ImageReadError as exc:
            errors.append(str(exc))
        else:
            kept.append(sample)
            shapes.append((int(img.shape[0]), int(img.shape[1])))
            for key, det in detectors.items():
                if key in plain:
                    pixels[key].append(to_pixels([img], det.config.backbone.input_size))
                else:
                    pixels[key].append(tiling.view_pixels(img, tiling.plan(shapes[-1], det.config)))
                if sum(p.shape[0] for p in pixels[key]) >= READ_CHUNK:
                    flush(key)
            del img
        bar.update(1)
    for key in detectors:
        flush(key)
    bar.close()
    out = {k: v[: len(kept)] for k, v in feats.items()}
    out.update({k: torch.cat(v) for k, v in view_feats.items() if v})
    return kept, shapes, out, errors


# =========================================================================== the evaluation


def evaluate(
    samples: Sequence[Sample],
    *,
    folds: int = 5,
    methods: Sequence[str] = DEFAULT_METHODS,
    settings: Mapping[str, DetectorConfig] | None = None,
    base_config: DetectorConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    out_dir: Path | str | None = None,
    gallery: int = 8,
    n_boot: int = 1000,
    max_train_good: int | None = None,
    map_side: int = MAP_SIDE,
    device: str | None = None,
    dataset_name: str | None = None,
    dataset_source: str = "",
    feature_cache: Path | str | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    unknown_type: bool = False,
    force: bool = False,
) -> R.Report:
    """k-fold cross-validated evaluation of ``methods`` (and named ``settings``) on ``samples``.

    ``samples``: labelled samples (label 0/1; unlabelled ones are ignored) of any split; all of
    them are cross-validated. ``methods`` are run with ``base_config`` (default config) and its
    ``method`` replaced; ``settings`` maps extra variant names to full configs (e.g. the
    separation loss on). Folds are made per feature type, grouped by ``Sample.group`` (part_id,
    else the image) and stratified by label; all variants see the same folds.
    ``max_train_good`` caps the GOOD training images per type and fold (a seeded subsample) to
    bound the run time. ``gallery``: worst misses per variant (half missed defects, half false
    alarms). When ``out_dir`` is given, report.json / .md / .html are written there: a new or
    empty folder or an earlier report, checked before any work (:func:`report.check_report_target`;
    ``force``: any folder, writing beside what is there and replacing nothing).
    ``feature_cache``: a folder where the raw backbone features are kept between runs (keyed by
    the backbone, its weights and the image files), so a re-run skips the extraction.
    ``runtime``: ``torch``, or ``onnx`` / ``openvino`` to score the held-out parts of each fold with
    ONNX Runtime / OpenVINO (each fold's diffusion model exported in memory, FP32; baselines,
    which have no ONNX export, stay on PyTorch); ``auto`` means ``torch`` here, since an export
    per fold costs more than it saves.
    ``unknown_type``: also score every held-out image with its type withheld (the fold model's
    type router picks it, as ``diffqc inspect`` without ``--feature-type`` does); the report's
    ``unknown_type`` entry holds, per variant, the type accuracy and the image AUROC per true type
    of the scores under the routed type (:func:`unknown_type_summary`).
    """
    if runtime not in ("torch", "onnx", "openvino", "auto"):
        raise ConfigError(f"runtime must be torch, onnx, openvino or auto, got {runtime!r}")
    if runtime in ("onnx", "openvino"):  # before any work, not after the features are extracted
        from diffqc.backends.graph import import_onnx
        from diffqc.backends.openvino import import_openvino
        from diffqc.backends.ort import import_onnxruntime

        import_onnx()
        if runtime == "onnx":
            import_onnxruntime()
        else:
            import_openvino()
    if out_dir is not None:
        R.check_report_target(out_dir, force=force)
    t_start = time.perf_counter()
    base = base_config or DetectorConfig()
    variants_cfg: dict[str, DetectorConfig] = {}
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; use {', '.join(METHODS)}")
        variants_cfg[m] = replace(base, method=m)
    for name, cfg in (settings or {}).items():
        if name in variants_cfg:
            raise ConfigError(f"setting name {name!r} clashes with a method name")
        variants_cfg[name] = cfg
    if not variants_cfg:
        raise ConfigError("nothing to evaluate: no methods and no settings")
    for cfg in variants_cfg.values():
        check_trainable(cfg)  # before any feature is extracted
    shaped = sorted(name for name, cfg in variants_cfg.items() if uses_layouts(cfg))
    if shaped and runtime in ("onnx", "openvino"):
        raise ConfigError(f"{', '.join(shaped)}: pad, crop and tiled models run with PyTorch only "
                          f"(diffqc export refuses them); evaluate them with --runtime torch")
    for name, cfg in variants_cfg.items():
        other = [(f"calibration.{key}", getattr(cfg.calibration, key), getattr(base.calibration, key))
                 for key in ("alpha_review", "alpha_reject")
                 if getattr(cfg.calibration, key) != getattr(base.calibration, key)]
        if other:
            raise ConfigError(
                f"variant {name!r} sets other α levels ({', '.join(f'{k} {v:g}' for k, v, _ in other)}) than "
                f"the others ({', '.join(f'{b:g}' for _, _, b in other)}): a report has one decision rule; "
                f"for the rates at those levels evaluate again with "
                f"{' '.join(f'--set {k}={v:g}' for k, v, _ in other)} (every method; --feature-cache DIR "
                "spares the second run the backbone), or read the realised FPR at α up to 0.2 in the "
                "report's calibration plot (report.json keeps every out-of-fold p-value)")

    notes: list[str] = []
    labelled = [s for s in samples if s.label in (GOOD, DEFECTIVE)]
    if len(labelled) < len(samples):
        notes.append(f"{len(samples) - len(labelled)} unlabelled sample(s) ignored")
    labelled, data_notes = without_copies(labelled)
    data_notes += label_shortcuts(labelled)
    notes += data_notes
    for msg in data_notes:
        warnings.warn(msg, DatasetWarning, stacklevel=2)
    types, type_notes = _eligible_types(labelled, folds)
    labelled = [s for s in labelled if s.feature_type in types]
    types, fold_notes = _trainable_types(labelled, folds, seed)  # the folds, before any work
    type_notes += fold_notes
    notes += type_notes
    for msg in type_notes:
        warnings.warn(msg, stacklevel=2)
    labelled = [s for s in labelled if s.feature_type in types]
    if not labelled:
        raise DatasetError(f"no feature type has enough labelled parts for {folds} folds: "
                           + "; ".join(type_notes))
    if note := twelve_bit_note(base, [s.path for s in labelled if s.label == GOOD]):
        notes.append(note)
        warnings.warn(note, stacklevel=2)
    for note in _gain_notes(variants_cfg.values(), [s for s in labelled if s.label == GOOD]):
        notes.append(note)
        warnings.warn(note, stacklevel=2)
    labelled, unread = _without_unreadable_masks(labelled)
    if unread:
        notes.append(f"{len(unread)} defect mask(s) unreadable, their images left out of the pixel "
                     f"metrics (still in the image metrics): {first_few(unread)}")
        warnings.warn(notes[-1], DatasetWarning, stacklevel=2)

    # ---- features, once
    t0 = time.perf_counter()
    extractors: dict[str, Detector] = {}
    for cfg in variants_cfg.values():
        det = extractors.setdefault(_backbone_key(cfg), Detector(cfg, device=device))
        fe = det.extractor  # every image's features are kept, and one fold's model at a time
        check_fit_memory(cfg, fe.grid, fe.channels, len(types), len(labelled), str(det.device),
                         views=views_to_fit(cfg, [s.path for s in labelled]))
    ev, shapes, raw_by_backbone, errors = _extract_cached(
        labelled, extractors, progress, None if feature_cache is None else Path(feature_cache))
    extract_seconds = time.perf_counter() - t0
    if errors:
        shown = first_few(errors)
        if not ev:
            raise DatasetError(f"none of the {len(errors)} images could be read: {shown}")
        notes.append(f"{len(errors)} unreadable image(s) left out of the evaluation: {shown}")
        warnings.warn(notes[-1], DatasetWarning, stacklevel=2)
        # the folds again without them: a type may be left short of GOOD parts in a fold
        types, late = _eligible_types(ev, folds)
        types, fold_notes = _trainable_types([s for s in ev if s.feature_type in types], folds, seed)
        for msg in late + fold_notes:
            notes.append(msg)
            warnings.warn(msg, stacklevel=2)
        if not types:
            raise DatasetError(f"no feature type has enough readable labelled parts for {folds} folds: "
                               + "; ".join(late + fold_notes))
        if late or fold_notes:
            ev, shapes, raw_by_backbone = _only_types(ev, shapes, raw_by_backbone, extractors, types)
    n = len(ev)
    y = np.array([s.label for s in ev], dtype=np.int64)
    stypes = [s.feature_type for s in ev]

    # ---- folds, identical for every variant
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold_of = per_type_folds(ev, folds, seed)
    notes += _grouped_by_type([str(w.message) for w in caught])
    type_idx = {t: np.flatnonzero(np.array(stypes) == t) for t in types}
    has_masks = {t: any(ev[i].mask_path is not None for i in type_idx[t] if y[i] == DEFECTIVE)
                 for t in types}
    map_sizes = [_map_size(sh, map_side) for sh in shapes]
    layouts = {key: _layouts(det.config, shapes) for key, det in extractors.items()}

    # ---- fit / calibrate / score per fold and variant
    rng = np.random.default_rng(seed)
    train_good: list[np.ndarray] = []
    for f in range(folds):
        idx = np.flatnonzero((fold_of >= 0) & (fold_of != f) & (y == GOOD))
        if max_train_good is not None:
            keep = []
            for t in types:
                of_t = idx[np.isin(idx, type_idx[t])]
                if of_t.size > max_train_good:
                    of_t = np.sort(rng.choice(of_t, max_train_good, replace=False))
                keep.append(of_t)
            idx = np.sort(np.concatenate(keep))
        train_good.append(idx)
    if max_train_good is not None:
        notes.append(f"GOOD training images capped at {max_train_good} per type and fold "
                     f"(seeded subsample, seed {seed}); held-out folds are complete")

    variants = {name: _Variant.empty(name, cfg, n) for name, cfg in variants_cfg.items()}
    if unknown_type:
        for v in variants.values():
            v.routed_type, v.routed_z = [None] * n, np.full(n, np.nan)
    calib_msgs: set[str] = set()
    jobs = list(itertools.product(range(folds), variants))
    bar = tqdm(jobs, desc="folds x methods", unit="fit", disable=not progress)
    for f, name in bar:
        v = variants[name]
        bar.set_postfix_str(f"fold {f + 1}/{folds} {name}")
        test = np.flatnonzero(fold_of == f)
        tr = train_good[f]
        raw = raw_by_backbone[_backbone_key(v.config)]
        lays = layouts[_backbone_key(v.config)]
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = Detector(v.config, device=device)
            det.extractor_ = _copy_extractor(extractors[_backbone_key(v.config)])
            if lays is None:
                det.fit_features(raw[tr], [ev[i] for i in tr])
            else:
                det.fit_features(raw[tiling.rows_of(lays, tr.tolist())], [ev[i] for i in tr],
                                 layouts=[lays[i] for i in tr])
        for w in caught:
            if issubclass(w.category, CalibrationWarning):
                calib_msgs.add(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        t2 = time.perf_counter()
        cal = cast(Calibrator, det.calibration_)
        std = {t: standardiser(cal.known[t].scores) for t in types}
        for t in types:
            c, s = std[t]
            th = cal.thresholds(t)  # the fold model's α levels are the report's (checked above)
            v.review_z.setdefault(t, []).append((th["review"] - c) / s)
            v.reject_z.setdefault(t, []).append((th["reject"] - c) / s)
            v.train_images.setdefault(t, []).append(int(np.isin(tr, type_idx[t]).sum()))
        scorer: Any = det
        if runtime in ("onnx", "openvino") and v.config.method == "diffusion":
            from diffqc.export import onnx_detector

            scorer = onnx_detector(det, threads=threads, runtime=runtime)
        for chunk in _chunks(test.size, INSPECT_CHUNK):
            ids = test[chunk]
            results = _score_held_out(scorer, raw, lays, ids, [stypes[i] for i in ids],
                                      [map_sizes[i] for i in ids])
            for i, r in zip(ids, results, strict=True):
                c, s = std[stypes[i]]
                v.raw[i], v.p[i], v.decision[i] = r.score, r.p_value, r.decision
                v.z[i] = (r.score - c) / s
                if r.anomaly_map is not None:
                    v.maps[i] = np.clip((r.anomaly_map - c) / s, -6e4, 6e4).astype(np.float16)
            if unknown_type:
                routed = _score_held_out(scorer, raw, lays, ids, [None] * ids.size, None)
                for i, r in zip(ids, routed, strict=True):
                    c, s = std[r.feature_type]  # fit on GOOD parts of every type in `types`
                    v.routed_type[i], v.routed_z[i] = r.feature_type, (r.score - c) / s
        v.fit_seconds.append(t2 - t1)
        v.inspect_seconds.append(time.perf_counter() - t2)
        if progress:
            tqdm.write(f"fold {f + 1}/{folds} {name}: fit {t2 - t1:.0f} s, scored {test.size} "
                       f"held-out images in {time.perf_counter() - t2:.0f} s", file=sys.stderr)
        del det
    bar.close()
    if calib_msgs:
        notes.append(f"calibration warnings in the fold models ({len(calib_msgs)} distinct), "
                     f"e.g.: {sorted(calib_msgs)[0]}")
    first = next(iter(variants.values()))  # every GOOD image is scored out of fold once
    if suspects := suspect_images((stypes[i], float(first.raw[i]), path_text(ev[i].path))
                                  for i in range(n) if y[i] == GOOD and np.isfinite(first.raw[i])):
        notes.append(suspects_note(
            suspects, images="GOOD image(s)", scored_by=f"scored out of fold by {first.name}",
            harm=COUNTED_FLAGGED, then="label them defective and evaluate again"))
        warnings.warn(notes[-1], DatasetWarning, stacklevel=2)

    report = _build_report(
        ev=ev, y=y, stypes=stypes, types=types, fold_of=fold_of, folds=folds, seed=seed,
        variants=variants, has_masks=has_masks, map_sizes=map_sizes, base=base, n_boot=n_boot,
        gallery=gallery, notes=notes, dataset_name=dataset_name, dataset_source=dataset_source,
    )
    extra = cast(dict[str, Any], report)
    if unknown_type:
        extra["unknown_type"] = {
            name: unknown_type_summary(y, stypes, v.routed_type, v.routed_z, v.z)
            for name, v in variants.items()}
    extra["run"] = {
        "variants": {name: cfg.to_dict() for name, cfg in variants_cfg.items()},
        "max_train_good": max_train_good,
        "map_side": map_side,
        "n_boot": n_boot,
        "seconds": {
            "extract_features": round(extract_seconds, 1),
            "fit": {name: [round(x, 1) for x in v.fit_seconds] for name, v in variants.items()},
            "score": {name: [round(x, 1) for x in v.inspect_seconds] for name, v in variants.items()},
            "total": round(time.perf_counter() - t_start, 1),
        },
    }
    if out_dir is not None:
        paths = R.write_report(report, out_dir)
        extra["paths"] = {k: str(p) for k, p in paths.items()}
    return report


# =========================================================================== the report dict


def _score_held_out(scorer: Any, raw: torch.Tensor, layouts: Sequence[tiling.Layout] | None,
                    ids: np.ndarray, types: Sequence[str | None],
                    map_sizes: Sequence[tuple[int, int]] | None) -> list[Any]:
    """The fold model's inspections of held-out images ``ids`` under ``types`` (None: routed),
    with maps at ``map_sizes`` (None: no maps), from their raw features (their views' rows for a
    pad / crop / tiled model)."""
    if layouts is None:
        return list(scorer.inspect_features(raw[ids], types, map_sizes, all_types=False))
    given = [None if t is None else scorer.type_index(t) for t in types]
    return tiling.inspect_views(scorer, raw[tiling.rows_of(layouts, ids.tolist())], [layouts[i] for i in ids],
                                given, map_sizes is not None, all_types=False, map_sizes=map_sizes)


def unknown_type_summary(y: np.ndarray, true_types: Sequence[str], routed_types: Sequence[str | None],
                         routed_scores: np.ndarray, known_scores: np.ndarray) -> dict[str, Any]:
    """Type withheld vs given, over the evaluated images: the share routed to their true type
    (all, and GOOD / defective), and per true type the image AUROC of the scores under the routed
    type beside that of the scores under the given type; ``mean_*``: the mean over the types
    where both classes occur. :func:`evaluate` passes out-of-fold scores pooled on the
    calibration-standardised scale (``POOLING_NOTE``; a routed score standardised as the routed
    type's), so "given" is the table's pooled AUROC."""
    truth = np.asarray(true_types, dtype=object)
    hit = np.array([r == t for r, t in zip(routed_types, true_types, strict=True)])
    per_type: dict[str, dict[str, float]] = {}
    for t in sorted(set(true_types)):
        m = truth == t
        row = {"images": int(m.sum()), "type_accuracy": float(hit[m].mean())}
        if has_both_classes(y[m]):
            row["auroc_type_withheld"] = image_auroc(y[m], routed_scores[m])
            row["auroc_type_given"] = image_auroc(y[m], known_scores[m])
        per_type[t] = row
    scored = [r for r in per_type.values() if "auroc_type_withheld" in r]

    def mean(values: Sequence[float] | np.ndarray) -> float:
        return float(np.mean(values)) if len(values) else float("nan")

    return {
        "type_accuracy": mean(hit),
        "type_accuracy_good": mean(hit[y == GOOD]),
        "type_accuracy_defective": mean(hit[y == DEFECTIVE]),
        "mean_auroc_type_withheld": mean([r["auroc_type_withheld"] for r in scored]),
        "mean_auroc_type_given": mean([r["auroc_type_given"] for r in scored]),
        "per_type": per_type,
    }


def _mask_problem(path: Path) -> str | None:
    """Why a mask cannot be read whole (missing, not an image, too large, corrupt or truncated:
    it is decoded, as :func:`~diffqc.data.read_mask` reads it later); None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as exc:  # a header read, the pixels not
                return f"corrupt or truncated: {exc}"
    except (OSError, UnidentifiedImageError) as exc:  # the latter is an OSError too
        return exc.strerror or "not an image"
    except Image.DecompressionBombError:
        return "larger than the image size limit"
    return None


def _without_unreadable_masks(samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """The samples with each unreadable mask (:func:`_mask_problem`) dropped to None (unknown),
    and the reasons; checked before any work, as a missing or truncated mask used to stop the
    evaluation after every fold was fitted."""
    out: list[Sample] = []
    unread: list[str] = []
    for s in samples:
        if s.mask_path is not None and (why := _mask_problem(s.mask_path)) is not None:
            unread.append(f"{s.mask_path} ({why})")
            s = replace(s, mask_path=None)
        out.append(s)
    return out, unread


def _masks_for(ev: Sequence[Sample], ids: np.ndarray, y: np.ndarray,
               map_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray | None]:
    """Ground-truth masks at the stored map size (GOOD: all clean; defective without a mask: None)."""
    out: list[np.ndarray | None] = []
    for i in ids:
        s = ev[i]
        if y[i] == GOOD:
            out.append(np.zeros(map_sizes[i], dtype=bool))
        elif s.mask_path is None:
            out.append(None)
        else:
            out.append(read_mask(s.mask_path, map_sizes[i]))
    return out


def _maps_for(v: _Variant, ids: np.ndarray) -> list[np.ndarray]:
    out = []
    for i in ids:
        m = v.maps[i]
        out.append(np.zeros((1, 1), np.float32) if m is None else m.astype(np.float32))
    return out


def _overall_pixels(result: R.MethodResult, y: np.ndarray, fold_of: np.ndarray, folds: int,
                    masks: list[np.ndarray | None], maps: list[np.ndarray]) -> None:
    """Fill the pixel metrics of an overall result from the types that have masks."""
    pooled = R.compute_metrics(y, np.zeros(y.size), masks=masks, maps=maps)
    for key in ("pixel_auroc", "aupro"):
        result["pooled"][key] = pooled[key]
    for f in range(folds):
        idx = np.flatnonzero(fold_of == f)
        m = R.compute_metrics(y[idx], np.zeros(idx.size), masks=[masks[i] for i in idx],
                              maps=[maps[i] for i in idx])
        for key in ("pixel_auroc", "aupro"):
            result["folds"][f][key] = m[key]
    result["summary"] = R.summarise(result["folds"])


def _build_report(
    *, ev: Sequence[Sample], y: np.ndarray, stypes: Sequence[str], types: Sequence[str],
    fold_of: np.ndarray, folds: int, seed: int, variants: Mapping[str, _Variant],
    has_masks: Mapping[str, bool], map_sizes: Sequence[tuple[int, int]], base: DetectorConfig,
    n_boot: int, gallery: int, notes: list[str], dataset_name: str | None, dataset_source: str,
) -> R.Report:
    type_arr = np.array(stypes)
    counts = {}
    for t in types:
        ids = np.flatnonzero(type_arr == t)
        counts[t] = R.TypeCounts(n_good=int((y[ids] == GOOD).sum()),
                                 n_defective=int((y[ids] == DEFECTIVE).sum()),
                                 n_groups=len({ev[int(i)].group for i in ids}))
    by_part = any(s.part_id for s in ev)
    grouping = ("part_id from the manifest (else the source image)" if by_part
                else "source image (no part_id given)")
    rule = base.calibration
    report = R.new_report(
        dataset=R.DatasetInfo(name=dataset_name or "dataset", source=dataset_source,
                              feature_types=counts),
        methods=list(variants),
        folds=R.FoldInfo(k=folds, seed=seed, grouping=grouping),
        decision_rule=R.DecisionRule(alpha_review=rule.alpha_review, alpha_reject=rule.alpha_reject),
        title=f"diffqc evaluation: {dataset_name}" if dataset_name else "diffqc evaluation report",
    )
    plots = report["plots"]
    names = list(variants)
    mask_ids = np.flatnonzero(np.isin(type_arr, [t for t in types if has_masks[t]]))
    all_masks = _masks_for(ev, mask_ids, y, map_sizes) if mask_ids.size else []

    for t in types:
        ids = np.flatnonzero(type_arr == t)
        yt, ft = y[ids], fold_of[ids]
        masks = _masks_for(ev, ids, y, map_sizes) if has_masks[t] else None
        report["results"][t] = {}
        for name, v in variants.items():
            maps = _maps_for(v, ids) if masks is not None else None
            report["results"][t][name] = R.method_result(
                yt, v.z[ids], ft, v.decision[ids], masks=masks, maps=maps, k=folds,
                n_boot=n_boot, seed=seed)
            plots["roc"].setdefault(t, {})[name] = R.roc_entry(yt, v.z[ids])
            plots["histograms"].setdefault(t, {})[name] = R.histogram_entry(
                yt, v.z[ids], v.review_z[t], v.reject_z[t])
        inside = ids[fold_of[ids] >= 0]
        for name, v in variants.items():
            report.setdefault("by_defect", []).extend(R.defect_kind_results(
                t, name, y[inside], v.z[inside], [ev[int(i)].defect for i in inside],
                v.decision[inside], n_boot=n_boot, seed=seed))
        n_train = float(np.mean(variants[names[0]].train_images[t]))
        for a, b in itertools.combinations(names, 2):
            report["comparisons"].append(_compare(
                t, a, b, yt, variants[a].z[ids], variants[b].z[ids], ft, n_train, folds))

    overall: dict[str, R.MethodResult] = {}
    for name, v in variants.items():
        res = R.method_result(y, v.z, fold_of, v.decision, k=folds, n_boot=n_boot, seed=seed)
        if mask_ids.size:
            _overall_pixels(res, y[mask_ids], fold_of[mask_ids], folds, all_masks,
                            _maps_for(v, mask_ids))
        overall[name] = res
        plots["calibration"][name] = R.calibration_entry(
            y, rule.alpha_review, rule.alpha_reject, p_values=v.p, decisions=v.decision)
    report["overall"] = overall
    if len(types) > 1:
        n_train_all = float(np.mean([sum(variants[names[0]].train_images[t][f] for t in types)
                                     for f in range(folds)]))
        for a, b in itertools.combinations(names, 2):
            report["comparisons"].append(_compare(
                R.OVERALL, a, b, y, variants[a].z, variants[b].z, fold_of, n_train_all, folds))
    report["comparisons"] = R.apply_holm(report["comparisons"])
    held = np.flatnonzero(fold_of >= 0)
    parts = {name: M.part_decision_metrics([ev[int(i)].part_id for i in held], [stypes[int(i)] for i in held],
                                           y[held], v.decision[held]) for name, v in variants.items()}
    if all(parts.values()):  # the same parts for every variant
        report["parts"] = cast(dict[str, M.PartRates], parts)
    plots["gallery"] = _gallery(ev, y, stypes, fold_of, variants, gallery)
    report["notes"] = [
        POOLING_NOTE,
        "Histogram lines are the score thresholds of the decision rule in use per fold (conformal; "
        "beyond the largest calibration score, the exponential tail), on the same scale.",
        *_timing_notes(variants),
        *notes,
    ]
    extra = cast(dict[str, Any], report)
    extra["out_of_fold"] = [
        {"path": str(s.path), "feature_type": s.feature_type, "label": int(y[i]),
         "defect": s.defect, "group": s.group, "fold": int(fold_of[i]),
         "score": {name: v.z[i] for name, v in variants.items()},
         "raw_score": {name: v.raw[i] for name, v in variants.items()},
         "p_value": {name: v.p[i] for name, v in variants.items()},
         "decision": {name: str(v.decision[i]) for name, v in variants.items()}}
        for i, s in enumerate(ev)
    ]
    return report


def _compare(ftype: str, a: str, b: str, y: np.ndarray, za: np.ndarray, zb: np.ndarray,
             fold_of: np.ndarray, n_train: float, folds: int) -> R.Comparison:
    """:func:`report.compare_methods`; the pooled AUROCs are filled in even where DeLong's test
    is undefined (fewer than two parts in a class)."""
    c = R.compare_methods(ftype, a, b, y, za, zb, fold_of, n_train=n_train, k=folds)
    if not math.isfinite(c["auroc_a"]):
        inside = fold_of >= 0
        c["auroc_a"] = R.M.image_auroc(y[inside], za[inside])
        c["auroc_b"] = R.M.image_auroc(y[inside], zb[inside])
        c["delta"] = c["auroc_a"] - c["auroc_b"]
    return c


def _timing_notes(variants: Mapping[str, _Variant]) -> list[str]:
    out = []
    for name, v in variants.items():
        if v.fit_seconds:
            out.append(f"{name}: fit {np.mean(v.fit_seconds):.0f} s per fold (total "
                       f"{np.sum(v.fit_seconds):.0f} s), scoring the held-out folds "
                       f"{np.sum(v.inspect_seconds):.0f} s in total")
    return out


def _gallery(ev: Sequence[Sample], y: np.ndarray, stypes: Sequence[str], fold_of: np.ndarray,
             variants: Mapping[str, _Variant], per_variant: int) -> list[R.GalleryItem]:
    """Worst misses of each variant on the pooled scale, with heat-map overlays.

    The colour scale of every overlay runs from the median GOOD calibration score (0 on the
    pooled scale) to the fold's REJECT threshold (or the map's maximum when that is higher), so
    a missed defect looks as dim as the model saw it."""
    items: list[R.GalleryItem] = []
    if per_variant <= 0:
        return items
    k_miss = (per_variant + 1) // 2
    k_alarm = per_variant // 2
    for name, v in variants.items():
        picks = R.worst_misses(y, v.z, [str(d) for d in v.decision], k=max(k_miss, k_alarm))
        chosen = [p for p in picks if y[p[0]] == 1][:k_miss] + [p for p in picks if y[p[0]] == 0][:k_alarm]
        for i, kind in chosen:
            item = R.GalleryItem(
                feature_type=stypes[i], method=name, kind=kind, path=str(ev[i].path),
                label=int(y[i]), score=float(v.z[i]), decision=str(v.decision[i]),
                p_value=float(v.p[i]))
            amap = v.maps[i]
            if amap is not None:
                try:
                    image = as_read(read_image(ev[i].path), v.config.backbone.input_gain)
                except ImageReadError:
                    image = None
                if image is not None:
                    m = amap.astype(np.float32)
                    f, t = int(fold_of[i]), stypes[i]
                    top = next((x for x in (v.reject_z[t][f], v.review_z[t][f]) if math.isfinite(x)),
                               1.0)
                    item["overlay_png"] = R.overlay_png_base64(
                        image, m, vmin=0.0, vmax=max(float(m.max()), top, 1e-3))
            items.append(item)
    return items


# =========================================================================== text summary


def _f(x: Any, kind: str = "num") -> str:
    return R.fmt(x if x is None or not isinstance(x, float) or math.isfinite(x) else None, kind)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A compact plain-text table of the report: one row per type and method (with the pixel
    AUROC where some type has defect masks), then comparisons."""
    pixels = R.has_pixel_metrics(report)
    rows = [("type", "method", "GOOD/def", "AUROC [95% CI]", "folds mean±sd", "AUPR",
             "TPR@5%", *(("pixel AUROC",) if pixels else ()), "FPR !PASS", "recall !PASS",
             "REVIEW", "REJECT", "")]

    def add(ftype: str, name: str, r: Mapping[str, Any]) -> None:
        p, s, ci = r["pooled"], r["summary"]["auroc"], r["auroc_ci"]
        rows.append((
            ftype, name, f"{r['n_good']}/{r['n_defective']}",
            f"{_f(p['auroc'])} [{_f(ci[0])}, {_f(ci[1])}]",
            f"{_f(s['mean'])}±{_f(s['sd'])}", _f(p["aupr"]), _f(p["tpr_at_5fpr"]),
            *((_f(p.get("pixel_auroc")),) if pixels else ()),
            _f(p["fpr_flagged"], "pct"), _f(p["recall_flagged"], "pct"),
            _f(p["share_review"], "pct"), _f(p["share_reject"], "pct"),
            "UNRELIABLE" if r["unreliable"] else ""))

    for ftype, per in report["results"].items():
        for name, r in per.items():
            add(ftype, name, r)
    for name, r in (report.get("overall") or {}).items():
        add(R.OVERALL, name, r)
    lines = text_columns(rows)
    why: dict[str, list[str]] = {}  # each reason once, with its types (the report's badge says it)
    for ftype, per in [*report["results"].items(), (R.OVERALL, report.get("overall") or {})]:
        for r in per.values():
            if r["unreliable"] and ftype not in why.setdefault(r["reason"], []):
                why[r["reason"]].append(ftype)
    if why:
        lines += ["", *(f"UNRELIABLE ({', '.join(types)}): {reason}" for reason, types in why.items())]
    if report.get("parts"):
        data = dict(report)
        lines += ["", R.parts_lead(data), *text_columns([R.PARTS_HEADER, *R.part_rows(data)])]
    if report["comparisons"]:
        comp = [("type", "A vs B", "ΔAUROC", "DeLong p", "p Holm", "NB p", "p Holm", "d_z")]
        for c in report["comparisons"]:
            comp.append((c["feature_type"], f"{c['method_a']} vs {c['method_b']}",
                         _f(c["delta"], "signed"), _f(c["delong_p"], "p"),
                         _f(c["delong_p_holm"], "p"), _f(c["nb_p"], "p"), _f(c["nb_p_holm"], "p"),
                         _f(c["effect_size"])))
        lines += ["", *text_columns(comp)]
    if report.get("unknown_type"):
        unk = [("method", "type withheld: accuracy", "GOOD", "defective", "mean AUROC withheld", "given")]
        for name, u in report["unknown_type"].items():
            unk.append((name, _f(u["type_accuracy"], "pct"), _f(u["type_accuracy_good"], "pct"),
                        _f(u["type_accuracy_defective"], "pct"), _f(u["mean_auroc_type_withheld"]),
                        _f(u["mean_auroc_type_given"])))
        lines += ["", *text_columns(unk)]
    return lines


# =========================================================================== CLI


def load_evaluation_data(data: Path | str) -> tuple[list[Sample], str]:
    """Samples of DATA and a description of the source. A folder's ``manifest.csv`` is preferred
    to its MVTec layout, because only the manifest carries ``part_id`` (the grouping unit)."""
    from diffqc.data import load_dataset, load_manifest, unlisted_images

    path = Path(data)
    if path.is_dir() and (path / "manifest.csv").is_file():
        listed = load_manifest(path / "manifest.csv")
        if unlisted := unlisted_images(path, listed):
            warnings.warn(f"{path / 'manifest.csv'} does not list {len(unlisted)} image(s) of its folder "
                          f"({first_few([str(p) for p in unlisted], 3)}): evaluate reads a folder's "
                          "manifest.csv (its part ids group the folds) and leaves them out, where "
                          "train, test and data info read the folder; write the manifest again with "
                          "them, or evaluate a copy of the folder without it", DatasetWarning, stacklevel=2)
        return listed, str(path / "manifest.csv")
    return load_dataset(path), str(path)


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not rest.strip():
        methods = not sep and all(m.strip() in METHODS for m in text.split(","))
        raise ConfigError(f"--compare-setting expects NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}"
                          + (f": methods are compared with --methods (default {','.join(METHODS)}); "
                             "--compare-setting adds a variant of the first method's config"
                             if methods else ""))
    return name, parse_overrides([p for p in _split_top_level(rest) if p.strip()])


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets, so that list values such as
    ``scoring.bank_timesteps=[100,200]`` stay one pair."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffqc.commands import model_overrides

    base = with_overrides(DetectorConfig(), {**model_overrides(args, seed=False),
                                                **parse_overrides(args.set or [])})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings: dict[str, DetectorConfig] = {}
    # a setting varies the first method unless it names its own
    setting_base = replace(base, method=methods[0]) if methods else base
    for text in args.compare_setting or []:
        name, over = parse_setting(text)
        settings[name] = with_overrides(setting_base, over)
    R.check_report_target(args.out, force=args.force)
    samples, source = load_evaluation_data(args.data)
    name = Path(args.data).name if Path(args.data).is_dir() else Path(args.data).parent.name
    report = evaluate(samples, folds=args.folds, methods=methods, settings=settings,
                      base_config=base, seed=args.seed, progress=not args.quiet,
                      gallery=args.gallery, n_boot=args.n_boot, max_train_good=args.max_train_good,
                      device=args.device, dataset_name=name, dataset_source=source,
                      feature_cache=args.feature_cache, runtime=args.runtime, threads=args.threads,
                      unknown_type=args.unknown_type)
    print("\n".join(summary_lines(report)))  # before the files: a full disk does not lose the table
    paths = R.write_report(report, args.out)
    print()
    for kind in ("html", "md", "json"):
        print(f"report.{kind}: {paths[kind]}")
    return 0


__all__ = ["DEFAULT_METHODS", "evaluate",
           "load_evaluation_data", "parse_setting", "summary_lines", "unknown_type_summary"]
