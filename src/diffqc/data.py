"""Datasets of feature types: MVTec-style folders and CSV manifests -> samples; image reading.

A *feature type* is one class of crop (e.g. ``edge1``); every sample carries one.
Labels: 0 = GOOD, 1 = defective, -1 = unknown (inspection only).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffqc.errors import (
    DatasetError,
    ImageReadError,
    OutputError,
    UnreadableImagesError,
    address_hint,
    did_you_mean,
    first_few,
    type_key,
)
from diffqc.output import STDIO, path_text

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".pgm", ".ppm", ".pnm", ".pbm"})
# image formats a phone or a camera writes that diffqc does not read: named where a folder scan
# finds them, not passed over in silence as other files are
OTHER_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".dng", ".raw", ".cr2",
                                  ".cr3", ".nef", ".arw", ".psd", ".svg", ".exr", ".hdr"})
GOOD = 0
DEFECTIVE = 1
UNKNOWN = -1

# Refuse images whose header claims more pixels than this (decompression-bomb guard).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
MIN_IMAGE_SIDE = 8  # a smaller image (a thumbnail, a 1 x 1 test array) is no part
_ORIENTATION = 0x0112  # the EXIF/TIFF tag: 1 = as stored; 5-8 turn the image by 90 degrees
_TO_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """How the image must still be turned to be shown upright: its EXIF Orientation (1-8; 1 when
    absent or invalid). Pillow's TIFF reader turns TIFFs itself (its size says so before
    ``load()``, and the tag is gone after)."""
    if img.format == "TIFF":
        return 1
    value = img.getexif().get(_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img: Image.Image) -> Image.Image:
    """A loaded image as a viewer, a browser (the dashboard) and OpenCV's ``imread`` show it:
    phones and some cameras store the pixels sideways and say so in the Orientation tag."""
    orientation = _orientation(img)
    return img.transpose(_TO_UPRIGHT[orientation]) if orientation != 1 else img


def image_shape(path: Path | str) -> tuple[int, int] | None:
    """(height, width) of the image file at ``path`` as :func:`read_image` returns it, from the
    header alone (its orientation tag included); None when the header cannot be read (missing,
    not an image, a decompression bomb: :func:`read_image` names why when it reads the file)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "PNG" and "exif" not in img.info:
                return height, width  # no tag before the pixels (Pillow would decode them to look)
            return (width, height) if _orientation(img) >= 5 else (height, width)
    except (OSError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        return None


# how much of an encoded image :func:`image_compression` looks at (a WebP's chunks before its image's)
COMPRESSION_HEAD = 4096
_LOSSLESS_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",
                        b"GIF87a", b"GIF89a", *(b"P%d" % k for k in range(1, 8)))


def image_compression(data: bytes) -> str | None:
    """``"lossy"`` for an encoded image in a lossy format (JPEG; WebP's VP8), ``"lossless"`` for
    the other formats diffqc reads (PNG, BMP, TIFF, GIF, PNM; WebP's VP8L), None for bytes of
    no such image: from its signature in the first :data:`COMPRESSION_HEAD` bytes. A camera set
    to save JPEG shows every part with the format's artifacts (:class:`~diffqc.inspection.ImageCheck`)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "lossy"
    if data.startswith(_LOSSLESS_SIGNATURES):
        return "lossless"
    if not (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
        return None
    at = 12  # a WebP's chunks: VP8 (lossy) or VP8L (lossless), after VP8X's ICCP, ANIM, ALPH, ...
    while at + 8 <= min(len(data), COMPRESSION_HEAD):
        fourcc, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if fourcc in (b"VP8 ", b"VP8L"):
            return "lossy" if fourcc == b"VP8 " else "lossless"
        at += 8 + 16 if fourcc == b"ANMF" else 8 + size + (size & 1)  # into an animation's first frame
    return None


def file_compression(path: Path | str) -> str | None:
    """:func:`image_compression` of the file at ``path`` (None when it cannot be read)."""
    if str(path) == STDIO:
        return None
    try:
        with open(path, "rb") as fh:
            return image_compression(fh.read(COMPRESSION_HEAD))
    except OSError:
        return None


# the most read from a pipe or a character device as one image (/dev/zero gives for ever)
MAX_STREAM_BYTES = 256 * 2**20

# the longest feature type (and the service's part id, line, ...): the API takes no longer one
MAX_NAME_LEN = 200
MAX_SOURCE_LEN = 1000  # a record's source (a watched folder's path)


def unprintable(c: str) -> bool:
    """Control characters (C0, DEL, C1), line/paragraph separators, surrogates (a file name that
    is not UTF-8), U+FFFD (what invalid UTF-8 decodes to): never in a name the service takes."""
    o = ord(c)
    return o < 32 or 0x7F <= o <= 0x9F or o in (0x2028, 0x2029, 0xFFFD) or 0xD800 <= o <= 0xDFFF


def escaped(text: str, keep: str = "") -> str:
    """``text`` with each character :func:`unprintable` names (but those in ``keep``) written as
    Python writes it in a string literal (``\\n``, ``\\x1b``, ``\\u2028``): one printable line."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unprintable(c) and c not in keep else c
                   for c in text)


def check_type_names(types: Iterable[str]) -> None:
    """A :class:`DatasetError` for a feature type the service could not be asked about (its API
    refuses the name): longer than :data:`MAX_NAME_LEN` characters, or holding a character
    :func:`unprintable` names."""
    for name in types:
        shown = "'" + path_text(name[:60]) + ("...'" if len(name) > 60 else "'")
        if len(name) > MAX_NAME_LEN:
            raise DatasetError(f"feature type {shown} is {len(name)} characters: at most {MAX_NAME_LEN} "
                               "(the service's limit); name its folder or manifest cell shorter")
        if any(unprintable(c) for c in name):
            raise DatasetError(f"feature type {shown} holds a control character or bytes that are "
                               "not UTF-8, which the service does not take; rename its folder or "
                               "manifest cell")


@dataclass(frozen=True)
class Sample:
    """One labelled (or unlabelled) image of one feature type."""

    path: Path
    feature_type: str
    label: int = UNKNOWN
    mask_path: Path | None = None
    part_id: str | None = None
    defect: str | None = None
    split: str = "test"

    @property
    def group(self) -> str:
        """The unit that must never straddle a train/test split: the part, else the image."""
        return self.part_id if self.part_id else str(self.path)


def _fixed_scale(mode: str, lo: float, hi: float, source: str) -> float:
    """What a 32-bit image (PIL mode ``F`` or ``I``) with values ``lo..hi`` is divided by: 1 for a
    float image in [0, 1] (the convention; a resize's overshoot of 0.05 clipped, as an array's), else
    255 or 65535 as its values are 8- or 16-bit ones. Below 0 or above 65535 (a height map about a
    reference plane) is refused: a scale of its own range would read each part unlike the others."""
    if mode == "F" and lo >= -0.05 and hi <= 1.05:
        return 1.0
    if lo < 0 or hi > 65535:
        where = "below 0 (a height map about a reference plane?)" if lo < 0 else "above 65535"
        raise ImageReadError(source, f"pixel values {lo:g}..{hi:g} lie {where}: an image is read on a "
                             "fixed scale (a float image in [0, 1] as it is, else as 8- or 16-bit values), "
                             "not by its own range, which would read each part unlike the others; write "
                             "the type's images on one scale, (h - LO) / (HI - LO) for its range LO..HI, "
                             "as float TIFFs in [0, 1] or 16-bit PNGs")
    return 65535.0 if hi > 255 else 255.0


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info)


def _padding(rgba: Image.Image) -> bool:
    """An alpha of 0 everywhere, no pixel shown: a camera's BGRX padding byte, not transparency
    (see :func:`as_image`); such an image is read by its colours."""
    return rgba.getchannel("A").getextrema() == (0, 0)


def alpha_is_padding(data: bytes) -> bool:
    """Whether an encoded image's alpha is a padding byte that :func:`decode_image` reads past
    (a browser shows such a file as a transparent square)."""
    import io

    with Image.open(io.BytesIO(data)) as img:
        return _has_alpha(img) and _padding(img.convert("RGBA"))


