"""The CLI's bad-input table: every row goes through ``diffqc.cli.main([...])`` and must give its
exit code, a clear one-line message (no traceback) and leave every input file as it was.

Each row fails before any training or inference work, so the table runs in seconds."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffqc.cli import main
from diffqc.errors import ConfigError
from tests.conftest import run_with_mount


@dataclass
class Ctx:
    model: Path  # a copy of the tiny model bundle
    data: Path  # a copy of the clear dataset
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    image: Path = field(init=False)

    def __post_init__(self) -> None:
        self.image = next((self.data / "dots" / "test" / "good").iterdir())


@dataclass(frozen=True)
class Row:
    argv: Callable[[Ctx], list[str]]
    messages: tuple[str, ...]  # all must appear in stderr
    code: int = 1
    setup: Callable[[Ctx], None] | None = None
    absent: Callable[[Ctx], Path] | None = None  # a path the command must not have created


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def _every_dots_training_image_broken(c: Ctx) -> None:
    """A copy of the data in which no GOOD training image of one type can be read: with
    --skip-corrupt the model left the type out without a word (the line met it as unknown)."""
    shutil.copytree(c.data, c.tmp / "sk")
    for image in (c.tmp / "sk" / "dots" / "train" / "good").iterdir():
        image.write_bytes(b"not an image")


def _foreign_out(c: Ctx) -> None:
    (c.tmp / "photos").mkdir()
    (c.tmp / "photos" / "holiday.jpg").write_bytes(b"precious")


def _dangling_out(c: Ctx) -> None:
    (c.tmp / "m").symlink_to(c.tmp / "nowhere" / "models")  # a volume's folder not mounted yet


def _manifest(c: Ctx) -> None:
    """c.tmp/manifest.csv listing the dataset's dots images by absolute path."""
    rows = ["path,feature_type,label"]
    rows += [f"{p},dots,good" for p in sorted((c.data / "dots" / "train" / "good").iterdir())]
    (c.tmp / "manifest.csv").write_text("\n".join(rows) + "\n")


def _labelled(c: Ctx) -> None:
    """c.tmp/lf: the dataset's dots as labelled folders (``dots/good``, ``dots/blob``)."""
    shutil.copytree(c.data / "dots" / "train" / "good", c.tmp / "lf" / "dots" / "good")
    shutil.copytree(c.data / "dots" / "test" / "blob", c.tmp / "lf" / "dots" / "blob")


def _foreign_report(c: Ctx) -> None:
    _foreign_out(c)
    (c.tmp / "photos" / "report.md").write_text("the line's own report")


def _tls(c: Ctx, *, other_key: bool = False, encrypted: bool = False) -> None:
    """c.tmp/cert.pem and c.tmp/key.pem: a certificate and its key, or another certificate's
    key, or its key encrypted with a passphrase (as `openssl genrsa -aes256` writes one)."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(c.tmp / "cert.pem"))
    key = (ca.issue_cert("localhost") if other_key else issued).private_key_pem
    if encrypted:
        loaded = serialization.load_pem_private_key(key.bytes(), password=None)
        (c.tmp / "key.pem").write_bytes(loaded.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
    else:
        key.write_to_path(str(c.tmp / "key.pem"))


def _serve(*tls: str) -> Callable[[Ctx], list[str]]:
    """`serve` with a token, a store in c.tmp and the TLS options given (c.tmp's files)."""
    return lambda c: ["serve", str(c.model), "--token", "t" * 32, "--db", str(c.tmp / "r.db"),
                      *[str(c.tmp / a) if a.endswith(".pem") else a for a in tls]]


def _empty_store(path: Path) -> None:
    from diffqc.service.store import ResultStore

    ResultStore(str(path)).close()


def _one_part_type(c: Ctx) -> None:
    root = c.tmp / "small"
    for i in range(3):
        _png(root / "a" / "train" / "good" / f"{i}.png", 100 + i)
    _png(root / "b" / "train" / "good" / "0.png")  # one GOOD part: nothing left to calibrate on
    _png(root / "c" / "test" / "good" / "0.png")  # test images only
    _png(root / "c" / "test" / "scratch" / "0.png", 20)


def _edit_meta(key: str, value: object) -> Callable[[Ctx], None]:
    def edit(c: Ctx) -> None:
        meta = json.loads((c.model / "metadata.json").read_text())
        meta[key] = value
        (c.model / "metadata.json").write_text(json.dumps(meta))
    return edit


def _damage_calibration(c: Ctx) -> None:
    (c.model / "calibration.json").write_text('{"config": {}, "known": {"dots": [1.0], "stri')


def _no_onnx(c: Ctx) -> None:
    c.monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError


def _no_onnxruntime(c: Ctx) -> None:
    c.monkeypatch.setitem(sys.modules, "onnxruntime", None)


def _cuda_row(row: Row) -> Any:
    return pytest.param(row, marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                      reason="CUDA is available here"))


