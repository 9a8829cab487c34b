"""The image's context (``diffusion.prior_context = K``): each location's Gaussian mean moves with
the whole image.

A per-location Gaussian holds every way a GOOD image varies as variance of its location: a
change that reaches the whole image (exposure, lighting, material, the aspect a crop is squashed
from) widens every location's covariance, and a defect then hides in that width. Here the mean of
each location is made a linear function of the image's *global descriptor* ``g`` (each feature
channel's mean over all locations), per type:

    x_l = μ_l + A_l z + r_l,     z = Wᵀ (g − ḡ)

where ``W`` whitens the type's first ``k`` principal components of ``g`` on its GOOD fit images,
``A`` is fitted by (ridge) least squares on the same images, and the per-location Gaussians of
:mod:`diffqc.diffusion` model the residual ``r``. So the model is a conditional Gaussian
p(x_l | z, type) per location. A local defect moves ``g`` by about its share of the image (one
cell of 1,024 at the default grid), so it stays in the residual; a defect that changes the whole
image (uneven lighting of a part, say) is partly explained away, which is the price of the
context. ``k`` per type is ``min(K, n / 8)`` for ``n`` fit images of the type (the regression has
``k + 1`` coefficients per location and channel; chosen on synthetic defects in training GOOD
images, BENCHMARKS.md "Session 12").

The effect ``A`` (``[k, h·w·C]`` per type) is stored at ``diffusion.prior_storage`` (float16 by
default) and rounded to it when fitted, as the Gaussians are; the descriptor's centre and
whitening stay in float32 (``C`` and ``C × k`` numbers per type).
"""

from __future__ import annotations

from typing import Self

import torch
from torch import Tensor, nn

__all__ = ["ImageContext", "descriptor", "whitening"]

STATE_PREFIX = "context."
SAMPLES_PER_COMPONENT = 8  # k <= n / 8 for n fit images of a type
RIDGE = 1e-3  # on whitened components (unit variance): a guard against exact collinearity only


def descriptor(features: Tensor) -> Tensor:
    """The global descriptor of each image ``features [N, C, h, w]``: each channel's mean ``[N, C]``."""
    return features.mean(dim=(2, 3))


def whitening(descriptors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The centre ``[C]`` of ``descriptors [n, C]`` and the whitening ``[C, k']`` of their first
    ``k' = min(k, rank)`` principal components: ``(g − centre) @ basis`` has unit variance (per
    image count, not n − 1) on ``descriptors``. ``k'`` may be 0 (all descriptors equal)."""
    centre = descriptors.mean(dim=0)
    _, s, vt = torch.linalg.svd(descriptors - centre, full_matrices=False)
    k = min(k, int((s > 1e-6 * s[0]).sum()))
    return centre, vt[:k].T / s[:k]


class ImageContext(nn.Module):
    """Per type: the descriptor's centre ``[T, C]``, its whitening ``[T, C, K]`` (columns beyond
    the type's ``k`` are zero) and the effect of the whitened components on every location and
    channel ``[T, K, C·h·w]`` (rounded to the storage dtype, kept in float32)."""

    centre: Tensor
    basis: Tensor
    effect: Tensor

    def __init__(self, n_types: int, channels: int, locations: int, components: int,
                 storage: torch.dtype = torch.float16) -> None:
        super().__init__()
        if components < 1:
            raise ValueError("an image context needs at least one component")
        self.storage = storage
        self.register_buffer("centre", torch.zeros(n_types, channels))
        self.register_buffer("basis", torch.zeros(n_types, channels, components))
        self.register_buffer("effect", torch.zeros(n_types, components, channels * locations))

    @property
    def components(self) -> int:
        return int(self.basis.shape[-1])

    @classmethod
    def fit(cls, features: Tensor, type_idx: Tensor, n_types: int, components: int,
            storage: torch.dtype = torch.float16, *, per_component: int = SAMPLES_PER_COMPONENT) -> Self:
        """Fit each type's context on its GOOD fit images ``features [N, C, h, w]``: at most
        ``components`` components and one per ``per_component`` images of the type (0: no
        such cap, for studies)."""
        _, c, h, w = features.shape
        fitted: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for ty in range(n_types):
            sel = type_idx == ty
            n = int(sel.sum())
            k = min(components, n // per_component) if per_component > 0 else components
            if k < 1 or n < 2:
                continue  # too few images: no context (the plain per-location Gaussian)
            x = features[sel].double()
            g = descriptor(x)
            centre, basis = whitening(g, k)  # [C, k]: unit-variance components on the fit images
            k = basis.shape[1]
            if k < 1:
                continue
            z = (g - centre) @ basis
            design = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
            gram = design.T @ design + RIDGE * torch.eye(k + 1, dtype=design.dtype, device=design.device)
            coef = torch.linalg.solve(gram, design.T @ x.flatten(1))  # [k + 1, C·h·w]; the intercept is kept
            fitted[ty] = (centre, basis, coef[:k])
        # as many components as the type that uses most: the effect is nearly all of the bytes
        width = max((basis.shape[1] for _, basis, _ in fitted.values()), default=1)
        self = cls(n_types, c, h * w, width, storage).to(features.device)
        for ty, (centre, basis, effect) in fitted.items():
            k = basis.shape[1]
            self.centre[ty] = centre.float()
            self.basis[ty, :, :k] = basis.float()
            self.effect[ty, :k] = effect.float().to(storage).float()
        return self

    def remove(self, features: Tensor, type_idx: Tensor) -> Tensor:
        """``features [N, C, h, w]`` minus the context part of each image under its type."""
        n = features.shape[0]
        flat = features.reshape(n, -1)
        desc = descriptor(features)
        types = type_idx.long()
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # types are a graph input
            z = ((desc - self.centre[types]).unsqueeze(1) @ self.basis[types])  # [N, 1, K]
            effect = torch.index_select(self.effect.to(self.storage), 0, types).float()
            return (flat - (z @ effect).squeeze(1)).view_as(features)
        groups = types.unique().tolist()
        if len(groups) == 1:  # the usual batch: one pass, flat − z A
            ty = groups[0]
            z = (desc - self.centre[ty]) @ self.basis[ty]
            return torch.addmm(flat, z, self.effect[ty], alpha=-1.0).view_as(features)
        out = torch.empty_like(flat)
        for ty in groups:
            sel = (types == ty).nonzero().squeeze(1)
            z = (desc[sel] - self.centre[ty]) @ self.basis[ty]
            out[sel] = torch.addmm(flat[sel], z, self.effect[ty], alpha=-1.0)
        return out.view_as(features)

    def state_tensors(self) -> dict[str, Tensor]:
        """The bundle's tensors: the effect at the storage dtype, the whitening in float32."""
        return {f"{STATE_PREFIX}centre": self.centre, f"{STATE_PREFIX}basis": self.basis,
                f"{STATE_PREFIX}effect": self.effect.to(self.storage)}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], storage: torch.dtype = torch.float16) -> Self:
        """Rebuild from :meth:`state_tensors` (``KeyError`` if a tensor is missing)."""
        centre, basis = tensors[f"{STATE_PREFIX}centre"], tensors[f"{STATE_PREFIX}basis"]
        effect = tensors[f"{STATE_PREFIX}effect"]
        n_types, channels, components = basis.shape
        self = cls(n_types, channels, effect.shape[-1] // channels, components, storage).to(basis.device)
        self.centre.copy_(centre.float())
        self.basis.copy_(basis.float())
        self.effect.copy_(effect.to(storage).float())  # rounded, whatever precision it was stored at
        return self
