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


def test_requests_from_refused_origins_never_reach_a_route():
    """A "simple" cross-site POST (text/plain, no preflight) would still be carried out if only
    the CORS headers were withheld: it is refused with 403 before any route."""
    for path in ("/v1/chat/completions", "/admin/reload"):
        r = app().post(path, headers={"origin": "https://evil.example", "content-type": "text/plain"},
                       content=b'{"model": "x"}')
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    anthropic = app().post("/v1/messages", headers={"origin": "https://evil.example"})
    assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"
    assert app().post("/v1/chat/completions").status_code == 401  # no Origin: not a browser


def test_the_host_is_checked_when_listening_on_loopback():
    async def ok(request):
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/v1/models", ok)])
    client = TestClient(Cors(inner, (), hosts=("gw.internal",), check_host=True))
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.1.2.3", "gw.internal",
                 "app.localhost:5173"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    for host in ("attacker.example:8000", "127.0.0.1.nip.io", "evil.localhost.example.com"):
        r = client.get("/v1/models", headers={"host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    anyone = TestClient(Cors(inner, (), hosts=("*",), check_host=True))
    assert anyone.get("/v1/models", headers={"host": "attacker.example"}).status_code == 200


def test_configured_origins_are_normalised():
    client = app(("HTTPS://My-IDE.example/",))
    r = client.options("/v1/chat/completions", headers={"origin": "https://my-ide.example", **PREFLIGHT})
    assert r.status_code == 204


def test_a_same_origin_page_may_post_from_any_address_of_the_server():
    """The web console opened at http://10.1.2.3:8000/ui (the gateway on 0.0.0.0) sends
    ``Origin: http://10.1.2.3:8000`` with its POSTs: that is its own origin, not a foreign one."""
    client = app()
    r = client.post("/v1/chat/completions", headers={"origin": "http://10.1.2.3:8000",
                                                     "host": "10.1.2.3:8000"})
    assert r.status_code == 401  # reached the route (which wants a key)
    r = client.post("/v1/chat/completions", headers={"origin": "https://gw.example.lan",
                                                     "host": "gw.example.lan"})
    assert r.status_code == 401  # behind a TLS proxy: https page, Host without a port
    for origin, host in (("http://10.1.2.3:8001", "10.1.2.3:8000"), ("http://evil.example", "10.1.2.3"),
                         ("null", "null"), ("http://10.1.2.3:8000.evil.example", "10.1.2.3:8000")):
        r = client.post("/v1/chat/completions", headers={"origin": origin, "host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin


def test_a_post_without_origin_passes_straight_through_and_one_with_origin_still_gets_headers():
    """The fast path for SDK and CLI clients (no Origin): the answer is the route's own, with no
    CORS header; a browser's POST from an allowed origin still gets them, Vary included."""
    r = app().post("/v1/chat/completions")
    assert r.status_code == 401 and r.json() == {"error": {"message": "no key"}}
    assert not [h for h in r.headers if h.lower().startswith("access-control") or h.lower() == "vary"]
    r = app().post("/v1/chat/completions", headers={"origin": "http://localhost:5173"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "origin" in r.headers["vary"].lower()
