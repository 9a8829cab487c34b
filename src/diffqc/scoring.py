"""Generative-classifier scoring: per-location denoising errors -> anomaly maps -> image scores.

A fixed, seeded bank of K (timestep, noise) pairs is shared by every image and every type, so
scores are comparable across types and runs. The noises come in antithetic pairs (ε, -ε): the
part of the error that is linear in ε, the main Monte-Carlo noise of a small bank, cancels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor

from diffqc.config import DetectorConfig, ScoringConfig
from diffqc.diffusion import Denoiser, NoiseSchedule
from diffqc.train import TrainHistory, train_denoiser


@dataclass(frozen=True)
class ScoreBank:
    timesteps: Tensor  # int64 [K]
    noise: Tensor  # float32 [K, L, C]

    @classmethod
    def make(cls, config: ScoringConfig, locations: int, channels: int) -> ScoreBank:
        if config.noises_per_timestep < 1:
            raise ValueError("noises_per_timestep must be >= 1")
        gen = torch.Generator().manual_seed(config.seed)
        ts, noises = [], []
        for t in config.bank_timesteps:
            for j in range(config.noises_per_timestep):
                if j % 2 == 0:
                    eps = torch.randn(locations, channels, generator=gen)
                    noises.append(eps)
                else:
                    noises.append(-noises[-1])
                ts.append(t)
        return cls(torch.tensor(ts, dtype=torch.long), torch.stack(noises))

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


@torch.inference_mode()
def denoising_error(
    denoiser: Denoiser, schedule: NoiseSchedule, bank: ScoreBank, tokens: Tensor, type_idx: Tensor
) -> Tensor:
    """Mean over the bank of the per-location ε-MSE: ``tokens [N, L, C]`` -> ``[N, L]``.

    With the Gaussian path (``denoiser.use_prior``) ``tokens`` and ``bank`` must be in the
    prior's channel order (``denoiser.prior_perm``; :meth:`DiffusionScorer.score_maps` permutes
    the feature maps once, where it is cheap, and keeps a permuted bank): the error is a sum over
    channels, so the order does not change it, and indexing the last axis is slow on CPU. All K
    (t, ε) pairs go through the denoiser together (one network pass over K·N images, one pass of
    the Gaussian path over the bank), which is what keeps small banks cheap."""
    n, locations, channels = tokens.shape
    k = len(bank)
    t = bank.timesteps.to(tokens.device)
    noise = bank.noise.to(tokens.device)[:, None]  # [K, 1, L, C]
    order = denoiser.prior_perm if denoiser.use_prior else None
    x_t = schedule.q_sample(tokens[None], t, noise)  # [K, N, L, C]
    pred: Tensor | None = None
    if not (denoiser.use_prior and denoiser.network_is_zero()):
        pos = torch.arange(locations, device=tokens.device).expand(k * n, locations)
        flat = denoiser.residual(x_t.reshape(k * n, locations, channels), t.repeat_interleave(n),
                                 type_idx.repeat(k), pos, order)
        pred = flat.view(k, n, locations, channels)
    if denoiser.use_prior:
        gauss = denoiser.gaussian_eps_bank(x_t, t, type_idx)
        pred = gauss if pred is None else pred + gauss
    assert pred is not None
    return (pred - noise).pow(2).mean(dim=-1).mean(dim=0)


class DiffusionScorer:
    """The class-conditional diffusion model as a feature-space scorer (see INTERFACES.md)."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.denoiser_: Denoiser | None = None
        self.bank_: ScoreBank | None = None
        self.history_: TrainHistory | None = None
        self.schedule = NoiseSchedule(config.diffusion.timesteps, config.diffusion.schedule)
        self.grid_: tuple[int, int] = (0, 0)
        self._scoring_bank: ScoreBank | None = None  # bank_ in the denoiser's channel order

    def fit(self, features: Tensor, type_idx: Tensor, n_types: int, *, progress: bool = False) -> Self:
        self.denoiser_, self.history_ = train_denoiser(
            features, type_idx, n_types, self.config.diffusion, self.config.train, progress=progress
        )
        _, c, h, w = features.shape
        self.grid_ = (h, w)
        self._set_bank(ScoreBank.make(self.config.scoring, h * w, c))
        return self

    def _set_bank(self, bank: ScoreBank) -> None:
        """Keep the bank, and once (not per call) its noise in the order denoising_error works
        in: the prior's channel order when the denoiser has the Gaussian path."""
        assert self.denoiser_ is not None
        self.bank_ = bank
        perm = self.denoiser_.prior_perm if self.denoiser_.use_prior else None
        self._scoring_bank = bank if perm is None else ScoreBank(bank.timesteps, bank.noise[..., perm])

    def _check(self) -> tuple[Denoiser, ScoreBank]:
        if self.denoiser_ is None or self.bank_ is None:
            raise RuntimeError("DiffusionScorer is not fitted")
        return self.denoiser_, self.bank_

    @torch.inference_mode()
    def score_maps(self, features: Tensor, type_idx: Tensor) -> Tensor:
        denoiser, _ = self._check()
        bank = self._scoring_bank
        assert bank is not None
        n, c, h, w = features.shape
        if (h, w) != self.grid_ or c != denoiser.channels:
            raise ValueError(f"features {tuple(features.shape[1:])} do not match the model "
                             f"({denoiser.channels}, {self.grid_[0]}, {self.grid_[1]})")
        if denoiser.use_prior:  # into the prior's channel order (see denoising_error)
            features = features[:, denoiser.prior_perm]
        tokens = features.permute(0, 2, 3, 1).reshape(n, h * w, c)
        # images per pass: K·chunk noised copies go through the network together. About 16
        # copies per pass was fastest here (64 was 1.5x slower: activations far beyond the caches)
        chunk = max(1, 16 // len(bank))
        if torch.jit.is_tracing():  # a traced graph must not bake the trace's batch into slices
            return denoising_error(denoiser, self.schedule, bank, tokens, type_idx.long()).view(n, h, w)
        err = torch.cat([denoising_error(denoiser, self.schedule, bank, tokens[i : i + chunk],
                                         type_idx[i : i + chunk].long()) for i in range(0, n, chunk)])
        return err.view(n, h, w)

    def state_tensors(self) -> dict[str, Tensor]:
        denoiser, bank = self._check()
        state = {f"denoiser.{k}": v for k, v in denoiser.state_dict().items()}
        state["bank.timesteps"] = bank.timesteps
        state["bank.noise"] = bank.noise
        return state

    @classmethod
    def from_state(
        cls, config: DetectorConfig, tensors: dict[str, Tensor], n_types: int, channels: int
    ) -> DiffusionScorer:
        self = cls(config)
        noise = tensors["bank.noise"]
        locations = int(noise.shape[1])
        denoiser = Denoiser(channels, n_types, locations, config.diffusion)
        state = {k.removeprefix("denoiser."): v for k, v in tensors.items() if k.startswith("denoiser.")}
        denoiser.load_state_dict(state)
        self.denoiser_ = denoiser.eval()
        self._set_bank(ScoreBank(tensors["bank.timesteps"].long(), noise.float()))
        side = math.isqrt(locations)
        self.grid_ = (side, locations // side)
        return self


# --------------------------------------------------------------------------- maps -> scores
def gaussian_kernel1d(sigma: float) -> Tensor:
    radius = max(1, round(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def upsample_and_smooth(maps: Tensor, size: int, sigma: float) -> Tensor:
    """``[N, h, w]`` -> ``[N, size, size]``: bilinear upsampling, then separable Gaussian blur."""
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma).to(maps.device)
        r = k.numel() // 2
        up = F.conv2d(F.pad(up, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        up = F.conv2d(F.pad(up, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return up[:, 0]


def aggregate(maps: Tensor, method: str = "topk", topk: float = 0.01) -> Tensor:
    """Image scores ``[N]`` from anomaly maps ``[N, H, W]``: ``max`` or the mean of the top-k
    fraction of locations (so that a small defect counts, but one noisy pixel does not)."""
    flat = maps.flatten(1)
    if method == "max":
        return flat.max(dim=1).values
    if method == "topk":
        k = max(1, round(topk * int(flat.shape[1])))  # int(): a constant when traced for ONNX
        return flat.topk(k, dim=1).values.mean(dim=1)
    if method == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"unknown aggregation {method!r} (topk, max or mean)")
