"""``diffqc ...``: the command-line interface. ``main(argv=None) -> int``.

One error boundary (:func:`main`): a :class:`~diffqc.errors.DiffqcError` (bad input, a missing
runtime, an unusable device, ...) or an ``OSError`` while reading or writing files is one line
``diffqc: error: ...`` on stderr and exit code 1; usage errors exit 2 (argparse); anything else
is a bug and keeps its traceback (as does every error with ``DIFFQC_TRACEBACK=1``). Warnings are
one line each, ``diffqc: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import logging
import os
import select
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffqc import __version__
from diffqc.arguments import DEVICE, NON_NEGATIVE, QUIET, SEED, given_options, path_name, path_value
from diffqc.commands import add_model_options, model_overrides
from diffqc.errors import (
    ConfigError,
    DatasetError,
    DiffqcError,
    ImageReadError,
    OutputError,
    did_you_mean_name,
    first_few,
    out_of_memory,
)
from diffqc.machine import env_flag
from diffqc.output import (
    check_output_file,
    folder_bytes,
    is_csv_table,
    is_stream,
    json_line,
    open_stream,
    path_text,
    write_all,
)
from diffqc.runtime import add_runtime_arguments

if TYPE_CHECKING:
    from diffqc.data import Sample

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    """The config to train with from the command's options; ``defaults`` (a command's own) yield
    to them. One that would train nothing it scores with is refused; the settings given that
    change nothing are named."""
    from diffqc.config import (
        DetectorConfig,
        check_trainable,
        parse_overrides,
        unused_settings,
        with_overrides,
    )

    given = {**model_overrides(args), **parse_overrides(getattr(args, "set", None) or [])}
    config = with_overrides(DetectorConfig(), {**(defaults or {}), **given})
    check_trainable(config)
    if unused := unused_settings(config, given):
        warnings.warn(unused, stacklevel=2)
    return config


# ---------------------------------------------------------------------------- commands
# the options of `data synth` and `demo` that synth.check_arguments names
SYNTH_OPTIONS = {"n_parts": "--parts", "image_size": "--size"}


def cmd_synth(args: argparse.Namespace) -> int:
    from diffqc.synth import check_arguments, write_synthetic_dataset

    try:  # an earlier synthetic dataset (it has a marker) is replaced: its own files only
        check_arguments(args.parts, args.size, names=SYNTH_OPTIONS)
        summary = write_synthetic_dataset(Path(args.out), n_parts=args.parts, seed=args.seed,
                                          image_size=args.size, overwrite=False,  # --overwrite too
                                          progress=not args.quiet)
    except FileExistsError as exc:
        raise OutputError(str(exc)) from None
    except ValueError as exc:  # its argument checks (--parts, --size)
        raise ConfigError(f"data synth: {exc}") from None
    except KeyboardInterrupt:  # its marker says so too: data info and train refuse the set
        print(f"the synthetic dataset in {path_text(args.out)} is incomplete: the same "
              "command, run again, replaces it", file=sys.stderr)
        raise
    print(json_line({"root": str(args.out), "splits": summary["splits"], "labels": summary["labels"]}))
    return EXIT_OK


def cmd_data_info(args: argparse.Namespace) -> int:
    from diffqc.data import DatasetWarning, describe, label_shortcuts, load_dataset

    samples = load_dataset(args.data)
    info = describe(samples)  # the loaders' and good_training's warnings as at train
    for note in label_shortcuts(samples):  # as evaluate and test name them
        warnings.warn(note, DatasetWarning, stacklevel=1)
    if args.json:
        print(json_line({"data": str(args.data), "types": info}))
        return EXIT_OK
    print(f"{'feature_type':<14} {'train':>6} {'good':>6} {'defect':>6} {'masks':>6} {'unlab.':>6} "
          f"{'unread.':>7}  size (HxW)  defect kinds")
    for t, row in info.items():
        sizes = row["sizes"]  # the one size, or how many and their range (--json lists them)
        hs, ws = [h for h, _, _ in sizes], [w for _, w, _ in sizes]
        size = (f"{hs[0]}x{ws[0]}" if len(sizes) == 1 else f"{len(sizes)} sizes, {min(hs)}-{max(hs)}"
                f"x{min(ws)}-{max(ws)}" if sizes else "-")
        kinds = ", ".join(f"{kind} {n}" for kind, n in row["defects"].items())
        print(f"{t:<14} {row['train']:>6} {row['good']:>6} {sum(row['defects'].values()):>6} "
              f"{row['masks']:>6} {row['unlabelled']:>6} {len(row['unreadable']):>7}  {size:<10}  {kinds}")
    unreadable = [p for row in info.values() for p in row["unreadable"]]
    if unreadable:
        n = len(unreadable)
        what = f"{n} files cannot be read as images" if n > 1 else "1 file cannot be read as an image"
        warnings.warn(f"{what} (missing, not an image or damaged): {first_few(unreadable)}; train "
                      "--skip-corrupt leaves them out", stacklevel=1)
    return EXIT_OK


def _nested(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _training_data(data: Path, out: Path) -> list[Sample]:
    """The samples of ``data``, once the model folder ``out`` does not overlap them. A dataset
    folder: the model may be neither that folder, nor inside it, nor around it (refused before
    the folder is even listed). A manifest (what it lists decides): neither the manifest nor any
    image or mask it lists may be the model folder or inside it; a folder beside them
    (``models/`` next to ``manifest.csv``) is fine."""
    from diffqc.data import is_manifest, load_dataset

    if not is_manifest(data):
        if _nested(out, data) or _nested(data, out):
            raise OutputError(f"--out {out} and the training data {data} overlap; write the model "
                              "bundle to a folder outside the dataset")
        return load_dataset(data)
    samples = load_dataset(data)
    listed = [data, *(s.path for s in samples), *(s.mask_path for s in samples if s.mask_path)]
    inside = next((p for p in listed if _nested(p, out)), None)
    if inside is not None:
        raise OutputError(f"--out {out} and the training data {data} overlap ({inside} would lie "
                          "inside the model folder); write the model bundle to another folder")
    return samples


def cmd_train(args: argparse.Namespace) -> int:
    from diffqc.bundle import (
        PREVIOUS_FOLDER,
        check_bundle_target,
        is_bundle,
        metadata_text,
        retrain_text,
        undo_retrain,
    )
    from diffqc.data import (
        DEFECTIVE,
        GOOD,
        UNKNOWN,
        feature_types,
        good_training,
        name_types_alike,
    )
    from diffqc.inspection import BUNDLE_FILES
    from diffqc.model import Detector

    sources, out = [Path(d) for d in args.data], Path(args.out)
    if args.undo:  # what shapes or reads a training has nothing to do: said, not taken silently
        given = (["DATA"] if sources else []) + given_options(
            args, ("--method", "--backbone", "--layers", "--steps", "--seed", "--fit", "--tile", "--set",
                   "--skip-corrupt", "--force"))
        if given:
            raise ConfigError(f"--undo puts the previous model back as it was: give it without "
                              f"{' and '.join(given)} (diffqc train --undo --out {path_text(out)})")
        print(json_line(undo_retrain(out)))
        return EXIT_OK
    if not sources:
        raise ConfigError("train needs DATA: diffqc train DATA [DATA ...] --out MODEL (or --undo --out "
                          "MODEL to put back the model a train replaced)")
    config = build_config(args)
    twice = next((d for i, d in enumerate(sources) if d.resolve() in {s.resolve() for s in sources[:i]}),
                 None)
    if twice is not None:
        raise ConfigError(f"the training data names {twice} twice")
    everything = [s for data in sources for s in _training_data(data, out)]
    if len(sources) > 1:  # one set's "dots", another's "Dots"
        name_types_alike(", ".join(map(str, sources)), feature_types(everything))
    check_bundle_target(out, force=args.force)  # refused before the training, not after
    replaced = metadata_text(out, "model_id") if is_bundle(out) else None
    samples = good_training(everything)  # names any type left without GOOD training images
    if replaced is not None and (left := retrain_text(out, config, feature_types(samples))):  # Ctrl-C time
        warnings.warn(left, stacklevel=1)
    if samples and all(s.split == "test" for s in samples):  # a test split given (DATA/<type>/test)
        warnings.warn(f"{', '.join(map(str, sources))}: none of its GOOD images is marked for training "
                      f"(train/good, or split=train in a manifest): the model fits on the "
                      f"{len(samples)} GOOD images held out for testing, and `diffqc test` leaves "
                      "them out as fit images; for a type's training images give its folder or its "
                      "train/ folder", stacklevel=1)
    start = time.perf_counter()
    det = Detector(config, device=args.device).fit(samples, progress=not args.quiet,
                                                    skip_corrupt=args.skip_corrupt)
    det.save(out, force=args.force)
    # one line a person reads: the images' fingerprints (one per image) stay in metadata.json
    training = {k: v for k, v in det.metadata["training_data"].items()
                if k not in ("fit_image_fingerprints", "calibration_image_fingerprints")}
    # what DATA holds besides: a test split, the line's defects (`results export --defects`)
    trained = {id(s) for s in samples}
    rest = [s for s in everything if id(s) not in trained]
    not_trained = {name: n for name, label in (("good", GOOD), ("defect", DEFECTIVE), ("unlabelled", UNKNOWN))
                   if (n := sum(s.label == label for s in rest))}
    previous, kept = None, out / PREVIOUS_FOLDER
    # kept unless not whole (a save cut short), which the save said
    if replaced is not None and is_bundle(kept) and metadata_text(kept, "model_id") == replaced:
        # say where it is, and what it costs: an edge box's disk is small
        previous = {"folder": str(kept), "model_id": replaced}
        print(f"the model it replaces ({replaced}) is kept in {path_text(kept)} "
              f"({folder_bytes(kept) / 1e6:.0f} MB; `diffqc train --undo --out {path_text(out)}` puts it "
              "back, a running serve or watch follows): delete the folder for its room", file=sys.stderr)
    size = sum((out / name).stat().st_size for name in BUNDLE_FILES)  # what a copy to an edge box takes
    print(json_line({"model": str(out), "classes": det.classes_, "method": config.method,
                      "bundle_mb": round(size / 1e6, 1),
                      "seconds": round(time.perf_counter() - start, 1), "training_data": training,
                      "not_trained_on": not_trained, "previous": previous}))
    return EXIT_OK


def _expand_images(paths: Sequence[str], leave_out: Path | None = None) -> list[tuple[Path, Path]]:
    """``(image, name)`` for every image file given or found under a folder given; ``name`` is
    its path relative to that folder (for a file given alone: its file name). A pattern that
    names no file (``*.png`` as Windows' shells, a quoted argument or a subprocess list pass
    it) is expanded as a shell would; one that matches nothing is a :class:`DatasetError`. A
    folder or pattern does not find files under ``leave_out`` (``--heatmaps``'s folder: put
    inside the folder inspected, a second run scored the first run's heat maps as parts)."""
    import glob

    from diffqc.data import OTHER_IMAGE_SUFFIXES, is_hidden, is_image_file, unread_images_note

    skip = leave_out.resolve() if leave_out is not None else None

    def found(q: Path) -> bool:
        return skip is None or not q.resolve().is_relative_to(skip)

    out: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if not p.exists() and any(c in str(p) for c in "*?["):
            if not (matches := sorted(glob.glob(str(p), recursive=True))):
                raise DatasetError(f"no file matches {str(p)!r}")
            out += [(q, name) for q, name in _expand_images(matches, leave_out) if found(q)]
        elif p.is_dir():
            listed = [(q, q.relative_to(p)) for q in _files_below(p)
                      if not any(is_hidden(Path(part)) for part in q.relative_to(p).parts) and found(q)]
            here = [(q, name) for q, name in listed if is_image_file(q)]
            masks = [m for _, name in here if (m := _mask_folder(name))]
            if masks:
                warnings.warn(f"{p}: left out {len(masks)} images in "
                              f"{', '.join(f'{m}/' for m in sorted(set(masks)))} folders (masks, not "
                              "parts; name a file to inspect it)", stacklevel=2)
            out += [(q, name) for q, name in here if not _mask_folder(name)]
            if unread := [q for q, _ in listed if q.suffix.lower() in OTHER_IMAGE_SUFFIXES and q.is_file()]:
                warnings.warn(f"{p}: left out {unread_images_note(unread)}", stacklevel=2)
        else:
            out.append((p, Path(p.name)))
    return out


def _files_below(folder: Path) -> list[Path]:
    """The files below ``folder``, sorted, linked sub-folders followed (a camera's share linked
    in, as ``watch`` reads it); a folder reached twice (a link to one above it, two links to one
    share) is read once; hidden folders are not read."""
    from diffqc.data import is_hidden

    seen: set[Path] = set()
    found: list[Path] = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        if (resolved := Path(here).resolve()) in seen:
            dirs[:] = []
            continue
        seen.add(resolved)
        dirs[:] = sorted(d for d in dirs if not is_hidden(Path(d)))  # the first of two links reads it
        found += [Path(here) / f for f in files]
    return sorted(found)


def _mask_folder(name: Path) -> str | None:
    """The folder of masks (an MVTec type's ``ground_truth/``) an image below a folder given is
    in, else None: a mask is not a part."""
    from diffqc.data import MASK_FOLDER_NAMES

    return next((folder for folder in name.parts[:-1] if folder.lower() in MASK_FOLDER_NAMES), None)


def cmd_inspect(args: argparse.Namespace) -> int:
    from diffqc.bundle import check_bundle_files
    from diffqc.data import IMAGE_SUFFIXES
    from diffqc.runtime import runtime_from_args
    from diffqc.visualize import heatmap_folder

    check_bundle_files(args.model)  # first: `inspect DATA MODEL` is not "no images in MODEL"
    images = _expand_images(args.images, Path(args.heatmaps) if args.heatmaps else None)
    if not images:
        raise DatasetError(f"no images in {', '.join(args.images)} (looked for "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    if args.heatmaps:
        heatmap_folder(Path(args.heatmaps))
    det = runtime_from_args(args, args.model)
    if args.feature_type is not None:
        det.type_index(args.feature_type)  # fail early on an unknown type
    csv_out = _CsvRows(Path(args.csv), force=args.force) if args.csv else None  # before any work
    try:
        _inspect_images(args, det, images, csv_out)
    finally:
        if csv_out is not None:
            csv_out.close()
    return EXIT_OK


def _inspect_images(args: argparse.Namespace, det: Any, images: list[tuple[Path, Path]],
                    csv_out: _CsvRows | None) -> None:
    from diffqc.data import file_compression, folder_like_a_type, read_image, type_of_folders
    from diffqc.inspection import ImageCheck
    from diffqc.visualize import write_heatmap

    image_check = ImageCheck(det.metadata)
    summary = det.calibration_.summary() if det.calibration_ is not None else {}
    named: set[Path] = set()  # the folders named almost as a type, warned of once each
    for path, name in images:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            _report_row({"path": path_text(path), "error": path_text(str(exc))}, csv_out)
            if not args.skip_corrupt:
                raise
            continue
        start = time.perf_counter()
        feature_type = args.feature_type or type_of_folders(path.parent.parts, det.classes_)
        near = None if feature_type else folder_like_a_type(path.parent.parts, det.classes_)
        if near is not None and (like := Path(*path.parent.parts[: near[0] + 1])) not in named:
            named.add(like)
            warnings.warn(f"folder {path_text(like)}/{near[1]}", stacklevel=1)
        # checked below, with its file's compression
        (result,) = det.inspect([image], [feature_type], check_images=False)
        if note := image_check(result.feature_type, image.shape[0], image.shape[1], image,
                               file_compression(path)):
            warnings.warn(note, stacklevel=1)
        row: dict[str, Any] = {"path": path_text(path), **result.to_json(),
                               "latency_ms": round(1000 * (time.perf_counter() - start), 1)}
        if args.heatmaps and result.anomaly_map is not None:
            try:
                out = write_heatmap(Path(args.heatmaps), name, image, result, summary,
                                    gain=det.config.backbone.input_gain, max_side=args.heatmap_size)
            except OSError:  # a full disk: the image's result is still reported, then the run stops
                _report_row(row, csv_out)
                raise
            row["heatmap"] = path_text(out)
        _report_row(row, csv_out)


CSV_COLUMNS = ("path", "feature_type", "predicted_type", "score", "p_value", "decision", "heatmap", "error")


class _CsvRows:
    """``--csv``: one row per image, on disk as soon as it is written (a long batch run keeps every
    finished row). A row that cannot be written (full disk) is taken back whole, so the file ends
    with the last complete row, and is an :class:`OutputError` naming the file. An existing file
    is replaced only if it is an earlier one, and only with ``force``; a device or a pipe
    (``/dev/stdout``) is written into as it is."""

    def __init__(self, path: Path, *, force: bool) -> None:
        self.path = path
        check_output_file(path, option="--csv", is_ours=is_csv_table(CSV_COLUMNS), what="inspect CSV",
                          force=force)
        self._stream = is_stream(path)
        try:
            self._fh = (open_stream(path) if self._stream
                        else open(path, "wb" if path.exists() else "xb", buffering=0))  # noqa: SIM115
        except FileExistsError:  # written by something else since it was checked
            raise OutputError(f"--csv {path} appeared meanwhile; give a new file name") from None
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            self._write(dict(zip(CSV_COLUMNS, CSV_COLUMNS, strict=True)))
        except OutputError:
            self._fh.close()
            raise

    def add(self, row: dict[str, Any]) -> None:
        self._write({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})

    def _write(self, row: dict[str, Any]) -> None:
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)
        start = None if self._stream else self._fh.tell()
        try:
            write_all(self._fh, text.getvalue().encode("utf-8"))
        except OSError as exc:
            with contextlib.suppress(OSError):
                if start is not None:
                    self._fh.truncate(start)
            kept = "" if start is None else "; it holds every row before this one"
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}{kept}") from None

    def close(self) -> None:
        self._fh.close()


