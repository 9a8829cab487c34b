"""A model bundle's folder. The one reader of its description: ``config.json``,
``metadata.json`` and ``calibration.json``, each checked, without PyTorch (the PyTorch
:class:`~diffqc.model.Detector` adds the weights; the exported detector, :mod:`diffqc.runtime`,
the ONNX graph). And the one way a bundle's files come into its folder: whole, ``metadata.json``
last, the bundle they replace kept in ``previous/`` (``diffqc train --undo`` puts it back)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffqc.calibration import CalibrationWarning, Calibrator
from diffqc.config import (
    FIT_RECORDED,
    ONNX_PREFIX,
    DetectorConfig,
    fitted_settings,
    recorded_name,
    settings,
    unknown_settings,
)
from diffqc.errors import BundleError, ConfigError, OutputError, address_hint
from diffqc.inspection import BUNDLE_FILES, check_bundle_version, newer_writer, sha256_file
from diffqc.output import (
    PARTIAL_PREFIX,
    check_output_folder,
    check_writable,
    keep_file,
    path_text,
    read_json,
    sync_folder,
    with_plain_modes,
)

WEIGHTS_FILE = "weights.safetensors"
# the bundle a save replaced, kept whole in the new one's folder; one, the last replaced
PREVIOUS_FOLDER = "previous"


def previous_name(name: str) -> str:
    """``calibration.json`` -> ``calibration.prev.json``: the file ``diffqc calibrate`` replaced."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.prev.{ext}"


