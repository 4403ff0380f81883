"""Unix domain sockets to local engines: where they live, their URLs, and the connector that dials them.

A local engine listens on ``<socket dir>/<id>.sock`` (vLLM's ``--uds``), not on a loopback port,
when the config's ``engine_transport`` is ``unix`` (the default). Measured on the floor proxy
(``loadtest/README.md``): 1.11× the requests per core of loopback TCP, plain, and 1.08× streamed.
The directory is the gateway user's alone (mode 0700), so no other local user reaches an engine
past the gateway's keys and limits, as any of them could reach a loopback port.

Such an engine's URL is ``http://<id>.uds.invalid``: the ``.invalid`` top-level name (RFC 2606)
can never resolve, so a URL that escaped would fail, not reach some other host. The one aiohttp
session of the gateway uses :class:`EngineConnector`, which dials the socket for those hosts and
TCP for every other (an upstream on another host), so health checks, model cards, metrics scrapes,
sleep and wake and the data path need no change of client.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
from pathlib import Path

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.helpers import ceil_timeout

log = logging.getLogger("vramgate.localsock")

SUFFIX = ".uds.invalid"  # the host of an engine URL on a Unix socket: <id>.uds.invalid
MAX_PATH = 100  # bytes; sun_path holds 108 on Linux (104 on macOS), less its NUL
ID_BYTES = 6  # an engine socket's id: 12 hex digits
# bytes. A Unix stream socket's sender holds at most its SO_SNDBUF in flight (Linux's default
# 208 KiB, net.core.wmem_default), where loopback TCP grows to 4 MiB: a 512 KiB request body then
# went over in three fills, 0.3-1 ms slower than TCP (issue #15). Capped by net.core.wmem_max.
SEND_BUFFER = 2 * 1024 * 1024


def supported() -> bool:
    """Whether this platform has Unix domain sockets (not Windows)."""
    return hasattr(socket, "AF_UNIX")


def socket_dir(data_dir: Path) -> tuple[Path | None, bool]:
    """Make the directory the engine sockets go in and return it, with whether it is the
    gateway's own to remove at the end; ``(None, False)`` when no directory will do (engines then
    listen on loopback ports, as with ``engine_transport: tcp``).

    ``<data_dir>/run/sockets`` (absolute) when a socket path there fits the :data:`MAX_PATH` bytes
    of ``sun_path`` and the directory is usable (:func:`_prepare`: not every file system takes a
    socket, a Windows drive under WSL refuses). Otherwise ``vramgate-<uid>-<hash of that path>``
    under the temporary directory (``$TMPDIR``, then ``/tmp``): the same one each time this data
    dir falls back, so a gateway that was killed leaves nothing that piles up."""
    fixed = Path(os.path.abspath(data_dir)) / "run" / "sockets"
    if _fits(fixed) and _prepare(fixed):
        return fixed, False
    name = f"vramgate-{os.getuid()}-{hashlib.sha256(os.fsencode(fixed)).hexdigest()[:12]}"
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        spare = Path(base) / name
        if _fits(spare) and _prepare(spare):
            return spare, True
    log.warning("no directory for engine sockets (tried %s and %s under %s and /tmp): engines "
                "listen on loopback ports", fixed, name, tempfile.gettempdir())
    return None, False


def _fits(directory: Path) -> bool:
    return len(os.fsencode(directory / f"{'0' * 2 * ID_BYTES}.sock")) <= MAX_PATH


def _prepare(directory: Path) -> bool:
    """Make ``directory`` (mode 0700) unless it is there, and say whether it will do: a real
    directory (not a link) of this user, in which a socket can be bound. The dead sockets in it
    (:func:`clear_stale`) are removed."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # a file there: FileExistsError
        st = directory.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False  # a file, a link (to somewhere not ours to chmod), another user's
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)  # made earlier with the umask's mode
        clear_stale(directory)
        return _can_bind(new_socket(directory))
    except OSError:
        return False


