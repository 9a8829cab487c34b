"""Any shape, any size: layouts (pad / crop / tiles), merged maps, and the detector end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffqc import tiling
from diffqc.config import uses_layouts
from diffqc.data import GOOD, load_dataset
from diffqc.errors import ConfigError, ExportError
from diffqc.model import Detector
from tests.conftest import tiny_config


def write_shaped_dataset(root: Path, h: int, w: int, n_train: int = 8, n_test: int = 4,
                         seed: int = 0) -> Path:
    """Two types of non-square images in MVTec layout; defects are dark/bright discs with masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for t in ("stripes", "dots"):
        for split, kind, n in (("train", "good", n_train), ("test", "good", n_test),
                               ("test", "blob", n_test)):
            folder = root / t / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                sx, sy = rng.uniform(-1.5, 1.5, 2)
                if t == "stripes":
                    img = 0.5 + 0.35 * np.sin(2 * np.pi * (xx + sx) / 8.0)
                else:
                    img = 0.85 - 0.6 * ((np.sin(2 * np.pi * (xx + sx) / 10) > 0.5)
                                        & (np.sin(2 * np.pi * (yy + sy) / 10) > 0.5))
                img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
                name = f"{t}_{split}_{kind}_{i:03d}.png"
                if kind == "blob":
                    cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) // 7) ** 2
                    img[mask] = 0.05 if i % 2 else 0.98
                    mdir = root / t / "ground_truth" / kind
                    mdir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((mask * 255).astype(np.uint8)).save(mdir / f"{Path(name).stem}_mask.png")
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / name)
    return root


# --------------------------------------------------------------------------- layouts
def test_tile_starts_cover_the_length_with_the_overlap() -> None:
    starts = tiling.tile_starts(300, 64, 0.25)
    assert starts[0] == 0 and starts[-1] == 300 - 64
    gaps = np.diff(starts)
    assert gaps.max() <= 64 - 16  # neighbours share at least a quarter of a tile
    assert tiling.tile_starts(50, 64, 0.25) == [0]


def test_pad_keeps_the_aspect_and_crop_takes_the_centre() -> None:
    pad = tiling.plan((500, 1250), tiny_config(**{"backbone.resize": "pad"}))
    assert pad.mode == "pad" and pad.canvas_hw == (26, 64)  # 500/1250 of 64, long side = input
    assert pad.origins == ((-19, 0),)  # centred: 19 rows of padding above, 19 below
    crop = tiling.plan((500, 1250), tiny_config(**{"backbone.resize": "crop"}))
    assert crop.image_box == (0, 375, 500, 875) and crop.canvas_hw == (64, 64)


def test_pad_views_repeat_the_edge_and_the_map_comes_back_to_the_image_shape() -> None:
    layout = tiling.plan((20, 64), tiny_config(**{"backbone.resize": "pad"}))
    img = np.zeros((20, 64, 3), np.float32)
    img[0] = 1.0  # top row white, bottom row black
    (view,) = tiling.view_pixels(img, layout)
    top = -layout.origins[0][0]
    assert torch.all(view[:, :top] == 1) and torch.all(view[:, top + 20:] == 0)
    assert torch.equal(view[:, top: top + 20], torch.from_numpy(img).permute(2, 0, 1))
    # a map that is 5 on the image and 100 on the padding: the padding never reaches the image map
    m = torch.full((1, 64, 64), 100.0)
    m[0, top: top + 20] = 5.0
    canvas = tiling.merge(m, layout)
    assert canvas.shape == (20, 64) and torch.all(canvas == 5)
    assert tiling.to_image(canvas, layout).shape == (20, 64)


def test_tiles_overlap_and_merge_to_the_mean() -> None:
    config = tiny_config(**{"tiling.mode": "auto", "tiling.overlap": 0.5})
    layout = tiling.plan((64, 96), config)
    assert layout.mode == "tile" and layout.canvas_hw == (64, 96)
    assert layout.origins == ((0, 0), (0, 32))
    maps = torch.stack([torch.full((64, 64), 1.0), torch.full((64, 64), 3.0)])
    canvas = tiling.merge(maps, layout)
    assert torch.all(canvas[:, :32] == 1) and torch.all(canvas[:, 32:64] == 2)
    assert torch.all(canvas[:, 64:] == 3)
    img = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)
    views = tiling.view_pixels(img, layout)
    assert views.shape == (2, 3, 64, 64)
    assert torch.equal(views[1], torch.from_numpy(img[:, 32:]).permute(2, 0, 1))  # native pixels
    # small images fall back to backbone.resize
    assert tiling.plan((40, 60), config).mode == "squash"


