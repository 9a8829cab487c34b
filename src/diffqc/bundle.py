"""The one reader of a model bundle's description: ``config.json``, ``metadata.json`` and
``calibration.json``, each checked, without PyTorch. The PyTorch :class:`~diffqc.model.Detector`
adds the weights; the exported detector (:mod:`diffqc.runtime`) the ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffqc.calibration import Calibrator
from diffqc.config import DetectorConfig
from diffqc.errors import BundleError
from diffqc.inspection import BUNDLE_FILES, check_bundle_version, sha256_file

WEIGHTS_FILE = "weights.safetensors"


def check_bundle_files(path: Path | str, *, usage: str = "it comes first: diffqc COMMAND MODEL ...") -> Path:
    """``path`` if it holds a bundle's files (their content is :func:`read_bundle`'s to check);
    a :class:`BundleError` otherwise, that tells a damaged bundle from another folder (and for
    another folder ends with ``usage``: where the command takes its bundle)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"model bundle {path} does not exist or is not a folder")
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
        meta = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"model bundle {path}: metadata.json is damaged ({exc})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"model bundle {path}: metadata.json is damaged (not an object)")
    check_bundle_version(path, meta)
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"model bundle {path}: metadata.json is damaged (classes: {classes!r})")
    try:
        config = DetectorConfig.from_json(path / "config.json")
    except ValueError as exc:
        raise BundleError(f"model bundle {path}: config.json is damaged ({exc})") from None
    cal = Calibrator.from_file(path / "calibration.json")
    if set(cal.known) != set(classes):
        raise BundleError(f"model bundle {path}: calibration types {sorted(cal.known)} != classes {classes}")
    return config, meta, cal


def check_weights(path: Path | str, meta: dict[str, Any]) -> None:
    """The weights file matches the checksum ``metadata.json`` recorded, else a BundleError."""
    expected = meta.get("weights_file_sha256")
    if expected and sha256_file(Path(path) / WEIGHTS_FILE) != expected:
        raise BundleError(f"model bundle {path}: {WEIGHTS_FILE} is damaged (checksum mismatch)")
