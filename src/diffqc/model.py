"""The Detector facade: fit / inspect / save / load.

``fit`` takes GOOD images of every feature type, holds out a calibration slice per type
(grouped by part, never used to fit), extracts frozen backbone features, fits the scorer
(the class-conditional diffusion model, or a PatchCore / PaDiM baseline over the same
features), and calibrates conformal p-values per type.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from diffqc import __version__, routing, tiling
from diffqc.backbone import (
    FeatureExtractor,
    raw_features_in_batches,
    resolve_device,
    to_pixels,
)
from diffqc.baselines import PatchCoreScorer
from diffqc.bundle import (
    PREVIOUS_FOLDER,
    changed_settings,
    changed_text,
    check_bundle_target,
    check_weights,
    edited_levels,
    install_bundle,
    is_bundle,
    metadata_text,
    read_bundle,
    retrain_text,
)
from diffqc.calibration import (
    LEARNT_OR_RAISED,
    CalibrationWarning,
    Calibrator,
    part_levels_warning,
    suspect_images,
    suspects_note,
)
from diffqc.config import (
    CalibrationConfig,
    DetectorConfig,
    check_trainable,
    fitted_settings,
    recorded_name,
    uses_layouts,
)
from diffqc.data import (
    DatasetWarning,
    Sample,
    check_type_names,
    file_compression,
    fingerprint,
    good_training,
    image_shape,
    iter_images,
    samples_of,
    sixteen_bit_white,
    without_copies,
)
from diffqc.errors import (
    BundleError,
    ConfigError,
    DatasetError,
    ImageReadError,
    NotFittedError,
    OutputError,
    out_of_memory,
    unknown_feature_type,
)
from diffqc.heatmap import PatchMemory, fit_memory
from diffqc.inspection import (
    BUNDLE_FILES,
    BUNDLE_FORMAT,
    ImageCheck,
    Inspection,
    as_arrays,
    brightness,
    detector_repr,
    image_brightness,
    image_colours,
    image_compressions,
    image_size_ranges,
    image_white,
    in_batches,
    inspect_arguments,
    inspect_in_batches,
    is_grey,
    sha256_file,
    verdicts,
    warn_outside,
    white_share,
)
from diffqc.machine import cgroup_memory_room
from diffqc.metrics import types_per_part
from diffqc.output import (
    PARTIAL_PREFIX,
    folder_bytes,
    interrupted_saves,
    path_text,
    with_plain_modes,
)
from diffqc.scoring import DiffusionScorer, aggregate, upsample_and_smooth

if TYPE_CHECKING:
    from PIL import Image


class Scorer(Protocol):
    def fit(self, features: Tensor, type_idx: Tensor, n_types: int, *, progress: bool = False) -> Self: ...
    def score_maps(self, features: Tensor, type_idx: Tensor) -> Tensor: ...
    def state_tensors(self) -> dict[str, Tensor]: ...


def make_scorer(config: DetectorConfig) -> Scorer:
    if config.method == "diffusion":
        return DiffusionScorer(config)
    from diffqc import baselines

    return baselines.scorer_for(config)


def load_scorer(config: DetectorConfig, tensors: dict[str, Tensor], n_types: int, channels: int) -> Scorer:
    if config.method == "diffusion":
        return DiffusionScorer.from_state(config, tensors, n_types, channels)
    from diffqc import baselines

    return baselines.load_scorer(config, tensors, n_types, channels)


def split_calibration(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices (fit, calibration) per type, grouped by part; every type keeps >= 1 on each side,
    and >= 2 to calibrate where it has 3 parts or more: from a single calibration score no tail
    can be fitted, so no part of the type could ever be flagged (``fraction`` 0.2 of up to 7 parts
    rounds to 1). A type with fewer than 2 GOOD parts is a :class:`DatasetError` naming it."""
    rng = np.random.default_rng(seed)
    fit_idx: list[int] = []
    cal_idx: list[int] = []
    by_type: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.feature_type, {}).setdefault(s.group, []).append(i)
    few = {t: len(g) for t, g in sorted(by_type.items()) if len(g) < 2}
    if few:
        listed = ", ".join(f"{t!r} ({n})" for t, n in few.items())
        raise DatasetError(f"too few GOOD training parts to calibrate: {listed}; every type needs at "
                           "least 2 (one to fit, one to calibrate), and >= 20 for a REVIEW level "
                           "that the calibration alone can reach")
    for t in sorted(by_type):
        groups = sorted(by_type[t])
        order = rng.permutation(len(groups))
        n_cal = min(len(groups) - 1, max(2, round(fraction * len(groups))))
        for rank, g in enumerate(order):
            (cal_idx if rank < n_cal else fit_idx).extend(by_type[t][groups[g]])
    return sorted(fit_idx), sorted(cal_idx)


