#!/usr/bin/env bash
# The browser test (web/browser.test.mjs): headless Chromium loads examples/build_log's page and
# the go-ws wiki snippet's page. Installs what it needs when it is missing, quietly: Debian's
# `chromium` (apt-get) and playwright-core, the version pinned in web/package-lock.json, with
# `npm ci` into web/node_modules (ignored by git). Not `npx playwright install`: that downloads
# a browser of its own, which a machine of this kind cannot.
#
#   bash .ci/browser.sh
#
# Environment: CHROMIUM (default /usr/bin/chromium): a browser already installed elsewhere.
# Only the loopback interface is used.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
LOG=target/browser-install.log
mkdir -p target

# Runs "$@" with its output in $LOG, shown only if it fails.
quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        return 1
    fi
}

if [ ! -x "$CHROMIUM" ]; then
    echo "== installing chromium (Debian's package)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update once, only if the
    # first attempt fails.
    install_chromium() { $SUDO apt-get install -y -q chromium >"$LOG" 2>&1; }
    if ! install_chromium && ! { $SUDO apt-get update -q >"$LOG" 2>&1 && install_chromium; }; then
        cat "$LOG" >&2
        echo "error: could not install Debian's chromium (apt-get's output above): install it," \
            "or set CHROMIUM to a Chromium or Chrome binary" >&2
        exit 1
    fi
    if [ ! -x "$CHROMIUM" ]; then
        echo "error: chromium was installed but $CHROMIUM is not there; set CHROMIUM" >&2
        exit 1
    fi
fi
echo "browser: $("$CHROMIUM" --version 2>/dev/null)"

if ! command -v npm >/dev/null; then
    echo "error: npm is missing: install Node.js 20 or later with npm" \
        "(this machine's nodejs package brings both)" >&2
    exit 1
fi
# `npm ci` installs exactly the lockfile's version (and checks its hash); skipped when that
# version is already there.
PINNED=$(node -p 'require("./web/package-lock.json")
    .packages["node_modules/playwright-core"].version')
INSTALLED=$(node -p 'try { require("./web/node_modules/playwright-core/package.json").version }
    catch { "" }')
if [ "$INSTALLED" != "$PINNED" ]; then
    echo "== npm ci (playwright-core $PINNED)"
    quietly npm ci --prefix web --no-audit --no-fund
fi
echo "driver: playwright-core $PINNED"

cargo build --example build_log --example server
# Node 20 (the machine's) needs --experimental-websocket for the test's own publisher.
BUILD_LOG=target/debug/examples/build_log SERVER=target/debug/examples/server CHROMIUM="$CHROMIUM" \
    node --experimental-websocket --test web/browser.test.mjs
