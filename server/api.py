"""HTTP routes: parse and validate, take a lease on the model's engine, forward, relay.

Only the routes below exist; nothing else is forwarded to an engine (cases C20). Every error leaves
as an OpenAI error envelope, as plain JSON whenever it is known before the first byte is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import aiohttp
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server import openapi
from server.admission import ModelGate, parse_priority, rate_check
from server.auth import SCOPE_KEY, allowed
from server.enginemetrics import merge
from server.engines import log_tail
from server.gpus.nvml import read_inventory
from server.requestid import SCOPE_KEY as RID_KEY
from server.errors import (BodyTooLarge, ConfigError, InvalidRequest, ModelNotFound, PermissionDenied,
                           RateLimited, RouteNotFound,
                           VramgateError, anthropic_body, error_body, normalize_upstream_error)
from server.sse import ANTHROPIC, OPENAI, RESPONSES, StreamTap, answer_usage
from server.metrics import UNKNOWN_MODEL
from server.pool import ModelState
from server.proxy import forward, relay_stream
from server.validation import ANTHROPIC_ROUTES, ROUTES, USAGE_ROUTES, engine_body, parse_body, validate

T = TypeVar("T")
log = logging.getLogger("vramgate.api")
access = logging.getLogger("vramgate.access")


def access_line(fmt: str, **fields: Any) -> str:
    """One access-log line: ``json`` (one object) or ``text`` (``key=value`` pairs); fields that
    are ``None`` are left out."""
    kept = {k: v for k, v in fields.items() if v is not None}
    if fmt == "json":
        return json.dumps(kept, separators=(",", ":"))
    return " ".join(f"{k}={v}" for k, v in kept.items())


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(aw: Awaitable[T], receive: Receive,
                           cleanup: Callable[[T], Any] | None = None) -> T:
    """Await ``aw`` unless the client disconnects first: then cancel it and raise :class:`ClientGone`.

    ``aw`` (a coroutine) runs inline in the request's own task (no task of its own: this is on
    every request's path); a watcher task reads ``receive`` and, on ``http.disconnect``, cancels
    the request's task while it is still inside ``aw``, so ``aw`` must be cancel-safe. If ``aw``
    swallowed that cancellation and finished anyway, ``cleanup(result)`` undoes it (a slot, a
    lease) before :class:`ClientGone` is raised.
    """
    current = asyncio.current_task()
    assert current is not None
    state = {"active": True, "gone": False}

    def on_disconnect(watch: asyncio.Future) -> None:
        if state["active"] and not watch.cancelled() and watch.exception() is None:
            state["gone"] = True
            current.cancel()

    watch = asyncio.ensure_future(_disconnected(receive))
    watch.add_done_callback(on_disconnect)
    try:
        result = await aw
        if state["gone"]:  # the cancel was swallowed inside ``aw`` (3.11's wait_for can): undo
            current.uncancel()
            if cleanup is not None:
                cleanup(result)
            raise ClientGone()
        return result
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        current.uncancel()
        raise ClientGone() from None
    finally:
        state["active"] = False
        watch.cancel()


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or :class:`BodyTooLarge` as soon as it passes ``limit`` bytes (checked on
    ``Content-Length`` first, then while reading, so a huge body is never held in memory);
    :class:`ClientGone` if the client hangs up before the body is complete."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is {int(declared)} bytes; the limit is {limit}.",
                           should_retry=False)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"The request body is over the limit of {limit} bytes.",
                                   should_retry=False)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def error_response(exc: VramgateError, route: str = "") -> Response:
    """The error as plain JSON: the OpenAI envelope, or the Anthropic shape on the Anthropic
    routes. ASCII-escaped, so any text in it (a model name with a lone surrogate) can be sent."""
    body = anthropic_body(exc.status, exc.message) if route in ANTHROPIC_ROUTES else exc.envelope()
    return Response(json.dumps(body), status_code=exc.status, headers=exc.headers(),
                    media_type="application/json")


FLAVORS = {"/v1/responses": RESPONSES, "/v1/messages": ANTHROPIC}
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class RelayResponse:
    """A streamed engine answer (ASGI): ``content``'s chunks as they come, then the end of the body.

    ``finalize`` runs exactly once however the stream ends (complete, engine failure, client
    disconnect, or never started). A client that hangs up cancels the relay at once (one watcher
    on ``receive``, :func:`until_disconnect`), which closes the engine connection, so vLLM aborts
    the request. Leaner than Starlette's ``StreamingResponse``, which runs a task group of two
    tasks for each stream.
    """

    def __init__(self, content: AsyncIterator[bytes], finalize: Callable[[], None]) -> None:
        self.body_iterator = content
        self._finalize = finalize

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(self._pump(send), receive)
        except (ClientGone, OSError):
            pass  # the client left: nothing more to send
        except RuntimeError as exc:  # uvloop: a write on a transport closed under a pipelined request
            if "closed" not in str(exc):
                raise
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._finalize()


def gate_for(state: Any, model: Any) -> ModelGate:
    """The model's admission gate, made anew when its limits changed (a configuration reload)."""
    gate = state.gates.get(model.name)
    limits = (model.max_concurrency, model.max_queue, model.queue_timeout)
    if gate is None or (gate.max_concurrency, gate.max_queue, gate.timeout) != limits:
        gate = state.gates[model.name] = ModelGate(*limits)
    return gate


