#!/usr/bin/env sh
# Debian's Chromium and its WebDriver for the browser tests of `echo-stream web` (tests/test_web.py),
# and espeak-ng, the offline TTS the page speaks typed sentences with (its test skips without it).
# Installed from the system's apt sources only when absent; nothing is downloaded from anywhere else.
# Skipped (with a line saying so) where apt-get is not available: those tests then skip with a reason.
set -e
PKGS=""
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || PKGS="chromium chromium-driver"
command -v espeak-ng >/dev/null 2>&1 || PKGS="$PKGS espeak-ng"
if [ -z "$PKGS" ]; then
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
echo ">> installing Debian's $PKGS (apt) for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
$SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null; } \
    || echo ">> apt-get could not install $PKGS: the tests that need them will be skipped" >&2
