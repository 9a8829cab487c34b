"""The type router: the feature type of a part of unknown type in one pass.

A part of unknown type is not scored under every type. A cheap classifier, fitted at fit time
on the GOOD training features and saved in the bundle, ranks the types; the full scorer then
runs only under the top ``scoring.type_candidates`` of them, and among those the type under
which the part looks least anomalous wins.

- **Router** (:class:`TypeRouter`): linear discriminant analysis on image-level pooled
  features. Each image's standardised backbone features ``[C, h, w]`` are pooled to ``2C``
  numbers (each channel's mean and standard deviation over the locations, :func:`pool`); each
  type is a Gaussian over these with its own mean and one covariance shared by all types
  (Ledoit-Wolf shrunk, on the pooled features scaled to unit variance). The log-likelihood of
  an image under each type (up to a constant common to all types) ranks the candidates.
- **Choice among candidates** (:func:`choose`): raw anomaly scores of different types are not
  comparable (each type has its own scale), so each candidate's score is turned into its
  known-type conformal p-value (how unusual the score is among that type's GOOD calibration
  scores); the candidate with the largest p-value, i.e. the lowest comparable score, wins, and
  a tie goes to the router's higher-ranked candidate. With one candidate the router decides.

Everything here is NumPy (no PyTorch): the PyTorch detector and the exported runtimes (ONNX
Runtime, OpenVINO) share this one implementation, on the standardised features each computes,
and the one planning step :func:`route_and_score` that decides which (image, type) pairs the
scorer runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from diffqc.errors import BundleError

if TYPE_CHECKING:
    from diffqc.calibration import Calibrator

# Tensor names of the router in a bundle's weights.safetensors.
STATE_KEYS = ("router.whiten", "router.means")
Maps = TypeVar("Maps")


def pool(features: np.ndarray) -> np.ndarray:
    """Standardised features ``[N, C, h, w]`` -> ``[N, 2C]`` float64: per channel, the mean and
    the standard deviation over the locations."""
    if features.ndim != 4:
        raise ValueError(f"features must be [N, C, h, w], got shape {features.shape}")
    flat = np.asarray(features, dtype=np.float32).reshape(features.shape[0], features.shape[1], -1)
    # float64 sums of x and x² (no float64 copy of the maps: 3x faster than .std() at batch 32);
    # the features are standardised, so E[x²] - E[x]² loses nothing that matters here
    mean = flat.mean(axis=2, dtype=np.float64)
    square = np.square(flat).mean(axis=2, dtype=np.float64)
    return np.concatenate([mean, np.sqrt(np.maximum(square - mean * mean, 0.0))], axis=1)


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``x [n, p]`` (toward ``tr(S)/p * I``; as
    :func:`diffqc.covariance.ledoit_wolf_batched`, for one set, in NumPy)."""
    n, p = x.shape
    emp = x.T @ x / n
    mu = np.trace(emp) / p
    delta = float(np.sum((emp - mu * np.eye(p)) ** 2)) / p
    beta = (float(np.sum(np.sum(x * x, axis=1) ** 2)) / n - float(np.sum(emp ** 2))) / (n * p)
    shrink = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    out: np.ndarray = (1.0 - shrink) * emp + shrink * mu * np.eye(p)
    return out


