"""The training loop (plain PyTorch): ε-prediction on GOOD features at sampled locations, with
timesteps drawn uniformly in log SNR over [t_min, t_max] (the variational bound's weighting)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from diffqc.config import DiffusionConfig, TrainConfig
from diffqc.diffusion import (
    Denoiser,
    NoiseSchedule,
    alpha_bar_of,
    ring_index,
    sampled_ring,
    vlb_timestep_weights,
)
from diffqc.errors import ConfigError


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)  # smoothed ε-MSE, one entry per logged step
    separation: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def separation_hinge(err_true: Tensor, err_other: Tensor, margin: float) -> Tensor:
    """Bounded separation loss: the error under a wrong type should exceed the error under the
    true type by ``margin``; zero once it does, so it can never run away (unlike -‖·‖²)."""
    return F.relu(margin - (err_other - err_true.detach())).mean()


def train_denoiser(
    features: Tensor,
    type_idx: Tensor,
    n_types: int,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
    context: Tensor | None = None,
) -> tuple[Denoiser, TrainHistory]:
    """Fit the shared denoiser on standardised GOOD features ``[N, C, h, w]`` (with
    ``diffusion.context=image``, ``context [N, k]``: each image's context components).

    Every step draws ``batch_images`` images and ``locations_per_image`` locations of each, a
    timestep per image in ``[t_min, t_max]`` (uniform in λ = log SNR) and fresh noise.
    Returns the EMA weights.
    """
    if features.dim() != 4 or features.shape[0] != type_idx.shape[0]:
        raise ValueError("features must be [N, C, h, w] with one type index per image")
    if train.t_min < 0 or train.t_max >= diffusion.timesteps or train.t_min > train.t_max:
        raise ValueError(f"need 0 <= t_min <= t_max < {diffusion.timesteps}")
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    n, c, h, w = features.shape
    if diffusion.prior_radius >= max(h, w):  # beyond the grid: more memory, no more locations
        raise ConfigError(f"diffusion.prior_radius={diffusion.prior_radius} reaches past the {h} x {w} "
                          f"feature grid; use at most {max(h, w) - 1} (which already pools every location)")
    locations = h * w
    tokens = features.to(device).permute(0, 2, 3, 1).reshape(n, locations, c).contiguous()
    type_idx = type_idx.to(device).long()
    model = Denoiser(c, n_types, locations, diffusion, (h, w)).to(device)
    if model.context_dim and (context is None or context.shape[0] != n):
        raise ValueError("diffusion.context=image needs the context components of every image")
    context = context.to(device) if model.context_dim and context is not None else None
    ring_cells = ring_index((h, w), device) if model.use_ring else None
    # the null type's Gaussians (every type's tokens) serve the network's training alone
    model.fit_prior(tokens, type_idx, (h, w), diffusion.prior_radius, null=train.steps > 0)
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = NoiseSchedule(diffusion.timesteps, diffusion.schedule).to(device)
    # uniform in λ = log SNR: the variational bound's weighting for ε-prediction, the same
    # range and weighting that scoring integrates (diffqc.scoring)
    t_weights = vlb_timestep_weights(alpha_bar_of(diffusion), train.t_min, train.t_max).float()
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    history = TrainHistory()
    b = min(train.batch_images, n)
    lp = min(train.locations_per_image, locations)
    running = sep_running = float("nan")
    start = time.perf_counter()
    # train.steps=0 (the default): the Gaussians alone, no bar for a loop that does not run
    bar = tqdm(range(train.steps), desc="training denoiser", disable=not progress or train.steps == 0,
               unit="step")
    for step in bar:
        img = torch.randint(0, n, (b,), generator=gen)
        pos = torch.randint(0, locations, (b, lp), generator=gen)
        x0 = tokens[img[:, None], pos].to(device)
        pos = pos.to(device)
        t = (train.t_min + torch.multinomial(t_weights, b, replacement=True, generator=gen)).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = schedule.q_sample(x0, t, noise)
        y_true = type_idx[img].to(device)
        drop = torch.rand(b, generator=gen).to(device) < diffusion.null_prob
        y = torch.where(drop, torch.full_like(y_true, n_types), y_true)
        ring = None  # diffusion.context=ring: the neighbours, noised with their own noise
        if ring_cells is not None:
            ring = sampled_ring(tokens, img.to(device), pos, t, schedule, ring_cells, gen)
        ctx = None if context is None else context[img.to(device)]
        pred = model(x_t, t, y, pos, ring=ring, context=ctx)
        err = (pred - noise).pow(2).mean(dim=(1, 2))
        loss = err.mean()
        sep_value = 0.0
        if train.separation_weight > 0 and n_types > 1:
            keep = ~drop
            if keep.any():
                shift = torch.randint(1, n_types, (b,), generator=gen).to(device)
                other = (y_true + shift) % n_types
                pred_o = model(x_t[keep], t[keep], other[keep], pos[keep],
                               ring=None if ring is None else ring[keep],
                               context=None if ctx is None else ctx[keep])
                err_o = (pred_o - noise[keep]).pow(2).mean(dim=(1, 2))
                sep = separation_hinge(err[keep], err_o, train.separation_margin)
                loss = loss + train.separation_weight * sep
                sep_value = float(sep.detach())  # a scalar with grad: PyTorch warns
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, train.steps, train.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        value = float(err.detach().mean())
        running = value if math.isnan(running) else 0.98 * running + 0.02 * value
        sep_running = sep_value if math.isnan(sep_running) else 0.98 * sep_running + 0.02 * sep_value
        if step % 10 == 0 or step == train.steps - 1:
            history.loss.append(running)
            history.separation.append(sep_running)
            history.steps.append(step)
            bar.set_postfix(loss=f"{running:.4f}")
    history.seconds = time.perf_counter() - start
    ema.eval()
    return ema, history
