"""The arguments of the commands whose modules are heavy (``evaluate``, ``export``: PyTorch,
matplotlib, ONNX). Registering them imports nothing but argparse; a command imports its module
when it runs, so that ``diffqc --version``, ``inspect`` on an exported bundle and ``serve`` do
not pay for what they do not use."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffqc.arguments import (
    DEVICE,
    NON_NEGATIVE,
    POSITIVE,
    QUIET,
    SEED,
    THREADS,
    integer,
    path_name,
    path_value,
)
from diffqc.config import METHODS


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command function that imports ``module`` when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    run.__name__ = name
    return run


def add_model_options(p: argparse.ArgumentParser, *, method_and_seed: bool = True,
                      set_help: str = "any config field, e.g. --set scoring.topk=0.02 (repeatable)"
                      ) -> None:
    """The options that shape a model (shortcuts for config fields, see :func:`model_overrides`)
    and ``--set``: ``train`` and ``demo`` have them all; ``evaluate``, which compares methods and
    has a seed of its own (the folds'), all but ``--method`` and ``--seed``."""
    if method_and_seed:
        p.add_argument("--method", choices=list(METHODS), default=None,
                       help="scoring method (default: diffusion)")
    p.add_argument("--backbone", default=None,
                   help="mobilenet-v2 (default), efficientnet-lite0, efficientnet-lite1, efficientnet-lite2 "
                        "or onnx:PATH")
    p.add_argument("--layers", default=None, help="comma-separated backbone layers to tap")
    p.add_argument("--steps", type=int, default=None,
                   help="train the residual denoiser N steps (default: train.steps, 0 = the Gaussians alone)")
    if method_and_seed:
        p.add_argument("--seed", type=int, default=None,
                       help="seed of the calibration split and the denoiser's training (default 0)")
    p.add_argument("--fit", choices=["squash", "pad", "crop"], default=None,
                   help="how images of another shape become the square input: squash (default), "
                        "pad (letterbox, aspect kept) or crop (centre square)")
    p.add_argument("--tile", action="store_true",
                   help="cut images larger than the input into overlapping input-sized tiles "
                        "(--set tiling.overlap=0.25 --set tiling.scale=1.0)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def model_overrides(args: argparse.Namespace, *, seed: bool = True) -> dict[str, Any]:
    """The config fields the options of :func:`add_model_options` set (``--set`` aside);
    ``seed=False`` where ``--seed`` is not the training seed (``evaluate``'s is the folds')."""
    over: dict[str, Any] = {}
    if getattr(args, "method", None):
        over["method"] = args.method
    if getattr(args, "backbone", None):
        over["backbone.name"] = args.backbone
    if getattr(args, "layers", None):
        over["backbone.layers"] = [x.strip() for x in args.layers.split(",") if x.strip()]
    if getattr(args, "steps", None) is not None:
        over["train.steps"] = args.steps
    if seed and getattr(args, "seed", None) is not None:
        over["train.seed"] = args.seed
    if getattr(args, "fit", None):
        over["backbone.resize"] = args.fit
    if getattr(args, "tile", False):
        over["tiling.mode"] = "auto"
    return over


def add_evaluate_command(subparsers: Any) -> None:
    """Register ``diffqc evaluate`` (:func:`diffqc.evaluate.cmd_evaluate`)."""
    p = subparsers.add_parser(
        "evaluate", help="k-fold cross-validated evaluation and comparison of methods -> report",
        description="Cross-validate methods (and settings) on all labelled images of DATA, grouped "
                    "by part and stratified by label per feature type (where DATA names parts seen "
                    "as images of several types, the parts are rated too, each by the worst of its "
                    "images); write report.html/.md/.json.")
    p.add_argument("data", type=path_name,
                   help="dataset folder (MVTec layout, or <type>/good + <type>/<kind> folders) "
                   "or CSV manifest (a folder's manifest.csv wins)")
    p.add_argument("--folds", type=integer(2), default=5, help="k of the k-fold split (default 5)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: diffusion,patchcore,padim)")
    p.add_argument("--out", type=path_value, default=Path("diffqc-evaluation"),
                   help="report folder (default: ./diffqc-evaluation): new, empty, or an earlier report")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not a report (deletes and replaces nothing)")
    p.add_argument("--seed", type=SEED, default=0, help="fold (and subsample) seed")
    add_model_options(p, method_and_seed=False,
                      set_help="config field for every method, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("--compare-setting", action="append", metavar="NAME:KEY=VALUE,...",
                   help="an extra variant: the first method's config with these overrides, "
                        "e.g. sep:train.separation_weight=0.1 (repeatable; method=... to change "
                        "the method)")
    p.add_argument("--gallery", type=NON_NEGATIVE, default=8,
                   help="worst misses shown per method: its lowest-scored defects and highest-scored "
                   "GOOD parts, each named by its decision (default 8)")
    p.add_argument("--n-boot", type=POSITIVE, default=1000, help="bootstrap replicates of the AUROC CI")
    p.add_argument("--max-train-good", type=integer(2), default=None,
                   help="cap GOOD training images per type and fold (seeded subsample)")
    p.add_argument("--feature-cache", type=path_value, default=None, metavar="DIR",
                   help="keep the raw backbone features in DIR so that a re-run skips extraction")
    p.add_argument("--device", default=None, help=DEVICE)
    p.add_argument("--runtime", choices=("torch", "onnx", "openvino", "auto"), default="auto",
                   help="score held-out parts with PyTorch, ONNX Runtime or OpenVINO (each fold's "
                        "diffusion model exported in memory, FP32); auto = torch")
    p.add_argument("--threads", type=THREADS, default=None, help="ONNX Runtime / OpenVINO CPU threads")
    p.add_argument("--unknown-type", action="store_true",
                   help="also score every held-out image with its type withheld (the type router "
                        "picks it): type accuracy and AUROC withheld vs given, in the printed "
                        "summary and report.json's unknown_type")
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=_lazy("diffqc.evaluate", "cmd_evaluate"))


def add_test_command(subparsers: Any) -> None:
    """Register ``diffqc test`` (:func:`diffqc.holdout.cmd_test`)."""
    from diffqc.runtime import add_runtime_arguments

    p = subparsers.add_parser(
        "test", help="score a trained model on labelled images it never saw -> per-type table",
        description="Score MODEL, as it runs (its runtime, precision and calibration), on the GOOD "
                    "and defective images of DATA: per type the image AUROC, the share of GOOD "
                    "images flagged (FPR; the target is α_review) and of defects flagged (recall); "
                    "where DATA names parts seen as images of several types (a manifest's part_id), "
                    "the parts as the service judges them, by the worst of their images. Images the "
                    "model was fit or calibrated on are left out (by content). "
                    "evaluate cross-validates methods; this measures one model.")
    p.add_argument("model", type=path_value, help="model bundle folder (from diffqc train)")
    p.add_argument("data", type=path_name,
                   help="dataset folder (MVTec layout, or <type>/good + <type>/<kind> folders) "
                   "or CSV manifest with labels")
    p.add_argument("--unknown-type", action="store_true",
                   help="withhold each image's type (the type router picks it), as for parts sent "
                        "without one")
    p.add_argument("--json", type=path_name, default=None, metavar="PATH",
                   help="also write the report (the table, what was left out, every image's score "
                        "and decision) as JSON")
    p.add_argument("--csv", type=path_name, default=None, metavar="PATH",
                   help="also write every image's row (path, type, label, defect kind, score, "
                        "p-value, decision, predicted type, heat map) as CSV, for a spreadsheet")
    p.add_argument("--force", action="store_true", help="replace an earlier --json report or --csv table")
    p.add_argument("--heatmaps", type=path_name, default=None, metavar="DIR",
                   help="heat maps of the misses: the defects that passed (DIR/missed) and the GOOD "
                        "parts flagged (DIR/flagged)")
    p.add_argument("--heatmap-size", type=NON_NEGATIVE, default=0, metavar="PX",
                   help="the image's longer side in a heat map (default 0: its own size)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images")
    p.add_argument("--device", default=None, help=DEVICE)
    add_runtime_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=_lazy("diffqc.holdout", "cmd_test"))


