"""The image checks a bundle carries (diffqc.inspection.ImageCheck: size and colour) and the
checks of ``inspect``'s arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffqc.inspection import (
    ImageCheck,
    brightness,
    image_brightness,
    image_colours,
    image_compressions,
    image_size_ranges,
    inspect_arguments,
    is_grey,
    white_share,
)


def test_image_size_ranges_per_type() -> None:
    sizes = [("dots", 256, 256), ("edge", 222, 618), ("edge", 388, 103), ("dots", 256, 256)]
    assert image_size_ranges(sizes) == {"dots": [[256, 256], [256, 256]], "edge": [[222, 388], [103, 618]]}
    assert image_size_ranges([]) == {}


def test_size_check_names_a_type_once_outside_its_training_sizes() -> None:
    check = ImageCheck({"training_data": {"image_sizes": {"dots": [[256, 256], [256, 256]],
                                                              "edge": [[222, 388], [103, 618]]}}})
    assert check("dots", 256, 256) is None
    assert check("dots", 240, 270) is None  # within 10 %: a crop a few pixels off
    assert check("edge", 300, 110) is None  # inside a type's range of sizes
    note = check("dots", 256, 320)
    assert note is not None and "320x256 px image of type 'dots'" in note and "256x256 px" in note
    assert check("dots", 512, 512) is None  # said once per type
    note = check("edge", 500, 600)
    assert note is not None and "103-618 x 222-388 px" in note
    assert check("angle", 10_000, 10) is None and check(None, 10, 10) is None  # a type it has no sizes of


def test_size_check_of_a_bundle_without_sizes_checks_nothing() -> None:
    for metadata in ({}, {"training_data": {}}, {"training_data": {"image_sizes": None}}):
        assert ImageCheck(metadata)("dots", 8, 4000) is None


def test_grey_images_are_told_from_colour_ones() -> None:
    grey = np.repeat(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64, 1), 3, axis=2)
    assert is_grey(grey) and is_grey(grey[..., 0])
    jpeg = grey.copy()
    jpeg[..., 2] += 1.0 / 255.0  # a JPEG's rounding of a grey image: still grey
    assert is_grey(jpeg)
    tinted = grey.copy()
    tinted[20:40, 20:40, 0] += 0.1  # a red mark: colour
    assert not is_grey(tinted)
    seen = [("dots", True), ("edge", False), ("mix", True), ("mix", False), ("dots", True)]
    assert image_colours(seen) == {"dots": "grey", "edge": "colour", "mix": "mixed"}


def test_colour_check_names_a_type_once_seen_in_the_other_colour() -> None:
    """A mono camera set to colour (or back) after a firmware update moves every part's score;
    the part is named once per type, beside its size."""
    colours = {"dots": "grey", "edge": "colour", "mix": "mixed"}
    check = ImageCheck({"training_data": {"image_colours": colours}})
    grey = np.full((32, 32, 3), 0.5, np.float32)
    colour = grey.copy()
    colour[..., 0] = 0.9
    assert check("dots", 32, 32, grey) is None and check("edge", 32, 32, colour) is None
    assert check("mix", 32, 32, colour) is None and check("mix", 32, 32, grey) is None
    assert check("dots", 32, 32) is None  # no pixels (a file's header): its size only
    note = check("dots", 32, 32, colour)
    assert note is not None and "a colour image of type 'dots', whose training images were grey" in note
    assert check("dots", 32, 32, colour) is None  # said once per type
    note = check("edge", 32, 32, grey)
    assert note is not None and "a grey image of type 'edge', whose training images were in colour" in note
    # size and colour at once: both said
    both = ImageCheck({"training_data": {"image_colours": {"dots": "grey"},
                                         "image_sizes": {"dots": [[32, 32], [32, 32]]}}})
    note = both("dots", 64, 64, np.full((64, 64, 3), [0.9, 0.1, 0.1], np.float32))
    assert note is not None and "64x64 px image" in note and "a colour image" in note
    # every part is counted, per type and check, though named once: a camera mended is seen
    assert both("dots", 64, 64) is None and both("dots", 32, 32, np.zeros((32, 32, 3), np.float32)) is None
    [colour_seen, size_seen] = both.snapshot()
    assert (colour_seen["check"], colour_seen["parts"], size_seen["check"], size_seen["parts"]) == (
        "colour", 1, "size", 2)
    assert size_seen["feature_type"] == "dots" and "64x64 px image" in size_seen["note"]
    assert size_seen["first_at"] <= size_seen["last_at"] and check.snapshot()[0]["parts"] == 2


def test_inspect_arguments_name_the_calls_easy_to_get_wrong(tiny_model: Path) -> None:
    """`det.inspect(image)` was numpy's "truth value of an array is ambiguous" (and with a type,
    "128 images but 1 feature types": its rows taken for images); `det.inspect([image], "dots")`
    said "1 images but 4 feature types" (the letters of the string); a file path for an image
    "cannot read image <array>: ... got shape ()"."""
    from diffqc.model import Detector

    det = Detector.load(tiny_model, device="cpu")
    image = np.full((64, 64, 3), 0.5, np.float32)
    with pytest.raises(TypeError, match=r"got one array of shape \(64, 64, 3\): pass \[image\]"):
        det.inspect(image)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got the string 'dots': pass \['dots'\] \* len\(images\)"):
        det.inspect([image], "dots")
    with pytest.raises(ValueError, match="2 images but 1 feature types"):
        det.inspect([image, image], ["dots"])
    # file paths, as a newcomer passes them: "cannot read image <array>: ... got shape ()"
    with pytest.raises(TypeError, match=r"got the file path 'part.png': read it with diffqc.data.read_image"):
        det.inspect([image, Path("part.png")], ["dots", "dots"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"got the file path 'part.png'"):
        det.inspect("part.png", ["dots"])  # type: ignore[arg-type]
    # a generator of images (`inspect(read_image(p) for p in paths)`): "object of type
    # 'generator' has no len()" from inside, after the check had consumed it
    with pytest.raises(TypeError, match=r"takes a list of images, got a generator: pass list\(images\), or "
                                        r"batches of it"):
        det.inspect(im for im in [image])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"feature_types is one type per image, got a map"):
        det.inspect([image], map(str, ["dots"]))  # type: ignore[arg-type]
    # a class index as a classifier's label, "'int' object has no attribute 'casefold'"; a
    # stack of images (N x H x W x 3) was told to pass [image]
    with pytest.raises(TypeError, match=r"a feature type is its name \(a str\) or None \(unknown\), "
                                        r"got 1 \(int\)"):
        det.inspect([image, image], ["dots", 1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"got one array of shape \(2, 64, 64, 3\): pass list\(images\)"):
        det.inspect(np.stack([image, image]), ["dots", "dots"])  # type: ignore[arg-type]
    assert [r.feature_type for r in det.inspect([image], ["dots"])] == ["dots"]
    assert inspect_arguments([image], None) == [None]
    # an image as nested lists (`arr.tolist()`, a JSON payload): "'list' object has no attribute
    # 'shape'"; read as its array is
    (nested,) = det.inspect([image.tolist()], ["dots"])
    assert nested.score == pytest.approx(det.inspect([image], ["dots"])[0].score)


def test_compression_check_names_a_type_once_seen_in_the_other_compression() -> None:
    """A camera set to save JPEG (to save disk) where the model learned PNGs: the compression's
    artifacts move every part's score; named once per type, as size and colour are. A part
    whose file is not known (an array) is not checked."""
    check = ImageCheck({"training_data": {"image_compression": {"dots": "lossless", "edge": "lossy",
                                                                "mix": "mixed"}}})
    grey = np.full((32, 32, 3), 0.5, np.float32)
    assert check("dots", 32, 32, grey, "lossless") is None and check("edge", 32, 32, grey, "lossy") is None
    assert check("mix", 32, 32, grey, "lossy") is None and check("dots", 32, 32, grey) is None
    note = check("dots", 32, 32, grey, "lossy")
    assert note is not None and ("a lossy (JPEG or WebP) image of type 'dots', whose training images "
                                 "were lossless") in note
    assert check("dots", 32, 32, grey, "lossy") is None  # said once per type
    note = check("edge", 32, 32, grey, "lossless")
    assert note is not None and "a lossless image of type 'edge', whose training images were lossy" in note
    assert [(s["feature_type"], s["check"], s["parts"]) for s in check.snapshot()] == [
        ("dots", "compression", 2), ("edge", "compression", 1)]
    assert ImageCheck({})("dots", 32, 32, grey, "lossy") is None  # a bundle from before: nothing to compare


def test_per_type_kinds_are_one_kind_or_mixed() -> None:
    assert image_compressions([("a", "lossy"), ("a", "lossy"), ("b", "lossless"), ("c", "lossy"),
                               ("c", "lossless")]) == {"a": "lossy", "b": "lossless", "c": "mixed"}


def test_brightness_check_names_a_type_once_seen_far_darker_than_its_training() -> None:
    """12-bit data saved in 16-bit files (a camera switched to Mono12) reads 16 times darker, and
    every part was REJECTed without a word of why (a GOOD part of the drill's dots: score 5239,
    p 3e-37, against 309 as trained); a lamp out alike. A part darker than a quarter of its
    type's darkest training image is named once per type; half as bright (scored PASS) is not."""
    check = ImageCheck({"training_data": {"image_brightness": {"dots": [0.40, 0.60]}}})
    part = np.full((64, 64, 3), 0.5, np.float32)
    assert check("dots", 64, 64, part) is None and check("dots", 64, 64, part * 0.5) is None
    assert check("edge", 64, 64, part / 16) is None  # no brightness kept for the type
    note = check("dots", 64, 64, part / 16)
    assert note is not None and ("an image of type 'dots' far darker than its training images "
                                 "(mean brightness 0.031; theirs 0.40-0.60)") in note
    assert "12-bit data saved in 16-bit files" in note and "a lamp" in note
    assert check("dots", 64, 64, part / 16) is None and check.snapshot()[0]["check"] == "brightness"
    kept = image_brightness([("a", 0.5), ("a", 0.3), ("b", 0.71234)])
    assert kept == {"a": [0.3, 0.5], "b": [0.7123, 0.7123]}
    assert brightness(np.full((16, 16), 0.25, np.float32)) == pytest.approx(0.25)


