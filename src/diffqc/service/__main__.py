"""``python -m diffqc.service serve|watch|results export ...`` (same as ``diffqc ...``).

The Docker image's entry point: one error boundary turns every error a user can cause (a bad
model path, database URL, folder or setting) into one ``error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from diffqc.errors import DiffqcError, out_of_memory
from diffqc.output import one_line_warnings
from diffqc.service import add_service_commands

EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffqc.service")
    sub = parser.add_subparsers(dest="command", required=True)
    add_service_commands(sub)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = one_line_warnings("warning: ")  # serve/watch log theirs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except (DiffqcError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (MemoryError, RuntimeError) as exc:  # a model larger than the machine, not a bug
        said = out_of_memory(exc)
        if said is None:
            raise
        print(f"error: {said}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