def add_export_command(subparsers: Any) -> None:
    """Register ``diffqc export`` (:func:`diffqc.export.cmd_export`)."""
    p = subparsers.add_parser(
        "export", help="export a model bundle to ONNX (FP32, INT8) or a TensorRT engine",
        description="Write model.onnx (the whole path: pixels + feature-type index -> anomaly map and "
                    "score), verified against PyTorch; with --int8 also model.int8.onnx with a parity "
                    "report; all recorded in export.json inside the bundle.")
    p.add_argument("model", type=path_value, help="model bundle folder (from diffqc train)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx",
                   help="onnx (default), or a TensorRT FP16 engine built from it (needs a GPU)")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 (static QDQ, per-channel)")
    p.add_argument("--calibration-data", type=path_name, default=None,
                   help="dataset (folder or CSV) whose GOOD training images calibrate INT8; its test "
                        "split is the held-out data of the parity report")
    p.add_argument("--data", type=path_name, default=None,
                   help="images to verify the export on (default: the calibration data, else synthetic)")
    p.add_argument("--held-out", type=path_name, default=None,
                   help="labelled data for the INT8 parity report")
    p.add_argument("--force", action="store_true",
                   help="keep an INT8 model that fails its parity check (never chosen automatically)")
    p.add_argument("--no-search", action="store_true",
                   help="quantize every layer (skip the search for layers to keep in float)")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--opset", type=integer(11, 23), default=None,
                   help="ONNX opset, 11-23 (default 17)")
    p.add_argument("--check-images", type=POSITIVE, default=None,
                   help="images for the FP32 check (default 16)")
    p.add_argument("--calibration-images", type=POSITIVE, default=None,
                   help="GOOD images calibrating INT8 (default 64)")
    p.add_argument("--sensitivity-images", type=POSITIVE, default=None,
                   help="GOOD images measuring each layer's INT8 error (default 16)")
    p.add_argument("--no-openvino", action="store_true",
                   help="do not check (or offer) the models on OpenVINO even when it is installed")
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET)
    p.set_defaults(func=_lazy("diffqc.export", "cmd_export"))
