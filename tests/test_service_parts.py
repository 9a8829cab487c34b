"""A part's verdict from the decisions on its images (``diffqc.service.parts``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffqc.service.parts import part_verdict
from diffqc.service.store import NOT_INSPECTED, ResultRecord, ResultStore


def _rec(rid: int, ftype: str | None, decision: str, *, known: bool | None = True,
         review: str | None = None) -> ResultRecord:
    if decision == NOT_INSPECTED:
        known = None
    return ResultRecord(created_at=1000.0 + rid, source="http", decision=decision, part_id="P-1",
                        feature_type=ftype, type_known=known, review=review, id=rid)


def test_worst_decision_of_the_types_wins() -> None:
    v = part_verdict("P-1", [_rec(1, "dots", "PASS"), _rec(2, "edge1", "REVIEW"), _rec(3, "angle", "PASS")])
    assert (v.decision, v.review, v.pending_review) == ("REVIEW", None, 1)
    assert v.types == {"dots": "PASS", "edge1": "REVIEW", "angle": "PASS"}
    assert [r.id for r in v.counted] == [1, 2, 3] and v.superseded == 0
    assert part_verdict("P-1", [_rec(1, "dots", "PASS"), _rec(2, "edge1", "PASS")]).decision == "PASS"
    # REJECT outranks everything; a crop not inspected outranks REVIEW (no verdict can settle it)
    assert part_verdict("P-1", [_rec(1, "dots", "REJECT"), _rec(2, "edge1", NOT_INSPECTED)]).decision \
        == "REJECT"
    assert part_verdict("P-1", [_rec(1, "dots", "REVIEW"), _rec(2, "edge1", NOT_INSPECTED)]).decision \
        == NOT_INSPECTED


def test_a_type_sent_again_replaces_its_earlier_image_in_any_order() -> None:
    recs = [_rec(4, "edge1", "PASS"), _rec(1, "dots", "PASS"), _rec(2, "edge1", NOT_INSPECTED),
            _rec(3, "dots", "REJECT")]
    v = part_verdict("P-1", recs)
    assert v.decision == "REJECT" and v.types == {"dots": "REJECT", "edge1": "PASS"}
    assert [r.id for r in v.counted] == [3, 4] and v.superseded == 2
    # the re-inspection of the one crop that was not inspected lets the part pass
    assert part_verdict("P-1", recs[:3]).decision == "PASS"


def test_a_part_id_that_repeats_hours_later_is_a_new_part() -> None:
    """A counter reset each shift gives today's P-1 the id of yesterday's: its crops of the
    types today's has not sent yet must not make it complete (nor decide it). Images of the id
    more than PART_WINDOW_S before its latest are an earlier part's: not counted."""
    from diffqc.service.parts import PART_WINDOW_S

    yesterday = [_rec(i, t, "PASS") for i, t in enumerate(["angle", "dots", "edge1"], 1)]
    today = ResultRecord(created_at=1003.0 + 8 * 3600, source="http", decision="REVIEW", part_id="P-1",
                         feature_type="dots", type_known=True, id=4)
    v = part_verdict("P-1", [*yesterday, today], ["angle", "dots", "edge1"])
    assert (v.decision, v.types, v.missing, v.complete) == ("REVIEW", {"dots": "REVIEW"}, ["angle", "edge1"],
                                                            False)
    assert [r.id for r in v.counted] == [4] and v.superseded == 3
    # crops of one part a few minutes apart (a crop sent again after an outage) still count
    later = ResultRecord(created_at=1001.0 + PART_WINDOW_S, source="http", decision="PASS", part_id="P-1",
                         feature_type="dots", type_known=True, id=4)
    assert part_verdict("P-1", [*yesterday, later], ["angle", "dots", "edge1"]).complete is True
    # a ring counter that repeats every few minutes: --part-window 60 tells its parts apart
    two_minutes = ResultRecord(created_at=1003.0 + 120, source="http", decision="PASS", part_id="P-1",
                               feature_type="dots", type_known=True, id=4)
    v = part_verdict("P-1", [*yesterday, two_minutes], ["angle", "dots", "edge1"], window_s=60.0)
    assert (v.missing, v.superseded) == (["angle", "edge1"], 3)
    assert part_verdict("P-1", [*yesterday, two_minutes], ["angle", "dots", "edge1"]).complete is True