def _to_float_rgb(img: Image.Image, source: str) -> np.ndarray:
    """Decode any PIL mode (L, I;16, I, F, RGB, RGBA, P, ...) to HxWx3 float32 in [0, 1]."""
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:  # a height map's unmeasured points: one NaN made the whole image NaN here
            raise ImageReadError(source, f"{bad} of {arr.size} pixels are not finite numbers (NaN or "
                                 "infinite, as a height map marks points it could not measure); "
                                 "fill them before inspecting")
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            arr = arr / _fixed_scale(img.mode, float(arr.min()), float(arr.max()), source)
        arr = np.clip(arr, 0.0, 1.0).astype(np.float32)  # a float image's overshoot, as an array's
        return np.repeat(arr[:, :, None], 3, axis=2)
    if _has_alpha(img):
        img = img.convert("RGBA")
        if not _padding(img):
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _big_enough(arr: np.ndarray, source: str) -> np.ndarray:
    if min(arr.shape[:2]) < MIN_IMAGE_SIDE:
        raise ImageReadError(source, f"image is {arr.shape[1]}x{arr.shape[0]}; at least "
                             f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
    return arr


def as_image(img: np.ndarray | Image.Image, source: str = "<array>") -> np.ndarray:
    """An image given as an array (the Python API, a camera SDK, ``cv2``/Pillow arrays) or a
    Pillow image as the detector reads image files: HxWx3 float32 in [0, 1]. A Pillow image is
    decoded as its file is (every mode, its orientation tag). Integer arrays are scaled as
    decoded files are (uint8 by 1/255, uint16 by 1/65535, other integers by 1/255 when none
    exceeds 255, else by 1/65535), bool is 0/1, HxW and HxWx1 are grey, HxWx4 is composited on
    black as RGBA files are (a fourth channel of 0 everywhere, no pixel shown, is a camera's BGRX
    padding byte, not transparency: it is left out, as OpenCV reads such a file, where it made the
    image black whatever the part); a float array must already lie in [0, 1]. Anything else, or
    smaller than 8 x 8 as a file may not be, is an :class:`ImageReadError` (a uint8 array was
    taken as floats and clamped: nearly white, every part REJECT)."""
    if isinstance(img, Image.Image):
        return _big_enough(_to_float_rgb(_upright(img), source), source)
    if isinstance(img, (bytes, bytearray)) or (isinstance(img, memoryview) and img.ndim < 2):
        raise ImageReadError(source, f"got the {len(img)} bytes of an encoded file, not an image array: "
                             "decode them first (diffqc.data.decode_image(data))")
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            hint = " (channels first, as a torch tensor is? pass arr.transpose(1, 2, 0))"
        elif arr.ndim == 4 and arr.shape[3] in (1, 3, 4):
            hint = f" (a batch of {arr.shape[0]} images? pass one array per image: list(batch))"
        elif arr.ndim == 4 and arr.shape[1] in (1, 3, 4):
            hint = (f" (a batch of {arr.shape[0]} images, channels first, as a torch batch is? pass one "
                    "HxWxC array per image: [t.permute(1, 2, 0).numpy() for t in batch])")
        raise ImageReadError(source, f"expected an HxW, HxWx3 or HxWx4 image, got shape {arr.shape}{hint}")
    if arr.size == 0:
        raise ImageReadError(source, f"empty image of shape {arr.shape}")
    if arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(source, f"integer values {lo}..{hi} are not 8- or 16-bit pixels")
        if arr.dtype in (np.uint8, np.uint16):
            scale = 255.0 if arr.dtype == np.uint8 else 65535.0
        else:  # int32/int64 (arithmetic, 32-bit "I" images): by their values, as an "I" file is
            scale = 255.0 if hi <= 255 else 65535.0
        out = arr.astype(np.float32) / scale
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32, copy=False)
        low, high = float(out.min()), float(out.max())
        if not (low >= -0.05 and high <= 1.05):  # also NaN; a little overshoot (bicubic) is clipped
            hint = "; divide by 255 (or pass the uint8 array)" if 1.05 < high <= 255 and low >= 0 else ""
            raise ImageReadError(source, f"float pixel values {low:g}..{high:g} lie outside [0, 1]{hint}")
        if low < 0 or high > 1:
            out = np.clip(out, 0.0, 1.0)
    else:
        raise ImageReadError(source, f"pixel type {arr.dtype} is not an image's")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 4:
        out = np.ascontiguousarray(out[:, :, :3]) if not out[:, :, 3].any() else out[:, :, :3] * out[:, :, 3:]
    return _big_enough(out, source)  # a float32 HxWx3 array in [0, 1] comes back as it is: no copy


def _images_of_first_size(img: Image.Image) -> int:
    """How many of a file's images (pages, frames) have the first one's size; a smaller page is
    a preview or a reduced-resolution copy, not another part. Leaves the file at its first image."""
    frames = int(getattr(img, "n_frames", 1))
    if frames == 1:
        return 1
    size, alike = img.size, 0
    for i in range(frames):
        img.seek(i)
        alike += img.size == size
    img.seek(0)
    return alike


def _read_stream(path: Path, name: str) -> bytes:
    """The bytes a pipe or a character device gives (``-``: standard input), at most
    :data:`MAX_STREAM_BYTES`."""
    try:
        if str(path) == STDIO:
            data = sys.stdin.buffer.read(MAX_STREAM_BYTES + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_STREAM_BYTES + 1)
    except OSError as exc:
        raise ImageReadError(name, exc.strerror or str(exc)) from None
    if len(data) > MAX_STREAM_BYTES:
        raise ImageReadError(name, f"more than {MAX_STREAM_BYTES >> 20} MiB from a pipe or device: not one "
                             "image")
    if not data:
        raise ImageReadError(name, "empty input")
    return data


