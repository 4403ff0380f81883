#!/usr/bin/env bash
# Install the agent CLIs the e2e suite drives (tests/e2e/test_agent_clients.py), at pinned versions,
# each in its own prefix: npm packages under $DIR/npm/<name>, PyPI ones in a virtualenv $DIR/py/<name>.
# Idempotent and cached between runs: a client already installed at its pinned version is kept.
#
#   VRAMGATE_CLIENTS_DIR  where they go (default: ~/.cache/vramgate/clients)
#   PYTHON                the interpreter for the PyPI clients' virtualenvs (default: python3)
#
#   ./scripts/install-clients.sh                 # all six
#   ./scripts/install-clients.sh claude codex    # some
# First install on 2 cores: about 2 minutes and 2.1 GB (aider alone 1 min and 690 MB).
set -euo pipefail
DIR=${VRAMGATE_CLIENTS_DIR:-$HOME/.cache/vramgate/clients}
PY=${PYTHON:-python3}
declare -A NPM=([claude]=@anthropic-ai/claude-code@2.1.332 [codex]=@openai/codex@0.171.0
                [cn]=@continuedev/cli@1.5.47 [cline]=cline@3.0.65)
declare -A PIP=([aider]=aider-chat==0.86.2 [llm]=llm==0.36)
declare -A BIN=([claude]=claude [codex]=codex [cn]=cn [cline]=cline [aider]=aider [llm]=llm)
for name in ${*:-claude codex cn cline aider llm}; do
  if [[ -n "${NPM[$name]:-}" ]]; then
    prefix=$DIR/npm/$name want=${NPM[$name]} exe=$prefix/node_modules/.bin/${BIN[$name]}
  elif [[ -n "${PIP[$name]:-}" ]]; then
    prefix=$DIR/py/$name want=${PIP[$name]} exe=$prefix/bin/${BIN[$name]}
  else
    echo "install-clients: unknown client $name" >&2; exit 2
  fi
  [[ -x $exe && "$(cat "$prefix/.pinned" 2>/dev/null)" == "$want" ]] && continue
  echo "install-clients: $want into $prefix" >&2
  rm -rf "$prefix"
  if [[ -n "${NPM[$name]:-}" ]]; then
    mkdir -p "$prefix"
    npm install --prefix "$prefix" --no-fund --no-audit --loglevel=error "$want" >&2
  else
    "$PY" -m venv "$prefix"
    "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "$want" >&2
  fi
  echo "$want" > "$prefix/.pinned"
done
