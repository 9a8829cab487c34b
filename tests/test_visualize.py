"""Heat maps people read: image | overlay, score, p-value, decision, colour bar; no matplotlib."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffqc.errors import ImageReadError
from diffqc.inspection import Inspection
from diffqc.visualize import DECISION_COLOURS, JET, colourise, fit_within, overlay, panel, write_heatmap


def test_jet_table_is_matplotlibs_jet() -> None:
    from matplotlib import colormaps

    assert JET.shape == (256, 3)
    np.testing.assert_allclose(JET, colormaps["jet"](np.arange(256))[:, :3], atol=1e-6)
    np.testing.assert_allclose(colourise(np.array([0.0, 1.0])), JET[[0, 255]])


def test_overlay_leaves_quiet_pixels_alone_and_colours_hot_ones() -> None:
    img = np.full((32, 48, 3), 0.5, np.float32)
    m = np.zeros((32, 48), np.float32)
    m[10:20, 30:40] = 1.0
    out = overlay(img, m, vmin=0.0, vmax=1.0)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert np.all(out[0, 0] == 128)  # below the scale: the image as it is
    hot = out[15, 35].astype(int)
    assert hot[0] > hot[2] + 40  # jet's top end is red


def test_panel_shows_image_overlay_decision_and_colour_bar() -> None:
    img = np.random.default_rng(0).random((40, 100, 3)).astype(np.float32)
    m = np.zeros((40, 100), np.float32)
    m[5:15, 60:80] = 3.0
    out = panel(img, m, score=2.5, p_value=0.001, decision="REJECT", feature_type="bottle",
                vmin=0.0, vmax=3.0, min_height=40)
    h, w, _ = out.shape
    assert w > 2 * 100 and h > 40  # two images side by side under a header
    colours = {tuple(int(v) for v in px) for px in out.reshape(-1, 3)}
    assert DECISION_COLOURS["REJECT"] in colours  # the decision badge
    # the colour bar runs the whole scale: jet's dark red and dark blue ends are both there
    assert any(r >= 128 and g == 0 and b == 0 for r, g, b in colours)
    assert any(b >= 128 and r == 0 and g == 0 for r, g, b in colours)
    # the left image is the original pixels (below the header)
    header = h - 40 - max(4, max(12, min(28, 40 // 18)) // 2)
    left = out[header: header + 40, 6: 106]
    assert np.abs(left.astype(int) - (img * 255 + 0.5).astype(int)).max() <= 1
    # small images are enlarged so the text stays readable
    assert panel(img, m, score=1.0, p_value=0.5, decision="PASS").shape[0] >= 256


def test_drawing_does_not_import_matplotlib() -> None:
    code = ("import sys, numpy as np; from diffqc.visualize import panel; "
            "panel(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.float32), score=1.0, "
            "p_value=0.5, decision='PASS'); print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_long_strips_panel_stacks_the_part_over_its_overlay() -> None:
    """An edge crop 8 times as long as it is high (512 x 64) was drawn as part | overlay side by
    side, enlarged to 256 px high: a 4195 x 299 panel, 14:1, which the dashboard's frames and a
    screen show as a thin line. A strip's part is drawn above its overlay, enlarged so that the
    two are at least 256 px high (here twice): a panel of about 4:1, the part's pixels as they are."""
    img = np.random.default_rng(1).random((64, 512, 3)).astype(np.float32)
    m = np.zeros((64, 512), np.float32)
    m[20:40, 300:360] = 3.0
    out = panel(img, m, score=2.5, p_value=0.001, decision="REJECT", feature_type="edge1", vmin=0.0, vmax=3.0)
    h, w, _ = out.shape
    assert w / h <= 5 and h >= 256, (w, h)
    drawn = np.repeat(np.repeat((img * 255 + 0.5).astype(np.uint8), 2, 0), 2, 1).astype(int)
    dh, dw = drawn.shape[:2]
    at = [(y, x) for y in range(h - dh + 1) for x in range(w - dw + 1)
          if np.abs(out[y, x: x + dw].astype(int) - drawn[0]).max() <= 1]
    assert at, "the part is not drawn, twice enlarged"
    y, x = at[0]
    assert np.abs(out[y: y + dh, x: x + dw].astype(int) - drawn).max() <= 1
    assert h - (y + dh) >= dh  # the overlay, under the part
    # a square part (and one up to 3:1) keeps image | overlay side by side
    sq = panel(img[:, :64], m[:, :64], score=1.0, p_value=0.5, decision="PASS")
    assert sq.shape[1] > sq.shape[0]