def test_brightness_check_names_a_type_once_seen_far_brighter_than_its_training() -> None:
    """An exposure or gain doubled (or a brighter lamp): half the part clipped at white, every
    part REJECTed (the drill's dots at 1.5 times: 60 % of its pixels at white, score 1006, p 2e-5;
    at 1.2 times none, p 0.67). A part with a quarter more of its pixels at white than any
    training image of its type is named once per type; a type trained with white in its images
    (a bright background) is allowed as much more."""
    check = ImageCheck({"training_data": {"image_brightness": {"dots": [0.40, 0.60], "bottle": [0.5, 0.6]},
                                          "image_white": {"dots": 0.0, "bottle": 0.40}}})
    part = np.full((64, 64, 3), 0.5, np.float32)
    glare = part.copy()
    glare[:40] = 1.0  # 62.5 % of the rows at white
    assert check("dots", 64, 64, part) is None and check("bottle", 64, 64, glare) is None
    some = part.copy()
    some[:16] = 1.0  # 25 %
    assert check("dots", 64, 64, some) is None
    note = check("dots", 64, 64, glare)
    assert note is not None and ("an image of type 'dots' far brighter than its training images "
                                 "(62% of its pixels at white; theirs at most 0%)") in note
    assert "a longer exposure, a higher gain or a brighter lamp" in note
    assert check("dots", 64, 64, glare) is None and check.snapshot()[0]["check"] == "clipping"
    assert white_share(glare) == pytest.approx(0.625)


