"""``X-Request-ID``: taken from the client (if it is a sane token) or generated, returned on every
response, forwarded to the engine, and put in the gateway's log lines about the request; and the
access log: the inference routes write their line themselves (``server.exchange``, with model and
tokens), every other request but the ``/health`` and ``/metrics`` probes gets one here."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "vramgate.request_id"
LOGGED = "vramgate.logged"  # set in the scope once a request's access-log line is written
PROBES = ("/health", "/metrics")  # polled every few seconds: no access-log line
access = logging.getLogger("vramgate.access")


def access_line(fmt: str, **fields: Any) -> str:
    """One access-log line: ``json`` (one object) or ``text`` (``key=value`` pairs); fields that
    are ``None`` are left out."""
    kept = {k: v for k, v in fields.items() if v is not None}
    if fmt == "json":
        return json.dumps(kept, separators=(",", ":"))
    return " ".join(f"{k}={v}" for k, v in kept.items())

_SANE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def request_id(given: str | None) -> str:
    """The client's id when it is 1–128 safe characters, else a new one: 32 random hex digits
    (``os.urandom``; a counter would tell any client how much traffic the server sees, and
    ``uuid4`` costs an object per request for the same randomness)."""
    if given and _SANE.match(given):
        return given
    return os.urandom(16).hex()


class RequestIdMiddleware:
    """Pure-ASGI: sets ``scope["vramgate.request_id"]``, adds the ``x-request-id`` header and
    writes the access-log line of a request that did not write its own (``log_format``: ``text``
    or ``json``)."""

    def __init__(self, app: ASGIApp, log_format: str = "text") -> None:
        self.app = app
        self.log_format = log_format

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                      if k == b"x-request-id"), None)
        rid = scope[SCOPE_KEY] = request_id(given)

        t0, status = time.perf_counter(), [499]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope.get(LOGGED) and scope["path"] not in PROBES and access.isEnabledFor(logging.INFO):
                access.info(access_line(self.log_format, request_id=rid, method=scope["method"],
                                        route=scope["path"], status=status[0],
                                        duration_s=round(time.perf_counter() - t0, 4)))
