"""End to end: an output budget beyond the context (C22's class) on all four generation routes,
on a real vLLM CPU engine serving the embedded chat model with ``max_model_len: 2048``.

Its own gateway and a 2,048-token context: the prompt must nearly fill the context, and an
8,000-token prefill took 262 s on two cores beside the embedding engine; this one takes 50 s, and
the module 100 s with the engine's start. C22 as Claude Code sends it, against the full 8,192 tokens, stays in
``test_embedded_models``. This module also shows the gateway reading a configured context.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server.models import CHAT_MODEL, CHAT_SAMPLING, CHAT_TEMPLATE, ensure_prepared
from tests.gateway import Gateway, embedded_data_dir

pytestmark = pytest.mark.e2e
CONTEXT = 2048  # tokens
LONG = " a" * 2000  # one token each: together with the template, near the context
# The same prompt as the chat template writes it, for /v1/completions: vLLM's prefix cache then
# spares the CPU a second prefill.
TEMPLATED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
             "Face<|im_end|>\n<|im_start|>user\n" + LONG)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data_dir = embedded_data_dir()
    ensure_prepared(data_dir)
    config = {"models": [{
        "name": CHAT_MODEL, "path": str(data_dir / "models" / CHAT_MODEL), "preload": True,
        "max_model_len": CONTEXT, "chat_template": str(CHAT_TEMPLATE),
        "engine_args": ["--override-generation-config", json.dumps(CHAT_SAMPLING)]}]}
    with Gateway(tmp_path_factory.mktemp("budget"), config, data_dir=data_dir) as gateway:
        gateway.wait_up(timeout=60)
        assert gateway.wait_states(timeout=400) == {CHAT_MODEL: "ready"}, gateway.log_text()[-3000:]
        yield gateway


@pytest.mark.parametrize("route, body, usage", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 32000,
                              "ignore_eos": True}, ("prompt_tokens", "completion_tokens")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}],
                              "max_completion_tokens": 32000, "ignore_eos": True},
     ("prompt_tokens", "completion_tokens")),
    ("/v1/completions", {"prompt": TEMPLATED, "max_tokens": 32000, "ignore_eos": True},
     ("prompt_tokens", "completion_tokens")),
    ("/v1/responses", {"input": LONG, "max_output_tokens": 32000}, ("input_tokens", "output_tokens")),
    ("/v1/messages", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 32000},
     ("input_tokens", "output_tokens")),
])
def test_an_output_budget_beyond_the_context_is_served_with_what_fits(gw, route, body, usage):
    """C22 on all four generation routes: 32,000 output tokens asked, the context holds 2,048."""
    r = httpx.post(gw.url + route, json={"model": CHAT_MODEL, **body}, timeout=300)
    assert r.status_code == 200, r.text
    param = next(k for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if k in body)
    assert r.headers["x-vramgate-max-tokens"] == f"{CONTEXT}; requested=32000; param={param}"
    counts = r.json()["usage"]
    prompt, output = counts[usage[0]], counts[usage[1]]
    assert CONTEXT - 100 < prompt < CONTEXT and 0 < output <= CONTEXT - prompt
    if body.get("ignore_eos"):
        assert output == CONTEXT - prompt  # all that the prompt left
