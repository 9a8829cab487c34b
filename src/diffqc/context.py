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

The effect ``A`` (``[k, C, h·w]`` per type) grows with ``k`` and so with the type's images. With
``maps = r > 0`` (``diffusion.prior_context_maps``) it is kept as ``A ≈ B M``: ``M`` the type's
first ``r`` right singular vectors of ``A`` seen as a ``[k·C, h·w]`` matrix (``r`` spatial maps
that every component and channel share) and ``B = A Mᵀ`` (``[k, C, r]``), the best rank-``r``
approximation in the least-squares sense. The context moves every location along these ``r``
maps, so a type's bytes are ``k·C·r + r·h·w`` instead of ``k·C·h·w``. Both are stored at
``diffusion.prior_storage`` and rounded to it when fitted, as the Gaussians are: with ``int8``
(the default) in 8 bits, with one float16 scale per component and channel of the effect (over
locations, or over maps) and one per map, else in its float dtype; the descriptor's centre and
whitening stay in float32 (``C`` and ``C × k`` numbers per type). ``maps = 0`` keeps ``A`` whole
(bundles from before the option: no ``context.maps`` tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

import torch
from torch import Tensor, nn

from diffqc.diffusion import gather_packed, pack_int8, round_int8, unpack_int8

__all__ = ["ImageContext", "descriptor", "spatial_maps", "whitening"]

STATE_PREFIX = "context."
SAMPLES_PER_COMPONENT = 8  # k <= n / 8 for n fit images of a type
FIT_CHUNK = 64  # images a fit takes in float64 at a time
RIDGE = 1e-3  # on whitened components (unit norm over the fit images): a guard against collinearity only


def descriptor(features: Tensor) -> Tensor:
    """The global descriptor of each image ``features [N, C, h, w]``: each channel's mean ``[N, C]``."""
    return features.mean(dim=(2, 3))


def whitening(descriptors: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The centre ``[C]`` of ``descriptors [n, C]`` and the whitening ``[C, k']`` of their first
    ``k' = min(k, rank)`` principal components: ``(g − centre) @ basis`` has orthonormal columns on
    ``descriptors`` (each component's sum of squares 1 over the n images, its variance 1/n: the
    left singular vectors). ``k'`` may be 0 (all descriptors equal)."""
    centre = descriptors.mean(dim=0)
    _, s, vt = torch.linalg.svd(descriptors - centre, full_matrices=False)
    k = min(k, int((s > 1e-6 * s[0]).sum()))
    return centre, vt[:k].T / s[:k]


def spatial_maps(effect: Tensor, channels: int, maps: int) -> tuple[Tensor, Tensor]:
    """``effect [k, C·L]`` as ``(B [k, C·r], M [r, L])`` with ``(B.view(k, C, r) @ M)`` its best
    rank-``r`` approximation as a ``[k·C, L]`` matrix, ``M`` orthonormal rows; ``r = min(maps,
    k·C, L)``."""
    k = effect.shape[0]
    flat = effect.reshape(k * channels, -1)
    _, _, vt = torch.linalg.svd(flat, full_matrices=False)
    m = vt[: min(maps, vt.shape[0])]  # [r, L]
    return (flat @ m.T).reshape(k, -1), m


class ImageContext(nn.Module):
    """Per type: the descriptor's centre ``[T, C]``, its whitening ``[T, C, K]`` (columns beyond
    the type's ``k`` are zero) and the effect of the whitened components on every location and
    channel: ``effect [T, K, C·h·w]``, or with ``maps > 0`` the factors ``effect [T, K, C·r]`` and
    ``maps [T, r, h·w]`` (module docstring), rows beyond a type's own zero. Rounded to the storage
    dtype (or to 8 bits: ``int8``), kept in float32."""

    centre: Tensor
    basis: Tensor
    effect: Tensor
    maps: Tensor | None
    packed_effect: Tensor | None  # int8 [T, C, K, ·], within packed_storage() only
    packed_effect_scale: Tensor | None  # float16 [T, C, K, 1]
    packed_maps: Tensor | None  # int8 [T, r, L]
    packed_maps_scale: Tensor | None  # float16 [T, r, 1]

    def __init__(self, n_types: int, channels: int, locations: int, components: int,
                 storage: torch.dtype = torch.float16, maps: int = 0, *, int8: bool = False) -> None:
        super().__init__()
        if components < 1:
            raise ValueError("an image context needs at least one component")
        self.storage = storage
        self.int8 = int8
        for name in ("effect", "maps"):  # int8: the tables packed for a graph to trace (packed_storage)
            self.register_buffer(f"packed_{name}", None, persistent=False)
            self.register_buffer(f"packed_{name}_scale", None, persistent=False)
        self.register_buffer("centre", torch.zeros(n_types, channels))
        self.register_buffer("basis", torch.zeros(n_types, channels, components))
        width = channels * (maps if maps > 0 else locations)
        self.register_buffer("effect", torch.zeros(n_types, components, width))
        self.register_buffer("maps", torch.zeros(n_types, maps, locations) if maps > 0 else None)

    @property
    def components(self) -> int:
        return int(self.basis.shape[-1])

    def _by_vector(self, name: str, table: Tensor) -> Tensor:
        """``table`` as its vectors of one 8-bit scale each, along the last axis: the effect
        ``[T, K, C, ·]`` (each component and channel over locations or maps), the maps as they are."""
        if name == "effect":
            return table.reshape(*table.shape[:2], self.centre.shape[-1], -1)
        return table

    def _rounded(self, name: str, table: Tensor) -> Tensor:
        """``table`` (``effect`` or ``maps``) as the bundle stores it, in float32."""
        if self.int8:
            return round_int8(self._by_vector(name, table), -1).reshape(table.shape)
        return table.to(self.storage).float()

    def _stored(self) -> dict[str, Tensor]:
        """The effect and maps as the bundle stores them: at the storage dtype, or int8 with a
        ``NAME_scale`` tensor each."""
        out: dict[str, Tensor] = {}
        for name, table in (("effect", self.effect), ("maps", self.maps)):
            if table is None:
                continue
            if not self.int8:
                out[name] = table.to(self.storage)
                continue
            q, scale = pack_int8(self._by_vector(name, table), -1)
            out[name], out[f"{name}_scale"] = q.reshape(table.shape), scale
        return out

    @contextmanager
    def packed_storage(self) -> Iterator[None]:
        """With 8-bit storage, the tables packed for a graph traced within (packing traced would
        be a graph computation, not a constant); released on leaving."""
        packed = self._stored() if self.int8 else {}
        if "effect" in packed:  # channel-major, [T, C, K, ·]: what the traced shift multiplies
            t, k, c = *self.effect.shape[:2], self.centre.shape[-1]
            packed["effect"] = packed["effect"].view(t, k, c, -1).transpose(1, 2).contiguous()
            packed["effect_scale"] = packed["effect_scale"].transpose(1, 2).contiguous()
        for name, table in packed.items():  # buffers: the graph's initializers
            setattr(self, f"packed_{name}", table)
        try:
            yield
        finally:
            for name in packed:
                setattr(self, f"packed_{name}", None)

    def _traced_shift(self, z: Tensor, types: Tensor) -> Tensor:
        """:meth:`_shift` of ``z [N, K]`` under each image's type, from the tables as stored (a
        traced graph keeps them so) gathered per image. In 8 bits the effect's scales (one per
        component and channel) go onto ``z``, so that each image's effect is widened from its
        codes only: ``Σ_k z_k s_kc q_kcw`` per channel c, a ``[1, K] @ [K, ·]`` product each."""
        n = z.shape[0]
        if not self.int8:
            def rows(table: Tensor) -> Tensor:
                return torch.index_select(table.to(self.storage), 0, types).float()

            maps = None if self.maps is None else rows(self.maps)
            return self._shift(z.unsqueeze(1), rows(self.effect), maps)
        # [N, C, K, ·] codes and [N, C, K, 1] scales
        codes, scale = gather_packed(self.packed_effect, self.packed_effect_scale, 0, types)
        out = ((z.unsqueeze(1) * scale.squeeze(-1)).unsqueeze(2) @ codes).squeeze(2)  # [N, C, ·]
        if self.maps is not None:
            mq, ms = gather_packed(self.packed_maps, self.packed_maps_scale, 0, types)  # [N, r, L], [N, r, 1]
            out = (out * ms.transpose(1, 2)) @ mq
        return out.reshape(n, -1)

    def _shift(self, z: Tensor, effect: Tensor, maps: Tensor | None) -> Tensor:
        """The context part ``[N, C·L]`` of whitened components ``z [N, k]`` (one type's
        ``effect`` and ``maps``) or ``z [N, 1, k]`` (per-image ``effect [N, k, ·]``, ``maps [N, r, L]``)."""
        out = z @ effect
        if maps is None:
            return out.reshape(z.shape[0], -1)
        channels = self.centre.shape[-1]
        return (out.reshape(z.shape[0], channels, -1) @ maps).reshape(z.shape[0], -1)

    def _subtract(self, flat: Tensor, z: Tensor, ty: int) -> Tensor:
        """``flat [N, C·L]`` minus the context part of ``z [N, k]`` under type ``ty`` (eager)."""
        if self.maps is None:  # the whole effect: one GEMM, flat − z A
            return torch.addmm(flat, z, self.effect[ty], alpha=-1.0)
        return flat - self._shift(z, self.effect[ty], self.maps[ty])

    @classmethod
    def fit(cls, features: Tensor, type_idx: Tensor, n_types: int, components: int,
            storage: torch.dtype = torch.float16, *, maps: int = 0,
            per_component: int = SAMPLES_PER_COMPONENT, int8: bool = False) -> Self:
        """Fit each type's context on its GOOD fit images ``features [N, C, h, w]``: at most
        ``components`` components and one per ``per_component`` images of the type (0: no
        such cap, for studies); the effect through ``maps`` spatial maps per type (0: whole)."""
        _, c, h, w = features.shape
        fitted: dict[int, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}
        for ty in range(n_types):
            sel = type_idx == ty
            n = int(sel.sum())
            k = min(components, n // per_component) if per_component > 0 else components
            if k < 1 or n < 2:
                continue  # too few images: no context (the plain per-location Gaussian)
            # in float64, FIT_CHUNK images at a time: a float64 copy of a type's features was three
            # times their float32 bytes on top of them (900 MB for 600 images at 128 x 32 x 32)
            chunks = sel.nonzero().squeeze(1).split(FIT_CHUNK)
            g = torch.cat([descriptor(features[rows].double()) for rows in chunks])
            centre, basis = whitening(g, k)  # [C, k]: unit-variance components on the fit images
            k = basis.shape[1]
            if k < 1:
                continue
            z = (g - centre) @ basis
            design = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
            gram = design.T @ design + RIDGE * torch.eye(k + 1, dtype=design.dtype, device=design.device)
            moment = torch.zeros(k + 1, c * h * w, dtype=design.dtype, device=design.device)
            for part, rows in zip(design.split(FIT_CHUNK), chunks, strict=True):
                moment.addmm_(part.T, features[rows].double().flatten(1))  # designᵀ x
            coef = torch.linalg.solve(gram, moment)  # [k + 1, C·h·w]; the intercept is kept
            effect, spatial = coef[:k], None
            if maps > 0:
                effect, spatial = spatial_maps(effect, c, maps)
            fitted[ty] = (centre, basis, effect, spatial)
        # as many components (and maps) as the type that uses most: the effect is nearly all of
        # the bytes
        width = max((basis.shape[1] for _, basis, _, _ in fitted.values()), default=1)
        rows = max((m.shape[0] for *_, m in fitted.values() if m is not None), default=1) if maps > 0 else 0
        self = cls(n_types, c, h * w, width, storage, rows, int8=int8).to(features.device)
        for ty, (centre, basis, effect, spatial) in fitted.items():
            k = basis.shape[1]
            self.centre[ty] = centre.float()
            self.basis[ty, :, :k] = basis.float()
            if spatial is None:
                self.effect[ty, :k] = effect.float()
                continue
            assert self.maps is not None
            r = spatial.shape[0]
            self.effect[ty, :k].view(k, c, rows)[:, :, :r] = effect.view(k, c, r).float()
            self.maps[ty, :r] = spatial.float()
        self.effect.copy_(self._rounded("effect", self.effect))  # as the bundle will hold them
        if self.maps is not None:
            self.maps.copy_(self._rounded("maps", self.maps))
        return self

    def whitened(self, features: Tensor, type_idx: Tensor) -> Tensor:
        """The whitened context components ``z [N, K]`` of each image ``features [N, C, h, w]``
        under its type (zero beyond the type's own ``k``): what the effect multiplies."""
        return self._whiten(descriptor(features), type_idx.long())

    def _whiten(self, desc: Tensor, types: Tensor) -> Tensor:
        """:meth:`whitened` from the descriptors ``desc [N, C]``, each image's whitening gathered."""
        return ((desc - self.centre[types]).unsqueeze(1) @ self.basis[types]).squeeze(1)

    def remove(self, features: Tensor, type_idx: Tensor, z: Tensor | None = None) -> Tensor:
        """``features [N, C, h, w]`` minus the context part of each image under its type; ``z``:
        the images' :meth:`whitened` components when the caller has them already (else computed)."""
        n = features.shape[0]
        flat = features.reshape(n, -1)
        types = type_idx.long()
        if z is None:
            z = self._whiten(descriptor(features), types)  # [N, K]
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # types are a graph input
            return (flat - self._traced_shift(z, types)).view_as(features)
        groups = types.unique().tolist()
        if len(groups) == 1:  # the usual batch: one pass
            return self._subtract(flat, z, groups[0]).view_as(features)
        out = torch.empty_like(flat)
        for ty in groups:
            sel = (types == ty).nonzero().squeeze(1)
            out[sel] = self._subtract(flat[sel], z[sel], ty)
        return out.view_as(features)

    def state_tensors(self) -> dict[str, Tensor]:
        """The bundle's tensors: the effect (and maps) as stored (:meth:`_stored`), the whitening
        in float32."""
        state = {f"{STATE_PREFIX}centre": self.centre, f"{STATE_PREFIX}basis": self.basis}
        state.update({f"{STATE_PREFIX}{name}": t for name, t in self._stored().items()})
        return state

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], storage: torch.dtype = torch.float16, *,
                   int8: bool = False) -> Self:
        """Rebuild from :meth:`state_tensors` (``KeyError`` if a tensor is missing; no
        ``context.maps``: the whole effect, as bundles from before the option hold it), rounded
        to the storage asked (``int8``: 8 bits) whatever it was stored at."""
        centre, basis = tensors[f"{STATE_PREFIX}centre"], tensors[f"{STATE_PREFIX}basis"]
        effect, maps = tensors[f"{STATE_PREFIX}effect"], tensors.get(f"{STATE_PREFIX}maps")
        n_types, channels, components = basis.shape
        rows, locations = (0, effect.shape[-1] // channels) if maps is None else maps.shape[1:]
        self = cls(n_types, channels, locations, components, storage, rows, int8=int8).to(basis.device)
        self.centre.copy_(centre.float())
        self.basis.copy_(basis.float())
        for name, table in (("effect", effect), ("maps", maps)):
            if table is None:
                continue
            scale = tensors.get(f"{STATE_PREFIX}{name}_scale")  # stored in 8 bits
            target = getattr(self, name)
            values = (table.float() if scale is None
                      else unpack_int8(self._by_vector(name, table), scale)).reshape(target.shape)
            # 8-bit tables read as 8-bit ones hold their rounded values already (as the Denoiser's
            # eigenbases: Denoiser.load_stored_prior); any other is rounded to the storage asked
            target.copy_(values if scale is not None and self.int8 else self._rounded(name, values))
        return self
