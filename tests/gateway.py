"""Test helpers: run a real ``vramgate serve`` process on a free loopback port and watch processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def embedded_data_dir() -> Path:
    """Where the embedded models are prepared, as ``vramgate serve`` finds them:
    ``$VRAMGATE_DATA_DIR``, else ``~/.cache/vramgate`` (shared across e2e modules and runs)."""
    return Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_id(address: str) -> str:
    """What the stand-in engine names its stats file by (``tests.standin_engine.listen_id``): the
    port of ``http://127.0.0.1:P``, or the socket id of ``unix:/dir/<id>.sock`` (an admin
    replica's ``url``)."""
    if address.startswith("unix:"):
        return Path(address[5:]).stem
    return address.rsplit(":", 1)[1]


def engine_client(address: str, timeout: float = 30) -> httpx.Client:
    """An httpx client to the engine at ``address`` (an admin replica's ``url``): over its Unix
    socket for ``unix:/path.sock``, else over TCP. Paths are relative: ``client.get("/metrics")``."""
    if address.startswith("unix:"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=address[5:]), base_url="http://engine",
                            timeout=timeout)
    return httpx.Client(base_url=address, timeout=timeout)


def alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for all ``pids`` to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Wait up to ``timeout`` seconds for ``cond()`` to be true (checked every 50 ms); returns
    whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def describe(pids: list[int]) -> list[str]:
    """``pid status cmdline`` of each process, for assertion messages."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} {p.status()} ppid={p.ppid()} {' '.join(p.cmdline()[:6])}")
        except psutil.Error:
            out.append(f"{pid} gone")
    return out


class Gateway:
    """A ``python -m server serve`` child process. ``config`` is a dict written as YAML, or None for
    the embedded models. Use as a context manager; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None, *,
                 data_dir: Path | None = None, env: dict[str, str] | None = None,
                 max_file_size: int | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.log_path = tmp / "gateway.log"
        args = [sys.executable, "-m", "server", "serve", "--port", str(self.port),
                "--data-dir", str(data_dir or tmp / "data")]
        if config is not None:
            cfg_path = tmp / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            args += ["--config", str(cfg_path)]
        self.log = open(self.log_path, "ab")

        def limit() -> None:  # RLIMIT_FSIZE: a write past it fails (EFBIG), as on a full disk
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_size, max_file_size))
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit if max_file_size else None,
                                     env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> "Gateway":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_text()[-3000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not up after {timeout}s: {self.log_text()[-3000:]}")

    def states(self) -> dict[str, str]:
        return self.client.get("/health").json()["models"]

    def wait_states(self, timeout: float, done: tuple[str, ...] = ("ready", "failed", "unloaded")) -> dict[str, str]:
        """Wait until no model is loading; returns the states."""
        self.wait_up()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states()
            if all(s in done for s in states.values()):
                return states
            time.sleep(0.25)
        raise TimeoutError(f"models still loading after {timeout}s: {self.states()}\n"
                           f"{self.log_text()[-3000:]}")

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self.log.close()
        return self.proc.returncode


def standin_gateway(tmp: Path, config: dict[str, Any], **kw: Any) -> Gateway:
    """A gateway whose engines are the stand-in (``tests/standin_engine.py``), which writes its
    records under ``tmp/standin``. ``config`` is the YAML document without ``engine_module``."""
    (tmp / "standin").mkdir(exist_ok=True)
    full = {"engine_module": "tests.standin_engine", "engine_stop_grace": 2, **config}
    return Gateway(tmp, full, env={"STANDIN_DIR": str(tmp / "standin")}, **kw)