def test_crop_map_covers_only_the_centre() -> None:
    layout = tiling.plan((32, 64), tiny_config(**{"backbone.resize": "crop"}))
    canvas = torch.arange(64 * 64, dtype=torch.float32).view(64, 64) + 10
    out = tiling.to_image(canvas, layout)
    assert out.shape == (32, 64)
    assert np.all(out[:, :16] == 10) and np.all(out[:, 48:] == 10)  # outside: the lowest value
    assert out[:, 16:48].max() > 1000


def test_squash_is_the_plain_path_and_a_bad_mode_is_a_config_error() -> None:
    assert not uses_layouts(tiny_config())
    assert uses_layouts(tiny_config(**{"backbone.resize": "pad"}))
    with pytest.raises(ConfigError, match=r"backbone\.resize must be one of squash, pad, crop"):
        tiny_config(**{"backbone.resize": "letterbox"})
    with pytest.raises(ConfigError, match=r"tiling\.overlap"):
        tiny_config(**{"tiling.overlap": 0.95})


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tall_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shaped_dataset(tmp_path_factory.mktemp("tall"), 40, 112)


@pytest.fixture(scope="module")
def large_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shaped_dataset(tmp_path_factory.mktemp("large"), 96, 144, seed=1)


def _auroc(samples: list, results: list) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([s.label != GOOD for s in samples], [r.score for r in results]))


def test_pad_model_on_non_square_images_round_trips(tall_data: Path, tmp_path: Path) -> None:
    samples = load_dataset(tall_data)
    det = Detector(tiny_config("padim", **{"backbone.resize": "pad"}), device="cpu").fit(
        samples, progress=False)
    assert det.config.backbone.grid == (8, 8)
    test = [s for s in samples if s.split == "test"]
    results, kept = det.inspect_samples(test)
    assert all(r.anomaly_map is not None and r.anomaly_map.shape == (40, 112) for r in results)
    assert _auroc(kept, results) > 0.9
    loaded = Detector.load(det.save(tmp_path / "pad"), device="cpu")
    assert loaded.config.backbone.resize == "pad" and loaded.config.backbone.grid == (8, 8)
    again, _ = loaded.inspect_samples(test[:3])
    assert [r.score for r in again] == pytest.approx([r.score for r in results[:3]], rel=1e-5)
    with pytest.raises(ConfigError, match="resize=squash"):
        det.extract([np.zeros((40, 112, 3), np.float32)])  # per-image features would be squashed


def test_patchcore_scores_padded_cropped_and_tiled_parts_as_published(
        tall_data: Path, clear_dataset: Path) -> None:
    """``train --method patchcore --fit pad`` (or crop, --tile) failed after the fit: the paper's
    re-weighted image score needed one map per image. It now re-weights the largest patch score
    among the patches on the image (a view's padding is not the part): where a layout's single
    view is the plain input (crop of a square image), the score is the plain path's."""
    from diffqc.config import with_overrides

    samples = load_dataset(clear_dataset)
    test = [s for s in samples if s.split == "test"]
    plain = Detector(tiny_config("patchcore"), device="cpu").fit(samples, progress=False)
    crop = Detector(with_overrides(plain.config, {"backbone.resize": "crop"}), device="cpu").fit(
        samples, progress=False)
    want, _ = plain.inspect_samples(test)
    got, _ = crop.inspect_samples(test)
    assert plain.config.patchcore.aggregation == "reweighted" and plain.config.patchcore.neighbors > 1
    assert [r.score for r in got] == pytest.approx([r.score for r in want], rel=1e-4)
    assert [r.decision for r in got] == [r.decision for r in want]

    tall = load_dataset(tall_data)
    for over in ({"backbone.resize": "pad"}, {"tiling.mode": "auto", "backbone.input_size": 32}):
        det = Detector(tiny_config("patchcore", **over), device="cpu").fit(tall, progress=False)
        results, kept = det.inspect_samples([s for s in tall if s.split == "test"])
        assert _auroc(kept, results) > 0.9, over
    # a 40 x 112 image letterboxed into 64 px fills the view's rows 20-42: of the 8 px cells
    # (centres at 4, 12, ..., 60) those centred at 20, 28 and 36 are on it, the others padding
    lay = tiling.plan((40, 112), tiny_config(**{"backbone.resize": "pad"}))
    assert lay.canvas_hw == (23, 64) and lay.origins == ((-20, 0),)
    rows = tiling._cells_on_canvas(lay, (8, 8))[0].any(dim=1).tolist()
    assert rows == [False, False, True, True, True, False, False, False]


