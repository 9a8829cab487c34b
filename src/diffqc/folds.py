"""Grouped, stratified k-fold splits for cross-validated evaluation.

Every item of a group (a physical part, else a source image) lands on the same side of
every split, so no part leaks from training into testing. Groups are stratified by their
label (a group is defective when any of its items is) and spread so that each fold gets
about the same number of defective items and of GOOD items. The split depends only on the
set of (label, group) pairs and the seed, not on the order of the items.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt

from diffqc.data import DEFECTIVE, GOOD, Sample
from diffqc.errors import FoldError
from diffqc.metrics import as_labels

Split = tuple[np.ndarray, np.ndarray]


def _group_table(
    labels: np.ndarray, groups: Sequence[Hashable]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Distinct group keys (sorted as strings), their label (max), size, and item -> group."""
    keys = [str(g) for g in groups]
    names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    item_group = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    group_label = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(group_label, item_group, labels)
    group_size = np.bincount(item_group, minlength=len(names))
    return names, group_label, group_size, item_group


def _assign_stratum(
    members: np.ndarray,
    sizes: np.ndarray,
    fold_stratum: np.ndarray,
    fold_total: np.ndarray,
    group_fold: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Greedy balancing: largest groups first (random among equal sizes), each to the fold
    with the fewest items of this stratum, then the fewest items overall, then lowest index."""
    shuffled = rng.permutation(members)
    ordered = shuffled[np.argsort(-sizes[shuffled], kind="mergesort")]
    for g in ordered:
        fold = int(np.lexsort((np.arange(fold_total.size), fold_total, fold_stratum))[0])
        group_fold[g] = fold
        fold_stratum[fold] += sizes[g]
        fold_total[fold] += sizes[g]


def grouped_stratified_assignment(
    labels: npt.ArrayLike, groups: Sequence[Hashable], k: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold index in ``[0, k)`` of every item; see :func:`grouped_stratified_kfold`."""
    y = as_labels(labels)
    if len(groups) != y.size:
        raise FoldError(f"got {len(groups)} groups for {y.size} labels")
    if k < 2:
        raise FoldError(f"k must be at least 2, got {k}")
    names, group_label, group_size, item_group = _group_table(y, groups)
    if len(names) < k:
        raise FoldError(
            f"cannot make {k} folds from {len(names)} group(s) (parts); every fold needs at "
            f"least one part: use --folds {max(len(names), 2)} or fewer, or add data"
        )
    rng = np.random.default_rng(seed)
    fold_total = np.zeros(k, dtype=np.int64)
    group_fold = np.full(len(names), -1, dtype=np.int64)
    # The rarer (defective) stratum first, so its few groups are spread before GOOD fills in.
    for label, word in ((DEFECTIVE, "defective"), (GOOD, "GOOD")):
        members = np.flatnonzero(group_label == label)
        if members.size < k:
            warnings.warn(
                f"only {members.size} {word} group(s) for {k} folds: "
                f"{k - members.size} fold(s) will have no {word} test items",
                stacklevel=3,
            )
        _assign_stratum(members, group_size, np.zeros(k, dtype=np.int64), fold_total,
                        group_fold, rng)
    return group_fold[item_group]


def splits_from_assignment(fold_of: npt.ArrayLike, k: int | None = None) -> list[Split]:
    """``[(train_idx, test_idx), ...]`` for each fold index in ``fold_of`` (-1 = in no fold)."""
    f = np.asarray(fold_of, dtype=np.int64).reshape(-1)
    k = int(f.max()) + 1 if k is None else k
    inside = f >= 0
    return [
        (np.flatnonzero(inside & (f != i)), np.flatnonzero(f == i)) for i in range(k)
    ]


def grouped_stratified_kfold(
    labels: npt.ArrayLike, groups: Sequence[Hashable], k: int = 5, seed: int = 0
) -> list[Split]:
    """k grouped, stratified folds: ``[(train_idx, test_idx), ...]`` (sorted int arrays).

    ``labels`` are 0/1 per item; ``groups`` any hashable per item (compared as strings).
    A group's label is the max of its items' labels. Deterministic for a given seed.
    Raises :class:`FoldError` when k < 2 or there are fewer groups than folds. Warns when
    a class has fewer groups than folds (then some folds have none of it; a class with no
    groups at all, e.g. a type without defective samples, gives folds without it).
    """
    return splits_from_assignment(grouped_stratified_assignment(labels, groups, k, seed), k)


def per_type_folds(samples: Sequence[Sample], k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per sample, split separately within each feature type; where a part is seen
    as images of several types, across the types, by part (:func:`_folds_across_types`).

    Groups are ``sample.group`` (part id, else image path). Unlabelled samples
    (label -1) get fold -1. Errors name the feature type.
    """
    fold_of = np.full(len(samples), -1, dtype=np.int64)
    by_type: dict[str, list[int]] = {}
    types_of: dict[str, set[str]] = {}
    for i, s in enumerate(samples):
        if s.label in (GOOD, DEFECTIVE):
            by_type.setdefault(s.feature_type, []).append(i)
            types_of.setdefault(s.group, set()).add(s.feature_type)
    if any(len(types) > 1 for types in types_of.values()):
        return _folds_across_types(samples, by_type, k, seed)
    for feature_type in sorted(by_type):
        idx = by_type[feature_type]
        labels = [samples[i].label for i in idx]
        groups = [samples[i].group for i in idx]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fold_of[idx] = grouped_stratified_assignment(labels, groups, k, seed)
        except FoldError as exc:
            raise FoldError(f"feature type {feature_type!r}: {exc}") from None
        for w in caught:
            warnings.warn(f"feature type {feature_type!r}: {w.message}", stacklevel=2)
    return fold_of


def _folds_across_types(samples: Sequence[Sample], by_type: dict[str, list[int]], k: int,
                        seed: int) -> np.ndarray:
    """Folds of parts seen as images of several types: made over every labelled image at once,
    by part (a part defective when any of its images is), so that no fold's model, fit on the
    other folds' images of every type, is fit on an image of a part it scores. A type whose
    images all fall in one fold (too few parts) is a :class:`FoldError` naming it."""
    fold_of = np.full(len(samples), -1, dtype=np.int64)
    idx = sorted(i for items in by_type.values() for i in items)
    fold_of[idx] = grouped_stratified_assignment([samples[i].label for i in idx],
                                                 [samples[i].group for i in idx], k, seed)
    for feature_type, items in sorted(by_type.items()):
        if len(set(fold_of[items].tolist())) < 2:
            raise FoldError(f"feature type {feature_type!r}: its parts all fall in one of {k} folds "
                            "(folds are made by part across types): too few parts of it")
    return fold_of
