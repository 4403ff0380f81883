"""End to end: the web console at /ui in a real browser (Debian's chromium, driven by Playwright's
Python package through ``executable_path``), against the real gateway on the embedded models with
API keys and an admin key configured.

The page loads without a console error, shows both models and the CPU device, streams a chat from
the playground, and its stop button cancels the request on the engine (vLLM's running requests
return to 0); unload and load change the state shown. A screenshot is written to
``tests/output/console.png`` (a CI artefact, not committed).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from server.models import CHAT_MODEL, EMBED_MODEL, ensure_prepared
from tests.browser import browser_page
from tests.gateway import Gateway, embedded_data_dir, wait_for

pytestmark = pytest.mark.e2e
OUTPUT = Path(__file__).resolve().parents[1] / "output"
API_KEY, ADMIN_KEY = "console-user-key", "console-admin-key"
LONG_PROMPT = "Write a very long story about a dragon who learns to sing, at least 3000 words."


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data_dir = embedded_data_dir()
    ensure_prepared(data_dir)
    models = data_dir / "models"
    config = {"api_keys": [API_KEY], "admin_key": ADMIN_KEY, "traffic_interval": 1,
              "models": [{"name": CHAT_MODEL, "path": str(models / CHAT_MODEL), "preload": True,
                          "aliases": ["smollm2"]},
                         {"name": EMBED_MODEL, "path": str(models / EMBED_MODEL), "task": "embed",
                          "preload": True}]}
    gateway = Gateway(tmp_path_factory.mktemp("console"), config, data_dir=data_dir)
    try:
        gateway.wait_up(60)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def page(gw):
    with browser_page(gw.url + "/ui") as pg:
        yield pg
        OUTPUT.mkdir(exist_ok=True)
        pg.screenshot(path=str(OUTPUT / "console.png"), full_page=True)


def admin(gw: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def engine_running(gw: Gateway, model: str) -> float | None:
    """vLLM's ``vllm:num_requests_running`` for ``model``, from the gateway's /metrics."""
    text = gw.client.get("/metrics").text
    found = re.findall(r'^vllm:num_requests_running\{[^}]*model="%s"[^}]*\} (\S+)$' % re.escape(model),
                       text, re.M)
    return float(found[0]) if found else None


def test_page_asks_for_the_key_then_shows_both_models_and_the_cpu(gw, page):
    page.wait_for_selector("#status[data-state=error]")  # no key yet: it asks, it does not 401
    assert "needs a key" in page.inner_text("#status")
    page.fill("#api-key", API_KEY)
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#keys button[type=submit]")
    page.wait_for_selector(f'.model[data-model="{CHAT_MODEL}"]')
    page.wait_for_selector(f'.model[data-model="{EMBED_MODEL}"]')
    page.wait_for_selector('.device[data-device="cpu"]')
    assert "CPU RAM" in page.inner_text('.device[data-device="cpu"]')
    # Both load (preloaded) and the page follows them to ready; the CPU bar holds our engines.
    page.wait_for_selector(f'.model[data-model="{CHAT_MODEL}"][data-state=ready]', timeout=400_000)
    page.wait_for_selector(f'.model[data-model="{EMBED_MODEL}"][data-state=ready]', timeout=400_000)
    with admin(gw) as client:
        cpu = next(d for d in client.get("/admin/gpus").json()["devices"] if d["id"] == "cpu")
    assert page.get_attribute('.device[data-device="cpu"] .seg.ours', "data-bytes") is not None
    assert f"reserved {cpu['reserved_bytes'] / 2**30:.2f} GiB" in page.inner_text(
        '.device[data-device="cpu"] .figures')
    assert page.errors == []


def test_chat_streams_and_stop_cancels_on_the_engine(gw, page):
    page.wait_for_selector(f'.model[data-model="{CHAT_MODEL}"][data-state=ready]')
    page.select_option("#chat-model", CHAT_MODEL)
    page.fill("#max-tokens", "3000")
    page.fill("#chat-input", LONG_PROMPT)
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").last
    # Text arrives piece by piece while the request runs on the engine.
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant .text')].pop();"
        " return m && m.textContent.length > 40; }", timeout=120_000)
    assert answer.get_attribute("data-status") == "streaming"
    first = len(answer.inner_text())
    page.wait_for_function(
        "n => [...document.querySelectorAll('.msg.assistant .text')].pop().textContent.length > n",
        arg=first + 10, timeout=60_000)
    assert wait_for(lambda: engine_running(gw, CHAT_MODEL) == 1.0, 30)
    page.click("#chat-stop")
    page.wait_for_selector('.msg.assistant[data-status="stopped"]')
    # The engine stops generating: its running requests return to 0, the gateway's too.
    assert wait_for(lambda: engine_running(gw, CHAT_MODEL) == 0.0, 30), gw.client.get("/metrics").text[-2000:]
    with admin(gw) as client:
        assert wait_for(lambda: next(m for m in client.get("/admin/models").json()["data"]
                                     if m["id"] == CHAT_MODEL)["in_flight"] == 0, 10)
    assert page.is_enabled("#chat-send") and not page.is_enabled("#chat-stop")
    assert "3000" in page.inner_text("#code-curl") and "max_tokens=3000" in page.inner_text("#code-python")
    assert page.errors == []


def test_a_short_chat_completes_and_its_tokens_are_counted(gw, page):
    page.fill("#max-tokens", "24")
    page.fill("#chat-input", "Say hello")
    page.click("#chat-send")
    page.wait_for_selector('.msg.assistant[data-status="done"]', timeout=120_000)
    assert page.locator(".msg.assistant").last.inner_text().strip() != "assistant"
    assert re.match(r"\d+ tokens in [\d.]+ s · TTFT [\d.]+ s", page.inner_text("#chat-stats"))
    with admin(gw) as client:  # the traffic series counts its output tokens
        assert wait_for(lambda: any((v or 0) > 0 for v in client.get("/console/traffic").json()[
            "models"][CHAT_MODEL]["tok_s"]), 15)
    assert page.errors == []


def test_embeddings_tab_shows_size_and_norm(page):
    page.click("#tab-embed")
    page.select_option("#embed-model", EMBED_MODEL)
    page.fill("#embed-input", "The quick brown fox")
    page.click("#embed-send")
    page.wait_for_selector(".embed-size")
    assert page.inner_text(".embed-size") == "size 384"
    norm = float(page.inner_text(".embed-norm").split()[1])
    assert 0.5 < norm < 2.0
    assert "client.embeddings.create" in page.inner_text("#code-python")
    page.click("#tab-chat")
    assert page.errors == []


def test_traffic_charts_show_the_chat(gw, page):
    # The chat above was counted: the traffic series has a non-zero request rate for it.
    with admin(gw) as client:
        assert wait_for(lambda: any((v or 0) > 0 for v in client.get("/console/traffic").json()[
            "models"].get(CHAT_MODEL, {}).get("req_s", [])), 15)
    page.wait_for_selector("#charts .chart[data-figure=req_s] canvas")
    assert CHAT_MODEL in page.inner_text("#chart-legend")
    assert page.errors == []


def test_unload_then_load_changes_the_state_shown(gw, page):
    card = f'.model[data-model="{EMBED_MODEL}"]'
    page.click(f"{card} button.unload")
    page.wait_for_selector(f"{card}[data-state=unloaded]", timeout=60_000)
    assert "unloaded in" in page.inner_text(f"{card} .result-line")
    assert gw.states()[EMBED_MODEL] == "unloaded"
    # Record every progress step the page shows while the engine starts (each poll re-renders).
    page.evaluate("""card => { window.steps = []; new MutationObserver(() => {
        const el = document.querySelector(card + ' .loading[data-step]');
        if (el) window.steps.push(Number(el.dataset.step)); }).observe(
        document.getElementById('models'), {childList: true, subtree: true}); }""", card)
    page.click(f"{card} button.load")
    page.wait_for_selector(f"{card}[data-state=loading]", timeout=30_000)
    page.wait_for_selector(f"{card}[data-state=ready]", timeout=300_000)
    assert "loaded in" in page.inner_text(f"{card} .result-line")
    # The bar followed vLLM's own start phases: it moved on, never back, within the 7 steps.
    steps = page.evaluate("window.steps")
    # This is the model's second start in its log: the first start's lines must not count.
    assert steps == sorted(steps) and max(steps) <= 7 and any(1 <= s < 7 for s in steps), steps
    assert gw.states()[EMBED_MODEL] == "ready"
    assert page.errors == []
