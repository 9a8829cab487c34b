"""Where and how a command writes: one rule for every output folder diffqc fills (a model bundle,
an evaluation report), one way to write a file so that a failed write leaves nothing half
written, and one way to write JSON that every parser reads (no NaN or Infinity).

A folder qualifies when it is new, empty, or an earlier output of the same kind (whose own files
are then replaced). Any other non-empty folder is refused unless ``force``; even then nothing
already there is deleted or replaced: the output's files are written beside what is there, and a
file or folder bearing one of their names is refused.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from diffqc.errors import OutputError, why_unwritable

# the hidden folder a bundle is written in inside an existing folder before its files are moved
# in (a run killed there leaves it: the folder still counts as empty, and nothing deletes it)
PARTIAL_PREFIX = ".diffqc-partial-"


def read_json(path: Path | str) -> Any:
    """A JSON file diffqc wrote and a user may have edited (a bundle's ``metadata.json``,
    ``config.json``, ``calibration.json``, ``export.json``): one saved by Windows Notepad or
    PowerShell starts with a byte order mark, read as the same JSON. OSError or ValueError."""
    return json.loads(Path(path).read_text(encoding="utf-8-sig"))


def interrupted_saves(path: Path, *, min_age_s: float = 600.0) -> list[Path]:
    """The hidden folders a save of a bundle to ``path`` left when it was interrupted (killed, or
    a power cut, between its first write and its last move): inside ``path`` and beside it, older
    than ``min_age_s`` (a younger one may be a save running now). Never deleted here."""
    now = time.time()
    found = []
    for folder, prefix in ((path, PARTIAL_PREFIX), (path.parent, f".{path.name}.partial-")):
        with suppress(OSError):
            for p in folder.iterdir():
                if p.name.startswith(prefix) and p.is_dir() and now - p.stat().st_mtime > min_age_s:
                    found.append(p)
    return sorted(found)


def umask() -> int:
    """This process's umask: from ``/proc/self/status`` on Linux (read without changing it, as
    another thread may be making a file), else by setting and restoring it."""
    with suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_plain_modes(folder: Path, names: Sequence[str]) -> None:
    """Give ``folder`` and its files ``names`` the modes the umask gives any new folder and file
    (0755 and 0644 under the usual 022): a temporary folder is made 0700, and safetensors writes
    0600, which a service run as another user (systemd's DynamicUser, a container's) cannot read.
    A file system without modes (a FAT stick, some network shares) keeps its own."""
    mask = umask()
    for path, mode in [*((folder / name, 0o666) for name in names), (folder, 0o777)]:
        with suppress(OSError):
            os.chmod(path, mode & ~mask)


def folder_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (0 for what cannot be read)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def check_output_folder(path: Path | str, *, what: str, names: Sequence[str],
                        is_ours: Callable[[Path], bool], foreign: str, force: bool = False) -> Path:
    """``path`` if ``what`` (its files: ``names``) may be written there; :class:`OutputError`
    otherwise. ``is_ours``: whether a folder holds an earlier output of this kind; ``foreign``:
    how the message describes a folder that does not (e.g. "is not a diffqc model bundle")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write the {what} to {path}: it exists and is not a folder")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"cannot write the {what} to {path}: it is a link to {os.readlink(path)}, "
                          "which does not exist")
    into = path  # the folder the output's files or folder are made in, said before the work
    while not into.exists() and into != into.parent:
        into = into.parent
    if into.is_dir() and not can_write_in(into):
        raise OutputError(f"cannot write the {what} to {path}: {into} is not writable "
                          f"({why_unwritable(into)})")
    if not path.is_dir() or is_ours(path) or not any(not p.name.startswith(PARTIAL_PREFIX)
                                                     for p in path.iterdir()):
        return path
    if not force:
        raise OutputError(f"{path} is not empty and {foreign}; choose a new or empty folder, or "
                          f"pass --force (force=True from Python) to write the {what}'s files beside "
                          "what is there (nothing is deleted)")
    clashes = [name for name in names if (path / name).exists()]
    if clashes:
        raise OutputError(f"{path} already holds {', '.join(clashes)}, not from a diffqc {what}; "
                          "--force writes beside other files but never replaces one: choose a "
                          "new or empty folder")
    return path


# a report's or table's path meaning standard output (an image's: standard input), as curl -o -
# and tar -f - read it
STDIO = "-"