def _report_row(row: dict[str, Any], csv_out: _CsvRows | None) -> None:
    """One inspected image: a JSON line on stdout and, with ``--csv``, a CSV row."""
    print(json_line(row), flush=True)  # a reader of the pipe (jq, a script) has it now
    if csv_out is not None:
        csv_out.add(row)


def cmd_demo(args: argparse.Namespace) -> int:
    from diffqc.bundle import check_bundle_target
    from diffqc.demo import DEMO_DEFAULTS, check_parts, is_demo_table, run_demo
    from diffqc.synth import check_arguments, check_target

    check_parts(args.parts)
    try:
        check_arguments(args.parts, names=SYNTH_OPTIONS)
    except ValueError as exc:
        raise ConfigError(f"demo: {exc}") from None
    try:  # --out's data/ and model/ are checked before any work (an earlier demo's are replaced)
        check_target(Path(args.out) / "data")
    except FileExistsError as exc:
        raise OutputError(f"demo: {exc}; or choose another --out") from None
    try:
        check_bundle_target(Path(args.out) / "model")
    except OutputError:
        raise OutputError(f"demo: {Path(args.out) / 'model'} holds files that are not a diffqc model "
                          "bundle (nothing in it is deleted); choose another --out") from None
    if args.json:
        check_output_file(Path(args.json), option="demo: --json", is_ours=is_demo_table,
                          what="demo's table")
    config = build_config(args, DEMO_DEFAULTS)
    rows = run_demo(Path(args.out), config=config, n_parts=args.parts, seed=args.data_seed,
                    json_path=Path(args.json) if args.json else None, progress=not args.quiet,
                    device=args.device)
    return EXIT_OK if rows else EXIT_ERROR


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffqc",
        description="Good-only visual quality control with a class-conditional diffusion model.",
    )
    parser.add_argument("--version", action="version", version=f"diffqc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="ACTION")
    synth = data.add_parser("synth", help="write the synthetic inkjet-print dataset (MVTec layout)")
    synth.add_argument("out", type=path_value,
                       help="folder to write: new, empty, or an earlier synthetic dataset")
    synth.add_argument("--parts", type=int, default=1327,
                       help="images in all, spread over the 8 types (default 1327)")
    synth.add_argument("--seed", type=SEED, default=0, help="the same seed writes the same images")
    synth.add_argument("--size", type=int, default=256,
                       help="image side in pixels (default 256, at most 4096)")
    synth.add_argument("--overwrite", action="store_true",
                       help="kept for compatibility: an earlier synthetic dataset in OUT is always "
                            "replaced, and any other non-empty folder refused")
    synth.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    synth.set_defaults(func=cmd_synth)
    info = data.add_parser("info", help="what diffqc reads in a dataset, per type (before a train)")
    info.add_argument("data", type=path_value, help="dataset folder (MVTec layout, or <type>/good folders) "
                      "or CSV manifest")
    info.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    info.set_defaults(func=cmd_data_info)

    train = sub.add_parser("train", help="fit and calibrate a model on GOOD images")
    train.add_argument("data", type=path_name, nargs="*",
                       help="dataset folder (MVTec layout, or <type>/good + <type>/<kind> "
                       "folders) or CSV manifest; several are fitted on together (a dataset and "
                       "`results export`s of the line's parts reviewed GOOD)")
    train.add_argument("--out", required=True, type=path_value,
                       help="model bundle folder to write: new, empty, or an earlier bundle (kept whole "
                       "in its previous/ folder)")
    train.add_argument("--force", action="store_true",
                       help="write into a non-empty folder that is not a bundle (deletes and replaces "
                            "nothing)")
    train.add_argument("--undo", action="store_true",
                       help="put back the model the last train into --out replaced, kept in its "
                       "previous/ folder (the current one is kept there in turn: --undo again redoes it)")
    add_model_options(train)
    train.add_argument("--skip-corrupt", action="store_true", help="skip and list unreadable images")
    train.add_argument("--device", default=None, help=DEVICE)
    train.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    train.set_defaults(func=cmd_train)

    insp = sub.add_parser("inspect", help="score images: one JSON line per image")
    insp.add_argument("model", type=path_value, help="model bundle folder (from diffqc train)")
    insp.add_argument("images", nargs="+", type=path_name, help="image files or folders")
    insp.add_argument("--feature-type", default=None,
                      help="the images' type (default: the nearest folder of each image's path "
                      "named after a model type, else the type router's pick)")
    insp.add_argument("--heatmaps", type=path_name, default=None, help="folder for heat-map overlay PNGs")
    insp.add_argument("--heatmap-size", type=NON_NEGATIVE, default=0, metavar="PX",
                      help="the image's longer side in a heat map (default 0: its own size; "
                      "serve and watch draw theirs within 768)")
    insp.add_argument("--csv", type=path_name, default=None, metavar="PATH",
                      help="also write one CSV row per image (path, types, score, p-value, decision, "
                           "heat map)")
    insp.add_argument("--force", action="store_true",
                      help="replace an earlier --csv table (never another file)")
    insp.add_argument("--skip-corrupt", action="store_true",
                      help="skip unreadable images, named on stderr (default: stop at the first)")
    insp.add_argument("--device", default=None, help=DEVICE)
    add_runtime_arguments(insp)
    insp.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="synthesise -> train -> calibrate -> inspect -> table")
    demo.add_argument("--out", type=path_name, default="diffqc-demo",
                      help="working folder (default: ./diffqc-demo)")
    demo.add_argument("--parts", type=int, default=1327,
                      help="synthetic images in all, spread over the 8 types (default 1327)")
    demo.add_argument("--data-seed", type=SEED, default=0, help="seed of the synthetic images")
    demo.add_argument("--json", type=path_name, default=None, help="also write the table as JSON rows")
    add_model_options(demo)
    demo.add_argument("--device", default=None, help=DEVICE)
    demo.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    demo.set_defaults(func=cmd_demo)

    for register in _optional_registrars():
        register(sub)
    return parser


