"""What an inspection returns, and the errors and checksums of a model bundle: plain Python and
NumPy, so that a runtime without PyTorch (ONNX Runtime, the service) can use them."""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from diffqc.calibration import Calibrator
    from diffqc.data import Sample

BUNDLE_FILES = ("config.json", "weights.safetensors", "calibration.json", "metadata.json")
# 2: Gaussian-path means and variances in the prior channel order;
# 3: likelihood scoring (quadrature bank), baselines as published
BUNDLE_FORMAT = 3


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detector_repr(detector: Any, *where: str) -> str:
    """What a notebook shows of a detector (PyTorch's or a runtime's): its class, ``where`` it
    runs (each ``name=value``), the model and its types, the levels it decides at; a detector
    not fitted says so."""
    config = detector.config
    parts = [*where, f"method={config.method!r}", f"backbone={config.backbone.name!r}"]
    if not detector.classes_:
        return f"{type(detector).__name__}(not fitted, {', '.join(parts)})"
    parts.insert(len(where), f"model_id={detector.version!r}")
    parts.append(f"types={list(detector.classes_)!r}")
    if (cal := detector.calibration_) is not None:
        parts.append(f"alpha_review={cal.config.alpha_review:g}, alpha_reject={cal.config.alpha_reject:g}")
    return f"{type(detector).__name__}({', '.join(parts)})"


