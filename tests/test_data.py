from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from diffqc.data import (
    DEFECTIVE,
    GOOD,
    DatasetError,
    DatasetWarning,
    ImageReadError,
    Sample,
    as_image,
    decode_image,
    image_shape,
    label_shortcuts,
    load_dataset,
    load_manifest,
    read_image,
    read_images,
    read_mask,
    without_copies,
)
from tests.conftest import png_header_only


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_mvtec_layout(clear_dataset: Path) -> None:
    samples = load_dataset(clear_dataset)
    assert {s.feature_type for s in samples} == {"stripes", "dots"}
    train = [s for s in samples if s.split == "train"]
    assert train and all(s.label == GOOD for s in train)
    bad = [s for s in samples if s.label == DEFECTIVE]
    assert bad and all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
    mask = read_mask(bad[0].mask_path, (64, 64))
    assert mask.dtype == bool and mask.any()


def test_single_type_folder(clear_dataset: Path) -> None:
    samples = load_dataset(clear_dataset / "dots")
    assert {s.feature_type for s in samples} == {"dots"}


@pytest.mark.parametrize("word", ["OK", "normal", "i.O."])
def test_an_mvtec_type_may_name_its_good_folders_as_labelled_folders_do(
        clear_dataset: Path, tmp_path: Path, word: str) -> None:
    """``train/OK`` and ``test/OK`` beside ``test/NOK`` (a line's words, which the labelled layout
    already takes for GOOD): train/OK was not read ("GOOD images only train"), and test/OK was
    read as a defect kind named OK, every GOOD test part a defect. Read as train/good, test/good."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))

    def read(root: Path) -> list[tuple[str, int, str, str | None, bool]]:
        return sorted((s.path.name, s.label, s.split, s.defect, s.mask_path is None)
                      for s in load_dataset(root))

    expected = read(dots)
    for split in ("train", "test"):
        (dots / split / "good").rename(dots / split / word)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing said to be left out
        assert read(tmp_path) == expected
    assert sum(s.label == GOOD and s.split == "train" for s in load_dataset(dots)) == 24


def test_masks_are_found_in_a_kind_folder_of_any_case_and_a_missing_one_is_named(
        clear_dataset: Path, tmp_path: Path) -> None:
    """``ground_truth/Blob`` for ``test/blob`` (made by hand, on Windows) lost every mask of the
    kind, and a mask saved under another name (``_gt.png``) lost its image's: both without a word,
    and pixel metrics quietly left the images out. The kind's folder is found in any case, and a
    type with a ground_truth folder names the defects it found no mask for."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))
    (dots / "ground_truth" / "blob").rename(dots / "ground_truth" / "Blob")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        defects = [s for s in load_dataset(dots) if s.label == DEFECTIVE]
    assert len(defects) == 8 and all(s.mask_path is not None and s.mask_path.is_file() for s in defects)
    mask = defects[0].mask_path
    assert mask is not None
    mask.rename(mask.with_name(mask.name.replace("_mask", "_gt")))
    with pytest.warns(DatasetWarning, match=r"1 of 8 defect images have no mask .*blob 1") as caught:
        assert sum(s.mask_path is None for s in load_dataset(dots) if s.label == DEFECTIVE) == 1
    assert defects[0].path.name in str(caught[0].message)


def test_a_mask_of_another_shape_than_its_image_is_named(clear_dataset: Path, tmp_path: Path) -> None:
    """A mask whose shape is not its image's (cropped in an editor, another image's, a mask of the
    camera's full frame beside a cropped part) was stretched onto the image without a word, and
    the pixel metrics measured the map against a misplaced defect. Such masks are named; a mask
    at another scale of the same shape (saved smaller) is read as before."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))
    masks = sorted((dots / "ground_truth" / "blob").iterdir())
    with Image.open(masks[0]) as m:
        m.crop((0, 0, m.width, m.height * 3 // 4)).save(masks[0])  # 64x48 for a 64x64 image
    with Image.open(masks[1]) as m:
        m.resize((m.width // 2, m.height // 2)).save(masks[1])  # the same shape, smaller
    with pytest.warns(DatasetWarning) as caught:
        load_dataset(dots)
    said = [str(w.message) for w in caught if "shape" in str(w.message)]
    assert said == [f"{dots / 'ground_truth'}: 1 of 8 defect masks has another shape than its image "
                    f"(blob/{masks[0].name}: 64x48 px for a 64x64 px image): it is stretched onto the "
                    "image, so the pixel metrics measure the map against a misplaced defect; is it the "
                    "mask of that image?"]


def test_netpbm_gif_and_jfif_files_are_images(clear_dataset: Path, tmp_path: Path) -> None:
    """A camera or a GStreamer/Aravis pipeline that saves ``.ppm`` (``.pgm`` was read), ``.pnm``,
    ``.pbm``, ``.gif`` or ``.jfif`` files: they were passed over in a folder without a word."""
    good = tmp_path / "t" / "train" / "good"
    good.mkdir(parents=True)
    source = next((clear_dataset / "dots" / "train" / "good").iterdir())
    with Image.open(source) as img:
        for suffix in (".ppm", ".pnm", ".pgm", ".gif", ".jfif", ".png"):
            img.convert("RGB" if suffix == ".ppm" else "L").save(
                good / f"part{suffix}", format={".pnm": "PPM", ".jfif": "JPEG"}.get(suffix))
    img1 = good / "part.pbm"
    Image.open(source).convert("1").save(img1)
    samples = load_dataset(tmp_path)
    assert sorted(s.path.suffix for s in samples) == sorted([".ppm", ".pnm", ".pgm", ".gif", ".jfif",
                                                             ".png", ".pbm"])
    for s in samples:
        assert read_image(s.path).shape == (64, 64, 3)


def test_a_root_whose_types_are_one_level_down_says_where_they_are(clear_dataset: Path,
                                                                   tmp_path: Path) -> None:
    """``data/lineA/<type>/train/good``, ``data/lineB/<type>/...`` given as ``data``: the error
    said the layout expected, not that the types are there one level down."""
    for line, t in (("lineA", "dots"), ("lineB", "stripes")):
        shutil.copytree(clear_dataset / t, tmp_path / line / t)
    with pytest.raises(DatasetError, match=r"one level down: lineA/ \(dots\), lineB/ \(stripes\); give "
                       r"one of those folders"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("split", ["test", "train", "Test"])
def test_a_split_folder_of_a_type_is_read_as_that_types_split(
        clear_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str) -> None:
    """`diffqc test MODEL bottle/test` (or `train DATA/bottle/train`) read the split folder as a
    type named after it, `test`: `test` then said "none of its types (test) is the model's", and
    `train` fitted a model whose one type was `train`, both without a word of why. A type's split
    folder is read as that split of its type (masks and all, as the type folder gives them)."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))
    expected = [s for s in load_dataset(dots) if s.split == split.lower()]
    if split != split.lower():  # made on Windows: the layout's names in any case
        (dots / split.lower()).rename(dots / split)
    samples = load_dataset(dots / split)
    assert [(s.path.name, s.feature_type, s.label, s.split, s.defect, s.mask_path) for s in samples] == [
        (s.path.name, s.feature_type, s.label, s.split, s.defect, s.mask_path) for s in expected]
    assert {s.feature_type for s in samples} == {"dots"} and len(samples) == (24 if split == "train" else 16)
    assert all((s.mask_path is None) == (s.label == GOOD) for s in samples)
    if split == "test":  # given from inside the type's folder: still the type's name
        monkeypatch.chdir(dots)
        assert [(str(s.path), s.feature_type) for s in load_dataset("test")] == [
            (str(s.path.relative_to(dots)), "dots") for s in expected]


