"""The OpenAI and Anthropic routes: the inference routes (served by ``server.exchange``), the
model list and the OpenAPI document. Operator routes live in ``server.admin``.

Only the routes below exist; nothing else is forwarded to an engine (cases C20). Every error leaves
as an OpenAI error envelope, as plain JSON whenever it is known before the first byte is sent.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server import openapi
from server.auth import SCOPE_KEY, allowed
from server.errors import (ModelNotFound, RouteNotFound,
                           anthropic_body, error_body)
from server.exchange import inference
from server.relay import error_response
from server.metrics import UNKNOWN_MODEL
from server.requestid import SCOPE_KEY as RID_KEY, add_id_header
from server.admin import model_object
from server.validation import ROUTES


class InferenceFastPath:
    """Pure ASGI, innermost: ``POST`` to an inference route goes straight to :func:`inference`,
    past Starlette (the same handler, the same answers, less work on every request:
    ``loadtest/README.md``), its answer carrying the ``x-request-id`` header
    (``server.requestid``). Everything else goes on to Starlette. An unexpected error (a bug) is
    answered as :func:`server_error` answers Starlette's, and raised on to the server, which
    logs it."""

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
        request, t0 = Request(scope, receive, send), time.perf_counter()
        try:
            response = await inference(request)
        except Exception as exc:  # a bug: answered in the route's shape, counted, then logged
            answer = await server_error(request, exc)
            add_id_header(scope, answer.raw_headers)
            request.state.service.record(
                route.path, scope.get("vramgate.model", UNKNOWN_MODEL), 500,
                time.perf_counter() - t0, request_id=scope.get(RID_KEY) or "",
                key=scope.get(SCOPE_KEY))
            await answer(scope, receive, send)
            raise
        add_id_header(scope, response.raw_headers)  # RequestIdMiddleware leaves it to us
        await response(scope, receive, send)


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: every configured model; never starts a load."""
    created = request.state.started
    key = request.scope.get(SCOPE_KEY)
    data = [model_object(m, created) for m in request.state.pool.models().values()
            if allowed(key, (m.config.name, *m.config.aliases))]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    """GET /v1/models/{id}: one model (by name or alias), or 404 ``model_not_found``."""
    model_id = request.path_params["model_id"]
    pool = request.state.pool
    model = pool.settings.resolve(model_id)
    view = pool.models().get(model.name) if model is not None else None
    if model is None or view is None or not allowed(
            request.scope.get(SCOPE_KEY), (model.name, *model.aliases)):
        return error_response(ModelNotFound(model_id))
    return JSONResponse(model_object(view, request.state.started, pool.clock()))


async def openapi_json(request: Request) -> JSONResponse:
    """GET /openapi.json: the OpenAPI document of these routes."""
    return JSONResponse(openapi.document())


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
    Route("/openapi.json", openapi_json, methods=["GET"]),
]
