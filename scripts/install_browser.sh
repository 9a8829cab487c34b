#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian packages (for the `browser` tests).
# Usage: sudo scripts/install_browser.sh   (no-op when both are already installed)
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
/usr/bin/chromedriver --version