def _can_bind(path: Path) -> bool:
    """Whether a Unix socket can be bound at ``path`` (it is removed again)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
        return True
    except OSError:
        return False
    finally:
        path.unlink(missing_ok=True)


def clear_stale(directory: Path) -> None:
    """Unlink each socket in ``directory`` that nothing listens on (a connect is refused): what
    the engines of a gateway that was killed left. A socket something still listens on (another
    gateway's on the same data dir) and anything that is not a socket are kept."""
    for path in directory.glob("*.sock"):
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1)
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    path.unlink(missing_ok=True)
        except OSError:
            pass  # gone meanwhile, busy (a full backlog) or unreadable: not ours to judge dead


def remove_dir(path: Path, own: bool) -> None:
    """At the end: remove the dead sockets left in ``path`` (:func:`clear_stale`), and ``path``
    itself when ``own`` and nothing else is left in it."""
    clear_stale(path)
    if own:
        try:
            path.rmdir()
        except OSError:
            pass  # another gateway's sockets are still in it, or it is gone


def new_socket(directory: Path) -> Path:
    """A fresh socket path in ``directory`` for one engine (vLLM binds it). ``directory`` is made
    again (mode 0700) if something removed it, as a cleaner of ``/tmp`` may."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory / f"{secrets.token_hex(ID_BYTES)}.sock"


def url_for(path: Path | str) -> str:
    """The URL of the engine listening on socket ``path``: ``http://<id>.uds.invalid``."""
    return f"http://{Path(path).stem}{SUFFIX}"


def engine_socket() -> socket.socket:
    """A non-blocking Unix stream socket, not yet connected, with a send buffer of
    :data:`SEND_BUFFER` bytes (what the kernel allows of it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    return sock


# Seconds between connect attempts to a socket whose listen backlog is full: doubling from the
# first to the last, for as long as the caller's connect timeout allows.
BACKLOG_WAIT = (0.001, 0.05)


async def connect(sock: socket.socket, path: str) -> None:
    """Connect the non-blocking Unix socket ``sock`` to ``path``, waiting while the listener's
    backlog is full; bound by the caller's timeout. Raises ``OSError`` (``FileNotFoundError``,
    ``ConnectionRefusedError``, ...).

    A Unix socket's ``connect`` never answers "in progress" as TCP's does: it connects at once,
    fails, or, when the listener's backlog is full, fails with ``EAGAIN``. asyncio and uvloop
    take that ``EAGAIN`` for "in progress", wait until the socket is writable (it already is) and
    return a socket that is not connected: the request then fails with ``EINVAL`` (a break-it
    pass: 88 of 300 streams got a 503 from a stand-in engine with the usual backlog of 128).
    So the call is made here, again after a short wait while the backlog stays full, as a TCP
    connect would wait in the listener's SYN queue."""
    wait = BACKLOG_WAIT[0]
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        await asyncio.sleep(wait)
        wait = min(wait * 2, BACKLOG_WAIT[1])


class EngineConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, except that a host ``<id>.uds.invalid`` is dialled as the Unix
    socket ``<directory>/<id>.sock``; pooling, keep-alive and limits are the TCP connector's, per
    host. With ``directory`` ``None`` it is the TCP connector alone. A socket that is not there
    raises aiohttp's ``UnixClientConnectorError`` (a ``ClientConnectorError``), as a refused port
    would raise its TCP form.

    It overrides ``_create_connection``, the method aiohttp's own ``UnixConnector`` implements
    (aiohttp 3.10 to 3.14); ``tests/unit/test_localsock.py`` dials a real socket through it."""

    def __init__(self, directory: Path | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.directory = directory

    async def _create_connection(self, req, traces, timeout):  # noqa: ANN001 (aiohttp's own)
        host = req.url.raw_host or ""
        if self.directory is None or not host.endswith(SUFFIX):
            return await super()._create_connection(req, traces, timeout)
        path = str(self.directory / f"{host[:-len(SUFFIX)]}.sock")
        sock = engine_socket()
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                await connect(sock, path)
                _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
        except OSError as exc:
            sock.close()
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise
            raise UnixClientConnectorError(path, req.connection_key, exc) from exc
        except BaseException:
            sock.close()
            raise
        return proto
