from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf

from diffqc.config import DiffusionConfig, TrainConfig
from diffqc.diffusion import (
    Denoiser,
    NoiseSchedule,
    alpha_bar_of,
    cosine_alpha_bar,
    log_snr,
    pack_int8,
    ring_index,
    ring_mean,
    sampled_ring,
    sinusoidal_embedding,
    unpack_int8,
    vlb_quadrature,
    vlb_timestep_weights,
)
from diffqc.train import separation_hinge, train_denoiser


def test_schedule_monotone_and_bounded() -> None:
    ab = cosine_alpha_bar(1000)
    assert ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1]) and 0 < float(ab[-1]) < float(ab[0]) <= 1
    s = NoiseSchedule(1000)
    x0 = torch.ones(2, 5, 3)
    noise = torch.zeros_like(x0)
    out = s.q_sample(x0, torch.tensor([0, 999]), noise)
    assert out[0, 0, 0] > 0.99 and out[1, 0, 0] < 0.1


def test_denoiser_shapes_and_no_nan() -> None:
    g = torch.Generator().manual_seed(0)
    m = Denoiser(12, n_types=3, locations=16,
                 config=DiffusionConfig(hidden=32, depth=2, embed_dim=16, prior="none"))
    x = torch.randn(4, 16, 12, generator=g)
    out = m(x, torch.tensor([1, 10, 500, 999]), torch.tensor([0, 1, 2, 3]), torch.arange(16).expand(4, 16))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # The type changes the prediction (conditioning is wired in); index 3 is the null type.
    a = m(x, torch.full((4,), 100), torch.zeros(4, dtype=torch.long), torch.arange(16).expand(4, 16))
    b = m(x, torch.full((4,), 100), torch.full((4,), 3), torch.arange(16).expand(4, 16))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("dim", [2, 16, 23])
def test_any_embedding_width_works(dim: int) -> None:
    """An odd diffusion.embed_dim got a timestep embedding one column short (a shape error at
    the first training step): the embedding has the width asked for, and a model with it runs."""
    t = torch.tensor([0, 10, 999])
    emb = sinusoidal_embedding(t, dim)
    assert emb.shape == (3, dim) and torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[2])  # it still tells timesteps apart
    config = DiffusionConfig(hidden=8, depth=1, embed_dim=dim, prior="none")
    m = Denoiser(12, n_types=2, locations=4, config=config)
    out = m(torch.randn(3, 4, 12), t, torch.tensor([0, 1, 2]), torch.arange(4).expand(3, 4))
    assert out.shape == (3, 4, 12)


def test_loss_falls() -> None:
    g = torch.Generator().manual_seed(0)
    # Structured data: two types with different means, low-rank channels.
    basis = torch.randn(3, 16, generator=g)
    feats = []
    for t in range(2):
        z = torch.randn(24, 3, 6, 6, generator=g)
        feats.append(torch.einsum("nkhw,kc->nchw", z, basis) * 0.3 + (t * 2 - 1))
    x = torch.cat(feats)
    types = torch.tensor([0] * 24 + [1] * 24)
    _, hist = train_denoiser(x, types, 2, DiffusionConfig(hidden=64, depth=2, embed_dim=16, prior="none"),
                             TrainConfig(steps=300, batch_images=8, locations_per_image=16), progress=False)
    first, last = hist.loss[2], hist.loss[-1]
    assert last < 0.8 * first, (first, last)
    assert all(v == v for v in hist.loss)  # no NaN


def test_separation_hinge_is_bounded() -> None:
    e_true = torch.tensor([0.5, 0.5])
    assert float(separation_hinge(e_true, torch.tensor([10.0, 100.0]), 0.05)) == 0.0
    assert float(separation_hinge(e_true, torch.tensor([0.5, 0.5]), 0.05)) == pytest.approx(0.05)


