"""How soon the drift watch names one camera of several that drifts, per camera and per type.

A simulation of the conformal p-values the service's drift watch receives (uniform on (0, 1)
for GOOD parts of a calibrated line): a type imaged by ``--cameras`` cameras in turn, one of
which drifts from the first part on (its p-values raised to ``--power``: squared, a shift that
moves a p of 0.25 to 0.06). For each of ``--runs`` seeds, the part of the type at which the
drifting camera's own window raises its alarm (since session 35) and at which the type's window
(all its cameras, as before) raises it, within ``--parts`` parts; then the false alarms of both
kinds over ``--calm-parts`` parts with no camera drifting. The service's defaults: window 200,
30 parts before the first test, level 1e-4 per test.

    python benchmarks/drift_cameras.py [--cameras 4] [--power 2 3] [--runs 200] [--parts 2000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics

import numpy as np

from diffqc.drift import DriftConfig, DriftMonitor


def first_alarms(seed: int, cameras: int, power: float, parts: int) -> tuple[int | None, int | None]:
    """(the drifting camera's first alarm, the type's first alarm): parts of the type seen."""
    rng = np.random.default_rng(seed)
    monitor = DriftMonitor(DriftConfig())
    camera_at = type_at = None
    for i in range(parts):
        camera = i % cameras
        u = float(rng.uniform())
        for event in monitor.observe("edge", u**power if camera == 0 else u, camera=f"cam{camera}"):
            if event.alarm and event.camera is not None and camera_at is None:
                camera_at = i + 1
            if event.alarm and event.camera is None and type_at is None:
                type_at = i + 1
        if camera_at is not None and type_at is not None:
            break
    return camera_at, type_at


def false_alarms(seed: int, cameras: int, parts: int) -> tuple[int, int]:
    """(camera windows' alarms, the type window's alarms) with no camera drifting."""
    rng = np.random.default_rng(10_000 + seed)
    monitor = DriftMonitor(DriftConfig())
    per_camera = per_type = 0
    for i in range(parts):
        for event in monitor.observe("edge", float(rng.uniform()), camera=f"cam{i % cameras}"):
            if event.alarm:
                per_camera += event.camera is not None
                per_type += event.camera is None
    return per_camera, per_type


def describe(at: list[int | None], parts: int) -> str:
    found = [a for a in at if a is not None]
    median = statistics.median([a if a is not None else parts + 1 for a in at])
    shown = f"{median:,.0f}" if median <= parts else f"> {parts:,}"
    return f"{shown} | {100 * len(found) / len(at):.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--power", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--parts", type=int, default=2000)
    ap.add_argument("--calm-runs", type=int, default=5)
    ap.add_argument("--calm-parts", type=int, default=20_000)
    args = ap.parse_args()
    print(f"# drift_cameras: {args.cameras} cameras, {args.runs} runs of at most {args.parts} parts, "
          f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print("| one camera's p-values | camera window: median parts to alarm | alarmed | "
          "type window: median parts to alarm | alarmed | camera first |")
    print("|---|---:|---:|---:|---:|---:|")
    for power in args.power:
        runs = [first_alarms(seed, args.cameras, power, args.parts) for seed in range(args.runs)]
        cam, typ = [r[0] for r in runs], [r[1] for r in runs]
        first = sum((c or args.parts + 1) < (t or args.parts + 1) for c, t in runs) / len(runs)
        cells = f"{describe(cam, args.parts)} | {describe(typ, args.parts)}"
        print(f"| p^{power:g} | {cells} | {100 * first:.1f} % |")
    calm = [false_alarms(seed, args.cameras, args.calm_parts) for seed in range(args.calm_runs)]
    total = args.calm_runs * args.calm_parts
    print(f"\nno camera drifting, {total:,} parts: {sum(c for c, _ in calm)} camera-window alarms, "
          f"{sum(t for _, t in calm)} type-window alarms")


if __name__ == "__main__":
    main()
