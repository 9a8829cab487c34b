"""Likelihood scoring: per-location −log p(x | type) bounds -> anomaly maps -> image scores.

The per-location score is the variational bound on −log p(x | type) of the diffusion model,
written as the Gaussian path's exact part plus the network's correction:

    ½ δᵀΣ⁻¹δ  [+ ½ log det Σ + ½ C log 2π]  +  ½ ∫_{λ(t_max)}^{λ(t_min)} E_ε[‖f‖² − 2 f·(ε − ε̂_G)] dλ

(λ = log SNR; ε̂_G the Gaussian path's posterior-mean noise, f the network's residual, so that
‖ε − ε̂_G − f‖² − ‖ε − ε̂_G‖² = ‖f‖² − 2 f·(ε − ε̂_G)). The first term is what the bound of the
Gaussian path integrates to over all noise levels, in closed form: there is no Monte-Carlo noise
in it. Only the correction is estimated, with a midpoint rule in λ over the range the network
is trained on (``train.t_min..t_max``, :func:`diffqc.diffusion.vlb_quadrature`) and a fixed,
seeded bank of antithetic noise pairs (ε, −ε) shared by every image and type. An untrained
network (zero output layer) adds exactly zero, and the map is then PaDiM's squared Mahalanobis
distance (halved) on the same channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor

from diffqc.config import DetectorConfig, ScoringConfig, smoothing_radius
from diffqc.context import STATE_PREFIX as CONTEXT_PREFIX
from diffqc.context import ImageContext
from diffqc.diffusion import (
    Denoiser,
    NoiseSchedule,
    alpha_bar_of,
    storage_dtype,
    stores_int8,
    vlb_quadrature,
)
from diffqc.train import TrainHistory, train_denoiser

# noisy copies of an image (K per image) that go through the network in one pass: about 16 was
# fastest here (64 was 1.5x slower: activations far beyond the caches)
COPIES_PER_PASS = 16


@dataclass(frozen=True)
class ScoreBank:
    """Quadrature nodes of the network's correction: one row per (timestep, noise) pair."""

    timesteps: Tensor  # int64 [K]
    noise: Tensor  # float32 [K, L, C]
    weights: Tensor  # float32 [K]: ½ × λ-cell width / noises per node

    @classmethod
    def make(cls, config: ScoringConfig, alpha_bar: Tensor, t_range: tuple[int, int],
             locations: int, channels: int) -> ScoreBank:
        if config.noises_per_timestep < 1:
            raise ValueError("noises_per_timestep must be >= 1")
        nodes, node_w = vlb_quadrature(alpha_bar, t_range[0], t_range[1], config.quadrature_nodes)
        gen = torch.Generator().manual_seed(config.seed)
        ts: list[int] = []
        ws: list[float] = []
        m = config.noises_per_timestep
        # whole, at once: a bank larger than the machine is PyTorch's out-of-memory error now,
        # not a loop that takes memory until the kernel kills the process
        noise = torch.empty(len(nodes) * m, locations, channels)
        for t, w in zip(nodes.tolist(), node_w.tolist(), strict=True):
            for j in range(m):
                k = len(ts)
                noise[k] = torch.randn(locations, channels, generator=gen) if j % 2 == 0 else -noise[k - 1]
                ts.append(t)
                ws.append(w / m)
        return cls(torch.tensor(ts, dtype=torch.long), noise, torch.tensor(ws, dtype=torch.float32))

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device) -> ScoreBank:
        return ScoreBank(*(getattr(self, f.name).to(device) for f in fields(self)))


def network_residuals(denoiser: Denoiser, schedule: NoiseSchedule, bank: ScoreBank, tokens: Tensor,
                      type_idx: Tensor, context: Tensor | None = None) -> Tensor:
    """The network's residual f at each of the bank's pairs, location-major: ``tokens [N, L, C]``
    -> ``[L, N, K, C]`` (:meth:`Denoiser.bank_residual`), all K·N noisy copies in one pass
    (``tokens`` and ``bank`` in the prior's channel order when the denoiser has the Gaussian
    path, see :func:`likelihood_map`; ``context [N, k]``: the images' context components, with
    ``diffusion.context=image``)."""
    t = bank.timesteps.to(tokens.device)
    shape = (1, 1, -1, 1)
    # q_sample, location-major: x_t[l, n, k] = √ᾱ_k x[n, l] + √(1-ᾱ_k) ε_k[l]
    # (contiguous operands: a strided x_t sends the input layer into a per-location matmul loop)
    noise = bank.noise.to(tokens.device).transpose(0, 1).contiguous()  # [L, K, C]
    x_t = (schedule.sqrt_alpha_bar[t].view(shape) * tokens.transpose(0, 1).contiguous()[:, :, None]
           + schedule.sqrt_one_minus[t].view(shape) * noise[:, None])
    order = denoiser.prior_perm if denoiser.use_prior else None
    return denoiser.bank_residual(x_t, t, type_idx, order, context)


