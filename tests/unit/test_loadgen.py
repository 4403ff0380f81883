"""The load generator's pure parts: its summary figures and report table."""

import asyncio
import json

import pytest
from aiohttp import web

from loadtest.loadgen import Result, markdown, payload, run_level, summarize


def test_summary_counts_rates_and_percentiles():
    rs = [Result(start=0, end=1.0, ok=True, ttft=0.1, itls=[0.01, 0.03], output_tokens=10),
          Result(start=0, end=3.0, ok=True, ttft=0.3, itls=[0.02], output_tokens=20),
          Result(start=0, end=9.0, ok=False, error="boom")]
    row = summarize(rs, 2.0, target="t", concurrency=2)
    assert (row["requests"], row["errors"], row["req_per_s"], row["output_tok_per_s"]) == (3, 1, 1.0, 15.0)
    assert row["ttft_p50_s"] == pytest.approx(0.2) and row["e2e_p50_s"] == pytest.approx(2.0)
    assert row["itl_p50_s"] == pytest.approx(0.02) and row["itl_p99_s"] == pytest.approx(0.0298)
    table = markdown([row])
    assert "| t | 2 | 3 | 1 | 1.00 | 15.0 | 200.0 |" in table  # rates as they are, TTFT p50 in ms
    assert summarize([], 1.0)["ttft_p50_s"] is None


def test_streams_are_timed_per_chunk_and_usage_is_read():
    """Against a tiny SSE server: TTFT, ITL and tokens come from the stream itself."""
    async def handler(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
            await asyncio.sleep(0.02)
        assert body["stream_options"] == {"include_usage": True}
        await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3}}\n\n'
                         b"data: [DONE]\n\n")
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await run_level(f"http://127.0.0.1:{port}/v1/chat/completions",
                                   lambda i: payload("m", "chat", True, 3, "hi", True),
                                   concurrency=2, requests=4)
        finally:
            await runner.cleanup()

    results, wall = asyncio.run(go())
    assert len(results) == 4 and all(r.ok and r.output_tokens == 3 for r in results)
    assert all(len(r.itls) == 2 and min(r.itls) >= 0.015 for r in results)
    assert json.dumps(payload("m", "completions", False, 5, "p", False)) == \
        '{"model": "m", "max_tokens": 5, "temperature": 0, "stream": false, "prompt": "p"}'


def test_ceiling_large_body_context_and_added_latency_ratios():
    import json

    from loadtest.ceiling import added_ratios, context
    for kb in (64, 512):
        text = context(kb)
        assert len(text) == kb * 1024 and '"' in text and "\n" in text
        assert len(json.dumps(text)) > len(text)  # it has escapes to decode
    latency = [{"target": "vramgate", "mode": "plain, 64 KB body", "added_s": 0.003},
               {"target": "floor", "mode": "plain, 64 KB body", "added_s": 0.002},
               {"target": "floor", "mode": "stream (first chunk)", "added_s": 0.0}]
    assert added_ratios(latency, "floor") == {
        "plain, 64 KB body: added latency, vramgate ÷ floor": 1.5}


def test_side_by_side_reports_each_modes_median_ratio():
    from loadtest.sidebyside import report
    rows = [{"mode": "plain", "a": {"cpu_us_per_request": 300.0, "errors": 0},
             "b": {"cpu_us_per_request": 300.0 * k, "errors": 0}, "per_core_ratio": k}
            for k in (1.0, 1.1, 1.3)]
    text = report(rows, ["a", "b"])
    assert "| plain | 300 | 330 | 1.100 | 0 / 0 |" in text
    assert "- plain: req/s per core, a ÷ b: **1.10×** (median of 3 rounds, 1.00–1.30)" in text
    assert "stream" not in text
