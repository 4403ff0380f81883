"""End to end: the gateway on the embedded models, real vLLM CPU engines, the official openai client.

Slow (about two minutes, most of it the two engines starting). The embedded models are prepared in
``$VRAMGATE_DATA_DIR`` (default ``~/.cache/vramgate``, shared with ``vramgate serve``).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import struct
import subprocess
import time

import httpx
import openai
import pytest

from tests.gateway import Gateway, describe, embedded_data_dir, engine_client, wait_gone

pytestmark = pytest.mark.e2e
CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data_dir = embedded_data_dir()
    gateway = Gateway(tmp_path_factory.mktemp("e2e"), None, data_dir=data_dir)
    try:
        gateway.wait_up(timeout=300)  # includes preparing the embedded models on a fresh machine
        states = gateway.wait_states(timeout=400)
        assert states == {CHAT: "ready", EMBED: "ready"}, gateway.log_text()[-3000:]
        yield gateway
        # At the end of the module, whatever ran before: SIGTERM leaves no engine process.
        pids = gateway.descendants()
        assert len(pids) >= 6  # per model: guard, API server, engine core, worker
        gateway.stop(signal.SIGTERM)
        assert wait_gone(pids, 30) == [], describe(pids)
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion(client):
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=16, temperature=0)
    assert r.model == CHAT
    assert r.choices[0].message.content.strip()
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_stream_with_usage_matches_the_non_streamed_usage(client):
    kw = dict(model=CHAT, messages=HELLO, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    finish = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert finish[0] == len(chunks) - 2 and last.choices == []
    assert last.usage.model_dump() == plain.usage.model_dump()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content


def test_stream_without_usage_has_no_usage_chunk(gw, client):
    """C01: the gateway asks vLLM for usage (its token metrics) and drops that chunk. The ITL
    histogram gets one gap fewer than the token events: vLLM's role-only first chunk is none."""
    def counted(series: str) -> float:  # 0 before the first request made the series
        return next((float(l.rsplit(" ", 1)[1]) for l in gw.client.get("/metrics").text.splitlines()
                     if l.startswith(series)), 0.0)
    tokens = f'vramgate_tokens_total{{kind="completion",model="{CHAT}"}}'
    gaps = f'vramgate_inter_token_latency_seconds_count{{model="{CHAT}"}}'

    before, gaps_before = counted(tokens), counted(gaps)
    chunks = list(client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.model == CHAT for c in chunks)  # aliases answer with the canonical name
    assert counted(tokens) - before == 8
    role_only = [c for c in chunks if c.choices[0].delta.role and not c.choices[0].delta.content]
    assert len(role_only) == 1 and chunks[0] is role_only[0]
    assert counted(gaps) - gaps_before == len(chunks) - 2


def test_completions_stop_string_never_leaks(client):
    kw = dict(model=CHAT, prompt="Here is the English alphabet: ABC", stop=["DEFGHIJ"],
              temperature=0, max_tokens=20)
    plain = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == plain
    assert "DEFGHIJ" not in plain


def test_exact_sse_framing(gw):
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 24, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        assert "content-encoding" not in r.headers
        raw = b"".join(r.iter_raw())
    assert b"\r" not in raw and b"event:" not in raw
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.count(b"data: [DONE]") == 1
    for event in raw[:-2].split(b"\n\n")[:-1]:
        assert event.startswith(b"data: {") and b"\n" not in event
        json.loads(event[6:])