def _optional_registrars() -> list[Callable[[Any], None]]:
    """Sub-commands whose modules pull optional dependencies register themselves lazily."""
    regs: list[Callable[[Any], None]] = []
    for module, name in (("diffqc.commands", "add_evaluate_command"),
                         ("diffqc.commands", "add_test_command"),
                         ("diffqc.commands", "add_export_command"),
                         ("diffqc.recalibrate", "add_calibrate_command"),
                         ("diffqc.service", "add_service_commands")):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError:
            continue
        fn = getattr(mod, name, None)
        if fn is not None:
            regs.append(fn)
    return regs


def _one_line_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints each warning as one line, and a text said once
    per command (a dataset read twice, by ``export`` say, names what it leaves out once)."""
    said: set[str] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = path_text(str(message))
        if text not in said:
            said.add(text)
            _say(logging.WARNING, f"diffqc: warning: {text}")

    return show


def _describe(exc: BaseException) -> str:
    """One line: the message; for a bare OSError its file name and reason."""
    if isinstance(exc, OSError) and not isinstance(exc, DiffqcError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _stdout_is_gone() -> bool:
    """True when the reader of stdout has gone (a pipe into ``head``): the pipe reports an error
    condition. stdout then points at /dev/null, so that the interpreter's last flush does not fail
    a second time."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (captured)
        return False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return False
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def _escaping_streams() -> None:
    """Standard output and error write what their encoding cannot as escapes (``\\xfc``) where a
    type's or file's name ended the command in a UnicodeEncodeError (a Windows pipe's code page,
    an old system's ISO 8859-1 locale)."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` names (``diffqc results list``'s), else ``parser``."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if sub is None or name not in sub.choices:
            return parser
        parser = sub.choices[name]


# a result store's file, by its ending or its first bytes (the results commands take it as --db)
STORE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_HEADER = b"SQLite format 3\x00"


def _is_store(arg: str) -> bool:
    if arg.startswith(("postgresql://", "postgres://")) or arg.lower().endswith(STORE_SUFFIXES):
        return True
    try:
        with open(arg, "rb") as fh:
            return fh.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


# the field's names for the rate calibration targets (diffqc's: the share of GOOD parts flagged)
FPR_OPTIONS = ("--fpr", "--target-fpr", "--false-positive-rate", "--fp-rate")


def _take_late_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         unknown: list[str]) -> list[str]:
    """Arguments given after a command's options (``calibrate MODEL --alpha-review 0.02 DATA``,
    ``inspect MODEL a.png --feature-type dots b.png``), which argparse leaves over once it has
    filled the positionals before them, taken into those that have room (an optional one not
    given, a list), as a shell user means them and ``parse_intermixed_args`` would; what is left
    is refused. Left alone when an unknown option is among them (its value is no argument)."""
    if any(arg.startswith("-") and arg != "-" for arg in unknown):
        return unknown
    left = list(unknown)
    for action in parser._actions:
        if action.option_strings or not left or action.nargs not in ("?", "+", "*"):
            continue
        convert = action.type if callable(action.type) else str
        try:
            if action.nargs == "?":
                if getattr(args, action.dest) is not None:
                    continue
                setattr(args, action.dest, convert(left.pop(0)))
            else:
                setattr(args, action.dest, [*(getattr(args, action.dest) or []), *map(convert, left)])
                left = []
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            parser.error(f"argument {action.dest}: {exc}")
    return left


def _refuse_unknown_options(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    """argparse's "unrecognized arguments", from the command's parser, with the option an
    unknown one likely meant (``--tokn``: ``--token``; ``--fpr``: ``--alpha-review``), or, for a
    command that takes ``--db``, that a result store given as an argument (``results list
    lineA.db``) is given so, or that an argument given as an option (``inspect --model M``) is
    an argument."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    meant = next((hint for arg in unknown if arg.startswith("--")
                  and (hint := did_you_mean_name(arg.partition("=")[0], options, "-"))), "")
    if not meant and any(arg.partition("=")[0].lower() in FPR_OPTIONS for arg in unknown):
        if "--alpha-review" in options:
            meant = (" (the target false-positive rate, the share of GOOD parts flagged, is --alpha-review; "
                     "REJECT's --alpha-reject)")
        elif "--set" in options:
            meant = (" (the target false-positive rate, the share of GOOD parts flagged, is --set "
                     "calibration.alpha_review=A; REJECT's calibration.alpha_reject)")
    store = next((arg for arg in unknown if "--db" in options and not arg.startswith("-") and _is_store(arg)),
                 None)
    if store is not None and not meant:
        meant = f" (the result store is given as --db: --db {store})"
    from diffqc.data import IMAGE_SUFFIXES

    positionals = [a for a in parser._actions if not a.option_strings and isinstance(a.dest, str)]
    names = {a.dest.replace("_", "-") for a in positionals}
    images = [arg for arg in unknown if Path(arg).suffix.lower() in IMAGE_SUFFIXES]
    if images and "dir" in names and not meant:  # `watch incoming/*.png MODEL`, as the shell expands it
        meant = (f" ({parser.prog} takes the folder the images are written into, not images: "
                 f"{parser.prog} {Path(images[0]).parent} MODEL)")
    given = next((name for arg in unknown if (name := arg.partition("=")[0][2:]) in names
                  and arg.startswith("--")), None)
    if given is not None and not meant:  # `--model M`, as anomalib and most tools take it
        usage = " ".join(f"[{a.dest.upper()}]" if a.nargs == "?"
                         else a.dest.upper() + " ..." * (a.nargs in ("+", "*")) for a in positionals)
        meant = f" ({given} is an argument of {parser.prog}, not an option: {parser.prog} {usage})"
    parser.error(f"unrecognized arguments: {' '.join(unknown)}{meant}")