def decode_image(data: bytes | Path | str, source: str | None = None) -> np.ndarray:
    """Decode an image (path or encoded bytes) to HxWx3 float32 in [0, 1].

    Raises :class:`ImageReadError` with a clear reason for empty, corrupt, truncated,
    oversized (decompression bomb) or degenerate inputs.
    """
    import io

    name = source or (str(data) if not isinstance(data, bytes) else "<bytes>")
    if isinstance(data, bytes):
        if not data:
            raise ImageReadError(name, "empty input")
        handle: io.BytesIO | Path = io.BytesIO(data)
    else:
        path = Path(data)
        if path.is_file() and str(path) != STDIO:
            handle = path
        elif str(path) == STDIO or (path.exists() and not path.is_dir() and not path.is_block_device()):
            handle = io.BytesIO(_read_stream(path, name))  # /dev/stdin, <(curl ...), a grabber's FIFO
        else:
            why = (f"no such file{address_hint(str(path))}" if not path.exists() else
                   "a folder, not an image file" if path.is_dir() else "a disk device, not an image file")
            raise ImageReadError(name, why)
    try:
        with Image.open(handle) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageReadError(name, f"{w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
            parts = _images_of_first_size(img)
            if parts > 1:  # several lightings or parts in one file: only the first was inspected
                raise ImageReadError(name, f"holds {parts} images of {w}x{h} (a multi-page TIFF or an "
                                     "animation); diffqc inspects one image per file: save each "
                                     "page as its own file")
            img.load()
            arr = _to_float_rgb(_upright(img), name)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"decompression bomb guard: {exc}") from None
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(name, f"corrupt or truncated image ({exc})") from None
    return _big_enough(arr, name)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image file as HxWx3 float32 in [0, 1] (grayscale and 16-bit included)."""
    return decode_image(Path(path), source=str(path))


def read_mask(path: Path | str | None, shape: tuple[int, int]) -> np.ndarray:
    """Read a defect mask as a bool array of ``shape`` (H, W); all False when there is none.

    A mask whose brightest value is above mid-grey (MVTec's 0/255, a 1-bit image) marks the
    pixels above it; a darker one is a label image (0/1 values, or a palette PNG as VOC-style
    labelling tools save it, defects in a dark colour) and marks every pixel that is not 0:
    read at 0/255's cut, such masks came out empty and the pixel metrics silently wrong."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    try:
        with Image.open(path) as img:
            img.load()
            m = _upright(img).convert("L")  # turned as images are (a mask rarely has the tag)
            cut = 127 if m.getextrema()[1] > 127 else 0  # type: ignore[operator]
            if m.size != (shape[1], shape[0]):
                m = m.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
            return np.asarray(m) > cut
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageReadError(str(path), f"mask unreadable ({exc})") from None


def fingerprint(path: Path | str) -> str:
    """A file's identity by content, the first 16 hex digits of its SHA-256: a copy under another
    name matches. A bundle keeps those of the images it was fit on (``diffqc calibrate``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def sixteen_bit_white(paths: Sequence[Path | str], n: int = 16) -> int | None:
    """The white level ``2**b - 1`` of 16-bit greyscale files that hold ``b`` <= 14 bits (a Mono10,
    Mono12 or Mono14 camera's values, right-aligned: 0..4095 for 12 bits), from up to ``n`` of
    ``paths`` spread over them; None when any of those is not such a file or uses more bits.
    Decoded as 16-bit (divided by 65535), such images read nearly black (1/16 of white at 12
    bits): ``backbone.input_gain = 65535 / white`` reads them as the camera meant."""
    if not paths:
        return None
    step = max(1, len(paths) // n)
    brightest = 0
    for path in list(paths)[::step][:n]:
        try:
            with Image.open(path) as img:
                if not img.mode.startswith("I;16") and img.mode != "I":
                    return None
                value = int(np.asarray(img).max())
                if img.mode == "I" and value <= 255:  # read on the 8-bit scale (_to_float_rgb)
                    return None
                brightest = max(brightest, value)
        except (OSError, Image.DecompressionBombError):  # unreadable: fit says so itself
            return None
    bits = max(brightest, 1).bit_length()
    return 2**bits - 1 if bits <= 14 else None


# folders a file system, a NAS or an archiver keeps for itself, hidden by the system that made
# them: Synology's thumbnails beside each image (``@eaDir/<image>/SYNOPHOTO_THUMB_S.jpg``) and
# its shares' recycle bins and snapshots, QNAP's, Windows', a Mac's zip, ext4's
SYSTEM_FOLDERS = frozenset({"@eadir", "#recycle", "#snapshot", "@recycle", "@recently-snapshot",
                            "$recycle.bin", "system volume information", "__macosx", "lost+found"})


def is_hidden(path: Path) -> bool:
    """A name starting with ``.`` (``.DS_Store``, macOS's ``._name.png`` companions, not images
    though named like them, ``.ipynb_checkpoints``) or one of :data:`SYSTEM_FOLDERS` (a Synology
    share's ``@eaDir`` thumbnails, a recycle bin). Folder scans leave these out, as a shell's
    ``*`` and a file manager do; a file listed by name (a manifest, a path given alone) is always
    read."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FOLDERS


def is_image_file(path: Path) -> bool:
    """A file that a folder scan takes as an image: a known suffix (any case), not hidden."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(path)


def _walk_files(folder: Path) -> Iterator[Path]:
    """The files in ``folder`` and its sub-folders (``train/good/2026-11-30/``, as a line files
    them by day), as found, hidden folders left out; symbolic links to folders are not followed."""
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(Path(d))]
        yield from (Path(here) / f for f in files)


def _walk_images(folder: Path) -> Iterator[Path]:
    """The images below ``folder`` (:func:`_walk_files`), hidden ones left out."""
    return (p for p in _walk_files(folder) if is_image_file(p))


def unread_images(folder: Path) -> list[Path]:
    """The files below ``folder`` (:func:`_walk_files`; hidden ones left out) of an image format
    diffqc does not read (:data:`OTHER_IMAGE_SUFFIXES`), sorted."""
    return sorted(p for p in _walk_files(folder)
                  if not is_hidden(p) and p.suffix.lower() in OTHER_IMAGE_SUFFIXES)


def unread_images_note(files: Sequence[Path]) -> str:
    """What :func:`unread_images` found, and what to do: "3 files of an image format diffqc does
    not read (.dng: 1, .heic: 2; e.g. ...): convert them to PNG, JPEG or TIFF"."""
    counts = Counter(p.suffix.lower() for p in files)
    kinds = ", ".join(f"{suffix}: {n}" for suffix, n in sorted(counts.items()))
    return (f"{len(files)} file{'s' * (len(files) > 1)} of an image format diffqc does not read ({kinds}; "
            f"e.g. {path_text(files[0])}): convert {'them' if len(files) > 1 else 'it'} to PNG, JPEG or TIFF")


def _images_in(folder: Path) -> list[Path]:
    """The images below ``folder`` (:func:`_walk_images`), sorted."""
    return sorted(_walk_images(folder))


def _subfolders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder``, hidden ones and links back to an enclosing folder left out
    (:func:`_links_back`)."""
    found = sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden(d))
    return [d for d in found if not _links_back(d)]


def _links_back(folder: Path) -> bool:
    """Whether ``folder`` is a symbolic link to the folder it is in or one above it (``test/self
    -> ..``): read, it would read the dataset again, its images counted twice (the training
    images as a defect kind named after the link). Said (a :class:`DatasetWarning`) when so.
    Links to folders elsewhere (a kind's images shared with another dataset) are followed."""
    if not folder.is_symlink():
        return False
    target, home = folder.resolve(), folder.parent.resolve()
    if target != home and target not in home.parents:
        return False
    warnings.warn(f"{path_text(folder)} is a link to {path_text(target)}, an enclosing folder: left "
                  "out (read, it would read the dataset again, its images counted twice)",
                  DatasetWarning, stacklevel=2)
    return True


def _find_mask(masks: Path, image: Path, within: Path = Path(), *, top: bool = True) -> Path | None:
    """The image's mask in its kind's folder of masks ``ground_truth/<defect>``: at the image's
    own sub-path ``within`` the kind's folder first, then at the top (``top``: where no other
    image of the kind has its name; else that mask may be the other's)."""
    for folder in dict.fromkeys((masks / within, *([masks] if top else []))):
        for candidate in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}_mask{image.suffix}"):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def load_mvtec_type(type_root: Path, feature_type: str | None = None) -> list[Sample]:
    """Samples of one feature type laid out as ``train/good``, ``test/<kind>``, ``ground_truth``
    (images in sub-folders of ``train/good`` and ``test/<kind>`` belong to them; the layout's
    folder names in any case, ``Train/Good`` as made on Windows)."""
    feature_type = feature_type or type_root.name
    samples: list[Sample] = []
    for train in _named(type_root, "train"):
        _name_what_train_leaves_out(train)
        for good in _good_folders(train):
            samples += [Sample(p, feature_type, GOOD, split="train", defect="good") for p in _images_in(good)]
    ground_truth = next(iter(_named(type_root, "ground_truth")), type_root / "ground_truth")
    alike: list[str] = []  # test/good_batch2/: a defect kind by the rule, GOOD by its name
    left: list[str] = []
    for test in _named(type_root, "test"):
        for kind_dir in _subfolders(test):
            label = GOOD if kind_dir.name.lower() in _GOOD_FOLDER_NAMES else DEFECTIVE
            kind = "good" if label == GOOD else kind_dir.name
            masks = next(iter(_named(ground_truth, kind.lower())), ground_truth / kind)  # Blob/: blob
            images = _images_in(kind_dir)
            names = Counter(p.name for p in images)
            for p in images:
                mask = None if label == GOOD else _find_mask(masks, p, p.parent.relative_to(kind_dir),
                                                             top=names[p.name] == 1)
                samples.append(Sample(p, feature_type, label, mask, defect=kind, split="test"))
            alike += [kind] if label == DEFECTIVE and _first_word(kind.lower()) in _GOOD_FOLDER_NAMES else []
        left += [f"{n} directly in {test.name}/"] if (n := _count_images_directly(test)) else []
    left += [f"{n} in {d.name}/" for d in _subfolders(type_root)  # validation/ (MVTec LOCO's), masks/
             if d.name.lower() not in ("train", "test", "ground_truth") and (n := len(_images_in(d)))]
    if left:
        warnings.warn(f"{type_root}: images not read: {'; '.join(left)} (the MVTec layout reads train/good, "
                      "test/<kind> and the masks in ground_truth/<kind>)", DatasetWarning, stacklevel=3)
    _name_read_as_defects(type_root, alike)
    _name_defects_without_masks(ground_truth, [s for s in samples if s.label == DEFECTIVE])
    _name_masks_of_another_shape(ground_truth, [s for s in samples if s.mask_path is not None])
    return samples


def _name_defects_without_masks(ground_truth: Path, defects: list[Sample]) -> None:
    """A type that has a ground_truth folder but no mask for some defects (a mask saved under
    another name, in another kind's folder): one :class:`DatasetWarning` names them, as pixel
    metrics leave them out."""
    missing = [s for s in defects if s.mask_path is None]
    if missing and ground_truth.is_dir():
        kinds = Counter(str(s.defect) for s in missing)
        warnings.warn(f"{ground_truth}: {len(missing)} of {len(defects)} defect images have no mask "
                      f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}: "
                      f"{first_few([s.path.name for s in missing], 3)}); looked for <kind>/<name>_mask.png "
                      "or <kind>/<name>.png; pixel metrics leave them out", DatasetWarning, stacklevel=4)


def _name_masks_of_another_shape(ground_truth: Path, masked: list[Sample]) -> None:
    """Masks whose shape (height to width, 1 % apart) is not their image's, read from the headers:
    :func:`read_mask` stretches a mask onto its image, right for one saved at another scale,
    wrong for one cropped or of another image. One :class:`DatasetWarning` names them."""
    odd = []
    for s in masked:
        assert s.mask_path is not None
        mask, image = image_shape(s.mask_path), image_shape(s.path)
        if mask and image and abs(mask[0] * image[1] - mask[1] * image[0]) > 0.01 * mask[1] * image[0]:
            odd.append(f"{s.mask_path.relative_to(ground_truth)}: {mask[1]}x{mask[0]} px for a "
                       f"{image[1]}x{image[0]} px image")
    if odd:
        one = len(odd) == 1
        warnings.warn(f"{ground_truth}: {len(odd)} of {len(masked)} defect masks {'has' if one else 'have'} "
                      f"another shape than {'its image' if one else 'their images'} ({first_few(odd, 3)}): "
                      f"{'it is' if one else 'they are'} stretched onto the image, so the pixel metrics "
                      "measure the map against a misplaced defect; is it the mask of that image?",
                      DatasetWarning, stacklevel=4)


def _named(folder: Path, name: str) -> list[Path]:
    """The sub-folders of ``folder`` called ``name`` in any case (``Good``, ``TRAIN``: a folder's
    case does not matter on Windows, where many datasets are put together)."""
    if not folder.is_dir():
        return []
    return [d for d in _subfolders(folder) if d.name.lower() == name]


def _good_folders(split: Path) -> list[Path]:
    """The GOOD folders of a split: ``good/``, or the other GOOD words a line uses (``OK/``,
    ``normal/``, ``i.O./``), as the labelled layout reads them."""
    return [d for d in _subfolders(split) if d.name.lower() in _GOOD_FOLDER_NAMES]


def _count_images_directly(folder: Path) -> int:
    """The images in ``folder`` itself, not in its sub-folders."""
    return sum(1 for p in folder.iterdir() if is_image_file(p))


def _name_what_train_leaves_out(train: Path) -> None:
    """Images under ``train/`` but not in ``train/good`` (``train/defect``, as a classifier's data
    is laid out) are not read: one :class:`DatasetWarning` says so and where they belong."""
    good = set(_good_folders(train))
    left = {d.name: len(_images_in(d)) for d in _subfolders(train) if d not in good}
    left = {name: n for name, n in left.items() if n}
    loose = _count_images_directly(train)
    if left or loose:
        parts = [f"{n} in {name}/" for name, n in left.items()]
        parts += [f"{loose} directly in it"] if loose else []
        warnings.warn(f"{train}: images outside train/good are not read ({', '.join(parts)}): diffqc "
                      "learns from GOOD images only (train/good); defective ones belong under "
                      "test/<kind>, where `diffqc evaluate` measures them", DatasetWarning, stacklevel=4)


def _is_mvtec_type(folder: Path) -> bool:
    return any(_good_folders(train) for train in _named(folder, "train")) or bool(_named(folder, "test"))


# A folder of GOOD images beside folders of defective ones, ``<type>/good/`` + ``<type>/<kind>/``
# (OK/NOK folders as a line's classifier keeps them; anomalib's Folder layout): a GOOD word names
# the GOOD folder, any other sub-folder is a defect kind, except those that hold masks.
MASK_FOLDER_NAMES = frozenset({"ground_truth", "masks", "mask"})


def type_of_folders(folders: Sequence[str], types: Collection[str]) -> str | None:
    """The type an image's folders name: the nearest (last) of ``folders`` named after one of
    ``types`` (``<type>/<day>/part.png``, ``<type>/test/good/part.png``), else None."""
    return next((name for name in reversed(folders) if name in types), None)


def folder_like_a_type(folders: Sequence[str], types: Collection[str]) -> tuple[int, str] | None:
    """Where none of ``folders`` names one of ``types`` (:func:`type_of_folders`) but one is named
    almost as one (``egde1``, ``Edge1``: a misspelled camera folder, whose images then go to the
    type router), its index (the nearest) and what to say after ``folder <it>/``."""
    if type_of_folders(folders, types) is not None:
        return None
    near = ((i, did_you_mean(name, sorted(types))) for i, name in reversed(list(enumerate(folders))))
    found = next(((i, hint) for i, hint in near if hint), None)
    return None if found is None else (found[0], (
        f" is named like no type of the model{found[1]}: its images are scored under the type "
        "router's pick (type_known false); name it after the type, or give --feature-type"))


def _is_labelled_type(folder: Path) -> bool:
    """``folder/good/`` (or ``OK/``, ``normal/``, ``i.O./``) holds images, and neither ``folder``
    nor any of its sub-folders is laid out as MVTec (a root of types, one of them named ``ok``,
    is not one type)."""
    subfolders = _subfolders(folder)
    return (not _is_mvtec_type(folder) and not any(_is_mvtec_type(d) for d in subfolders)
            and any(any(_walk_images(d)) for d in subfolders if d.name.lower() in _GOOD_FOLDER_NAMES))


def load_labelled_type(type_root: Path, feature_type: str | None = None) -> list[Sample]:
    """Samples of one feature type laid out as labelled folders: ``good/`` (GOOD, training
    candidates, as a manifest's GOOD rows without a split) and ``<kind>/`` (defective, e.g.
    ``bad/``, ``NOK/``, ``crack/``: test images of that kind); images in their sub-folders belong
    to them. Mask folders and images directly in ``type_root`` are not read (one
    :class:`DatasetWarning`: masks need the MVTec layout)."""
    feature_type = feature_type or type_root.name
    samples: list[Sample] = []
    left: list[str] = []
    alike: list[str] = []  # good_batch2/: a defect kind by the rule, GOOD by its name
    for folder in _subfolders(type_root):
        images = _images_in(folder)
        name = folder.name.lower()
        if name in _GOOD_FOLDER_NAMES:
            samples += [Sample(p, feature_type, GOOD, defect="good", split="train") for p in images]
        elif name in MASK_FOLDER_NAMES:
            left += [f"{len(images)} in {folder.name}/ (masks are read in the MVTec layout only: "
                     "<type>/ground_truth/<kind>/)"] if images else []
        else:
            samples += [Sample(p, feature_type, DEFECTIVE, defect=folder.name) for p in images]
            alike += [folder.name] if images and _first_word(name) in _GOOD_FOLDER_NAMES else []
    if loose := _count_images_directly(type_root):
        left.append(f"{loose} directly in it (put GOOD ones in good/, defective ones in a folder "
                    "named after their kind)")
    if left:
        warnings.warn(f"{type_root}: images not read: {'; '.join(left)}", DatasetWarning, stacklevel=3)
    _name_read_as_defects(type_root, alike)
    return samples


def _name_read_as_defects(type_root: Path, alike: list[str]) -> None:
    """Folders of defects by the rule, GOOD by their name's first word (``good_batch2/``): one
    :class:`DatasetWarning` names them."""
    if alike:
        verb = "is read as a defect kind" if len(alike) == 1 else "are read as defect kinds"
        warnings.warn(f"{type_root}: {', '.join(f'{a}/' for a in alike)} {verb}: only a "
                      f"folder named {', '.join(sorted(_GOOD_FOLDER_NAMES))} (any case) holds GOOD "
                      "images; move GOOD ones there", DatasetWarning, stacklevel=4)


def _first_word(name: str) -> str:
    """``good`` of ``good_batch2``, ``good-old``, ``good 2``."""
    return name.replace("-", " ").replace("_", " ").split(" ")[0]


def _type_loader(folder: Path) -> Callable[[Path], list[Sample]] | None:
    if _is_mvtec_type(folder):
        return load_mvtec_type
    return load_labelled_type if _is_labelled_type(folder) else None


def load_mvtec(root: Path | str) -> list[Sample]:
    """Load one type folder, or a root holding several of them (one per type, named after its
    folder). A type folder is laid out as MVTec AD (``train/good``, ``test/<kind>``,
    ``ground_truth``: :func:`load_mvtec_type`) or as labelled folders (``good/``,
    ``<kind>/``: :func:`load_labelled_type`). The ``train`` or ``test`` folder of an MVTec type
    is that split of the type; one kind's folder (``train/good``, ``test/crack``, a labelled
    type's ``good/``) is those images of the type (:func:`_one_kind_of_a_type`)."""
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"{root} is a file, not a dataset folder: a manifest is a table saved as "
                           ".csv, .tsv or .txt (path,feature_type,label columns)")
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a device or a pipe, not a dataset folder")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist{address_hint(str(root))}")
    if root.name in ("", ".."):  # `.`, `..`: the folder's own name names its type (or split)
        root = Path(os.path.abspath(root))
    loader = _type_loader(root)
    split = root.name.lower()
    typed = [(sub, load) for sub in _subfolders(root) if (load := _type_loader(sub))]
    if (split in ("train", "test") and _is_mvtec_type(root.parent)
            and (loader is load_labelled_type or (loader is None and not typed))):
        # a type's split folder (``bottle/test``: good/ beside kinds, or kinds alone), not a
        # type named ``test``; a root of types named ``test`` stays a root of types
        type_name = root.absolute().parent.name  # of ``test`` given inside ``bottle/`` too
        samples = [s for s in load_mvtec_type(root.parent, type_name) if s.split == split]
    else:
        _refuse_good_beside_types(root, [sub.name for sub, _ in typed])
        if loader:
            samples = loader(root)
        elif typed:
            samples = [s for sub, load in typed for s in load(sub)]
        else:  # neither a type nor a root of them: one kind's folder of a type?
            samples = _one_kind_of_a_type(root)
    unread = unread_images(root)
    if not samples:
        hint = f"; {root} holds {unread_images_note(unread)}" if unread else _loose_images_hint(root)
        raise DatasetError(
            f"no images found under {root}: expected <type>/train/good and <type>/test/<kind> "
            "folders (MVTec AD layout), <type>/good and <type>/<kind> folders (labelled folders) "
            f"or a CSV manifest{hint}"
        )
    if unread:
        warnings.warn(f"{root}: left out {unread_images_note(unread)}", DatasetWarning, stacklevel=3)
    return samples


