"""What the machine gives a process: its memory cgroup's room, read in a real cgroup."""

from __future__ import annotations

import sys

from tests.conftest import memory_cgroup


def test_available_memory_is_bounded_by_the_containers_limit() -> None:
    """`train` refuses a fit that cannot fit in memory before it reads an image, from the memory
    available: the machine's, bounded by the container's limit. Only cgroup v2's limit at the
    file system's root was read, so in a container on a cgroup v1 host (Docker on Ubuntu 20.04,
    as many edge boxes run) or in a limited cgroup of a host the fit saw the host's memory and
    was killed for memory instead. The limit of the process's own cgroup (and its parents') is
    read in both hierarchies: here a real cgroup limited to 600 MB, the process moved into it."""
    import subprocess

    folder = memory_cgroup(600 * 2**20)
    code = ("from diffqc.machine import cgroup_memory_room; from diffqc.model import available_memory; "
            "print(cgroup_memory_room(), available_memory('cpu'))")
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > "{folder}/cgroup.procs" && exec "$0" -c "$1"',
                               sys.executable, code], capture_output=True, text=True, timeout=120)
    finally:
        folder.rmdir()
    assert proc.returncode == 0, proc.stderr
    room, available = (int(x) for x in proc.stdout.split())
    assert 0 < available <= room <= 600 * 2**20, proc.stdout
