"""HTTP/1.1 to the local engines on their Unix sockets: the data path's client (issue #15).

aiohttp's client was about a third of the gateway's CPU a request against the instant engine
(py-spy, 2026-12-07): more than any part of our own code. It parses a URL, consults a cookie jar,
auth and proxy settings and trace hooks, and builds a multidict of headers, a payload object, a
timer and a stream reader for each request. An engine the gateway started itself, on a socket in
a directory only the gateway's user can reach, needs none of that: the request is one ``POST``
with a handful of headers, and the answer comes from vLLM's uvicorn (or a stand-in) with a
``Content-Length`` or chunked. Here the request goes out as one write, and the answer is parsed by
httptools (llhttp, the parser uvicorn itself uses), on keep-alive connections pooled per socket.
Measured on the instant engine, 32 requests at a time (``loadtest/README.md``): 35-44 µs of the
client's CPU a plain request against aiohttp's 115-143 µs, and 87-92 µs against 180-254 µs a
16-chunk stream.

Engines on loopback ports (``engine_transport: tcp``), upstreams on other hosts (TLS, DNS, their
own keep-alive rules) and the control plane (health checks, metrics scrapes, sleep and wake) keep
aiohttp (``server.proxy``).

Errors: :class:`ConnectFailed` when no connection could be made (the engine is not there),
:class:`EngineConnectionError` when one broke (lost, or not HTTP); both are ``OSError``s, which
``server.proxy`` translates into the error tree.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

import httptools

from server import localsock

# Seconds an idle connection is used again. vLLM's uvicorn closes a connection idle for 5 s
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, uvicorn's timeout_keep_alive): one reused later could be closed by
# the engine as the request goes out.
KEEPALIVE = 4.0
# Bytes of a streamed answer buffered before the engine's socket is read no more (the client
# reads slower than the engine writes); aiohttp's stream reader pauses at 128 KiB too.
HIGH_WATER = 128 * 1024
CONNECT_TIMEOUT = 10.0  # seconds, as the aiohttp session's sock_connect (server.proxy.TIMEOUT)
# Seconds after the request went out within which a reused connection that the engine closed
# unanswered is taken for one its keep-alive timer closed as the request arrived (the request was
# never read), and the request is sent again on a new connection. Closed later, the engine may
# have begun on it: the error goes to the caller, as aiohttp does for a POST.
RETRY_WITHIN = 0.1
MAX_HEAD = 64 * 1024  # bytes of an answer's header lines (aiohttp allows 8,190 a line)
_COPY_UNDER = 64 * 1024  # bytes: a smaller body goes out joined to the head in one write


class ConnectFailed(ConnectionError):
    """No connection to an engine's socket could be made: missing, refused or timed out."""


class EngineConnectionError(ConnectionError):
    """A connection to an engine broke before its answer was whole, or the answer was not HTTP."""