def test_images_the_model_routed_each_count() -> None:
    # two crops sent without a type, both routed to dots: neither replaces the other
    v = part_verdict("P-1", [_rec(1, "dots", "REVIEW", known=False), _rec(2, "dots", "PASS", known=False)])
    assert v.decision == "REVIEW" and v.types == {"dots": "REVIEW"} and len(v.counted) == 2
    # a part not inspected before the model chose a type counts on its own too
    v = part_verdict("P-1", [_rec(1, None, NOT_INSPECTED), _rec(2, "dots", "PASS")])
    assert v.decision == NOT_INSPECTED and v.types == {"dots": "PASS"} and v.superseded == 0


def test_review_of_the_part_from_its_flagged_images() -> None:
    flagged = [_rec(1, "dots", "REVIEW", review="GOOD"), _rec(2, "edge1", "REJECT"), _rec(3, "angle", "PASS")]
    v = part_verdict("P-1", flagged)
    assert (v.review, v.pending_review) == (None, 1)  # the REJECT is not reviewed yet
    flagged[1] = _rec(2, "edge1", "REJECT", review="GOOD")
    assert (part_verdict("P-1", flagged).review, part_verdict("P-1", flagged).pending_review) == ("GOOD", 0)
    # one BAD verdict on any image, a passed one too, makes the part BAD
    assert part_verdict("P-1", [*flagged[:2], _rec(3, "angle", "PASS", review="BAD")]).review == "BAD"
    # nothing flagged: no review; a crop not inspected: the part is not settled by verdicts
    assert part_verdict("P-1", [_rec(1, "dots", "PASS")]).review is None
    assert part_verdict("P-1", [*flagged[:2], _rec(3, "angle", NOT_INSPECTED)]).review is None


def test_a_part_is_complete_when_every_expected_type_came() -> None:
    """A PLC reading the part's decision after its first crop saw PASS with 7 of its 8 types
    still to come: ``missing`` names the expected types (the model's) without a counted image,
    in the order given, and ``complete`` says none is missing."""
    types = ["angle", "dots", "edge1"]
    v = part_verdict("P-1", [_rec(1, "dots", "PASS")], expected=types)
    assert (v.decision, v.missing, v.complete) == ("PASS", ["angle", "edge1"], False)
    v = part_verdict("P-1", [_rec(1, "dots", "PASS"), _rec(2, "edge1", NOT_INSPECTED),
                             _rec(3, "angle", "PASS", known=False)], expected=types)
    assert (v.missing, v.complete) == ([], True)  # a routed crop and one not inspected came too
    assert {"missing": [], "complete": True}.items() <= v.to_json().items()
    # a crop not inspected before the model chose its type fills no type
    v = part_verdict("P-1", [_rec(1, None, NOT_INSPECTED)], expected=["dots"])
    assert (v.missing, v.complete) == (["dots"], False)
    # without expected types nothing is known about completeness
    v = part_verdict("P-1", [_rec(1, "dots", "PASS")])
    assert (v.missing, v.complete) == (None, None)
    assert {"missing": None, "complete": None}.items() <= v.to_json().items()


def test_no_records_is_an_error() -> None:
    with pytest.raises(ValueError, match="P-9"):
        part_verdict("P-9", [])


