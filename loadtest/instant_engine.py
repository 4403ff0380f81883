"""An engine that answers at once: the stand-in behind the gateway-ceiling benchmark.

Speaks enough of vLLM's OpenAI server for a proxy in front of it: ``/health``, ``/metrics``,
``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (non-streamed, or ``CHUNKS``
content chunks, the usage chunk on request, then ``[DONE]``). Started by the gateway exactly like
vLLM (``engine_module: loadtest.instant_engine``) or by hand for another proxy:

    python -m loadtest.instant_engine --model x --served-model-name instant --port 9001

``INSTANT_CHUNKS`` (default 16) sets the chunks per stream. Every answer is pre-encoded: the
engine does as little per request as aiohttp allows, so the proxy in front is what is measured.

For the concurrency benchmark (``loadtest/streams.py``), ``INSTANT_HOLD=1`` holds every stream
after its first chunk until ``POST /release``: then N streams are open at once, mid-answer, for as
long as the benchmark needs to measure them. ``GET /held`` tells how many wait. The listen backlog
is 8,192 so that thousands of connections arriving at once are queued, not refused.
``INSTANT_CHUNK_DELAY`` (seconds, default 0) spaces the chunks, so that a client can hang up in
the middle of a stream (``loadtest/soak.py``); ``/v1/embeddings`` answers a fixed 384-dimension
vector.

Given ``--uds PATH`` (the gateway's default, ``engine_transport: unix``), it listens there, and
also on ``127.0.0.1:$INSTANT_TCP_PORT`` when that is set: the benchmarks' direct path, which a
real vLLM engine on a socket would not have.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web

CHUNKS = int(os.environ.get("INSTANT_CHUNKS", "16"))
HOLD = os.environ.get("INSTANT_HOLD", "") == "1"
CHUNK_DELAY = float(os.environ.get("INSTANT_CHUNK_DELAY", "0"))  # seconds between chunks (soak)
EMBED_DIM = 384


def dumps(obj: object) -> bytes:
    """Compact JSON, as vLLM writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()


def build(name: str) -> dict[str, bytes]:
    """Every answer's bytes, made once."""
    created = int(time.time())
    usage = {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS}
    out: dict[str, bytes] = {"embedding": dumps({
        "object": "list", "model": name, "usage": {"prompt_tokens": 4, "total_tokens": 4},
        "data": [{"object": "embedding", "index": 0, "embedding": [0.05] * EMBED_DIM}]})}
    for kind, obj, delta in (("chat", "chat.completion", None), ("text", "text_completion", None)):
        choice = ({"index": 0, "message": {"role": "assistant", "content": "tok " * CHUNKS},
                   "finish_reason": "length"} if kind == "chat" else
                  {"index": 0, "text": "tok " * CHUNKS, "finish_reason": "length"})
        out[kind] = dumps({"id": "x", "object": obj, "created": created, "model": name,
                           "choices": [choice], "usage": usage})
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        chunks = []
        for i in range(CHUNKS):
            c = ({"index": 0, "delta": {"content": "tok "}, "finish_reason": None} if kind == "chat"
                 else {"index": 0, "text": "tok ", "finish_reason": None})
            if i == CHUNKS - 1:
                c["finish_reason"] = "length"
            chunks.append(b"data: " + dumps({"id": "x", "object": chunk_obj, "created": created,
                                             "model": name, "choices": [c]}) + b"\n\n")
        out[kind + "_chunks"] = chunks  # type: ignore[assignment]
        out[kind + "_usage"] = b"data: " + dumps({"id": "x", "object": chunk_obj, "created": created,
                                                  "model": name, "choices": [], "usage": usage}) + b"\n\n"
    return out


def app_for(name: str) -> web.Application:
    answers = build(name)
    gate = {"event": asyncio.Event(), "held": 0}  # INSTANT_HOLD: the streams wait on the event

    async def held(_: web.Request) -> web.Response:
        return web.json_response({"held": gate["held"]})

    async def release(_: web.Request) -> web.Response:
        gate["event"].set()
        gate["event"] = asyncio.Event()  # the next wave waits again
        return web.json_response({"released": True})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/plain")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        kind = "chat" if request.path.endswith("chat/completions") else "text"
        if not body.get("stream"):
            return web.Response(body=answers[kind], content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, chunk in enumerate(answers[kind + "_chunks"]):  # type: ignore[union-attr]
            if CHUNK_DELAY and i:
                await asyncio.sleep(CHUNK_DELAY)
            await resp.write(chunk)
            if HOLD and i == 0:
                event = gate["event"]
                gate["held"] += 1
                try:
                    await event.wait()
                finally:
                    gate["held"] -= 1
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(answers[kind + "_usage"])
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embed(_: web.Request) -> web.Response:
        return web.Response(body=answers["embedding"], content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/embeddings", embed)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/held", held)
    app.router.add_post("/release", release)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--uds")  # a Unix socket path, as vLLM's --uds: host and port are ignored then
    args, _ = p.parse_known_args()  # vLLM's other flags are accepted and ignored
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    where = {"path": args.uds} if args.uds else {"host": args.host, "port": args.port}
    if args.uds and os.environ.get("INSTANT_TCP_PORT"):  # a direct path for the benchmarks too
        where.update(host="127.0.0.1", port=int(os.environ["INSTANT_TCP_PORT"]))
    web.run_app(app_for(args.served_model_name), **where, print=None,
                access_log=None, backlog=8192)


if __name__ == "__main__":
    main()
