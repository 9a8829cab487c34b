"""A part's verdict from the decisions on its images.

On the line a part is seen as several images, one crop per feature type, sent with the same
``part_id``; each image gets its own decision and record. A PLC diverting the part needs one
verdict, which :func:`part_verdict` makes from those records:

- each feature type counts once, with its latest record: a crop sent again (a re-inspection after
  ``NOT_INSPECTED``, a second shot) replaces the earlier one. Images of the id more than
  ``window_s`` (:data:`PART_WINDOW_S`, ``--part-window``) before its latest image are an
  earlier part's (a counter reset each shift gave both the id) and do not count: its crops not
  sent yet are missing, not taken from the earlier part. An image sent without a type (the
  model chose it) counts on its own: two such images may be two crops routed to one type;
- ``decision`` is the worst counted decision, in the order REJECT, NOT_INSPECTED, REVIEW, PASS:
  a part passes only when every counted image passed, and a crop that was not inspected outranks
  a REVIEW because no operator verdict can settle it (it must be inspected again);
- ``review`` is BAD when an operator reviewed any counted image BAD, GOOD when every flagged
  (REVIEW or REJECT) counted image was reviewed GOOD and none is NOT_INSPECTED, else None;
- given the types a part should have (the model's, or the fewer a line's parts have:
  :func:`part_types`), ``missing`` names those without a counted image (sent with the type, or
  routed to it) and ``complete`` says none is missing: the PASS of a part whose other crops have
  not come yet is not its last word.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

from diffqc.errors import ConfigError, UnknownFeatureTypeError, did_you_mean
from diffqc.service.store import NOT_INSPECTED, Filters, ResultRecord, ResultStore, iso_time, records_by_part

# worst first: the part's decision is the first of these any counted image has
SEVERITY = ("REJECT", NOT_INSPECTED, "REVIEW", "PASS")
FLAGGED = ("REVIEW", "REJECT")
PART_IMAGES = 64  # the images a RecentParts keeps per part
PART_RECORDS = 1000  # a stored part's verdict reads its latest images, at most this many
# GET /v1/parts reads the store's rows newest first, at most this many a request: a client that
# polls a filter few parts pass (complete=false) costs ~85 ms a poll, not seconds
LATEST_PARTS_ROWS = 10_000
# a part's crops come within this of its latest one; the id's older images are an earlier part's
PART_WINDOW_S = 3600.0
OVERDUE_PARTS = 10_000  # incomplete parts an OverdueParts keeps waiting (--part-timeout)
# the store's meta entry (+ "/" + station) keeping how far a --part-timeout run judged its parts
OVERDUE_KEY = "parts.overdue_swept"


@dataclass(frozen=True)
class PartVerdict:
    part_id: str
    decision: str
    review: str | None
    pending_review: int  # counted flagged images without an operator verdict
    types: dict[str, str]  # feature type -> the decision of its counted image (the worst of them)
    counted: list[ResultRecord]  # oldest first
    superseded: int  # earlier images not counted: of a type sent again, or of an earlier part of the id
    missing: list[str] | None = None  # the expected types without a counted image; None: none expected

    @property
    def complete(self) -> bool | None:
        """Every expected type has an image; None when no types were expected."""
        return None if self.missing is None else not self.missing

    def to_json(self) -> dict[str, Any]:
        """The verdict as the API answers it and the sinks push it, without its records."""
        return {"part_id": self.part_id, "decision": self.decision, "review": self.review,
                "pending_review": self.pending_review, "types": self.types, "images": len(self.counted),
                "superseded": self.superseded, "complete": self.complete, "missing": self.missing,
                "first": iso_time(self.counted[0].created_at) if self.counted else None,
                "last": iso_time(self.counted[-1].created_at) if self.counted else None}


def part_types(model_types: Sequence[str], chosen: Sequence[str] = ()) -> list[str]:
    """The types a part should have: ``chosen`` (``--part-types``, for a line whose parts have
    fewer types than the model: a model of 8 types serving a station that crops 2), in its
    order, or else every type of the model."""
    return list(chosen) if chosen else list(model_types)


def check_part_types(chosen: Sequence[str], model_types: Sequence[str]) -> None:
    """``--part-types`` names each type once, and only types the model knows (a typo would
    leave every part incomplete)."""
    seen: set[str] = set()
    for name in chosen:
        if name in seen:
            raise ConfigError(f"--part-types names {name!r} twice")
        seen.add(name)
        if name not in model_types:
            raise UnknownFeatureTypeError(f"--part-types names {name!r}, not a type of this model"
                                          f"{did_you_mean(name, model_types)}; it knows "
                                          f"{', '.join(model_types)}")


def _given_type(rec: ResultRecord) -> str | None:
    """The type the image was sent with, or None when the model chose it (or none was sent)."""
    if rec.type_known or (rec.decision == NOT_INSPECTED and rec.type_known is None):
        return rec.feature_type
    return None


def part_verdict(part_id: str, records: Sequence[ResultRecord],
                 expected: Sequence[str] | None = None, window_s: float = PART_WINDOW_S) -> PartVerdict:
    """The verdict of the part from its records (any order; at least one); ``expected``: the
    types it should have, in the order ``missing`` names them; ``window_s``: its images more
    than this before its latest are an earlier part's (``--part-window``)."""
    if not records:
        raise ValueError(f"part {part_id!r} has no records")
    ordered = sorted(records, key=lambda r: (r.id or 0, r.created_at))
    start = ordered[-1].created_at - window_s  # before it: an earlier part of the same id
    latest: dict[str, ResultRecord] = {}
    counted: list[ResultRecord] = []
    for rec in ordered:
        if rec.created_at < start:
            continue
        given = _given_type(rec)
        if given is None:
            counted.append(rec)
        else:
            latest[given] = rec  # a later image of the type replaces an earlier one
    counted = sorted([*counted, *latest.values()], key=lambda r: (r.id or 0, r.created_at))
    decisions = {rec.decision for rec in counted}
    decision = next(d for d in SEVERITY if d in decisions)
    flagged = [rec for rec in counted if rec.decision in FLAGGED]
    pending = sum(rec.review is None for rec in flagged)
    if any(rec.review == "BAD" for rec in counted):
        review: str | None = "BAD"
    elif flagged and pending == 0 and NOT_INSPECTED not in decisions:
        review = "GOOD"
    else:
        review = None
    types: dict[str, str] = {}  # two images routed to one type: its worse decision
    for rec in counted:
        if rec.feature_type is not None:
            earlier = types.get(rec.feature_type, "PASS")
            types[rec.feature_type] = min(earlier, rec.decision, key=SEVERITY.index)
    missing = None if expected is None else [t for t in expected if t not in types]
    return PartVerdict(part_id, decision, review, pending, types, counted, len(ordered) - len(counted),
                       missing)