def _one_kind_of_a_type(folder: Path) -> list[Sample]:
    """The samples of ``folder`` when it holds one kind of a type's images, given alone: a split's
    ``<type>/train/good``, ``<type>/test/<kind>`` (MVTec layout: `train DATA/bottle/train/good`,
    the first folder of GOOD images one points at) or a labelled type's ``<type>/<kind>``; the
    type is named after its folder, as when the type's folder is given. Empty otherwise."""
    names = Path(os.path.abspath(folder)).parts  # the real names, of `good` given inside `test/`
    parent = folder.parent
    grand = parent.parent if len(folder.parts) > 1 else Path("..")  # `good` inside `test/`
    if len(names) > 3 and names[-2].lower() in SPLITS and _is_mvtec_type(grand):
        return [s for s in load_mvtec_type(grand, names[-3])
                if s.path.relative_to(grand).parts[:2] == names[-2:]]
    if len(names) > 2 and folder.name.lower() not in MASK_FOLDER_NAMES and _is_labelled_type(parent):
        return [s for s in load_labelled_type(parent, names[-2])
                if s.path.relative_to(parent).parts[0] == names[-1]]
    return []


def _refuse_good_beside_types(root: Path, types: Sequence[str]) -> None:
    """A root holding a GOOD folder beside type folders (``types``; ``good/`` + ``edge/good/``,
    ``edge/crack/``: a type's GOOD folder copied one level too high) is neither one type nor a
    root of types: read as one type, every type folder's images, its GOOD ones too, were taken
    for defects of a kind named after the type. A :class:`DatasetError` naming both."""
    goods = [d.name for d in _subfolders(root) if d.name.lower() in _GOOD_FOLDER_NAMES
             and d.name not in types and any(_walk_images(d))]  # a type named ``ok`` is a type
    if goods and types:
        raise DatasetError(
            f"{root} holds {goods[0]}/ (the GOOD images of one type) beside type folders "
            f"({', '.join(f'{t}/' for t in types)}): is it one type or a root of types? Move "
            f"{goods[0]}/ into the folder of its type, or give the folder of one type")


