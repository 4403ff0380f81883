"""HTTP routes: the inference routes (served by ``server.exchange``), the model list, health,
admin and metrics.

Only the routes below exist; nothing else is forwarded to an engine (cases C20). Every error leaves
as an OpenAI error envelope, as plain JSON whenever it is known before the first byte is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server import openapi
from server.auth import SCOPE_KEY, allowed
from server.enginemetrics import merge
from server.engines import log_tail
from server.errors import (ConfigError, InvalidRequest, ModelNotFound, RouteNotFound,
                           VramgateError, anthropic_body, error_body)
from server.exchange import error_response, inference
from server.gpus.nvml import read_inventory
from server.pool import ModelState
from server.relay import ClientGone, until_disconnect
from server.validation import ROUTES


class InferenceFastPath:
    """Pure ASGI, innermost: ``POST`` to an inference route goes straight to :func:`inference`,
    past Starlette's router and exception middleware (the same handler, the same answers, less
    work on every request: ``loadtest/README.md``). Everything else goes on to Starlette.
    Unexpected errors still reach Starlette's outermost ``ServerErrorMiddleware``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.routes = {r.path: r for r in routes if isinstance(r, Route) and r.endpoint is inference}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        scope["endpoint"] = inference
        response = await inference(Request(scope, receive, send))
        await response(scope, receive, send)


def replica_object(rep: Any, now: float) -> dict[str, Any]:
    """One engine replica as the admin API shows it (bytes, seconds)."""
    running = rep.process is not None and rep.process.returncode is None
    out: dict[str, Any] = {"index": rep.index, "state": rep.state.value, "in_flight": rep.in_flight,
                           "pid": rep.process.pid if running else None,
                           "url": rep.process.launch.base_url if running else None,
                           "max_model_len": rep.max_model_len,
                           "cpu_cores": rep.process.launch.env.get("VLLM_CPU_OMP_THREADS_BIND")
                           if running else None,
                           "uptime_s": round(now - rep.ready_since, 1) if rep.ready_since else None,
                           "idle_s": round(now - rep.last_used, 1) if rep.ready_since else None,
                           "load_s": round(rep.load_seconds, 1) if rep.load_seconds else None}
    if rep.plan is not None:
        req = rep.requirement
        out["placement"] = {
            "devices": list(rep.plan.devices), "tensor_parallel_size": rep.plan.tensor_parallel_size,
            "gpu_memory_utilization": rep.plan.gpu_memory_utilization,
            "reserved_bytes": rep.booked_bytes, "measured_bytes": rep.measured_bytes,
            "estimated_bytes": req.per_device_bytes(rep.plan.tensor_parallel_size)
            if req is not None and req.weight_bytes is not None else None}
    return out


def model_object(entry: Any, created: int, now: float | None = None) -> dict[str, Any]:
    """One entry of ``/v1/models``: the OpenAI fields plus vramgate's ``state``, ``aliases``,
    ``task``, ``device`` and, with ``now`` (the pool's clock), its tool-call parser, FIM format,
    output-budget policy and each replica's details."""
    cfg = entry.config
    out: dict[str, Any] = {"id": cfg.name, "object": "model", "created": created,
                           "owned_by": "vramgate", "state": entry.state.value,
                           "aliases": list(cfg.aliases), "task": cfg.task, "device": entry.device}
    problem = entry.error or entry.nofit
    if problem is not None and entry.state != ModelState.READY:
        out["error"] = problem.message
    if now is not None:
        prof = entry.profile
        out.update(ttl=cfg.ttl, pinned=cfg.pinned, in_flight=entry.in_flight,
                   tool_parser=prof.tool_parser, tool_parser_source=prof.tool_parser_source,
                   fim=prof.fim.family if prof.fim else None,
                   max_tokens_policy=cfg.max_tokens_policy,
                   replicas=[replica_object(r, now) for r in entry.replicas])
    return out


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: every configured model; never starts a load."""
    created = request.state.started
    key = request.scope.get(SCOPE_KEY)
    data = [model_object(e, created) for e in list(request.state.pool.entries.values())
            if allowed(key, (e.config.name, *e.config.aliases))]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    """GET /v1/models/{id}: one model (by name or alias), or 404 ``model_not_found``."""
    model_id = request.path_params["model_id"]
    pool = request.state.pool
    model = pool.settings.resolve(model_id)
    if model is None or model.name not in pool.entries or not allowed(
            request.scope.get(SCOPE_KEY), (model.name, *model.aliases)):
        return error_response(ModelNotFound(model_id))
    return JSONResponse(model_object(pool.entries[model.name], request.state.started, pool.clock()))


async def openapi_json(request: Request) -> JSONResponse:
    """GET /openapi.json: the OpenAPI document of these routes."""
    return JSONResponse(openapi.document())


async def health(request: Request) -> JSONResponse:
    """GET /health: 200 while the gateway runs, with each model's state."""
    states = {name: e.state.value for name, e in request.state.pool.entries.items()}
    return JSONResponse({"status": "ok", "models": states})


