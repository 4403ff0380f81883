"""HTTP plumbing of one inference request: the body read under a limit, the race against a client
that hangs up, and the streamed response (pure ASGI, no task group per stream)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.errors import BodyTooLarge, ClientGone, VramgateError, anthropic_body
from server.validation import ANTHROPIC_ROUTES

T = TypeVar("T")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# Seconds a request runs before its hang-up watcher starts. A request that ends sooner (most
# non-streaming answers from a warm engine) never pays for the watcher's task, its receive and its
# cancellation: py-spy put them at about 8% of the gateway's CPU a request (issue #15). A client
# that hangs up sooner is noticed this much later at most, so its engine request is aborted late
# by as much.
WATCH_AFTER = 0.05


async def until_disconnect(aw: Awaitable[T], receive: Receive,
                           cleanup: Callable[[T], Any] | None = None,
                           after: float = WATCH_AFTER) -> T:
    """Await ``aw`` unless the client disconnects first: then cancel it and raise :class:`ClientGone`.

    ``aw`` (a coroutine) runs inline in the request's own task (no task of its own: this is on
    every request's path). Once ``aw`` has run ``after`` seconds, a watcher task reads
    ``receive`` and, on ``http.disconnect``, cancels the request's task while it is still inside
    ``aw``, so ``aw`` must be cancel-safe. (A client gone before then is noticed when the watcher
    starts: its first ``receive`` returns the disconnect at once.) If ``aw`` swallowed that
    cancellation and finished anyway, ``cleanup(result)`` undoes it (a slot, a lease) before
    :class:`ClientGone` is raised.
    """
    current = asyncio.current_task()
    assert current is not None
    state: dict[str, Any] = {"active": True, "gone": False, "watch": None}

    def on_disconnect(watch: asyncio.Future) -> None:
        if state["active"] and not watch.cancelled() and watch.exception() is None:
            state["gone"] = True
            current.cancel()

    def start_watch() -> None:
        if state["active"]:
            state["watch"] = watch = asyncio.ensure_future(_disconnected(receive))
            watch.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(after, start_watch)
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
        timer.cancel()
        if state["watch"] is not None:
            state["watch"].cancel()


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


class RelayResponse:
    """A streamed answer (ASGI): the headers at once, ``content``'s chunks as they come, then the
    end of the body.

    ``finalize(complete)`` runs exactly once however the stream ends; ``complete`` is false when
    the client hung up (or the send failed) before the body's end. A client that hangs up cancels
    the relay (one watcher on ``receive``, :func:`until_disconnect`, within :data:`WATCH_AFTER`
    seconds), which closes the engine connection, so vLLM aborts the request. Cancelled by uvicorn
    once ``closing()`` (the gateway's shutdown ran past ``shutdown_timeout``), it ends quietly.
    Leaner than Starlette's ``StreamingResponse``, which runs a task group of two tasks for each
    stream. ``headers`` are sent besides :data:`SSE_HEADERS`; ``raw_headers`` (name and value
    bytes, as Starlette's responses have them) is the whole list.
    """

    def __init__(self, content: AsyncIterator[bytes], finalize: Callable[[bool], None],
                 headers: dict[str, str] | None = None,
                 closing: Callable[[], bool] = lambda: False) -> None:
        self.body_iterator = content
        self._finalize = finalize
        self._closing = closing
        self.raw_headers = list(SSE_HEADERS) + [(k.encode(), v.encode("latin-1"))
                                             for k, v in (headers or {}).items()]

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._complete = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._complete = False
        try:
            await until_disconnect(self._pump(send), receive)
        except (ClientGone, OSError):
            pass  # the client left: nothing more to send
        except RuntimeError as exc:  # uvloop: a write on a transport closed under a pipelined request
            if "closed" not in str(exc):
                raise
        except asyncio.CancelledError:  # uvicorn's at shutdown: the stream's error event is out, or
            if not self._closing():     # a slow client could not take it; nothing more to send
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._finalize(self._complete)


def error_response(exc: VramgateError, route: str = "") -> Response:
    """The error as plain JSON: the OpenAI envelope, or the Anthropic shape on the Anthropic
    routes. ASCII-escaped, so any text in it (a model name with a lone surrogate) can be sent."""
    body = anthropic_body(exc.status, exc.message) if route in ANTHROPIC_ROUTES else exc.envelope()
    return Response(json.dumps(body), status_code=exc.status, headers=exc.headers(),
                    media_type="application/json")
