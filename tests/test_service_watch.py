"""Folder ingestion (``diffqc watch``) with the real tiny model."""

# ruff: noqa: F811  (fixtures imported from tests.test_service_common are re-bound as arguments)

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffqc.service.buffer import BufferFull, InspectionPipeline
from diffqc.service.store import NOT_INSPECTED, ArtifactStore, ResultRecord, ResultStore
from diffqc.service.watch import FolderWatcher, WatchSettings
from tests.test_service_common import Samples, detector, samples, service_model  # noqa: F401


@pytest.fixture
def rig(detector: Any, tmp_path: Path) -> Iterator[tuple[Path, InspectionPipeline, ResultStore]]:
    folder = tmp_path / "camera"
    folder.mkdir()
    store = ResultStore(str(tmp_path / "results.db"))
    pipe = InspectionPipeline(
        detector, store, ArtifactStore(tmp_path), max_batch=4, model_version=detector.version
    )
    pipe.start()
    yield folder, pipe, store
    pipe.stop()
    store.close()


def _watcher(folder: Path, pipe: InspectionPipeline, store: ResultStore, **kw: Any) -> FolderWatcher:
    kw.setdefault("settle_s", 0.0)
    kw.setdefault("fail_after_s", 0.0)
    return FolderWatcher(WatchSettings(folder, **kw), pipe, store)