def test_embeddings(client):
    r = client.embeddings.create(model=EMBED, input=["hello world", "goodbye"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 384
    assert r.data[0].embedding != r.data[1].embedding
    raw = httpx.post(str(client.base_url) + "embeddings", timeout=60, json={
        "model": "minilm", "input": "hello world", "encoding_format": "base64"}).json()
    vec = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert abs(vec[0] - r.data[0].embedding[0]) < 1e-4


def test_models_list_and_retrieve(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT, EMBED}
    assert models[CHAT].model_extra["state"] == "ready"
    assert client.models.retrieve("smollm2").id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model(client, stream):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=stream)
    assert info.value.code == "model_not_found" and info.value.status_code == 404
    assert info.value.type == "invalid_request_error"


def test_bad_requests(gw, client):
    r = httpx.post(gw.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:  # decided by vLLM, relayed in the envelope
        client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4,
                                       extra_body={"top_k": -5})
    assert info.value.type == "invalid_request_error" and "top_k" in info.value.message


def test_responses_api(client):
    r = client.responses.create(model="smollm2", input="Say hello", max_output_tokens=16)
    assert r.output_text and r.model == CHAT
    events = list(client.responses.create(model=CHAT, input="Say hello", max_output_tokens=8,
                                          stream=True))
    assert events[-1].type == "response.completed"
    assert any(e.type == "response.output_text.delta" for e in events)


def test_anthropic_messages_with_the_anthropic_client(gw):
    import anthropic

    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    msg = claude.messages.create(model="smollm2", max_tokens=16,
                                 messages=[{"role": "user", "content": "Say hello"}])
    assert msg.type == "message" and msg.content[0].text
    with claude.messages.stream(model=CHAT, max_tokens=8,
                                messages=[{"role": "user", "content": "Say hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason in ("max_tokens", "end_turn") and text == final.content[0].text
    count = claude.messages.count_tokens(model=CHAT,
                                         messages=[{"role": "user", "content": "Say hello"}])
    assert count.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as info:  # errors in Anthropic's own shape
        claude.messages.create(model="no-such-model", max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "not_found_error"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_tools_are_accepted_without_configuration(client, choice):
    """C21: agents send tools on every request; the embedded model answers them."""
    extra = {} if choice is None else {"tool_choice": choice}
    r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], max_tokens=16, **extra)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    if choice == "none":
        assert not r.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_follow_the_schema_and_the_result_goes_back(client, choice):
    import jsonschema

    r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                       max_tokens=60)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 22 C"}]
    follow = client.chat.completions.create(model=CHAT, messages=history, tools=[WEATHER], max_tokens=16)
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls


def stream_events(gw: Gateway, body: dict, route: str = "/v1/chat/completions") -> list[bytes]:
    with httpx.stream("POST", gw.url + route, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_raw())
    return raw.split(b"\n\n")[:-1]


def test_streamed_tool_call_deltas_are_relayed_as_vllm_sends_them(gw):
    """C04 (forced: the 135M model never chooses a tool by itself): one delta opens each call
    with its id, type and name; the others carry argument fragments only; no summary chunk."""
    import jsonschema

    events = stream_events(gw, {"model": CHAT, "messages": ASK, "tools": [WEATHER],
                                "tool_choice": "required", "max_tokens": 60, "stream": True})
    assert events[-1] == b"data: [DONE]" and events.count(b"data: [DONE]") == 1
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    deltas = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or []]
    opening = [d for d in deltas if "id" in d]
    assert len(opening) == 1 and opening[0]["type"] == "function"
    assert opening[0]["function"]["name"] == "get_weather"
    rest = [d for d in deltas if d is not opening[0]]
    assert all(set(d) <= {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    arguments = opening[0]["function"].get("arguments", "") + "".join(d["function"]["arguments"] for d in rest)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finish == ["tool_calls"]


def test_a_truncated_tool_call_ends_cleanly(gw, client):
    """C05: cut at five tokens, the stream ends with "length" and [DONE]; nothing restarts."""
    pid = gw.client.get(f"/v1/models/{CHAT}").json()["replicas"][0]["pid"]
    events = stream_events(gw, {"model": CHAT, "messages": ASK, "tools": [WEATHER],
                                "tool_choice": "required", "max_tokens": 5, "stream": True})
    assert events[-1] == b"data: [DONE]"
    finish = [ch["finish_reason"] for e in events[:-1] for ch in json.loads(e[6:])["choices"]
              if ch.get("finish_reason")]
    assert finish == ["length"]
    assert client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4).choices
    assert gw.client.get(f"/v1/models/{CHAT}").json()["replicas"][0]["pid"] == pid


def test_anthropic_tools_tool_results_and_token_counts(gw):
    import anthropic
    import jsonschema

    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    tool = {"name": "get_weather", "description": "Get the current weather for a city",
            "input_schema": WEATHER["function"]["parameters"]}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    free = claude.messages.create(model=CHAT, max_tokens=16, tools=[tool], messages=ask)
    assert free.stop_reason in ("end_turn", "max_tokens", "tool_use")
    forced = claude.messages.create(model=CHAT, max_tokens=60, tools=[tool],
                                    tool_choice={"type": "tool", "name": "get_weather"}, messages=ask)
    use = next(b for b in forced.content if b.type == "tool_use")
    assert use.name == "get_weather" and forced.stop_reason == "tool_use"
    jsonschema.validate(use.input, tool["input_schema"])
    after = claude.messages.create(model=CHAT, max_tokens=16, tools=[tool], messages=ask + [
        {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert after.content
    with_tools = claude.messages.count_tokens(model=CHAT, tools=[tool], messages=ask).input_tokens
    without = claude.messages.count_tokens(model=CHAT, messages=ask).input_tokens
    assert with_tools > without  # the template shows the tools to the model


def test_claude_codes_request_shape_streams_within_the_context(gw):
    """C22 as Claude Code sends it: 32,000 tokens, adaptive thinking, context management, cache
    control, a dozen tools, a prompt of about 4,000 tokens."""
    tools = [{"name": f"tool_{i}", "description": "Does one thing with a file. " * 12,
              "input_schema": {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#",
                               "properties": {"path": {"type": "string"}, "n": {"type": "integer"}},
                               "required": ["path"], "additionalProperties": False}} for i in range(12)]
    body = {"model": CHAT, "max_tokens": 32000, "stream": True, "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"}, "metadata": {"user_id": "{\"device_id\":\"x\"}"},
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                       {"type": "text", "text": "You are an agent for coding. " * 200,
                        "cache_control": {"type": "ephemeral"}}],
            "tools": tools, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Say hello", "cache_control": {"type": "ephemeral"}}]}]}
    with httpx.stream("POST", gw.url + "/v1/messages?beta=true", json=body, timeout=300,
                      headers={"anthropic-beta": "claude-code-20250219,context-management-2025-06-27",
                               "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["x-vramgate-max-tokens"].startswith("8192;")
        text = r.read().decode()
    assert '"message_stop"' in text.rstrip().rsplit("\n\n", 1)[-1]
    usage = json.loads(next(line[6:] for line in text.splitlines() if '"message_delta"' in line))["usage"]
    assert 3000 < usage["input_tokens"] < 8192


def test_a_prompt_longer_than_the_context_is_a_clear_400(gw, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": " a" * 9000}],
                                       max_tokens=10)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    r = httpx.post(gw.url + "/v1/messages", timeout=60, json={
        "model": CHAT, "max_tokens": 10, "messages": [{"role": "user", "content": " a" * 9000}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_suffix_on_a_model_without_fim_tokens(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CHAT, prompt="def f(", suffix="):\n    return 1", max_tokens=8)
    assert info.value.code == "suffix_not_supported" and info.value.param == "suffix"
    assert CHAT in info.value.message


def test_the_model_shows_its_tool_parser_and_context(gw):
    model = gw.client.get("/v1/models/smollm2").json()
    assert model["tool_parser"] == "hermes" and model["fim"] is None
    assert model["replicas"][0]["max_model_len"] == 8192


def engine_running(gw: Gateway) -> float:
    """``vllm:num_requests_running`` of the chat engine, read from its own /metrics, over the Unix
    socket the gateway's log says it is ready on."""
    address = re.search(rf"engine for {CHAT}#0 ready on (unix:\S+\.sock)", gw.log_text()).group(1)
    with engine_client(address, timeout=10) as engine:
        text = engine.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def wait_value(fn, want: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn() == want:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_generation_at_the_engine(gw, stream):
    """C12: a caller that goes away stops the engine's work within about a second.

    The caller holds its connection open until the engine reports the request running, then hangs
    up: no timing guess, so a slow CI machine cannot make the test miss the window.
    """
    body = json.dumps({"model": CHAT, "messages": HELLO, "max_tokens": 4000, "temperature": 1.0,
                       "stream": stream, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers, then tokens flow
        assert wait_value(lambda: engine_running(gw), 1.0, 30)  # it reached the engine
    finally:
        sock.close()  # the caller goes away
    hung_up = time.monotonic()
    assert wait_value(lambda: engine_running(gw), 0.0, 3)  # ... and was aborted there
    assert time.monotonic() - hung_up < 3
    assert wait_value(lambda: f'vramgate_requests_in_flight{{model="{CHAT}"}} 0.0'
                      in gw.client.get("/metrics").text, True, 3)


def test_real_prometheus_evaluates_the_dashboard_and_alert_rules(gw, client, tmp_path):
    """A real Prometheus scrapes the gateway (and so its engines' metrics) and evaluates every
    query of deploy/'s dashboard and alert rules: all evaluate, the main panels have data."""
    import yaml

    from tests.gateway import ROOT, free_port
    from tests.unit.test_deploy import dashboard_exprs

    port = free_port()
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "rule_files": [str(ROOT / "deploy" / "alerts.yml")],
           "scrape_configs": [{"job_name": "vramgate",
                               "static_configs": [{"targets": [f"127.0.0.1:{gw.port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        def query(expr: str) -> dict:
            return httpx.get(api, params={"query": expr}, timeout=10).json()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # Prometheus answers 503 text until its TSDB is up
            try:
                if query('up{job="vramgate"}')["data"]["result"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        def scrapes() -> int:  # how many times Prometheus has scraped the gateway so far
            result = query('count_over_time(up{job="vramgate"}[10m])')["data"]["result"]
            return int(float(result[0]["value"][1])) if result else 0

        for _ in range(6):  # traffic spread over several scrapes, so rate() has data
            client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4)
            list(client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, stream=True))
            client.embeddings.create(model=EMBED, input="x")
            seen = scrapes()
            assert wait_value(lambda: scrapes() > seen, True, 30)  # the next scrape has them
        rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
        exprs = dashboard_exprs() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
        results = {}
        for expr in exprs:
            answer = query(expr.replace("$model", ".*"))
            assert answer["status"] == "success", (expr, answer)
            results[expr] = answer["data"]["result"]
        main = [e for e in dashboard_exprs() if any(k in e for k in (
            "vramgate_requests_total", "vllm:generation_tokens_total", "vramgate_model_state",
            "vllm:kv_cache_usage_perc", "vramgate_time_to_first_token_seconds_bucket",
            "vramgate_batch"))]
        assert len(main) >= 8
        for expr in main:
            assert results[expr], f"no data for {expr}"
        assert query('up{job="vramgate"}')["data"]["result"][0]["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(10)


BATCH_BODIES = {
    "/v1/chat/completions": lambda i: {"model": CHAT, "max_tokens": 8, "temperature": 0,
                                       "messages": [{"role": "user", "content": f"Count to {i}"}]},
    "/v1/completions": lambda i: {"model": CHAT, "prompt": f"{i} plus one is", "max_tokens": 6},
    "/v1/embeddings": lambda i: {"model": EMBED, "input": f"sentence number {i}"},
    "/v1/responses": lambda i: {"model": CHAT, "input": f"Say {i}", "max_output_tokens": 8},
}


@pytest.mark.parametrize("endpoint", list(BATCH_BODIES))
def test_a_batch_on_the_real_engines(client, endpoint):
    """The SDK's batch workflow on each endpoint: upload, create, poll, download; every line
    answered by the engine, with its usage."""
    import io
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": endpoint,
              "body": BATCH_BODIES[endpoint](i)} for i in range(4)]
    f = client.files.create(file=io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines)),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h",
                                  metadata={"suite": "e2e"})
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)  # polling, as the SDK's users do
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 4, batch
    assert batch.metadata == {"suite": "e2e"} and batch.error_file_id is None
    out = {r["custom_id"]: r for r in
           map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    assert sorted(out) == [f"line-{i}" for i in range(4)]
    for r in out.values():
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200
        if endpoint == "/v1/embeddings":
            assert len(body["data"][0]["embedding"]) == 384 and body["usage"]["prompt_tokens"] > 0
        elif endpoint == "/v1/responses":
            assert body["output"] and body["usage"]["output_tokens"] > 0
        else:
            assert body["choices"][0] and body["usage"]["completion_tokens"] > 0
    assert batch.usage.input_tokens > 0