def main(argv: Sequence[str] | None = None) -> int:
    _escaping_streams()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # usage errors: argparse says so and exits 2
    if unknown:
        unknown = _take_late_arguments(_command_parser(parser, args), args, unknown)
    if unknown:  # by the command's parser, with its usage: the root's named no option of it
        _refuse_unknown_options(_command_parser(parser, args), unknown)
    if not getattr(args, "func", None):
        group = _command_parser(parser, args)
        actions = next((a for a in group._actions if isinstance(a, argparse._SubParsersAction)), None)
        if group is not parser and actions is not None:  # `diffqc results`: its own usage and actions
            group.error(f"the following arguments are required: ACTION ({', '.join(actions.choices)})")
        parser.print_help()
        return EXIT_USAGE
    try:
        traceback = env_flag("DIFFQC_TRACEBACK")
    except ConfigError as exc:
        _last_word(args, "ERROR", str(exc))
        return EXIT_ERROR
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warnings()
        try:
            return int(args.func(args))
        except (DiffqcError, OSError) as exc:  # the user's input or the machine, not a bug
            if isinstance(exc, BrokenPipeError) and _stdout_is_gone():
                return EXIT_ERROR  # `diffqc inspect ... | head`: the reader has what it wanted
            if traceback:
                raise
            hint = ""
            if isinstance(exc, ImageReadError) and getattr(args, "skip_corrupt", True) is False:
                hint = " (pass --skip-corrupt to leave unreadable images out)"
            _last_word(args, "ERROR", f"{path_text(_describe(exc))}{hint}")
            return EXIT_ERROR
        except (MemoryError, RuntimeError) as exc:  # a job larger than the machine: say so
            said = out_of_memory(exc)
            if said is None or traceback:
                raise
            _last_word(args, "ERROR", f"{said}; DIFFQC_TRACEBACK=1 shows where")
            return EXIT_ERROR
        except KeyboardInterrupt:
            pass
    # out of the handler, the interrupted job's frames are gone: its progress bars close (and end
    # their lines) now, not after the message as the process ends
    gc.collect()
    _last_word(args, "INFO", "interrupted")
    return 130


def _last_word(args: argparse.Namespace, level: str, text: str) -> None:
    """``diffqc: error: TEXT`` (or ``diffqc: interrupted``) on stderr; for a command whose log
    is JSON lines (``serve``/``watch --log-format json``), a JSON line of ``level`` instead."""
    if getattr(args, "log_format", "text") == "json":
        from diffqc.service.logs import json_log_line

        _say(getattr(logging, level), json_log_line(level, text))
    else:
        _say(getattr(logging, level), f"diffqc: {'error: ' if level == 'ERROR' else ''}{text}")


def _say(levelno: int, line: str) -> None:
    """``line`` on stderr; on a systemd unit's journal, at ``levelno``'s priority."""
    from diffqc.service.logs import for_journal, on_journal

    print(for_journal(line, levelno) if on_journal() else line, file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