def is_stream(path: Path) -> bool:
    """Whether ``path`` is written as a stream rather than as a file: ``-`` (standard output), a
    character device (``/dev/null``), a pipe (a named pipe, ``/dev/stdout`` in a pipeline), or
    this process's own standard output or error (``/dev/stdout`` redirected to a file). Such a
    path is never read, truncated or replaced (:func:`open_stream`)."""
    if _own_stream(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _own_stream(path: Path) -> int | None:
    """The descriptor of this process's standard output or error that ``path`` names (``-``:
    standard output), else None."""
    if str(path) == STDIO:
        return 1
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    for fd in (1, 2):
        with suppress(OSError):  # no such descriptor (a daemon's closed stdout)
            if os.path.samestat(st, os.fstat(fd)):
                return fd
    return None


def open_stream(path: Path) -> BinaryIO:
    """``path`` (:func:`is_stream`) opened to write, unbuffered: this process's standard output or
    error through its own descriptor, after what was printed to it (flushed first), so that the
    two do not overwrite each other; a device or a pipe appended to."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError, AttributeError):
            stream.flush()
    fd = _own_stream(path)
    return open(path, "ab", buffering=0) if fd is None else open(os.dup(fd), "wb", buffering=0)


def write_all(fh: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file (whose one write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view) or 0:]


def check_output_file(path: Path, *, option: str, is_ours: Callable[[Path], bool], what: str,
                      force: bool = True) -> None:
    """``option PATH`` before any work: a new file, or an earlier ``what`` (replaced if
    ``force``); a folder, or any other file (a user's, never replaced), is an
    :class:`OutputError`. ``is_ours``: whether a file is an earlier ``what`` (a file it cannot
    read, or not as it expects, is not). A device or a pipe (:func:`is_stream`:
    ``/dev/stdout``, ``/dev/null``) is written to as it is, never read; a disk device is refused.
    The file's folder is made if it does not exist, and one that takes no new file is refused
    (:func:`check_writable`): said before the work, not after it."""
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    if is_stream(path):
        return
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file, not a folder" if file is not None else exc.strerror or exc
            raise OutputError(f"cannot write {path}: {why}") from None
        check_writable(path)
        return
    if not path.is_file():
        raise OutputError(f"{option} {path} is a disk device or a socket, not a file; give a file name")
    try:
        earlier = is_ours(path)
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        raise OutputError(f"{option} {path} exists and is not an earlier {what} (nothing is "
                          "replaced); give a new file name")
    if not force:
        raise OutputError(f"{option} {path} exists (an earlier {what}); pass --force to replace it")
    check_writable(path)


def is_csv_table(columns: Sequence[str]) -> Callable[[Path], bool]:
    """For :func:`check_output_file`: whether a file is a CSV table this program wrote with
    ``columns`` (its header is the first line)."""
    header = ",".join(columns)

    def ours(path: Path) -> bool:
        with open(path, "rb") as fh:
            return fh.readline().decode("utf-8").rstrip("\r\n") == header

    return ours


def check_writable(path: Path) -> None:
    """An :class:`OutputError` naming ``path``, a file written after long work, when its folder
    takes no new file (a read-only volume, another user's folder): said before the work, not
    after it. A probe file is made there and removed."""
    try:
        _probe(path.parent, f".{path.name}.")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def can_write_in(folder: Path) -> bool:
    """Whether ``folder`` takes a new file (a probe file is made there and removed)."""
    try:
        _probe(folder, ".diffqc.")
    except OSError:
        return False
    return True


def _probe(folder: Path, prefix: str) -> None:
    fd, probe = tempfile.mkstemp(prefix=prefix, suffix=".probe", dir=folder)
    os.close(fd)
    os.unlink(probe)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a rename: ``path`` holds either its
    previous content or all of ``data``, never part of it. A write that fails (full disk,
    unwritable folder) is an :class:`OutputError` naming ``path``, and no temporary file is left.
    ``sync``: fsync the file and the rename, so that they outlive a power cut (a bundle's files;
    a picture the ``visualize`` command draws need not wait for the disk). A device or a pipe
    (:func:`is_stream`) is written into as it is."""
    if is_stream(path):
        try:
            with open_stream(path) as fh:
                write_all(fh, data)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return
    with replacing(path, data, sync=sync):
        pass


@contextmanager
def replacing(path: Path, data: bytes, *, sync: bool = True) -> Iterator[None]:
    """:func:`write_atomic` of a file (not a stream) around a body: ``data`` is written beside
    ``path`` (and fsynced) before the body runs, and renamed onto ``path`` after it. Where the
    write or the body fails, ``path`` is as it was and no temporary file is left; the body runs
    only once the new content is safely on disk (a bundle's previous calibration kept aside,
    which a full disk must not cost)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def discard() -> None:
        with suppress(OSError):  # a read-only folder refuses even this (EROFS)
            tmp.unlink(missing_ok=True)

    def failed(exc: BaseException) -> None:
        discard()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None

    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except BaseException as exc:
        failed(exc)
        raise
    try:
        yield
    except BaseException:  # the body's own error, as it is
        discard()
        raise
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        failed(exc)
        raise
    if sync:
        sync_folder(path.parent)


def keep_file(current: Path, kept: Path) -> None:
    """``current`` kept as ``kept`` too, atomically: a hard link (no room taken), or a copy on a
    file system without them."""
    link = kept.with_name(f".{kept.name}.{os.getpid()}.link")
    try:
        link.unlink(missing_ok=True)
        os.link(current, link)
        os.replace(link, kept)
    except OSError:
        with suppress(OSError):
            link.unlink(missing_ok=True)
        write_atomic(kept, current.read_bytes())


def move_file(src: Path, dest: Path, tag: str) -> Path:
    """Move file ``src`` to ``dest`` or, where that name is taken, to the first free one of
    ``<stem>-<tag><suffix>``, ``<stem>-<tag>-2<suffix>``, ...: never over another file. Across file
    systems (a rename fails with EXDEV) it is copied beside the target, synced, renamed in, and
    only then removed from ``src``; where ``src`` cannot be removed, the copy is removed again and
    the error raised. Returns where it went."""
    target, n = dest, 0
    while os.path.lexists(target):  # one writer: the folder's own watch
        n += 1
        target = dest.with_name(f"{dest.stem}-{tag}{f'-{n}' if n > 1 else ''}{dest.suffix}")
    try:
        os.rename(src, target)
        return target
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        st = os.stat(src)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.rename(name, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(name)
        raise
    try:
        os.unlink(src)
    except OSError:
        with suppress(OSError):
            os.unlink(target)  # the copy this wrote: the file stays where it was
        raise
    sync_folder(target.parent)
    return target


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename into it, a new file's name) to the disk, so that they
    outlive a power cut. Where a folder cannot be opened or synced (Windows, some network
    shares), nothing: the file's own fsync is what such a system offers."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextmanager
def scratch_folder(prefix: str, *, what: str) -> Iterator[Path]:
    """A temporary folder for ``what`` (under TMPDIR), removed on exit. A write there that fails
    for want of room (a small /tmp on an edge device) is an :class:`OutputError` that names the
    temporary folder and how to choose another, not a bare "No space left on device"."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
            yield Path(tmp)
    except OSError as exc:
        if isinstance(exc, OutputError) or exc.errno not in _NO_ROOM:
            raise
        raise OutputError(f"no room for {what} in the temporary folder {tempfile.gettempdir()} "
                          f"({exc.strerror}); free space there or set TMPDIR to a folder with "
                          "room") from None


def json_safe(x: Any) -> Any:
    """``x`` with every NaN or infinite float (in dicts, lists and tuples) as None: JSON has no
    NaN or Infinity, and Python's ``json`` writes them as tokens that jq, JavaScript and most other
    parsers refuse."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def path_text(path: Path | str) -> str:
    """A path (or a text holding one) as text that UTF-8 files, databases and JSON readers take.

    A file name that is not UTF-8 (``b"caf\\xe9.png"``, written by an older Windows or Latin-1
    system on a share) reaches Python with surrogate escapes, which no UTF-8 encoder writes; its
    undecodable bytes become ``\\xNN`` here (``caf\\xe9.png``). Other text is returned as it is."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name gives (a caller's text): \udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_columns(rows: Sequence[Sequence[str]], *, right_from: int | None = None) -> list[str]:
    """``rows`` of text as aligned lines, two spaces between columns: left-justified, or from
    column ``right_from`` on right-justified (counts)."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    edge = len(widths) if right_from is None else right_from
    return ["  ".join(c.ljust(w) if j < edge else c.rjust(w)
                      for j, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]


def json_line(x: Any) -> str:
    """One line of strict JSON (see :func:`json_safe`): what a command prints on stdout."""
    return json.dumps(json_safe(x), allow_nan=False)
