"""``python -m diffqc.service serve|watch|results export ...`` (same as ``diffqc ...``)."""

from __future__ import annotations

import argparse
import sys

from diffqc.service import add_service_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffqc.service")
    sub = parser.add_subparsers(dest="command", required=True)
    add_service_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