def test_tiled_model_maps_the_defect_at_full_resolution(large_data: Path) -> None:
    samples = load_dataset(large_data)
    det = Detector(tiny_config("padim", **{"tiling.mode": "auto"}), device="cpu").fit(
        samples, progress=False)
    test = [s for s in samples if s.split == "test"]
    results, kept = det.inspect_samples(test)
    assert _auroc(kept, results) > 0.9
    from sklearn.metrics import roc_auc_score

    from diffqc.data import read_mask

    masks, maps = [], []
    for s, r in zip(kept, results, strict=True):
        assert r.anomaly_map is not None and r.anomaly_map.shape == (96, 144)
        masks.append(read_mask(s.mask_path, (96, 144)).ravel())
        maps.append(r.anomaly_map.ravel())
    assert roc_auc_score(np.concatenate(masks), np.concatenate(maps)) > 0.9  # pixel AUROC
    # unknown type: scored under every type, still one merged map per image; a GOOD part is named
    # (a defective one, unlikely under every type, by the least unlikely tail: not asserted)
    good = next(s for s in test if s.label == GOOD)
    (unknown,) = det.inspect([np.asarray(Image.open(good.path).convert("RGB"), np.float32) / 255], [None])
    assert unknown.predicted_type == good.feature_type and unknown.anomaly_map is not None


def test_a_tiled_models_part_smaller_than_a_tile_is_named(large_data: Path) -> None:
    """A tiled model cuts its parts into tiles at their own scale; a part no longer than a tile
    is scaled up to the model's input instead, another scale than its type's training images
    had: a camera's region of interest shrunk made every GOOD part REJECT without a word, where
    a squashed model named the size. Named once per type; a part still tiled is not."""
    samples = load_dataset(large_data)
    det = Detector(tiny_config("padim", **{"tiling.mode": "auto"}), device="cpu").fit(
        [s for s in samples if s.split == "train"], progress=False)
    good = next(s for s in samples if s.split == "test" and s.label == 0)
    image = np.asarray(Image.open(good.path).convert("RGB"), np.float32) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.inspect([image[:, :100]], [good.feature_type])  # 96 x 100: still tiled
    with pytest.warns(UserWarning, match=r"a 48x48 px image of type '\w+', no side longer than a tile "
                                         r"\(64 px\): it is scaled up to the model's input"):
        det.inspect([image[:48, :48]], [good.feature_type])


def test_read_features_streams_the_views_extract_views_makes(large_data: Path) -> None:
    """fit reads one image at a time (Detector.read_features): the same rows and layouts as
    reading every image first and cutting their views (tiling.extract_views)."""
    from diffqc.data import read_images

    samples = load_dataset(large_data)[:5]
    det = Detector(tiny_config("padim", **{"tiling.mode": "auto", "batch_size": 3}), device="cpu")
    raw, layouts, kept, errors = det.read_features(samples)
    images, _, _ = read_images(samples)
    expected, expected_layouts = tiling.extract_views(det, images)
    assert kept == samples and not errors and layouts == expected_layouts
    assert raw.shape[0] == sum(lay.views for lay in layouts) > len(samples)
    assert torch.equal(raw.cpu(), expected)


