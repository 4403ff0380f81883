"""The web console in a real browser (Debian's chromium through Playwright) on a simulated GPU
layout with stand-in engines: one bar per GPU split as /admin/gpus counts it, the headroom mark at
the placement limit, each replica's placement, and no key form on a server without keys."""

from __future__ import annotations

import httpx
import pytest

from tests.browser import browser_page
from tests.gateway import standin_gateway

GiB = 2**30
MODELS = [{"name": "m", "path": "standin:ok", "memory": "30GiB", "preload": True},
          {"name": "n", "path": "standin:ok", "memory": "8GiB", "preload": True},
          {"name": "e", "path": "standin:ok", "task": "embed", "device": "cpu", "preload": True},
          {"name": "broken", "path": "standin:fail-start", "device": "cpu", "preload": True}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    config = {"simulate_gpus": "1x80GiB@64GiB,1x80GiB", "gpu_headroom": "1GiB", "models": MODELS}
    with standin_gateway(tmp_path_factory.mktemp("console-gpus"), config) as g:
        assert g.wait_states(60) == {"m": "ready", "n": "ready", "e": "ready", "broken": "failed"}
        yield g


def test_gpu_bars_match_admin_gpus(gw):
    devices = {d["id"]: d for d in gw.client.get("/admin/gpus").json()["devices"]}
    assert set(devices) == {"cuda:0", "cuda:1", "cpu"}
    with browser_page(gw.url + "/ui/") as page:
        for dev in ("cuda:0", "cuda:1", "cpu"):
            page.wait_for_selector(f'.device[data-device="{dev}"]')
        assert page.is_hidden("#keys")  # no keys configured: nothing to ask
        for dev in ("cuda:0", "cuda:1"):
            d = devices[dev]
            bar = f'.device[data-device="{dev}"] .bar'
            segs = {cls: int(page.get_attribute(f"{bar} .seg.{cls}", "data-bytes"))
                    for cls in ("others", "ours", "reserved", "free")}
            assert segs["others"] == d["used_by_others_bytes"]
            assert segs["ours"] == d["used_by_vramgate_bytes"]
            assert segs["reserved"] == max(0, d["reserved_bytes"] - d["used_by_vramgate_bytes"])
            assert sum(segs.values()) == d["total_bytes"]
            # The mark sits where the 1 GiB headroom begins: 79 of 80 GiB.
            left = page.eval_on_selector(f"{bar} .limit", "e => parseFloat(e.style.left)")
            assert left == pytest.approx(100 * 79 / 80, abs=0.01)
            assert f"{d['reserved_bytes'] / GiB:.2f} GiB" in page.inner_text(
                f'.device[data-device="{dev}"] .figures')
        # Other programs hold 64 GiB of GPU 0: the grey part is 80 % of its bar.
        width = page.eval_on_selector('.device[data-device="cuda:0"] .seg.others',
                                      "e => parseFloat(e.style.width)")
        assert width == pytest.approx(80.0, abs=0.01)
        # m went to GPU 1, n to GPU 0 (the placement example of the README): each row says so.
        assert "cuda:1" in page.inner_text('.model[data-model="m"] tr.replica')
        assert "cuda:0" in page.inner_text('.model[data-model="n"] tr.replica')
        assert "m#0" in page.inner_text('.device[data-device="cuda:1"] .figures')
        assert page.locator('.device[data-device="cpu"] .limit').count() == 0  # no headroom on RAM
        # The CPU engine's RAM shows where a GPU engine's NVML figure would.
        assert page.inner_text('.model[data-model="e"] tr.replica').count(" RAM") == 1
        assert page.errors == []


def polls(page) -> int:
    return int(page.get_attribute("#status", "data-polls") or 0)


def wait_polls(page, n: int) -> None:
    """Wait until the page has polled the state ``n`` more times."""
    page.wait_for_function("n => Number(document.getElementById('status').dataset.polls) >= n",
                           arg=polls(page) + n)


def test_cards_survive_the_polls_and_a_log_stays_open(gw):
    with browser_page(gw.url + "/ui/") as page:
        page.wait_for_selector('.model[data-model="broken"][data-state=failed]')
        card = page.query_selector('.model[data-model="m"]')
        page.focus('.model[data-model="m"] button.unload')
        page.click('.model[data-model="broken"] button.show-log')
        page.wait_for_selector('.model[data-model="broken"] pre.log')
        assert "failing at start" in page.inner_text('.model[data-model="broken"] pre.log')
        wait_polls(page, 3)
        # Nothing it shows changed: the same card, the log still open, the focus where it was.
        assert card.evaluate("e => e.isConnected")
        assert page.is_visible('.model[data-model="broken"] pre.log')
        page.click('.model[data-model="broken"] button.show-log')  # hide log
        page.wait_for_selector('.model[data-model="broken"] pre.log', state="detached")
        assert page.errors == []


def test_the_playground_refuses_what_the_server_would(gw):
    with browser_page(gw.url + "/ui/") as page:
        page.wait_for_selector('#chat-model option[value="m"]', state="attached")
        for field, value, why in (("#max-tokens", "0", "max_tokens must be"),
                                  ("#max-tokens", "1.5", "max_tokens must be"),
                                  ("#temperature", "7", "temperature must be")):
            page.fill("#max-tokens", "16")
            page.fill("#temperature", "")
            page.fill(field, value)
            page.fill("#chat-input", "hi")
            page.click("#chat-send")
            assert why in page.inner_text("#chat-stats")
            assert page.locator(".msg").count() == 0  # nothing was sent
        page.click("#tab-embed")
        page.click("#embed-send")
        assert "Type some text" in page.inner_text("#embed-result")
        assert page.errors == []


def test_the_page_works_at_an_address_outside_the_default_origins(tmp_path):
    """A gateway listening on 0.0.0.0, opened at an address the default CORS origins do not list
    (127.0.0.2 stands in for the machine's LAN address): the page's module scripts and its POSTs
    carry that Origin, and same-origin requests are never refused."""
    config = {"host": "0.0.0.0", "api_keys": ["sk-lan"], "models": [
        {"name": "m", "path": "standin:ok", "preload": True}]}
    with standin_gateway(tmp_path, config) as g:
        g.wait_states(60)
        with browser_page(f"http://127.0.0.2:{g.port}/ui/") as page:
            page.fill("#api-key", "sk-lan")
            page.click("#keys button[type=submit]")
            page.wait_for_selector('.model[data-model="m"][data-state=ready]')
            page.fill("#chat-input", "hi")
            page.click("#chat-send")
            page.wait_for_selector('.msg.assistant[data-status="done"]')
            assert page.errors == []
        # A page of another origin is still refused.
        r = httpx.post(f"http://127.0.0.2:{g.port}/v1/chat/completions", json={"model": "m"},
                       headers={"origin": "http://127.0.0.3:1234", "authorization": "Bearer sk-lan"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
