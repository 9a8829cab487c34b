"""The share of GOOD *parts* flagged when each part is seen as crops of several types.

The levels (``calibration.alpha_review``, ``alpha_reject``) hold per image of a type; the
service judges a part by the worst of its crops, so a GOOD part of k types is flagged up to k
times as often (README, "Parts of several types" in docs/METHOD.md). This measures it on the
synthetic set made into parts of its 8 types: ``data synth --parts N`` written under ``--work``,
then a manifest whose part ``P{i}`` is the i-th GOOD image (by file name) of every type (as many
parts as the type with the fewest GOOD images has; the others' extra GOOD images are left out)
and each defective image a part of its own (``D-{type}-{j}``), then ``diffqc evaluate`` on it
(grouped folds keep each part's images in one fold). Prints the report's ``parts``: GOOD parts
flagged and rejected, defective parts flagged, per method.

    python benchmarks/part_rates.py                      # at the defaults
    python benchmarks/part_rates.py --set calibration.alpha_review=0.00625 \
        --set calibration.alpha_reject=0.00125
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from diffqc.data import GOOD, Sample, load_dataset

MANIFEST_COLUMNS = ("path", "feature_type", "label", "mask", "part_id", "split", "defect")


def parts_manifest(dataset: Path, out: Path) -> dict[str, int]:
    """Write ``out`` (a CSV manifest) naming the parts of ``dataset`` as the module docstring
    says; return the counts of GOOD parts, defective parts and GOOD images left out."""
    good: dict[str, list[Sample]] = defaultdict(list)
    rows: list[tuple[object, ...]] = []
    defective: Counter[str] = Counter()  # per type, so far
    for s in sorted(load_dataset(dataset), key=lambda s: (s.feature_type, s.path.name)):
        if s.label == GOOD:
            good[s.feature_type].append(s)
            continue
        part = f"D-{s.feature_type}-{defective[s.feature_type]}"
        rows.append((s.path, s.feature_type, "defect", s.mask_path or "", part, s.split,
                     s.defect or "defect"))
        defective[s.feature_type] += 1
    n = min(len(v) for v in good.values())
    for t, samples in good.items():
        rows += [(s.path, t, "good", "", f"P{i:04d}", s.split, "good") for i, s in enumerate(samples[:n])]
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(MANIFEST_COLUMNS)
        w.writerows((str(path), *rest) for path, *rest in rows)
    return {"good_parts": n, "defective_parts": defective.total(),
            "good_images_left_out": sum(len(v) - n for v in good.values())}


def main(argv: list[str] | None = None) -> int:
    from diffqc.cli import main as diffqc

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-part-rates")
    ap.add_argument("--parts", type=int, default=800, help="images of the synthetic set, all types")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--methods", default="diffusion,padim")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data, manifest, report = args.work / "synth", args.work / "parts.csv", args.work / "evaluate"
    if diffqc(["data", "synth", str(data), "--parts", str(args.parts), "--seed", str(args.seed),
               "--size", str(args.size), "-q"]) != 0:
        return 1
    counts = parts_manifest(data, manifest)
    print(json.dumps(counts), flush=True)
    cmd = ["evaluate", str(manifest), "--folds", str(args.folds), "--methods", args.methods,
           "--out", str(report), "--force"]
    for kv in args.set:
        cmd += ["--set", kv]
    if diffqc(cmd) != 0:
        return 1
    parts = json.loads((report / "report.json").read_text(encoding="utf-8")).get("parts")
    print(json.dumps({"command": cmd, "parts": parts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
