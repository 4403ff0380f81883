"""Operator routes over the scheduler's frozen views: ``/health``, ``/metrics`` (the gateway's
registry and every ready engine's ``vllm:*`` metrics) and ``/admin/*`` (models, devices, load,
unload, logs, reload). They read ``request.state.pool`` (the scheduler) and never change its books
except through its messages (load, unload, reconfigure)."""

from __future__ import annotations

import asyncio
import glob
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.books import EngineView, ModelState, ModelView
from server.enginemetrics import merge
from server.engines import log_tail
from server.errors import ClientGone, ConfigError, InvalidRequest, ModelNotFound, VramgateError
from server.gpus.nvml import NvmlError, read_inventory
from server.proxy import probe
from server.relay import error_response, until_disconnect

log = logging.getLogger("vramgate.admin")


def replica_object(rep: EngineView, now: float) -> dict[str, Any]:
    """One engine replica as the admin API shows it (bytes, seconds)."""
    out: dict[str, Any] = {"index": rep.index, "state": rep.state.value, "in_flight": rep.in_flight,
                           "pid": rep.pid, "url": rep.address, "device": rep.device,
                           "max_model_len": rep.max_model_len,
                           "cpu_cores": dict(rep.env).get("VLLM_CPU_OMP_THREADS_BIND"),
                           "uptime_s": round(now - rep.ready_since, 1) if rep.ready_since else None,
                           "idle_s": round(now - rep.last_used, 1) if rep.ready_since else None,
                           "load_s": round(rep.load_seconds, 1) if rep.load_seconds else None,
                           "loading_s": round(now - rep.loading_since, 1)
                           if rep.state == ModelState.LOADING and rep.loading_since is not None
                           else None}
    if rep.plan is not None:
        req = rep.requirement
        out["placement"] = {
            "devices": list(rep.plan.devices), "tensor_parallel_size": rep.plan.tensor_parallel_size,
            "gpu_memory_utilization": rep.plan.gpu_memory_utilization,
            "reserved_bytes": rep.booked_bytes, "measured_bytes": rep.measured_bytes,
            "host_bytes": rep.host_bytes,
            "estimated_bytes": req.per_device_bytes(rep.plan.tensor_parallel_size)
            if req is not None and req.weight_bytes is not None else None}
    return out


def model_object(entry: ModelView, created: int, now: float | None = None) -> dict[str, Any]:
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
        out.update(ttl=cfg.ttl, pinned=cfg.pinned, in_flight=entry.in_flight, queued=entry.waiting,
                   tool_parser=prof.tool_parser, tool_parser_source=prof.tool_parser_source,
                   fim=prof.fim.family if prof.fim else None,
                   max_tokens_policy=cfg.max_tokens_policy,
                   replicas=[replica_object(r, now) for r in entry.replicas])
    return out


async def health(request: Request) -> JSONResponse:
    """GET /health: 200 while the gateway runs, with each model's state."""
    states = {name: e.state.value for name, e in request.state.pool.models().items()}
    return JSONResponse({"status": "ok", "models": states})


async def _scrape(session: Any, url: str) -> str:
    """An engine's metrics text; ``""`` when it does not answer in time (left out of this scrape)."""
    got = await probe(session, url + "/metrics", 2)
    return got[1].decode(errors="replace") if got is not None and got[0] == 200 else ""


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the gateway's own registry (requests, latency, states, queues, devices), then
    every ready engine's ``vllm:*`` metrics with ``model`` and ``replica`` labels added. A driver
    error leaves the device gauges out of this scrape (and is logged); the rest still answers."""
    state = request.state
    metrics, pool = state.metrics, state.pool
    models = pool.models()
    metrics.set_states({name: m.state.value for name, m in models.items()})
    metrics.loaded.set(sum(1 for m in models.values() for r in m.replicas
                           if r.state in (ModelState.LOADING, ModelState.READY, ModelState.SLEEPING)))
    metrics.set_model_gauges({name: m.in_flight for name, m in models.items()},  # at the scrape,
                             {name: m.waiting for name, m in models.items()})  # not per request
    batches = state.batches
    metrics.set_batches(await batches.store.call(batches.store.status_counts),
                        batches.lines_queued(), batches.seconds_since_progress())
    try:
        snap = await pool.snapshot()
        gpus = await asyncio.to_thread(read_inventory) if snap.source == "nvml" and any(
            d.kind == "cuda" for d in snap.devices) else []
        metrics.set_devices(snap.devices, pool.bookings(), gpus)
    except NvmlError as exc:
        log.warning("/metrics: no device gauges this scrape: %s", exc)
    ready = [(name, r) for name, m in models.items() for r in m.replicas
             if r.state == ModelState.READY and r.base_url]
    texts = await asyncio.gather(*(_scrape(state.service.session, r.base_url) for _, r in ready))
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
    try:
        snap = await pool.snapshot()
    except NvmlError as exc:
        return error_response(exc)
    return JSONResponse({"source": snap.source, "policy": pool.policy.name,
                         "headroom_bytes": pool.policy.headroom_bytes,
                         "devices": inventory_view(snap, pool.bookings(), pool.policy.headroom_bytes)})


async def admin_models(request: Request) -> JSONResponse:
    """GET /admin/models: every model with its replicas: state, placement, memory reserved,
    measured and estimated, uptime, requests in flight, idle time."""
    pool = request.state.pool
    now = pool.clock()
    return JSONResponse({"object": "list", "data": [model_object(m, request.state.started, now)
                                                    for m in pool.models().values()]})


def _admin_entry(request: Request) -> ModelView:
    pool = request.state.pool
    model = pool.settings.resolve(request.path_params["name"])
    if model is None or model.name not in pool.models():
        raise ModelNotFound(request.path_params["name"])
    return pool.models()[model.name]


def _fresh(request: Request, name: str) -> JSONResponse:
    pool = request.state.pool
    view = pool.models().get(name)
    if view is None:
        return error_response(ModelNotFound(name))
    return JSONResponse(model_object(view, request.state.started, pool.clock()))


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
    return _fresh(request, entry.config.name)


async def admin_unload(request: Request) -> JSONResponse:
    """POST /admin/models/{name}/unload[?force=true]: stop the model's engines once their
    in-flight requests end (at once with force)."""
    try:
        entry = _admin_entry(request)
    except VramgateError as exc:
        return error_response(exc)
    force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
    await request.state.pool.unload(entry.config.name, force=force)
    return _fresh(request, entry.config.name)


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
    files = sorted(settings.log_dir.glob(f"{glob.escape(name)}*.log"), key=lambda f: f.stat().st_mtime)
    files = [f for f in files if f.name[len(name):len(name) + 1] in (".", "-")]
    parts = [f"==> {f} <==\n{log_tail(f, lines)}\n" for f in files]
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


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/admin/gpus", admin_gpus, methods=["GET"]),
    Route("/admin/models", admin_models, methods=["GET"]),
    Route("/admin/models/{name:path}/load", admin_load, methods=["POST"]),
    Route("/admin/models/{name:path}/unload", admin_unload, methods=["POST"]),
    Route("/admin/models/{name:path}/logs", admin_logs, methods=["GET"]),
    Route("/admin/reload", admin_reload, methods=["POST"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
]
