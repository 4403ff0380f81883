"""Unix sockets to local engines (server.localsock): the one session dials a real socket for an
engine's ``<id>.uds.invalid`` URL and TCP for every other host; where the sockets live."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from server import localsock
from server.config import ModelConfig
from server.configload import parse_settings
from server.engines import engine_launch
from server.errors import ConfigError, EngineUnreachable
from server.proxy import new_session, open_upstream, probe


def app(name: str, conns: set | None = None) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        if conns is not None:
            conns.add(id(request.transport))  # one per connection the client opened
        return web.json_response({"from": name, "host": request.host})
    out = web.Application()
    out.router.add_get("/who", hello)
    out.router.add_post("/who", hello)
    return out


engine_socket = localsock.engine_socket


def wmem_max() -> int:
    """The kernel's cap on SO_SNDBUF (bytes); what this test can expect the connector to get."""
    path = Path("/proc/sys/net/core/wmem_max")
    return int(path.read_text()) if path.exists() else localsock.SEND_BUFFER


def test_one_session_dials_the_socket_for_engine_urls_and_tcp_for_the_rest(tmp_path, monkeypatch):
    async def go():
        sock = localsock.new_socket(tmp_path)
        conns: set = set()
        unix, tcp = web.AppRunner(app("unix", conns)), web.AppRunner(app("tcp"))
        await unix.setup()
        await tcp.setup()
        await web.UnixSite(unix, str(sock)).start()
        site = web.TCPSite(tcp, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        made = []
        monkeypatch.setattr(localsock, "engine_socket", lambda: made.append(engine_socket()) or made[-1])
        session = new_session(tmp_path)
        try:
            got = await probe(session, localsock.url_for(sock) + "/who", 5)
            assert got is not None and got[0] == 200 and b'"from": "unix"' in got[1]
            got = await probe(session, f"http://127.0.0.1:{port}/who", 5)
            assert got is not None and b'"from": "tcp"' in got[1]
            for _ in range(3):  # kept alive and pooled like a TCP connection
                resp = await open_upstream(session, localsock.url_for(sock) + "/who", b"{}", {})
                assert resp.status == 200 and (await resp.json())["from"] == "unix"
            assert len(conns) == 1 and len(made) == 1  # the connector's socket, buffer and all
            sock.unlink()  # the engine is gone: an unreachable engine, as a refused port
            gone = localsock.url_for(tmp_path / "000000000000.sock")
            with pytest.raises(EngineUnreachable, match="could not be reached"):
                await open_upstream(session, gone + "/who", b"{}", {})
            assert await probe(session, gone + "/health", 5) is None
        finally:
            await session.close()
            await unix.cleanup()
            await tcp.cleanup()
    asyncio.run(go())


def test_without_a_socket_dir_an_engine_url_is_never_dialled(tmp_path):
    async def go():
        session = new_session(None)  # engine_transport tcp, or no AF_UNIX
        try:
            assert await probe(session, "http://abc.uds.invalid/health", 5) is None
        finally:
            await session.close()
    asyncio.run(go())


def test_the_socket_dir_is_the_users_alone_and_starts_empty(tmp_path):
    data = tmp_path / "data"
    (data / "run" / "sockets").mkdir(parents=True, mode=0o755)
    (data / "run" / "sockets" / "keep.txt").write_text("")
    with socket.socket(socket.AF_UNIX) as dead:  # bound, closed, never unlinked: a killed engine's
        dead.bind(str(data / "run" / "sockets" / "dead.sock"))
    live = socket.socket(socket.AF_UNIX)  # another gateway on the same data dir: its engine's socket
    live.bind(str(data / "run" / "sockets" / "live.sock"))
    live.listen(8)
    try:
        path, own = localsock.socket_dir(data)
        assert (path, own) == (data / "run" / "sockets", False)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert sorted(p.name for p in path.iterdir()) == ["keep.txt", "live.sock"]
        with socket.socket(socket.AF_UNIX) as ours:  # an engine of this gateway, not unlinked
            ours.bind(str(path / "a.sock"))
        localsock.remove_dir(path, own)
        assert path.is_dir() and sorted(p.name for p in path.iterdir()) == ["keep.txt", "live.sock"]
    finally:
        live.close()


def test_a_data_dir_too_long_for_sun_path_gets_the_same_temporary_dir_each_time(tmp_path):
    deep = tmp_path / ("d" * 100)
    path, own = localsock.socket_dir(deep)
    try:
        assert own and path.name.startswith(f"vramgate-{os.getuid()}-") and not deep.exists()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert len(os.fsencode(localsock.new_socket(path))) <= localsock.MAX_PATH
        with socket.socket(socket.AF_UNIX) as dead:  # the gateway was killed: its engine's socket
            dead.bind(str(path / "dead.sock"))
        assert localsock.socket_dir(deep) == (path, True)  # its restart: the same dir, cleared
        assert list(path.iterdir()) == []
    finally:
        localsock.remove_dir(path, own)
    assert not path.exists()


def test_a_relative_data_dir_gives_absolute_socket_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, own = localsock.socket_dir(Path("rel"))
    assert path == tmp_path / "rel" / "run" / "sockets" and not own


@pytest.mark.parametrize("odd", ["file", "symlink"])
def test_a_sockets_path_that_is_not_our_directory_is_left_alone(tmp_path, odd):
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    shared = tmp_path / "shared"  # a symlink's target: not to be chmod-ed or swept
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(shared / "precious.sock"))
    if odd == "file":
        (data / "run" / "sockets").write_text("")
    else:
        (data / "run" / "sockets").symlink_to(shared)
    path, own = localsock.socket_dir(data)
    try:
        assert own and path.parent == Path(tempfile.gettempdir())  # the fallback instead
        assert (shared / "precious.sock").exists()
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    finally:
        localsock.remove_dir(path, own)


