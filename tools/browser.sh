#!/usr/bin/env bash
# Make sure a headless Chromium is there for the report page's browser tests
# (tests/browser) and tools/report_screenshot.py. Idempotent: fast when one is installed.
#
#   tools/browser.sh          # prints the browser it found or installed
#
# Order, as tools/chromium.py looks: $RDV_CHROMIUM, a Chromium on PATH, Playwright's own
# download. When none is there, it installs the distribution's package (Debian/Ubuntu
# `chromium`, through apt-get: root or sudo), else Playwright's download (its CDN).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=.venv/bin/python
# Playwright's download is ~150 MB; a CDN that is unreachable fails fast, a slow one not.
PLAYWRIGHT_INSTALL_TIMEOUT_S=600

log() { printf 'browser: %s\n' "$*" >&2; }

found() {
    "${PY}" -c 'from tools.chromium import find_chromium; print(find_chromium() or "")'
}

playwright_own() {
    # Playwright's own Chromium, when it was downloaded before.
    "${PY}" - <<'PYTHON'
import os, sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    path = p.chromium.executable_path
sys.exit(0 if os.path.exists(path) else 1)
PYTHON
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

path="$(found)"
if [[ -n "${path}" ]]; then
    log "using ${path}"
    exit 0
fi
if playwright_own; then
    log "using Playwright's own Chromium"
    exit 0
fi

# The distribution's package first where there is one: it comes with its libraries from the
# same registry as everything else, whereas Playwright's download needs its CDN (unreachable
# on machines that reach package registries only) and, as root, an apt run for its libraries.
if command -v apt-get >/dev/null; then
    log "no Chromium found; installing the distribution's chromium with apt-get"
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; then
        path="$(found)"
        if [[ -n "${path}" ]]; then
            log "using ${path}"
            exit 0
        fi
    fi
    log "apt-get gave no chromium; trying Playwright's download"
fi

deps=()
[[ "$(id -u)" == 0 ]] && deps=(--with-deps)
if timeout "${PLAYWRIGHT_INSTALL_TIMEOUT_S}" "${PY}" -m playwright install "${deps[@]}" chromium; then
    log "using Playwright's own Chromium"
    exit 0
fi

log "could not install a Chromium: install one and set RDV_CHROMIUM to its executable"
exit 1