# a bundle as a save replaces it: its files and the calibration its last ``calibrate`` replaced
# (an export's files stay: a retrain makes them stale, ``train --undo`` valid again)
KEPT_FILES = (*BUNDLE_FILES, previous_name("calibration.json"))


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a folder that diffqc wrote a model bundle into."""
    try:
        meta = read_json(path / "metadata.json")
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "diffqc_version" in meta


def check_bundle_target(path: Path | str, *, force: bool = False) -> Path:
    """``path`` if a bundle may be written there: a new or empty folder, or an earlier bundle
    (whose own files are replaced, the bundle kept in ``previous/``); any other folder only with
    ``force``, beside what is there and replacing nothing
    (:func:`diffqc.output.check_output_folder`)."""
    path = check_output_folder(path, what="model bundle", names=KEPT_FILES, is_ours=is_bundle,
                               foreign="is not a diffqc model bundle", force=force)
    if is_bundle(path):
        _check_previous(path)
    return path


def _check_previous(path: Path) -> None:
    """An :class:`OutputError` unless ``previous/`` in bundle ``path`` may be replaced by the
    bundle there now: absent, or holding the files of a bundle kept so and nothing else."""
    prev = path / PREVIOUS_FOLDER
    if not prev.exists() and not prev.is_symlink():
        return
    try:
        if prev.is_symlink() or not prev.is_dir():
            why = "it is a link" if prev.is_symlink() else "it is not a folder"
        else:  # an export of the kept bundle, the operator's notes: theirs to move
            other = sorted(p.name for p in prev.iterdir() if p.name not in KEPT_FILES or not p.is_file())
            why = f"it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}" if other else ""
    except OSError as exc:
        raise OutputError(f"cannot read {path_text(prev)}: {exc.strerror or exc}") from None
    if why:
        raise OutputError(f"{path_text(prev)} is not a bundle diffqc kept as it was ({why}; a save into "
                          f"{path_text(path)} keeps the bundle it replaces there): move it away; nothing "
                          "is written")


def _whole(path: Path) -> bool:
    """Whether the bundle in ``path`` is whole as its ``metadata.json`` names it (its weights'
    checksum): a save cut short between its moves (a power cut) leaves files of two bundles,
    which kept in ``previous/`` would replace the whole one kept there; said, not kept."""
    try:
        check_weights(path, read_json(path / "metadata.json"))
        return True
    except (BundleError, OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"{path_text(path)} holds no whole bundle ({exc}: a save cut short?); it is not "
                      f"kept, and {PREVIOUS_FOLDER}/ keeps the one it held", stacklevel=4)
        return False


@contextmanager
def staged_bundle(path: Path) -> Iterator[Path]:
    """A hidden folder inside bundle folder ``path`` to write a bundle's files into, for
    :func:`install_bundle`; removed on exit with whatever is left in it (our own files)."""
    staged = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=path))
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def install_bundle(staged: Path, path: Path) -> Path | None:
    """Move the bundle's files in ``staged`` (:func:`staged_bundle`) into ``path``,
    ``metadata.json`` last; a bundle ``path`` holds is kept first, whole, in ``path/previous``
    (by hard links: no room taken beyond what it holds now; copies where the file system has
    none), replacing the one kept there before. Returns ``previous/``, None when ``path`` held no
    bundle. A failure before the first move (a full disk copying) changes nothing."""
    keep = is_bundle(path) and _whole(path)
    dropped = None
    if keep:
        _check_previous(path)
        with staged_bundle(path) as held:
            for name in KEPT_FILES:
                if (path / name).is_file():
                    keep_file(path / name, held / name)
            with_plain_modes(held, ())  # not a temporary folder's 0700: another user reads it too
            sync_folder(held)
            prev = path / PREVIOUS_FOLDER
            if prev.is_dir():  # the bundle kept before (its files only: checked), set aside
                dropped = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=path))
                os.replace(prev, dropped / PREVIOUS_FOLDER)
            os.replace(held, prev)
    # the weights first, metadata.json (which names their checksum) last: a move cut short leaves
    # weights their metadata does not name, told at load and by the next save (_whole)
    ends = (WEIGHTS_FILE, "metadata.json")
    try:
        for name in [WEIGHTS_FILE, *(n for n in KEPT_FILES if n not in ends), "metadata.json"]:
            if (staged / name).is_file():
                os.replace(staged / name, path / name)
            elif keep and name not in BUNDLE_FILES:  # kept in previous/ with the bundle it calibrated
                (path / name).unlink(missing_ok=True)
    except BaseException:  # Ctrl-C, a move refused: said, for "interrupted" says nothing of the folder
        if not (staged / WEIGHTS_FILE).exists():  # moved in: beside the old metadata.json
            warnings.warn(_cut_short(path), stacklevel=2)
        raise
    sync_folder(path)
    # dropped once the new bundle is in: a move cut short (Ctrl-C, a power cut) leaves it whole,
    # in a hidden folder the next save names (the bundle `train --undo` was putting back)
    if dropped is not None:
        shutil.rmtree(dropped, ignore_errors=True)
    return path / PREVIOUS_FOLDER if keep else None


def _cut_short(path: Path) -> str:
    """What to say of bundle folder ``path`` when the moves of :func:`install_bundle` stopped
    after the first: a new file beside the old ``metadata.json``."""
    where, prev = path_text(path), path / PREVIOUS_FOLDER
    then = (f"`diffqc train --undo --out {where}` puts back the model kept in {path_text(prev)}"
            if prev.is_dir() else "train again to write it whole")
    return f"{where} is incomplete (cut short as its files were moved in): {then}"


def check_bundle_files(path: Path | str, *, usage: str = "it comes first: diffqc COMMAND MODEL ...") -> Path:
    """``path`` if it holds a bundle's files (their content is :func:`read_bundle`'s to check);
    a :class:`BundleError` otherwise, that tells a damaged bundle from another folder (and for
    another folder ends with ``usage``: where the command takes its bundle)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist or is not a folder{address_hint(str(path))}")
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    if len(missing) == len(BUNDLE_FILES):  # not a damaged bundle: another folder (the data?)
        raise BundleError(f"{path} is not a diffqc model bundle (it holds none of "
                          f"{', '.join(BUNDLE_FILES)}); a bundle is the folder `diffqc train --out` "
                          f"wrote, and {usage}")
    if missing:
        raise BundleError(f"model bundle {path} is incomplete: missing {', '.join(missing)}")
    return path


