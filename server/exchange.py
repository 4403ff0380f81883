"""One inference request, from its body to its answer: parse and validate, rewrite (FIM, stop
tokens), admit, lease an engine, fit the output budget, forward, relay.

Errors known before the first byte leave as plain JSON in the route's shape. A stream whose model
is still loading after :data:`COMMIT_AFTER` seconds (a cold start, a restart) gets its headers then
and keep-alive events (``StreamFlavor.keepalive``) every ``stream_keepalive`` seconds until the
engine's first token, so clients with a 30–60 s read timeout do not give up during a CPU cold start;
a start that then fails ends that stream with the route's error event. A stream that waits for room
(no engine loading yet) waits silently, so a refusal is still a 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from typing import Any, AsyncIterator, Callable

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from server import infill
from server.admission import PRIORITIES, parse_priority, rate_check
from server.auth import SCOPE_KEY, allowed
from server.errors import (InvalidRequest, ModelNotFound, PermissionDenied, RateLimited,
                           VramgateError, anthropic_body, normalize_upstream_error)
from server.metrics import UNKNOWN_MODEL
from server.modelfiles import UNKNOWN
from server.profile import profile
from server.proxy import forward, relay_stream
from server.relay import ClientGone, RelayResponse, read_limited, until_disconnect
from server.requestid import LOGGED, SCOPE_KEY as RID_KEY, access, access_line
from server.rewrite import fim_completion, fit_output, special_stops
from server.sse import ANTHROPIC, OPENAI, RESPONSES, StreamTap, answer_usage
from server.validation import (ANTHROPIC_ROUTES, ROUTES, STOP_ROUTES, USAGE_ROUTES, engine_body,
                               parse_body, validate)

log = logging.getLogger("vramgate.api")
FLAVORS = {"/v1/responses": RESPONSES, "/v1/messages": ANTHROPIC}
# Seconds a stream waits for its engine before its headers go out and keep-alives begin: errors
# known sooner (no room, a failed model) are still answered as plain JSON.
COMMIT_AFTER = 0.75
AFFINITY_CHARS = 512  # the prompt prefix that keys replica affinity (characters)


def error_response(exc: VramgateError, route: str = "") -> Response:
    """The error as plain JSON: the OpenAI envelope, or the Anthropic shape on the Anthropic
    routes. ASCII-escaped, so any text in it (a model name with a lone surrogate) can be sent."""
    body = anthropic_body(exc.status, exc.message) if route in ANTHROPIC_ROUTES else exc.envelope()
    return Response(json.dumps(body), status_code=exc.status, headers=exc.headers(),
                    media_type="application/json")


def affinity_key(route: str, body: dict[str, Any]) -> str:
    """What requests that share a prompt prefix have in common: the first
    :data:`AFFINITY_CHARS` characters of their prompt, messages (with the system prompt) or input."""
    if route in ("/v1/completions", "/infill"):
        head = body.get("prompt")
    elif route == "/v1/responses":
        head = [body.get("instructions"), body.get("input")]
    else:
        head = [body.get("system"), body.get("messages")]
    text = head if isinstance(head, str) else json.dumps(head, separators=(",", ":"), default=str)
    return text[:AFFINITY_CHARS]


async def _wait(fut: asyncio.Future) -> Any:
    return await fut


class Exchange:
    """The state of one request while it is served; :meth:`run` is the whole of it.

    ``cleanups`` are undone in reverse order when the answer ends (a stream hands them to its
    ``finalize``); ``headers`` go out with the answer (``x-vramgate-max-tokens``).
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.route = request.scope["route"].path
        self.engine_route = "/v1/completions" if self.route == "/infill" else self.route
        self.state = request.state
        self.pool, self.metrics = self.state.pool, self.state.metrics
        self.settings = self.pool.settings
        self.flavor = FLAVORS.get(self.route, OPENAI)
        self.t0 = time.perf_counter()
        self.label = UNKNOWN_MODEL
        self.cleanups: list[Callable[[], None]] = []
        self.headers: dict[str, str] = {}
        self.timing: dict[str, float] = {}
        self.rewritten: dict[str, Any] | None = None
        self.fim = False
        self.middle, self.warm = "", False  # /infill: its prompt, and n_predict 0

    def done(self, status: int, tokens: dict[str, int] | None = None) -> None:
        """Record the finished request: metrics and one access-log line."""
        seconds = time.perf_counter() - self.t0
        self.metrics.observe(self.label, self.route, status, seconds)
        for kind, count in (tokens or {}).items():
            self.metrics.tokens.labels(self.label, kind).inc(count)
        self.request.scope[LOGGED] = True
        if access.isEnabledFor(logging.INFO):
            key = self.request.scope.get(SCOPE_KEY)
            ttft = self.timing.get("ttft")
            parsed = getattr(self, "parsed", None)
            tools = parsed.body.get("tools") if parsed is not None else None
            access.info(access_line(
                self.settings.log_format, request_id=self.request.scope.get(RID_KEY),
                route=self.route, model=self.label, status=status, duration_s=round(seconds, 4),
                ttft_s=round(ttft, 4) if ttft is not None else None,
                key=key.name if key is not None else None,
                tools=len(tools) if isinstance(tools, list) and tools else None,
                **{f"{kind}_tokens": n for kind, n in (tokens or {}).items()}))

    def rejected(self, exc: VramgateError) -> None:
        """Count and log an error before it is answered."""
        if exc.status in (429, 503) and exc.code:
            self.metrics.rejections.labels(self.label, exc.code).inc()
        if exc.status >= 500:
            log.warning("request %s for %s failed: %s %s", self.request.scope.get(RID_KEY),
                        self.label, exc.status, exc.message.splitlines()[0])

    async def run(self) -> Response:
        """Serve the request; every outcome is a response (and one :meth:`done`)."""
        try:
            await self._prepare()
            lease = await self._lease()
            if lease is None:
                return self._waiting()
            return await self._answer(lease)
        except VramgateError as exc:
            self.rejected(exc)
            self.done(exc.status)
            return error_response(exc, self.route)
        except ClientGone:
            self.done(499)
            return Response(status_code=499)
        finally:
            for undo in reversed(self.cleanups):
                undo()

    # ---- before the engine --------------------------------------------------------------------
    def _infill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("model")
        if name is None:  # llama.cpp serves one model: the first this key may use that fills in
            key = self.request.scope.get(SCOPE_KEY)
            name = next((e.config.name for e in self.pool.models().values()
                         if e.profile.fim is not None
                         and allowed(key, (e.config.name, *e.config.aliases))), None)
            if name is None:
                raise InvalidRequest("No model that this key may use has fill-in-the-middle "
                                     "tokens: serve a FIM-trained model, or set 'fim' for one in "
                                     "the configuration.", param="model",
                                     code="suffix_not_supported")
        model = self.settings.resolve(name) if isinstance(name, str) else None
        budget = model.fim_max_tokens if model is not None else 128
        self.middle, self.warm = infill.middle(body), infill.warm_only(body)
        return infill.to_completion(body, name, budget)

    async def _prepare(self) -> None:
        raw = await read_limited(self.request, self.settings.max_body_bytes)
        body = parse_body(raw)
        if self.route == "/infill":
            body = self._infill_body(body)
        parsed = validate(self.engine_route, body)
        model = self.settings.resolve(parsed.model)
        if model is None:
            raise ModelNotFound(parsed.model)
        self.label = model.name
        key = self.request.scope.get(SCOPE_KEY)
        if not allowed(key, (model.name, *model.aliases)):
            raise PermissionDenied(f"This API key may not use the model '{parsed.model}'.")
        if model.task != ROUTES[self.route][1]:
            raise InvalidRequest(f"The model '{model.name}' serves {model.task} requests and cannot "
                                 f"answer {self.route}.", param="model", code="model_not_supported")
        if key is not None and key.rpm:
            times = self.state.rates.setdefault(key.name, deque())
            wait = rate_check(times, time.monotonic(), key.rpm)
            if wait:
                raise RateLimited(f"Rate limit reached: {key.rpm} requests per minute for this key. "
                                  f"Try again in {wait:.1f} s.", retry_after=wait)
            times.append(time.monotonic())
        prof = self.pool.profile(model.name) or profile(model, UNKNOWN)
        if self.engine_route == "/v1/completions" and body.get("suffix") is not None:
            self.fim = True
            self.rewritten = fim_completion(body, model.name, prof.fim, prof.files,
                                            model.fim_max_tokens, self.middle)
        elif self.engine_route in STOP_ROUTES:
            self.rewritten = special_stops(body, prof.files)
        self.raw, self.parsed, self.model = raw, parsed, model

    # ---- the engine ---------------------------------------------------------------------------
    def _leased(self, lease: Any, into: list[Callable[[], None]]) -> Any:
        into.append(lease.release)
        in_flight = self.metrics.in_flight.labels(self.label)
        in_flight.inc()
        into.append(in_flight.dec)
        return lease

    async def _lease(self) -> Any:
        """A lease on a ready engine, from the scheduler, at the request's priority (``X-Priority``;
        FIM requests default to interactive). ``None`` for a stream whose engine is still loading
        after :data:`COMMIT_AFTER` seconds (the request goes on waiting in ``self.acquiring``)."""
        header = self.request.headers.get("x-priority")
        priority = PRIORITIES["interactive"] if self.fim and header is None else parse_priority(header)
        affinity = affinity_key(self.engine_route, self.parsed.body) if self.model.replicas > 1 else None
        sched, name, receive = self.pool, self.model.name, self.request.receive
        wid, fut = sched.request(name, priority, affinity)
        try:
            # The scheduler's task runs before this one resumes: a ready engine's lease (the
            # common case) is granted by then, and no watcher for a hang-up is needed.
            await asyncio.sleep(0)
            if not fut.done() and (not self.parsed.stream or self.settings.stream_keepalive <= 0):
                await until_disconnect(_wait(fut), receive, lambda lease: lease.release())
            while not fut.done():  # only a cold start gets keep-alives; a wait for room ends in JSON
                await until_disconnect(asyncio.wait({fut}, timeout=COMMIT_AFTER), receive)
                if not fut.done() and sched.loading(name):
                    self.acquiring = (wid, fut)
                    return None
        except BaseException:
            sched.withdraw(wid, fut)
            raise
        return self._leased(fut.result(), self.cleanups)

    async def _forward(self, lease: Any, into: list[Callable[[], None]]
                       ) -> tuple[aiohttp.ClientResponse, bytes]:
        body = self.rewritten
        if self.model.max_tokens_policy == "fit":
            fitted, note = fit_output(body or self.parsed.body, self.engine_route,
                                      lease.max_model_len)
            if fitted is not None:
                body = fitted
                if self.route == "/infill":  # the client's own name for it
                    note = dataclasses.replace(note, params=("n_predict",))
                self.headers["x-vramgate-max-tokens"] = note.header()
        raw = engine_body(self.raw, self.parsed, self.model.name, body=body,
                          want_usage=self.engine_route in USAGE_ROUTES)
        headers = {"content-type": "application/json",
                   "x-request-id": self.request.scope.get(RID_KEY) or ""}
        upstreams = self.state.upstreams

        def opened(resp: aiohttp.ClientResponse) -> None:  # closed with the answer, or at shutdown
            into.append(resp.close)
            upstreams.add(resp)
            into.append(lambda: upstreams.discard(resp))

        return await forward(self.state.session, lease.base_url + self.engine_route, raw, headers,
                             opened, read=not self.parsed.stream)

    def _upstream_error(self, status: int, data: bytes) -> VramgateError:
        return normalize_upstream_error(status, data, field=ROUTES[self.route][0])

    async def _answer(self, lease: Any) -> Response:
        upstream, data = await until_disconnect(self._forward(lease, self.cleanups),
                                                self.request.receive)
        if upstream.status >= 400:
            raise self._upstream_error(upstream.status, data)
        if not self.parsed.stream:
            self.done(upstream.status, answer_usage(data))
            media = upstream.headers.get("content-type", "application/json")
            if self.route == "/infill":
                data = json.dumps(infill.from_completion(json.loads(data), self.model.name,
                                                         self.warm)).encode()
                media = "application/json"
            return Response(data, status_code=upstream.status, headers=self.headers,
                            media_type=media)
        held, self.cleanups = self.cleanups, []
        tap = self._tap()
        return RelayResponse(self._relay(upstream, tap), self._finalizer(held, tap, {"status": 200}),
                             self.headers)

    # ---- streams ------------------------------------------------------------------------------
    def _tap(self) -> StreamTap:
        include = self.parsed.include_usage
        return StreamTap(self.flavor, null_usage=include and self.flavor is OPENAI,
                         drop_usage=not include)

    def _first(self) -> None:
        self.timing["ttft"] = time.perf_counter() - self.t0
        self.metrics.ttft.labels(self.label, self.route).observe(self.timing["ttft"])

    def _relay(self, upstream: aiohttp.ClientResponse, tap: StreamTap) -> AsyncIterator[bytes]:
        convert = (infill.InfillStream(self.model.name, tap.tokens, self.warm).feed
                   if self.route == "/infill" else None)
        return relay_stream(upstream, tap=tap, on_first=self._first,
                            closing=lambda: self.pool.closing, convert=convert)

    def _finalizer(self, held: list[Callable[[], None]], tap: StreamTap,
                   outcome: dict[str, int]) -> Callable[[bool], None]:
        def finalize(complete: bool) -> None:
            for undo in reversed(held):
                undo()
            itl = self.metrics.itl.labels(self.label)
            for gap in tap.gaps:
                itl.observe(gap)
            # A client that hangs up once it has the stream's last event (Codex does, after
            # response.completed) got its whole answer.
            self.done(outcome["status"] if complete or tap.finished else 499, tap.tokens)
        return finalize

    def _waiting(self) -> RelayResponse:
        """The stream of a request whose engine is not ready yet: keep-alives while the lease
        is acquired, then the engine's events (or the route's error event)."""
        held, self.cleanups = self.cleanups, []
        wid, acquiring = self.acquiring
        held.append(lambda: self.pool.withdraw(wid, acquiring))
        tap, outcome = self._tap(), {"status": 200}

        async def content() -> AsyncIterator[bytes]:
            yield self.flavor.keepalive()  # a first byte with the headers: the wait has begun
            while not acquiring.done():
                await asyncio.wait({acquiring}, timeout=self.settings.stream_keepalive)
                if not acquiring.done():
                    yield self.flavor.keepalive()
            try:
                lease = self._leased(acquiring.result(), held)
                upstream, data = await self._forward(lease, held)
                if upstream.status >= 400:
                    raise self._upstream_error(upstream.status, data)
            except VramgateError as exc:
                self.rejected(exc)
                outcome["status"] = exc.status
                yield self.flavor.error(exc.message, exc.code, type_=exc.type, param=exc.param,
                                        status=exc.status)
                return
            async for chunk in self._relay(upstream, tap):
                yield chunk

        return RelayResponse(content(), self._finalizer(held, tap, outcome))


async def inference(request: Request) -> Response:
    """Every inference route (``validation.ROUTES``): see :class:`Exchange`."""
    return await Exchange(request).run()
