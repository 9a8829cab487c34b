"""``python -m diffqc.service serve|watch|results ...``: the same as ``diffqc ...``, through the
CLI's one error boundary (every error a user can cause is one ``diffqc: error: ...`` line, or a
JSON log line under ``--log-format json``, and exit code 1; warnings one line each; a pipe closed
by its reader ends quietly). The Docker image's entry point: an entry point, above every module
of the package, so the one place besides the console script that runs the CLI.
"""

from __future__ import annotations

import sys

from diffqc.cli import main

if __name__ == "__main__":
    sys.exit(main())
