"""No engine process outlives its engine's end, or its gateway: the stand-in forks a child the way
vLLM's API server runs its ``EngineCore``, and the tests SIGKILL the guard and the API server
together, or the gateway itself."""

from __future__ import annotations

import json
import os
import signal

from tests.gateway import Gateway, alive, describe, standin_gateway, wait_for

CONFIG = {"models": [{"name": "grp", "path": "standin:ok,fork-core", "ttl": 0}]}


def engine_pids(gw: Gateway) -> tuple[int, int, int]:
    """The guard's, the API server's and its forked core's pids."""
    guard = gw.client.get("/v1/models/grp").json()["replicas"][0]["pid"]
    stats = json.loads((gw.tmp / "standin" / "grp.json").read_text())
    return guard, stats["pid"], stats["core_pid"]


def test_killing_a_guard_and_its_engine_leaves_nothing_of_its_group(tmp_path):
    with standin_gateway(tmp_path, CONFIG) as gw:
        gw.wait_up()
        assert gw.client.post("/v1/completions", json={"model": "grp", "prompt": "x",
                                                       "max_tokens": 1}).status_code == 200
        guard, server, core = engine_pids(gw)
        assert alive(core) and os.getpgid(core) == guard
        os.kill(guard, signal.SIGKILL)
        os.kill(server, signal.SIGKILL)
        # The gateway counts the engine gone only once its whole group is.
        assert wait_for(lambda: gw.states()["grp"] in ("failed", "unloaded"), 20)
        assert not alive(core), describe([core])
        assert "exited with status" in gw.log_text()
        # The replacement: started by the next request after the back-off.
        assert wait_for(lambda: gw.client.post("/v1/completions", json={
            "model": "grp", "prompt": "x", "max_tokens": 1}).status_code == 200, 20)
        assert engine_pids(gw)[2] != core


def test_a_gateway_killed_outright_has_its_engines_reaped_by_the_next_one(tmp_path):
    first = standin_gateway(tmp_path, CONFIG)
    try:
        first.wait_up()
        assert first.client.post("/v1/completions", json={"model": "grp", "prompt": "x",
                                                          "max_tokens": 1}).status_code == 200
        left = list(engine_pids(first))
        first.stop(signal.SIGKILL)  # no clean-up: its engines live on
        assert all(alive(p) for p in left), describe(left)
        with standin_gateway(tmp_path, CONFIG) as second:  # the same data dir
            second.wait_up()
            assert wait_for(lambda: not any(alive(p) for p in left), 20), describe(left)
            assert "reaping" in second.log_text()
    finally:
        for pid in [p for p in locals().get("left", []) if alive(p)]:
            os.kill(pid, signal.SIGKILL)
