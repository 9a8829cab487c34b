"""What one poll of ``diffqc watch`` costs when files stay in the folder (``--keep``).

Writes ``--files`` small PNGs into ``--folders`` dated sub-folders of a temporary folder (as a
camera that files by day and keeps them) and times the watcher's scan of it (listing every folder
and stat-ing every file, as each poll does), median of ``--rounds``. No model is loaded: the
scan is what grows with the files left; what is ready is then inspected as usual. The watcher's
store is a real SQLite one, empty, in another temporary folder.

    python benchmarks/watch_scan.py [--files 20000] [--folders 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffqc.service.store import ResultStore
from diffqc.service.watch import FolderWatcher, WatchSettings


class _Types:
    classes_ = ("edge1",)


class _NoInspection:
    """The scan needs the pipeline only for the model's types; nothing is inspected here."""

    detector = _Types()
    artifacts = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--folders", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as db_dir, \
            ResultStore(str(Path(db_dir) / "results.db")) as store:
        root = Path(tmp)
        per = -(-args.files // args.folders)
        for f in range(args.folders):
            day = root / f"2026-11-{f + 1:02d}"
            day.mkdir()
            for i in range(min(per, args.files - f * per)):
                (day / f"p{i:05d}.png").write_bytes(buf.getvalue())
        pipeline: Any = _NoInspection()
        settings = WatchSettings(root, after="keep", settle_s=0.0)
        watcher = FolderWatcher(settings, pipeline, store=store)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ready = watcher.ready_files()
            times.append(time.perf_counter() - start)
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: {args.files} files in "
          f"{args.folders} folders, {len(ready)} ready; one poll's scan: median "
          f"{statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
