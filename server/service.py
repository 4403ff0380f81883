"""The request service, HTTP-free: one parsed inference call for a model, a key and a priority, from
its rate limit to its answer. The routes call it (``server.exchange``, which reads the HTTP
request); a batch runner can call it the same way.

:meth:`Service.serve` applies the key's rate limit, rewrites the body where the engine needs it
(FIM prompts, special-token stops), takes a lease from the scheduler at the call's priority, fits
the output budget to the engine's context, forwards, reads the usage, and emits one
:class:`Record` (metrics and the access-log line) when the answer ends. ``watch(aw, undo)`` is how
the service learns the caller is gone: it awaits ``aw`` unless the caller leaves first, then raises
:class:`~server.errors.ClientGone` (after ``undo(result)`` if ``aw`` finished anyway).

Errors known before the first byte are raised (:class:`~server.errors.VramgateError`, recorded
already). A stream whose model is still loading after :data:`COMMIT_AFTER` seconds (a cold start,
a restart) is answered at once with keep-alive events (``StreamFlavor.keepalive``) every
``stream_keepalive`` seconds until the engine's first token, so clients with a 30–60 s read
timeout do not give up during a CPU cold start; a start that then fails ends that stream with the
route's error event. A stream that waits for room (no engine loading yet) waits silently, so a
refusal is still a plain 503 with ``Retry-After``.
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

from server import infill
from server.calls import Answer, Call, Watch, affinity_key, unwatched  # noqa: F401  (re-exported)
from server.admission import PRIORITIES, rate_check
from server.engineclient import EngineClient
from server.errors import (ClientGone, EngineUnreachable, RateLimited, UpstreamError, VramgateError,
                           normalize_upstream_error)
from server.modelfiles import UNKNOWN
from server.profile import profile
from server.proxy import forward, relay_stream
from server.accesslog import AccessLog
from server.rewrite import fim_completion, fit_output, special_stops
from server.sse import ANTHROPIC, OPENAI, RESPONSES, ModelRename, StreamTap, answer_usage
from server.validation import ROUTES, STOP_ROUTES, USAGE_ROUTES, engine_body

log = logging.getLogger("vramgate.api")
FLAVORS = {"/v1/responses": RESPONSES, "/v1/messages": ANTHROPIC}
# Seconds a stream waits for its engine before it is answered and keep-alives begin: errors known
# sooner (no room, a failed model) are still answered as plain JSON.
COMMIT_AFTER = 0.75


class Service:
    """The request service over the scheduler (``pool``), the metrics, the engines' HTTP session
    and the client of the engines on Unix sockets (``local``, :mod:`server.engineclient`; ``None``:
    the session for all), per-key request times (``rates``: key name → deque of monotonic
    seconds) and the engine responses being relayed (``upstreams``, cut short at shutdown)."""

    def __init__(self, pool: Any, metrics: Any, session: aiohttp.ClientSession,
                 rates: dict[str, deque] | None = None, upstreams: set | None = None,
                 access: AccessLog | None = None, local: EngineClient | None = None) -> None:
        self.pool, self.metrics, self.session, self.local = pool, metrics, session, local
        self.access = access or AccessLog()
        self.rates = {} if rates is None else rates
        self.upstreams = set() if upstreams is None else upstreams

    async def serve(self, call: Call, watch: Watch = unwatched) -> Answer:
        """Serve ``call`` (module docstring). Raises :class:`VramgateError` or ``ClientGone``,
        each recorded already."""
        return await Serving(self, call, watch).run()

    def record(self, route: str, model: str, status: int, seconds: float, *, request_id: str = "",
               key: Any = None, ttft: float | None = None, tools: int | None = None,
               tokens: dict[str, int] | None = None) -> None:
        """The one record of a finished call: the metrics, and one access-log line (unless the
        access log is off)."""
        self.metrics.observe(model, route, status, seconds, tokens)
        if not self.access.enabled:
            return
        self.access.write(
            self.pool.settings.log_format, request_id=request_id or None, route=route,
            model=model, status=status, duration_s=round(seconds, 4),
            ttft_s=round(ttft, 4) if ttft is not None else None,
            key=key.name if key is not None else None, tools=tools,
            **{f"{kind}_tokens": n for kind, n in (tokens or {}).items()})

    def rejected(self, exc: VramgateError, model: str, request_id: str = "") -> None:
        """Count and log an error before it is answered."""
        if exc.status in (429, 503) and exc.code:
            self.metrics.child(self.metrics.rejections, model, exc.code).inc()
        if exc.status >= 500:
            log.warning("request %s for %s failed: %s %s", request_id, model, exc.status,
                        exc.message.splitlines()[0])


class Serving:
    """The state of one call while it is served; :meth:`run` is the whole of it. ``cleanups`` are
    undone in reverse order when the answer ends (a stream hands them to its ``finalize``)."""

    def __init__(self, service: Service, call: Call, watch: Watch) -> None:
        self.service, self.call, self.watch = service, call, watch
        self.pool, self.metrics, self.settings = service.pool, service.metrics, service.pool.settings
        self.model, self.parsed, self.label = call.model, call.parsed, call.model.name
        self.flavor = FLAVORS.get(call.route, OPENAI)
        self.cleanups: list[Callable[[], None]] = []
        self.headers: dict[str, str] = {}
        self.ttft: float | None = None
        self.rewritten: dict[str, Any] | None = None
        self.fim = False

    def done(self, status: int, tokens: dict[str, int] | None = None) -> None:
        tools = self.parsed.body.get("tools")
        self.service.record(self.call.route, self.label, status,
                            time.perf_counter() - self.call.started,
                            request_id=self.call.request_id, key=self.call.key, ttft=self.ttft,
                            tools=len(tools) if isinstance(tools, list) and tools else None,
                            tokens=tokens)

    def failed(self, exc: VramgateError) -> None:
        self.service.rejected(exc, self.label, self.call.request_id)

    async def run(self) -> Answer:
        try:
            self._limit()
            self._rewrite()
            lease = await self._lease()
            if lease is None:
                return self._waiting()
            try:
                return await self._answer(lease)
            except EngineUnreachable as exc:  # it never reached that engine: once more, elsewhere
                self.pool.unreachable(lease, exc.message)
                self._unlease()
                lease = await self._lease()
                if lease is None:
                    return self._waiting()
                return await self._answer(lease)
        except VramgateError as exc:
            if not (self.call.retried and exc.status in (429, 503)
                    and not isinstance(exc, UpstreamError)):
                self.failed(exc)
                self.done(exc.status)
            raise
        except ClientGone:
            self.done(499)
            raise
        finally:
            for undo in reversed(self.cleanups):
                undo()

    # ---- before the engine --------------------------------------------------------------------
    def _limit(self) -> None:
        key = self.call.key
        if key is not None and key.rpm:
            times = self.service.rates.setdefault(key.name, deque())
            wait = rate_check(times, time.monotonic(), key.rpm)
            if wait:
                raise RateLimited(f"Rate limit reached: {key.rpm} requests per minute for this key. "
                                  f"Try again in {wait:.1f} s.", retry_after=wait)
            times.append(time.monotonic())

    def _rewrite(self) -> None:
        model, body, route = self.model, self.parsed.body, self.call.engine_route
        prof = self.pool.profile(model.name) or profile(model, UNKNOWN)
        if route == "/v1/completions" and body.get("suffix") is not None:
            self.fim = True
            self.rewritten = fim_completion(body, model.name, prof.fim, prof.files,
                                            model.fim_max_tokens, self.call.middle)
        elif route in STOP_ROUTES:
            self.rewritten = special_stops(body, prof.files)

    # ---- the engine ---------------------------------------------------------------------------
    def _leased(self, lease: Any, into: list[Callable[[], None]]) -> Any:
        # No in-flight gauge to move here: /metrics reads the leases from the scheduler's books.
        self.lease_undo = (lease.release,)
        into.extend(self.lease_undo)
        return lease

    def _unlease(self) -> None:
        """Give the lease back now, not when the answer ends (its engine could not be reached)."""
        for undo in self.lease_undo:
            self.cleanups.remove(undo)
            undo()

    async def _lease(self) -> Any:
        """A lease on a ready engine, from the scheduler, at the call's priority. ``None`` for a
        stream whose engine is still loading after :data:`COMMIT_AFTER` seconds (the call goes
        on waiting in ``self.acquiring``)."""
        priority = self.call.priority
        if priority is None:
            priority = PRIORITIES["interactive"] if self.fim else PRIORITIES["normal"]
        affinity = (affinity_key(self.call.engine_route, self.parsed.body)
                    if self.model.engines > 1 else None)
        sched, name = self.pool, self.model.name
        wid, fut = sched.request(name, priority, affinity)
        try:
            # The scheduler's task runs before this one resumes: a ready engine's lease (the
            # common case) is granted by then, and no watch for a hang-up is needed.
            await asyncio.sleep(0)
            if not fut.done() and (not self.parsed.stream or self.settings.stream_keepalive <= 0):
                await self.watch(_wait(fut), lambda lease: lease.release())
            while not fut.done():  # only a cold start gets keep-alives; a wait for room ends in JSON
                await self.watch(asyncio.wait({fut}, timeout=COMMIT_AFTER))
                if not fut.done() and sched.loading(name):
                    self.acquiring = (wid, fut)
                    return None
        except BaseException:
            sched.withdraw(wid, fut)
            raise
        return self._leased(fut.result(), self.cleanups)

    async def _forward(self, lease: Any, into: list[Callable[[], None]]
                       ) -> tuple[aiohttp.ClientResponse, bytes]:
        body, route = self.rewritten, self.call.engine_route
        if self.model.max_tokens_policy == "fit":
            fitted, note = fit_output(body or self.parsed.body, route, lease.max_model_len)
            if fitted is not None:
                body = fitted
                if self.call.route == "/infill":  # the client's own name for it
                    note = dataclasses.replace(note, params=("n_predict",))
                self.headers["x-vramgate-max-tokens"] = note.header()
        raw = engine_body(self.call.raw, self.parsed, lease.served_name or self.model.name, body=body,
                          want_usage=route in USAGE_ROUTES)
        headers = {"content-type": "application/json", "x-request-id": self.call.request_id,
                   **lease.headers}
        upstreams = self.service.upstreams
        # The time the request spent in the gateway before it went to the engine (ms), as a
        # Server-Timing metric: a client can tell the gateway's share from the engine's.
        self.headers["server-timing"] = f"gateway;dur={(time.perf_counter() - self.call.started) * 1000:.3f}"

        def opened(resp: aiohttp.ClientResponse) -> None:  # closed with the answer, or at shutdown
            into.append(resp.close)
            upstreams.add(resp)
            into.append(lambda: upstreams.discard(resp))

        return await forward(self.service.session, lease.base_url + route, raw, headers, opened,
                             read=not self.parsed.stream, local=self.service.local)

    def _upstream_error(self, status: int, data: bytes) -> VramgateError:
        return normalize_upstream_error(status, data, field=ROUTES[self.call.route][0])

    async def _answer(self, lease: Any) -> Answer:
        upstream, data = await self.watch(self._forward(lease, self.cleanups))
        if upstream.status >= 400:
            raise self._upstream_error(upstream.status, data)
        if not self.parsed.stream:
            self.done(upstream.status, answer_usage(data))
            rename = self._rename(lease)
            if rename is not None:
                data = rename(data)
            media = upstream.headers.get("content-type", "application/json")
            if self.call.route == "/infill":
                data = json.dumps(infill.from_completion(json.loads(data), self.model.name,
                                                         self.call.warm)).encode()
                media = "application/json"
            return Answer(upstream.status, self.headers, data, media)
        held, self.cleanups = self.cleanups, []
        tap = self._tap()
        tap.rename = self._rename(lease)
        return Answer(200, self.headers, stream=self._relay(upstream, tap),
                      finalize=self._finalizer(held, tap, {"status": 200}))

    def _rename(self, lease: Any) -> ModelRename | None:
        """How answers from ``lease``'s engine get our model name back, if it serves the model
        under another (an upstream's ``model``)."""
        theirs = lease.served_name
        return ModelRename(theirs, self.model.name) if theirs and theirs != self.model.name else None

    # ---- streams ------------------------------------------------------------------------------
    def _tap(self) -> StreamTap:
        include = self.parsed.include_usage
        return StreamTap(self.flavor, null_usage=include and self.flavor is OPENAI,
                         drop_usage=not include)

    def _first(self) -> None:
        self.ttft = time.perf_counter() - self.call.started
        self.metrics.child(self.metrics.ttft, self.label, self.call.route).observe(self.ttft)

    def _relay(self, upstream: aiohttp.ClientResponse, tap: StreamTap) -> AsyncIterator[bytes]:
        convert = (infill.InfillStream(self.model.name, tap.tokens, self.call.warm).feed
                   if self.call.route == "/infill" else None)
        return relay_stream(upstream, tap=tap, on_first=self._first,
                            closing=lambda: self.pool.closing, convert=convert)

    def _finalizer(self, held: list[Callable[[], None]], tap: StreamTap,
                   outcome: dict[str, int]) -> Callable[[bool], None]:
        def finalize(complete: bool) -> None:
            for undo in reversed(held):
                undo()
            self.metrics.itl.observe_many((self.label,), tap.gaps)
            # A client that hangs up once it has the stream's last event (Codex does, after
            # response.completed) got its whole answer.
            self.done(outcome["status"] if complete or tap.finished else 499, tap.tokens)
        return finalize

    def _waiting(self) -> Answer:
        """The stream of a call whose engine is not ready yet: keep-alives while the lease is
        acquired, then the engine's events (or the route's error event)."""
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
                tap.rename = self._rename(lease)
                upstream, data = await self._forward(lease, held)
                if upstream.status >= 400:
                    raise self._upstream_error(upstream.status, data)
            except VramgateError as exc:
                self.failed(exc)
                outcome["status"] = exc.status
                yield self.flavor.error(exc.message, exc.code, type_=exc.type, param=exc.param,
                                        status=exc.status)
                return
            async for chunk in self._relay(upstream, tap):
                yield chunk

        return Answer(200, {}, stream=content(), finalize=self._finalizer(held, tap, outcome))


async def _wait(fut: asyncio.Future) -> Any:
    return await fut