def _loose_images_hint(root: Path) -> str:
    """Where images lie outside the layout (directly in ``root``, or in ``root/<type>``), where
    they belong: a folder of GOOD images is the commonest first try."""
    if n := _count_images_directly(root):  # the simplest layout first: the folder is one type
        return (f"; {root} holds {n} image{'s' * (n > 1)} directly: for one type, put GOOD ones in "
                f"{root}/good/ (a type named {Path(os.path.abspath(root)).name}) and defective ones "
                f"in {root}/<kind>/; for several, one folder per type: {root}/<type>/good/")
    loose = [(d, k) for d in _subfolders(root) if (k := _count_images_directly(d))]
    labelled = [d for d, _ in loose if _LABEL_WORDS.get(d.name.lower()) == DEFECTIVE]
    if labelled:  # bad/ or NOK/ without good/ beside it
        return (f"; {labelled[0]} holds defective images, and no good/ folder is beside it: diffqc "
                f"learns from GOOD images, put them in {root}/good/")
    if loose:
        d, k = loose[0]
        more = f" (and {len(loose) - 1} more folder{'s' * (len(loose) > 2)} alike)" if len(loose) > 1 else ""
        return f"; {d} holds {k} image{'s' * (k > 1)} directly{more}: put GOOD ones under {d}/train/good/"
    deeper = [(d, types) for d in _subfolders(root)
              if (types := [t.name for t in _subfolders(d) if _type_loader(t)])]
    if deeper:  # data/lineA/<type>/..., data/lineB/<type>/...
        where = ", ".join(f"{d.name}/ ({', '.join(types)})" for d, types in deeper)
        return (f"; the types are one level down: {where}; give one of those folders, or list them "
                "all in a CSV manifest")
    return ""


MANIFEST_COLUMNS = ("path", "feature_type", "label")
MANIFEST_OPTIONAL = ("mask", "part_id", "split", "defect")
# a table as spreadsheets save it: CSV, or tab-separated as .tsv or .txt (Excel's "Text (Tab delimited)")
MANIFEST_SUFFIXES = frozenset({".csv", ".tsv", ".txt"})


