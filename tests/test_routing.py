"""The type router (diffqc.routing): a part of unknown type is scored under the router's
candidates only, picks the type as the known-type mode would, and the router travels in the
bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from diffqc import routing
from diffqc.calibration import Calibrator
from diffqc.config import CalibrationConfig, DetectorConfig, with_overrides
from diffqc.data import GOOD, load_dataset, read_images
from diffqc.errors import BundleError, ConfigError
from diffqc.inspection import sha256_file
from diffqc.model import Detector
from diffqc.synth import FEATURE_TYPES, write_synthetic_dataset

from .conftest import tiny_config


def _blobs(n_per_type: int, n_types: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature maps ``[N, 6, 4, 4]`` whose per-channel means and spreads depend on the type."""
    rng = np.random.default_rng(seed)
    centre = np.random.default_rng(99).normal(0, 1.0, (n_types, 6))
    spread = np.random.default_rng(98).uniform(0.5, 1.5, (n_types, 6))
    y = np.repeat(np.arange(n_types), n_per_type)
    x = centre[y][:, :, None, None] + spread[y][:, :, None, None] * rng.normal(0, 1, (len(y), 6, 4, 4))
    return x.astype(np.float32), y


def test_router_is_lda_on_pooled_features() -> None:
    x, y = _blobs(40, 3, seed=0)
    router = routing.TypeRouter.fit(x, y, 3)
    # the same log-likelihoods from the textbook LDA formula on unit-variance pooled features
    p = routing.pool(x)
    scale = p.std(axis=0)
    z = p / scale
    means = np.stack([z[y == t].mean(axis=0) for t in range(3)])
    cov = routing._ledoit_wolf(z - means[y])
    cov += 1e-6 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    prec = np.linalg.inv(cov)
    d = np.array([[(zi - m) @ prec @ (zi - m) for m in means] for zi in z])
    np.testing.assert_allclose(router.log_likelihood(x), -0.5 * d, rtol=1e-4, atol=1e-3)
    test_x, test_y = _blobs(30, 3, seed=1)
    assert np.mean(router.candidates(test_x, 1)[:, 0] == test_y) >= 0.95
    cand = router.candidates(test_x, 2)
    assert cand.shape == (90, 2) and (cand[:, 0] != cand[:, 1]).all()
    assert router.candidates(test_x, 9).shape == (90, 3)  # never more than the types


def test_router_with_one_image_per_type_routes_by_nearest_mean() -> None:
    # no within-type scatter at all: the covariance is zero; the router must still fit (it used to
    # raise numpy's LinAlgError) and name each training image's own type
    x, y = _blobs(1, 4, seed=0)
    router = routing.TypeRouter.fit(x, y, 4)
    assert np.isfinite(router.whiten).all()
    assert (router.candidates(x, 1)[:, 0] == y).all()


def test_router_needs_every_type() -> None:
    x, y = _blobs(5, 2, seed=0)
    with pytest.raises(ValueError, match="every one of 3 types"):
        routing.TypeRouter.fit(x, y, 3)


def test_router_state_round_trip_and_mismatch() -> None:
    x, y = _blobs(10, 2, seed=0)
    router = routing.TypeRouter.fit(x, y, 2)
    back = routing.TypeRouter.from_state(router.state(), 2, 6)
    assert back is not None
    np.testing.assert_array_equal(back.log_likelihood(x), router.log_likelihood(x))
    assert routing.TypeRouter.from_state({}, 2, 6) is None  # a bundle from before the router
    with pytest.raises(ValueError, match="does not fit 3 types"):
        routing.TypeRouter.from_state(router.state(), 3, 6)


def test_choose_takes_the_largest_known_type_p_value() -> None:
    cal = Calibrator(CalibrationConfig(min_per_type=1)).fit(
        {"a": np.linspace(0, 1, 19), "b": np.linspace(10, 20, 19)}, warn=False)
    classes = ["a", "b"]
    cand = np.array([[0, 1], [0, 1], [1, 0]])
    # raw 5.0 is far above a's GOOD scores but low for b: b wins though its raw score is larger
    scores = np.array([[5.0, 12.0], [0.05, 19.5], [15.0, 15.0]])
    np.testing.assert_array_equal(routing.choose(cand, scores, cal, classes), [1, 0, 0])
    # a tie (below every GOOD calibration score of both: p = 1 twice) goes to the router's first
    assert cal.p_value("a", -100.0) == cal.p_value("b", -100.0) == 1.0
    np.testing.assert_array_equal(routing.choose(np.array([[1, 0], [0, 1]]), np.full((2, 2), -100.0),
                                                 cal, classes), [0, 0])
    np.testing.assert_array_equal(routing.choose(cand[:, :1], scores[:, :1], cal, classes), [0, 0, 0])


