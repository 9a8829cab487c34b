"""What the machine gives a process: its memory cgroup's room, read in a real cgroup."""

from __future__ import annotations

import sys

from tests.conftest import memory_cgroup


def _in_cgroup(limit: int, code: str) -> str:
    """What Python ``code`` prints, run in a real memory cgroup limited to ``limit`` bytes."""
    import subprocess

    folder = memory_cgroup(limit)
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > "{folder}/cgroup.procs" && exec "$0" -c "$1"',
                               sys.executable, code], capture_output=True, text=True, timeout=120)
    finally:
        folder.rmdir()
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_available_memory_is_bounded_by_the_containers_limit() -> None:
    """`train` refuses a fit that cannot fit in memory before it reads an image, from the memory
    available: the machine's, bounded by the container's limit. Only cgroup v2's limit at the
    file system's root was read, so in a container on a cgroup v1 host (Docker on Ubuntu 20.04,
    as many edge boxes run) or in a limited cgroup of a host the fit saw the host's memory and
    was killed for memory instead. The limit of the process's own cgroup (and its parents') is
    read in both hierarchies: here a real cgroup limited to 600 MB, the process moved into it."""
    out = _in_cgroup(600 * 2**20, "from diffqc.machine import cgroup_memory_room; "
                     "from diffqc.model import available_memory; "
                     "print(cgroup_memory_room(), available_memory('cpu'))")
    room, available = (int(x) for x in out.split())
    # Both are the limit less the cgroup's usage, read a moment apart (the usage moves by a page
    # or so between them: comparing them exactly failed once in CI); the host has gigabytes.
    assert 0 < room <= 600 * 2**20 and 0 < available <= 600 * 2**20, out
    assert abs(available - room) < 32 * 2**20, out


def test_an_environment_flag_reads_as_systemd_and_docker_read_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``DIFFQC_ORT_SPINNING=true`` left spinning off (only ``1`` counted), as
    ``DIFFQC_TRACEBACK=0`` turned tracebacks on: every diffqc flag reads 1/true/yes/on as on and
    0/false/no/off/empty/unset as off."""
    import pytest

    from diffqc.backends.ort import session_options
    from diffqc.machine import env_flag

    for value, on in [("1", True), ("true", True), (" Yes ", True), ("on", True), ("0", False),
                      ("false", False), ("no", False), ("OFF", False), ("", False)]:
        monkeypatch.setenv("DIFFQC_ORT_SPINNING", value)
        assert env_flag("DIFFQC_ORT_SPINNING") is on, value
        assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == str(int(on))
    monkeypatch.delenv("DIFFQC_ORT_SPINNING")
    assert env_flag("DIFFQC_ORT_SPINNING") is False
    monkeypatch.setenv("DIFFQC_ORT_SPINNING", "maybe")
    with pytest.raises(ValueError, match="DIFFQC_ORT_SPINNING='maybe' is not a flag: give 1 or 0"):
        env_flag("DIFFQC_ORT_SPINNING")


def test_a_containers_room_counts_the_page_cache_it_may_reclaim(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The cgroup's usage counts the files it read and wrote (the page cache), which the kernel
    frees when a process asks for memory: a container that had copied its dataset saw little
    room, and `train` refused a fit that fitted ("0.1 GB is available" of a 2 GB limit). Its
    reclaimable part (``inactive_file``, as ``docker stats`` leaves out) is room: here a real
    cgroup of 600 MB whose process wrote 300 MB to a file first."""
    out = _in_cgroup(600 * 2**20, "import os; from diffqc.machine import cgroup_memory_room\n"
                     f"with open({str(tmp_path / 'cache')!r}, 'wb') as f:\n"
                     "    for _ in range(300): f.write(b'x' * 2**20)\n"
                     "    f.flush(); os.fsync(f.fileno())\n"
                     "print(cgroup_memory_room())")
    assert int(out) > 450 * 2**20, out  # 600 MB less the interpreter's own, not the file's
