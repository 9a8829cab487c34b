"""Heat-map overlays: what an operator looks at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float | None = None,
    vmax: float | None = None, alpha: float = 0.45,
) -> np.ndarray:
    """Blend a colour-mapped anomaly map over the image -> HxWx3 uint8.

    ``vmin``/``vmax`` fix the colour scale (e.g. the REVIEW threshold and a high score) so
    that overlays of different parts are comparable; by default the map's own range is used.
    """
    img = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    img = np.clip(img.astype(np.float32), 0, 1)
    m = anomaly_map.astype(np.float32)
    if m.shape != img.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.Resampling.BILINEAR))
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    norm = np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1)
    colour = colormaps["jet"](norm)[..., :3].astype(np.float32)
    weight = alpha * norm[..., None] ** 0.5  # low scores stay see-through
    blended = (1 - weight) * img + weight * colour
    return (blended * 255 + 0.5).astype(np.uint8)


def save_overlay(path: Path | str, image: np.ndarray, anomaly_map: np.ndarray, **kwargs: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, anomaly_map, **kwargs)).save(path)
    return path