def test_route_and_score_scores_only_what_it_needs() -> None:
    x, y = _blobs(20, 4, seed=0)
    router = routing.TypeRouter.fit(x, y, 4)
    cal = Calibrator(CalibrationConfig(min_per_type=1)).fit({t: [0.0, 1.0] for t in "abcd"}, warn=False)
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    test_x, test_y = x[::5], y[::5]

    def score(image: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append((image, kind))
        return image * 10 + kind, (kind != test_y[image]).astype(np.float64)  # 0 under the true type

    given: list[int | None] = [None] * len(test_y)
    for m in (1, 2, 3):
        calls.clear()
        routed, maps = routing.route_and_score(given, lambda: test_x, router, m, 4, score, cal, "abcd",
                                               all_types=False)
        assert len(calls) == 1 and len(calls[0][0]) == m * len(test_y)  # one pass, m rows per image
        assert routed.own == test_y.tolist() and routed.predicted == test_y.tolist()
        assert routed.table is None and routed.scores == [0.0] * len(test_y)
        np.testing.assert_array_equal(maps[routed.own_rows], np.arange(len(test_y)) * 10 + test_y)
    calls.clear()
    routed, _ = routing.route_and_score(test_y.tolist(), lambda: test_x, router, 2, 4, score, cal, "abcd",
                                        all_types=False)
    assert len(calls[0][0]) == len(test_y) and routed.predicted == [None] * len(test_y)
    routed, _ = routing.route_and_score(test_y.tolist(), lambda: test_x, router, 1, 4, score, cal, "abcd",
                                        all_types=True)
    assert routed.table is not None and routed.table.shape == (len(test_y), 4)
    assert routed.predicted == test_y.tolist()
    # no router (a bundle from before it): known types still work, unknown ones are refused
    routing.route_and_score(test_y.tolist(), lambda: test_x, None, 1, 4, score, cal, "abcd", all_types=True)
    with pytest.raises(BundleError, match="no type router"):
        routing.route_and_score([None], lambda: test_x[:1], None, 1, 4, score, cal, "abcd", all_types=False)


def test_type_candidates_is_validated() -> None:
    assert DetectorConfig().scoring.type_candidates == 1
    assert with_overrides(DetectorConfig(), {"scoring.type_candidates": 2}).scoring.type_candidates == 2
    with pytest.raises(ConfigError, match=r"scoring\.type_candidates"):
        with_overrides(DetectorConfig(), {"scoring.type_candidates": 0})


# ----------------------------------------------------------------------------- with a detector
@pytest.fixture(scope="module")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "set"
    write_synthetic_dataset(root, n_parts=12 * len(FEATURE_TYPES), image_size=64, progress=False)
    return root


def test_router_recognises_synthetic_types(small_synth: Path) -> None:
    """Fitted on the GOOD training parts of 8 synthetic types (train.steps=0: no training),
    the router names the type of every held-out test part, GOOD or defective."""
    det = Detector(tiny_config("diffusion", **{"train.steps": 0}), device="cpu")
    samples = load_dataset(small_synth)
    det.fit(samples, progress=False)
    summary = det.metadata["type_router"]
    assert summary["used"] and summary["calibration_images"] >= len(FEATURE_TYPES)
    test = [s for s in samples if s.split == "test"]
    res, kept = det.inspect_samples(test, type_known=False, maps=False, all_types=False)
    acc = np.mean([r.feature_type == s.feature_type for r, s in zip(res, kept, strict=True)])
    assert len(kept) >= 2 * len(FEATURE_TYPES) and acc >= 0.95


def test_unknown_type_equals_known_type_when_routed_right(tiny_model: Path, clear_dataset: Path,
                                                          tmp_path: Path) -> None:
    det = Detector.load(tiny_model, device="cpu")
    assert det.router_ is not None
    assert det.metadata["type_router"]["top1_accuracy"] == 1.0  # so unknown calibration = known
    samples = [s for s in load_dataset(clear_dataset) if s.split == "test"]
    images, samples, _ = read_images(samples)
    types = [s.feature_type for s in samples]
    known = det.inspect(images, types, all_types=False)
    unknown = det.inspect(images, [None] * len(images), all_types=False)
    assert [r.feature_type for r in unknown] == types and all(not r.type_known for r in unknown)
    assert [r.predicted_type for r in unknown] == types
    for a, b in zip(unknown, known, strict=True):
        assert a.score == b.score and a.p_value == pytest.approx(b.p_value) and a.decision == b.decision
        assert a.anomaly_map is not None and b.anomaly_map is not None
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    # the diagnostic table path picks the same type and score
    slow = det.inspect(images, [None] * len(images), all_types=True, maps=False)
    assert [r.feature_type for r in slow] == types
    np.testing.assert_allclose([r.score for r in slow], [r.score for r in known], rtol=1e-5)
    # the router travels in the bundle
    again = Detector.load(det.save(tmp_path / "copy"), device="cpu")
    assert again.router_ is not None
    np.testing.assert_array_equal(again.router_.whiten, det.router_.whiten)
    np.testing.assert_array_equal(again.router_.means, det.router_.means)
    assert [r.score for r in again.inspect(images, [None] * len(images), all_types=False)] == \
        [r.score for r in unknown]


def test_bundle_without_router_refuses_unknown_type_only(tiny_model: Path, clear_dataset: Path,
                                                         tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_model, old)
    weights = old / "weights.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("router.")}
    save_file(tensors, str(weights), metadata={"format": "3"})
    meta = json.loads((old / "metadata.json").read_text())
    meta["weights_file_sha256"] = sha256_file(weights)
    (old / "metadata.json").write_text(json.dumps(meta))
    det = Detector.load(old, device="cpu")
    assert det.router_ is None
    sample = next(s for s in load_dataset(clear_dataset) if s.split == "test" and s.label == GOOD)
    images, _, _ = read_images([sample])
    (r,) = det.inspect(images, [sample.feature_type])  # known type: as before
    assert r.feature_type == sample.feature_type and r.predicted_type is None and r.type_scores
    with pytest.raises(BundleError, match=r"no type router.*give each part's feature type"):
        det.inspect(images, [None])
