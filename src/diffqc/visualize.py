"""Heat maps people read: the image beside its colour-mapped anomaly map, with the score, the
p-value, the decision and a colour bar.

NumPy and Pillow only (the colour map is a 256 x 3 jet lookup table), so the service and the
CLI draw heat maps without importing matplotlib.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffqc.data import MIN_IMAGE_SIDE, as_image, check_outside_datasets, decode_image
from diffqc.errors import OutputError
from diffqc.output import path_text, write_atomic

# matplotlib's "jet" as piecewise-linear (position, value) nodes per channel
_JET_NODES = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),  # red
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),  # green
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),  # blue
)


def _jet_lut() -> np.ndarray:
    """256 x 3 float32 jet colour map: dark blue -> blue -> cyan -> yellow -> red -> dark red."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(x, [p for p, _ in nodes], [v for _, v in nodes]) for nodes in _JET_NODES]
    return np.stack(channels, axis=1).astype(np.float32)


JET = _jet_lut()
DECISION_COLOURS = {"PASS": (22, 163, 74), "REVIEW": (217, 119, 6), "REJECT": (220, 38, 38)}
_BG = (255, 255, 255)
_INK = (17, 24, 39)


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> their jet colours (``... x 3`` float32)."""
    idx = np.clip(np.rint(np.nan_to_num(values) * 255), 0, 255).astype(np.intp)
    out: np.ndarray = JET[idx]
    return out


def as_read(image: np.ndarray, gain: float) -> np.ndarray:
    """The image as the model reads it, to be drawn: ``backbone.input_gain`` applied as the
    backbone applies it (:meth:`diffqc.backbone.FeatureExtractor.raw_features`), so that a 12-bit camera's
    data in 16-bit files, nearly black as read, is drawn at the camera's white, white saturating."""
    return image if gain == 1.0 else np.clip(image * np.float32(gain), 0.0, 1.0)


