"""PatchCore / PaDiM feature-space scorers: shapes, references, per-type state, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import ledoit_wolf

from diffqc.baselines import (
    PaDiMConfig,
    PaDiMScorer,
    PatchCoreConfig,
    PatchCoreScorer,
    greedy_coreset,
    ledoit_wolf_batched,
    load_scorer,
    nearest_neighbor_distances,
    random_projection,
    scorer_for,
)
from diffqc.config import DetectorConfig


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _features(n: int, c: int = 6, h: int = 5, w: int = 4, seed: int = 0, noise: int = 100) -> torch.Tensor:
    """GOOD features of one type: a per-location pattern (from ``seed``) plus noise."""
    pattern = torch.randn(1, c, h, w, generator=_gen(seed))
    return pattern + 0.3 * torch.randn(n, c, h, w, generator=_gen(seed + noise))


def _scorers() -> list[PatchCoreScorer | PaDiMScorer]:
    return [PatchCoreScorer(PatchCoreConfig(coreset_ratio=0.25)), PaDiMScorer(PaDiMConfig())]


def _clusters(n_clusters: int = 12, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated tight clusters of very unequal sizes; returns points and cluster labels."""
    g = _gen(3)
    centres = 20.0 * torch.randn(n_clusters, dim, generator=g)
    sizes = [200 if i % 3 == 0 else 3 for i in range(n_clusters)]
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    points = centres[labels] + 0.05 * torch.randn(labels.numel(), dim, generator=g)
    return points, labels


def _coverage_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(dim=1).values.max())


# -------------------------------------------------------------------------------- configs


def test_configs_json_round_trip() -> None:
    pc = PatchCoreConfig(coreset_ratio=0.2, projection_dim=64, max_bank=123, seed=4, chunk=999)
    pd = PaDiMConfig(dims=7, seed=3)
    assert PatchCoreConfig.from_dict(json.loads(json.dumps(pc.to_dict()))) == pc
    assert PaDiMConfig.from_dict(json.loads(json.dumps(pd.to_dict()))) == pd
    with pytest.raises(ValueError, match="unknown keys"):
        PaDiMConfig.from_dict({"dims": 3, "dimz": 4})
    with pytest.raises(ValueError):
        PatchCoreConfig(coreset_ratio=0.0)


# -------------------------------------------------------------------------------- shared contract