def test_with_no_usable_directory_engines_go_on_loopback_ports(tmp_path, monkeypatch):
    monkeypatch.setattr(localsock, "_can_bind", lambda path: False)
    assert localsock.socket_dir(tmp_path / "data") == (None, False)


def test_what_is_not_a_dead_socket_is_kept_and_a_removed_dir_comes_back(tmp_path):
    path, _ = localsock.socket_dir(tmp_path / "data")
    (path / "x.sock").mkdir()  # a directory that happens to end in .sock
    (path / "plain.sock").write_text("")  # a regular file: not ours either
    localsock.clear_stale(path)
    assert sorted(p.name for p in path.iterdir()) == ["plain.sock", "x.sock"]
    shutil.rmtree(path)  # a cleaner removed it while the gateway ran
    fresh = localsock.new_socket(path)
    assert path.is_dir() and stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert fresh.parent == path


def test_an_engine_on_a_socket_gets_uds_and_no_port():
    m = ModelConfig("chat", "/m")
    on_socket = engine_launch(m, port=0, uds="/run/x/0123456789ab.sock", device="cpu", python="py",
                              module="v")
    assert on_socket.argv[on_socket.argv.index("--uds") + 1] == "/run/x/0123456789ab.sock"
    assert "--port" not in on_socket.argv and "--host" not in on_socket.argv
    assert on_socket.base_url == "http://0123456789ab.uds.invalid"
    assert on_socket.address == "unix:/run/x/0123456789ab.sock"
    on_port = engine_launch(m, port=8123, device="cpu", python="py", module="v")
    assert "--uds" not in on_port.argv and on_port.address == on_port.base_url == "http://127.0.0.1:8123"


def test_engine_transport_is_unix_or_tcp():
    models = [{"name": "a", "path": "p"}]
    assert parse_settings({"models": models}).engine_transport == "unix"
    assert parse_settings({"engine_transport": "tcp", "models": models}).engine_transport == "tcp"
    with pytest.raises(ConfigError, match="engine_transport: must be unix or tcp"):
        parse_settings({"engine_transport": "uds", "models": models})



def test_a_file_system_that_refuses_sockets_gets_a_temporary_dir(tmp_path, monkeypatch):
    data = tmp_path / "data"
    refuse = localsock._can_bind
    monkeypatch.setattr(localsock, "_can_bind",  # a Windows drive under WSL
                        lambda path: not path.is_relative_to(data) and refuse(path))
    path, own = localsock.socket_dir(data)
    try:
        assert own and path.name.startswith("vramgate-")
    finally:
        localsock.remove_dir(path, own)
