#!/usr/bin/env bash
# Install the router that goes in front of a vramgate fleet (README "Scaling out"; driven by
# tests/e2e/test_fleet.py): vllm-router (vllm-project/router, Rust, from PyPI) at a pinned version,
# in its own virtualenv $DIR/vllm-router, its command $DIR/vllm-router/bin/vllm-router. Chosen by
# loadtest/routers.py (results in loadtest/results/routers.md). Idempotent: a router already
# installed at the pin is kept (a second run takes well under a second).
#
#   VRAMGATE_ROUTERS_DIR  where it goes (default: ~/.cache/vramgate/routers)
#   PYTHON                the interpreter for its virtualenv (default: python3)
# First install: about 20 s and 130 MB (one 24 MB wheel and its few Python dependencies).
set -euo pipefail
DIR=${VRAMGATE_ROUTERS_DIR:-$HOME/.cache/vramgate/routers}
SPEC=vllm-router==0.1.17
prefix=$DIR/vllm-router
[[ -x $prefix/bin/vllm-router && "$(cat "$prefix/.pinned" 2>/dev/null)" == "$SPEC" ]] && exit 0
echo "install-router: $SPEC into $prefix" >&2
rm -rf "$prefix"
start=$(date +%s)
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "$SPEC" >&2
echo $(( $(date +%s) - start )) > "$prefix/.install-seconds"
echo "$SPEC" > "$prefix/.pinned"
