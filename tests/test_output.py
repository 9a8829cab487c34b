"""diffqc.output: one way to write a file whole or not at all, and a temporary folder whose lack
of room is named."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from diffqc.errors import OutputError
from diffqc.output import check_output_file, json_line, scratch_folder, write_atomic

from .conftest import full_disk


def test_write_atomic_on_a_full_disk_names_the_file_and_keeps_its_content(tmp_path: Path) -> None:
    target = tmp_path / "calibration.json"
    target.write_bytes(b"the previous content")
    with full_disk(4096), pytest.raises(OutputError, match=f"cannot write {target}: File too large"):
        write_atomic(target, b"x" * 10_000)
    assert target.read_bytes() == b"the previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temporary sibling left
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_scratch_folder_names_the_temporary_folder_when_it_has_no_room(tmp_path: Path) -> None:
    """A small /tmp on an edge device: a bare "No space left on device" would not say where."""
    with full_disk(4096), pytest.raises(OutputError) as err, \
            scratch_folder("diffqc-test-", what="the test's graph") as folder:
        (folder / "graph.onnx").write_bytes(b"x" * 10_000)
    assert f"no room for the test's graph in the temporary folder {tempfile.gettempdir()}" in str(err.value)
    assert "TMPDIR" in str(err.value)
    assert not folder.exists()  # removed all the same
    with pytest.raises(FileNotFoundError), scratch_folder("diffqc-test-", what="x") as folder:
        (folder / "missing").read_bytes()  # any other error is left as it is


def test_json_line_is_strict_json() -> None:
    """What a command prints parses everywhere (jq, JavaScript): a value that is not a finite
    number (an unreachable threshold, a score that could not be computed) is null."""
    import json

    row = {"score": float("nan"), "thresholds": {"a": {"reject": float("inf")}}, "n": [1.5, -float("inf")],
           "ok": 2.0}
    line = json_line(row)
    assert "\n" not in line and "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"score": None, "thresholds": {"a": {"reject": None}}, "n": [1.5, None],
                                "ok": 2.0}


def test_path_text_writes_undecodable_bytes_of_a_file_name_as_escapes() -> None:
    """A Latin-1 name reaches Python with surrogate escapes; as text it gets ``\\xNN`` for the bytes
    that are not UTF-8, and other text is left as it is."""
    import os

    from diffqc.output import path_text

    assert path_text(Path(os.fsdecode(b"cam/caf\xe9.png"))) == "cam/caf\\xe9.png"
    assert path_text("cam/café.png") == "cam/café.png"
    assert path_text("x\ud800") == "x\\ud800"  # a surrogate no file name gives: escaped too


def test_a_device_or_a_pipe_is_taken_as_an_output_without_being_read(tmp_path: Path) -> None:
    """``--csv /dev/full`` (or ``/dev/zero``) read zeros until memory ran out, and a named pipe
    blocked, in the check whether the file was an earlier output: a device or a pipe is written to
    as it is, never read or replaced (``--force`` not needed); a disk device is refused."""
    import os

    def never(path: Path) -> bool:
        raise AssertionError(f"{path} was read")

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (Path("/dev/null"), Path("/dev/zero"), fifo):
        check_output_file(path, option="--csv", is_ours=never, what="table", force=False)
    disk = next((p for p in Path("/dev").iterdir() if p.is_block_device()), None)
    if disk is not None:  # none in some containers
        with pytest.raises(OutputError, match=f"--csv {disk} is a disk device"):
            check_output_file(disk, option="--csv", is_ours=never, what="table")


def test_write_atomic_writes_into_a_pipe_or_device_as_it_is(tmp_path: Path) -> None:
    """A pipe (or ``/dev/stdout`` in a pipeline) is written into, not replaced by a renamed
    temporary file (as root, that rename replaced ``/dev/stdout`` itself); ``/dev/full`` is the
    full-disk error, naming it."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, b"a report\n")
    reader.join(10)
    assert got == [b"a report\n"]
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"] and fifo.is_fifo()
    write_atomic(Path("/dev/null"), b"nothing")
    with pytest.raises(OutputError, match="cannot write /dev/full: No space left on device"):
        write_atomic(Path("/dev/full"), b"x")


def test_an_outputs_folder_is_made_and_a_file_in_its_way_named(tmp_path: Path) -> None:
    """``--json reports/2026-12/run.json``: the folders are made before the work; a file where a
    folder should be is named ("File exists" said nothing of which)."""
    def never(path: Path) -> bool:
        raise AssertionError(f"{path} was read")

    check_output_file(tmp_path / "reports" / "2026-12" / "run.json", option="--json", is_ours=never,
                      what="report")
    made = tmp_path / "reports" / "2026-12"
    assert made.is_dir() and not (made / "run.json").exists()
    (tmp_path / "notes.txt").write_text("mine")
    for target in (tmp_path / "notes.txt" / "run.json", tmp_path / "notes.txt" / "sub" / "run.json"):
        with pytest.raises(OutputError, match=f"cannot write {target}: {tmp_path / 'notes.txt'} is a file, "
                                              "not a folder"):
            check_output_file(target, option="--json", is_ours=never, what="report")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_move_across_file_systems_copies_and_leaves_the_file_where_it_cannot_be_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``move_file`` across file systems (a rename fails with EXDEV): the file is copied in and
    removed from where it was; where it may not be removed (a read-only share), the copy is
    removed again, the file stays, and the refusal is raised. A taken name is never replaced."""
    import errno
    import os

    from diffqc.output import move_file

    share, dest = tmp_path / "share", tmp_path / "processed"
    share.mkdir()
    dest.mkdir()
    (share / "a.png").write_bytes(b"frame a")
    (dest / "a.png").write_bytes(b"an earlier frame")
    rename, unlink = os.rename, os.unlink

    def across(src: object, dst: object) -> None:
        if Path(str(src)).parent == share:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", across)
    monkeypatch.setattr(os, "unlink", lambda p: (_ for _ in ()).throw(  # a read-only share
        OSError(errno.EROFS, "Read-only file system", str(p))) if Path(str(p)).parent == share else unlink(p))
    with pytest.raises(OSError, match="Read-only file system"):
        move_file(share / "a.png", dest / "a.png", "7")
    assert (share / "a.png").read_bytes() == b"frame a"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {"a.png": b"an earlier frame"}
    monkeypatch.setattr(os, "unlink", unlink)
    assert move_file(share / "a.png", dest / "a.png", "7") == dest / "a-7.png"
    assert not (share / "a.png").exists()
    now = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert now == {"a.png": b"an earlier frame", "a-7.png": b"frame a"}
