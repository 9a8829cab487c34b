"""Retention of kept images and heat maps: a maximum age and a disk budget.

Only files the service wrote are ever deleted: the artifact names stored in the result rows
(generated names under ``<data>/heatmaps`` and ``<data>/images``, checked again by
:meth:`ArtifactStore.remove`). A file in those folders that no row names is never touched, and
no record is ever deleted: an expired artifact's row keeps a note, ``heatmap_expired_at`` /
``image_expired_at`` (epoch seconds), and loses only the file name.

Order of work, per artifact: the row is updated first (committed), then the file is removed.
A crash in between leaves an unreferenced file (kept, never a row that points at nothing). A
file that cannot be removed (a read-only folder) is named by its row again, not counted as
freed, said in the log, and tried again at the next pass.

A part is as old as its time says, or as the latest part stored before it (records are numbered
in the order they are stored), whichever is younger: an edge box without a clock battery boots
with its clock behind (at its last shutdown, or at systemd's build date) and stores parts so until
NTP sets it; their files expired at the first pass after. A time in the future (a clock ahead)
holds back no later part's. A first store with a clock behind cannot know.

A wall clock that steps ahead while the service runs (a bad time source; or one behind, set
right) would make one pass expire every file younger than the step. The service's clock watch
(:class:`diffqc.service.line.ClockWatch`) sees a step of more than a minute against the time since
boot; the parts this run stored before it are aged from their time plus the step (the worker's
``clock``), so none expires more than a minute early (a part stored between the step and the
pass that takes it is kept that much longer). The parts of an earlier run keep their times,
which the clock then gave (a box that boots behind and is set right ages them as they are); a
step while the service is stopped cannot be seen.

The budget counts the bytes of the files the rows reference; when they exceed it, the oldest
artifacts (by record id) are expired until the total fits. The worker reads the sizes once (the
first pass lists both folders) and keeps them: a later pass reads only the new files' (a kept
file is written whole before its row is committed, and never changed), so a file removed by
hand still counts its size until its row expires.

On a store that several services share (stations on one PostgreSQL, each keeping its files in
its own folder), a service given its station expires only its own: the rows whose files are in
its folder, and its station's rows (a file of its own already gone is noted, as a single
service's is). The others' rows it neither counts nor expires: it cannot see their files, and
a row that no longer named its file left that file on the other station's disk for good.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diffqc.errors import ConfigError
from diffqc.service.security import is_artifact_name
from diffqc.service.store import TABLE, ArtifactStore, ResultStore

log = logging.getLogger("diffqc.service.retention")

# artifact kind (folder) -> (name column, expiry-note column)
COLUMNS = {"heatmaps": ("heatmap", "heatmap_expired_at"), "images": ("image", "image_expired_at")}


@dataclass(frozen=True)
class RetentionPolicy:
    """``max_age_s``: expire artifacts of records older than this; ``max_bytes``: keep the
    referenced artifacts under this many bytes (oldest first out). None: no limit."""

    max_age_s: float | None = None
    max_bytes: int | None = None
    interval_s: float = 60.0  # how often the service applies it

    def validate(self) -> RetentionPolicy:
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise ConfigError(f"retention max age must be positive seconds, got {self.max_age_s}")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ConfigError(f"retention disk budget must be >= 0 bytes, got {self.max_bytes}")
        if self.interval_s <= 0:
            raise ConfigError(f"retention interval must be positive, got {self.interval_s}")
        return self

    @property
    def active(self) -> bool:
        return self.max_age_s is not None or self.max_bytes is not None


@dataclass(frozen=True)
class Artifact:
    record_id: int
    kind: str
    name: str
    created_at: float
    size: int  # bytes on disk (0 when the file is already gone)


# the predicate of the store's partial index ``<table>_artifacts``: read through it, not the table
ARTIFACT_ROWS = (f"SELECT id, created_at, heatmap, image, station FROM {TABLE} "
                 "WHERE heatmap IS NOT NULL OR image IS NOT NULL ORDER BY id")


def artifact_sizes(artifacts: ArtifactStore, kind: str) -> dict[str, int]:
    """The bytes of each file with a generated name in ``root/kind``, by name, from one listing
    of the folder. A symlink is not followed (no file of ours: size 0, as a missing one).
    Resolving each named file's path instead took 40 µs a file: 8 s a pass, every minute, for
    200,000 kept files (``--keep-images all`` for days; BENCHMARKS.md "Session 34")."""
    sizes: dict[str, int] = {}
    try:
        with os.scandir(artifacts.root / kind) as entries:
            for entry in entries:
                if is_artifact_name(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):  # deleted meanwhile
                        sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    except (FileNotFoundError, NotADirectoryError):
        pass
    return sizes


def _file_size(artifacts: ArtifactStore, sizes: Sizes, listed: bool, kind: str, name: str) -> int | None:
    """A kept file's bytes: from the pass's listing, or the earlier passes' sizes, else (a file
    new since) as :func:`artifact_sizes` reads them; None: not in this service's folder (gone,
    or not a file)."""
    if listed or name in sizes[kind]:
        return sizes[kind].get(name)
    if not is_artifact_name(name):
        return None
    try:
        st = os.stat(artifacts.root / kind / name, follow_symlinks=False)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


# the sizes of the kept files a pass read, by kind and name, kept by the worker between passes
Sizes = dict[str, dict[str, int]]


def _pass_sizes(artifacts: ArtifactStore, known: Sizes | None) -> tuple[Sizes, bool]:
    """The sizes a pass starts from and whether they are a listing of both folders: ``known``
    (an earlier pass's), or without it (or when empty: the first pass) one listing per folder."""
    if known and any(known.values()):
        return known, False
    return {kind: artifact_sizes(artifacts, kind) for kind in COLUMNS}, True


def expire(store: ResultStore, artifacts: ArtifactStore, items: list[Artifact],
           now: float) -> list[tuple[Artifact, OSError]]:
    """Note the expiry in each row (one transaction), then delete the files; the rows of those
    that could not be deleted name them again (one transaction), and they are returned with why."""
    if not items:
        return []
    with store._transaction() as conn:
        for a in items:
            name_col, note_col = COLUMNS[a.kind]
            conn.execute(
                store._q(f"UPDATE {TABLE} SET {name_col} = NULL, {note_col} = ? "
                         f"WHERE id = ? AND {name_col} = ?"),
                (now, a.record_id, a.name),
            )
    kept = [(a, exc) for a in items if (exc := artifacts.remove(a.kind, a.name)) is not None]
    if kept:
        with store._transaction() as conn:
            for a, _ in kept:
                name_col, note_col = COLUMNS[a.kind]
                conn.execute(
                    store._q(f"UPDATE {TABLE} SET {name_col} = ?, {note_col} = NULL "
                             f"WHERE id = ? AND {name_col} IS NULL AND {note_col} = ?"),
                    (a.name, a.record_id, now),
                )
    return kept


# the wall clock's steps ahead while the worker ran, each as (the last record id the pass that took
# it read, seconds): the parts this run stored by then are aged from their time plus the step
Steps = list[tuple[int, float]]


def apply_retention(store: ResultStore, artifacts: ArtifactStore, policy: RetentionPolicy,
                    now: float | None = None, known: Sizes | None = None,
                    station: str | None = None, steps: Sequence[tuple[int, float]] = (), stepped: float = 0.0,
                    since_id: int | None = None) -> dict[str, Any]:
    """Expire what the policy says; returns counts and the bytes kept. ``known``: the sizes of
    the kept files an earlier pass read, by kind and name, kept by the caller and replaced in
    place by this pass's (those of the files the rows name now). A kept file is written whole
    before its row is committed and never changed, so a later pass reads only the new files'
    sizes (one ``stat`` each); the first pass lists each folder once.

    One pass over the rows naming a file, oldest record first, in plain loops (an object per
    file made a pass over 200,000 kept files take 0.7 s, every minute): the files of records
    older than the maximum age are expired, and while the rest exceed the budget, its oldest.
    ``station``: the service's (``--station``), on a store that others may share: a row of
    another station (or none) whose file is not in ``artifacts`` is another service's, left as
    it is. Without it every row naming a file is this service's (a single service's store).
    ``steps`` (:data:`Steps`): the clock's steps ahead that earlier passes took, and ``stepped``:
    the seconds it stepped ahead since, read with ``now`` (for every row read after it), each for
    the rows after ``since_id`` only (the parts an earlier run stored kept the times the clock
    then gave; None: no step is taken). The result's ``last_id``: the last row read."""
    now = time.time() if now is None else now
    with store._reader() as conn:  # read after the clock: every part stored before its step
        rows = conn.execute(ARTIFACT_ROWS).fetchall()
    last_id = int(rows[-1][0]) if rows else 0
    steps = [] if since_id is None else [*steps, (last_id, stepped)]
    later = iter(steps)
    step = next(later, None)
    ahead = sum(seconds for _, seconds in steps)  # the steps after a row's part was stored
    sizes, listed = _pass_sizes(artifacts, known)
    cutoff = -math.inf if policy.max_age_s is None else now - policy.max_age_s
    seen: Sizes = {kind: {} for kind in COLUMNS}
    doomed: list[Artifact] = []
    total = kept = 0
    ours: list[tuple[Any, ...]] = []  # the rows of this service's files
    latest = -math.inf  # the latest time stored so far, in record order, none in the future
    for rid, stored_at, heatmap, image, row_station in rows:
        while step is not None and rid > step[0]:  # stored after this step: on the clock since
            ahead -= step[1]
            step = next(later, None)
        if since_id is not None and rid > since_id:
            stored_at += ahead
        heat_size = None if heatmap is None else _file_size(artifacts, sizes, listed, "heatmaps", heatmap)
        image_size = None if image is None else _file_size(artifacts, sizes, listed, "images", image)
        if station is not None and row_station != station and heat_size is None and image_size is None:
            continue  # another station's: its files are in its own folder
        if stored_at <= now:
            latest = max(latest, stored_at)
        created = max(stored_at, latest)  # not before a part stored earlier: a clock behind
        ours.append((rid, created, heatmap, image))
        for kind, name, found in (("heatmaps", heatmap, heat_size), ("images", image, image_size)):
            if name is None:
                continue
            size = found or 0  # 0: gone
            seen[kind][name] = size
            if created < cutoff:
                doomed.append(Artifact(int(rid), kind, str(name), float(created), size))
            else:
                total += size
                kept += 1
    if policy.max_bytes is not None and total > policy.max_bytes:  # the oldest out (a second loop)
        for rid, created, heatmap, image in ours:
            if total <= policy.max_bytes:
                break
            if created < cutoff:
                continue
            for kind, name in (("heatmaps", heatmap), ("images", image)):
                if name is not None and total > policy.max_bytes:
                    size = seen[kind][name]
                    doomed.append(Artifact(int(rid), kind, str(name), float(created), size))
                    total -= size
                    kept -= 1
    if kept_back := expire(store, artifacts, doomed, now):
        a, exc = kept_back[0]
        log.warning("retention: %d file(s) could not be deleted (%s/%s: %s%s): their records name them "
                    "still, and they are tried again at the next pass", len(kept_back), a.kind, a.name,
                    exc.strerror or exc, "; and others" if len(kept_back) > 1 else "")
        left = {id(a) for a, _ in kept_back}
        doomed = [a for a in doomed if id(a) not in left]
        total += sum(a.size for a, _ in kept_back)
        kept += len(kept_back)
    if known is not None:  # files no row names any more (expired) are forgotten
        known.clear()
        known.update(seen)
    freed = sum(a.size for a in doomed)
    if doomed:
        log.info("retention: expired %d artifacts (%d bytes); %d bytes kept", len(doomed), freed, total)
    return {"expired": len(doomed), "freed_bytes": freed, "kept": kept, "kept_bytes": total,
            "last_id": last_id}


class RetentionWorker:
    """Applies a policy every ``policy.interval_s`` seconds in a background thread, to the files
    of ``station`` (:func:`apply_retention`). ``clock``: the wall clock's time and the seconds it
    stepped ahead so far (the service's :meth:`diffqc.service.line.ClockWatch.read`); without it
    a step is not seen."""

    def __init__(self, store: ResultStore, artifacts: ArtifactStore, policy: RetentionPolicy,
                 station: str | None = None, clock: Callable[[], tuple[float, float]] | None = None) -> None:
        self.store = store
        self.clock = clock if clock is not None else lambda: (time.time(), 0.0)
        self._steps: Steps = []
        self._ahead = 0.0  # the clock's steps ahead that the worker took
        self._since_id = self._last_id()  # the parts stored before this run (None: not read yet)
        self.station = station
        self.artifacts = artifacts
        self.policy = policy.validate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired_total = 0
        self.freed_bytes_total = 0
        self.kept_bytes = 0
        self.last_error: str | None = None
        self._sizes: Sizes = {}  # the kept files' sizes, between passes

    def _last_id(self) -> int | None:
        """The last record id stored, 0 for none; None where the store cannot be read now."""
        try:
            with self.store._reader() as conn:
                return int(conn.execute(f"SELECT MAX(id) FROM {TABLE}").fetchone()[0] or 0)
        except Exception:  # the store down at the start: read at the first pass
            return None

    def run_once(self) -> dict[str, Any]:
        if self._since_id is None:
            self._since_id = self._last_id()
        now, ahead = self.clock()
        out = apply_retention(self.store, self.artifacts, self.policy, now=now, known=self._sizes,
                              station=self.station, steps=self._steps, stepped=ahead - self._ahead,
                              since_id=self._since_id)
        if ahead > self._ahead:
            self._steps.append((out["last_id"], ahead - self._ahead))
            self._ahead = ahead
        self.expired_total += out["expired"]
        self.freed_bytes_total += out["freed_bytes"]
        self.kept_bytes = out["kept_bytes"]
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            try:
                self.run_once()
                self.last_error = None
            except Exception as exc:  # the store may be down for a while: try again later
                self.last_error = str(exc)
                log.warning("retention pass failed: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="diffqc-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def metrics_lines(self) -> list[str]:
        return [
            "# HELP diffqc_artifacts_expired_total Kept images and heat maps deleted by retention.",
            "# TYPE diffqc_artifacts_expired_total counter",
            f"diffqc_artifacts_expired_total {self.expired_total}",
            "# HELP diffqc_artifacts_kept_bytes Bytes of kept images and heat maps after the last pass.",
            "# TYPE diffqc_artifacts_kept_bytes gauge",
            f"diffqc_artifacts_kept_bytes {self.kept_bytes}",
        ]