@pytest.mark.parametrize("folder", ["train/good", "test/good", "test/blob", "Test/Good"])
def test_a_folder_of_one_kind_in_a_types_split_is_read_as_those_images_of_the_type(
        clear_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: str) -> None:
    """`train DATA/bottle/train/good` (the first folder of GOOD images one points at),
    `calibrate MODEL DATA/bottle/test/good`, `test MODEL DATA/bottle/test/crack`: refused with
    "no images found", and told to put the images under ``good/<type>/train/good/``. Such a
    folder is read as those images of its type and split (masks and all)."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))
    split, kind = folder.lower().split("/")
    expected = [s for s in load_dataset(dots) if s.split == split and (s.defect or "good") == kind]
    if folder != folder.lower():  # made on Windows
        (dots / "test").rename(dots / "Test")
        (dots / "Test" / "good").rename(dots / "Test" / "Good")
    samples = load_dataset(dots / folder)
    assert expected and [(s.path.name, s.feature_type, s.label, s.split, s.defect, s.mask_path)
                         for s in samples] == [
        (s.path.name, s.feature_type, s.label, s.split, s.defect, s.mask_path) for s in expected]
    monkeypatch.chdir(dots / folder.split("/")[0])  # given from inside the split: still the type
    assert [(s.path.name, s.feature_type) for s in load_dataset(folder.split("/")[1])] == [
        (s.path.name, "dots") for s in expected]
    assert all((Path.cwd() / s.path).is_file() for s in load_dataset(folder.split("/")[1]))


@pytest.mark.parametrize("inside", ["", "test", "test/blob", "train/good"])
def test_a_folder_given_as_dot_is_named_after_the_folder(
        clear_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside: str) -> None:
    """`diffqc train .` (or `data info .`, `test MODEL .`) inside a type's folder or its split read
    the type under the name of ``.``, an empty one: a model whose one type was ``''``. ``.`` is
    the folder it stands for, as any other name for it is."""
    dots = Path(shutil.copytree(clear_dataset / "dots", tmp_path / "dots"))
    expected = [(s.path.name, s.label, s.split, s.defect) for s in load_dataset(dots / inside)]
    monkeypatch.chdir(dots / inside)
    samples = load_dataset(".")
    assert {s.feature_type for s in samples} == {"dots"}
    assert [(s.path.name, s.label, s.split, s.defect) for s in samples] == expected


@pytest.mark.parametrize("kind", ["good", "blob"])
def test_a_folder_of_one_kind_of_a_labelled_type_is_read_as_those_images_of_the_type(
        clear_dataset: Path, tmp_path: Path, kind: str) -> None:
    """``edge/good`` of a labelled type (``edge/good``, ``edge/blob``) given alone: those images of
    the type, not "no images found"."""
    labelled = tmp_path / "edge"
    for k in ("good", "blob"):
        shutil.copytree(clear_dataset / "dots" / "test" / k, labelled / k)
    expected = [s for s in load_dataset(labelled) if s.defect == kind]
    samples = load_dataset(labelled / kind)
    assert expected and [(s.path, s.feature_type, s.label, s.split, s.defect) for s in samples] == [
        (s.path, s.feature_type, s.label, s.split, s.defect) for s in expected]


@pytest.mark.parametrize("name", ["test", "train"])
def test_a_dataset_root_named_test_is_still_a_root_of_types(clear_dataset: Path, tmp_path: Path,
                                                            name: str) -> None:
    """A held-out set kept as ``line/test/`` (type folders inside, MVTec or labelled) is a root
    of types, though its parent holds a folder named ``test`` (itself): not the test split of a
    type named ``line`` whose defect kinds are the types, every GOOD image taken for a defect."""
    root = tmp_path / "line" / name
    shutil.copytree(clear_dataset / "dots", root / "dots")
    labelled = root / "stripes"
    shutil.copytree(clear_dataset / "stripes" / "test" / "good", labelled / "good")
    shutil.copytree(clear_dataset / "stripes" / "test" / "blob", labelled / "blob")
    samples = load_dataset(root)
    assert {s.feature_type for s in samples} == {"dots", "stripes"}
    assert sum(s.label == GOOD for s in samples) == 24 + 8 + 8


def test_images_filed_in_sub_folders_belong_to_their_split(tmp_path: Path, clear_dataset: Path) -> None:
    """A line files its images by day (``train/good/2026-11-30/``) or by batch under a defect kind:
    they were not found ("no images found"); now they belong to train/good or to the kind, masks
    at the same sub-path under ground_truth/<kind>; hidden sub-folders stay out."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset / "dots", data / "dots")
    good = data / "dots" / "train" / "good"
    flat = sorted(p.name for p in good.iterdir())
    (good / "2026-11-30").mkdir()
    for name in flat[:3]:
        shutil.move(good / name, good / "2026-11-30" / name)
    (good / "2026-12-01" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(good / flat[3], good / "2026-12-01" / ".ipynb_checkpoints" / "x.png")
    blob = data / "dots" / "test" / "blob"
    image = sorted(blob.iterdir())[0]
    (blob / "batch-7").mkdir()
    shutil.move(image, blob / "batch-7" / "nested.png")
    (data / "dots" / "ground_truth" / "blob" / "batch-7").mkdir(parents=True)
    mask = next((data / "dots" / "ground_truth" / "blob").glob(f"{image.stem}*"))
    shutil.copy(mask, data / "dots" / "ground_truth" / "blob" / "batch-7" / "nested_mask.png")
    samples = load_dataset(data)
    train = sorted(s.path.name for s in samples if s.split == "train")
    assert train == flat and len(train) == len(set(train))
    nested = next(s for s in samples if s.path.name == "nested.png")
    assert (nested.label, nested.defect, nested.split) == (DEFECTIVE, "blob", "test")
    assert nested.mask_path == data / "dots" / "ground_truth" / "blob" / "batch-7" / "nested_mask.png"


def test_a_mask_at_the_top_is_not_given_to_two_images_of_one_name(tmp_path: Path,
                                                                   clear_dataset: Path) -> None:
    """Images of one name in two dated folders of a kind (``test/blob/day1/000.png``,
    ``day2/000.png``) with one mask at the kind's top (``ground_truth/blob/000_mask.png``): both
    were given it, one of them another image's mask, without a word. A mask at the top is an
    image's only where its name is one image's of the kind; else the image has none, and the
    defects without masks are named."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset / "dots", data / "dots")
    blob, masks = data / "dots" / "test" / "blob", data / "dots" / "ground_truth" / "blob"
    first, second = sorted(blob.iterdir())[:2]
    for day, image in (("day1", first), ("day2", second)):
        (blob / day).mkdir()
        shutil.move(image, blob / day / "000.png")
    next(masks.glob(f"{first.stem}*")).rename(masks / "000_mask.png")
    with pytest.warns(DatasetWarning, match=r"2 of \d+ defect images have no mask"):
        samples = load_dataset(data)
    assert [s.mask_path for s in samples if s.path.name == "000.png"] == [None, None]


def test_a_types_test_folder_without_good_is_that_split(tmp_path: Path) -> None:
    """``diffqc test MODEL DATA/bottle/test`` of a test folder holding only defect kinds (the
    GOOD test parts elsewhere) was "no images found ... put GOOD ones under
    bottle/test/crack/train/good/": it is the type's test split, as one with good/ is."""
    img = _png(np.full((8, 8), 128, np.uint8))
    for name in ("bottle/train/good/a.png", "bottle/test/crack/b.png", "bottle/test/scratch/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(img)
    samples = load_dataset(tmp_path / "bottle" / "test")
    assert sorted((s.path.name, s.feature_type, s.label, s.split) for s in samples) == [
        ("b.png", "bottle", DEFECTIVE, "test"), ("c.png", "bottle", DEFECTIVE, "test")]


def test_layout_folder_names_in_any_case(tmp_path: Path, clear_dataset: Path) -> None:
    """``Train/Good``, ``Test/Good`` and ``Ground_Truth`` as made on Windows (where case does not
    matter): Good was read as a defect kind (every GOOD test part counted defective) and
    Train/Good not at all; now they are the layout's folders."""
    lower = load_dataset(clear_dataset / "dots")
    data = tmp_path / "dots"
    shutil.copytree(clear_dataset / "dots", data)
    for old, new in [("train/good", "train/Good"), ("train", "Train"), ("test/good", "test/Good"),
                     ("test", "Test"), ("ground_truth", "Ground_Truth")]:
        (data / old).rename(data / new)
    assert sorted(p.name for p in data.iterdir()) == ["Ground_Truth", "Test", "Train"]
    mixed = load_dataset(data)
    key = sorted((s.path.name, s.label, s.split, s.defect, s.mask_path is None) for s in lower)
    assert sorted((s.path.name, s.label, s.split, s.defect, s.mask_path is None) for s in mixed) == key
    assert any(s.split == "test" and s.label == GOOD for s in mixed)


def test_images_beside_train_good_are_named_as_not_read(tmp_path: Path, clear_dataset: Path) -> None:
    """Defective images put under ``train/defect`` (a classifier's layout) were silently not read;
    they still are not (GOOD images only train), and one warning says where they belong."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset / "dots", data / "dots")
    before = load_dataset(data)
    defects = sorted((data / "dots" / "test" / "blob").iterdir())
    (data / "dots" / "train" / "defect").mkdir()
    for p in defects[:2]:
        shutil.copy(p, data / "dots" / "train" / "defect" / p.name)
    (data / "dots" / "train" / "empty").mkdir()
    with pytest.warns(DatasetWarning) as record:
        after = load_dataset(data)
    assert [s.path for s in after] == [s.path for s in before]
    assert len(record) == 1 and "(2 in defect/)" in str(record[0].message)
    assert "belong under test/<kind>" in str(record[0].message)


def test_labelled_folders_good_beside_defect_kinds(tmp_path: Path) -> None:
    """A line's OK/NOK folders (``<type>/good/`` beside ``<type>/<kind>/``, anomalib's Folder
    layout) were "no images found", with a hint to put GOOD images under ``bad/train/good``: now
    GOOD images train (training candidates, as a manifest's GOOD rows) and every other folder is
    a defect kind, one type per folder or the root itself; mask folders are named as not read."""
    img = _png(np.full((8, 8), 128, np.uint8))

    def put(*names: str) -> None:
        for name in names:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(img)

    put("one/good/a.png", "one/good/2026-12-01/b.png", "one/bad/c.png", "one/NOK/d.png")
    samples = load_dataset(tmp_path / "one")  # the root is the type
    assert {s.feature_type for s in samples} == {"one"}
    assert sorted((s.path.name, s.label, s.split, s.defect) for s in samples) == [
        ("a.png", GOOD, "train", "good"), ("b.png", GOOD, "train", "good"),
        ("c.png", DEFECTIVE, "test", "bad"), ("d.png", DEFECTIVE, "test", "NOK")]

    put("types/dots/OK/a.png", "types/dots/NOK/b.png", "types/edge/good/c.png", "types/edge/crack/d.png",
        "types/edge/masks/d.png", "types/edge/e.png")
    with pytest.warns(DatasetWarning) as record:
        samples = load_dataset(tmp_path / "types")
    assert sorted((s.feature_type, s.path.name, s.label) for s in samples) == [
        ("dots", "a.png", GOOD), ("dots", "b.png", DEFECTIVE), ("edge", "c.png", GOOD),
        ("edge", "d.png", DEFECTIVE)]
    message = str(record[0].message)
    assert len(record) == 1 and "1 in masks/ (masks are read in the MVTec layout only" in message
    assert "1 directly in it" in message

    put("named/good/a.png", "named/good_batch2/b.png", "named/NOK/c.png")  # GOOD by name only
    with pytest.warns(DatasetWarning, match=r"good_batch2/ is read as a defect kind: only a folder named"):
        samples = load_dataset(tmp_path / "named")
    assert sorted((s.path.name, s.label) for s in samples) == [
        ("a.png", GOOD), ("b.png", DEFECTIVE), ("c.png", DEFECTIVE)]


def test_mvtec_folders_read_otherwise_than_named_are_said(tmp_path: Path) -> None:
    """In the MVTec layout, ``test/good_batch2/`` was read as a defect kind without a word (the
    labelled layout named it), and images directly in ``test/`` or in a folder beside ``train/``
    and ``test/`` (``validation/good``, MVTec LOCO's; ``masks/`` for ``ground_truth/``) were left out
    without one: each is said."""
    img = _png(np.full((8, 8), 128, np.uint8))
    for name in ("bottle/train/good/a.png", "bottle/test/good/b.png", "bottle/test/good_batch2/c.png",
                 "bottle/test/crack/d.png", "bottle/test/e.png", "bottle/validation/good/f.png",
                 "bottle/masks/crack/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(img)
    with pytest.warns(DatasetWarning) as record:
        samples = load_dataset(tmp_path / "bottle")
    assert sorted((s.path.name, s.label) for s in samples) == [
        ("a.png", GOOD), ("b.png", GOOD), ("c.png", DEFECTIVE), ("d.png", DEFECTIVE)]
    said = [str(r.message) for r in record]
    assert any("good_batch2/ is read as a defect kind: only a folder named" in m for m in said), said
    assert any("images not read: 1 directly in test/; 1 in masks/; 1 in validation/" in m for m in said), said


def test_a_good_folder_beside_type_folders_is_refused(tmp_path: Path, clear_dataset: Path) -> None:
    """``root/good/`` beside ``root/edge/good/`` and ``root/edge/crack/`` (a type's GOOD folder
    copied one level too high) was read as one type whose defect kind ``edge`` held edge's GOOD
    images: GOOD parts tested as defects without a word. It is an error naming both."""
    img = _png(np.full((8, 8), 128, np.uint8))
    for name in ("mixed/good/a.png", "mixed/edge/good/b.png", "mixed/edge/crack/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(img)
    with pytest.raises(DatasetError, match=r"holds good/ .* beside type folders \(edge/\)"):
        load_dataset(tmp_path / "mixed")
    shutil.copytree(clear_dataset / "dots", tmp_path / "mvtec" / "dots")  # an MVTec type beside it
    shutil.copytree(tmp_path / "mixed" / "good", tmp_path / "mvtec" / "OK")
    with pytest.raises(DatasetError, match=r"holds OK/ .* \(dots/\)"):
        load_dataset(tmp_path / "mvtec")
    assert {s.feature_type for s in load_dataset(tmp_path / "mixed" / "edge")} == {"edge"}  # one type


def test_a_type_named_ok_is_not_a_good_folder(tmp_path: Path, clear_dataset: Path) -> None:
    """A root of MVTec types, one of them called ``ok``, stays a root of types."""
    shutil.copytree(clear_dataset / "dots", tmp_path / "data" / "ok")
    shutil.copytree(clear_dataset / "stripes", tmp_path / "data" / "stripes")
    samples = load_dataset(tmp_path / "data")
    assert {s.feature_type for s in samples} == {"ok", "stripes"}
    assert len(samples) == len(load_dataset(clear_dataset))


def test_defect_folder_without_good_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "data" / "NOK").mkdir(parents=True)
    (tmp_path / "data" / "NOK" / "a.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(DatasetError, match=r"NOK holds defective images, and no good/ folder is beside it"):
        load_dataset(tmp_path / "data")


def test_a_link_back_to_an_enclosing_folder_is_left_out_and_named(tmp_path: Path,
                                                                   clear_dataset: Path) -> None:
    """A symbolic link inside a dataset that points back at an enclosing folder (``test/self ->
    ..``, made by a script or a slip of ``ln -s``) was read as a defect kind named after the link,
    the type's training images and masks counted a second time as its defects (``data info``:
    ``self 27``). Such a link is left out, and named; a link to a folder elsewhere (a shared
    folder of a kind's images) is still followed."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    before = load_dataset(data)
    shared = tmp_path / "shared_blob"
    shutil.copytree(clear_dataset / "dots" / "test" / "blob", shared)
    (data / "dots" / "test" / "self").symlink_to("..")
    (data / "dots" / "test" / "blob2").symlink_to(shared)
    (data / "again").symlink_to(data)
    with pytest.warns(DatasetWarning) as caught:
        after = load_dataset(data)
    said = sorted({str(w.message).split(" is a link")[0] for w in caught
                   if "an enclosing folder" in str(w.message)})
    assert said == [str(data / "again"), str(data / "dots" / "test" / "self")]
    linked = [s for s in after if s.defect == "blob2"]
    assert len(linked) == len(list(shared.iterdir()))
    assert sorted(s.path for s in after if s.defect != "blob2") == sorted(s.path for s in before)


def test_hidden_files_and_folders_are_not_data(tmp_path: Path, clear_dataset: Path) -> None:
    """A dataset copied from a Mac or opened in Jupyter gains files named like images that are
    not (``._000.png``) and hidden folders (``.ipynb_checkpoints``, which under ``test/`` would be
    taken for a defect kind): a folder scan leaves them out, as a shell's ``*`` does."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    before = load_dataset(data)
    good = data / "dots" / "train" / "good"
    (good / "._000.png").write_bytes(b"Mac resource fork")
    (good / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    first = next(p for p in sorted(good.iterdir()) if not p.name.startswith("."))
    (data / "dots" / "test" / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, data / "dots" / "test" / ".ipynb_checkpoints" / "000-checkpoint.png")
    (data / ".trash" / "train" / "good").mkdir(parents=True)
    shutil.copy(first, data / ".trash" / "train" / "good" / "000.png")
    shutil.copy(first, good / "UPPER.PNG")  # a visible image is taken whatever its suffix's case
    after = load_dataset(data)
    assert [s.path.name for s in after if s.path.name not in {x.path.name for x in before}] == ["UPPER.PNG"]
    assert {s.defect for s in after} == {s.defect for s in before}
    assert {s.feature_type for s in after} == {"stripes", "dots"}
    images, _, _ = read_images(after)  # raises on any sample that is not a readable image
    assert len(images) == len(after)


def test_folders_a_nas_or_file_system_keeps_for_itself_are_not_data(tmp_path: Path,
                                                                     clear_dataset: Path) -> None:
    """A dataset on a Synology share gains an ``@eaDir/<image>/`` folder of thumbnails beside each
    image (``SYNOPHOTO_THUMB_S.jpg``, smaller and lossy: every thumbnail was taken as a GOOD
    training image of its type), a share's recycle bin (``#recycle``, ``@Recycle``,
    ``$RECYCLE.BIN``) keeps deleted images, a zip made on a Mac holds ``__MACOSX/``: a folder
    scan leaves them out, as it leaves hidden folders out."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    before = sorted(s.path for s in load_dataset(data))
    good = data / "dots" / "train" / "good"
    first = next(p for p in sorted(good.iterdir()) if not p.name.startswith("."))
    for kept in ("@eaDir/000.png/SYNOPHOTO_THUMB_S.png", "#recycle/old.png", "@Recycle/old.png",
                 "$RECYCLE.BIN/S-1-5-21/$R0A1B2C.png", "__MACOSX/x.png",
                 "System Volume Information/x.png"):
        (good / kept).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(first, good / kept)
    (data / "dots" / "test" / "@eaDir" / "000.png").mkdir(parents=True)  # not a defect kind
    shutil.copy(first, data / "dots" / "test" / "@eaDir" / "000.png" / "SYNOPHOTO_THUMB_M.png")
    (data / "#recycle" / "train" / "good").mkdir(parents=True)  # not a type
    shutil.copy(first, data / "#recycle" / "train" / "good" / "000.png")
    assert sorted(s.path for s in load_dataset(data)) == before
    assert sorted(s.path for s in load_dataset(good)) == [p for p in before if p.parent == good]


def test_manifest(tmp_path: Path, clear_dataset: Path) -> None:
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    (tmp_path / "m.csv").write_text(
        "path,feature_type,label,part_id\n"
        f"{img},dots,good,p1\n{img},dots,defect,p2\n{img},edge1,,p3\n"
    )
    s = load_manifest(tmp_path / "m.csv")
    assert [x.label for x in s] == [GOOD, DEFECTIVE, -1]
    assert s[0].group == "p1" and s[0].split == "train" and s[1].split == "test"


@pytest.mark.parametrize("content,err", [
    ("path,label\nx.png,good\n", "lacks column"),
    # ELPV's labels.csv: no header, columns separated by spaces
    ("images/cell0001.png  1.0  mono\n", r"lacks column.*its first line is a row \(images/cell0001.png\), "
     r"not the column names: write path,feature_type,label\[,mask\]\[,part_id\]\[,split\]\[,defect\] first"),
    ("path feature_type label\nx.png dots good\n", r"lacks column.*its columns are separated by spaces: "
     r"separate them by commas, semicolons or tabs"),
    ("path,feature_type,label\nx.png,dots,maybe\n", "unknown label"),
    ("path,feature_type,label,split\nx.png,dots,good,validation\n", "unknown split 'validation'"),
])
def test_manifest_errors(tmp_path: Path, content: str, err: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=err):
        load_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_manifest_as_a_spreadsheet_saves_it(tmp_path: Path, clear_dataset: Path, sep: str) -> None:
    """A spreadsheet's CSV: a byte-order mark, ';' (where the decimal separator is a comma) or tabs,
    Windows line ends, a split written 'Train', paths with umlauts, empty rows at the end."""
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    shutil.copy(img, tmp_path / "Prüfteil 1.png")
    rows = [["path", "feature_type", "label", "split"], ["Prüfteil 1.png", "dots", "good", "Train"],
            [str(img), "dots", "defect", "TEST"], ["", "", "", ""], [" ", "", "", ""]]  # rows once used
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(sep.join(r) for r in rows).encode())
    s = load_manifest(tmp_path / "m.csv")
    assert [(x.path, x.label, x.split) for x in s] == [(tmp_path / "Prüfteil 1.png", GOOD, "train"),
                                                        (img, DEFECTIVE, "test")]
    assert read_image(s[0].path).shape[2] == 3


@pytest.mark.parametrize("name", ["m.tsv", "m.txt", "M.TXT"])
def test_a_tab_separated_manifest_as_spreadsheets_name_it(tmp_path: Path, clear_dataset: Path,
                                                          name: str) -> None:
    """A spreadsheet's tab-separated table is saved as .tsv or .txt (Excel's "Text (Tab
    delimited)"): it was taken for a dataset folder, and said not to exist; it is read as a
    manifest. A file of any other kind is named as a file, not as a folder that does not exist."""
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    (tmp_path / name).write_text(f"path\tfeature_type\tlabel\r\n{img}\tdots\tgood\r\n")
    assert [(s.path, s.feature_type, s.label) for s in load_dataset(tmp_path / name)] == [(img, "dots", GOOD)]
    (tmp_path / "m.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DatasetError, match=r"m\.xlsx is a file, not a dataset folder: a manifest is a table "
                                           r"saved as \.csv, \.tsv or \.txt"):
        load_dataset(tmp_path / "m.xlsx")


def test_an_image_from_a_pipe_is_read_and_a_device_or_pipe_is_no_dataset(
        tmp_path: Path, clear_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image from a pipe (``inspect MODEL /dev/stdin`` fed by a grabber, ``<(curl -s
    http://camera/snapshot)``, a named pipe) was "no such file": it is read, at most
    ``MAX_STREAM_BYTES`` (``/dev/zero`` is not read for ever); ``train /dev/zero`` said "dataset
    folder /dev/zero does not exist": it exists, and is no folder."""
    import os
    import threading

    from diffqc import data

    image = next((clear_dataset / "dots" / "train" / "good").iterdir())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=lambda: fifo.write_bytes(image.read_bytes()), daemon=True)
    feeder.start()
    assert (decode_image(fifo) == decode_image(image)).all()
    feeder.join(10)
    monkeypatch.setattr(data, "MAX_STREAM_BYTES", 2**20)
    with pytest.raises(ImageReadError, match=r"/dev/zero: more than 1 MiB from a pipe or device: not one "
                                             r"image"):
        decode_image(Path("/dev/zero"))
    with pytest.raises(ImageReadError, match="empty input"):
        decode_image(Path("/dev/null"))
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(DatasetError, match=f"{path} is a device or a pipe, not a dataset folder"):
            load_dataset(path)
    with pytest.raises(ImageReadError, match="no such file"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="a folder, not an image file"):
        decode_image(tmp_path)


@pytest.mark.parametrize("words,labels", [("OK,NOK", [GOOD, DEFECTIVE]), ("i.O.,n.i.O.", [GOOD, DEFECTIVE]),
                                          ("pass,fail", [GOOD, DEFECTIVE]), ("0,1", [GOOD, DEFECTIVE])])
def test_manifest_label_words_of_a_line(tmp_path: Path, words: str, labels: list[int]) -> None:
    good, bad = words.split(",")
    (tmp_path / "m.csv").write_text(f"path,feature_type,label\na.png,dots,{good}\nb.png,dots,{bad}\n")
    assert [x.label for x in load_manifest(tmp_path / "m.csv")] == labels


def test_manifest_labels_as_pandas_writes_an_integer_column_with_a_gap(tmp_path: Path) -> None:
    """pandas writes a label column of 0/1 with an empty (NaN) cell in it as floats, ``0.0``,
    ``1.0``: refused as "unknown label '0.0'". They are 0 and 1; a grade (``0.33``, as ELPV's
    defect probabilities) stays refused, and the error says a label must be chosen from it."""
    (tmp_path / "m.csv").write_text("path,feature_type,label\na.png,dots,0.0\nb.png,dots,1.0\n"
                                    "c.png,dots,\nd.png,dots,-1.0\n")
    assert [x.label for x in load_manifest(tmp_path / "m.csv")] == [GOOD, DEFECTIVE, -1, -1]
    (tmp_path / "m.csv").write_text("path,feature_type,label\na.png,dots,0.3333\n")
    with pytest.raises(DatasetError, match=r"m.csv:2: unknown label '0.3333' \(use good/defect, OK/NOK "
                       r"or 0/1; empty: unlabelled\): a grade or a probability is no label: decide "
                       r"which grades are defects"):
        load_manifest(tmp_path / "m.csv")


def test_manifest_written_on_windows(tmp_path: Path, clear_dataset: Path) -> None:
    """Paths with ``\\`` (a manifest made on Windows, used in the Linux container) are read with it
    as the separator, masks too; a file whose own name holds a ``\\`` is still taken as named; a
    drive path cannot be read here and is named with its line."""
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    (tmp_path / "dots" / "train").mkdir(parents=True)
    shutil.copy(img, tmp_path / "dots" / "train" / "a.png")
    shutil.copy(img, tmp_path / "odd\\name.png")
    (tmp_path / "m.csv").write_text("path,feature_type,label,mask\n"
                                    "dots\\train\\a.png,dots,good,\n"
                                    "odd\\name.png,dots,defect,dots\\train\\a.png\n")
    s = load_manifest(tmp_path / "m.csv")
    assert [x.path for x in s] == [tmp_path / "dots" / "train" / "a.png", tmp_path / "odd\\name.png"]
    assert s[1].mask_path == tmp_path / "dots" / "train" / "a.png"
    assert all(read_image(x.path).shape[2] == 3 for x in s)
    (tmp_path / "m.csv").write_text("path,feature_type,label\ndots\\train\\a.png,dots,good\n"
                                    "C:\\Daten\\dots\\b.png,dots,good\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: 'C:\\\\Daten.*' is a Windows path \(on C:\\\)"):
        load_manifest(tmp_path / "m.csv")


def test_a_manifests_columns_are_read_in_any_case_and_a_near_miss_is_named(tmp_path: Path,
                                                                          clear_dataset: Path) -> None:
    """A column named ``Split`` (as a spreadsheet's header is often capitalised) or ``Part_ID``
    was not read, without a word: the GOOD test rows were trained on. Column names are read in
    any case, spaces and hyphens as underscores; one that misses a column diffqc reads
    (``splits``) is named with it; others (``notes``) are the user's own, left alone."""
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    (tmp_path / "m.csv").write_text(f"Path,Feature Type,LABEL,Split,Part-ID,notes\n"
                                    f"{img},dots,good,test,p1,ok\n")
    (s,) = load_manifest(tmp_path / "m.csv")
    assert (s.path, s.feature_type, s.label, s.split, s.part_id) == (img, "dots", GOOD, "test", "p1")
    (tmp_path / "m.csv").write_text(f"path,feature_type,label,splits\n{img},dots,good,test\n")
    with pytest.raises(DatasetError, match=r"m\.csv: column 'splits' is not one diffqc reads \(did you "
                                           r"mean 'split'\?\)"):
        load_manifest(tmp_path / "m.csv")
    for twice in ("Split", "split"):
        (tmp_path / "m.csv").write_text(f"path,feature_type,label,split,{twice}\n"
                                        f"{img},dots,good,train,test\n")
        with pytest.raises(DatasetError, match=rf"m\.csv: columns 'split' and '{twice}' are one column"):
            load_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("content,err", [
    ("path,feature_type,label\n,dots,good\n", r"m\.csv:2: empty path"),  # was read as the manifest's folder
    ("path,feature_type,label\nC:/Daten/b.png,dots,good\n", r"m\.csv:2: 'C:/Daten/b.png' is a Windows path"),
])
def test_manifest_rows_that_name_no_file_here_are_named(tmp_path: Path, content: str, err: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=err):
        load_manifest(tmp_path / "m.csv")


def test_manifest_cells_after_a_space_and_a_quoted_header_are_read(tmp_path: Path,
                                                                   clear_dataset: Path) -> None:
    """``dots, "edge1", good`` kept the quotes of a cell after ", " (a type named '"edge1"'), and a
    header of quoted names separated by ';' (LibreOffice's "quote all text cells") was not
    found."""
    img = next((clear_dataset / "dots" / "train" / "good").iterdir())
    (tmp_path / "m.csv").write_text(f'path, feature_type, label\n{img}, "edge1", good\n')
    assert [s.feature_type for s in load_manifest(tmp_path / "m.csv")] == ["edge1"]
    (tmp_path / "m.csv").write_text(f'"path";"feature_type";"label"\n"{img}";"dots";"good"\n')
    assert [(s.path, s.feature_type) for s in load_manifest(tmp_path / "m.csv")] == [(img, "dots")]


def test_manifest_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes("path,feature_type,label\nPrüfteil.png,dots,good\n".encode("cp1252"))
    with pytest.raises(DatasetError, match=r"m\.csv is not UTF-8 text .*CSV UTF-8"):
        load_manifest(tmp_path / "m.csv")


def test_manifest_names_types_that_differ_only_in_case_or_spaces(tmp_path: Path) -> None:
    """A manifest typed by hand with "dots" and "Dots" (or "edge 1" and "edge1") was read as two
    types, each trained on part of the images, without a word; it is still read so (types are
    matched exactly), and a warning names them."""
    rows = ["a.png,dots,good", "b.png,Dots,good", "c.png,edge 1,good", "d.png,edge1,good", "e.png,angle,good"]
    (tmp_path / "m.csv").write_text("path,feature_type,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(DatasetWarning, match=r"feature types 'Dots' and 'dots'; 'edge 1' and 'edge1' "
                                            r"differ only in case"):
        samples = load_manifest(tmp_path / "m.csv")
    assert sorted({s.feature_type for s in samples}) == ["Dots", "angle", "dots", "edge 1", "edge1"]
    (tmp_path / "m.csv").write_text("path,feature_type,label\n" + "\n".join(rows[::2]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_manifest(tmp_path / "m.csv")


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(tmp_path / "empty")


def test_decode_modes() -> None:
    gray = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    assert decode_image(_png(gray)).shape == (64, 64, 3)
    deep = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)
    out16 = decode_image(_png(deep))
    assert out16.max() <= 1.0 and out16.max() > 0.9  # full 16-bit range kept
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)  # a float image in [0, 1]
    buf = io.BytesIO()
    Image.fromarray(ramp, mode="F").save(buf, format="TIFF")
    np.testing.assert_allclose(decode_image(buf.getvalue())[..., 0], ramp, atol=1e-6)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    out = decode_image(_png(rgba))
    assert out.shape == (32, 32, 3) and 0.4 < out[0, 0, 0] < 0.6
    # transparent everywhere (a camera frame saved with its BGRX padding byte as alpha, 0): its
    # colours, as OpenCV reads it and Pillow a 32-bit BMP, where it was black whatever the part
    rgba[..., 3] = 0
    assert np.allclose(decode_image(_png(rgba)), [1.0, 0.0, 0.0])
    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0] = 51
    assert np.allclose(decode_image(_png(la)), 0.2)


def test_without_copies_leaves_out_byte_identical_copies_and_names_label_clashes(tmp_path: Path) -> None:
    """A copy of an image under another name (a dataset put together by copying folders) is the
    same data point twice: left out when its type and label match, kept and named when the label
    differs; the same bytes under another type, and files that cannot be read or are no image
    (empty files are all alike), are kept: the reading names them."""
    a, b = _png(np.full((16, 16), 10, np.uint8)), _png(np.full((16, 16), 200, np.uint8))
    for name, data in {"a.png": a, "a-copy.png": a, "a-again.png": a, "b.png": b, "b-copy.png": b}.items():
        (tmp_path / name).write_bytes(data)
    samples = [Sample(tmp_path / "a.png", "dots", GOOD), Sample(tmp_path / "b.png", "dots", GOOD),
               Sample(tmp_path / "a-copy.png", "dots", GOOD),
               Sample(tmp_path / "a-again.png", "edges", GOOD),
               Sample(tmp_path / "b-copy.png", "dots", DEFECTIVE),
               Sample(tmp_path / "gone.png", "dots", GOOD), Sample(tmp_path / "gone.png", "dots", GOOD),
               Sample(tmp_path / "empty-1.png", "dots", GOOD), Sample(tmp_path / "empty-2.png", "dots", GOOD)]
    (tmp_path / "empty-1.png").write_bytes(b"")
    (tmp_path / "empty-2.png").write_bytes(b"")
    kept, notes = without_copies([*samples, samples[1]])  # b.png listed twice, as a manifest can
    assert kept == [samples[i] for i in (0, 1, 3, 4, 5, 6, 7, 8)]
    assert len(notes) == 2
    assert notes[0].startswith("2 image(s) are byte-identical copies") and "a-copy.png = " in notes[0]
    assert "b.png (listed twice)" in notes[0]
    assert notes[1].startswith("1 image(s) are byte-identical to an image of the same type with "
                               "the other label") and "b-copy.png (defect) = " in notes[1]
    assert without_copies(samples[:2]) == (samples[:2], [])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_points_that_are_not_numbers_is_refused(bad: float) -> None:
    """A height map from a laser profiler marks the points it could not measure NaN; one such
    pixel in a float TIFF made the whole image NaN (every pixel rescaled by a NaN minimum), and
    an infinite one made it black, both without a word. It is refused, as such an array is."""
    heights = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    heights[5, 7] = bad
    buf = io.BytesIO()
    Image.fromarray(heights, mode="F").save(buf, format="TIFF")
    with pytest.raises(ImageReadError, match=r"1 of 4096 pixels are not finite numbers"):
        decode_image(buf.getvalue(), source="height.tiff")


def _tiff(values: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values, mode=mode).save(buf, format="TIFF")
    return buf.getvalue()


def test_a_32_bit_image_is_read_on_a_fixed_scale_or_refused() -> None:
    """A float or 32-bit integer TIFF (a laser profiler's height map about a reference plane)
    was read on a scale of its own when a point lay below 0 (its minimum to its maximum), and on
    the 8-bit scale when none did: two scans of one surface 0.02 mm apart in level came in 127
    times apart in contrast, so parts of one type were read unlike each other, without a word;
    values above 16 bits were clipped to white. Such images are refused, naming the fix (one
    scale for the type's images); those on a fixed scale are read as before."""
    surface = np.linspace(0, 2, 64 * 64, dtype=np.float32).reshape(64, 64)  # heights in mm
    np.testing.assert_allclose(decode_image(_tiff(surface + 0.01, "F"))[..., 0], (surface + 0.01) / 255,
                               rtol=1e-6)  # on the 8-bit scale, as before
    with pytest.raises(ImageReadError, match=r"pixel values -0\.01\.\.1\.99 lie below 0 .*not by "
                       r"its own range.*\(h - LO\) / \(HI - LO\)"):
        decode_image(_tiff(surface - 0.01, "F"), source="scan-2.tiff")
    overshoot = np.clip(surface / 2, 0, 1) * 1.04 - 0.02  # [0, 1] with a bicubic resize's overshoot
    np.testing.assert_allclose(decode_image(_tiff(overshoot, "F"))[..., 0], np.clip(overshoot, 0, 1))
    with pytest.raises(ImageReadError, match=r"pixel values -5\.\.4090 lie below 0"):
        decode_image(_tiff(np.linspace(-5, 4090, 64 * 64).astype(np.int32).reshape(64, 64), "I"))
    with pytest.raises(ImageReadError, match=r"pixel values 0\.\.70000 lie above 65535"):
        decode_image(_tiff(np.linspace(0, 70000, 64 * 64).astype(np.int32).reshape(64, 64), "I"))


def test_a_file_of_several_images_is_refused_and_a_preview_page_is_not() -> None:
    """A camera writing one TIFF per part under several lightings (or a stack of parts) gave
    diffqc its first page only, without a word: the other pages were never inspected. A file with
    more than one image of the first one's size is refused; a smaller page (a preview, a
    reduced-resolution page) is not a part, and the first page is read as before."""
    pages = [Image.fromarray(np.full((64, 48), v, np.uint8)) for v in (10, 120, 240)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageReadError, match=r"holds 3 images of 48x64 .*one image per file"):
        decode_image(buf.getvalue(), source="lightings.tiff")

    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=[pages[1].resize((12, 16))])
    arr = decode_image(buf.getvalue(), source="with-preview.tiff")
    assert arr.shape == (64, 48, 3) and np.allclose(arr, 10 / 255)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"not an image at all", "not a recognised image"),
    (_png(np.zeros((64, 64), np.uint8))[:60], "corrupt or truncated"),
    (_png(np.zeros((1, 1), np.uint8)), "at least 8x8"),
])
def test_decode_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageReadError, match=reason):
        decode_image(data)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    # A PNG header that claims 40,000 x 40,000 pixels: refused before decoding (a mask too).
    bomb = png_header_only(40_000, 40_000)
    with pytest.raises(ImageReadError, match=r"exceeds the limit|decompression"):
        decode_image(bomb)
    (tmp_path / "bomb_mask.png").write_bytes(bomb)
    with pytest.raises(ImageReadError, match=r"bomb_mask\.png.*mask unreadable"):
        read_mask(tmp_path / "bomb_mask.png", (8, 8))