def part_summary_counts(store: ResultStore, by: Sequence[str], since: float | None, until: float | None,
                        window_s: float = PART_WINDOW_S) -> tuple[list[tuple[Any, ...]], int]:
    """:func:`~diffqc.service.store.summarize`'s count rows of the parts whose latest image lies in
    ``[since, until)``, one a part, judged whole (its images up to ``window_s`` either side of the
    period read too: a part across a shift's end is counted once, in the shift of its latest
    image): its latest counted image's ``by`` values, its verdict and review; and the number of
    images without a part id (``results summary --parts``, ``GET /v1/summary?parts=true``). A
    part spans types: ``feature_type`` in ``by`` is refused."""
    if "feature_type" in by:
        raise ConfigError("a part spans feature types: group parts by line, station, camera or source, "
                          "or count images (without parts) by type")
    counts = []
    wider = (None if since is None else since - window_s, None if until is None else until + window_s)
    for pid, recs in records_by_part(store, since=wider[0], until=wider[1]):
        v = part_verdict(pid, recs, window_s=window_s)
        last = v.counted[-1]
        if (since is None or last.created_at >= since) and (until is None or last.created_at < until):
            counts.append((*(getattr(last, k) for k in by), v.decision, v.review, 1))
    return counts, store.count(has_part=False, since=since, until=until)


class RecentParts:
    """The verdicts of the parts seen lately, from the records as they are stored (the OPC UA
    server's ``Part``): the latest ``capacity`` part ids, the least recently seen forgotten. A
    part whose images came before this was made (a restart) is judged on the later ones only.
    ``types`` and ``window_s``: as :func:`part_verdict` takes them."""

    def __init__(self, capacity: int = 256, types: Sequence[str] | None = None,
                 window_s: float = PART_WINDOW_S) -> None:
        self.capacity = capacity
        self.types = None if types is None else list(types)
        self.window_s = window_s
        self._parts: OrderedDict[str, list[ResultRecord]] = OrderedDict()

    def add(self, rec: ResultRecord) -> PartVerdict | None:
        """The verdict of ``rec``'s part with it; None for a record without a part id."""
        if rec.part_id is None:
            return None
        records = self._parts.pop(rec.part_id, [])
        records = [r for r in records if r.id is None or r.id != rec.id]  # the same record again
        # its latest PART_IMAGES images at most (a part id every image is sent with)
        recent = [*records[-(PART_IMAGES - 1):], rec]
        verdict = part_verdict(rec.part_id, recent, self.types, self.window_s)
        self._parts[rec.part_id] = verdict.counted  # what counts
        while len(self._parts) > self.capacity:
            self._parts.popitem(last=False)
        return verdict


