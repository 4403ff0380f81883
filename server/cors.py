"""Which browsers and hosts may talk to the gateway: CORS for local origins by default, as Ollama
does, refusal of every other origin, and a Host check against DNS rebinding.

Allowed without any configuration (what Ollama allows by default): loopback origins on any port,
``http(s)://localhost``, ``127.0.0.1`` and ``[::1]``, and the schemes of desktop-app and editor
webviews, ``app://``, ``tauri://`` (and ``http(s)://tauri.localhost``), ``vscode-webview://``,
``vscode-file://``. ``cors_origins`` adds origins (``*`` inside one matches any characters, so
``https://*.example.com`` works); ``["*"]`` allows every origin.

Starlette's ``CORSMiddleware`` does the work; this subclass answers an allowed preflight with 204
(no body) and a refused one with 403 and no ``Access-Control-Allow-*`` header, instead of its 200
and 400. Being the outermost layer, it also puts the CORS headers on errors, a 401 included, so a
browser client can read why it was refused.

Withholding CORS headers only stops a page from *reading* an answer; a "simple" cross-site request
(``Content-Type: text/plain``, no preflight) would still be carried out. So, as Ollama does, any
request whose ``Origin`` is not allowed is refused with 403 before it reaches a route, unless it is
same-origin: its ``Origin`` names the very host and port of its ``Host`` header, as the web console's
calls do when it is opened at any address of this server. And when the
gateway listens on loopback, a request whose ``Host`` is not a loopback name, an IP address or this
machine's name is refused too (a DNS-rebinding page reaches 127.0.0.1 under its own name);
``allowed_hosts`` adds names (a reverse proxy's), ``["*"]`` turns the check off.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import socket
from typing import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import anthropic_body, error_body

LOCAL_ORIGINS = (r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?",
                 r"https?://tauri\.localhost(:\d+)?",
                 r"(app|tauri|vscode-webview|vscode-file)://[^\s]*")
log = logging.getLogger("vramgate.cors")
EXPOSE = ("x-request-id", "retry-after", "x-vramgate-max-tokens", "server-timing")


LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it: lower case, no trailing slash."""
    return origin.strip().rstrip("/").lower()


def origin_pattern(extra: Sequence[str]) -> str:
    """One regular expression matching the local origins and each of ``extra`` (where ``*``
    matches any run of characters and everything else is literal; written in any case, with or
    without a trailing slash)."""
    added = ["[^\\s]*".join(re.escape(part) for part in normalize_origin(origin).split("*"))
             for origin in extra]
    return "|".join(f"(?:{p})" for p in (*LOCAL_ORIGINS, *added))


def same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the host and port of the ``Host``
    header ``host``: a page served by this server calling it back (browsers send ``Origin`` on
    same-origin POSTs too). The scheme is not compared: behind a TLS proxy the page is https and
    the request reaching us http."""
    parts = urlsplit(normalize_origin(origin))
    return bool(parts.scheme in ("http", "https") and parts.netloc and
                parts.netloc == host.strip().lower())


def host_allowed(host: str, extra: Sequence[str], machine: Sequence[str]) -> bool:
    """Whether a ``Host`` header names this machine: an IP address, ``localhost`` or
    ``*.localhost``, one of ``machine`` (its host names) or of ``extra`` (``allowed_hosts``)."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return (name == "localhost" or name.endswith(".localhost") or name in machine
            or name in (h.lower() for h in extra))


def _refusal(path: str, message: str, code: str) -> Response:
    log.warning("refused %s: %s", path, message)
    body = anthropic_body(403, message) if path.lower().startswith("/v1/messages") else \
        error_body(message, "permission_error", None, code)
    return Response(json.dumps(body), status_code=403, media_type="application/json",
                    headers={"vary": "Origin"})


class Cors(CORSMiddleware):
    """The gateway's browser and host checks (see the module docstring). ``origins`` is
    ``cors_origins``; ``hosts`` is ``allowed_hosts``, and ``check_host`` is whether the gateway
    listens on loopback."""

    def __init__(self, app: ASGIApp, origins: Sequence[str] = (), hosts: Sequence[str] = (),
                 check_host: bool = False) -> None:
        any_origin = "*" in origins
        super().__init__(app, allow_origins=["*"] if any_origin else [],
                         allow_origin_regex=None if any_origin else origin_pattern(origins),
                         allow_methods=["*"], allow_headers=["*"], allow_private_network=True,
                         expose_headers=EXPOSE)
        self.hosts = tuple(hosts)
        self.check_host = check_host and "*" not in self.hosts
        machine = socket.gethostname().lower()
        self.machine = (machine, socket.getfqdn(machine).lower())
        # Every request asks about the same Host or two; bounded, since a client chooses it.
        self.host_ok = functools.lru_cache(maxsize=256)(
            lambda host: host_allowed(host, self.hosts, self.machine))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            origin = host = None
            for name, value in scope["headers"]:  # one pass, the first of each, as Headers.get
                if name == b"host" and host is None:  # (ASGI servers lower-case the names)
                    host = value.decode("latin-1")
                elif name == b"origin" and origin is None:
                    origin = value.decode("latin-1")
            host = host or ""
            if self.check_host and not self.host_ok(host):
                await _refusal(scope["path"], f"Host '{host}' is not allowed: this server "
                               "listens on loopback (allowed_hosts adds names).",
                               "host_not_allowed")(scope, receive, send)
                return
            if origin is not None and not self.is_allowed_origin(origin) and \
                    not same_origin(origin, host):
                await _refusal(scope["path"], f"Origin '{origin}' is not allowed (cors_origins "
                               "adds origins).", "origin_not_allowed")(scope, receive, send)
                return
            if origin is None and scope["method"] == "POST":
                # No Origin, no CORS headers to add; a POST answer is not cached, so it needs no
                # ``Vary: Origin`` either. Skipping Starlette's send wrapper saves about 5% of the
                # gateway's CPU per inference request (py-spy, loadtest/README.md).
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        """204 with the allow headers, or 403 without any of them."""
        answer = super().preflight_response(request_headers)
        if answer.status_code == 200:
            return Response(status_code=204, headers={
                k: v for k, v in answer.headers.items() if k.lower() not in ("content-length",
                                                                            "content-type")})
        reason = answer.body.decode(errors="replace")
        return PlainTextResponse(f"{reason}: {request_headers['origin']}", status_code=403,
                                 headers={"vary": "Origin"})
