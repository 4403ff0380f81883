"""The floor: the least a Python proxy can do (raw ASGI on uvicorn, aiohttp to the engine, no
routing, no parsing, no checks). The ceiling benchmark measures it beside the gateway, so the
gateway's figures read against what this machine allows any Python proxy, not an absolute.

    python -m loadtest.floor_proxy --upstream http://127.0.0.1:9001 --port 9002
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn

state: dict = {}


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["session"] = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            else:
                await state["session"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    async with state["session"].request(scope["method"], state["upstream"] + scope["path"], data=body,
                                        headers={"content-type": "application/json"}) as resp:
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [(b"content-type", resp.headers["content-type"].encode())]})
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    state["upstream"] = args.upstream.rstrip("/")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