def test_brightness_check_names_8_bit_parts_of_a_type_trained_on_12_bit_data() -> None:
    """The other way round: a type trained on a 12-bit camera's data in 16-bit files (read at the
    gain train names) and a camera set back to Mono8 (a replaced camera's default) reads 16 times
    brighter: every part was REJECTed without a word (the drill's GOOD dots: score 33183, p 0,
    against 112), as neither the darkness nor the clipping check reads it. A part brighter than
    four times its type's brightest training image is named; a type trained bright (above a
    quarter of white) cannot be so, and nothing changes for it."""
    check = ImageCheck({"training_data": {
        "image_brightness": {"dots": [0.0018, 0.0024], "bottle": [0.3, 0.6]},
        "image_white": {"dots": 0.0, "bottle": 0.0}}})
    mono12 = np.full((64, 64, 3), 0.002, np.float32)
    assert check("dots", 64, 64, mono12) is None and check("dots", 64, 64, mono12 * 4) is None
    assert check("bottle", 64, 64, np.full((64, 64, 3), 0.98, np.float32)) is None
    note = check("dots", 64, 64, mono12 * 350)
    assert note is not None and ("an image of type 'dots' far brighter than its training images "
                                 "(mean brightness 0.700; theirs 0.0018-0.0024)") in note
    assert "has the camera's pixel format been set to Mono8" in note
    assert check.snapshot()[0]["check"] == "brightness"


