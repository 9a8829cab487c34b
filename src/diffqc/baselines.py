"""PatchCore and PaDiM: two standard good-only detectors over the backbone feature maps.

Both follow the feature-space ``Scorer`` contract of ``docs/INTERFACES.md``: ``fit`` on the
feature maps ``[N, C, h, w]`` of GOOD images with a feature-type index per image, then
``score_maps`` gives a ``[N, h, w]`` anomaly map (higher = more anomalous) of every image under
the type named for it. One model covers all feature types: the learned state is kept per type
(one memory bank / one set of Gaussians per type). ``state_tensors`` / ``from_state`` carry the
state through safetensors (plain tensors, no pickle).

* :class:`PatchCoreScorer` (Roth et al. 2022) -- memory bank of GOOD patch features per type,
  the greedy k-center coreset of ALL the type's patches (chosen on a random projection of the
  features); the score of a location is the Euclidean distance of its feature vector to the
  nearest bank entry, and the image score the paper's re-weighted largest patch score
  (:meth:`PatchCoreScorer.reweighted_scores`).
* :class:`PaDiMScorer` (Defard et al. 2020) -- a Gaussian per location and type over a fixed
  random subset of the channels, with the sample covariance plus ``epsilon * I`` (or Ledoit-Wolf);
  the score is the Mahalanobis distance.

Their settings are ``PatchCoreConfig`` / ``PaDiMConfig`` in :mod:`diffqc.config` (the one
definition: ``--set patchcore.coreset_ratio=0.01`` reaches them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffqc.config import DetectorConfig, PaDiMConfig, PatchCoreConfig
from diffqc.covariance import covariance_batched, ledoit_wolf_batched, sample_covariance_batched
from diffqc.errors import ConfigError

__all__ = [
    "PaDiMScorer",
    "PatchCoreScorer",
    "greedy_coreset",
    "ledoit_wolf_batched",
    "load_scorer",
    "mahalanobis_maps",
    "nearest_neighbors",
    "random_projection",
    "sample_covariance_batched",
    "scorer_for",
]

# Feature-vector count of one block in PaDiM fitting (float64 copies of a few locations' data).
_PADIM_FIT_ELEMENTS = 1 << 23
# Elements of one block of centred features in PaDiM scoring (float32).
_PADIM_SCORE_ELEMENTS = 1 << 24
# How many greedy iterations between two progress-bar updates.
_PROGRESS_EVERY = 256
# Candidates kept exact between two batched updates in the lazy greedy coreset.
_LAZY_CANDIDATES = 512
# Elements of one [rows, pending picks] distance block in a batched coreset update (float32).
_FLUSH_ELEMENTS = 1 << 22
# Bank rows per tile in the nearest-neighbour search (with C=152: 1.2 MiB, fits in L2).
_BANK_TILE = 2048
# Query rows (locations) copied out at a time when scoring with PatchCore.
_QUERY_ROWS = 8192


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, stream) pair, e.g. stream = feature type."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def _check_features(
    features: Tensor, type_idx: Tensor, n_types: int, channels: int | None = None
) -> tuple[Tensor, Tensor]:
    """Validate a ``[N, C, h, w]`` feature batch and its ``[N]`` type indices; float32 / int64."""
    if features.ndim != 4:
        raise ValueError(f"features must be [N, C, h, w], got shape {tuple(features.shape)}")
    if type_idx.ndim != 1 or type_idx.shape[0] != features.shape[0]:
        raise ValueError(
            f"type_idx must be [N] with N={features.shape[0]}, got shape {tuple(type_idx.shape)}"
        )
    if channels is not None and features.shape[1] != channels:
        raise ValueError(f"features have {features.shape[1]} channels, the model expects {channels}")
    if type_idx.dtype.is_floating_point or type_idx.dtype == torch.bool:
        raise ValueError(f"type_idx must be an integer tensor, got {type_idx.dtype}")
    type_idx = type_idx.to(device=features.device, dtype=torch.long)
    if type_idx.numel() and (int(type_idx.min()) < 0 or int(type_idx.max()) >= n_types):
        raise ValueError(f"type_idx values must be in [0, {n_types}), got {type_idx.tolist()}")
    return features.float(), type_idx


def _images_of_type(type_idx: Tensor, t: int) -> Tensor:
    return torch.nonzero(type_idx == t, as_tuple=False).flatten()


# --------------------------------------------------------------------------------------------
# PatchCore
# --------------------------------------------------------------------------------------------


def random_projection(x: Tensor, dim: int, generator: torch.Generator) -> Tensor:
    """Project rows of ``x [P, C]`` to ``dim`` dimensions with a Gaussian ``N(0, 1/dim)`` matrix.

    Returns ``x`` itself when ``dim`` is 0 or not smaller than ``C`` (nothing to gain).
    """
    c = x.shape[1]
    if dim <= 0 or dim >= c:
        return x
    matrix = torch.randn(c, dim, generator=generator, dtype=torch.float32) / math.sqrt(dim)
    return x @ matrix.to(device=x.device, dtype=x.dtype)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops with ``n`` intra-op threads inside the block (restored after)."""
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lower_min_sq(points: Tensor, sq_norms: Tensor, min_sq: Tensor, centres: Tensor, threads: int) -> None:
    """``min_sq = min(min_sq, |x - c|^2 over c in points[centres])`` for every row x, in place.

    One matrix product per block of rows (block x centres stays near cache size): this is where
    the coreset spends its arithmetic, so it runs with the caller's ``threads``.
    """
    c = points[centres]
    c_sq = sq_norms[centres].unsqueeze(0)
    rows = max(1, _FLUSH_ELEMENTS // centres.numel())
    with _intra_op_threads(threads):
        for s in range(0, points.shape[0], rows):
            block = torch.addmm(c_sq, points[s : s + rows], c.T, alpha=-2.0).amin(dim=1)
            block.add_(sq_norms[s : s + rows])
            torch.minimum(min_sq[s : s + rows], block, out=min_sq[s : s + rows])


class _FarthestCandidates:
    """The lazily refreshed candidate set of :func:`greedy_coreset`.

    ``min_sq`` holds every point's squared distance to the picks ``chosen[:applied]``: an upper
    bound on its distance to all picks. The ``size`` points with the largest bound are the
    candidates; their distances (``cand_sq``) are kept exact after every pick, and ``bound`` is
    the largest bound outside the set. While the best candidate is at least ``bound`` away from
    the picks it is the exact farthest point; otherwise :meth:`refresh` applies the pending
    picks to all points in one matrix product and takes a new candidate set.
    """

    def __init__(self, points: Tensor, chosen: Tensor, size: int, threads: int) -> None:
        self.points = points
        self.chosen = chosen
        self.size = min(size, points.shape[0])
        self.threads = threads
        self.sq_norms = (points * points).sum(dim=1)
        self.min_sq = torch.full_like(self.sq_norms, math.inf)
        self.applied = 0
        self.cand = torch.empty(0, dtype=torch.long, device=points.device)
        self.cand_sq = torch.empty(0, dtype=points.dtype, device=points.device)
        self.cand_points = points[:0]
        self.cand_norms = self.sq_norms[:0]
        self.bound = math.inf

    def refresh(self, picked: int) -> None:
        pending = self.chosen[self.applied : picked].to(self.points.device)
        _lower_min_sq(self.points, self.sq_norms, self.min_sq, pending, self.threads)
        self.min_sq[pending] = -1.0  # picks: below every distance, never picked again
        self.applied = picked
        if self.size < self.points.shape[0]:
            values, order = torch.topk(self.min_sq, self.size + 1)
            self.bound = float(values[-1])
            self.cand, self.cand_sq = order[:-1], values[:-1].clone()
        else:
            self.bound = -math.inf
            self.cand = torch.arange(self.size, device=self.points.device)
            self.cand_sq = self.min_sq.clone()
        self.cand_points = self.points[self.cand]
        self.cand_norms = self.sq_norms[self.cand]

    def farthest(self, picked: int) -> int:
        """Index of the point farthest from ``chosen[:picked]`` (exact, refreshing if needed)."""
        best = int(torch.argmax(self.cand_sq))
        if float(self.cand_sq[best]) < self.bound:
            self.refresh(picked)
            best = int(torch.argmax(self.cand_sq))
        index = int(self.cand[best])
        self.cand_sq[best] = -1.0
        return index

    def add_pick(self, index: int) -> None:
        """Lower the candidates' distances with the newest pick (a small matrix-vector product)."""
        step = torch.addmv(self.cand_norms, self.cand_points, self.points[index], alpha=-2.0)
        step.add_(self.sq_norms[index])
        torch.minimum(self.cand_sq, step, out=self.cand_sq)


def greedy_coreset(
    points: Tensor,
    k: int,
    *,
    start: int = 0,
    progress: bool = False,
    desc: str = "coreset",
    candidates: int = _LAZY_CANDIDATES,
) -> Tensor:
    """Greedy k-center selection: indices ``[k]`` (int64) into the rows of ``points [P, d]``.

    Starts from row ``start``; every next pick is the point farthest from all picks so far (the
    standard greedy coreset, covering the set within twice the optimal radius). Exact, but lazy:
    distances to the picks only ever shrink, so stale ones are upper bounds. Only the
    ``candidates`` farthest points are updated after each pick; the others catch up on all
    pending picks at once, in a matrix product, whenever a stale bound could hide the farthest
    point (see :class:`_FarthestCandidates`). The arithmetic is the same ``O(k * P * d)`` as the
    textbook loop, but done as matrix products instead of one memory-bound matrix-vector product
    per pick: ~10x faster on CPU. The per-pick work is small, so it runs single-threaded (intra-op
    threads on tiny ops only wait on each other); the batched updates use the caller's threads.
    Picks can differ from the textbook loop only on float32 near-ties.
    """
    n = points.shape[0]
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    k = min(k, n)
    chosen = torch.empty(max(k, 0), dtype=torch.long)
    if k <= 0:
        return chosen
    chosen[0] = start
    threads = torch.get_num_threads()
    with tqdm(total=k, desc=desc, disable=not progress, leave=False) as bar:
        with _intra_op_threads(1):
            state = _FarthestCandidates(points.float().contiguous(), chosen, candidates, threads)
            state.refresh(1)
            for j in range(1, k):
                index = state.farthest(j)
                chosen[j] = index
                if j < k - 1:
                    state.add_pick(index)
                if j % _PROGRESS_EVERY == 0:
                    bar.update(_PROGRESS_EVERY)
        bar.update(k - bar.n)
    return chosen


def nearest_neighbors(queries: Tensor, bank: Tensor, chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Euclidean distance ``[Q]`` (float32) and index ``[Q]`` (int64) of the ``bank`` row nearest
    to each row of ``queries [Q, C]``.

    The nearest row is found with ``|b|^2 - 2 q.b`` (``|q|^2`` is the same along a row, so it
    does not change the argmin), in blocks of query rows x bank tiles (of at most 2048 rows) of
    at most ``chunk`` elements; the distance to it is then computed directly as ``|q - b|``,
    free of the cancellation error of the expansion.
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError("bank must be a non-empty [M, C] tensor")
    if queries.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries must be [Q, {bank.shape[1]}], got {tuple(queries.shape)}")
    queries = queries.float()
    bank = bank.to(device=queries.device, dtype=torch.float32)
    bank_sq = (bank * bank).sum(dim=1).unsqueeze(0)
    tile = min(bank.shape[0], _BANK_TILE, chunk)
    starts = range(0, bank.shape[0], tile)
    tiles = [(bank[b : b + tile].T, bank_sq[:, b : b + tile]) for b in starts]
    offsets = torch.tensor(list(starts), device=queries.device)
    rows = max(1, chunk // tile)
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    index = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for s in range(0, queries.shape[0], rows):
        q = queries[s : s + rows]
        best = torch.empty(len(tiles), q.shape[0], dtype=torch.float32, device=q.device)
        where = torch.empty(len(tiles), q.shape[0], dtype=torch.long, device=q.device)
        for t, (tile_t, tile_sq) in enumerate(tiles):
            torch.min(torch.addmm(tile_sq, q, tile_t, alpha=-2.0), dim=1, out=(best[t], where[t]))
        winner = best.argmin(dim=0, keepdim=True)
        nearest = (where.gather(0, winner) + offsets[winner]).squeeze(0)
        out[s : s + rows] = torch.linalg.vector_norm(q - bank[nearest], dim=1)
        index[s : s + rows] = nearest
    return out, index


class PatchCoreScorer:
    """PatchCore over feature maps: per-type coreset memory bank, nearest-neighbour distance.

    The image score of the paper is :meth:`reweighted_scores` (``aggregation="reweighted"``); the
    detector uses it in place of an aggregate of the smoothed map.
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, label: str = "PatchCore") -> None:
        self.config = config or PatchCoreConfig()
        self.label = label  # names its progress bars (the fused heat map's memory is one too)
        self.banks: list[Tensor] | None = None
        self.n_types = 0
        self.channels = 0
        self._padded: Tensor | None = None  # [T, M, C] banks padded with far rows (traced graph)

    @property
    def fitted(self) -> bool:
        return self.banks is not None

    def bank_size(self, n_patches: int) -> int:
        """Bank size for a type with ``n_patches`` GOOD patches under this config."""
        cfg = self.config
        k = min(math.ceil(cfg.coreset_ratio * n_patches), n_patches)
        if cfg.max_bank > 0:
            k = min(k, cfg.max_bank)
        return max(1, k)

    def _fit_type(self, features: Tensor, images: Tensor, t: int, progress: bool) -> Tensor:
        """The coreset bank ``[k, C]`` of one type, chosen among ALL its GOOD patches."""
        cfg = self.config
        patches = features[images].permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # [P, C]
        k = self.bank_size(patches.shape[0])
        if k >= patches.shape[0]:
            return patches.contiguous()
        gen = _generator(cfg.seed, t)
        projected = random_projection(patches, cfg.projection_dim, gen)
        start = int(torch.randint(patches.shape[0], (1,), generator=gen))
        chosen = greedy_coreset(
            projected, k, start=start, progress=progress, desc=f"{self.label} coreset, type {t}"
        )
        return patches[chosen.to(features.device)].contiguous()

    @torch.no_grad()
    def fit(self, features: Tensor, type_idx: Tensor, n_types: int, *, progress: bool = False) -> Self:
        features, type_idx = _check_features(features, type_idx, n_types)
        banks = []
        for t in range(n_types):
            images = _images_of_type(type_idx, t)
            if images.numel() == 0:
                raise ValueError(f"PatchCore: feature type {t} has no GOOD images to fit")
            banks.append(self._fit_type(features, images, t, progress))
        self.banks = banks
        self.n_types = n_types
        self.channels = features.shape[1]
        return self

    def padded_banks(self) -> Tensor:
        """Every type's bank as one ``[T, M, C]`` tensor (``M`` the largest bank), shorter banks
        filled with rows so far from any feature that they are never a nearest neighbour: what
        the exported graph gathers by type (a trace cannot loop over the types of a batch)."""
        if self.banks is None:
            raise RuntimeError("PatchCoreScorer is not fitted")
        if self._padded is None:
            m = max(b.shape[0] for b in self.banks)
            far = float(max(b.abs().max() for b in self.banks)) * 100.0 + 1e3
            out = torch.full((self.n_types, m, self.channels), far, dtype=torch.float32)
            for t, b in enumerate(self.banks):
                out[t, : b.shape[0]] = b.float().cpu()
            self._padded = out
        return self._padded

    def _gathered_nearest(self, queries: Tensor, type_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Distance and bank row ``[N, L]`` of the nearest bank entry of each query ``[N, L, C]``
        within its image's type: the traced form of :func:`nearest_neighbors` (same arithmetic)."""
        bank = self.padded_banks().to(queries.device)[type_idx]  # [N, M, C]
        sq = (bank * bank).sum(dim=2).unsqueeze(1)  # [N, 1, M]
        nearest = torch.baddbmm(sq, queries, bank.transpose(1, 2), alpha=-2.0).argmin(dim=2)  # [N, L]
        rows = torch.gather(bank, 1, nearest.unsqueeze(2).expand(-1, -1, bank.shape[2]))
        return torch.linalg.vector_norm(queries - rows, dim=2), nearest

    @torch.no_grad()
    def score_maps(self, features: Tensor, type_idx: Tensor) -> Tensor:
        if self.banks is None:
            raise RuntimeError("PatchCoreScorer is not fitted")
        if torch.jit.is_tracing():  # one gather by type instead of a loop over the batch's types
            n, c, h, w = features.shape
            dist, _ = self._gathered_nearest(features.flatten(2).transpose(1, 2), type_idx.long())
            return dist.reshape(n, h, w)
        features, type_idx = _check_features(features, type_idx, self.n_types, self.channels)
        n, c, h, w = features.shape
        locs = h * w
        maps = torch.empty(n, h, w, dtype=torch.float32, device=features.device)
        for t in range(self.n_types):
            images = _images_of_type(type_idx, t)
            if images.numel() == 0:
                continue
            bank = self.banks[t].to(features.device)
            # a few images at a time, so the [rows, C] query copy stays bounded too
            per_block = max(1, _QUERY_ROWS // locs)
            for s in range(0, images.numel(), per_block):
                block = images[s : s + per_block]
                queries = features[block].permute(0, 2, 3, 1).reshape(-1, c)
                dist, _ = nearest_neighbors(queries, bank, self.config.chunk)
                maps[block] = dist.reshape(-1, h, w)
        return maps

    @torch.no_grad()
    def reweighted_scores(self, features: Tensor, type_idx: Tensor, patch_maps: Tensor) -> Tensor:
        """The paper's image score ``[N]`` from the patch maps ``[N, h, w]`` of :meth:`score_maps`.

        For the patch with the largest score ``s*`` (feature ``q``, nearest bank entry ``m*``), with
        ``N_b(m*)`` the ``b = neighbors`` bank entries nearest to ``m*`` (``m*`` itself first),
        the score is ``(1 - exp|q - m*| / sum over m in N_b(m*) of exp|q - m|) * s*`` (Roth et al.
        2022, eq. 7; anomalib's ``compute_anomaly_score``). ``neighbors=1`` gives ``s*`` itself.
        """
        if self.banks is None:
            raise RuntimeError("PatchCoreScorer is not fitted")
        features, type_idx = _check_features(features, type_idx, self.n_types, self.channels)
        n, _, h, w = features.shape
        if tuple(patch_maps.shape) != (n, h, w):
            raise ValueError(f"patch_maps must be [{n}, {h}, {w}], got {tuple(patch_maps.shape)}")
        flat = patch_maps.reshape(n, -1).float()
        best, where = flat.max(dim=1)
        if self.config.neighbors == 1:
            return best
        if torch.jit.is_tracing():
            return self._reweighted_gathered(features, type_idx, best, where)
        queries = features.flatten(2)[torch.arange(n, device=features.device), :, where]  # [N, C]
        out = torch.empty(n, dtype=torch.float32, device=features.device)
        for t in range(self.n_types):
            images = _images_of_type(type_idx, t)
            if images.numel() == 0:
                continue
            bank = self.banks[t].to(features.device)
            out[images] = _reweight(queries[images], best[images], bank, self.config.neighbors,
                                    self.config.chunk)
        return out

    def _reweighted_gathered(self, features: Tensor, type_idx: Tensor, best: Tensor, where: Tensor) -> Tensor:
        """The traced form of :meth:`reweighted_scores` (:func:`_reweight`), with each image's
        bank gathered by type from :meth:`padded_banks`."""
        assert self.banks is not None
        flat = features.flatten(2)  # [N, C, L]
        queries = torch.gather(flat, 2, where.view(-1, 1, 1).expand(-1, flat.shape[1], 1))  # [N, C, 1]
        queries = queries.transpose(1, 2)  # [N, 1, C]
        _, m_star = self._gathered_nearest(queries, type_idx)  # [N, 1]
        bank = self.padded_banks().to(features.device)[type_idx]  # [N, M, C]
        centre = torch.gather(bank, 1, m_star.unsqueeze(2).expand(-1, -1, bank.shape[2]))  # [N, 1, C]
        to_bank = torch.linalg.vector_norm(centre - bank, dim=2)  # [N, M]
        to_bank = to_bank.scatter(1, m_star, -1.0)  # m* itself first
        b = min(self.config.neighbors, min(int(x.shape[0]) for x in self.banks))
        support = to_bank.topk(b, dim=1, largest=False).indices  # [N, b]
        rows = torch.gather(bank, 1, support.unsqueeze(2).expand(-1, -1, bank.shape[2]))  # [N, b, C]
        dist = torch.linalg.vector_norm(queries - rows, dim=2)
        return (1.0 - torch.softmax(dist, dim=1)[:, 0]) * best

    def state_tensors(self) -> dict[str, Tensor]:
        if self.banks is None:
            raise RuntimeError("PatchCoreScorer is not fitted")
        sizes = torch.tensor([0] + [b.shape[0] for b in self.banks], dtype=torch.long)
        return {
            "bank": torch.cat([b.cpu() for b in self.banks]).contiguous(),
            "bank_offsets": torch.cumsum(sizes, dim=0),
        }

    @classmethod
    def from_state(
        cls, config: PatchCoreConfig, tensors: dict[str, Tensor], n_types: int, channels: int
    ) -> Self:
        try:
            bank, offsets = tensors["bank"], tensors["bank_offsets"]
        except KeyError as exc:
            raise ValueError(f"PatchCore state lacks tensor {exc}") from None
        if bank.ndim != 2 or bank.shape[1] != channels:
            raise ValueError(f"PatchCore bank must be [M, {channels}], got {tuple(bank.shape)}")
        bounds = [int(v) for v in offsets.tolist()]
        if (
            len(bounds) != n_types + 1
            or bounds[0] != 0
            or bounds[-1] != bank.shape[0]
            or any(b <= a for a, b in itertools.pairwise(bounds))
        ):
            raise ValueError(f"PatchCore bank_offsets {bounds} do not fit {n_types} types")
        scorer = cls(config)
        scorer.banks = [bank[a:b].float().contiguous() for a, b in itertools.pairwise(bounds)]
        scorer.n_types = n_types
        scorer.channels = channels
        return scorer


def _reweight(queries: Tensor, scores: Tensor, bank: Tensor, neighbors: int, chunk: int) -> Tensor:
    """``(1 - softmax weight of m*) * s*`` for each query ``[Q, C]`` and its score ``s* [Q]``."""
    _, nearest = nearest_neighbors(queries, bank, chunk)
    b = min(neighbors, bank.shape[0])
    rows = max(1, chunk // bank.shape[0])
    out = torch.empty_like(scores)
    for s in range(0, queries.shape[0], rows):
        m_star = nearest[s : s + rows]
        # distances of m* to the bank, m* itself pinned first (duplicates cannot displace it)
        to_bank = torch.cdist(bank[m_star], bank)
        to_bank[torch.arange(m_star.numel(), device=bank.device), m_star] = -1.0
        support = to_bank.topk(b, dim=1, largest=False).indices  # [q, b]
        dist = torch.linalg.vector_norm(queries[s : s + rows, None] - bank[support], dim=2)
        weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
        out[s : s + rows] = weight * scores[s : s + rows]
    return out


# --------------------------------------------------------------------------------------------
# PaDiM
# --------------------------------------------------------------------------------------------


def mahalanobis_maps(x: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Mahalanobis distance of ``x [n, p, h, w]`` to per-location Gaussians -> ``[n, h, w]``.

    ``mean`` is ``[h, w, p]`` and ``precision`` ``[h, w, p, p]``; one batched matrix product over
    all locations (no loop over locations).
    """
    n, p, h, w = x.shape
    locs = h * w
    diff = x.permute(2, 3, 0, 1).reshape(locs, n, p) - mean.reshape(locs, 1, p)
    quad = (torch.bmm(diff, precision.reshape(locs, p, p)) * diff).sum(dim=2)  # [L, n]
    return quad.clamp_min(0.0).sqrt().reshape(h, w, n).permute(2, 0, 1)


class PaDiMScorer:
    """PaDiM over feature maps: a Gaussian per type and location, covariance ``S + epsilon * I``
    with ``S`` the sample (default, as published) or Ledoit-Wolf covariance."""

    def __init__(self, config: PaDiMConfig | None = None) -> None:
        self.config = config or PaDiMConfig()
        self.channel_idx: Tensor | None = None
        self.mean: Tensor | None = None  # [T, h, w, d]
        self.precision: Tensor | None = None  # [T, h, w, d, d]
        self.n_types = 0
        self.channels = 0

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def select_channels(self, channels: int) -> Tensor:
        """The fixed channel subset (sorted int64) for ``channels`` input channels."""
        if channels <= self.config.dims:
            return torch.arange(channels)
        perm = torch.randperm(channels, generator=_generator(self.config.seed, 0))
        return perm[: self.config.dims].sort().values

    def _fit_type(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [n, d, h, w]`` of one type -> mean ``[h, w, d]``, precision ``[h, w, d, d]``."""
        n, d, h, w = x.shape
        locs = h * w
        per_loc = x.permute(2, 3, 0, 1).reshape(locs, n, d)
        block = max(1, _PADIM_FIT_ELEMENTS // (n * d))
        means, precisions = [], []
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        for s in range(0, locs, block):
            samples = per_loc[s : s + block].double()
            mean, cov = covariance_batched(samples, self.config.covariance)
            cov = cov + self.config.epsilon * eye
            factor, info = torch.linalg.cholesky_ex(cov)
            if bool((info != 0).any()):
                raise ConfigError("PaDiM: a covariance is not positive definite; raise padim.epsilon "
                                  f"(now {self.config.epsilon:g})")
            # cov = F F^T  ->  precision = F^-T F^-1 (triangular solve: far faster than
            # torch.cholesky_inverse on a batch of small matrices)
            inv_factor = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
            prec = inv_factor.transpose(1, 2) @ inv_factor
            means.append(mean.float())
            precisions.append((0.5 * (prec + prec.transpose(1, 2))).float())
        return torch.cat(means).reshape(h, w, d), torch.cat(precisions).reshape(h, w, d, d)

    @torch.no_grad()
    def fit(self, features: Tensor, type_idx: Tensor, n_types: int, *, progress: bool = False) -> Self:
        features, type_idx = _check_features(features, type_idx, n_types)
        channel_idx = self.select_channels(features.shape[1])
        means, precisions = [], []
        for t in tqdm(range(n_types), desc="PaDiM", disable=not progress, leave=False):
            images = _images_of_type(type_idx, t)
            if images.numel() == 0:
                raise ValueError(f"PaDiM: feature type {t} has no GOOD images to fit")
            x = features[images][:, channel_idx.to(features.device)]
            mean, precision = self._fit_type(x)
            means.append(mean)
            precisions.append(precision)
        self.channel_idx = channel_idx
        self.mean = torch.stack(means)
        self.precision = torch.stack(precisions)
        self.n_types = n_types
        self.channels = features.shape[1]
        return self

    @torch.no_grad()
    def score_maps(self, features: Tensor, type_idx: Tensor) -> Tensor:
        if self.mean is None or self.precision is None or self.channel_idx is None:
            raise RuntimeError("PaDiMScorer is not fitted")
        if torch.jit.is_tracing():  # one gather by type instead of a loop over the batch's types
            return self._maps_gathered(features, type_idx.long())
        features, type_idx = _check_features(features, type_idx, self.n_types, self.channels)
        n, _, h, w = features.shape
        _, fh, fw, d = self.mean.shape
        if (h, w) != (fh, fw):
            raise ValueError(f"PaDiM was fitted on {fh}x{fw} feature maps, got {h}x{w}")
        device = features.device
        channel_idx = self.channel_idx.to(device)
        maps = torch.empty(n, h, w, dtype=torch.float32, device=device)
        per_block = max(1, _PADIM_SCORE_ELEMENTS // (h * w * d))
        for t in range(self.n_types):
            images = _images_of_type(type_idx, t)
            if images.numel() == 0:
                continue
            mean = self.mean[t].to(device)
            precision = self.precision[t].to(device)
            for s in range(0, images.numel(), per_block):
                block = images[s : s + per_block]
                maps[block] = mahalanobis_maps(features[block][:, channel_idx], mean, precision)
        return maps

    def _maps_gathered(self, features: Tensor, type_idx: Tensor) -> Tensor:
        """The traced form of :meth:`score_maps`: each image's Gaussians gathered by its type
        (the same arithmetic as :func:`mahalanobis_maps`)."""
        assert self.mean is not None and self.precision is not None and self.channel_idx is not None
        x = features[:, self.channel_idx.to(features.device)]
        n, d, h, w = x.shape
        diff = x.permute(0, 2, 3, 1).reshape(n, h * w, 1, d) - self.mean[type_idx].reshape(n, h * w, 1, d)
        prec = self.precision[type_idx].reshape(n, h * w, d, d)
        quad = (torch.matmul(diff, prec) * diff).sum(dim=3)  # [N, L, 1]
        return quad.clamp_min(0.0).sqrt().reshape(n, h, w)

    def state_tensors(self) -> dict[str, Tensor]:
        if self.mean is None or self.precision is None or self.channel_idx is None:
            raise RuntimeError("PaDiMScorer is not fitted")
        return {
            "channel_idx": self.channel_idx.cpu().contiguous(),
            "mean": self.mean.cpu().contiguous(),
            "precision": self.precision.cpu().contiguous(),
        }

    @classmethod
    def from_state(cls, config: PaDiMConfig, tensors: dict[str, Tensor], n_types: int, channels: int) -> Self:
        try:
            channel_idx = tensors["channel_idx"].long()
            mean, precision = tensors["mean"].float(), tensors["precision"].float()
        except KeyError as exc:
            raise ValueError(f"PaDiM state lacks tensor {exc}") from None
        d = channel_idx.numel()
        if channel_idx.ndim != 1 or d == 0 or int(channel_idx.max()) >= channels:
            raise ValueError(f"PaDiM channel_idx does not fit {channels} channels")
        if mean.ndim != 4 or mean.shape[0] != n_types or mean.shape[3] != d:
            raise ValueError(f"PaDiM mean must be [{n_types}, h, w, {d}], got {tuple(mean.shape)}")
        if tuple(precision.shape) != (*mean.shape, d):
            raise ValueError(f"PaDiM precision must be {(*mean.shape, d)}, got {tuple(precision.shape)}")
        scorer = cls(config)
        scorer.channel_idx = channel_idx
        scorer.mean = mean
        scorer.precision = precision
        scorer.n_types = n_types
        scorer.channels = channels
        return scorer


# --------------------------------------------------------------------------------------------
# Detector glue
# --------------------------------------------------------------------------------------------


def _baseline_config(config: DetectorConfig) -> PatchCoreConfig | PaDiMConfig:
    """The scorer config for ``config.method``: its ``patchcore`` / ``padim`` section."""
    if config.method == "patchcore":
        return config.patchcore
    if config.method == "padim":
        return config.padim
    raise ValueError(f"no baseline scorer for method {config.method!r}")


def scorer_for(config: DetectorConfig) -> PatchCoreScorer | PaDiMScorer:
    """An unfitted PatchCore / PaDiM scorer for a ``DetectorConfig`` (``method`` picks which)."""
    cfg = _baseline_config(config)
    return PatchCoreScorer(cfg) if isinstance(cfg, PatchCoreConfig) else PaDiMScorer(cfg)


def load_scorer(
    config: DetectorConfig, tensors: dict[str, Tensor], n_types: int, channels: int
) -> PatchCoreScorer | PaDiMScorer:
    """A fitted PatchCore / PaDiM scorer rebuilt from its ``state_tensors``."""
    cfg = _baseline_config(config)
    if isinstance(cfg, PatchCoreConfig):
        return PatchCoreScorer.from_state(cfg, tensors, n_types, channels)
    return PaDiMScorer.from_state(cfg, tensors, n_types, channels)
