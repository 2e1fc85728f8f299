#!/usr/bin/env bash
# deploy/local/chromium.sh - a headless browser for the dashboard's tests.
#
# Installs Debian's chromium with apt-get if no Chromium is on PATH (the dashboard's
# end-to-end test drives it over the DevTools protocol; tests/integration/browser.py).
# Nothing runs in the background: each test starts its own browser.
#
#   chromium.sh install   install if needed; print the browser's path and version
#   chromium.sh status    exit 0 if a Chromium is on PATH (print it), 3 if not
#
# Environment:
#   CONFIGBUS_CHROMIUM   the browser to use instead of the first of chromium,
#                        chromium-browser, google-chrome on PATH
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=chromium.sh
# shellcheck source=deploy/local/lib.sh
source "$HERE/lib.sh"

find_browser() {
    local name
    for name in ${CONFIGBUS_CHROMIUM:-chromium chromium-browser google-chrome google-chrome-stable}; do
        if command -v "$name" >/dev/null; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

# Debian's /usr/bin/chromium is a shell wrapper that may print a harmless shell
# warning first: the version is the line that names the browser.
version() { "$1" --version 2>/dev/null | grep -i -m1 -E 'chrom(e|ium)' || echo "(version unknown)"; }

cmd_install() {
    local browser started=$SECONDS
    if ! browser="$(find_browser)"; then
        apt_install chromium chromium
        browser="$(find_browser)" || die "chromium not on PATH after installing it"
        log "installed in $((SECONDS - started))s"
    fi
    echo "$browser: $(version "$browser")"
}

cmd_status() {
    local browser
    if browser="$(find_browser)"; then
        echo "$browser: $(version "$browser")"
    else
        echo "no chromium on PATH"
        return 3
    fi
}

case "${1:-}" in
install) cmd_install ;;
status) cmd_status ;;
*)
    echo "usage: $0 install | status" >&2
    exit 2
    ;;
esac
