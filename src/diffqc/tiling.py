"""Any image shape and size: how an image becomes square model inputs, and how their anomaly maps
become one map and one score for the whole image.

The backbone takes ``S × S`` inputs (``backbone.input_size``). ``backbone.resize`` says how an image
of another shape gets there:

- ``squash`` (default): the whole image resized to ``S × S`` (aspect lost). Runs the plain path of
  :class:`~diffqc.model.Detector`, unchanged.
- ``pad``: letterboxed: resized so its long side is ``S``, the rest filled by repeating the edge
  pixels; the map is cropped back to the image's region (the padding is never scored).
- ``crop``: the central square, resized to ``S × S``; the rest of the image is not inspected (its
  map is the lowest value of the inspected part).

``tiling.mode = "auto"`` cuts images larger than ``S`` (after ``tiling.scale``) into ``S × S`` tiles
that overlap by ``tiling.overlap`` of a tile, scored by the same model; the tiles' maps are merged
(mean where they overlap) into one map at the (scaled) image resolution. Smaller images fall back to
``backbone.resize``.

Each image gets a :class:`Layout`: a *canvas* (the map on which the image score is aggregated, the
same ``aggregate`` as untiled), the part of the image it covers, and the top-left corner of every
``S × S`` view in canvas coordinates (a view may reach past the canvas: that part is padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffqc import routing
from diffqc.config import DetectorConfig
from diffqc.data import as_image
from diffqc.errors import ConfigError, NotFittedError

if TYPE_CHECKING:
    from diffqc.inspection import Inspection
    from diffqc.model import Detector

RESIZE_MODES = ("squash", "pad", "crop")
TILING_MODES = ("off", "auto")

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (end exclusive)


@dataclass(frozen=True)
class Layout:
    """Where the views of one image come from and where their maps go."""

    mode: str  # squash | pad | crop | tile
    image_hw: tuple[int, int]
    size: int  # S, the model's input side
    canvas_hw: tuple[int, int]
    image_box: Box  # the part of the image the canvas covers (all of it except for crop)
    origins: tuple[tuple[int, int], ...]  # top-left of each S x S view in canvas coordinates

    @property
    def views(self) -> int:
        return len(self.origins)


def check_config(config: DetectorConfig) -> None:
    if config.backbone.resize not in RESIZE_MODES:
        raise ConfigError(f"backbone.resize must be one of {', '.join(RESIZE_MODES)}; "
                          f"got {config.backbone.resize!r}")
    if config.tiling.mode not in TILING_MODES:
        raise ConfigError(f"tiling.mode must be one of {', '.join(TILING_MODES)}; got {config.tiling.mode!r}")


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of ``size`` windows covering ``[0, length)`` with at least ``overlap`` (a
    fraction of ``size``) between neighbours, spread evenly, the last one flush with the end."""
    if length <= size:
        return [0]
    stride = max(1, size - round(overlap * size))
    n = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def plan(image_hw: tuple[int, int], config: DetectorConfig) -> Layout:
    """The layout of an image of ``image_hw`` (H, W) under ``config``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"empty image of shape {image_hw}")
    s = config.backbone.input_size
    til = config.tiling
    if til.mode == "auto":
        ch, cw = max(1, round(h * til.scale)), max(1, round(w * til.scale))
        if max(ch, cw) > s:
            ys = [y if ch >= s else -((s - ch) // 2) for y in tile_starts(ch, s, til.overlap)]
            xs = [x if cw >= s else -((s - cw) // 2) for x in tile_starts(cw, s, til.overlap)]
            return Layout("tile", (h, w), s, (ch, cw), (0, 0, h, w),
                          tuple((y, x) for y in ys for x in xs))
    mode = config.backbone.resize
    if mode == "pad":
        scale = s / max(h, w)
        ph, pw = max(1, min(s, round(h * scale))), max(1, min(s, round(w * scale)))
        return Layout("pad", (h, w), s, (ph, pw), (0, 0, h, w), ((-((s - ph) // 2), -((s - pw) // 2)),))
    if mode == "crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return Layout("crop", (h, w), s, (s, s), (y0, x0, y0 + side, x0 + side), ((0, 0),))
    return Layout("squash", (h, w), s, (s, s), (0, 0, h, w), ((0, 0),))


# --------------------------------------------------------------------------- pixels
def _as_chw(image: np.ndarray) -> Tensor:
    img = as_image(image)
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)


def view_pixels(image: np.ndarray, layout: Layout) -> Tensor:
    """The ``[V, 3, S, S]`` model inputs of one image (pixels in [0, 1])."""
    y0, x0, y1, x1 = layout.image_box
    t = _as_chw(image)[:, y0:y1, x0:x1][None]
    ch, cw = layout.canvas_hw
    if t.shape[-2:] != (ch, cw):  # the antialiased bilinear resize of diffqc.backbone.to_pixels
        t = F.interpolate(t, size=(ch, cw), mode="bilinear", align_corners=False, antialias=True)
    s = layout.size
    top = max(0, -min(y for y, _ in layout.origins))
    left = max(0, -min(x for _, x in layout.origins))
    bottom = max(0, max(y for y, _ in layout.origins) + s - ch)
    right = max(0, max(x for _, x in layout.origins) + s - cw)
    if top or left or bottom or right:  # edge pixels repeated into the padding
        t = F.pad(t, (left, right, top, bottom), mode="replicate")
    views = [t[0, :, y + top: y + top + s, x + left: x + left + s] for y, x in layout.origins]
    return torch.stack(views).clamp_(0, 1)


# --------------------------------------------------------------------------- maps
def merge(maps: Tensor, layout: Layout) -> Tensor:
    """``[V, S, S]`` view maps -> the ``[h, w]`` canvas map (the mean where views overlap)."""
    ch, cw = layout.canvas_hw
    s = layout.size
    if layout.views == 1 and layout.origins[0] == (0, 0) and (ch, cw) == (s, s):
        return maps[0]
    total = maps.new_zeros(ch, cw)
    count = maps.new_zeros(ch, cw)
    for m, (y, x) in zip(maps, layout.origins, strict=True):
        cy0, cx0, cy1, cx1 = max(0, y), max(0, x), min(ch, y + s), min(cw, x + s)
        total[cy0:cy1, cx0:cx1] += m[cy0 - y: cy1 - y, cx0 - x: cx1 - x]
        count[cy0:cy1, cx0:cx1] += 1
    return total / count.clamp_min(1)


def to_image(canvas: Tensor, layout: Layout, out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The canvas map as a map of the whole image (``out_hw``, default the image's size): resized
    onto the image region it covers; the rest (crop) gets the canvas's lowest value."""
    h, w = layout.image_hw
    oh, ow = out_hw or (h, w)
    y0, x0, y1, x1 = layout.image_box
    by0, bx0 = round(y0 * oh / h), round(x0 * ow / w)
    by1, bx1 = max(by0 + 1, round(y1 * oh / h)), max(bx0 + 1, round(x1 * ow / w))
    part = canvas.float()
    if part.shape != (by1 - by0, bx1 - bx0):
        part = F.interpolate(part[None, None], size=(by1 - by0, bx1 - bx0), mode="bilinear",
                             align_corners=False)[0, 0]
    if (by0, bx0, by1, bx1) == (0, 0, oh, ow):
        out: np.ndarray = part.cpu().numpy()
        return out
    full = part.new_full((oh, ow), float(canvas.min()))
    full[by0:by1, bx0:bx1] = part
    return full.cpu().numpy()


