"""The data path: forward one request to an engine and relay its answer byte for byte.

The local engines on Unix sockets (the default) are reached by
:class:`server.engineclient.EngineClient`, at a third of aiohttp's CPU a request. aiohttp's client
carries the rest of the data path (engines on loopback ports, upstreams on other hosts; measured
on loopback: +0.3 ms a request against +1.0 ms for httpx's default transport) and the control
plane (health checks, model cards, metrics scrapes: :func:`probe`), over one pooled session.
Engine connection errors are translated here and nowhere else: into the error tree on the data
path, into ``None`` on the control plane.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp

from server.engineclient import ConnectFailed, EngineClient
from server.errors import EngineUnreachable, ModelUnavailable
from server.localsock import EngineConnector
from server.sse import StreamFlavor, StreamTap

# Engines answer slowly (a long generation); only the connection attempt is bounded.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


def new_session(socket_dir: Path | None = None) -> aiohttp.ClientSession:
    """One pooled client for every engine: keep-alive connections, no total connection limit;
    engines on Unix sockets in ``socket_dir`` are dialled there (:mod:`server.localsock`)."""
    return aiohttp.ClientSession(
        connector=EngineConnector(socket_dir, limit=0, keepalive_timeout=30,
                                  enable_cleanup_closed=True),
        timeout=TIMEOUT, auto_decompress=False, skip_auto_headers=("User-Agent",))


async def probe(session: aiohttp.ClientSession, url: str, timeout: float,
                headers: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    """``GET url`` (with ``headers``) within ``timeout`` seconds: its status and body, or ``None``
    when the engine cannot be reached, resets the connection or does not answer in time."""
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return None


async def open_upstream(session: aiohttp.ClientSession, url: str, body: bytes,
                        headers: dict[str, str], local: EngineClient | None = None
                        ) -> aiohttp.ClientResponse:
    """POST ``body`` to ``url``; returns the response once its headers arrived: through ``local``
    when it names an engine on a Unix socket (:meth:`EngineClient.target`), else through
    ``session``. Both responses have what the data path reads: ``status``, ``headers``,
    ``read()``, ``content.iter_any()``, ``release()`` and ``close()``.

    Raises :class:`EngineUnreachable` (503) when no connection could be made, and
    :class:`ModelUnavailable` (503) when the connection failed later. An engine error status is
    returned as is, for :func:`read_error` to turn into an OpenAI error.
    """
    try:
        where = local.target(url) if local is not None else None
        if where is not None:
            return await local.post(*where, body, headers)  # type: ignore[return-value]
        return await session.post(url, data=body, headers=headers)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, ConnectFailed) as exc:
        raise EngineUnreachable(f"the engine could not be reached: {exc.__class__.__name__}: {exc}",
                                retry_after=5) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ModelUnavailable(f"the engine did not answer: {exc.__class__.__name__}: {exc}",
                               retry_after=5) from exc


async def read_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body of a non-streaming answer; :class:`ModelUnavailable` if the engine drops it."""
    try:
        data = await resp.read()
    except (aiohttp.ClientError, OSError) as exc:
        resp.close()
        raise ModelUnavailable(f"the engine dropped the connection: {exc}", retry_after=5) from exc
    except BaseException:  # cancelled (client gone): drop the connection so vLLM aborts the request
        resp.close()
        raise
    resp.release()
    return data


async def forward(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                  opened: Callable[[aiohttp.ClientResponse], None], *, read: bool,
                  local: EngineClient | None = None) -> tuple[aiohttp.ClientResponse, bytes]:
    """Send ``body`` to the engine at ``url`` (through ``local`` for an engine on a Unix
    socket); ``opened(response)`` as soon as its headers are in (the caller closes it when done).
    Returns the response and, with ``read`` or an error status, its whole body (else ``b""``: the
    caller streams it). Raises as :func:`open_upstream` does."""
    resp = await open_upstream(session, url, body, headers, local)
    opened(resp)
    if read or resp.status >= 400:
        return resp, await read_body(resp)
    return resp, b""


async def relay_stream(resp: aiohttp.ClientResponse, *, tap: StreamTap,
                       on_first: Callable[[], None] | None = None,
                       closing: Callable[[], bool] = lambda: False,
                       convert: Callable[[list[bytes]], list[bytes]] | None = None
                       ) -> AsyncIterator[bytes]:
    """Yield the engine's SSE bytes as they arrive, whole events only, bytes unchanged.

    Chunks are cut at ``\n\n`` so that a failure never leaves half an event before the error
    event. Each read's events go through ``tap`` (:class:`server.sse.StreamTap`: token usage,
    inter-token gaps, the usage chunk the client did not ask for removed, ``"usage":null`` where
    the client asked). If the engine fails or ends the stream without its proper last event (the
    tap's flavor: ``[DONE]`` for the OpenAI routes), one error event in the route's shape is sent
    and the body ends (``closing()`` true: the gateway is shutting down, and says so). The upstream
    connection is closed in ``finally``, so vLLM aborts the request when the client goes away.
    ``convert`` rewrites the tapped events for a route that answers in another API's shape
    (``/infill``); every other route's events go out as the engine wrote them.
    """
    flavor = tap.flavor
    clock = time.perf_counter
    try:
        async for chunk in resp.content.iter_any():
            if on_first is not None:
                on_first()
                on_first = None
            if convert is None:  # bytes as the engine wrote them, whole events only
                out = tap.feed_bytes(chunk, clock())
            else:
                out = b"".join(convert(tap.feed_events(chunk, clock())))
            if out:
                yield out
        if not flavor.complete(tap.last_event):
            yield _failure("the engine ended the stream before it was complete",
                           "engine_stream_incomplete", closing, flavor)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        yield _failure(f"the engine connection failed mid-stream: {exc.__class__.__name__}",
                       "engine_stream_failed", closing, flavor)
    finally:
        resp.close()


def _failure(message: str, code: str, closing: Callable[[], bool], flavor: StreamFlavor) -> bytes:
    if closing():
        return flavor.error("the server is shutting down; the stream was cut short",
                            "server_shutting_down", status=503)
    return flavor.error(message, code)
