from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffqc.cli import main

from .conftest import drawn_part_brightness, full_disk


def test_help_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


@pytest.mark.parametrize("group", ["data", "results"])
def test_a_command_group_without_its_action_names_its_actions(group: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``diffqc data`` printed the top-level help (not data's actions), and ``diffqc results``
    said "the following arguments are required: results_command", an internal name: each now
    gives its own usage, with its actions, as a usage error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([group])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"usage: diffqc {group} [-h] ACTION ..." in err and "_command" not in err, err
    assert f"diffqc {group}: error: the following arguments are required: ACTION (" in err, err


def test_data_info_says_what_a_train_would_read(clear_dataset: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``diffqc data info DATA``, before a long train on one's own folder: per type the GOOD
    images a model fits on, the held-out GOOD ones, the defects by kind and their masks, the
    image sizes from the headers, and the files that cannot be read, named."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    (data / "dots" / "train" / "good" / "broken.png").write_bytes(b"not a png")
    assert main(["data", "info", str(data), "--json"]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)["types"]
    assert info["stripes"] == {"train": 24, "good": 8, "defects": {"blob": 8}, "masks": 8,
                               "unlabelled": 0, "sizes": [[64, 64, 40]], "unreadable": []}
    assert info["dots"]["train"] == 25 and info["dots"]["sizes"] == [[64, 64, 40]]
    assert info["dots"]["unreadable"] == [str(data / "dots" / "train" / "good" / "broken.png")]
    assert main(["data", "info", str(data)]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split()[:3] == ["feature_type", "train", "good"]
    assert lines[1].split() == ["dots", "25", "8", "8", "8", "0", "1", "64x64", "blob", "8"]
    assert "1 file cannot be read as an image (missing" in out.err and "broken.png" in out.err
    assert main(["data", "info", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    from PIL import Image

    for p in sorted((data / "dots" / "test" / "blob").glob("*.png")):  # defects saved as JPEG
        with Image.open(p) as img:
            img.save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    assert main(["data", "info", str(data)]) == 0
    assert "are lossy (JPEG or WebP) in other shares (dots: 8 of 8 defective, 0 of 32 GOOD" in \
        capsys.readouterr().err


def test_train_on_a_test_split_says_it_fits_the_held_out_images(clear_dataset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``train DATA/dots/test`` (a type's test split given by mistake, or for want of train/):
    the model fits on the GOOD images kept for testing, and `diffqc test` then leaves them out as
    fit images; said, not done silently. The type's own folder says nothing of the kind."""
    args = ["-q", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"]
    assert main(["train", str(clear_dataset / "dots" / "test"), "--out", str(tmp_path / "m"), *args]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["training_data"]["fit_images"] == {"dots": 5}
    assert "none of its GOOD images is marked for training" in out.err, out.err
    assert "the 8 GOOD images held out for testing" in out.err
    assert main(["train", str(clear_dataset / "dots"), "--out", str(tmp_path / "m2"), *args]) == 0
    assert "held out for testing" not in capsys.readouterr().err


def test_inspect_json_lines(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = clear_dataset / "dots" / "test" / "blob"
    rc = main(["inspect", str(tiny_model), str(folder), "--feature-type", "dots",
               "--heatmaps", str(tmp_path / "hm")])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(list(folder.iterdir()))
    assert {"score", "p_value", "decision", "type_scores", "predicted_type", "heatmap"} <= set(rows[0])
    assert all(Path(r["heatmap"]).is_file() for r in rows)
    # --heatmap-size: the image within N px in the picture (a 12-megapixel frame's took seconds)
    from PIL import Image

    big = tmp_path / "big.png"
    Image.open(next(folder.iterdir())).convert("RGB").resize((1200, 900)).save(big)
    widths = []
    for size in ("0", "600"):
        assert main(["inspect", str(tiny_model), str(big), "--feature-type", "dots",
                     "--heatmaps", str(tmp_path / f"hm-{size}"), "--heatmap-size", size]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        with Image.open(row["heatmap"]) as picture:
            widths.append(picture.size[0])
    assert widths[0] > 2 * 1200 and 2 * 600 < widths[1] < 2 * 600 + 200


def test_inspect_streams_its_lines_and_stops_quietly_when_the_reader_goes(
        tiny_model: Path, clear_dataset: Path) -> None:
    """``diffqc inspect ... | head -1``: each line reaches the pipe as its image is scored (not
    in 8 KB blocks), and when the reader closes the pipe inspect stops without an error line or
    traceback (it said "diffqc: error: Broken pipe")."""
    import subprocess
    import sys

    folder = clear_dataset / "dots" / "test"
    n = sum(1 for p in folder.rglob("*.png"))
    assert n >= 10
    proc = subprocess.Popen([sys.executable, "-m", "diffqc.cli", "inspect", str(tiny_model), str(folder),
                             "--feature-type", "dots"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())  # before the other images are scored
    assert first["feature_type"] == "dots"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "error" not in err and "Traceback" not in err and "Exception" not in err, err


def test_inspect_names_an_image_size_its_type_was_not_trained_on(
    tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A camera's new region of interest: the first part of a type at a size outside its training
    images' is named on stderr (once per type); parts at the trained size are not."""
    import numpy as np
    from PIL import Image

    meta = json.loads((tiny_model / "metadata.json").read_text())
    (h0, h1), (w0, w1) = meta["training_data"]["image_sizes"]["dots"]
    first = next((clear_dataset / "dots" / "test" / "good").iterdir())
    with Image.open(first) as img:
        assert (img.height, img.width) == (h0, w0) and (h0, w0) == (h1, w1)
        img.resize((2 * w0, h0)).save(tmp_path / "wide.png")
        img.resize((2 * w0, 2 * h0)).save(tmp_path / "large.png")
    assert main(["inspect", str(tiny_model), str(first), "--feature-type", "dots"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["inspect", str(tiny_model), str(tmp_path / "wide.png"), str(tmp_path / "large.png"),
                 "--feature-type", "dots"]) == 0
    out = capsys.readouterr()
    warned = [line for line in out.err.splitlines() if line.startswith("diffqc: warning:")]
    assert len(warned) == 1 and f"a {2 * w0}x{h0} px image of type 'dots'" in warned[0], out.err
    assert len(out.out.splitlines()) == 2  # scored all the same
    # a camera switched from mono to colour: the trained type's colour named, once
    assert meta["training_data"]["image_colours"] == {"dots": "grey", "stripes": "grey"}
    with Image.open(first) as img:
        Image.merge("RGB", (img.convert("L"), img.convert("L"), Image.new("L", img.size, 40))).save(
            tmp_path / "tinted.png")
    assert main(["inspect", str(tiny_model), str(tmp_path / "tinted.png"), "--feature-type", "stripes"]) == 0
    err = capsys.readouterr().err
    assert "diffqc: warning: a colour image of type 'stripes', whose training images were grey" in err
    # a camera set to save JPEG where the model learned PNGs: named, once per type
    assert meta["training_data"]["image_compression"] == {"dots": "lossless", "stripes": "lossless"}
    with Image.open(first) as img:
        img.save(tmp_path / "a.jpg", quality=75)
        img.save(tmp_path / "b.jpg", quality=90)
    assert main(["inspect", str(tiny_model), str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"),
                 "--feature-type", "dots"]) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffqc: warning:")]
    assert len(warned) == 1 and "a lossy (JPEG or WebP) image of type 'dots', whose training images were " \
        "lossless" in warned[0], warned
    # a camera switched to Mono12: 12-bit data in a 16-bit PNG reads 16 times darker
    lo, hi = meta["training_data"]["image_brightness"]["dots"]
    assert 0 < lo <= hi < 1
    with Image.open(first) as img:
        twelve = np.asarray(img.convert("L")).astype(np.uint16) * 16
    Image.fromarray(twelve).save(tmp_path / "mono12.png")
    assert main(["inspect", str(tiny_model), str(tmp_path / "mono12.png"), "--feature-type", "dots"]) == 0
    err = capsys.readouterr().err
    assert "diffqc: warning: an image of type 'dots' far darker than its training images" in err
    # and one whose exposure was doubled: half of it clipped at white
    assert meta["training_data"]["image_white"]["dots"] < 0.25
    with Image.open(first) as img:
        doubled = np.clip(np.asarray(img.convert("L")).astype(np.int32) * 2, 0, 255).astype(np.uint8)
    Image.fromarray(doubled).save(tmp_path / "doubled.png")
    assert main(["inspect", str(tiny_model), str(tmp_path / "doubled.png"), "--feature-type", "dots"]) == 0
    err = capsys.readouterr().err
    assert "diffqc: warning: an image of type 'dots' far brighter than its training images" in err


def test_inspect_folder_leaves_hidden_files_out(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect FOLDER`` scores the folder's images, not macOS ``._name.png`` companions or
    copies in hidden folders; an image named on the command line is read whatever its name."""
    folder = tmp_path / "imgs"
    shutil.copytree(clear_dataset / "dots" / "test" / "blob", folder)
    images = sorted(p.name for p in folder.iterdir())
    (folder / "._000.png").write_bytes(b"Mac resource fork")
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(folder / images[0], folder / ".ipynb_checkpoints" / images[0])
    (folder / "@eaDir" / images[0]).mkdir(parents=True)  # a Synology share's thumbnails
    shutil.copy(folder / images[0], folder / "@eaDir" / images[0] / "SYNOPHOTO_THUMB_S.png")
    assert main(["inspect", str(tiny_model), str(folder), "--feature-type", "dots"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == images
    shutil.copy(folder / images[0], folder / ".hidden.png")
    assert main(["inspect", str(tiny_model), str(folder / ".hidden.png"), "--feature-type", "dots"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_inspect_takes_each_image_type_from_its_folder(tiny_model: Path, clear_dataset: Path,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect`` a folder laid out by type (``<type>/...``, as ``watch`` and ``diffqc test``
    read it): each image is scored under the nearest folder of its path named after a model
    type, a file given alone too; an MVTec type's masks (``ground_truth/``) under a folder given
    are left out, with a word; ``--feature-type`` is for all of them."""
    assert main(["inspect", str(tiny_model), str(clear_dataset)]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    parts = [p for p in clear_dataset.rglob("*.png") if "ground_truth" not in p.parts]
    assert sorted(r["path"] for r in rows) == sorted(map(str, parts))
    for row in rows:
        kind = Path(row["path"]).relative_to(clear_dataset).parts[0]
        assert row["type_known"] and row["feature_type"] == kind, row
    assert "left out 16 images in ground_truth/ folders (masks, not parts" in out.err, out.err
    folder = clear_dataset / "dots"
    assert main(["inspect", str(tiny_model), str(folder / "test")]) == 0  # from the folder given
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 16 and all(r["type_known"] and r["feature_type"] == "dots" for r in rows)
    mask = next((folder / "ground_truth" / "blob").iterdir())  # a file given is read as it is
    alone = tmp_path / "part.png"  # in no folder named after a type: the router names it
    shutil.copy(next((folder / "test" / "good").iterdir()), alone)
    assert main(["inspect", str(tiny_model), str(mask), str(alone)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["feature_type"], r["type_known"]) for r in rows] == [("dots", True), ("dots", False)]
    assert main(["inspect", str(tiny_model), str(folder), "--feature-type", "stripes"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["feature_type"] == "stripes" and r["type_known"] for r in rows)


def test_inspect_names_once_a_folder_named_almost_as_a_type(tiny_model: Path, clear_dataset: Path,
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect parts/`` with a type's folder named in another case (``Dots/`` for ``dots/``): its images
    were scored under the router's pick without a word, as `watch` scored them. A warning names
    the folder once, with the near miss."""
    typo = tmp_path / "parts" / "Dots"
    shutil.copytree(clear_dataset / "dots" / "test" / "good", typo)
    assert main(["inspect", str(tiny_model), str(tmp_path / "parts")]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert len(rows) == 8 and not any(r["type_known"] for r in rows)
    said = [line for line in out.err.splitlines() if "named like no type" in line]
    assert said == [f"diffqc: warning: folder {typo}/ is named like no type of the model (did you mean "
                    "'dots'?): its images are scored under the type router's pick (type_known false); "
                    "name it after the type, or give --feature-type"], out.err


def test_inspect_expands_a_pattern_the_shell_left(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Windows' cmd and PowerShell, a quoted argument and subprocess lists pass ``*.png`` as it
    is: inspect expands it as a shell would (a file named so is read as itself), and a pattern
    that matches nothing is one error that says so, not "no such file"."""
    folder = tmp_path / "imgs"
    shutil.copytree(clear_dataset / "dots" / "test" / "blob", folder)
    images = sorted(p.name for p in folder.iterdir())
    (folder / "notes.txt").write_text("not an image")
    assert main(["inspect", str(tiny_model), str(folder / "*.png"), "--feature-type", "dots"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == images and "error" not in rows[0]
    assert main(["inspect", str(tiny_model), str(folder / "*.bmp"), "--feature-type", "dots"]) == 1
    err = capsys.readouterr().err
    assert "no file matches" in err and "*.bmp" in err and "Traceback" not in err


def test_inspect_heat_map_names_of_a_deep_folder_fit_the_file_system(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A heat map is named after the image's path below the folder given, flattened: three
    levels of 60-character folders and a 100-character file name made a name over the file
    system's 255 bytes, and inspect stopped ("File name too long"). Long names are shortened
    (a digest of the whole path, then its end), so each image still gets its own file."""
    deep = tmp_path / "line" / ("a" * 60) / ("b" * 60) / ("c" * 60)
    deep.mkdir(parents=True)
    source = next((clear_dataset / "dots" / "test" / "blob").iterdir())
    for k in range(2):
        shutil.copy(source, deep / f"{k}{'p' * 100}.png")
    assert main(["inspect", str(tiny_model), str(tmp_path / "line"), "--feature-type", "dots",
                 "--heatmaps", str(tmp_path / "hm")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [Path(r["heatmap"]).name for r in rows]
    assert len(set(names)) == 2 and all(len(n.encode()) <= 255 for n in names)
    assert all(n.endswith("p" * 100 + "_heatmap.png") for n in names)
    assert all(Path(r["heatmap"]).stat().st_size > 0 for r in rows)


def test_inspect_unknown_type_is_clear_error(tiny_model: Path, clear_dataset: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", str(tiny_model), str(clear_dataset / "dots" / "test" / "good"),
               "--feature-type", "nope"])
    assert rc == 1
    assert "unknown feature type 'nope'; this model knows" in capsys.readouterr().err
    assert main(["inspect", str(tiny_model), str(clear_dataset / "dots" / "test" / "good"),
                 "--feature-type", "Dots"]) == 1
    assert "unknown feature type 'Dots' (did you mean 'dots'?)" in capsys.readouterr().err


def test_inspect_corrupt_image(tiny_model: Path, tmp_path: Path, clear_dataset: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = next((clear_dataset / "dots" / "test" / "good").iterdir())
    assert main(["inspect", str(tiny_model), str(bad)]) == 1
    assert "bad.png" in capsys.readouterr().err
    assert main(["inspect", str(tiny_model), str(bad), str(good), "--skip-corrupt"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "error" in rows[0] and "score" in rows[1]


def test_train_names_every_unreadable_image_and_the_way_past_them(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    good = data / "dots" / "train" / "good"
    (good / "zz_empty.png").write_bytes(b"")
    (good / os.fsdecode(b"zz_t\xe9xt.png")).write_text("not an image")  # a Latin-1 name, too
    args = ["train", str(data), "--out", str(tmp_path / "m"), "-q", "--set", "backbone.input_size=64",
            "--set", "calibration.fraction=0.35"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "2 unreadable images" in err and "zz_empty.png" in err and "zz_t\\xe9xt.png" in err
    assert "--skip-corrupt" in err and not (tmp_path / "m").exists()
    assert main([*args, "--skip-corrupt"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sorted(Path(p).name for p in out["training_data"]["skipped_corrupt"]) == [
        "zz_empty.png", "zz_t\\xe9xt.png"]  # as text: \xNN for its undecodable bytes
    # the summary is one readable line: the fit images' fingerprints (one per image) stay in the
    # bundle, not on the terminal
    kept = json.loads((tmp_path / "m" / "metadata.json").read_text())["training_data"]
    assert len(kept["fit_image_fingerprints"]) == sum(kept["fit_images"].values())
    assert "fit_image_fingerprints" not in out["training_data"]
    assert out["training_data"]["fit_images"] == kept["fit_images"]
    # and what DATA holds besides the GOOD training images: left for `diffqc test`
    test = list(data.glob("*/test/*/*.png"))
    assert out["not_trained_on"] == {"good": sum(p.parent.name == "good" for p in test),
                                     "defect": sum(p.parent.name != "good" for p in test)}
    assert out["not_trained_on"]["defect"] > 0


def test_train_writes_a_model_beside_its_manifest(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """project/manifest.csv, project/images/..., project/models/m: the model folder overlaps no
    listed file, so it is not refused (a dataset folder's own subfolders still are)."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(clear_dataset / "dots", project / "images")
    rows = ["path,feature_type,label"]
    rows += [f"images/train/good/{p.name},dots,good"
             for p in sorted((project / "images" / "train" / "good").iterdir())]
    (project / "manifest.csv").write_text("\n".join(rows) + "\n")
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    rc = main(["train", str(project / "manifest.csv"), "--out", str(project / "models" / "m"), "-q",
               "--method", "padim", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"])
    assert rc == 0, capsys.readouterr().err
    assert (project / "models" / "m" / "weights.safetensors").is_file()
    after = sorted(r for r in (p.relative_to(project) for p in project.rglob("*"))
                   if r.parts[0] != "models")
    assert after == before


def test_train_on_several_datasets_fits_them_together(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Retraining on the line's parts reviewed GOOD (`results export`) beside the first dataset:
    `train DATA MORE --out M` fits on both (it took one DATA, and the export alone would drop
    the first set). Each is checked as one alone is; one named twice is refused."""
    import json

    from tests.conftest import write_clear_dataset

    more = write_clear_dataset(tmp_path / "more", n_train=6, n_test=2, seed=1)
    fit = ["-q", "--method", "padim", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"]
    assert main(["train", str(clear_dataset), str(more), "--out", str(tmp_path / "m"), *fit]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["classes"] == ["dots", "stripes"]
    seen = {t: out["training_data"]["fit_images"][t] + out["training_data"]["calibration_images"][t]
            for t in out["classes"]}
    assert seen == {t: 24 + 6 for t in out["classes"]}
    assert out["not_trained_on"] == {"good": 2 * (8 + 2), "defect": 2 * (8 + 2)}
    assert main(["train", str(more), str(more / "dots" / ".."), "--out", str(tmp_path / "m2"), *fit]) == 1
    assert f"names {more / 'dots' / '..'} twice" in capsys.readouterr().err
    assert main(["train", str(clear_dataset), str(more), "--out", str(more / "m"), *fit]) == 1
    assert f"--out {more / 'm'} and the training data {more} overlap" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() and not (more / "m").exists()
    # two sets naming one type two ways (a colleague's "Dots"): two types, as one manifest's
    # would be, and said as a manifest's are
    (more / "dots").rename(more / "Dots")
    assert main(["train", str(clear_dataset), str(more), "--out", str(tmp_path / "m3"), *fit]) == 0
    assert (f"diffqc: warning: {clear_dataset}, {more}: feature types 'Dots' and 'dots' differ only in "
            "case, spaces or punctuation") in capsys.readouterr().err


def test_damaged_bundle_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    assert main(["inspect", str(tmp_path / "m"), "x.png"]) == 1
    assert "is not a diffqc model bundle" in capsys.readouterr().err  # an empty folder
    (tmp_path / "m" / "metadata.json").write_text("{}")
    assert main(["inspect", str(tmp_path / "m"), "x.png"]) == 1
    assert "is incomplete: missing config.json, weights.safetensors" in capsys.readouterr().err


def test_train_and_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", str(tmp_path / "d"), "--parts", "48", "--size", "64", "-q"]) == 0
    assert (tmp_path / "d" / "manifest.csv").is_file()
    capsys.readouterr()
    rc = main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "m"), "-q", "--method", "diffusion",
               "--steps", "20", "--set", "backbone.input_size=64", "--set", "diffusion.hidden=32",
               "--set", "calibration.fraction=0.3"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(out["classes"]) == 8 and (tmp_path / "m" / "weights.safetensors").is_file()


def test_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--set", "train.nope=1"]) == 1
    assert "unknown config field" in capsys.readouterr().err


def test_heatmaps_named_by_relative_path_never_overwrite(tiny_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """MVTec's test/<kind>/000.png share a stem: each gets its own file, and a file already in the
    heat-map folder (an earlier run's, or anyone's) is never overwritten."""
    from PIL import Image

    src = tmp_path / "imgs"
    for kind in ("blob", "good"):
        (src / "test" / kind).mkdir(parents=True)
        Image.new("RGB", (64, 64), (120, 120, 120)).save(src / "test" / kind / "000.png")
    hm = tmp_path / "hm"
    hm.mkdir()
    (hm / "test_blob_000_heatmap.png").write_bytes(b"someone else's file")
    assert main(["inspect", str(tiny_model), str(src), "--feature-type", "dots", "--runtime", "torch",
                 "--heatmaps", str(hm)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = sorted(Path(r["heatmap"]).name for r in rows)
    assert names == ["test_blob_000_heatmap-1.png", "test_good_000_heatmap.png"]
    assert (hm / "test_blob_000_heatmap.png").read_bytes() == b"someone else's file"
    assert all(Path(r["heatmap"]).stat().st_size > 100 for r in rows)


def test_export_onnx_without_data_as_the_readme_says(tiny_model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc export MODEL --format onnx` checks parity on synthetic images when no --data is
    given (it failed: the synthetic set was asked for fewer parts than it can write)."""
    import shutil

    bundle = shutil.copytree(tiny_model, tmp_path / "m")
    assert main(["export", str(bundle), "--format", "onnx", "-q", "--threads", "1",
                 "--check-images", "8"]) == 0, capsys.readouterr().err
    assert (bundle / "model.onnx").is_file()
    assert "synthetic images" in (bundle / "export.json").read_text()


def test_inspect_heatmaps_on_a_full_disk_reports_the_image_and_names_the_file(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The heat map cannot be written (full disk): the image's result is still printed, the run
    stops with the file named, and no truncated PNG is left (it was a partial file and a bare
    "File too large")."""
    image = next((clear_dataset / "dots" / "test" / "blob").iterdir())
    hm = tmp_path / "hm"
    with full_disk(2048):
        rc = main(["inspect", str(tiny_model), str(image), "--feature-type", "dots",
                   "--runtime", "torch", "--heatmaps", str(hm)])
    assert rc == 1
    out, err = capsys.readouterr()
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["path"] == str(image) and row["decision"] and "heatmap" not in row
    assert f"cannot write {hm / (image.stem + '_heatmap.png')}: File too large" in err
    assert list(hm.iterdir()) == []


def test_inspect_csv_on_a_full_disk_ends_with_the_last_complete_row(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--csv on a full disk left half a row (and said a bare "File too large"): the row that did
    not fit is taken back, and the error names the file."""
    import csv

    folder = clear_dataset / "dots" / "test" / "blob"
    table = tmp_path / "results.csv"
    with full_disk(300):
        rc = main(["inspect", str(tiny_model), str(folder), "--feature-type", "dots",
                   "--runtime", "torch", "--csv", str(table)])
    assert rc == 1
    out, err = capsys.readouterr()
    assert f"cannot write {table}: File too large; it holds every row before this one" in err
    rows = list(csv.DictReader(table.open(newline="", encoding="utf-8")))
    printed = [json.loads(line) for line in out.splitlines()]
    assert 1 <= len(rows) < len(printed) <= len(list(folder.iterdir()))  # each scored image printed
    assert table.read_bytes().endswith(b"\r\n")
    assert [r["path"] for r in rows] == [p["path"] for p in printed[:len(rows)]]
    assert all(r["decision"] in {"PASS", "REVIEW", "REJECT"} for r in rows)


def test_reports_and_tables_go_to_dev_stdout(tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    """``--json /dev/stdout`` in a pipeline hung (the check whether it was an earlier report read
    the pipe) and, redirected to a file, was refused as "not an earlier report": standard output
    (a pipe or a file) takes the report after what was printed, and ``/dev/full`` is a full disk."""
    folder = clear_dataset / "dots" / "test" / "blob"
    cli = [sys.executable, "-m", "diffqc.cli"]
    piped = subprocess.run([*cli, "test", str(tiny_model), str(clear_dataset), "-q", "--json", "/dev/stdout"],
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert lines[-1] == '{"report": "/dev/stdout"}'
    start = lines.index("{")  # the report, after the summary table
    report = json.loads("\n".join(lines[start:-1]))
    assert {"rows", "images"} <= set(report) and lines[0] and start > 0
    into = tmp_path / "out.txt"
    with into.open("w") as fh:
        to_file = subprocess.run([*cli, "inspect", str(tiny_model), str(folder), "--feature-type", "dots",
                                  "--runtime", "torch", "--csv", "/dev/stdout"],
                                 stdout=fh, stderr=subprocess.PIPE, text=True, timeout=120)
    assert to_file.returncode == 0, to_file.stderr
    lines = into.read_text().splitlines()
    assert lines[0] == "path,feature_type,predicted_type,score,p_value,decision,heatmap,error"
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(rows) == len(list(folder.iterdir())) == len(lines) - 1 - len(rows)  # each as JSON and CSV
    dash = subprocess.run([*cli, "test", str(tiny_model), str(clear_dataset), "-q", "--csv", "-"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # "-": standard output
    assert dash.returncode == 0, dash.stderr
    assert dash.stdout.splitlines()[-1] == '{"table": "-"}' and "path,feature_type" in dash.stdout
    assert not (tmp_path / "-").exists()  # no file named "-"
    full = subprocess.run([*cli, "test", str(tiny_model), str(clear_dataset), "-q", "--json", "/dev/full"],
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 1
    assert full.stderr.strip().endswith("diffqc: error: cannot write /dev/full: No space left on device")


def test_inspect_reads_an_image_from_a_pipe(tiny_model: Path, clear_dataset: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``grab | diffqc inspect MODEL /dev/stdin`` (or ``<(curl -s http://camera/snapshot)``) was
    "no such file": the piped image is scored."""
    image = next((clear_dataset / "dots" / "test" / "blob").iterdir())
    proc = subprocess.run([sys.executable, "-m", "diffqc.cli", "inspect", str(tiny_model), "/dev/stdin",
                           "--feature-type", "dots", "--runtime", "torch"],
                          input=image.read_bytes(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["path"] == "/dev/stdin"
    dash = subprocess.run([sys.executable, "-m", "diffqc.cli", "inspect", str(tiny_model), "-",
                           "--feature-type", "dots", "--runtime", "torch"],
                          input=image.read_bytes(), capture_output=True, timeout=120)  # "-": standard input
    assert dash.returncode == 0, dash.stderr
    assert json.loads(dash.stdout)["score"] == row["score"]
    assert main(["inspect", str(tiny_model), str(image), "--feature-type", "dots", "--runtime", "torch"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert (row["score"], row["decision"]) == pytest.approx((from_file["score"], from_file["decision"]))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="resource limits are POSIX")
def test_running_out_of_memory_is_one_error_line(tmp_path: Path) -> None:
    """A job larger than the machine (here: a 4000 px synthetic set under a 800 MB address-space
    limit) ends with one error line naming memory and how to see where, exit 1 (it was a
    ``numpy._ArrayMemoryError`` traceback)."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (800 * 2**20, 800 * 2**20))

    proc = subprocess.run([sys.executable, "-m", "diffqc.cli", "data", "synth", str(tmp_path / "set"),
                           "--size", "4000", "--parts", "24", "-q"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffqc: error: out of memory"), proc.stderr
    assert "DIFFQC_TRACEBACK=1" in lines[0]


@pytest.mark.parametrize("value,traceback", [("1", True), ("yes", True), ("0", False), ("false", False),
                                             ("", False), (" no ", False), ("off", False)])
def test_diffqc_traceback_off_as_environment_flags_are(value: str, traceback: bool, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``DIFFQC_TRACEBACK=0`` (as a compose file or a unit turns a flag off) gave the traceback:
    any value did. 0, false, no, off and empty are off, as systemd and Docker read them."""
    from diffqc.errors import DatasetError

    monkeypatch.setenv("DIFFQC_TRACEBACK", value)
    if traceback:
        with pytest.raises(DatasetError):
            main(["data", "info", str(tmp_path / "nope")])
    else:
        assert main(["data", "info", str(tmp_path / "nope")]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"diffqc: error: dataset folder {tmp_path / 'nope'} does not exist"
    monkeypatch.setenv("DIFFQC_TRACEBACK", "maybe")  # neither: said, before any work
    assert main(["data", "info", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.strip() == ("diffqc: error: DIFFQC_TRACEBACK='maybe' is not a flag: "
                                               "give 1 or 0 (true or false)")


def test_torch_running_out_of_memory_is_one_error_line(clear_dataset: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """PyTorch's allocator says it has no room with a RuntimeError (the CPU's ``DefaultCPUAllocator:
    can't allocate memory``) or ``torch.OutOfMemoryError`` (CUDA's), not Python's MemoryError: a
    job no machine holds (found with backbone.input_size=100000; here a noise schedule of 2^53 steps,
    the most an integer setting takes, 64 PiB) ended in a RuntimeError traceback; it is the same
    one error line, saying how much was asked."""
    out = tmp_path / "model"
    assert main(["train", str(clear_dataset), "--out", str(out), "-q",
                 "--set", f"diffusion.timesteps={2**53}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("diffqc: error: out of memory: it tried to allocate 64.0 PiB at once"), lines
    assert "DIFFQC_TRACEBACK=1" in lines[0] and "alloc_cpu" not in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["inspect", "", "x.png"], ["inspect", "m", ""], ["inspect", "m", "x.png", "--heatmaps", ""],
    ["inspect", "m", "x.png", "--csv", ""], ["train", "", "--out", "o"], ["train", "d", "--out", ""],
    ["evaluate", ""], ["evaluate", "d", "--out", ""], ["evaluate", "d", "--feature-cache", ""],
    ["test", "", "d"], ["test", "m", ""], ["test", "m", "d", "--json", ""], ["test", "m", "d", "--csv", ""],
    ["test", "m", "d", "--heatmaps", ""], ["export", ""], ["export", "m", "--int8", "--calibration-data", ""],
    ["export", "m", "--data", ""], ["export", "m", "--held-out", ""],
    ["calibrate", ""], ["calibrate", "m", ""],
    ["data", "synth", ""], ["data", "info", ""], ["demo", "--out", ""], ["demo", "--json", ""],
    ["serve", ""], ["serve", "m", "--db", ""], ["serve", "m", "--data-dir", ""],
    ["serve", "m", "--watch", " "], ["serve", "m", "--tls-cert", ""], ["serve", "m", "--tls-key", ""],
    ["serve", "m", "--opcua-users", ""], ["serve", "m", "--opcua-trust", ""],
    ["watch", "", "m"], ["watch", "d", ""], ["watch", "d", "m", "--db", ""],
    ["watch", "d", "m", "--data-dir", ""],
    ["results", "export", ""], ["results", "export", "o", "--db", ""],
    ["results", "export", "o", "--data-dir", ""],
    ["results", "list", "--db", ""], ["results", "summary", "--db", ""],
    ["results", "parts", "--db", ""], ["results", "parts", "--model", ""], ["results", "backup", ""],
    ["results", "backup", "o", "--db", ""],
], ids=lambda argv: " ".join(a or "''" for a in argv))
def test_an_empty_file_or_folder_name_is_a_usage_error(argv: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An empty name (a script's "$DIR" of a variable it never set) was the current folder:
    `inspect MODEL ""` scanned it to any depth and inspected what it found there, `--heatmaps ""`
    and `--csv ""` wrote nothing without a word, `serve --db ""` opened the default store; it is
    refused as it is parsed, naming the argument (exit 2), before any work."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("expected a file or folder, got an empty name (a shell variable that was never "
                            "set?)"), err


@pytest.mark.parametrize("argv", [
    ["inspect", "m", "x.png", "--threads", "100000"], ["evaluate", "d", "--threads", "100000"],
    ["export", "m", "--threads", "100000"], ["serve", "m", "--threads", "100000"],
    ["watch", "d", "m", "--threads", "100000"],
])
def test_a_thread_count_no_machine_has_is_a_usage_error(argv: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--threads 100000`` (a typo, or a count of cores in the wrong unit): `serve` was killed by
    a segmentation fault (exit 139) as its thread pools were made; refused as it is parsed."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --threads: must be from 1 to 1024, got 100000")


def test_every_option_says_what_it_does() -> None:
    """``--help`` of every command explains each of its arguments (``serve --port`` and
    ``data synth --parts`` were listed bare, their defaults unsaid)."""
    import argparse

    from diffqc.cli import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "diffqc")
    assert not bare, bare


@pytest.mark.skipif(__import__("sys").platform != "linux",
                    reason="Linux file systems take names that are not UTF-8")
def test_inspect_takes_file_names_that_are_not_utf8(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An image named in Latin-1 (``b"caf\\xe9.png"``, from an older share) stopped ``inspect
    --heatmaps`` and ``--csv`` with a ``UnicodeEncodeError`` traceback. Its undecodable bytes are
    written as ``\\xNN`` in the JSON line, the CSV and the heat map's name."""
    import csv
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    first = next((clear_dataset / "dots" / "test" / "good").iterdir())
    latin = os.fsdecode(b"caf\xe9.png")
    shutil.copy(first, folder / latin)
    assert main(["inspect", str(tiny_model), str(folder), "--feature-type", "dots", "--csv",
                 str(tmp_path / "rows.csv"), "--heatmaps", str(tmp_path / "hm")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["path"] == str(folder / "caf\\xe9.png")
    assert Path(row["heatmap"]).name == "caf\\xe9_heatmap.png" and Path(row["heatmap"]).is_file()
    with open(tmp_path / "rows.csv", encoding="utf-8", newline="") as fh:
        (cell,) = [r["path"] for r in csv.DictReader(fh)]
    assert cell == row["path"]
    # --force replaces an earlier inspect CSV only, never a file it did not write as one (the
    # bundle's metadata.json): refused before any image is scored
    inspect = ["inspect", str(tiny_model), str(folder), "--feature-type", "dots", "--force", "--csv"]
    meta = (tiny_model / "metadata.json").read_bytes()
    assert main([*inspect, str(tiny_model / "metadata.json")]) == 1
    out, err = capsys.readouterr()
    assert "is not an earlier inspect CSV" in err and out == ""
    assert (tiny_model / "metadata.json").read_bytes() == meta
    assert main([*inspect, str(tmp_path / "rows.csv")]) == 0


def test_inspect_again_does_not_score_its_own_heat_maps(tiny_model: Path, clear_dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect DIR --heatmaps DIR/hm`` run twice: the second run scored the first run's heat
    maps as parts (twice the rows, half of them pictures). A folder or pattern leaves out the
    ``--heatmaps`` folder of the same run; an image named alone is read wherever it lies."""
    folder = tmp_path / "imgs"
    shutil.copytree(clear_dataset / "dots" / "test" / "blob", folder)
    n = len(list(folder.iterdir()))
    for args in ([str(folder)], [str(folder)], [str(folder / "*.png"), str(folder / "**" / "*.png")]):
        assert main(["inspect", str(tiny_model), *args, "--feature-type", "dots",
                     "--heatmaps", str(folder / "hm")]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len({r["path"] for r in rows}) == n and all("_heatmap" not in r["path"] for r in rows)
    picture = next((folder / "hm").iterdir())
    assert main(["inspect", str(tiny_model), str(picture), "--feature-type", "dots",
                 "--heatmaps", str(folder / "hm")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_inspect_names_a_type_the_bundle_can_flag_no_part_of(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Trained on 2 GOOD images of a type, a bundle calibrates it on one: no tail can be fitted,
    every p-value is at least 1/2, and every part of the type PASSes, a clear defect included.
    `train` warned once; `inspect`, `serve` and `watch` loaded such a bundle without a word. They
    now name the type as they load it; a type that can be flagged is not named."""
    from diffqc.data import load_dataset
    from diffqc.model import Detector

    from .conftest import tiny_config, write_clear_dataset

    data = write_clear_dataset(tmp_path / "data", n_train=2, n_test=2)
    more = write_clear_dataset(tmp_path / "more", n_train=8, n_test=0, seed=3)
    for path in (more / "stripes" / "train" / "good").glob("*.png"):  # stripes: 10 GOOD, 3 calibrate
        shutil.copy(path, data / "stripes" / "train" / "good" / f"more_{path.name}")
    det = Detector(tiny_config(), device="cpu").fit(load_dataset(data), progress=False)
    bundle = det.save(tmp_path / "m")
    assert main(["inspect", str(bundle), str(data / "dots" / "test" / "blob"), "--feature-type", "dots"]) == 0
    out, err = capsys.readouterr()
    assert {json.loads(line)["decision"] for line in out.splitlines()} == {"PASS"}  # clear defects
    assert f"model bundle {bundle}: no part of dots (1 GOOD calibration image) can be flagged" in err
    assert "stripes" not in err
    # three copies of one image (scores all alike) leave no tail either: named as such, where the
    # advice was 2 GOOD images, which the type had
    cal = json.loads((bundle / "calibration.json").read_text())
    cal["known"]["stripes"] = [cal["known"]["stripes"][0]] * 3
    (bundle / "calibration.json").write_text(json.dumps(cal))
    assert main(["inspect", str(bundle), str(data / "dots" / "test" / "blob"), "--feature-type", "dots"]) == 0
    err = capsys.readouterr().err
    assert "stripes (3 GOOD calibration images, all scoring alike)" in err
    assert "recalibrate on 2 different GOOD images or more" in err


def test_ctrl_c_during_train_ends_with_interrupted_on_its_own_line(tmp_path: Path) -> None:
    """Ctrl-C while `train` read its images printed "diffqc: interrupted" in the middle of the
    progress bar's line, and the bar again after it (closed as the process ended): the last
    thing on the terminal was a half-done bar. The bar ends first now, and nothing follows the
    message. The interrupt comes once the bar counts a batch, with most of the images left."""
    import time

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(300):
        folder = tmp_path / "data" / "dots" / "train" / "good"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "diffqc.cli", "train", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "model")], stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    counted = re.compile(r"features: +\d+%\|[^|]*\| ([1-9]\d)/300")
    while not counted.search(log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)  # a batch in the backbone (the bar waits for it), with most images left
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    shown = log.read_text().replace("\r", "\n")
    lines = [line for line in shown.splitlines() if line.strip()]
    assert "/300" in shown and "300/300" not in shown  # interrupted while the bar was open
    assert lines[-1] == "diffqc: interrupted", lines[-3:]
    assert not (tmp_path / "model").exists()


def test_a_name_the_terminal_cannot_show_is_escaped_not_a_crash(clear_dataset: Path, tmp_path: Path) -> None:
    """Where standard output's encoding cannot write a type's name (a Windows pipe's code page, an
    old system's ISO 8859-1 locale: here ``PYTHONIOENCODING``), ``data info`` ended in a
    UnicodeEncodeError traceback; the name is now written escaped (``\\xfc``) and the table whole."""
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    (data / "dots").rename(data / "Prüfung")
    (data / "stripes").rename(data / "角度")
    for encoding in ("ascii", "latin-1"):
        env = {**os.environ, "PYTHONIOENCODING": encoding}
        proc = subprocess.run([sys.executable, "-m", "diffqc.cli", "data", "info", str(data)],
                              capture_output=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        out = proc.stdout.decode(encoding)
        assert ("Pr\\xfcfung" if encoding == "ascii" else "Prüfung") in out, out
        assert "\\u89d2\\u5ea6" in out, out


def test_heatmaps_draw_a_12_bit_cameras_part_as_the_model_reads_it(mono12_model: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    """A 12-bit camera's parts, trained with the gain train names (backbone.input_gain), were
    drawn in their heat maps as read, nearly black: the reviewer saw no part. They are drawn as
    the model reads them, for `inspect --heatmaps` and `test`'s heat maps alike."""
    model, data = mono12_model
    hm = tmp_path / "hm"
    assert main(["inspect", str(model), str(data / "dots" / "test" / "blob"), "--feature-type", "dots",
                 "--heatmaps", str(hm)]) == 0
    drawn = sorted(hm.glob("*.png"))
    bright = [drawn_part_brightness(p) for p in drawn]
    assert drawn and min(bright) > 100, bright
    labelled = tmp_path / "data"  # two defects among dots' GOOD test parts: flagged, so drawn
    shutil.copytree(data, labelled)
    for blob in sorted((labelled / "dots" / "test" / "blob").glob("*.png"))[:2]:
        blob.rename(labelled / "dots" / "test" / "good" / f"mislabelled_{blob.name}")
    assert main(["test", str(model), str(labelled), "--heatmaps", str(tmp_path / "held"), "-q"]) == 0
    tested = sorted((tmp_path / "held" / "flagged").rglob("*.png"))
    bright = [drawn_part_brightness(p) for p in tested]
    assert tested and min(bright) > 100, bright


def test_inspect_names_8_bit_parts_of_a_model_trained_on_12_bit_data(
        mono12_model: tuple[Path, Path], clear_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A camera set back to Mono8 under a model of its 12-bit parts: every part REJECT, said."""
    model, _ = mono12_model
    good = sorted((clear_dataset / "dots" / "test" / "good").glob("*.png"))[:2]  # 8-bit, as Mono8 gives
    assert main(["inspect", str(model), *map(str, good), "--feature-type", "dots"]) == 0
    err = capsys.readouterr().err
    assert "far brighter than its training images (mean brightness" in err
    assert err.count("far brighter") == 1  # once per type


def _help_sections(command: str) -> dict[str, list[str]]:
    """``diffqc COMMAND --help``'s options by the section they are listed under."""
    from diffqc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    sections: dict[str, list[str]] = {}
    title = ""
    for line in sub.format_help().splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
        elif line.startswith("  -"):
            sections.setdefault(title, []).append(line.split()[0].rstrip(","))
    return sections


def test_serve_and_watch_help_lists_their_options_by_subject() -> None:
    """`diffqc serve --help` listed 59 options in one run of 239 lines (the API's address and
    token beside the MQTT client certificate and the ring buffer's size): a first user looking
    for where the images are kept or how to push to a MES read it all. Each option is listed
    under its subject; only -h is left under "options"."""
    for command, subjects in (("serve", ("where it listens and who may call", "results and what is kept",
                                         "inspection", "the line", "pushing decisions", "log")),
                              ("watch", ("the folder", "results and what is kept", "inspection", "the line",
                                         "pushing decisions", "log"))):
        sections = _help_sections(command)
        assert sections.pop("options") == ["-h"], command
        assert set(sections) == set(subjects), (command, sorted(sections))
        assert all(sections.values())
    serve = _help_sections("serve")
    assert "--keep-images" in serve["results and what is kept"]
    assert {"--mqtt", "--webhook", "--opcua"} <= set(serve["pushing decisions"])
    assert {"--host", "--token", "--tls-cert"} <= set(serve["where it listens and who may call"])


def test_train_on_parts_of_several_types_says_what_the_levels_mean_for_a_part(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new line has GOOD parts only, so no `diffqc test` measures its parts before it runs; its
    manifest names each part's crops of every type. Trained at the default levels per image, a
    GOOD part of k types is flagged up to k times as often (8 types: 33 % of GOOD parts measured
    on the synthetic set): `train` says it (fit's warning) before it reads an image, with the
    levels that keep the defaults' shares per part, and nothing where it is given them."""
    rows = ["path,feature_type,label,part_id"]
    for t in ("dots", "stripes"):
        rows += [f"{p},{t},good,{p.stem.replace(t, 'part')}"
                 for p in sorted((clear_dataset / t / "train" / "good").iterdir())]
    manifest = tmp_path / "parts.csv"
    manifest.write_text("\n".join(rows) + "\n")
    fit = ["-q", "--method", "padim", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"]
    assert main(["train", str(manifest), "--out", str(tmp_path / "m"), *fit]) == 0
    err = capsys.readouterr().err
    assert ("diffqc: warning: the training data names parts seen as images of 2 types (its part_id), and a "
            "part is judged by the worst of its images: A GOOD part of 2 types is flagged when any of its "
            "images is: at α_review = 0.05 per image, in at most 2 × 0.05 = 10 % of GOOD parts") in err, err
    assert ("for the defaults' shares (0.05 flagged, 0.01 rejected), train with `--set "
            "calibration.alpha_review=0.025 --set calibration.alpha_reject=0.005` (in Python") in err, err
    assert err.count("names parts seen as images") == 1, err
    levels = ["--set", "calibration.alpha_review=0.025", "--set", "calibration.alpha_reject=0.005"]
    assert main(["train", str(manifest), "--out", str(tmp_path / "m2"), *fit, *levels]) == 0
    assert "names parts seen as images" not in capsys.readouterr().err
    # parts of one type each: nothing to say
    manifest.write_text("\n".join(r.replace(",part_", ",p_") if ",stripes," in r else r for r in rows) + "\n")
    assert main(["train", str(manifest), "--out", str(tmp_path / "m3"), *fit]) == 0
    assert "names parts seen as images" not in capsys.readouterr().err


def test_data_synth_at_a_size_too_small_for_every_defect_is_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``data synth --size 40`` (the parser took 32 to 4096) stopped half-way with a traceback,
    "could not place a void defect on dist6 #17", leaving a half-written set: a size too small
    for every defect is refused before any file is written."""
    out = tmp_path / "d"
    assert main(["data", "synth", str(out), "--parts", "400", "--size", "40", "-q"]) == 1
    err = capsys.readouterr().err
    assert "diffqc: error: data synth: --size must be from 64 to 4096, got 40" in err, err
    assert not out.exists()


def test_train_with_the_separation_loss_says_no_torch_warning(clear_dataset: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``train --steps 5 --set train.separation_weight=0.5`` showed PyTorch's "Converting a tensor
    with requires_grad=True to a scalar" as a two-line ``diffqc: warning``, about diffqc's own
    bookkeeping: nothing the user could act on."""
    rc = main(["train", str(clear_dataset), "--out", str(tmp_path / "m"), "-q", "--method", "diffusion",
               "--steps", "5", "--set", "backbone.input_size=64", "--set", "diffusion.hidden=32",
               "--set", "train.separation_weight=0.5", "--set", "calibration.fraction=0.35"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "requires_grad" not in err, err


def test_inspect_folder_reads_a_linked_camera_share_once(tiny_model: Path, clear_dataset: Path,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``inspect DIR`` with a camera's share linked into DIR never inspected the share's images,
    and said nothing; a link back to DIR itself is not read twice."""
    share = tmp_path / "share"
    shutil.copytree(clear_dataset / "dots" / "test" / "blob", share)
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(sorted(share.iterdir())[0], folder / "local.png")
    (folder / "camera1").symlink_to(share, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert main(["inspect", str(tiny_model), str(folder), "--feature-type", "dots"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = sorted(Path(r["path"]).relative_to(folder).as_posix() for r in rows)
    assert names == ["camera1/" + p.name for p in sorted(share.iterdir())] + ["local.png"]


def test_train_refuses_the_plain_network_without_training_steps(clear_dataset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``train --set diffusion.prior=none`` (docs/METHOD.md: "trains the plain network") without
    ``--steps`` trained nothing and saved a model that scored every part with an untrained, random
    network (mean AUROC 0.37, recall 0 on the synthetic set), without a word. Refused before any
    image is read, naming ``--steps``; with ``--steps`` it trains."""
    out = tmp_path / "m"
    tiny = ["-q", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35",
            "--set", "diffusion.prior=none", "--set", "diffusion.hidden=16"]
    assert main(["train", str(clear_dataset), "--out", str(out), *tiny]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffqc: error: diffusion.prior=none"), err
    assert "--steps N" in err and err.count("\n") == 1, err
    assert not out.exists()
    assert main(["train", str(clear_dataset), "--out", str(out), *tiny, "--steps", "5"]) == 0


def test_train_names_the_settings_given_that_change_nothing(clear_dataset: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``train --method padim --steps 10 --set scoring.heat_map=fused`` trained the PaDiM model it
    trains without them (the same weights), and config.json recorded them as if used; so did
    ``--set train.lr=...`` without ``--steps`` (the network is not trained) and ``--set
    tiling.scale=...`` without ``--tile``. `train` names each such setting given, before it trains."""
    tiny = ["-q", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35"]
    assert main(["train", str(clear_dataset), "--out", str(tmp_path / "p"), *tiny, "--method", "padim",
                 "--set", "padim.dims=8", "--steps", "10", "--set", "scoring.heat_map=fused",
                 "--set", "scoring.smooth_sigma=2", "--set", "tiling.scale=0.5"]) == 0
    err = capsys.readouterr().err
    assert ("diffqc: warning: settings given that change nothing, recorded in config.json all the same: "
            "train.steps and scoring.heat_map (not used by method=padim), tiling.scale "
            "(tiling.mode=off: --tile cuts large images into tiles)\n") in err, err
    assert main(["train", str(clear_dataset), "--out", str(tmp_path / "g"), *tiny,
                 "--set", "train.lr=1e-5", "--set", "diffusion.context=ring"]) == 0
    err = capsys.readouterr().err
    assert ("diffqc: warning: settings given that change nothing, recorded in config.json all the same: "
            "train.lr and diffusion.context (train.steps=0: the network is not trained, --steps N "
            "trains it)\n") in err, err
    assert main(["train", str(clear_dataset), "--out", str(tmp_path / "t"), *tiny, "--steps", "3",
                 "--set", "train.lr=1e-5", "--set", "diffusion.hidden=16"]) == 0
    assert "change nothing" not in capsys.readouterr().err


def test_layers_named_with_spaces_after_the_commas_are_the_layers() -> None:
    """``--layers "features.6, features.13"`` (as a person writes a list) asked the backbone for
    the layer ' features.13', with its space, which no network has."""
    from diffqc.commands import model_overrides

    args = argparse.Namespace(layers="features.6, features.13 ,")
    assert model_overrides(args)["backbone.layers"] == ["features.6", "features.13"]