def test_watch_inspects_moves_and_uses_subfolder_types(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    folder, pipe, store = rig
    (b0, _), (b1, t1) = samples.all[0], samples.all[1]
    (folder / "part-0.png").write_bytes(b0)
    (folder / t1).mkdir()
    (folder / t1 / "part-1.png").write_bytes(b1)
    (folder / "notes.txt").write_text("ignored")
    (folder / "part-2.png.tmp").write_bytes(b0)  # still being written by the camera
    w = _watcher(folder, pipe, store)
    report = w.step()
    assert report.inspected == 2 and report.failed == 0
    recs = {r.part_id: r for r in store.query(limit=None)}
    assert set(recs) == {"part-0", "part-1"}
    assert recs["part-1"].feature_type == t1 and recs["part-1"].type_known is True
    assert recs["part-0"].type_known is False  # no type given: predicted
    assert (folder / "processed" / "part-0.png").read_bytes() == b0
    assert (folder / "processed" / t1 / "part-1.png").is_file()
    assert (folder / "notes.txt").exists() and (folder / "part-2.png.tmp").exists()
    assert w.step().inspected == 0  # nothing new


def test_watch_refuses_to_take_a_dataset_apart(tmp_path: Path, service_model: tuple[Path, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`diffqc watch DATA MODEL` (a new user's `watch` for `inspect`) moved every image of the
    dataset, training ones too, into DATA/processed/...: `train DATA` then found no images. A
    folder holding a dataset (a train/ or test/ folder with good/ in it, at any of the layout's
    levels) is refused unless --keep, which moves nothing; nothing is moved."""
    from diffqc.cli import main

    model, dataset = service_model
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*.png"))
    for folder in (data, data / "dots", data / "dots" / "train", data / "dots" / "train" / "good"):
        assert main(["watch", str(folder), str(model), "--once", "--db", str(tmp_path / "r.db")]) == 1
        err = capsys.readouterr().err
        assert f"watch: {folder.resolve()} holds a dataset (" in err and "would take it apart" in err, err
        assert "--keep" in err
    assert sorted(p.relative_to(data) for p in data.rglob("*.png")) == before
    assert main(["watch", str(data / "dots" / "test"), str(model), "--once", "--keep",
                 "--db", str(tmp_path / "r.db")]) == 0  # moves nothing
    assert sorted(p.relative_to(data) for p in data.rglob("*.png")) == before


def test_watch_follows_no_link_back_up_or_into_a_dataset(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, service_model: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture
) -> None:
    """A link in the camera's folder to a folder above it (`up -> ..`) or to a dataset: watch
    followed it and moved every image it reached (608 in the drill: a whole scratch folder, a
    dataset's training images among them) into processed/. Such a link is passed over, said
    once; a link to another folder of images (a camera's share linked in) is still read."""
    import logging

    folder, pipe, store = rig
    (b0, _), (b1, _) = samples.all[0], samples.all[1]
    (folder / "part-0.png").write_bytes(b0)
    beside = folder.parent / "archive"  # images beside the camera's folder, reached through `up`
    beside.mkdir()
    (beside / "old-part.png").write_bytes(b1)
    data = shutil.copytree(service_model[1], folder.parent / "data")
    share = folder.parent / "share"
    share.mkdir()
    (share / "part-9.png").write_bytes(b1)
    (folder / "up").symlink_to("..")
    (folder / "data").symlink_to(data)
    (folder / "cam2").symlink_to(share)
    before = sorted(p.relative_to(data) for p in data.rglob("*.png"))
    with caplog.at_level(logging.WARNING, logger="diffqc.watch"):
        w = _watcher(folder, pipe, store)
        assert w.step().inspected == 2  # part-0 and the share's part-9
        assert w.step().inspected == 0
    assert {r.part_id for r in store.query(limit=None)} == {"part-0", "part-9"}
    assert (beside / "old-part.png").is_file()
    assert sorted(p.relative_to(data) for p in data.rglob("*.png")) == before
    said = [r.getMessage() for r in caplog.records if "passing over the link" in r.getMessage()]
    assert len(said) == 2, said
    up = f"{folder / 'up'} (it leads to {folder.parent}, which holds the watched folder)"
    assert any(up in s for s in said)
    assert any(f"{folder / 'data'} (it leads to a dataset" in s for s in said)


def test_watch_names_once_a_folder_named_almost_as_a_type(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera's folder misspelled (``egde1/`` for ``edge1/``, ``Edge1/``) had its parts scored
    under the type router's pick without a word: the line meant the type, the model never took
    it. The watcher says so once per folder; a dated folder, or a folder under a type's, says
    nothing."""
    folder, pipe, store = rig
    (b0, t0), (b1, _) = samples.all[0], samples.all[1]
    typo = t0[:-2] + t0[-1] + t0[-2]  # the last two letters swapped
    for name, data in ((f"{typo}/a.png", b0), (f"{typo}/b.png", b1), (f"{t0}/2026-12-03/c.png", b0),
                       ("2026-12-03/d.png", b1)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    w = _watcher(folder, pipe, store)
    with caplog.at_level("WARNING", logger="diffqc.watch"):
        assert w.step().inspected == 4
        (folder / typo / "e.png").write_bytes(b0)
        assert w.step().inspected == 1
    said = [r.getMessage() for r in caplog.records if "named like no type" in r.getMessage()]
    assert said == [f"folder {typo}/ is named like no type of the model (did you mean {t0!r}?): its images "
                    "are scored under the type router's pick (type_known false); name it after the type, "
                    "or give --feature-type"], said
    assert {r.part_id: r.type_known for r in store.query(limit=None)} == {
        "a": False, "b": False, "c": True, "d": False, "e": False}


def test_watch_names_once_a_folder_of_a_type_the_model_served_now_lacks(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """`watch` started with a model retrained without one of the line's types (its folder left out
    of the training data) took the camera's folder of that type for no type and scored its parts
    under the type router's pick without a word (the hot reload of such a model says so; a start
    did not). A folder named after a type the store's parts had and the model lacks is named once
    in the log; a dated folder is not."""
    import datetime as dt

    folder, pipe, store = rig
    (b0, _), (b1, _) = samples.all[0], samples.all[1]
    day = dt.datetime(2026, 12, 1, 14, 30, tzinfo=dt.UTC).timestamp()
    store.insert(ResultRecord(created_at=day, source="watch:old", decision="PASS", part_id="old",
                              feature_type="hinge", type_known=True, model_version="v-before"))
    for name, data in (("hinge/a.png", b0), ("hinge/b.png", b1), ("2026-12-03/c.png", b0)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    w = _watcher(folder, pipe, store)
    with caplog.at_level("WARNING", logger="diffqc.watch"):
        assert w.step().inspected == 3
        (folder / "hinge" / "d.png").write_bytes(b0)
        assert w.step().inspected == 1
    said = [r.getMessage() for r in caplog.records if "hinge" in r.getMessage()]
    types = ", ".join(sorted(pipe.detector.classes_))
    assert said == [f"folder hinge/ is named after hinge, a type of the parts stored before (the latest "
                    f"2026-12-01 14:30 UTC, model v-before) that the model served now does not know (its "
                    f"types: {types}): its images are scored under the type router's pick (type_known "
                    "false); was hinge's folder left out of the training data?"], said
    assert not [r for r in caplog.records if "2026-12-03" in r.getMessage()]

    # a type only older parts had (here: older than the latest one) is not looked for
    monkeypatch.setattr("diffqc.service.watch.RECENT_PARTS", 1)
    caplog.clear()
    (folder / "hinge" / "e.png").write_bytes(b1)
    with caplog.at_level("WARNING", logger="diffqc.watch"):
        assert _watcher(folder, pipe, store).step().inspected == 1
    assert not [r for r in caplog.records if "hinge" in r.getMessage()]


def test_watch_reads_the_dated_folders_a_camera_files_its_images_in(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A camera that files by day (``DIR/<type>/2026-12-02/img.png``) or by hour is watched to any
    depth, as train reads ``train/good/2026-11-30/``: the type is the top folder's name when the
    model knows it. They were left unseen, with nothing said. processed/ keeps the layout."""
    folder, pipe, store = rig
    (b0, _), (b1, t1) = samples.all[0], samples.all[1]
    (folder / t1 / "2026-12-02" / "14").mkdir(parents=True)
    (folder / t1 / "2026-12-02" / "14" / "part-1.png").write_bytes(b1)
    (folder / "2026-12-02").mkdir()
    (folder / "2026-12-02" / "part-0.png").write_bytes(b0)
    (folder / "2026-12-02" / ".thumbs").mkdir()
    (folder / "2026-12-02" / ".thumbs" / "part-0.png").write_bytes(b0)  # hidden: not data
    thumbs = folder / "2026-12-02" / "@eaDir" / "part-0.png"  # a Synology share's thumbnails
    thumbs.mkdir(parents=True)
    (thumbs / "SYNOPHOTO_THUMB_S.png").write_bytes(b0)
    (folder / "#recycle").mkdir()  # the share's recycle bin: deleted images are not new parts
    (folder / "#recycle" / "part-9.png").write_bytes(b1)
    w = _watcher(folder, pipe, store)
    assert w.step().inspected == 2
    recs = {r.part_id: r for r in store.query(limit=None)}
    assert set(recs) == {"part-0", "part-1"}
    assert recs["part-1"].feature_type == t1 and recs["part-1"].type_known is True
    assert recs["part-0"].type_known is False
    assert (folder / "processed" / t1 / "2026-12-02" / "14" / "part-1.png").read_bytes() == b1
    assert (folder / "processed" / "2026-12-02" / "part-0.png").read_bytes() == b0
    assert (folder / "2026-12-02" / ".thumbs" / "part-0.png").exists()
    assert (thumbs / "SYNOPHOTO_THUMB_S.png").exists() and (folder / "#recycle" / "part-9.png").exists()
    assert w.step().inspected == 0  # processed/ is not watched
    # a folder watched per type (one camera per type: `watch incoming/<type>`) names its parts'
    # type, as `inspect incoming/<type>` does
    (folder / t1 / "part-3.png").write_bytes(next(b for b, t in samples.all[2:] if t == t1))
    assert _watcher(folder / t1, pipe, store).step().inspected == 1
    rec = next(r for r in store.query(limit=None) if r.part_id == "part-3")
    assert rec.feature_type == t1 and rec.type_known is True


def test_a_part_id_pattern_takes_the_part_id_from_a_camera_s_file_names(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera names each crop by part and type (``P-0001_dots.png``): each file's name was its
    part id, so the crops of one part had 8 part ids and no part verdict could be made.
    ``--part-id-pattern`` finds the part id in the name; a name it is not found in is stored
    without one (logged once)."""
    from diffqc.service.parts import part_verdict

    folder, pipe, store = rig
    by_type: dict[str, bytes] = {}
    for body, ftype in samples.all:
        by_type.setdefault(ftype, body)
    (t1, b1), (t2, b2) = list(by_type.items())[:2]
    for ftype, body in ((t1, b1), (t2, b2)):
        (folder / ftype).mkdir()
        (folder / ftype / f"P-0001_{ftype}.png").write_bytes(body)
    (folder / t1 / f"P-0002_{t1}.png").write_bytes(b1)
    (folder / t1 / "snapshot.png").write_bytes(b1)
    (folder / t2 / "other.png").write_bytes(b2)
    w = _watcher(folder, pipe, store, part_id_pattern=r"^(P-\d+)_")
    with caplog.at_level("WARNING", logger="diffqc.watch"):
        assert w.step().inspected == 5
    recs = store.query(limit=None, oldest_first=True)
    assert sorted(str(r.part_id) for r in recs) == ["None", "None", "P-0001", "P-0001", "P-0002"]
    verdict = part_verdict("P-0001", [r for r in recs if r.part_id == "P-0001"])
    assert set(verdict.types) == {t1, t2} and verdict.superseded == 0
    said = [r.getMessage() for r in caplog.records if "--part-id-pattern" in r.getMessage()]
    assert len(said) == 1 and "stored without a part id" in said[0], said


def test_a_backlog_is_inspected_oldest_file_first(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A camera filing each type in its own folder (DIR/<type>/...) left a backlog (the watcher
    was down, or slower for a while): it was inspected in path order, every dots crop before
    any edge crop, so a part's crops were inspected minutes apart (overdue with --part-timeout,
    complete in the end) and the oldest parts waited longest. Files are inspected oldest first,
    as the camera wrote them: a part's crops together."""
    folder, pipe, store = rig
    by_type: dict[str, bytes] = {}
    for body, ftype in samples.all:
        by_type.setdefault(ftype, body)
    (t1, b1), (t2, b2) = sorted(by_type.items())[:2]
    written = []
    for ftype in (t1, t2):
        (folder / ftype).mkdir()
    for n in range(3):  # P-0's two crops first, then P-1's, then P-2's
        for ftype, body in ((t2, b2), (t1, b1)):  # each part's t2 crop first: not the paths' order
            path = folder / ftype / f"P-{n}.png"
            path.write_bytes(body)
            at = 1_700_000_000 + len(written)
            os.utime(path, (at, at))
            written.append((f"P-{n}", ftype))
    w = _watcher(folder, pipe, store, max_pending=2)
    assert w.step().inspected == 2
    first = store.query(limit=None, oldest_first=True)
    assert [(r.part_id, r.feature_type) for r in first] == written[:2]  # P-0 complete after one step
    while w.step().inspected:
        pass
    assert [(r.part_id, r.feature_type) for r in store.query(limit=None, oldest_first=True)] == written


def test_part_id_pattern_forms_and_refusals() -> None:
    from diffqc.errors import ConfigError
    from diffqc.service.watch import compile_part_id_pattern, part_id_of

    assert part_id_of("P-0001_dots", None) == "P-0001_dots"  # no pattern: the name, as before
    assert part_id_of("P-0001_dots", compile_part_id_pattern(r"P-\d+")) == "P-0001"  # the match
    assert part_id_of("cam2_P-0001_dots", compile_part_id_pattern(r"_(P-\d+)_")) == "P-0001"  # its group
    named = compile_part_id_pattern(r"(?P<line>L\d)-(?P<part>\d+)")
    assert part_id_of("L1-0042", named) == "0042"
    assert part_id_of("snapshot", named) is None
    assert part_id_of("x", compile_part_id_pattern(r"x(\d*)")) is None  # an empty group: no id
    with pytest.raises(ConfigError, match="not a regular expression"):
        compile_part_id_pattern("P-(\\d+")
    with pytest.raises(ConfigError, match=r"has 2 groups: name the part id's \(\?P<part>"):
        compile_part_id_pattern(r"(L\d)-(\d+)")


def test_watch_does_not_inspect_its_own_heat_maps_and_kept_images(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``cd /camera && diffqc watch . model`` puts the store and its heat maps and kept images
    beside it, inside the watched folder: they were inspected as parts, whose heat maps were
    inspected in turn (201 records in a minute from one image, measured). They are not read,
    and the store's own files are not named as files it passes over (three warnings at start,
    .db, .db-shm and .db-wal, "not an image file diffqc reads"); another .db file still is."""
    import logging

    folder = tmp_path / "camera"
    folder.mkdir()
    store = ResultStore(str(folder / "diffqc-results.db"))
    pipe = InspectionPipeline(detector, store, ArtifactStore(folder), model_version="v",
                              heatmaps="all", keep_images="all")
    pipe.start()
    try:
        (folder / "part-1.png").write_bytes(samples.all[0][0])
        w = _watcher(folder, pipe, store)
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            assert w.step().inspected == 1
        assert [len(list((folder / kind).iterdir())) for kind in ("heatmaps", "images")] == [1, 1]
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("diffqc-results.db")) == [
            "diffqc-results.db", "diffqc-results.db-shm", "diffqc-results.db-wal"]
        assert "passing over" not in caplog.text, caplog.text
        (folder / "other.db").write_bytes(b"")
        with caplog.at_level(logging.WARNING, logger="diffqc"):
            assert w.step().inspected == 0 and store.count() == 1
        assert "passing over 1 file ending .db (other.db)" in caplog.text
    finally:
        pipe.stop()
        store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux file systems take names that are not UTF-8")
def test_watch_takes_file_names_that_are_not_utf8(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A share an older Windows or Latin-1 system writes holds names that are not UTF-8
    (``b"caf\\xe9.png"``): Python reads them with surrogate escapes, which neither SQLite nor
    PostgreSQL stores. One such file stopped the watch: the same traceback every poll, no other
    file inspected, for ever. The name is stored with its undecodable bytes as ``\\xNN``; the
    files are moved as they are."""
    folder, pipe, store = rig
    (b0, _), (b1, _) = samples.all[0], samples.all[1]
    latin = os.fsdecode(b"caf\xe9")
    (folder / f"{latin}.png").write_bytes(b0)
    (folder / f"{latin}-broken.png").write_bytes(b"not an image")
    (folder / "part-1.png").write_bytes(b1)
    w = _watcher(folder, pipe, store)
    report = w.step()
    assert (report.inspected, report.failed) == (2, 1)
    recs = {r.part_id: r for r in store.query(limit=None)}
    assert set(recs) == {"caf\\xe9", "caf\\xe9-broken", "part-1"}
    assert "caf\\xe9-broken.png" in (recs["caf\\xe9-broken"].reason or "")
    assert (folder / "processed" / f"{latin}.png").read_bytes() == b0
    assert (folder / "failed" / f"{latin}-broken.png").is_file()
    assert w.step().inspected == 0


def test_a_file_name_no_part_id_can_be_is_stored_as_one_the_service_takes(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A file's name is its part id, and the service takes a part id of at most 200 printable
    characters (the API answers 422 to another, OPC UA's GetPart BadInvalidArgument). A name
    with a tab or a line break (a script's slip on the camera's share) was stored as it was:
    a part the API could not be asked for, and a line break split the log's line; one of 230
    characters likewise. Control characters are written as in a string literal (``\\t``);
    a name still too long is stored without a part id, said once."""
    from diffqc.data import MAX_NAME_LEN, unprintable

    folder, pipe, store = rig
    (b0, _), (b1, _) = samples.all[0], samples.all[1]
    (folder / "P-1\tcam2.png").write_bytes(b0)
    (folder / "P-2\nFAKE.png").write_bytes(b1)
    (folder / f"{'P' * 230}.png").write_bytes(b0 + b"")
    w = _watcher(folder, pipe, store)
    with caplog.at_level("WARNING", logger="diffqc.watch"):
        assert w.step().inspected == 3
    ids = sorted(str(r.part_id) for r in store.query(limit=None))
    assert ids == ["None", "P-1\\tcam2", "P-2\\nFAKE"]
    for pid in ids:
        assert len(pid) <= MAX_NAME_LEN and not any(unprintable(c) for c in pid)
    said = [r.getMessage() for r in caplog.records if "longer than 200" in r.getMessage()]
    assert len(said) == 1 and "stored without a part id" in said[0], said


def test_watch_waits_until_a_file_is_complete(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    folder, pipe, store = rig
    body, ftype = samples.all[2]
    w = _watcher(folder, pipe, store, feature_type=ftype, settle_s=0.3, fail_after_s=5.0)
    path = folder / "slow.png"
    path.write_bytes(body[: len(body) // 2])  # the camera has written half of it
    assert w.step().inspected == 0  # first sighting: not settled yet
    time.sleep(0.35)
    r = w.step()  # settled but truncated: waits (within fail_after_s) instead of failing
    assert r.inspected == 0 and r.failed == 0 and store.count() == 0
    with open(path, "ab") as fh:
        fh.write(body[len(body) // 2 :])
    os.utime(path)
    assert w.step().inspected == 0  # changed again: settles first
    time.sleep(0.35)
    assert w.step().inspected == 1
    (rec,) = store.query()
    assert rec.feature_type == ftype and rec.decision in ("PASS", "REVIEW", "REJECT")


def test_watch_does_not_fail_a_file_still_being_written_however_long_it_takes(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A camera's upload over a slow or busy link (FTP, a share) can take longer than
    ``fail_after_s`` with pauses longer than ``settle_s``: the file was failed (recorded
    NOT_INSPECTED and moved to failed/, where the upload went on into it) once it had been seen
    ``fail_after_s`` before, though it was still changing. A file fails only once it has stopped
    changing for ``fail_after_s`` and still does not decode."""
    folder, pipe, store = rig
    body, ftype = samples.all[2]
    w = _watcher(folder, pipe, store, feature_type=ftype, settle_s=0.05, fail_after_s=0.5)
    path = folder / "uploading.png"
    cuts = [len(body) * k // 8 for k in range(1, 8)]
    path.write_bytes(body[: cuts[0]])
    for start, end in zip(cuts, [*cuts[1:], len(body)], strict=True):
        w.step()  # sees it grown
        time.sleep(0.15)  # a pause longer than settle_s: the part written so far is tried
        assert w.step().failed == 0 and store.count() == 0, "failed while still being written"
        with open(path, "ab") as fh:  # over 1 s in all: twice fail_after_s since first seen
            fh.write(body[start:end])
    w.step()
    time.sleep(0.15)
    assert w.step().inspected == 1 and (folder / "processed" / "uploading.png").exists()
    (folder / "stuck.png").write_bytes(body[: len(body) // 2])  # a camera that stopped mid-file
    w.step()
    time.sleep(0.6)
    assert w.step().failed == 1 and (folder / "failed" / "stuck.png").exists()


def test_watch_names_a_file_rewritten_faster_than_it_settles(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera set to write every image under one name (``image.png``, overwritten at each
    trigger) faster than ``--settle`` never leaves the file unchanged long enough: nothing was
    inspected, and nothing said. A file rewritten (not grown) three times before it settled is
    named once, with what to do; one that only grows (a slow upload) is not."""
    import logging

    folder, pipe, store = rig
    (a, ftype), (b, _) = samples.all[0], samples.all[1]
    w = _watcher(folder, pipe, store, feature_type=ftype, settle_s=0.3)
    caplog.set_level(logging.WARNING, logger="diffqc.watch")
    fixed, growing = folder / "image.png", folder / "upload.png"
    for i in range(8):  # each trigger rewrites it before it settles
        fixed.write_bytes((a, b)[i % 2])
        with open(growing, "ab") as fh:
            fh.write(a[i * len(a) // 8:(i + 1) * len(a) // 8])
        os.utime(fixed, ns=(time.time_ns() + i * 10**9,) * 2)  # a new mtime on any file system
        assert w.step().inspected == 0
        time.sleep(0.05)
    said = [r.getMessage() for r in caplog.records if "rewritten" in r.getMessage()]
    assert len(said) == 1 and "image.png" in said[0] and "upload.png" not in said[0], said
    assert "a name of its own" in said[0] and "--settle" in said[0]
    time.sleep(0.35)
    assert w.step().inspected == 2  # once they rest, both are inspected


def test_watch_names_once_each_kind_of_file_it_passes_over(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera set to a format diffqc does not read (``.raw``, ``.bin``) filled the folder and
    nothing was inspected, with nothing in the log: each such file ending is named once."""
    import logging

    folder, pipe, store = rig
    for name in ("a.raw", "b.raw", "c.RAW", "log.txt"):
        (folder / name).write_bytes(samples.all[0][0])
    (folder / "part.png.tmp").write_bytes(samples.all[0][0])  # being written: not passed over
    w = _watcher(folder, pipe, store)
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        assert w.step().inspected == 0
        (folder / "d.raw").write_bytes(samples.all[0][0])
        assert w.step().inspected == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2 and ".raw" in said[0] and ".txt" in said[1] and ".png" in said[0], said
    assert "3 files" in said[0] and "a.raw" in said[0]
    # an image format a camera may be set to is named as one, with what to do; a log file is not
    assert "an image format diffqc does not read: set the camera to write PNG, BMP or TIFF" in said[0]
    assert "passing over 1 file ending .txt (log.txt): not an image file diffqc reads" in said[1]
    assert "set the camera" not in said[1]


def test_watch_says_once_that_its_folder_is_gone_and_goes_on_when_it_returns(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A network share that drops (the folder unreadable) is one error line naming it, not a
    traceback every poll, nor silence; when it is back, so is the watcher."""
    import logging
    import threading

    folder, pipe, store = rig
    w = _watcher(folder, pipe, store, poll_s=0.05)
    hidden = folder.with_name("camera-offline")
    folder.rename(hidden)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        thread.start()
        time.sleep(0.5)  # ~10 polls without the folder
        hidden.rename(folder)
        (folder / "part-9.png").write_bytes(samples.all[0][0])
        deadline = time.monotonic() + 20
        while store.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join()
    assert store.count() == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(folder) in errors[0].getMessage() and errors[0].exc_info is None
    assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_watch_says_once_that_the_store_is_down_and_stores_the_part_when_it_is_back(
    detector: Any, samples: Samples, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database restart (here another connection holding SQLite's write lock): the file stays
    in the folder and is stored once the store takes writes again; the log has one error line
    for the outage, not a traceback every poll."""
    import logging
    import sqlite3
    import threading

    folder = tmp_path / "camera"
    folder.mkdir()
    db = tmp_path / "results.db"
    store = ResultStore(str(db), busy_timeout_s=0.1)
    pipe = InspectionPipeline(detector, store, ArtifactStore(tmp_path), model_version="v")
    pipe.start()
    w = _watcher(folder, pipe, store, poll_s=0.05)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    (folder / "part-7.png").write_bytes(samples.all[0][0])
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    try:
        with caplog.at_level(logging.INFO, logger="diffqc.watch"):
            thread.start()
            time.sleep(1.5)  # polls against a store that takes no write
            assert store.count() == 0 and (folder / "part-7.png").exists()
            lock.execute("ROLLBACK")
            deadline = time.monotonic() + 30
            while store.count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            thread.join()
    finally:
        lock.close()
        pipe.stop()
    assert store.count() == 1 and (folder / "processed" / "part-7.png").exists()
    store.close()
    errors = [r for r in caplog.records if r.name == "diffqc.watch" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "store" in errors[0].getMessage() and errors[0].exc_info is None
    assert any("again" in r.getMessage() for r in caplog.records if r.name == "diffqc.watch")


def test_watch_that_cannot_move_its_files_says_so_at_start_and_once_later(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera share this computer may only read: processed/ cannot be made, and every poll
    logged the same traceback for ever (measured on a read-only mount). At start that is one
    error naming --keep; a folder that becomes unwritable later is one error line, the files stay
    (their records stored once) and are moved when it can be written again. Here processed/ is a
    regular file, which no one can write into (root included, unlike chmod)."""
    import logging
    import threading

    from diffqc.errors import OutputError

    folder, pipe, store = rig
    (folder / "processed").write_text("in the way")
    with pytest.raises(OutputError, match=r"processed.*--keep"):
        _watcher(folder, pipe, store)
    (folder / "processed").unlink()
    w = _watcher(folder, pipe, store, poll_s=0.05)
    (folder / "processed").write_text("in the way")  # after the start: the share turned read-only
    (folder / "part-3.png").write_bytes(samples.all[0][0])
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        thread.start()
        time.sleep(1.0)
        assert store.count() == 1 and (folder / "part-3.png").exists()
        (folder / "processed").unlink()
        deadline = time.monotonic() + 20
        while (folder / "part-3.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join()
    assert (folder / "processed" / "part-3.png").exists() and store.count() == 1
    errors = [r for r in caplog.records if r.name == "diffqc.watch" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "processed" in errors[0].getMessage() and errors[0].exc_info is None


def test_watch_says_what_it_inspected_once_a_minute(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """`diffqc watch` in a terminal said "watching DIR" and then nothing for hours, parts or no
    parts (its counts came at the stop only), so whoever started it could not tell it working from
    stuck without `results list`. It says its first images at once, and then, once a minute in
    which it inspected images, how many, by decision."""
    import logging

    folder, pipe, store = rig

    def watched(*bodies: bytes) -> list[str]:
        """What a running watcher says while ``bodies`` come one after another."""
        caplog.clear()
        stop = threading.Event()
        watcher = _watcher(folder, pipe, store, poll_s=0.05)
        thread = threading.Thread(target=watcher.run, args=(stop,))
        thread.start()
        try:
            for body in bodies:
                before = store.count()
                (folder / f"part-{before}.png").write_bytes(body)
                deadline = time.monotonic() + 30
                while store.count() == before and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.2)  # the step after it: its word said or not
        finally:
            stop.set()
            thread.join(30)
        return [r.getMessage() for r in caplog.records if " inspected since " in r.getMessage()]

    bodies = [body for body, _ in samples.all[:4]]
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        said = watched(*bodies[:2])
        first = min(store.query(limit=None), key=lambda r: r.id or 0).decision
        assert len(said) == 1, said  # the first at once, the second within the minute: not yet
        assert re.fullmatch(rf"1 image\(s\) inspected since \d\d:\d\d:\d\d: {first} 1", said[0]), said
        monkeypatch.setattr(FolderWatcher, "SAY_EVERY_S", 0.0)
        assert len(watched(*bodies[2:])) == 2
    assert store.count() == 4


def test_watch_counts_the_parts_its_images_were_of(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A line whose parts are several crops, named by part (`--part-id-pattern`): the watcher's
    minute line counted images, where the QC engineer counts parts. It says both."""
    import logging

    folder, pipe, store = rig
    b0, b1 = samples.all[0][0], samples.all[1][0]
    for part in ("P-1", "P-2"):
        (folder / f"{part}_a.png").write_bytes(b0)
        (folder / f"{part}_b.png").write_bytes(b1)
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        _watcher(folder, pipe, store, part_id_pattern=r"^(P-\d+)_").run(once=True)
    said = [r.getMessage() for r in caplog.records if " inspected since " in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("4 image(s) of 2 part(s) inspected since "), said
    caplog.clear()
    (folder / "solo.png").write_bytes(b0)  # a part id per image: parts are images, said once
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        _watcher(folder, pipe, store).run(once=True)
    said = [r.getMessage() for r in caplog.records if " inspected since " in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 image(s) inspected since "), said


def test_watch_once_ends_with_an_error_when_it_cannot_finish(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """``--once`` (a cron job: process what is there, then exit) met an outage and retried for
    ever. It ends with the outage as its error; the file stays for the next run, its record
    stored once."""
    folder, pipe, store = rig
    w = _watcher(folder, pipe, store, poll_s=0.05)
    (folder / "processed").write_text("in the way")  # after the start: the share turned read-only
    (folder / "part-4.png").write_bytes(samples.all[0][0])
    with pytest.raises(OSError, match=r"cannot move inspected files into .*processed"):
        w.run(once=True)
    assert store.count() == 1 and (folder / "part-4.png").exists()


def test_watch_logs_an_unexpected_failure_once_and_once_ends_with_it(
    rig: tuple[Path, InspectionPipeline, ResultStore], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A failure nobody foresaw (a bug: a file name that stopped the watch was one) logged its
    traceback at every poll, for ever, and made ``--once`` retry for ever. Its traceback is logged
    once (it is the watcher's ``problem``, under ``/readyz`` ``degraded``), and ``--once`` ends
    with it."""
    import logging
    import threading

    folder, pipe, store = rig
    w = _watcher(folder, pipe, store, poll_s=0.02)

    def failing_step() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(w, "step", failing_step)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with caplog.at_level(logging.INFO, logger="diffqc.watch"):
        w.run(stop)
    errors = [r for r in caplog.records if r.name == "diffqc.watch" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and "a bug" in errors[0].getMessage()
    assert w.problem is not None and "a bug" in w.problem
    with pytest.raises(RuntimeError, match="a bug"):
        w.run(once=True)


def test_watch_records_unreadable_files_as_not_inspected(
    rig: tuple[Path, InspectionPipeline, ResultStore],
) -> None:
    """An unreadable file is recorded NOT_INSPECTED, and the line hears of it as of any record
    (the pipeline's listeners: OPC UA's latest decision and counts, the drift watch): it was
    stored beside them, and a PLC reading `diffqc.Last` never saw it."""
    folder, pipe, store = rig
    heard: list[ResultRecord] = []
    pipe.listeners.append(lambda rec, seconds: heard.append(rec))
    (folder / "junk.png").write_bytes(b"definitely not a png")
    w = _watcher(folder, pipe, store)
    assert w.step().failed == 1
    (rec,) = store.query()
    assert rec.decision == NOT_INSPECTED and "not a recognised image" in (rec.reason or "")
    assert (folder / "failed" / "junk.png").exists()
    assert [(r.id, r.decision) for r in heard] == [(rec.id, NOT_INSPECTED)]


def test_an_empty_file_is_waited_for_then_failed_and_once_ends(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A file left empty (a camera that crashed or ran out of room after creating it) was never
    taken: no record of the part, nothing said, and ``watch --once`` (a cron job) never ended.
    An empty file is waited for as one being written is, then stored NOT_INSPECTED and moved to
    failed/, as a file that does not decode."""
    folder, pipe, store = rig
    (folder / "zero.png").write_bytes(b"")
    (folder / "ok.png").write_bytes(samples.all[0][0])
    w = _watcher(folder, pipe, store, fail_after_s=0.3, poll_s=0.05)
    first = w.step()
    assert (first.inspected, first.failed) == (1, 0)  # the empty one may still be written
    stop = threading.Event()
    timer = threading.Timer(20, stop.set)  # before: run(once=True) never returned
    timer.start()
    try:
        w.run(stop, once=True)
    finally:
        timer.cancel()
    assert not stop.is_set(), "watch --once did not end"
    assert (folder / "failed" / "zero.png").exists()
    (failed,) = [r for r in store.query(limit=None) if r.part_id == "zero"]
    assert failed.decision == NOT_INSPECTED and "empty" in (failed.reason or ""), failed.reason


def test_a_failed_file_moved_back_is_tried_again(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in failed/ (its inspection failed, or it was dropped under overload) moved back
    into the folder as it was (same bytes, same modification time) is inspected, not taken for
    a file stored before a crash and moved to processed/ uninspected."""
    folder, pipe, store = rig
    data, ftype = samples.all[0]
    (folder / ftype).mkdir()
    (folder / ftype / "p1.png").write_bytes(data)
    w = _watcher(folder, pipe, store)

    def broken(batch: Any) -> Any:
        raise RuntimeError("GPU out of memory")

    with monkeypatch.context() as m:
        m.setattr(pipe, "_inspect", broken)
        w.step()
    failed = folder / "failed" / ftype / "p1.png"
    assert failed.is_file() and [r.decision for r in store.query()] == [NOT_INSPECTED]
    os.rename(failed, folder / ftype / "p1.png")
    report = w.step()
    assert (report.inspected, report.already_recorded) == (1, 0)
    assert (folder / "processed" / ftype / "p1.png").read_bytes() == data
    assert sorted(r.decision != NOT_INSPECTED for r in store.query()) == [False, True]
    # with --keep the file stays: not tried again in this run, tried again at the next start
    (folder / ftype / "p2.png").write_bytes(data)
    kept = _watcher(folder, pipe, store, after="keep")
    with monkeypatch.context() as m:
        m.setattr(pipe, "_inspect", broken)
        kept.step()
    assert kept.step().inspected == 0 and (folder / ftype / "p2.png").is_file()
    assert _watcher(folder, pipe, store, after="keep").step().inspected == 1
    assert [r.decision == NOT_INSPECTED for r in store.query() if r.part_id == "p2"] == [False, True]
    (folder / ftype / "p2.png").unlink()
    (folder / "junk.png").write_bytes(b"not an image")  # unreadable: failed again, both stored
    w.step()
    os.rename(folder / "failed" / "junk.png", folder / "junk.png")
    assert w.step().failed == 1 and (folder / "failed" / "junk.png").is_file()
    assert [r.part_id for r in store.query()].count("junk") == 2


def test_a_file_it_may_not_read_fails_alone(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera's file this user may not read (written 0600 by an FTP server's user; tests run
    as root, who reads anything, so the refusal is raised here as the OS raises it) waits
    ``fail_after_s`` and is then recorded NOT_INSPECTED and moved to failed/: the other files
    are inspected, where the whole folder used to stall on it, poll after poll."""
    folder, pipe, store = rig
    data, _ = samples.all[0]
    (folder / "locked.png").write_bytes(data)
    (folder / "open.png").write_bytes(data)
    read_bytes = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    w = _watcher(folder, pipe, store, fail_after_s=60.0)
    report = w.step()
    assert (report.inspected, report.failed, report.waiting) == (1, 0, 1)  # it may be being written
    assert (folder / "locked.png").is_file() and (folder / "processed" / "open.png").is_file()
    w = _watcher(folder, pipe, store, fail_after_s=0.0)
    assert w.step().failed == 1 and (folder / "failed" / "locked.png").is_file()
    rec = next(r for r in store.query() if r.part_id == "locked")
    assert rec.decision == NOT_INSPECTED and "Permission denied" in (rec.reason or "")
    monkeypatch.undo()  # its permission mended, moved back: inspected
    os.rename(folder / "failed" / "locked.png", folder / "locked.png")
    assert w.step().inspected == 1 and (folder / "processed" / "locked.png").is_file()


def test_watch_restart_neither_skips_nor_double_counts(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, pipe, store = rig
    for i in range(4):
        (folder / f"p{i}.png").write_bytes(samples.all[i][0])
    w = _watcher(folder, pipe, store)
    # crash after the records are committed but before the files are moved
    monkeypatch.setattr(FolderWatcher, "_finish", lambda self, *a, **k: (_ for _ in ()).throw(SystemExit))
    with pytest.raises(SystemExit):
        w.step()
    committed = store.count()
    assert committed == 4
    monkeypatch.undo()
    # an unrecorded file arrives while "down"
    (folder / "p4.png").write_bytes(samples.all[4][0])
    restarted = _watcher(folder, pipe, store)
    report = restarted.step()
    assert report.already_recorded == 4 and report.inspected == 1
    assert store.count() == 5
    assert sorted(p.name for p in (folder / "processed").iterdir()) == [f"p{i}.png" for i in range(5)]
    parts = [r.part_id for r in store.query(limit=None)]
    assert sorted(p or "" for p in parts) == [f"p{i}" for i in range(5)]


def test_watch_reused_name_with_new_content_is_a_new_part(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    folder, pipe, store = rig
    w = _watcher(folder, pipe, store)
    (folder / "img.png").write_bytes(samples.all[0][0])
    assert w.step().inspected == 1
    (folder / "img.png").write_bytes(samples.all[1][0])  # camera counter wrapped
    assert w.step().inspected == 1
    assert store.count() == 2 and len(list((folder / "processed").iterdir())) == 2


def test_watch_reused_name_with_the_same_content_is_a_new_part_and_named(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera that repeats its last frame (a stale buffer) writes the same bytes under the
    same name: the second file was taken for one stored before a crash, moved and not recorded,
    so a part went by with no record. Each file that arrives is recorded, and a repeated image
    is named in the log; a file stored before a crash (the same file, unmoved) is still not."""
    folder, pipe, store = rig
    pipe.SAY_REPEATS_EVERY_S = 0.0  # each repeat named, as a minute apart
    w = _watcher(folder, pipe, store)
    (folder / "img.png").write_bytes(samples.all[0][0])
    submit = pipe.submit_many
    pipe.submit_many = lambda jobs: (_ for _ in ()).throw(BufferFull("full"))  # type: ignore[method-assign]
    assert w.step().waiting == 1  # overloaded: the file stays for the next pass
    pipe.submit_many = submit  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="diffqc.service"):
        assert w.step().inspected == 1
    assert "same image" not in caplog.text  # a retried file is no repeat
    (folder / "img.png").write_bytes(samples.all[0][0])
    os.utime(folder / "img.png", ns=(time.time_ns(), time.time_ns() + 10**9))  # written later
    with caplog.at_level("WARNING", logger="diffqc.service"):
        report = w.step()
    assert report.inspected == 1 and report.already_recorded == 0 and store.count() == 2
    first, second = sorted(r.id or 0 for r in store.query(limit=None))
    assert f"part img (record {second}) is the same image as part img (record {first})" in caplog.text
    assert len(list((folder / "processed").iterdir())) == 2
    (folder / "img-0002.png").write_bytes(samples.all[0][0])  # a counter in the name: the same
    with caplog.at_level("WARNING", logger="diffqc.service"):
        assert w.step().inspected == 1
    assert f"part img-0002 (record {second + 1}) is the same image as part img (record {second})" \
        in caplog.text
    assert pipe.repeated_images_total == 2


def _refuse_moves_out_of(monkeypatch: pytest.MonkeyPatch, folder: str, code: int, said: str) -> None:
    """``os.rename`` and ``os.replace`` of a camera's file in a folder named ``folder`` (not one
    under processed/) fail as the OS fails them (``code``: EXDEV across file systems, EROFS a
    read-only mount)."""
    for name in ("rename", "replace"):
        move = getattr(os, name)

        def refuse(src: Any, dst: Any, *args: Any, _move: Any = move, **kw: Any) -> None:
            if Path(src).parent.name == folder and "processed" not in Path(src).parts:
                raise OSError(code, said, str(src))
            _move(src, dst, *args, **kw)

        monkeypatch.setattr(os, name, refuse)


def test_a_reused_name_never_replaces_a_file_in_processed(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A camera reusing a name: the file is moved as ``<name>-<record id>``, a name a new store
    (its ids from 1 again) had given a frame already in processed/, which the move replaced: a
    camera's image lost. It takes the first free name now, and replaces nothing."""
    folder, pipe, store = rig
    processed = folder / "processed"
    processed.mkdir()
    earlier = {"img.png": samples.all[1][0], "img-1.png": samples.all[2][0]}  # an earlier store's
    for name, data in earlier.items():
        (processed / name).write_bytes(data)
    (folder / "img.png").write_bytes(samples.all[0][0])
    w = _watcher(folder, pipe, store)
    assert w.step().inspected == 1 and store.query()[0].id == 1
    now = {p.name: p.read_bytes() for p in processed.iterdir()}
    assert now == {**earlier, "img-1-2.png": samples.all[0][0]}


def test_a_camera_share_on_another_file_system_is_moved_by_copying(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera's share linked into the watched folder (read, as the docs say) lies on another
    file system, where a rename into processed/ fails (EXDEV): every poll failed on its oldest
    file and nothing behind it was inspected. Such a file is copied into processed/, synced, and
    only then removed from the share; the files behind it go on as before."""
    import errno

    folder, pipe, store = rig
    (folder / "share").mkdir()
    (folder / "share" / "a.png").write_bytes(samples.all[0][0])
    (folder / "b.png").write_bytes(samples.all[1][0])
    os.utime(folder / "b.png", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # after a.png
    _refuse_moves_out_of(monkeypatch, "share", errno.EXDEV, "Invalid cross-device link")
    w = _watcher(folder, pipe, store)
    assert w.step().inspected == 2 and w.problem is None
    assert (folder / "processed" / "share" / "a.png").read_bytes() == samples.all[0][0]
    assert (folder / "processed" / "b.png").read_bytes() == samples.all[1][0]
    assert not (folder / "share" / "a.png").exists() and not (folder / "b.png").exists()
    assert [p.name for p in (folder / "processed" / "share").iterdir()] == ["a.png"]  # no copy left over


def test_files_that_may_not_leave_their_folder_are_left_there_and_the_others_go_on(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A camera's sub-folder files may not leave (read-only to this user; tests run as root, so
    the refusal is raised as the OS raises it): the watch stopped at its oldest file on every
    poll, saying it could not move files into processed/, which was writable. Such files are
    inspected once and left in place, as --keep leaves them, said once naming their folder; the
    files behind them are inspected and moved."""
    import errno
    import logging

    folder, pipe, store = rig
    (folder / "ro").mkdir()
    for i in range(2):
        (folder / "ro" / f"a{i}.png").write_bytes(samples.all[i][0])
    (folder / "b.png").write_bytes(samples.all[2][0])
    os.utime(folder / "b.png", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # the newest
    _refuse_moves_out_of(monkeypatch, "ro", errno.EROFS, "Read-only file system")
    w = _watcher(folder, pipe, store)
    with caplog.at_level(logging.WARNING, logger="diffqc.watch"):
        assert w.step().inspected == 3 and w.problem is None
        assert w.step().inspected == 0 and store.count() == 3  # not read again
    assert sorted(p.name for p in (folder / "ro").iterdir()) == ["a0.png", "a1.png"]
    assert (folder / "processed" / "b.png").is_file() and not list((folder / "processed").glob("ro/*"))
    said = [r.getMessage() for r in caplog.records if "left in place" in r.getMessage()]
    assert len(said) == 1 and str(folder / "ro") in said[0] and "Read-only file system" in said[0], said


def test_a_folder_it_may_list_but_not_enter_is_passed_over_alone(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dated folder listable but not searchable (mode 644: an FTP server's umask gone wrong)
    made ``is_dir`` of its entries raise PermissionError, and every poll failed on it: no file of
    the folder was inspected. The entry is passed over (looked at again next poll), the rest
    inspected."""
    folder, pipe, store = rig
    (folder / "2026-01-01").mkdir()
    (folder / "2026-01-01" / "sub").mkdir()
    (folder / "good.png").write_bytes(samples.all[0][0])
    is_dir = Path.is_dir

    def refuse(self: Path) -> bool:
        if self.name == "sub":
            raise PermissionError(13, "Permission denied", str(self))
        return is_dir(self)

    monkeypatch.setattr(Path, "is_dir", refuse)
    w = _watcher(folder, pipe, store)
    assert w.step().inspected == 1 and (folder / "processed" / "good.png").is_file()


def test_watch_keep_mode_leaves_files_and_survives_restart(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    folder, pipe, store = rig
    (folder / "k.png").write_bytes(samples.all[0][0])
    assert _watcher(folder, pipe, store, after="keep").step().inspected == 1
    w2 = _watcher(folder, pipe, store, after="keep")
    r = w2.step()
    assert r.inspected == 0 and r.already_recorded == 1 and (folder / "k.png").exists()
    assert w2.step().already_recorded == 0  # remembered, not re-hashed
    assert store.count() == 1
    # what is remembered goes with the file (something else empties the folder): a watcher
    # running for months must not hold every file it ever saw
    (folder / "k.png").unlink()
    w2.step()
    assert not w2._kept


def test_watch_keeps_what_a_diffqc_before_the_modification_time_key_recorded(
    rig: tuple[Path, InspectionPipeline, ResultStore], samples: Samples
) -> None:
    """A diffqc before 755c3fe keyed a file by its path and content only; after an upgrade,
    ``watch --keep`` inspected again every file it had recorded (a drill: 6 files left in a
    camera's folder, 12 records after the upgrade, each pushed twice). A file whose key of then
    is stored, by a record made after the file was written, is recorded; one written again
    since is a new part."""
    import hashlib

    folder, pipe, store = rig
    for i in range(3):
        (folder / f"k{i}.png").write_bytes(samples.all[i][0])
    w = _watcher(folder, pipe, store, after="keep")
    store.insert_many([ResultRecord(
        created_at=time.time() + 1, source=w.source, decision="PASS", part_id=f"k{i}", feature_type="a",
        dedup_key=f"k{i}.png|{hashlib.sha256(samples.all[i][0]).hexdigest()}") for i in range(3)])
    later = time.time_ns() + 60 * 10**9
    os.utime(folder / "k2.png", ns=(later, later))  # written again, with the same bytes, since
    report = w.step()
    assert (report.already_recorded, report.inspected) == (2, 1) and store.count() == 4


def test_watch_cli_once(service_model: tuple[Path, Path], samples: Samples, tmp_path: Path) -> None:
    import diffqc

    folder = tmp_path / "cam"
    folder.mkdir()
    for i in range(3):
        (folder / f"c{i}.png").write_bytes(samples.all[i][0])
    (folder / "c0.png").write_bytes(samples.one("PASS")[0])
    (folder / "bad.png").write_bytes(b"garbage")
    env = dict(os.environ, PYTHONPATH=str(Path(diffqc.__file__).parents[1]), OMP_NUM_THREADS="1")
    db = tmp_path / "w.db"
    cmd = [
        sys.executable,
        "-m",
        "diffqc.service",
        "watch",
        str(folder),
        str(service_model[0]),
        "--db",
        str(db),
        "--once",
        "--settle",
        "0",
        "--poll",
        "0.05",
        "--heatmaps",  # the PASS part's too (the default draws flagged parts' only)
        "all",
    ]
    out = subprocess.run([*cmd, "--disk-min-free-mb", "0", "--disk-min-free-percent", "0"], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is nearly full" not in out.stderr  # no floor: no disk is low
    with ResultStore(str(db)) as store:
        recs: list[ResultRecord] = store.query(limit=None)
    assert sorted(r.part_id or "" for r in recs) == ["bad", "c0", "c1", "c2"]
    assert [r.decision for r in recs if r.part_id == "bad"] == [NOT_INSPECTED]
    by_part = {r.part_id: r for r in recs}
    assert by_part["c0"].decision == "PASS" and all(by_part[f"c{i}"].heatmap for i in range(3))
    assert len(list((folder / "processed").iterdir())) == 3
    # --keep-days (as serve's): kept images and heat maps expire, records stay; a cron job's
    # `--once` run is over before the first pass, so it makes one as it ends (watch had none)
    for i in range(3):
        (folder / f"d{i}.png").write_bytes(samples.all[i][0])
    retention = ("--keep-images", "all", "--keep-days", "1e-9", "--disk-min-free-percent", "100")
    out = subprocess.run([*cmd, *retention], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is nearly full" in out.stderr  # watch's disks are watched as serve's, at its thresholds
    with ResultStore(str(db)) as store:
        recs = store.query(limit=None)
    assert len(recs) == 7 and all(r.heatmap is None for r in recs)
    assert all(r.heatmap_expired_at is not None for r in recs if r.decision != NOT_INSPECTED)
    assert not [p for p in (tmp_path / "images").iterdir()] + [p for p in (tmp_path / "heatmaps").iterdir()]
    # --part-timeout with --once: a run ends before its parts are due, so none would ever be
    # overdue; refused at start, in one line, nothing inspected
    (folder / "e0.png").write_bytes(samples.all[0][0])
    out = subprocess.run([*cmd, "--part-timeout", "30"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert "--part-timeout needs a watch that keeps running, not --once" in out.stderr
    assert (folder / "e0.png").exists()


def test_a_camera_frame_above_the_default_image_limit_is_taken_with_max_image_mpx(
        service_model: tuple[Path, Path], tmp_path: Path) -> None:
    """A 20-megapixel camera (5472 x 3648, common on inspection lines) was refused by `watch`
    (every part NOT_INSPECTED: "image header claims 5472x3648 pixels; the limit is 16777216
    pixels") and by `serve` (413), with no way to raise the limit, though `train` and `inspect`
    read such frames. `--max-image-mpx` sets it, and the refusal names it. (A 4200 x 4200 frame
    here: just above the default's 16.8 MP.)"""
    from PIL import Image

    import diffqc

    folder = tmp_path / "cam"
    folder.mkdir()
    Image.new("L", (4200, 4200), 128).save(folder / "big.png")
    env = dict(os.environ, PYTHONPATH=str(Path(diffqc.__file__).parents[1]), OMP_NUM_THREADS="1")
    db = tmp_path / "w.db"
    cmd = [sys.executable, "-m", "diffqc.service", "watch", str(folder), str(service_model[0]), "--db",
           str(db), "--once", "--settle", "0", "--poll", "0.05", "--feature-type", "dots"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("image header claims 4200x4200 pixels (17.6 MP); the limit is 16.8 MP: --max-image-mpx "
            "takes larger frames") in out.stderr
    (folder / "failed" / "big.png").rename(folder / "big.png")  # tried again once moved back
    out = subprocess.run([*cmd, "--max-image-mpx", "20"], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    with ResultStore(str(db)) as store:
        decisions = [r.decision for r in store.query(limit=None, oldest_first=True)]
    assert decisions[0] == NOT_INSPECTED and decisions[1] in ("PASS", "REVIEW", "REJECT")
    out = subprocess.run([*cmd, "--max-image-mpx", "65"], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 2 and "at most 64" in out.stderr, out.stderr[-2000:]


def test_watch_picks_up_a_new_calibration_without_a_restart(service_model: tuple[Path, Path],
                                                            samples: Samples, tmp_path: Path) -> None:
    """``diffqc calibrate MODEL DATA`` while ``diffqc watch`` runs: `serve` picks the new
    calibration up, `watch` went on deciding with the old one until restarted, and said nothing.
    It reloads it as `serve` does (and logs so); the next part's p-value is the new one's."""
    import csv
    import json
    import shutil
    import signal

    import diffqc
    from diffqc.calibration import Calibrator
    from diffqc.cli import main
    from diffqc.data import GOOD, load_dataset

    model = tmp_path / "model"
    shutil.copytree(service_model[0], model)
    good = [s for s in load_dataset(service_model[1]) if s.label == GOOD and s.split == "test"]
    data, ftype = samples.one("REVIEW")
    manifest = tmp_path / "good.csv"
    with manifest.open("w", newline="") as fh:  # a few GOOD parts per type: another calibration
        w = csv.writer(fh)
        w.writerow(["path", "feature_type", "label"])
        types = sorted({s.feature_type for s in good})
        for t in types:
            for s in [s for s in good if s.feature_type == t][:6]:
                w.writerow([s.path, t, "good"])
    folder = tmp_path / "cam"
    (folder / ftype).mkdir(parents=True)
    db = tmp_path / "w.db"
    log = (tmp_path / "watch.log").open("w")
    env = dict(os.environ, PYTHONPATH=str(Path(diffqc.__file__).parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffqc.service", "watch", str(folder), str(model),
                             "--db", str(db), "--settle", "0", "--poll", "0.05"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    def records(n: int) -> list[ResultRecord]:
        for _ in range(1200):
            if db.exists():
                with ResultStore(str(db)) as store:
                    if len(recs := store.query(limit=None)) >= n:
                        return recs
            assert proc.poll() is None, (tmp_path / "watch.log").read_text()[-2000:]
            time.sleep(0.1)
        raise AssertionError((tmp_path / "watch.log").read_text()[-2000:])

    try:
        (folder / ftype / "first.png").write_bytes(data)
        (first,) = records(1)
        assert main(["calibrate", str(model), str(manifest), "-q"]) == 0
        new = Calibrator.from_dict(json.loads((model / "calibration.json").read_text()))
        for _ in range(300):
            if "calibration reloaded" in (tmp_path / "watch.log").read_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "watch.log").read_text()[-2000:])
        (folder / ftype / "second.png").write_bytes(data)
        second = next(r for r in records(2) if r.part_id == "second")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert second.score == pytest.approx(first.score, rel=1e-5)
    assert second.p_value == pytest.approx(new.p_value(ftype, second.score))
    assert second.p_value != first.p_value


def test_a_running_watch_inspects_with_a_retrained_model(service_model: tuple[Path, Path], samples: Samples,
                                                         tmp_path: Path) -> None:
    """`watch` served the model it started with until restarted; a model retrained into its
    folder (`diffqc train DATA --out MODEL`) is loaded once complete, and the parts after it
    carry its version."""
    import shutil
    import signal

    import diffqc
    from tests.test_service_common import bench

    model = tmp_path / "model"
    shutil.copytree(service_model[0], model)
    data, ftype = samples.all[0]
    folder = tmp_path / "cam"
    (folder / ftype).mkdir(parents=True)
    db = tmp_path / "w.db"
    log_path = tmp_path / "watch.log"
    env = dict(os.environ, PYTHONPATH=str(Path(diffqc.__file__).parents[1]), OMP_NUM_THREADS="1")
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "diffqc.service", "watch", str(folder), str(model),
                                 "--db", str(db), "--settle", "0", "--poll", "0.05"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)

        def record(part: str) -> ResultRecord:
            for _ in range(1200):
                if db.exists():
                    with ResultStore(str(db)) as store:
                        if found := store.query(part_id=part, limit=1):
                            return found[0]
                assert proc.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.1)
            raise AssertionError(log_path.read_text()[-2000:])

        try:
            (folder / ftype / "first.png").write_bytes(data)
            first = record("first")
            bench.retrain_into(model, service_model[0], "retrained-w")
            for _ in range(300):
                if "serving the retrained model retrained-w" in log_path.read_text():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(log_path.read_text()[-2000:])
            (folder / ftype / "second.png").write_bytes(data)
            second = record("second")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    assert first.model_version != "retrained-w" and second.model_version == "retrained-w"
    assert second.decision in ("PASS", "REVIEW", "REJECT")