def test_onnx_export_refuses_a_pad_model(tall_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from diffqc.errors import BundleError
    from diffqc.export import build_onnx
    from diffqc.runtime import load_detector

    det = Detector(tiny_config(**{"backbone.resize": "pad", "train.steps": 5}), device="cpu")
    det.fit(load_dataset(tall_data), progress=False)
    with pytest.raises(ExportError, match="squash without tiling"):
        build_onnx(det)
    # `inspect --runtime onnx` on it said "run `diffqc export`", which then refused it
    model = det.save(tmp_path / "pad")
    with pytest.raises(BundleError, match=r"letterboxes, crops or tiles .* use --runtime torch") as exc:
        load_detector(model, "onnx")
    assert "diffqc export" not in str(exc.value)


def test_cli_trains_with_fit_pad_and_inspects_a_folder_into_a_csv(tall_data: Path, tmp_path: Path) -> None:
    import csv

    from diffqc.cli import main

    model = tmp_path / "model"
    assert main(["train", str(tall_data), "--out", str(model), "--method", "padim", "--fit", "pad",
                 "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35",
                 "--set", "padim.aggregation=topk", "--set", "padim.topk=0.05",
                 "--set", "scoring.smooth_sigma=2.0", "-q"]) == 0
    folder = tall_data / "dots" / "test"
    table, heat = tmp_path / "results.csv", tmp_path / "heat"
    args = ["inspect", str(model), str(folder), "--feature-type", "dots", "--runtime", "torch",
            "--csv", str(table), "--heatmaps", str(heat)]
    assert main(args) == 0
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and set(rows[0]) >= {"path", "feature_type", "predicted_type", "score",
                                               "p_value", "decision", "heatmap"}
    assert {r["decision"] for r in rows} <= {"PASS", "REVIEW", "REJECT"}
    blob = [float(r["score"]) for r in rows if "/blob/" in r["path"]]
    good = [float(r["score"]) for r in rows if "/good/" in r["path"]]
    assert np.mean(blob) > np.mean(good)
    for r in rows:  # the heat map is image | overlay: twice as wide as the image's aspect
        png = Image.open(r["heatmap"])
        assert png.width > 2 * png.height * 112 / 40 * 0.9
    before = table.read_bytes()
    assert main(args) == 1  # an existing CSV is refused and left as it was
    assert table.read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_a_layout_models_unknown_type_is_the_one_of_the_largest_p_value(tmp_path: Path) -> None:
    """A model with layouts (pad, crop, tiles) has no type router: it took the type of the
    lowest raw score. Raw scores are not comparable across types: a type fitted on few GOOD
    images scores its own held-out parts high, so a type of 4 GOOD images beside another of 26
    (here the same print 15 % brighter) was never predicted: all 12 of its GOOD parts went to
    the other type, and its defects would be judged by the other type's model. The type of the
    largest known-type p-value wins, as the router's candidates are chosen."""
    import shutil

    from diffqc.data import read_image
    from tests.conftest import write_clear_dataset

    root = write_clear_dataset(tmp_path / "d", n_train=30, n_test=12, size=64, seed=3)
    shutil.rmtree(root / "dots")
    train = sorted((root / "stripes" / "train" / "good").iterdir())
    for split, files in (("train", train[-4:]), ("test", sorted((root / "stripes/test/good").iterdir()))):
        out = root / "bright" / split / "good"
        out.mkdir(parents=True)
        for f in files:
            image = np.asarray(Image.open(f)).astype(float) * 1.15
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out / f.name)
    for f in train[-4:]:
        f.unlink()
    samples = load_dataset(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a type of 4 GOOD images: too few, said
        det = Detector(tiny_config(**{"train.steps": 0, "backbone.resize": "pad"}), device="cpu").fit(
            [s for s in samples if s.split == "train"])
    for ftype in det.classes_:
        test = [s for s in samples if s.split == "test" and s.label == GOOD and s.feature_type == ftype]
        results = det.inspect([read_image(s.path) for s in test], [None] * len(test), maps=False)
        named = sum(r.predicted_type == ftype for r in results)
        assert named > len(test) // 2, (ftype, [r.predicted_type for r in results])
    assert det.metadata["type_router"]["used"] is False
