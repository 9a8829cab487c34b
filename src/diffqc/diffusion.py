"""Noise schedule and the shared, type-conditioned denoiser over feature maps.

The denoiser sees one feature vector per location (no spatial context: a denoiser that sees
its neighbours learns to copy them and rebuilds defects too). Optionally
(``diffusion.context=ring``) it also sees the mean of the 8 neighbouring locations' noisy
features, never its own location's, so that it can learn what a location should look like
from its surroundings without being able to copy itself. It is conditioned on the
timestep, on the feature type through one learned embedding per type plus a learned *null*
type (index ``n_types``), and on the location through a learned position embedding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffqc.config import DiffusionConfig


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> Tensor:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal 2021), float64, t = 0..T-1."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def linear_alpha_bar(timesteps: int) -> Tensor:
    betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def alpha_bar_of(config: DiffusionConfig) -> Tensor:
    """ᾱ_t (float64) of the configured schedule."""
    if config.schedule == "cosine":
        return cosine_alpha_bar(config.timesteps)
    if config.schedule == "linear":
        return linear_alpha_bar(config.timesteps)
    raise ValueError(f"unknown schedule {config.schedule!r} (cosine or linear)")


def log_snr(alpha_bar: Tensor) -> Tensor:
    """λ_t = log SNR_t = log(ᾱ_t / (1 - ᾱ_t)); decreasing in t."""
    return (alpha_bar / (1 - alpha_bar)).log()


def vlb_timestep_weights(alpha_bar: Tensor, t_min: int, t_max: int) -> Tensor:
    """Training distribution over the integer timesteps ``t_min..t_max`` that is uniform in λ:
    the share of step t is the width of its λ-cell (λ_{t-1} − λ_t). For ε-prediction the
    variational bound is ½∫ E‖ε − ε̂‖² dλ (Kingma et al. 2021, VDM: −SNR'(t)/SNR(t) dt = −dλ),
    so sampling t this way and averaging the plain ε-MSE trains on exactly the bound that
    scoring integrates (:func:`vlb_quadrature`)."""
    lam = log_snr(alpha_bar.double())
    t = torch.arange(t_min, t_max + 1)
    prev = torch.where(t > 0, lam[(t - 1).clamp_min(0)], 2 * lam[0] - lam[1])
    width = (prev - lam[t]).clamp_min(0)
    return width / width.sum()


def vlb_quadrature(alpha_bar: Tensor, t_min: int, t_max: int, nodes: int) -> tuple[Tensor, Tensor]:
    """Midpoint rule in λ for ½∫_{λ(t_max)}^{λ(t_min)} g(λ) dλ: ``nodes`` integer timesteps
    (the t whose λ is nearest each cell's midpoint) and their weights (½ × the cell width)."""
    if nodes < 1:
        raise ValueError("nodes must be >= 1")
    lam = log_snr(alpha_bar.double())
    hi, lo = float(lam[t_min]), float(lam[t_max])
    width = (hi - lo) / nodes
    mids = torch.tensor([hi - (j + 0.5) * width for j in range(nodes)], dtype=torch.float64)
    span = lam[t_min : t_max + 1]
    ts = t_min + (span[None, :] - mids[:, None]).abs().argmin(dim=1)
    return ts.long(), torch.full((nodes,), 0.5 * width, dtype=torch.float64)


class NoiseSchedule(nn.Module):
    """Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I); computed once, kept as buffers."""

    sqrt_alpha_bar: Tensor
    sqrt_one_minus: Tensor

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine") -> None:
        super().__init__()
        alpha_bar = alpha_bar_of(DiffusionConfig(timesteps=timesteps, schedule=schedule))
        self.timesteps = timesteps
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus", (1 - alpha_bar).sqrt().float(), persistent=False)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noisy features; ``t`` has one entry per leading index of ``x0``."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_alpha_bar[t].view(shape)
        b = self.sqrt_one_minus[t].view(shape)
        return a * x0 + b * noise


def sinusoidal_embedding(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        z = self.act(self.fc1(self.norm(h)) + self.cond(cond))
        return h + self.fc2(z)


def _eigen_gain(r: Tensor, vecs: Tensor, vals: Tensor, alpha_bar: Tensor,
                rest: Tensor | None = None) -> Tensor:
    """``g(Σ) r`` with ``g(s) = √(1-ᾱ_k) / (ᾱ_k s + 1 - ᾱ_k)``, for row vectors
    ``r [G, L, K, M, d]`` (K timesteps of ᾱ ``alpha_bar [K]``, M vectors each) and eigenbases
    ``vecs [G, L, d, q]`` with eigenvalues ``vals [G, L, q]``: two batched products over G·L.
    With q < d, ``rest [G, L]`` is the variance of the discarded directions (Σ_q = V diag(λ) Vᵀ
    + σ²(I − V Vᵀ)) and the result is ``V ((g(λ) − g(σ²)) ⊙ Vᵀr) + g(σ²) r``."""
    g, locs, k, m, d = r.shape
    q = vecs.shape[-1]
    ab = alpha_bar.view(1, 1, k, 1, 1)
    gain = (1 - ab).sqrt() / (ab * vals[:, :, None, None, :] + (1 - ab))  # [G, L, K, 1, q]
    # contiguous: a strided view (a slice of the channels) sends bmm into a per-matrix loop
    rc = r.reshape(g, locs, k * m, d).contiguous()
    z = (rc @ vecs).view(g, locs, k, m, q)
    if rest is None:
        return ((z * gain).view(g, locs, k * m, q) @ vecs.transpose(-1, -2)).view(g, locs, k, m, d)
    gain_rest = (1 - ab).sqrt() / (ab * rest[:, :, None, None, None] + (1 - ab))  # [G, L, K, 1, 1]
    low = ((z * (gain - gain_rest)).view(g, locs, k * m, q) @ vecs.transpose(-1, -2))
    return low.view(g, locs, k, m, d) + gain_rest * r


def _neighbours(grid: tuple[int, int], radius: int) -> Tensor:
    """``[h·w, (2r+1)²]``: for each location of the grid (row-major) the indices of the
    locations within ``radius`` cells in each direction, clamped at the borders."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    offs = torch.arange(-radius, radius + 1)
    ny = (ys.reshape(-1, 1, 1) + offs.view(1, -1, 1)).clamp(0, h - 1)
    nx = (xs.reshape(-1, 1, 1) + offs.view(1, 1, -1)).clamp(0, w - 1)
    return (ny * w + nx).reshape(h * w, -1)


def ring_index(grid: tuple[int, int], device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """The 8 cells around each location of the grid (row-major), never the location itself:
    indices ``[h·w, 8]`` (a cell outside the grid points at the centre) and whether each is inside
    the grid ``[h·w, 8]`` (bool)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1])
    dx = torch.tensor([-1, 0, 1, -1, 1, -1, 0, 1])
    ny, nx = ys.reshape(-1, 1) + dy, xs.reshape(-1, 1) + dx
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    idx = torch.where(inside, ny * w + nx, (ys * w + xs).reshape(-1, 1))
    return idx.to(device), inside.to(device)


def ring_mean(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Mean of the (up to 8) neighbouring locations' features, the centre excluded:
    ``x [B, h·w, C]`` (row-major grid) -> ``[B, h·w, C]``. A 3 x 3 average pool over the cells
    inside the grid, minus the centre (exports to ONNX as AveragePool)."""
    b, locs, c = x.shape
    h, w = grid
    img = x.transpose(1, 2).reshape(b, c, h, w)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    others = 9 * F.avg_pool2d(ones, 3, 1, 1) - 1  # cells of the window inside the grid, less the centre
    total = 9 * F.avg_pool2d(img, 3, 1, 1)  # zero padding: the sum over the cells inside
    return ((total - img) / others.clamp_min(1)).reshape(b, c, locs).transpose(1, 2)


def sampled_ring(tokens: Tensor, img: Tensor, pos: Tensor, t: Tensor, schedule: NoiseSchedule,
                 ring: tuple[Tensor, Tensor], gen: torch.Generator) -> Tensor:
    """Training's ring context (:func:`ring_mean`) at sampled locations: the neighbours (``ring``
    from :func:`ring_index`) of location ``pos [b, m]`` in image ``img [b]`` of ``tokens [N, L, C]``,
    noised at the image's timestep ``t [b]`` with their own noise, averaged -> ``[b, m, C]``."""
    idx, inside = ring
    x0 = tokens[img[:, None, None], idx[pos]]  # [b, m, 8, C]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    weight = inside[pos].to(x0.dtype).unsqueeze(-1)
    return (schedule.q_sample(x0, t, noise) * weight).sum(2) / weight.sum(2)


class PriorParams(NamedTuple):
    """Per-token Gaussian parameters (channels permuted: the full-covariance block first)."""

    mean: Tensor  # [B, L, C]
    var: Tensor  # [B, L, C]
    vecs: Tensor  # [B, L, d, r]
    vals: Tensor  # [B, L, r]
    rest: Tensor | None = None  # [B, L]: the discarded directions' variance when r < d


class Denoiser(nn.Module):
    """ε-prediction network: ``(x_t [B, L, C], t [B], type [B], pos [B, L]) -> ε̂ [B, L, C]``.

    With ``prior="local"`` the prediction is ``ε̂_G + f_θ``. ``ε̂_G`` is the exact posterior
    mean E[ε | x_t] when x_0 ~ N(μ[type, loc], Σ[type, loc]) (Tweedie):
    ``ε̂_G = √(1-ᾱ) (ᾱ Σ + (1-ᾱ) I)^{-1} (x_t - √ᾱ μ)``. Σ is a full (Ledoit–Wolf shrunk)
    covariance on a fixed random subset of ``prior_dims`` channels, kept as its eigenbasis, and
    diagonal on the others. With ``prior_rank`` r < d only the top r eigenpairs are kept and the
    other d − r directions share one variance (the mean of their eigenvalues: the maximum-
    likelihood probabilistic PCA of that covariance, Tipping & Bishop 1999). The network f_θ
    (zero at initialisation) learns what a Gaussian misses. The statistics are buffers fitted on
    the GOOD training features (:meth:`fit_prior`); the null type gets those of all types pooled.
    """

    alpha_bar: Tensor
    prior_mean: Tensor  # [T+1, L, C], channels in prior order (prior_perm)
    prior_var: Tensor  # [T+1, L, C], channels in prior order
    prior_vecs: Tensor  # [T+1, L, d, r]: the top-r eigenvectors
    prior_vals: Tensor  # [T+1, L, r]
    prior_rest: Tensor  # [T+1, L]: the other d − r directions' variance (only when r < d)
    prior_perm: Tensor  # [C]: the full-covariance channels first
    prior_unperm: Tensor  # [C]

    def __init__(self, channels: int, n_types: int, locations: int, config: DiffusionConfig,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        e, h = config.embed_dim, config.hidden
        self.channels, self.n_types, self.locations = channels, n_types, locations
        self.grid = grid or (locations, 1)  # (h, w): only the ring context uses it
        self.use_ring = config.context == "ring"
        if self.use_ring and self.grid[0] * self.grid[1] != locations:
            raise ValueError(f"grid {self.grid} does not have {locations} locations")
        self.embed_dim = e
        if config.prior not in ("local", "none"):
            raise ValueError(f"unknown prior {config.prior!r} (local or none)")
        self.use_prior = config.prior == "local"
        self.prior_dims = min(config.prior_dims, channels)
        rank = config.prior_rank
        self.prior_rank = self.prior_dims if rank <= 0 or rank >= self.prior_dims else rank
        self.low_rank = self.prior_rank < self.prior_dims
        alpha_bar = alpha_bar_of(config)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        if self.use_prior:
            d, k = self.prior_dims, n_types + 1
            perm = torch.randperm(channels, generator=torch.Generator().manual_seed(config.prior_seed))
            perm = torch.cat([perm[:d].sort().values, perm[d:].sort().values])
            self.register_buffer("prior_perm", perm)
            self.register_buffer("prior_unperm", torch.argsort(perm))
            self.register_buffer("prior_mean", torch.zeros(k, locations, channels))
            self.register_buffer("prior_var", torch.ones(k, locations, channels))
            r = self.prior_rank
            self.register_buffer("prior_vecs", torch.eye(d)[:, d - r :].expand(k, locations, d, r).clone())
            self.register_buffer("prior_vals", torch.ones(k, locations, r))
            if self.low_rank:  # absent at full rank: full-rank bundles keep their layout
                self.register_buffer("prior_rest", torch.ones(k, locations))
        self.type_embed = nn.Embedding(n_types + 1, e)  # the last row is the null type
        self.pos_embed = nn.Embedding(locations, e)
        self.time_mlp = nn.Sequential(nn.Linear(e, h), nn.SiLU(), nn.Linear(h, h))
        self.type_proj = nn.Linear(e, h)
        self.pos_proj = nn.Linear(e, h, bias=False)
        self.inp = nn.Linear(channels, h)
        if self.use_ring:  # the neighbours' mean, projected like the input (diffusion.context)
            self.ring_inp = nn.Linear(channels, h, bias=False)
        self.blocks = nn.ModuleList([_Block(h) for _ in range(config.depth)])
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, channels)
        nn.init.normal_(self.type_embed.weight, std=0.5)
        nn.init.normal_(self.pos_embed.weight, std=0.5)
        if self.use_prior:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def fit_prior(self, tokens: Tensor, type_idx: Tensor, grid: tuple[int, int] | None = None,
                  radius: int = 0) -> None:
        """Per-type, per-location Gaussians from GOOD ``tokens [N, L, C]``; with ``radius`` > 0
        each location's Gaussian pools the features of every location within ``radius`` cells of
        it on the ``grid`` (h, w) (clamped at the borders)."""
        if not self.use_prior:
            return
        from diffqc.covariance import ledoit_wolf_batched

        d, rank = self.prior_dims, self.prior_rank
        nbr = _neighbours(grid or (self.locations, 1), radius)  # [L, M]
        block = max(1, 256 // nbr.shape[1])
        groups = [type_idx == k for k in range(self.n_types)] + [torch.ones_like(type_idx, dtype=torch.bool)]
        for k, sel in enumerate(groups):
            x = tokens[sel][:, :, self.prior_perm]
            if x.shape[0] == 0:
                continue
            mean = x.mean(dim=0)
            var = x.var(dim=0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])
            if radius > 0:  # pooled over the neighbourhood: mean of the means, total variance
                mean_n = mean[nbr].mean(dim=1)
                var = (var[nbr] + mean[nbr].pow(2)).mean(dim=1) - mean_n.pow(2)
                mean = mean_n
            self.prior_mean[k] = mean
            floor = 0.01 * var.mean()
            self.prior_var[k] = var + floor
            for s in range(0, self.locations, block):  # bounded memory
                idx = nbr[s : s + block]  # [l, M]
                per_loc = x[:, idx, :d].permute(1, 0, 2, 3).reshape(idx.shape[0], -1, d).double()
                _, cov, _ = ledoit_wolf_batched(per_loc)
                cov = cov + floor.double() * torch.eye(d, dtype=cov.dtype, device=cov.device)
                vals, vecs = torch.linalg.eigh(cov)  # ascending: the top r are the last r
                vals = vals.clamp_min(1e-6)
                self.prior_vecs[k, s : s + block] = vecs[..., d - rank :].float()
                self.prior_vals[k, s : s + block] = vals[..., d - rank :].float()
                if self.low_rank:  # probabilistic PCA: the mean of the discarded eigenvalues
                    self.prior_rest[k, s : s + block] = vals[..., : d - rank].mean(-1).float()

    def gather_prior(self, type_idx: Tensor, pos: Tensor | None = None) -> PriorParams:
        """The Gaussian parameters of each token's type and location, in the permuted channel
        order. ``pos=None`` means every location in order (scoring), which is a plain index on the
        type axis. Gathered once per image and reused for every (t, ε) pair of a score bank."""
        if pos is None:
            idx: tuple[Tensor, ...] = (type_idx,)
        else:
            idx = (type_idx[:, None], pos)
        return PriorParams(self.prior_mean[idx], self.prior_var[idx], self.prior_vecs[idx],
                           self.prior_vals[idx], self.prior_rest[idx] if self.low_rank else None)

    def gaussian_eps(self, x_t: Tensor, t: Tensor, prior: PriorParams) -> Tensor:
        """E[ε | x_t] under the per-type, per-location Gaussian ``prior`` (see gather_prior)."""
        d = self.prior_dims
        ab = self.alpha_bar[t].view(-1, 1, 1)
        sq, sq1 = ab.sqrt(), (1 - ab).sqrt()
        resid = x_t[..., self.prior_perm] - sq * prior.mean  # [B, L, C]
        diag = resid[..., d:] * sq1 / (ab * prior.var[..., d:] + (1 - ab))
        gain = sq1 / (ab * prior.vals + (1 - ab))  # [B, L, d]
        # batched mat-vec products (not einsum): they export to ONNX as MatMul, which runs
        # several times faster than the Einsum kernel of ONNX Runtime on CPU
        r = resid[..., :d]
        z = (r.unsqueeze(-2) @ prior.vecs).squeeze(-2)  # [B, L, r]
        if prior.rest is None:
            full = (prior.vecs @ (z * gain).unsqueeze(-1)).squeeze(-1)
        else:  # low rank: g(σ²) on the discarded directions, g(λ) on the kept ones
            gain_rest = sq1 / (ab * prior.rest.unsqueeze(-1) + (1 - ab))  # [B, L, 1]
            full = (prior.vecs @ (z * (gain - gain_rest)).unsqueeze(-1)).squeeze(-1) + gain_rest * r
        return torch.cat([full, diag], dim=-1)[..., self.prior_unperm]

    def gaussian_eps_bank(self, x_t: Tensor, t: Tensor, type_idx: Tensor) -> Tensor:
        """:meth:`gaussian_eps` for a whole score bank at every location in order, **in the
        prior's channel order** (``prior_perm``, in and out): ``x_t [K, N, L, C]`` noised at
        timesteps ``t [K]``, images of types ``type_idx [N]``.

        Same values as calling :meth:`gaussian_eps` once per timestep, but each eigenbasis is
        read twice per image instead of twice per (image, timestep): the bank's K vectors of a
        location go through one matrix product. The full-covariance block is memory-bound, so
        this is what its cost is. Eagerly, the images are grouped by type and each type's
        eigenbases are used in place (no per-image copy); a traced graph (ONNX) gathers them per
        image, since the types are an input there.
        """
        d = self.prior_dims
        k = t.shape[0]
        ab = self.alpha_bar[t]
        abv = ab.view(k, 1, 1, 1)
        traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        single = not traced and bool((type_idx == type_idx[0]).all())
        # one type: its parameters in place (views); else gathered per image (small next to x_t)
        sel0: Tensor | int = int(type_idx[0]) if single else type_idx
        # traced: [: n_types], the null type's row is for training only, not a graph constant
        rows = slice(0, self.n_types) if traced else slice(None)
        mean, var = self.prior_mean[rows][sel0], self.prior_var[rows][sel0][..., d:]
        resid = x_t - abv.sqrt() * mean  # [K, N, L, C]
        diag = resid[..., d:] * ((1 - abv).sqrt() / (abv * var + (1 - abv)))
        r = resid[..., :d]
        if traced:
            vecs, vals = self.prior_vecs[rows], self.prior_vals[rows]
            rest = self.prior_rest[rows][type_idx] if self.low_rank else None
            full = _eigen_gain(r.permute(1, 2, 0, 3).unsqueeze(3), vecs[type_idx], vals[type_idx],
                               ab, rest).squeeze(3).permute(2, 0, 1, 3)
        elif single:
            ty = int(type_idx[0])
            full = _eigen_gain(r.permute(2, 0, 1, 3).unsqueeze(0), self.prior_vecs[ty][None],
                               self.prior_vals[ty][None], ab, self._rest_of(ty))[0].permute(1, 2, 0, 3)
        else:
            full = torch.empty_like(r)
            for ty in type_idx.unique().tolist():
                sel = (type_idx == ty).nonzero().squeeze(1)
                part = r[:, sel].permute(2, 0, 1, 3).unsqueeze(0)  # [1, L, K, m, d]
                out = _eigen_gain(part, self.prior_vecs[ty][None], self.prior_vals[ty][None], ab,
                                  self._rest_of(ty))
                full[:, sel] = out[0].permute(1, 2, 0, 3)
        return torch.cat([full, diag], dim=-1)

    def _rest_of(self, ty: int) -> Tensor | None:
        """``[1, L]``: type ``ty``'s discarded-direction variances (None at full rank)."""
        return self.prior_rest[ty][None] if self.low_rank else None

    def mahalanobis(self, x: Tensor, type_idx: Tensor) -> Tensor:
        """½ δᵀΣ⁻¹δ per location (δ = x − μ) under each image's type: ``x [N, L, C]`` **in the
        prior's channel order** -> ``[N, L]``. This is the image-dependent part of −log p(x) under
        the per-location Gaussian, which the variational bound of the Gaussian path equals
        exactly when integrated over all noise levels (see docs/METHOD.md)."""
        d = self.prior_dims
        traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        rows = slice(0, self.n_types) if traced else slice(None)
        delta = x - self.prior_mean[rows][type_idx]
        diag = (delta[..., d:].pow(2) / self.prior_var[rows][type_idx][..., d:]).sum(-1)
        r = delta[..., :d]
        if traced:
            z = (r.unsqueeze(-2) @ self.prior_vecs[rows][type_idx]).squeeze(-2)  # [N, L, r]
            full = (z.pow(2) / self.prior_vals[rows][type_idx]).sum(-1)
            if self.low_rank:  # the discarded directions: (|δ|² − |z|²) / σ²
                left = (r.pow(2).sum(-1) - z.pow(2).sum(-1)).clamp_min(0)
                full = full + left / self.prior_rest[rows][type_idx]
        else:  # per type, its eigenbases used in place (no per-image copy)
            full = torch.empty(r.shape[:2], dtype=r.dtype, device=r.device)
            for ty in type_idx.unique().tolist():
                sel = (type_idx == ty).nonzero().squeeze(1)
                rt = r[sel].transpose(0, 1).contiguous()  # [L, m, d]
                z = rt @ self.prior_vecs[ty]  # [L, m, r]
                part = (z.pow(2) / self.prior_vals[ty][:, None, :]).sum(-1)  # [L, m]
                if self.low_rank:
                    left = (rt.pow(2).sum(-1) - z.pow(2).sum(-1)).clamp_min(0)
                    part = part + left / self.prior_rest[ty][:, None]
                full[sel] = part.transpose(0, 1)
        return 0.5 * (full + diag)

    def log_det_term(self, type_idx: Tensor) -> Tensor:
        """The image-independent part of −log p(x) per location, ½(log det Σ + C log 2π):
        ``[N, L]`` for images of types ``type_idx [N]``."""
        d = self.prior_dims
        traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        rows = slice(0, self.n_types) if traced else slice(None)
        logdet = self.prior_vals[rows].log().sum(-1) + self.prior_var[rows][..., d:].log().sum(-1)
        if self.low_rank:  # d − r discarded directions of variance σ²
            logdet = logdet + (d - self.prior_rank) * self.prior_rest[rows].log()
        return 0.5 * (logdet + self.channels * math.log(2 * math.pi))[type_idx]

    def residual(self, x_t: Tensor, t: Tensor, type_idx: Tensor, pos: Tensor,
                 channel_order: Tensor | None = None, ring: Tensor | None = None) -> Tensor:
        """The learned part f_θ alone (what :meth:`forward` adds to the Gaussian path). With
        ``channel_order`` (e.g. ``prior_perm``) the channels of ``x_t`` and of the result are in
        that order: the first and last layers' weights are permuted instead of the activations.
        With ``diffusion.context=ring``, ``ring`` is the mean of each location's neighbours in
        ``x_t``'s noisy grid (same channel order); by default it is computed from ``x_t``, which
        must then hold every location of the grid in order (scoring)."""
        cond = self.time_mlp(sinusoidal_embedding(t, self.embed_dim)) + self.type_proj(
            self.type_embed(type_idx)
        )  # [B, H]
        if channel_order is None:
            h = self.inp(x_t)
        else:
            h = F.linear(x_t, self.inp.weight[:, channel_order], self.inp.bias)
        if self.use_ring:
            if ring is None:
                if x_t.shape[1] != self.locations:
                    raise ValueError("diffusion.context=ring needs every location of the grid, or `ring`")
                ring = ring_mean(x_t, self.grid)
            weight = self.ring_inp.weight if channel_order is None else self.ring_inp.weight[:, channel_order]
            h = h + F.linear(ring, weight)
        h = h + self.pos_proj(self.pos_embed(pos)) + cond[:, None, :]
        c = cond[:, None, :]
        for block in self.blocks:
            h = block(h, c)
        h = self.out_norm(h)
        if channel_order is None:
            out: Tensor = self.out(h)
            return out
        return F.linear(h, self.out.weight[channel_order], self.out.bias[channel_order])

    def network_is_zero(self) -> bool:
        """Whether the residual network's output layer is exactly zero (never trained)."""
        return not bool(self.out.weight.any()) and not bool(self.out.bias.any())

    @property
    def null_type(self) -> int:
        return self.n_types

    def forward(self, x_t: Tensor, t: Tensor, type_idx: Tensor, pos: Tensor,
                prior: PriorParams | None = None, ring: Tensor | None = None) -> Tensor:
        """Predicted ε for ``x_t [B, L, C]`` at locations ``pos [B, L]``; ``prior`` (from
        :meth:`gather_prior` with the same ``type_idx`` and ``pos``) saves gathering it again;
        ``ring``: the neighbours' mean (see :meth:`residual`)."""
        if self.use_prior and not self.training and self.network_is_zero():
            # an untrained residual network (zero output layer, e.g. train.steps=0) adds exactly
            # zero: skip it (a weight property, so a traced ONNX graph skips it too)
            return self.gaussian_eps(x_t, t, prior if prior is not None else self.gather_prior(type_idx, pos))
        out = self.residual(x_t, t, type_idx, pos, ring=ring)
        if self.use_prior:
            if prior is None:
                prior = self.gather_prior(type_idx, pos)
            out = out + self.gaussian_eps(x_t, t, prior)
        return out
