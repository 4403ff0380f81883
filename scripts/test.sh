#!/usr/bin/env bash
# Install (once) and run the whole test suite; arguments go to pytest:
#   ./scripts/test.sh                 # everything, e2e on real vLLM engines and agent CLIs included (about 26 minutes)
#   ./scripts/test.sh -m "not e2e"    # the fast loop: unit and integration tests (about 9 minutes)
#   ./scripts/test.sh tests/unit      # unit tests alone (about 35 s)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
./scripts/install-router.sh   # vllm-router for tests/e2e/test_fleet.py (pinned, idempotent)
# Debian packages some tests need, installed when missing and this runs as root:
#   need COMMAND PACKAGE WHAT-NEEDS-IT
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "vramgate: installing $2 (Debian package) for $3" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2") >/dev/null
  else
    echo "vramgate: $1 not found: install it (e.g. apt-get install $2), or $3 will fail" >&2
  fi
}
need promtool prometheus "the observability tests (a real Prometheus)"
# The console's browser tests drive chromium through Playwright (tests/e2e/test_console.py);
# VRAMGATE_CHROMIUM names another Chromium binary.
[ -n "${VRAMGATE_CHROMIUM:-}" ] || need chromium chromium "the web console's browser tests"
exec "${VRAMGATE_VENV:-.venv}/bin/python" -m pytest "$@"
