"""5-fold cross-validated evaluation, diffusion vs the baselines, on the synthetic set, magnetic
tile, ELPV and MVTec bottle (issues 4 and 14): writes the full reports and prints the tables for
BENCHMARKS.md.

    OMP_NUM_THREADS=2 python benchmarks/evaluate_cv.py [--out DIR]
        [--only synthetic|magnetic_tile|elpv|mvtec_bottle] [--magnetic-tile PATH] [--bottle PATH]
        [--max-train-good N] [--folds 5] [--methods diffusion,patchcore]

The synthetic set (``diffqc.synth.write_synthetic_dataset``, 1327 parts, seed 0) is written
once into ``--cache`` and reused. Magnetic tile and MVTec bottle are read from
``../shared/datasets/{magnetic_tile,mvtec_bottle}`` (each skipped with a message when absent; the
bottle's train and test images are pooled and re-split into the folds, as every set here);
ELPV from PyPI ``elpv-dataset`` (a manifest is written into ``--elpv-cache``). Default configs;
``--set KEY=VALUE`` applies to all.
Each dataset's report lands in ``OUT/<dataset>/`` (report.html/.md/.json) together with
``benchmark.md``, the Markdown tables printed at the end, and ``state.pkl``, every out-of-fold
result, from which ``--rebuild`` re-renders the reports without refitting.

``--jitter [SEED]`` evaluates the jittered variant of each dataset instead (issue 14's
robustness setting, as ``benchmarks/quality.py --jitter`` defines it): every image, GOOD and
defective, resized to the backbone's input and shifted by up to 12 % and rotated by up to 15°,
its mask with it. The jittered copy is written once into ``--jitter-cache`` (a manifest keeping
each image's part, split and defect) and the dataset is reported as ``NAME+jitter``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffqc import evaluate as E
from diffqc import report as R
from diffqc.cli import build_config
from diffqc.config import with_overrides
from diffqc.data import GOOD, Sample, read_image, read_mask
from diffqc.errors import OutputError
from diffqc.evaluate import evaluate, load_evaluation_data, summary_lines

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TILE = REPO.parent / "shared" / "datasets" / "magnetic_tile"
DEFAULT_BOTTLE = REPO.parent / "shared" / "datasets" / "mvtec_bottle"


def synthetic_dataset(cache: Path, n_parts: int = 1327, seed: int = 0) -> Path:
    """The synthetic set in ``cache``, written there unless it already holds this one."""
    from diffqc.data import SYNTH_MARKER
    from diffqc.synth import write_synthetic_dataset

    marker = cache / SYNTH_MARKER
    if marker.is_file() and (cache / "manifest.csv").is_file():
        meta = json.loads(marker.read_text())
        if meta.get("n_parts") == n_parts and meta.get("seed") == seed:
            return cache
    print(f"writing the synthetic set ({n_parts} parts) into {cache}", file=sys.stderr)
    write_synthetic_dataset(cache, n_parts=n_parts, seed=seed, overwrite=True)
    return cache


def elpv_manifest(cache: Path) -> Path:
    """ELPV (PyPI ``elpv-dataset``) as a manifest in ``cache``: types mono/poly, GOOD = defect
    probability 0, defective = probability >= 2/3 (the selection of benchmarks/quality.py; the
    CV folds replace its fixed split). Each image is its own part; a defective image's defect
    kind is its annotated probability (``p=0.67``, ``p=1.00``), so the report breaks AUROC down by it."""
    from quality import ELPV_DEFECTIVE, elpv_labels  # benchmarks/quality.py, beside this script

    lines = ["path,feature_type,label,defect"]
    for path, p, kind in elpv_labels():
        if p == 0.0 or p >= ELPV_DEFECTIVE:
            lines.append(f"{path},{kind},{'good,good' if p == 0.0 else f'defect,p={p:.2f}'}")
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "manifest.csv"
    out.write_text("\n".join(lines) + "\n")
    return cache


JITTER_MARKER = ".diffqc-jitter.json"


def jittered_copy(samples: Sequence[Sample], dest: Path, seed: int, size: int) -> Path:
    """Write every sample resized to ``size`` x ``size`` and moved by ``quality.jitter_transform(i,
    seed)`` (``i``: its position in ``samples``) into ``dest``, with its mask and a manifest that
    keeps its type, label, part, split and defect; return ``dest``. A folder this function wrote
    for the same samples (paths and every field above), seed and size is reused, one it wrote for
    others is rewritten; any other non-empty folder is refused, never overwritten."""
    import torch
    from PIL import Image
    from quality import apply_jitter, jitter_transform  # benchmarks/quality.py, beside this script

    from diffqc.backbone import to_pixels

    listing = "\n".join(f"{s.path}|{s.feature_type}|{s.label}|{s.mask_path}|{s.group}|{s.split}|{s.defect}"
                         for s in samples)  # a changed label, mask or kind means a new copy
    meta = {"seed": seed, "size": size, "n": len(samples),
            "samples": hashlib.sha256(listing.encode()).hexdigest()}
    marker = dest / JITTER_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == meta and (dest / "manifest.csv").is_file():
        return dest
    if dest.exists() and any(dest.iterdir()) and not marker.is_file():
        raise OutputError(f"{dest} is not empty and was not written by --jitter: "
                          "choose another --jitter-cache")
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "masks").mkdir(exist_ok=True)
    lines = ["path,feature_type,label,mask,part_id,split,defect"]
    for i, s in enumerate(samples):
        theta = jitter_transform(i, seed)
        pixels = apply_jitter(to_pixels([read_image(s.path)], size)[0], theta, "bilinear")
        image = (pixels.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype("uint8")
        Image.fromarray(image).save(dest / "images" / f"{i:05d}.png")
        mask = ""
        if s.mask_path is not None:
            m = torch.from_numpy(read_mask(s.mask_path, (size, size)).astype("float32"))[None]
            moved = apply_jitter(m, theta, "nearest")[0].numpy() > 0.5
            Image.fromarray((moved * 255).astype("uint8")).save(dest / "masks" / f"{i:05d}.png")
            mask = f"masks/{i:05d}.png"
        label = "good" if s.label == GOOD else "defect"
        fields = [f"images/{i:05d}.png", s.feature_type, label, mask, s.group, s.split, s.defect or ""]
        if any("," in f or '"' in f for f in fields):
            raise OutputError(f"{s.path}: a comma or quote in its fields cannot go into the manifest")
        lines.append(",".join(fields))
    (dest / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    marker.write_text(json.dumps(meta))
    return dest


def _n(x: Any, kind: str = "num") -> str:
    return R.fmt(x if not isinstance(x, float) or math.isfinite(x) else None, kind)


def markdown_tables(report: Mapping[str, Any]) -> str:
    """Per-type metrics (pooled, [95% CI], folds mean ± sd; pixel AUROC and AUPRO where a type
    has defect masks) and the comparisons."""
    alpha = _n(report["decision_rule"]["alpha_review"], "num")
    pixels = R.has_pixel_metrics(report)
    head = ("| type | GOOD / def | method | AUROC pooled [95% CI] | AUROC folds mean ± sd | AUPR | "
            f"F1-max | TPR @ 5% FPR | {'pixel AUROC | AUPRO (0.3) | ' if pixels else ''}"
            f"FPR not-PASS (α={alpha}) | recall not-PASS | REVIEW / REJECT share |")
    lines = [head, "|" + "---|" * (13 if pixels else 11)]

    def row(ftype: str, name: str, r: Mapping[str, Any]) -> None:
        p, s, ci = r["pooled"], r["summary"]["auroc"], r["auroc_ci"]
        flag = " (unreliable)" if r["unreliable"] else ""
        pixel = f"{_n(p.get('pixel_auroc'))} | {_n(p.get('aupro'))} | " if pixels else ""
        lines.append(
            f"| {ftype}{flag} | {r['n_good']} / {r['n_defective']} | {name} | "
            f"{_n(p['auroc'])} [{_n(ci[0])}, {_n(ci[1])}] | {_n(s['mean'])} ± {_n(s['sd'])} | "
            f"{_n(p['aupr'])} | {_n(p['f1_max'])} | {_n(p['tpr_at_5fpr'])} | {pixel}"
            f"{_n(p['fpr_flagged'], 'pct')} | {_n(p['recall_flagged'], 'pct')} | "
            f"{_n(p['share_review'], 'pct')} / {_n(p['share_reject'], 'pct')} |")

    for ftype, per in report["results"].items():
        for name, r in per.items():
            row(ftype, name, r)
    for name, r in (report.get("overall") or {}).items():
        row(f"**{R.OVERALL}**", name, r)
    out = "\n".join(lines)
    if report["comparisons"]:
        comp = ["| type | A vs B | Δ AUROC (pooled) | DeLong p | DeLong p (Holm) | "
                "mean Δ AUROC over folds | NB p | NB p (Holm) | effect d_z |", "|" + "---|" * 9]
        for c in report["comparisons"]:
            comp.append(
                f"| {c['feature_type']} | {c['method_a']} vs {c['method_b']} | "
                f"{_n(c['delta'], 'signed')} | {_n(c['delong_p'], 'p')} | "
                f"{_n(c['delong_p_holm'], 'p')} | {_n(c['mean_diff'], 'signed')} | "
                f"{_n(c['nb_p'], 'p')} | {_n(c['nb_p_holm'], 'p')} | {_n(c['effect_size'])} |")
        out += "\n\n" + "\n".join(comp)
    if report.get("unknown_type"):
        out += "\n\n" + unknown_type_table(report["unknown_type"])
    return out


def unknown_type_table(summary: Mapping[str, Any]) -> str:
    """Type withheld (``--unknown-type``): per method the share of images routed to their true
    type and the mean image AUROC over types with the type withheld and given."""
    lines = ["| method | type accuracy (GOOD / defective) | mean AUROC, type withheld | "
             "mean AUROC, type given | worst type: withheld − given |", "|" + "---|" * 5]
    for name, u in summary.items():
        gaps = [(r["auroc_type_withheld"] - r["auroc_type_given"], t) for t, r in u["per_type"].items()
                if "auroc_type_withheld" in r]
        worst = f"{_n(min(gaps)[0], 'signed')} ({min(gaps)[1]})" if gaps else "–"
        lines.append(f"| {name} | {_n(u['type_accuracy'], 'pct')} ({_n(u['type_accuracy_good'], 'pct')} / "
                     f"{_n(u['type_accuracy_defective'], 'pct')}) | {_n(u['mean_auroc_type_withheld'])} | "
                     f"{_n(u['mean_auroc_type_given'])} | {worst} |")
    return "\n".join(lines)


def _keeping_state(path: Path) -> Any:
    """Wrap the report builder so that its inputs (all out-of-fold results) are pickled to
    ``path`` first: ``--rebuild`` then re-renders the report without refitting anything."""
    build = E._build_report

    def wrapper(**kwargs: Any) -> Any:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            pickle.dump(kwargs, fh)
        return build(**kwargs)

    return wrapper


def rebuild(name: str, out: Path) -> dict[str, Any]:
    """Re-render ``OUT/<name>`` from its pickled state with the current report code."""
    state = out / name / "state.pkl"
    with state.open("rb") as fh:
        kwargs = pickle.load(fh)  # written by this script, trusted
    old = json.loads((out / name / "report.json").read_text())
    report = E._build_report(**kwargs)
    extra: dict[str, Any] = dict(report)
    extra["run"] = old.get("run", {})
    R.write_report(extra, out / name)
    tables = markdown_tables(report)
    (out / name / "benchmark.md").write_text(tables + "\n", encoding="utf-8")
    print("\n".join(summary_lines(report)))
    return {"name": name, "seconds": float(extra["run"].get("seconds", {}).get("total", 0.0)),
            "tables": tables}


def run_one(name: str, data: Path, out: Path, args: argparse.Namespace,
            max_train_good: int | None) -> dict[str, Any]:
    if args.jitter is not None:
        name += "+jitter"
    if args.rebuild:
        return rebuild(name, out)
    base = build_config(argparse.Namespace(set=args.set))
    if args.jitter is not None:
        original, _ = load_evaluation_data(data)
        size = base.backbone.input_size
        data = jittered_copy(original, args.jitter_cache / f"{name}-seed{args.jitter}-{size}",
                             args.jitter, size)
    samples, source = load_evaluation_data(data)
    start = time.perf_counter()
    E._build_report = _keeping_state(out / name / "state.pkl")
    methods = args.methods.split(",")
    settings = {}
    for text in args.compare_setting or []:  # as `diffqc evaluate --compare-setting`
        label, over = E.parse_setting(text)
        settings[label] = with_overrides(replace(base, method=methods[0]), over)
    report = evaluate(
        samples, folds=args.folds, methods=methods, settings=settings, base_config=base,
        seed=args.seed, progress=not args.quiet, out_dir=out / name, gallery=args.gallery,
        max_train_good=max_train_good, dataset_name=name, dataset_source=source,
        feature_cache=args.feature_cache, unknown_type=args.unknown_type)
    seconds = time.perf_counter() - start
    tables = markdown_tables(report)
    (out / name / "benchmark.md").write_text(tables + "\n", encoding="utf-8")
    print("\n".join(summary_lines(report)))
    print(f"\n{name}: {seconds / 60:.1f} min; report in {out / name}\n")
    return {"name": name, "seconds": seconds, "tables": tables}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffqc-evaluate-cv")
    p.add_argument("--cache", type=Path,
                   default=Path.home() / ".cache" / "diffqc" / "synthetic-1327-seed0")
    p.add_argument("--synthetic-parts", type=int, default=1327, help=argparse.SUPPRESS)
    p.add_argument("--feature-cache", type=Path,
                   default=Path.home() / ".cache" / "diffqc" / "evaluate-features",
                   help="raw backbone features kept between runs")
    p.add_argument("--magnetic-tile", type=Path, default=DEFAULT_TILE)
    p.add_argument("--bottle", type=Path, default=DEFAULT_BOTTLE, help="MVTec AD bottle folder")
    p.add_argument("--only", choices=["synthetic", "magnetic_tile", "elpv", "mvtec_bottle"],
                   default=None)
    p.add_argument("--elpv-cache", type=Path, default=Path.home() / ".cache" / "diffqc" / "elpv")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--methods", default="diffusion,patchcore")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gallery", type=int, default=8)
    p.add_argument("--max-train-good", type=int, default=None,
                   help="cap GOOD training images per type and fold on magnetic tile")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--compare-setting", action="append", metavar="NAME:KEY=VALUE,...",
                   help="an extra variant of the first method, as in diffqc evaluate")
    p.add_argument("--rebuild", action="store_true",
                   help="re-render the reports in --out from their state.pkl (no refitting)")
    p.add_argument("--jitter", type=int, nargs="?", const=0, default=None, metavar="SEED",
                   help="evaluate the jittered variant (shift <= 12 %%, rotation <= 15 deg, seeded)")
    p.add_argument("--jitter-cache", type=Path,
                   default=Path.home() / ".cache" / "diffqc" / "jittered",
                   help="where the jittered copies are written once and reused")
    p.add_argument("--unknown-type", action="store_true",
                   help="also score every held-out image with its type withheld (the type router picks it)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    print(f"{dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
          f"({platform.processor() or platform.machine()})", file=sys.stderr)
    if args.only in (None, "synthetic"):
        data = synthetic_dataset(args.cache, n_parts=args.synthetic_parts)
        runs.append(run_one("synthetic", data, args.out, args, None))
    if args.only in (None, "magnetic_tile"):
        if args.magnetic_tile.is_dir():
            runs.append(run_one("magnetic_tile", args.magnetic_tile, args.out, args,
                                args.max_train_good))
        else:
            print(f"magnetic tile not found at {args.magnetic_tile}: skipped", file=sys.stderr)
    if args.only in (None, "elpv"):
        runs.append(run_one("elpv", elpv_manifest(args.elpv_cache), args.out, args, None))
    if args.only in (None, "mvtec_bottle"):
        if args.bottle.is_dir():
            runs.append(run_one("mvtec_bottle", args.bottle, args.out, args, None))
        else:
            print(f"MVTec bottle not found at {args.bottle}: skipped", file=sys.stderr)
    for r in runs:
        print(f"## {r['name']} ({r['seconds'] / 60:.1f} min)\n\n{r['tables']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
