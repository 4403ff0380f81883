"""The floor: the least a Python proxy can do with the usual parts (raw ASGI on uvicorn, aiohttp
to the engine, no routing, no parsing, no checks). The ceiling benchmark measures it beside the
gateway, so the gateway's figures read against what this machine allows such a proxy, not an
absolute. (The gateway's own client of local engines, ``server/engineclient.py``, costs less than
aiohttp's: a proxy can go below this floor.)

    python -m loadtest.floor_proxy --upstream http://127.0.0.1:9001 --port 9002
    python -m loadtest.floor_proxy --upstream-uds /tmp/engine.sock --port 9002   # as the gateway

With ``--upstream-uds`` it reaches the engine over that Unix socket, as the gateway reaches its
engines by default, so the two compare on the same transport (``sidebyside --baseline floor-uds``).
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
                connector = (aiohttp.UnixConnector(state["uds"], limit=0) if state["uds"]
                             else aiohttp.TCPConnector(limit=0))
                state["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
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
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--upstream")
    where.add_argument("--upstream-uds")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    state["upstream"] = (args.upstream or "http://engine").rstrip("/")
    state["uds"] = args.upstream_uds
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