def request_head(target: str, length: int, headers: Mapping[str, str]) -> bytes:
    """The head of ``POST target`` with a ``length``-byte body and ``headers``, as bytes.
    Raises ``ValueError`` for a header name or value that could end a line or split the header
    (CR, LF; a colon in a name), or a character outside Latin-1, as aiohttp refuses them."""
    lines = [f"POST {target} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {length}\r\n"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r}: a line break or a colon in a name")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class EngineResponse:
    """One answer from an engine, as it arrives: ``status`` and ``headers`` (names lower-case)
    once :meth:`EngineClient.post` returns, then the body through :meth:`read` (whole) or
    :meth:`iter_any` (as it comes). ``close()`` drops the connection (the engine sees the client
    go and aborts the request); a response read to its end gives its connection back to the pool.
    ``content`` is the response itself, where ``server.proxy.relay_stream`` reads aiohttp's
    ``response.content.iter_any()``."""

    def __init__(self, conn: "_Connection") -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._size = 0  # bytes buffered and not yet taken
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._streaming = False  # read by iter_any: the socket pauses past HIGH_WATER

    @property
    def content(self) -> "EngineResponse":
        return self

    # ---- from the connection ------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._streaming and self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._done or self._error is not None:
            return
        self._error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: post() raises it, or nobody waits any more
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # ---- for the reader -----------------------------------------------------------------------
    def _take(self) -> bytes:
        chunks, self._chunks, self._size = self._chunks, [], 0
        if self._conn is not None:
            self._conn.resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool. Raises
        :class:`EngineConnectionError` if it breaks first (the connection is dropped)."""
        try:
            while not self._done:
                await self._wait()
        except BaseException:
            self.close()
            raise
        data = self._take()
        self.release()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what came since the last step, joined. Ends with the body
        (the connection then goes back to the pool); raises :class:`EngineConnectionError` if it
        breaks first."""
        self._streaming = True
        while True:
            if self._chunks:
                yield self._take()
            elif self._done:
                self.release()
                return
            else:
                await self._wait()

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read whole and the engine keeps
        it alive, else drop it. Nothing after the first call."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self._done and not self._chunks)

    def close(self) -> None:
        """Drop the connection now (a reader still waiting gets :class:`EngineConnectionError`).
        Nothing once the response was given back or closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._fail(EngineConnectionError("the connection to the engine was closed by the gateway"))
            conn.finished(False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine's socket, and its response parser. Answers one
    request at a time (no pipelining): ``response`` is the current one, ``None`` while idle."""

    def __init__(self, client: "EngineClient", path: str) -> None:
        self.client, self.path = client, path
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: EngineResponse | None = None
        self.closed = False
        self.keep_alive = False  # the last answer allows another request on this connection
        self.received = False  # a byte of the current answer has arrived
        self.interim = False  # the message being parsed is a 1xx (100 Continue): not the answer
        self.head_bytes = 0  # of the header lines of the message being parsed
        self.paused = False
        self.sent_at = 0.0  # when the current request went out (the client's clock)
        self.idle_since = 0.0

    # ---- asyncio ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.response
        if resp is None:
            self.client.forget(self)
        elif resp.head.done() and not self._framed(resp):
            resp._end()  # an answer without length or chunks ends with its connection (HTTP/1.0)
        else:
            resp._fail(EngineConnectionError(f"the engine closed the connection{_why(exc)}"))

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is not to be trusted
            self.transport.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            why = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            self.keep_alive = False
            self.response._fail(EngineConnectionError(f"the engine's answer is not HTTP: {why}"))
            self.transport.close()

    # ---- httptools' callbacks (an exception raised here ends the parse: data_received) ---------
    def on_message_begin(self) -> None:
        if self.response._done:  # bytes after the answer: they answer no request of ours
            raise ValueError("bytes after the end of the answer")
        self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD:
            raise ValueError(f"header lines over {MAX_HEAD} bytes")
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        resp, status = self.response, self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self.interim = True
            resp.headers.clear()
            return
        resp.status = status
        if not resp.head.done():
            resp.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.response._end()

    # ---- for the response and the client ------------------------------------------------------
    def begin(self) -> EngineResponse:
        """A response for the request about to go out on this connection, from now on (the
        client's clock)."""
        self.response, self.received, self.keep_alive = EngineResponse(self), False, False
        self.sent_at = self.client.clock()
        return self.response

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def finished(self, whole: bool) -> None:
        """The response is done with: back to the pool if ``whole`` and kept alive, else closed."""
        self.response = None
        self.resume()
        if whole and self.keep_alive and not self.closed:
            self.client.put(self)
        else:
            self.transport.close()

    @staticmethod
    def _framed(resp: EngineResponse) -> bool:
        return "content-length" in resp.headers or "chunked" in resp.headers.get("transfer-encoding", "")


def _why(exc: BaseException | None) -> str:
    return f": {exc.__class__.__name__}: {exc}" if exc is not None else ""