@dataclass(frozen=True)
class TypeRouter:
    """LDA over pooled features (see the module docstring). ``whiten`` ``[D, D]`` maps pooled
    features to coordinates where the shared covariance is the identity; ``means`` ``[T, D]``
    are the types' means in those coordinates."""

    whiten: np.ndarray
    means: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, type_idx: np.ndarray, n_types: int) -> TypeRouter:
        """Fit on standardised GOOD features ``[N, C, h, w]`` with their types ``[N]``; every
        type needs at least one image."""
        x = pool(features)
        y = np.asarray(type_idx, dtype=np.int64)
        counts = np.bincount(y, minlength=n_types)
        if len(counts) != n_types or (counts == 0).any():
            raise ValueError(f"the type router needs images of every one of {n_types} types, "
                             f"got counts {counts.tolist()}")
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        x = x / scale
        means = np.stack([x[y == t].mean(axis=0) for t in range(n_types)])
        cov = _ledoit_wolf(x - means[y])
        # never singular; with one image per type there is no within-type scatter at all, and
        # the router falls back to the nearest type mean in unit-variance coordinates
        ridge = 1e-6 * np.trace(cov) / cov.shape[0]
        cov += (ridge if ridge > 1e-12 else 1.0) * np.eye(cov.shape[0])
        chol = np.linalg.cholesky(cov)
        inv = np.linalg.solve(chol, np.eye(cov.shape[0]))  # L^-1: Σ^-1 = L^-T L^-1
        whiten = inv / scale[None, :]  # fold the unit-variance scaling in
        return cls(whiten.astype(np.float32), (means @ inv.T).astype(np.float32))

    @property
    def n_types(self) -> int:
        return int(self.means.shape[0])

    def log_likelihood(self, features: np.ndarray) -> np.ndarray:
        """``[N, T]``: each image's Gaussian log-likelihood under each type, up to a constant
        common to all types."""
        z = pool(features) @ self.whiten.T.astype(np.float64)
        d = ((z[:, None, :] - self.means[None].astype(np.float64)) ** 2).sum(axis=2)
        out: np.ndarray = -0.5 * d
        return out

    def candidates(self, features: np.ndarray, m: int) -> np.ndarray:
        """The ``m`` most likely types of each image, most likely first: int64 ``[N, m]``."""
        m = max(1, min(int(m), self.n_types))
        order: np.ndarray = np.argsort(-self.log_likelihood(features), axis=1, kind="stable")
        return order[:, :m].astype(np.int64)

    def state(self) -> dict[str, np.ndarray]:
        return {"router.whiten": np.ascontiguousarray(self.whiten, dtype=np.float32),
                "router.means": np.ascontiguousarray(self.means, dtype=np.float32)}

    @classmethod
    def from_state(cls, tensors: Mapping[str, Any], n_types: int, channels: int) -> TypeRouter | None:
        """The router saved in a bundle's weights (NumPy arrays or CPU tensors), or ``None``
        when the bundle has none (written before the router existed); a router that does not
        fit the model is a ValueError."""
        if not all(k in tensors for k in STATE_KEYS):
            return None
        whiten = np.asarray(tensors["router.whiten"], dtype=np.float32)
        means = np.asarray(tensors["router.means"], dtype=np.float32)
        d = 2 * channels
        if whiten.shape != (d, d) or means.shape != (n_types, d):
            raise ValueError(f"type router of shapes {whiten.shape}, {means.shape} does not fit "
                             f"{n_types} types of {channels} channels")
        return cls(whiten, means)


def no_router_error(where: object) -> BundleError:
    return BundleError(f"model bundle {where} has no type router (it was written by a diffqc "
                       "before the router existed): give each part's feature type, or train the "
                       "model again to inspect parts of unknown type")


def choose(candidates: np.ndarray, scores: np.ndarray, calibration: Calibrator,
           classes: Sequence[str]) -> np.ndarray:
    """Which candidate of each image wins (an index into its row of ``candidates [N, m]``),
    from its scores ``[N, m]`` under them: the largest known-type conformal p-value (the lowest
    comparable score); a tie goes to the router's higher-ranked candidate (the first)."""
    n, m = candidates.shape
    if m == 1:
        return np.zeros(n, dtype=np.int64)
    p = np.array([[calibration.p_value(classes[int(c)], float(s)) for c, s in zip(cr, sr, strict=True)]
                  for cr, sr in zip(candidates, scores, strict=True)], dtype=np.float64).reshape(n, m)
    return np.argmax(p, axis=1).astype(np.int64)  # the first of equal maxima


def rows(types_per_image: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, list[dict[int, int]]]:
    """The (image, type) pairs to score, each once: image indices ``[R]``, types ``[R]`` and,
    per image, type -> row."""
    image: list[int] = []
    kind: list[int] = []
    where: list[dict[int, int]] = []
    for i, types in enumerate(types_per_image):
        here: dict[int, int] = {}
        for t in types:
            if int(t) not in here:
                here[int(t)] = len(image)
                image.append(i)
                kind.append(int(t))
        where.append(here)
    return np.array(image, dtype=np.int64), np.array(kind, dtype=np.int64), where


