"""The sleep tier through the lifecycle against the stand-in on a simulated GPU: a slow wake shared
by many requests, level 2, SIGTERM and unloads while sleeping or waking, a reload, the ttl, and
what admin and metrics show. From a review that tried to break it (issue #13 §4)."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import yaml

from tests.gateway import wait_for, wait_gone
from tests.integration.test_sleep_tier import ask, metric, replica, run, sleeper, stats


def chat(gw, model="s", **kw):
    return httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], **kw})


def asleep(gw, name="s"):
    return wait_for(lambda: gw.states()[name] == "sleeping", 30)


def put_to_sleep(gw, tmp_path) -> int:
    """Start s, use it once and wait until it sleeps; returns its engine's pid."""
    assert gw.wait_states(60) == {"s": "ready"}
    ask(gw, "s")
    assert asleep(gw)
    return stats(tmp_path, "s")["pid"]


def test_many_requests_during_a_slow_wake_share_one_wake(tmp_path):
    with run(tmp_path, [sleeper("s", path="standin:slow-wake=2", preload=True)]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        ask(gw, "s")
        assert asleep(gw)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: chat(gw), range(8)))
        assert [r.status_code for r in got] == [200] * 8, [r.text for r in got]
        assert all(r.json()["choices"][0]["message"]["content"] == " w0 w1 w2" for r in got)
        st = stats(tmp_path, "s")
        assert st["wakes"] == 1 and st["wake_calls"] == 1, st
        assert metric(gw, "vramgate_engine_wakes_total", model="s") == 1
        assert metric(gw, "vramgate_engine_starts_total", model="s") == 1


def test_level_2_wake_reloads_weights(tmp_path):
    with run(tmp_path, [sleeper("s", preload=True, sleep_level=2)]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        ask(gw, "s")
        assert asleep(gw)
        assert replica(gw, "s")["placement"]["host_bytes"] == 0
        assert stats(tmp_path, "s")["weights_valid"] is False
        assert ask(gw, "s").choices[0].message.content == " w0 w1 w2"
        st = stats(tmp_path, "s")
        assert st["reloads"] == 1 and st["weights_valid"] and st["wakes"] == 1, st


def test_sigterm_during_a_slow_wake_leaves_no_engine(tmp_path):
    gw = run(tmp_path, [sleeper("s", path="standin:slow-wake=5", preload=True)])
    with gw:
        pid = put_to_sleep(gw, tmp_path)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(chat, gw)
            assert wait_for(lambda: stats(tmp_path, "s")["wake_calls"] == 1, 20)
            t0 = time.monotonic()
            rc = gw.stop(signal.SIGTERM)
            assert rc in (0, -signal.SIGTERM) and time.monotonic() - t0 < 30
            assert "Application shutdown complete" in gw.log_text()
            try:
                fut.result(30)
            except httpx.HTTPError:
                pass
        assert wait_gone([pid], 10) == []


def test_sigterm_while_sleeping_leaves_no_engine(tmp_path):
    gw = run(tmp_path, [sleeper("s", preload=True)])
    with gw:
        pid = put_to_sleep(gw, tmp_path)
        assert gw.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gw.log_text()
        assert wait_gone([pid], 10) == []


def test_unload_during_a_slow_wake(tmp_path):
    with run(tmp_path, [sleeper("s", path="standin:slow-wake=3", preload=True)]) as gw:
        pid = put_to_sleep(gw, tmp_path)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(chat, gw)
            assert wait_for(lambda: stats(tmp_path, "s")["wake_calls"] == 1, 20)
            r = gw.client.post("/admin/models/s/unload", timeout=60)
            assert r.status_code == 200, r.text
            assert wait_gone([pid], 10) == []
            got = fut.result(60)
        # the waiting request loads the model again (unload's documented behaviour)
        assert got.status_code == 200, got.text
        assert stats(tmp_path, "s")["pid"] != pid


def test_force_unload_while_sleeping_and_reload_while_sleeping(tmp_path):
    with run(tmp_path, [sleeper("s", preload=True), sleeper("t", preload=True)]) as gw:
        gw.wait_states(60, ("ready", "sleeping"))
        ask(gw, "s")
        ask(gw, "t")
        assert asleep(gw, "s") and asleep(gw, "t")
        s_pid, t_pid = stats(tmp_path, "s")["pid"], stats(tmp_path, "t")["pid"]
        r = gw.client.post("/admin/models/s/unload?force=true", timeout=60)
        assert r.status_code == 200, r.text
        assert wait_gone([s_pid], 10) == [] and gw.states()["s"] == "unloaded"
        # reload: t's memory changes -> restart of a sleeping engine
        cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
        cfg["models"][1]["memory"] = "7GiB"
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        r = gw.client.post("/admin/reload", timeout=60)
        assert r.status_code == 200, r.text
        assert wait_gone([t_pid], 10) == []
        assert wait_for(lambda: gw.states()["t"] in ("ready", "sleeping"), 30), gw.states()
        assert ask(gw, "t").choices[0].message.content == " w0 w1 w2"
        assert ask(gw, "s").choices[0].message.content == " w0 w1 w2"


def test_ttl_unloads_a_sleeping_engine(tmp_path):
    with run(tmp_path, [sleeper("s", preload=True, ttl=3)]) as gw:
        pid = put_to_sleep(gw, tmp_path)
        assert wait_for(lambda: gw.states()["s"] == "unloaded", 20), gw.states()
        assert wait_gone([pid], 10) == []
        assert metric(gw, "vramgate_engine_stops_total", model="s", reason="idle") == 1


def test_admin_and_metrics_for_a_sleeping_replica(tmp_path):
    with run(tmp_path, [sleeper("s", preload=True)]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        ask(gw, "s")
        assert asleep(gw)
        models = gw.client.get("/admin/models").json()["data"]
        (m,) = [m for m in models if m["id"] == "s"]
        r = m["replicas"][0]
        assert r["state"] == "sleeping" and r["pid"] and r["placement"]["host_bytes"] > 0, r
        assert metric(gw, "vramgate_model_state", model="s", state="ready") == 0
        # a sleeping engine is a running process that max_loaded_models counts
        assert metric(gw, "vramgate_engines_loaded") == 1, "a sleeping engine not counted as loaded"
