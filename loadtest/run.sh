#!/usr/bin/env bash
# One command per benchmark, from a fresh clone (installs what it needs first):
#   ./loadtest/run.sh overhead [--concurrency 1,4,16,64 ...]   the same vLLM engine direct vs through the gateway
#   ./loadtest/run.sh ceiling  [--requests 2000 ...]           gateway vs LiteLLM's proxy on an instant engine, per core
#   ./loadtest/run.sh sidebyside --baseline COMMIT|floor|floor-uds|dir:PATH   this gateway and a baseline loaded at once: A/B per core
#   ./loadtest/run.sh lane     [--levels 1,8 --requests 24]     FIM TTFT beside chat streams, with and without the lane
#   ./loadtest/run.sh cancel   [--runs 10]                      how fast a hung-up stream stops at the engine
#   ./loadtest/run.sh batch    [--requests 48 --lines 2000]     interactive TTFT with and without a batch on the same engine
#   ./loadtest/run.sh fleet    [--seeds 1,2,3,4,5 --events 10000]  placement pack vs spread on 8 simulated GPUs, 20 models
#   ./loadtest/run.sh routers  [--pairs 300 --requests 1000]    vllm-router vs LiteLLM vs production-stack in front of two nodes
#   ./loadtest/run.sh streams  [--levels 1000,5000]             N streams open through the gateway at once (instant engine)
#   ./loadtest/run.sh soak     [--seconds 3600]                 an hour of mixed load: RSS growth and gauges back at 0
#   ./loadtest/run.sh peers    [--rounds 3]                     vllm bench serve and guidellm, direct vs through the gateway
#   ./loadtest/run.sh ttftgap  [--levels 64,256]                the TTFT gap under load: arrival order or gateway delay
#   ./loadtest/run.sh loadgen  --url URL --model M [...]        sweep any OpenAI-compatible server
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:?usage: loadtest/run.sh overhead|ceiling|sidebyside|lane|cancel|batch|fleet|routers|streams|soak|peers|ttftgap|loadgen [options]}"
shift
./scripts/install.sh
PY="${VRAMGATE_VENV:-.venv}/bin/python"
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q -e ".[loadtest]"
case "$what" in
  overhead|ceiling|sidebyside|lane|cancel|batch|fleet|routers|streams|soak|peers|ttftgap|loadgen) exec "$PY" -m "loadtest.$what" "$@" ;;
  *) echo "unknown benchmark: $what (overhead, ceiling, sidebyside, lane, cancel, batch, fleet, routers, streams, soak, peers, ttftgap or loadgen)" >&2; exit 2 ;;
esac