def test_recent_parts_judge_each_part_as_its_images_come() -> None:
    from diffqc.service.parts import PART_IMAGES, RecentParts

    recent = RecentParts(capacity=2, types=["dots", "edge1"])
    assert recent.add(ResultRecord(created_at=1.0, source="http", decision="PASS")) is None  # no part id
    first = recent.add(_rec(1, "dots", "PASS"))
    assert first is not None and (first.decision, len(first.counted), first.missing) == ("PASS", 1, ["edge1"])
    v = recent.add(_rec(2, "edge1", "REVIEW"))
    assert v is not None and (v.decision, v.types) == ("REVIEW", {"dots": "PASS", "edge1": "REVIEW"})
    assert v.complete
    v = recent.add(_rec(3, "edge1", "PASS"))  # edge1 again: replaces its REVIEW
    assert v is not None and (v.decision, len(v.counted), v.superseded) == ("PASS", 2, 1)
    again = recent.add(_rec(3, "edge1", "PASS"))  # the same record twice counts once
    assert again is not None and len(again.counted) == 2 and again.superseded == 0
    # the least recently seen part is forgotten beyond the capacity
    for pid in ("P-2", "P-3"):
        recent.add(ResultRecord(created_at=9.0, source="http", decision="PASS", part_id=pid, id=9))
    v = recent.add(_rec(10, "angle", "PASS"))
    assert v is not None and set(v.types) == {"angle"}
    # a part id every image is sent with, routed: its latest images only
    for i in range(PART_IMAGES + 5):
        v = recent.add(_rec(100 + i, "dots", "PASS", known=False))
    assert v is not None and len(v.counted) == PART_IMAGES


def test_latest_parts_newest_first_from_their_images(tmp_path: Path) -> None:
    """``GET /v1/parts``: the parts whose latest image is newest, each judged from its images
    (those older than the rows read too), filtered by verdict and completeness; a scan that
    stops before enough parts says so."""
    from diffqc.service.parts import latest_parts
    from diffqc.service.store import ResultStore

    def crop(part: str, ftype: str, decision: str = "PASS", line: str = "L1") -> ResultRecord:
        return ResultRecord(created_at=1000.0, source="http", decision=decision, part_id=part,
                            feature_type=ftype, type_known=True, line=line)

    with ResultStore(str(tmp_path / "r.db")) as store:
        store.insert_many([crop("A", "dots"), crop("B", "dots", "REVIEW"), crop("A", "edge"),
                           crop("C", "dots", line="L2"), crop("B", "edge"),
                           ResultRecord(created_at=1000.0, source="http", decision="REJECT")])
        parts, truncated = latest_parts(store, limit=10, types=["dots", "edge"])
        assert [(v.part_id, v.decision, v.complete) for v in parts] == [
            ("B", "REVIEW", True), ("C", "PASS", False), ("A", "PASS", True)] and not truncated
        assert [v.part_id for v in latest_parts(store, limit=1, types=None)[0]] == ["B"]
        assert [v.part_id for v in latest_parts(store, limit=10, types=["dots", "edge"], complete=False)[0]] \
            == ["C"]
        assert [v.part_id for v in latest_parts(store, limit=10, types=None, verdict="PASS")[0]] == ["C", "A"]
        assert [v.part_id for v in latest_parts(store, limit=10, types=None, line="L1")[0]] == ["B", "A"]
        # B's newest row alone is read, yet B is judged from both of its images
        (b,), _ = latest_parts(store, limit=1, types=None, page=1)
        assert (b.part_id, len(b.counted)) == ("B", 2)
        # the scan stops after max_rows rows: the parts found so far, truncated
        parts, truncated = latest_parts(store, limit=10, types=None, verdict="PASS", page=1, max_rows=2)
        assert [v.part_id for v in parts] == ["C"] and truncated


def overdue_parts_contract(store: ResultStore) -> None:
    """``--part-timeout`` without pushes (a line watching /metrics for a camera that misses
    triggers): a store hook notes each part's verdict; a part still incomplete the timeout
    after its latest image is overdue once, counted per type it lacks; a part completed in time,
    and one with a later image, are not; at most ``capacity`` parts wait (the oldest forgotten).
    Also run against PostgreSQL."""
    from diffqc.service.parts import OverdueParts

    def crop(part: str, ftype: str, at: float) -> ResultRecord:
        return ResultRecord(created_at=at, source="http", decision="PASS", part_id=part, feature_type=ftype,
                            type_known=True)

    overdue = OverdueParts(store, 10.0, ["angle", "dots", "edge1"], capacity=3)
    store.insert_hooks.append(overdue.on_insert)
    store.insert_many([crop("A", "dots", 100.0), crop("A", "edge1", 101.0)])  # lacks angle
    store.insert_many([crop(p, "dots", 102.0) for p in ("B", "C")])
    store.insert(crop("C", "angle", 103.0))
    store.insert(crop("C", "edge1", 104.0))  # complete in time
    store.insert(crop("D", "dots", 105.0))
    assert overdue.waiting() == 3  # A, B, D
    store.insert(crop("E", "dots", 106.0))  # a fourth: the oldest waiting (A) is forgotten
    assert overdue.waiting() == 3
    assert overdue.sweep(111.0) == []  # B's latest image is 102: 9 s
    assert [v.part_id for v, _ in overdue.sweep(112.0)] == ["B"]
    store.insert(crop("D", "edge1", 114.0))  # D's second crop came: it waits again, from 114
    assert [v.part_id for v, _ in overdue.sweep(120.0)] == ["E"]
    assert [(v.part_id, v.missing) for v, _ in overdue.sweep(130.0)] == [("D", ["angle"])]
    assert overdue.lacking == {"angle": 3, "edge1": 2} and overdue.overdue_total == 3
    assert overdue.last_at == {"angle": 114.0, "edge1": 106.0}  # the latest image of the latest lacking
    assert overdue.waiting() == 0 and overdue.last_error is None


