"""The web console: ``GET /ui`` serves the static page shipped in ``server/ui`` (no key needed, a
Content-Security-Policy that allows no inline script and no other origin), and the page polls two
data routes that need an API key like ``/v1`` does:

- ``GET /console/state``: the models the key may use, each with its replicas (``/admin/models``'s
  fields, plus a starting engine's phase read from its log, ``server.startphases``, and a CPU
  engine's RAM, ``ram_bytes``), the devices
  (``/admin/gpus``'s figures) and what the key may do (``admin``: load and unload);
- ``GET /console/traffic``: the last 15 minutes of per-model rates (``server.traffic``).

``GET /ui/config.json`` (open) tells the page which keys the server asks for.

Load, unload and logs go to the ``/admin`` routes, with the admin key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path
from typing import Any, Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admin import inventory_view, model_object
from server.auth import SCOPE_KEY, ApiKey, AuthConfig, allowed
from server.books import ModelState, ModelView
from server.errors import NvmlError
from server.gpus.cpu import memory_bytes, tree_pids
from server.startphases import start_phase

UI_DIR = Path(__file__).parent / "ui"
LOG_READ_BYTES = 512 * 1024  # enough of a starting engine's log to hold every start marker
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
UI_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
              (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
              (b"cache-control", b"no-cache"))


class SecureHeaders:
    """Pure-ASGI wrapper that adds :data:`UI_HEADERS` to every response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *UI_HEADERS]
            await send(message)
        await self.app(scope, receive, send_secured)


def can_admin(auth: AuthConfig, key: ApiKey | None) -> bool:
    """Whether the caller holding ``key`` may use the ``/admin`` routes (see ``server.auth``)."""
    if not auth.enabled or auth.admin_key is None:
        return True
    return key is not None and hmac.compare_digest(key.key.encode(), auth.admin_key.encode())


def _log_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - LOG_READ_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def start_phases(views: Iterable[ModelView]) -> dict[str, dict[str, Any]]:
    """``{"model#replica": {"step", "steps", "phase"}}`` of each loading replica with a log.
    Blocking reads: call in a thread."""
    return {r.key: start_phase(_log_text(r.log_path)).as_dict()
            for m in views for r in m.replicas
            if r.state == ModelState.LOADING and r.log_path}


def cpu_memory(views: Iterable[ModelView]) -> dict[str, int]:
    """``{"model#replica": bytes}``: the RAM (PSS) of each running CPU engine's process tree,
    which NVML cannot measure. Blocking reads: call in a thread."""
    return {r.key: memory_bytes(tree_pids(r.pid)) for m in views for r in m.replicas
            if r.pid and r.plan is not None and r.plan.devices == ("cpu",)}


def _visible(request: Request) -> list[ModelView]:
    key = request.scope.get(SCOPE_KEY)
    return [m for m in request.state.pool.models().values()
            if allowed(key, (m.config.name, *m.config.aliases))]


async def console_state(request: Request) -> JSONResponse:
    """GET /console/state (see the module docstring). A driver error leaves ``devices`` empty
    and names the error in ``devices_error``."""
    pool, key = request.state.pool, request.scope.get(SCOPE_KEY)
    views = _visible(request)
    now = pool.clock()
    phases, ram = await asyncio.to_thread(lambda: (start_phases(views), cpu_memory(views)))
    models = []
    for view in views:
        obj = model_object(view, request.state.started, now)
        for rep, rep_obj in zip(view.replicas, obj["replicas"]):
            rep_obj["start_phase"] = phases.get(rep.key)
            rep_obj["ram_bytes"] = ram.get(rep.key)
        models.append(obj)
    names = {v.config.name for v in views}
    out: dict[str, Any] = {"models": models, "policy": pool.policy.name,
                           "headroom_bytes": pool.policy.headroom_bytes,
                           "admin": can_admin(request.state.auth, key), "devices": [],
                           "devices_error": None}
    try:
        snap = await pool.snapshot()
    except NvmlError as exc:
        out["devices_error"] = exc.message
        return JSONResponse(out)
    devices = inventory_view(snap, pool.bookings(), pool.policy.headroom_bytes)
    for d in devices:  # a key limited to some models sees only theirs by name
        d["models"] = [b for b in d["models"] if b.split("#", 1)[0] in names]
    out.update(source=snap.source, devices=devices)
    return JSONResponse(out)


async def console_traffic(request: Request) -> JSONResponse:
    """GET /console/traffic: ``server.traffic.Traffic.series`` for the models the key may use."""
    offset = time.time() - time.monotonic()  # the charts' times are Unix seconds
    return JSONResponse(request.state.traffic.series((v.config.name for v in _visible(request)), offset))


async def ui_config(request: Request) -> JSONResponse:
    """GET /ui/config.json (open, like the page): which keys the server asks for, so that the page
    asks for one before its first data call instead of collecting a 401; and the traffic sample
    interval (seconds)."""
    auth = request.state.auth  # the keys in force: a reload does not change them
    return JSONResponse({"auth": {"api_key": bool(auth.api_keys), "admin_key": auth.admin_key is not None},
                         "traffic_interval_s": request.state.traffic.interval},
                        headers={k.decode(): v.decode() for k, v in UI_HEADERS})


async def ui_root(request: Request) -> Response:
    """GET /ui: to ``/ui/``, so that the page's relative links resolve under it (a relative
    ``Location``, so that a reverse proxy's path prefix is kept)."""
    return RedirectResponse("ui/", status_code=308)


routes = [
    Route("/ui", ui_root, methods=["GET", "HEAD"]),
    Route("/ui/config.json", ui_config, methods=["GET"]),
    Mount("/ui", app=SecureHeaders(StaticFiles(directory=UI_DIR, html=True))),
    Route("/console/state", console_state, methods=["GET"]),
    Route("/console/traffic", console_traffic, methods=["GET"]),
]
