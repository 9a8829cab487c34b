"""Embedded synthetic inkjet-print dataset (MVTec AD layout, several feature types).

:func:`write_synthetic_dataset` renders grayscale crops of printed patterns on a
textured substrate, one image per *part*, for the eight feature types of the original
line (:data:`FEATURE_TYPES`). GOOD images vary naturally (ink density, drop jitter,
small shifts and rotations, illumination gradients, substrate texture, sensor noise,
blur); defective images carry one realistic print defect of their type
(:data:`DEFECT_KINDS`) with a binary pixel mask.

Layout under ``OUT``::

    <type>/train/good/<part>.png
    <type>/test/good/<part>.png
    <type>/test/<kind>/<part>.png
    <type>/ground_truth/<kind>/<part>_mask.png
    manifest.csv   (path, feature_type, label, mask, part_id, split, defect)
    README.md

Every image is rendered from its own ``numpy.random.default_rng`` seeded with
``(seed, type, index)``, so a seed gives byte-identical files whatever the order.
Shapes are signed distance functions in pixels (negative inside ink) turned into
anti-aliased coverage, so the rendering is fully vectorised.
"""

from __future__ import annotations

import csv
import io
import json
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from diffqc.data import SYNTH_MARKER, check_outside_datasets
from diffqc.errors import OutputError

__all__ = ["DEFECT_KINDS", "FEATURE_TYPES", "render_image", "write_synthetic_dataset"]

FEATURE_TYPES: tuple[str, ...] = (
    "angle", "dist1", "dist6", "dots", "edge1", "edge2", "edge3", "edge4",
)

DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "angle": ("wrong_angle", "break", "blob"),
    "dist1": ("wrong_spacing", "misaligned", "satellite"),
    "dist6": ("wrong_spacing", "misaligned", "void"),
    "dots": ("missing_dot", "nozzle_out", "satellite", "blob"),
    "edge1": ("ragged", "void", "splash"),
    "edge2": ("break", "smear", "satellite"),
    "edge3": ("chipped", "blob", "void"),
    "edge4": ("bridge", "banding", "ragged"),
}

_TYPE_NOTES: dict[str, str] = {
    "angle": "two printed lines meeting at a nominal 55 degree angle",
    "dist1": "two printed bars at the short nominal distance (gap 0.075 x width)",
    "dist6": "two printed bars at six times that distance (gap 0.45 x width)",
    "dots": "regular field of inkjet drops",
    "edge1": "straight printed edge (ink on the left half)",
    "edge2": "thin horizontal printed line",
    "edge3": "printed corner (ink in one quadrant)",
    "edge4": "double edge: two parallel diagonal bars with a narrow gap",
}

TRAIN_FRACTION = 0.65
MAX_IMAGE_SIZE = 4096  # a synthetic part at a camera's size; larger ones only run out of memory
# under ~50 px dist6's bars are too thin to hold a void (a part's render failed); 64 has room
MIN_IMAGE_SIZE = 64
_MASK_THRESHOLD = 0.06  # |darkness(defective) - darkness(good)| that counts as defect
_MIN_MASK_PIXELS = 3
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- geometry


@lru_cache(maxsize=4)
def _pixel_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of an s x s image, float32, read-only."""
    ax = np.arange(s, dtype=np.float32) + 0.5
    x = np.broadcast_to(ax[None, :], (s, s))
    y = np.broadcast_to(ax[:, None], (s, s))
    return x, y


@dataclass
class _Ctx:
    """Everything one image's renderer needs: rng, size, pixel and pattern coordinates."""

    rng: np.random.Generator
    s: int
    k: float  # pixel scale relative to a 256 px image
    x: np.ndarray  # image coordinates of pixel centres
    y: np.ndarray
    u: np.ndarray  # pattern coordinates (image centre, shifted and rotated), pixels
    v: np.ndarray
    theta: float  # pattern rotation (radians)
    shift: tuple[float, float]
    edge_noise: np.ndarray  # natural ink-edge raggedness, pixels (added to every sdf)

    def px(self, frac: float, floor: float = 0.0) -> float:
        """A length given as a fraction of the image size, in pixels (at least ``floor``)."""
        return max(frac * self.s, floor)

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        c, s_ = math.cos(self.theta), math.sin(self.theta)
        half = self.s / 2
        return (half + self.shift[0] + c * u - s_ * v, half + self.shift[1] + s_ * u + c * v)

    def sev(self) -> float:
        """A defect severity in [0, 1], biased towards small defects."""
        return float(self.rng.uniform() ** 1.2)

    def pick(self, cond: np.ndarray, margin: float = 0.08) -> tuple[float, float] | None:
        """A random pixel centre (x, y) where ``cond`` holds, away from the border."""
        m = round(margin * self.s)
        sub = cond[m : self.s - m, m : self.s - m]
        idx = np.flatnonzero(sub)
        if idx.size == 0:
            return None
        j = int(idx[self.rng.integers(idx.size)])
        r, c = divmod(j, sub.shape[1])
        return (c + m + 0.5, r + m + 0.5)


@lru_cache(maxsize=16)
def _upsampler(s: int, n: int) -> np.ndarray:
    """(s, n) matrix of periodic linear interpolation from n coarse to s fine samples."""
    pos = (np.arange(s) + 0.5) * (n / s) - 0.5
    lo = np.floor(pos).astype(np.int64)
    w = (pos - lo).astype(np.float32)
    mat = np.zeros((s, n), dtype=np.float32)
    rows = np.arange(s)
    np.add.at(mat, (rows, lo % n), 1 - w)
    np.add.at(mat, (rows, (lo + 1) % n), w)
    mat.setflags(write=False)
    return mat


