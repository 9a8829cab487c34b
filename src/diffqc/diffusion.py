"""Noise schedule and the shared, type-conditioned denoiser over feature maps.

The denoiser sees one feature vector per location (no spatial context: a denoiser that sees
its neighbours learns to copy them and rebuilds defects too). Optionally
(``diffusion.context=ring``) it also sees the mean of the 8 neighbouring locations' noisy
features, never its own location's, so that it can learn what a location should look like
from its surroundings without being able to copy itself. With ``diffusion.context=image`` it
is also conditioned on the image's context components z (:mod:`diffqc.context`), so that the
spread of a location, not only its mean, may follow the whole image. It is conditioned on the
timestep, on the feature type through one learned embedding per type plus a learned *null*
type (index ``n_types``), and on the location through a learned position embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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


def storage_dtype(config: DiffusionConfig) -> torch.dtype:
    """The dtype the Gaussians' parameters are stored (and rounded) in: ``prior_storage``; with
    ``int8``, float16, that of every table but the eigenbases and the context's effect, which
    are stored in 8 bits (:func:`pack_int8`)."""
    return torch.float16 if stores_int8(config) else getattr(torch, config.prior_storage)


def stores_int8(config: DiffusionConfig) -> bool:
    """``prior_storage=int8``: the eigenbases and the context's effect are stored in 8 bits."""
    return config.prior_storage == "int8"


# the per-type, per-location Gaussians: nearly all of a bundle's bytes (diffusion.prior_storage)
PRIOR_TENSORS = ("prior_mean", "prior_var", "prior_vecs", "prior_vals", "prior_rest")
INT8_STEPS = 127  # symmetric: -127..127, so that a vector's sign flip is exact
VECS_AXIS = -2  # prior_vecs [.., d, r]: one 8-bit scale per eigenvector (column)


