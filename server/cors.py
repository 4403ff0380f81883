"""CORS for browser and webview clients: on by default for local origins, as Ollama does.

Allowed without any configuration (what Ollama allows by default): loopback origins on any port,
``http(s)://localhost``, ``127.0.0.1`` and ``[::1]``, and the schemes of desktop-app and editor
webviews, ``app://``, ``tauri://`` (and ``http(s)://tauri.localhost``), ``vscode-webview://``,
``vscode-file://``. ``cors_origins`` adds origins (``*`` inside one matches any characters, so
``https://*.example.com`` works); ``["*"]`` allows every origin.

Starlette's ``CORSMiddleware`` does the work; this subclass answers an allowed preflight with 204
(no body) and a refused one with 403 and no ``Access-Control-Allow-*`` header, instead of its 200
and 400. Being the outermost layer, it also puts the CORS headers on errors, a 401 included, so a
browser client can read why it was refused.
"""

from __future__ import annotations

import re
from typing import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp

LOCAL_ORIGINS = (r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?",
                 r"https?://tauri\.localhost(:\d+)?",
                 r"(app|tauri|vscode-webview|vscode-file)://[^\s]*")
EXPOSE = ("x-request-id", "retry-after", "x-vramgate-max-tokens")


def origin_pattern(extra: Sequence[str]) -> str:
    """One regular expression matching the local origins and each of ``extra`` (where ``*``
    matches any run of characters and everything else is literal)."""
    added = ["[^\\s]*".join(re.escape(part) for part in origin.split("*")) for origin in extra]
    return "|".join(f"(?:{p})" for p in (*LOCAL_ORIGINS, *added))


class Cors(CORSMiddleware):
    """The gateway's CORS layer (see the module docstring). ``origins`` is ``cors_origins``."""

    def __init__(self, app: ASGIApp, origins: Sequence[str] = ()) -> None:
        any_origin = "*" in origins
        super().__init__(app, allow_origins=["*"] if any_origin else [],
                         allow_origin_regex=None if any_origin else origin_pattern(origins),
                         allow_methods=["*"], allow_headers=["*"], allow_private_network=True,
                         expose_headers=EXPOSE)

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
