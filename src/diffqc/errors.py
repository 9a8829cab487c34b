"""One error hierarchy for diffqc: every error a user can cause is a :class:`DiffqcError`.

The CLI and the service each have one error boundary that turns a ``DiffqcError`` into a clear
message (exit code 1, or a 4xx/5xx JSON body with a ``code``), and a job larger than the machine's
memory into ``out of memory ...`` (:func:`out_of_memory`); anything else is a bug and keeps its
traceback. Each kind keeps the built-in base it had before (``ValueError`` for bad input,
``RuntimeError`` for an unusable environment) so ``except ValueError`` in user code still works.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path


class DiffqcError(Exception):
    """Base of every error diffqc raises on purpose; ``code`` is a stable machine-readable kind."""

    code = "diffqc_error"


class ConfigError(DiffqcError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""

    code = "bad_config"


class DatasetError(DiffqcError, ValueError):
    """A dataset folder or manifest is not usable; the message says why and where."""

    code = "bad_dataset"


class ImageReadError(DiffqcError, ValueError):
    """An image file or buffer could not be decoded; the message names the file."""

    code = "bad_image"

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def decimal_comma(text: str) -> str:
    """``: write the decimal with a point, 0.05`` for a number written with a decimal comma
    (``0,05``, as German and French write it), else ``""``. Not taken as the number: a comma
    also separates thousands."""
    written = text.strip().replace(",", ".", 1)
    if text.count(",") != 1:
        return ""
    try:
        float(written.removesuffix("%"))
    except ValueError:
        return ""
    return f": write the decimal with a point, {written}"


def percent_share(text: str) -> float | None:
    """The share a percentage written as ``5%`` means (0.05); None for any other text."""
    body = text.strip()
    try:
        value = float(body[:-1]) / 100 if body.endswith("%") else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def percent_written(text: str) -> str:
    """``: write the share as a number, 0.05`` for a share written as a percentage (``5%``, as
    ``calibrate --alpha-review`` takes it), else ``""``."""
    value = percent_share(text)
    return f": write the share as a number, {value:g}" if value is not None else ""


def percent_meant(value: float) -> str:
    """``: for 5 % write 0.05`` for a share given as a number from 1 to 100 (a 5 meant as 5 %),
    else ``""``."""
    return f": for {value:g} % write {value / 100:g}" if 1 <= value < 100 else ""


def first_few(items: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` of ``items`` joined by "; ", and how many more there are: a message
    that names a long list's files without printing them all."""
    more = len(items) - shown
    return "; ".join(items[:shown]) + (f"; and {more} more" if more > 0 else "")


class UnreadableImagesError(ImageReadError):
    """Several images could not be decoded: all of them are named (the first few in the message,
    every one in ``errors``), so a dataset is mended in one pass rather than one file per run."""

    shown = 5

    def __init__(self, errors: Sequence[ImageReadError]) -> None:
        if not errors:
            raise ValueError("UnreadableImagesError needs at least one ImageReadError")
        self.errors = list(errors)
        listed = first_few([f"{e.source} ({e.reason})" for e in self.errors], self.shown)
        reason = f"{len(self.errors)} unreadable image{'s' if len(self.errors) > 1 else ''}: {listed}"
        DiffqcError.__init__(self, reason)
        self.source = self.errors[0].source
        self.reason = reason


class UnknownFeatureTypeError(DiffqcError, ValueError):
    """A feature type the model was not trained on."""

    code = "unknown_feature_type"


def unknown_feature_type(name: str, known: Sequence[str]) -> UnknownFeatureTypeError:
    """The error for a type the model does not know: the types it knows and the near miss meant."""
    return UnknownFeatureTypeError(
        f"unknown feature type {name!r}{did_you_mean(name, known)}; this model knows {', '.join(known)}")


def type_key(name: str) -> str:
    """A feature type's name without case, spaces and punctuation: "Edge1", "edge 1" and
    "edge-1" share one. Types are matched exactly; this finds the near misses a person meant as one."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean 'dots'?)`` for a near miss of a known type (another case, a space, a
    typo: "Dots", "edge 1", "egde1"), else ``""``. Types are matched exactly; this only names
    the likely one."""
    same = [k for k in known if type_key(k) == type_key(name)]
    close = same or difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close and close[0] != name else ""


def did_you_mean_name(name: str, known: Sequence[str], sep: str) -> str:
    """:func:`did_you_mean` for an option's or a field's name, or the one known name whose last
    word ``name`` is (words split at ``sep``): ``--type`` meant ``--feature-type``, a field
    ``type`` ``feature_type``, as a person shortens a long name; ``""`` when none or several end
    so."""
    ending = [k for k in known if k.endswith(sep + name.lstrip("-"))]
    return did_you_mean(name, known) or (f" (did you mean {ending[0]!r}?)" if len(ending) == 1 else "")


_SHARE_URL = re.compile(r"(?i)(smb|cifs|nfs)://?([^/]+)/?(.*)")  # a Path keeps one '/'
_UNC = re.compile(r"\\\\([^\\]+)\\?(.*)")  # \\nas\share\dir, as Windows names a share's folder
_URL = re.compile(r"(?i)([a-z][a-z0-9+.-]+):/")  # ftp://, sftp://, https://: a URL (C:/ is a drive)


