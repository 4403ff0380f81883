"""End to end: the gateway on the embedded models, real vLLM CPU engines, the official openai client.

Slow (about two minutes, most of it the two engines starting). The embedded models are prepared in
``$VRAMGATE_DATA_DIR`` (default ``~/.cache/vramgate``, shared with ``vramgate serve``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway import Gateway, wait_gone

pytestmark = pytest.mark.e2e
CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data_dir = Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))
    gateway = Gateway(tmp_path_factory.mktemp("e2e"), None, data_dir=data_dir)
    try:
        gateway.wait_up(timeout=300)  # includes preparing the embedded models on a fresh machine
        states = gateway.wait_states(timeout=400)
        assert states == {CHAT: "ready", EMBED: "ready"}, gateway.log_text()[-3000:]
        yield gateway
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
    """C01: the gateway asks vLLM for usage (its token metrics) and drops that chunk."""
    def counted() -> float:
        line = next(l for l in gw.client.get("/metrics").text.splitlines()
                    if l.startswith(f'vramgate_tokens_total{{kind="completion",model="{CHAT}"}}'))
        return float(line.rsplit(" ", 1)[1])

    before = counted()
    chunks = list(client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.model == CHAT for c in chunks)  # aliases answer with the canonical name
    assert counted() - before == 8


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
        client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=100_000_000)
    assert info.value.param == "max_tokens" and info.value.type == "invalid_request_error"
    assert "max_tokens" in info.value.message


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


def engine_running(gw: Gateway) -> float:
    """``vllm:num_requests_running`` of the chat engine, read from its own /metrics (loopback)."""
    url = re.search(rf"engine for {CHAT}#0 ready on (http://127.0.0.1:\d+)", gw.log_text()).group(1)
    text = httpx.get(url + "/metrics", timeout=10).text
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
        for _ in range(6):  # traffic spread over several scrapes, so rate() has data
            client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4)
            list(client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, stream=True))
            client.embeddings.create(model=EMBED, input="x")
            time.sleep(1)
        rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
        exprs = dashboard_exprs() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
        results = {}
        for expr in exprs:
            answer = query(expr.replace("$model", ".*"))
            assert answer["status"] == "success", (expr, answer)
            results[expr] = answer["data"]["result"]
        main = [e for e in dashboard_exprs() if any(k in e for k in (
            "vramgate_requests_total", "vllm:generation_tokens_total", "vramgate_model_state",
            "vllm:kv_cache_usage_perc", "vramgate_time_to_first_token_seconds_bucket"))]
        assert len(main) >= 5
        for expr in main:
            assert results[expr], f"no data for {expr}"
        assert query('up{job="vramgate"}')["data"]["result"][0]["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(10)


def test_zz_sigterm_leaves_no_engine(gw):
    """Last in the module: stop the gateway and check that every engine process is gone."""
    pids = gw.descendants()
    assert len(pids) >= 6  # per model: guard, API server, engine core, worker
    gw.stop(signal.SIGTERM)
    assert wait_gone(pids, 30) == []