def test_corrupt_file_named_and_skippable(tmp_path: Path, clear_dataset: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        read_image(bad)
    samples = load_dataset(clear_dataset)[:3]
    from dataclasses import replace

    mixed = [*samples, replace(samples[0], path=bad)]
    with pytest.raises(ImageReadError):
        read_images(mixed)
    with pytest.warns(UserWarning, match="skipped"):
        images, kept, errors = read_images(mixed, skip_corrupt=True)
    assert len(images) == 3 and len(kept) == 3 and errors[0].source == str(bad)


def test_every_unreadable_file_is_named_in_one_error(tmp_path: Path, clear_dataset: Path) -> None:
    """A dataset with several broken files is mended in one pass: the error names every one
    (the first five in the message, all in ``errors``); with one broken file the message is that
    file's own."""
    from dataclasses import replace

    from diffqc.errors import UnreadableImagesError

    samples = load_dataset(clear_dataset)[:2]
    bad = []
    for i in range(7):
        path = tmp_path / f"broken{i}.png"
        path.write_bytes(b"" if i % 2 else b"\x89PNG garbage")
        bad.append(replace(samples[0], path=path))
    with pytest.raises(UnreadableImagesError) as caught:
        read_images([samples[0], *bad, samples[1]])
    err = caught.value
    assert isinstance(err, ImageReadError)  # callers catching the one-file error still do
    assert [e.source for e in err.errors] == [str(s.path) for s in bad]
    message = str(err)
    assert "7 unreadable images" in message
    assert all(f"broken{i}.png" in message for i in range(5))
    assert "broken5.png" not in message and "and 2 more" in message
    with pytest.raises(ImageReadError, match=r"^cannot read image .*broken1\.png: not a recognised"):
        read_images([samples[0], bad[1]])


def test_type_with_only_test_images_is_named(tmp_path: Path, clear_dataset: Path) -> None:
    from diffqc.data import DatasetWarning, good_training

    root = tmp_path / "root"
    shutil.copytree(clear_dataset, root)
    shutil.rmtree(root / "dots" / "train")  # dots: test images only
    samples = load_dataset(root)
    assert {s.feature_type for s in samples} == {"dots", "stripes"}  # still loaded (for testing)
    with pytest.warns(DatasetWarning, match="dots have no GOOD training images"):
        good = good_training(samples)
    assert {s.feature_type for s in good} == {"stripes"}


@pytest.mark.parametrize("kind", ["0/255 grey", "1-bit", "0/1 grey", "VOC palette", "JPEG 0/255"])
def test_read_mask_reads_label_images_and_0_255_masks_alike(tmp_path: Path, kind: str) -> None:
    """0/1 masks and palette PNGs (VOC-style labelling tools: defects in dark red, index 1) were
    read at 0/255's cut, all empty: every defect's pixels counted as clean, silently."""
    truth = np.zeros((40, 60), bool)
    truth[10:22, 20:44] = True
    path = tmp_path / ("mask.jpg" if kind.startswith("JPEG") else "mask.png")
    if kind == "0/255 grey" or kind == "JPEG 0/255":
        Image.fromarray(truth.astype(np.uint8) * 255).save(path, quality=90)
    elif kind == "1-bit":
        Image.fromarray(truth).save(path)
    elif kind == "0/1 grey":
        Image.fromarray(truth.astype(np.uint8)).save(path)
    else:
        img = Image.fromarray(truth.astype(np.uint8), mode="P")
        img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        img.save(path)
    mask = read_mask(path, (40, 60))
    assert (mask != truth).mean() < 0.01, kind  # JPEG: a few edge pixels may differ
    assert read_mask(path, (20, 30)).sum() == pytest.approx(truth.sum() / 4, rel=0.1)


def test_as_image_reads_arrays_as_decoded_files_are() -> None:
    """The Python API takes arrays from cameras, cv2 and Pillow: uint8 and uint16 are scaled as
    the image files they came from, grey and RGBA as their files; floats must lie in [0, 1]."""
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, format="PNG")
    decoded = decode_image(buf.getvalue())
    assert np.array_equal(as_image(rgb8), decoded)
    assert np.allclose(as_image(rgb8.astype(np.uint16) * 257), decoded, atol=1e-6)
    assert np.array_equal(as_image(rgb8.astype(np.int64)), decoded)  # values up to 255: 8-bit
    dark16 = np.full((12, 16), 200, np.uint16)  # a dark 16-bit frame is not an 8-bit one
    assert np.allclose(as_image(dark16), 200 / 65535)
    assert np.array_equal(as_image(decoded), decoded)
    grey = as_image(rgb8[:, :, 0])
    assert grey.shape == (12, 16, 3) and np.array_equal(grey[:, :, 2], decoded[:, :, 0])
    assert np.array_equal(as_image(rgb8[:, :, :1]), grey)
    rgba = np.dstack([rgb8, np.full((12, 16), 255, np.uint8)])
    assert np.allclose(as_image(rgba), decoded)
    rgba[:6, :, 3] = 0
    half = as_image(rgba)  # partly transparent: composited on black, as an RGBA file is
    assert not half[:6].any() and np.allclose(half[6:], decoded[6:])
    rgba[:, :, 3] = 0  # transparent everywhere: a camera's BGRX padding byte, no alpha (was black)
    assert np.allclose(as_image(rgba), decoded)
    assert as_image(np.ones((12, 16), bool)).min() == 1.0
    with pytest.raises(ImageReadError, match=r"values 0\.\.255 lie outside \[0, 1\]; divide by 255"):
        as_image(np.linspace(0, 255, 12 * 16).reshape(12, 16))
    with pytest.raises(ImageReadError, match="outside"):
        as_image(np.full((12, 16), np.nan, np.float32))
    with pytest.raises(ImageReadError, match="not 8- or 16-bit"):
        as_image(np.full((12, 16), -1, np.int32))
    with pytest.raises(ImageReadError, match="HxWx3"):
        as_image(np.zeros((12, 16, 2), np.uint8))
    # a torch tensor's channels-first layout and a batch are named, with what to do
    with pytest.raises(ImageReadError, match=r"channels first.*transpose\(1, 2, 0\)"):
        as_image(np.zeros((3, 12, 16), np.float32))
    with pytest.raises(ImageReadError, match=r"a batch of 8 images.*one array per image"):
        as_image(np.zeros((8, 12, 16, 3), np.uint8))
    # a torch batch (N x C x H x W) and a file's encoded bytes were "got shape (1, 3, 12, 16)",
    # "got shape ()": named too
    with pytest.raises(ImageReadError, match=r"a batch of 2 images, channels first.*permute\(1, 2, 0\)"):
        as_image(np.zeros((2, 3, 12, 16), np.float32))
    with pytest.raises(ImageReadError, match=r"got the 5 bytes of an encoded file.*decode_image\(data\)"):
        as_image(b"\x89PNG\r")  # type: ignore[arg-type]
    # a frame through the buffer protocol (a camera SDK's buffer, memoryview(array)) has its
    # shape: read as its array, where it was named "the 192 bytes of an encoded file"
    assert np.array_equal(as_image(memoryview(rgb8)), decoded)  # type: ignore[arg-type]
    with pytest.raises(ImageReadError, match=r"got the 5 bytes of an encoded file"):
        as_image(memoryview(b"\x89PNG\r"))  # type: ignore[arg-type]
    with pytest.raises(ImageReadError, match="not an image's"):
        as_image(np.zeros((12, 16), np.complex64))
    # smaller than a file may be (a 1 x 1 array was scored, far off every part: REJECT)
    with pytest.raises(ImageReadError, match=r"image is 7x12; at least 8x8 is needed"):
        as_image(rgb8[:, :7])
    # a Pillow image, of any mode, as its file is decoded (a palette PNG's indices are no grey)
    for mode in ("RGB", "P", "L", "I;16"):
        img = Image.fromarray(rgb8).convert(mode) if mode != "I;16" else Image.fromarray(dark16)
        img.save(buf := io.BytesIO(), format="PNG")
        assert np.array_equal(as_image(img), decode_image(buf.getvalue())), mode


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_images_are_read_upright_as_their_orientation_tag_says(tmp_path: Path, fmt: str) -> None:
    # A phone or a camera that writes EXIF Orientation stores the pixels sideways; a viewer,
    # a browser (the dashboard) and OpenCV's imread show them turned. diffqc reads them as
    # shown, so a heat map lies over the part as the user sees it, and the size that
    # image_shape() reads from the header alone is the decoded one.
    stored = np.zeros((40, 64), np.uint8)
    stored[:8, :16] = 255  # a bright block in the stored top-left corner
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        img = Image.fromarray(stored)
        exif = img.getexif()
        exif[0x0112] = orientation
        if fmt == "TIFF":
            # the tag in the TIFF's own directory; compressed, as Pillow 13 turns uncompressed
            # TIFFs of orientations 5-8 wrongly (a Pillow bug)
            img.save(path, format=fmt, tiffinfo=exif, compression="tiff_lzw")
        else:
            img.save(path, format=fmt, exif=exif, quality=100)
        out = read_image(path)[..., 0]
        assert image_shape(path) == out.shape
        expected = np.asarray(ImageOps.exif_transpose(Image.open(path)), np.float32) / 255.0
        np.testing.assert_allclose(out, expected, atol=1e-6)
        if orientation == 6:  # "rotate 90° clockwise to display": the block moves top-right
            assert out.shape == (64, 40) and out[:16, -8:].mean() > 0.9
        if orientation == 1:
            assert out.shape == (40, 64) and out[:8, :16].mean() > 0.9