def test_gaussian_prior_is_the_optimal_linear_denoiser() -> None:
    """On Gaussian data the closed-form path alone beats predicting zero noise, and its error
    grows with the Mahalanobis distance of x0 from the type's mean."""
    g = torch.Generator().manual_seed(1)
    c, n, side = 8, 64, 4
    a = torch.randn(c, c, generator=g) * 0.5
    x = (torch.randn(n, side * side, c, generator=g) @ a) + 2.0
    m = Denoiser(c, 1, side * side, DiffusionConfig(hidden=16, depth=1, embed_dim=8, prior_dims=4))
    m.fit_prior(x, torch.zeros(n, dtype=torch.long))
    t = torch.full((n,), 300)
    eps = torch.randn(x.shape, generator=g)
    ab = m.alpha_bar[300]
    x_t = ab.sqrt() * x + (1 - ab).sqrt() * eps
    pos = torch.arange(side * side).expand(n, -1)
    with torch.no_grad():
        pred = m(x_t, t, torch.zeros(n, dtype=torch.long), pos)
        err = (pred - eps).pow(2).mean()
        far = m(ab.sqrt() * (x + 6.0) + (1 - ab).sqrt() * eps, t, torch.zeros(n, dtype=torch.long), pos)
    assert float(err) < 0.9 * float(eps.pow(2).mean())
    assert float((far - eps).pow(2).mean()) > 2 * float(err)


def _posterior_mean_eps(m: Denoiser, x_t: torch.Tensor, t: int, ty: torch.Tensor) -> torch.Tensor:
    """E[ε | x_t] from its dense definition (float64), independent of the eigenbasis code path:
    ε̂ = √(1-ᾱ) (ᾱ Σ + (1-ᾱ) I)⁻¹ (x_t - √ᾱ μ), with Σ rebuilt from the fitted prior (V diag(λ) Vᵀ
    on the full-covariance channels, diagonal on the rest) in the prior's channel order."""
    d, c = m.prior_dims, m.channels
    ab = float(m.alpha_bar[t])
    out = torch.empty(x_t.shape, dtype=torch.float64)
    for i, k in enumerate(ty.tolist()):
        for loc in range(m.locations):
            cov = torch.zeros(c, c, dtype=torch.float64)
            vecs, vals = m.prior_vecs[k, loc].double(), m.prior_vals[k, loc].double()
            cov[:d, :d] = vecs @ torch.diag(vals) @ vecs.T
            cov[d:, d:] = torch.diag(m.prior_var[k, loc, d:].double())
            resid = x_t[i, loc, m.prior_perm].double() - ab**0.5 * m.prior_mean[k, loc].double()
            eye = torch.eye(c, dtype=torch.float64)
            eps = (1 - ab) ** 0.5 * torch.linalg.solve(ab * cov + (1 - ab) * eye, resid)
            out[i, loc] = eps[m.prior_unperm]
    return out


def test_untrained_network_is_skipped_exactly() -> None:
    """With a zero output layer (train.steps=0) inference is the Gaussian path alone, which is the
    posterior mean of ε under the fitted Gaussian, and the network is not run; once the output
    layer is non-zero the network runs again and adds its output."""
    g = torch.Generator().manual_seed(3)
    c, side = 6, 3
    m = Denoiser(c, 2, side * side, DiffusionConfig(hidden=16, depth=1, embed_dim=8, prior_dims=3))
    x = torch.randn(20, side * side, c, generator=g)
    m.fit_prior(x, torch.arange(20) % 2)
    m.eval()
    x_t, t = torch.randn(4, side * side, c, generator=g), torch.full((4,), 300)
    ty, pos = torch.tensor([0, 1, 0, 1]), torch.arange(side * side).expand(4, -1)
    network_calls: list[int] = []
    m.inp.register_forward_hook(lambda *_: network_calls.append(1))
    expected = _posterior_mean_eps(m, x_t, 300, ty)
    assert m.network_is_zero()
    with torch.no_grad():
        got = m(x_t, t, ty, pos)
    assert not network_calls, "an untrained network is not run"
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        m.out.bias.fill_(0.5)  # the network's output is now exactly 0.5 everywhere (zero weights)
        assert not m.network_is_zero()
        got = m(x_t, t, ty, pos)
    assert network_calls == [1]
    torch.testing.assert_close(got.double(), expected + 0.5, rtol=1e-4, atol=1e-5)


