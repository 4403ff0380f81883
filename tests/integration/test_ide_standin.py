"""The IDE and agent features through the real gateway, in front of stand-in engines where a fault
or a layout is needed: keep-alives while a model loads (C23) and the error event when its start
fails, output budgets (fit and reject), the FIM lane's priority, prefix affinity over replicas,
and CORS by default (C24)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest
import yaml

from tests.gateway import engine_id, standin_gateway

CONFIG = {
    "stream_keepalive": 0.5,
    "models": [
        {"name": "slow", "path": "standin:slow-start=3", "ttl": 0},
        {"name": "broken-openai", "path": "standin:fail-after=3"},
        {"name": "broken-anthropic", "path": "standin:fail-after=3"},
        {"name": "ctx", "path": "standin:context=1000", "preload": True},
        {"name": "strict", "path": "standin:context=1000", "preload": True,
         "max_tokens_policy": "reject"},
        {"name": "coder", "path": "standin:delay=0.02", "preload": True, "fim": "starcoder",
         "max_concurrency": 1, "fim_max_tokens": 9},
        {"name": "multi", "path": "standin:ok", "preload": True, "replicas": 2},
        {"name": "slow-strict", "path": "standin:slow-start=2,context=1000", "ttl": 0,
         "max_tokens_policy": "reject"},
    ],
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ide")
    with standin_gateway(tmp, CONFIG) as g:
        g.wait_states(60, done=("ready", "unloaded", "failed"))
        g.standin = tmp / "standin"
        yield g


def lines_until_done(response: httpx.Response) -> list[tuple[float, str]]:
    return [(time.monotonic(), line) for line in response.iter_lines() if line]


@pytest.mark.parametrize("route, keepalive, start", [
    ("/v1/chat/completions", ": keep-alive", "data: {"),
    ("/v1/messages", "event: ping", "event: message_start"),
])
def test_a_stream_waiting_for_its_model_gets_headers_and_keepalives(gw, route, keepalive, start):
    """C23: headers at once, a keep-alive every stream_keepalive seconds, then the tokens."""
    gw.client.post("/admin/models/slow/unload")
    t0 = time.monotonic()
    with httpx.stream("POST", gw.url + route, timeout=60,
                      json={"model": "slow", "stream": True, "max_tokens": 3,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        headers_after = time.monotonic() - t0
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        assert r.headers["content-type"] == "text/event-stream"
        lines = lines_until_done(r)
    assert headers_after < 2.5
    first = next(i for i, (_, line) in enumerate(lines) if line.startswith(start))
    pings = [line for _, line in lines[:first] if line == keepalive]
    assert len(pings) >= 3  # a slow start of 3 s at one every 0.5 s
    if route == "/v1/messages":
        assert '"type":"ping"' in lines[1][1] and lines[-1][1].endswith('"message_stop"}')
    else:
        assert lines[-1][1] == "data: [DONE]"


@pytest.mark.parametrize("route, model, error_line", [
    ("/v1/chat/completions", "broken-openai", "data: {\"error\""),
    ("/v1/messages", "broken-anthropic", "event: error")])
def test_a_start_that_fails_during_the_wait_ends_the_stream_with_the_routes_error(gw, route, model,
                                                                                   error_line):
    with httpx.stream("POST", gw.url + route, timeout=60, json={
            "model": model, "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] in (": keep-alive", "event: ping")
    errors = [i for i, line in enumerate(lines) if line.startswith(error_line)]
    assert errors and errors[-1] >= len(lines) - 2  # the last event, then the body closed
    assert "engine_start_failed" in "".join(lines) or route == "/v1/messages"
    # Known at once (the model gave up or backs off): plain JSON again, no stream committed.
    r = httpx.post(gw.url + route, timeout=30, json={
        "model": model, "stream": True, "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"


def test_a_budget_beyond_the_context_is_lowered_or_refused_as_configured(gw):
    body = {"prompt": "x", "max_tokens": 5000}
    ok = httpx.post(gw.url + "/v1/completions", json={"model": "ctx", **body}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-vramgate-max-tokens"] == "1000; requested=5000; param=max_tokens"
    last = json.loads((gw.standin / "ctx.json").read_text())["last"]
    assert last["max_tokens"] == 1000
    small = httpx.post(gw.url + "/v1/completions", json={"model": "ctx", "prompt": "x", "max_tokens": 7})
    assert "x-vramgate-max-tokens" not in small.headers
    refused = httpx.post(gw.url + "/v1/completions", json={"model": "strict", **body}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    streamed = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "ctx", "stream": True, "max_completion_tokens": 99999,
        "messages": [{"role": "user", "content": "hi"}]})
    assert streamed.headers["x-vramgate-max-tokens"] == "1000; requested=99999; param=max_completion_tokens"


def queued(gw, model: str) -> float:
    line = next(l for l in gw.client.get("/metrics").text.splitlines()
                if l.startswith(f'vramgate_requests_queued{{model="{model}"}}'))
    return float(line.rsplit(" ", 1)[1])


def wait_for(cond, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_fim_requests_go_before_queued_chat_and_get_their_budget(gw):
    order: list[str] = []

    def send(name: str, body: dict) -> None:
        r = httpx.post(gw.url + "/v1/completions", json={"model": "coder", **body}, timeout=60)
        assert r.status_code == 200, r.text
        order.append(name)

    holder = threading.Thread(target=send, args=("holder", {"prompt": "x", "max_tokens": 60}))
    holder.start()
    wait_for(lambda: json.loads((gw.standin / "coder.json").read_text())["running"] == 1)
    chat = threading.Thread(target=send, args=("chat", {"prompt": "queued first", "max_tokens": 1}))
    chat.start()
    wait_for(lambda: queued(gw, "coder") == 1)
    fim = threading.Thread(target=send, args=("fim", {"prompt": "def f(", "suffix": "):"}))
    fim.start()
    wait_for(lambda: queued(gw, "coder") == 2)
    for t in (holder, chat, fim):
        t.join()
    arrived = json.loads((gw.standin / "coder.json").read_text())["prompts"][-3:]
    # The FIM request, queued later, reached the engine first.
    assert arrived == ["x", "<fim_prefix>def f(<fim_suffix>):<fim_middle>", "queued first"]
    assert sorted(order) == ["chat", "fim", "holder"]
    r = httpx.post(gw.url + "/v1/completions", timeout=30,
                   json={"model": "coder", "prompt": "a", "suffix": "b"})
    sent = json.loads((gw.standin / "coder.json").read_text())["last"]
    assert sent["prompt"] == "<fim_prefix>a<fim_suffix>b<fim_middle>" and "suffix" not in sent
    assert sent["max_tokens"] == 9 and r.json()["choices"][0]["text"].count(" w") == 9


def replica_counts(gw) -> dict[str, int]:
    ports = [engine_id(r["url"]) for r in gw.client.get("/v1/models/multi").json()["replicas"]]
    return {p: json.loads((gw.standin / f"multi@{p}.json").read_text())["completed"] for p in ports}


def test_requests_sharing_a_prefix_go_to_one_replica(gw):
    before = replica_counts(gw)
    head = "You are a careful coding assistant. " * 20
    for i in range(6):
        httpx.post(gw.url + "/v1/completions", timeout=30,
                   json={"model": "multi", "prompt": head + f"question {i}", "max_tokens": 1})
    after = replica_counts(gw)
    assert sorted(after[p] - before[p] for p in after) == [0, 6]
    for i in range(16):  # different prefixes spread over both
        httpx.post(gw.url + "/v1/completions", timeout=30,
                   json={"model": "multi", "prompt": f"{i} " * 50, "max_tokens": 1})
    spread = replica_counts(gw)
    assert all(spread[p] > after[p] for p in spread)


def test_cors_by_default_on_every_api_route(gw):
    """C24: no cors_origins configured; a local origin gets 204 with the allow headers."""
    ask = {"origin": "http://localhost:5173", "access-control-request-method": "POST",
           "access-control-request-headers": "authorization,content-type,x-stainless-os,x-stainless-lang"}
    for path in ("/v1/chat/completions", "/v1/models", "/v1/messages", "/infill"):
        r = httpx.options(gw.url + path, headers=ask)
        assert r.status_code == 204, path
        assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "x-stainless-os" in r.headers["access-control-allow-headers"]
    evil = httpx.options(gw.url + "/v1/chat/completions", headers={**ask, "origin": "https://evil.example"})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    listed = httpx.get(gw.url + "/v1/models", headers={"origin": "http://127.0.0.1:3000"})
    assert listed.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"


def test_a_stream_waiting_for_room_still_gets_a_plain_503(tmp_path):
    """C13: no room for a second model while the first streams: the waiting stream is not
    committed (no engine is loading), so the refusal is a 503 with Retry-After, as JSON."""
    models = [{"name": "x", "path": "standin:delay=0.2"}, {"name": "y", "path": "standin:ok"}]
    with standin_gateway(tmp_path, {"models": models, "max_loaded_models": 1,
                                    "place_wait_timeout": 2, "stream_keepalive": 0.5}) as g:
        g.wait_up()
        assert g.client.post("/v1/completions", json={"model": "x", "prompt": "a",
                                                       "max_tokens": 1}).status_code == 200
        holder = threading.Thread(target=lambda: httpx.post(
            g.url + "/v1/completions", timeout=60, json={"model": "x", "prompt": "a", "max_tokens": 40}))
        holder.start()
        wait_for(lambda: json.loads((tmp_path / "standin" / "x.json").read_text())["running"] == 1)
        r = httpx.post(g.url + "/v1/chat/completions", timeout=30, json={
            "model": "y", "stream": True, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        holder.join()
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "model_unavailable"


def test_an_engine_error_after_the_wait_keeps_its_type_and_param(gw):
    """The engine refuses the request once it is up: the stream's error event says what the
    engine said (400, invalid_request_error, the param), not a server error."""
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "slow-strict", "stream": True, "max_tokens": 5000,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == ": keep-alive"
    error = json.loads(lines[-1][6:])["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "max_tokens"), error


def test_a_stream_that_hangs_up_during_the_wait_is_a_499(gw):
    gw.client.post("/admin/models/slow/unload")
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "slow", "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert next(r.iter_lines()) == ": keep-alive"
    wait_for(lambda: 'vramgate_requests_in_flight{model="slow"} 0.0' in gw.client.get("/metrics").text)
    wait_for(lambda: re.search(r"route=/v1/chat/completions model=slow status=499", gw.log_text()))


def test_infill_warm_up_and_the_keys_own_model(gw):
    r = httpx.post(gw.url + "/infill", json={"model": "coder", "input_prefix": "a", "n_predict": 0})
    assert r.status_code == 200 and r.json()["content"] == "" and r.json()["tokens_predicted"] == 0
    assert json.loads((gw.standin / "coder.json").read_text())["last"]["max_tokens"] == 1
    r = httpx.post(gw.url + "/infill", json={"model": "coder", "input_prefix": "a", "prompt": "b",
                                             "input_suffix": "c", "n_predict": 2})
    sent = json.loads((gw.standin / "coder.json").read_text())["last"]["prompt"]
    assert sent == "<fim_prefix>a<fim_suffix>c<fim_middle>b"  # llama.cpp: prompt after the middle


def test_a_crashed_replica_restarts_beside_the_one_that_serves(gw):
    reps = gw.client.get("/v1/models/multi").json()["replicas"]
    guard = reps[0]["pid"]  # the engine's guard process
    engine = json.loads((gw.standin / f"multi@{engine_id(reps[0]['url'])}.json").read_text())["pid"]
    os.kill(guard, signal.SIGKILL)  # the guard dies; its engine must not live on
    wait_for(lambda: not psutil.pid_exists(engine) or psutil.Process(engine).status() == "zombie")
    wait_for(lambda: [r["state"] for r in gw.client.get("/v1/models/multi").json()["replicas"]]
             [0] == "unloaded")

    def both_ready() -> bool:
        httpx.post(gw.url + "/v1/completions", json={"model": "multi", "prompt": "x", "max_tokens": 1})
        states = [r["state"] for r in gw.client.get("/v1/models/multi").json()["replicas"]]
        return states == ["ready", "ready"]
    wait_for(both_ready, timeout=30)  # after the first failure's back-off of 2 s


def test_a_model_removed_while_requests_wait_for_it_starts_no_engine(tmp_path):
    models = [{"name": "keep", "path": "standin:ok", "preload": True},
              {"name": "gone", "path": "standin:slow-start=3"}]
    with standin_gateway(tmp_path, {"models": models}) as g:
        g.wait_states(30, done=("ready", "unloaded"))
        out: list[int] = []
        waiter = threading.Thread(target=lambda: out.append(httpx.post(
            g.url + "/v1/completions", timeout=60,
            json={"model": "gone", "prompt": "x", "max_tokens": 1}).status_code))
        waiter.start()
        wait_for(lambda: g.states()["gone"] == "loading")
        # "loading" is set before the engine's process starts: wait for the start itself, so that
        # the removal below always meets a starting engine, not one still being placed
        wait_for(lambda: "starting engine for gone#0" in g.log_text())
        cfg = tmp_path / "config.yaml"
        doc = yaml.safe_load(cfg.read_text())
        doc["models"] = [models[0]]
        cfg.write_text(yaml.safe_dump(doc))
        assert g.client.post("/admin/reload").status_code == 200
        waiter.join()
        assert out == [404]
        wait_for(lambda: "gone" not in g.states())

        def gone_processes() -> list[int]:
            out = []
            for pid in g.descendants():
                try:
                    if "gone" in psutil.Process(pid).cmdline():
                        out.append(pid)
                except psutil.Error:
                    pass
            return out
        wait_for(lambda: gone_processes() == [])
        assert g.log_text().count("starting engine for gone#0") == 1