def _smooth_noise(rng: np.random.Generator, s: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise low-passed with a Gaussian of ``sigma`` pixels."""
    sigma = max(sigma, 0.3)
    if sigma > 4:  # render coarse and upsample: same look, far cheaper
        f = max(1, int(sigma // 2))
        n = -(-s // f)
        coarse = ndimage.gaussian_filter(
            rng.standard_normal((n, n), dtype=np.float32), sigma / f, mode="wrap"
        )
        up = _upsampler(s, n)
        out = up @ coarse @ up.T
    else:
        out = ndimage.gaussian_filter(
            rng.standard_normal((s, s), dtype=np.float32), sigma, mode="wrap"
        )
    out = out - out.mean()
    return (out / (out.std() + 1e-8)).astype(np.float32)


def _make_ctx(rng: np.random.Generator, s: int) -> _Ctx:
    k = s / 256.0
    x, y = _pixel_grid(s)
    shift = (float(rng.uniform(-2.0, 2.0) * k), float(rng.uniform(-2.0, 2.0) * k))
    theta = math.radians(float(np.clip(rng.normal(0.0, 0.5), -2.0, 2.0)))
    c, sn = math.cos(theta), math.sin(theta)
    dx = x - (s / 2 + shift[0])
    dy = y - (s / 2 + shift[1])
    u = (c * dx + sn * dy).astype(np.float32)
    v = (-sn * dx + c * dy).astype(np.float32)
    edge = _smooth_noise(rng, s, 1.3 * k) * np.float32(rng.uniform(0.2, 0.45) * max(k, 0.5))
    return _Ctx(rng, s, k, x, y, u, v, theta, shift, edge)


# ------------------------------------------------------------------- shape primitives


def _cov(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased ink coverage of a signed distance field (pixels, negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _box(px: np.ndarray, py: np.ndarray, hx: float, hy: float) -> np.ndarray:
    """Signed distance to an axis-aligned box of half sizes (hx, hy) centred at 0."""
    qx = np.abs(px) - hx
    qy = np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return (outside + np.minimum(np.maximum(qx, qy), 0)).astype(np.float32)


def _ray(
    u: np.ndarray, v: np.ndarray, ox: float, oy: float, ang: float, half_w: float
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to a thick ray from (ox, oy) in direction ``ang``, and the ray parameter."""
    dx, dy = math.cos(ang), math.sin(ang)
    px, py = u - ox, v - oy
    t = px * dx + py * dy
    tc = np.maximum(t, 0)
    d = np.hypot(px - tc * dx, py - tc * dy) - half_w
    return d.astype(np.float32), t.astype(np.float32)


def _blob(ctx: _Ctx, cx: float, cy: float, r: float, irregular: float = 0.25) -> np.ndarray:
    """Signed distance (image coordinates) to an irregular round blob."""
    rng = ctx.rng
    dx, dy = ctx.x - cx, ctx.y - cy
    d = np.hypot(dx, dy)
    a = np.arctan2(dy, dx)
    wob = np.ones_like(d)
    for h in (2, 3, 5):
        wob += float(rng.uniform(0, irregular) / h * 1.5) * np.cos(h * a + rng.uniform(0, 6.3))
    return (d - r * wob).astype(np.float32)


def _drops(
    ctx: _Ctx, near: tuple[float, float], n: int, r_lo: float, r_hi: float, spread: float
) -> np.ndarray:
    """Signed distance to ``n`` small satellite drops scattered around ``near``."""
    rng = ctx.rng
    sdf = np.full((ctx.s, ctx.s), np.inf, dtype=np.float32)
    ang0 = rng.uniform(0, 2 * math.pi)
    for i in range(n):
        a = ang0 + rng.normal(0, 0.6)
        dist = spread * (0.0 if i == 0 else rng.uniform(0.2, 1.0))
        cx = near[0] + dist * math.cos(a)
        cy = near[1] + dist * math.sin(a)
        r = rng.uniform(r_lo, r_hi) * (1.0 if i == 0 else rng.uniform(0.5, 1.0))
        sdf = np.minimum(sdf, np.hypot(ctx.x - cx, ctx.y - cy) - max(r, 0.6))
    return sdf


def _window(ctx: _Ctx, cx: float, cy: float, radius: float) -> np.ndarray:
    """Smooth bump (1 at the centre, ~0 beyond ``radius``)."""
    d2 = (ctx.x - cx) ** 2 + (ctx.y - cy) ** 2
    return np.exp(-d2 / (2 * (radius / 2) ** 2)).astype(np.float32)


# --------------------------------------------------------------------------- scenes


@dataclass
class _Scene:
    """A rendered GOOD pattern: its signed distance field plus type-specific parameters."""

    sdf: np.ndarray
    params: dict[str, Any]


@dataclass
class _Defect:
    """A defect applied to a scene: new ink sdf / coverage, density multiplier, footprint."""

    sdf: np.ndarray | None = None
    cov: np.ndarray | None = None  # overrides sdf where given (e.g. smears)
    dens_mult: np.ndarray | None = None
    footprint: np.ndarray | None = None  # pixels that belong to the mask regardless of diff


def _scene_angle(ctx: _Ctx) -> _Scene:
    rng = ctx.rng
    hw = ctx.px(0.018, 1.0)
    ox, oy = -0.22 * ctx.s, 0.18 * ctx.s
    alpha = math.radians(55.0 + rng.normal(0, 0.15))
    d1, t1 = _ray(ctx.u, ctx.v, ox, oy, 0.0, hw)
    d2, t2 = _ray(ctx.u, ctx.v, ox, oy, -alpha, hw)
    sdf = np.minimum(d1, d2) + ctx.edge_noise
    return _Scene(sdf, {"hw": hw, "o": (ox, oy), "alpha": alpha, "d": (d1, d2), "t": (t1, t2)})


def _defect_angle(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    p = sc.params
    d1 = p["d"][0]
    if kind == "wrong_angle":
        delta = math.radians((1.5 + 7.0 * ctx.sev()) * rng.choice([-1.0, 1.0]))
        ox, oy = p["o"]
        nd2, _ = _ray(ctx.u, ctx.v, ox, oy, -p["alpha"] + delta, p["hw"])
        return _Defect(sdf=np.minimum(d1, nd2) + ctx.edge_noise, footprint=_cov(nd2) > 0.5)
    if kind == "break":
        which = int(rng.integers(2))
        d, t = p["d"][which], p["t"][which]
        t0 = rng.uniform(0.12, 0.6) * ctx.s
        g = ctx.px(0.01 + 0.07 * ctx.sev(), 1.5)
        carve = np.maximum(np.abs(t - t0) - g / 2, d - 2.0)  # only across this line
        if rng.uniform() < 0.3:  # partial break: a neck from one side
            side = rng.choice([-1.0, 1.0])
            ang = 0.0 if which == 0 else -p["alpha"]
            ox, oy = p["o"]
            n = (ctx.u - ox) * -math.sin(ang) + (ctx.v - oy) * math.cos(ang)
            depth = p["hw"] * rng.uniform(0.3, 1.2)
            carve = np.maximum(carve, side * -n + p["hw"] - 2 * depth)
        return _Defect(sdf=np.maximum(sc.sdf, -carve))
    if kind == "blob":
        hit = ctx.pick(np.abs(sc.sdf) < 0.7)
        if hit is None:
            return None
        r = ctx.px(0.008 + 0.055 * ctx.sev(), 1.2)
        return _Defect(sdf=np.minimum(sc.sdf, _blob(ctx, *hit, r)))
    raise ValueError(kind)


def _scene_dist(ctx: _Ctx, gap_frac: float) -> _Scene:
    rng = ctx.rng
    hw, hh = ctx.px(0.05, 1.0), ctx.px(0.2, 3.0)
    gap = gap_frac * ctx.s + rng.normal(0, 0.25 * ctx.k)
    cx = (-(gap / 2 + hw), gap / 2 + hw)
    bars = [_box(ctx.u - c, ctx.v, hw, hh) for c in cx]
    sdf = np.minimum(bars[0], bars[1]) + ctx.edge_noise
    return _Scene(sdf, {"hw": hw, "hh": hh, "cx": cx, "bars": bars})


def _defect_dist(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    p = sc.params
    if kind in ("wrong_spacing", "misaligned"):
        which = int(rng.integers(2))
        sign = rng.choice([-1.0, 1.0])
        if kind == "wrong_spacing":
            du, dv = sign * ctx.px(0.008 + 0.05 * ctx.sev(), 1.5), 0.0
        else:
            du, dv = 0.0, sign * ctx.px(0.012 + 0.08 * ctx.sev(), 1.5)
        moved = _box(ctx.u - p["cx"][which] - du, ctx.v - dv, p["hw"], p["hh"])
        other = p["bars"][1 - which]
        return _Defect(sdf=np.minimum(other, moved) + ctx.edge_noise, footprint=_cov(moved) > 0.5)
    if kind == "satellite":
        hit = ctx.pick((sc.sdf > ctx.px(0.01, 1.5)) & (sc.sdf < ctx.px(0.08, 4)))
        if hit is None:
            return None
        n = int(rng.integers(1, 6))
        drops = _drops(ctx, hit, n, ctx.px(0.004), ctx.px(0.005 + 0.018 * ctx.sev()),
                       ctx.px(0.01 + 0.04 * ctx.sev()))
        return _Defect(sdf=np.minimum(sc.sdf, drops))
    if kind == "void":
        return _void(ctx, sc)
    raise ValueError(kind)


def _void(ctx: _Ctx, sc: _Scene, r_hi: float = 0.06) -> _Defect | None:
    """One to three unprinted holes inside the ink."""
    rng = ctx.rng
    sdf = sc.sdf
    r = ctx.px(0.005 + r_hi * ctx.sev(), 1.0)
    for _ in range(int(rng.integers(1, 4)) if r < 0.02 * ctx.s else 1):
        hit = ctx.pick(sc.sdf < -(r + 1.5 * ctx.k + 1.0))
        if hit is None:
            return None
        sdf = np.maximum(sdf, -_blob(ctx, *hit, r, 0.35))
        r = r * rng.uniform(0.5, 1.0)
    return _Defect(sdf=sdf)


def _scene_dots(ctx: _Ctx) -> _Scene:
    rng = ctx.rng
    pitch = ctx.s / 11.0
    n = math.ceil(0.75 * ctx.s / pitch) + 2
    shape = (2 * n + 1, 2 * n + 1)
    r0 = 0.30 * pitch * rng.normal(1.0, 0.04)
    rad = (r0 * rng.normal(1.0, 0.06, shape)).astype(np.float32)
    jx = rng.normal(0, 0.05 * pitch, shape).astype(np.float32)
    jy = rng.normal(0, 0.05 * pitch, shape).astype(np.float32)
    dens = np.clip(rng.normal(1.0, 0.05, shape), 0.6, 1.1).astype(np.float32)
    ci = np.clip(np.rint(ctx.u / pitch).astype(np.int64) + n, 0, 2 * n)
    cj = np.clip(np.rint(ctx.v / pitch).astype(np.int64) + n, 0, 2 * n)
    params = {"pitch": pitch, "n": n, "rad": rad, "jx": jx, "jy": jy, "dens": dens,
              "ci": ci, "cj": cj}
    return _Scene(_dots_sdf(ctx, params, rad), params)


def _dots_sdf(ctx: _Ctx, p: dict[str, Any], rad: np.ndarray) -> np.ndarray:
    ci, cj, n, pitch = p["ci"], p["cj"], p["n"], p["pitch"]
    cx = (ci - n) * pitch + p["jx"][ci, cj]
    cy = (cj - n) * pitch + p["jy"][ci, cj]
    d = np.hypot(ctx.u - cx, ctx.v - cy) - rad[ci, cj]
    return (d + ctx.edge_noise).astype(np.float32)


def _dots_defect(ctx: _Ctx, p: dict[str, Any], rad: np.ndarray) -> _Defect:
    """Drops with changed radii; the mask covers each changed drop (old or new size)."""
    changed = rad != p["rad"]
    fp_rad = np.where(changed, np.maximum(rad, p["rad"]), -1e3).astype(np.float32)
    return _Defect(sdf=_dots_sdf(ctx, p, rad), footprint=_cov(_dots_sdf(ctx, p, fp_rad)) > 0.5)


def _defect_dots(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    p = sc.params
    ci, cj = p["ci"], p["cj"]
    hit = ctx.pick(sc.sdf < -0.5, margin=0.12)
    if hit is None:
        return None
    iy, ix = int(hit[1]), int(hit[0])
    i0, j0 = int(ci[iy, ix]), int(cj[iy, ix])
    rad = p["rad"].copy()
    if kind == "missing_dot":
        cells = [(i0, j0)]
        for _ in range(int(rng.integers(0, 3)) if rng.uniform() < 0.4 else 0):
            di, dj = [(1, 0), (0, 1), (-1, 0), (0, -1)][int(rng.integers(4))]
            cells.append((cells[-1][0] + di, cells[-1][1] + dj))
        for a, b in cells:
            if rng.uniform() < 0.15:  # a weak, undersized drop instead of none
                rad[a, b] *= rng.uniform(0.3, 0.55)
            else:
                rad[a, b] = -1e3
        return _dots_defect(ctx, p, rad)
    if kind == "nozzle_out":
        length = int(rng.integers(3, 2 * p["n"] + 1))
        start = int(rng.integers(-length + 1, 1))
        if rng.uniform() < 0.5:
            rad[i0, max(j0 + start, 0) : j0 + start + length] = -1e3
        else:
            rad[max(i0 + start, 0) : i0 + start + length, j0] = -1e3
        return _dots_defect(ctx, p, rad)
    if kind == "satellite":
        gap = ctx.pick(sc.sdf > 0.22 * p["pitch"], margin=0.1)
        if gap is None:
            return None
        n = int(rng.integers(1, 4))
        drops = _drops(ctx, gap, n, ctx.px(0.004), ctx.px(0.006 + 0.016 * ctx.sev()),
                       0.2 * p["pitch"] * ctx.sev())
        return _Defect(sdf=np.minimum(sc.sdf, drops))
    if kind == "blob":
        if rng.uniform() < 0.5:  # an oversized drop
            rad[i0, j0] *= 1.3 + 0.6 * ctx.sev()
            return _dots_defect(ctx, p, rad)
        r = ctx.px(0.01 + 0.05 * ctx.sev(), 1.2)  # a merged ink blob on a dot
        return _Defect(sdf=np.minimum(sc.sdf, _blob(ctx, *hit, r, 0.35)))
    raise ValueError(kind)


def _scene_edge1(ctx: _Ctx) -> _Scene:
    return _Scene(ctx.u + ctx.edge_noise, {})


def _ragged(ctx: _Ctx, sc: _Scene) -> _Defect | None:
    hit = ctx.pick(np.abs(sc.sdf) < 0.6, margin=0.12)
    if hit is None:
        return None
    sev = ctx.sev()
    amp = ctx.px(0.005 + 0.03 * sev, 0.8)
    win = _window(ctx, *hit, ctx.px(0.04 + 0.2 * ctx.rng.uniform(), 3.0))
    noise = _smooth_noise(ctx.rng, ctx.s, ctx.px(0.004 + 0.006 * ctx.rng.uniform(), 0.8))
    return _Defect(sdf=sc.sdf + amp * noise * win)


def _defect_edge1(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    if kind == "ragged":
        return _ragged(ctx, sc)
    if kind == "void":
        return _void(ctx, sc)
    if kind == "splash":
        hit = ctx.pick((sc.sdf > ctx.px(0.006, 1.5)) & (sc.sdf < ctx.px(0.06, 4)))
        if hit is None:
            return None
        n = int(ctx.rng.integers(1, 8))
        sev = ctx.sev()
        drops = _drops(ctx, hit, n, ctx.px(0.004), ctx.px(0.005 + 0.02 * sev),
                       ctx.px(0.008 + 0.05 * sev))
        return _Defect(sdf=np.minimum(sc.sdf, drops))
    raise ValueError(kind)


def _scene_edge2(ctx: _Ctx) -> _Scene:
    hw = ctx.px(0.02, 1.0)
    return _Scene(np.abs(ctx.v) - hw + ctx.edge_noise, {"hw": hw})


def _defect_edge2(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    hw = sc.params["hw"]
    u0 = rng.uniform(-0.35, 0.35) * ctx.s
    if kind == "break":
        g = ctx.px(0.008 + 0.07 * ctx.sev(), 1.2)
        carve = np.abs(ctx.u - u0) - g / 2
        if rng.uniform() < 0.45:  # a neck: ink missing from one side only
            side = rng.choice([-1.0, 1.0])
            depth = hw * rng.uniform(0.6, 1.6)
            carve = np.maximum(carve, side * ctx.v + hw - depth)
        return _Defect(sdf=np.maximum(sc.sdf, -carve))
    if kind == "smear":
        side = rng.choice([-1.0, 1.0])
        length = ctx.px(0.03 + 0.25 * ctx.sev(), 3.0)
        tail = ctx.px(0.015 + 0.09 * ctx.sev(), 2.0)
        dist = side * ctx.v - hw  # distance out of the line on the smeared side
        along = np.clip(1 - np.abs(ctx.u - u0) / (length / 2), 0, 1) ** 0.5
        reach = tail * along * (1 + 0.35 * _smooth_noise(rng, ctx.s, ctx.px(0.01, 1.0)))
        fade = np.clip(1 - dist / np.maximum(reach, 1e-3), 0, 1)
        strength = rng.uniform(0.4, 0.85)
        smear = np.where((dist > -1) & (reach > 0.5), fade * strength, 0).astype(np.float32)
        return _Defect(cov=np.maximum(_cov(sc.sdf), smear))
    if kind == "satellite":
        hit = ctx.pick((sc.sdf > ctx.px(0.008, 1.5)) & (sc.sdf < ctx.px(0.07, 4)))
        if hit is None:
            return None
        drops = _drops(ctx, hit, int(rng.integers(1, 6)), ctx.px(0.004),
                       ctx.px(0.005 + 0.018 * ctx.sev()), ctx.px(0.01 + 0.04 * ctx.sev()))
        return _Defect(sdf=np.minimum(sc.sdf, drops))
    raise ValueError(kind)


def _scene_edge3(ctx: _Ctx) -> _Scene:
    rc = ctx.rng.uniform(0.5, 2.0) * ctx.k
    cu, cv = 0.08 * ctx.s, -0.08 * ctx.s
    # ink where u < cu and v > cv (one quadrant), corner slightly rounded
    qx = ctx.u - cu + rc
    qy = cv - ctx.v + rc
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    sdf = outside + np.minimum(np.maximum(qx, qy), 0) - rc
    return _Scene(sdf.astype(np.float32) + ctx.edge_noise, {"corner": (cu, cv)})


def _defect_edge3(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    if kind in ("chipped", "blob"):
        edge = np.abs(sc.sdf) < 0.6
        if rng.uniform() < 0.35:  # at the corner itself
            cx, cy = ctx.to_image(*sc.params["corner"])
            edge &= _window(ctx, cx, cy, ctx.px(0.05, 3)) > 0.3
        hit = ctx.pick(edge)
        if hit is None:
            return None
        r = ctx.px(0.008 + 0.065 * ctx.sev(), 1.2)
        bl = _blob(ctx, *hit, r, 0.35)
        new = np.maximum(sc.sdf, -bl) if kind == "chipped" else np.minimum(sc.sdf, bl)
        return _Defect(sdf=new)
    if kind == "void":
        return _void(ctx, sc)
    raise ValueError(kind)


def _scene_edge4(ctx: _Ctx) -> _Scene:
    bw, gap = ctx.px(0.08, 1.5), ctx.px(0.035, 1.0)
    a = (ctx.u + ctx.v) * np.float32(math.sqrt(0.5))  # across the bars
    c = gap / 2 + bw
    sdf = np.minimum(np.abs(a - c) - bw, np.abs(a + c) - bw)
    return _Scene(sdf.astype(np.float32) + ctx.edge_noise, {"a": a, "gap": gap, "bw": bw})


def _defect_edge4(ctx: _Ctx, sc: _Scene, kind: str) -> _Defect | None:
    rng = ctx.rng
    p = sc.params
    if kind == "bridge":
        hit = ctx.pick(np.abs(p["a"]) < 0.5, margin=0.15)
        if hit is None:
            return None
        b = (ctx.v - ctx.u) * np.float32(math.sqrt(0.5))  # along the bars
        b0 = float(b[int(hit[1]), int(hit[0])])
        width = ctx.px(0.006 + 0.05 * ctx.sev(), 1.2)
        reach = p["gap"] * (1.0 if rng.uniform() < 0.6 else rng.uniform(0.4, 0.8))
        side = rng.choice([-1.0, 1.0])
        a_rel = side * p["a"] + p["gap"] / 2  # 0 at one bar's edge, gap at the other's
        br = _box(b - b0, a_rel - reach / 2, width / 2, reach / 2 + 0.5)
        br = br + 0.6 * ctx.k * _smooth_noise(rng, ctx.s, ctx.px(0.006, 0.8))
        return _Defect(sdf=np.minimum(sc.sdf, br))
    if kind == "banding":
        depth = rng.uniform(0.25, 0.55)
        mult = np.ones((ctx.s, ctx.s), dtype=np.float32)
        ink = _cov(sc.sdf) > 0.5
        foot = np.zeros_like(ink)
        for _ in range(int(rng.integers(1, 4))):
            v0 = rng.uniform(-0.38, 0.38) * ctx.s
            w = ctx.px(0.012 + 0.05 * ctx.sev(), 1.5)
            band = _cov(np.abs(ctx.v - v0) - w / 2)
            mult *= 1 - depth * band
            foot |= (band > 0.5) & ink
        return _Defect(sdf=sc.sdf, dens_mult=mult, footprint=foot)
    if kind == "ragged":
        return _ragged(ctx, sc)
    raise ValueError(kind)


_Renderer = tuple[Callable[[_Ctx], _Scene], Callable[[_Ctx, _Scene, str], _Defect | None]]
_RENDERERS: dict[str, _Renderer] = {
    "angle": (_scene_angle, _defect_angle),
    "dist1": (lambda c: _scene_dist(c, 0.075), _defect_dist),
    "dist6": (lambda c: _scene_dist(c, 0.45), _defect_dist),
    "dots": (_scene_dots, _defect_dots),
    "edge1": (_scene_edge1, _defect_edge1),
    "edge2": (_scene_edge2, _defect_edge2),
    "edge3": (_scene_edge3, _defect_edge3),
    "edge4": (_scene_edge4, _defect_edge4),
}


# -------------------------------------------------------------------------- imaging


def _type_code(feature_type: str) -> int:
    return zlib.crc32(feature_type.encode("utf-8"))


def render_image(
    feature_type: str, kind: str | None, seed: int, index: int, image_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image (uint8 HxW) and, for a defect ``kind``, its bool mask.

    The result depends only on the arguments (the rng is seeded with
    ``(seed, type, index)``).
    """
    if feature_type not in _RENDERERS:
        raise ValueError(f"unknown feature type {feature_type!r}; known: {FEATURE_TYPES}")
    if kind is not None and kind not in DEFECT_KINDS[feature_type]:
        raise ValueError(
            f"{feature_type} has no defect kind {kind!r}; known: {DEFECT_KINDS[feature_type]}"
        )
    s = int(image_size)
    rng = np.random.default_rng([int(seed), _type_code(feature_type), int(index)])
    ctx = _make_ctx(rng, s)
    scene_fn, defect_fn = _RENDERERS[feature_type]
    scene = scene_fn(ctx)

    # ink density and substrate/illumination appearance (drawn before any defect)
    ink_level = np.float32(rng.uniform(0.85, 0.97))
    ink_mottle = _smooth_noise(rng, s, 6.0 * ctx.k)
    dens = np.clip(ink_level * (1 + rng.uniform(0.02, 0.06) * ink_mottle), 0, 1)
    if feature_type == "dots":
        p = scene.params
        dens = np.clip(dens * p["dens"][p["ci"], p["cj"]], 0, 1)
    dark_good = _cov(scene.sdf) * dens

    mask = None
    dark = dark_good
    if kind is not None:
        for _attempt in range(40):
            d = defect_fn(ctx, scene, kind)
            if d is None:
                continue
            cov = d.cov if d.cov is not None else _cov(d.sdf if d.sdf is not None else scene.sdf)
            dark_def = cov * dens * (d.dens_mult if d.dens_mult is not None else 1.0)
            m = np.abs(dark_def - dark_good) > _MASK_THRESHOLD
            if d.footprint is not None:
                m |= d.footprint
            if int(m.sum()) >= _MIN_MASK_PIXELS:
                grow = max(1, round(ctx.k))
                mask = ndimage.binary_dilation(m, iterations=grow)
                dark = np.clip(dark_def, 0, 1).astype(np.float32)
                break
        else:  # pragma: no cover - every kind finds a place within a few tries
            raise RuntimeError(f"could not place a {kind} defect on {feature_type} #{index}")

    substrate = np.float32(rng.uniform(0.72, 0.84)) * (
        1
        + np.float32(rng.uniform(0.01, 0.025)) * _smooth_noise(rng, s, 0.8 * ctx.k)
        + np.float32(rng.uniform(0.01, 0.035)) * _smooth_noise(rng, s, 10.0 * ctx.k)
    )
    ink_tone = np.float32(rng.uniform(0.07, 0.16))
    img = substrate * (1 - dark) + ink_tone * dark
    phi = rng.uniform(0, 2 * math.pi)
    half = s / 2
    ramp = ((ctx.x - half) * math.cos(phi) + (ctx.y - half) * math.sin(phi)) / half
    r2 = ((ctx.x - half) ** 2 + (ctx.y - half) ** 2) / half**2
    illum = 1 + rng.uniform(0, 0.08) * ramp - rng.uniform(0, 0.06) * r2
    img = ndimage.gaussian_filter(img * illum.astype(np.float32), rng.uniform(0.45, 1.0) * ctx.k)
    sigma_n = rng.uniform(0.006, 0.016)
    img = img + rng.standard_normal((s, s), dtype=np.float32) * (sigma_n * (0.5 + img))
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, mask


# ------------------------------------------------------------------------- dataset


def _split_counts(n: int, defect_fraction: float) -> tuple[int, int, int]:
    """(train_good, test_good, test_defect) for a type with ``n`` images."""
    n_train = min(n, max(1, math.floor(TRAIN_FRACTION * n + 0.5)))
    n_test = n - n_train
    n_def = math.floor(defect_fraction * n_test + 0.5)
    if defect_fraction > 0 and n_test >= 2:
        n_def = min(max(n_def, 1), n_test - 1)
    n_def = min(n_def, n_test)
    return n_train, n_test - n_def, n_def


def min_parts_with_defects(defect_fraction: float = 0.25) -> int:
    """The fewest parts that give every type a defective test part (``defect_fraction`` > 0):
    with fewer, a type has none and its AUROC is undefined."""
    if not 0.0 < defect_fraction < 1.0:
        raise ValueError(f"defect_fraction must be in (0, 1), got {defect_fraction}")
    per_type = next(n for n in range(1, 10_000) if _split_counts(n, defect_fraction)[2] >= 1)
    return per_type * len(FEATURE_TYPES)


_Job = tuple[str, int, str, str | None]


def _plan(n_parts: int, seed: int, defect_fraction: float) -> list[_Job]:
    """Every image as (feature_type, index, part_id, defect kind or 'train' / None)."""
    n_types = len(FEATURE_TYPES)
    base, rem = divmod(n_parts, n_types)
    width = max(4, len(str(n_parts)))
    jobs: list[_Job] = []
    part = 0
    for t_i, ft in enumerate(FEATURE_TYPES):
        n = base + (1 if t_i < rem else 0)
        n_train, n_good, n_def = _split_counts(n, defect_fraction)
        kinds = DEFECT_KINDS[ft]
        roles: list[str | None] = ["train"] * n_train + [None] * n_good
        roles += [kinds[j % len(kinds)] for j in range(n_def)]
        order = np.random.default_rng([int(seed), _type_code(ft), 0x5EED]).permutation(n)
        for index in range(n):
            part += 1
            jobs.append((ft, index, f"p{part:0{width}d}", roles[int(order[index])]))
    return jobs


def check_target(out: Path, *, overwrite: bool = False) -> None:
    """Raise :class:`FileExistsError` unless a synthetic set may be written to ``out``: a new or
    empty folder, or an earlier synthetic set (``overwrite``: any folder); never in another
    dataset's folder of images (an :class:`OutputError`: it would read them as its parts)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    check_outside_datasets(out, "the synthetic dataset's folder", "the synthetic images")
    if out.is_dir() and any(out.iterdir()) and not (out / SYNTH_MARKER).is_file() and not overwrite:
        raise FileExistsError(f"{out} is not empty and holds no earlier synthetic dataset (no "
                              f"{SYNTH_MARKER}); choose a new or empty folder (nothing in it is deleted)")


def _prepare_out(out: Path, overwrite: bool) -> None:
    check_target(out, overwrite=overwrite)
    if (out / SYNTH_MARKER).is_file():
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)


def _remove_previous(out: Path) -> None:
    """Delete an earlier synthetic set's own files (those its manifest lists or, for a set whose
    writing was cut short before its manifest, those its marker's arguments plan; the manifest,
    README and marker) and the folders they leave empty; any other file in ``out`` stays."""
    root = out.resolve()
    listed: list[Path] = []
    manifest = out / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                listed += [out / row[k] for k in ("path", "mask") if row.get(k)]
    else:
        listed += [out / rel for rel in _planned_files(out / SYNTH_MARKER)]
    for path in [*listed, manifest, out / "README.md", out / SYNTH_MARKER]:
        if path.resolve().is_relative_to(root) and (path.is_file() or path.is_symlink()):
            path.unlink()
    for ft in FEATURE_TYPES:  # deepest first: a folder is removed only once empty
        for folder in [*sorted((out / ft).rglob("*"), key=lambda p: -len(p.parts)), out / ft]:
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()


def _planned_files(marker: Path) -> list[str]:
    """The files (relative paths) a set with this marker's arguments writes; none when the marker
    cannot be read."""
    try:
        m = json.loads(marker.read_text(encoding="utf-8"))
        jobs = _plan(int(m["n_parts"]), int(m["seed"]), float(m["defect_fraction"]))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [rel for ft, _, part_id, role in jobs for rel in _paths(ft, part_id, role) if rel]


def _paths(ft: str, part_id: str, role: str | None) -> tuple[str, str]:
    """An image's and its mask's path in the set ("" for no mask)."""
    if role == "train":
        return f"{ft}/train/good/{part_id}.png", ""
    if role is None:
        return f"{ft}/test/good/{part_id}.png", ""
    return f"{ft}/test/{role}/{part_id}.png", f"{ft}/ground_truth/{role}/{part_id}_mask.png"


def _write_marker(out: Path, args: dict[str, Any], *, complete: bool) -> None:
    marker = {"generator": "diffqc.synth", "format_version": _FORMAT_VERSION, **args,
              "complete": complete}
    _write_text(out / SYNTH_MARKER, json.dumps(marker, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise _incomplete(path, exc) from None


def _incomplete(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}; the synthetic dataset is "
                       "incomplete: the same command, run again, replaces it")


def _save_png(arr: np.ndarray, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").save(path, format="PNG", compress_level=1)
    except OSError as exc:
        raise _incomplete(path, exc) from None


def _readme(summary: dict[str, Any]) -> str:
    lines = [
        "# diffqc synthetic inkjet-print dataset",
        "",
        "Generated by `diffqc.synth.write_synthetic_dataset` "
        f"(format version {_FORMAT_VERSION}): seed {summary['seed']}, "
        f"{summary['n_parts']} parts, {summary['image_size']}x{summary['image_size']} px "
        f"grayscale 8-bit, defect fraction of the test split {summary['defect_fraction']}.",
        "",
        "Layout (MVTec AD): `<type>/train/good`, `<type>/test/good`, `<type>/test/<defect>`, "
        "`<type>/ground_truth/<defect>/<part>_mask.png` (0/255). `manifest.csv` lists every "
        "image (path, feature_type, label, mask, part_id, split, defect), paths relative to "
        "this folder. Same seed and arguments give byte-identical files.",
        "",
        "GOOD variation: ink density and mottle, drop position/size jitter, shifts of a few "
        "pixels, rotations up to 2 degrees, illumination gradients and vignetting, substrate "
        "texture, sensor noise and slight blur.",
        "",
        "| type | pattern | train good | test good | test defect | defect kinds (count) |",
        "|---|---|---|---|---|---|",
    ]
    for ft in FEATURE_TYPES:
        t = summary["types"][ft]
        kinds = ", ".join(f"{k} ({n})" for k, n in t["defects"].items())
        lines.append(
            f"| {ft} | {_TYPE_NOTES[ft]} | {t['train_good']} | {t['test_good']} | "
            f"{t['test_defect']} | {kinds} |"
        )
    lines += [
        "",
        f"Totals: {summary['splits']['train']} train, {summary['splits']['test']} test "
        f"({summary['labels']['good']} good, {summary['labels']['defect']} defective).",
        "",
    ]
    return "\n".join(lines)


def check_arguments(n_parts: int, image_size: int = 256, defect_fraction: float = 0.25, *,
                    names: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` for arguments :func:`write_synthetic_dataset` cannot honour (checked
    before any file is written; ``diffqc data synth`` and ``demo`` check theirs first, ``names``
    giving the options the user typed: ``{"n_parts": "--parts", "image_size": "--size"}``)."""
    parts, size = (dict(names or {}).get(n, n) for n in ("n_parts", "image_size"))
    if n_parts < 3 * len(FEATURE_TYPES):
        raise ValueError(f"{parts} must be at least {3 * len(FEATURE_TYPES)} (3 for each of the "
                         f"{len(FEATURE_TYPES)} types), got {n_parts}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"{size} must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size}")
    if not 0.0 <= defect_fraction < 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1), got {defect_fraction}")


def write_synthetic_dataset(
    out: Path | str,
    n_parts: int = 1327,
    seed: int = 0,
    image_size: int = 256,
    defect_fraction: float = 0.25,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the synthetic inkjet dataset under ``out``; return a summary of its counts.

    ``n_parts`` images in total are spread as evenly as possible over
    :data:`FEATURE_TYPES` (the remainder to the first types). Per type about 65 % go to
    ``train/good``; of the rest, ``defect_fraction`` are defective, spread round-robin
    over the type's :data:`DEFECT_KINDS`. ``out`` must be empty, missing, or a previous
    synthetic set (whose own files are deleted first: those its manifest lists, nothing else);
    otherwise :class:`FileExistsError` is raised unless ``overwrite=True`` (which deletes nothing
    and replaces only the paths this function writes).
    """
    out = Path(out)
    n_parts, image_size = int(n_parts), int(image_size)
    check_arguments(n_parts, image_size, defect_fraction)
    _prepare_out(out, overwrite)
    args = {"seed": int(seed), "n_parts": n_parts, "image_size": image_size,
            "defect_fraction": float(defect_fraction)}
    # The marker comes first: a set cut short (Ctrl-C, a full disk) is still known as one, and
    # the next run removes what it wrote (the marker's arguments name its files).
    _write_marker(out, args, complete=False)

    jobs = _plan(n_parts, seed, defect_fraction)
    types: dict[str, dict[str, Any]] = {
        ft: {"total": 0, "train_good": 0, "test_good": 0, "test_defect": 0,
             "defects": dict.fromkeys(DEFECT_KINDS[ft], 0)}
        for ft in FEATURE_TYPES
    }
    rows: list[dict[str, str]] = []
    for ft, index, part_id, role in tqdm(
        jobs, desc="synthetic dataset", unit="img", disable=not progress
    ):
        kind = role if role not in (None, "train") else None
        img, mask = render_image(ft, kind, seed, index, image_size)
        t = types[ft]
        t["total"] += 1
        rel, mask_rel = _paths(ft, part_id, role)
        if role == "train":
            t["train_good"] += 1
        elif role is None:
            t["test_good"] += 1
        else:
            assert mask is not None
            _save_png(np.where(mask, 255, 0).astype(np.uint8), out / mask_rel)
            t["test_defect"] += 1
            t["defects"][role] += 1
        _save_png(img, out / rel)
        rows.append({
            "path": rel, "feature_type": ft, "label": "defect" if mask_rel else "good",
            "mask": mask_rel, "part_id": part_id, "split": "train" if role == "train" else "test",
            "defect": role if role not in (None, "train") else "good",
        })

    table = io.StringIO()
    writer = csv.DictWriter(
        table, fieldnames=["path", "feature_type", "label", "mask", "part_id", "split", "defect"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out / "manifest.csv", table.getvalue())

    n_train = sum(t["train_good"] for t in types.values())
    n_def = sum(t["test_defect"] for t in types.values())
    summary: dict[str, Any] = {
        "root": str(out),
        "seed": int(seed),
        "n_parts": n_parts,
        "image_size": image_size,
        "defect_fraction": float(defect_fraction),
        "types": types,
        "splits": {"train": n_train, "test": n_parts - n_train},
        "labels": {"good": n_parts - n_def, "defect": n_def},
    }
    _write_text(out / "README.md", _readme(summary))
    _write_marker(out, args, complete=True)
    return summary
