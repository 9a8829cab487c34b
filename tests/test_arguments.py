"""The command line's number types (diffqc.arguments)."""

from __future__ import annotations

import argparse

import pytest

from diffqc.arguments import number, share


@pytest.mark.parametrize("parse,text,said", [
    (share, "0,05", "got 0,05: write the decimal with a point, 0.05"),
    (share, "2,5%", "got 2,5%: write the decimal with a point, 2.5%"),
    (number(0.0), "2,5", "expected a number, got '2,5': write the decimal with a point, 2.5"),
])
def test_a_decimal_comma_is_told_to_be_a_point(parse: object, text: str, said: str) -> None:
    """`calibrate --alpha-review 0,05` (as a German or French QC engineer writes five hundredths)
    was refused as "must be a share ... got 0,05", the comma unnamed; it is named now, with the
    value written with a point (not taken: a comma is also a thousands separator)."""
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        parse(text)  # type: ignore[operator]
    assert said in str(exc.value)


def test_numbers_and_shares_without_a_comma_are_read_as_before() -> None:
    assert share("0.05") == 0.05 and share("5%") == pytest.approx(0.05)
    assert number(0.0)("2.5") == 2.5
    for text, said in [("abc", "expected a number, got 'abc'\\Z"), ("1,2,3", "got '1,2,3'\\Z")]:
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            number(0.0)(text)
