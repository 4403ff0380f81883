"""The HTTP edge of an inference request: read the body under its limit, parse and validate it,
resolve the model, check the key may use it and that the model serves this route, then hand the
call to the request service (``server.service``) and turn its answer into a response.

The caller's hang-up reaches the service through ``watch`` (``relay.until_disconnect``). Errors
leave as plain JSON in the route's shape when they are known before the first byte.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server import infill
from server.admission import parse_priority
from server.auth import SCOPE_KEY, allowed
from server.errors import (ClientGone, InvalidRequest, ModelNotFound, ModelUnavailable,
                           PermissionDenied, VramgateError)
from server.metrics import UNKNOWN_MODEL
from server.relay import RelayResponse, error_response, read_limited, until_disconnect
from server.requestid import LOGGED, SCOPE_KEY as RID_KEY
from server.calls import Call
from server.validation import ROUTES, parse_body, validate


def infill_body(state: Any, key: Any, body: dict[str, Any]) -> tuple[dict[str, Any], str, bool]:
    """llama.cpp's ``/infill`` body as a completion, with its prompt and whether it only warms
    the cache. Without ``model``, llama.cpp-style: the first model this key may use that fills in.
    Raises :class:`InvalidRequest` (``suffix_not_supported``) when there is none."""
    name = body.get("model")
    if name is None:
        name = next((m.config.name for m in state.pool.models().values()
                     if m.profile.fim is not None and allowed(key, (m.config.name, *m.config.aliases))),
                    None)
        if name is None:
            raise InvalidRequest("No model that this key may use has fill-in-the-middle tokens: "
                                 "serve a FIM-trained model, or set 'fim' for one in the "
                                 "configuration.", param="model", code="suffix_not_supported")
    model = state.pool.settings.resolve(name) if isinstance(name, str) else None
    budget = model.fim_max_tokens if model is not None else 128
    return infill.to_completion(body, name, budget), infill.middle(body), infill.warm_only(body)


async def read_call(request: Request, route: str, started: float | None = None) -> Call:
    """The request as a :class:`~server.calls.Call`; ``started``: when its handler began
    (``time.perf_counter()``; default now). Raises :class:`VramgateError` (400, 403, 404, 413)
    or ``ClientGone``."""
    state, key = request.state, request.scope.get(SCOPE_KEY)
    settings = state.pool.settings
    raw = await read_limited(request, settings.max_body_bytes)
    body, middle, warm = parse_body(raw), "", False
    if route == "/infill":
        body, middle, warm = infill_body(state, key, body)
    parsed = validate("/v1/completions" if route == "/infill" else route, body)
    model = settings.resolve(parsed.model)
    if model is None:
        raise ModelNotFound(parsed.model)
    request.scope["vramgate.model"] = model.name
    if not allowed(key, (model.name, *model.aliases)):
        raise PermissionDenied(f"This API key may not use the model '{parsed.model}'.")
    if model.task != ROUTES[route][1]:
        raise InvalidRequest(f"The model '{model.name}' serves {model.task} requests and cannot "
                             f"answer {route}.", param="model", code="model_not_supported")
    header = request.headers.get("x-priority")
    return Call(route, raw, parsed, model, key=key,
                priority=None if header is None else parse_priority(header),
                request_id=request.scope.get(RID_KEY) or "", middle=middle, warm=warm,
                started=time.perf_counter() if started is None else started)


def refused(request: Request, route: str, t0: float, exc: VramgateError | ClientGone) -> Response:
    """The answer to a call refused outside the service (before it, or cut at shutdown), counted
    and logged as the service records its own (``t0``: when the handler began)."""
    status = exc.status if isinstance(exc, VramgateError) else 499
    service, model = request.state.service, request.scope.get("vramgate.model", UNKNOWN_MODEL)
    if isinstance(exc, VramgateError):
        service.rejected(exc, model, request.scope.get(RID_KEY) or "")
    service.record(route, model, status, time.perf_counter() - t0,
                   request_id=request.scope.get(RID_KEY) or "", key=request.scope.get(SCOPE_KEY))
    return error_response(exc, route) if isinstance(exc, VramgateError) else Response(status_code=499)


async def inference(request: Request) -> Response:
    """Every inference route (``validation.ROUTES``). A call still running when uvicorn gives up
    waiting at shutdown (``shutdown_timeout``) and cancels it is answered with a 503
    ``server_shutting_down`` in the route's shape, not uvicorn's plain-text 500."""
    t0, route, service = time.perf_counter(), request.scope["route"].path, request.state.service
    request.scope[LOGGED] = True  # the service (or the refusal below) writes its access-log line
    try:
        call = await read_call(request, route, t0)
    except (VramgateError, ClientGone) as exc:
        return refused(request, route, t0, exc)
    call.started = t0

    def watch(aw: Any, undo: Any = None) -> Any:
        return until_disconnect(aw, request.receive, undo)
    try:
        answer = await service.serve(call, watch)
    except VramgateError as exc:
        return error_response(exc, route)
    except ClientGone:
        return Response(status_code=499)
    except asyncio.CancelledError:
        if not service.pool.closing:
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]  (answered, not cancelled)
        return refused(request, route, t0, ModelUnavailable(
            "the server is shutting down; the request was cut short", code="server_shutting_down",
            retry_after=5))
    if answer.stream is not None:
        assert answer.finalize is not None
        return RelayResponse(answer.stream, answer.finalize, answer.headers,
                             closing=lambda: service.pool.closing)
    return Response(answer.body, status_code=answer.status, headers=answer.headers,
                    media_type=answer.media_type)
