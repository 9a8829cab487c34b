from __future__ import annotations

import pytest
import torch

from diffqc.config import DiffusionConfig, TrainConfig
from diffqc.diffusion import (
    Denoiser,
    NoiseSchedule,
    alpha_bar_of,
    cosine_alpha_bar,
    log_snr,
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