def _train(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["train", str(c.data), "--out", str(c.tmp / "m"), "-q", *extra]


ROWS: dict[str, Row | object] = {
    # data loss
    "train_out_foreign_folder": Row(lambda c: ["train", str(c.data), "--out", str(c.tmp / "photos")],
                                    ("is not empty and is not a diffqc model bundle", "--force"),
                                    setup=_foreign_out),
    # refused before the training, not after it (it trained, then said "Not a directory")
    "train_out_dangling_link": Row(_train(), ("cannot write the model bundle to", "is a link to",
                                              "nowhere/models, which does not exist"), setup=_dangling_out),
    "evaluate_out_dangling_link": Row(lambda c: ["evaluate", str(c.data), "--out", str(c.tmp / "m")],
                                      ("cannot write the report to", "which does not exist"),
                                      setup=_dangling_out),
    "train_out_is_data": Row(lambda c: ["train", str(c.data), "--out", str(c.data)], ("overlap",)),
    "train_out_inside_data": Row(lambda c: ["train", str(c.data), "--out", str(c.data / "model")],
                                 ("overlap",), absent=lambda c: c.data / "model"),
    "train_data_inside_out": Row(lambda c: ["train", str(c.data / "dots"), "--out", str(c.data)],
                                 ("overlap",)),
    "train_out_is_a_file": Row(lambda c: ["train", str(c.data), "--out", str(c.image)],
                               ("overlap",)),
    "train_manifest_out_holds_its_images": Row(
        lambda c: ["train", str(c.tmp / "manifest.csv"), "--out", str(c.data / "dots")],
        ("overlap", "would lie inside the model folder"), setup=_manifest),
    "train_manifest_out_holds_the_manifest": Row(
        lambda c: ["train", str(c.tmp / "manifest.csv"), "--out", str(c.tmp)],
        ("overlap", "manifest.csv would lie inside"), setup=_manifest),
    "evaluate_out_foreign_folder": Row(
        lambda c: ["evaluate", str(c.data), "--out", str(c.tmp / "photos")],
        ("is not empty and holds no diffqc report", "--force"), setup=_foreign_out),
    "evaluate_force_never_replaces": Row(
        lambda c: ["evaluate", str(c.data), "--out", str(c.tmp / "photos"), "--force"],
        ("already holds report.md", "never replaces"), setup=_foreign_report),
    # config validation
    "set_steps_abc": Row(_train("--set", "train.steps=abc"), ("train.steps must be an integer, got 'abc'",)),
    "set_t_max_beyond_T": Row(_train("--set", "train.t_max=1000"),
                              ("train.t_max must be < diffusion.timesteps (1000)",)),
    "set_topk_2": Row(_train("--set", "scoring.topk=2"), ("scoring.topk must be in (0, 1]",)),
    "set_tail_exp": Row(_train("--set", "calibration.tail=exp"),
                        ("calibration.tail must be one of exponential, none; got 'exp'",)),
    "set_schedule_foo": Row(_train("--set", "diffusion.schedule=foo"),
                            ("diffusion.schedule must be one of cosine, linear",)),
    "set_unknown_key": Row(_train("--set", "train.step=5"), ("did you mean train.steps",)),
    "set_removed_key": Row(_train("--set", "scoring.bank_timesteps=[100,1000]"),
                           ("unknown config field 'scoring.bank_timesteps'",)),
    "set_negative_seed": Row(_train("--seed", "-1"), ("train.seed must be >= 0, got -1",)),
    "demo_too_few_parts": Row(lambda c: ["demo", "--parts", "5", "--out", str(c.tmp / "demo"), "-q"],
                              ("demo: --parts must be at least 40 (5 for each of the 8 types: fewer leave a "
                               "type no defective test part to score), got 5",),
                              absent=lambda c: c.tmp / "demo"),
    # --json: a folder, or a user's file (was overwritten, or IsADirectoryError after the whole demo)
    "demo_json_is_a_folder": Row(lambda c: ["demo", "--parts", "40", "--out", str(c.tmp / "demo"), "--json",
                                            str(c.tmp), "-q"], ("is a folder; give a file name",),
                                 absent=lambda c: c.tmp / "demo"),
    "demo_json_is_a_users_file": Row(
        lambda c: ["demo", "--parts", "40", "--out", str(c.tmp / "demo"), "--json", str(c.tmp / "notes.json"),
                   "-q"], ("notes.json exists and is not an earlier demo's table",),
        setup=lambda c: (c.tmp / "notes.json").write_text('{"mine": 1}'), absent=lambda c: c.tmp / "demo"),
    "demo_out_holds_foreign_data": Row(
        lambda c: ["demo", "--parts", "40", "--out", str(c.tmp / "proj"), "-q"],
        ("holds no earlier synthetic dataset", "choose another --out"),
        setup=lambda c: _png(c.tmp / "proj" / "data" / "dots" / "0.png"),
        absent=lambda c: c.tmp / "proj" / "model"),
    "demo_out_holds_foreign_model": Row(
        lambda c: ["demo", "--parts", "40", "--out", str(c.tmp / "proj"), "-q"],
        ("model holds files that are not a diffqc model bundle", "choose another --out"),
        setup=lambda c: _png(c.tmp / "proj" / "model" / "photo.png"),
        absent=lambda c: c.tmp / "proj" / "data"),
    "train_layers_not_blocks": Row(_train("--layers", "foo,bar"),
                                   ("backbone layer 'foo' is not a block of mobilenet-v2: name one as",
                                    "features.6,features.13")),
    "train_layer_beyond_the_backbone": Row(_train("--layers", "6,99"),
                                           ("backbone layer 99 is beyond mobilenet-v2's blocks 0-17",)),
    "set_without_equals": Row(_train("--set", "train.steps"), ("--set expects KEY=VALUE",)),
    # data
    "train_missing_data": Row(lambda c: ["train", str(c.tmp / "nothing"), "--out", str(c.tmp / "m")],
                              ("does not exist",)),
    "evaluate_setting_named_like_a_method": Row(
        lambda c: ["evaluate", str(c.data), "--compare-setting", "padim:train.steps=1", "--out",
                   str(c.tmp / "rep")], ("setting name 'padim' clashes with a method name",),
        absent=lambda c: c.tmp / "rep"),
    # `--compare padim`, argparse's abbreviation of --compare-setting: a method is not a setting
    "evaluate_setting_is_a_method": Row(
        lambda c: ["evaluate", str(c.data), "--compare", "padim", "--out", str(c.tmp / "rep")],
        ("--compare-setting expects NAME:KEY=VALUE[,KEY=VALUE...], got 'padim': methods are compared "
         "with --methods (default diffusion,patchcore,padim)",), absent=lambda c: c.tmp / "rep"),
    "evaluate_setting_malformed": Row(
        lambda c: ["evaluate", str(c.data), "--compare-setting", "x:", "--out", str(c.tmp / "rep")],
        ("--compare-setting expects NAME:KEY=VALUE",), absent=lambda c: c.tmp / "rep"),
    # was said after every feature was extracted (minutes on a real set)
    "evaluate_runtime_not_installed": Row(
        lambda c: ["evaluate", str(c.data), "--runtime", "onnx", "--feature-cache", str(c.tmp / "cache"),
                   "-q"], ("ONNX Runtime is not installed",), setup=_no_onnxruntime,
        absent=lambda c: c.tmp / "cache"),  # no feature was extracted (and cached) first
    "evaluate_nothing": Row(lambda c: ["evaluate", str(c.data), "--methods", "", "--out", str(c.tmp / "rep")],
                            ("nothing to evaluate",), absent=lambda c: c.tmp / "rep"),
    "evaluate_no_type_with_enough_parts": Row(
        lambda c: ["evaluate", str(c.tmp / "small"), "--folds", "4", "--out", str(c.tmp / "rep")],
        ("no feature type has enough labelled parts for 4 folds", "feature type 'a' left out"),
        setup=_one_part_type, absent=lambda c: c.tmp / "rep"),
    "train_type_with_one_part": Row(
        lambda c: ["train", str(c.tmp / "small"), "--out", str(c.tmp / "m"), "-q"],
        ("too few GOOD training parts", "'b' (1)", "c have no GOOD training images"),
        setup=_one_part_type, absent=lambda c: c.tmp / "m"),
    "synth_overwrite_foreign_folder": Row(
        lambda c: ["data", "synth", str(c.tmp / "mine"), "--overwrite", "--parts", "24", "-q"],
        ("holds no earlier synthetic dataset",), setup=lambda c: _png(c.tmp / "mine" / "dots" / "0.png")),
    "synth_too_few_parts": Row(lambda c: ["data", "synth", str(c.tmp / "s"), "--parts", "5", "-q"],
                               ("data synth: --parts must be at least 24 (3 for each of the 8 types), "
                                "got 5",)),
    "synth_too_small": Row(lambda c: ["data", "synth", str(c.tmp / "s"), "--size", "8", "-q"],
                           ("data synth: --size must be from 64 to 4096, got 8",),
                           absent=lambda c: c.tmp / "s"),
    # devices
    "train_device_cuda": _cuda_row(Row(_train("--device", "cuda"), ("CUDA is not available",))),
    "inspect_device_cuda": _cuda_row(Row(lambda c: ["inspect", str(c.model), str(c.image),
                                                    "--device", "cuda"], ("CUDA is not available",))),
    "train_device_bogus": Row(_train("--device", "tpu9"), ("device", "tpu9")),
    # inspect
    "inspect_heatmaps_into_a_file": Row(lambda c: ["inspect", str(c.model), str(c.image), "--heatmaps",
                                                   str(c.image)], ("is a file; give a folder",)),
    # heat maps or a gallery written into a dataset were read back as parts: GOOD ones to train on
    "inspect_heatmaps_into_a_datasets_good_folder": Row(
        lambda c: ["inspect", str(c.model), str(c.image), "--heatmaps",
                   str(c.data / "dots" / "train" / "good")],
        ("--heatmaps", "lies in", "dots/train/good, a folder of a dataset's images",
         "give a folder outside the dataset"),
        absent=lambda c: c.data / "dots" / "train" / "good" / f"{c.image.stem}_heatmap.png"),
    "test_heatmaps_below_a_datasets_defects": Row(
        lambda c: ["test", str(c.model), str(c.data), "--heatmaps",
                   str(c.data / "dots" / "test" / "blob" / "hm")],
        ("dots/test/blob, a folder of a dataset's images",),
        absent=lambda c: c.data / "dots" / "test" / "blob" / "hm"),
    "evaluate_out_in_a_datasets_good_folder": Row(
        lambda c: ["evaluate", str(c.data), "--out", str(c.data / "dots" / "train" / "good" / "rep"), "-q"],
        ("--out", "dots/train/good, a folder of a dataset's images",),
        absent=lambda c: c.data / "dots" / "train" / "good" / "rep"),
    "evaluate_out_in_a_labelled_types_folder": Row(  # read back as a defect kind 'report'
        lambda c: ["evaluate", str(c.tmp / "lf"), "--methods", "padim", "--out",
                   str(c.tmp / "lf" / "dots" / "report"), "-q"],
        ("--out", "lf/dots/report lies in", "lf/dots, a folder of a dataset's images", "as parts"),
        setup=_labelled, absent=lambda c: c.tmp / "lf" / "dots" / "report"),
    "test_heatmaps_in_a_labelled_types_folder": Row(
        lambda c: ["test", str(c.model), str(c.tmp / "lf"), "--heatmaps",
                   str(c.tmp / "lf" / "dots" / "heat")],
        ("--heatmaps", "lf/dots/heat lies in", "lf/dots, a folder of a dataset's images"),
        setup=_labelled, absent=lambda c: c.tmp / "lf" / "dots" / "heat"),
    "inspect_empty_folder": Row(lambda c: ["inspect", str(c.model), str(c.tmp / "empty")],
                                ("no images in",), setup=lambda c: (c.tmp / "empty").mkdir()),
    "inspect_missing_model": Row(lambda c: ["inspect", str(c.tmp / "nomodel"), str(c.image)],
                                 ("does not exist",)),
    "inspect_data_and_model_swapped": Row(lambda c: ["inspect", str(c.data), str(c.model)],
                                          ("is not a diffqc model bundle (it holds none of",
                                           "it comes first")),
    "train_skip_corrupt_would_drop_a_whole_type": Row(
        lambda c: ["train", str(c.tmp / "sk"), "--out", str(c.tmp / "m"), "--skip-corrupt", "-q"],
        ("every GOOD training image of 'dots' is unreadable", "the model would not know the type"),
        setup=_every_dots_training_image_broken, absent=lambda c: c.tmp / "m"),
    "train_on_a_flat_folder_of_images": Row(
        lambda c: ["train", str(c.tmp / "flat"), "--out", str(c.tmp / "m")],
        ("holds 2 images directly: for one type, put GOOD ones in", "flat/good/ (a type named flat) and "
         "defective ones in", "for several, one folder per type", "/<type>/good/"),
        setup=lambda c: [_png(c.tmp / "flat" / f"{i}.png") for i in range(2)]),
    "train_on_type_folders_without_train_good": Row(
        lambda c: ["train", str(c.tmp / "types"), "--out", str(c.tmp / "m")],
        ("holds 1 image directly (and 1 more folder alike): put GOOD ones under", "dots/train/good/"),
        setup=lambda c: [_png(c.tmp / "types" / t / "0.png") for t in ("dots", "edge")]),
    "inspect_unknown_type": Row(lambda c: ["inspect", str(c.model), str(c.image), "--feature-type", "x"],
                                ("unknown feature type 'x'",)),
    "inspect_newer_bundle": Row(lambda c: ["inspect", str(c.model), str(c.image), "--runtime", "torch"],
                                ("written by diffqc 9.0.0", "newer major version"),
                                setup=_edit_meta("diffqc_version", "9.0.0")),
    "inspect_newer_format": Row(lambda c: ["inspect", str(c.model), str(c.image)],
                                ("bundle format 99", "upgrade diffqc"), setup=_edit_meta("format", 99)),
    "inspect_damaged_calibration": Row(lambda c: ["inspect", str(c.model), str(c.image),
                                                  "--runtime", "torch"],
                                       ("calibration.json", "damaged"), setup=_damage_calibration),
    "inspect_int8_on_torch": Row(lambda c: ["inspect", str(c.model), str(c.image), "--runtime", "torch",
                                            "--precision", "int8"], ("INT8 runs on",)),
    # results store
    "results_since_a_phrase": Row(lambda c: ["results", "export", str(c.tmp / "x"), "--db",
                                             str(c.tmp / "r.db"), "--since", "last shift"],
                                  ("since='last shift'", "ISO 8601"), absent=lambda c: c.tmp / "r.db"),
    "results_db_unknown_scheme": Row(lambda c: ["results", "export", str(c.tmp / "x"), "--db",
                                                "mysql://u:pw@host/db"], ("unsupported result store",)),
    # SQLite's own spellings: the store went to /x/r.db, its kept images and heat maps under a
    # folder named "file:" in the working folder (and a lost connection was logged); an in-memory
    # store keeps nothing past the process (each connection its own) and kept files in the cwd
    "watch_db_sqlite_file_uri": Row(
        lambda c: ["watch", str(c.tmp / "cam"), str(c.model), "--once", "--db", f"file:{c.tmp}/r.db"],
        ("is a SQLite URI, which diffqc does not take", "give the path, "),
        setup=lambda c: ((c.tmp / "cam").mkdir(), c.monkeypatch.chdir(c.tmp)),
        absent=lambda c: c.tmp / "file:"),
    "watch_db_in_memory": Row(
        lambda c: ["watch", str(c.tmp / "cam"), str(c.model), "--once", "--db", ":memory:"],
        ("an in-memory SQLite store keeps nothing",),
        setup=lambda c: ((c.tmp / "cam").mkdir(), c.monkeypatch.chdir(c.tmp)),
        absent=lambda c: c.tmp / "heatmaps"),
    "results_db_under_a_file": Row(lambda c: ["results", "export", str(c.tmp / "x"), "--db",
                                              str(c.image / "r.db")], ("r.db does not exist",)),
    # the folder of the store for the store: was "does not exist", which it does
    "results_db_a_folder": Row(lambda c: ["results", "parts", "--db", str(c.tmp / "line")],
                               ("result store", "line is a folder, not a store's file", "line/results.db"),
                               setup=lambda c: _empty_store(c.tmp / "line" / "results.db")),
    # a typo in --db: was an empty new database (and artifact folders) and "exported 0"
    "results_db_typo": Row(lambda c: ["results", "export", str(c.tmp / "x"), "--db", str(c.tmp / "typo.db")],
                           ("result store", "typo.db does not exist: nothing to export"),
                           absent=lambda c: c.tmp / "typo.db"),
    "results_export_into_a_dataset": Row(lambda c: ["results", "export", str(c.data / "dots"), "--db",
                                                    str(c.tmp / "r.db")],
                                         ("holds no earlier `diffqc results export`",),
                                         setup=lambda c: _empty_store(c.tmp / "r.db"),
                                         absent=lambda c: c.data / "dots" / "manifest.csv"),
    "results_export_below_a_datasets_good_folder": Row(
        lambda c: ["results", "export", str(c.data / "dots" / "train" / "good" / "reviewed"), "--db",
                   str(c.tmp / "r.db")],
        ("results export OUT", "dots/train/good, a folder of a dataset's images"),
        setup=lambda c: _empty_store(c.tmp / "r.db"),
        absent=lambda c: c.data / "dots" / "train" / "good" / "reviewed"),
    "synth_below_a_datasets_good_folder": Row(
        lambda c: ["data", "synth", str(c.data / "dots" / "train" / "good" / "syn"), "--parts", "24", "-q"],
        ("dots/train/good, a folder of a dataset's images",),
        absent=lambda c: c.data / "dots" / "train" / "good" / "syn"),
    "demo_out_in_a_datasets_defects": Row(
        lambda c: ["demo", "--parts", "40", "--out", str(c.data / "dots" / "test" / "blob" / "demo"), "-q"],
        ("dots/test/blob, a folder of a dataset's images",),
        absent=lambda c: c.data / "dots" / "test" / "blob" / "demo"),
    "watch_feature_type_typo": Row(lambda c: ["watch", str(c.tmp / "cam"), str(c.model), "--once",
                                              "--db", str(c.tmp / "r.db"), "--feature-type", "dotz"],
                                   ("'dotz' is not a type of this model",),
                                   setup=lambda c: _png(c.tmp / "cam" / "0.png"),
                                   absent=lambda c: c.tmp / "r.db"),
    # watch alone takes its folder first (DIR MODEL): given as the other commands take theirs,
    # it was "CAM is not a diffqc model bundle ... it comes first: diffqc COMMAND MODEL" (it was)
    "watch_model_and_folder_swapped": Row(lambda c: ["watch", str(c.model), str(c.tmp / "cam"), "--once",
                                                     "--db", str(c.tmp / "r.db")],
                                          ("is not a diffqc model bundle and", "is one: watch takes "
                                           "the folder first, then the model: diffqc watch ", "/cam "),
                                          setup=lambda c: _png(c.tmp / "cam" / "0.png"),
                                          absent=lambda c: c.tmp / "r.db"),
    "watch_model_not_a_bundle": Row(lambda c: ["watch", str(c.tmp / "cam"), str(c.data), "--once",
                                               "--db", str(c.tmp / "r.db")],
                                    ("is not a diffqc model bundle (it holds none of",
                                     "diffqc watch DIR MODEL"),
                                    setup=lambda c: _png(c.tmp / "cam" / "0.png"),
                                    absent=lambda c: c.tmp / "r.db"),
    # the folder is named before the model loads and the store is made (an empty store was left)
    "watch_folder_missing": Row(lambda c: ["watch", str(c.tmp / "nocam"), str(c.model), "--once",
                                           "--db", str(c.tmp / "r.db")],
                                ("watch folder", "nocam does not exist"),
                                absent=lambda c: c.tmp / "r.db"),
    # `--db data/` for `--db data/results.db`: was sqlite's "unable to open database file"
    "watch_db_is_a_folder": Row(lambda c: ["watch", str(c.tmp / "cam"), str(c.model), "--once",
                                           "--db", str(c.tmp / "cam")],
                                ("it is a folder; give a file path", "diffqc-results.db"),
                                setup=lambda c: _png(c.tmp / "cam" / "0.png")),
    # serve over TLS: each file named before the port, the store or the model
    "serve_tls_cert_without_key": Row(_serve("--tls-cert", "cert.pem"),
                                      ("cert.pem holds no private key: give --tls-key",),
                                      setup=_tls, absent=lambda c: c.tmp / "r.db"),
    "serve_tls_key_without_cert": Row(_serve("--tls-key", "key.pem"), ("--tls-key needs --tls-cert",),
                                      setup=_tls, absent=lambda c: c.tmp / "r.db"),
    "serve_tls_cert_missing": Row(_serve("--tls-cert", "nocert.pem", "--tls-key", "key.pem"),
                                  ("cannot serve over TLS", "nocert.pem", "No such file"),
                                  setup=_tls, absent=lambda c: c.tmp / "r.db"),
    "serve_tls_key_of_another_cert": Row(_serve("--tls-cert", "cert.pem", "--tls-key", "key.pem"),
                                         ("cannot serve over TLS", "key.pem is not the key of"),
                                         setup=lambda c: _tls(c, other_key=True),
                                         absent=lambda c: c.tmp / "r.db"),
    "serve_tls_encrypted_key": Row(_serve("--tls-cert", "cert.pem", "--tls-key", "key.pem"),
                                   ("cannot serve over TLS", "key.pem is encrypted",
                                    "openssl pkey -in"),
                                   setup=lambda c: _tls(c, encrypted=True),
                                   absent=lambda c: c.tmp / "r.db"),
    "serve_tls_cert_not_pem": Row(_serve("--tls-cert", "cert.pem", "--tls-key", "key.pem"),
                                  ("cannot serve over TLS", "cert.pem", "PEM"),
                                  setup=lambda c: (_tls(c), (c.tmp / "cert.pem").write_bytes(b"\x30junk")),
                                  absent=lambda c: c.tmp / "r.db"),
    "serve_token_file_missing": Row(lambda c: ["serve", str(c.model), "--db", str(c.tmp / "r.db")],
                                    ("cannot read DIFFQC_TOKEN_FILE", "No such file"),
                                    setup=lambda c: (c.monkeypatch.delenv("DIFFQC_TOKEN", raising=False),
                                                     c.monkeypatch.setenv("DIFFQC_TOKEN_FILE",
                                                                          str(c.tmp / "secret"))),
                                    absent=lambda c: c.tmp / "r.db"),
    "serve_webhook_header_without_webhook": Row(
        lambda c: ["serve", str(c.model), "--token", "t" * 32, "--db", str(c.tmp / "r.db"),
                   "--webhook-header", "Authorization: Bearer x"],
        ("--webhook-header needs --webhook",), absent=lambda c: c.tmp / "r.db"),
    "serve_webhook_header_malformed": Row(
        lambda c: ["serve", str(c.model), "--token", "t" * 32, "--db", str(c.tmp / "r.db"),
                   "--webhook", "http://127.0.0.1:9/hook", "--webhook-header", "Bearer s3cr3t"],
        ("--webhook-header 1 is not 'Name: value'",), absent=lambda c: c.tmp / "r.db"),
    # export
    "export_int8_without_data": Row(lambda c: ["export", str(c.model), "--int8", "-q"],
                                    ("--int8 needs --calibration-data",)),
    "export_onnx_missing": Row(lambda c: ["export", str(c.model), "--format", "onnx", "-q"],
                               ("onnx package is not installed",), setup=_no_onnx),
}


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tiny_model: Path, clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad-input")
    return shutil.copytree(tiny_model, root / "model"), shutil.copytree(clear_dataset, root / "data")


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_bad_input(row: Row, inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    model = shutil.copytree(inputs[0], tmp_path / "model")  # rows may damage their own copy
    ctx = Ctx(model, inputs[1], tmp_path, monkeypatch)
    if row.setup is not None:
        row.setup(ctx)
    before = _snapshot(tmp_path, inputs[1])
    capsys.readouterr()
    code = main(row.argv(ctx))
    err = capsys.readouterr().err
    assert code == row.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("diffqc: error: ")]
    assert len(errors) == 1, err  # one clear line
    for message in row.messages:
        assert message in err, (message, err)
    after = _snapshot(tmp_path, inputs[1])
    assert {k: after.get(k) for k in before} == before  # every input file is still there, unchanged
    if row.absent is not None:
        assert not row.absent(ctx).exists()


@pytest.mark.parametrize("argv", [["train", "data"], ["inspect"],
                                  ["inspect", "m", "x.png", "--runtime", "tpu"],
                                  ["train", "d", "--out", "o", "--steps", "many"], ["nosuchcommand"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "d", "--folds", "1"], "argument --folds: must be at least 2, got 1"),
    (["evaluate", "d", "--max-train-good", "1"], "argument --max-train-good: must be at least 2"),
    (["evaluate", "d", "--n-boot", "0"], "argument --n-boot: must be at least 1"),
    (["evaluate", "d", "--seed", "-1"], "argument --seed: must be from 0 to 4294967295"),
    (["inspect", "m", "x.png", "--threads", "0"], "argument --threads: must be from 1 to 1024, got 0"),
    (["inspect", "m", "x.png", "--threads", "two"], "argument --threads: expected an integer, got 'two'"),
    (["export", "m", "--opset", "9"], "argument --opset: must be from 11 to 23, got 9"),
    (["export", "m", "--check-images", "0"], "argument --check-images: must be at least 1"),
    (["data", "synth", "s", "--seed", "-4"], "argument --seed: must be from 0"),
    (["serve", "m", "--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
    (["serve", "m", "--buffer-size", "0"], "argument --buffer-size: must be at least 1, got 0"),
    (["serve", "m", "--max-upload-mb", "0"], "argument --max-upload-mb: must be at least 1"),
    (["serve", "m", "--retry-after", "-1"], "argument --retry-after: must be at least 0"),
    (["serve", "m", "--keep-days", "-1"], "argument --keep-days: must be a number more than 0"),
    (["serve", "m", "--artifact-budget-mb", "nan"], "argument --artifact-budget-mb: must be a number"),
    (["serve", "m", "--body-timeout", "0"], "argument --body-timeout: must be a number more than 0"),
    # a slip (1e308, 10^11): a traceback (int() of inf, a wait beyond the clock's range) once running
    (["watch", "d", "m", "--poll", "1e11"],
     "argument --poll: must be a number more than 0 and at most 1e+09"),
    (["watch", "d", "m", "--artifact-budget-mb", "1e308"], "argument --artifact-budget-mb: must be a number "
     "more than 0 and at most 1e+09, got 1e308"),
    (["serve", "m", "--disk-min-free-mb", "1e308"],
     "argument --disk-min-free-mb: must be a number at least 0 and at most 1e+09"),
    (["serve", "m", "--log-level", "verbose"], "argument --log-level: invalid choice: 'verbose'"),
    (["watch", "cam", "m", "--poll", "-1"], "argument --poll: must be a number more than 0"),
    (["watch", "cam", "m", "--settle", "inf"], "argument --settle: must be a number at least 0"),
    (["watch", "cam", "m", "--max-batch", "0"], "argument --max-batch: must be at least 1"),
])
def test_numbers_out_of_range_are_usage_errors(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An option's number outside its range is refused as it is parsed, naming the option, before
    any work: not a traceback deep in the run (--folds 1, --threads -3, --port 70000, watch
    --max-batch 0), nor a service that starts and refuses every upload (--max-upload-mb 0)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_real_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only user faults are one line: an unexpected exception propagates with its traceback."""
    import diffqc.cli as cli

    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_synth", broken)
    with pytest.raises(ZeroDivisionError):
        main(["data", "synth", str(tmp_path / "s")])


@pytest.mark.parametrize("given", ["--db", "default"])
def test_a_result_store_in_a_read_only_folder_names_the_folder(tiny_model: Path, tmp_path: Path,
                                                               given: str) -> None:
    """`serve` or `watch` started in a read-only folder (a container's read-only root, its
    working directory ``/app``) or given `--db` there said "cannot open SQLite store
    diffqc-results.db: unable to open database file": neither where nor why. The error names
    the store's full path and that its folder is not writable, and what to give instead."""
    volume, mounted = tmp_path / "volume", tmp_path / "app"
    volume.mkdir()
    mounted.mkdir()
    _png(tmp_path / "cam" / "0.png")
    db = [] if given == "default" else ["--db", str(mounted / "results.db")]
    watch = [sys.executable, "-m", "diffqc.cli", "watch", str(tmp_path / "cam"), str(tiny_model), "--once",
             *db]
    proc = run_with_mount(volume, mounted, ["sh", "-c", f'cd "{mounted}" && exec "$@"', "sh", *watch],
                          read_only=True)
    name = "results.db" if db else "diffqc-results.db"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"diffqc: error: cannot open SQLite store {mounted / name}: its folder {mounted} is not "
            "writable (Read-only file system): give --db a file in a writable folder") in proc.stderr
    assert not any(volume.iterdir()) and (tmp_path / "cam" / "0.png").is_file()


def test_a_folder_not_writable_is_named_where_there_is_no_statvfs(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Naming why a store's folder is not writable asked os.statvfs, which Windows has not: the
    error said about a folder not writable became an AttributeError there. Without it the
    reason is a permission's, naming the user this process runs as."""
    import os
    import pwd

    from diffqc.service import store

    monkeypatch.setattr(store.os, "access", lambda *args, **kwargs: False)
    monkeypatch.delattr(store.os, "statvfs")
    said = store._unwritable_folder(tmp_path / "results.db")
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert said == f"its folder {tmp_path} is not writable (permission denied for user {user})"


def test_watch_on_a_read_only_folder_says_why_it_is_not_writable(tiny_model: Path, tmp_path: Path) -> None:
    """`watch` of a camera folder it may not write (a read-only share, a systemd unit's
    ProtectSystem=strict without ReadWritePaths=, a folder its dynamic user may not write) said
    "(DIR is not writable)" whatever the cause, where the cure differs: a writable path, or a
    permission. It now says which: here a read-only file system."""
    volume, mounted = tmp_path / "volume", tmp_path / "camera"
    mounted.mkdir()
    _png(volume / "dots" / "0.png")
    watch = [sys.executable, "-m", "diffqc.cli", "watch", str(mounted), str(tiny_model), "--once",
             "--db", str(tmp_path / "r.db")]
    proc = run_with_mount(volume, mounted, watch, read_only=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"cannot move inspected files into {mounted / 'processed'} ({mounted} is not writable: "
            "Read-only file system): give --keep") in proc.stderr, proc.stderr
    assert (volume / "dots" / "0.png").is_file() and not (volume / "processed").exists()


def test_results_list_and_export_read_a_store_on_a_read_only_share(tmp_path: Path) -> None:
    """A line's store, copied to a read-only share or a write-protected stick for a QC engineer,
    or given to `results list` from a read-only volume, was refused: "its folder is not
    writable: give --db a file in a writable folder" (SQLite's WAL wants to write beside it).
    The reading commands open it read-only: a copy taken while the service ran (the store, its
    -wal and -shm files) reads every record; a -wal file alone, whose records SQLite cannot
    read without writing the -shm beside it, is named with what to copy. Nothing is written."""
    import json
    import shutil
    import time

    from diffqc.service.store import ResultRecord, ResultStore

    cli = [sys.executable, "-m", "diffqc.cli"]
    volume, mounted = tmp_path / "volume", tmp_path / "share"
    volume.mkdir()
    mounted.mkdir()
    line = ResultStore(str(tmp_path / "line" / "results.db"))  # the running service's store
    stored = line.insert_many([ResultRecord(created_at=time.time(), source="http", decision="PASS",
                                            feature_type="edge", p_value=0.5, part_id=f"p{i}")
                               for i in range(3)])
    line.set_review(stored[0].id or 0, "GOOD", reviewer="anna")
    try:
        for suffix in ("", "-wal", "-shm"):  # copied while it runs: the records are in the -wal
            shutil.copy(tmp_path / "line" / f"results.db{suffix}", volume / f"results.db{suffix}")
    finally:
        line.close()
    assert (volume / "results.db-wal").stat().st_size > 0
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in volume.iterdir())
    proc = run_with_mount(volume, mounted, [*cli, "results", "list", "--db", str(mounted / "results.db")],
                          read_only=True)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(row)["part_id"] for row in proc.stdout.splitlines()] == ["p0", "p1", "p2"]
    export = [*cli, "results", "export", "--db", str(mounted / "results.db"), str(tmp_path / "out")]
    proc = run_with_mount(volume, mounted, export, read_only=True)
    assert proc.returncode == 0 and '"exported": 0' in proc.stdout, proc.stderr  # its image was not kept
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in volume.iterdir()) == before

    (volume / "results.db-shm").unlink()  # the -wal without its -shm: SQLite would write one
    proc = run_with_mount(volume, mounted, [*cli, "results", "list", "--db", str(mounted / "results.db")],
                          read_only=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "results.db-wal holds records not yet in the database file" in proc.stderr, proc.stderr
    assert "copy results.db, results.db-wal and results.db-shm together" in proc.stderr



def test_export_and_calibrate_into_a_read_only_bundle_are_refused_before_their_work(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path) -> None:
    """A bundle on a read-only volume (a container's ``:ro`` mount): `export` checked the ONNX
    graph against PyTorch, timed it and, with ``--int8``, quantised it (11 s for the 8-type
    model, minutes with INT8) before its first write failed; `calibrate DATA` scored every
    GOOD image first. Each now says the bundle's file it cannot write before its work, and
    changes nothing."""
    volume, mounted = Path(shutil.copytree(tiny_model, tmp_path / "model")), tmp_path / "mounted"
    mounted.mkdir()
    before = {p.name: p.read_bytes() for p in volume.iterdir()}
    cli = [sys.executable, "-m", "diffqc.cli"]
    for argv, file in [(["export", str(mounted)], "model.onnx"),
                       (["calibrate", str(mounted), str(clear_dataset)], "calibration.json")]:
        proc = run_with_mount(volume, mounted, [*cli, *argv], read_only=True)
        assert proc.returncode == 1
        said = [line for line in proc.stderr.splitlines() if line.strip()]
        assert said == [f"diffqc: error: cannot write {mounted}/{file}: Read-only file system"], said
    assert {p.name: p.read_bytes() for p in volume.iterdir()} == before


def test_a_misspelt_option_is_told_by_its_command_with_the_option_it_likely_meant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc serve MODEL --tokn T` answered with the top-level usage ("usage: diffqc [-h]
    [--version] COMMAND ...") and "unrecognized arguments: --tokn T": neither the command's
    options nor the one meant. The command's own usage now answers, naming the option likely
    meant; an option no command has near it is named alone."""
    from diffqc.cli import main

    for argv, usage, said in [
        (["serve", str(tmp_path), "--tokn", "x"], "usage: diffqc serve ",
         "diffqc serve: error: unrecognized arguments: --tokn x (did you mean '--token'?)"),
        (["results", "list", "--sinse=8h"], "usage: diffqc results list ",
         "diffqc results list: error: unrecognized arguments: --sinse=8h (did you mean '--since'?)"),
        (["train", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", "3"], "usage: diffqc train ",
         "diffqc train: error: unrecognized arguments: --epochs 3\n"),
        # the last word of an option (`--type` for `--feature-type`): too far apart to be a typo
        (["inspect", str(tmp_path), "part.png", "--type", "dots"], "usage: diffqc inspect ",
         "diffqc inspect: error: unrecognized arguments: --type dots (did you mean '--feature-type'?)"),
        # an argument given as an option, as anomalib's and most tools' `--model` is
        (["inspect", "--model", str(tmp_path), "part.png"], "usage: diffqc inspect ",
         "diffqc inspect: error: unrecognized arguments: --model (model is an argument of diffqc inspect, "
         "not an option: diffqc inspect MODEL IMAGES ...)"),
        (["watch", "incoming", "--model", str(tmp_path)], "usage: diffqc watch ",
         "unrecognized arguments: --model (model is an argument of diffqc watch, not an option: diffqc "
         "watch DIR MODEL)"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "m")], "usage: diffqc train ",
         "(data is an argument of diffqc train, not an option: diffqc train DATA ...)"),
        # the shell's expansion of `watch incoming/*.png MODEL`: watch takes the folder
        (["watch", "incoming/a.png", "incoming/b.png", "incoming/c.PNG", str(tmp_path)],
         "usage: diffqc watch ",
         "unrecognized arguments: incoming/c.PNG " + str(tmp_path) + " (diffqc watch takes the folder the "
         "images are written into, not images: diffqc watch incoming MODEL)"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(usage) and said in err, err


def test_arguments_after_a_commands_options_are_taken_as_its_arguments(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc calibrate MODEL --alpha-review 0.1 DATA` (the levels typed first, the folder after)
    answered "unrecognized arguments: DATA", and `inspect MODEL a.png --feature-type dots b.png`
    the same of b.png: argparse fills a command's arguments before its options only. An argument
    after the options goes where there is room for it, as a shell user means it; with no room
    left, or beside an unknown option, it is refused as before."""
    import warnings

    model = shutil.copytree(tiny_model, tmp_path / "model")
    a, b = sorted((clear_dataset / "dots" / "test" / "good").iterdir())[:2]
    assert main(["inspect", str(model), str(a), "--feature-type", "dots", str(b)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["path"], d["feature_type"]) for d in lines] == [(str(a), "dots"), (str(b), "dots")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["calibrate", str(model), "--alpha-review", "0.1", str(clear_dataset), "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["alpha_review"] == 0.1 and sum(summary["images"].values()) > 0
    assert main(["calibrate", str(model), "--undo", str(clear_dataset)]) == 1  # taken, then refused
    said = "--undo puts the previous calibration back as it was: give it without DATA"
    assert said in capsys.readouterr().err
    for argv, said in [(["calibrate", str(model), "-q", str(clear_dataset), "more"], "arguments: more"),
                       (["serve", str(model), "--port", "0", "extra"], "unrecognized arguments: extra"),
                       (["calibrate", str(model), "--alpa", "0.1", "x"], "arguments: --alpa 0.1 x")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err, err


def test_a_result_store_given_as_an_argument_is_told_to_be_given_as_db(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc results list lineA.db` (as `sqlite3 lineA.db` takes it) answered "unrecognized
    arguments: lineA.db", nothing more: the results commands take the store as `--db`, and the
    error now says so, for a store's file (by its ending or its first bytes) or URL."""
    from diffqc.cli import main

    store = tmp_path / "line-a"  # a SQLite file without an ending, named by its first bytes
    store.write_bytes(b"SQLite format 3\x00" + bytes(100))
    for argv, said in [
        (["results", "list", "lineA.db"],
         "diffqc results list: error: unrecognized arguments: lineA.db (the result store is given as "
         "--db: --db lineA.db)"),
        (["results", "summary", str(store), "--since", "8h"],
         f"unrecognized arguments: {store} (the result store is given as --db: --db {store})"),
        (["results", "backup", "copy.db", "postgresql://qc@db/line"],
         "(the result store is given as --db: --db postgresql://qc@db/line)"),
        (["results", "list", "notes.txt"], "unrecognized arguments: notes.txt\n"),  # not a store
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err, err


def test_a_false_positive_rate_option_is_told_its_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc calibrate MODEL DATA --fpr 0.02` (the rate a QC engineer sets, in the words of the
    field) answered "unrecognized arguments: --fpr 0.02" alone: diffqc calls it the share of GOOD
    parts flagged, `--alpha-review` (`calibrate`), `calibration.alpha_review` (`train --set`)."""
    from diffqc.cli import main

    for argv, said in [
        (["calibrate", "m", "--fpr", "0.02"],
         "unrecognized arguments: --fpr 0.02 (the target false-positive rate, the share of GOOD parts "
         "flagged, is --alpha-review; REJECT's --alpha-reject)"),
        (["train", "data", "--out", "m", "--target-fpr=2%"],
         "unrecognized arguments: --target-fpr=2% (the target false-positive rate, the share of GOOD "
         "parts flagged, is --set calibration.alpha_review=A; REJECT's calibration.alpha_reject)"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err, err


def test_a_second_serve_on_a_port_is_refused_before_the_first_listens() -> None:
    """Linux lets two sockets bind one port (SO_REUSEADDR) until one of them listens: a second
    `serve` started while the first loaded its model passed the early check, loaded its model,
    made its store, told systemd READY=1 and ended in tracebacks. The port is listened on as it
    is checked, so the second is one line before its model loads."""
    from diffqc.service.app import listening_sockets

    first = listening_sockets("127.0.0.1", 0)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use "
                                              r"\(is another diffqc serve running\?\)"):
            listening_sockets("127.0.0.1", port)
    finally:
        for sock in first:
            sock.close()


@pytest.mark.parametrize(("argv", "said"), [
    (["--cors-origin", "hmi:8080"], "'hmi:8080' is no origin a browser sends: write scheme://host[:port]"),
    (["--cors-origin", "http://hmi:3000/app"], "is no origin a browser sends"),
    (["--max-image-mpx", "0.00001"], "--max-image-mpx: must be a number at least 6.4e-05"),
])
def test_serve_options_a_browser_or_a_camera_could_never_match_are_refused(
        argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--cors-origin hmi:8080`` (no scheme) or with a path was taken, and every call from the
    page was refused by CORS without a word in the log; ``--max-image-mpx`` below an 8 x 8
    image's pixels became 0 and refused every image."""
    from diffqc.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "model", *argv])
    assert said in capsys.readouterr().err


def test_serve_options_are_read_as_meant(capsys: pytest.CaptureFixture[str]) -> None:
    """An origin copied from the address bar keeps its slash off (a browser's ``Origin`` has
    none); ``--max-image-mpx`` is rounded to pixels, not cut: 2.039808 MP is a 1536 x 1328
    frame, which was refused as over the limit it was given. ``watch --help`` names what it
    does (it has no HTTP API, and its records' source is ``watch:<folder>``)."""
    from diffqc.cli import build_parser

    args = build_parser().parse_args(["serve", "model", "--cors-origin", "http://hmi:3000/",
                                      "--cors-origin", "https://line.example", "--max-image-mpx", "2.039808"])
    assert args.cors_origin == ["http://hmi:3000", "https://line.example"]
    assert args.max_image_pixels == 1536 * 1328
    with pytest.raises(SystemExit):
        build_parser().parse_args(["watch", "--help"])
    watch_help = " ".join(capsys.readouterr().out.split())
    assert "default: watch:<the folder's absolute path>" in watch_help
    assert "/v1/line" not in watch_help and "/metrics" not in watch_help


def test_an_empty_period_time_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--since "$START"`` of a variable not set listed every record and summed "from the
    first" without a word, where ``--since " "`` was refused."""
    from diffqc.cli import main

    for option in ("--since", "--until"):
        assert main(["results", "list", "--db", str(tmp_path / "r.db"), option, ""]) != 0
        assert f"{option} is empty: give a time" in capsys.readouterr().err