def test_training_timesteps_are_uniform_in_log_snr() -> None:
    """Training draws t with the variational bound's weighting for ε-prediction (uniform in
    λ = log SNR) over [t_min, t_max]: the λ-mass below any cut is proportional to its λ-length,
    and the scoring quadrature's nodes lie in the same range at equal λ spacing."""
    ab = alpha_bar_of(DiffusionConfig())
    lam = log_snr(ab)
    w = vlb_timestep_weights(ab, 50, 800)
    assert w.shape == (751,) and float(w.sum()) == pytest.approx(1.0)
    cut = 300  # share of the steps 50..300 = their share of the λ range
    share = float((lam[49] - lam[cut]) / (lam[49] - lam[800]))
    assert float(w[: cut - 50 + 1].sum()) == pytest.approx(share, rel=1e-6)
    assert float(w[0]) > 2 * float(w[-1])  # not uniform in t
    nodes, weights = vlb_quadrature(ab, 50, 800, 4)
    assert int(nodes.min()) >= 50 and int(nodes.max()) <= 800
    gaps = (lam[nodes[:-1]] - lam[nodes[1:]]).tolist()
    assert max(gaps) - min(gaps) < 0.05 * max(gaps)
    assert float(weights.sum()) == pytest.approx(0.5 * float(lam[50] - lam[800]))


def test_prior_radius_pools_the_neighbourhood() -> None:
    """With ``radius`` = 1 each location's Gaussian is fitted on the features of the 3 x 3 cells
    around it (clamped at the border): its mean and diagonal variance are those of the pooled
    samples; radius 0 keeps each location's own statistics."""
    g = torch.Generator().manual_seed(4)
    side, c, n = 4, 6, 30
    x = torch.randn(n, side * side, c, generator=g) + torch.arange(side * side).view(1, -1, 1)
    cfg = DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=3)
    m = Denoiser(c, 1, side * side, cfg)
    m.fit_prior(x, torch.zeros(n, dtype=torch.long), (side, side), 1)
    xp = x[..., m.prior_perm]
    loc, nb = 5, [0, 1, 2, 4, 5, 6, 8, 9, 10]  # (1, 1) and its 3 x 3 neighbourhood
    pooled = xp[:, nb].reshape(-1, c)
    assert torch.allclose(m.prior_mean[0, loc], pooled.mean(0), atol=1e-5)
    floor = m.prior_var[0, loc, 3:] - pooled.var(0, unbiased=False)[3:]  # the same floor for all
    assert torch.allclose(floor, floor[0].expand_as(floor), atol=1e-4) and float(floor[0]) > 0
    corner = xp[:, [0, 0, 1, 0, 0, 1, 4, 4, 5]].reshape(-1, c)  # (0, 0): clamped at the border
    assert torch.allclose(m.prior_mean[0, 0], corner.mean(0), atol=1e-5)
    m0 = Denoiser(c, 1, side * side, cfg)
    m0.fit_prior(x, torch.zeros(n, dtype=torch.long), (side, side), 0)
    assert torch.allclose(m0.prior_mean[0], xp.mean(0), atol=1e-5)


class _Traced(torch.nn.Module):
    """The Gaussian path's scoring calls as one module, to run their traced (ONNX) branch."""

    def __init__(self, m: Denoiser) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor, types: torch.Tensor, f: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.m.bound_with_network(x, types, f, t, noise, w), self.m.mahalanobis(x, types),
                self.m.log_det_term(types))


def _gaussian_calls(m: Denoiser, x: torch.Tensor, types: torch.Tensor, f: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, w: torch.Tensor, *, traced: bool) -> list[torch.Tensor]:
    """The reference bound with the network's residuals ``f [L, N, K, C]``: ½δᵀΣ⁻¹δ +
    Σ_k w_k (‖f_k‖² − 2 f_k·(ε_k − ε̂_G,k)) with ε̂_G formed explicitly by ``gaussian_eps`` per
    timestep; then bound_with_network, mahalanobis and log_det_term: eagerly, or (``traced``)
    through torch.jit.trace. ``x`` and ``noise`` in the prior's channel order."""
    prior = m.gather_prior(types)
    ref = m.mahalanobis(x, types)
    for k in range(len(t)):
        ab = m.alpha_bar[t[k]]
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise[k]
        eps_g = m.gaussian_eps(x_t[..., m.prior_unperm], t[k].expand(len(types)), prior)[..., m.prior_perm]
        fk = f[:, :, k].transpose(0, 1)
        ref = ref + w[k] * (fk.pow(2) - 2 * fk * (noise[k] - eps_g)).sum(-1)
    args = (x, types, f, t, noise, w)
    if traced:
        graph = torch.jit.trace(_Traced(m), args, check_trace=False)
        return [ref, *graph(*args)]
    return [ref, m.bound_with_network(*args), m.mahalanobis(x, types), m.log_det_term(types)]


