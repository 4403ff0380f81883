"""API keys: who may call which route (a pure-ASGI middleware and the pure rules behind it).

Rules, checked on the *normalised* path (lower case, repeated slashes collapsed, trailing slash
dropped), so ``/V1//chat/completions/`` is judged like ``/v1/chat/completions`` (cases C20):

- ``/health``, ``/openapi.json`` and the console's static files (``/ui``, ``/ui/...``) are always
  open; ``/metrics`` unless ``metrics_auth`` is set;
- ``/admin/...`` needs the admin key (or, when no admin key is set, any API key);
- every other path, known or not, needs an API key once any key is configured.

Keys come as ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as the ``anthropic`` client
sends them) and are compared in constant time against every
configured key (``hmac.compare_digest``). A key never appears in logs, metrics, reprs or errors.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthError, anthropic_body
from server.requestid import STATUS, add_id_header

SCOPE_KEY = "vramgate.api_key"


@dataclass(frozen=True)
class ApiKey:
    """One API key. ``name`` labels it in logs (never the key itself); ``models`` (canonical names
    or aliases) limits what it may use, ``None`` = every model; ``rpm`` caps its requests a minute."""

    key: str = field(repr=False)
    name: str = "key"
    models: tuple[str, ...] | None = None
    rpm: int | None = None


@dataclass(frozen=True)
class AuthConfig:
    """Keys and who needs them. Empty ``api_keys`` and no ``admin_key``: everything is open."""

    api_keys: tuple[ApiKey, ...] = ()
    admin_key: str | None = field(default=None, repr=False)
    metrics_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_key)


def normalize_path(path: str) -> str:
    """``/V1//chat/completions/`` → ``/v1/chat/completions`` (the form the rules are written for)."""
    out = re.sub(r"/{2,}", "/", path.lower())
    return out.rstrip("/") or "/"


def required(auth: AuthConfig, path: str) -> str:
    """What ``path`` needs: ``none``, ``api`` (any API key) or ``admin``."""
    p = normalize_path(path)
    if not auth.enabled or p in ("/health", "/openapi.json", "/ui") or p.startswith("/ui/") or (
            p == "/metrics" and not auth.metrics_auth):
        return "none"
    if p == "/admin" or p.startswith("/admin/"):
        return "admin" if auth.admin_key else "api"
    return "api"


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check(auth: AuthConfig, path: str, header: str | None, need: str | None = None) -> ApiKey | None:
    """The key allowing this request (``None`` when none is needed); raises :class:`AuthError`.
    ``need``: :func:`required`'s answer for ``path``, when the caller has it already."""
    need = need or required(auth, path)
    if need == "none":
        return None
    token = bearer(header)
    if token is None:
        raise AuthError("Missing API key: send it as 'Authorization: Bearer <key>'.")
    if need == "admin":
        if auth.admin_key is not None and _same(token, auth.admin_key):
            return ApiKey(auth.admin_key, name="admin")
        raise AuthError("This route needs the admin key.")
    found = None
    for key in auth.api_keys:  # compare with every key: the time taken says nothing
        if _same(token, key.key) and found is None:
            found = key
    if found is None and auth.admin_key is not None and _same(token, auth.admin_key):
        found = ApiKey(auth.admin_key, name="admin")
    if found is None:
        raise AuthError("Incorrect API key provided.")
    return found


def allowed(key: ApiKey | None, model_names: tuple[str, ...]) -> bool:
    """May ``key`` use a model known by any of ``model_names`` (its name and aliases)?"""
    return key is None or key.models is None or any(n in key.models for n in model_names)


class AuthMiddleware:
    """Pure-ASGI middleware applying :func:`check` to every HTTP request (streams untouched).

    The allowing key is put in ``scope["vramgate.api_key"]`` for the route's model allowlist.
    """

    def __init__(self, app: ASGIApp, auth: AuthConfig) -> None:
        self.app = app
        self.auth = auth
        # What each path needs, worked out once (a regex per request otherwise); bounded, since
        # a client chooses the path.
        self.need = functools.lru_cache(maxsize=1024)(lambda path: required(auth, path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.enabled:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
            if name == b"x-api-key" and header is None:  # the anthropic client's way
                header = "Bearer " + value.decode("latin-1")
        try:
            scope[SCOPE_KEY] = check(self.auth, scope["path"], header, self.need(scope["path"]))
        except AuthError as exc:
            anthropic = normalize_path(scope["path"]).startswith("/v1/messages")
            body = json.dumps(anthropic_body(401, exc.message) if anthropic else exc.envelope()).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()),
                       (b"www-authenticate", b"Bearer")]
            headers += [(k.encode(), v.encode()) for k, v in exc.headers().items()]
            add_id_header(scope, headers)  # a direct request's send adds none (server.requestid)
            scope[STATUS] = 401
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