def commit_verdicts(store: ResultStore, conn: Any, records: Sequence[ResultRecord],
                    types: Sequence[str] | None,
                    window_s: float = PART_WINDOW_S) -> Iterator[tuple[PartVerdict, ResultRecord]]:
    """In a store insert hook: each part of the commit's new ``records`` (not repeats), judged
    on the commit's connection from its latest stored images (those of earlier commits too),
    with its latest record of the commit; once per part, after all of its images."""
    latest = {rec.part_id: rec for rec in records
              if rec.part_id is not None and rec.id is not None and not rec.duplicate}
    for part_id, rec in latest.items():
        rows = store.part_records(part_id, conn=conn, limit=PART_RECORDS)
        yield part_verdict(part_id, rows, types, window_s), rec


def stored_part(store: ResultStore, part: str, types: Sequence[str] | None, /, *,
                window_s: float = PART_WINDOW_S,
                **filters: Unpack[Filters]) -> tuple[PartVerdict, bool] | None:
    """The verdict of the stored part ``part`` from its latest :data:`PART_RECORDS` images matching
    ``filters`` (``GET /v1/parts/{part_id}``), and whether it has more (truncated); None when no
    image of it matches."""
    of_part: Filters = {**filters, "part_id": part}
    recs = store.query(**of_part, limit=PART_RECORDS + 1)
    if not recs:
        return None
    return part_verdict(part, recs[:PART_RECORDS], types, window_s), len(recs) > PART_RECORDS


def latest_parts(store: ResultStore, *, limit: int, types: Sequence[str] | None,
                 verdict: str | None = None, complete: bool | None = None, page: int = 1000,
                 max_rows: int = LATEST_PARTS_ROWS, window_s: float = PART_WINDOW_S,
                 **filters: Unpack[Filters]) -> tuple[list[PartVerdict], bool]:
    """The verdicts of the ``limit`` parts whose latest image matching ``filters`` is newest,
    newest first (``GET /v1/parts``): the store's rows are read newest first, ``page`` at a
    time, and each new part id is judged by :func:`stored_part` with ``filters`` (as ``GET
    /v1/parts/{part_id}``), kept when its decision is ``verdict`` and its
    completeness (by ``types``) is ``complete``. Returns (the verdicts, True when the read stopped
    after ``max_rows`` rows with fewer than ``limit`` parts found: older parts were not read)."""
    found: list[PartVerdict] = []
    seen: set[str] = set()
    before: int | None = None
    read = 0
    while len(found) < limit:
        if read >= max_rows:
            return found, True
        back: Filters = {**filters, "before_id": before}
        rows = store.recent_part_rows(min(page, max_rows - read), **back)
        if not rows:
            break
        read += len(rows)
        before = rows[-1][0]
        for _, pid in rows:
            if pid in seen:
                continue
            seen.add(pid)
            stored = stored_part(store, pid, types, window_s=window_s, **filters)
            if stored is None:  # pragma: no cover - a row read just now matches its own filters
                continue
            judged = stored[0]
            if (verdict is None or judged.decision == verdict) and (
                    complete is None or judged.complete is complete):
                found.append(judged)
                if len(found) == limit:
                    break
    return found, False


