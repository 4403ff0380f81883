"""The web console's routes through the real gateway (stand-in engines): /ui's static files are
open and sent with a strict Content-Security-Policy, the page holds no inline script or style,
and the data routes need a key, show only the key's models and count the traffic."""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser

import httpx
import openai
import pytest

from server.console import UI_DIR
from tests.gateway import standin_gateway, wait_for

CONFIG = {"api_keys": ["sk-user", {"key": "sk-limited", "models": ["small"]}],
          "admin_key": "sk-admin", "traffic_interval": 0.2,
          "models": [{"name": "echo", "path": "standin:ok", "aliases": ["small"], "preload": True},
                     {"name": "other", "path": "standin:ok", "preload": True},
                     {"name": "slow", "path": "standin:slow-start=600"},
                     {"name": "broken", "path": "standin:fail-start"}]}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def get(gw, path: str, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(gw.url + path, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with standin_gateway(tmp_path_factory.mktemp("console"), CONFIG) as g:
        g.wait_states(60)
        yield g


class _Scan(HTMLParser):
    """Collects what a strict CSP would block in a page: inline scripts, inline styles and event
    handler attributes, and every URL the page loads."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.inline += [f"{tag} {k}" for k in a if k.startswith("on") or k == "style"]
        if tag == "style":
            self.inline.append("style element")
        if tag == "script":
            self._in_script = True
            if not a.get("src"):
                self.inline.append("script without src")
        self.urls += [a[k] for k in ("src", "href") if a.get(k)]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


def test_static_files_are_open_and_strict(gw):
    r = httpx.get(gw.url + "/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "ui/"  # relative: a proxy prefix stays
    page = get(gw, "/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe" not in csp and "http" not in csp  # no inline script, no other origin
    assert page.headers["x-content-type-options"] == "nosniff"
    scan = _Scan()
    scan.feed(page.text)
    assert scan.inline == []
    assert all("//" not in u for u in scan.urls), scan.urls  # nothing from a CDN
    for u in scan.urls:  # every file the page names is shipped and served, with the same headers
        r = get(gw, "/ui/" + u)
        assert r.status_code == 200, u
        assert r.headers["content-security-policy"] == csp
    assert get(gw, "/ui/console.js").headers["content-type"].startswith(("text/javascript",
                                                                         "application/javascript"))
    assert get(gw, "/ui/missing.js").status_code == 404
    assert get(gw, "/ui/%2e%2e/app.py").status_code == 404  # no way out of server/ui
    assert get(gw, "/ui/..%2fapp.py").status_code == 404


def test_vendored_libraries_carry_their_licences():
    notice = (UI_DIR / "vendor" / "README.md").read_text()
    assert "uPlot 1.6.32" in notice and "MIT" in notice
    assert (UI_DIR / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")
    assert "(v1.6.32)" in (UI_DIR / "vendor" / "uPlot.iife.min.js").read_text()[:80]
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):  # unchanged from the published package
        digest = hashlib.sha256((UI_DIR / "vendor" / name).read_bytes()).hexdigest()
        assert f"`{name}`: `{digest}`" in notice, name


def test_config_tells_the_page_which_keys_are_needed(gw):
    r = get(gw, "/ui/config.json")
    assert r.status_code == 200
    assert r.json() == {"auth": {"api_key": True, "admin_key": True}, "traffic_interval_s": 0.2}
    assert "sk-" not in r.text


def test_state_needs_a_key_and_shows_only_the_keys_models(gw):
    assert get(gw, "/console/state").status_code == 401
    assert get(gw, "/console/traffic").status_code == 401
    assert get(gw, "/console/state", "sk-wrong").status_code == 401
    full = get(gw, "/console/state", "sk-user").json()
    assert [m["id"] for m in full["models"]] == ["echo", "other", "slow", "broken"]
    assert full["admin"] is False
    echo = full["models"][0]["replicas"][0]  # a CPU engine: its RAM (PSS), which NVML cannot give
    assert echo["ram_bytes"] > 10 * 2**20 and echo["placement"]["measured_bytes"] is None
    cpu = next(d for d in full["devices"] if d["id"] == "cpu")
    assert sorted(cpu["models"]) == ["echo#0", "other#0"]
    # The device figures are /admin/gpus's own.
    gpus = get(gw, "/admin/gpus", "sk-admin").json()
    admin_cpu = next(d for d in gpus["devices"] if d["id"] == "cpu")
    for field in ("total_bytes", "reserved_bytes", "kind", "index"):
        assert cpu[field] == admin_cpu[field]
    assert full["headroom_bytes"] == gpus["headroom_bytes"]
    limited = get(gw, "/console/state", "sk-limited").json()
    assert [m["id"] for m in limited["models"]] == ["echo"]
    assert next(d for d in limited["devices"] if d["id"] == "cpu")["models"] == ["echo#0"]
    assert get(gw, "/console/state", "sk-admin").json()["admin"] is True


def test_a_loading_model_shows_its_elapsed_time_and_phase(gw):
    try:  # a load started from the admin route; the caller stops waiting, the load goes on
        httpx.post(gw.url + "/admin/models/slow/load", headers={"authorization": "Bearer sk-admin"},
                   timeout=0.5)
    except httpx.TimeoutException:
        pass

    def loading() -> dict | None:
        slow = next(m for m in get(gw, "/console/state", "sk-user").json()["models"] if m["id"] == "slow")
        rep = slow["replicas"][0]
        return rep if slow["state"] == "loading" and rep["start_phase"] and rep["loading_s"] else None
    assert wait_for(lambda: loading() is not None, 20)
    rep = loading()
    assert rep["start_phase"] == {"step": 1, "steps": 7, "phase": "starting the process"}
    first = rep["loading_s"]
    assert wait_for(lambda: (loading() or {}).get("loading_s", 0) > first, 10)
    assert httpx.post(gw.url + "/admin/models/slow/unload?force=true",
                      headers={"authorization": "Bearer sk-admin"}).status_code == 200
    assert wait_for(lambda: gw.states()["slow"] == "unloaded", 30)


def test_a_failed_model_shows_its_error_and_log_tail(gw):
    assert httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "broken"},
                      headers={"authorization": "Bearer sk-user"}, timeout=30).status_code == 503

    def broken() -> dict:
        return next(m for m in get(gw, "/console/state", "sk-user").json()["models"]
                    if m["id"] == "broken")
    assert wait_for(lambda: broken()["state"] == "failed", 20)
    error = broken()["error"]
    assert "last lines of the engine log" in error and "standin: failing at start" in error, error


def test_traffic_counts_requests_tokens_and_ttft_per_model(gw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-user", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(**CHAT)
    stream = client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def echo() -> dict:
        return get(gw, "/console/traffic", "sk-user").json()["models"].get("echo", {})
    assert wait_for(lambda: sum(v or 0 for v in echo().get("req_s", [])) > 0, 10)
    assert wait_for(lambda: any((v or 0) > 0 for v in echo()["tok_s"]), 10)
    assert wait_for(lambda: any(v is not None and v > 0 for v in echo()["ttft_p50_s"]), 10)
    series = get(gw, "/console/traffic", "sk-user").json()
    assert series["interval_s"] == 0.2 and series["window_s"] == 900
    assert len(series["t"]) == len(series["models"]["echo"]["queued"])
    assert set(get(gw, "/console/traffic", "sk-limited").json()["models"]) <= {"echo"}


def test_a_reload_does_not_make_the_page_disagree_with_the_keys_in_force(gw):
    """Keys change only with a restart: after a reload that drops them (and changes the sample
    interval), the page is still told what the middleware enforces and what the sampler does."""
    import yaml

    path = gw.tmp / "config.yaml"
    changed = yaml.safe_load(path.read_text())
    for field in ("api_keys", "admin_key"):
        changed.pop(field)
    changed["traffic_interval"] = 7
    path.write_text(yaml.safe_dump(changed))
    assert httpx.post(gw.url + "/admin/reload", headers={"authorization": "Bearer sk-admin"},
                      timeout=30).status_code == 200
    assert get(gw, "/ui/config.json").json() == {"auth": {"api_key": True, "admin_key": True},
                                                 "traffic_interval_s": 0.2}
    assert get(gw, "/console/state").status_code == 401
    assert get(gw, "/console/state", "sk-user").json()["admin"] is False
    assert get(gw, "/console/state", "sk-admin").json()["admin"] is True
