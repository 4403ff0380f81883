"""The request service without HTTP in front of it (as a batch runner calls it): a scheduler with a
fake engine whose API is a small in-process aiohttp server, no gateway."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from server.auth import ApiKey
from server.books import ModelState
from server.errors import RateLimited
from server.metrics import Metrics
from server.proxy import new_session
from server.service import Call, Service
from server.validation import validate
from tests.unit.test_scheduler import make_pool, model, settle

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def engine_app(seen: list) -> web.AppRunner:
    async def chat(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    return runner


def call(key=None, priority=None) -> Call:
    raw = json.dumps(BODY).encode()
    return Call("/v1/chat/completions", raw, validate("/v1/chat/completions", dict(BODY)),
                model("m", max_model_len=64), key=key, priority=priority, request_id="rid-1")


def test_a_call_is_served_recorded_once_and_rate_limited_without_http(caplog):
    async def go():
        seen: list = []
        runner = await engine_app(seen)
        pool, _, _, engines = make_pool([model("m")])
        (await pool.acquire("m")).release()  # the fake engine is up: serve its URL for real
        port = int(engines["m"].base_url.rsplit(":", 1)[1])
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        session = new_session()
        metrics = Metrics({"m": ("/v1/chat/completions",)}, [s.value for s in ModelState])
        service = Service(pool, metrics, session)
        key = ApiKey("sk-x", name="batch", rpm=1)
        try:
            with caplog.at_level(logging.INFO, logger="vramgate.access"):
                answer = await service.serve(call(key, priority=10))
            assert answer.status == 200 and json.loads(answer.body)["choices"][0]["message"]["content"] == "ok"
            assert seen[0]["model"] == "m" and seen[0]["max_tokens"] == 2
            lines = [r.getMessage() for r in caplog.records if "rid-1" in r.getMessage()]
            assert len(lines) == 1 and "status=200" in lines[0] and "key=batch" in lines[0]
            assert "completion_tokens=2" in lines[0]
            assert 'vramgate_requests_total{model="m",route="/v1/chat/completions",status_class="2xx"} 1.0' \
                in metrics.render().decode()
            with pytest.raises(RateLimited):  # rpm 1: the key's second call in the minute
                await service.serve(call(key))
            assert 'status_class="4xx"} 1.0' in metrics.render().decode()
            retried = call(key)
            retried.retried = True  # the batch runner tries again later: no record of it
            with pytest.raises(RateLimited):
                await service.serve(retried)
            assert 'status_class="4xx"} 1.0' in metrics.render().decode()
            assert 'reason="rate_limit_exceeded"} 1.0' in metrics.render().decode()
            await settle()
            assert pool.models()["m"].in_flight == 0  # every lease went back
        finally:
            await session.close()
            await runner.cleanup()
            await pool.stop_all()
    asyncio.run(go())
