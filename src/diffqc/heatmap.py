"""The fused heat map (``scoring.heat_map = "fused"``): the Gaussian likelihood's map plus the
distance of each location to its nearest GOOD patch.

The likelihood's map scores each location under that location's Gaussian alone. A memory of GOOD
patches (PatchCore's: the greedy coreset of a ``scoring.memory_ratio`` share of each type's GOOD
patches, :class:`diffqc.baselines.PatchCoreScorer`) scores it by its Euclidean distance to the
nearest GOOD patch from any position. The two are put on one scale with their GOOD calibration
image scores (:func:`diffqc.calibration.standardiser`: median ``c`` and interquartile range
``s`` per type) and added, in the likelihood's units::

    fused = likelihood + (s_likelihood / s_memory) * (distance - c_memory)

i.e. ``s_likelihood`` times the sum of the two standardised maps, shifted by ``c_likelihood``.
Only the map changes: the image score, the decision and the calibration stay the likelihood's.
The memory's patches are kept at the precision of the Gaussians' float tables (float16 unless
``diffusion.prior_storage=float32``: half the bytes of the bundle's memory), rounded when fitted so
that the fitted detector is exactly the one its bundle loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Self

import numpy as np
import torch
from torch import Tensor

from diffqc.baselines import PatchCoreScorer
from diffqc.calibration import standardiser
from diffqc.config import DetectorConfig, PatchCoreConfig
from diffqc.diffusion import storage_dtype

__all__ = ["PatchMemory", "fit_memory"]

STATE_PREFIX = "memory."


def _memory_config(config: DetectorConfig) -> PatchCoreConfig:
    """PatchCore's settings with its coreset at ``scoring.memory_ratio``."""
    return replace(config.patchcore, coreset_ratio=config.scoring.memory_ratio)


def fit_memory(config: DetectorConfig, features: Tensor, type_idx: Tensor, n_types: int, *,
               progress: bool = False) -> PatchCoreScorer:
    """The memory of the GOOD fit patches ``features [N, C, h, w]``: each type's PatchCore coreset
    at ``scoring.memory_ratio``, its patches rounded to ``diffusion.prior_storage`` (computed in
    float32, as the Gaussians are)."""
    nearest = PatchCoreScorer(_memory_config(config), label="heat-map memory")
    nearest.fit(features, type_idx, n_types, progress=progress)
    storage = storage_dtype(config.diffusion)
    assert nearest.banks is not None
    nearest.banks = [bank.to(storage).float() for bank in nearest.banks]
    return nearest


@dataclass
class PatchMemory:
    """A fitted memory and, per type, the constants that put its map on the likelihood's scale."""

    nearest: PatchCoreScorer
    centre: Tensor  # [T] median of the memory's GOOD calibration image scores
    weight: Tensor  # [T] IQR of the likelihood's over IQR of the memory's
    storage: torch.dtype  # the bank's dtype in the bundle (already rounded to it)

    @classmethod
    def calibrated(cls, config: DetectorConfig, nearest: PatchCoreScorer,
                   likelihood_scores: Sequence[np.ndarray], memory_scores: Sequence[np.ndarray]) -> Self:
        """Constants from each type's GOOD calibration image scores under both maps, for the
        memory :func:`fit_memory` fitted under ``config``."""
        centre, weight = [], []
        for lik, mem in zip(likelihood_scores, memory_scores, strict=True):
            c_mem, s_mem = standardiser(mem)
            weight.append(standardiser(lik)[1] / s_mem)
            centre.append(c_mem)
        return cls(nearest, torch.tensor(centre, dtype=torch.float32),
                   torch.tensor(weight, dtype=torch.float32), storage_dtype(config.diffusion))

    def fuse(self, likelihood: Tensor, distance: Tensor, type_idx: Tensor) -> Tensor:
        """The fused maps ``[N, H, W]`` from the smoothed likelihood and distance maps."""
        centre = self.centre.to(distance.device)[type_idx].view(-1, 1, 1)
        weight = self.weight.to(distance.device)[type_idx].view(-1, 1, 1)
        return likelihood + weight * (distance - centre)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"{STATE_PREFIX}{k}": v.to(self.storage) if k == "bank" else v
               for k, v in self.nearest.state_tensors().items()}
        out[f"{STATE_PREFIX}centre"] = self.centre.cpu()
        out[f"{STATE_PREFIX}weight"] = self.weight.cpu()
        return out

    @classmethod
    def from_state(cls, config: DetectorConfig, tensors: dict[str, Tensor], n_types: int,
                   channels: int) -> Self:
        """Rebuild from the ``memory.*`` tensors of a bundle (``ValueError`` when they do not fit)."""
        own = {k.removeprefix(STATE_PREFIX): v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if "centre" not in own or "weight" not in own:
            raise ValueError("the fused heat map's memory.centre / memory.weight are missing")
        centre, weight = own.pop("centre").float(), own.pop("weight").float()
        if centre.shape != (n_types,) or weight.shape != (n_types,):
            raise ValueError(f"memory.centre / memory.weight must be [{n_types}], got "
                             f"{tuple(centre.shape)} / {tuple(weight.shape)}")
        nearest = PatchCoreScorer.from_state(_memory_config(config), own, n_types, channels)
        # saved again as it was read: a bundle from before the float16 memory keeps its float32 bank
        return cls(nearest, centre, weight, own["bank"].dtype)
