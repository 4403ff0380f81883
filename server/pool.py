"""The model pool: which engines exist, where they are placed, their state, and leases on them.

One asyncio task per model owns that model's engine process (``_run``); request handlers only wait
on its ``ready`` event and take leases. Placement decisions are made one at a time under
``_placing`` (so an engine still starting is already in the books when the next model is placed:
cases C16), from a fresh inventory snapshot, by the pure planner (``placement.plan``). Engine starts
on one GPU are serialised (two vLLM engines profiling memory at once misjudge each other). In this
version every configured model is started at server start; ``acquire`` already waits for a model
that is still loading, so on-demand loading can start an engine from there.

States (``ModelState``): ``unloaded`` → ``loading`` → ``ready``; ``failed`` when the engine could not
be placed or started, or exited; ``stopping`` during shutdown or eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from server.estimate import requirement_for
from server.gpus import EngineUsage, Inventory, Snapshot
from server.gpus.cpu import tree_pids
from server.placement import Booking, NoFit, Plan, Policy, Requirement, fmt, plan

log = logging.getLogger("vramgate.pool")


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass
class ModelEntry:
    """The pool's book on one model. Mutated only by the pool (its owning task and leases).

    ``plan`` is the current placement (``None`` when nothing is reserved); ``booked_bytes`` what is
    reserved on each of its devices: the plan's share while starting, NVML's measurement once ready.
    """

    config: ModelConfig
    state: ModelState = ModelState.UNLOADED
    process: EngineProcess | None = None
    error: VramgateError | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    loaded_at: float | None = None
    load_seconds: float | None = None
    last_used: float = 0.0
    task: asyncio.Task | None = None
    plan: Plan | None = None
    requirement: Requirement | None = None
    booked_bytes: int = 0
    measured_bytes: int | None = None
    retry_placement: bool = False

    @property
    def base_url(self) -> str | None:
        return self.process.launch.base_url if self.process and self.state == ModelState.READY else None

    @property
    def device(self) -> str:
        """Where the engine runs (``cuda:0+cuda:1``, ``cpu``), or ``-`` when not placed."""
        return "+".join(self.plan.devices) if self.plan else "-"


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


Launcher = Callable[[str, EngineLaunch, Settings], EngineProcess]


def default_launcher(name: str, launch: EngineLaunch, settings: Settings) -> EngineProcess:
    return EngineProcess(name, launch, settings.log_dir / f"{name.replace('/', '_')}.log",
                         grace=settings.engine_stop_grace)


def device_kind(model: ModelConfig, snapshot: Snapshot) -> str:
    """``cuda`` or ``cpu`` for ``model``: its ``device`` setting, or a GPU when the snapshot has one."""
    if model.device != "auto":
        return model.device
    return "cuda" if any(d.kind == "cuda" for d in snapshot.devices) else "cpu"


def dry_run(settings: Settings, snap: Snapshot) -> list[tuple[Requirement, Plan | NoFit]]:
    """Place every configured model in order on ``snap``, as a server starting now would (each
    plan booked before the next model is placed); used by ``vramgate plan``."""
    policy = Policy(settings.placement, settings.gpu_headroom_bytes, allow_eviction=False)
    cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
    cpu_models = [m for m in settings.models if device_kind(m, snap) == "cpu"]
    bookings: list[Booking] = []
    out: list[tuple[Requirement, Plan | NoFit]] = []
    for model in settings.models:
        req = requirement_for(model, device_kind(model, snap), kv_sequences=settings.kv_cache_sequences,
                              available_ram=cpu_dev.free_bytes, cpu_engines=len(cpu_models))
        result = plan(req, snap.devices, tuple(bookings), policy)
        if isinstance(result, Plan):
            bookings.append(Booking(model.name, result.devices, result.bytes_per_device, starting=True))
        out.append((req, result))
    return out


class ModelPool:
    """Engines by canonical model name. Create inside the running event loop."""

    def __init__(self, settings: Settings, inventory: Inventory, *,
                 launcher: Launcher = default_launcher) -> None:
        self.settings = settings
        self.inventory = inventory
        self.launcher = launcher
        self.entries = {m.name: ModelEntry(config=m) for m in settings.models}
        self.policy = Policy(settings.placement, settings.gpu_headroom_bytes)
        self.http = httpx.AsyncClient()
        self.closing = False
        self._placing = asyncio.Lock()
        self._device_locks: dict[str, asyncio.Lock] = {}

    # ---- books ----------------------------------------------------------------------------
    def usages(self) -> list[EngineUsage]:
        """Our engines as the inventory sees them (process trees, devices, shares)."""
        out = []
        for e in self.entries.values():
            if e.plan and e.process and e.process.pid:
                out.append(EngineUsage(e.config.name, tree_pids(e.process.pid), e.plan.devices,
                                       e.plan.bytes_per_device, e.loaded_at is not None))
        return out

    def bookings(self, exclude: str | None = None) -> tuple[Booking, ...]:
        """Every reservation in the books, as the planner takes them."""
        return tuple(
            Booking(e.config.name, e.plan.devices, e.booked_bytes,
                    starting=e.state == ModelState.LOADING, idle=e.in_flight == 0,
                    pinned=e.config.pinned, last_used=e.last_used)
            for e in self.entries.values() if e.plan and e.config.name != exclude)

    async def snapshot(self) -> Snapshot:
        return await asyncio.to_thread(self.inventory.snapshot, self.usages())

    # ---- lifecycle ----------------------------------------------------------------------------
    def start_all(self) -> None:
        """Start every model's engine in the background (each in its own task)."""
        for entry in self.entries.values():
            self._start(entry)

    def _start(self, entry: ModelEntry) -> None:
        if entry.task is None or entry.task.done():
            entry.loaded_at = None
            entry.state = ModelState.LOADING
            entry.error = None
            entry.ready.clear()
            entry.task = asyncio.create_task(self._run(entry), name=f"engine:{entry.config.name}")

    def _fail(self, entry: ModelEntry, error: VramgateError, *, retry_placement: bool = False) -> None:
        entry.plan, entry.booked_bytes = None, 0  # a failed start returns its reservation
        entry.error = error
        entry.retry_placement = retry_placement
        entry.state = ModelState.FAILED
        entry.ready.set()

    async def _place(self, entry: ModelEntry) -> Plan:
        """Decide where ``entry`` goes and book it (under ``_placing``); evicts what the plan says.

        Raises :class:`ModelUnavailable` (503) with the planner's numbers when nothing fits.
        """
        model = entry.config
        async with self._placing:
            snap = await self.snapshot()
            kind = device_kind(model, snap)
            cpu = [m for m in self.entries.values() if device_kind(m.config, snap) == "cpu"]
            cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
            req = requirement_for(model, kind, kv_sequences=self.settings.kv_cache_sequences,
                                  available_ram=cpu_dev.free_bytes, cpu_engines=len(cpu))
            result = plan(req, snap.devices, self.bookings(exclude=model.name), self.policy)
            if isinstance(result, NoFit):
                raise ModelUnavailable(f"cannot place {model.name}: {result.reason}", retry_after=30)
            for victim in result.evict:
                ventry = self.entries[victim]
                log.warning("evicting %s (%s on %s, idle since %s) to place %s: %s", victim,
                            fmt(ventry.booked_bytes), ventry.device,
                            time.strftime("%H:%M:%S", time.localtime(ventry.last_used)),
                            model.name, result.why)
                await self._stop_entry(ventry)
            entry.plan, entry.requirement, entry.booked_bytes = result, req, result.bytes_per_device
            log.info("placed %s on %s: %s", model.name, "+".join(result.devices), result.why)
            return result

    async def _run(self, entry: ModelEntry) -> None:
        """Own one engine from placement to exit."""
        model = entry.config
        try:
            placed = await self._place(entry)
        except ModelUnavailable as exc:
            log.error("%s", exc.message)
            self._fail(entry, exc, retry_placement=True)
            return
        kind = "cpu" if placed.devices == ("cpu",) else "cuda"
        launch = engine_launch(
            model, port=free_port(), device=kind, python=self.settings.engine_python or sys.executable,
            module=self.settings.engine_module,
            kv_cache_bytes=entry.requirement.kv_cache_bytes if entry.requirement else None,
            gpu_memory_utilization=placed.gpu_memory_utilization,
            tensor_parallel_size=placed.tensor_parallel_size, cuda_devices=placed.cuda_indices)
        proc = self.launcher(model.name, launch, self.settings)
        entry.process = proc
        t0 = time.monotonic()
        locks = [self._device_locks.setdefault(d, asyncio.Lock())
                 for d in sorted(placed.devices) if d != "cpu"]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for lock in locks:  # one engine starting per GPU at a time
                    await stack.enter_async_context(lock)
                log.info("starting engine for %s: %s", model.name, " ".join(launch.argv))
                await proc.start()
                await proc.wait_healthy(model.startup_timeout, self.http)
        except (EngineStartError, OSError) as exc:
            await proc.stop()
            error = exc if isinstance(exc, EngineStartError) else EngineStartError(
                f"engine for {model.name} could not be started: {exc}")
            log.error("engine for %s failed to start: %s", model.name, error.message)
            self._fail(entry, error)
            return
        entry.load_seconds = time.monotonic() - t0
        entry.loaded_at = entry.last_used = time.time()
        await self._measure(entry)  # before READY: the books are right once anyone sees it ready
        entry.state = ModelState.READY
        entry.ready.set()
        log.info("engine for %s ready on %s in %.1f s", model.name, launch.base_url, entry.load_seconds)
        status = await proc.wait()
        if entry.state != ModelState.STOPPING:
            self._fail(entry, ModelUnavailable(
                f"the engine for {model.name} exited with status {status}; last lines of its log:\n"
                f"{log_tail(proc.log_path, 20)}", retry_after=30))
            log.error("engine for %s exited with status %s", model.name, status)

    async def _measure(self, entry: ModelEntry) -> None:
        """Replace the estimate in the books by what NVML measures the engine using (cases C18)."""
        if entry.plan is None or entry.plan.devices == ("cpu",):
            return
        snap = await self.snapshot()
        measured = snap.measured.get(entry.config.name)
        if measured:
            log.info("%s measured at %s per device (estimate %s, share %s)", entry.config.name,
                     fmt(measured), fmt(entry.requirement.per_device_bytes(
                         entry.plan.tensor_parallel_size)) if entry.requirement and
                     entry.requirement.weight_bytes is not None else "unknown",
                     fmt(entry.plan.bytes_per_device))
            entry.measured_bytes = entry.booked_bytes = measured

    async def _stop_entry(self, entry: ModelEntry) -> None:
        entry.state = ModelState.STOPPING
        if entry.process:
            await entry.process.stop()
        if entry.task and not entry.task.done() and entry.task is not asyncio.current_task():
            await asyncio.gather(entry.task, return_exceptions=True)
        entry.plan, entry.booked_bytes, entry.measured_bytes = None, 0, None
        entry.state = ModelState.UNLOADED
        entry.ready.set()

    async def acquire(self, name: str, timeout: float | None = None) -> Lease:
        """A lease on the ready engine of canonical model ``name``, waiting while it loads.

        Raises :class:`ModelUnavailable` when the engine failed, the pool is shutting down, or it is
        not ready within ``timeout`` seconds (default ``settings.load_wait_timeout``).
        """
        entry = self.entries[name]
        if self.closing:
            raise ModelUnavailable("the server is shutting down", retry_after=5)
        if entry.state == ModelState.UNLOADED or (
                entry.state == ModelState.FAILED and entry.retry_placement):
            self._start(entry)  # a model that did not fit is placed again: room may have been made
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
                entry.plan, entry.booked_bytes = None, 0
            entry.ready.set()  # waiters see a model that is not ready and get a 503
        await self.http.aclose()