def test_dataset_folder_of_names_the_dataset_folder_an_output_would_land_in(tmp_path: Path,
                                                                            clear_dataset: Path) -> None:
    """Heat maps or a report's gallery written into a dataset's ``train/good`` (or a folder below
    it, or a ``test/<kind>``) are read back as parts by the next train, test or evaluate: GOOD
    images to train on. Folders that only look like a split are no dataset's."""
    from diffqc.data import dataset_folder_of

    data = shutil.copytree(clear_dataset, tmp_path / "data")
    good, blob = data / "dots" / "train" / "good", data / "dots" / "test" / "blob"
    assert dataset_folder_of(good) == good
    assert dataset_folder_of(good / "heat" / "new") == good  # not made yet
    assert dataset_folder_of(blob / "hm") == blob
    for elsewhere in (data, data / "dots", data / "dots" / "train", data / "dots" / "ground_truth" / "blob",
                      tmp_path / "heat" / "test" / "good", tmp_path / "runs" / "train" / "x", tmp_path):
        assert dataset_folder_of(elsewhere) is None, elsewhere
    (tmp_path / "heat" / "test" / "good").mkdir(parents=True)  # heat maps filed as a dataset is
    Image.new("L", (8, 8)).save(tmp_path / "heat" / "test" / "good" / "a_heatmap.png")
    assert dataset_folder_of(tmp_path / "heat" / "test" / "good") is None  # no train/good: no dataset
    # labelled folders (<type>/OK beside <type>/<kind>): the type's folder, whose every new
    # sub-folder is read as a defect kind ('report/gallery': 'report')
    labelled = tmp_path / "lf" / "dots"
    shutil.copytree(good, labelled / "OK")
    shutil.copytree(blob, labelled / "NOK")
    for inside in (labelled, labelled / "OK", labelled / "report" / "gallery", labelled / "NOK" / "hm"):
        assert dataset_folder_of(inside) == labelled, inside
    for elsewhere in (tmp_path / "lf", tmp_path / "lf" / "report"):
        assert dataset_folder_of(elsewhere) is None, elsewhere


