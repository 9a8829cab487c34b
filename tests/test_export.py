"""ONNX export, the ONNX Runtime detector, INT8 with its parity report, a bring-your-own ONNX
backbone, and the TensorRT engine (GPU only)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from diffqc import export as ex
from diffqc.backbone import sha256_file, to_pixels
from diffqc.backends import graph as graph_module
from diffqc.backends.ort import OnnxGraph
from diffqc.cli import main
from diffqc.data import GOOD, load_dataset, read_images
from diffqc.errors import BackboneError, BundleError, ExportError, OutputError, UnknownFeatureTypeError
from diffqc.metrics import image_auroc
from diffqc.model import Detector
from diffqc.recalibrate import CalibrationReloader
from diffqc.runtime import (
    OnnxDetector,
    add_runtime_arguments,
    choose_runtime,
    load_detector,
    preprocess,
    read_export_info,
    resize_map,
    runtime_from_args,
)

from .conftest import tiny_config


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(tiny_model: Path, clear_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny bundle with its FP32 ONNX export."""
    bundle = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(tiny_model, bundle)
    ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=8, log=_quiet)
    return bundle


@pytest.fixture(scope="module")
def test_images(clear_dataset: Path) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"][::4]
    images, samples, _ = read_images(samples)
    return images, [s.feature_type for s in samples], np.array([s.label != GOOD for s in samples])


def test_preprocessing_and_map_resize_match_torch() -> None:
    rng = np.random.default_rng(0)
    for shape in ((80, 50, 3), (64, 64, 3), (40, 70, 3)):
        img = rng.random(shape, dtype=np.float32)
        assert np.abs(preprocess([img], 64) - to_pixels([img], 64).numpy()).max() < 1e-5
        img8 = (img * 255).astype(np.uint8)  # an array from cv2 or Pillow: read as its file would be
        assert np.abs(preprocess([img8], 64) - preprocess([img8 / np.float32(255)], 64)).max() < 1e-6
    m = rng.random((64, 64), dtype=np.float32)
    for h, w in ((80, 50), (30, 100), (64, 64)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(h, w), mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        assert np.abs(resize_map(m, h, w) - ref).max() < 1e-5


def test_onnx_graph_equals_pytorch(exported: Path, test_images: tuple,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    info = read_export_info(exported)
    check = info["fp32"]["parity_vs_torch"]
    assert check["passed"] and check["decisions_equal"] == check["images"]
    assert check["max_rel_score_error"] <= ex.RTOL and check["max_rel_map_error"] <= ex.RTOL
    import onnx

    model = onnx.load(str(exported / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["pixels", "type_idx"]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["diffqc.classes"]) == info["classes"]
    # independently: maps and scores of every image under every type, at two batch sizes
    det = Detector.load(exported, device="cpu")
    before = set(Path(tempfile.gettempdir()).glob("diffqc-graph-*"))
    monkeypatch.setattr(graph_module, "EXTERNAL_THRESHOLD", 1 << 19)
    graph, module = OnnxGraph(model, threads=1), ex.InferenceGraph(det)
    # its large constants are memory-mapped from a temporary file, removed once mapped; the
    # caller's model keeps its own constants (the tiny model's largest, its 8-bit eigenbases,
    # is 0.9 MB: the bar of 1 MiB lowered here so that it is one)
    assert set(Path(tempfile.gettempdir()).glob("diffqc-graph-*")) == before
    assert max(len(t.raw_data) for t in model.graph.initializer) > graph_module.EXTERNAL_THRESHOLD
    assert not any(t.external_data for t in model.graph.initializer)
    # the Gaussians' tables stay at the bundle's storage precision in the graph (the parity
    # below holds because their values are exact in it): the eigenbases, location-major, are
    # int8 (the default storage) and hold the bundle's bytes, not four times them
    assert det.config.diffusion.prior_storage == "int8"
    vecs = det.scorer_.denoiser_.prior_vecs[: len(det.classes_)].transpose(0, 1)
    held = [t for t in model.graph.initializer if tuple(t.dims) == tuple(vecs.shape)]
    assert [t.data_type for t in held] == [onnx.TensorProto.INT8]
    assert len(held[0].raw_data) == vecs.numel()
    images = test_images[0][:3]
    n_types = len(det.classes_)
    pixels = np.repeat(preprocess(images, 64), n_types, axis=0)
    idx = np.tile(np.arange(n_types), len(images))
    with torch.inference_mode():
        ref_maps, ref_scores = (t.numpy() for t in module(torch.from_numpy(pixels), torch.from_numpy(idx)))
    maps, scores = graph.run(pixels, idx)
    assert maps.shape == ref_maps.shape == (len(idx), 64, 64)
    np.testing.assert_allclose(scores, ref_scores, rtol=ex.RTOL, atol=ex.RTOL * np.abs(ref_scores).max())
    np.testing.assert_allclose(maps, ref_maps, atol=ex.RTOL * np.abs(ref_maps).max())
    _, one_score = graph.run(pixels[:1], idx[:1])
    np.testing.assert_allclose(one_score, ref_scores[:1], rtol=ex.RTOL)


def test_the_exported_graph_holds_no_empty_tensor(exported: Path) -> None:
    """At the default rank every channel is in the full covariance, so the diagonal channels'
    term was a slice of none: an empty tensor in the graph, which torch 2.11's exporter turned
    into a sum ONNX Runtime could not broadcast (every export there failed its parity check).
    No value of the graph is empty (shapes propagated with the constants)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(exported / "model.onnx")), data_prop=True)
    empty = [v.name for v in model.graph.value_info
             if any(d.HasField("dim_value") and d.dim_value == 0 for d in v.type.tensor_type.shape.dim)]
    assert empty == [] and len(model.graph.value_info) > 100


def test_the_default_model_exports_as_the_gaussians_alone(clear_dataset: Path, tmp_path: Path,
                                                        test_images: tuple) -> None:
    """The shipped default does not train the network (train.steps=0): its graph holds no network
    weights and computes PyTorch's scores, which are ½ δᵀΣ⁻¹δ under each image's type."""
    import onnx

    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    # widths no backbone layer has, so that any network weight in the graph would show
    over = {"train.steps": 0, "diffusion.hidden": 37, "diffusion.embed_dim": 23}
    det = Detector(tiny_config(**over), device="cpu").fit(train, progress=False)
    denoiser = det.scorer_.denoiser_
    assert denoiser.network_is_zero()
    bundle = tmp_path / "default"
    det.save(bundle)
    ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=8, log=_quiet)
    assert read_export_info(bundle)["fp32"]["parity_vs_torch"]["passed"]
    model = onnx.load(str(bundle / "model.onnx"))
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    # no layer of the residual network or its embeddings (one of their widths is in every weight)
    assert not [d for d in shapes if 37 in d or 23 in d]
    images, types, _ = test_images
    onx = load_detector(bundle, "onnx", threads=1)
    got = onx.inspect(images[:4], types[:4], all_types=False, maps=False)
    ref = det.inspect(images[:4], types[:4], all_types=False, maps=False)
    np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4)


def test_the_fused_heat_map_exports(clear_dataset: Path, tmp_path: Path, test_images: tuple) -> None:
    """scoring.heat_map=fused: the graph gathers each image's GOOD-patch memory by type, and its
    maps and scores are PyTorch's."""
    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    over = {"train.steps": 0, "scoring.heat_map": "fused", "scoring.memory_ratio": 0.05}
    det = Detector(tiny_config(**over), device="cpu").fit(train, progress=False)
    bundle = det.save(tmp_path / "fused")
    ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=8, log=_quiet)
    assert read_export_info(bundle)["fp32"]["parity_vs_torch"]["passed"]
    images, types, _ = test_images
    got = load_detector(bundle, "onnx", threads=1).inspect(images[:6], types[:6], all_types=False)
    ref = det.inspect(images[:6], types[:6], all_types=False)
    np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4)
    for a, b in zip(got, ref, strict=True):
        assert a.anomaly_map is not None and b.anomaly_map is not None
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4 * np.abs(b.anomaly_map).max())