def test_a_camera_frame_is_drawn_as_the_detector_reads_it() -> None:
    """`Detector.inspect` takes a camera's uint8 or uint16 frame (scaled as its file would be), but
    `overlay` of the same frame, a notebook's next line, took its values as floats and clipped them
    at 1: a white square with the hot spots on it. A frame is drawn as the detector reads it,
    whatever its pixel type (uint8, uint16, grey, a Pillow image), the same as its float image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(32, 48), dtype=np.uint8)
    m = np.zeros((32, 48), np.float32)
    m[10:20, 30:40] = 1.0
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    want = overlay(rgb.astype(np.float32) / 255, m, vmin=0.0, vmax=1.0)
    frames = (grey, rgb, grey.astype(np.uint16) * 257, Image.fromarray(grey))
    for frame in frames:
        got = overlay(frame, m, vmin=0.0, vmax=1.0)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, type(frame)
    left = panel(grey, m, score=1.0, p_value=0.5, decision="PASS", min_height=32)
    assert left.mean() < 250  # not a white square


def _verdict(shape: tuple[int, int], decision: str = "REJECT") -> Inspection:
    amap = np.zeros(shape, np.float32)
    amap[:, : shape[1] // 2] = 2.0
    return Inspection(score=2.5, p_value=0.001, decision=decision, feature_type="edge1",
                      predicted_type=None, type_known=True, anomaly_map=amap)


def test_a_thin_strips_heat_map_is_drawn_when_shrunk(tmp_path: Path) -> None:
    """Shrinking an image for its heat map could take its short side below the 8 px an image
    must have, and drawing it then failed ("image is 300x4"): `diffqc inspect --heatmap-size 300`
    on a 600 x 9 strip stopped the run there, and the service's 8192 x 64 line-scan strips (768 x 6
    at its 768 px) got no heat map at all. The short side is kept at 8 px: the heat map is drawn."""
    from PIL import Image

    strip = np.random.default_rng(3).random((9, 600, 3)).astype(np.float32)
    for side in (300, 6):
        out = write_heatmap(tmp_path / str(side), Path("strip.png"), strip, _verdict((9, 600)), {},
                            gain=1.0, max_side=side)
        with Image.open(out) as picture:
            assert picture.size[1] > 2 * 8  # drawn, part over overlay
    line_scan = fit_within(np.full((64, 8192, 3), 0.5, np.float32), 768)
    assert line_scan.shape == (8, 768, 3)
    assert fit_within(np.full((600, 9, 3), 0.5, np.float32), 6).shape[:2] == (8, 8)


def test_a_thin_strips_heat_map_is_not_drawn_thousands_of_pixels_wide() -> None:
    """A small image is enlarged so that its heat map can be read, but a thin strip was enlarged
    until it was 256 px high: a 600 x 9 strip's picture was 9,099 px wide and the service's 768 x 8
    line-scan strips (8192 x 64 within its 768 px) 12,000 px wide, a file a screen shows as a thin
    line. The enlargement stops where the longer side reaches 1536 px (twice the service's 768)."""
    for shape in ((9, 600), (8, 768), (64, 512), (20, 20)):
        img = np.random.default_rng(2).random((*shape, 3)).astype(np.float32)
        m = np.zeros(shape, np.float32)
        out = panel(img, m, score=2.5, p_value=0.001, decision="REJECT", feature_type="edge1",
                    vmin=0.0, vmax=3.0)
        h, w, _ = out.shape
        assert w <= 1536 + 200, (shape, out.shape)  # the pictures, the colour bar and its labels
        assert h > 2 * shape[0] and w > shape[1], (shape, out.shape)  # still enlarged
    small = panel(img, m, score=2.5, p_value=0.001, decision="REJECT")
    assert small.shape[0] >= 256  # a small square part still reads at 256 px


def test_a_heat_map_that_cannot_be_drawn_leaves_no_empty_file(tmp_path: Path) -> None:
    """The heat map's file is claimed first (so that none is overwritten), but it was removed only
    when the write itself failed: an image the drawing refuses (or Ctrl-C while drawing) left an
    empty ``*_heatmap.png`` for good. A heat map not drawn leaves no file, and its error is raised."""
    with pytest.raises(ImageReadError, match="image is 4x4"):
        write_heatmap(tmp_path, Path("tiny.png"), np.zeros((4, 4, 3), np.float32), _verdict((4, 4)), {},
                      gain=1.0)
    assert list(tmp_path.iterdir()) == []


def test_a_tall_images_heat_map_shows_its_whole_header() -> None:
    """The header (decision, score, p-value, type) was drawn on a picture as wide as the image,
    its overlay and the colour bar: on a tall, narrow image (9 px wide, 600 high) it was cut off
    after "REJECT score". The picture is as wide as its header: the same header as a wide image's."""
    rng = np.random.default_rng(4)
    kwargs = {"score": 2.5, "p_value": 0.001, "decision": "REJECT", "feature_type": "bottle",
              "vmin": 0.0, "vmax": 3.0}
    wide = panel(rng.random((600, 600, 3)).astype(np.float32), np.zeros((600, 600), np.float32), **kwargs)
    tall = panel(rng.random((600, 9, 3)).astype(np.float32), np.zeros((600, 9), np.float32), **kwargs)
    head = wide[:40]  # the header's text, above the pictures
    inked = np.flatnonzero((head != 255).any(axis=(0, 2)))
    right = int(inked.max()) + 1
    assert tall.shape[1] > right, (tall.shape, right)
    np.testing.assert_array_equal(tall[:40, :right], head[:, :right])