@pytest.mark.parametrize("scorer", _scorers(), ids=["patchcore", "padim"])
def test_shapes_and_finite(scorer: PatchCoreScorer | PaDiMScorer) -> None:
    feats = _features(24)
    types = torch.arange(24) % 2
    scorer.fit(feats, types, 2)
    test = _features(5, noise=9)
    maps = scorer.score_maps(test, torch.tensor([0, 1, 1, 0, 1]))
    assert maps.shape == (5, 5, 4)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert (maps >= 0).all()
    assert scorer.score_maps(test[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 5, 4)


@pytest.mark.parametrize("scorer", _scorers(), ids=["patchcore", "padim"])
def test_planted_anomaly_scores_highest(scorer: PatchCoreScorer | PaDiMScorer) -> None:
    feats = _features(40)
    scorer.fit(feats, torch.zeros(40, dtype=torch.long), 1)
    test = _features(3, noise=11)
    test[1, :, 3, 2] += 3.0
    maps = scorer.score_maps(test, torch.zeros(3, dtype=torch.long))
    flat_argmax = int(maps[1].flatten().argmax())
    assert divmod(flat_argmax, 4) == (3, 2)
    assert maps[1, 3, 2] > maps[0].max() and maps[1, 3, 2] > maps[2].max()


@pytest.mark.parametrize("scorer", _scorers(), ids=["patchcore", "padim"])
def test_per_type_state(scorer: PatchCoreScorer | PaDiMScorer) -> None:
    a = _features(30, seed=1)
    b = _features(30, seed=2) + 2.0  # a different per-location pattern and level
    types = torch.cat([torch.zeros(30), torch.ones(30)]).long()
    scorer.fit(torch.cat([a, b]), types, 2)
    test_a = _features(4, seed=1, noise=7)
    under_a = scorer.score_maps(test_a, torch.zeros(4, dtype=torch.long))
    under_b = scorer.score_maps(test_a, torch.ones(4, dtype=torch.long))
    assert (under_b.mean(dim=(1, 2)) > 2 * under_a.mean(dim=(1, 2))).all()


@pytest.mark.parametrize("scorer", _scorers(), ids=["patchcore", "padim"])
def test_state_round_trip_through_safetensors(scorer: PatchCoreScorer | PaDiMScorer, tmp_path: Path) -> None:
    feats = _features(20, c=12)
    types = torch.tensor([0, 1, 2, 2] * 5)
    scorer.fit(feats, types, 3, progress=True)
    test = _features(6, c=12, seed=5)
    test_types = torch.tensor([2, 1, 0, 0, 1, 2])
    path = tmp_path / "state.safetensors"
    save_file(scorer.state_tensors(), str(path))
    restored = type(scorer).from_state(scorer.config, load_file(str(path)), 3, 12)  # type: ignore[arg-type]
    assert torch.equal(restored.score_maps(test, test_types), scorer.score_maps(test, test_types))


@pytest.mark.parametrize("scorer", _scorers(), ids=["patchcore", "padim"])
def test_errors(scorer: PatchCoreScorer | PaDiMScorer) -> None:
    feats = _features(6)
    with pytest.raises(RuntimeError, match="not fitted"):
        scorer.score_maps(feats, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="no GOOD images"):
        scorer.fit(feats, torch.zeros(6, dtype=torch.long), 2)
    scorer.fit(feats, torch.zeros(6, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="channels"):
        scorer.score_maps(feats[:, :5], torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="type_idx"):
        scorer.score_maps(feats, torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError):
        type(scorer).from_state(scorer.config, scorer.state_tensors(), 2, 6)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_detector_glue(method: str) -> None:
    config = DetectorConfig(method=method)
    scorer = scorer_for(config)
    assert isinstance(scorer, PatchCoreScorer if method == "patchcore" else PaDiMScorer)
    assert scorer.config.seed == 0
    feats = _features(8)
    types = torch.arange(8) % 2
    scorer.fit(feats, types, 2)
    restored = load_scorer(config, scorer.state_tensors(), 2, 6)
    assert torch.equal(restored.score_maps(feats, types), scorer.score_maps(feats, types))
    with pytest.raises(ValueError, match="no baseline"):
        scorer_for(DetectorConfig(method="diffusion"))


# -------------------------------------------------------------------------------- PatchCore


def test_greedy_coreset_covers_clustered_data() -> None:
    points, labels = _clusters()
    k = 12
    chosen = greedy_coreset(points, k, start=0)
    assert chosen.unique().numel() == k
    # one pick per cluster, small clusters included: within-cluster radius only
    assert sorted(labels[chosen].tolist()) == list(range(12))
    greedy_radius = _coverage_radius(points, chosen)
    for seed in range(5):
        random_pick = torch.randperm(points.shape[0], generator=_gen(seed))[:k]
        assert greedy_radius <= _coverage_radius(points, random_pick)


def _textbook_greedy(points: torch.Tensor, k: int, start: int) -> list[int]:
    """Reference greedy k-center in float64: recompute every distance after every pick."""
    x = points.double()
    chosen = [start]
    while len(chosen) < k:
        chosen.append(int(torch.cdist(x, x[chosen]).min(dim=1).values.argmax()))
    return chosen


def test_greedy_coreset_equals_textbook_greedy() -> None:
    g = _gen(5)
    points = torch.randn(1500, 8, generator=g) * torch.linspace(3.0, 0.5, 8)
    expected = _textbook_greedy(points, 120, start=11)
    # few candidates: many batched catch-ups; more candidates than points: no catch-up at all
    for candidates in (4, 64, 512, 10_000):
        got = greedy_coreset(points, 120, start=11, candidates=candidates)
        assert got.tolist() == expected, candidates


def test_greedy_coreset_first_picks_far_apart() -> None:
    points = torch.randn(300, 5, generator=_gen(1))
    chosen = greedy_coreset(points, 20, start=7)
    assert int(chosen[0]) == 7
    assert int(chosen[1]) == int(torch.cdist(points[7:8], points).argmax())
    # each pick is at least the final coverage radius away from all earlier picks
    radius = _coverage_radius(points, chosen)
    picked = points[chosen]
    pairwise = torch.cdist(picked, picked) + torch.eye(20) * 1e9
    assert float(pairwise.min()) >= radius - 1e-5
    assert greedy_coreset(points, 0).shape == (0,)
    # k at or above the number of points: every point, once
    assert sorted(greedy_coreset(points[:10], 50).tolist()) == list(range(10))


def test_random_projection_keeps_distances_roughly() -> None:
    x = torch.randn(50, 400, generator=_gen(2))
    y = random_projection(x, 128, _gen(0))
    assert y.shape == (50, 128)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.4
    assert random_projection(x[:, :100], 128, _gen(0)).shape == (50, 100)


def test_nearest_neighbor_distance_matches_brute_force() -> None:
    g = _gen(4)
    queries = torch.randn(97, 16, generator=g)
    bank = torch.randn(41, 16, generator=g)
    queries[5] = bank[3]  # an exact match: distance 0, no cancellation residue
    reference = (queries.double()[:, None] - bank.double()[None]).square().sum(-1).min(1).values
    for chunk in (7, 41 * 5, 1 << 20):  # bank tiles of 7 or all 41 rows, 1-5-all query rows
        got = nearest_neighbor_distances(queries, bank, chunk=chunk)
        torch.testing.assert_close(got.double(), reference.sqrt(), rtol=1e-5, atol=1e-6)
    assert float(nearest_neighbor_distances(queries, bank)[5]) == 0.0


def test_patchcore_maps_equal_brute_force_over_bank() -> None:
    feats = _features(16, c=20)
    types = torch.arange(16) % 2
    scorer = PatchCoreScorer(PatchCoreConfig(coreset_ratio=0.3, projection_dim=8, chunk=50))
    scorer.fit(feats, types, 2)
    assert scorer.banks is not None
    assert [b.shape[0] for b in scorer.banks] == [48, 48]  # ceil(0.3 * 8 images * 20 locations)
    test = _features(3, c=20, seed=8)
    test_types = torch.tensor([1, 0, 1])
    maps = scorer.score_maps(test, test_types)
    for i in range(3):
        q = test[i].permute(1, 2, 0).reshape(-1, 20).double()
        bank = scorer.banks[int(test_types[i])].double()
        ref = torch.cdist(q, bank).min(dim=1).values.reshape(5, 4)
        torch.testing.assert_close(maps[i].double(), ref, rtol=1e-5, atol=1e-5)


def test_patchcore_full_ratio_keeps_all_patches_and_good_scores_zero() -> None:
    feats = _features(4)
    scorer = PatchCoreScorer(PatchCoreConfig(coreset_ratio=1.0))
    scorer.fit(feats, torch.zeros(4, dtype=torch.long), 1)
    assert scorer.banks is not None and scorer.banks[0].shape == (80, 6)
    assert float(scorer.score_maps(feats, torch.zeros(4, dtype=torch.long)).abs().max()) == 0.0


def test_patchcore_candidate_pool_and_max_bank_caps() -> None:
    feats = _features(10)
    config = PatchCoreConfig(coreset_ratio=0.5, max_bank=30, candidate_pool=60)
    scorer = PatchCoreScorer(config).fit(feats, torch.zeros(10, dtype=torch.long), 1)
    assert scorer.banks is not None and scorer.banks[0].shape == (30, 6)
    # bank rows are genuine patches of the training features
    patches = feats.permute(0, 2, 3, 1).reshape(-1, 6)
    gap = (scorer.banks[0][:, None] - patches[None]).abs().sum(dim=2).min(dim=1).values
    assert float(gap.max()) == 0.0
    again = PatchCoreScorer(config).fit(feats, torch.zeros(10, dtype=torch.long), 1)
    assert again.banks is not None and torch.equal(again.banks[0], scorer.banks[0])


# -------------------------------------------------------------------------------- PaDiM


@pytest.mark.parametrize(("n", "p"), [(50, 10), (8, 20), (200, 3)])
def test_ledoit_wolf_matches_sklearn(n: int, p: int) -> None:
    x = torch.randn(3, n, p, generator=_gen(n + p), dtype=torch.float64)
    x[1] *= torch.linspace(0.1, 3.0, p, dtype=torch.float64)  # anisotropic
    x[2] += 5.0  # non-zero mean
    mean, cov, shrinkage = ledoit_wolf_batched(x)
    for b in range(3):
        ref_cov, ref_shrinkage = ledoit_wolf(x[b].numpy())
        np.testing.assert_allclose(cov[b].numpy(), ref_cov, rtol=1e-5, atol=1e-7)
        assert abs(float(shrinkage[b]) - ref_shrinkage) < 1e-5
        np.testing.assert_allclose(mean[b].numpy(), x[b].numpy().mean(0), rtol=1e-6, atol=1e-9)
    # float32 input also lands within 1e-5 of the float64 reference
    cov32 = ledoit_wolf_batched(x.float())[1]
    np.testing.assert_allclose(cov32[0].numpy(), ledoit_wolf(x[0].numpy())[0], atol=1e-5)


def test_padim_mahalanobis_matches_scipy() -> None:
    feats = _features(30, c=5)
    scorer = PaDiMScorer(PaDiMConfig(dims=8)).fit(feats, torch.zeros(30, dtype=torch.long), 1)
    test = _features(2, c=5, noise=3)
    maps = scorer.score_maps(test, torch.zeros(2, dtype=torch.long))
    for i, y, x in [(0, 0, 0), (1, 2, 3), (0, 4, 1)]:
        samples = feats[:, :, y, x].double().numpy()
        cov, _ = ledoit_wolf(samples)
        ref = mahalanobis(test[i, :, y, x].double().numpy(), samples.mean(0), np.linalg.inv(cov))
        assert abs(float(maps[i, y, x]) - ref) < 1e-4 * max(1.0, ref)


def test_padim_random_channel_subset() -> None:
    scorer = PaDiMScorer(PaDiMConfig(dims=4, seed=1))
    subset = scorer.select_channels(10)
    assert subset.shape == (4,) and subset.unique().numel() == 4
    assert torch.equal(subset, subset.sort().values) and int(subset.max()) < 10
    assert torch.equal(subset, PaDiMScorer(PaDiMConfig(dims=4, seed=1)).select_channels(10))
    assert torch.equal(scorer.select_channels(3), torch.arange(3))
    scorer.fit(_features(12, c=10), torch.zeros(12, dtype=torch.long), 1)
    state = scorer.state_tensors()
    assert state["mean"].shape == (1, 5, 4, 4) and state["precision"].shape == (1, 5, 4, 4, 4)
    # channels outside the subset do not influence the score
    test = _features(2, c=10, seed=4)
    changed = test.clone()
    outside = [c for c in range(10) if c not in subset.tolist()]
    changed[:, outside] += 10.0
    types = torch.zeros(2, dtype=torch.long)
    assert torch.equal(scorer.score_maps(test, types), scorer.score_maps(changed, types))