def test_images_of_a_format_diffqc_does_not_read_are_named_not_passed_over(tmp_path: Path) -> None:
    """Photos taken with a phone (HEIC) or a camera's RAW files in a dataset were passed over in
    silence: a type of them alone was "no images found under DATA: expected <type>/train/good
    ..." (its layout was right), and beside PNGs the fit left them out without a word. They are
    now named, with what to do; `inspect` of such a folder says so too."""
    from diffqc.errors import DatasetError

    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
    only = tmp_path / "only" / "dots" / "train" / "good"
    only.mkdir(parents=True)
    for name in ("a.heic", "b.HEIC", "c.dng"):
        (only / name).write_bytes(heic)
    with pytest.raises(DatasetError, match=r"holds 3 files of an image format diffqc does not read "
                                           r"\(\.dng: 1, \.heic: 2; e\.g\. .*a\.heic\): convert them to PNG"):
        load_dataset(tmp_path / "only")
    mixed = tmp_path / "mixed" / "dots" / "train" / "good"
    mixed.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i, i, i)).save(mixed / f"p{i}.png")
    (mixed / "phone.heic").write_bytes(heic)
    (mixed / "notes.txt").write_text("not an image: not named")
    with pytest.warns(UserWarning, match=r"left out 1 file of an image format diffqc does not read "
                                         r"\(\.heic: 1; e\.g\. .*phone\.heic\)"):
        samples = load_dataset(tmp_path / "mixed")
    assert sorted(s.path.name for s in samples) == ["p0.png", "p1.png", "p2.png"]
    from diffqc.cli import _expand_images

    with pytest.warns(UserWarning, match=r"only: left out 3 files of an image format diffqc does not read"):
        assert _expand_images([str(tmp_path / "only")]) == []