# --------------------------------------------------------------------------- the detector's path
def offsets(layouts: Sequence[Layout]) -> list[int]:
    """Row offsets of each image's views in a stacked batch (``len(layouts) + 1`` entries)."""
    out = [0]
    for lay in layouts:
        out.append(out[-1] + lay.views)
    return out


def rows_of(layouts: Sequence[Layout], images: Sequence[int]) -> list[int]:
    """The view rows of the given images."""
    off = offsets(layouts)
    return [r for i in images for r in range(off[i], off[i + 1])]


def extract_views(det: Detector, images: Sequence[np.ndarray], *, progress: bool = False
                  ) -> tuple[Tensor, list[Layout]]:
    """Raw backbone features of every view ``[sum V, C, h, w]`` and each image's layout."""
    from tqdm.auto import tqdm

    from diffqc.backbone import raw_features_in_batches

    layouts = [plan((int(img.shape[0]), int(img.shape[1])), det.config) for img in images]
    views = (view_pixels(img, lay) for img, lay in tqdm(
        list(zip(images, layouts, strict=True)), desc="extracting features", disable=not progress,
        unit="image"))
    raw = raw_features_in_batches(det.extractor, views, det.config.batch_size, det.device)
    return raw, layouts


def _cells_on_canvas(layout: Layout, grid: tuple[int, int]) -> Tensor:
    """``[V, h, w]``: whether each feature cell of each view has its centre on the canvas (not in
    a view's padding)."""
    h, w = grid
    s, (ch, cw) = layout.size, layout.canvas_hw
    out = torch.zeros(layout.views, h, w, dtype=torch.bool)
    for k, (y, x) in enumerate(layout.origins):
        cy = y + (torch.arange(h) + 0.5) * s / h
        cx = x + (torch.arange(w) + 0.5) * s / w
        out[k] = ((cy >= 0) & (cy < ch))[:, None] & ((cx >= 0) & (cx < cw))[None, :]
    return out if bool(out.any()) else torch.ones_like(out)