def read_bundle(path: Path | str) -> tuple[DetectorConfig, dict[str, Any], Calibrator]:
    """``(config, metadata, calibration)`` of the bundle at ``path``; a missing file, damaged
    JSON, a bundle format or diffqc version this diffqc cannot read, or a calibration of other
    types than the model's is a :class:`BundleError` that says which."""
    path = check_bundle_files(path)
    try:
        meta = read_json(path / "metadata.json")
    except (OSError, ValueError) as exc:
        raise BundleError(f"model bundle {path}: metadata.json is damaged ({exc})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"model bundle {path}: metadata.json is damaged (not an object)")
    check_bundle_version(path, meta)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"model bundle {path}: metadata.json is damaged (classes: {classes!r})")
    if (wrong := _wrong_training_data(meta)) is not None:
        raise BundleError(f"model bundle {path}: metadata.json is damaged ({wrong[0]}: {wrong[1]!r})")
    try:
        config = DetectorConfig.from_json(path / "config.json")
    except ValueError as exc:
        raise (_newer_refusal(path, meta, "config.json", exc)
               or BundleError(f"model bundle {path}: config.json is damaged ({exc})")) from None
    if not isinstance(fitted := meta.get("fitted_settings", {}), dict):
        raise BundleError(f"model bundle {path}: metadata.json is damaged (fitted_settings: {fitted!r})")
    if message := _edited_settings(fitted, config):
        raise BundleError(f"model bundle {path}: {message}")
    try:
        cal = Calibrator.from_file(path / "calibration.json")
    except BundleError as exc:  # its own words: "... is damaged or unreadable (...)"
        raise _newer_refusal(path, meta, "calibration.json", exc) or exc from None
    if set(cal.known) != set(classes):
        raise BundleError(f"model bundle {path}: calibration types {sorted(cal.known)} != classes {classes}")
    if message := _edited_levels(path, config, cal):
        warnings.warn(f"model bundle {path}: {message}", CalibrationWarning, stacklevel=2)
        config = dataclasses.replace(config, calibration=cal.config)  # the config says what decides
    return config, meta, cal


def _newer_refusal(path: Path, meta: dict[str, Any], name: str, exc: Exception) -> BundleError | None:
    """Where a newer diffqc wrote the bundle (a model trained on a workstation, copied to an older
    edge box), the refusal of its ``name`` (``config.json``, ``calibration.json``) that this
    diffqc cannot read (``exc``) as holding that version's settings, not as damaged; else None."""
    from diffqc import __version__

    if (newer := newer_writer(meta)) is None:
        return None
    try:
        data = read_json(path / name)
    except (OSError, ValueError):
        data = None
    if name != "config.json":  # calibration.json: its "config" is the config's calibration section
        data = {"calibration": data.get("config")} if isinstance(data, dict) else None
    unknown = unknown_settings(data)
    what = (f"a setting this diffqc does not know ({', '.join(unknown)})" if unknown
            else f"what this diffqc does not read ({exc})")
    return BundleError(f"model bundle {path} was written by diffqc {newer}, newer than this diffqc "
                       f"{__version__}: its {name} has {what}; upgrade diffqc here to {newer} or later, "
                       f"or train the model with this diffqc")


