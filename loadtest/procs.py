"""Processes the benchmarks start and stop: the gateway, a bare engine, LiteLLM's proxy; and the CPU
time a process tree used (what "per core" figures divide by)."""

from __future__ import annotations

import os
import shutil
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


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in its own session, its output in ``log``; ``stop()`` ends its whole tree."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def cpu_seconds(self, children: bool = False) -> float:
        """User + system CPU seconds of the process (and, with ``children``, its descendants)."""
        procs = [psutil.Process(self.proc.pid)]
        if children:
            procs += procs[0].children(recursive=True)
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._fh.close()


def drop_scratch(tmp: Path) -> None:
    """Call in a ``finally``: remove a benchmark's scratch dir (configs, data, the processes'
    logs) after a run that ended well; after a failure keep it, and say where, for its logs."""
    if sys.exc_info()[0] is None:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"the processes' logs are kept in {tmp}", file=sys.stderr)


def wait_http(url: str, proc: Proc, timeout: float, ok=lambda r: r.status_code == 200,
              headers: dict[str, str] | None = None) -> None:
    """Poll ``url`` until ``ok(response)``; raises RuntimeError with the log's end on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.log.name} exited ({proc.proc.returncode}):\n{proc.text()[-3000:]}")
        try:
            if ok(httpx.get(url, timeout=5, headers=headers)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{proc.text()[-3000:]}")


def start_gateway(config: dict[str, Any], tmp: Path, *, data_dir: Path | None = None,
                  ready_timeout: float = 600, args: tuple[str, ...] = (),
                  cwd: Path = ROOT) -> tuple[Proc, str]:
    """``vramgate serve`` on a free port with ``config``; returns once every model is ready (with
    ``api_keys`` in the config, the first one is used to ask). ``cwd``: the checkout whose
    ``server`` package runs (``python -m`` imports from there: another commit's worktree)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--config", str(tmp / "config.yaml"),
            "--port", str(port), "--data-dir", str(data_dir or tmp / "data"), *args]
    proc = Proc(argv, tmp / "gateway.log", cwd=cwd)
    url = f"http://127.0.0.1:{port}"

    def all_ready(r: httpx.Response) -> bool:
        states = {m["id"]: m.get("state") for m in r.json()["data"]}
        if any(s == "failed" for s in states.values()):
            raise RuntimeError(f"a model failed to start:\n{proc.text()[-3000:]}")
        return bool(states) and all(s == "ready" for s in states.values())

    keys = config.get("api_keys") or []
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else None
    try:
        wait_http(url + "/v1/models", proc, ready_timeout, all_ready, headers)
    except BaseException:  # never leave a gateway (and its engines) behind
        proc.stop()
        raise
    return proc, url


def engine_url(gateway_url: str, model: str, headers: dict[str, str] | None = None) -> str:
    """The loopback URL of ``model``'s first engine (``GET /admin/models``). Raises
    ``RuntimeError`` when it has none, or listens on a Unix socket (no direct client can use it:
    start the gateway with ``engine_transport: tcp``, or see :func:`instant_direct`)."""
    models = httpx.get(gateway_url + "/admin/models", headers=headers, timeout=10).json()["data"]
    rep = next(m for m in models if m["id"] == model)["replicas"][0]
    if not rep.get("url"):
        raise RuntimeError(f"no running engine for {model}: {rep}")
    if not rep["url"].startswith("http"):
        raise RuntimeError(f"the engine for {model} listens on {rep['url']}: give the gateway "
                           "engine_transport: tcp for a direct path")
    return rep["url"]


def instant_direct(model: dict[str, Any]) -> str:
    """Give ``model`` (an instant-engine model of a gateway config, changed in place) a loopback
    port beside its Unix socket (``INSTANT_TCP_PORT``): the benchmark's direct path while the
    gateway talks to it over the socket, as it does by default. Returns that port's URL."""
    port = free_port()
    model.setdefault("engine_env", {})["INSTANT_TCP_PORT"] = str(port)
    return f"http://127.0.0.1:{port}"


def venv_version(venv: Path, dist: str) -> str:
    """The version of distribution ``dist`` installed in virtualenv ``venv`` ('' if none)."""
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip()