class OverdueParts:
    """The parts left incomplete by their latest commit, judged again ``timeout_s`` after their
    latest image (``--part-timeout``): those still incomplete are overdue, their other crops
    never came (a camera missing triggers), counted per type they lack (``lacking``). Waiting
    parts are kept in memory, at most ``capacity`` (the oldest forgotten); over a restart, the
    store keeps how far the sweeps got (:meth:`save`), and the next run judges the parts stored
    after that, of ``station`` or of none (:meth:`resume`)."""

    def __init__(self, store: ResultStore, timeout_s: float, types: Sequence[str] | None,
                 capacity: int = OVERDUE_PARTS, window_s: float = PART_WINDOW_S,
                 station: str | None = None) -> None:
        self.store = store
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.types = None if types is None else list(types)
        self.capacity = capacity
        self.station = station  # whose parts a restart resumes, on a store several services share
        self.key = OVERDUE_KEY if station is None else f"{OVERDUE_KEY}/{station}"
        # every part whose latest image is at or before this was judged (the latest full sweep's cutoff)
        self.swept_until: float | None = None
        self.lacking: Counter[str] = Counter()  # overdue parts per type they had no image of
        self.last_at: dict[str, float] = {}  # per type, the latest image of the latest part lacking it
        self.overdue_total = 0
        self.last_error: str | None = None  # why the latest sweep stopped early (the store down)
        # part id -> (when it is due from, its latest image's time: save's bound)
        self._waiting: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, verdict: PartVerdict, at: float, image_at: float | None = None) -> None:
        """The part's verdict after a commit of its images, the latest made at ``at`` (or
        ``image_at``, a part :meth:`resume` took up, due a timeout after ``at``): it waits while
        incomplete."""
        with self._lock:
            self._waiting.pop(verdict.part_id, None)
            if verdict.complete is False:
                self._waiting[verdict.part_id] = (at, at if image_at is None else image_at)
                while len(self._waiting) > self.capacity:
                    self._waiting.popitem(last=False)

    def on_insert(self, conn: Any, records: Sequence[ResultRecord]) -> None:
        """A store insert hook (where no outbox judges the parts already): :meth:`note` each
        part of the commit (:func:`commit_verdicts`)."""
        for verdict, rec in commit_verdicts(self.store, conn, records, self.types, self.window_s):
            self.note(verdict, rec.created_at)

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def sweep(self, now: float) -> list[tuple[PartVerdict, ResultRecord]]:
        """The parts overdue at ``now``, each once, judged again from the store (one with a
        later image, another service's, is left to that service): (verdict, its latest record).
        The store down stops the sweep: ``last_error`` says why, the parts not judged yet wait on."""
        cutoff = now - self.timeout_s
        with self._lock:
            due = [(pid, times) for pid, times in self._waiting.items() if times[0] <= cutoff]
            for pid, _ in due:
                del self._waiting[pid]
        found: list[tuple[PartVerdict, ResultRecord]] = []
        for done, (part_id, _) in enumerate(due):
            try:
                stored = stored_part(self.store, part_id, self.types, window_s=self.window_s)
            except Exception as exc:  # the store down: the rest wait, in front, oldest first
                self.last_error = str(exc) or type(exc).__name__
                with self._lock:
                    for pid, times in reversed(due[done:]):
                        if pid not in self._waiting:  # unless seen again meanwhile
                            self._waiting[pid] = times
                            self._waiting.move_to_end(pid, last=False)
                return found
            if stored is None:
                continue
            verdict, latest = stored[0], stored[0].counted[-1]  # its latest image always counts
            if latest.created_at > cutoff:
                continue
            if verdict.complete is False:
                found.append((verdict, latest))
                self.overdue_total += 1
                self.lacking.update(verdict.missing or ())
                self.last_at.update((t, latest.created_at) for t in verdict.missing or ())
        self.last_error = None
        self.swept_until = cutoff if self.swept_until is None else max(self.swept_until, cutoff)
        return found

    def save(self, before: float | None = None) -> None:
        """Keep in the store how far the sweeps got, for the next run's :meth:`resume`; not past
        ``before`` (the latest image of a part judged whose push waits: judged again), nor past
        the latest image of a part still waiting (one :meth:`resume` took up, due a timeout after
        this run's start: a restart before then would lose it)."""
        if self.swept_until is not None:
            with self._lock:
                waiting = min((image for _, image in self._waiting.values()), default=None)
            until = min(t for t in (self.swept_until, before, waiting) if t is not None)
            self.store.set_meta(self.key, repr(until))

    def resume(self, now: float) -> int:
        """At start, before any image of this run is stored: :meth:`note` the parts a previous
        run left waiting, those with an image after its kept :meth:`save` (of ``station`` or of
        none, when given: a store several services share) that are incomplete, as if their
        latest image came ``now`` (their other crops may still come now that the service is
        back: a camera's folder kept them); returns how many. With nothing kept (this station's
        first run with ``--part-timeout``) the sweeps start now."""
        kept = self.store.meta_items(self.key).get(self.key)
        if kept is None:
            self.swept_until = now
            self.save()
            return 0
        self.swept_until = float(kept)
        parts: dict[str, None] = {}  # newest first, each once
        before: int | None = None
        while len(parts) < self.capacity:
            rows = self.store.recent_part_rows(1000, since=self.swept_until, station_or_none=self.station,
                                               before_id=before)
            parts.update((part_id, None) for _, part_id in rows)
            if len(rows) < 1000:
                break
            before = rows[-1][0]
        resumed = 0
        for part_id in reversed(list(parts)[:self.capacity]):  # oldest first: the first forgotten
            stored = stored_part(self.store, part_id, self.types, window_s=self.window_s)
            if stored is not None and stored[0].complete is False:
                latest = stored[0].counted[-1].created_at
                self.note(stored[0], max(latest, now), image_at=latest)
                resumed += 1
        return resumed
