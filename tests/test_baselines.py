"""PatchCore / PaDiM feature-space scorers: shapes, references, per-type state, round trips,
the published coreset and image scores, and separation of the clear dataset through the Detector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score

from diffqc.baselines import (
    PaDiMScorer,
    PatchCoreScorer,
    greedy_coreset,
    ledoit_wolf_batched,
    load_scorer,
    nearest_neighbors,
    random_projection,
    scorer_for,
)
from diffqc.config import DetectorConfig, PaDiMConfig, PatchCoreConfig, with_overrides
from diffqc.errors import ConfigError


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
    pc = PatchCoreConfig(coreset_ratio=0.2, projection_dim=64, max_bank=123, neighbors=3,
                         aggregation="topk", seed=4, chunk=999)
    pd = PaDiMConfig(dims=7, covariance="ledoit_wolf", epsilon=1e-4, aggregation="topk", seed=3)
    config = DetectorConfig(patchcore=pc, padim=pd)
    assert DetectorConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match=r"padim\.dimz"):
        DetectorConfig.from_dict({"padim": {"dims": 3, "dimz": 4}})
    with pytest.raises(ConfigError, match=r"patchcore\.coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0.0)
    with pytest.raises(ConfigError, match="reweighted, max, topk"):
        PatchCoreConfig(aggregation="mean")
    with pytest.raises(ConfigError, match="sample, ledoit_wolf"):
        PaDiMConfig(covariance="diag")


def test_published_defaults() -> None:
    pc, pd = PatchCoreConfig(), PaDiMConfig()
    assert (pc.coreset_ratio, pc.max_bank, pc.neighbors, pc.aggregation) == (0.1, 0, 9, "reweighted")
    assert (pd.dims, pd.covariance, pd.epsilon, pd.aggregation) == (100, "sample", 0.01, "max")


def test_every_setting_reaches_the_scorer_from_dotted_overrides() -> None:
    """``--set patchcore.x=...`` / ``--set padim.x=...`` is the one way to set a baseline."""
    pc_over = {"coreset_ratio": 0.01, "projection_dim": 32, "max_bank": 500, "neighbors": 3,
               "aggregation": "topk", "topk": 0.05, "seed": 7, "chunk": 4096}
    config = with_overrides(DetectorConfig(), {"method": "patchcore",
                                               **{f"patchcore.{k}": v for k, v in pc_over.items()}})
    pc_scorer = scorer_for(config)
    assert isinstance(pc_scorer, PatchCoreScorer)
    assert {k: getattr(pc_scorer.config, k) for k in pc_over} == pc_over
    pd_over = {"dims": 20, "covariance": "ledoit_wolf", "epsilon": 1e-3, "aggregation": "topk",
               "topk": 0.02, "seed": 5}
    config = with_overrides(DetectorConfig(), {"method": "padim",
                                               **{f"padim.{k}": v for k, v in pd_over.items()}})
    pd_scorer = scorer_for(config)
    assert isinstance(pd_scorer, PaDiMScorer)
    assert {k: getattr(pd_scorer.config, k) for k in pd_over} == pd_over
    with pytest.raises(ConfigError, match=r"patchcore\.candidate_pool"):
        with_overrides(DetectorConfig(), {"patchcore.candidate_pool": 1000})


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
    reference = (queries.double()[:, None] - bank.double()[None]).square().sum(-1).min(1)
    for chunk in (7, 41 * 5, 1 << 20):  # bank tiles of 7 or all 41 rows, 1-5-all query rows
        got, index = nearest_neighbors(queries, bank, chunk=chunk)
        torch.testing.assert_close(got.double(), reference.values.sqrt(), rtol=1e-5, atol=1e-6)
        assert torch.equal(index, reference.indices)
    assert float(nearest_neighbors(queries, bank)[0][5]) == 0.0


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


def test_patchcore_max_bank_cap() -> None:
    feats = _features(10)
    config = PatchCoreConfig(coreset_ratio=0.5, max_bank=30)
    scorer = PatchCoreScorer(config).fit(feats, torch.zeros(10, dtype=torch.long), 1)
    assert scorer.banks is not None and scorer.banks[0].shape == (30, 6)
    # bank rows are genuine patches of the training features
    patches = feats.permute(0, 2, 3, 1).reshape(-1, 6)
    gap = (scorer.banks[0][:, None] - patches[None]).abs().sum(dim=2).min(dim=1).values
    assert float(gap.max()) == 0.0
    again = PatchCoreScorer(config).fit(feats, torch.zeros(10, dtype=torch.long), 1)
    assert again.banks is not None and torch.equal(again.banks[0], scorer.banks[0])
    assert PatchCoreScorer(PatchCoreConfig(coreset_ratio=0.5)).bank_size(10_000_000) == 5_000_000


def test_patchcore_bank_is_the_greedy_coreset_of_all_patches() -> None:
    """No subsampling before the coreset: the bank is the greedy k-center set of every GOOD
    patch of the type (other types' patches never enter), in the textbook's pick order."""
    feats = _features(30, c=12)  # 30 images x 20 locations
    types = torch.tensor([0, 1] * 15)
    config = PatchCoreConfig(coreset_ratio=0.1, projection_dim=0, seed=2)
    scorer = PatchCoreScorer(config).fit(feats, types, 2)
    assert scorer.banks is not None
    patches = feats[types == 1].permute(0, 2, 3, 1).reshape(-1, 12)  # 300 patches
    start = int(torch.randint(300, (1,), generator=torch.Generator().manual_seed(2 * 1_000_003 + 1)))
    expected = _textbook_greedy(patches, 30, start=start)
    assert torch.equal(scorer.banks[1], patches[expected])


def _bank_scorer(bank: torch.Tensor, neighbors: int) -> PatchCoreScorer:
    state = {"bank": bank, "bank_offsets": torch.tensor([0, bank.shape[0]])}
    return PatchCoreScorer.from_state(PatchCoreConfig(neighbors=neighbors), state, 1, bank.shape[1])


def test_reweighted_score_matches_hand_computation() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    # one image, 1 x 2 locations: q1 = (0.5, 0.1) lies near (0, 0); q2 = (3, 0) is the max patch
    feats = torch.tensor([[0.5, 3.0], [0.1, 0.0]]).reshape(1, 2, 1, 2)
    types = torch.zeros(1, dtype=torch.long)
    scorer = _bank_scorer(bank, neighbors=3)
    patch_maps = scorer.score_maps(feats, types)
    torch.testing.assert_close(patch_maps, torch.tensor([[[math.hypot(0.5, 0.1), 2.0]]]))
    # s* = |q2 - (1, 0)| = 2, m* = (1, 0). The 3 bank entries nearest m*: m* itself, (0, 0) at 1,
    # (0, 2) at sqrt 5 (not (5, 5) at sqrt 41). Their distances to q2: 2, 3, sqrt 13.
    d = [2.0, 3.0, math.sqrt(13.0)]
    expected = (1.0 - math.exp(d[0]) / sum(math.exp(x) for x in d)) * 2.0
    got = scorer.reweighted_scores(feats, types, patch_maps)
    assert got.shape == (1,)
    assert abs(float(got[0]) - expected) < 1e-5
    # b = 1: the plain maximum; b above the bank size: the whole bank is the support
    assert float(_bank_scorer(bank, 1).reweighted_scores(feats, types, patch_maps)[0]) == 2.0
    d4 = [*d, math.sqrt(29.0)]
    expected4 = (1.0 - math.exp(d4[0]) / sum(math.exp(x) for x in d4)) * 2.0
    got4 = _bank_scorer(bank, 9).reweighted_scores(feats, types, patch_maps)
    assert abs(float(got4[0]) - expected4) < 1e-5
    with pytest.raises(ValueError, match="patch_maps"):
        scorer.reweighted_scores(feats, types, patch_maps[:, :, :1])


def test_reweighted_scores_per_type_and_in_blocks() -> None:
    """Many images of two types, a chunk forcing many blocks: each equals its one-image score."""
    feats = _features(24, c=8)
    types = torch.arange(24) % 2
    scorer = PatchCoreScorer(PatchCoreConfig(coreset_ratio=0.3, chunk=64)).fit(feats, types, 2)
    test = _features(7, c=8, seed=3)
    test_types = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    maps = scorer.score_maps(test, test_types)
    together = scorer.reweighted_scores(test, test_types, maps)
    for i in range(7):
        alone = scorer.reweighted_scores(test[i : i + 1], test_types[i : i + 1], maps[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone)
    # the weight is in (0, 1): the score is below the largest patch score, and positive
    top = maps.flatten(1).max(dim=1).values
    assert bool(((together > 0) & (together < top)).all())


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


def test_padim_ledoit_wolf_mahalanobis_matches_scipy() -> None:
    feats = _features(30, c=5)
    config = PaDiMConfig(dims=8, covariance="ledoit_wolf", epsilon=0.0)
    scorer = PaDiMScorer(config).fit(feats, torch.zeros(30, dtype=torch.long), 1)
    test = _features(2, c=5, noise=3)
    maps = scorer.score_maps(test, torch.zeros(2, dtype=torch.long))
    for i, y, x in [(0, 0, 0), (1, 2, 3), (0, 4, 1)]:
        samples = feats[:, :, y, x].double().numpy()
        cov, _ = ledoit_wolf(samples)
        ref = mahalanobis(test[i, :, y, x].double().numpy(), samples.mean(0), np.linalg.inv(cov))
        assert abs(float(maps[i, y, x]) - ref) < 1e-4 * max(1.0, ref)


def test_padim_paper_covariance_matches_scipy() -> None:
    """As published: the unbiased sample covariance plus 0.01 I, Mahalanobis distance."""
    feats = _features(30, c=5)
    scorer = PaDiMScorer(PaDiMConfig(dims=8)).fit(feats, torch.zeros(30, dtype=torch.long), 1)
    test = _features(2, c=5, noise=3)
    maps = scorer.score_maps(test, torch.zeros(2, dtype=torch.long))
    for i, y, x in [(0, 0, 0), (1, 2, 3), (0, 4, 1)]:
        samples = feats[:, :, y, x].double().numpy()
        cov = np.cov(samples, rowvar=False) + 0.01 * np.eye(5)
        ref = mahalanobis(test[i, :, y, x].double().numpy(), samples.mean(0), np.linalg.inv(cov))
        assert abs(float(maps[i, y, x]) - ref) < 1e-4 * max(1.0, ref)
    # a single image has no sample covariance: epsilon alone keeps it invertible, or it fails
    one = PaDiMScorer(PaDiMConfig(dims=8)).fit(feats[:1], torch.zeros(1, dtype=torch.long), 1)
    torch.testing.assert_close(one.score_maps(feats[:1], torch.zeros(1, dtype=torch.long)),
                               torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match=r"padim\.epsilon"):
        PaDiMScorer(PaDiMConfig(epsilon=0.0)).fit(feats[:1], torch.zeros(1, dtype=torch.long), 1)


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


# -------------------------------------------------------------------------------- through the Detector


# anomalib's PaDiM taps of EfficientNet-Lite0: strides 4, 8, 16 (24 + 40 + 112 channels), no pooling
ANOMALIB_TAPS = {"backbone.name": "efficientnet-lite0", "backbone.pool": 1,
                 "backbone.layers": ["blocks.2", "blocks.4", "blocks.10"]}


@pytest.mark.parametrize(("method", "over"), [("patchcore", {}), ("padim", ANOMALIB_TAPS)],
                         ids=["patchcore", "padim-anomalib-taps"])
def test_baselines_separate_the_clear_dataset(method: str, over: dict[str, object],
                                              clear_dataset: Path) -> None:
    """Fitted by the Detector on the GOOD images, each baseline at its published image score
    ranks the big-blob defects above the GOOD test images of both types."""
    from diffqc.data import load_dataset, with_split
    from diffqc.model import Detector
    from tests.conftest import tiny_config

    samples = load_dataset(clear_dataset)
    det = Detector(tiny_config(method, **over), device="cpu").fit(samples, progress=False)
    results, read = det.inspect_samples(with_split(samples, "test"), maps=False)
    labels = [s.label for s in read]
    assert sorted(set(labels)) == [0, 1]
    assert roc_auc_score(labels, [r.score for r in results]) >= 0.95
    feats = det.extract([np.zeros((64, 64, 3), np.float32)])
    idx = torch.zeros(1, dtype=torch.long)
    maps, score = det.maps_and_scores(feats, idx)
    assert det.scorer_ is not None
    if method == "patchcore":  # the paper's score: the re-weighted largest patch score, below it
        assert 0 < float(score[0]) < float(det.scorer_.score_maps(feats, idx).max())
    else:  # stride-4 grid of the 64-pixel input; the score is the max of the smoothed map
        assert det.extractor.channels == 24 + 40 + 112 and det.extractor.grid == (16, 16)
        assert float(score[0]) == float(maps.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_patchcore_on_cuda_matches_the_textbook_and_the_cpu() -> None:
    """The coreset, the maps and the re-weighted scores on CUDA (full FP32 matrix products)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        points = torch.randn(1500, 8, generator=_gen(5)) * torch.linspace(3.0, 0.5, 8)
        expected = _textbook_greedy(points, 120, start=11)
        for candidates in (4, 512):
            got = greedy_coreset(points.cuda(), 120, start=11, candidates=candidates)
            assert got.tolist() == expected, candidates
        feats, types = _features(24, c=8), torch.arange(24) % 2
        config = PatchCoreConfig(coreset_ratio=0.3)
        cpu = PatchCoreScorer(config).fit(feats, types, 2)
        gpu = PatchCoreScorer(config).fit(feats.cuda(), types.cuda(), 2)
        assert cpu.banks is not None and gpu.banks is not None
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.banks, gpu.banks, strict=True))
        test, test_types = _features(5, c=8, seed=3), torch.tensor([0, 1, 1, 0, 1])
        maps_cpu = cpu.score_maps(test, test_types)
        maps_gpu = gpu.score_maps(test.cuda(), test_types.cuda())
        torch.testing.assert_close(maps_gpu.cpu(), maps_cpu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            gpu.reweighted_scores(test.cuda(), test_types.cuda(), maps_gpu).cpu(),
            cpu.reweighted_scores(test, test_types, maps_cpu), rtol=1e-5, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_traced_forms_equal_the_loops_on_mixed_type_batches() -> None:
    """What the exported graph runs (each image's per-type state gathered by its type, banks of
    unequal size padded) equals the per-type loops the Detector runs, on a batch of mixed types."""
    feats = torch.cat([_features(9, seed=1), _features(5, seed=2), _features(7, seed=3)])
    types = torch.tensor([0] * 9 + [1] * 5 + [2] * 7)
    test = torch.cat([_features(3, seed=1, noise=7), _features(3, seed=3, noise=8)])
    test_types = torch.tensor([2, 0, 1, 1, 2, 0])
    padim = PaDiMScorer(PaDiMConfig(dims=4)).fit(feats, types, 3)
    torch.testing.assert_close(padim._maps_gathered(test, test_types), padim.score_maps(test, test_types),
                               rtol=1e-5, atol=1e-5)
    core = PatchCoreScorer(PatchCoreConfig(coreset_ratio=0.5, neighbors=3)).fit(feats, types, 3)
    assert core.banks is not None and len({b.shape[0] for b in core.banks}) == 3  # unequal sizes
    maps = core.score_maps(test, test_types)
    dist, _ = core._gathered_nearest(test.flatten(2).transpose(1, 2), test_types)
    torch.testing.assert_close(dist.reshape(maps.shape), maps, rtol=1e-5, atol=1e-5)
    best, where = maps.flatten(1).max(dim=1)
    torch.testing.assert_close(core._reweighted_gathered(test, test_types, best, where),
                               core.reweighted_scores(test, test_types, maps), rtol=1e-5, atol=1e-5)
