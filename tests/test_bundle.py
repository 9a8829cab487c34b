"""The bundle's folder: a retrain into it keeps the bundle it replaces, and ``train --undo``."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from diffqc.bundle import named_model_id, undo_retrain
from diffqc.cli import main
from diffqc.errors import BundleError, ConfigError, OutputError
from diffqc.model import Detector
from diffqc.recalibrate import recalibrate, undo_recalibration

from .conftest import full_disk


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _own(tree: dict[str, bytes]) -> dict[str, bytes]:
    """A bundle folder's tree without its previous/ folder."""
    return {k: v for k, v in tree.items() if not k.startswith("previous/")}


def _retrained(tiny_model: Path, model_id: str) -> Detector:
    """The tiny model as a retrain gives another (its metadata names another model)."""
    det = Detector.load(tiny_model, device="cpu")
    det.metadata = {**det.metadata, "model_id": model_id}
    return det


def test_a_retrain_keeps_the_bundle_it_replaces_and_undo_puts_it_back(tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """A retrain into the folder a service serves (`train --out SERVED`) replaced the bundle
    there: one trained on the wrong folder, or on a GOOD set with defects in it, left the line on
    the worse model and the one before gone (retrained, where its images were still at hand, it
    is another model: other weights, other scores). The bundle replaced is kept whole in
    previous/ (its weights by a hard link: no copy), with the calibration its last `calibrate`
    replaced; `undo_retrain` (`train --undo`) puts it back, keeping the one it replaces there, so
    a second undo redoes it. One is kept: a third save drops the first."""
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    assert not (out / "previous").exists()  # nothing replaced
    recalibrate(out, alpha_review=0.1)  # the first model's calibration history: calibration.prev.json
    first = _tree(out)
    assert "calibration.prev.json" in first
    weights_inode = (out / "weights.safetensors").stat().st_ino

    mask = os.umask(0o022)
    try:
        _retrained(tiny_model, "second").save(out)
    finally:
        os.umask(mask)
    assert named_model_id(out) == "second" and named_model_id(out / "previous") == "first"
    # as the umask says, as the bundle's own folder: a service or operator of another user reads it
    assert stat.S_IMODE((out / "previous").stat().st_mode) == 0o755
    assert _own(_tree(out / "previous")) == first  # whole, its calibration history too
    assert (out / "previous" / "weights.safetensors").stat().st_ino == weights_inode
    assert not (out / "calibration.prev.json").exists()  # the first model's, not the second's
    with pytest.raises(ConfigError, match="not recalibrated since it was trained"):
        undo_recalibration(out)
    second = _own(_tree(out))
    Detector.load(out / "previous", device="cpu")  # a bundle: `diffqc test MODEL/previous DATA`

    summary = undo_retrain(out)
    assert summary["model_id"] == "first"
    assert summary["previous"] == {"folder": str(out / "previous"), "model_id": "second"}
    assert _own(_tree(out)) == first and _own(_tree(out / "previous")) == second
    Detector.load(out, device="cpu")
    assert undo_recalibration(out)["alpha_review"] == 0.05  # its own history is back with it

    undo_retrain(out)  # redone
    assert _own(_tree(out)) == second and named_model_id(out / "previous") == "first"

    _retrained(tiny_model, "third").save(out)
    assert named_model_id(out / "previous") == "second"  # one kept, the last replaced
    assert sorted(p.name for p in out.iterdir()) == sorted([*second, "previous"])  # nothing left over


def test_undo_retrain_refuses_without_a_previous_or_a_damaged_one(tiny_model: Path, tmp_path: Path) -> None:
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    with pytest.raises(ConfigError, match="keeps no previous model to put back"):
        undo_retrain(out)
    _retrained(tiny_model, "second").save(out)
    weights = out / "previous" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()  # a hard link: written in place, it would damage the served bundle's too
    weights.write_bytes(bytes(data))
    before = _tree(out)
    with pytest.raises(BundleError, match=r"previous: weights\.safetensors is damaged"):
        undo_retrain(out)
    assert _tree(out) == before


def test_undo_retrain_on_a_read_only_volume_names_the_bundle(tiny_model: Path, tmp_path: Path) -> None:
    """`train --undo` on a bundle mounted read-only said "MODEL/.diffqc-partial-k3x9: Permission
    denied" (or Read-only file system), a temporary folder the user never made. It names the
    bundle's folder and why, and nothing changes."""
    import subprocess
    import sys

    from .conftest import run_with_mount

    volume, mounted = tmp_path / "volume", tmp_path / "models"
    _retrained(tiny_model, "first").save(volume)
    _retrained(tiny_model, "second").save(volume)
    mounted.mkdir()
    before = _tree(volume)
    proc: subprocess.CompletedProcess[str] = run_with_mount(
        volume, mounted, [sys.executable, "-m", "diffqc.cli", "train", "--undo", "--out", str(mounted)],
        read_only=True)
    assert proc.returncode == 1
    assert f"cannot write {mounted / 'metadata.json'}: Read-only file system" in proc.stderr, proc.stderr
    assert ".diffqc-partial" not in proc.stderr and _tree(volume) == before


def test_a_save_refuses_a_previous_folder_that_is_not_one_it_kept(tiny_model: Path, tmp_path: Path) -> None:
    """previous/ holding the user's own files (a folder of that name made by hand) is never
    emptied: the save is refused, nothing written, and says what to do."""
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    (out / "previous").mkdir()
    (out / "previous" / "notes.txt").write_text("the operator's")
    before = _tree(out)
    with pytest.raises(OutputError, match=r"previous is not a bundle diffqc kept as it was \(it holds "
                       r"notes\.txt; a save .* move it away"):
        _retrained(tiny_model, "second").save(out)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*_own(before), "previous"])