@torch.inference_mode()
def likelihood_map(
    denoiser: Denoiser, schedule: NoiseSchedule, bank: ScoreBank, tokens: Tensor, type_idx: Tensor,
    *, log_det: bool = False, context: Tensor | None = None,
) -> Tensor:
    """Per-location bound on −log p(x | type) (see the module docstring), ``[N, L]``; without
    ``log_det`` the image-independent ½ log det Σ + ½ C log 2π is left out. ``tokens`` (and the
    bank) in the prior's channel order: the sums over channels do not depend on the order, and
    indexing the last axis is slow on CPU. Without the Gaussian path (``diffusion.prior=none``)
    it is the quadrature of the network's whole bound, Σ_k w_k ‖ε_k − f_k‖², over the trained λ
    range only."""
    weights = bank.weights.to(tokens.device)
    noise = bank.noise.to(tokens.device)
    if not denoiser.use_prior:
        f = network_residuals(denoiser, schedule, bank, tokens, type_idx, context)  # [L, N, K, C]
        return ((noise.transpose(0, 1)[:, None] - f).pow(2).sum(-1) * weights).sum(-1).transpose(0, 1)
    if denoiser.network_is_zero():  # adds exactly zero: the Gaussian part alone
        nll = denoiser.mahalanobis(tokens, type_idx)
    else:
        f = network_residuals(denoiser, schedule, bank, tokens, type_idx, context)
        t = bank.timesteps.to(tokens.device)
        nll = denoiser.bound_with_network(tokens, type_idx, f, t, noise, weights)
    if log_det:
        nll = nll + denoiser.log_det_term(type_idx)
    return nll


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
        self.context_: ImageContext | None = None  # diffusion.prior_context > 0 (diffqc.context)

    def fit(self, features: Tensor, type_idx: Tensor, n_types: int, *, progress: bool = False) -> Self:
        features = features.float()  # any float type, as the baselines take it
        components, z = self.config.diffusion.prior_context, None
        if components > 0:  # the Gaussians (and the network) then model what the context leaves
            self.context_ = ImageContext.fit(features, type_idx, n_types, components,
                                             storage_dtype(self.config.diffusion),
                                             maps=self.config.diffusion.prior_context_maps,
                                             int8=stores_int8(self.config.diffusion))
            z = self._network_context(features, type_idx)
            features = self.context_.remove(features, type_idx, z)
        self.denoiser_, self.history_ = train_denoiser(
            features, type_idx, n_types, self.config.diffusion, self.config.train, progress=progress,
            device=features.device, context=z,
        )
        self.denoiser_.round_to_storage()
        _, c, h, w = features.shape
        self.grid_ = (h, w)
        tr = self.config.train
        self._set_bank(ScoreBank.make(self.config.scoring, alpha_bar_of(self.config.diffusion),
                                      (tr.t_min, tr.t_max), h * w, c))
        return self

    def _network_context(self, features: Tensor, type_idx: Tensor) -> Tensor | None:
        """The images' context components for the network (``diffusion.context=image``), else None."""
        if self.context_ is None or self.config.diffusion.context != "image":
            return None
        return self.context_.whitened(features, type_idx)

    def _set_bank(self, bank: ScoreBank) -> None:
        """Keep the bank, and once (not per call) its noise in the order denoising_error works
        in: the prior's channel order when the denoiser has the Gaussian path."""
        assert self.denoiser_ is not None
        device = self.denoiser_.alpha_bar.device  # the scorer lives on its denoiser's device
        bank = bank.to(device)
        self.schedule.to(device)
        self.bank_ = bank
        perm = self.denoiser_.prior_perm if self.denoiser_.use_prior else None
        self._scoring_bank = bank if perm is None else ScoreBank(bank.timesteps, bank.noise[..., perm],
                                                                 bank.weights)

    def _check(self) -> tuple[Denoiser, ScoreBank]:
        if self.denoiser_ is None or self.bank_ is None:
            raise RuntimeError("DiffusionScorer is not fitted")
        return self.denoiser_, self.bank_

    @torch.inference_mode()
    def score_maps(self, features: Tensor, type_idx: Tensor) -> Tensor:
        denoiser, _ = self._check()
        features = features.float()
        bank = self._scoring_bank
        assert bank is not None
        n, c, h, w = features.shape
        if (h, w) != self.grid_ or c != denoiser.channels:
            raise ValueError(f"features {tuple(features.shape[1:])} do not match the model "
                             f"({denoiser.channels}, {self.grid_[0]}, {self.grid_[1]})")
        z = None
        if self.context_ is not None:
            z = self._network_context(features, type_idx)
            features = self.context_.remove(features, type_idx, z)
        if denoiser.use_prior:  # into the prior's channel order (see likelihood_map)
            features = features[:, denoiser.prior_perm]
        tokens = features.permute(0, 2, 3, 1).reshape(n, h * w, c)
        chunk = max(1, COPIES_PER_PASS // len(bank))
        log_det = self.config.scoring.log_det
        if torch.jit.is_tracing():  # a traced graph must not bake the trace's batch into slices
            return likelihood_map(denoiser, self.schedule, bank, tokens, type_idx.long(),
                                  log_det=log_det, context=z).view(n, h, w)
        if denoiser.use_prior and denoiser.network_is_zero():  # Gaussian part only: no bank
            chunk = n
        types = type_idx.long()
        order = None
        if n > 1 and bool((types[1:] < types[:-1]).any()):
            # each type's images together: a pass then reads one type's eigenbases, not several
            order = torch.argsort(types, stable=True)
            tokens, types = tokens[order], types[order]
            z = None if z is None else z[order]
        err = torch.cat([likelihood_map(denoiser, self.schedule, bank, tokens[i : i + chunk],
                                        types[i : i + chunk], log_det=log_det,
                                        context=None if z is None else z[i : i + chunk])
                         for i in range(0, max(n, 1), max(chunk, 1))])
        if order is not None:
            err = torch.empty_like(err).index_copy_(0, order, err)
        return err.view(n, h, w)

    def state_tensors(self) -> dict[str, Tensor]:
        """The bundle's tensors; the Gaussians' parameters in ``diffusion.prior_storage``."""
        denoiser, bank = self._check()
        # the Gaussians at the bundle's storage, without the null type's row (1/(types+1) of the
        # bundle, for training only)
        prior = denoiser.stored_prior()
        state = {f"denoiser.{k}": v for k, v in denoiser.state_dict().items() if k not in prior}
        state.update({f"denoiser.{k}": v for k, v in prior.items()})
        state["bank.timesteps"] = bank.timesteps
        state["bank.noise"] = bank.noise
        state["bank.weights"] = bank.weights
        if self.context_ is not None:
            state.update(self.context_.state_tensors())
        return state

    @classmethod
    def from_state(
        cls, config: DetectorConfig, tensors: dict[str, Tensor], n_types: int, channels: int
    ) -> DiffusionScorer:
        vecs = tensors.get("denoiser.prior_vecs")
        if vecs is not None and vecs.shape[-1] == vecs.shape[-2] and "denoiser.prior_rest" not in tensors:
            # full-rank Gaussians (bundles from before diffusion.prior_rank, whose config.json
            # lacks it and so reads today's default rank): the stored eigenbases say full rank
            config = replace(config, diffusion=replace(config.diffusion, prior_rank=0))
        self = cls(config)
        noise = tensors["bank.noise"]
        locations = int(noise.shape[1])
        grid = config.backbone.grid  # recorded at fit time; bundles from before: square
        side = math.isqrt(locations)
        self.grid_ = (int(grid[0]), int(grid[1])) if len(grid) == 2 else (side, locations // side)
        denoiser = Denoiser(channels, n_types, locations, config.diffusion, self.grid_)
        # stored in float16 or float32 (diffusion.prior_storage): computed in float32
        state = {k.removeprefix("denoiser."): v.float() if v.is_floating_point() else v
                 for k, v in tensors.items() if k.startswith("denoiser.")}
        exact = denoiser.load_stored_prior(state)
        denoiser.load_state_dict(state)
        # a bundle stored at a finer precision than configured (float32 bundles written before
        # diffusion.prior_storage existed) is rounded now, so that what is scored (and
        # recalibrated) is what saving it again writes; 8-bit eigenbases are so already
        denoiser.round_to_storage(exact)
        self.denoiser_ = denoiser.to(noise.device).eval()  # on the device of the given tensors
        self._set_bank(ScoreBank(tensors["bank.timesteps"].long(), noise.float(),
                                 tensors["bank.weights"].float()))
        if config.diffusion.prior_context > 0:
            if not any(k.startswith(CONTEXT_PREFIX) for k in tensors):
                raise KeyError(f"diffusion.prior_context={config.diffusion.prior_context} but the "
                               "bundle holds no image context (context.*)")
            self.context_ = ImageContext.from_state(tensors, storage_dtype(config.diffusion),
                                                    int8=stores_int8(config.diffusion)).to(noise.device)
        return self


# --------------------------------------------------------------------------- maps -> scores
def gaussian_kernel1d(sigma: float) -> Tensor:
    radius = smoothing_radius(sigma)
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
