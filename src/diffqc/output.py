"""Where a command may write: one rule for every output folder diffqc fills (a model bundle, an
evaluation report).

A folder qualifies when it is new, empty, or an earlier output of the same kind (whose own files
are then replaced). Any other non-empty folder is refused unless ``force``; even then nothing
already there is deleted or replaced: the output's files are written beside what is there, and a
file or folder bearing one of their names is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from diffqc.errors import OutputError


def check_output_folder(path: Path | str, *, what: str, names: Sequence[str],
                        is_ours: Callable[[Path], bool], foreign: str, force: bool = False) -> Path:
    """``path`` if ``what`` (its files: ``names``) may be written there; :class:`OutputError`
    otherwise. ``is_ours``: whether a folder holds an earlier output of this kind; ``foreign``:
    how the message describes a folder that does not (e.g. "is not a diffqc model bundle")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write the {what} to {path}: it exists and is not a folder")
    if not path.is_dir() or is_ours(path) or not any(path.iterdir()):
        return path
    if not force:
        raise OutputError(f"{path} is not empty and {foreign}; choose a new or empty folder, or "
                          f"pass --force to write the {what}'s files beside what is there (nothing "
                          "is deleted)")
    clashes = [name for name in names if (path / name).exists()]
    if clashes:
        raise OutputError(f"{path} already holds {', '.join(clashes)}, not from a diffqc {what}; "
                          "--force writes beside other files but never replaces one: choose a "
                          "new or empty folder")
    return path