def is_manifest(path: Path) -> bool:
    """Whether ``path`` names a manifest (by its suffix, any case), not a dataset folder."""
    return path.suffix.lower() in MANIFEST_SUFFIXES
# a line's own words: OK / NOK and i.O. / n.i.O. (German: in order / not in order), NG (no good)
_LABEL_WORDS = {"good": GOOD, "ok": GOOD, "0": GOOD, "pass": GOOD, "normal": GOOD, "io": GOOD,
                "i.o.": GOOD, "defect": DEFECTIVE, "defective": DEFECTIVE, "bad": DEFECTIVE,
                "ng": DEFECTIVE, "nok": DEFECTIVE, "nio": DEFECTIVE, "n.i.o.": DEFECTIVE, "fail": DEFECTIVE,
                "1": DEFECTIVE, "anomaly": DEFECTIVE, "": UNKNOWN, "unknown": UNKNOWN, "-1": UNKNOWN}
# the names of a labelled dataset's GOOD folder: the GOOD label words, less the digit ("0/" and
# "1/" are a classifier's class indices, not GOOD and defect by that word)
_GOOD_FOLDER_NAMES = frozenset(w for w, label in _LABEL_WORDS.items() if label == GOOD and not w.isdigit())


SPLITS = ("train", "test")


def dataset_folder_of(path: Path | str) -> Path | None:
    """The folder of a dataset's images that ``path`` is or lies in (made yet or not): a kind's
    folder of a split, ``<type>/train/good`` or ``<type>/test/<kind>``, of a type laid out as
    MVTec whose ``train/`` holds GOOD images; or a type laid out as labelled folders
    (:func:`_is_labelled_type`), any new sub-folder of which is read as a defect kind. An image an
    output writes there is read back as a part by train, test and evaluate (from ``train/good``
    or ``good/``: a GOOD one to train on). None if not."""
    here = Path(os.path.abspath(path))
    for folder in (here, *here.parents):
        split = folder.parent
        if (split.name.lower() in SPLITS and folder.name.lower() not in MASK_FOLDER_NAMES
                and any(any(_walk_images(good)) for train in _named(split.parent, "train")
                        for good in _good_folders(train))):
            return folder
        if (folder.is_dir() and _good_folders(folder) and _is_labelled_type(folder)  # one listing first
                and not _is_mvtec_type(folder.parent)):  # not an MVTec type's train/ with its good/
            return folder
    return None


def check_outside_datasets(path: Path | str, option: str, what: str) -> None:
    """An :class:`OutputError` when ``path`` (an output folder, given as ``option``) lies in a
    dataset's folder of images (:func:`dataset_folder_of`), where ``what`` would be read as parts."""
    if (folder := dataset_folder_of(path)) is not None:
        raise OutputError(f"{option} {path_text(path)} lies in {path_text(folder)}, a folder of a dataset's "
                          f"images: train, test and evaluate would read {what} written there as parts "
                          "(GOOD ones to train on, in train/good); give a folder outside the dataset")


def _delimiter(header: str) -> str:
    """The manifest's field separator: ``,``, or ``;`` / tab when the header is split by that (a
    spreadsheet saved as CSV where the decimal separator is a comma writes ``;``)."""
    for sep in (",", ";", "\t"):
        if set(MANIFEST_COLUMNS) <= {_column(f) for f in header.split(sep)}:
            return sep
    return ","


def _column(name: str) -> str:
    """A manifest's column name as read: in any case, spaces and hyphens as ``_`` (``Part ID``,
    ``Part-ID``: ``part_id``), quotes left around it dropped."""
    return re.sub(r"[\s-]+", "_", name.strip().strip('"').strip().lower())


def _listed_path(base: Path, text: str, where: str) -> Path:
    """A manifest's file: relative to the manifest's folder unless absolute. A path written on
    Windows (``dots\\train\\001.png``, a spreadsheet made there and used in the Linux
    container) is read with ``\\`` as the separator when no file has the literal name (a name
    may hold a ``\\`` here); a Windows drive or share (``C:\\...``) cannot be, and is named."""
    literal = Path(text) if Path(text).is_absolute() else base / text
    windows = PureWindowsPath(text)
    if isinstance(literal, PureWindowsPath) or literal.exists() or not (windows.drive or "\\" in text):
        return literal
    if windows.anchor:  # C:\ or C:/, \\nas\share
        raise DatasetError(f"{where}: {text!r} is a Windows path (on {windows.anchor}); write "
                           "the paths relative to the manifest's folder")
    return base.joinpath(*windows.parts)


def load_manifest(path: Path | str) -> list[Sample]:
    """Load a CSV manifest with columns ``path, feature_type, label[, mask][, part_id][, split]``.

    Relative paths are resolved against the manifest's folder (``\\`` as written on Windows is
    read as a separator where no file has the literal name). Rows without a ``split``
    column: GOOD images count as training candidates (``split="train"``), the rest as test.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist")
    base = path.parent
    samples: list[Sample] = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is dropped
    except UnicodeDecodeError as exc:
        raise DatasetError(f"manifest {path} is not UTF-8 text (byte {exc.start}); save it as "
                           "'CSV UTF-8'") from None
    first_line = text.partition("\n")[0]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(first_line),
                            skipinitialspace=True)  # `a, "b"`: b
    names = {name: _column(name) for name in reader.fieldnames or []}
    fields = list(names.values())
    missing = [c for c in MANIFEST_COLUMNS if c not in fields]
    if missing:
        raise DatasetError(f"manifest {path} lacks column(s) {', '.join(missing)}; has {fields}"
                           f"{_header_hint(first_line)}")
    _check_columns(path, reader.fieldnames or [])  # as given: two of one name are one column too
    for lineno, raw in enumerate(reader, start=2):
        row = {names[k]: (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):  # ",,," as a spreadsheet saves rows it once had
            continue
        label = _manifest_label(row["label"], f"{path}:{lineno}")
        if not row["feature_type"]:
            raise DatasetError(f"{path}:{lineno}: empty feature_type")
        if not row["path"]:  # else read as the manifest's own folder
            raise DatasetError(f"{path}:{lineno}: empty path")
        img = _listed_path(base, row["path"], f"{path}:{lineno}")
        mask = row.get("mask") or None
        mask_path = None if mask is None else _listed_path(base, mask, f"{path}:{lineno}")
        split = (row.get("split") or ("train" if label == GOOD else "test")).lower()
        if split not in SPLITS:
            raise DatasetError(f"{path}:{lineno}: unknown split {row['split']!r} (use "
                               f"{' or '.join(SPLITS)}; calibration images are held out of train)")
        samples.append(Sample(img, row["feature_type"], label, mask_path,
                              part_id=row.get("part_id") or None,
                              defect=row.get("defect") or ("good" if label == GOOD else None),
                              split=split))
    if not samples:
        raise DatasetError(f"manifest {path} has no rows")
    name_types_alike(f"manifest {path}", feature_types(samples))
    return samples


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    """A :class:`DatasetError` for two columns that are one (``split`` and ``Split``), or one that
    misses a column diffqc reads (``splits``: the column it meant would go unread, without a
    word); other columns (``notes``) are the user's own, not read."""
    known = (*MANIFEST_COLUMNS, *MANIFEST_OPTIONAL)
    seen: dict[str, str] = {}
    for name in columns:
        if (column := _column(name)) in seen:
            raise DatasetError(f"{path}: columns {seen[column]!r} and {name!r} are one column ({column}): "
                               "keep one")
        seen[column] = name
        if column not in known and (hint := did_you_mean(column, known)):
            raise DatasetError(f"{path}: column {name!r} is not one diffqc reads{hint}")