def test_a_full_disk_on_a_retrain_changes_nothing_the_previous_included(tiny_model: Path,
                                                                         tmp_path: Path) -> None:
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    _retrained(tiny_model, "second").save(out)
    before = _tree(out)
    with full_disk(64 * 1024), pytest.raises(OutputError, match=str(out)):
        _retrained(tiny_model, "third").save(out)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*_own(before), "previous"])


def test_cli_train_says_what_it_kept_and_undo_puts_it_back(clear_dataset: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    args = ["train", str(clear_dataset), "--out", str(out), "-q", "--set", "backbone.input_size=64",
            "--set", "calibration.fraction=0.35", "--set", "train.steps=20"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["previous"] is None
    # the bundle's size, what a copy to an edge box takes (previous/ aside)
    assert summary["bundle_mb"] == round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1) > 0
    first = named_model_id(out)
    shutil.copytree(out, tmp_path / "first")
    assert main(args) == 0
    done = capsys.readouterr()
    assert json.loads(done.out.splitlines()[-1])["previous"] == {"folder": str(out / "previous"),
                                                                  "model_id": first}
    assert f"the model it replaces ({first}) is kept in {out / 'previous'} (" in done.err
    assert f"`diffqc train --undo --out {out}` puts it back" in done.err

    assert main(["train", "--undo", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == first
    assert _own(_tree(out)) == _tree(tmp_path / "first")
    # refused: DATA with --undo (which puts a model back, it trains none), and a train without DATA
    assert main(["train", str(clear_dataset), "--undo", "--out", str(out)]) == 1
    assert "give it without DATA" in capsys.readouterr().err
    assert main(["train", "--undo", "--out", str(out), "--steps", "0", "--set", "train.seed=1"]) == 1
    assert "give it without --steps and --set (diffqc train --undo --out" in capsys.readouterr().err
    assert main(["train", "--out", str(out)]) == 1
    assert "train needs DATA" in capsys.readouterr().err


def test_a_bundle_left_mixed_by_a_save_cut_short_is_not_kept_over_the_whole_one(tiny_model: Path,
                                                                                tmp_path: Path) -> None:
    """A save cut short between its moves (a power cut) leaves another bundle's weights beside
    the metadata that names the first's; a retrain then kept that mix in previous/ in place of
    the whole bundle kept there. The mix is said and not kept; previous/ keeps the whole one."""
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    _retrained(tiny_model, "second").save(out)
    weights = out / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # another bundle's weights, moved in before its metadata.json
    weights.unlink()
    weights.write_bytes(bytes(data))
    kept = _tree(out / "previous")
    with pytest.warns(UserWarning, match=r"no whole bundle .*weights\.safetensors is damaged.*not kept"):
        _retrained(tiny_model, "third").save(out)
    assert _tree(out / "previous") == kept and named_model_id(out) == "third"
    Detector.load(out, device="cpu")


def test_an_undo_cut_short_between_its_moves_loses_neither_bundle(tiny_model: Path, tmp_path: Path) -> None:
    """`train --undo` cut short between its moves (Ctrl-C, a power cut; here a move the file
    system refuses) dropped the bundle it was putting back: its files were in previous/, set
    aside and deleted before the moves, and in the staging folder, deleted on the way out. The
    bundle set aside is dropped only once the moves are done: cut short, it stays whole in a
    hidden folder the next save names, and the one it replaces in previous/."""
    from diffqc.output import PARTIAL_PREFIX

    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    recalibrate(out, alpha_review=0.1)  # the first's calibration history, kept with it
    _retrained(tiny_model, "second").save(out)
    first = _tree(out / "previous")
    # a move onto it fails: after the weights, config.json and calibration.json, before metadata.json
    (out / "calibration.prev.json").mkdir()
    (out / "calibration.prev.json" / "x").write_text("")
    with pytest.raises(OSError):
        undo_retrain(out)
    assert named_model_id(out / "previous") == "second"
    left = [p for p in out.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert len(left) == 1 and _tree(left[0] / "previous") == first
    # the next save, once the leftover is old enough not to be a save running now, names what it holds
    hour_ago = time.time() - 3600
    os.utime(left[0], (hour_ago, hour_ago))
    shutil.rmtree(out / "calibration.prev.json")
    with pytest.warns(UserWarning, match=rf"holding the model first whole: its files are in "
                                         rf"{re.escape(str(left[0] / 'previous'))}\).*left by a save"):
        _retrained(tiny_model, "third").save(out)
    assert _tree(left[0] / "previous") == first  # named, not deleted


def _next_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


def test_a_bundle_a_newer_diffqc_wrote_is_refused_as_newer_not_as_damaged(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model trained on a workstation with a newer diffqc, copied to an edge box that runs an
    older one: a setting the box's diffqc does not know is that version's, not damage, and the
    user is told to upgrade the box (or train with its version), not that the bundle is broken."""
    from diffqc import __version__

    newer = _next_minor(__version__)
    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    (bundle / "metadata.json").write_text(json.dumps({**meta, "diffqc_version": newer}))
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "scoring": {**config["scoring"], "future": 1}}))
    said = (rf"model bundle {re.escape(str(bundle))} was written by diffqc {re.escape(newer)}, newer than "
            rf"this diffqc {re.escape(__version__)}: its config\.json has a setting this diffqc does not "
            rf"know \(scoring\.future\); upgrade diffqc here to {re.escape(newer)} or later")
    with pytest.raises(BundleError, match=said) as err:
        Detector.load(bundle, device="cpu")
    assert "damaged" not in str(err.value) and "did you mean" not in str(err.value)
    assert main(["inspect", str(bundle), str(clear_dataset / "dots" / "test" / "good")]) == 1
    assert re.search(said, capsys.readouterr().err)

    (bundle / "config.json").write_text(json.dumps(config))  # a calibration setting it does not know
    calibration = json.loads((bundle / "calibration.json").read_text())
    calibration["config"]["future"] = 0.5
    (bundle / "calibration.json").write_text(json.dumps(calibration))
    said = rf"by diffqc {re.escape(newer)}, newer .*: its calibration\.json has a setting this diffqc"
    with pytest.raises(BundleError, match=rf"{said} does not know \(calibration\.future\); upgrade"):
        Detector.load(bundle, device="cpu")

    # the same setting in a bundle this diffqc's own version wrote is a hand edit: damaged, as before
    (bundle / "metadata.json").write_text(json.dumps(meta))
    (bundle / "calibration.json").write_text((tiny_model / "calibration.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "scoring": {**config["scoring"], "topkk": 1}}))
    with pytest.raises(BundleError, match=r"config\.json is damaged .*unknown config field 'scoring\.topkk'; "
                                          r"did you mean scoring\.topk"):
        Detector.load(bundle, device="cpu")


def test_a_retrain_names_the_settings_of_the_model_it_replaces_that_it_does_not_give(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A week after the first training (letterboxed images, `--fit pad`) and a recalibration at
    other levels (`calibrate --alpha-review 0.1`), the same `train` command without them retrained
    the served model at the defaults (squashed images, α 0.05), without a word: the line decided at
    other levels than the ones chosen for it. A retrain names each setting of the model it replaces
    that it does not give, before it trains, with the options that keep them."""
    out = tmp_path / "m"
    tiny = ["-q", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35", "--steps", "0"]
    assert main(["train", str(clear_dataset), "--out", str(out), "--fit", "pad", *tiny]) == 0
    assert main(["calibrate", str(out), "--alpha-review", "0.1", "-q"]) == 0
    capsys.readouterr()
    assert main(["train", str(clear_dataset), "--out", str(out), *tiny]) == 0
    done = capsys.readouterr()
    text = done.err
    assert (f"diffqc: warning: {out} holds a model trained with settings this train does not give: "
            "backbone.resize pad (this train: squash), calibration.alpha_review 0.1 (this train: 0.05); "
            "the new model is trained with this train's (to keep those, give --set backbone.resize=pad --set "
            "calibration.alpha_review=0.1); the model replaced is kept in") in text, text
    assert text.count("settings this train does not give") == 1, text  # before it trains, not at its save
    assert json.loads(done.out.splitlines()[-1])["model"] == str(out)  # trained all the same
    assert json.loads((out / "config.json").read_text())["backbone"]["resize"] == "squash"
    # the settings given again: nothing to say
    assert main(["train", str(clear_dataset), "--out", str(out), *tiny]) == 0
    assert "settings this train does not give" not in capsys.readouterr().err


def test_a_save_over_a_model_names_the_settings_it_drops_as_train_does(tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """A notebook's retrain (the README's `Detector(DetectorConfig()).fit(...).save("model/")`
    run again a week later) into a folder whose model was recalibrated at other levels: said, as
    `train` says it (the command line says a text once: not twice)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    recalibrate(model, alpha_review=0.1)
    det = Detector.load(tiny_model, device="cpu")
    with pytest.warns(UserWarning, match=r"holds a model trained with settings this train does not give: "
                                         r"calibration\.alpha_review 0\.1 \(this train: 0\.05\)"):
        det.save(model)
    assert json.loads((model / "config.json").read_text())["calibration"]["alpha_review"] == 0.05


def test_a_retrain_that_leaves_out_a_type_of_the_model_it_replaces_says_so_before_it_trains(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A retrain given a folder that lacks one of the line's types (a type's folder left out, a
    copy cut short) trained a model without it, without a word until a service serving it refused
    the line's parts of that type: `train` says so before it trains, with the model kept to undo."""
    out = tmp_path / "m"
    tiny = ["-q", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35", "--steps", "0"]
    assert main(["train", str(clear_dataset), "--out", str(out), *tiny]) == 0
    capsys.readouterr()
    assert main(["train", str(clear_dataset / "dots"), "--out", str(out), *tiny]) == 0
    err = capsys.readouterr().err
    assert (f"diffqc: warning: {out} holds a model that knows stripes, a type this train has no GOOD images "
            "of: the new model does not know it, and a service serving it refuses its parts (was its folder "
            "left out of DATA?); the model replaced is kept in") in err, err
    assert json.loads((out / "metadata.json").read_text())["classes"] == ["dots"]  # trained as given


def test_a_bundle_whose_json_files_carry_a_byte_order_mark_loads(tiny_model: Path, tmp_path: Path) -> None:
    """config.json, metadata.json or calibration.json edited in Windows Notepad (or written by
    PowerShell) start with a UTF-8 byte order mark: the bundle was refused as damaged, and a
    folder whose metadata.json had one was not a bundle at all (a train into it refused as "not a
    diffqc model bundle"). Read as the same JSON, by the detector and the runtimes alike."""
    from diffqc.bundle import is_bundle, read_bundle
    from diffqc.runtime import load_detector

    bundle = tmp_path / "b"
    shutil.copytree(tiny_model, bundle)
    for name in ("config.json", "metadata.json", "calibration.json"):
        (bundle / name).write_bytes(b"\xef\xbb\xbf" + (tiny_model / name).read_bytes())
    assert is_bundle(bundle)
    _, meta, _ = read_bundle(bundle)
    assert meta == json.loads((tiny_model / "metadata.json").read_text())
    assert named_model_id(bundle) == meta["model_id"]
    loaded = Detector.load(bundle, device="cpu")
    assert loaded.calibration_ is not None
    assert load_detector(bundle, runtime="torch").calibration_ is not None


def _tiny_graph(path: Path) -> Path:
    """A small ONNX backbone: two convolution taps, ``f8`` and ``f16``."""
    import torch

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1))
    b = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 2, 1))

    class Taps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f8 = self.a(x)
            return f8, self.b(f8)

    torch.onnx.export(Taps().eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["f8", "f16"], dynamic_axes={"x": {0: "n"}})
    return path


def test_a_retrain_with_the_same_onnx_backbone_by_a_relative_path_names_no_setting(
        clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same `train --backbone onnx:tiny.onnx` run again in the same folder warned that the
    model it replaces was trained with other settings, "backbone.name onnx:/.../tiny.onnx (this
    train: onnx:tiny.onnx)", and offered to keep the path it was already given: the fit records
    the graph's absolute path. The path is compared as the fit records it; another graph is named."""
    (tmp_path / "work").mkdir()
    _tiny_graph(tmp_path / "work" / "tiny.onnx")
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "m"
    args = ["train", str(clear_dataset), "--out", str(out), "-q", "--method", "padim",
            "--set", "padim.dims=8", "--set", "backbone.input_size=64", "--set", "calibration.fraction=0.35",
            "--layers", "f8,f16"]
    assert main([*args, "--backbone", "onnx:tiny.onnx"]) == 0
    capsys.readouterr()
    assert main([*args, "--backbone", "onnx:tiny.onnx"]) == 0
    assert "settings this train does not give" not in capsys.readouterr().err
    assert main([*args, "--backbone", f"onnx:{tmp_path / 'work' / 'tiny.onnx'}"]) == 0
    assert "settings this train does not give" not in capsys.readouterr().err
    shutil.copy(tmp_path / "work" / "tiny.onnx", tmp_path / "work" / "other.onnx")
    assert main([*args, "--backbone", "onnx:other.onnx"]) == 0
    assert (f"backbone.name onnx:{tmp_path / 'work' / 'tiny.onnx'} (this train: onnx:other.onnx)"
            in capsys.readouterr().err)


def test_a_save_cut_short_between_its_moves_says_how_to_put_the_model_back(tiny_model: Path,
                                                                           tmp_path: Path) -> None:
    """A retrain cut short as its files were moved in (Ctrl-C, or a move the file system refuses:
    here a folder where the save drops calibration.prev.json) left the new weights beside the old
    metadata.json, a model that loads as damaged, and said only "interrupted" (or the move's
    error): the folder is named as incomplete, with the command that puts the model back."""
    out = _retrained(tiny_model, "first").save(tmp_path / "m")
    first = _tree(out)
    (out / "calibration.prev.json").mkdir()  # moved onto after the weights, config.json and calibration.json
    (out / "calibration.prev.json" / "x").write_text("")
    second = _retrained(tiny_model, "second")
    second.extractor.feat_mean.add_(1.0)  # another model's weights
    where = re.escape(str(out))
    with pytest.warns(UserWarning, match=rf"^{where} is incomplete \(cut short as its files were moved in\): "
                                         rf"`diffqc train --undo --out {where}` puts back the model kept in "
                                         rf"{where}/previous$"), pytest.raises(OutputError):
        second.save(out)
    with pytest.raises(BundleError, match="checksum mismatch"):  # the mix the warning names
        Detector.load(out, device="cpu")
    shutil.rmtree(out / "calibration.prev.json")
    with pytest.warns(UserWarning, match="no whole bundle"):  # the mix is not kept over previous/
        undo_retrain(out)
    assert _own(_tree(out)) == first
    Detector.load(out, device="cpu")