def test_low_rank_prior_keeps_the_top_eigenpairs_and_the_mean_of_the_rest() -> None:
    """prior_rank r < d keeps the r largest eigenpairs of the same Ledoit–Wolf covariance that the
    full-rank model fits, and σ²_rest = the mean of the d − r discarded eigenvalues (the maximum-
    likelihood probabilistic PCA); the diagonal channels are untouched. prior_rank = d is full rank."""
    g = torch.Generator().manual_seed(5)
    c, d, r, side, n = 9, 6, 2, 3, 40
    x = torch.randn(n, side * side, c, generator=g) @ torch.randn(c, c, generator=g)
    types = torch.arange(n) % 2
    full = Denoiser(c, 2, side * side, DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=d))
    low = Denoiser(c, 2, side * side, DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=d,
                                                      prior_rank=r))
    at_d = Denoiser(c, 2, side * side, DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=d,
                                                       prior_rank=d))
    for m in (full, low, at_d):
        m.fit_prior(x, types)
    assert low.prior_vecs.shape == (3, side * side, d, r) and low.prior_rest.shape == (3, side * side)
    assert not at_d.low_rank and "prior_rest" not in dict(at_d.named_buffers())
    assert torch.equal(at_d.prior_vecs, full.prior_vecs) and torch.equal(at_d.prior_vals, full.prior_vals)
    torch.testing.assert_close(low.prior_vals, full.prior_vals[..., d - r :])
    torch.testing.assert_close(low.prior_rest, full.prior_vals[..., : d - r].mean(-1))
    proj = low.prior_vecs @ low.prior_vecs.transpose(-1, -2)  # eigenvectors up to sign
    top = full.prior_vecs[..., d - r :]
    torch.testing.assert_close(proj, top @ top.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    assert torch.equal(low.prior_mean, full.prior_mean) and torch.equal(low.prior_var, full.prior_var)


@pytest.mark.parametrize("traced", [False, True])
def test_low_rank_path_equals_the_full_path_on_a_ppca_covariance(traced: bool) -> None:
    """When the fitted covariance already has the probabilistic-PCA form (its d − r smallest
    eigenvalues equal), the low-rank model must reproduce the full-rank model's numbers: the bound
    with the network's residuals (single- and mixed-type batches; eager and traced), ½δᵀΣ⁻¹δ and
    log det; and the closed-form bound (ε̂_G never formed) equals the one from ε̂_G per timestep."""
    g = torch.Generator().manual_seed(6)
    c, d, r, side, n_types = 8, 5, 2, 3, 3
    locs = side * side
    x = torch.randn(30, locs, c, generator=g) @ torch.randn(c, c, generator=g)
    cfg = {"hidden": 8, "depth": 1, "embed_dim": 8, "prior_dims": d, "prior_storage": "float32"}
    full = Denoiser(c, n_types, locs, DiffusionConfig(**cfg)).eval()
    low = Denoiser(c, n_types, locs, DiffusionConfig(**cfg, prior_rank=r)).eval()
    full.fit_prior(x, torch.arange(30) % n_types)
    with torch.no_grad():
        full.prior_vals[..., : d - r] = full.prior_vals[..., : d - r].mean(-1, keepdim=True)
        low.prior_mean.copy_(full.prior_mean)
        low.prior_var.copy_(full.prior_var)
        low.prior_vecs.copy_(full.prior_vecs[..., d - r :])
        low.prior_vals.copy_(full.prior_vals[..., d - r :])
        low.prior_rest.copy_(full.prior_vals[..., 0])
    t = torch.tensor([60, 300, 700])
    x0 = torch.randn(4, locs, c, generator=g)[..., full.prior_perm]
    noise = torch.randn(3, locs, c, generator=g)
    f = 0.3 * torch.randn(locs, 4, 3, c, generator=g)
    w = torch.tensor([0.5, 0.3, 0.2])
    for types in (torch.tensor([0, 2, 1, 2]), torch.full((4,), 1)):
        with torch.no_grad():
            want = _gaussian_calls(full, x0, types, f, t, noise, w, traced=traced)
            got = _gaussian_calls(low, x0, types, f, t, noise, w, traced=traced)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for res in (got, want):  # the closed form = the explicit ε̂_G per timestep
            torch.testing.assert_close(res[1], res[0], rtol=1e-4, atol=1e-4)


def test_prior_rank_is_validated() -> None:
    from diffqc.errors import ConfigError

    assert DiffusionConfig(prior_dims=10, prior_rank=10).prior_rank == 10
    # a rank at or above the channels modelled means full rank (the default 64 with a small model)
    cfg = DiffusionConfig(prior_dims=10, prior_rank=64)
    assert Denoiser(12, 1, 4, cfg).prior_rank == 10 and not Denoiser(12, 1, 4, cfg).low_rank
    assert Denoiser(12, 1, 4, DiffusionConfig(prior_dims=10, prior_rank=3)).low_rank
    with pytest.raises(ConfigError, match="prior_rank"):
        DiffusionConfig(prior_rank=-1)


@pytest.mark.parametrize("estimator", ["sample", "ledoit_wolf"])
def test_prior_covariance_is_the_chosen_estimator_plus_the_floor(estimator: str) -> None:
    """At full rank each location's Gaussian is the chosen estimate of its features' covariance
    plus 1 % of the mean per-channel variance on the diagonal; the two estimators differ."""
    g = torch.Generator().manual_seed(5)
    c, n, locs = 6, 12, 3  # few samples: Ledoit-Wolf shrinks visibly
    x = torch.randn(n, locs, c, generator=g) @ (torch.randn(c, c, generator=g) * 0.7)
    cfg = DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=c, prior_rank=0,
                          prior_covariance=estimator)
    m = Denoiser(c, 1, locs, cfg)
    m.fit_prior(x, torch.zeros(n, dtype=torch.long))
    xp = x[:, :, m.prior_perm].double()
    floor = 0.01 * xp.var(dim=0, unbiased=False).mean()
    for loc in range(locs):
        v = m.prior_vecs[0, loc].double()
        got = v @ torch.diag(m.prior_vals[0, loc].double()) @ v.T
        ref = torch.from_numpy(np.cov(xp[:, loc].numpy(), rowvar=False))  # unbiased sample covariance
        if estimator == "ledoit_wolf":
            ref = torch.from_numpy(ledoit_wolf(xp[:, loc].numpy())[0])
        torch.testing.assert_close(got, ref + floor * torch.eye(c, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    sample = np.cov(xp[:, 0].numpy(), rowvar=False)
    assert np.abs(ledoit_wolf(xp[:, 0].numpy())[0] - sample).max() > 0.05


def test_prior_covariance_is_validated() -> None:
    from diffqc.errors import ConfigError

    with pytest.raises(ConfigError, match="prior_covariance"):
        DiffusionConfig(prior_covariance="empirical")


def test_ring_mean_averages_the_neighbours_without_the_centre() -> None:
    """diffusion.context=ring: each location sees the mean of its 8 neighbours (3 at a corner, 5 on
    an edge), never itself: changing one location moves its neighbours' ring by δ/count and
    leaves its own unchanged."""
    g = torch.Generator().manual_seed(7)
    h, w, c = 3, 4, 5
    x = torch.randn(2, h * w, c, generator=g)
    ring = ring_mean(x, (h, w))
    assert ring.shape == x.shape
    torch.testing.assert_close(ring[:, 0], x[:, [1, w, w + 1]].mean(1))  # corner (0, 0)
    torch.testing.assert_close(ring[:, 1], x[:, [0, 2, w, w + 1, w + 2]].mean(1))  # edge (0, 1)
    inner = [0, 1, 2, 4, 6, 8, 9, 10]  # around (1, 1) = index 5
    torch.testing.assert_close(ring[:, 5], x[:, inner].mean(1))
    bumped = x.clone()
    bumped[:, 5] += 8.0
    moved = ring_mean(bumped, (h, w)) - ring
    torch.testing.assert_close(moved[:, 5], torch.zeros(2, c))
    torch.testing.assert_close(moved[:, 0], torch.full((2, c), 8.0 / 3))
    torch.testing.assert_close(moved[:, 1], torch.full((2, c), 8.0 / 5))
    torch.testing.assert_close(moved[:, 6], torch.full((2, c), 8.0 / 8))
    assert float(moved[:, 3].abs().max()) == 0.0  # (0, 3) is not next to (1, 1)


def test_training_ring_noises_the_same_neighbours() -> None:
    """The training path's ring at sampled locations (each neighbour noised with its own noise)
    is ring_mean of the clean grid scaled by √ᾱ plus the mean of the neighbours' √(1-ᾱ) ε."""
    g = torch.Generator().manual_seed(8)
    h, w, c = 4, 3, 6
    tokens = torch.randn(5, h * w, c, generator=g)
    img, pos, t = torch.tensor([0, 3]), torch.tensor([[0, 4, 11], [7, 2, 5]]), torch.tensor([100, 600])
    sch = NoiseSchedule(1000)
    cells = ring_index((h, w))
    got = sampled_ring(tokens, img, pos, t, sch, cells, torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 8, c, generator=torch.Generator().manual_seed(0))
    inside = cells[1][pos].float().unsqueeze(-1)
    noise = (eps * inside).sum(2) / inside.sum(2)
    clean = ring_mean(tokens, (h, w))[img[:, None], pos]
    a, b = sch.sqrt_alpha_bar[t].view(-1, 1, 1), sch.sqrt_one_minus[t].view(-1, 1, 1)
    torch.testing.assert_close(got, a * clean + b * noise)


def test_ring_context_reaches_the_network_and_trains() -> None:
    """With context=ring the residual at a location depends on its neighbours' x_t (and not with
    context=none), gives the same result in the prior's channel order, and training runs with the
    sampled-location ring."""
    g = torch.Generator().manual_seed(9)
    side, c = 4, 6
    feats = torch.randn(12, c, side, side, generator=g)
    types = torch.arange(12) % 2
    for context in ("none", "ring"):
        cfg = DiffusionConfig(hidden=16, depth=1, embed_dim=8, prior_dims=3, context=context)
        m, hist = train_denoiser(feats, types, 2, cfg, TrainConfig(steps=3, batch_images=4,
                                 locations_per_image=5), progress=False)
        assert len(hist.loss) > 0 and all(v == v for v in hist.loss)
        x_t = torch.randn(2, side * side, c, generator=g)
        args = (torch.tensor([100, 400]), torch.tensor([0, 1]), torch.arange(side * side).expand(2, -1))
        with torch.no_grad():
            base = m.residual(x_t, *args)
            bumped = x_t.clone()
            bumped[:, 5] += 3.0
            moved = (m.residual(bumped, *args) - base).abs().amax(-1)  # [2, L]
            ordered = m.residual(x_t[..., m.prior_perm], *args, channel_order=m.prior_perm)
        torch.testing.assert_close(ordered, base[..., m.prior_perm], rtol=1e-4, atol=1e-5)
        assert float(moved[:, 5].min()) > 0  # its own input
        assert (float(moved[:, 6].max()) > 1e-6) == (context == "ring")  # a neighbour's
        assert float(moved[:, 15].max()) == 0.0  # far away: never


def test_prior_radius_beyond_the_grid_is_a_config_error() -> None:
    """A radius past the feature grid pools no more locations, only more memory (1000 ran out of
    it): a ConfigError naming the field and the largest useful value, before any fitting."""
    from diffqc.errors import ConfigError

    feats = torch.randn(6, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    types = torch.zeros(6, dtype=torch.long)
    steps0 = TrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"prior_radius=1000 .* at most 4"):
        train_denoiser(feats, types, 1, DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_radius=1000),
                       steps0, progress=False)
    m, _ = train_denoiser(feats, types, 1, DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_radius=4),
                          steps0, progress=False)
    assert bool(torch.isfinite(m.prior_vals).all())  # the largest useful radius still fits