def test_image_compression_is_read_from_the_files_signature() -> None:
    """Lossy (JPEG, WebP's VP8) or lossless (PNG, BMP, TIFF, GIF, PNM, WebP's VP8L), from the
    encoded bytes' first kilobytes, as a camera wrote them; anything else is not known."""
    from diffqc.data import image_compression

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))

    def encoded(fmt: str, image: Image.Image = rgb, **kw: object) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    lossy = [encoded("JPEG"), encoded("JPEG", rgb.convert("L")), encoded("WEBP", quality=80),
             encoded("WEBP", rgb.convert("RGBA"), quality=80)]  # with alpha: the extended VP8X form
    lossless = [encoded("PNG"), encoded("BMP"), encoded("TIFF"), encoded("GIF"), encoded("PPM"),
                encoded("PPM", rgb.convert("L")), encoded("WEBP", lossless=True),
                encoded("WEBP", rgb.convert("RGBA"), lossless=True), encoded("TIFF", rgb.convert("I;16"))]
    assert [image_compression(d) for d in lossy] == ["lossy"] * len(lossy)
    assert [image_compression(d) for d in lossless] == ["lossless"] * len(lossless)
    for other in (b"", b"not an image", b"\x00" * 64, b"RIFF\x00\x00\x00\x00WAVEfmt "):
        assert image_compression(other) is None