async def inference(request: Request) -> Response:
    """Every inference route (``ROUTES``): parse, validate, admit, lease an engine, forward, relay."""
    route = request.scope["route"].path
    state = request.state
    pool, metrics = state.pool, state.metrics
    settings = pool.settings
    t0 = time.perf_counter()
    label = UNKNOWN_MODEL
    cleanups: list[Callable[[], None]] = []  # undone in reverse order when the answer ends
    timing: dict[str, float] = {}

    def done(status: int, tokens: dict[str, int] | None = None) -> None:
        seconds = time.perf_counter() - t0
        metrics.observe(label, route, status, seconds)
        for kind, count in (tokens or {}).items():
            metrics.tokens.labels(label, kind).inc(count)
        if access.isEnabledFor(logging.INFO):
            key = request.scope.get(SCOPE_KEY)
            access.info(access_line(
                settings.log_format, request_id=request.scope.get(RID_KEY), route=route,
                model=label, status=status, duration_s=round(seconds, 4),
                ttft_s=round(timing["ttft"], 4) if "ttft" in timing else None,
                key=key.name if key is not None else None,
                **{f"{kind}_tokens": n for kind, n in (tokens or {}).items()}))

    try:
        raw = await read_limited(request, settings.max_body_bytes)
        body = parse_body(raw)
        parsed = validate(route, body)
        model = settings.resolve(parsed.model)
        if model is None:
            raise ModelNotFound(parsed.model)
        label = model.name
        key = request.scope.get(SCOPE_KEY)
        if not allowed(key, (model.name, *model.aliases)):
            raise PermissionDenied(f"This API key may not use the model '{parsed.model}'.")
        needed = ROUTES[route][1]
        if model.task != needed:
            raise InvalidRequest(f"The model '{model.name}' serves {model.task} requests and cannot "
                                 f"answer {route}.", param="model", code="model_not_supported")
        if key is not None and key.rpm:
            times = state.rates.setdefault(key.name, deque())
            wait = rate_check(times, time.monotonic(), key.rpm)
            if wait:
                raise RateLimited(f"Rate limit reached: {key.rpm} requests per minute for this key. "
                                  f"Try again in {wait:.1f} s.", retry_after=wait)
            times.append(time.monotonic())
        flavor = FLAVORS.get(route, OPENAI)
        raw = engine_body(raw, parsed, model.name, want_usage=route in USAGE_ROUTES)
        receive = request.receive
        gate = gate_for(state, model)
        # The common case (a free slot, a ready engine) awaits nothing here; only a real wait is
        # raced against the client hanging up.
        if not gate.try_enter():
            await until_disconnect(gate.enter(parse_priority(request.headers.get("x-priority"))),
                                   receive, lambda _: gate.leave())
        cleanups.append(gate.leave)
        lease = pool.try_acquire(model.name) or await until_disconnect(
            pool.acquire(model.name), receive, lambda l: l.release())
        cleanups.append(lease.release)
        in_flight = metrics.in_flight.labels(label)
        in_flight.inc()
        cleanups.append(in_flight.dec)
        headers = {"content-type": "application/json",
                   "x-request-id": request.scope.get(RID_KEY) or ""}

        def opened(resp: aiohttp.ClientResponse) -> None:  # closed with the answer, or at shutdown
            cleanups.append(resp.close)
            state.upstreams.add(resp)
            cleanups.append(lambda: state.upstreams.discard(resp))

        # One race against the client per request: opening, plus reading a whole answer.
        upstream, data = await until_disconnect(
            forward(state.session, lease.base_url + route, raw, headers, opened,
                    read=not parsed.stream), receive)
        if upstream.status >= 400:
            raise normalize_upstream_error(upstream.status, data)
        if not parsed.stream:
            status = upstream.status
            done(status, answer_usage(data))
            return Response(data, status_code=status,
                            media_type=upstream.headers.get("content-type", "application/json"))
        held, cleanups = cleanups, []  # the stream's finalize undoes them

        def first() -> None:
            timing["ttft"] = time.perf_counter() - t0
            metrics.ttft.labels(label, route).observe(timing["ttft"])

        tap = StreamTap(flavor, null_usage=parsed.include_usage and flavor is OPENAI,
                        drop_usage=not parsed.include_usage)

        def finalize() -> None:
            for undo in reversed(held):
                undo()
            itl = metrics.itl.labels(label)
            for gap in tap.gaps:
                itl.observe(gap)
            done(200, tap.tokens)

        return RelayResponse(relay_stream(upstream, tap=tap, on_first=first,
                                          closing=lambda: pool.closing), finalize)
    except VramgateError as exc:
        if exc.status in (429, 503) and exc.code:
            metrics.rejections.labels(label, exc.code).inc()
        if exc.status >= 500:
            log.warning("request %s for %s failed: %s %s", request.scope.get(RID_KEY), label,
                        exc.status, exc.message.splitlines()[0])
        done(exc.status)
        return error_response(exc, route)
    except ClientGone:
        done(499)
        return Response(status_code=499)
    finally:
        for undo in reversed(cleanups):
            undo()


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
    ``task``, ``device`` and, with ``now`` (the pool's clock), each replica's details."""
    cfg = entry.config
    out: dict[str, Any] = {"id": cfg.name, "object": "model", "created": created,
                           "owned_by": "vramgate", "state": entry.state.value,
                           "aliases": list(cfg.aliases), "task": cfg.task, "device": entry.device}
    problem = entry.error or entry.nofit
    if problem is not None and entry.state != ModelState.READY:
        out["error"] = problem.message
    if now is not None:
        out.update(ttl=cfg.ttl, pinned=cfg.pinned, in_flight=entry.in_flight,
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