def test_image_context_reaches_the_network_and_is_required() -> None:
    """With context=image the residual depends on each image's context components (padded with
    zeros to prior_context when a type has fewer), the bank layout gives the same result, and a
    call or a training run without them is an error; prior_context=0 with it is a ConfigError."""
    from diffqc.errors import ConfigError

    g = torch.Generator().manual_seed(4)
    cfg = DiffusionConfig(hidden=16, depth=1, embed_dim=8, prior_dims=3, context="image", prior_context=3)
    feats, types = torch.randn(10, 5, 2, 2, generator=g), torch.arange(10) % 2
    with pytest.raises(ValueError, match="context components"):
        train_denoiser(feats, types, 2, cfg, TrainConfig(steps=2, batch_images=4), progress=False)
    z = torch.randn(10, 2, generator=g)  # fewer components than prior_context: padded
    m, hist = train_denoiser(feats, types, 2, cfg, TrainConfig(steps=3, batch_images=4), progress=False,
                             context=z)
    assert m.context_dim == 3 and all(v == v for v in hist.loss)
    torch.nn.init.normal_(m.out.weight)  # a visibly non-zero network
    x_t, t, ty = torch.randn(2, 4, 5, generator=g), torch.tensor([100, 100]), torch.tensor([0, 1])
    pos = torch.arange(4).expand(2, -1)
    with torch.no_grad():
        a = m.residual(x_t, t, ty, pos, context=z[:2])
        b = m.residual(x_t, t, ty, pos, context=z[:2] + 1.0)
        padded = m.residual(x_t, t, ty, pos, context=torch.cat([z[:2], torch.zeros(2, 1)], 1))
        bank = m.bank_residual(x_t.transpose(0, 1)[:, :, None], t[:1], ty, context=z[:2])
    assert float((a - b).abs().max()) > 1e-4
    torch.testing.assert_close(padded, a)
    torch.testing.assert_close(bank[:, :, 0].transpose(0, 1), a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context components"):
        m.residual(x_t, t, ty, pos)
    with pytest.raises(ConfigError, match="prior_context"):
        DiffusionConfig(context="image", prior_context=0)


def test_pack_int8_keeps_each_vector_within_half_a_step_of_its_scale() -> None:
    """``diffusion.prior_storage=int8``'s storage: int8 codes and one float16 scale per vector
    along the axis given (a location's eigenvector), each entry within half a step of its own
    vector's scale, however different the vectors' magnitudes; an all-zero vector (a type's
    unused rows) stays exactly zero, and packing what was unpacked gives the same bytes, so a
    bundle saved, loaded and saved again does not drift, down to vectors of 10⁻⁷ (whose scale,
    among float16's subnormal numbers, gave back other codes: a context's channel that barely
    varies within a type)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, 4, generator=g) * torch.logspace(-1, 2, 4)  # columns 0.1 .. 100
    x[1, 2, :, 0] = 0.0
    q, scale = pack_int8(x, -2)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.shape == x.shape and scale.shape == (3, 5, 1, 4)
    assert int(q.abs().max()) == 127  # the whole range is used
    back = unpack_int8(q, scale)
    assert ((back - x).abs() <= 0.5 * scale.float() * (1 + 1e-3)).all()
    # relative to each vector's largest entry, not to the largest of all (as one scale would be)
    rel = (back - x).abs().amax(dim=-2) / x.abs().amax(dim=-2).clamp_min(1e-30)
    assert float(rel.max()) < 0.5 / 127 * 1.01
    assert torch.equal(back[1, 2, :, 0], torch.zeros(16))
    q2, scale2 = pack_int8(back, -2)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)
    tiny = torch.randn(200, 16, generator=g) * torch.logspace(-7, 0, 200)[:, None]  # 1e-7 .. 1
    q, scale = pack_int8(tiny, -1)
    back = unpack_int8(q, scale)
    assert ((back - tiny).abs() <= 0.5 * scale.float() * (1 + 1e-3)).all()
    floored = tiny.abs().amax(dim=-1) < 127 * 2.0**-14  # a scale of float16's smallest normal
    assert 50 < int(floored.sum()) < 200
    assert float((back - tiny)[floored].abs().max()) <= 2.0**-15 * 1.001  # within 3e-5 there
    q2, scale2 = pack_int8(back, -1)
    assert torch.equal(q2, q) and torch.equal(scale2, scale)


def test_the_null_types_gaussians_are_fitted_only_for_the_networks_training() -> None:
    """The null type's Gaussians (every type's images pooled) serve the network's training alone
    (a bundle does not store them): an untrained model (train.steps=0, the default) no longer fits
    them, which with one type doubled the fit's eigendecompositions; a trained one does."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(12, 6, 3, 3, generator=g)
    types = torch.arange(12) % 2
    cfg = DiffusionConfig(hidden=8, depth=1, embed_dim=8, prior_dims=4, prior_rank=2)
    pooled = feats.permute(0, 2, 3, 1).reshape(12, 9, 6).mean(0)
    untrained, _ = train_denoiser(feats, types, 2, cfg, TrainConfig(steps=0), progress=False)
    trained, _ = train_denoiser(feats, types, 2, cfg, TrainConfig(steps=1, batch_images=4), progress=False)
    fresh = Denoiser(6, 2, 9, cfg)
    assert torch.equal(untrained.prior_mean[2], fresh.prior_mean[2])  # left as made
    assert torch.allclose(trained.prior_mean[2], pooled[:, trained.prior_perm], atol=1e-5)
    for name in ("prior_mean", "prior_var", "prior_vecs", "prior_vals"):  # the types' own: the same
        assert torch.equal(getattr(untrained, name)[:2], getattr(trained, name)[:2]), name
