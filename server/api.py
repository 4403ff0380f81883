"""HTTP routes: parse and validate, take a lease on the model's engine, forward, relay.

Only the routes below exist; nothing else is forwarded to an engine (cases C20). Every error leaves
as an OpenAI error envelope, as plain JSON whenever it is known before the first byte is sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.errors import InvalidRequest, ModelNotFound, RouteNotFound, VramgateError, error_body
from server.metrics import UNKNOWN_MODEL
from server.pool import Lease, ModelState
from server.proxy import open_upstream, read_body, read_error, relay_stream
from server.validation import ROUTES, parse_body, validate

T = TypeVar("T")
FORWARDED_HEADERS = ("x-request-id",)


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(aw: Awaitable[T], receive: Receive,
                           cleanup: Callable[[T], Any] | None = None) -> T:
    """Await ``aw`` unless the client disconnects first: then cancel it and raise :class:`ClientGone`.

    If ``aw`` completed anyway while being cancelled, ``cleanup(result)`` undoes it (a lease, a
    connection), so nothing leaks.
    """
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    result = (await asyncio.gather(task, return_exceptions=True))[0]
    if cleanup is not None and not isinstance(result, BaseException):
        cleanup(result)
    raise ClientGone()


def error_response(exc: VramgateError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers())


class RelayResponse(StreamingResponse):
    """A streamed engine answer whose ``finalize`` runs exactly once, however the stream ends
    (complete, engine failure, client disconnect, or never started)."""

    def __init__(self, content: Any, finalize: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._finalize = finalize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._finalize()


async def inference(request: Request) -> Response:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
    route = request.scope["route"].path
    state = request.state
    settings, pool, metrics = state.settings, state.pool, state.metrics
    t0 = time.perf_counter()
    label = UNKNOWN_MODEL
    lease: Lease | None = None
    try:
        raw = await request.body()
        body = parse_body(raw)
        parsed = validate(route, body)
        model = settings.resolve(parsed.model)
        if model is None:
            raise ModelNotFound(parsed.model)
        label = model.name
        needed = ROUTES[route][1]
        if model.task != needed:
            raise InvalidRequest(f"The model '{model.name}' serves {model.task} requests and cannot "
                                 f"answer {route}.", param="model", code="model_not_supported")
        if parsed.model != model.name:  # an alias: the engine only knows its served name
            body["model"] = model.name
            raw = json.dumps(body).encode()
        receive = request.receive
        lease = await until_disconnect(pool.acquire(model.name), receive, lambda l: l.release())
        metrics.in_flight.labels(label).inc()
        headers = {"content-type": "application/json"}
        for name in FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        upstream = await until_disconnect(
            open_upstream(state.session, lease.base_url + route, raw, headers), receive,
            lambda r: r.close())
        if upstream.status >= 400:
            raise await read_error(upstream)
        if not parsed.stream:
            data = await until_disconnect(read_body(upstream), receive)
            status = upstream.status
            metrics.observe(label, route, status, time.perf_counter() - t0)
            return Response(data, status_code=status,
                            media_type=upstream.headers.get("content-type", "application/json"))
        held, lease = lease, None  # the stream's finalize releases it

        def first() -> None:
            metrics.ttft.labels(label, route).observe(time.perf_counter() - t0)

        def finalize() -> None:
            upstream.close()
            held.release()
            metrics.in_flight.labels(label).dec()
            metrics.observe(label, route, 200, time.perf_counter() - t0)

        return RelayResponse(relay_stream(upstream, null_usage=parsed.include_usage, on_first=first),
                             finalize, status_code=200,
                             headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                      "x-accel-buffering": "no"})
    except VramgateError as exc:
        metrics.observe(label, route, exc.status, time.perf_counter() - t0)
        return error_response(exc)
    except ClientGone:
        metrics.observe(label, route, 499, time.perf_counter() - t0)
        return Response(status_code=499)
    finally:
        if lease is not None:
            lease.release()
            metrics.in_flight.labels(label).dec()


def model_object(entry: Any, created: int) -> dict[str, Any]:
    """One entry of ``/v1/models``: the OpenAI fields plus vramgate's ``state``, ``aliases``, ``task``."""
    cfg = entry.config
    out = {"id": cfg.name, "object": "model", "created": created, "owned_by": "vramgate",
           "state": entry.state.value, "aliases": list(cfg.aliases), "task": cfg.task,
           "device": entry.device}
    if entry.plan is not None:
        out["placement"] = {"devices": list(entry.plan.devices),
                            "tensor_parallel_size": entry.plan.tensor_parallel_size,
                            "gpu_memory_utilization": entry.plan.gpu_memory_utilization,
                            "reserved_bytes": entry.booked_bytes,
                            "measured_bytes": entry.measured_bytes}
    if entry.state == ModelState.FAILED and entry.error is not None:
        out["error"] = entry.error.message
    return out


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: every configured model; never starts a load."""
    created = request.state.started
    data = [model_object(e, created) for e in request.state.pool.entries.values()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    """GET /v1/models/{id}: one model (by name or alias), or 404 ``model_not_found``."""
    model_id = request.path_params["model_id"]
    model = request.state.settings.resolve(model_id)
    if model is None:
        return error_response(ModelNotFound(model_id))
    return JSONResponse(model_object(request.state.pool.entries[model.name], request.state.started))


async def health(request: Request) -> JSONResponse:
    """GET /health: 200 while the gateway runs, with each model's state."""
    states = {name: e.state.value for name, e in request.state.pool.entries.items()}
    return JSONResponse({"status": "ok", "models": states})


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text exposition of the gateway's own registry."""
    metrics = request.state.metrics
    metrics.set_states({name: e.state.value for name, e in request.state.pool.entries.items()})
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


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
    Route("/admin/gpus", admin_gpus, methods=["GET"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
]
