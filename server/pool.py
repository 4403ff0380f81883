"""The model pool: which engines exist, their state, and leases on ready ones.

One asyncio task per model owns that model's engine process (``_run``); request handlers only wait
on its ``ready`` event and take leases. In this version every configured model is started at server
start (``start_all``); ``acquire`` already waits for a model that is still loading, so on-demand
loading can start an engine from there.

States (``ModelState``): ``unloaded`` → ``loading`` → ``ready``; ``failed`` when the engine did not
start or exited; ``stopping`` during shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import httpx

from server.config import ModelConfig, Settings
from server.engines import EngineLaunch, EngineProcess, engine_launch, free_port, log_tail
from server.errors import EngineStartError, ModelUnavailable, VramgateError
from server.estimate import cpu_kv_cache_bytes, kv_bytes_per_token, max_model_len, read_config

log = logging.getLogger("vramgate.pool")


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass
class ModelEntry:
    """The pool's book on one model. Mutated only by the pool (its owning task and leases)."""

    config: ModelConfig
    state: ModelState = ModelState.UNLOADED
    device: str = "cpu"
    process: EngineProcess | None = None
    error: VramgateError | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    loaded_at: float | None = None
    load_seconds: float | None = None
    last_used: float | None = None
    task: asyncio.Task | None = None

    @property
    def base_url(self) -> str | None:
        return self.process.launch.base_url if self.process and self.state == ModelState.READY else None


@dataclass
class Lease:
    """The right to send one request to a ready engine; ``release()`` exactly once when done."""

    entry: ModelEntry
    base_url: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.entry.in_flight -= 1
            self.entry.last_used = time.time()


Launcher = Callable[[str, EngineLaunch, "Settings"], EngineProcess]


def default_launcher(name: str, launch: EngineLaunch, settings: Settings) -> EngineProcess:
    return EngineProcess(name, launch, settings.log_dir / f"{name.replace('/', '_')}.log",
                         grace=settings.engine_stop_grace)


def plan_cpu_kv_cache(models: tuple[ModelConfig, ...], available_ram: int) -> dict[str, int]:
    """KV-cache bytes for each CPU model whose folder has a readable config.json (pure).

    See :func:`server.estimate.cpu_kv_cache_bytes`; the RAM share is split over all CPU models.
    """
    out: dict[str, int] = {}
    for model in models:
        config = read_config(model.path)
        if config is None:
            continue
        try:
            per_token = kv_bytes_per_token(config)
        except (KeyError, ValueError, TypeError):
            continue
        out[model.name] = cpu_kv_cache_bytes(per_token, model.max_model_len or max_model_len(config),
                                             available_ram, len(models))
    return out


class ModelPool:
    """Engines by canonical model name. Create inside the running event loop."""

    def __init__(self, settings: Settings, *, gpu_count: int, available_ram: int,
                 launcher: Launcher = default_launcher) -> None:
        self.settings = settings
        self.launcher = launcher
        self.entries: dict[str, ModelEntry] = {}
        for model in settings.models:
            device = model.device if model.device != "auto" else ("cuda" if gpu_count else "cpu")
            self.entries[model.name] = ModelEntry(config=model, device=device)
        cpu_models = tuple(e.config for e in self.entries.values() if e.device == "cpu")
        self.kv_plan = plan_cpu_kv_cache(cpu_models, available_ram)
        self.http = httpx.AsyncClient()
        self.closing = False

    def start_all(self) -> None:
        """Start every model's engine in the background (each in its own task)."""
        for entry in self.entries.values():
            self._start(entry)

    def _start(self, entry: ModelEntry) -> None:
        if entry.task is None or entry.task.done():
            entry.state = ModelState.LOADING
            entry.error = None
            entry.ready.clear()
            entry.task = asyncio.create_task(self._run(entry), name=f"engine:{entry.config.name}")

    async def _run(self, entry: ModelEntry) -> None:
        """Own one engine from start to exit."""
        model = entry.config
        launch = engine_launch(model, port=free_port(), device=entry.device,
                               python=self.settings.engine_python or sys.executable,
                               module=self.settings.engine_module,
                               kv_cache_bytes=self.kv_plan.get(model.name) if entry.device == "cpu" else None)
        proc = self.launcher(model.name, launch, self.settings)
        entry.process = proc
        t0 = time.monotonic()
        try:
            log.info("starting engine for %s on %s: %s", model.name, entry.device, " ".join(launch.argv))
            await proc.start()
            await proc.wait_healthy(model.startup_timeout, self.http)
        except (EngineStartError, OSError) as exc:
            await proc.stop()
            entry.error = exc if isinstance(exc, EngineStartError) else EngineStartError(
                f"engine for {model.name} could not be started: {exc}")
            entry.state = ModelState.FAILED
            entry.ready.set()
            log.error("engine for %s failed to start: %s", model.name, entry.error.message)
            return
        entry.load_seconds = time.monotonic() - t0
        entry.loaded_at = time.time()
        entry.state = ModelState.READY
        entry.ready.set()
        log.info("engine for %s ready on %s in %.1f s", model.name, launch.base_url, entry.load_seconds)
        status = await proc.wait()
        if entry.state != ModelState.STOPPING:
            entry.state = ModelState.FAILED
            entry.error = ModelUnavailable(
                f"the engine for {model.name} exited with status {status}; last lines of its log:\n"
                f"{log_tail(proc.log_path, 20)}", retry_after=30)
            log.error("engine for %s exited with status %s", model.name, status)

    async def acquire(self, name: str, timeout: float | None = None) -> Lease:
        """A lease on the ready engine of canonical model ``name``, waiting while it loads.

        Raises :class:`ModelUnavailable` when the engine failed, the pool is shutting down, or it is
        not ready within ``timeout`` seconds (default ``settings.load_wait_timeout``).
        """
        entry = self.entries[name]
        if self.closing:
            raise ModelUnavailable("the server is shutting down", retry_after=5)
        if entry.state == ModelState.UNLOADED:
            self._start(entry)
        if entry.state == ModelState.LOADING:
            wait = self.settings.load_wait_timeout if timeout is None else timeout
            try:
                await asyncio.wait_for(entry.ready.wait(), wait)
            except asyncio.TimeoutError:
                raise ModelUnavailable(f"the model {name} is still loading after {wait:g} s",
                                       retry_after=10) from None
        if entry.state != ModelState.READY or entry.base_url is None:
            raise entry.error or ModelUnavailable(f"the model {name} is {entry.state.value}",
                                                  retry_after=10)
        entry.in_flight += 1
        return Lease(entry=entry, base_url=entry.base_url)

    async def stop_all(self) -> None:
        """Stop every engine (each: SIGTERM → grace → SIGKILL of its group) and wait for them."""
        self.closing = True
        entries = list(self.entries.values())
        for entry in entries:
            if entry.state in (ModelState.READY, ModelState.LOADING):
                entry.state = ModelState.STOPPING
        tasks = [e.task for e in entries if e.task and not e.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.process.stop() for e in entries if e.process), return_exceptions=True)
        for entry in entries:
            if entry.state == ModelState.STOPPING:
                entry.state = ModelState.UNLOADED
            entry.ready.set()  # waiters see a model that is not ready and get a 503
        await self.http.aclose()
