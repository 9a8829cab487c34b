"""Folder ingestion: inspect images as a camera writes them into a folder.

A file is taken once it is complete: its size and modification time have not changed for
``settle_s`` and it decodes. Each file is keyed by its path relative to the folder, the
SHA-256 of its content and its modification time; the key is stored with the record in the same
transaction, and only then is the file moved to ``processed/`` (or, with ``after="keep"``, left
in place). After a crash, a file whose key is already stored is moved without being inspected
again, and a file without a stored key is inspected: nothing is skipped, nothing counted twice.
A key stored ``NOT_INSPECTED`` is not done: a file moved back from ``failed/`` as it was is tried
again (its earlier record stays).
A file written again with the same name and bytes (a camera repeating its last frame) is a new
file, recorded as a part (and named in the log by the pipeline, as any repeated image).

Files are found to any depth below the folder (a camera filing by day or hour), not in
``processed/``, ``failed/`` or hidden folders. Feature type: ``feature_type`` when given, else the
name of the nearest folder around the file that the model knows (``DIR/<type>/img.png``,
``DIR/<type>/2026-12-02/img.png``), else unknown (scored under every type).
Files that do not decode (an empty one too), or cannot be read (a camera's file this user may not
read), once they have not changed for ``fail_after_s`` are stored as ``NOT_INSPECTED`` and moved to
``failed/`` (one still being written, however slowly, is waited for).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from diffqc.calibration import DECISIONS
from diffqc.data import (
    IMAGE_SUFFIXES,
    MAX_NAME_LEN,
    OTHER_IMAGE_SUFFIXES,
    SPLITS,
    dataset_folder_of,
    decode_image,
    escaped,
    folder_like_a_type,
    image_compression,
    is_hidden,
    type_of_folders,
)
from diffqc.errors import (
    BundleError,
    ConfigError,
    ImageReadError,
    OutputError,
    StoreError,
    UnknownFeatureTypeError,
    address_hint,
    did_you_mean,
    first_few,
    why_unwritable,
)
from diffqc.inspection import BUNDLE_FILES
from diffqc.output import can_write_in, move_file, path_text
from diffqc.service.buffer import BufferClosed, BufferFull, InspectionPipeline, Job
from diffqc.service.line import LineServices
from diffqc.service.logs import utc_minute
from diffqc.service.parts import PART_WINDOW_S, check_part_types
from diffqc.service.security import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    ImageTooLarge,
    check_image_header,
    kept_as_sent,
)
from diffqc.service.store import ARTIFACT_KINDS, NOT_INSPECTED, ResultRecord, ResultStore
from diffqc.service.systemd import STOP_SIGNALS, Watchdog, notify, worker_problems
from diffqc.visualize import DEFAULT_HEATMAP_SIZE, overlay_scales

log = logging.getLogger("diffqc.watch")

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


@dataclass
class WatchSettings:
    directory: Path
    feature_type: str | None = None
    source: str | None = None  # idempotency namespace; default "watch:<absolute folder>"
    poll_s: float = 0.5
    settle_s: float = 1.0
    fail_after_s: float = 10.0
    after: str = "move"  # "move" to processed/ / failed/, or "keep" in place
    processed_dir: Path | None = None
    failed_dir: Path | None = None
    max_pending: int = 16
    max_file_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    line: str | None = None  # recorded on every part from this folder
    station: str | None = None
    camera: str | None = None
    part_id_pattern: str | None = None  # the part id in a file's name (part_id_of); None: the name

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.after not in ("move", "keep"):
            raise ValueError(f"after must be 'move' or 'keep', got {self.after!r}")


def compile_part_id_pattern(text: str) -> re.Pattern[str]:
    """``--part-id-pattern``: a regular expression found in a file's name without its suffix;
    the part id is its group named ``part``, else its only group, else the whole match."""
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ConfigError(f"--part-id-pattern {text!r} is not a regular expression: {exc}") from None
    if pattern.groups > 1 and "part" not in pattern.groupindex:
        raise ConfigError(f"--part-id-pattern {text!r} has {pattern.groups} groups: name the part id's "
                          "(?P<part>...) or make the others non-capturing (?:...)")
    return pattern


def part_id_of(stem: str, pattern: re.Pattern[str] | None) -> str | None:
    """The part id in a file's name without its suffix (``P-0001_dots`` -> ``P-0001`` by
    ``P-\\d+``): the name itself without a pattern; None when the pattern is not found in it
    (or finds nothing)."""
    if pattern is None:
        return stem
    found = pattern.search(stem)
    if found is None:
        return None
    if "part" in pattern.groupindex:
        value = found.group("part")
    else:
        value = found.group(1) if pattern.groups else found.group(0)
    return value or None


class _FolderUnreadable(OSError):
    """The watched folder itself cannot be listed (a network share that dropped)."""


class _CannotMove(OSError):
    """An inspected file cannot be moved to processed/ or failed/ (its record is stored)."""


# a move's refusals that, where processed/ takes files, are the file's folder's: it alone stays
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}


REWRITES_SAID = 3  # rewrites of a file before it rests that name it in the log


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float  # monotonic: when its size and mtime were first seen as they are
    rewrites: int = 0  # changes that did not grow it, since it last rested for settle_s
    said: bool = False  # named in the log as rewritten faster than it settles


@dataclass
class StepReport:
    inspected: int = 0
    already_recorded: int = 0
    failed: int = 0
    waiting: int = 0
    records: list[ResultRecord] = field(default_factory=list)


KEEP_HINT = "give --keep for a folder this computer may only read"


def check_watch_arguments(directory: Path | str, model_path: Path | str, *, keep: bool) -> Path:
    """The folder to watch, resolved (:func:`check_watch_folder`), once ``model_path`` holds a
    bundle's files. ``watch`` alone takes its folder first: a bundle given as the folder and a
    folder that is none as the model are named as the two swapped. Nothing is created here."""
    from diffqc.bundle import check_bundle_files

    try:
        check_bundle_files(model_path, usage="it comes after the folder: diffqc watch DIR MODEL")
    except BundleError:
        if all((Path(directory) / name).is_file() for name in BUNDLE_FILES):
            raise BundleError(f"{model_path} is not a diffqc model bundle and {directory} is one: "
                              "watch takes the folder first, then the model: "
                              f"diffqc watch {model_path} {directory}") from None
        raise
    return check_watch_folder(directory, moves_into=() if keep else ("processed", "failed"))


def check_watch_folder(folder: Path | str, *, moves_into: Sequence[Path | str] = ("processed", "failed"),
                       hint: str = KEEP_HINT) -> Path:
    """The folder to watch, resolved; one that does not exist or is a file is named. Its files
    are moved into ``moves_into`` (relative to it; none with ``--keep``): the folder and those
    must take them, else an :class:`OutputError` ends with ``hint`` (a share this computer may
    only read). Nothing is created here."""
    root = Path(folder).resolve()
    if not root.exists():
        raise FileNotFoundError(f"watch folder {root} does not exist{address_hint(str(folder))}")
    if not root.is_dir():
        raise NotADirectoryError(f"watch folder {root} is a file, not a folder")
    for target in [root / t for t in moves_into]:
        where = target
        while not where.exists() and where != where.parent:  # what mkdir would write into
            where = where.parent
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            why = f"not writable: {why_unwritable(where)}" if where.is_dir() else "a file"
            raise OutputError(f"watch: cannot move inspected files into {target} ({where} is {why}): {hint}")
    if moves_into and not os.access(root, os.W_OK | os.X_OK):  # the files leave it
        raise OutputError(f"watch: cannot move inspected files out of {root} (it is not writable: "
                          f"{why_unwritable(root)}): {hint}")
    if moves_into and (held := dataset_in(root)) is not None:
        raise OutputError(f"watch: {root} holds a dataset ({held}): watch moves each image it inspects "
                          "into processed/, which would take it apart; score a dataset with `diffqc "
                          "inspect MODEL DIR` or `diffqc test MODEL DIR` (`diffqc watch DIR MODEL --keep` "
                          "moves nothing)")
    return root


def check_watch_folders_apart(folders: Sequence[Path | str]) -> None:
    """A :class:`ConfigError` for ``serve --watch`` folders that are one folder, or one inside
    another: a folder's watcher reads its sub-folders too, so each file there was inspected by
    both (two records of one part, the second named a repeated frame)."""
    roots = [(str(f), Path(f).resolve()) for f in folders]
    for i, (given, root) in enumerate(roots):
        for other, outer in roots[:i]:
            if root == outer:
                raise ConfigError(f"--watch {given} is the folder --watch {other} names: give it once")
            if root.is_relative_to(outer):
                inner, around = given, other
            elif outer.is_relative_to(root):
                inner, around = other, given
            else:
                continue
            raise ConfigError(f"--watch {inner} lies in --watch {around}, whose watcher reads its "
                              "sub-folders too: each of its files would be inspected twice; give "
                              "one of them")


def dataset_in(root: Path, *, most: int = 64) -> Path | None:
    """A sign that ``root`` holds a dataset in MVTec's layout (a camera's folder never does): a
    ``train/`` or ``test/`` folder with ``good/`` in it, as ``root`` or in it or in one of its
    first ``most`` folders (a root of types), or ``root`` being such a ``good/``. None if not."""

    def folders(p: Path) -> list[Path]:
        with contextlib.suppress(OSError), os.scandir(p) as entries:
            found = (Path(e.path) for e in entries if e.is_dir() and not is_hidden(Path(e.path)))
            return list(itertools.islice(found, most))
        return []

    def good_in(split: Path) -> Path | None:
        if split.name.lower() not in SPLITS:
            return None
        return next((g for g in folders(split) if g.name.lower() == "good"), None)

    if root.name.lower() == "good" and root.parent.name.lower() in SPLITS:
        return root
    below = folders(root)  # a type's splits, or a root's types
    splits = [root, *below, *(split for folder in below for split in folders(folder))]
    return next((good for split in splits if (good := good_in(split)) is not None), None)


RECENT_PARTS = 10_000  # the stored parts a folder's name is looked for among as a former type


def check_feature_type(feature_type: str | None, classes: Sequence[str]) -> None:
    """A fixed ``--feature-type`` must be one of the model's types (a typo would send every
    part to NOT_INSPECTED)."""
    if feature_type is not None and feature_type not in classes:
        raise UnknownFeatureTypeError(
            f"--feature-type {feature_type!r} is not a type of this model"
            f"{did_you_mean(feature_type, classes)}; it knows {', '.join(classes)}"
        )


class FolderWatcher:
    """Polls one folder and feeds complete image files into an :class:`InspectionPipeline`."""

    SAY_EVERY_S = 60.0  # the log's word of what was inspected: the first at once, then at most this often

    def __init__(self, settings: WatchSettings, pipeline: InspectionPipeline, store: ResultStore) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.store = store
        root = Path(settings.directory).resolve()
        self.processed = (settings.processed_dir or root / "processed").resolve()
        self.failed = (settings.failed_dir or root / "failed").resolve()
        moves = (self.processed, self.failed) if settings.after == "move" else ()
        self.root = check_watch_folder(root, moves_into=moves)
        self.source = path_text(settings.source or f"watch:{self.root}")
        # the heat maps and kept images the pipeline writes (inside the folder when the store is,
        # `cd /camera && diffqc watch . model`): never parts, or each would be inspected in turn
        artifacts = pipeline.artifacts
        self._own = {(artifacts.root / kind).resolve() for kind in ARTIFACT_KINDS} if artifacts else set()
        # and a SQLite store's own files there: not named as files passed over
        db = store.path.resolve() if store.path is not None else None
        self._store_files = ({db.with_name(db.name + end) for end in ("", "-wal", "-shm", "-journal")}
                             if db is not None else set())
        self.pipeline = pipeline
        check_feature_type(settings.feature_type, pipeline.detector.classes_)
        self._seen: dict[Path, _Seen] = {}
        self._kept: set[tuple[str, int, int]] = set()  # after="keep": (path, size, mtime) done
        self._left_in: set[Path] = set()  # folders whose files may not leave them (said once)
        self._passed_over: set[str] = set()  # the file endings named in the log (once each)
        self._links: dict[tuple[Path, Path], bool] = {}  # (link, where it leads): passed over?
        self._near_types: set[str] = set()  # folders named almost as a type, named in the log
        self._asked_store: set[str] = set()  # folder names looked for as a type of stored parts
        self._former_types: set[str] = set()  # those found: named in the log
        self._pattern = (compile_part_id_pattern(settings.part_id_pattern)
                         if settings.part_id_pattern is not None else None)
        self._unmatched_logged = False  # a name the part id pattern is not found in: logged once
        self._long_logged = False  # a part id longer than any the service takes: logged once
        self.problem: str | None = None  # why nothing is taken now (serve's /readyz)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.totals = StepReport()

    # ------------------------------------------------------------------ scanning

    @property
    def classes(self) -> set[str]:
        """The types of the model the pipeline serves now (a retrained one may add types)."""
        return set(self.pipeline.detector.classes_)
    def _candidates(self) -> list[Path]:
        """The image files under the folder, to any depth (a camera filing by day and hour), but
        not in processed/, failed/, hidden folders or the folders of the heat maps and kept images
        the pipeline writes; a folder reached twice (a link) is read once."""
        out: list[Path] = []
        other: dict[str, list[str]] = {}  # files of an ending diffqc does not read, by ending
        skip = {self.processed, self.failed, *self._own}
        seen: set[Path] = set()
        stack = [self.root]
        while stack:
            folder = stack.pop()
            resolved = folder.resolve()
            if resolved in seen or resolved in skip:
                continue
            seen.add(resolved)
            try:
                entries = sorted(folder.iterdir())
            except OSError as exc:
                if folder == self.root:  # a network share that dropped: run() says so, once
                    raise _FolderUnreadable(exc.strerror or str(exc)) from exc
                continue  # a sub-folder removed or unreadable meanwhile: looked at next poll
            subfolders = []
            for entry in entries:
                if is_hidden(entry) or entry.name.startswith("~"):
                    continue
                try:  # a folder listable but not searchable (mode 644) refuses them: next poll
                    is_dir, is_file = entry.is_dir(), entry.is_file()
                except OSError:
                    continue
                if is_dir:
                    if not (entry.is_symlink() and self._passes_over_link(entry)):
                        subfolders.append(entry)
                elif not is_file or resolved / entry.name in self._store_files:
                    continue
                elif self._is_image_name(entry):
                    out.append(entry)
                elif (ending := entry.suffix.lower() or "(none)") not in self._passed_over and not (
                        entry.name.lower().endswith(_TEMP_SUFFIXES)):  # named once: not collected again
                    other.setdefault(ending, []).append(entry.name)
            stack.extend(reversed(subfolders))
        self._name_passed_over(other)
        return out

    def _passes_over_link(self, link: Path) -> bool:
        """Whether the linked folder ``link`` is passed over, said once: a link to the watched
        folder's own folder or one above it (reading it would take in the folders beside this
        one, this one again among them) or, when files are moved, to a dataset (its images moved
        into processed/ would take it apart). A link to another folder (a camera's share) is read."""
        target = link.resolve()
        known = self._links.get((link, target))
        if known is not None:
            return known
        why = None
        if self.root.is_relative_to(target):
            why = f"it leads to {target}, which holds the watched folder"
        elif self.settings.after == "move" and (held := dataset_in(target) or dataset_folder_of(target)):
            why = f"it leads to a dataset ({held}), which moving its images into processed/ would take apart"
        if why is not None:
            log.warning("%s: passing over the link %s (%s)", self.root, link, why)
        self._links[(link, target)] = why is not None
        return why is not None

    def _name_passed_over(self, other: dict[str, list[str]]) -> None:
        """A camera set to a format diffqc does not read (``.raw``) fills the folder and nothing is
        inspected: each file ending passed over is named once, with the endings that are read."""
        for suffix, names in sorted(other.items()):  # endings not named before (_candidates)
            self._passed_over.add(suffix)
            image = ("; an image format diffqc does not read: set the camera to write PNG, BMP or TIFF"
                     if suffix in OTHER_IMAGE_SUFFIXES else "")
            log.warning("%s: passing over %d file%s ending %s (%s): not an image file diffqc reads "
                        "(%s)%s", self.root, len(names), "s" * (len(names) > 1), suffix, first_few(names, 3),
                        ", ".join(sorted(IMAGE_SUFFIXES)), image)

    @staticmethod
    def _is_image_name(p: Path) -> bool:
        name = p.name.lower()
        return (
            not name.startswith((".", "~"))
            and not name.endswith(_TEMP_SUFFIXES)
            and p.suffix.lower() in IMAGE_SUFFIXES
        )

    def ready_files(self) -> list[Path]:
        """Files whose size and mtime have been stable for ``settle_s``, oldest first (as the
        camera wrote them: a backlog in per-type folders is inspected a part's crops together,
        not every crop of one type before any of the next)."""
        now = time.monotonic()
        ready: list[tuple[int, str, Path]] = []
        present = set()
        for path in self._candidates():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            present.add(path)
            if (str(path), st.st_size, st.st_mtime_ns) in self._kept:
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._seen[path] = seen = self._changed(path, seen, st.st_size, st.st_mtime_ns, now)
                if self.settings.settle_s > 0:
                    continue
            rested = now - seen.stable_since  # an empty one: until it fails, unless it is written
            if rested >= self.settings.settle_s and (st.st_size > 0 or rested >= self.settings.fail_after_s):
                seen.rewrites = 0
                ready.append((st.st_mtime_ns, str(path), path))
        for gone in set(self._seen) - present:
            del self._seen[gone]
        if self._kept:  # forget the files that are gone (something else emptied the folder)
            names = {str(p) for p in present}
            self._kept = {k for k in self._kept if k[0] in names}
        return [path for *_, path in sorted(ready)]

    def _changed(self, path: Path, seen: _Seen | None, size: int, mtime_ns: int, now: float) -> _Seen:
        """``path`` as it is now; one rewritten (not grown) :data:`REWRITES_SAID` times before it
        rested for ``settle_s`` is named once: a camera writing every image under one name faster
        than that, none of which is inspected."""
        if seen is None:
            return _Seen(size, mtime_ns, now)
        out = _Seen(size, mtime_ns, now, seen.rewrites + (size <= seen.size), seen.said)
        if out.rewrites >= REWRITES_SAID and not out.said:
            out.said = True
            log.warning("%s was rewritten %d times before it stayed unchanged for --settle %g s, and is "
                        "not inspected until it does: is a camera writing every image under this one "
                        "name? give each image a name of its own (a counter or the time in it), or a "
                        "--settle below the camera's interval", path_text(path), out.rewrites,
                        self.settings.settle_s)
        return out

    # ------------------------------------------------------------------ processing
    def _key(self, path: Path, digest: str, mtime_ns: int) -> str:
        """The file's path below the folder, as stored text (a name that is not UTF-8 with
        ``\\xNN``: :func:`diffqc.output.path_text`), the digest of its content and its
        modification time: the same file after a crash has the key stored, and a file written
        again, even with the same bytes, has a new one."""
        return f"{self._name(path)}|{digest}|{mtime_ns}"

    def _name(self, path: Path) -> str:
        return path_text(path.relative_to(self.root).as_posix())

    def _feature_type(self, path: Path) -> str | None:
        if self.settings.feature_type:
            return self.settings.feature_type
        # the folder watched, then those below it (`watch incoming/<type>`, `watch incoming`)
        folders = (self.root.name, *path.relative_to(self.root).parts[:-1])
        found = type_of_folders(folders, self.classes)
        if found is None and not self._former_type(folders) and (
                near := folder_like_a_type(folders, self.classes)):
            folder = "/".join(folders[1: near[0] + 1]) or folders[0]  # below the root, or the root
            if folder not in self._near_types:
                self._near_types.add(folder)
                log.warning("folder %s/%s", path_text(folder), near[1])
        return found

    def _former_type(self, folders: Sequence[str]) -> bool:
        """Whether one of ``folders`` (an image's, none named after a type of the model) is named
        after a type of the latest :data:`RECENT_PARTS` parts stored, which the model served now
        lacks (one retrained without that type's folder); said once a name. The store is asked
        once a name, and reads at most those rows (a camera's dated folders are new names)."""
        for i, name in reversed(list(enumerate(folders))):
            if name not in self._asked_store:
                try:
                    newest = self.store.query(limit=1)
                    after = (newest[0].id or 0) - RECENT_PARTS if newest else 0
                    latest = self.store.query(feature_type=name, after_id=after, limit=1)
                except StoreError:
                    return False  # asked again at the next image
                self._asked_store.add(name)
                if not latest:
                    continue
                rec = latest[0]
                self._former_types.add(name)
                log.warning("folder %s/ is named after %s, a type of the parts stored before (the latest "
                            "%s, model %s) that the model served now does not know (its types: %s): its "
                            "images are scored under the type router's pick (type_known false); was %s's "
                            "folder left out of the training data?",
                            path_text("/".join(folders[1: i + 1]) or folders[0]), path_text(name),
                            utc_minute(rec.created_at), rec.model_version or "?",
                            ", ".join(sorted(self.classes)), path_text(name))
            if name in self._former_types:
                return True
        return False

    def step(self) -> StepReport:
        """One pass: inspect every ready file (at most ``max_pending``)."""
        report = StepReport()
        ready = self.ready_files()[: self.settings.max_pending]
        if not ready:
            return report
        loaded: list[tuple[Path, bytes, str, str, float]] = []
        for path in ready:
            try:
                st = path.stat()
                if st.st_size > self.settings.max_file_bytes:
                    self._fail(
                        path,
                        b"",
                        f"file larger than {self.settings.max_file_bytes} bytes",
                        report,
                        key=self._key(path, "too-large", st.st_mtime_ns),
                    )
                    continue
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:  # a file this user may not read: it alone fails, not the folder
                if self._unchanged_for(path) < self.settings.fail_after_s:
                    report.waiting += 1  # a camera may open it to others once written
                    continue
                self._fail(path, b"", exc.strerror or str(exc), report,
                           key=self._key(path, "unreadable", st.st_mtime_ns))
                continue
            digest = hashlib.sha256(data).hexdigest()
            loaded.append((path, data, digest, self._key(path, digest, st.st_mtime_ns), st.st_mtime))
        keys = [key for *_, key, _ in loaded]
        # a diffqc before 755c3fe keyed a file without its modification time: a file so stored by
        # a record made after it was written is that file (after an upgrade, `--keep` inspected
        # every file again)
        before = {key: key.rsplit("|", 1)[0] for key in keys}
        known = self.store.inspected_keys(self.source, keys + list(before.values()))
        jobs: list[Job] = []
        job_paths: list[Path] = []
        for path, data, digest, key, mtime in loaded:
            if key in known or known.get(before[key], -math.inf) >= mtime:
                # stored before a crash: finish the move, do not re-inspect
                report.already_recorded += 1
                self._finish(path, self.processed)
                continue
            try:
                jobs.append(self._job(path, data, digest, key))
                job_paths.append(path)
            except (ImageReadError, ImageTooLarge) as exc:
                waited = self._unchanged_for(path) >= self.settings.fail_after_s
                if not waited and not isinstance(exc, ImageTooLarge):
                    report.waiting += 1  # maybe still being written
                    continue
                self._fail(path, data, str(exc), report, key=key)
        if jobs:
            try:
                futures: list[Future[ResultRecord]] = self.pipeline.submit_many(jobs)
            except (BufferFull, BufferClosed):
                report.waiting += len(jobs)  # the files stay; the next pass retries
                return self._add(report)
            for path, fut in zip(job_paths, futures, strict=True):
                rec = fut.result()
                report.records.append(rec)
                if rec.duplicate:
                    report.already_recorded += 1
                else:
                    report.inspected += 1
                # a part dropped under overload is recorded NOT_INSPECTED: keep it apart
                done = self.failed if rec.decision == NOT_INSPECTED else self.processed
                self._finish(path, done, rec.id)
        return self._add(report)

    def _unchanged_for(self, path: Path) -> float:
        """Seconds the file has kept its size and mtime (a file not seen before: long enough to
        fail): one still being written, however slowly, is not failed."""
        seen = self._seen.get(path)
        return time.monotonic() - seen.stable_since if seen else self.settings.fail_after_s

    def _add(self, report: StepReport) -> StepReport:
        t = self.totals
        t.inspected += report.inspected
        t.already_recorded += report.already_recorded
        t.failed += report.failed
        return report

    def _job(self, path: Path, data: bytes, digest: str, key: str) -> Job:
        _, _, fmt = check_image_header(data, self.settings.max_image_pixels)
        image = decode_image(data, source=str(path))
        ext = kept_as_sent(data, fmt)
        return Job(
            image=image,
            feature_type=self._feature_type(path),
            part_id=self._part_id(path),
            source=self.source,
            dedup_key=key,
            digest=digest,
            encoded=data if ext else None,
            encoded_ext=ext,
            compression=image_compression(data),
            line=self.settings.line,
            station=self.settings.station,
            camera=self.settings.camera,
        )

    def _part_id(self, path: Path) -> str | None:
        """The part id in the file's name, as one the service takes (the API's rule): a control
        character written as in a string literal (``\\t``), none when still too long."""
        part = part_id_of(path_text(path.stem), self._pattern)
        if part is None and not self._unmatched_logged:
            self._unmatched_logged = True
            log.warning("--part-id-pattern %r is not found in the name of %s: its parts are stored "
                        "without a part id (logged once)", self.settings.part_id_pattern, path)
        if part is None:
            return None
        part = escaped(part)
        if len(part) > MAX_NAME_LEN:
            if not self._long_logged:
                self._long_logged = True
                log.warning("the part id in the name of %s is longer than %d characters, which no part id "
                            "is: its parts are stored without a part id (--part-id-pattern takes the id "
                            "out of a longer name; logged once)", path_text(path), MAX_NAME_LEN)
            return None
        return part

    def _fail(self, path: Path, data: bytes, reason: str, report: StepReport, *, key: str) -> None:
        log.warning("not inspected: %s (%s)", path, reason)
        rec = self.store.insert(
            ResultRecord(
                created_at=time.time(),
                source=self.source,
                decision=NOT_INSPECTED,
                part_id=self._part_id(path),
                feature_type=self._feature_type(path),
                model_version=self.pipeline.model_version,
                reason=path_text(f"unreadable file: {reason}"),
                dedup_key=key,
                line=self.settings.line,
                station=self.settings.station,
                camera=self.settings.camera,
            )
        )
        if not rec.duplicate:  # the line hears of it as of any record (OPC UA, drift)
            self.pipeline.announce(rec)
        report.records.append(rec)
        report.failed += 1
        self._finish(path, self.failed, rec.id)

    def _finish(self, path: Path, folder: Path, record_id: int | None = None) -> None:
        self._seen.pop(path, None)
        if self.settings.after == "keep":
            self._keep(path)
            return
        dest = folder / path.relative_to(self.root)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # the camera reused a name: both kept, the later one tagged with its record
            with contextlib.suppress(FileNotFoundError):
                move_file(path, dest, str(record_id if record_id is not None else int(time.time() * 1000)))
        except OSError as exc:  # the record is stored: the file stays
            if exc.errno in _REFUSED and can_write_in(dest.parent):
                self._leave(path, exc)  # the file may not leave its folder: the others go on
                return
            raise _CannotMove(f"cannot move inspected files into {folder} "  # moved next time
                              f"({exc.strerror or exc})") from exc

    def _keep(self, path: Path) -> None:
        """An inspected file left where it is, not read again while it stays as it is."""
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            self._kept.add((str(path), st.st_size, st.st_mtime_ns))

    def _leave(self, path: Path, exc: OSError) -> None:
        """An inspected file that may not leave its folder (a camera's folder read-only to this
        user) left in place, as ``after="keep"`` leaves files (not read again while it stays as it
        is), said once per folder."""
        self._keep(path)
        if path.parent not in self._left_in:
            self._left_in.add(path.parent)
            log.warning("%s: cannot move inspected files out of it (%s): they are left in place, "
                        "and not read again while this watch runs (give it a folder it may move files "
                        "out of, or --keep)", path_text(path.parent), exc.strerror or exc)

    # ------------------------------------------------------------------ running
    def run(self, stop: threading.Event | None = None, *, once: bool = False) -> StepReport:
        """Poll until ``stop`` is set (or, with ``once``, until the folder holds nothing ready;
        then an outage — the folder unreadable or unwritable, the store down — is raised)."""
        stop = stop or self._stop
        # the decisions since the last word of them: the first at once (it works), then once a minute
        said_at, since, seen = -math.inf, time.time(), Counter[str]()
        parts: set[str | None] = set()  # the part ids of those seen
        while not stop.is_set():
            try:
                report = self.step()
                if self.problem is not None:
                    log.info("%s: over, working again", self.problem)
                    self.problem = None
            except (_FolderUnreadable, _CannotMove, StoreError) as exc:  # said once, until over
                if once:  # a batch run (cron) ends with it; the files stay for the next one
                    raise
                problem = (f"watch folder {self.root} cannot be read ({exc})"
                           if isinstance(exc, _FolderUnreadable) else str(exc))
                if self.problem != problem:
                    log.error("%s; the files stay, trying again every %g s", problem,
                              self.settings.poll_s)
                self.problem = problem
                report = StepReport(waiting=1)
            except Exception as exc:  # unforeseen (a bug): its traceback once, not every poll
                if once:
                    raise
                problem = f"watch step failed ({type(exc).__name__}: {exc})"
                if self.problem != problem:
                    log.exception("%s; trying again every %g s", problem, self.settings.poll_s)
                self.problem = problem
                report = StepReport(waiting=1)
            new = [r for r in report.records if not r.duplicate]
            seen.update(r.decision for r in new)
            parts.update(r.part_id for r in new)
            if seen and time.monotonic() - said_at >= self.SAY_EVERY_S:
                # of parts too where crops share a part id (--part-id-pattern): the line counts parts
                of = f" of {len(parts)} part(s)" if len(parts) < seen.total() else ""
                log.info("%d image(s)%s inspected since %s: %s", seen.total(), of,
                         time.strftime("%H:%M:%S", time.localtime(since)),
                         ", ".join(f"{d} {seen[d]}" for d in (*DECISIONS, NOT_INSPECTED) if seen[d]))
                said_at, since, seen, parts = time.monotonic(), time.time(), Counter(), set()
            busy = report.inspected + report.already_recorded + report.failed
            if once and not busy and not report.waiting and not self._seen:
                break
            if not busy:
                stop.wait(self.settings.poll_s)
        return self.totals

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, name="diffqc-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def run_watch(
    directory: str | Path,
    model_path: str | Path,
    db_url: str | None = None,
    *,
    feature_type: str | None = None,
    data_dir: str | Path | None = None,
    poll_s: float = 0.5,
    settle_s: float = 1.0,
    after: str = "move",
    once: bool = False,
    max_batch: int = 8,
    keep_images: str = "flagged",
    heatmaps: str = "flagged",
    heatmap_size: int = DEFAULT_HEATMAP_SIZE,
    source: str | None = None,
    line: str | None = None,
    station: str | None = None,
    camera: str | None = None,
    part_id_pattern: str | None = None,
    part_types: tuple[str, ...] = (),
    part_timeout_s: float | None = None,
    part_window_s: float = PART_WINDOW_S,
    opcua_url: str | None = None,
    opcua_users: str | Path | None = None,
    opcua_trust: str | Path | None = None,
    retention_max_age_s: float | None = None,
    retention_max_bytes: int | None = None,
    disk_min_free_bytes: int = 1 << 30,
    disk_min_free_ratio: float = 0.05,
    runtime: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    log_level: str = "info",
    log_format: str = "text",
) -> int:
    """Inspect images written into ``directory`` until SIGINT/SIGTERM (``diffqc watch``).

    Each complete file is inspected with the model at ``model_path``, its record stored in
    ``db_url`` (SQLite path or ``postgresql://`` URL, default ``diffqc-results.db``) together
    with the file's key, and the file is then moved to ``processed/`` (``failed/`` when it
    cannot be decoded) unless ``after="keep"``. ``once`` processes what is there and exits. Kept
    images and heat maps older than ``retention_max_age_s`` or beyond ``retention_max_bytes`` are
    deleted as ``serve`` deletes them (records stay), and once more when ``once`` ends (a cron
    job's run is over before the first pass). The disks it writes to are said to be nearly full
    below ``disk_min_free_bytes`` or ``disk_min_free_ratio`` of their size, as ``serve``'s are.
    ``part_types``: those a part has, when fewer than the model's
    (:func:`diffqc.service.parts.part_types`); ``part_timeout_s``: a part still incomplete this
    long after its latest image is overdue, logged (:class:`~diffqc.service.parts.OverdueParts`);
    ``part_window_s``: as :func:`~diffqc.service.parts.part_verdict`'s ``window_s``.
    ``runtime``, ``precision`` and ``threads`` as ``serve`` takes them
    (:func:`diffqc.runtime.load_detector`). The log goes to stderr at ``log_level``, as text
    or JSON lines (``log_format``, :mod:`diffqc.service.logs`). Returns the process exit code.
    """
    from diffqc.bundle import read_bundle
    from diffqc.runtime import load_detector  # not the HTTP app: the watcher runs without FastAPI
    from diffqc.service.logs import configure_logging
    from diffqc.service.store import ArtifactStore, default_artifact_root, store_url

    configure_logging(log_level, log_format)
    db = store_url(db_url)
    if once and part_timeout_s is not None:
        raise ConfigError("--part-timeout needs a watch that keeps running, not --once: a run ends before "
                          "its parts are due (a cron job's incomplete parts: diffqc results parts "
                          "--incomplete)")
    # as serve: a path that is no bundle, or a type it does not know, leaves no new store; a
    # --db that is no store is said before the model loads
    check_watch_arguments(directory, model_path, keep=after == "keep")
    classes = read_bundle(model_path)[1]["classes"]
    check_feature_type(feature_type, classes)
    check_part_types(part_types, classes)
    if part_id_pattern is not None:
        compile_part_id_pattern(part_id_pattern)
    if opcua_url or opcua_users is not None or opcua_trust is not None:  # as serve: before the model loads
        from diffqc.service.opcua import check_opcua_options

        check_opcua_options(opcua_url, opcua_users, opcua_trust)
    store = ResultStore(db)
    try:
        detector: Any = load_detector(model_path, runtime, threads=threads, device="cpu",
                                      precision=precision)
    except BaseException:
        store.close()
        raise
    artifacts = ArtifactStore(data_dir or default_artifact_root(db))
    cal = getattr(detector, "calibration_", None)
    pipeline = InspectionPipeline(
        detector,
        store,
        artifacts,
        capacity=max(64, 2 * max_batch),
        max_batch=max_batch,
        model_version=str(getattr(detector, "version", "")),
        keep_images=keep_images,
        heatmaps=heatmaps,
        heatmap_size=heatmap_size,
        overlay_scale=overlay_scales(cal.summary()) if cal is not None else None,
    )
    settings = WatchSettings(
        Path(directory),
        feature_type=feature_type,
        source=source,
        poll_s=poll_s,
        settle_s=settle_s,
        after=after,
        max_pending=max(16, 2 * max_batch),
        line=line,
        station=station,
        camera=camera,
        part_id_pattern=part_id_pattern,
        max_image_pixels=max_image_pixels,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    def _calibration_changed() -> None:  # `diffqc calibrate MODEL ...` while watching
        pipeline.overlay_scale = overlay_scales(detector.calibration_.summary())  # the heat maps' scale

    # the line's services as `serve` runs them, without sinks: a new calibration is picked up
    # (it was served only after a restart), drift is watched and logged, artifacts expire
    settings_ns = SimpleNamespace(model_path=model_path, station=station, part_types=part_types,
                                  part_timeout_s=part_timeout_s,
                                  part_window_s=part_window_s,
                                  opcua_url=opcua_url,
                                  opcua_users=opcua_users, opcua_trust=opcua_trust,
                                  retention_max_age_s=retention_max_age_s,
                                  retention_max_bytes=retention_max_bytes,
                                  disk_min_free_bytes=disk_min_free_bytes,
                                  disk_min_free_ratio=disk_min_free_ratio)
    def _model_changed(new: Any) -> None:  # `diffqc train DATA --out MODEL` while watching
        nonlocal detector
        detector = new
        pipeline.use_model(new, str(getattr(new, "version", "")), overlay_scales(new.calibration_.summary()))

    def _load() -> Any:
        return load_detector(model_path, runtime, threads=threads, device="cpu", precision=precision)

    line_services = LineServices(settings_ns, store, artifacts, detector,
                                 on_calibration=_calibration_changed, load_model=_load,
                                 on_model=_model_changed)
    pipeline.listeners.append(line_services.on_record)
    try:  # an OPC UA port in use: said, and what started is stopped
        line_services.start()
    except BaseException:
        line_services.stop()
        store.close()
        raise
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    pipeline.start()
    watchdog = Watchdog(lambda: worker_problems(pipeline), f"watching {directory}")
    try:
        watcher = FolderWatcher(settings, pipeline, store)
        log.info("watching %s (source %s)", watcher.root, watcher.source)
        watchdog.start()
        notify(f"READY=1\nSTATUS=watching {watcher.root}")  # systemd's Type=notify
        totals = watcher.run(stop, once=once)
        if once and line_services.retention is not None:
            line_services.retention.run_once()
        log.info(
            "inspected %d, already recorded %d, failed %d",
            totals.inspected,
            totals.already_recorded,
            totals.failed,
        )
    finally:
        notify("STOPPING=1")
        watchdog.stop()
        pipeline.stop()
        line_services.stop()
        store.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
