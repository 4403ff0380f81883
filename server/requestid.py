"""``X-Request-ID``: taken from the client (if it is a sane token) or generated, returned on every
response, forwarded to the engine, and put in the gateway's log lines about the request."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "vramgate.request_id"
_SANE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id(given: str | None) -> str:
    """The client's id when it is 1–128 safe characters, else a new one: 32 random hex digits
    (``os.urandom``; a counter would tell any client how much traffic the server sees, and
    ``uuid4`` costs an object per request for the same randomness)."""
    if given and _SANE.match(given):
        return given
    return os.urandom(16).hex()


class RequestIdMiddleware:
    """Pure-ASGI: sets ``scope["vramgate.request_id"]`` and adds the ``x-request-id`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                      if k == b"x-request-id"), None)
        rid = scope[SCOPE_KEY] = request_id(given)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)