def _widened_int8_rows_feed(model: Any) -> set[str]:
    """The kinds of node that take the graph's int8 tables' gathered rows once cast to float."""
    int8 = {t.name for t in model.graph.initializer if t.data_type == 3}  # onnx.TensorProto.INT8
    nodes = model.graph.node
    gathered = {n.output[0] for n in nodes if n.op_type == "Gather" and n.input[0] in int8}
    cast = {n.output[0] for n in nodes if n.op_type == "Cast" and n.input[0] in gathered}
    assert len(cast) == len(gathered) >= 2  # the eigenbases and the context's effect, at least
    return {n.op_type for n in nodes if set(n.input) & cast}


@pytest.mark.parametrize(("maps", "network", "storage"), [
    (0, "none", "float16"), (3, "none", "float16"), (0, "image", "float16"),
    (0, "none", "int8"), (3, "none", "int8")])
def test_the_image_context_exports(clear_dataset: Path, tmp_path: Path, test_images: tuple,
                                   maps: int, network: str, storage: str) -> None:
    """diffusion.prior_context: the bundle reloads the fitted detector, and the graph gathers each
    image's context effect (whole, or its factors through ``prior_context_maps`` spatial maps) by
    type (float16 constants; with ``prior_storage=int8`` the eigenbases and the effect as int8
    constants and their scales) and computes PyTorch's maps and scores; with a trained network
    that sees the context (``diffusion.context=image``), the graph feeds it each image's
    components."""
    import onnx

    train = [s for s in load_dataset(clear_dataset) if s.split == "train"]
    over = {"train.steps": 0 if network == "none" else 60, "diffusion.context": network,
            "diffusion.prior_context": 4, "diffusion.prior_context_maps": maps,
            "diffusion.prior_storage": storage}
    det = Detector(tiny_config(**over), device="cpu")
    det.fit(train, progress=False)
    context = det.scorer_.context_
    assert context is not None and context.basis.abs().sum() > 0
    assert (context.maps is None) == (maps == 0)
    assert det.scorer_.denoiser_.network_is_zero() == (network == "none")
    bundle = det.save(tmp_path / "context")
    images, types, _ = test_images
    ref = det.inspect(images[:6], types[:6], all_types=False)
    again = Detector.load(bundle).inspect(images[:6], types[:6], all_types=False)
    assert [r.score for r in again] == [r.score for r in ref]
    ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=8, log=_quiet)
    assert read_export_info(bundle)["fp32"]["parity_vs_torch"]["passed"]
    got = load_detector(bundle, "onnx", threads=1).inspect(images[:6], types[:6], all_types=False)
    np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4)
    # the eigenbases, location-major, held at the bundle's storage (not widened)
    vecs = det.scorer_.denoiser_.prior_vecs[: len(det.classes_)].transpose(0, 1)
    held = [t.data_type for t in onnx.load(str(bundle / "model.onnx")).graph.initializer
            if tuple(t.dims) == tuple(vecs.shape)]
    assert held == [onnx.TensorProto.INT8 if storage == "int8" else onnx.TensorProto.FLOAT16]
    if storage == "int8":  # each image's 8-bit rows are widened by a cast alone, straight into a
        # matrix product that their scales then multiply (not a pass over every image's rows)
        assert _widened_int8_rows_feed(onnx.load(str(bundle / "model.onnx"))) == {"MatMul"}
    # a graph built in this process packs the 8-bit tables for its trace only: none stay on the
    # detector (a quarter of its tables' float32 bytes), which still scores as before
    graph = ex.build_onnx(det)
    assert graph.SerializeToString() == ex.build_onnx(det).SerializeToString()
    assert [n for m in (det.scorer_.denoiser_, context) for n, _ in m.named_buffers()
            if n.startswith("packed_")] == []
    assert [r.score for r in det.inspect(images[:6], types[:6], all_types=False)] == [r.score for r in ref]


def test_onnx_detector_reproduces_torch_inspect(exported: Path, test_images: tuple,
                                                clear_dataset: Path) -> None:
    images, types, _ = test_images
    det = Detector.load(exported, device="cpu")
    onx = load_detector(exported, "onnx", threads=1)
    assert isinstance(onx, OnnxDetector) and onx.classes_ == det.classes_ and onx.version == det.version
    unknown = [None] * len(types)
    for feature_types, all_types in ((types, True), (types, False), (unknown, True), (unknown, False)):
        ref = det.inspect(images, feature_types, all_types=all_types)
        got = onx.inspect(images, feature_types, all_types=all_types)
        assert [r.decision for r in got] == [r.decision for r in ref]
        assert [r.feature_type for r in got] == [r.feature_type for r in ref]
        assert [r.predicted_type for r in got] == [r.predicted_type for r in ref]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4)
        # beyond the calibration range p decays exponentially in the score: compare log p
        np.testing.assert_allclose(np.log([r.p_value for r in got]), np.log([r.p_value for r in ref]),
                                   rtol=1e-3, atol=1e-6)
        for a, b in zip(got, ref, strict=True):
            assert set(a.type_scores) == set(b.type_scores)
            assert a.anomaly_map is not None and b.anomaly_map is not None
            assert a.anomaly_map.shape == b.anomaly_map.shape
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4 * np.abs(b.anomaly_map).max())
    fast = onx.inspect(images[:2], types[:2], all_types=False, maps=False)
    assert fast[0].anomaly_map is None and fast[0].type_scores == {} and fast[0].predicted_type is None
    assert onx.inspect([], []) == []
    with pytest.raises(UnknownFeatureTypeError):
        onx.inspect(images[:1], ["nope"])
    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"][:3]
    results, kept = onx.inspect_samples(samples, all_types=False)
    assert len(results) == len(kept) == 3 and results[0].feature_type == samples[0].feature_type
    in_memory = ex.onnx_detector(det, threads=1)  # e.g. for models a cross-validation fits
    expected = [r.decision for r in det.inspect(images, types)]
    assert [r.decision for r in in_memory.inspect(images, types)] == expected


