"""Number, list and path types for the command line, checked as they are parsed.

A value out of range (``--folds 1``, ``--threads -3``, ``--port 70000``) is then a usage error
that names the option (exit code 2, one line) before any work, as ``argparse`` answers
``--folds abc``; not a traceback from deep inside the run, nor a service that starts and
refuses every upload (``--max-upload-mb 0``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from diffqc.errors import decimal_comma, percent_meant, percent_share


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[minimum, maximum]`` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


# the largest number an option takes unless it names its own: a billion seconds (31 years), MB
# (a petabyte) or days; beyond it a slip (1e308) was a traceback once running (int() of inf, a
# wait past the range of the clock's nanoseconds)
MAX_NUMBER = 1e9


def number(minimum: float, *, inclusive: bool = True,
           maximum: float = MAX_NUMBER) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= minimum`` (``> minimum`` when not inclusive)
    and ``<= maximum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number, got {text!r}{decimal_comma(text)}") from None
        if (not math.isfinite(value) or value < minimum or (value == minimum and not inclusive)
                or value > maximum):
            bound = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"
            bound += f" and at most {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def share(text: str) -> float:
    """An argparse ``type``: a share strictly between 0 and 1, as ``0.05`` or as a percentage
    (``5%``). A number from 1 to 100 without ``%`` is refused with the share it likely meant."""
    percent = percent_share(text)
    try:
        value = float(text) if percent is None else percent
    except ValueError:
        value = math.nan
    if math.isfinite(value) and 0 < value < 1:
        return value
    meant = (f"{percent_meant(value)} or {value:g}%"
             if percent is None and percent_meant(value) else decimal_comma(text))
    raise argparse.ArgumentTypeError(f"must be a share of GOOD parts between 0 and 1 (0.05, or 5%), "
                                     f"got {text}{meant}")


def names(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated names (``dots,edge1``; spaces around each dropped),
    none empty."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected names separated by commas (dots,edge1), got {text!r}")
    return items


def path_name(text: str) -> str:
    """An argparse ``type``: a file or folder (or a store's URL), as given, not empty. An empty
    one (a script's ``"$DIR"`` of a variable it never set) reads as the current folder: ``inspect
    MODEL ""`` would scan it to any depth, ``demo --out ""`` write its set and model there."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "expected a file or folder, got an empty name (a shell variable that was never set?)")
    return text


def path_value(text: str) -> Path:
    """An argparse ``type``: :func:`path_name` as a :class:`~pathlib.Path`."""
    return Path(path_name(text))


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
SEED = integer(0, 2**32 - 1)  # numpy's seeds
POSITIVE_NUMBER = number(0.0, inclusive=False)
THREADS = integer(1, 1024)  # 100000 crashed `serve` (a segmentation fault as its thread pools were made)

# help texts of options several commands share, said one way
DEVICE = "cpu or cuda (default: cuda when present)"
QUIET = "no progress lines on stderr (errors and warnings still)"


def given_options(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    """Those of ``options`` (``--alpha-review``, ``--skip-corrupt``) the command line gave: a
    value not None and a flag set (``--steps 0`` is given). What ``--undo``, which puts a file
    back as it was, refuses beside it."""
    return [option for option in options
            if (value := getattr(args, option[2:].replace("-", "_"))) is not None and value is not False]
