"""The pure helpers of ``benchmarks/latency.py``: its override options, the unknown/known ratio and
the table it prints (no model, no timing asserted; the benchmark itself is run by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffqc.errors import ConfigError

from .conftest import load_benchmark

lat = load_benchmark("latency")


def test_variant_is_parsed_with_the_set_value_rules() -> None:
    name, over = lat.parse_variant("q1:scoring.quadrature_nodes=1,train.steps=0,method=diffusion")
    assert name == "q1"
    assert over == {"scoring.quadrature_nodes": 1, "train.steps": 0, "method": "diffusion"}
    # a list keeps its commas
    assert lat.parse_variant("m:backbone.layers=[\"a\",\"b\"]")[1] == {"backbone.layers": ["a", "b"]}


@pytest.mark.parametrize("text, words", [
    ("gauss", "NAME:KEY=VALUE"),
    ("gauss:", "NAME:KEY=VALUE"),
    ("diffusion:train.steps=0", "taken"),
    ("padim:train.steps=0", "taken"),
    ("a/b:train.steps=0", "folder"),
    ("g:train.steps", "KEY=VALUE"),
])
def test_bad_variant_is_refused_with_its_reason(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        lat.parse_variant(text)


def test_variant_name_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        lat.parse_variants(["g:train.steps=0", "g:train.steps=1"])


def test_unknown_config_key_fails_before_any_work(tmp_path: Path) -> None:
    """``main`` checks every override before training: a misspelt key is a usage error (were it
    not checked, the missing --data would fail with another error, before any training)."""
    missing = ["--data", str(tmp_path / "no-data"), "--work", str(tmp_path)]
    for option in (["--variant", "g:scoring.quadrature_node=1"], ["--diffusion-set", "train.stepz=0"]):
        with pytest.raises(SystemExit) as exc:
            lat.main([*option, *missing])
        assert exc.value.code == 2
    assert lat.default_config(0, {"scoring.quadrature_nodes": 1}).scoring.quadrature_nodes == 1


def _raw(method: str, runtime: str, known: list[float], unknown: list[float] | None) -> dict[str, Any]:
    times = {s: [1.0, 2.0] for s in lat.STAGES} | {"end_to_end": known}
    if unknown is not None:
        times["end_to_end_unknown"] = unknown
    return {"method": method, "runtime": runtime, "times_ms": times, "parts": 4, "batched_s": 0.5,
            "peak_rss_mb": 100.0, "torch_imported": runtime.startswith("torch")}


def test_summary_gives_the_unknown_over_known_ratio_and_the_table_labels_it() -> None:
    rows = [lat.summarise([_raw("diffusion", "onnx-fp32", [10.0] * 5, [25.0] * 5)]),
            lat.summarise([_raw("padim", "onnx-fp32", [8.0] * 5, None)])]
    assert rows[0]["p50_unknown_ms"] == 25.0 and rows[0]["unknown_over_known_p50"] == 2.5
    assert rows[1]["p50_unknown_ms"] is None and rows[1]["unknown_over_known_p50"] is None
    for r in rows:
        r["floor_ms"] = 1.0
    text = lat.table(rows, {("padim", "openvino-fp32"): "BundleError: no model"}, 2, 8)
    header = text.splitlines()[1]
    assert "known p50" in header and "unknown p50" in header and "unknown/known p50" in header
    assert "| diffusion | onnx-fp32 | 10.0 | 10.0 | 25.0 | 25.0 | 2.50 |" in text
    assert "| padim | onnx-fp32 | 8.0 | 8.0 | - | - | - |" in text
    assert "| padim | openvino-fp32 | FAILED: BundleError: no model |" in text
    verdict = lat.verdicts(rows, 8)
    assert "2.50× known (target ≤ 2: NOT met)" in verdict[0]
    assert verdict[1] == ("padim fastest exported runtime: onnx-fp32 p50 8.0 ms: diffusion NOT faster "
                          "(diffusion takes 1.25× its time)")


def test_targets_are_judged_on_runtimes_that_passed_parity() -> None:
    """A faster runtime refused by its export's parity gate is marked and named, never the one
    the targets are judged on."""
    rows = [lat.summarise([_raw("diffusion", "onnx-fp32", [20.0] * 5, [21.0] * 5)]),
            lat.summarise([_raw("diffusion", "onnx-int8", [12.0] * 5, [12.0] * 5)])]
    rows[1]["offered"] = False
    for r in rows:
        r["floor_ms"] = 1.0
    assert "| diffusion | onnx-int8 (refused at export) | 12.0 |" in lat.table(rows, {}, 2, 8)
    verdict = lat.verdicts(rows, 8)
    assert verdict[0].startswith("best CPU runtime that passed parity (diffusion, type known): onnx-fp32: "
                                 "p50 20.0 ms (target ≤ 15: NOT met)")
    assert verdict[1] == "faster but refused by their parity gate (not offered): onnx-int8 12.0 ms"


def test_plan_times_int8_and_unknown_for_diffusion_models_only() -> None:
    bundles = [lat.Bundle("diffusion", Path("d"), True), lat.Bundle("gauss", Path("g"), True),
               lat.Bundle("padim", Path("p"), False)]
    keys = lat.plan(bundles)
    assert ("gauss", "openvino-int8") in keys and ("padim", "openvino-fp32") in keys
    assert ("padim", "onnx-int8") not in keys
    assert len(keys) == 2 * len(lat.DIFFUSION_RUNTIMES) + len(lat.BASELINE_RUNTIMES)
