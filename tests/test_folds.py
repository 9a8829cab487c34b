"""Grouped stratified folds: no part leaks across a split; balanced; deterministic."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from diffqc.data import Sample
from diffqc.folds import (
    FoldError,
    grouped_stratified_assignment,
    grouped_stratified_kfold,
    per_type_folds,
)


def _parts(seed: int, n_parts: int = 60) -> tuple[np.ndarray, list[str]]:
    """Parts with 1-4 crops each; some parts defective (then 1+ crops are defective)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_parts):
        n = int(rng.integers(1, 5))
        bad = rng.random() < 0.3
        for j in range(n):
            labels.append(int(bad and (j == 0 or rng.random() < 0.5)))
            groups.append(f"part{p:03d}")
    return np.array(labels), groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 5])
def test_no_part_straddles_a_split_and_folds_partition(seed: int, k: int) -> None:
    labels, groups = _parts(seed)
    splits = grouped_stratified_kfold(labels, groups, k=k, seed=seed)
    assert len(splits) == k
    g = np.array(groups)
    seen = np.zeros(labels.size, int)
    for train, test in splits:
        assert set(g[train]).isdisjoint(g[test])
        assert np.intersect1d(train, test).size == 0
        assert train.size + test.size == labels.size
        seen[test] += 1
    assert (seen == 1).all()  # every item tested exactly once


def test_stratified_and_balanced() -> None:
    labels, groups = _parts(7, n_parts=100)
    fold = grouped_stratified_assignment(labels, groups, k=5, seed=0)
    bad_groups = {g for g, y in zip(groups, labels, strict=True) if y}
    pairs = list(zip(groups, fold, strict=True))
    per_fold_bad = [len({g for g, f in pairs if f == i and g in bad_groups}) for i in range(5)]
    assert max(per_fold_bad) - min(per_fold_bad) <= 1  # defective parts spread evenly
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 4  # groups have at most 4 items
    defect_items = np.bincount(fold[labels == 1], minlength=5)
    assert defect_items.max() - defect_items.min() <= 4


def test_deterministic_and_order_invariant() -> None:
    labels, groups = _parts(3)
    a = grouped_stratified_assignment(labels, groups, 5, seed=11)
    b = grouped_stratified_assignment(labels, groups, 5, seed=11)
    np.testing.assert_array_equal(a, b)
    perm = np.random.default_rng(0).permutation(labels.size)
    c = grouped_stratified_assignment(labels[perm], [groups[i] for i in perm], 5, seed=11)
    np.testing.assert_array_equal(a[perm], c)
    d = grouped_stratified_assignment(labels, groups, 5, seed=12)
    assert not np.array_equal(a, d)


def test_group_label_is_max_of_items() -> None:
    labels = [0, 1, 0, 0, 0, 0]
    groups = ["a", "a", "b", "c", "d", "e"]
    with pytest.warns(UserWarning, match="only 1 defective group"):
        fold = grouped_stratified_assignment(labels, groups, k=2, seed=0)
    assert fold[0] == fold[1]


def test_too_many_folds_is_a_clear_error() -> None:
    with pytest.raises(FoldError, match="cannot make 5 folds from 3 group"):
        grouped_stratified_kfold([0, 0, 1, 1], ["a", "a", "b", "c"], k=5)
    with pytest.raises(FoldError, match="at least 2"):
        grouped_stratified_kfold([0, 1], ["a", "b"], k=1)


def test_class_with_fewer_groups_than_folds_warns() -> None:
    labels = [0] * 10 + [1] * 3
    groups = [f"g{i}" for i in range(10)] + ["d1", "d2", "d2"]
    with pytest.warns(UserWarning, match="only 2 defective group"):
        splits = grouped_stratified_kfold(labels, groups, k=5, seed=0)
    y = np.array(labels)
    with_defects = [int(y[test].sum() > 0) for _, test in splits]
    assert sum(with_defects) == 2
    assert all(test.size > 0 for _, test in splits)


def test_type_without_defective_samples_is_handled() -> None:
    with pytest.warns(UserWarning, match="only 0 defective"):
        splits = grouped_stratified_kfold([0] * 12, [f"g{i // 2}" for i in range(12)], k=3)
    assert [t.size for _, t in splits] == [4, 4, 4]


def _sample(i: int, ftype: str, label: int, part: str | None) -> Sample:
    return Sample(Path(f"/data/{ftype}/{i}.png"), ftype, label, part_id=part)


def test_per_type_folds_over_samples() -> None:
    samples = []
    for i in range(30):
        samples.append(_sample(i, "edge", int(i % 5 == 0), f"p{i // 3}"))  # 3 crops per part
    for i in range(12):
        samples.append(_sample(100 + i, "corner", int(i < 6), None))  # group = image path
    samples.append(_sample(999, "edge", -1, "p0"))  # unlabelled: no fold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold = per_type_folds(samples, k=3, seed=0)
    assert fold[-1] == -1
    for ftype in ("edge", "corner"):
        idx = [i for i, s in enumerate(samples) if s.feature_type == ftype and s.label >= 0]
        assert sorted(set(fold[idx])) == [0, 1, 2]
        parts: dict[str, set[int]] = {}
        for i in idx:
            parts.setdefault(samples[i].group, set()).add(int(fold[i]))
        assert all(len(f) == 1 for f in parts.values())
    corner = [i for i, s in enumerate(samples) if s.feature_type == "corner"]
    assert sorted(np.bincount(fold[corner][np.array([samples[i].label for i in corner]) == 1])) \
        == [2, 2, 2]


def test_a_part_seen_as_images_of_several_types_lies_in_one_fold() -> None:
    """Folds were made within each type, so a part's edge crop and corner crop could lie in two
    folds (19 of 30 parts so), and a fold's one model, fit on the other folds' GOOD images of
    every type, was fit on a crop of a part it then scored: the leak the folds exist to keep out.
    Where a part is seen as images of several types, the folds are made across types, by part;
    each type still lies in every fold."""
    samples = []
    for part in range(30):
        samples.append(_sample(part, "edge", int(part % 5 == 0), f"P{part}"))
        samples.append(_sample(100 + part, "corner", 0, f"P{part}"))
    fold = per_type_folds(samples, k=3, seed=0)
    folds_of: dict[str, set[int]] = {}
    for s, f in zip(samples, fold, strict=True):
        folds_of.setdefault(str(s.part_id), set()).add(int(f))
    assert all(len(f) == 1 for f in folds_of.values())
    for ftype in ("edge", "corner"):
        in_type = {int(f) for s, f in zip(samples, fold, strict=True) if s.feature_type == ftype}
        assert sorted(in_type) == [0, 1, 2]
    defective = [int(f) for s, f in zip(samples, fold, strict=True) if s.label == 1]
    assert sorted(np.bincount(defective, minlength=3)) == [2, 2, 2]  # still stratified


def test_per_type_folds_names_the_type() -> None:
    samples = [_sample(i, "tiny", 0, "same") for i in range(4)]
    with pytest.raises(FoldError, match="'tiny'"):
        per_type_folds(samples, k=2)
