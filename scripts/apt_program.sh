#!/usr/bin/env bash
# Print the path of PROGRAM (on PATH or in /usr/sbin), installing its Debian PACKAGE (default:
# PROGRAM) first when it is not there; apt's output and this script's words go to stderr.
#
#   MOSQUITTO="$(bash scripts/apt_program.sh mosquitto)"
#   bash scripts/apt_program.sh nginx nginx-light >/dev/null
set -euo pipefail
PROGRAM="$1"
PACKAGE="${2:-$1}"

found() { command -v "$PROGRAM" || { [ -x "/usr/sbin/$PROGRAM" ] && echo "/usr/sbin/$PROGRAM"; }; }

if ! found; then
    echo "apt_program: installing $PACKAGE (apt)" >&2
    bash "$(dirname "$0")/apt_install.sh" "$PACKAGE"
    found
fi
