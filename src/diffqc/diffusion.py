"""Noise schedule and the shared, type-conditioned denoiser over feature maps.

The denoiser sees one feature vector per location (no spatial context: a denoiser that sees
its neighbours learns to copy them and rebuilds defects too). It is conditioned on the
timestep, on the feature type through one learned embedding per type plus a learned *null*
type (index ``n_types``), and on the location through a learned position embedding.
"""

from __future__ import annotations

import math

import torch
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


class NoiseSchedule(nn.Module):
    """Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I); computed once, kept as buffers."""

    sqrt_alpha_bar: Tensor
    sqrt_one_minus: Tensor

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine") -> None:
        super().__init__()
        if schedule == "cosine":
            alpha_bar = cosine_alpha_bar(timesteps)
        elif schedule == "linear":
            alpha_bar = linear_alpha_bar(timesteps)
        else:
            raise ValueError(f"unknown schedule {schedule!r} (cosine or linear)")
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


class Denoiser(nn.Module):
    """ε-prediction network: ``(x_t [B, L, C], t [B], type [B], pos [B, L]) -> ε̂ [B, L, C]``.

    With ``prior="gaussian"`` the prediction is ``ε̂_G + f_θ``: ``ε̂_G`` is the exact posterior
    mean E[ε | x_t] when x_0 ~ N(μ[type, location], Σ[type]) (Tweedie):
    ``ε̂_G = √(1-ᾱ) (ᾱ Σ + (1-ᾱ) I)^{-1} (x_t - √ᾱ μ)``, computed through Σ's eigenbasis; the
    network f_θ (zero at initialisation) learns what a Gaussian misses. The statistics are
    buffers fitted on the GOOD training features (:meth:`fit_prior`), the null type gets those
    of all types pooled.
    """

    prior_mean: Tensor
    prior_vecs: Tensor
    prior_vals: Tensor
    alpha_bar: Tensor

    def __init__(self, channels: int, n_types: int, locations: int, config: DiffusionConfig) -> None:
        super().__init__()
        e, h = config.embed_dim, config.hidden
        self.channels, self.n_types, self.locations = channels, n_types, locations
        self.embed_dim = e
        if config.prior not in ("gaussian", "none"):
            raise ValueError(f"unknown prior {config.prior!r} (gaussian or none)")
        self.use_prior = config.prior == "gaussian"
        self.shrinkage = config.prior_shrinkage
        alpha_bar = (cosine_alpha_bar if config.schedule == "cosine" else linear_alpha_bar)(config.timesteps)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        if self.use_prior:
            self.register_buffer("prior_mean", torch.zeros(n_types + 1, locations, channels))
            self.register_buffer("prior_vecs", torch.eye(channels).repeat(n_types + 1, 1, 1))
            self.register_buffer("prior_vals", torch.ones(n_types + 1, channels))
        self.type_embed = nn.Embedding(n_types + 1, e)  # the last row is the null type
        self.pos_embed = nn.Embedding(locations, e)
        self.time_mlp = nn.Sequential(nn.Linear(e, h), nn.SiLU(), nn.Linear(h, h))
        self.type_proj = nn.Linear(e, h)
        self.pos_proj = nn.Linear(e, h, bias=False)
        self.inp = nn.Linear(channels, h)
        self.blocks = nn.ModuleList([_Block(h) for _ in range(config.depth)])
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, channels)
        nn.init.normal_(self.type_embed.weight, std=0.5)
        nn.init.normal_(self.pos_embed.weight, std=0.5)
        if self.use_prior:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def fit_prior(self, tokens: Tensor, type_idx: Tensor) -> None:
        """Per-type location means and a shrunk covariance from GOOD ``tokens [N, L, C]``."""
        if not self.use_prior:
            return
        groups = [type_idx == k for k in range(self.n_types)] + [torch.ones_like(type_idx, dtype=torch.bool)]
        for k, sel in enumerate(groups):
            x = tokens[sel].double()
            if x.shape[0] == 0:
                continue
            mean = x.mean(dim=0)  # [L, C]
            resid = (x - mean).reshape(-1, self.channels)
            cov = resid.T @ resid / max(1, resid.shape[0] - 1)
            target = torch.eye(self.channels, dtype=cov.dtype) * cov.diagonal().mean()
            cov = (1 - self.shrinkage) * cov + self.shrinkage * target
            vals, vecs = torch.linalg.eigh(cov)
            self.prior_mean[k] = mean.float()
            self.prior_vecs[k] = vecs.float()
            self.prior_vals[k] = vals.clamp_min(1e-6).float()

    def gaussian_eps(self, x_t: Tensor, t: Tensor, type_idx: Tensor, pos: Tensor) -> Tensor:
        """E[ε | x_t] under the per-type Gaussian."""
        ab = self.alpha_bar[t].view(-1, 1, 1)
        mu = self.prior_mean[type_idx[:, None], pos]  # [B, L, C]
        vecs = self.prior_vecs[type_idx]  # [B, C, C]
        gain = (1 - ab).sqrt() / (ab * self.prior_vals[type_idx][:, None, :] + (1 - ab))  # [B, 1, C]
        z = torch.bmm(x_t - ab.sqrt() * mu, vecs) * gain
        return torch.bmm(z, vecs.transpose(1, 2))

    @property
    def null_type(self) -> int:
        return self.n_types

    def forward(self, x_t: Tensor, t: Tensor, type_idx: Tensor, pos: Tensor) -> Tensor:
        cond = self.time_mlp(sinusoidal_embedding(t, self.embed_dim)) + self.type_proj(
            self.type_embed(type_idx)
        )  # [B, H]
        h = self.inp(x_t) + self.pos_proj(self.pos_embed(pos)) + cond[:, None, :]
        c = cond[:, None, :]
        for block in self.blocks:
            h = block(h, c)
        out = self.out(self.out_norm(h))
        if self.use_prior:
            out = out + self.gaussian_eps(x_t, t, type_idx, pos)
        return out
