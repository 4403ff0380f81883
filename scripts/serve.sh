#!/usr/bin/env bash
# Install (once; later runs take about a second) and run the server. Arguments go to `vramgate serve`:
#   ./scripts/serve.sh                      # the embedded models on http://127.0.0.1:8000/v1
#   ./scripts/serve.sh --config my.yaml --port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec "${VRAMGATE_VENV:-.venv}/bin/vramgate" serve "$@"
