from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from diffqc.config import DetectorConfig, DiffusionConfig, ScoringConfig, with_overrides
from diffqc.diffusion import Denoiser, NoiseSchedule, alpha_bar_of, log_snr
from diffqc.scoring import DiffusionScorer, ScoreBank, aggregate, likelihood_map, upsample_and_smooth


def test_bank_is_seeded_antithetic_and_weighted_in_log_snr() -> None:
    cfg = ScoringConfig(quadrature_nodes=2, noises_per_timestep=2, seed=7)
    ab = alpha_bar_of(DiffusionConfig())
    a = ScoreBank.make(cfg, ab, (50, 800), 16, 4)
    b = ScoreBank.make(cfg, ab, (50, 800), 16, 4)
    assert len(a) == 4 and torch.equal(a.noise, b.noise)
    assert a.timesteps[0] == a.timesteps[1] and a.timesteps[1] < a.timesteps[2] == a.timesteps[3]
    assert torch.equal(a.noise[1], -a.noise[0])
    lam = log_snr(ab)
    # the weights integrate ½ dλ over the trained range
    assert float(a.weights.sum()) == pytest.approx(0.5 * float(lam[50] - lam[800]), rel=1e-6)
    c = ScoreBank.make(ScoringConfig(seed=8), ab, (50, 800), 16, 4)
    assert not torch.equal(a.noise[0], c.noise[0])


def _gaussian_model(d: int, extra: int, locs: int, seed: int,
                    rank: int = 0) -> tuple[Denoiser, Tensor, Tensor, Tensor]:
    """A one-type Denoiser whose Gaussian path is set to a known random SPD Σ (full on the
    first ``d`` channels of the prior order, diagonal on ``extra`` more), shared by all
    locations; returns the model, μ, Σ (full C x C, prior order) and the diagonal variances.
    With 0 < ``rank`` < d the full block is Σ_r = V diag(λ) Vᵀ + σ²(I − V Vᵀ), V of ``rank``
    random orthonormal columns (``diffusion.prior_rank``)."""
    g = torch.Generator().manual_seed(seed)
    c = d + extra
    cfg = DiffusionConfig(hidden=16, depth=1, embed_dim=8, prior_dims=d, prior_rank=rank)
    m = Denoiser(c, 1, locs, cfg).eval()
    r = m.prior_rank
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    vals = 0.2 + 4.8 * torch.rand(r, generator=g, dtype=torch.float64)
    var = 0.5 + 1.5 * torch.rand(extra, generator=g, dtype=torch.float64)
    mu = torch.randn(c, generator=g, dtype=torch.float64)
    rest = 0.3  # the discarded directions' variance when r < d
    with torch.no_grad():
        m.prior_mean[:] = mu.float()
        m.prior_var[..., d:] = var.float()
        m.prior_vecs[:] = q[:, :r].float()
        m.prior_vals[:] = vals.float()
        if m.low_rank:
            m.prior_rest.fill_(rest)
    sigma = torch.zeros(c, c, dtype=torch.float64)
    v = q[:, :r]
    sigma[:d, :d] = v @ torch.diag(vals) @ v.T + rest * (torch.eye(d, dtype=torch.float64) - v @ v.T)
    sigma[d:, d:] = torch.diag(var)
    return m, mu, sigma, var