def overdue_resume_contract(store: ResultStore) -> None:
    """A restart of a service with ``--part-timeout``: the parts its previous run left waiting
    (an image after that run's last sweep, kept in the store) are judged by the next run, a
    timeout after its start; those already judged are not again, nor another station's; a
    station's first run resumes nothing. Also run against PostgreSQL."""
    from diffqc.service.parts import OverdueParts

    def crop(part: str, ftype: str, at: float, station: str | None = "S1") -> ResultRecord:
        return ResultRecord(created_at=at, source="http", decision="PASS", part_id=part, feature_type=ftype,
                            type_known=True, station=station)

    types = ["dots", "edge1"]
    first = OverdueParts(store, 10.0, types, station="S1")
    assert first.resume(now=95.0) == 0  # its first run: nothing left waiting by an earlier one
    store.insert_hooks.append(first.on_insert)
    store.insert(crop("A", "dots", 100.0))
    assert [v.part_id for v, _ in first.sweep(111.0)] == ["A"]  # judged by the first run
    store.insert_many([crop("B", "dots", 112.0), crop("C", "dots", 113.0), crop("C", "edge1", 114.0),
                       crop("X", "dots", 115.0, station="S2"), crop("Y", "edge1", 116.0, station=None)])
    assert first.sweep(120.0) == [] and first.waiting() == 3  # B, X, Y; C is complete
    first.save()  # it stops: swept until 110, B's image (112) is later
    store.insert_hooks.remove(first.on_insert)
    second = OverdueParts(store, 10.0, types, station="S1")
    # B, and Y sent without a station: not A (judged), C (complete), X (another station's)
    assert second.resume(now=200.0) == 2 and second.waiting() == 2
    # restarted again within the timeout (a crash loop, a deploy and its rollback): the sweeps'
    # mark passed the images of the parts it had resumed, still waiting, and the run after it
    # resumed none of them: never reported overdue
    assert second.sweep(205.0) == []
    second.save()
    assert OverdueParts(store, 10.0, types, station="S1").resume(now=206.0) == 2
    # their crops may still come now that the service is back (a camera's folder kept them):
    # overdue a timeout after the restart, not at once
    assert second.sweep(209.0) == []
    assert [(v.part_id, v.missing) for v, _ in second.sweep(210.0)] == [("B", ["edge1"]), ("Y", ["dots"])]
    second.save(before=112.0)  # B's push waited for the store when it stopped: judged again, with Y
    assert OverdueParts(store, 10.0, types, station="S1").resume(now=250.0) == 2
    second.save()
    assert OverdueParts(store, 10.0, types, station="S1").resume(now=300.0) == 0  # B and Y were judged
    # another station on the same store resumes its own parts only (none ran before)
    assert OverdueParts(store, 10.0, types, station="S2").resume(now=300.0) == 0


def test_overdue_parts_without_sinks_are_counted_by_the_types_they_lack(tmp_path: Path) -> None:
    with ResultStore(str(tmp_path / "r.db")) as store:
        overdue_parts_contract(store)


def test_overdue_parts_left_waiting_by_a_stopped_run_are_judged_by_the_next(tmp_path: Path) -> None:
    with ResultStore(str(tmp_path / "r.db")) as store:
        overdue_resume_contract(store)