@dataclass
class Routed:
    """What :func:`route_and_score` decided and scored."""

    own: list[int]  # the type each image is scored under (given, or chosen when unknown)
    scores: list[float]  # its score under that type
    own_rows: np.ndarray  # int64 [N]: the row of the scored maps holding its map
    predicted: list[int | None]  # the type unknown mode picks (None where not computed)
    table: np.ndarray | None  # [N, T] every type's score (all_types only)


def route_and_score(
    given: Sequence[int | None], features: Callable[[], np.ndarray], router: TypeRouter | None,
    n_candidates: int, n_types: int, score: Callable[[np.ndarray, np.ndarray], tuple[Maps, np.ndarray]],
    calibration: Calibrator, classes: Sequence[str], *, all_types: bool, where: object = "",
) -> tuple[Routed, Maps]:
    """The one inspect decision of every runtime. ``given``: each image's type index, ``None``
    when unknown; ``features()``: the standardised features ``[N, C, h, w]`` (NumPy) the router
    reads, asked for only when it runs; ``score(image_idx, type_idx) -> (maps, scores)`` runs
    the full scorer on those (image, type) rows in one pass. A known type is scored under
    itself only; an unknown type under the router's ``n_candidates`` best types (:func:`choose`
    picks among them); ``all_types`` scores every image under every type too (the table, and
    the type unknown mode would pick also for images of known type). Returns the decision and
    the maps of every row scored (``Routed.own_rows`` indexes them)."""
    n = len(given)
    need_route = [all_types or g is None for g in given]
    cand: np.ndarray | None = None
    if any(need_route):
        if router is None:
            if any(g is None for g in given):
                raise no_router_error(where)
        else:
            cand = router.candidates(features(), n_candidates)
    everything = list(range(n_types))
    wanted: list[list[int]] = []
    for i, g in enumerate(given):
        if all_types:
            wanted.append(everything)
        elif g is None:
            assert cand is not None
            wanted.append([int(c) for c in cand[i]])
        else:
            wanted.append([g])
    image, kind, at = rows(wanted)
    maps, row_scores = score(image, kind)
    row_scores = np.asarray(row_scores, dtype=np.float64).reshape(-1)
    predicted: list[int | None] = [None] * n
    if cand is not None:
        sel = [i for i in range(n) if need_route[i]]
        cs = np.array([[row_scores[at[i][int(c)]] for c in cand[i]] for i in sel]).reshape(len(sel), -1)
        pick = choose(cand[sel], cs, calibration, classes)
        for j, i in enumerate(sel):
            predicted[i] = int(cand[i, pick[j]])
    own: list[int] = []
    for g, p in zip(given, predicted, strict=True):
        k = g if g is not None else p
        assert k is not None  # every image of unknown type was routed
        own.append(int(k))
    own_rows = np.array([at[i][k] for i, k in enumerate(own)], dtype=np.int64)
    table = None
    if all_types:
        table = np.array([[row_scores[at[i][t]] for t in everything] for i in range(n)],
                         dtype=np.float32).reshape(n, n_types)
    routed = Routed(own, [float(row_scores[r]) for r in own_rows], own_rows, predicted, table)
    return routed, maps


def unknown_scores(classes: Sequence[str], candidates: np.ndarray, scores: np.ndarray,
                   calibration: Calibrator) -> dict[str, list[float]]:
    """Unknown-type calibration scores of GOOD images from their router ``candidates [N, m]``
    and scores under them ``[N, m]``, keyed by the type unknown mode picks (the key used at
    inference); ``calibration`` holds the known-type scores :func:`choose` compares with."""
    out: dict[str, list[float]] = {t: [] for t in classes}
    pick = choose(candidates, scores, calibration, classes)
    for row_c, row_s, j in zip(candidates, scores, pick, strict=True):
        out[classes[int(row_c[j])]].append(float(row_s[j]))
    return out
