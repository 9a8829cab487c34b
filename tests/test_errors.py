"""diffqc.errors: the hint for a feature type the model does not know."""

from __future__ import annotations

import pytest

from diffqc.errors import UnknownFeatureTypeError, did_you_mean, did_you_mean_name, unknown_feature_type

KNOWN = ["angle", "dots", "edge1", "edge2", "top_edge"]


@pytest.mark.parametrize(("name", "meant"), [
    ("Dots", "dots"), ("DOTS", "dots"), ("edge 1", "edge1"), ("Edge-2", "edge2"),
    ("top-edge", "top_edge"), ("egde1", "edge1"), ("angel", "angle"),
])
def test_a_near_miss_names_the_type_meant(name: str, meant: str) -> None:
    assert did_you_mean(name, KNOWN) == f" (did you mean {meant!r}?)"


@pytest.mark.parametrize("name", ["x", "scratch", "dots", ""])
def test_no_hint_for_a_stranger_or_an_exact_match(name: str) -> None:
    assert did_you_mean(name, KNOWN) == ""


def test_the_error_names_the_known_types() -> None:
    err = unknown_feature_type("Dots", KNOWN)
    assert isinstance(err, UnknownFeatureTypeError) and isinstance(err, ValueError)
    assert str(err) == ("unknown feature type 'Dots' (did you mean 'dots'?); this model knows "
                        "angle, dots, edge1, edge2, top_edge")


@pytest.mark.parametrize(("name", "known", "sep", "hint"), [
    ("type", ["camera", "feature_type", "part_id"], "_", " (did you mean 'feature_type'?)"),
    ("--type", ["--feature-type", "--token"], "-", " (did you mean '--feature-type'?)"),
    ("partid", ["part_id", "feature_type"], "_", " (did you mean 'part_id'?)"),  # a typo still
    ("id", ["part_id", "record_id"], "_", ""),  # the last word of two: neither named
    ("camera", ["feature_type"], "_", ""),
])
def test_a_name_s_last_word_alone_names_the_name(name: str, known: list[str], sep: str, hint: str) -> None:
    assert did_you_mean_name(name, known, sep) == hint
