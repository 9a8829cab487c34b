"""diffqc.output: one way to write a file whole or not at all, and a temporary folder whose lack
of room is named."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from diffqc.errors import OutputError
from diffqc.output import json_line, scratch_folder, write_atomic

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