@pytest.mark.parametrize("rank", [0, 2])
def test_gaussian_bound_over_all_noise_levels_is_the_mahalanobis_distance(rank: int) -> None:
    """The image-dependent part of the Gaussian path's variational bound, ½∫ E_ε‖ε − ε̂_G‖² dλ,
    integrated numerically over the schedule's whole λ range with the model's own ε̂_G, equals
    ½ δᵀΣ⁻¹δ (PaDiM's squared Mahalanobis distance, halved); ``Denoiser.mahalanobis`` gives
    the same in closed form. ε̂_G is affine in ε, so the ε-expectation of the image-dependent
    part is the error at ε = 0: ‖ε̂_G(√ᾱ x)‖². With ``prior_rank`` 2 of 6, for Σ_r."""
    locs, d, extra = 4, 6, 3
    m, mu, sigma, _ = _gaussian_model(d, extra, locs, seed=0, rank=rank)
    g = torch.Generator().manual_seed(1)
    x = (mu + 1.5 * torch.randn(5, locs, d + extra, generator=g, dtype=torch.float64))
    delta = x - mu
    want = 0.5 * (delta @ torch.linalg.inv(sigma) * delta).sum(-1)  # [5, L]
    ab = alpha_bar_of(DiffusionConfig())
    lam = log_snr(ab)
    types = torch.zeros(5, dtype=torch.long)
    prior = m.gather_prior(types)
    with torch.no_grad():
        natural = x[..., m.prior_unperm]  # gaussian_eps takes the natural channel order
        sq = torch.stack([m.gaussian_eps((ab[t].sqrt() * natural).float(), torch.full((5,), t), prior)
                          .double().pow(2).sum(-1) for t in range(len(ab))])  # [T, 5, L]
    steps = (lam[:-1] - lam[1:]).view(-1, 1, 1)
    bound = 0.5 * (0.5 * (sq[:-1] + sq[1:]) * steps).sum(0)  # trapezoid in λ
    assert torch.allclose(bound, want, rtol=2e-4)  # measured: 5e-5 (float32 path, trapezoid)
    closed = m.mahalanobis(x.float(), types).double()
    assert torch.allclose(closed, want, rtol=1e-4)


@pytest.mark.parametrize("rank", [0, 3])
def test_untrained_likelihood_map_is_the_gaussian_negative_log_density(rank: int) -> None:
    """With a zero network the map is ½ δᵀΣ⁻¹δ exactly, and with ``log_det`` it is
    −log N(x; μ, Σ) per location (checked against torch.distributions); also for Σ_r."""
    locs, d, extra = 4, 5, 2
    m, mu, sigma, _ = _gaussian_model(d, extra, locs, seed=2, rank=rank)
    x = mu + torch.randn(3, locs, d + extra, dtype=torch.float64)
    types = torch.zeros(3, dtype=torch.long)
    bank = ScoreBank.make(ScoringConfig(), alpha_bar_of(DiffusionConfig()), (50, 800), locs, d + extra)
    nll = torch.distributions.MultivariateNormal(mu, sigma).log_prob(x).neg()
    with torch.inference_mode():
        plain = likelihood_map(m, NoiseSchedule(1000), bank, x.float(), types)
        full = likelihood_map(m, NoiseSchedule(1000), bank, x.float(), types, log_det=True)
    delta = x - mu
    assert torch.allclose(plain.double(), 0.5 * (delta @ torch.linalg.inv(sigma) * delta).sum(-1), rtol=1e-4)
    assert torch.allclose(full.double(), nll, rtol=1e-4, atol=1e-4)


def test_aggregate_small_defect_counts() -> None:
    maps = torch.zeros(2, 32, 32)
    maps[1, 3:6, 3:6] = 5.0  # a 9-pixel defect
    top = aggregate(maps, "topk", 0.01)
    assert top[1] > top[0] and float(top[1]) > 3.0
    assert torch.equal(aggregate(maps, "max"), torch.tensor([0.0, 5.0]))


def test_upsample_smooth_shape_and_mass() -> None:
    m = torch.zeros(1, 8, 8)
    m[0, 4, 4] = 1.0
    up = upsample_and_smooth(m, 64, 2.0)
    assert up.shape == (1, 64, 64) and torch.isfinite(up).all()
    peak = divmod(int(up[0].argmax()), 64)
    assert abs(peak[0] - 36) <= 4 and abs(peak[1] - 36) <= 4


def _per_pair_correction(m: Denoiser, sch: NoiseSchedule, bank: ScoreBank, x: Tensor,
                         types: Tensor) -> Tensor:
    """The reference: one denoiser call per (t, ε) pair, channels in their natural order; the
    weighted difference of the squared ε-errors with and without the network."""
    n, locs, _ = x.shape
    pos = torch.arange(locs).expand(n, locs)
    total = torch.zeros(n, locs)
    for k in range(len(bank)):
        t = bank.timesteps[k].expand(n)
        eps = bank.noise[k].expand_as(x)
        x_t = sch.q_sample(x, t, eps)
        full = (m(x_t, t, types, pos) - eps).pow(2).sum(-1)
        gauss = (m.gaussian_eps(x_t, t, m.gather_prior(types)) - eps).pow(2).sum(-1)
        total += bank.weights[k] * (full - gauss)
    return total


