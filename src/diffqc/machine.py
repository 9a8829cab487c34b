"""What the machine a process runs on gives it: the room its memory cgroup (a container's limit)
leaves, and the flags its environment sets. Imports nothing of diffqc but its errors, so that the
training side and the service both read it."""

from __future__ import annotations

import os
from pathlib import Path

from diffqc.errors import ConfigError

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_flag(name: str) -> bool:
    """The flag ``$name``: 1, true, yes or on is on; 0, false, no, off, empty or unset is off (as
    systemd and Docker read one); anything else is a :class:`ConfigError`."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON or value in _OFF:
        return value in _ON
    raise ConfigError(f"{name}={os.environ[name]!r} is not a flag: give 1 or 0 (true or false)")


def _stat(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup's ``memory.stat`` (0 where it cannot be read)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_memory_room() -> int | None:
    """Bytes this process's memory cgroup may still take (its limit less its usage, the
    tightest of its own and its parents'), in cgroup v2 or v1's memory controller; None without
    a limit. The usage counts the page cache of the files read and written, whose inactive part
    the kernel frees on demand: it is not counted (``inactive_file``, as ``docker stats`` leaves
    it out). A container with a cgroup namespace sees its own cgroup as the root; one without
    (Docker on a v1 host) has its own mounted there: the root is read last."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    room: int | None = None
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            folder, files, cache = root, ("memory.max", "memory.current"), "inactive_file"
        elif "memory" in controllers.split(","):
            folder, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
            cache = "total_inactive_file"  # the hierarchy's, as its usage is
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for depth in range(len(parts), -1, -1):
            here = folder.joinpath(*parts[:depth])
            try:
                limit_text = (here / files[0]).read_text().strip()
                used = int((here / files[1]).read_text())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
                continue  # no limit here (v1 writes "none" as a huge number)
            left = max(0, int(limit_text) - used + _stat(here / "memory.stat", cache))
            room = left if room is None else min(room, left)
    return room
