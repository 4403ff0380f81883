"""The web console in a real browser (Debian's chromium through Playwright) on a simulated GPU
layout with stand-in engines: one bar per GPU split as /admin/gpus counts it, the headroom mark at
the placement limit, each replica's placement, and no key form on a server without keys."""

from __future__ import annotations

import pytest

from tests.browser import browser_page
from tests.gateway import standin_gateway

GiB = 2**30
MODELS = [{"name": "m", "path": "standin:ok", "memory": "30GiB", "preload": True},
          {"name": "n", "path": "standin:ok", "memory": "8GiB", "preload": True},
          {"name": "e", "path": "standin:ok", "task": "embed", "device": "cpu", "preload": True}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    config = {"simulate_gpus": "1x80GiB@64GiB,1x80GiB", "gpu_headroom": "1GiB", "models": MODELS}
    with standin_gateway(tmp_path_factory.mktemp("console-gpus"), config) as g:
        assert g.wait_states(60) == {"m": "ready", "n": "ready", "e": "ready"}
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