def _resave(folder: Path, suffix: str, scale: int = 1) -> None:
    """Every PNG under ``folder`` saved again as ``suffix`` (JPEG at quality 90), ``scale`` times
    as wide and high."""
    for p in sorted(folder.rglob("*.png")):
        with Image.open(p) as img:
            img = img.resize((img.width * scale, img.height * scale))
            img.save(p.with_suffix(suffix), **({"quality": 90} if suffix == ".jpg" else {}))
        if suffix != ".png":
            p.unlink()


def test_label_shortcuts_name_defects_saved_otherwise_than_the_good_parts(tmp_path: Path) -> None:
    """Defect images collected apart from the GOOD ones (a reject bin photographed and saved as
    JPEG, or at another zoom) differ by the file alone: on the synthetic set, JPEG defects at
    quality 90 raised `diffqc test`'s AUROC from 0.887 to 0.940 without a word. Each such type is
    named, with the counts and one image; a dataset saved alike yields no note."""
    from tests.conftest import write_clear_dataset

    root = write_clear_dataset(tmp_path / "d", n_train=4, n_test=3)
    assert label_shortcuts(load_dataset(root)) == []
    _resave(root / "dots" / "test" / "blob", ".jpg")
    _resave(root / "stripes" / "test" / "blob", ".png", scale=2)
    notes = label_shortcuts(load_dataset(root))
    assert len(notes) == 2, notes
    assert notes[0].startswith("defective and GOOD images of 1 type(s) are lossy (JPEG or WebP) in "
                               f"other shares (dots: 3 of 3 defective, 0 of 7 GOOD; e.g. {root}/dots/")
    assert "AUROC" in notes[0] and "stripes" not in notes[0]
    assert notes[1].startswith("defective images of 1 type(s) are of a size outside their GOOD "
                               "images' (stripes: 3 of 3 defective (128x128 px, ...), GOOD 64x64 px; "
                               f"e.g. {root}/stripes/")
    _resave(root / "dots" / "test" / "good", ".jpg")  # a GOOD part saved as JPEG too: told apart less
    _resave(root / "dots" / "train" / "good", ".jpg")
    assert [n for n in label_shortcuts(load_dataset(root)) if "dots" in n] == []


def test_a_synthetic_set_cut_short_is_refused_with_the_command_that_writes_it_whole(tmp_path: Path) -> None:
    """A ``data synth`` cut short (Ctrl-C, a full disk) left its first types' images and a
    marker saying ``"complete": false``; ``data info`` then listed those types with no word and
    ``train`` fitted a model of them, exit 0, as if the set were whole."""
    from diffqc.errors import OutputError
    from diffqc.synth import write_synthetic_dataset
    from tests.conftest import full_disk

    out = tmp_path / "set"
    with full_disk(3000), pytest.raises(OutputError, match="incomplete"):
        write_synthetic_dataset(out, n_parts=48, image_size=64, seed=3, progress=False)
    assert any(out.rglob("*.png"))
    with pytest.raises(DatasetError, match=r"cut short .* run `diffqc data synth .*set --parts 48 --seed 3 "
                                           r"--size 64` again"):
        load_dataset(out)
    write_synthetic_dataset(out, n_parts=48, image_size=64, seed=3, progress=False)  # run again: whole
    assert len(load_dataset(out)) == 48