@pytest.mark.parametrize(("trained", "rank"), [(False, 0), (True, 0), (True, 2)])
def test_likelihood_map_is_mahalanobis_plus_the_per_pair_network_correction(trained: bool, rank: int) -> None:
    """likelihood_map runs the whole bank at once, in the prior's channel order, grouped by
    type; it must equal the closed-form Mahalanobis term plus the quadrature of the network's
    effect on the ε-error, pair by pair, for mixed and single-type batches (and a rank-2 prior)."""
    torch.manual_seed(0)
    locs, ch, n_types = 16, 12, 3
    cfg = DiffusionConfig(prior_dims=5, hidden=16, depth=1, prior_rank=rank)
    m = Denoiser(ch, n_types, locs, cfg).eval()
    good = torch.randn(40, locs, ch) * torch.rand(ch) + torch.randn(ch)
    m.fit_prior(good, torch.arange(40) % n_types)
    if trained:
        torch.nn.init.normal_(m.out.weight, std=0.1)
    sch = NoiseSchedule(1000)
    bank = ScoreBank.make(ScoringConfig(quadrature_nodes=3), alpha_bar_of(DiffusionConfig()),
                          (50, 800), locs, ch)
    in_order = ScoreBank(bank.timesteps, bank.noise[..., m.prior_perm], bank.weights)
    x = torch.randn(7, locs, ch)
    for types in (torch.tensor([0, 2, 2, 1, 0, 3, 2]), torch.full((7,), 2)):
        with torch.inference_mode():
            got = likelihood_map(m, sch, in_order, x[..., m.prior_perm], types)
            maha = m.mahalanobis(x[..., m.prior_perm], types)
            want = maha + _per_pair_correction(m, sch, bank, x, types)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got, maha) != trained