def _value(value: Any) -> str:
    """A setting's value as ``--set`` takes it (a string bare, else JSON without spaces)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def retrain_text(path: Path, config: DetectorConfig, types: Collection[str]) -> str | None:
    """What a retrain into bundle folder ``path`` with ``config``, of ``types``, leaves behind of
    the model there: the types it knows that the retrain has no images of (a type's folder left
    out), and its settings (its ``config.json``: the levels a ``calibrate`` set included) that
    the retrain gives otherwise, with the options that keep them; None when it leaves nothing
    behind, or the model's description cannot be read."""
    try:
        earlier = settings(DetectorConfig.from_json(path / "config.json"))
        known = read_json(path / "metadata.json")["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = settings(config)
    recorded = {**now, "backbone.name": recorded_name(config.backbone.name)}  # as the fit will record it
    changed = [(key, _value(now[key]), _value(value)) for key, value in sorted(earlier.items())
               if key in now and key not in FIT_RECORDED and recorded[key] != value]
    lost = [str(t) for t in known if t not in types] if isinstance(known, list) else []
    said = []
    if lost:
        kind, it, its, folder = (("a type", "it", "its", "its folder") if len(lost) == 1 else
                                 ("types", "them", "their", "a folder"))
        said.append(f"that knows {', '.join(lost)}, {kind} this train has no GOOD images of: the new model "
                    f"does not know {it}, and a service serving it refuses {its} parts (was {folder} left "
                    f"out of DATA?)")
    if changed:
        was_given = ", ".join(f"{key} {was} (this train: {given})" for key, given, was in changed)
        keep = " ".join("--set " + shlex.quote(f"{key}={was}") for key, _, was in changed)
        said.append(f"trained with settings this train does not give: {was_given}; the new model is trained "
                    f"with this train's (to keep those, give {keep})")
    if not said:
        return None
    where = path_text(path)
    return (f"{where} holds a model {', and '.join(said)}; the model replaced is kept in "
            f"{path_text(path / PREVIOUS_FOLDER)}: `diffqc train --undo --out {where}` puts it back")


def changed_settings(fitted: dict[str, Any], config: DetectorConfig) -> list[tuple[str, str, str]]:
    """``[("scoring.topk", "0.5", "0.05")]``: each setting of ``config`` that differs from those a
    model was fitted and calibrated with (``fitted``, :func:`diffqc.config.fitted_settings`; a
    bundle from before the record has none, a setting added since is not in it), with its value
    now and as fitted, as ``--set`` takes them. A change there puts every score on another scale
    than the one its calibration's thresholds were set on."""
    now = fitted_settings(config)
    return [(key, _value(now[key]), _value(value)) for key, value in sorted(fitted.items())
            if key in now and now[key] != value and not _moved_graph(key, value, now[key])]


def changed_text(changed: list[tuple[str, str, str]]) -> str:
    """:func:`changed_settings` said: "scoring.topk is 0.5; the model was fitted and calibrated
    with scoring.topk 0.05"."""
    return (f"{', '.join(f'{k} is {now}' for k, now, _ in changed)}; the model was fitted and calibrated "
            f"with {', '.join(f'{k} {was}' for k, _, was in changed)}")


def _edited_settings(fitted: dict[str, Any], config: DetectorConfig) -> str | None:
    """What is wrong when ``config`` (config.json) differs from the settings ``metadata.json``
    recorded (:func:`changed_settings`), else None."""
    if not (changed := changed_settings(fitted, config)):
        return None
    sets = " ".join(f"--set {k}={now}" for k, now, _ in changed)
    return (f"config.json was edited after training: {changed_text(changed)} (metadata.json), and its "
            f"calibration's thresholds hold for those alone: put them back, or train again with the new "
            f"ones (diffqc train DATA --out NEW {sets})")


def _moved_graph(key: str, fitted: Any, now: Any) -> bool:
    """An ONNX backbone's path edited (its graph moved to another folder or machine): the graph's
    checksum, ``backbone.weights_sha256``, tells whether it is the one the model was fitted on."""
    return key == "backbone.name" and all(str(v).startswith(ONNX_PREFIX) for v in (fitted, now))


# the calibration settings `diffqc calibrate` sets, with its options; the others are train's
_LEVEL_OPTIONS = {"alpha_review": "--alpha-review", "alpha_reject": "--alpha-reject"}


def _edited_levels(path: Path, config: DetectorConfig, cal: Calibrator) -> str | None:
    """What to say when config.json's ``calibration`` section is not calibration.json's (an edit
    of config.json: calibration.json decides, with its own), else None."""
    return edited_levels(config, cal, source="config.json", file="calibration.json", bundle=path_text(path))


def edited_levels(config: DetectorConfig, cal: Calibrator, *, source: str, file: str,
                  bundle: str) -> str | None:
    """What to say when ``config``'s ``calibration`` section (``source``'s: config.json, or a
    detector's config replaced in Python) is not the calibration's (``cal``, kept in ``file``),
    which decides with its own, else None; ``bundle``: the bundle the commands it names act on."""
    mine, theirs = dataclasses.asdict(config.calibration), dataclasses.asdict(cal.config)
    edited = sorted(key for key in mine if mine[key] != theirs[key])
    if not edited:
        return None
    levels = " ".join(f"{_LEVEL_OPTIONS[k]} {mine[k]}" for k in edited if k in _LEVEL_OPTIONS)
    others = " ".join(f"--set calibration.{k}={mine[k]}" for k in edited if k not in _LEVEL_OPTIONS)
    commands = ([f"diffqc calibrate {bundle} {levels}"] if levels else []) + (
        [f"diffqc train DATA --out NEW {others}"] if others else [])
    said = ", ".join(f"calibration.{k} {mine[k]}" for k in edited)
    decides = ", ".join(str(theirs[k]) for k in edited)
    is_, it = ("is", "it") if len(edited) == 1 else ("are", "them")
    return (f"{source}'s {said} {is_} not its calibration's ({decides}, {file}, which decides); "
            f"an edit of {source} changes no decision: to change {it}, {' and '.join(commands)}")


def _wrong_training_data(meta: dict[str, Any]) -> tuple[str, Any] | None:
    """The key and value of ``training_data`` that is not of its kind (each optional: bundles from
    before lack them), or None: an object; its ``image_sizes`` an object of ``[[h0, h1], [w0, w1]]``
    per type, its ``image_colours`` and ``image_compression`` ones of strings, its
    ``image_brightness`` a ``[darkest, brightest]`` pair of numbers, its ``image_white`` and
    ``tiled_above`` a number."""
    training = meta.get("training_data", {})
    if not isinstance(training, dict):
        return "training_data", training
    for key, fits in (("image_sizes", _size_ranges), ("image_colours", lambda v: isinstance(v, str)),
                      ("image_compression", lambda v: isinstance(v, str)), ("image_brightness", _pair),
                      ("image_white", lambda v: isinstance(v, (int, float))),
                      ("tiled_above", lambda v: isinstance(v, (int, float)))):
        entries = training.get(key, {})
        if not isinstance(entries, dict):
            return f"training_data.{key}", entries
        for t, value in entries.items():
            if not fits(value):
                return f"training_data.{key}.{t}", value
    return None


def _pair(value: Any) -> bool:
    """``[a, b]`` of numbers."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value)


def _size_ranges(value: Any) -> bool:
    """``[[h0, h1], [w0, w1]]`` of numbers."""
    return isinstance(value, list) and len(value) == 2 and all(_pair(r) for r in value)


def named_model_id(path: Path | str) -> str:
    """The ``model_id`` that ``metadata.json`` names as it is now (a watch's look at a bundle being
    replaced under a service); OSError, ValueError, KeyError or TypeError when it names none."""
    return str(read_json(Path(path) / "metadata.json")["model_id"])


def metadata_text(path: Path | str, key: str) -> str | None:
    """``metadata.json``'s ``key`` (``model_id``, ``created``) in bundle folder ``path``, as text;
    None where it cannot be read or holds no text there (a bundle a save cut short, a folder)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        value = read_json(Path(path) / "metadata.json").get(key)
        return value if isinstance(value, str) else None
    return None


def check_not_retrained(path: Path | str, loaded: dict[str, Any], while_: str) -> dict[str, Any]:
    """``metadata.json`` as it is now, once it still names the model of ``loaded`` (the metadata
    read as a command's work on the bundle began: ``calibrate``'s scoring, ``export``'s graphs);
    a bundle retrained meanwhile (``train DATA --out PATH``) is an :class:`OutputError` saying
    ``while_``: what the work computed is the old model's, on another scale than the new one's."""
    meta: dict[str, Any] = read_json(Path(path) / "metadata.json")
    if any(meta.get(key) != loaded.get(key) for key in ("model_id", "weights_file_sha256")):
        raise OutputError(f"{path} was retrained while {while_}")
    return meta


def check_weights(path: Path | str, meta: dict[str, Any]) -> None:
    """The weights file matches the checksum ``metadata.json`` recorded, else a BundleError."""
    expected = meta.get("weights_file_sha256")
    if expected and sha256_file(Path(path) / WEIGHTS_FILE) != expected:
        raise BundleError(f"model bundle {path}: {WEIGHTS_FILE} is damaged (checksum mismatch)")


def undo_retrain(model: Path | str) -> dict[str, Any]:
    """Put back the bundle the last save into bundle folder ``model`` replaced (a retrain:
    ``diffqc train --out MODEL``), kept in ``previous/``; the bundle it replaces is kept there in
    turn, so that a second undo redoes it. Refused, nothing changed, when ``previous/`` holds no
    bundle or a damaged one. Returns what ``diffqc train --undo`` prints."""
    path = check_bundle_files(model, usage="train --undo takes it as --out: diffqc train --undo --out MODEL")
    prev = path / PREVIOUS_FOLDER
    if not prev.is_dir():
        raise ConfigError(f"{path_text(path)} keeps no previous model to put back: a train into a folder "
                          f"holding a bundle keeps that bundle in {PREVIOUS_FOLDER}/, and none was")
    _check_previous(path)
    _, meta, _ = read_bundle(prev)  # a damaged one is refused before anything moves
    check_weights(prev, meta)
    check_writable(path / "metadata.json")  # a read-only volume: named, not a temporary folder in it
    replaced = metadata_text(path, "model_id")  # None: a bundle a save cut short, not kept
    with staged_bundle(path) as staged:
        for name in KEPT_FILES:
            if (prev / name).is_file():
                keep_file(prev / name, staged / name)
        kept = install_bundle(staged, path)
    return {"model": str(model), "undo": True, "model_id": meta.get("model_id"),
            "previous": None if kept is None else {"folder": str(kept), "model_id": replaced}}
