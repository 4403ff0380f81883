"""``X-Request-ID``: taken from the client (if it is a sane token) or generated, returned on every
response, forwarded to the engine, and put in the gateway's log lines about the request; and the
access log: the inference routes write their line themselves (``server.exchange``, with model and
tokens), every other request but the ``/health`` and ``/metrics`` probes gets one here.

A ``POST`` to an inference route (``direct``) passes through with the client's own ``send``: the
fast path (``api.InferenceFastPath``) and the key check put the header in their own responses. A
send wrapper costs a coroutine per message, 64 of them for a 64-chunk stream (issue #15)."""

from __future__ import annotations

import os
import re
import time
from typing import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.accesslog import AccessLog

SCOPE_KEY = "vramgate.request_id"
LOGGED = "vramgate.logged"  # set in the scope once a request's access-log line is written
STATUS = "vramgate.status"  # a direct request's status, set by what answered it unlogged (a 401)
PROBES = ("/health", "/metrics")  # polled every few seconds: no access-log line

_SANE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class _Random:
    """16 random bytes at a time, from ``os.urandom`` read 4 KiB at a time (a ``getrandom``
    system call per request was 0.8% of the gateway's CPU, issue #15). Only the event loop's
    thread takes from it."""

    def __init__(self) -> None:
        self._pool, self._at = b"", 0

    def take(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        self._at += 16
        return self._pool[self._at - 16:self._at]


_random = _Random()


def request_id(given: str | None) -> str:
    """The client's id when it is 1–128 safe characters, else a new one: 32 random hex digits
    (from ``os.urandom``; a counter would tell any client how much traffic the server sees, and
    ``uuid4`` costs an object per request for the same randomness)."""
    if given and _SANE.match(given):
        return given
    return _random.take().hex()


def add_id_header(scope: Scope, headers: list[tuple[bytes, bytes]]) -> None:
    """Append the ``x-request-id`` response header of the request in ``scope`` (if it has an id)
    to ``headers``: what answers a ``direct`` request does itself (module docstring)."""
    rid = scope.get(SCOPE_KEY)
    if rid:
        headers.append((b"x-request-id", rid.encode()))


class RequestIdMiddleware:
    """Pure-ASGI: sets ``scope["vramgate.request_id"]``, adds the ``x-request-id`` header (but on
    ``POST`` to the ``direct`` paths, module docstring) and writes, to ``access``, the access-log
    line of a request that did not write its own (``log_format``: ``text`` or ``json``)."""

    def __init__(self, app: ASGIApp, log_format: str = "text", access: AccessLog | None = None,
                 direct: Collection[str] = ()) -> None:
        self.app = app
        self.log_format = log_format
        self.access = access or AccessLog()
        self.direct = frozenset(direct)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                      if k == b"x-request-id"), None)
        rid = scope[SCOPE_KEY] = request_id(given)

        t0 = time.perf_counter()
        if scope["method"] == "POST" and scope["path"] in self.direct:
            try:
                await self.app(scope, receive, send)
            finally:
                if not scope.get(LOGGED):
                    self._log(scope, scope.get(STATUS, 499), t0)
            return
        status = [499]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope.get(LOGGED) and scope["path"] not in PROBES:
                self._log(scope, status[0], t0)

    def _log(self, scope: Scope, status: int, t0: float) -> None:
        self.access.write(self.log_format, request_id=scope[SCOPE_KEY], method=scope["method"],
                          route=scope["path"], status=status,
                          duration_s=round(time.perf_counter() - t0, 4))