def _header_hint(header: str) -> str:
    """Why a manifest's first line names no columns: it is a row (a list without a header, as
    ELPV's ``labels.csv``), or its columns are separated by spaces."""
    first = header.strip().split()[0] if header.strip() else ""
    if Path(first.strip(",;")).suffix.lower() in IMAGE_SUFFIXES:
        return (f"; its first line is a row ({first.strip(',;')}), not the column names: write "
                "path,feature_type,label[,mask][,part_id][,split][,defect] first")
    if not any(sep in header for sep in ",;\t") and len(header.split()) > 1:
        return "; its columns are separated by spaces: separate them by commas, semicolons or tabs"
    return ""


def label_of_word(text: str) -> int | None:
    """GOOD, DEFECTIVE or UNKNOWN for a word a line labels parts with (good, OK, NOK, i.O., fail,
    0/1: :data:`_LABEL_WORDS`, a manifest's label column, a labelled folder's name), without
    case or the spaces around it; None for another word."""
    return _LABEL_WORDS.get(text.strip().lower())


def _manifest_label(text: str, where: str) -> int:
    """A manifest's label: a word of :data:`_LABEL_WORDS`, or a number equal to one of its digits
    (``1.0``: pandas writes a 0/1 column with an empty cell in it as floats)."""
    word = text.lower()
    try:
        number = float(word)
    except ValueError:
        number = None
    if number is not None and number.is_integer():
        word = str(int(number))
    if (label := label_of_word(word)) is not None:
        return label
    grade = (": a grade or a probability is no label: decide which grades are defects"
             if number is not None else "")
    raise DatasetError(f"{where}: unknown label {text!r} (use good/defect, OK/NOK or 0/1; "
                       f"empty: unlabelled){grade}")


def name_types_alike(where: str, types: Sequence[str]) -> None:
    """Warn of types whose names differ only in case, spaces or punctuation ("dots", "Dots"): a
    spreadsheet typed by hand, or two datasets trained on together, read as two types, each
    trained on part of the images."""
    alike: dict[str, list[str]] = {}
    for t in types:
        alike.setdefault(type_key(t), []).append(t)
    groups = [" and ".join(repr(t) for t in names) for names in alike.values() if len(names) > 1]
    if groups:
        warnings.warn(f"{where}: feature types {'; '.join(groups)} differ only in case, "
                      "spaces or punctuation; they are read as different types (types are "
                      "matched exactly): write each type one way", DatasetWarning, stacklevel=3)


def _holds_types(folder: Path) -> bool:
    """Whether ``folder`` holds type folders (MVTec layout or labelled folders): read as a
    dataset in its own right, before a ``manifest.csv`` beside them."""
    return any(_is_mvtec_type(d) or _is_labelled_type(d) for d in _subfolders(folder))


SYNTH_MARKER = ".diffqc-synth.json"  # a synthetic set's marker (diffqc.synth writes it)