def _outside_warnings(inspect: Any, images: list[Any], types: list[str | None], **kwargs: Any) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        inspect(images, types, **kwargs)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_the_python_api_names_a_part_outside_its_training_images(tiny_model: Path, clear_dataset: Path,
                                                                   tmp_path: Path, runtime: str) -> None:
    """`Detector.inspect` scored a part from a changed camera (12-bit data in 16-bit arrays, a new
    region of interest, mono to colour) without a word, where `inspect`, `test`, `serve` and
    `watch` name it: a notebook or a line's own program on the Python API saw every part move.
    It warns now, once per type and check for the detector, as the commands do."""
    from diffqc.data import read_image
    from diffqc.model import Detector

    if runtime == "torch":
        det: Any = Detector.load(tiny_model, device="cpu")
    else:
        import shutil

        from diffqc import export as ex
        from diffqc.runtime import OnnxDetector

        bundle = tmp_path / "tiny"
        shutil.copytree(tiny_model, bundle)
        ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=lambda _: None)
        det = OnnxDetector(bundle, threads=1)
    image = read_image(next((clear_dataset / "dots" / "test" / "good").glob("*.png")))
    assert _outside_warnings(det.inspect, [image], ["dots"]) == []
    mono8 = (image[..., 0] * 255 + 0.5).astype(np.uint8)  # a mono camera's frame, as its SDK gives it
    assert _outside_warnings(det.inspect, [mono8], ["dots"]) == []
    mono12 = (image * 4095).round().astype(np.uint16)  # 12-bit data in 16-bit arrays: 16 times darker
    (dark,) = _outside_warnings(det.inspect, [mono12], ["dots"])
    assert "an image of type 'dots' far darker than its training images" in dark
    assert "(said once per type)" in dark
    assert _outside_warnings(det.inspect, [mono12, mono12], ["dots", "dots"]) == []  # said once
    big = np.kron(image, np.ones((2, 2, 1), np.float32))  # 128 x 128 where it learned 64 x 64
    (size,) = _outside_warnings(det.inspect, [big], [None])  # its type unknown: the one it is scored under
    assert "a 128x128 px image of type 'dots'" in size
    colour = image.copy()
    colour[..., 0] = np.clip(colour[..., 0] + 0.2, 0, 1)
    (cast,) = _outside_warnings(det.inspect, [colour], ["dots"])
    assert "a colour image of type 'dots', whose training images were grey" in cast
    assert _outside_warnings(det.inspect, [colour, mono12], ["stripes"] * 2, check_images=False) == []
