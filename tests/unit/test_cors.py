"""CORS by default for local and webview origins (cases C24), through the real middleware stack."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.cors import Cors, origin_pattern

PREFLIGHT = {"access-control-request-method": "POST",
             "access-control-request-headers": "authorization,content-type,x-stainless-os,"
                                               "x-stainless-lang,anthropic-version"}


def app(origins=()) -> TestClient:
    async def denied(request):
        return JSONResponse({"error": {"message": "no key"}}, status_code=401)

    inner = Starlette(routes=[Route("/v1/chat/completions", denied, methods=["POST"])])
    return TestClient(Cors(inner, origins))


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080",
                                    "https://localhost", "app://obsidian.md", "tauri://localhost",
                                    "vscode-webview://1abc", "vscode-file://vscode-app"])
def test_local_and_webview_origins_are_allowed_by_default(origin):
    r = app().options("/v1/chat/completions", headers={"origin": origin, **PREFLIGHT})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == origin
    assert "x-stainless-os" in r.headers["access-control-allow-headers"]
    assert "POST" in r.headers["access-control-allow-methods"]


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example",
                                    "http://127.0.0.1.nip.io", "null"])
def test_other_origins_get_403_without_allow_headers(origin):
    r = app().options("/v1/chat/completions", headers={"origin": origin, **PREFLIGHT})
    assert r.status_code == 403
    assert not [h for h in r.headers if h.lower().startswith("access-control-allow")]


def test_errors_carry_the_cors_headers_for_allowed_origins():
    r = app().post("/v1/chat/completions", headers={"origin": "http://localhost:5173"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = app().post("/v1/chat/completions", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_configured_origins_add_to_the_defaults_and_star_allows_all():
    client = app(("https://*.example.com",))
    ok = client.options("/v1/chat/completions", headers={"origin": "https://ide.example.com", **PREFLIGHT})
    assert ok.status_code == 204
    assert client.options("/v1/chat/completions", headers={
        "origin": "http://localhost:1", **PREFLIGHT}).status_code == 204
    assert client.options("/v1/chat/completions", headers={
        "origin": "https://example.org", **PREFLIGHT}).status_code == 403
    anyone = app(("*",)).options("/v1/chat/completions", headers={"origin": "https://x.y", **PREFLIGHT})
    assert anyone.status_code == 204 and anyone.headers["access-control-allow-origin"] == "*"
    assert "example\\.com" in origin_pattern(["https://*.example.com"])
