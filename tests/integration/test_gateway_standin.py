"""The gateway as a real process on loopback, in front of stand-in engines that misbehave on demand."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest
import yaml

from tests.gateway import Gateway, alive, describe, engine_client, standin_gateway, wait_for, wait_gone


def standin(name: str, mode: str = "ok", **extra) -> dict:
    return {"name": name, "path": f"standin:{mode}", "preload": True, **extra}


CONFIG = {
    "models": [
        standin("echo", aliases=["small"]),
        standin("emb", task="embed"),
        standin("slow", "delay=0.2"),
        standin("crashy", "crash-mid-stream"),
        standin("halfway", "crash-mid-event"),
        standin("halfway2", "crash-mid-event"),
        standin("crlf", "crlf"),
        standin("broken", "fail-start"),
        standin("stuck", "hang-start", startup_timeout=3),
    ],
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("gw"), CONFIG) as gateway:
        gateway.wait_states(60)
        yield gateway


def stats(gw: Gateway, name: str) -> dict:
    return json.loads((gw.tmp / "standin" / f"{name}.json").read_text())


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-100:]
    return raw[:-2].split(b"\n\n")


def test_the_access_log_can_be_off_and_a_reload_turns_it_on(tmp_path):
    """``access_log: false``: no line for any request (inference or not), the metrics still
    count; a reload with it true brings the lines back (behind an ingress that logs, the line
    is CPU spent twice: loadtest/README.md)."""
    config = {"access_log": False, "models": [standin("quiet")]}
    with standin_gateway(tmp_path, config) as g:
        g.wait_states(30)
        requests = 'vramgate_requests_total{model="quiet",route="/v1/chat/completions",status_class="2xx"}'
        assert g.client.post("/v1/chat/completions", json=chat("quiet", max_tokens=2),
                             headers={"x-request-id": "off-1"}).status_code == 200
        assert g.client.get("/v1/models", headers={"x-request-id": "off-2"}).status_code == 200
        assert metric(g, requests) == 1
        config["access_log"] = True
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "engine_module":
                                                              "tests.standin_engine"}))
        assert g.client.post("/admin/reload").status_code == 200
        assert g.client.post("/v1/chat/completions", json=chat("quiet", max_tokens=2),
                             headers={"x-request-id": "on-1"}).status_code == 200
        assert wait_for(lambda: "request_id=on-1" in g.log_text())
        assert "request_id=off-" not in g.log_text()  # lines go out in order: none came before


def test_no_access_log_flag_and_variable_override_the_config(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from server import cli
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"models": [standin("x")]}))
    seen = []
    monkeypatch.setattr(cli, "run_gateway", lambda create, settings, reload, level, **_: seen.append(
        (settings.access_log, reload().access_log)))
    for args, env in (([], {}), (["--no-access-log"], {}), ([], {"VRAMGATE_ACCESS_LOG": "false"}),
                      (["--access-log"], {"VRAMGATE_ACCESS_LOG": "false"})):
        res = CliRunner().invoke(cli.main, ["serve", "--config", str(cfg), *args], env=env)
        assert res.exit_code == 0, res.output
    assert seen == [(True, True), (False, False), (False, False), (True, True)]


def metric(gw: Gateway, name: str) -> float:
    text = gw.client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def series_count(gw: Gateway) -> int:
    text = gw.client.get("/metrics").text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_states_after_start(gw):
    states = gw.states()
    assert states == {"echo": "ready", "emb": "ready", "slow": "ready", "crashy": "ready",
                      "halfway": "ready", "halfway2": "ready", "crlf": "ready", "broken": "failed",
                      "stuck": "failed"}


def test_failed_start_answers_503_with_cause_and_leaves_no_process(gw):
    for model, needle in (("broken", "CUDA out of memory, simulated"), ("stuck", "not ready after 3")):
        r = gw.client.post("/v1/chat/completions", json=chat(model))
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "engine_start_failed" and needle in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert not alive(stats(gw, model)["pid"])
    listed = {m["id"]: m for m in gw.client.get("/v1/models").json()["data"]}
    assert listed["broken"]["state"] == "failed" and "simulated" in listed["broken"]["error"]


def test_stream_is_relayed_byte_for_byte(gw):
    body = chat("echo", stream=True, max_tokens=5)
    address = stats(gw, "echo")["address"]
    assert address.startswith("unix:")  # the default engine_transport
    with engine_client(address) as engine:
        direct = engine.post("/v1/chat/completions", json=body)
    with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        relayed = b"".join(r.iter_raw())
    assert relayed == direct.content
    events = sse_events(relayed)
    assert events.count(b"data: [DONE]") == 1 and events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") and b"\r" not in e for e in events)


@pytest.mark.parametrize("include_usage", [False, True])
def test_an_engine_that_ends_its_lines_with_crlf_is_relayed_whole(gw, include_usage):
    """The SSE standard lets a server end its lines with CRLF: every event is relayed as written
    (``"usage":null`` added where asked), the stream ends with its own ``[DONE]`` and no error
    event, and its tokens are counted (a break-it pass had such a stream forwarded as nothing)."""
    from openai import OpenAI

    body = chat("crlf", stream=True, max_tokens=4,
                **({"stream_options": {"include_usage": True}} if include_usage else {}))
    tokens = 'vramgate_tokens_total{kind="completion",model="crlf"}'
    itl = 'vramgate_inter_token_latency_seconds_count{model="crlf"}'
    before, itl_before = metric(gw, tokens), metric(gw, itl)
    raw = gw.client.post("/v1/chat/completions", json=body).content
    events = raw.split(b"\r\n\r\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]" and b"error" not in raw
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == " w0 w1 w2 w3"
    assert all(c["usage"] is None for c in chunks if c["choices"]) if include_usage else \
        all("usage" not in c for c in chunks)
    client = OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="crlf", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        if c.choices)
    assert text == " w0 w1 w2"
    assert metric(gw, tokens) - before == 7 and metric(gw, itl) - itl_before == 3 + 2


@pytest.mark.parametrize("stream", [False, True])
def test_server_timing_says_how_long_the_request_was_in_the_gateway(gw, stream):
    """``Server-Timing: gateway;dur=MS``: arrival at the handler to the hand-over to the engine,
    which a client can set beside its own TTFT (loadtest/README.md measures it under load)."""
    import re as _re

    r = gw.client.post("/v1/chat/completions", json=chat("echo", stream=stream, max_tokens=2),
                       headers={"origin": "http://localhost:5173"})
    found = _re.fullmatch(r"gateway;dur=(\d+\.\d{3})", r.headers["server-timing"])
    assert r.status_code == 200 and found, r.headers.get("server-timing")
    assert 0 < float(found.group(1)) < 1000
    assert "server-timing" in r.headers["access-control-expose-headers"]  # a browser may read it


def test_include_usage_gives_null_usage_then_one_usage_chunk(gw):
    body = chat("echo", stream=True, max_tokens=4, stream_options={"include_usage": True})
    events = sse_events(gw.client.post("/v1/chat/completions", json=body).content)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_alias_reaches_the_engine_as_its_served_name(gw):
    r = gw.client.post("/v1/chat/completions", json=chat("small", max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "echo"
    assert gw.client.get("/v1/models/small").json()["id"] == "echo"


def test_engine_error_is_relayed_in_the_envelope(gw):
    r = gw.client.post("/v1/completions", json={"model": "echo", "prompt": "x", "max_tokens": 5000})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "max_tokens too large", "type": "invalid_request_error",
                                  "param": "max_tokens", "code": None}}


def test_crash_mid_stream_ends_with_one_error_event(gw):
    with gw.client.stream("POST", "/v1/chat/completions", json=chat("crashy", stream=True)) as r:
        raw = b"".join(r.iter_raw())
    events = sse_events(raw)
    assert b"data: [DONE]" not in events
    errors = [json.loads(e[6:]) for e in events if b'"error"' in e]
    assert len(errors) == 1 and events[-1] == b"data: " + json.dumps(
        errors[0], separators=(",", ":")).encode()
    assert errors[0]["error"]["code"] in ("engine_stream_failed", "engine_stream_incomplete")
    deadline = time.monotonic() + 10
    while gw.states()["crashy"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw.states()["crashy"] == "failed"
    r = gw.client.post("/v1/chat/completions", json=chat("crashy"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"


@pytest.mark.parametrize("include_usage", [False, True])
def test_engine_dying_mid_event_never_sends_half_an_event(gw, include_usage):
    body = chat("halfway2" if include_usage else "halfway", stream=True,
                **({"stream_options": {"include_usage": True}} if include_usage else {}))
    with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = b"".join(r.iter_raw())
    events = sse_events(raw)
    for event in events:  # every event is whole JSON: the half one was dropped
        assert event.startswith(b"data: ")
        json.loads(event[6:])
    assert b'"error"' in events[-1] and b"choi" not in raw.replace(b'"choices"', b"")


def test_odd_text_in_errors_is_still_json(gw):
    r = gw.client.post("/v1/chat/completions", content=b'{"model": "\\ud800", "messages": '
                       b'[{"role": "user", "content": "x"}]}', headers={"content-type": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    deep = b'{"model": "echo", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    r = gw.client.post("/v1/chat/completions", content=deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", chat("no-such-model")),
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
    ("/v1/embeddings", {"model": "no-such-model", "input": "hi"}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_and_adds_no_series(gw, route, body, stream):
    before = series_count(gw)
    r = gw.client.post(route, json={**body, "stream": stream} if route != "/v1/embeddings" else body)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert err["param"] == "model"
    assert series_count(gw) == before


@pytest.mark.parametrize("messages", ["missing", None, [], [{"role": "user"}], "text"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_messages_are_400_before_any_engine_work(gw, messages, stream):
    started = stats(gw, "echo")["started"]
    body = {"model": "echo", "stream": stream}
    if messages != "missing":
        body["messages"] = messages
    r = gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("messages")
    assert stats(gw, "echo")["started"] == started


def test_malformed_and_missing_model_are_400(gw):
    r = gw.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = gw.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = gw.client.post("/v1/embeddings", json={"model": "echo", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


@pytest.mark.parametrize("path", ["/v1//chat/completions", "/v1/chat/completions/",
                                  "/V1/chat/completions", "/invocations", "/tokenize", "/sleep",
                                  "/v1/chat/completions/../../tokenize", "/pooling"])
def test_only_defined_routes_exist(gw, path):
    started = stats(gw, "echo")["started"]
    r = gw.client.post(path, json=chat("echo"))
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert stats(gw, "echo")["started"] == started


def test_models_list_shape(gw):
    data = gw.client.get("/v1/models").json()
    assert data["object"] == "list"
    for m in data["data"]:
        assert {"id", "object", "created", "owned_by", "state"} <= set(m) and m["object"] == "model"
    r = gw.client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _wait_stats(gw, name, key, value, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stats(gw, name)[key] == value:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_engine_request(gw, stream):
    aborted = stats(gw, "slow")["aborted"]
    body = chat("slow", max_tokens=50, stream=stream)
    if stream:  # read the first event, then hang up
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
            assert next(r.iter_raw()).startswith(b"data: ")
    else:  # give up waiting for the answer (50 × 0.2 s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    assert _wait_stats(gw, "slow", "aborted", aborted + 1), stats(gw, "slow")
    assert _wait_stats(gw, "slow", "running", 0)
    text = gw.client.get("/metrics").text
    assert 'vramgate_requests_in_flight{model="slow"} 0.0' in text


def test_concurrent_streams_each_end_once(gw):
    results: list[bytes] = []

    def one() -> None:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30,
                          json=chat("echo", stream=True, max_tokens=20)) as r:
            results.append(b"".join(r.iter_raw()))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    for raw in results:
        events = sse_events(raw)
        assert events.count(b"data: [DONE]") == 1 and events[-1] == b"data: [DONE]"
        assert b'"finish_reason":"length"' in events[-2]


def _engine_pids(gw: Gateway) -> list[int]:
    pids = gw.descendants()
    assert len(pids) >= 4, pids  # a guard and an engine per model at least
    return pids


def test_sigterm_stops_every_engine_even_one_ignoring_sigterm(tmp_path):
    gw = standin_gateway(tmp_path, {"models": [standin("a"), standin("deaf", "ignore-sigterm")]})
    try:
        assert gw.wait_states(60) == {"a": "ready", "deaf": "ready"}
        pids = _engine_pids(gw)
        sockets = tmp_path / "data" / "run" / "sockets"
        assert len(list(sockets.glob("*.sock"))) == 2  # one Unix socket per engine
    finally:
        rc = gw.stop(signal.SIGTERM)
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled, after shutdown
    assert "Application shutdown complete" in gw.log_text()
    assert wait_gone(pids, 5) == []
    assert list(sockets.glob("*")) == []  # each engine's socket unlinked as it was reaped


def test_sigkill_of_the_gateway_leaves_no_orphan(tmp_path):
    gw = standin_gateway(tmp_path, {"models": [standin("a"), standin("b", task="embed")]})
    try:
        gw.wait_states(60)
        pids = _engine_pids(gw)
    finally:
        gw.stop(signal.SIGKILL)
    left = wait_gone(pids, 15)
    assert left == [], describe(left)


def test_engine_metrics_are_re_exported_with_model_labels(gw):
    text = gw.client.get("/metrics").text
    assert 'vllm:num_requests_running{model="echo",replica="0",engine="0",model_name="echo"} 0.0' in text
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert "python_info" not in text  # only the engines' vllm:* families
    assert "vramgate_cpu_memory_reserved_bytes" in text


def test_labels_stay_bounded(gw):
    """C19: random model names, users and paths add no series."""
    import random
    import string
    before = series_count(gw)

    def word() -> str:
        return "".join(random.choices(string.ascii_lowercase, k=12))

    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(300):
            c.post("/v1/chat/completions", json=chat(word()))
            c.post(f"/v1/{word()}", json=chat("echo"))
        for _ in range(100):
            c.post("/v1/chat/completions", json=chat("echo", max_tokens=1, user=word()))
    after = series_count(gw)
    assert after == before, (before, after)


def test_access_log_line_and_engine_logs(gw):
    r = gw.client.post("/v1/completions", headers={"x-request-id": "acc-42"},
                       json={"model": "small", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200
    # Written once the event loop's turn has sent its answers (server.accesslog): just after.
    assert wait_for(lambda: "request_id=acc-42" in gw.log_text())
    line = next(l for l in gw.log_text().splitlines() if "request_id=acc-42" in l)
    # Written in one write, not through logging, in the root handler's format all the same.
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO vramgate\.access: request_id=", line), line
    for part in ("route=/v1/completions", "model=echo", "status=200", "prompt_tokens=3",
                 "completion_tokens=3", "duration_s="):
        assert part in line, line
    assert sum("request_id=acc-42" in l for l in gw.log_text().splitlines()) == 1  # one line each
    # Every other request gets its line too (not the /health and /metrics probes).
    assert gw.client.get("/v1/models", headers={"x-request-id": "acc-43"}).status_code == 200
    assert gw.client.get("/v1/models/nope", headers={"x-request-id": "acc-44"}).status_code == 404
    assert gw.client.get("/health", headers={"x-request-id": "acc-45"}).status_code == 200
    assert wait_for(lambda: "request_id=acc-44" in gw.log_text())
    lines = gw.log_text().splitlines()
    assert any("request_id=acc-43 method=GET route=/v1/models status=200" in l for l in lines)
    assert any("request_id=acc-44 method=GET route=/v1/models/nope status=404" in l for l in lines)
    assert not any("request_id=acc-45" in l for l in lines)
    logs = gw.client.get("/admin/models/echo/logs", params={"lines": 5}).text
    assert "/logs/echo." in logs and "standin: echo listening" in gw.client.get(
        "/admin/models/echo/logs").text
    from click.testing import CliRunner

    from server.cli import main
    res = CliRunner().invoke(main, ["logs", "echo", "--url", gw.url, "-n", "50"])
    assert res.exit_code == 0 and "standin: echo listening" in res.output
    assert 'vramgate_tokens_total{kind="completion",model="echo"}' in gw.client.get("/metrics").text


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", chat("small", stream=True, max_tokens=6)),
    ("/v1/completions", {"model": "echo", "prompt": "x", "stream": True, "max_tokens": 6}),
])
def test_streamed_tokens_are_counted_without_a_usage_chunk_for_the_client(gw, route, body):
    """C01 with the gateway's own metrics: it asks the engine for usage, counts the tokens, and the
    client that did not ask still gets no usage chunk."""
    tokens = 'vramgate_tokens_total{kind="completion",model="echo"}'
    itl = 'vramgate_inter_token_latency_seconds_count{model="echo"}'
    before, itl_before = metric(gw, tokens), metric(gw, itl)
    raw = gw.client.post(route, json=body, headers={"x-request-id": "tok-" + route[-4:]}).content
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]" and len(events) == 7  # 6 words, no usage chunk
    assert all(b'"usage"' not in e for e in events)
    assert metric(gw, tokens) - before == 6
    assert metric(gw, itl) - itl_before == 5  # gaps between 6 tokens
    assert wait_for(lambda: "request_id=tok-" + route[-4:] in gw.log_text())  # the stream's end
    line = next(l for l in gw.log_text().splitlines() if "request_id=tok-" + route[-4:] in l)
    assert "completion_tokens=6" in line and "prompt_tokens=3" in line and "ttft_s=" in line


def test_stream_flag_on_embeddings_gets_the_json_answer(gw):
    r = gw.client.post("/v1/embeddings", json={"model": "emb", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["data"][0]["embedding"]


def test_a_client_hanging_up_mid_body_is_a_quiet_499(gw):
    import socket
    body = json.dumps(chat("echo", max_tokens=2)).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nX-Request-ID: midbody-1\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode()
                  + body[:-10])
    assert wait_for(lambda: "request_id=midbody-1" in gw.log_text(), 5)
    line = next(l for l in gw.log_text().splitlines() if "request_id=midbody-1" in l)
    assert "status=499" in line
    assert "Exception in ASGI" not in gw.log_text() and "Traceback" not in gw.log_text()
