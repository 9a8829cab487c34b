#!/usr/bin/env bash
# Install Debian packages without a question (as root, or through sudo), apt's output on stderr:
# the one way the scripts beside this one install what they start.
#
#   bash scripts/apt_install.sh PACKAGE...
set -euo pipefail
SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