@pytest.mark.parametrize("rank", [0, 3])
def test_float16_prior_storage_round_trip(rank: int, tmp_path: Path) -> None:
    """With ``diffusion.prior_storage=float16`` the Gaussians' parameters (and nothing else) are
    written as float16 and read back as float32; the fitted model is already rounded, so that
    its bundle reloads it exactly (calibration and inspection see the same numbers), and its maps
    stay within float16 rounding of the float32 model's."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(9)
    feats = torch.randn(24, 10, 4, 4, generator=g) * torch.rand(10, 1, 1, generator=g) + 1.0
    types = torch.arange(24) % 2
    # the Gaussians' tensors alone (the image context's storage: tests/test_context.py)
    over = {"train.steps": 0, "diffusion.prior_dims": 6, "diffusion.prior_rank": rank,
            "diffusion.prior_context": 0}
    scorers = {}
    for storage in ("float32", "float16"):
        config = with_overrides(DetectorConfig(), over | {"diffusion.prior_storage": storage})
        fitted = DiffusionScorer(config).fit(feats, types, 2)
        state = fitted.state_tensors()
        halves = {k.removeprefix("denoiser.") for k, v in state.items() if v.dtype == torch.float16}
        want = {"prior_mean", "prior_var", "prior_vecs", "prior_vals"} | ({"prior_rest"} if rank else set())
        assert halves == (want if storage == "float16" else set())
        # the null type's row (training only) is not saved: one row per type
        assert all(state[f"denoiser.{k}"].shape[0] == 2 for k in want)
        path = tmp_path / f"{storage}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        loaded = DiffusionScorer.from_state(config, load_file(str(path)), 2, 10)
        assert loaded.denoiser_ is not None and loaded.denoiser_.prior_vecs.dtype == torch.float32
        scorers[storage] = (fitted, loaded)
    x = torch.randn(6, 10, 4, 4, generator=g) + 1.0
    t = torch.arange(6) % 2
    ref = scorers["float32"][0].score_maps(x, t)
    assert torch.equal(scorers["float32"][1].score_maps(x, t), ref)
    half = scorers["float16"][1].score_maps(x, t)
    assert torch.equal(scorers["float16"][0].score_maps(x, t), half)
    # a float32-stored bundle (written before prior_storage existed) loaded under float16 is
    # rounded when loaded: it scores what saving it again writes
    config16 = with_overrides(DetectorConfig(), over | {"diffusion.prior_storage": "float16"})
    old = DiffusionScorer.from_state(config16, scorers["float32"][0].state_tensors(), 2, 10)
    assert torch.equal(old.score_maps(x, t), half)
    # bundles written with the null type's row still load and score the same
    den = scorers["float32"][0].denoiser_
    assert den is not None
    with_null = {f"denoiser.{k}": v for k, v in den.state_dict().items()} | {
        k: v for k, v in scorers["float32"][0].state_tensors().items() if k.startswith("bank.")}
    assert with_null["denoiser.prior_vecs"].shape[0] == 3
    config32 = with_overrides(DetectorConfig(), over | {"diffusion.prior_storage": "float32"})
    assert torch.equal(DiffusionScorer.from_state(config32, with_null, 2, 10).score_maps(x, t), ref)
    assert not torch.equal(half, ref)  # the rounding is real ...
    torch.testing.assert_close(half, ref, rtol=5e-3, atol=1e-3)  # ... and small (measured: 7e-4)


def test_full_rank_bundle_loads_under_a_low_rank_default() -> None:
    """A bundle written before diffusion.prior_rank existed has full-rank eigenbases and a
    config.json without the field, which reads today's default rank: the stored tensors decide,
    and it scores as it did; a mismatch the other way stays an error."""
    g = torch.Generator().manual_seed(10)
    feats = torch.randn(16, 10, 4, 4, generator=g) + 1.0
    types = torch.arange(16) % 2
    over = {"train.steps": 0, "diffusion.prior_dims": 6, "diffusion.prior_storage": "float32"}
    full = DiffusionScorer(with_overrides(DetectorConfig(), over | {"diffusion.prior_rank": 0}))
    full.fit(feats, types, 2)
    low_config = with_overrides(DetectorConfig(), over | {"diffusion.prior_rank": 3})
    loaded = DiffusionScorer.from_state(low_config, full.state_tensors(), 2, 10)
    x, t = torch.randn(3, 10, 4, 4, generator=g) + 1.0, torch.tensor([0, 1, 1])
    assert torch.equal(loaded.score_maps(x, t), full.score_maps(x, t))
    low = DiffusionScorer(low_config).fit(feats, types, 2)
    with pytest.raises(RuntimeError, match="prior_vecs"):
        DiffusionScorer.from_state(full.config, low.state_tensors(), 2, 10)


def _two_surfaces(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """GOOD feature maps ``[n, 4, 4, 4]`` of two kinds of surface, alternating: a quiet one
    (spread 0.15) and a loud one (spread 1) that also moves the whole image by 2."""
    g = torch.Generator().manual_seed(seed)
    loud = torch.arange(n) % 2
    spread = torch.where(loud.bool(), 1.0, 0.15).view(n, 1, 1, 1)
    return 2.0 * loud.view(n, 1, 1, 1).float() + spread * torch.randn(n, 4, 4, 4, generator=g), loud


def test_a_network_that_sees_the_image_context_holds_a_spread_that_follows_the_image() -> None:
    """diffusion.context=image: the context removes the loud surface's shift, but a per-location
    Gaussian of what is left must hold both spreads at once. The network, given the image's
    context components, learns which spread applies: a better likelihood of held-out GOOD images
    and a small local change on a quiet surface told from GOOD images, which the same network
    without the components does not do."""
    from diffqc.metrics import image_auroc

    x, _ = _two_surfaces(96, 0)
    held, loud = _two_surfaces(64, 1)
    bad = held.clone()
    bad[:, :, 1, 2] += 0.8  # as large as the loud surface's spread: a defect on the quiet one
    types = torch.zeros(96, dtype=torch.long)
    result = {}
    for network in ("none", "image"):
        cfg = with_overrides(DetectorConfig(), {
            "diffusion.context": network, "diffusion.prior_context": 2, "diffusion.hidden": 32,
            "diffusion.depth": 1, "diffusion.embed_dim": 16, "train.steps": 500, "train.lr": 3e-3,
            "train.batch_images": 16, "train.locations_per_image": 16})
        torch.manual_seed(0)
        scorer = DiffusionScorer(cfg).fit(x, types, 1)
        assert scorer.denoiser_ is not None
        assert scorer.denoiser_.context_dim == (2 if network == "image" else 0)
        good_maps = scorer.score_maps(held, types[:64])
        quiet = (loud == 0).nonzero().squeeze(1)
        bad_scores = scorer.score_maps(bad[quiet], types[: len(quiet)]).flatten(1).amax(1)
        labels = [0] * 64 + [1] * len(quiet)
        scores = torch.cat([good_maps.flatten(1).amax(1), bad_scores]).numpy()
        result[network] = (float(good_maps.mean()), image_auroc(labels, scores))
    assert result["image"][0] < 0.5 * result["none"][0], result  # held-out GOOD: a better likelihood
    assert result["image"][1] > result["none"][1] + 0.15, result


def test_the_scorer_takes_features_of_any_float_type_as_the_baselines_do() -> None:
    """`Detector.fit_features` / `inspect_features` with float64 features (a cache kept through
    NumPy) ended in "expected scalar type Double but found Float" deep in the image context,
    and float16 ones in a matmul's dtype error, where PaDiM and PatchCore take them as float32.
    The scorer reads them as float32: the same maps as from the float32 features."""
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(20, 10, 4, 4, generator=g) + 1.0
    types = torch.arange(20) % 2
    config = with_overrides(DetectorConfig(), {"train.steps": 0, "diffusion.prior_dims": 6,
                                               "diffusion.prior_context": 4})
    ref = DiffusionScorer(config).fit(feats, types, 2)
    x = torch.randn(4, 10, 4, 4, generator=g) + 1.0
    want = ref.score_maps(x, torch.arange(4) % 2)
    for dtype in (torch.float64, torch.float16):
        scorer = DiffusionScorer(config).fit(feats.to(dtype), types, 2)
        got = scorer.score_maps(x.to(dtype), torch.arange(4) % 2)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        if dtype == torch.float64:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_int8_prior_storage_round_trip(tmp_path: Path) -> None:
    """With ``diffusion.prior_storage=int8`` the two largest tables, the per-location eigenbases
    and the image context's effect, are written as int8 with a float16 scale per vector, every
    other table of the Gaussians as float16; the fitted model is already rounded, so that its
    bundle reloads it exactly, saving the reloaded model writes the same bytes, and its maps stay
    close to the float16 model's."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(11)
    feats = torch.randn(48, 10, 4, 4, generator=g) * torch.rand(10, 1, 1, generator=g) + 1.0
    types = torch.arange(48) % 2
    over = {"train.steps": 0, "diffusion.prior_dims": 8, "diffusion.prior_rank": 4,
            "diffusion.prior_context": 2}
    x = torch.randn(6, 10, 4, 4, generator=g) + 1.0
    t = torch.arange(6) % 2
    maps = {}
    for storage in ("float16", "int8"):
        config = with_overrides(DetectorConfig(), over | {"diffusion.prior_storage": storage})
        fitted = DiffusionScorer(config).fit(feats, types, 2)
        state = fitted.state_tensors()
        path = tmp_path / f"{storage}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        loaded = DiffusionScorer.from_state(config, load_file(str(path)), 2, 10)
        maps[storage] = fitted.score_maps(x, t)
        assert torch.equal(loaded.score_maps(x, t), maps[storage])
        again = loaded.state_tensors()
        assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
        if storage == "float16":
            continue
        packed = {k for k, v in state.items() if v.dtype == torch.int8}
        assert packed == {"denoiser.prior_vecs", "context.effect"}
        assert state["denoiser.prior_vecs_scale"].shape == (2, 16, 1, 4)  # per eigenvector
        assert state["context.effect_scale"].shape == (2, 2, 10, 1)  # per component and channel
        halves = {k.removeprefix("denoiser.") for k, v in state.items() if v.dtype == torch.float16}
        assert halves == {"prior_mean", "prior_var", "prior_vals", "prior_rest", "prior_vecs_scale",
                          "context.effect_scale"}
        assert path.stat().st_size < (tmp_path / "float16.safetensors").stat().st_size
    assert not torch.equal(maps["int8"], maps["float16"])  # the rounding is real ...
    # ... and small: at most 1.2e-3 of the largest map value here
    top = float(maps["float16"].max())
    torch.testing.assert_close(maps["int8"], maps["float16"], rtol=0, atol=5e-3 * top)