def address_hint(given: str) -> str:
    """For a path given as a share's address, as a file manager shows it (``smb://nas/qc/cam1``,
    ``\\\\nas\\qc\\cam1``, ``nfs://nas/export``), or as a URL (``file://``, ``ftp://``,
    ``https://``), which name nothing here: `` (... mount it ... and give /mnt/qc/cam1)``, what to
    give; else ``""``."""
    if given.lower().startswith("file:/"):
        return f" ({given} is a URL: give the path, {'/' + given[5:].lstrip('/')})"
    if (found := _SHARE_URL.fullmatch(given)) and found[1].lower() == "nfs":
        export = found[3].strip("/")
        point = f"/mnt/{export.rsplit('/', 1)[-1] or found[2]}"
        return (f" ({given} is a share's address, not a path here: mount it, mount -t nfs "
                f"{found[2]}:/{export} {point}, and give {point})")
    if found:
        host, path = found[2], found[3]
    elif found := _UNC.fullmatch(given):
        host, path = found[1], found[2].replace("\\", "/")
    elif found := _URL.match(given):
        fetch = "download it, and give the file's" if found[1].lower() in ("http", "https") else \
            "copy it here, or mount it, and give its"
        return f" ({given} is a URL, not a path here: {fetch} path)"
    else:
        return ""
    share, _, rest = path.strip("/").partition("/")  # SMB's share is the first name of the path
    point = f"/mnt/{share or host}"
    return (f" ({given} is a share's address, not a path here: mount it, mount -t cifs //{host}/{share} "
            f"{point}, and give {point}{'/' + rest if rest else ''})")


class FoldError(DiffqcError, ValueError):
    """The requested folds cannot be built (too few groups for k, bad k, ...)."""

    code = "bad_folds"


class BundleError(DiffqcError, RuntimeError):
    """A model bundle is missing, damaged, partial or does not match this code."""

    code = "bad_bundle"


class NotFittedError(DiffqcError, RuntimeError):
    """A detector used before ``fit()`` or ``Detector.load()`` (scikit-learn's name)."""

    code = "not_fitted"

    def __init__(self) -> None:
        super().__init__("the detector is not fitted; call fit() or Detector.load()")


class BackboneError(DiffqcError, RuntimeError):
    """The backbone or its weights are not available."""

    code = "backbone_unavailable"


class DeviceError(DiffqcError, RuntimeError):
    """The requested compute device (e.g. ``cuda``) is not available here."""

    code = "device_unavailable"


DEVICES = "cpu, cuda or cuda:N"


def check_device_name(device: object) -> None:
    """``device`` names one diffqc runs on: None or ``auto`` (pick), ``cpu``, ``cuda`` or ``cuda:N``
    (a ``torch.device`` too); anything else (``gpu``, ``mps``) is a :class:`DeviceError`. Checked
    without PyTorch, which a bundle ONNX Runtime runs does not import; whether CUDA is usable here
    is :func:`diffqc.backbone.resolve_device`'s to say."""
    if device is None or re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        return
    raise DeviceError(f"device {str(device)!r} is not supported; use {DEVICES}")


class RuntimeUnavailableError(DiffqcError, RuntimeError):
    """An inference runtime (or the exported model it needs) is not available."""

    code = "runtime_unavailable"


class ExportError(DiffqcError, RuntimeError):
    """The export could not be made, or failed its checks."""

    code = "export_failed"


class OutputError(DiffqcError, OSError):
    """An output could not be written (full disk, unwritable or non-empty folder, ...)."""

    code = "output_error"


class StoreError(DiffqcError, RuntimeError):
    """The result store cannot be opened or used."""

    code = "store_unavailable"


_TORCH_ALLOCATION = re.compile(r"tried to allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]?i?B)")


def out_of_memory(exc: BaseException) -> str | None:
    """``out of memory ...`` for an allocation that found no room, None for any other error:
    Python's MemoryError (NumPy's included), or PyTorch's, which is no MemoryError: the CPU
    allocator's RuntimeError, CUDA's ``torch.OutOfMemoryError``. PyTorch's says how much it asked."""
    if isinstance(exc, MemoryError):
        return f"out of memory ({' '.join(str(exc).split())})" if str(exc) else "out of memory"
    text = str(exc)
    cuda = type(exc).__name__ == "OutOfMemoryError"
    if not cuda and "can't allocate memory" not in text:
        return None
    found = _TORCH_ALLOCATION.search(text)
    if found is None:
        size = ""
    elif found.group(1):
        size = f": it tried to allocate {_binary_size(int(found.group(1)))} at once"
    else:
        size = f": it tried to allocate {found.group(2)} at once"
    return f"out of memory{' on the GPU' if cuda else ''}{size}"


def _binary_size(n: int) -> str:
    """``n`` bytes as PyTorch's CUDA allocator says them: ``272.8 TiB``."""
    size, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def why_unwritable(folder: Path) -> str:
    """Why this process may not write in ``folder``, which it may not: a read-only file system
    (a read-only share or volume, a systemd unit's ``ProtectSystem=strict`` without
    ``ReadWritePaths=``), else a permission, naming the user this process runs as (a systemd
    unit's dynamic user, say), or what asking said."""
    statvfs = getattr(os, "statvfs", None)  # not on Windows
    try:
        read_only = statvfs is not None and statvfs(folder).f_flag & os.ST_RDONLY
    except OSError as exc:
        return exc.strerror or str(exc)
    return "Read-only file system" if read_only else f"permission denied for user {_user_name()}"


def _user_name() -> str:
    try:
        import pwd  # not on Windows

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USERNAME") or "unknown"
