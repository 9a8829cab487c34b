#!/usr/bin/env bash
# Install Prometheus's server and promtool (for the `prometheus` tests: the alert rules in deploy/,
# the /metrics text, checked by Prometheus's own code, and deploy/prometheus.yml run by a real
# Prometheus scraping the service). Takes the two binaries out of Debian's `prometheus` package
# without installing the package: no Prometheus service is set up or started.
# Usage: sudo scripts/install_prometheus.sh [DIR]   (DIR default /usr/local/bin; no-op when both are present)
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    promtool --version 2>&1 | head -1
    exit 0
fi
DIR="${1:-/usr/local/bin}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then  # package lists not fetched yet
    $SUDO apt-get update -qq
    apt-get download prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb x
$SUDO install -m 0755 x/usr/bin/promtool "$DIR/promtool"
$SUDO install -m 0755 x/usr/bin/prometheus "$DIR/prometheus"
"$DIR/promtool" --version 2>&1 | head -1