def _flip_byte(path: Path, from_end: int) -> None:
    """A byte of ``path`` inverted in place (an edge device's SD card), ``from_end`` from its end."""
    with open(path, "r+b") as fh:
        fh.seek(from_end, 2)
        byte = fh.read(1)
        fh.seek(from_end, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_runtime_choice(exported: Path, tiny_model: Path, tmp_path: Path) -> None:
    assert isinstance(load_detector(tiny_model, "auto"), Detector)  # no export: PyTorch
    with pytest.raises(BundleError, match="no ONNX export"):
        load_detector(tiny_model, "onnx")
    info = read_export_info(exported)
    chosen = load_detector(exported, "auto", threads=1)
    fastest = info["fastest_first"][0]  # measured at export, among those that passed parity
    assert getattr(chosen, "runtime", "torch") == fastest["runtime"]
    assert fastest["latency_ms"] == min(c["latency_ms"] for c in info["fastest_first"])
    assert isinstance(load_detector(exported, "torch"), Detector)
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    args = parser.parse_args(["--runtime", "onnx", "--threads", "1"])
    det = runtime_from_args(args, exported)
    assert isinstance(det, OnnxDetector) and det.precision == "fp32"
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int)  # a command with its own --threads
    add_runtime_arguments(parser, threads=False)
    assert isinstance(runtime_from_args(parser.parse_args(["--runtime", "torch"]), exported), Detector)
    assert "int8" not in info
    with pytest.raises(BundleError, match="INT8"):
        OnnxDetector(exported, precision="int8")
    stale = tmp_path / "stale"  # exported from the weights of a model retrained since
    shutil.copytree(exported, stale)
    export_info = json.loads((stale / "export.json").read_text())
    export_info["weights_file_sha256"] = "0" * 64
    (stale / "export.json").write_text(json.dumps(export_info))
    with pytest.raises(BundleError, match="older than the model"):
        OnnxDetector(stale)
    # an input size edited into config.json after the export: refused, as PyTorch refuses it (it
    # was ONNX Runtime's InvalidArgument traceback on the first image)
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    config = json.loads((edited / "config.json").read_text())
    config["backbone"]["input_size"] += 32
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=rf"config\.json was edited after training: backbone\.input_size is "
                                          rf"{config['backbone']['input_size']}; the model was fitted"):
        OnnxDetector(edited)
    meta = json.loads((edited / "metadata.json").read_text())
    del meta["fitted_settings"]  # a bundle from before the record: its graph tells
    (edited / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"backbone\.input_size {config['backbone']['input_size']} differs "
                                          r"from its ONNX export's input, \d+ px"):
        OnnxDetector(edited)
    # the export's graph deleted (or not copied with the bundle): said, not silently PyTorch
    gone = tmp_path / "gone"
    shutil.copytree(exported, gone)
    (gone / "model.onnx").unlink()
    with pytest.warns(UserWarning, match="model.onnx, which its export lists, is missing"):
        assert isinstance(load_detector(gone, "auto"), Detector)
    (gone / "export.json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged export.json .*; using PyTorch"):
        assert isinstance(load_detector(gone, "auto"), Detector)
    # the graph damaged (a bit flipped on an edge device's SD card): as a damaged export.json,
    # auto runs PyTorch and says so (it refused to start); asked for by name, it is refused
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    _flip_byte(damaged / "model.onnx", -100)
    with pytest.warns(UserWarning, match=r"model\.onnx is damaged \(checksum mismatch\); using PyTorch "
                                         r"\(run `diffqc export .*damaged` again\)"):
        assert isinstance(load_detector(damaged, "auto"), Detector)
    with pytest.raises(BundleError, match=r"model\.onnx is damaged"):
        load_detector(damaged, "onnx")
    # the weights damaged: the exported graph reads the type router and the feature statistics
    # from them, and ran with a router of 3e+32 where PyTorch refused the bundle
    weights = tmp_path / "weights"
    shutil.copytree(exported, weights)
    _flip_byte(weights / "weights.safetensors", -8)
    with pytest.raises(BundleError, match=r"weights\.safetensors is damaged \(checksum mismatch\)"):
        load_detector(weights, "onnx")
    # a graph that passed its checksum and that this ONNX Runtime cannot load (an export made
    # with a newer one): a traceback; now a BundleError, so that auto runs PyTorch and says why
    newer = tmp_path / "newer"
    shutil.copytree(exported, newer)
    import onnx

    graph = onnx.load(str(newer / "model.onnx"))
    graph.ir_version = 99
    onnx.save(graph, str(newer / "model.onnx"))
    info = json.loads((newer / "export.json").read_text())
    info["fp32"]["sha256"] = sha256_file(newer / "model.onnx")
    (newer / "export.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match=r"onnx cannot load model\.onnx \(.*IR version"):
        load_detector(newer, "onnx")


def test_an_unfitted_detector_is_not_exported() -> None:
    # baselines are exported (test_baselines_export_through_the_cli); an unfitted model is not
    with pytest.raises(RuntimeError, match="not fitted"):
        ex.build_onnx(Detector(tiny_config("patchcore"), device="cpu"))


def test_int8_export_and_parity_report(exported: Path, clear_dataset: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The parity gate passes for real (no --force): calibrated on GOOD images like the parts it
    will see, INT8 separates the clear defects as well as FP32 does."""
    bundle = tmp_path / "int8"
    shutil.copytree(exported, bundle)
    rc = main(["export", str(bundle), "--int8", "--calibration-data", str(clear_dataset),
               "--threads", "1", "--calibration-images", "16", "--sensitivity-images", "6",
               "--check-images", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "parity: PASSED" in err and "AUROC fp32" in err and "INT8 REFUSED" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["files"] == ["model.onnx", "model.int8.onnx"]
    entry = read_export_info(bundle)["int8"]
    assert {"accepted", "float_layers", "layer_errors", "score_error_sd", "settings", "parity",
            "calibration"} <= set(entry)
    assert entry["settings"]["per_channel"] and entry["settings"]["format"] == "QDQ"
    assert set(entry["float_layers"]) <= set(entry["layer_errors"])
    report = entry["parity"]
    assert {"per_type", "spearman", "decision_agreement", "decisions_fp32_to_int8", "max_auroc_drop",
            "passed", "auroc_measured"} <= set(report)
    assert set(report["per_type"]) == {"dots", "stripes"}
    for row in report["per_type"].values():
        assert {"auroc_fp32", "auroc_int8", "auroc_drop", "spearman", "decision_agreement", "n_good",
                "n_defective"} <= set(row)
        assert row["n_defective"] > 0 and row["auroc_fp32"] is not None
    assert report["auroc_measured"] and 0.0 <= report["decision_agreement"] <= 1.0
    assert sum(report["decisions_fp32_to_int8"].values()) == report["images"]
    assert entry["calibration"].startswith("recomputed")  # the data reproduces the bundle's calibration
    assert entry["accepted"] is True and report["passed"] is True and summary["int8_accepted"] is True
    assert report["max_auroc_drop"] is not None and report["max_auroc_drop"] <= ex.MAX_AUROC_DROP
    int8 = OnnxDetector(bundle, precision="int8", threads=1)
    assert int8.precision == "int8"
    images, _, _ = read_images([s for s in load_dataset(clear_dataset) if s.split == "test"][:2])
    assert len(int8.inspect(images, ["dots", "dots"])) == 2


def test_an_exported_detector_shows_where_it_runs_in_a_notebook(exported: Path) -> None:
    """A runtime's detector, as a notebook shows it: the bundle, runtime and precision, and the
    model as PyTorch's shows it (it was `<diffqc.runtime.OnnxDetector object at 0x7f..>`)."""
    det = OnnxDetector(exported, precision="fp32", threads=1)
    assert repr(det) == (f"OnnxDetector({str(exported)!r}, runtime='onnx', precision='fp32', "
                         f"model_id={det.version!r}, method='diffusion', "
                         f"backbone={det.config.backbone.name!r}, types=['dots', 'stripes'], "
                         "alpha_review=0.05, alpha_reject=0.01)")


def test_int8_parity_on_labelled_folders_measures_every_type(
        exported: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labelled folders (or a manifest without a split) make every GOOD image a training one, so
    the test split held defects only: INT8's AUROC could not be measured and the export was
    refused. The GOOD calibration images of such a type now join its held-out defects; the
    warnings of a dataset the export reads twice are said once."""
    data = tmp_path / "labelled"
    for s in load_dataset(clear_dataset):
        folder = data / s.feature_type / ("good" if s.label == 0 else "bad")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, folder / f"{s.split}-{s.path.name}")
    (data / "dots" / "stray.png").write_bytes((data / "dots" / "bad").iterdir().__next__().read_bytes())
    bundle = tmp_path / "int8"
    shutil.copytree(exported, bundle)
    rc = main(["export", str(bundle), "--int8", "--calibration-data", str(data), "--threads", "1",
               "--calibration-images", "16", "--sensitivity-images", "6", "--check-images", "4"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "could not be measured" not in err and "parity: PASSED" in err
    assert err.count("images not read: 1 directly in it") == 1
    report = read_export_info(bundle)["int8"]["parity"]
    assert all(row["n_good"] > 0 and row["n_defective"] > 0 for row in report["per_type"].values())
    assert "and the GOOD calibration images of dots, stripes" in report["held_out"]


def test_int8_export_after_an_undo_to_the_training_calibration_gives_int8_its_own(
        exported: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recalibration undone by `calibrate --undo` puts back the training's calibration, whose
    images an INT8 export given the training data can score: it still kept FP32's for INT8, as
    after any recalibration, and said the bundle was recalibrated. It computes INT8's own, as for
    a bundle never recalibrated; a recalibration's put back is still said and kept."""
    from tests.conftest import write_clear_dataset

    bundle = tmp_path / "int8"
    shutil.copytree(exported, bundle)
    line = write_clear_dataset(tmp_path / "line", n_train=10, n_test=0, seed=9)
    export = ["export", str(bundle), "--int8", "--calibration-data", str(clear_dataset), "--threads", "1",
              "--calibration-images", "16", "--sensitivity-images", "6", "--check-images", "4"]
    assert main(["calibrate", str(bundle), str(line), "-q"]) == 0
    assert main(["calibrate", str(bundle), "--undo", "-q"]) == 0  # the training's calibration back
    assert main(export) == 0, capsys.readouterr().err
    entry = read_export_info(bundle)["int8"]
    assert "recalibrated" not in entry["calibration"] and (bundle / "calibration.int8.json").is_file()
    assert main(["calibrate", str(bundle), "--undo", "-q"]) == 0  # redone: the line's is back
    assert main(["calibrate", str(bundle), str(line), "--alpha-review", "0.1", "-q"]) == 0
    assert main(["calibrate", str(bundle), "--undo", "-q"]) == 0  # a recalibration's put back
    assert main(export) == 0
    assert "`diffqc calibrate --undo` put back is a recalibration's" in read_export_info(bundle)["int8"][
        "calibration"]


def test_int8_export_of_a_recalibrated_bundle_says_so(exported: Path, clear_dataset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle recalibrated on the line's GOOD parts (`diffqc calibrate`), then exported to INT8
    with its training data: INT8 cannot recompute that calibration, whose images it is not given.
    The export said "the data given does not reproduce the bundle's calibration scores (not the
    training data?)" of the very training data; it now names the recalibration and what gives
    INT8 its own calibration, and that command does."""
    from tests.conftest import write_clear_dataset

    bundle = tmp_path / "int8"
    shutil.copytree(exported, bundle)
    line = write_clear_dataset(tmp_path / "line", n_train=10, n_test=0, seed=9)
    assert main(["calibrate", str(bundle), str(line), "-q"]) == 0
    assert main(["export", str(bundle), "--int8", "--calibration-data", str(clear_dataset), "--threads", "1",
                 "--calibration-images", "16", "--sensitivity-images", "6", "--check-images", "4"]) == 0
    entry = read_export_info(bundle)["int8"]
    assert "recalibrated by `diffqc calibrate` (on " in entry["calibration"]
    assert "not the training data" not in entry["calibration"] and entry["accepted"] is True
    assert not (bundle / "calibration.int8.json").exists()
    running = OnnxDetector(bundle, precision="int8", threads=1)  # a service on INT8, as it is now
    reloader = CalibrationReloader(running, bundle)
    assert reloader.file.name == "calibration.json"
    capsys.readouterr()
    assert main(["calibrate", str(bundle), str(line), "-q"]) == 0
    # the same images: FP32's calibration is the bundle's as it stands, INT8's its own now
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["files"] == ["calibration.int8.json"]
    # the running INT8 service takes up INT8's own calibration, not the FP32 one beside it
    assert (reloader.check() or reloader.check()) and reloader.file.name == "calibration.int8.json"
    own = json.loads((bundle / "calibration.int8.json").read_text())["known"]
    assert running.calibration_ is not None
    assert {t: c.scores.tolist() for t, c in running.calibration_.known.items()} == own
    assert not reloader.check()  # once
    # undone: INT8 decides with the FP32 calibration put back, as before; redone: with its own again
    fp32 = (bundle / "calibration.json").read_bytes()
    assert main(["calibrate", str(bundle), "--undo", "-q"]) == 0
    assert (bundle / "calibration.json").read_bytes() == fp32
    assert not (bundle / "calibration.int8.json").exists()
    assert (reloader.check() or reloader.check()) and reloader.file.name == "calibration.json"
    assert {t: c.scores.tolist() for t, c in running.calibration_.known.items()} == json.loads(fp32)["known"]
    assert main(["calibrate", str(bundle), "--undo", "-q"]) == 0
    assert json.loads((bundle / "calibration.int8.json").read_text())["known"] == own
    assert (reloader.check() or reloader.check()) and reloader.file.name == "calibration.int8.json"
    assert {t: c.scores.tolist() for t, c in running.calibration_.known.items()} == own
    capsys.readouterr()
    # other levels, without images: INT8's own calibration decides at them too, on its own scores
    assert main(["calibrate", str(bundle), "--alpha-review", "0.2", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["files"] == ["calibration.int8.json",
                                                                             "calibration.json"]
    assert json.loads((bundle / "calibration.int8.json").read_text())["known"] == own
    assert (reloader.check() or reloader.check()) and running.calibration_.config.alpha_review == 0.2


def test_calibrate_after_a_retrain_leaves_the_stale_int8_export_alone(
        exported: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Retrained into its folder, a bundle's INT8 export is stale (no runtime runs it: `inspect`
    and `serve` fall back to PyTorch). `calibrate` then stopped, after scoring every image, with
    "the ONNX export is older than the model", and the retrained model could not be recalibrated
    until it was exported again. It now recalibrates the model and says the stale export's
    calibration is not recomputed."""
    from diffqc.model import Detector
    from tests.conftest import tiny_config, write_clear_dataset

    bundle = tmp_path / "int8"
    shutil.copytree(exported, bundle)
    assert main(["export", str(bundle), "--int8", "--calibration-data", str(clear_dataset), "--threads", "1",
                 "--calibration-images", "16", "--sensitivity-images", "6", "--check-images", "4",
                 "--force"]) == 0
    int8_calibration = (bundle / "calibration.int8.json").read_bytes()
    retrained = Detector(tiny_config(**{"train.seed": 1}), device="cpu")
    retrained.fit(load_dataset(clear_dataset), progress=False).save(bundle)
    line = write_clear_dataset(tmp_path / "line", n_train=10, n_test=0, seed=9)
    capsys.readouterr()
    assert main(["calibrate", str(bundle), str(line), "-q"]) == 0
    out, err = capsys.readouterr()
    assert "the ONNX export is older than the model" in err and "INT8 calibration is not recomputed" in err
    assert json.loads(out.splitlines()[-1])["files"] == ["calibration.json"]
    assert (bundle / "calibration.int8.json").read_bytes() == int8_calibration


def test_data_of_types_the_model_does_not_know_is_named(exported: Path, clear_dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--data`` / ``--calibration-data`` with types the model lacks (another line's folder): those
    images are left out as before, and now named in one warning, not silently."""
    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    data = tmp_path / "data"
    shutil.copytree(clear_dataset, data)
    shutil.copytree(clear_dataset / "dots", data / "gears")
    n_gears = sum(1 for p in (data / "gears").rglob("*.png") if "ground_truth" not in p.parts)
    assert main(["export", str(bundle), "--data", str(data), "--threads", "1", "--check-images", "4",
                 "--no-openvino"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffqc: warning:")]
    assert warned == [f"diffqc: warning: {data}: {n_gears} images of types the model does not know are "
                      "left out (gears; the model's: dots, stripes)"], warned


def _flat_grey_dataset(root: Path, types: tuple[str, ...], n: int = 12, size: int = 64) -> Path:
    """GOOD training images of the model's types that look nothing like its parts: flat mid-grey."""
    from PIL import Image

    for t in types:
        folder = root / t / "train" / "good"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size), 110 + i % 3, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def test_an_export_of_a_bundle_retrained_meanwhile_is_not_recorded_as_its_export(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`diffqc export SERVED` builds and checks the graph for a minute; a `train --out SERVED
    --force` that landed meanwhile got an export.json naming the NEW weights' checksum beside the
    OLD model's graph: not stale by that check, so `--runtime auto` (a service's reload) ran the
    old model under the new one's calibration. The bundle's model is checked again before
    export.json is written: a retrained one gets none, and PyTorch runs it."""
    bundle = tmp_path / "served"
    shutil.copytree(tiny_model, bundle)
    checked = ex.check_fp32

    def retrained_meanwhile(*args: Any, **kw: Any) -> Any:
        out = checked(*args, **kw)
        meta = json.loads((bundle / "metadata.json").read_text())  # what a retrain rewrites
        meta.update(model_id="diffusion-retrained", weights_file_sha256="0" * 64)
        (bundle / "metadata.json").write_text(json.dumps(meta))
        return out

    monkeypatch.setattr(ex, "check_fp32", retrained_meanwhile)
    with pytest.raises(OutputError, match=r"was retrained while export ran: export\.json is not written"):
        ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=_quiet, openvino=False)
    assert not (bundle / "export.json").exists()
    assert choose_runtime(bundle).runtime == "torch"


def test_int8_without_held_out_images_to_measure_every_type_is_refused_before_quantizing(
        exported: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Calibration data of one type of two (or whose test split holds no defect): INT8 was
    calibrated and each layer searched (minutes on a line PC), then refused, as its AUROC could
    not be measured on the other type. Said before the quantization now, with what to give;
    ``--force`` (keep it unmeasured) still quantizes."""
    bundle = tmp_path / "one-type"
    shutil.copytree(exported, bundle)
    data = tmp_path / "dots-only"
    shutil.copytree(clear_dataset / "dots", data / "dots")
    argv = ["export", str(bundle), "--int8", "--calibration-data", str(data), "--no-search",
            "--threads", "1", "--calibration-images", "4", "--sensitivity-images", "2", "--check-images", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (f"diffqc: error: INT8's parity check needs GOOD and defective held-out images of each type, "
            f"and the test split of {data} lacks them for stripes: give --held-out labelled images of "
            "every type, or --force to keep INT8 unmeasured (never chosen automatically)") in err
    assert "calibrating activations" not in err and not (bundle / "model.int8.onnx").exists()
    assert main([*argv, "--force"]) == 0
    assert "could not be measured on type(s) stripes" in capsys.readouterr().err
    assert (bundle / "model.int8.onnx").exists()


def test_int8_refused_when_parity_fails(exported: Path, clear_dataset: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The parity gate fails for real: INT8 calibrated on flat grey images (nothing like the
    parts) gets activation ranges that do not fit real parts, and the held-out AUROC shows it
    (here: -0.012 and -0.016 AUROC, > MAX_AUROC_DROP)."""
    bundle = tmp_path / "refused"
    shutil.copytree(exported, bundle)
    grey = _flat_grey_dataset(tmp_path / "grey", ("dots", "stripes"))
    rc = main(["export", str(bundle), "--int8", "--calibration-data", str(grey), "--held-out",
               str(clear_dataset), "--no-search", "--threads", "1", "--calibration-images", "8",
               "--sensitivity-images", "4", "--check-images", "4"])
    out, err = capsys.readouterr()
    assert rc == 1, err  # refused, and the command says so by its exit code
    assert "parity: FAILED" in err and "INT8 REFUSED" in err
    info = read_export_info(bundle)
    report = info["int8"]["parity"]
    assert report["auroc_measured"] and report["max_auroc_drop"] > ex.MAX_AUROC_DROP
    assert json.loads(out.strip().splitlines()[-1])["int8_accepted"] is False
    assert info["int8"]["accepted"] is False and info["int8"]["file"] is None
    assert not (bundle / "model.int8.onnx").exists()
    assert isinstance(load_detector(bundle, "onnx"), OnnxDetector)  # FP32 is still there
    with pytest.raises(BundleError, match="INT8"):
        OnnxDetector(bundle, precision="int8")
    # -q leaves out the progress and the reports, not why it exits 1 (it said nothing but the
    # JSON line's int8_accepted false); the JSON line says it too, for a script
    rc = main(["export", str(bundle), "--int8", "--calibration-data", str(grey), "--held-out",
               str(clear_dataset), "--no-search", "--threads", "1", "--calibration-images", "8",
               "--sensitivity-images", "4", "--check-images", "4", "-q"])
    out, err = capsys.readouterr()
    why = ex.parity_failure(read_export_info(bundle)["int8"]["parity"])
    assert rc == 1 and "parity: FAILED" not in err and why.startswith("it loses")
    assert err.strip() == f"diffqc: INT8 refused: {why} (--force keeps it, never chosen automatically)"
    assert json.loads(out.strip().splitlines()[-1])["int8_parity_failed"] == why


def _tiny_onnx_backbone(path: Path, size: int | None = None) -> Path:
    """A small random conv net with a 'detection head', exported as ultralytics does (module
    scopes ``model.N``), to be tapped in the middle."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = []
            for i, (cin, cout, stride) in enumerate([(3, 8, 2), (8, 16, 2), (16, 24, 2), (24, 32, 2)]):
                layers += [torch.nn.Conv2d(cin, cout, 3, stride, 1), torch.nn.SiLU()]
                del i
            self.model = torch.nn.Sequential(*layers)
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.model(x).mean(dim=(2, 3)))

    x = torch.zeros(1, 3, size or 64, size or 64)
    dyn = None if size else {"images": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(Net().eval(), (x,), str(path), dynamo=False, opset_version=13, input_names=["images"],
                      output_names=["out"], dynamic_axes=dyn)
    return path


def test_an_onnx_backbone_given_by_a_relative_path_is_found_from_any_folder(
        clear_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model trained with ``--backbone onnx:tiny.onnx`` (a path relative to the folder it was
    trained in) loaded from that folder only: a service started from ``/`` (systemd's) said
    "backbone weights not found at tiny.onnx". The fit records the graph's absolute path."""
    (tmp_path / "work").mkdir()
    _tiny_onnx_backbone(tmp_path / "work" / "tiny.onnx")
    monkeypatch.chdir(tmp_path / "work")
    config = tiny_config("padim", **{"backbone.name": "onnx:tiny.onnx",
                                     "backbone.layers": ["model.5", "model.7"]})
    samples = [s for s in load_dataset(clear_dataset) if s.split == "train"][:24]
    det = Detector(config, device="cpu").fit(samples, progress=False)
    bundle = det.save(tmp_path / "model")
    assert det.config.backbone.name == f"onnx:{tmp_path / 'work' / 'tiny.onnx'}"
    test = [s for s in load_dataset(clear_dataset) if s.split == "test"][:4]
    scores = [r.score for r in det.inspect_samples(test, maps=False)[0]]
    monkeypatch.chdir("/")
    again = Detector.load(bundle)
    np.testing.assert_allclose([r.score for r in again.inspect_samples(test, maps=False)[0]], scores,
                               rtol=1e-5)


def test_bring_your_own_onnx_backbone(clear_dataset: Path, tmp_path: Path) -> None:
    onnx_file = _tiny_onnx_backbone(tmp_path / "tiny_yolo.onnx")
    config = tiny_config(**{"backbone.name": f"onnx:{onnx_file}", "backbone.layers": ["model.5", "model.7"],
                            "train.steps": 20})
    samples = load_dataset(clear_dataset)
    det = Detector(config, device="cpu").fit(samples, progress=False)
    fe = det.extractor
    assert fe.weights_sha256 == sha256_file(onnx_file)
    assert fe.onnx is not None and fe.onnx.shapes == [(24, 8, 8), (32, 4, 4)]  # finest first
    assert fe.channels == 56 and fe.grid == (8, 8)
    test = [s for s in samples if s.split == "test"]
    results, kept = det.inspect_samples(test)
    scores = [r.score for r in results]
    assert np.isfinite(scores).all()
    assert image_auroc([s.label != GOOD for s in kept], scores) > 0.6
    bundle = det.save(tmp_path / "byo")
    again = Detector.load(bundle)
    np.testing.assert_allclose([r.score for r in again.inspect_samples(test[:4])[0]], scores[:4], rtol=1e-5)
    # the exported graph holds the ONNX backbone cut at its taps
    info = ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=_quiet)
    assert info["fp32"]["parity_vs_torch"]["passed"]
    onx = OnnxDetector(bundle, threads=1)
    images, _, _ = read_images(test[:4])
    ref = again.inspect(images, [s.feature_type for s in test[:4]])
    assert [r.decision for r in onx.inspect(images, [s.feature_type for s in test[:4]])] == \
        [r.decision for r in ref]
    # the graph moved (another machine, another folder) and its new path edited into config.json:
    # taken, its checksum (backbone.weights_sha256) telling the same graph, where another setting
    # so edited is refused
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    graph = onnx_file.rename(tmp_path / "elsewhere.onnx")
    config_file = moved / "config.json"
    edited = json.loads(config_file.read_text())
    edited["backbone"]["name"] = f"onnx:{graph}"
    config_file.write_text(json.dumps(edited))
    moved_scores = [r.score for r in Detector.load(moved).inspect_samples(test[:4])[0]]
    np.testing.assert_allclose(moved_scores, scores[:4], rtol=1e-5)
    _tiny_onnx_backbone(graph, size=64)  # another graph at the path (a fixed input): refused by its checksum
    with pytest.raises(BundleError, match="differ from those the model was trained with"):
        Detector.load(moved)


def _edited(path: Path, out: Path, *, half: bool = False, tap_op: str | None = None) -> Path:
    """The tiny backbone edited as other exports give it: ``half``, a float16 input and a
    float16 tap ``half_tap`` (ultralytics' ``half=True``); ``tap_op``, a tap ``odd`` that is
    ``model.5``'s output through ``Cast`` to int32 (``"int"``), ``Log`` of a ReLU (``"log"``:
    -inf where it is 0) or times zero (``"zero"``: no longer depends on the image)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    tap = [n for n in graph.node if "/model.5/" in n.name][-1].output[0]  # the module's output
    extra: list[Any] = []
    if half:
        for node in graph.node:
            node.input[:] = ["images/f32" if x == "images" else x for x in node.input]
        extra.append(helper.make_node("Cast", ["images"], ["images/f32"], to=TensorProto.FLOAT))
        graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
        graph.node.append(helper.make_node("Cast", [tap], ["half_tap"], to=TensorProto.FLOAT16))
    if tap_op == "int":
        graph.node.append(helper.make_node("Cast", [tap], ["odd"], to=TensorProto.INT32))
    elif tap_op == "log":
        graph.node.extend([helper.make_node("Relu", [tap], ["relu"]),
                           helper.make_node("Log", ["relu"], ["odd"])])
    elif tap_op == "zero":
        graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.float32), "zero"))
        graph.node.append(helper.make_node("Mul", [tap, "zero"], ["odd"]))
    nodes = [*extra, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out


def test_a_half_precision_onnx_backbone_is_fitted_and_exported(clear_dataset: Path, tmp_path: Path) -> None:
    """A backbone exported in half precision (a float16 input, float16 taps: ultralytics'
    ``half=True``, for an edge GPU) was a traceback from ONNX Runtime at the first image; a
    float16 tap, a traceback at export. Its input is given float16 pixels and its taps are read
    as float32; the export casts both ways in the graph and passes its parity check."""
    half = _edited(_tiny_onnx_backbone(tmp_path / "net.onnx"), tmp_path / "half.onnx", half=True)
    config = tiny_config(**{"backbone.name": f"onnx:{half}", "backbone.layers": ["half_tap", "model.7"]})
    samples = load_dataset(clear_dataset)
    det = Detector(config, device="cpu").fit(samples, progress=False)
    test = [s for s in samples if s.split == "test"]
    results, kept = det.inspect_samples(test)
    assert image_auroc([s.label != GOOD for s in kept], [r.score for r in results]) > 0.6
    bundle = det.save(tmp_path / "byo")
    info = ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=_quiet)
    assert info["fp32"]["parity_vs_torch"]["passed"]
    images, _, _ = read_images(test[:4])
    onx = OnnxDetector(bundle, threads=1).inspect(images, [s.feature_type for s in test[:4]])
    np.testing.assert_allclose([r.score for r in onx], [r.score for r in results[:4]], rtol=1e-4)


def test_an_onnx_tap_a_model_cannot_use_is_refused_naming_it(tmp_path: Path) -> None:
    """A tap of integers, one that holds -inf (a Log of zeros), one that is the same whatever
    the image (a constant: a model fitted on it passes every part), an input of bytes: each was
    a traceback deep in the fit (or, the constant, a model scoring every part 0.0); each is
    refused at load naming the tensor."""
    from diffqc.backbone import FeatureExtractor
    from diffqc.config import BackboneConfig

    net = _tiny_onnx_backbone(tmp_path / "net.onnx")
    for op, said in [("int", "'odd' is int32; taps must be floating point"),
                     ("log", "'odd' holds NaN or infinite values for a black image"),
                     ("zero", "'odd' is the same for a black and a white image")]:
        graph = _edited(net, tmp_path / f"{op}.onnx", tap_op=op)
        with pytest.raises(BackboneError, match=said):
            FeatureExtractor(BackboneConfig(name=f"onnx:{graph}", layers=("odd",), input_size=64))
    import onnx

    model = onnx.load(str(net))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    onnx.save(model, str(tmp_path / "bytes.onnx"))
    with pytest.raises(BackboneError, match="'images' is uint8; diffqc gives it pixels in \\[0, 1\\]"):
        FeatureExtractor(BackboneConfig(name=f"onnx:{tmp_path / 'bytes.onnx'}", layers=("model.5",),
                                        input_size=64))


def test_an_onnx_backbone_of_a_fixed_batch_is_not_exported(clear_dataset: Path, tmp_path: Path) -> None:
    """A backbone whose batch is fixed at 1 is fitted on (an image at a time); its export, which
    runs batches, was ONNX Runtime's "Got invalid dimensions" traceback: it is refused with
    what to do."""
    import onnx

    model = onnx.load(str(_tiny_onnx_backbone(tmp_path / "net.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "one.onnx"))
    config = tiny_config(**{"backbone.name": f"onnx:{tmp_path / 'one.onnx'}", "backbone.layers": ["model.5"]})
    det = Detector(config, device="cpu").fit(load_dataset(clear_dataset), progress=False)
    bundle = det.save(tmp_path / "m")
    with pytest.raises(ExportError, match=r"takes a batch of 1 image\(s\) only .* dynamic batch"):
        ex.export_bundle(bundle, data=clear_dataset, threads=1, check_images=4, log=_quiet)


def test_onnx_backbone_errors(tmp_path: Path) -> None:
    from diffqc.backbone import FeatureExtractor
    from diffqc.config import BackboneConfig

    onnx_file = _tiny_onnx_backbone(tmp_path / "net.onnx")
    with pytest.raises(BackboneError, match="needs the tensors"):
        FeatureExtractor(BackboneConfig(name=f"onnx:{onnx_file}", input_size=64))
    with pytest.raises(BackboneError, match=r"model\.3"):  # the hint lists the module names
        FeatureExtractor(BackboneConfig(name=f"onnx:{onnx_file}", layers=("nope",), input_size=64))
    # A graph with a fixed input size (YOLOv8: 640) is fed that size, whatever input_size says.
    fixed = _tiny_onnx_backbone(tmp_path / "fixed.onnx", size=96)
    extractor = FeatureExtractor(BackboneConfig(name=f"onnx:{fixed}", layers=("model.5",), input_size=64))
    assert extractor.input_size == 96
    with pytest.raises(BackboneError, match="not found"):
        FeatureExtractor(BackboneConfig(name=f"onnx:{tmp_path / 'missing.onnx'}", layers=("x",)))


def test_export_with_data_none_of_which_can_be_read_says_so(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--data`` whose images cannot be read (or are of other types): the parity check fell
    back to synthetic images, saying "give --data for the model's own" to a user who had. It is
    an error, before anything is written."""
    bundle = Path(shutil.copytree(tiny_model, tmp_path / "tiny"))
    junk = tmp_path / "junk" / "stripes" / "test" / "good"
    junk.mkdir(parents=True)
    (junk / "a.png").write_bytes(b"not an image")
    assert main(["export", str(bundle), "--format", "onnx", "--data", str(tmp_path / "junk"),
                 "--no-openvino", "-q"]) == 1
    assert "no readable image" in capsys.readouterr().err
    assert not (bundle / "model.onnx").exists() and not (bundle / "export.json").exists()
    # INT8 calibration data none of which can be read: an error, not a traceback
    junk_good = tmp_path / "junk" / "stripes" / "train" / "good"
    junk_good.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (junk_good / name).write_bytes(b"not an image")
    assert main(["export", str(bundle), "--format", "onnx", "--int8", "--calibration-data",
                 str(tmp_path / "junk"), "--data", str(clear_dataset), "--no-openvino", "-q"]) == 1
    err = capsys.readouterr().err
    assert "too few readable GOOD images" in err and "Traceback" not in err


def test_tensorrt_is_given_the_8_bit_tables_as_float16_codes(exported: Path, test_images: tuple) -> None:
    """TensorRT's networks take an INT8 tensor only with a quantization scale of its own, and the
    default bundle's graph holds its eigenbases and context effect as INT8 codes that it gathers
    and widens: the engine is built from a copy whose codes are FLOAT16 initializers (exact: -127
    to 127), which computes the same numbers (checked here with ONNX Runtime; the engine itself
    needs a GPU: the ``gpu`` tests)."""
    import onnx
    import onnxruntime as ort

    from diffqc.backends.tensorrt import widened_int8_tables

    model = onnx.load(str(exported / "model.onnx"))
    int8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8  # the default storage's tables
    wide = widened_int8_tables(model)
    assert wide is not None
    kinds = {t.name: t.data_type for t in wide.graph.initializer}
    assert all(kinds[n] == onnx.TensorProto.FLOAT16 for n in int8)
    assert onnx.TensorProto.INT8 not in kinds.values()
    onnx.checker.check_model(wide)
    assert widened_int8_tables(wide) is None  # nothing left to widen
    images, _, _ = test_images
    feeds = {"pixels": preprocess(images[:3], 64), "type_idx": np.array([0, 1, 0], dtype=np.int64)}
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            for m in (model, wide)]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tensorrt_without_tensorrt_is_refused_before_any_export(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without TensorRT (neither its Python package nor trtexec), ``export --format tensorrt``
    says so at once: it used to export and check the ONNX graph first (a minute on a line PC)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    bundle = Path(shutil.copytree(tiny_model, tmp_path / "tiny"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-trtexec"))  # a PATH without trtexec
    assert main(["export", str(bundle), "--format", "tensorrt"]) == 1
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (bundle / "model.onnx").exists() and not (bundle / "export.json").exists()


def test_options_an_export_does_not_use_are_refused_before_any_export(
        tiny_model: Path, clear_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``export --held-out DATA`` without ``--int8`` wrote the FP32 export and no parity report,
    without a word (the held-out data, the INT8 image counts and ``--no-search`` are the INT8
    export's); ``--format tensorrt --int8`` built an FP16 engine. Each is refused at once, naming
    the options and what they need, with nothing written."""
    bundle = Path(shutil.copytree(tiny_model, tmp_path / "tiny"))
    before = sorted(p.name for p in bundle.iterdir())
    for argv, says in [
            (["--held-out", str(clear_dataset)], "--held-out is an option of the INT8 export: give --int8 "
                                                 "too, or leave it out"),
            (["--no-search", "--calibration-images", "8", "--sensitivity-images", "4"],
             "--no-search, --calibration-images, --sensitivity-images are options of the INT8 export"),
            (["--format", "tensorrt", "--int8", "--no-openvino"],
             "--int8, --no-openvino are not options of --format tensorrt (an FP16 engine built from "
             "model.onnx; it takes --data, --threads, --opset): leave them out")]:
        assert main(["export", str(bundle), *argv]) == 1
        assert f"diffqc: error: {says}" in capsys.readouterr().err
        assert sorted(p.name for p in bundle.iterdir()) == before


@pytest.mark.gpu
def test_tensorrt_fp16_engine(exported: Path, test_images: tuple) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("tensorrt")
    from diffqc.backends.tensorrt import TensorRTGraph

    engine = ex.build_tensorrt_engine(exported / "model.onnx", exported / ex.TENSORRT_ENGINE, input_size=64)
    trt_graph = TensorRTGraph(engine)
    import onnx

    cpu = OnnxGraph(onnx.load(str(exported / "model.onnx")), threads=1)
    pixels = preprocess(test_images[0][:4], 64)
    idx = np.zeros(4, dtype=np.int64)
    _, ref = cpu.run(pixels, idx)
    _, got = trt_graph.run(pixels, idx)
    np.testing.assert_allclose(got, ref, rtol=2e-2)


def test_inspect_command_runs_either_runtime(exported: Path, clear_dataset: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = next((clear_dataset / "dots" / "test").iterdir())
    rows = {}
    for runtime in ("torch", "onnx"):
        assert main(["inspect", str(exported), str(folder), "--feature-type", "dots",
                     "--runtime", runtime, "--threads", "1"]) == 0
        rows[runtime] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows["onnx"]) == len(rows["torch"]) > 0
    assert [r["decision"] for r in rows["onnx"]] == [r["decision"] for r in rows["torch"]]
    np.testing.assert_allclose([r["score"] for r in rows["onnx"]], [r["score"] for r in rows["torch"]],
                               rtol=1e-4)


def test_service_on_the_onnx_runtime(exported: Path, clear_dataset: Path, tmp_path: Path) -> None:
    """``diffqc serve --runtime onnx``: the lifespan loads the bundle with ONNX Runtime, and every
    accepted part gets the same decision as PyTorch gives it, stored."""
    asyncio.run(_service_on_the_onnx_runtime(exported, clear_dataset, tmp_path))


async def _service_on_the_onnx_runtime(exported: Path, clear_dataset: Path, tmp_path: Path) -> None:
    import httpx

    from diffqc.data import decode_image
    from diffqc.service.app import ServiceSettings, create_app

    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"][::7][:3]
    bodies = [Path(s.path).read_bytes() for s in samples]
    images, types = [decode_image(b) for b in bodies], [s.feature_type for s in samples]
    settings = ServiceSettings(model_path=exported, runtime="onnx", torch_threads=1,
                               db_url=str(tmp_path / "r.db"), allow_no_token=True)
    app = create_app(settings)
    expected = Detector.load(exported, device="cpu").inspect(images[:3], types[:3])
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)
    async with app.router.lifespan_context(app), client:
        info = (await client.get("/v1/model")).json()
        assert info["runtime"] == "onnx" and info["precision"] == "fp32"
        for body, ftype, ref in zip(bodies, types, expected, strict=True):
            r = await client.post("/v1/inspect", content=body, params={"feature_type": ftype})
            assert r.status_code == 200, r.text
            assert r.json()["decision"] == ref.decision
            assert r.json()["score"] == pytest.approx(ref.score, rel=1e-4)
        assert len(app.state.diffqc.store.query(limit=None)) == 3


def test_onnx_process_never_imports_torch(exported: Path, clear_dataset: Path) -> None:
    """Choosing the runtime (`--runtime auto`) and inspecting with ONNX Runtime keep PyTorch out
    of the process (its import alone costs ~270 MB of serving memory)."""
    import subprocess
    import sys

    from diffqc.runtime import _nvidia_driver_loaded

    if _nvidia_driver_loaded():
        pytest.skip("an NVIDIA driver is loaded: auto asks PyTorch whether CUDA is usable")
    image = next((clear_dataset / "dots" / "test").rglob("*.png"))
    code = ("import sys\nfrom diffqc.data import read_image\n"
            "from diffqc.runtime import choose_runtime, load_detector\n"
            f"choice = choose_runtime({str(exported)!r})\n"
            f"det = load_detector({str(exported)!r}, 'onnx', threads=1)\n"
            f"(r,) = det.inspect([read_image({str(image)!r})], ['dots'])\n"
            "print(choice.runtime, type(det).__name__, r.decision, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    choice, name, decision, torch_loaded = out.split()
    assert choice in ("onnx", "openvino", "torch") and name == "OnnxDetector"
    assert decision in ("PASS", "REVIEW", "REJECT")
    assert torch_loaded == "False"


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_baselines_export_through_the_cli(method: str, clear_dataset: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """PaDiM and PatchCore bundles take the same graph, parity gate and runtimes as the
    diffusion model: the export passes its FP32 check against PyTorch and the ONNX Runtime
    detector reproduces PyTorch's inspection, known and unknown type."""
    det = Detector(tiny_config(method), device="cpu")
    det.fit(load_dataset(clear_dataset), progress=False)
    bundle = det.save(tmp_path / method)
    rc = main(["export", str(bundle), "--data", str(clear_dataset), "--threads", "1", "--check-images", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    info = read_export_info(bundle)
    assert info["fp32"]["parity_vs_torch"]["passed"] and json.loads(out.strip().splitlines()[-1])["files"]
    runtimes = ["onnx"]
    if "version" in info["openvino"]:  # OpenVINO installed: checked by the same gate
        assert info["openvino"]["fp32"]["parity_vs_torch"]["passed"]
        runtimes.append("openvino")
    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"][::3]
    images, samples, _ = read_images(samples)
    types = [s.feature_type for s in samples]
    for runtime in runtimes:
        onx = load_detector(bundle, runtime, threads=1)
        assert isinstance(onx, OnnxDetector) and onx.runtime == runtime
        for feature_types in (types, [None] * len(types)):
            ref = det.inspect(images, feature_types, all_types=False)
            got = onx.inspect(images, feature_types, all_types=False)
            assert [r.feature_type for r in got] == [r.feature_type for r in ref] == types
            assert [r.decision for r in got] == [r.decision for r in ref]
            np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-4)


class _PixelMeanGraph(ex.SplitGraph):
    """A stand-in graph whose score is the image's mean pixel value (negated for type 1 when
    ``flip_b``: its ranking reversed)."""

    def __init__(self, flip_b: bool = False) -> None:
        self.flip_b = flip_b

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.mean(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)

    def score_batch(self, feats: np.ndarray, type_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = feats.reshape(-1) * np.where(self.flip_b & (type_idx == 1), -1.0, 1.0)
        return np.zeros((len(scores), 4, 4), np.float32), scores.astype(np.float32)


def test_int8_parity_gate_needs_every_type_measured() -> None:
    """The gate checks each type, not the pooled or the measurable ones only: a type without
    defective held-out images (or none at all) fails it even when every measured type is
    perfect, and one type's loss fails it though the other type loses nothing."""
    from diffqc.calibration import Calibrator
    from diffqc.config import CalibrationConfig
    from diffqc.data import Sample

    cal = Calibrator(CalibrationConfig(min_per_type=1)).fit({"a": [0.1, 0.2], "b": [0.1, 0.2]}, warn=False)
    levels = {("a", GOOD): [0.1, 0.2, 0.3], ("a", 1): [0.6, 0.7], ("b", GOOD): [0.15, 0.25, 0.35],
              ("b", 1): [0.5, 0.8]}

    def held(keys: list[tuple[str, int]]) -> tuple[list[Sample], list[np.ndarray]]:
        pairs = [(Sample(Path(f"{t}{lab}{v}.png"), t, lab), np.full((8, 8, 3), v, np.float32))
                 for t, lab in keys for v in levels[(t, lab)]]
        return [s for s, _ in pairs], [img for _, img in pairs]

    same = _PixelMeanGraph()
    samples, images = held([("a", GOOD), ("a", 1), ("b", GOOD)])  # no defective b
    report = ex.parity_report(same, same, samples, images, ["a", "b"], cal, cal, 4)
    assert report["per_type"]["a"]["auroc_drop"] == 0.0 and report["types_without_auroc"] == ["b"]
    assert not report["passed"] and not report["auroc_measured"]
    assert "could not be measured on type(s) b" in ex.format_parity_report(report)
    samples, images = held(list(levels))
    assert ex.parity_report(same, same, samples, images, ["a", "b"], cal, cal, 4)["passed"]
    absent = ex.parity_report(same, same, samples, images, ["a", "b", "c"], cal, cal, 4)
    assert absent["types_without_auroc"] == ["c"] and not absent["passed"]  # a type never held out
    worse = ex.parity_report(same, _PixelMeanGraph(flip_b=True), samples, images, ["a", "b"], cal, cal, 4)
    assert worse["per_type"]["a"]["auroc_drop"] == 0.0 and worse["per_type"]["b"]["auroc_drop"] == 1.0
    assert worse["max_auroc_drop"] == 1.0 and not worse["passed"]
    assert "loses +1.0000 AUROC on a type" in ex.format_parity_report(worse)