async def _scrape(session: Any, url: str) -> str:
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return await resp.text() if resp.status == 200 else ""
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return ""  # an engine that does not answer in time is left out of this scrape


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the gateway's own registry (requests, latency, states, devices), then every
    ready engine's ``vllm:*`` metrics with ``model`` and ``replica`` labels added."""
    state = request.state
    metrics, pool = state.metrics, state.pool
    metrics.set_states({name: e.state.value for name, e in pool.entries.items()})
    metrics.loaded.set(sum(1 for _, r in pool.replicas()
                           if r.state in (ModelState.LOADING, ModelState.READY)))
    for name, gate in state.gates.items():
        metrics.queued.labels(name).set(gate.queued)
    snap = await pool.snapshot()
    gpus = await asyncio.to_thread(read_inventory) if snap.source == "nvml" and any(
        d.kind == "cuda" for d in snap.devices) else []
    metrics.set_devices(snap.devices, pool.bookings(), gpus)
    ready = [(e.config.name, r) for e in list(pool.entries.values()) for r in e.replicas
             if r.base_url]
    texts = await asyncio.gather(*(_scrape(state.session, r.base_url) for _, r in ready))
    engines = merge(({"model": name, "replica": str(r.index)}, text)
                    for (name, r), text in zip(ready, texts))
    return Response(metrics.render() + engines.encode(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def inventory_view(snapshot: Any, bookings: tuple, headroom: int) -> list[dict[str, Any]]:
    """Devices with vramgate's books beside them (what ``/admin/gpus`` and ``vramgate gpus`` show)."""
    from server.placement import available

    room = available(snapshot.devices, bookings, headroom)
    out = []
    for d in snapshot.devices:
        mine = [b for b in bookings if d.id in b.devices]
        out.append({"id": d.id, "kind": d.kind, "index": d.index, "name": d.name,
                    "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                    "used_by_vramgate_bytes": d.seen_bytes,
                    "used_by_others_bytes": max(0, d.total_bytes - d.free_bytes - d.seen_bytes),
                    "reserved_bytes": sum(b.bytes_per_device for b in mine),
                    "available_bytes": room[d.id],
                    "models": [b.model for b in mine]})
    return out


async def admin_gpus(request: Request) -> JSONResponse:
    """GET /admin/gpus: every device (GPUs, then the CPU) with vramgate's reservations."""
    pool = request.state.pool
    snap = await pool.snapshot()
    return JSONResponse({"source": snap.source, "policy": pool.policy.name,
                         "headroom_bytes": pool.policy.headroom_bytes,
                         "devices": inventory_view(snap, pool.bookings(), pool.policy.headroom_bytes)})


async def admin_models(request: Request) -> JSONResponse:
    """GET /admin/models: every model with its replicas: state, placement, memory reserved,
    measured and estimated, uptime, requests in flight, idle time."""
    pool = request.state.pool
    now = pool.clock()
    return JSONResponse({"object": "list", "data": [model_object(e, request.state.started, now)
                                                    for e in list(pool.entries.values())]})


def _admin_entry(request: Request) -> Any:
    pool = request.state.pool
    model = pool.settings.resolve(request.path_params["name"])
    if model is None or model.name not in pool.entries:
        raise ModelNotFound(request.path_params["name"])
    return pool.entries[model.name]


async def admin_load(request: Request) -> JSONResponse:
    """POST /admin/models/{name}/load: start the model now (also after it gave up) and wait
    until it is ready; 503 with the cause when it cannot start."""
    try:
        entry = _admin_entry(request)
        await until_disconnect(request.state.pool.load(entry.config.name), request.receive)
    except VramgateError as exc:
        return error_response(exc)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(model_object(entry, request.state.started, request.state.pool.clock()))


async def admin_unload(request: Request) -> JSONResponse:
    """POST /admin/models/{name}/unload[?force=true]: stop the model's engines once their
    in-flight requests end (at once with force)."""
    try:
        entry = _admin_entry(request)
    except VramgateError as exc:
        return error_response(exc)
    force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
    await request.state.pool.unload(entry.config.name, force=force)
    return JSONResponse(model_object(entry, request.state.started, request.state.pool.clock()))


async def admin_logs(request: Request) -> Response:
    """GET /admin/models/{name}/logs[?lines=N]: the last N lines (default 200, at most 5000) of
    each of the model's engine logs, as text."""
    try:
        entry = _admin_entry(request)
    except VramgateError as exc:
        return error_response(exc)
    raw = request.query_params.get("lines", "200")
    lines = min(5000, int(raw)) if raw.isdigit() and int(raw) > 0 else 200
    settings = request.state.pool.settings
    name = entry.config.name.replace("/", "_")
    files = [settings.log_dir / f"{name}.log"] + [
        settings.log_dir / f"{name}-{r.index}.log" for r in entry.replicas]
    parts = [f"==> {f} <==\n{log_tail(f, lines)}\n" for f in files if f.exists()]
    return Response("".join(parts) or "(no engine log yet)\n", media_type="text/plain; charset=utf-8")


async def admin_reload(request: Request) -> JSONResponse:
    """POST /admin/reload: read the configuration again and apply it (as SIGHUP does)."""
    try:
        changes = await request.state.reload()
    except ConfigError as exc:  # the file is wrong, not the server: nothing was changed
        return error_response(InvalidRequest(f"configuration not reloaded: {exc.message}",
                                             code="invalid_config"))
    except VramgateError as exc:
        return error_response(exc)
    return JSONResponse(changes)


async def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected error (a bug): 500 in the route's error shape, never a bare text page. The
    traceback goes to the log (Starlette's error middleware re-raises after answering)."""
    message = f"Internal error: {exc.__class__.__name__}"
    body = anthropic_body(500, message) if request.url.path.lower().startswith("/v1/messages") \
        else error_body(message, "server_error", None, "internal_error")
    return JSONResponse(body, status_code=500)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 in the OpenAI envelope."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(RouteNotFound(f"Unknown route: {request.method} {request.url.path}"))
    return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}",
                                   "invalid_request_error", None, "method_not_allowed"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


routes = [
    *(Route(path, inference, methods=["POST"]) for path in ROUTES),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/admin/gpus", admin_gpus, methods=["GET"]),
    Route("/admin/models", admin_models, methods=["GET"]),
    Route("/admin/models/{name:path}/load", admin_load, methods=["POST"]),
    Route("/admin/models/{name:path}/unload", admin_unload, methods=["POST"]),
    Route("/admin/models/{name:path}/logs", admin_logs, methods=["GET"]),
    Route("/admin/reload", admin_reload, methods=["POST"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
]