def scored_canvases(det: Detector, feats: Tensor, layout: Layout, types: Sequence[int]
                    ) -> list[tuple[Tensor, float]]:
    """One image's canvas map and image score under each of ``types``, from its standardised
    view features. The score aggregates the canvas by the method's rule; PatchCore's default (the
    paper's re-weighted largest patch score) re-weights the largest patch score among the
    patches of all views that lie on the canvas."""
    v = layout.views
    rep = feats.repeat(len(types), 1, 1, 1)  # type-major: [T * V]
    idx = torch.tensor(types, device=feats.device).repeat_interleave(v)
    scorer = det.reweighting_scorer()
    if scorer is None:
        maps = det.score_maps(rep, idx)
        canvases = [merge(maps[k * v: (k + 1) * v], layout) for k in range(len(types))]
        return [(c, float(det.image_scores(c[None])[0])) for c in canvases]
    patch = scorer.score_maps(rep, idx)  # [T * V, h, w], before smoothing
    maps = det.smooth(patch)
    on_canvas = _cells_on_canvas(layout, (patch.shape[-2], patch.shape[-1])).to(patch.device)
    patch = patch.masked_fill(~on_canvas.repeat(len(types), 1, 1), float("-inf"))
    reweighted = scorer.reweighted_scores(rep, idx, patch)  # each view's largest patch score
    best = patch.flatten(1).amax(dim=1)
    out = []
    for k in range(len(types)):
        views = slice(k * v, (k + 1) * v)
        out.append((merge(maps[views], layout), float(reweighted[views][int(best[views].argmax())])))
    return out


def score_table(det: Detector, feats: Tensor, layouts: Sequence[Layout]) -> Tensor:
    """Image scores of every image under every type, ``[N, n_types]``, from view features."""
    off = offsets(layouts)
    all_types = list(range(len(det.classes_)))
    rows = [[score for _, score in scored_canvases(det, feats[off[i]: off[i + 1]], lay, all_types)]
            for i, lay in enumerate(layouts)]
    return torch.tensor(rows, dtype=torch.float32).view(len(layouts), len(all_types))


def candidate_order(table: np.ndarray) -> np.ndarray:
    """Each image's types ordered by its raw score under them, lowest first (``[N, types]`` from
    a ``[N, types]`` score table): a model with layouts has no router, so every type is a
    candidate and the one of the largest known-type p-value wins (:func:`diffqc.routing.choose`:
    raw scores' scales differ by type, with the number of a type's fit images among other
    things: a type fitted on few GOOD images scores its own held-out parts high, and was never
    named beside a similar type fitted on many); equal p-values (a score below every calibration
    score of two types) go to the lower raw score. A defective part, unlikely under every type,
    is named by the least unlikely tail: its type is then no more than a guess."""
    return np.argsort(table, axis=1, kind="stable")


@torch.inference_mode()
def inspect_views(
    det: Detector, raw: Tensor, layouts: Sequence[Layout], given: Sequence[int | None],
    maps: bool = True, *, all_types: bool = True,
    map_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Inspection]:
    """:meth:`Detector.inspect` for models with layouts, from :func:`extract_views`; maps at each
    image's size, or at ``map_sizes`` (as :meth:`Detector.inspect_features` gives them)."""
    from diffqc.inspection import verdicts

    calibration = det.calibration_
    if calibration is None:
        raise NotFittedError
    feats = det.extractor.standardise(raw.to(det.device))
    off = offsets(layouts)
    n_types = len(det.classes_)
    need_table = all_types or any(g is None for g in given)
    table = np.empty((len(layouts), n_types), dtype=np.float32) if need_table else None
    predicted: list[int | None] = []
    own: list[int] = []
    scores: list[float] = []
    out_maps: list[np.ndarray] = []
    for i, lay in enumerate(layouts):
        f = feats[off[i]: off[i + 1]]
        g = given[i]
        if table is not None:
            scored = scored_canvases(det, f, lay, list(range(n_types)))
            table[i] = [score for _, score in scored]
            order = candidate_order(table[i: i + 1])
            (best,) = routing.choose(order, table[i: i + 1, order[0]], calibration, det.classes_)
            won = int(order[0, best])
            predicted.append(won)
            k = won if g is None else g
            canvas, score = scored[k]
        else:
            assert g is not None
            k = g
            predicted.append(None)
            canvas, score = scored_canvases(det, f, lay, [k])[0]
        own.append(k)
        scores.append(score)
        if maps:
            out_maps.append(to_image(canvas, lay, None if map_sizes is None else map_sizes[i]))
    return verdicts(det.classes_, calibration, given, own, scores, table, out_maps if maps else None,
                    predicted=predicted)
