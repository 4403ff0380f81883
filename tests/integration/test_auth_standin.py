"""API keys through the real gateway: every route that can run or control inference needs a key
whatever the path spelling (cases C20); allowlists, admin key, CORS."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway import standin_gateway

CONFIG = {"api_keys": ["sk-user", {"key": "sk-limited", "models": ["small"]}],
          "admin_key": "sk-admin", "cors_origins": ["https://ide.example"],
          "models": [{"name": "echo", "path": "standin:ok", "aliases": ["small"], "preload": True},
                     {"name": "other", "path": "standin:ok"}]}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("auth"), CONFIG) as g:
        g.wait_states(60)
        yield g


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1//chat/completions",
                                  "/v1/chat/completions/", "/V1/chat/completions", "/invocations",
                                  "/tokenize", "/sleep", "/admin/reload", "/admin/models/echo/unload"])
def test_no_key_no_entry(gw, path):
    r = httpx.post(gw.url + path, json=CHAT, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["x-should-retry"] == "false"
    assert gw.states()["echo"] == "ready"  # nothing was unloaded


def test_keys_and_allowlists(gw):
    ok = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-user", max_retries=0)
    assert ok.chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong",
                      max_retries=0).chat.completions.create(**CHAT)
    assert info.value.code == "invalid_api_key" and "sk-wrong" not in str(info.value)
    limited = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-limited", max_retries=0)
    assert limited.chat.completions.create(**{**CHAT, "model": "small"}).model == "echo"
    with pytest.raises(openai.PermissionDeniedError) as info:
        limited.chat.completions.create(**{**CHAT, "model": "other"})
    assert info.value.code == "model_not_allowed"
    assert [m.id for m in limited.models.list()] == ["echo"]
    assert "sk-user" not in gw.log_text() and "sk-limited" not in gw.log_text()


def test_admin_needs_the_admin_key(gw):
    r = httpx.get(gw.url + "/admin/models", headers={"authorization": "Bearer sk-user"})
    assert r.status_code == 401
    r = httpx.get(gw.url + "/admin/models", headers={"authorization": "Bearer sk-admin"})
    assert r.status_code == 200


def test_open_routes_and_cors(gw):
    assert httpx.get(gw.url + "/health").status_code == 200
    assert httpx.get(gw.url + "/metrics").status_code == 200
    pre = httpx.options(gw.url + "/v1/chat/completions", headers={
        "origin": "https://ide.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://ide.example"
    denied = httpx.post(gw.url + "/v1/chat/completions", json=CHAT,
                        headers={"origin": "https://ide.example"})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == "https://ide.example"
