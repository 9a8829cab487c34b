"""What writing heat maps costs the service's inference worker, by image size.

The service (``serve``, ``watch``) renders each part's heat-map picture (the image beside its
overlay, diffqc.visualize.panel) and writes it as PNG on its one inference worker, before the
part's record is stored: its time is every part's. This drives the real
:class:`~diffqc.service.buffer.InspectionPipeline` (a real bundle, SQLite store, artifact folder)
with parts of each ``--sizes``: without heat maps, and with one for every part drawn with the
image fitted within each ``--heatmap-sizes`` (0: the image's own size, as before session 23),
and with ``--shedding`` a row whose buffer sheds heat maps while more than half full,
interleaved in ``--rounds`` rounds so that all see the same machine, and prints the worker's
parts per second (median over rounds) and the heat-map files' mean size. ``--keep-images all``
keeps each part's image too; ``--without-fsync`` adds each row again with the files not
flushed to the disk before their records are committed (as before session 51: ``os.fsync`` a
no-op for that run), to price the flush.

    python benchmarks/heatmap_cost.py MODEL [--sizes 256x256,1024x1280] [--heatmap-sizes 1024,0]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth picture of the size asked (a random field blurred by upsampling), not noise:
    PNG compresses it as it would a part."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.uniform(0, 255, (16, 16, 3))).astype(np.uint8)
    big = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255.0


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """``os.fsync`` a no-op while in it (the artifact files and folders; SQLite syncs by itself)."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def run_once(detector: Any, size: tuple[int, int], heatmaps: str, heatmap_size: int,
             parts: int, *, shedding: bool = False, keep_images: str = "none",
             fsync: bool = True) -> dict[str, float]:
    """Parts per second of one pipeline over ``parts`` parts of ``size``, all submitted at once;
    mean heat-map bytes and the share of heat maps shed. The buffer holds ``2 * parts + 1``, so
    that it is never more than half full and every heat map is drawn; with ``shedding`` it holds
    ``parts``, and the worker skips heat maps while more than half of it waits."""
    from diffqc.service.buffer import InspectionPipeline, Job
    from diffqc.service.store import ArtifactStore, ResultStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(f"sqlite:///{tmp}/r.db")
        artifacts = ArtifactStore(tmp)
        pipe = InspectionPipeline(detector, store, artifacts, max_bytes=None,
                                  capacity=parts if shedding else 2 * parts + 1,
                                  max_batch=8, heatmaps=heatmaps, heatmap_size=heatmap_size,
                                  keep_images=keep_images)
        images = [_image(*size, seed=i) for i in range(parts)]
        types = detector.classes_
        pipe.start()
        try:
            with contextlib.nullcontext() if fsync else no_fsync():
                start = time.perf_counter()
                futures = pipe.submit_many([Job(image=im, feature_type=types[i % len(types)])
                                            for i, im in enumerate(images)])
                records = [f.result(timeout=600) for f in futures]
                seconds = time.perf_counter() - start
        finally:
            pipe.stop()
            store.close()
        files = [p.stat().st_size for p in (Path(tmp) / "heatmaps").glob("*.png")]
        assert all(r.decision in ("PASS", "REVIEW", "REJECT") for r in records)
        kb = sum(files) / len(files) / 1024 if files else 0.0
        return {"parts_per_s": parts / seconds, "heatmap_kb": kb, "shed": pipe.heatmaps_shed_total / parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--sizes", default="256x256,1024x1280", help="HxW,HxW,...")
    ap.add_argument("--heatmap-sizes", default="1024,0", help="the image's longer side, px")
    ap.add_argument("--parts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shedding", action="store_true",
                    help="a row with a buffer of --parts: heat maps shed while it is over half full")
    ap.add_argument("--keep-images", default="none", choices=["none", "flagged", "all"])
    ap.add_argument("--without-fsync", action="store_true",
                    help="each row again with os.fsync a no-op (the files not flushed, as before)")
    args = ap.parse_args()

    import torch

    from diffqc.model import Detector

    torch.set_num_threads(args.threads)
    detector = Detector.load(args.model, device="cpu")
    sizes = [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.sizes.split(",")]
    pxs = [int(px) for px in args.heatmap_sizes.split(",")]
    settings = [("none", 0, False)] + [("all", px, False) for px in pxs]
    settings += [("all", pxs[0], True)] if args.shedding else []
    syncs = (True, False) if args.without_fsync else (True,)
    runs: dict[tuple[tuple[int, int], str, int, bool, bool], list[dict[str, float]]] = {}
    run_once(detector, (256, 256), "all", 0, 8)  # warm-up: first-call costs out of the way
    for _ in range(args.rounds):
        for size in sizes:
            for heatmaps, px, shedding in settings:
                for fsync in syncs:
                    runs.setdefault((size, heatmaps, px, shedding, fsync), []).append(
                        run_once(detector, size, heatmaps, px, args.parts, shedding=shedding,
                                 keep_images=args.keep_images, fsync=fsync))
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short",
                             "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.threads} threads, "
          f"{args.parts} parts x {args.rounds} rounds, --keep-images {args.keep_images}")
    print("| image (H x W) | heat maps | parts/s (median; rounds) | heat-map file | shed |")
    print("|---|---|---|---|---|")
    for (size, heatmaps, px, shedding, fsync), rs in runs.items():
        rates = [r["parts_per_s"] for r in rs]
        kb = statistics.mean(r["heatmap_kb"] for r in rs)
        what = "none" if heatmaps == "none" else f"every part, image within {px or 'its own size'}"
        what += ", buffer of --parts (shedding)" if shedding else ""
        what += "" if fsync else ", files not flushed (before)"
        shed = statistics.mean(r["shed"] for r in rs)
        print(f"| {size[0]} x {size[1]} | {what} | {statistics.median(rates):.1f} "
              f"({', '.join(f'{x:.1f}' for x in rates)}) | {kb:.0f} KB | {shed:.0%} |")


if __name__ == "__main__":
    main()
