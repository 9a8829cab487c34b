#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian packages (for the `browser` tests).
# Usage: sudo scripts/install_browser.sh   (no-op when both are already installed)
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then
    echo "chromium and chromedriver already installed"
    exit 0
fi
bash "$(dirname "$0")/apt_install.sh" chromium chromium-driver
chromium --version
/usr/bin/chromedriver --version
