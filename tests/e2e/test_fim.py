"""End to end FIM on real vLLM CPU engines: one synthetic model per family (``tests/fim_models.py``:
a tiny config with random weights and the embedded tokenizer carrying the family's tokens).

Through the gateway, for every family: the prompt the engine tokenizes is the family's published
format (its prompt token ids, as vLLM returns them), and the family's stop tokens are really set
(a stop token forced with ``logit_bias`` ends the completion; sent to the engine directly, the
same request runs to its length). Then streaming, cancellation and llama.cpp's ``/infill``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from server import fim
from server.models import CHAT_MODEL, ensure_prepared
from server.modelfiles import read_model_files
from tests.fim_models import FAMILY_STOP, ROLE_TOKENS, build
from tests.gateway import Gateway, embedded_data_dir, engine_client

pytestmark = pytest.mark.e2e
FAMILIES = sorted(FAMILY_STOP)
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"
FIM_BUDGET = 6
CUSTOM = "<repo_name>{suffix}<file_sep>{prefix}"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    data_dir = embedded_data_dir()
    ensure_prepared(data_dir)
    return data_dir / "models" / CHAT_MODEL


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("fim-models")
    return {f: build(f, smollm2, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, folders, smollm2):
    models = [{"name": f"fim-{f}", "path": str(path), "preload": True, "max_model_len": 2048,
               "kv_cache_bytes": "64MiB", "fim_max_tokens": FIM_BUDGET,
               "engine_args": {"load-format": "dummy"}} for f, path in folders.items()]
    # Real weights, for what needs an engine as slow as a real one (the synthetic ones make
    # 1,500 tokens in a fraction of a second); SmolLM2 has no FIM tokens, so a format is set.
    models.append({"name": "fim-custom", "path": str(smollm2), "preload": True, "fim": CUSTOM})
    gateway = Gateway(tmp_path_factory.mktemp("fim"), {"models": models})
    try:
        gateway.wait_up(timeout=60)
        states = gateway.wait_states(timeout=600)
        assert set(states.values()) == {"ready"}, gateway.log_text()[-3000:]
        yield gateway
    finally:
        gateway.stop()


def complete(gw: Gateway, family: str, base: str | None = None, **body) -> dict:
    url = (base or gw.url) + "/v1/completions"
    r = httpx.post(url, timeout=120, json={"model": f"fim-{family}", "prompt": PREFIX,
                                           "suffix": SUFFIX, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def engine_url(gw: Gateway, family: str) -> str:
    model = gw.client.get(f"/v1/models/fim-{family}").json()
    return model["replicas"][0]["url"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_receives_the_familys_fim_prompt(gw, folders, family):
    from tokenizers import Tokenizer

    answer = complete(gw, family, max_tokens=1, return_token_ids=True)
    ids = answer["choices"][0]["prompt_token_ids"]
    files = read_model_files(str(folders[family]))
    rendered = fim.detect(files).render(PREFIX, SUFFIX)
    assert ids == Tokenizer.from_file(str(folders[family] / "tokenizer.json")).encode(rendered).ids
    roles = [files.token_id(t) for t in ROLE_TOKENS[family]]
    positions = [ids.index(r) for r in roles]  # every FIM token, each exactly where it belongs
    assert positions == sorted(positions) and len(set(roles)) == len(roles)
    # No max_tokens: the model's fim_max_tokens, not vLLM's default of 16 (the random weights
    # kept off the stop tokens, so the budget alone ends it).
    never = {str(i): -100 for i in fim.detect(files).stop_token_ids}
    free = complete(gw, family, ignore_eos=True, logit_bias=never)
    assert free["usage"]["completion_tokens"] == FIM_BUDGET


@pytest.mark.parametrize("family", FAMILIES)
def test_the_familys_stop_tokens_reach_the_engine(gw, folders, family):
    stop_id = read_model_files(str(folders[family])).token_id(FAMILY_STOP[family])
    force = {"max_tokens": 5, "logit_bias": {str(stop_id): 100}}
    choice = complete(gw, family, **force)["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_id)
    # The same prompt straight to the engine, without the gateway's stop ids, does not stop.
    rendered = fim.detect(read_model_files(str(folders[family]))).render(PREFIX, SUFFIX)
    with engine_client(engine_url(gw, family), timeout=60) as engine:  # its Unix socket
        direct = engine.post("/v1/completions", json={
            "model": f"fim-{family}", "prompt": rendered, "temperature": 0, **force}).json()
    assert direct["choices"][0]["finish_reason"] == "length"


def test_a_client_stop_string_that_is_a_special_token_stops(gw, folders):
    stop_id = read_model_files(str(folders["qwen"])).token_id("<|im_end|>")
    body = {"model": "fim-qwen", "prompt": "x", "max_tokens": 5, "temperature": 0,
            "logit_bias": {str(stop_id): 100}, "stop": ["<|im_end|>"]}
    choice = httpx.post(gw.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_id)


def engine_running(url: str) -> float:
    with engine_client(url, timeout=10) as engine:
        text = engine.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_a_fim_stream_relays_every_token(gw, folders):
    never = {str(i): -100 for i in fim.detect(read_model_files(str(folders["qwen"]))).stop_token_ids}
    with httpx.stream("POST", gw.url + "/v1/completions", timeout=60, json={
            "model": "fim-qwen", "prompt": PREFIX, "suffix": SUFFIX, "stream": True, "max_tokens": 50,
            "ignore_eos": True, "logit_bias": never}) as r:  # random weights: off the stop tokens
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 40
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_hung_up_fim_stream_stops_the_engine(gw):
    url = engine_url(gw, "custom")
    body = json.dumps({"model": "fim-custom", "prompt": PREFIX, "suffix": SUFFIX, "stream": True,
                       "max_tokens": 1500, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while seen.count(b"data: {") < 3:  # tokens are flowing
            got = sock.recv(65536)
            assert got, seen  # the gateway closed the connection
            seen += got
            assert not seen.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")), seen
        assert seen.startswith(b"HTTP/1.1 200") and b"text/event-stream" in seen
        assert engine_running(url) == 1.0
    finally:
        sock.close()
    hung_up = time.monotonic()
    while engine_running(url) != 0.0:
        assert time.monotonic() - hung_up < 3, "the engine kept generating after the hang-up"
        time.sleep(0.01)


def test_infill_answers_in_llama_cpp_shape(gw, folders):
    stops = fim.detect(read_model_files(str(folders["starcoder"]))).stop_token_ids
    body = {"model": "fim-starcoder", "input_prefix": PREFIX, "input_suffix": SUFFIX,
            "input_extra": [{"filename": "util.py", "text": "X = 1\n"}], "n_predict": 4,
            "temperature": 0, "ignore_eos": True, "cache_prompt": True,
            "logit_bias": [[i, -100] for i in stops]}  # llama.cpp's form; no random stop
    r = httpx.post(gw.url + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop"] is True and out["model"] == "fim-starcoder" and isinstance(out["content"], str)
    assert out["tokens_predicted"] == 4 and out["stop_type"] == "limit" and out["tokens_evaluated"] > 10
    with httpx.stream("POST", gw.url + "/infill", json={**body, "stream": True}, timeout=60) as s:
        assert s.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 4
    assert all(e["stop"] is False for e in events[:-1])
    # Without a model, llama.cpp-style: the first model that can fill in.
    r = httpx.post(gw.url + "/infill", json={"input_prefix": "a", "input_suffix": "b", "n_predict": 1},
                   timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "fim-codegemma"