def cross_folds(samples: Sequence[Sample], k: int, seed: int) -> list[list[int]]:
    """``k`` folds of sample indices for cross-conformal calibration: each type's parts (groups)
    shuffled and dealt round-robin, so a part never straddles folds and every fold holds about a
    ``1/k`` share of every type. Empty folds are dropped."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    by_type: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.feature_type, {}).setdefault(s.group, []).append(i)
    for t in sorted(by_type):
        groups = sorted(by_type[t])
        for rank, g in enumerate(rng.permutation(len(groups))):
            folds[rank % k].extend(by_type[t][groups[g]])
    return [sorted(f) for f in folds if f]


def _held_model(folder: Path) -> str:
    """What a save's leftover ``folder`` holds whole, for its warning: a bundle set aside (one a
    `train --undo` cut short was putting back is there, under ``previous/``), or nothing said."""
    for held in (folder, folder / PREVIOUS_FOLDER):
        if is_bundle(held) and (model_id := metadata_text(held, "model_id")):
            return f", holding the model {model_id} whole: its files are in {path_text(held)}"
    return ""


def twelve_bit_note(config: DetectorConfig, good: Sequence[Path | str]) -> str | None:
    """What ``fit`` and ``evaluate`` say of GOOD images that are 16-bit files holding 10- to
    14-bit data (:func:`diffqc.data.sixteen_bit_white`) read at gain 1: nearly black."""
    if config.backbone.input_gain != 1.0 or not (white := sixteen_bit_white(good)):
        return None
    return (f"the GOOD images are 16-bit files whose values stay within 0..{white} "
            f"({white.bit_length()}-bit data): they read nearly black (magnetic tile stored so: image "
            'AUROC 0.896 in 5-fold CV, 0.975 at the gain below; BENCHMARKS.md "Session 24"); '
            f"--set backbone.input_gain={65535 / white:.4f} reads {white} as white (in Python: "
            f"with_overrides(config, {{'backbone.input_gain': {65535 / white:.4f}}}), diffqc.config)")


def part_levels_note(k: int, config: CalibrationConfig) -> str | None:
    """What ``fit`` (``train``) says where its GOOD images are of parts seen as images of ``k``
    types (their ``part_id``), each judged by the worst of its images, and the levels per image let
    GOOD parts be flagged more often than the defaults' share
    (:func:`~diffqc.calibration.part_levels_warning`): a new line has no labelled parts to
    measure it by."""
    said = part_levels_warning(k, config, lambda review, reject: (
        f"train with `--set calibration.alpha_review={review} --set calibration.alpha_reject={reject}` "
        f"(in Python: with_overrides(config, {{'calibration.alpha_review': {review}, "
        f"'calibration.alpha_reject': {reject}}}), diffqc.config; once trained, `diffqc calibrate MODEL "
        f"--alpha-review {review} --alpha-reject {reject}`)"))
    return said and (f"the training data names parts seen as images of {k} types (its part_id), and a "
                     f"part is judged by the worst of its images: {said}")


def gain_clips_note(gain: float, brightness: dict[str, list[float]]) -> str | None:
    """What ``fit`` and ``evaluate`` say where ``backbone.input_gain`` reads a type's GOOD images
    (``brightness``: per type, :func:`~diffqc.inspection.image_brightness`), on average, above
    white: the gain for a 12-bit camera's 16-bit files set for 8-bit ones (the drill's tiny model
    of the clear set: held-out AUROC 0.750, its bright defects clipped and passed, against 1.000
    at 1)."""
    over = [f"{t} (mean brightness up to {hi:.2f})" for t, (_, hi) in sorted(brightness.items())
            if hi * gain > 1.0 + 1e-3]
    if not over:
        return None
    return (f"backbone.input_gain {gain:g} reads 1/{gain:g} of white as white ({65535 / gain:.0f} "
            f"of 65535 in a 16-bit file, {255 / gain:.0f} of 255 in an 8-bit one), and the GOOD "
            f"images of {', '.join(over)} are on average brighter than that: what is above it "
            "is clipped, and the model sees nothing of it; the gain is for 16-bit files "
            "holding 10- to 14-bit data (train names it where it finds them): set it back "
            "to 1 for these")


class Detector:
    """Good-only detector over frozen backbone features, one model for all feature types."""

    runtime = "torch"
    precision = "fp32"

    def __init__(self, config: DetectorConfig | None = None, *, device: str | None = None) -> None:
        if config is not None and not isinstance(config, DetectorConfig):  # it failed at fit
            given = "DetectorConfig.from_dict(config)" if isinstance(config, dict) else "DetectorConfig(...)"
            raise TypeError(f"Detector takes a DetectorConfig, got a {type(config).__name__}: pass {given} "
                            "(diffqc.config)")
        self.config = config or DetectorConfig()
        self.device = resolve_device(device)  # DeviceError when it is not usable here
        self.extractor_: FeatureExtractor | None = None
        self.scorer_: Scorer | None = None
        self.calibration_: Calibrator | None = None
        self.router_: routing.TypeRouter | None = None  # None: a bundle from before the router
        self.memory_: PatchMemory | None = None  # the fused heat map's GOOD-patch memory
        self.classes_: list[str] = []
        self.fit_indices_: list[int] = []  # the images (of fit_features' GOOD samples) fitted on
        self.metadata: dict[str, Any] = {}
        self._image_check: ImageCheck | None = None  # inspect's, made for self.metadata
        self._checked_config: DetectorConfig | None = None  # the config _require_fitted last checked

    # ------------------------------------------------------------------ features
    @property
    def extractor(self) -> FeatureExtractor:
        if self.extractor_ is None:
            # Built outside inference mode even when first needed inside it: its statistics
            # buffers are updated in place later by fit_standardisation.
            with torch.inference_mode(False):
                self.extractor_ = FeatureExtractor(self.config.backbone).to(self.device)
            if self.extractor_.input_size != self.config.backbone.input_size:  # the ONNX graph's own
                self.config = replace(self.config, backbone=replace(self.config.backbone,
                                                                    input_size=self.extractor_.input_size))
        return self.extractor_

    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray], *, raw: bool = False, progress: bool = False) -> Tensor:
        """Backbone features ``[N, C, h, w]`` (standardised unless ``raw``), batched, on the
        detector's device."""
        self._one_map_per_image()
        bs, size = self.config.batch_size, self.config.backbone.input_size
        batches = (to_pixels(images[i : i + bs], size)
                   for i in tqdm(range(0, len(images), bs), desc="extracting features",
                                 disable=not progress, unit="batch"))
        feats = raw_features_in_batches(self.extractor, batches, bs, self.device)
        return feats if raw else self.extractor.standardise(feats)

    def _one_map_per_image(self) -> None:
        if uses_layouts(self.config):
            raise ConfigError("one feature map per image needs backbone.resize=squash and tiling.mode=off; "
                              "pad, crop and tiled models run through fit() and inspect()")

    @torch.inference_mode()
    def extract_pixels(self, pixels: Tensor, *, raw: bool = False) -> Tensor:
        """Backbone features of model inputs ``[N, 3, S, S]`` (:func:`diffqc.backbone.to_pixels`),
        in batches of ``batch_size``, on the detector's device: floating point in [0, 1] (an
        integer tensor, 0 to 255, is refused: read as it was, its features were far off)."""
        self._one_map_per_image()
        if not pixels.is_floating_point():
            raise TypeError(f"pixels are {pixels.dtype}: give floating point in [0, 1] "
                            "(diffqc.backbone.to_pixels makes them from images)")
        pixels = pixels.float()  # float64 (numpy's default) was a dtype error deep in the network
        feats = raw_features_in_batches(self.extractor, [pixels], self.config.batch_size, self.device)
        return feats if raw else self.extractor.standardise(feats)

    def read_features(
        self, samples: Sequence[Sample], *, skip_corrupt: bool = False, progress: bool = False,
        sizes: list[tuple[int, int]] | None = None, greys: list[bool] | None = None,
        lights: list[tuple[float, float]] | None = None,
    ) -> tuple[Tensor, list[tiling.Layout] | None, list[Sample], list[ImageReadError]]:
        """Raw backbone features of the samples' images, read one at a time: each image is
        decoded, cut to its model inputs and released before the next is read, so memory holds
        one full-size image and the features, whatever the camera's resolution (reading every
        image first held them all: 12-megapixel images cost 144 MB each as float32).

        Returns the features (one row per image, or per view with a pad / crop / tiled model),
        the images' layouts (``None`` without such a model), the samples read and the unreadable
        files' errors. Unreadable files are skipped and listed with ``skip_corrupt`` (a warning
        each); without it every file is still tried, no more features are extracted after the
        first failure, and one error names them all, as :func:`diffqc.data.read_images` does.
        ``sizes``, when given, receives each image's (height, width) as read; ``greys`` whether
        it is grey (:func:`diffqc.inspection.is_grey`); ``lights`` its brightness and share at
        white (:func:`diffqc.inspection.brightness`, :func:`~diffqc.inspection.white_share`).
        """
        views_of = uses_layouts(self.config)
        layouts: list[tiling.Layout] = []
        kept: list[Sample] = []
        errors: list[ImageReadError] = []

        def inputs() -> Iterator[Tensor]:  # one image read, cut and released at a time
            bar = tqdm(samples, desc="reading + extracting features", disable=not progress,
                       unit="image")
            for sample, image in iter_images(bar, errors, skip_corrupt=skip_corrupt):
                kept.append(sample)
                if sizes is not None:
                    sizes.append((int(image.shape[0]), int(image.shape[1])))
                if greys is not None:
                    greys.append(is_grey(image))
                if lights is not None:
                    lights.append((brightness(image), white_share(image)))
                if views_of:  # pad / crop / tiles: the views of tiling.extract_views
                    layouts.append(tiling.plan((int(image.shape[0]), int(image.shape[1])),
                                               self.config))
                    yield tiling.view_pixels(image, layouts[-1])
                else:
                    yield to_pixels([image], self.config.backbone.input_size)

        raw = raw_features_in_batches(self.extractor, inputs(), self.config.batch_size, self.device)
        return raw, (layouts if views_of else None), kept, errors

    # ------------------------------------------------------------------ fit
    def fit(
        self, samples: Sequence[Sample] | Path | str, *, progress: bool = True, skip_corrupt: bool = False
    ) -> Detector:
        """Fit on GOOD samples (``split == "train"`` where any is so marked) and calibrate.
        ``samples``: :class:`~diffqc.data.Sample` s, or a dataset (a folder, MVTec layout or
        labelled, or a CSV manifest, read with :func:`~diffqc.data.load_dataset`)."""
        samples = samples_of(samples, "fit")
        good = good_training(samples)
        if len(good) < len(samples):
            warnings.warn(f"fit uses the {len(good)} GOOD training samples of {len(samples)} given",
                          stacklevel=2)
        if not good:
            raise DatasetError("no GOOD training samples to fit on")
        check_type_names({s.feature_type for s in good})
        # a copy on the calibration side of a fit image scores as a fit image: too low a threshold
        good, copy_notes = without_copies(good)
        for note in copy_notes:
            warnings.warn(note, DatasetWarning, stacklevel=2)
        # a type with too few GOOD parts fails here, before any image is read or model trained
        split_calibration(good, self.config.calibration.fraction, self.config.train.seed)
        k = types_per_part([s.part_id for s in good], [s.feature_type for s in good])
        if levels := part_levels_note(k, self.config.calibration):  # before the images are read
            warnings.warn(levels, CalibrationWarning, stacklevel=2)
        _check_heat_map(self.config)
        check_trainable(self.config)  # before the images are read
        wanted = {s.feature_type for s in good}
        fe = self.extractor
        check_fit_memory(self.config, fe.grid, fe.channels, len(wanted), len(good), str(self.device),
                         views=views_to_fit(self.config, [s.path for s in good]), copies=FIT_FEATURE_COPIES)
        sizes: list[tuple[int, int]] = []
        greys: list[bool] = []
        lights: list[tuple[float, float]] = []
        try:
            raw, layouts, good, errors = self.read_features(good, skip_corrupt=skip_corrupt,
                                                            progress=progress, sizes=sizes, greys=greys,
                                                            lights=lights)
        except ImageReadError as exc:  # a traceback's note; the command line says --skip-corrupt
            exc.add_note("fit(..., skip_corrupt=True) leaves unreadable images out")
            raise
        if lost := sorted(wanted - {s.feature_type for s in good}):
            raise DatasetError(f"every GOOD training image of {', '.join(map(repr, lost))} is "
                               "unreadable (skipped); the model would not know the type: mend "
                               "the images, or take the type out of the data")
        if dark := twelve_bit_note(self.config, [s.path for s in good]):
            warnings.warn(dark, stacklevel=2)
        with self._all_or_nothing():  # a Ctrl-C in the fit, or its failure, changes nothing
            self.fit_features(raw, good, progress=progress, layouts=layouts)
            training = self.metadata["training_data"]
            training["suspect_images"] += self._suspect_fit_images(raw, good, layouts)
            if suspects := training["suspect_images"]:
                warnings.warn(suspects_note(suspects, images="GOOD training image(s)", harm=LEARNT_OR_RAISED,
                                            then="move them out of the GOOD images and train again "
                                            "(metadata.json's training_data.suspect_images lists them)"),
                              DatasetWarning, stacklevel=2)
            training["skipped_corrupt"] = [path_text(e.source) for e in errors]
            if self.config.tiling.mode == "off":  # for inspection.ImageCheck
                training["image_sizes"] = image_size_ranges(
                    (s.feature_type, h, w) for s, (h, w) in zip(good, sizes, strict=True))
            elif layouts is not None:  # tiled: the types whose training images were all cut into tiles
                untiled = {s.feature_type for s, lay in zip(good, layouts, strict=True) if lay.mode != "tile"}
                side = self.config.backbone.input_size / self.config.tiling.scale
                training["tiled_above"] = {t: side for t in self.classes_ if t not in untiled}
            training["image_colours"] = image_colours(
                (s.feature_type, grey) for s, grey in zip(good, greys, strict=True))
            training["image_brightness"] = image_brightness(
                (s.feature_type, b) for s, (b, _) in zip(good, lights, strict=True))
            training["image_white"] = image_white(
                (s.feature_type, w) for s, (_, w) in zip(good, lights, strict=True))
            if clipped := gain_clips_note(self.config.backbone.input_gain, training["image_brightness"]):
                warnings.warn(clipped, stacklevel=2)
            training["image_compression"] = image_compressions(
                (s.feature_type, c) for s in good if (c := file_compression(s.path)) is not None)
            if k > 1:
                training["types_per_part"] = k  # a part is judged by the worst of its k crops: calibrate
                # says it
            # by content, so that `diffqc calibrate` can leave out any it is given (their scores are
            # optimistic: calibrated on them, the line's GOOD parts would be flagged too often)
            fitted = set(self.fit_indices_)
            training["fit_image_fingerprints"] = sorted({fingerprint(good[i].path) for i in fitted})
            # and those it was calibrated on only, which `diffqc test` leaves out (their flag rate is
            # the target by construction)
            training["calibration_image_fingerprints"] = sorted(
                {fingerprint(s.path) for i, s in enumerate(good) if i not in fitted})
        return self

    def fit_features(self, raw: Tensor, good: Sequence[Sample], *, progress: bool = False,
                     layouts: Sequence[tiling.Layout] | None = None) -> Detector:
        """Fit from precomputed *raw* backbone features of GOOD samples (``extract(raw=True)``).

        The backbone is frozen, so cross-validation extracts features once and refits here.
        With ``layouts`` (:func:`diffqc.tiling.extract_views`) ``raw`` holds each image's views.
        A fit interrupted (Ctrl-C) or failing leaves the detector as it was.
        """
        check_trainable(self.config)
        with self._all_or_nothing():
            return self._fit_features(raw, good, progress=progress, layouts=layouts)

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """The detector as it was where the block is left by an exception (a Ctrl-C, out of
        memory): a refit stopped after its scorer was fitted left the new types and feature
        standardisation over the old scorer and calibration, scoring wrongly without a word."""
        state = dict(vars(self))
        fe = self.extractor_
        moments = None if fe is None else (fe.feat_mean.clone(), fe.feat_std.clone())
        try:
            yield
        except BaseException:
            vars(self).clear()
            vars(self).update(state)
            if fe is not None and moments is not None:
                fe.feat_mean.copy_(moments[0])
                fe.feat_std.copy_(moments[1])
            raise

    def _fit_features(self, raw: Tensor, good: Sequence[Sample], *, progress: bool,
                      layouts: Sequence[tiling.Layout] | None) -> Detector:
        n_rows = len(good) if layouts is None else tiling.offsets(layouts)[-1]
        if raw.shape[0] != n_rows:
            raise ValueError(f"{raw.shape[0]} feature maps for {len(good)} samples")
        start = time.perf_counter()
        self.classes_ = sorted({s.feature_type for s in good})
        fit_idx, cal_idx = split_calibration(good, self.config.calibration.fraction,
                                             self.config.train.seed)
        if not fit_idx or not cal_idx:
            raise ValueError("need at least 2 GOOD images (parts) per type: one to fit, one to calibrate")
        cross = self.config.calibration.scheme == "cross"
        if cross:  # every GOOD image fits the final model and calibrates, scored out of fold
            fit_idx = cal_idx = list(range(len(good)))
        fe = self.extractor
        name = recorded_name(self.config.backbone.name)
        self.config = replace(self.config, backbone=replace(self.config.backbone, name=name,
                                                            weights_sha256=fe.weights_sha256,
                                                            grid=tuple(fe.grid)))
        image_idx = (fit_idx, cal_idx)
        if layouts is not None:  # image indices -> their views' rows
            fit_idx, cal_idx = tiling.rows_of(layouts, fit_idx), tiling.rows_of(layouts, cal_idx)
        raw = raw.to(self.device)  # the scorer is fitted (the denoiser trained) where the features are
        types = torch.tensor([self.classes_.index(s.feature_type) for s in good], device=self.device)
        if layouts is not None:
            views = torch.tensor([lay.views for lay in layouts], device=types.device)
            types = types.repeat_interleave(views)
        t_fit = time.perf_counter()
        fused = _check_heat_map(self.config)
        self.memory_ = None
        fit_feats = self._fit_rows(raw, fit_idx, types, all_rows=cross, progress=progress)
        nearest = fit_memory(self.config, fit_feats, types[fit_idx], len(self.classes_),
                             progress=progress) if fused else None
        del fit_feats
        fit_seconds = time.perf_counter() - t_fit
        fit_idx, cal_idx = image_idx
        self.fit_indices_ = list(fit_idx)
        cal_samples = [good[i] for i in cal_idx]
        cal_layouts = None if layouts is None else [layouts[i] for i in cal_idx]
        cal_rows = cal_idx if layouts is None else tiling.rows_of(layouts, cal_idx)
        cal_feats = None
        if cross:  # each fold standardises its own (a fused map needs split)
            scored = self._cross_fold_scores(raw, good, types, layouts, progress=progress)
        else:
            cal_feats = fe.standardise(raw[cal_rows])
            scored = self._calibration_scores(cal_feats, cal_samples, progress=progress, layouts=cal_layouts)
        self.calibration_ = scored.calibrator(self.classes_, self.config.calibration)
        suspects = suspect_images(((self.classes_[k], s, path_text(p))
                                   for k, s, p in zip(scored.true, scored.known, scored.paths, strict=True)),
                                  among="calibration images")
        if nearest is not None and cal_feats is not None:
            self.memory_ = self._calibrated_memory(nearest, cal_feats, types[cal_rows])
        history = getattr(self.scorer_, "history_", None)
        fitted = _dt.datetime.now(_dt.UTC)
        self.metadata = {
            "format": BUNDLE_FORMAT,
            "diffqc_version": __version__,
            "created": fitted.isoformat(timespec="seconds"),
            "method": self.config.method,
            "classes": self.classes_,
            "backbone": {"name": self.config.backbone.name, "layers": list(fe.layers),
                         "input_size": self.config.backbone.input_size,
                         "channels": fe.channels, "grid": list(fe.grid),
                         "weights_sha256": fe.weights_sha256},
            "training_data": {
                "fit_images": {t: sum(good[i].feature_type == t for i in fit_idx) for t in self.classes_},
                "calibration_images": {t: sum(s.feature_type == t for s in cal_samples)
                                       for t in self.classes_},
                "skipped_corrupt": [],
                "suspect_images": suspects,
            },
            "type_router": scored.router_summary(self.classes_, self.config.scoring.type_candidates),
            "fit_seconds": round(fit_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
            "fitted_settings": fitted_settings(self.config),
            "final_loss": history.loss[-1] if history is not None and history.loss else None,
        }
        # the second it was fitted (UTC, as short as the dashboard's header on a phone needs) and 6
        # random hex digits: two fits within a second (a script retraining, two stations) have two
        # ids, which the service's model watch tells apart
        self.metadata["model_id"] = f"{self.config.method}-{fitted:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        return self

    def _fit_rows(self, raw: Tensor, rows: list[int], types: Tensor, *, all_rows: bool = False,
                  progress: bool) -> Tensor:
        """The standardisation, scorer and type router fitted on ``raw``'s ``rows`` (``all_rows``:
        every row, read without a copy); their standardised features returned, the fit's own copy
        (a standardised copy of every row, and one of the rows from it, were held before)."""
        picked = raw if all_rows else raw[rows]
        self.extractor.fit_standardisation(picked)
        feats = self.extractor.standardise(picked)
        del picked
        scorer = make_scorer(self.config)
        scorer.fit(feats, types[rows], len(self.classes_), progress=progress)
        self.scorer_ = scorer
        self.router_ = _fit_router(feats, types[rows], len(self.classes_))
        return feats

    def _cross_fold_scores(
        self, raw: Tensor, good: Sequence[Sample], types: Tensor,
        layouts: Sequence[tiling.Layout] | None, *, progress: bool,
    ) -> _CalibrationScores:
        """Cross-conformal calibration scores: every GOOD image scored by a model (standardisation,
        scorer and type router) fitted on the other ``calibration.folds`` folds, never on its own
        part. The fitted detector (its standardisation, scorer and router) is left as it was."""
        fe, final, final_router = self.extractor, self.scorer_, self.router_
        saved = fe.feat_mean.clone(), fe.feat_std.clone()
        out = _CalibrationScores()

        def rows(idx: list[int]) -> list[int]:
            return idx if layouts is None else tiling.rows_of(layouts, idx)

        folds = cross_folds(good, self.config.calibration.folds, self.config.train.seed)
        try:
            for held in tqdm(folds, desc="cross-calibration folds", disable=not progress):
                held_set = set(held)
                rest = rows([i for i in range(len(good)) if i not in held_set])
                self._fit_rows(raw, rest, types, progress=False)  # its features go before the next fold's
                out.extend(self._calibration_scores(
                    fe.standardise(raw[rows(held)]), [good[i] for i in held], progress=False,
                    layouts=None if layouts is None else [layouts[i] for i in held]))
                self.scorer_, self.router_ = final, final_router
        finally:
            fe.feat_mean.copy_(saved[0])
            fe.feat_std.copy_(saved[1])
            self.scorer_, self.router_ = final, final_router
        return out

    def _calibration_scores(
        self, feats: Tensor, samples: Sequence[Sample], *, progress: bool,
        layouts: Sequence[tiling.Layout] | None = None,
    ) -> _CalibrationScores:
        """Scores of GOOD calibration images under their own type (known-type mode) and under
        the type router's candidates (unknown-type mode), from standardised features."""
        out = _CalibrationScores()
        bs = self.config.batch_size
        true = [self.classes_.index(s.feature_type) for s in samples]
        m = self.config.scoring.type_candidates
        for i in tqdm(range(0, len(samples), bs), desc="calibrating", disable=not progress, unit="batch"):
            own = true[i : i + bs]
            if layouts is not None:  # every type a candidate, from the views' merged maps
                off = tiling.offsets(layouts)
                table = tiling.score_table(self, feats[off[i]: off[min(i + bs, len(samples))]],
                                           layouts[i : i + bs]).numpy()
                order = tiling.candidate_order(table)
                out.add([int(k) for k in own], [float(table[j, k]) for j, k in enumerate(own)],
                        order, np.take_along_axis(table, order, axis=1))
                out.layouts = True
                continue
            batch = feats[i : i + bs]
            assert self.router_ is not None
            cand = self.router_.candidates(batch.float().cpu().numpy(), m)
            image, kind, at = routing.rows([[k, *c] for k, c in zip(own, cand.tolist(), strict=True)])
            scores = self.maps_and_scores(batch[torch.from_numpy(image).to(batch.device)],
                                          torch.from_numpy(kind).to(batch.device))[1].cpu().numpy()
            out.add(own, [scores[at[j][k]] for j, k in enumerate(own)], cand,
                    np.array([[scores[at[j][int(c)]] for c in row] for j, row in enumerate(cand)]))
        out.paths = [s.path for s in samples]
        return out

    @torch.inference_mode()
    def _suspect_fit_images(self, raw: Tensor, good: Sequence[Sample],
                            layouts: Sequence[tiling.Layout] | None) -> list[dict[str, Any]]:
        """The fit images that score far above their type's others under the model fit on them
        (:func:`~diffqc.calibration.suspect_images`): a defect among them is learnt as GOOD. Not
        judged: under ``calibration.scheme=cross`` (every image is a calibration image), for
        pad, crop and tiled models (views, not images), and for PatchCore (its memory bank holds
        the fit images themselves: their distances to it say nothing)."""
        if (self.config.calibration.scheme == "cross" or layouts is not None
                or self.config.method == "patchcore"):
            return []
        fit, bs = self.fit_indices_, self.config.batch_size
        types = torch.tensor([self.classes_.index(good[i].feature_type) for i in fit], device=self.device)
        own = np.concatenate([  # a batch at a time: no second copy of the features
            self.maps_and_scores(self.extractor.standardise(raw[fit[i: i + bs]].to(self.device)),
                                 types[i: i + bs])[1].float().cpu().numpy() for i in range(0, len(fit), bs)])
        return suspect_images(((good[i].feature_type, float(s), path_text(good[i].path))
                               for i, s in zip(fit, own, strict=True)), among="fit images (in sample)")

    def _calibrated_memory(self, nearest: PatchCoreScorer, feats: Tensor, types: Tensor) -> PatchMemory:
        """The fused heat map's constants from the GOOD calibration images' image scores under
        the likelihood (the calibrator's own) and under the memory's map (same aggregation)."""
        assert self.calibration_ is not None
        bs = self.config.batch_size
        distance = torch.cat([
            self.image_scores(self.smooth(nearest.score_maps(feats[i: i + bs], types[i: i + bs])))
            for i in range(0, feats.shape[0], bs)]).cpu().numpy()
        own = types.cpu().numpy()
        return PatchMemory.calibrated(
            self.config, nearest, [np.asarray(self.calibration_.known[t].scores) for t in self.classes_],
            [distance[own == k] for k in range(len(self.classes_))])

    # ------------------------------------------------------------------ scoring
    def _require_fitted(self) -> tuple[Scorer, Calibrator]:
        """The fitted scorer and calibration, refused (:class:`ConfigError`) once ``config`` was
        replaced after the fit with another setting of the scores (``det.config =
        with_overrides(...)`` in a notebook): every score would be on another scale than the
        calibration's thresholds, and a saved bundle would record the replaced settings."""
        if self.scorer_ is None or self.calibration_ is None:
            raise NotFittedError
        if self.config is not self._checked_config:  # a frozen config: replaced, not changed
            if changed := changed_settings(self.metadata.get("fitted_settings", {}), self.config):
                raise ConfigError(f"the detector's config was replaced after fit: {changed_text(changed)}, "
                                  "and its calibration's thresholds hold for those alone: put them back, or "
                                  "fit again with the new ones")
            if message := edited_levels(self.config, self.calibration_, source="the detector's config",
                                        file="Detector.calibration_", bundle="SAVED_BUNDLE"):
                warnings.warn(message, CalibrationWarning, stacklevel=3)
            self._checked_config = self.config
        return self.scorer_, self.calibration_

    def score_maps(self, feats: Tensor, type_idx: Tensor) -> Tensor:
        """Smoothed anomaly maps ``[N, S, S]`` at the backbone input size."""
        scorer = self.scorer_
        if scorer is None:
            raise NotFittedError
        return self.smooth(scorer.score_maps(feats, type_idx))

    def smooth(self, patch_maps: Tensor) -> Tensor:
        """Feature-grid maps ``[N, h, w]`` -> ``[N, S, S]``: upsampled to the input size, smoothed."""
        return upsample_and_smooth(patch_maps, self.config.backbone.input_size,
                                   self.config.scoring.smooth_sigma)

    def maps_and_scores(self, feats: Tensor, type_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Smoothed maps ``[N, S, S]`` and image scores ``[N]``. PatchCore's default image score
        (the paper's re-weighted largest patch score) is computed from the unsmoothed patch maps;
        every other rule aggregates the smoothed map (:meth:`image_scores`)."""
        scorer = self.reweighting_scorer()
        if scorer is None:
            maps = self.score_maps(feats, type_idx)
            scores = self.image_scores(maps)
            if self.memory_ is not None:  # the map only: the image score stays the likelihood's
                distance = self.smooth(self.memory_.nearest.score_maps(feats, type_idx))
                maps = self.memory_.fuse(maps, distance, type_idx)
            return maps, scores
        patch_maps = scorer.score_maps(feats, type_idx)
        return self.smooth(patch_maps), scorer.reweighted_scores(feats, type_idx, patch_maps)

    def reweighting_scorer(self) -> PatchCoreScorer | None:
        """The scorer when it is PatchCore with the paper's image score (``reweighted``), which
        is computed from the unsmoothed patch maps, not from the smoothed map; else None."""
        scorer = self.scorer_
        if isinstance(scorer, PatchCoreScorer) and scorer.config.aggregation == "reweighted":
            return scorer
        return None

    def image_scores(self, maps: Tensor) -> Tensor:
        """Image scores ``[N]`` from smoothed maps by the method's own rule: ``scoring.aggregation``
        (diffusion), ``patchcore.aggregation`` or ``padim.aggregation`` (max, topk)."""
        cfg = self.config
        how, topk = {"patchcore": (cfg.patchcore.aggregation, cfg.patchcore.topk),
                     "padim": (cfg.padim.aggregation, cfg.padim.topk)}.get(
            cfg.method, (cfg.scoring.aggregation, cfg.scoring.topk))
        if how == "reweighted":
            from diffqc.errors import ConfigError

            raise ConfigError("patchcore.aggregation=reweighted scores an image from its patch maps "
                              "(Detector.maps_and_scores), not from a smoothed map; use max or topk here")
        return aggregate(maps, how, topk)

    def type_index(self, feature_type: str) -> int:
        try:
            return self.classes_.index(feature_type)
        except ValueError:
            raise unknown_feature_type(feature_type, self.classes_) from None

    @torch.inference_mode()
    def inspect(
        self,
        images: Sequence[np.ndarray | Image.Image],
        feature_types: Sequence[str | None] | None = None,
        *,
        all_types: bool = True,
        maps: bool = True,
        check_images: bool = True,
    ) -> list[Inspection]:
        """Score images. A given type is scored under that type; ``None`` means unknown: the
        type router picks the type (:mod:`diffqc.routing`: the full scorer runs only under its
        ``scoring.type_candidates`` best types). ``all_types`` also scores every image under
        every type (``type_scores``, and ``predicted_type``: the type unknown mode picks), a
        slow diagnostic; turn it off for the fastest path. ``check_images`` warns, once per type
        and check, of a part outside its type's training images in size, colour or brightness
        (:func:`diffqc.inspection.warn_outside`), as ``diffqc inspect`` does."""
        self._require_fitted()
        types = inspect_arguments(images, feature_types)
        for t in types:
            if t is not None:
                self.type_index(t)  # an unknown type fails before any work is done
        if not images:
            return []
        if len(images) > self.config.batch_size:
            return in_batches(self.inspect, images, types, self.config.batch_size, all_types=all_types,
                              maps=maps, check_images=check_images)
        images = as_arrays(images)  # a batch's Pillow images, decoded
        if uses_layouts(self.config):  # pad / crop / tiles: see diffqc.tiling
            raw, layouts = tiling.extract_views(self, images)
            results = tiling.inspect_views(self, raw, layouts, [None if t is None else self.type_index(t)
                                                                for t in types], maps, all_types=all_types)
        else:
            raw = self.extract(images, raw=True)
            shapes = [(int(img.shape[0]), int(img.shape[1])) for img in images]
            results = self.inspect_features(raw, types, shapes if maps else None, all_types=all_types)
        if check_images:
            self._image_check = warn_outside(self._image_check, self.metadata, images, results)
        return results

    @torch.inference_mode()
    def inspect_features(
        self, raw: Tensor, feature_types: Sequence[str | None],
        map_sizes: Sequence[tuple[int, int]] | None = None, *, all_types: bool = True,
    ) -> list[Inspection]:
        """:meth:`inspect` from precomputed raw backbone features; maps are returned at
        ``map_sizes`` (H, W) per image, or not at all when it is ``None``."""
        _, calibration = self._require_fitted()
        if raw.shape[0] != len(feature_types) or (map_sizes is not None and len(map_sizes) != raw.shape[0]):
            sizes = "" if map_sizes is None else f", {len(map_sizes)} map sizes"
            raise ValueError(f"{raw.shape[0]} feature maps for {len(feature_types)} feature types{sizes}: "
                             "give one of each per image")
        if not feature_types:
            return []
        given = [None if t is None else self.type_index(t) for t in feature_types]
        feats = self.extractor.standardise(raw.to(self.device))

        def score(image: np.ndarray, kind: np.ndarray) -> tuple[Tensor, np.ndarray]:
            rows = torch.from_numpy(image).to(feats.device)
            maps, scores = self.maps_and_scores(feats[rows], torch.from_numpy(kind).to(feats.device))
            return maps, scores.cpu().numpy()

        routed, row_maps = routing.route_and_score(
            given, lambda: feats.float().cpu().numpy(), self.router_, self.config.scoring.type_candidates,
            len(self.classes_), score, calibration, self.classes_, all_types=all_types,
            where=self.metadata.get("model_id", "(in memory)"))
        resized = None
        if map_sizes is not None:
            resized = [_resize_map(row_maps[int(r)], *map_sizes[i]) for i, r in enumerate(routed.own_rows)]
        return verdicts(self.classes_, calibration, given, routed.own, routed.scores, routed.table,
                        resized, predicted=routed.predicted)

    def inspect_samples(
        self, samples: Sequence[Sample], *, type_known: bool = True, progress: bool = False,
        all_types: bool = True, maps: bool = True, skip_corrupt: bool = False,
    ) -> tuple[list[Inspection], list[Sample]]:
        """Inspect dataset samples in batches; returns the results and the samples read. Without
        ``maps`` (calibration, say) each image is cut to the model's input as it is read."""
        size = self.config.backbone.input_size

        def shrink(image: np.ndarray) -> np.ndarray:  # the resize inspect() would make
            return to_pixels([image], size)[0].permute(1, 2, 0).numpy()

        plain = not maps and not uses_layouts(self.config)
        return inspect_in_batches(self.inspect, samples, self.config.batch_size, type_known=type_known,
                                  progress=progress, all_types=all_types, maps=maps,
                                  skip_corrupt=skip_corrupt, shrink=shrink if plain else None)

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path | str, *, force: bool = False) -> Path:
        """Write the bundle: a new folder appears whole (written beside it, then renamed); into an
        existing folder (an earlier bundle, an empty folder or, with ``force``, any folder) the
        bundle's own files are written in a hidden folder inside it first and then moved in,
        ``metadata.json`` last; an earlier bundle there is kept whole in its ``previous/`` folder
        (hard links: the room it holds now; ``diffqc train --undo`` puts it back), replacing the
        one kept before.
        Nothing this method did not write is ever deleted. A write that fails (full disk,
        unwritable folder) raises :class:`OutputError` naming the path, leaves no partial files
        and any previous bundle as it was."""
        scorer, calibration = self._require_fitted()
        path = check_bundle_target(path, force=force)
        if is_bundle(path) and (dropped := retrain_text(path, self.config, self.classes_)):  # `train` said it
            warnings.warn(dropped, stacklevel=2)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # into an existing folder: written inside it, where the moves cannot cross a mount
            # (a volume mounted at the bundle's folder: a rename out of its parent is refused)
            inside = path.is_dir()
            tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX if inside else f".{path.name}.partial-",
                                        dir=path if inside else path.parent))
        except OSError as exc:
            raise OutputError(f"cannot write the model bundle {path}: {exc.strerror or exc}") from None
        try:
            self._write_bundle(tmp, scorer, calibration)
            if inside:  # an earlier bundle kept whole in previous/
                install_bundle(tmp, path)
                tmp.rmdir()
            else:
                os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
            why = getattr(exc, "strerror", None) or exc  # the OS's words, not our temporary file's name
            raise OutputError(f"cannot write the model bundle {path}: {why}") from None
        finally:
            if tmp.exists():  # our own temporary folder, never the destination
                shutil.rmtree(tmp, ignore_errors=True)
        left = interrupted_saves(path)
        if left:  # e.g. retrains on an edge device cut by power: their room was lost unseen
            named = ", ".join(f"{path_text(p)} ({folder_bytes(p) / 1e6:.0f} MB{_held_model(p)})"
                              for p in left)
            was, it = ("was", "it") if len(left) == 1 else ("were", "them")
            warnings.warn(f"{named} {was} left by a save that was interrupted (killed, or a power cut); "
                          f"nothing deletes {it}: delete {it} when no save is running", stacklevel=2)
        return path

    def _write_bundle(self, folder: Path, scorer: Scorer, calibration: Calibrator) -> None:
        fe = self.extractor
        tensors = {f"scorer.{k}": v.contiguous().cpu() for k, v in scorer.state_tensors().items()}
        tensors["features.mean"] = fe.feat_mean.cpu()
        tensors["features.std"] = fe.feat_std.cpu()
        if self.router_ is not None:
            tensors.update({k: torch.from_numpy(v) for k, v in self.router_.state().items()})
        if self.memory_ is not None:
            tensors.update({k: v.contiguous().cpu() for k, v in self.memory_.state_tensors().items()})
        save_file(tensors, str(folder / "weights.safetensors"), metadata={"format": str(BUNDLE_FORMAT)})
        self.config.to_json(folder / "config.json")
        (folder / "calibration.json").write_text(json.dumps(calibration.to_dict()))
        meta = dict(self.metadata, classes=self.classes_, format=BUNDLE_FORMAT,
                    fitted_settings=fitted_settings(self.config))
        meta["weights_file_sha256"] = sha256_file(folder / "weights.safetensors")
        (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
        for name in BUNDLE_FILES:
            with open(folder / name, "rb") as fh:
                os.fsync(fh.fileno())
        with_plain_modes(folder, BUNDLE_FILES)  # a service run as another user reads it

    @classmethod
    def load(cls, path: Path | str, *, device: str | None = None) -> Detector:
        """Load a bundle; any damage or mismatch is a :class:`BundleError` that says what."""
        path = Path(path)
        config, meta, cal = read_bundle(path)  # the reader the exported runtimes share
        check_weights(path, meta)
        try:
            tensors = load_file(str(path / "weights.safetensors"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"model bundle {path}: weights.safetensors unreadable ({exc})") from None
        det = cls(config, device=device)
        det.classes_ = list(meta["classes"])
        det.metadata = meta
        try:
            fe = det.extractor
            fitted = config.backbone.grid  # recorded at fit time (bundles from before: not checked)
            if fitted and tuple(fitted) != fe.grid:  # an input size edited into config.json, say
                raise ValueError(f"backbone.input_size {config.backbone.input_size} gives a {fe.grid[0]} x "
                                 f"{fe.grid[1]} feature grid, the model was fitted on {fitted[0]} x "
                                 f"{fitted[1]}")
            fe.feat_mean.copy_(tensors["features.mean"])
            fe.feat_std.copy_(tensors["features.std"])
            # the scorer lives on the device of the tensors it is built from
            scorer_state = {k.removeprefix("scorer."): v.to(det.device) for k, v in tensors.items()
                            if k.startswith("scorer.")}
            det.scorer_ = load_scorer(config, scorer_state, len(det.classes_), fe.channels)
            det.router_ = routing.TypeRouter.from_state(
                {k: v.numpy() for k, v in tensors.items() if k in routing.STATE_KEYS},
                len(det.classes_), fe.channels)
            if config.method == "diffusion" and config.scoring.heat_map == "fused":
                on_device = {k: v.to(det.device) for k, v in tensors.items()}
                det.memory_ = PatchMemory.from_state(config, on_device, len(det.classes_), fe.channels)
        except (KeyError, RuntimeError, ValueError) as exc:
            if out_of_memory(exc) is not None:
                raise  # the machine's room, not the bundle: the CLI and the service say so
            raise BundleError(f"model bundle {path} does not match its config: {exc}") from None
        det.calibration_ = cal
        return det

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_id", "unfitted"))

    def __repr__(self) -> str:
        return detector_repr(self, f"device={str(self.device)!r}")


# the times a fit holds its GOOD images' features at once, at least: as read, and the fit's rows
# (80 % of them at the default split) standardised and then in the scorer's working copies, with
# the transients of each step (benchmarks/fit_memory.py measured 4.2-5.6 times the features at the
# peak, the tables included, for every method and calibration scheme: BENCHMARKS.md "Session 73")
FIT_FEATURE_COPIES = 3


def fit_bytes(config: DetectorConfig, grid: tuple[int, int], channels: int, n_types: int,
              n_images: int, copies: int = 1) -> tuple[int, int]:
    """A lower bound of what fitting holds in memory, in bytes (float32): ``(features, model)``,
    the backbone features of the GOOD images (``copies`` times) and the per-location Gaussians (the default
    diffusion prior: mean, variance, kept eigenpairs per type and location; PaDiM: a d x d
    covariance per type and location). Both grow with the feature grid, i.e. with the square of
    ``backbone.input_size``; what a fit needs on top (eigendecompositions, the network) is not
    counted, so a fit that exceeds the bound cannot succeed."""
    locations = grid[0] * grid[1]
    features = copies * n_images * locations * channels * 4
    model = 0
    if config.method == "diffusion" and config.diffusion.prior == "local":
        d = min(config.diffusion.prior_dims, channels)
        rank = config.diffusion.prior_rank
        r = d if rank <= 0 or rank >= d else rank
        model = (n_types + 1) * locations * (2 * channels + d * r + r + 1) * 4
    elif config.method == "padim":
        d = min(config.padim.dims, channels)
        model = n_types * locations * (d * d + d) * 4
    return features, model


def available_memory(device: str) -> int | None:
    """Bytes of memory a fit may still take: the free CUDA memory, else Linux's MemAvailable
    bounded by the process's memory cgroup (a container's limit:
    :func:`diffqc.machine.cgroup_memory_room`);
    None where it cannot be told."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        info = Path("/proc/meminfo").read_text()
        free = next(int(line.split()[1]) * 1024 for line in info.splitlines()
                    if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    room = cgroup_memory_room()
    return free if room is None else min(free, room)


def views_to_fit(config: DetectorConfig, paths: Sequence[Path | str]) -> int:
    """How many model inputs the images at ``paths`` make, each held as a feature map by a fit:
    one per image, or with tiling (``tiling.mode=auto``) its tiles, counted from the files'
    headers without decoding them (an unreadable file counts one: it is named when read)."""
    if config.tiling.mode == "off":
        return len(paths)
    return sum(1 if (shape := image_shape(path)) is None else tiling.plan(shape, config).views
               for path in paths)


def check_fit_memory(config: DetectorConfig, grid: tuple[int, int], channels: int, n_types: int,
                     n_images: int, device: str, *, views: int | None = None, copies: int = 1) -> None:
    """Before any image is read: a fit whose lower bound (:func:`fit_bytes`) exceeds the memory
    available is a :class:`ConfigError`; one above half of it, a warning. (A backbone.input_size
    of 2000 held 21.6 GB after 5 minutes on 40 GOOD images, still fitting, on a 24 GB machine.)
    ``views``: the model inputs of a tiled fit (:func:`views_to_fit`), each held as a feature map
    (a 4000 x 3000 px frame makes 336 tiles of 256 px); ``copies``: the times the fit holds the
    features at once (:data:`FIT_FEATURE_COPIES` for a fit's GOOD images)."""
    inputs = n_images if views is None else views
    features, model = fit_bytes(config, grid, channels, n_types, inputs, copies)
    free = available_memory(device)
    if free is None or 2 * (features + model) <= free:
        return

    def gb(n: int) -> str:
        return f"{n / 2**30:.1f} GB"

    tiles = f" ({inputs} tiles)" if views is not None and views != n_images else ""
    held = f" (held about {copies} times at once: as read, standardised and the fit's own)" \
        if copies > 1 else ""
    what = (f"at least {gb(features + model)} of memory: {gb(features)} for the features of "
            f"{n_images} images{tiles} at {grid[0]} x {grid[1]} locations{held}"
            + (f", {gb(model)} for the per-location Gaussians of {n_types} types" if model else ""))
    if tiles:
        advice = (f"tile the images at a smaller scale (tiling.scale, now {config.tiling.scale:g}: "
                  "fewer, coarser tiles), lower tiling.overlap (now "
                  f"{config.tiling.overlap:g}), or fit on fewer GOOD images")
    else:
        advice = (f"lower backbone.input_size (now {config.backbone.input_size}; the memory grows "
                  "with its square), or cut large images into tiles at the model's input size "
                  "(tiling.mode=auto)")
    if features + model > free:
        raise ConfigError(f"this fit needs {what}, and {gb(free)} is available; {advice}")
    warnings.warn(f"this fit needs {what}, more than half of the {gb(free)} available: it may run "
                  f"out of memory; {advice}", stacklevel=3)


def _check_heat_map(config: DetectorConfig) -> bool:
    """Whether the fit builds the fused heat map's memory (the diffusion detector's: PatchCore and
    PaDiM ignore the ``scoring`` section, as they do its aggregation); a setting it cannot serve
    is a :class:`ConfigError` before any fitting."""
    if config.scoring.heat_map != "fused" or config.method != "diffusion":
        return False
    why = ("its constants come from the split calibration images" if config.calibration.scheme != "split"
           else "views of resized or tiled images are not supported yet" if uses_layouts(config)
           else None)
    if why is not None:
        raise ConfigError(f"scoring.heat_map=fused needs calibration.scheme=split, backbone.resize=squash "
                          f"and tiling.mode=off ({why}); set scoring.heat_map=likelihood")
    return True


def _fit_router(feats: Tensor, types: Tensor, n_types: int) -> routing.TypeRouter:
    return routing.TypeRouter.fit(feats.float().cpu().numpy(), types.cpu().numpy(), n_types)


class _CalibrationScores:
    """GOOD calibration images' scores: under their own type (known-type mode), and under the
    type router's candidates (unknown-type mode, chosen among once the known-type calibration
    exists: :func:`diffqc.routing.unknown_scores`)."""

    def __init__(self) -> None:
        self.true: list[int] = []
        self.known: list[float] = []
        self.candidates: list[np.ndarray] = []
        self.candidate_scores: list[np.ndarray] = []
        self.layouts = False  # a model with layouts: every type a candidate, no router
        self.paths: list[Path] = []  # the image of each known-type score

    def add(self, true: Sequence[int], known: Sequence[float], candidates: np.ndarray,
            scores: np.ndarray) -> None:
        self.true += [int(k) for k in true]
        self.known += [float(s) for s in known]
        self.candidates.append(np.asarray(candidates, dtype=np.int64))
        self.candidate_scores.append(np.asarray(scores, dtype=np.float64))

    def extend(self, other: _CalibrationScores) -> None:
        self.true += other.true
        self.known += other.known
        self.paths += other.paths
        self.candidates += other.candidates
        self.candidate_scores += other.candidate_scores
        self.layouts = self.layouts or other.layouts

    def calibrator(self, classes: Sequence[str], config: CalibrationConfig) -> Calibrator:
        known: dict[str, list[float]] = {t: [] for t in classes}
        for k, s in zip(self.true, self.known, strict=True):
            known[classes[k]].append(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once, by the calibrator returned
            known_only = Calibrator(config).fit(known)
        unknown = routing.unknown_scores(classes, np.concatenate(self.candidates),
                                         np.concatenate(self.candidate_scores), known_only)
        return Calibrator(config).fit(known, unknown)

    def router_summary(self, classes: Sequence[str], m: int) -> dict[str, Any]:
        """How the router did on the calibration images (held out from its fit, or scored by
        fold routers that never saw them)."""
        if self.layouts:
            return {"fitted": True, "used": False, "why": "models with layouts score every type and take "
                    "the one of the largest known-type p-value"}
        cand = np.concatenate(self.candidates)
        true = np.array(self.true)
        return {"fitted": True, "used": True, "type_candidates": m, "pooled_features": "mean,std",
                "calibration_images": len(true),
                "top1_accuracy": round(float(np.mean(cand[:, 0] == true)), 6),
                "in_candidates": round(float(np.mean((cand == true[:, None]).any(axis=1))), 6)}


def _resize_map(m: Tensor, h: int, w: int) -> np.ndarray:
    if m.shape != (h, w):
        m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bilinear",
                                            align_corners=False)[0, 0]
    out: np.ndarray = m.float().cpu().numpy()
    return out