class EngineClient:
    """Keep-alive connections to the engines on Unix sockets in ``directory``, pooled per socket
    (most recently used first, each used again for :data:`KEEPALIVE` seconds after its last
    answer); ``clock`` gives monotonic seconds. An engine's URL is ``http://<id>.uds.invalid``
    (:func:`server.localsock.url_for`)."""

    def __init__(self, directory: Path, *, connect_timeout: float = CONNECT_TIMEOUT,
                 keepalive: float = KEEPALIVE, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = str(directory)
        self.connect_timeout, self.keepalive, self.clock = connect_timeout, keepalive, clock
        self._idle: dict[str, dict[_Connection, None]] = {}  # socket path → idle connections
        self._closed = False

    def target(self, url: str) -> tuple[str, str] | None:
        """``(socket path, request target)`` of ``url`` if it names an engine on a socket (its
        host ends in ``.uds.invalid``), else ``None``."""
        if not url.startswith("http://"):
            return None
        host, slash, rest = url[7:].partition("/")
        if not host.endswith(localsock.SUFFIX):
            return None
        return f"{self.directory}/{host[:-len(localsock.SUFFIX)]}.sock", slash + rest

    async def post(self, path: str, target: str, body: bytes,
                   headers: Mapping[str, str]) -> EngineResponse:
        """``POST target`` with ``body`` and ``headers`` to the engine on socket ``path``; returns
        once the answer's head is in. A connection used before that the engine closed before
        answering a byte (its keep-alive ran out as the request went) is retried once on a new
        one, if that happened within :data:`RETRY_WITHIN` seconds. Raises :class:`ConnectFailed`,
        :class:`EngineConnectionError` or ``ValueError`` (a header that cannot be sent,
        :func:`request_head`)."""
        head = request_head(target, len(body), headers)
        message = [head + body] if len(body) < _COPY_UNDER else [head, body]
        conn = self._take(path)
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(path)
            resp = conn.begin()
            conn.transport.writelines(message)
            try:
                await resp.head
                return resp
            except EngineConnectionError:
                if not (reused and not conn.received
                        and self.clock() - conn.sent_at < RETRY_WITHIN):
                    raise
                conn = None  # once more, on a new connection
            except BaseException:
                resp.close()
                raise

    async def _connect(self, path: str) -> _Connection:
        sock = localsock.engine_socket()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await localsock.connect(sock, path)  # a full backlog is waited for, not mistaken
                _, conn = await loop.create_unix_connection(lambda: _Connection(self, path), sock=sock)
        except OSError as exc:  # TimeoutError is one
            sock.close()
            raise ConnectFailed(f"{path}: {exc.__class__.__name__}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return conn

    def _take(self, path: str) -> _Connection | None:
        idle = self._idle.get(path)
        now = self.clock()
        while idle:
            conn, _ = idle.popitem()  # the most recently used
            if not conn.closed and now - conn.idle_since < self.keepalive:
                if not idle:
                    del self._idle[path]
                return conn
            conn.transport.close()
        self._idle.pop(path, None)
        return None

    def put(self, conn: _Connection) -> None:
        """An idle connection back into its pool (closed instead once the client is closed). The
        pool's oldest connections past :data:`KEEPALIVE` are closed on the way: after a burst,
        the connections it opened do not wait for the engine to close them."""
        if self._closed:
            conn.transport.close()
            return
        now = conn.idle_since = self.clock()
        idle = self._idle.setdefault(conn.path, {})
        while idle:
            oldest = next(iter(idle))
            if now - oldest.idle_since < self.keepalive:
                break
            del idle[oldest]
            oldest.transport.close()
        idle[conn] = None

    def forget(self, conn: _Connection) -> None:
        """An idle connection the engine closed leaves its pool (and the pool, once empty)."""
        idle = self._idle.get(conn.path)
        if idle is not None:
            idle.pop(conn, None)
            if not idle:
                del self._idle[conn.path]

    def idle(self) -> dict[str, int]:
        """Idle connections per socket path."""
        return {path: len(conns) for path, conns in self._idle.items()}

    def close(self) -> None:
        """Close the idle connections; those in use close as their answers end."""
        self._closed = True
        pools, self._idle = self._idle, {}
        for conns in pools.values():
            for conn in conns:
                conn.transport.close()
