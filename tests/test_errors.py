"""diffqc.errors: the hint for a feature type the model does not know."""

from __future__ import annotations

import pytest

from diffqc.errors import (
    UnknownFeatureTypeError,
    address_hint,
    did_you_mean,
    did_you_mean_name,
    unknown_feature_type,
)

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


@pytest.mark.parametrize(("given", "hint"), [
    ("smb://nas/qc/cam1", " (smb://nas/qc/cam1 is a share's address, not a path here: mount it, mount -t "
                          "cifs //nas/qc /mnt/qc, and give /mnt/qc/cam1)"),
    ("smb:/nas/cam1", " (smb:/nas/cam1 is a share's address, not a path here: mount it, mount -t cifs "
                      "//nas/cam1 /mnt/cam1, and give /mnt/cam1)"),  # as a Path keeps it
    ("\\\\nas\\qc\\p.png", " (\\\\nas\\qc\\p.png is a share's address, not a path here: mount it, mount -t "
                           "cifs //nas/qc /mnt/qc, and give /mnt/qc/p.png)"),
    ("nfs://nas/export/cam", " (nfs://nas/export/cam is a share's address, not a path here: mount it, mount "
                             "-t nfs nas:/export/cam /mnt/cam, and give /mnt/cam)"),
    ("file:///data/qc", " (file:///data/qc is a URL: give the path, /data/qc)"),
    *[(url, f" ({url} is a URL, not a path here: copy it here, or mount it, and give its path)")
      for url in ("ftp://cam/img", "sftp:/edge/qc", "afp://mac/qc")],
    ("https://mes/p.png", " (https://mes/p.png is a URL, not a path here: download it, and give the file's "
                          "path)"),
    ("data/qc", ""), ("C:/qc/cam1", ""), ("C:\\qc", ""), ("cam:1/p.png", ""),
])
def test_a_share_s_address_given_as_a_path_names_what_to_give(given: str, hint: str) -> None:
    """`diffqc train smb://nas/qc`, `inspect MODEL \\\\nas\\qc\\p.png`, a watched folder so given:
    each was "does not exist" alone (the text copied from a file manager names no path here)."""
    assert address_hint(given) == hint