def _release(version: str) -> tuple[int, ...] | None:
    """``(0, 2, 0)`` of ``"0.2.0"`` (a suffix left aside: ``0.3.0rc1`` reads as 0.3.0); None for a
    version that does not begin with a number."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else None


def newer_writer(meta: dict[str, Any]) -> str | None:
    """The version of diffqc that wrote a bundle (``metadata.json``'s ``diffqc_version``) where it
    is newer than this diffqc: a setting such a bundle has that this one does not know is that
    version's (its minor version is raised with each: ``tests/test_config.py``), not damage."""
    from diffqc import __version__

    written = str(meta.get("diffqc_version", ""))
    theirs, ours = _release(written), _release(__version__)
    return written if theirs is not None and ours is not None and theirs > ours else None


def check_bundle_version(path: Path | str, meta: dict[str, Any]) -> None:
    """A bundle this diffqc can read: the same bundle format, written by a diffqc whose major
    version is not newer. An older diffqc of the same format is fine. Else a BundleError naming
    both versions."""
    from diffqc import __version__
    from diffqc.errors import BundleError

    written = str(meta.get("diffqc_version", "unknown"))
    fmt = meta.get("format")
    if fmt != BUNDLE_FORMAT:
        newer = isinstance(fmt, int) and fmt > BUNDLE_FORMAT
        advice = "upgrade diffqc to read it" if newer else "train it again with this diffqc"
        raise BundleError(f"model bundle {path}: bundle format {fmt} (written by diffqc {written}) is "
                          f"{'newer' if newer else 'not'} {'than' if newer else 'the'} format "
                          f"{BUNDLE_FORMAT} that diffqc {__version__} reads; {advice}")
    theirs, ours = _release(written), _release(__version__)
    if "diffqc_version" in meta and theirs is None:
        raise BundleError(f"model bundle {path}: metadata.json has an unreadable diffqc_version "
                          f"{written!r}")
    if theirs is not None and ours is not None and theirs[0] > ours[0]:
        raise BundleError(f"model bundle {path} was written by diffqc {written}, a newer major version "
                          f"than this diffqc {__version__}; upgrade diffqc to read it")


# how far a part's image may lie outside its type's training image sizes before it is named
SIZE_TOLERANCE = 0.1


def image_size_ranges(sizes: Iterable[tuple[str, int, int]]) -> dict[str, list[list[int]]]:
    """Per type, ``[[min height, max height], [min width, max width]]`` of ``(type, height,
    width)``: the sizes of the GOOD images a model was fit on (``metadata.json``'s
    ``training_data.image_sizes``), for :class:`ImageCheck`."""
    out: dict[str, list[list[int]]] = {}
    for feature_type, height, width in sizes:
        r = out.setdefault(feature_type, [[height, height], [width, width]])
        r[0] = [min(r[0][0], height), max(r[0][1], height)]
        r[1] = [min(r[1][0], width), max(r[1][1], width)]
    return out


# how far apart an image's channels may lie (a JPEG's rounding of a grey image) for it to be grey
GREY_TOLERANCE = 2.0 / 255.0


def is_grey(image: np.ndarray) -> bool:
    """Whether an image (HxW, or HxWxC; in [0, 1], uint8 or uint16) is grey: its channels equal within
    :data:`GREY_TOLERANCE`, looked at on every 8th pixel of every 8th row (a mono camera's
    frame; a colour camera's has channels that differ)."""
    if image.ndim == 2 or image.shape[-1] == 1:
        return True
    view = _view(image)
    return bool(np.abs(view - view[..., :1]).max(initial=0.0) <= GREY_TOLERANCE)


# a part darker than this share of its type's darkest training image is named: 12-bit data in
# 16-bit files reads at 1/16 (a GOOD part: REJECT), a lamp out alike; half as bright still passed
DARK_SHARE = 0.25
# and one with this share more of its pixels at white than any of its type's training images: 1.5
# times the exposure clipped 60 % of a GOOD part (REJECT, p 2e-5); 1.2 times clipped none (PASS)
WHITE_MARGIN = 0.25
# a pixel at white: at or above 254 of 255
WHITE = 254.0 / 255.0


def _view(image: np.ndarray) -> np.ndarray:
    """Every 8th pixel of every 8th row (its colour channels), as the checks look at an image, in
    [0, 1]: a camera's uint8 or uint16 frame scaled as its file would be (the view alone)."""
    view = image[::8, ::8] if image.ndim == 2 else image[::8, ::8, :3]
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(view.dtype)
    return view if scale is None else view / scale


def brightness(image: np.ndarray) -> float:
    """The mean of an image (HxW, or HxWxC; in [0, 1], uint8 or uint16) on :func:`_view`."""
    view = _view(image)
    return float(view.mean()) if view.size else 0.0


def white_share(image: np.ndarray) -> float:
    """The share of an image's values at white (clipped: at or above :data:`WHITE`) on :func:`_view`."""
    view = _view(image)
    return float((view >= WHITE).mean()) if view.size else 0.0


def image_white(seen: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Per type, the largest :func:`white_share` of ``(type, share)``: the GOOD images a model was
    fit on (``metadata.json``'s ``training_data.image_white``), for :class:`ImageCheck`."""
    out: dict[str, float] = {}
    for feature_type, share in seen:
        out[feature_type] = max(out.get(feature_type, 0.0), round(share, 4))
    return out


def image_brightness(seen: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
    """Per type, ``[darkest, brightest]`` of ``(type, brightness)``: the GOOD images a model was
    fit on (``metadata.json``'s ``training_data.image_brightness``), for :class:`ImageCheck`."""
    out: dict[str, list[float]] = {}
    for feature_type, value in seen:
        v = round(value, 4)
        lo, hi = out.get(feature_type, [v, v])
        out[feature_type] = [min(lo, v), max(hi, v)]
    return out


def _one_kind_per_type(seen: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Per type, the one kind of ``(type, kind)`` seen, or ``mixed``."""
    kinds: dict[str, set[str]] = {}
    for feature_type, kind in seen:
        kinds.setdefault(feature_type, set()).add(kind)
    return {t: k.pop() if len(k) == 1 else "mixed" for t, k in kinds.items()}


def image_colours(seen: Iterable[tuple[str, bool]]) -> dict[str, str]:
    """Per type, ``grey`` when every one of ``(type, grey)`` is grey, ``colour`` when none is,
    else ``mixed``: the GOOD images a model was fit on (``metadata.json``'s
    ``training_data.image_colours``), for :class:`ImageCheck`."""
    return _one_kind_per_type((t, "grey" if grey else "colour") for t, grey in seen)


def image_compressions(seen: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Per type, ``lossless`` or ``lossy`` when every one of ``(type, compression)`` is so
    (:func:`diffqc.data.image_compression`), else ``mixed``: the files a model was fit on
    (``metadata.json``'s ``training_data.image_compression``), for :class:`ImageCheck`."""
    return _one_kind_per_type(seen)


class ImageCheck:
    """Names, once per type, a part whose image lies outside what its type was trained on, in
    size (by more than :data:`SIZE_TOLERANCE`), in colour or in compression: every image is
    scaled to the model's input, so a camera's new region of interest or lens shows every part at
    another scale or aspect than the calibration saw, a camera switched between mono and colour
    (a firmware update, a new pixel format) changes every part's features, and one set to save
    JPEG where the model learned lossless files shows every part with the format's artifacts (a
    GOOD part of the drill's dots, p 1.0 as PNG, was REJECTed at p 0.004 as a JPEG of quality 75);
    scores move for every part at once; and one far darker than every training image (less than
    :data:`DARK_SHARE` of the darkest's brightness: 12-bit data saved in 16-bit files, a camera
    set to Mono12, reads 16 times darker; a lamp out) or brighter than four times the brightest
    (1 / :data:`DARK_SHARE`: 8-bit data of a type trained on 12-bit data), or with far more of
    it clipped at white (:data:`WHITE_MARGIN` more than any training image: an exposure or gain
    raised), is scored on another footing. A bundle
    without the sizes (older, or tiled: tiles are cut at native resolution whatever the size)
    checks no size, but a tiled one names a part no longer than a tile (``tiled_above``: it is
    scaled up instead, where its type's training images were all tiled); one without the
    colours, no colour; one without the compressions, or a part given as an array, no
    compression; one without the brightness or the white, neither.

    Every part is checked (a type's parts cost the same whether it was named or not), and
    :meth:`snapshot` counts, per type and check, the parts outside and when the first and the
    last came: what the service shows its operators (``/v1/line``, ``/metrics``), so that a
    camera mended is seen as mended. Thread-safe: the service's worker calls it while a request
    reads the snapshot."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        self.metadata = metadata  # the bundle's, checked against: see :func:`warn_outside`
        training = metadata.get("training_data") or {}
        self.ranges: dict[str, Any] = dict(training.get("image_sizes") or {})
        self.tiled_above: dict[str, float] = dict(training.get("tiled_above") or {})
        self.colours: dict[str, str] = dict(training.get("image_colours") or {})
        self.compressions: dict[str, str] = dict(training.get("image_compression") or {})
        self.brightness: dict[str, list[float]] = dict(training.get("image_brightness") or {})
        self.white: dict[str, float] = dict(training.get("image_white") or {})
        # (type, check: "size", "colour", ...) -> {"note", "parts", "first_at", "last_at"}
        self.outside: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, feature_type: str | None, height: int, width: int,
                 image: np.ndarray | None = None, compression: str | None = None) -> str | None:
        """The warning for this part, the first time its type is seen outside its sizes, its
        colour (``image``'s pixels; without them, the size alone) or its compression (its file's,
        :func:`diffqc.data.image_compression`; None: not known)."""
        if feature_type is None:
            return None
        notes = (("size", self._size(feature_type, height, width)),
                 ("colour", self._colour(feature_type, image)),
                 ("compression", self._compression(feature_type, compression)),
                 ("brightness", self._brightness(feature_type, image)),
                 ("clipping", self._clipping(feature_type, image)))
        found = [(check, note) for check, note in notes if note]
        now = time.time()
        first: list[str] = []
        with self._lock:
            for check, note in found:
                seen = self.outside.get((feature_type, check))
                if seen is None:
                    first.append(note)
                    self.outside[(feature_type, check)] = {"note": note, "parts": 1, "first_at": now,
                                                           "last_at": now}
                else:
                    seen["parts"] += 1
                    seen["last_at"] = now
        return "; ".join(first) + " (said once per type)" if first else None

    def snapshot(self) -> list[dict[str, Any]]:
        """The types seen outside their training images, one entry per type and check
        (``feature_type``, ``check``, ``parts``, ``first_at``, ``last_at`` as Unix times, the
        ``note`` said the first time), by type."""
        with self._lock:
            return [{"feature_type": t, "check": c, **dict(v)}
                    for (t, c), v in sorted(self.outside.items())]

    def _size(self, feature_type: str, height: int, width: int) -> str | None:
        if (side := self.tiled_above.get(feature_type)) is not None and max(height, width) <= side:
            return (f"a {width}x{height} px image of type {feature_type!r}, no side longer than a tile "
                    f"({side:g} px): it is scaled up to the model's input, where its type's training "
                    "images were cut into tiles at their own scale, so it is scored on another scale "
                    "than the model learned and was calibrated on (has the camera's region of "
                    "interest changed? if on purpose, train again on its images)")
        if feature_type not in self.ranges:
            return None
        (h0, h1), (w0, w1) = self.ranges[feature_type]
        lo, hi = 1.0 - SIZE_TOLERANCE, 1.0 + SIZE_TOLERANCE
        if lo * h0 <= height <= hi * h1 and lo * w0 <= width <= hi * w1:
            return None
        seen = f"{w0}x{h0}" if (h0, w0) == (h1, w1) else f"{w0}-{w1} x {h0}-{h1}"
        return (f"a {width}x{height} px image of type {feature_type!r}, whose training images were "
                f"{seen} px: every image is scaled to the model's input, so parts at another size "
                "or aspect are scored on another scale than the model learned and was calibrated "
                "on (has the camera's region of interest or lens changed? if on purpose, train "
                "again on its images)")

    def _colour(self, feature_type: str, image: np.ndarray | None) -> str | None:
        trained = self.colours.get(feature_type)
        if image is None or trained not in ("grey", "colour"):
            return None
        if is_grey(image) == (trained == "grey"):
            return None
        seen, was = ("colour", "grey") if trained == "grey" else ("grey", "in colour")
        return (f"a {seen} image of type {feature_type!r}, whose training images were {was}: the "
                "model learned and was calibrated on the other, so every part's score moves (has "
                "the camera's pixel format changed, mono to colour or back? if on purpose, train "
                "again on its images)")

    def _brightness(self, feature_type: str, image: np.ndarray | None) -> str | None:
        if image is None or feature_type not in self.brightness:
            return None
        lo, hi = self.brightness[feature_type]
        seen = brightness(image)
        if seen > hi / DARK_SHARE:  # only a type trained darker than a quarter of white can be
            return (f"an image of type {feature_type!r} far brighter than its training images (mean "
                    f"brightness {seen:.3f}; theirs {lo:.2g}-{hi:.2g}): the model learned and was "
                    "calibrated on parts as dark as those, so every part's score moves (a brighter "
                    "lamp, a longer exposure or a higher gain, or 8-bit data where the type was "
                    "trained on a 12-bit camera's data in 16-bit files: has the camera's pixel "
                    "format been set to Mono8, a new camera's default? set it back to the "
                    "training's, or train again on its images)")
        if seen >= DARK_SHARE * lo:
            return None
        return (f"an image of type {feature_type!r} far darker than its training images (mean "
                f"brightness {seen:.3f}; theirs {lo:.2f}-{hi:.2f}): the model learned and was "
                "calibrated on parts as bright as those, so every part's score moves (a lamp out, a "
                "shorter exposure or a lower gain, or 12-bit data saved in 16-bit files: has the "
                "camera's pixel format been set to Mono12? set it back to Mono8, or train again on "
                "its images)")

    def _clipping(self, feature_type: str, image: np.ndarray | None) -> str | None:
        if image is None or feature_type not in self.white:
            return None
        most = self.white[feature_type]
        if (seen := white_share(image)) <= most + WHITE_MARGIN:
            return None
        return (f"an image of type {feature_type!r} far brighter than its training images ({seen:.0%} "
                f"of its pixels at white; theirs at most {most:.0%}): what is clipped at white shows "
                "nothing of the part, so every part's score moves (a longer exposure, a higher gain "
                "or a brighter lamp: set it back, or train again on its images)")

    def _compression(self, feature_type: str, compression: str | None) -> str | None:
        trained = self.compressions.get(feature_type)
        if compression is None or trained not in ("lossless", "lossy") or compression == trained:
            return None
        if compression == "lossy":
            return (f"a lossy (JPEG or WebP) image of type {feature_type!r}, whose training images "
                    "were lossless (PNG, BMP, TIFF, ...): its compression artifacts move every part's "
                    "score (has the camera been set to save JPEG? if on purpose, train again on its "
                    "images)")
        return (f"a lossless image of type {feature_type!r}, whose training images were lossy (JPEG "
                "or WebP): the model learned their compression artifacts as part of a GOOD part, so "
                "every part's score moves (has the camera's image format changed? if on purpose, "
                "train again on its images)")


def warn_outside(check: ImageCheck | None, metadata: Mapping[str, Any], images: Sequence[Any],
                 results: Sequence[Inspection]) -> ImageCheck:
    """What the Python API's ``inspect`` (every runtime) says of its parts, as the commands name
    them: a warning for a part outside its type's training images (:class:`ImageCheck`: size,
    colour, brightness, clipping; an array has no file, so not its compression), once per type and
    check for the detector. ``check`` is the detector's (None: none yet), replaced when
    ``metadata`` is no longer the one it was made for (the detector fit again); returns it."""
    from diffqc.data import as_image

    if check is None or check.metadata is not metadata:
        check = ImageCheck(metadata)
    for image, result in zip(images, results, strict=True):
        # the checks read [0, 1] (uint8 and uint16 scaled on their view): other arrays, an int64
        # or RGBA one, as the detector read them (converting a whole 2048 x 2048 uint8 frame
        # took 19 ms)
        plain = image.ndim == 2 or image.shape[2] == 3
        pixels = image if plain and image.dtype in (np.uint8, np.uint16, np.float32) else as_image(image)
        if note := check(result.feature_type, pixels.shape[0], pixels.shape[1], pixels):
            warnings.warn(note, stacklevel=3)
    return check


# how many of a type's images are read for their colour and brightness by :func:`other_images` (a
# camera's format is one for all its frames: the first few show it, without decoding every image
# a second time)
COLOUR_LOOKS = 4


def other_images(metadata: Mapping[str, Any], samples: Iterable[Sample]) -> list[str]:
    """``"<path>: <note>"`` for the first of ``samples`` of each type (and check) whose size,
    colour, compression or brightness its type was not trained on (:class:`ImageCheck`), as
    ``inspect`` names such parts: a dataset from a changed camera, given to ``calibrate`` or
    ``test``. Sizes and compressions are read from every file's header; colour and brightness
    from the pixels of a type's first :data:`COLOUR_LOOKS` images. A file that cannot be read is
    passed over (named where it is read for its score)."""
    from diffqc.data import file_compression, image_shape, read_image
    from diffqc.errors import ImageReadError

    check = ImageCheck(metadata)
    looked: dict[str, int] = {}
    notes = []
    for s in samples:
        if (shape := image_shape(s.path)) is None:
            continue
        pixels = None
        if looked.get(s.feature_type, 0) < COLOUR_LOOKS:
            looked[s.feature_type] = looked.get(s.feature_type, 0) + 1
            with contextlib.suppress(ImageReadError, OSError):
                pixels = read_image(s.path)
        if note := check(s.feature_type, *shape, pixels, file_compression(s.path)):
            notes.append(f"{s.path}: {note}")
    return notes


@dataclass(frozen=True)
class Inspection:
    """The verdict on one image."""

    score: float  # anomaly score under ``feature_type`` (higher = more anomalous)
    p_value: float
    decision: str  # PASS / REVIEW / REJECT
    feature_type: str  # the type it was scored under (given, or predicted when unknown)
    predicted_type: str | None  # the type unknown-type mode picks (None when not computed)
    type_known: bool
    type_scores: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score, "p_value": self.p_value, "decision": self.decision,
            "feature_type": self.feature_type, "predicted_type": self.predicted_type,
            "type_known": self.type_known, "type_scores": self.type_scores,
        }



def inspect_arguments(images: Sequence[Any], feature_types: Sequence[str | None] | None
                      ) -> list[str | None]:
    """The per-image types of an ``inspect(images, feature_types)`` call (None: unknown), or a
    clear error for the calls that are easy to get wrong: one array instead of a list of them (it
    was taken for a list of rows), a type as a string instead of a list (a list of its letters)."""
    if isinstance(images, np.ndarray):
        given = "list(images)" if images.ndim == 4 else "[image]"  # a stack of images, or one
        raise TypeError(f"inspect takes a list of images, got one array of shape {images.shape}: "
                        f"pass {given}")
    if not isinstance(images, Sequence):  # a generator: its length is unknown, and a look uses it up
        raise TypeError(f"inspect takes a list of images, got a {type(images).__name__}: pass "
                        "list(images), or batches of it (each call holds its images and results)")
    if feature_types is not None and not isinstance(feature_types, Sequence):
        raise TypeError(f"feature_types is one type per image, got a {type(feature_types).__name__}: "
                        "pass a list")
    for item in [images] if isinstance(images, str | PurePath) else images:
        if isinstance(item, str | PurePath):
            raise TypeError(f"inspect takes image arrays, got the file path {str(item)!r}: read it "
                            "with diffqc.data.read_image(path)")
    if isinstance(feature_types, str):
        raise TypeError(f"feature_types is one type per image, got the string {feature_types!r}: "
                        f"pass [{feature_types!r}] * len(images)")
    types: list[str | None] = list(feature_types) if feature_types is not None else [None] * len(images)
    if len(types) != len(images):
        raise ValueError(f"{len(images)} images but {len(types)} feature types")
    odd = next((t for t in types if t is not None and not isinstance(t, str)), None)
    if odd is not None:  # a class index (3), as a classifier's label: it was an AttributeError
        raise TypeError(f"a feature type is its name (a str) or None (unknown), got {odd!r} "
                        f"({type(odd).__name__})")
    return types


def as_arrays(images: Sequence[Any]) -> list[np.ndarray]:
    """A batch's images as arrays: an array as it is; anything else read as the detector reads an
    image (:func:`diffqc.data.as_image`): a Pillow image (``Image.open(path)``) decoded as its
    file is (it was an AttributeError), nested lists (``arr.tolist()``: so was it) or a tensor as
    their array."""
    from diffqc.data import as_image

    return [im if isinstance(im, np.ndarray) else as_image(im) for im in images]


def verdicts(
    classes: Sequence[str], calibration: Calibrator, given: Sequence[int | None], own: Sequence[int],
    scores: Sequence[float], table: np.ndarray | None, maps: Sequence[np.ndarray] | None, *,
    predicted: Sequence[int | None],
) -> list[Inspection]:
    """One :class:`Inspection` per image from what a runtime computed: ``given`` type index (None
    when unknown), ``own`` type scored under, its ``scores``, the optional ``[N, types]`` score
    ``table``, the optional anomaly ``maps`` and the ``predicted`` type (None: none predicted;
    :func:`diffqc.routing.route_and_score`, or for models with layouts
    :func:`diffqc.tiling.inspect_views`). PyTorch and ONNX Runtime share this, so both decide the
    same way."""
    results = []
    for i, k in enumerate(own):
        known = given[i] is not None
        p = calibration.p_value(classes[k], float(scores[i]), type_known=known)
        pred = predicted[i]
        results.append(Inspection(
            score=float(scores[i]), p_value=p, decision=calibration.decide(p), feature_type=classes[k],
            predicted_type=None if pred is None else classes[pred],
            type_known=known,
            type_scores={} if table is None else {c: float(table[i, j]) for j, c in enumerate(classes)},
            anomaly_map=None if maps is None else maps[i],
        ))
    return results


def in_batches(inspect: Callable[..., list[Inspection]], images: Sequence[Any],
               types: Sequence[str | None], batch_size: int, **kwargs: Any) -> list[Inspection]:
    """``inspect(images, types, **kwargs)`` ``batch_size`` images at a time: one call's memory
    grows with its images (under ``all_types``, every type's maps of each), so a whole test set
    given at once (200 frames of 256 x 256 and 8 types: 9.6 GB) is scored as batches are, each
    image as it is scored alone."""
    return [r for i in range(0, len(images), batch_size)
            for r in inspect(images[i : i + batch_size], types[i : i + batch_size], **kwargs)]


def inspect_in_batches(
    inspect: Callable[..., list[Inspection]], samples: Sequence[Sample], batch_size: int, *,
    type_known: bool = True, progress: bool = False, all_types: bool = True, maps: bool = True,
    skip_corrupt: bool = False, shrink: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[Inspection], list[Sample]]:
    """Read dataset ``samples`` in batches and ``inspect(images, types, all_types=, maps=)`` each;
    returns the results and the samples read (the ``inspect_samples`` of both runtimes).

    ``shrink`` (only without ``maps``, whose sizes are the images'): each image is cut to the
    model's input as soon as it is read — the runtime's own resize, which its ``inspect`` then
    leaves as it is — so a batch holds model inputs, not camera frames."""
    from tqdm.auto import tqdm

    from diffqc.data import iter_images
    from diffqc.errors import ImageReadError

    if shrink is not None and maps:
        raise ValueError("shrink needs maps=False: a map is drawn at its image's own size")
    results: list[Inspection] = []
    kept: list[Sample] = []
    for i in tqdm(range(0, len(samples), batch_size), desc="inspecting", disable=not progress,
                  unit="batch"):
        errors: list[ImageReadError] = []
        images: list[np.ndarray] = []
        chunk: list[Sample] = []
        for sample, image in iter_images(samples[i : i + batch_size], errors,
                                         skip_corrupt=skip_corrupt):
            images.append(image if shrink is None else shrink(image))
            chunk.append(sample)
            del image
        types = [s.feature_type if type_known else None for s in chunk]
        # (unchecked: a dataset's images are named by :func:`other_images`, from their files)
        results += inspect(images, types, all_types=all_types, maps=maps, check_images=False)
        kept += chunk
    return results, kept
