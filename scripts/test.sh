#!/usr/bin/env bash
# Install (once) and run the whole test suite; arguments go to pytest:
#   ./scripts/test.sh                 # everything, e2e on real vLLM engines and agent CLIs included (about 20 minutes)
#   ./scripts/test.sh -m "not e2e"    # the fast loop: unit and integration tests (about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
./scripts/install-router.sh   # vllm-router for tests/e2e/test_fleet.py (pinned, idempotent)
# The observability tests run a real Prometheus (Debian's package: prometheus and promtool).
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "vramgate: installing Prometheus (Debian package) for the tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null
  else
    echo "vramgate: promtool/prometheus not found: install Prometheus (e.g. apt-get install prometheus)" >&2
    echo "          or the observability tests will fail" >&2
  fi
fi
exec "${VRAMGATE_VENV:-.venv}/bin/python" -m pytest "$@"
