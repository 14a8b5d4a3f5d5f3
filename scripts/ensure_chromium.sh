#!/usr/bin/env sh
# Debian's Chromium and its WebDriver for the browser tests of `echo-stream web` (tests/test_web.py).
# Installed from the system's apt sources only when absent; nothing is downloaded from anywhere else.
# Skipped (with a line saying so) where apt-get is not available: those tests then skip with a reason.
set -e
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo ">> no apt-get here: the browser tests (tests/test_web.py) will be skipped" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo ">> not root and no sudo: cannot install chromium; the browser tests will be skipped" >&2
        exit 0
    fi
fi
echo ">> installing Debian's chromium + chromium-driver (apt) for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; } \
    || echo ">> apt-get could not install chromium: the browser tests will be skipped" >&2