def _refuse_cut_short(folder: Path) -> None:
    """A :class:`DatasetError` for a synthetic set whose writing was cut short (Ctrl-C, a full
    disk: its marker says ``"complete": false``): read, its first types would pass for the set."""
    try:
        m = json.loads((folder / SYNTH_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(m, dict) or m.get("complete") is not False:
        return
    options = "".join(f" {opt} {m[key]}" for opt, key in (("--parts", "n_parts"), ("--seed", "seed"),
                                                          ("--size", "image_size")) if key in m)
    raise DatasetError(f"{folder} is a synthetic dataset cut short (its {SYNTH_MARKER} says complete: "
                       f"false): run `diffqc data synth {path_text(folder)}{options}` again to write it "
                       "whole")


def load_dataset(source: Path | str) -> list[Sample]:
    """Load a dataset from a folder (MVTec layout or labelled folders) or a manifest
    (:func:`is_manifest`). A synthetic set cut short is a :class:`DatasetError`."""
    source = Path(source)
    if source.is_dir():
        _refuse_cut_short(source)
    if is_manifest(source):
        return load_manifest(source)
    if source.is_dir() and (source / "manifest.csv").is_file() and not _holds_types(source):
        return load_manifest(source / "manifest.csv")
    return load_mvtec(source)


def unlisted_images(folder: Path | str, listed: Sequence[Sample]) -> list[Path]:
    """The images ``folder`` holds in a dataset layout (as :func:`load_dataset` reads a folder
    with types in it) that ``listed`` (its manifest's samples) leaves out: images added after
    the manifest was written. ``[]`` for a folder without such a layout (the manifest is its
    dataset) or one that cannot be read as one."""
    folder = Path(folder)
    if not _holds_types(folder):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the folder's own notes: the manifest is what is read
            held = load_mvtec(folder)
    except DatasetError:
        return []
    named = {os.path.abspath(s.path) for s in listed}
    return sorted(s.path for s in held if os.path.abspath(s.path) not in named)


def samples_of(data: Sequence[Sample] | Path | str, taker: str) -> list[Sample]:
    """A dataset given to the Python API: its path (read with :func:`load_dataset`) or its
    :class:`Sample` s (read, then filtered, say); anything else is a TypeError naming ``taker``."""
    if isinstance(data, str | Path):
        return load_dataset(data)
    try:
        items = list(data)
    except TypeError:  # an int, None: not a collection at all
        raise TypeError(f"{taker} takes Samples (diffqc.data.load_dataset) or a dataset's path, got "
                        f"{type(data).__name__}") from None
    if not all(isinstance(s, Sample) for s in items):
        kinds = sorted({type(s).__name__ for s in items if not isinstance(s, Sample)})
        raise TypeError(f"{taker} takes Samples (diffqc.data.load_dataset) or a dataset's path, got "
                        f"{', '.join(kinds)} items")
    return items


def feature_types(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct feature types."""
    return sorted({s.feature_type for s in samples})


def of_the_model(samples: Sequence[Sample], classes: Sequence[str],
                 source: Path | str | None) -> list[Sample]:
    """The samples of a model's types (``classes``); those of other types are left out, named in
    a warning (once per data source: ``source`` None when it was named already)."""
    foreign = sorted({s.feature_type for s in samples} - set(classes))
    if foreign and source is not None:
        warnings.warn(f"{source}: {sum(s.feature_type in foreign for s in samples)} images of types the "
                      f"model does not know are left out ({', '.join(foreign)}; the model's: "
                      f"{', '.join(classes)})", stacklevel=3)
    return [s for s in samples if s.feature_type in classes]


class DatasetWarning(UserWarning):
    """Part of a dataset is left out (e.g. a type without GOOD training images)."""


def good_training(samples: Iterable[Sample]) -> list[Sample]:
    """The GOOD samples a model fits on: those marked ``split == "train"`` when any is so
    marked, else every GOOD sample. A type left without any (only test images, say) is named in
    one :class:`DatasetWarning`: a model learns a type only from its GOOD training images."""
    samples = list(samples)
    good = [s for s in samples if s.label == GOOD]
    if any(s.split == "train" for s in good):
        good = [s for s in good if s.split == "train"]
    left_out = sorted(set(feature_types(samples)) - set(feature_types(good)))
    if left_out:
        warnings.warn(f"type(s) {', '.join(left_out)} have no GOOD training images (train/good) and "
                      "are left out of the model: training needs GOOD training images of every type",
                      DatasetWarning, stacklevel=2)
    return good


def describe(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per type, what a dataset holds as diffqc reads it (``diffqc data info``): ``train``, the
    GOOD images a model fits on (:func:`good_training`); ``good``, the other GOOD images (held
    out: ``diffqc test`` measures them); ``defects`` per kind; ``masks``, the defects with one;
    ``unlabelled``; ``sizes``, the image sizes (H, W) from the headers with their counts; and
    ``unreadable``, the images whose header cannot be read."""
    training = {id(s) for s in good_training(samples)}
    out: dict[str, dict[str, Any]] = {}
    for t in feature_types(samples):
        mine = [s for s in samples if s.feature_type == t]
        defects = [s for s in mine if s.label == DEFECTIVE]
        shapes = [(s, image_shape(s.path)) for s in mine]
        out[t] = {
            "train": sum(id(s) in training for s in mine),
            "good": sum(s.label == GOOD and id(s) not in training for s in mine),
            "defects": dict(sorted(Counter(str(s.defect or "defect") for s in defects).items())),
            "masks": sum(s.mask_path is not None for s in defects),
            "unlabelled": sum(s.label == UNKNOWN for s in mine),
            "sizes": [[h, w, n] for (h, w), n in sorted(Counter(hw for _, hw in shapes if hw).items())],
            "unreadable": [str(s.path) for s, hw in shapes if hw is None],
        }
    return out


# how much more often one label's images of a type are lossy, or of a size the GOOD images are not,
# than the other's for :func:`label_shortcuts` to name it: that fact alone ranks the images with an
# AUROC of 0.5 +- 0.1 or further from chance (0.5 + the difference of the shares / 2)
SHORTCUT_SHARE = 0.2

# what a note of :func:`label_shortcuts` says a score measures, and how to mend it
_TOLD_APART = ("a score tells them apart by the file alone, so an AUROC measured on them says how "
               "well the files are told apart, not the defects (the line's parts are saved alike); "
               "take a type's GOOD and defective images with one camera, its settings and its file "
               "format")


def label_shortcuts(samples: Sequence[Sample]) -> list[str]:
    """Notes on the types whose defective images differ from their GOOD ones in the file itself
    (one note per difference, naming its types): lossy compression (JPEG, WebP) far more often in
    one label's images than in the other's, or defects of a size outside the GOOD images' range
    (a reject bin photographed apart, at another zoom or saved as JPEG). A score then tells the
    labels apart without a defect (JPEG defects at quality 90 raised the AUROC of a test of the
    synthetic set from 0.887 to 0.940), which evaluate and test would report as the detector's.
    Read from the headers: files that cannot be read are left to the readers that name them."""
    compressed: list[tuple[str, Path]] = []  # per type: its counts, and an image of the odd kind
    sized_otherwise: list[tuple[str, Path]] = []
    by_type: dict[str, dict[int, list[Sample]]] = {}
    for s in samples:
        by_type.setdefault(s.feature_type, {GOOD: [], DEFECTIVE: []}).get(s.label, []).append(s)
    for t, labelled in sorted(by_type.items()):
        good, bad = labelled[GOOD], labelled[DEFECTIVE]
        if not good or not bad:
            continue
        kind = {id(s): file_compression(s.path) for s in (*good, *bad)}
        lossy = [[s for s in label if kind[id(s)] == "lossy"] for label in (good, bad)]
        known = [sum(kind[id(s)] is not None for s in label) for label in (good, bad)]
        if all(known) and abs(len(lossy[1]) / known[1] - len(lossy[0]) / known[0]) >= SHORTCUT_SHARE:
            compressed.append((f"{t}: {len(lossy[1])} of {known[1]} defective, {len(lossy[0])} of "
                               f"{known[0]} GOOD", (lossy[1] or lossy[0])[0].path))
        shape = {id(s): image_shape(s.path) for s in (*good, *bad)}
        hws = [hw for s in good if (hw := shape[id(s)])]
        sized = [(s, hw) for s in bad if (hw := shape[id(s)])]
        if not hws or not sized:
            continue
        (h0, h1), (w0, w1) = ((min(side), max(side)) for side in zip(*hws, strict=True))
        outside = [(s, hw) for s, hw in sized if not (h0 <= hw[0] <= h1 and w0 <= hw[1] <= w1)]
        if outside and len(outside) >= SHORTCUT_SHARE * len(sized):
            s, (h, w) = outside[0]
            theirs = f"{h0}x{w0}" if (h0, w0) == (h1, w1) else f"{h0}-{h1}x{w0}-{w1}"
            sized_otherwise.append((f"{t}: {len(outside)} of {len(sized)} defective ({h}x{w} px, ...), "
                                    f"GOOD {theirs} px", s.path))
    notes = []
    if compressed:
        notes.append(f"defective and GOOD images of {len(compressed)} type(s) are lossy (JPEG or WebP) "
                     f"in other shares ({_listed(compressed)}): {_TOLD_APART}")
    if sized_otherwise:
        notes.append(f"defective images of {len(sized_otherwise)} type(s) are of a size outside their "
                     f"GOOD images' ({_listed(sized_otherwise)}); resized to the model's input they "
                     f"show the part at another scale: {_TOLD_APART}")
    return notes


def _listed(found: Sequence[tuple[str, Path]]) -> str:
    """The first few types' counts of a :func:`label_shortcuts` note, and its first example."""
    return f"{first_few([text for text, _ in found], 3)}; e.g. {path_text(found[0][1])}"


def without_copies(samples: Sequence[Sample]) -> tuple[list[Sample], list[str]]:
    """``samples`` less each file that is a byte-identical copy of an earlier one of the same type
    and label, and what was found, as notes. A copy of a fit image in another fold, or among the
    calibration images, is scored by a model fit on itself (a nearest-neighbour distance of 0):
    the cross-validated AUROC counts it twice and too well, and the calibration cuts too low
    (the line's GOOD parts flagged too often). Copies with the other label are kept and named
    (one label is wrong). Files that cannot be read, or are no image (a share's empty files are
    all alike), are kept as they are: the reading names them."""
    first: dict[tuple[str, str], tuple[int, Sample]] = {}
    kept: list[Sample] = []
    dropped: list[str] = []
    clashes: list[str] = []
    label = {GOOD: "good", DEFECTIVE: "defect"}
    for i, s in enumerate(samples):
        try:
            digest = fingerprint(s.path)
        except OSError:
            kept.append(s)
            continue
        at, original = first.setdefault((s.feature_type, digest), (i, s))
        if at == i or image_shape(s.path) is None:  # not an image: empty files, say
            kept.append(s)
        elif original.label == s.label:  # the same file listed twice, or a copy of it
            dropped.append(f"{s.path} (listed twice)" if s.path == original.path
                           else f"{s.path} = {original.path}")
        else:
            kept.append(s)
            clashes.append(f"{s.path} ({label.get(s.label, s.label)}) = {original.path} "
                           f"({label.get(original.label, original.label)})")
    notes = []
    for found, what in ((dropped, "byte-identical copies of another image of the same type and "
                                  "label, left out (a copy held out of a fit, in another fold or "
                                  "the calibration images, is scored by a model fit on itself)"),
                        (clashes, "byte-identical to an image of the same type with the other "
                                  "label, kept (one of the labels is wrong)")):
        if found:
            notes.append(f"{len(found)} image(s) are {what}: {first_few(found)}")
    return kept, notes


def iter_images(
    samples: Iterable[Sample], errors: list[ImageReadError], *, skip_corrupt: bool = False
) -> Iterator[tuple[Sample, np.ndarray]]:
    """Each readable sample with its image, one at a time; unreadable files go to ``errors``.
    With ``skip_corrupt`` they are skipped (a warning each); without it every file is still
    tried, nothing more is yielded after the first failure, and the end raises one error naming
    them all (the one file's :class:`ImageReadError`, or :class:`UnreadableImagesError`)."""
    for s in samples:
        try:
            image = read_image(s.path)
        except ImageReadError as exc:
            errors.append(exc)
            if skip_corrupt:
                warnings.warn(f"skipped: {exc}", stacklevel=3)
            continue
        if not errors or skip_corrupt:  # once one failed, only the failures still matter
            yield s, image
    if errors and not skip_corrupt:
        raise errors[0] if len(errors) == 1 else UnreadableImagesError(errors)


def read_images(
    samples: Sequence[Sample], *, skip_corrupt: bool = False
) -> tuple[list[np.ndarray], list[Sample], list[ImageReadError]]:
    """Read every sample's image (:func:`iter_images`): the images, the samples read and the
    unreadable files' errors."""
    errors: list[ImageReadError] = []
    pairs = list(iter_images(samples, errors, skip_corrupt=skip_corrupt))
    return [image for _, image in pairs], [s for s, _ in pairs], errors


def with_split(samples: Iterable[Sample], split: str) -> list[Sample]:
    return [replace(s, split=split) for s in samples]
