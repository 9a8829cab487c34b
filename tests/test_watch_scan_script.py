"""``benchmarks/watch_scan.py`` at a tiny size, run as its command is, from another folder than the
repository: it times the watcher's scan of the files written and names the repository's commit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "watch_scan.py"


def test_scan_is_timed_and_the_repositorys_commit_named(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--files", "30", "--folders", "3", "--rounds", "2"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"commit (\S+), \d{4}-\d\d-\d\d \d\d:\d\d UTC: 30 files in 3 folders, (\d+) ready; "
                         r"one poll's scan: median (\d+\.\d\d) s \((\d+\.\d\d), (\d+\.\d\d)\)", line)
    assert match, line
    # the repository's commit, not the current folder's (none here)
    kind = subprocess.run(["git", "-C", str(SCRIPT.parent), "cat-file", "-t", match[1]],
                          capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{7,40}", match[1]) and kind == "commit", match[1]
    assert int(match[2]) == 30  # every file settled at once (--settle 0)
    median, times = float(match[3]), sorted(float(t) for t in match.group(4, 5))
    assert 0 <= median < 60 and times[0] <= median <= times[1]