def pack_int8(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``x`` in 8 bits: ``(q, scale)``, ``q`` int8 of ``x``'s shape and ``scale`` float16 with one
    entry per vector along ``dim`` (its largest magnitude / 127, at least float16's smallest
    normal number 2⁻¹⁴; kept as a size-1 ``dim``), so that ``q · scale`` (:func:`unpack_int8`) is
    ``x`` within half a step of its vector's scale: a vector whose largest entry is below 127 ·
    2⁻¹⁴ ≈ 0.0078 is kept to within 3·10⁻⁵ (a scale among float16's subnormal numbers would be
    too coarse to give back the same codes). Packing the unpacked values again gives the same
    ``q`` and ``scale``."""
    scale = (x.abs().amax(dim=dim, keepdim=True).float() / INT8_STEPS).to(torch.float16)
    scale = scale.clamp_min(2.0**-14)  # float16's smallest normal; an all-zero vector stays zero
    q = (x.float() / scale.float()).round().clamp(-INT8_STEPS, INT8_STEPS).to(torch.int8)
    return q, scale


def unpack_int8(q: Tensor, scale: Tensor) -> Tensor:
    """The float32 values of :func:`pack_int8`'s ``(q, scale)``."""
    return q.float() * scale.float()


def round_int8(x: Tensor, dim: int) -> Tensor:
    """``x`` as its 8-bit storage along ``dim`` reads back (float32)."""
    return unpack_int8(*pack_int8(x, dim))


def gather_packed(q: Tensor | None, scale: Tensor | None, dim: int, index: Tensor) -> tuple[Tensor, Tensor]:
    """The rows ``index`` along ``dim`` of a table packed for a graph to trace (``packed_storage``:
    :func:`pack_int8`'s ``(q, scale)``): their codes and scales, each widened to float32. The
    rows are the product; a caller applies the scales to what it computes from the codes where
    that is smaller than the rows (a pass over each image's rows less in the graph)."""
    if q is None or scale is None:
        raise RuntimeError("8-bit tables are traced packed: trace within packed_storage()")
    return torch.index_select(q, dim, index).float(), torch.index_select(scale, dim, index).float()


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
    """``[...]`` -> ``[..., dim]``: cosines and sines of ``dim // 2`` frequencies, and a zero
    column when ``dim`` is odd (``diffusion.embed_dim`` may be any width)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / max(half, 1))
    args = x.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


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


def gaussian_gain(alpha_bar: Tensor, var: Tensor) -> Tensor:
    """``g(s) = √(1-ᾱ) / (ᾱ s + 1 - ᾱ)``: E[ε | x_t] = g(s) (x_t − √ᾱ μ) along a direction of
    variance ``s`` of a Gaussian x_0 (broadcast over ``alpha_bar`` and ``var``)."""
    return (1 - alpha_bar).sqrt() / (alpha_bar * var + (1 - alpha_bar))


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
    # a traced graph's 8-bit eigenbases (prior_storage=int8): ``vecs`` holds their codes, and the
    # eigenvectors are ``vecs · scale`` (one scale per column) [L, N, 1, r]; applied to Vᵀx's
    # r columns (:meth:`Denoiser._project`) instead of to every image's d × r table
    scale: Tensor | None = None


class Denoiser(nn.Module):
    """ε-prediction network: ``(x_t [B, L, C], t [B], type [B], pos [B, L]) -> ε̂ [B, L, C]``.

    With ``prior="local"`` the prediction is ``ε̂_G + f_θ``. ``ε̂_G`` is the exact posterior
    mean E[ε | x_t] when x_0 ~ N(μ[type, loc], Σ[type, loc]) (Tweedie):
    ``ε̂_G = √(1-ᾱ) (ᾱ Σ + (1-ᾱ) I)^{-1} (x_t - √ᾱ μ)``. Σ is a full covariance (Ledoit–Wolf
    shrunk or the sample covariance: ``prior_covariance``) on a fixed random subset of
    ``prior_dims`` channels, kept as its eigenbasis, and diagonal on the others. With
    ``prior_rank`` r < d only the top r eigenpairs are kept and the other d − r directions share
    one variance (the mean of their eigenvalues: the maximum-likelihood probabilistic PCA of that
    covariance, Tipping & Bishop 1999). The network f_θ
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
    packed_vecs: Tensor | None  # int8 [L, T, d, r], within packed_storage() only
    packed_vecs_scale: Tensor | None  # float16 [L, T, 1, r]

    def __init__(self, channels: int, n_types: int, locations: int, config: DiffusionConfig,
                 grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        e, h = config.embed_dim, config.hidden
        self.channels, self.n_types, self.locations = channels, n_types, locations
        self.grid = grid or (locations, 1)  # (h, w): only the ring context uses it
        self.use_ring = config.context == "ring"
        # diffusion.context=image: the image's whitened context components, zero-padded to K
        self.context_dim = config.prior_context if config.context == "image" else 0
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
        self.prior_covariance = config.prior_covariance
        # the precision the Gaussians' parameters are stored in (their values are rounded to
        # it): an exported graph keeps them at it and widens each image's gathered copy
        self.prior_storage = storage_dtype(config)
        # prior_storage=int8: the eigenbases in 8 bits, one scale per eigenvector of a location;
        # the exported graph holds them packed (packed_storage), eager scoring their float32 values
        self.prior_int8 = stores_int8(config)
        self.register_buffer("packed_vecs", None, persistent=False)
        self.register_buffer("packed_vecs_scale", None, persistent=False)
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
        if self.context_dim:  # the image's context components, added to the condition
            self.context_proj = nn.Linear(self.context_dim, h, bias=False)
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
                  radius: int = 0, *, null: bool = True) -> None:
        """Per-type, per-location Gaussians from GOOD ``tokens [N, L, C]``; with ``radius`` > 0
        each location's Gaussian pools the features of every location within ``radius`` cells of
        it on the ``grid`` (h, w) (clamped at the borders). ``null``: the null type's too (every
        type's tokens), which only the network's training reads."""
        if not self.use_prior:
            return
        nbr = _neighbours(grid or (self.locations, 1), radius)  # [L, M]
        for k in range(self.n_types + int(null)):
            sel = type_idx == k if k < self.n_types else torch.ones_like(type_idx, dtype=torch.bool)
            if bool(sel.any()):
                self._fit_prior_row(k, tokens if bool(sel.all()) else tokens[sel], nbr, radius)

    def _fit_prior_row(self, k: int, tokens: Tensor, nbr: Tensor, radius: int) -> None:
        """Type ``k``'s Gaussians from its ``tokens``, in the permuted channel order: the
        eigendecompositions ``64 // M`` locations at a time (M: the locations each one pools,
        ``diffusion.prior_radius``), each block's tokens copied alone (a copy of them all in that
        order was as large as the features)."""
        from diffqc.covariance import covariance_batched

        d, rank, perm = self.prior_dims, self.prior_rank, self.prior_perm
        block = max(1, 64 // nbr.shape[1])
        mean = tokens.mean(dim=0)[:, perm]
        var = tokens.var(dim=0, unbiased=False)[:, perm] if tokens.shape[0] > 1 else torch.ones_like(mean)
        if radius > 0:  # pooled over the neighbourhood: mean of the means, total variance
            mean_n = mean[nbr].mean(dim=1)
            var = (var[nbr] + mean[nbr].pow(2)).mean(dim=1) - mean_n.pow(2)
            mean = mean_n
        self.prior_mean[k] = mean
        floor = 0.01 * var.mean()
        self.prior_var[k] = var + floor
        for s in range(0, self.locations, block):  # bounded memory
            idx = nbr[s : s + block]  # [l, M]
            per_loc = tokens[:, idx][..., perm[:d]].permute(1, 0, 2, 3).reshape(idx.shape[0], -1, d).double()
            _, cov = covariance_batched(per_loc, self.prior_covariance)
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
        resid = x_t[..., self.prior_perm] - ab.sqrt() * prior.mean  # [B, L, C]
        gain = gaussian_gain(ab, prior.vals)  # [B, L, r]
        # batched mat-vec products (not einsum): they export to ONNX as MatMul, which runs
        # several times faster than the Einsum kernel of ONNX Runtime on CPU
        r = resid[..., :d]
        z = (r.unsqueeze(-2) @ prior.vecs).squeeze(-2)  # [B, L, r]
        if prior.rest is None:
            full = (prior.vecs @ (z * gain).unsqueeze(-1)).squeeze(-1)
        else:  # low rank: g(σ²) on the discarded directions, g(λ) on the kept ones
            gain_rest = gaussian_gain(ab, prior.rest.unsqueeze(-1))  # [B, L, 1]
            full = (prior.vecs @ (z * (gain - gain_rest)).unsqueeze(-1)).squeeze(-1) + gain_rest * r
        if d < self.channels:  # the diagonal channels (none at the default rank: no empty slice)
            full = torch.cat([full, resid[..., d:] * gaussian_gain(ab, prior.var[..., d:])], dim=-1)
        return full[..., self.prior_unperm]

    def _scoring_rows(self) -> slice:
        """The types a scoring call may index: all rows eagerly; in a traced graph (ONNX) not the
        null type's, which is for training only and should not be a graph constant."""
        traced = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        return slice(0, self.n_types) if traced else slice(None)

    def _type_groups(self, type_idx: Tensor) -> list[tuple[Tensor | None, Tensor | int]]:
        """How a scoring call walks its images: eagerly one group per type, ``(images, type)``
        (``None``: all of them), so that each type's per-location parameters are used in place
        (no per-image copy: the eigenbases are most of the model's bytes); a traced graph (ONNX),
        whose types are an input, one group of all images, each with its type's parameters
        gathered (``type_idx``)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return [(None, type_idx)]
        types = type_idx.unique().tolist()
        if len(types) == 1:
            return [(None, int(types[0]))]
        return [((type_idx == ty).nonzero().squeeze(1), int(ty)) for ty in types]

    def round_to_storage(self, exact: tuple[str, ...] = ()) -> None:
        """Round the Gaussians' parameters in place to ``prior_storage`` (under ``int8`` the
        eigenbases to 8 bits), so that the fitted model (and its calibration scores) is exactly the
        one its bundle loads; ``exact``: tables known to hold their stored values already."""
        with torch.no_grad():
            for name in PRIOR_TENSORS:
                buf = getattr(self, name, None)
                if buf is None or name in exact:
                    continue
                int8 = name == "prior_vecs" and self.prior_int8
                buf.copy_(round_int8(buf, VECS_AXIS) if int8 else buf.to(self.prior_storage))

    def stored_prior(self) -> dict[str, Tensor]:
        """The Gaussians' tables as a bundle stores them: one row per type (the null type's serves
        training only: ``load_stored_prior`` puts its initial row back), at ``prior_storage``,
        under ``int8`` the eigenbases as int8 codes with ``prior_vecs_scale``."""
        out: dict[str, Tensor] = {}
        for name in PRIOR_TENSORS:
            buf = getattr(self, name, None)
            if buf is None:
                continue
            if name == "prior_vecs" and self.prior_int8:
                out[name], out["prior_vecs_scale"] = pack_int8(buf[: self.n_types], VECS_AXIS)
            else:
                out[name] = buf[: self.n_types].to(self.prior_storage)
        return out

    def load_stored_prior(self, state: dict[str, Tensor]) -> tuple[str, ...]:
        """Widen the Gaussians' tables of a bundle's denoiser ``state`` (without the prefix;
        changed in place) to float32, each with the null type's initial row where the bundle
        has one row per type; the names of those that hold their stored values exactly (8-bit
        eigenbases read as 8-bit ones), for :meth:`round_to_storage`'s ``exact``."""
        exact: tuple[str, ...] = ()
        if (scale := state.pop("prior_vecs_scale", None)) is not None:
            state["prior_vecs"] = unpack_int8(state["prior_vecs"], scale)
            exact = ("prior_vecs",) if self.prior_int8 else ()
        for key in PRIOR_TENSORS:  # one row per type (older bundles hold the null type's too: kept)
            init = getattr(self, key, None)
            if key in state and init is not None and state[key].shape == (self.n_types, *init.shape[1:]):
                state[key] = torch.cat([state[key].float(), init[self.n_types :].to(state[key].device)])
        return exact

    @contextmanager
    def packed_storage(self) -> Iterator[None]:
        """With 8-bit eigenbases (``prior_storage=int8``), packed, location-major, for a graph
        traced within (:func:`pack_int8` traced would be a graph computation, not a constant):
        the exported graph then holds the int8 table and its scales, gathers each image's rows
        and widens them. Released on leaving: eager scoring does not read them."""
        if self.use_prior and self.prior_int8:  # buffers: the graph's initializers
            self.packed_vecs, self.packed_vecs_scale = pack_int8(
                self.prior_vecs[: self.n_types].transpose(0, 1), VECS_AXIS)
        try:
            yield
        finally:
            self.packed_vecs = self.packed_vecs_scale = None

    def _params(self, sel: Tensor | int) -> PriorParams:
        """Location-major Gaussian parameters of type ``sel`` (an int: ``[L, 1, ...]``, in place)
        or of each image's type (``type_idx [N]``: ``[L, N, ...]``, gathered); ``var`` holds the
        diagonal channels only and ``vecs`` is ``[L, d, r]`` or ``[L, N, d, r]``."""
        rows, d = self._scoring_rows(), self.prior_dims
        if isinstance(sel, int):
            return PriorParams(self.prior_mean[sel][:, None], self.prior_var[sel][:, None, d:],
                               self.prior_vecs[sel], self.prior_vals[sel][:, None],
                               self.prior_rest[sel][:, None] if self.low_rank else None)

        def by_location(table: Tensor) -> Tensor:
            # [T, L, ...] -> [L, N, ...]. The transpose and the rounding to the storage precision
            # of a constant are folded at export: the graph holds the tables location-major at
            # the precision the bundle stores (float16, or the eigenbases in 8 bits under int8, the
            # default: the values are exact in it, a fraction of the file and of the resident
            # memory float32 would take) and gathers each image's copy straight
            # into the order it is used in (gathering first and transposing the copy moved each
            # image's eigenbases twice), then widens the copy to float32
            stored = table[rows].transpose(0, 1).to(self.prior_storage)
            return torch.index_select(stored, 1, sel).float()

        vecs, scale = (gather_packed(self.packed_vecs, self.packed_vecs_scale, 1, sel) if self.prior_int8
                       else (by_location(self.prior_vecs), None))
        return PriorParams(by_location(self.prior_mean), by_location(self.prior_var)[..., d:],
                           vecs, by_location(self.prior_vals),
                           by_location(self.prior_rest) if self.low_rank else None, scale)

    @staticmethod
    def _project(x: Tensor, p: PriorParams, shared: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``Vᵀ`` per location (``V``: ``p``'s eigenbases): ``x [L, N, M, d]`` -> ``[L, N, M, r]``,
        and ``shared [L, S, d]`` (the same vectors for every image: the bank's noises) ->
        ``[L, 1 or N, S, r]``.

        With one type (``vecs [L, d, r]``) every vector of a location goes through one matrix
        product, so each eigenbasis is read once: the Gaussian part is memory-bound, and that is
        what it costs. Per-image bases (``vecs [L, N, d, r]``, a traced graph) take ``shared``
        once per image; 8-bit ones (``p.scale``) are their codes, and the product is scaled."""
        locs, n, m, d = x.shape
        vecs = p.vecs
        if vecs.dim() == 3:
            rows = x.reshape(locs, n * m, d)
            if shared is not None:
                rows = torch.cat([rows, shared], dim=1)
            z = rows @ vecs  # [L, N·M (+ S), r]
            head = z[:, : n * m].view(locs, n, m, -1)
            return head, None if shared is None else z[:, n * m :].unsqueeze(1)
        rows = x if shared is None else torch.cat([x, shared.unsqueeze(1).expand(-1, n, -1, -1)], dim=2)
        z = rows @ vecs
        if p.scale is not None:  # 8-bit codes: V = codes · scale, one scale per column
            z = z * p.scale
        return (z, None) if shared is None else (z[:, :, :m], z[:, :, m:])

    def _mahalanobis(self, delta: Tensor, z: Tensor, p: PriorParams) -> Tensor:
        """½ δᵀΣ⁻¹δ from location-major ``delta [L, N, C]`` (prior order) and its projection
        ``z = Vᵀδ [L, N, r]``, under the parameters ``p`` (:meth:`_params`) -> ``[L, N]``."""
        d = self.prior_dims
        full = (z.pow(2) / p.vals).sum(-1)
        if p.rest is not None:  # the discarded directions: (|δ|² − |z|²) / σ²
            left = (delta[..., :d].pow(2).sum(-1) - z.pow(2).sum(-1)).clamp_min(0)
            full = full + left / p.rest
        if d < self.channels:  # the diagonal channels (none at the default rank: no empty slice, which
            # torch 2.11's ONNX exporter turned into a sum that ONNX Runtime cannot broadcast)
            full = full + (delta[..., d:].pow(2) / p.var).sum(-1)
        return 0.5 * full

    def mahalanobis(self, x: Tensor, type_idx: Tensor) -> Tensor:
        """½ δᵀΣ⁻¹δ per location (δ = x − μ) under each image's type: ``x [N, L, C]`` **in the
        prior's channel order** -> ``[N, L]``. This is the image-dependent part of −log p(x) under
        the per-location Gaussian, which the variational bound of the Gaussian path equals
        exactly when integrated over all noise levels (see docs/METHOD.md)."""
        xl = x.transpose(0, 1).contiguous()  # [L, N, C] (strided operands send bmm into a per-matrix loop)
        out = x.new_empty(x.shape[1], x.shape[0])
        for sel, ty in self._type_groups(type_idx):
            part = xl if sel is None else xl[:, sel]
            p = self._params(ty)
            delta = part - p.mean
            z, _ = self._project(delta[..., None, : self.prior_dims], p)
            maha = self._mahalanobis(delta, z[:, :, 0], p)
            if sel is None:
                return maha.transpose(0, 1)
            out[:, sel] = maha
        return out.transpose(0, 1)

    def bound_with_network(self, x: Tensor, type_idx: Tensor, f: Tensor, t: Tensor, noise: Tensor,
                           weights: Tensor) -> Tensor:
        """½ δᵀΣ⁻¹δ + Σ_k w_k (‖f_k‖² − 2 f_k·(ε_k − ε̂_G,k)) per location: the Gaussian path's
        closed form plus the network's correction at the score bank's pairs, for ``x [N, L, C]``
        **in the prior's channel order** (as the bank's ``noise [K, L, C]`` and the network's
        residuals ``f [L, N, K, C]`` (:meth:`bank_residual`) at ``x_t = √ᾱ_k x + √(1-ᾱ_k) ε_k``,
        timesteps ``t [K]``, weights ``weights [K]``) -> ``[N, L]``.

        ε̂_G is never formed: it is linear in x_t − √ᾱ μ = √ᾱ δ + √(1-ᾱ) ε, so its projection on
        the eigenvectors is that of δ and ε, and f·ε̂_G needs only Vᵀf and a few dot products.
        One pass over each type's eigenbases projects δ, the noises and the residuals together
        and also gives the Mahalanobis term."""
        xl, noise_l = x.transpose(0, 1).contiguous(), noise.transpose(0, 1).contiguous()  # [L, N | K, C]
        out = x.new_empty(x.shape[1], x.shape[0])
        for sel, ty in self._type_groups(type_idx):
            if sel is None:
                return self._bound_part(xl, f, t, noise_l, weights, self._params(ty)).transpose(0, 1)
            out[:, sel] = self._bound_part(xl[:, sel], f[:, sel], t, noise_l, weights, self._params(ty))
        return out.transpose(0, 1)

    def _bound_part(self, x: Tensor, f: Tensor, t: Tensor, noise: Tensor, weights: Tensor,
                    p: PriorParams) -> Tensor:
        """:meth:`bound_with_network` location-major, under parameters ``p``: ``x [L, N, C]``,
        ``f [L, N, K, C]``, ``noise [L, K, C]`` -> ``[L, N]``."""
        d = self.prior_dims
        delta = x - p.mean  # [L, N, C]
        eps = noise[:, None]  # [L, 1, K, C]
        rows = torch.cat([delta[:, :, None, :d], f[..., :d]], dim=2)  # [L, N, 1 + K, d]
        z, z_eps = self._project(rows, p, noise[..., :d])
        assert z_eps is not None
        z_delta, z_f = z[:, :, 0], z[:, :, 1:]  # [L, N, r], [L, N, K, r]
        ab = self.alpha_bar[t]  # [K]
        a, b = ab.sqrt(), (1 - ab).sqrt()
        gain = gaussian_gain(ab[:, None], p.vals[:, :, None])  # [L, 1 or N, K, r]
        f_eps = (f[..., :d] * eps[..., :d]).sum(-1)  # [L, N, K]
        err = f.pow(2).sum(-1) - 2 * f_eps  # ‖f‖² − 2 f·ε, then + 2 f·ε̂_G
        if p.rest is not None:  # ε̂_G = V((g(λ) − g(σ²)) ⊙ Vᵀr) + g(σ²) r on the full block
            g_rest = gaussian_gain(ab, p.rest[..., None])  # [L, 1 or N, K]
            gain = gain - g_rest[..., None]
            f_delta = (f[..., :d] * delta[:, :, None, :d]).sum(-1)
            err = err + 2 * g_rest * (a * f_delta + b * f_eps)
        zg = z_f * gain
        err = err + 2 * (a * (zg * z_delta[:, :, None]).sum(-1) + b * (zg * z_eps).sum(-1))
        if d < self.channels:  # the diagonal channels: ε̂_G = g(s) (√ᾱ δ + √(1-ᾱ) ε) per channel
            abv = ab.view(-1, 1)
            resid = abv.sqrt() * delta[:, :, None, d:] + (1 - abv).sqrt() * eps[..., d:]
            eps_g = gaussian_gain(abv, p.var[:, :, None]) * resid
            err = err + 2 * (f[..., d:] * (eps_g - eps[..., d:])).sum(-1)
        return self._mahalanobis(delta, z_delta, p) + (err * weights).sum(-1)

    def log_det_term(self, type_idx: Tensor) -> Tensor:
        """The image-independent part of −log p(x) per location, ½(log det Σ + C log 2π):
        ``[N, L]`` for images of types ``type_idx [N]``."""
        d, rows = self.prior_dims, self._scoring_rows()
        logdet = self.prior_vals[rows].log().sum(-1) + self.prior_var[rows][..., d:].log().sum(-1)
        if self.low_rank:  # d − r discarded directions of variance σ²
            logdet = logdet + (d - self.prior_rank) * self.prior_rest[rows].log()
        return 0.5 * (logdet + self.channels * math.log(2 * math.pi))[type_idx]

    def residual(self, x_t: Tensor, t: Tensor, type_idx: Tensor, pos: Tensor,
                 channel_order: Tensor | None = None, ring: Tensor | None = None,
                 context: Tensor | None = None) -> Tensor:
        """The learned part f_θ alone (what :meth:`forward` adds to the Gaussian path). With
        ``channel_order`` (e.g. ``prior_perm``) the channels of ``x_t`` and of the result are in
        that order: the first and last layers' weights are permuted instead of the activations.
        With ``diffusion.context=ring``, ``ring`` is the mean of each location's neighbours in
        ``x_t``'s noisy grid (same channel order); by default it is computed from ``x_t``, which
        must then hold every location of the grid in order (scoring). With
        ``diffusion.context=image``, ``context [B, k]`` holds each image's context components."""
        time = self.time_mlp(sinusoidal_embedding(t, self.embed_dim))
        cond = time + self._image_condition(type_idx, context)  # [B, H]
        if self.use_ring and ring is None:
            if x_t.shape[1] != self.locations:
                raise ValueError("diffusion.context=ring needs every location of the grid, or `ring`")
            ring = ring_mean(x_t, self.grid)
        h = self._input(x_t, ring, channel_order) + self.pos_proj(self.pos_embed(pos)) + cond[:, None, :]
        return self._trunk(h, cond[:, None, :], channel_order)

    def bank_residual(self, x_t: Tensor, t: Tensor, type_idx: Tensor,
                      channel_order: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """:meth:`residual` at every location of K noisy copies of N images, laid out location-
        major: ``x_t [L, N, K, C]`` (image n's copy at timestep ``t [K]`` k), types
        ``type_idx [N]`` -> ``[L, N, K, C]``. The network is per location, so this is the same
        function; the layout is the one the Gaussian part's per-location products read
        (:meth:`bound_with_network`), and the timestep and type conditions are computed per
        timestep and per image instead of per copy."""
        locs, n, k, c = x_t.shape
        ring = None
        if self.use_ring:
            ring = ring_mean(x_t.reshape(locs, n * k, c).transpose(0, 1), self.grid)
            ring = ring.transpose(0, 1).reshape(locs, n, k, c)
        cond = self.time_mlp(sinusoidal_embedding(t, self.embed_dim))[None] + self._image_condition(
            type_idx, context
        )[:, None]  # [N, K, H]
        h = self._input(x_t, ring, channel_order) + self.pos_proj(self.pos_embed.weight)[:, None, None] + cond
        return self._trunk(h, cond, channel_order)

    def _image_condition(self, type_idx: Tensor, context: Tensor | None) -> Tensor:
        """The per-image part of the condition ``[n, H]``: the type's embedding, and with
        ``diffusion.context=image`` the image's context components ``context [n, k]`` (k ≤ K,
        zero-padded to K) through their linear map."""
        cond: Tensor = self.type_proj(self.type_embed(type_idx))
        if not self.context_dim:
            return cond
        n = type_idx.shape[0]
        if context is None or context.shape[0] != n:
            raise ValueError(f"diffusion.context=image needs the context components of each of the "
                             f"{n} images")
        if context.shape[-1] < self.context_dim:
            context = F.pad(context, (0, self.context_dim - context.shape[-1]))
        return cond + self.context_proj(context)

    def _input(self, x_t: Tensor, ring: Tensor | None, channel_order: Tensor | None) -> Tensor:
        """The input layer on ``x_t`` (and the neighbours' mean ``ring`` with context=ring)."""
        if channel_order is None:
            h = self.inp(x_t)
        else:
            h = F.linear(x_t, self.inp.weight[:, channel_order], self.inp.bias)
        if ring is not None:
            weight = self.ring_inp.weight if channel_order is None else self.ring_inp.weight[:, channel_order]
            h = h + F.linear(ring, weight)
        return h

    def _trunk(self, h: Tensor, cond: Tensor, channel_order: Tensor | None) -> Tensor:
        """The residual blocks (condition ``cond``, broadcast over ``h``'s locations) and the output
        layer."""
        for block in self.blocks:
            h = block(h, cond)
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
                prior: PriorParams | None = None, ring: Tensor | None = None,
                context: Tensor | None = None) -> Tensor:
        """Predicted ε for ``x_t [B, L, C]`` at locations ``pos [B, L]``; ``prior`` (from
        :meth:`gather_prior` with the same ``type_idx`` and ``pos``) saves gathering it again;
        ``ring``: the neighbours' mean, ``context``: the images' context components (see
        :meth:`residual`)."""
        if self.use_prior and not self.training and self.network_is_zero():
            # an untrained residual network (zero output layer, e.g. train.steps=0) adds exactly
            # zero: skip it (a weight property, so a traced ONNX graph skips it too)
            return self.gaussian_eps(x_t, t, prior if prior is not None else self.gather_prior(type_idx, pos))
        out = self.residual(x_t, t, type_idx, pos, ring=ring, context=context)
        if self.use_prior:
            if prior is None:
                prior = self.gather_prior(type_idx, pos)
            out = out + self.gaussian_eps(x_t, t, prior)
        return out