def as_read_png(path: Path, gain: float) -> bytes:
    """An image file as the model reads it (:func:`as_read`), as an 8-bit PNG: what a screen is
    shown of a kept file that a browser draws otherwise (a 12-bit camera's, nearly black)."""
    buf = io.BytesIO()
    seen = as_read(decode_image(path), gain)
    Image.fromarray((seen * 255.0 + 0.5).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """``image`` as the detector reads it (:func:`~diffqc.data.as_image`: a uint8 or uint16 frame
    scaled as its file would be, grey as RGB): a camera's frame given to ``inspect`` and then here
    was clipped at 1 as floats, drawn white."""
    return as_image(image, "the image to draw")


def _scale(anomaly_map: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    lo = float(np.min(anomaly_map)) if vmin is None else float(vmin)
    hi = float(np.max(anomaly_map)) if vmax is None else float(vmax)
    return lo, max(hi, lo + 1e-12)


# the service's heat maps: the image at most this many px on its longer side, so that the
# picture (image | overlay | colour bar) is within a 1920 px screen's width. The dashboard shows
# it at 160 px, beside the kept image at its own size; drawn at a 1280 x 1024 camera's own size
# it took ~0.25 s of the one inference worker per part (benchmarks/heatmap_cost.py)
DEFAULT_HEATMAP_SIZE = 768
MAX_ENLARGED_SIDE = 2 * DEFAULT_HEATMAP_SIZE  # a small image is enlarged no further than this


def fit_within(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """An HxWx3 float image in [0, 1] shrunk (bilinear) so that its longer side is at most
    ``max_side`` px; returned as it is when it already fits or ``max_side`` is None or 0. A heat
    map is looked at on a screen: drawn at a 12-megapixel frame's own size it took seconds. No
    side is shrunk below the 8 px an image must have (an 8192 x 64 strip within 768 px is 768 x 8,
    not 768 x 6, which could not be drawn)."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (min(w, max(MIN_IMAGE_SIDE, round(w * scale))), min(h, max(MIN_IMAGE_SIDE, round(h * scale))))
    small = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(small.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0),
                      dtype=np.float32) / 255.0


def overlay(
    image: np.ndarray | Image.Image, anomaly_map: np.ndarray, *, vmin: float | None = None,
    vmax: float | None = None, alpha: float = 0.45,
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over the image (any array or Pillow image ``inspect``
    takes, drawn as it reads it) -> HxWx3 uint8.

    ``vmin``/``vmax`` fix the colour scale (e.g. the REVIEW threshold and a high score) so
    that overlays of different parts are comparable; by default the map's own range is used.
    """
    img = _rgb(image)
    m = anomaly_map.astype(np.float32)
    if m.shape != img.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.Resampling.BILINEAR))
    lo, hi = _scale(m, vmin, vmax)
    norm = np.clip((m - lo) / (hi - lo), 0, 1)
    weight = alpha * norm[..., None] ** 0.5  # low scores stay see-through
    blended = (1 - weight) * img + weight * colourise(norm)
    return (blended * 255 + 0.5).astype(np.uint8)


def is_strip(height: int, width: int) -> bool:
    """Whether an image is drawn above its overlay, not beside it: more than 3 times as wide as
    high (an edge's crop; side by side, an 8:1 strip made a 14:1 picture, a thin line on a screen)."""
    return width > 3 * height


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def panel(
    image: np.ndarray | Image.Image, anomaly_map: np.ndarray, *, score: float, p_value: float, decision: str,
    feature_type: str | None = None, vmin: float | None = None, vmax: float | None = None,
    alpha: float = 0.45, min_height: int = 256,
) -> np.ndarray:
    """``image | overlay`` side by side under a header (decision, score, p-value, type) with a
    colour bar on the right labelled with the scale's ends -> HxWx3 uint8; a strip
    (:func:`is_strip`) above its overlay instead.

    Small images are enlarged (nearest neighbour) so that the picture is ``min_height`` high and
    the text stays readable, but no further than a longer side of :data:`MAX_ENLARGED_SIDE` px
    (a thin strip is not drawn thousands of pixels wide).
    """
    img = _rgb(image)
    over = overlay(img, anomaly_map, vmin=vmin, vmax=vmax, alpha=alpha)
    base = (img * 255 + 0.5).astype(np.uint8)
    h, w = base.shape[:2]
    stacked = is_strip(h, w)
    zoom = max(1, min(-(-min_height // (2 * h if stacked else h)), MAX_ENLARGED_SIDE // max(h, w)))
    if zoom > 1:
        base = np.repeat(np.repeat(base, zoom, 0), zoom, 1)
        over = np.repeat(np.repeat(over, zoom, 0), zoom, 1)
        h, w = h * zoom, w * zoom
    text = max(12, min(28, (2 * h if stacked else h) // 18))
    small_px = max(10, text * 4 // 5)
    font, small = _font(text), _font(small_px)
    gap, header, bar_w = max(4, text // 2), text * 2 + 8, max(12, text)
    label_w = int(small.getlength("-0.000e+00")) + 8
    body_w, body_h = (w, 2 * h + gap) if stacked else (2 * w + gap, h)  # the two pictures
    info = f"score {_fmt(score)}   p = {p_value:.3g}" + (f"   type {feature_type}" if feature_type else "")
    info_x = gap + int(font.getlength(decision)) + 24
    # as wide as the header: on a tall, narrow image it was cut off after "REJECT score"
    width = max(body_w + 2 * gap + bar_w + label_w, info_x + int(font.getlength(info)) + gap)
    canvas = Image.new("RGB", (width, header + body_h + gap), _BG)
    canvas.paste(Image.fromarray(base), (gap, header))
    canvas.paste(Image.fromarray(over), (gap, header + h + gap) if stacked else (2 * gap + w, header))
    draw = ImageDraw.Draw(canvas)
    colour = DECISION_COLOURS.get(decision.upper(), _INK)
    draw.rectangle((gap, 4, gap + int(font.getlength(decision)) + 12, header - 6), fill=colour)
    draw.text((gap + 6, 6), decision, fill=(255, 255, 255), font=font)
    draw.text((info_x, 6), info, fill=_INK, font=font)
    # colour bar: top = the scale's high end
    lo, hi = _scale(anomaly_map, vmin, vmax)
    x0 = 2 * gap + body_w
    ramp = colourise(np.linspace(1, 0, body_h, dtype=np.float32))
    bar = (np.repeat(ramp[:, None, :], bar_w, axis=1) * 255 + 0.5).astype(np.uint8)
    canvas.paste(Image.fromarray(bar), (x0, header))
    draw.rectangle((x0, header, x0 + bar_w - 1, header + body_h - 1), outline=_INK)
    draw.text((x0 + bar_w + 4, header), _fmt(hi), fill=_INK, font=small)
    draw.text((x0 + bar_w + 4, header + body_h - small_px - 2), _fmt(lo), fill=_INK, font=small)
    return np.asarray(canvas)


def save_png(path: Path | str, picture: np.ndarray) -> Path:
    """Write an HxWx3 uint8 picture as a PNG, whole or not at all (the folder is created): a
    failed write (full disk, unwritable folder) is an :class:`~diffqc.errors.OutputError`
    naming ``path``, and leaves ``path`` as it was."""
    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    write_atomic(path, buf.getvalue(), sync=False)
    return path


def save_overlay(path: Path | str, image: np.ndarray, anomaly_map: np.ndarray, **kwargs: float) -> Path:
    """Write :func:`overlay` as a PNG (:func:`save_png`)."""
    return save_png(path, overlay(image, anomaly_map, **kwargs))


def save_panel(path: Path | str, image: np.ndarray, anomaly_map: np.ndarray, **kwargs: object) -> Path:
    """Write :func:`panel` as a PNG (:func:`save_png`)."""
    return save_png(path, panel(image, anomaly_map, **kwargs))  # type: ignore[arg-type]


def overlay_scales(calibration_summary: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """A fixed colour scale per type, so that heat maps of different parts compare: from the
    median calibration (GOOD) score, transparent, to well above the largest one, saturated."""
    out: dict[str, tuple[float, float]] = {}
    for ftype, info in (calibration_summary.get("types") or {}).items():
        try:
            med, top = float(info["median"]), float(info["max"])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(med) and np.isfinite(top) and top > med:
            out[str(ftype)] = (med, top + (top - med))
    return out


def heatmap_folder(folder: Path) -> None:
    """Make ``--heatmaps``'s folder before any image is scored, or say why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--heatmaps {folder} is a file; give a folder for the heat maps")
    check_outside_datasets(folder, "--heatmaps", "the heat maps")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the heat-map folder {folder}: {exc.strerror or exc}") from None


def new_heatmap_path(folder: Path, name: Path) -> Path:
    """A heat-map file named after the image's relative path (``test/blob/000.png`` ->
    ``test_blob_000_heatmap.png``) that did not exist before: it is created here, empty, so that
    no file (an earlier run's, or another image's of the same name) is ever overwritten. A name
    longer than a file system takes (255 bytes) becomes a digest of the whole path and its end."""
    stem = path_text("_".join([*name.parent.parts, name.stem])) or "image"
    if len(raw := stem.encode()) > 200:  # "_heatmap-9999.png" and the digest fit the rest
        tail = raw[-160:].decode("utf-8", errors="ignore")
        stem = f"{hashlib.sha256(raw).hexdigest()[:12]}-{tail}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(10_000):
        candidate = folder / (f"{stem}_heatmap.png" if k == 0 else f"{stem}_heatmap-{k}.png")
        try:
            with open(candidate, "xb"):
                return candidate
        except FileExistsError:
            continue
    raise OutputError(f"no free heat-map file name for {name} in {folder}")


def write_heatmap(folder: Path, name: Path, image: np.ndarray, result: Any,
                  calibration_summary: dict[str, Any], *, gain: float, max_side: int = 0) -> Path:
    """One inspected image's heat map (:func:`panel`: image | overlay with score, p-value,
    decision and a colour bar) in a new file of ``folder`` (:func:`new_heatmap_path`); the colour
    scale of a type is fixed (:func:`overlay_scales`, as the service draws them); the image as the
    model reads it (:func:`as_read`, the model's ``backbone.input_gain``), within ``max_side`` px
    (0: its own size). A heat map not written (a failed write, an image it cannot draw, Ctrl-C)
    leaves no file; its error is raised."""
    out = new_heatmap_path(folder, name)
    scale = overlay_scales(calibration_summary).get(result.feature_type)
    try:
        save_panel(out, fit_within(as_read(image, gain), max_side), result.anomaly_map, score=result.score,
                   p_value=result.p_value, decision=result.decision, feature_type=result.feature_type,
                   vmin=scale[0] if scale else None, vmax=scale[1] if scale else None)
    except BaseException:
        out.unlink(missing_ok=True)  # the empty file new_heatmap_path claimed
        raise
    return out
