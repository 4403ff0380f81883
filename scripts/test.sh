#!/usr/bin/env bash
# Install (once) and run the whole test suite; arguments go to pytest:
#   ./scripts/test.sh                 # everything, e2e on real vLLM engines included (a few minutes)
#   ./scripts/test.sh -m "not e2e"    # the fast loop: unit and integration tests (about 20 seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec "${VRAMGATE_VENV:-.venv}/bin/python" -m pytest "$@"
