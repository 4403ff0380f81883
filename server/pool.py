"""The model pool: engines per model (replicas), where they are placed, their lifecycle, leases.

One asyncio task per replica owns that replica's engine process (``_run``: place, start, watch);
request handlers only wait on the model's ``changed`` event and take leases. Decisions are pure
functions: placement (``placement.plan``), which replica serves, which idle engines unload, when a
crashed model may restart (``lifecycle.py``). State changes that a decision depends on happen
without an ``await`` in between, so no request can lease an engine that was just chosen for eviction
or unloading.

- Models start ``unloaded`` unless ``preload``; the first request places and starts every replica
  and concurrent requests wait for that one start (single flight, cases C13).
- Placement is decided one model at a time (``_placing``) on a fresh inventory snapshot, so an
  engine still starting is already in the books (C16); starts on one GPU are serialised.
- Idle replicas unload ``ttl`` seconds after their last request ended (never while one runs or a
  request waits for the model). When a model does not fit, idle engines are evicted least recently
  used first; when no room can be made the request waits up to ``place_wait_timeout`` for capacity,
  then gets 503 with ``Retry-After``.
- An engine that exits or fails its health checks fails its streams (the relay sends one error
  event) and is restarted by the next request, after an exponential back-off; after
  ``lifecycle.MAX_FAILURES`` failures the model shows ``failed`` with the last lines of its log until
  it is loaded by hand or the configuration reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping

import httpx

from server.config import ModelConfig, Settings
from server.engines import (EngineLaunch, EngineProcess, cpu_binding, engine_launch, free_port,
                            log_tail)
from server.errors import EngineStartError, ModelNotFound, ModelUnavailable, VramgateError
from server.estimate import requirement_for
from server.gpus import EngineUsage, Inventory, Snapshot
from server.gpus.cpu import tree_pids
from server.lifecycle import ReplicaView, idle_expired, model_state, pick_replica, restart_delay
from server.modelfiles import UNKNOWN
from server.placement import Booking, Device, NoFit, Plan, Policy, Requirement, fmt, plan
from server.profile import Profile, profile, read_profiles

log = logging.getLogger("vramgate.pool")
HEALTH_FAILURES = 3  # consecutive failed /health checks that count as an engine failure


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass
class Replica:
    """One engine of a model. ``plan`` is its placement (``None`` when nothing is reserved);
    ``booked_bytes`` what is reserved on each of its devices: the plan's share while starting,
    NVML's measurement once ready (cases C18). Times are the pool's clock (seconds)."""

    model: str
    index: int
    state: ModelState = ModelState.UNLOADED
    process: EngineProcess | None = None
    task: asyncio.Task | None = None
    plan: Plan | None = None
    requirement: Requirement | None = None
    booked_bytes: int = 0
    measured_bytes: int | None = None
    in_flight: int = 0
    last_used: float = 0.0
    ready_since: float | None = None
    load_seconds: float | None = None
    max_model_len: int | None = None  # tokens, as the engine reports it once ready
    crashed: bool = False  # its engine failed: restart it (after the back-off) beside the others

    @property
    def key(self) -> str:
        return f"{self.model}#{self.index}"

    @property
    def base_url(self) -> str | None:
        return self.process.launch.base_url if self.process and self.state == ModelState.READY else None

    @property
    def device(self) -> str:
        """Where the engine runs (``cuda:0+cuda:1``, ``cpu``), or ``-`` when not placed."""
        return "+".join(self.plan.devices) if self.plan else "-"


@dataclass
class ModelEntry:
    """The pool's book on one model and its replicas. ``failures`` are the clock times of engine
    failures (for the back-off); ``nofit`` the last placement refusal; ``waiting`` counts requests
    waiting for the model to become ready. ``profile``: its tool-call parser and FIM format
    (``server.profile``)."""

    config: ModelConfig
    profile: Profile = field(default_factory=lambda: profile(ModelConfig("-", "-"), UNKNOWN))
    replicas: list[Replica] = field(default_factory=list)
    error: VramgateError | None = None
    failures: list[float] = field(default_factory=list)
    gave_up: bool = False
    nofit: ModelUnavailable | None = None
    waiting: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    retiring: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # reload's restart/retire, one at a time

    def __post_init__(self) -> None:
        if not self.replicas:
            self.replicas = [Replica(self.config.name, i) for i in range(self.config.replicas)]

    @property
    def state(self) -> ModelState:
        return ModelState(model_state([r.state.value for r in self.replicas], self.error is not None))

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def device(self) -> str:
        return ",".join(r.device for r in self.replicas if r.plan) or "-"

    def notify(self) -> None:
        """Wake everything waiting for a change of this model."""
        event, self.changed = self.changed, asyncio.Event()
        event.set()


@dataclass
class Lease:
    """The right to send one request to a ready replica; ``release()`` exactly once when done."""

    pool: "ModelPool"
    entry: ModelEntry
    replica: Replica
    released: bool = False

    @property
    def base_url(self) -> str:
        return self.replica.process.launch.base_url  # type: ignore[union-attr]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.replica.in_flight -= 1
            self.replica.last_used = self.pool.clock()
            if self.replica.in_flight == 0:
                self.entry.notify()
                self.pool.notify_capacity()


Launcher = Callable[[str, EngineLaunch, Settings], EngineProcess]


def default_launcher(name: str, launch: EngineLaunch, settings: Settings) -> EngineProcess:
    return EngineProcess(name, launch, settings.log_dir / f"{name.replace('/', '_')}.log",
                         grace=settings.engine_stop_grace)


def cpu_list() -> list[int]:
    """The CPU cores this process may run on (its affinity, which containers narrow)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def device_kind(model: ModelConfig, snap: Snapshot) -> str:
    """``cuda`` or ``cpu`` for ``model``: its ``device`` setting, or a GPU when the snapshot has one."""
    if model.device != "auto":
        return model.device
    return "cuda" if any(d.kind == "cuda" for d in snap.devices) else "cpu"


def with_cpu_budget(snap: Snapshot, budget: int | None) -> Snapshot:
    """Replace the CPU device by a fixed ``budget`` of bytes (``cpu_memory_budget``), if set."""
    if budget is None:
        return snap
    devices = tuple(Device("cpu", "cpu", budget, budget, 0, name=f"CPU (budget {fmt(budget)})")
                    if d.kind == "cpu" else d for d in snap.devices)
    return Snapshot(devices, snap.measured, snap.source)


def dry_run(settings: Settings, snap: Snapshot) -> list[tuple[Requirement, Plan | NoFit]]:
    """Place every configured replica in order on ``snap``, as a server starting all of them now
    would (each plan booked before the next); used by ``vramgate plan``."""
    snap = with_cpu_budget(snap, settings.cpu_memory_budget)
    policy = Policy(settings.placement, settings.gpu_headroom_bytes, allow_eviction=False)
    cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
    cpu_models = [m for m in settings.models if device_kind(m, snap) == "cpu"]
    bookings: list[Booking] = []
    out: list[tuple[Requirement, Plan | NoFit]] = []
    for model in settings.models:
        for i in range(model.replicas):
            req = requirement_for(model, device_kind(model, snap),
                                  kv_sequences=settings.kv_cache_sequences,
                                  available_ram=cpu_dev.free_bytes, cpu_engines=len(cpu_models))
            result = plan(req, snap.devices, tuple(bookings), policy)
            if isinstance(result, Plan):
                bookings.append(Booking(f"{model.name}#{i}", result.devices,
                                        result.bytes_per_device, starting=True))
            out.append((req, result))
    return out


class Events:
    """Receives the pool's lifecycle events (the metrics implement it); this one ignores them."""

    def engine_started(self, model: str) -> None: ...
    def engine_failed(self, model: str) -> None: ...
    def engine_stopped(self, model: str, reason: str) -> None: ...
    def engine_ready(self, model: str, seconds: float) -> None: ...


class ModelPool:
    """Models and their engines, by canonical name. Create inside the running event loop; call
    ``start()`` once, ``stop_all()`` at the end. ``clock`` gives seconds (monotonic)."""

    def __init__(self, settings: Settings, inventory: Inventory, *,
                 launcher: Launcher = default_launcher, clock: Callable[[], float] = time.monotonic,
                 health_interval: float = 5.0, reap_interval: float = 1.0,
                 events: Events = Events(), profiles: Mapping[str, Profile] | None = None) -> None:
        self.settings = settings
        self.inventory = inventory
        self.launcher = launcher
        self.clock = clock
        self.health_interval = health_interval
        self.reap_interval = reap_interval
        self.profiles = dict(profiles or {})
        self.entries = {m.name: self._entry(m, profiles) for m in settings.models}
        self.http = httpx.AsyncClient()
        self.closing = False
        self._capacity = asyncio.Event()
        self._placing = asyncio.Lock()
        self._device_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self.starts = 0  # engines started so far (a counter for metrics and tests)
        self.events = events

    @staticmethod
    def _entry(model: ModelConfig, profiles: Mapping[str, Profile] | None) -> ModelEntry:
        """A new book for ``model``; its profile from ``profiles`` (read from its files), else
        derived from its configuration and name alone."""
        found = (profiles or {}).get(model.name)
        return ModelEntry(config=model, profile=found or profile(model, UNKNOWN))

    @property
    def policy(self) -> Policy:
        s = self.settings
        return Policy(s.placement, s.gpu_headroom_bytes, max_engines=s.max_loaded_models)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def notify_capacity(self) -> None:
        """Wake requests waiting for room (an engine stopped, or one became idle)."""
        event, self._capacity = self._capacity, asyncio.Event()
        event.set()

    # ---- books ----------------------------------------------------------------------------
    def replicas(self) -> list[tuple[ModelEntry, Replica]]:
        return [(e, r) for e in self.entries.values() for r in e.replicas]

    def usages(self) -> list[EngineUsage]:
        """Our engines as the inventory sees them (process trees, devices, shares)."""
        return [EngineUsage(r.model, tree_pids(r.process.pid), r.plan.devices, r.plan.bytes_per_device,
                            r.ready_since is not None)
                for _, r in self.replicas() if r.plan and r.process and r.process.pid]

    def bookings(self, exclude: str | None = None) -> tuple[Booking, ...]:
        """Every reservation in the books, as the planner takes them (keyed ``model#replica``)."""
        return tuple(
            Booking(r.key, r.plan.devices, r.booked_bytes, starting=r.state == ModelState.LOADING,
                    idle=r.in_flight == 0 and r.state == ModelState.READY,
                    pinned=e.config.pinned, last_used=r.last_used)
            for e, r in self.replicas() if r.plan and r.key != exclude)

    async def snapshot(self) -> Snapshot:
        snap = await asyncio.to_thread(self.inventory.snapshot, self.usages())
        return with_cpu_budget(snap, self.settings.cpu_memory_budget)

    def views(self, entry: ModelEntry) -> list[ReplicaView]:
        return [ReplicaView(r.key, r.model, r.state == ModelState.READY, r.in_flight, r.last_used)
                for r in entry.replicas]

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the preloaded models and the idle reaper."""
        for entry in self.entries.values():
            if entry.config.preload:
                self._start_model(entry)
        self._spawn(self._reaper(), "reaper")

    def _start_model(self, entry: ModelEntry, crashed_only: bool = False) -> None:
        """Start every replica of ``entry`` that is unloaded (single flight: never a second one);
        with ``crashed_only``, only those whose engine failed. A model being removed by a
        reload starts nothing."""
        if entry.retiring or self.closing:
            return
        entry.nofit = None
        for rep in entry.replicas:
            if rep.state == ModelState.UNLOADED and (rep.crashed or not crashed_only):
                rep.crashed = False
                rep.state = ModelState.LOADING
                rep.ready_since = None
                rep.task = self._spawn(self._run(entry, rep), f"engine:{rep.key}")
        entry.notify()

    def _failed(self, entry: ModelEntry, rep: Replica, error: VramgateError) -> None:
        """Book an engine failure: reservation returned, back-off or give up, waiters woken."""
        rep.plan, rep.booked_bytes, rep.measured_bytes, rep.ready_since = None, 0, None, None
        rep.state, rep.crashed = ModelState.UNLOADED, True
        now = self.clock()
        self.events.engine_failed(entry.config.name)
        entry.failures = [t for t in entry.failures if now - t < 3600] + [now]
        entry.error = error
        if restart_delay(entry.failures, now) is None:
            entry.gave_up = True
            log.error("%s failed %d times: giving up until it is loaded by hand", entry.config.name,
                      len(entry.failures))
        entry.notify()
        self.notify_capacity()

    async def _place(self, entry: ModelEntry, rep: Replica) -> Plan:
        """Decide where ``rep`` goes and book it (under ``_placing``); evicts what the plan says.

        Raises :class:`ModelUnavailable` (503) with the planner's numbers when nothing fits.
        """
        model = entry.config
        async with self._placing:
            snap = await self.snapshot()
            kind = device_kind(model, snap)
            cpu = [e for e in self.entries.values() if device_kind(e.config, snap) == "cpu"]
            cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
            req = requirement_for(model, kind, kv_sequences=self.settings.kv_cache_sequences,
                                  available_ram=cpu_dev.free_bytes, cpu_engines=len(cpu))
            result = plan(req, snap.devices, self.bookings(exclude=rep.key), self.policy)
            if isinstance(result, NoFit):
                raise ModelUnavailable(f"cannot place {model.name}: {result.reason}", retry_after=10)
            victims = [r for _, r in self.replicas() if r.key in result.evict]
            for victim in victims:  # no await before this: nobody can lease them any more
                victim.state = ModelState.STOPPING
            for victim in victims:
                log.warning("evicting %s (%s on %s, idle for %.0f s) to place %s: %s", victim.model,
                            fmt(victim.booked_bytes), victim.device, self.clock() - victim.last_used,
                            model.name, result.why)
                # shielded: if this placement is cancelled, the victim still stops completely
                await asyncio.shield(self._stop_replica(victim, "evicted"))
            rep.plan, rep.requirement, rep.booked_bytes = result, req, result.bytes_per_device
            log.info("placed %s on %s: %s", rep.key, "+".join(result.devices), result.why)
            return result

    async def _run(self, entry: ModelEntry, rep: Replica) -> None:
        """Own one replica's engine from placement to exit; whatever goes wrong ends in a state
        (never a replica stuck loading). Cancelled by ``_stop_replica``."""
        try:
            await self._run_engine(entry, rep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an odd model folder: fail the model, keep the pool
            log.exception("engine for %s: unexpected error", rep.key)
            if rep.process:
                await rep.process.stop()
            self._failed(entry, rep, ModelUnavailable(
                f"vramgate could not run {entry.config.name}: {exc.__class__.__name__}: {exc}",
                retry_after=30))

    async def _run_engine(self, entry: ModelEntry, rep: Replica) -> None:
        model = entry.config
        try:
            placed = await self._place(entry, rep)
        except ModelUnavailable as exc:
            log.warning("%s", exc.message)
            rep.state = ModelState.UNLOADED
            entry.nofit = exc
            entry.notify()
            return
        kind = "cpu" if placed.devices == ("cpu",) else "cuda"
        launch = engine_launch(
            model, port=free_port(), device=kind, python=self.settings.engine_python or sys.executable,
            module=self.settings.engine_module,
            kv_cache_bytes=rep.requirement.kv_cache_bytes if rep.requirement else None,
            gpu_memory_utilization=placed.gpu_memory_utilization,
            tensor_parallel_size=placed.tensor_parallel_size, cuda_devices=placed.cuda_indices,
            tool_parser=entry.profile.tool_parser,
            cpu_cores=cpu_binding(self.settings.models, cpu_list()).get(rep.key) if kind == "cpu" else None)
        proc = self.launcher(model.name if model.replicas == 1 else rep.key.replace("#", "-"),
                             launch, self.settings)
        rep.process = proc
        t0 = time.monotonic()
        locks = [self._device_locks.setdefault(d, asyncio.Lock())
                 for d in sorted(placed.devices) if d != "cpu"]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for lock in locks:  # one engine starting per GPU at a time
                    await stack.enter_async_context(lock)
                log.info("starting engine for %s: %s", rep.key, " ".join(launch.argv))
                self.starts += 1
                self.events.engine_started(model.name)
                await proc.start()
                await proc.wait_healthy(model.startup_timeout, self.http)
        except (EngineStartError, OSError) as exc:
            await proc.stop()
            error = exc if isinstance(exc, EngineStartError) else EngineStartError(
                f"engine for {model.name} could not be started: {exc}")
            log.error("engine for %s failed to start: %s", rep.key, error.message)
            self._failed(entry, rep, error)
            return
        rep.load_seconds = time.monotonic() - t0
        rep.max_model_len = await self._max_model_len(proc)
        if entry.profile.files.folder is None:  # a hub model: vLLM has downloaded it by now
            await self._reread_profile(entry)
        self.events.engine_ready(model.name, rep.load_seconds)
        rep.ready_since = rep.last_used = self.clock()
        await self._measure(rep)  # before READY: the books are right once anyone sees it ready
        if rep.state != ModelState.LOADING:  # unloaded or evicted meanwhile
            return
        rep.state = ModelState.READY
        entry.error, entry.gave_up = None, False
        entry.notify()
        log.info("engine for %s ready on %s in %.1f s", rep.key, launch.base_url, rep.load_seconds)
        reason = await self._watch(proc)
        if rep.state == ModelState.STOPPING:
            return
        if proc.returncode is None:
            rep.state = ModelState.STOPPING  # unhealthy: stop it before booking the failure
            await proc.stop()
        log.error("engine for %s %s", rep.key, reason)
        self._failed(entry, rep, ModelUnavailable(
            f"the engine for {model.name} {reason}; last lines of its log:\n"
            f"{log_tail(proc.log_path, 20)}", retry_after=5))

    async def _watch(self, proc: EngineProcess) -> str:
        """Wait until the engine exits or fails ``HEALTH_FAILURES`` health checks in a row; says which."""
        exited = asyncio.ensure_future(proc.wait())
        failed = 0
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.health_interval)
                if done:
                    return f"exited with status {exited.result()}"
                try:
                    ok = (await self.http.get(proc.launch.base_url + "/health", timeout=5)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                failed = 0 if ok else failed + 1
                if failed >= HEALTH_FAILURES:
                    return f"failed {failed} health checks in a row"
        finally:
            exited.cancel()

    async def _reread_profile(self, entry: ModelEntry) -> None:
        """Read the model's files again (in a thread) for its FIM format and special tokens; the
        tool-call parser stays the one its engines were started with."""
        fresh = await asyncio.to_thread(read_profiles, (entry.config,))
        self._adopt(entry, fresh[entry.config.name])

    @staticmethod
    def _adopt(entry: ModelEntry, fresh: Profile) -> None:
        running = any(r.state != ModelState.UNLOADED for r in entry.replicas)
        keep = entry.profile.tool_parser if running else fresh.tool_parser
        source = entry.profile.tool_parser_source if running else fresh.tool_parser_source
        entry.profile = dataclasses.replace(fresh, tool_parser=keep, tool_parser_source=source)

    async def _max_model_len(self, proc: EngineProcess) -> int | None:
        """The context length (tokens) the engine serves, from its ``GET /v1/models``
        (``data[0].max_model_len``, vLLM's model card); ``None`` when it does not say."""
        try:
            resp = await self.http.get(proc.launch.base_url + "/v1/models", timeout=5)
            value = resp.json()["data"][0].get("max_model_len")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    async def _measure(self, rep: Replica) -> None:
        """Replace the estimate in the books by what NVML measures the engine using (cases C18)."""
        if rep.plan is None or rep.plan.devices == ("cpu",):
            return
        measured = (await self.snapshot()).measured.get(rep.model)
        if measured:
            estimate = rep.requirement.per_device_bytes(rep.plan.tensor_parallel_size) if (
                rep.requirement and rep.requirement.weight_bytes is not None) else None
            log.info("%s measured at %s per device (estimate %s, share %s)", rep.key, fmt(measured),
                     fmt(estimate) if estimate else "unknown", fmt(rep.plan.bytes_per_device))
            rep.measured_bytes = rep.booked_bytes = measured

    async def _stop_replica(self, rep: Replica, reason: str = "unload") -> None:
        """Stop one replica: cancel its owning task (wherever it is: placing, starting, watching),
        then stop its engine, and return its reservation. ``reason`` goes to the events."""
        if rep.process and rep.process.returncode is None:
            self.events.engine_stopped(rep.model, reason)
        rep.state = ModelState.STOPPING
        task = rep.task
        if task and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if rep.process:
            await rep.process.stop()
        rep.plan, rep.booked_bytes, rep.measured_bytes, rep.ready_since = None, 0, None, None
        rep.state = ModelState.UNLOADED
        entry = self.entries.get(rep.model)
        if entry:
            entry.notify()
        self.notify_capacity()

    async def reap(self) -> list[str]:
        """Unload the replicas idle past their model's ``ttl``; returns their keys."""
        now = self.clock()
        views = [v for e in self.entries.values() for v in self.views(e)]
        ttl = {name: e.config.ttl for name, e in self.entries.items()}
        waiting = {name: e.waiting for name, e in self.entries.items()}
        keys = idle_expired(views, ttl, waiting, now)
        victims = [r for _, r in self.replicas() if r.key in keys]
        for rep in victims:  # no await before this: nobody can lease them any more
            rep.state = ModelState.STOPPING
        for rep in victims:
            log.info("unloading %s: idle for %.0f s (ttl %g s)", rep.key, now - rep.last_used,
                     self.entries[rep.model].config.ttl)
            await self._stop_replica(rep, "idle")
        return keys

    async def _reaper(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap()
            except Exception:  # the reaper must outlive one bad round; the error is logged
                log.exception("idle reaper")

    def loading(self, name: str) -> bool:
        """Whether an engine of ``name`` is starting now (placed, not yet ready)."""
        entry = self.entries.get(name)
        return entry is not None and any(r.state == ModelState.LOADING for r in entry.replicas)

    def try_acquire(self, name: str, affinity: str | None = None) -> Lease | None:
        """A lease at once when ``name`` has a ready replica (no await: the common case costs no
        task), else ``None``: then call :meth:`acquire`, which starts, waits and explains.
        ``affinity``: a prompt-prefix key for :func:`~server.lifecycle.pick_replica`."""
        entry = self.entries.get(name)
        if entry is None or self.closing:
            return None
        key = pick_replica(self.views(entry), affinity)
        if key is None:
            return None
        rep = next(r for r in entry.replicas if r.key == key)
        rep.in_flight += 1
        self._restart_crashed(entry)
        return Lease(self, entry, rep)

    def _restart_crashed(self, entry: ModelEntry) -> None:
        """A replica whose engine failed while others serve restarts on the next request once its
        back-off has passed (a model that gave up waits for ``load``)."""
        if len(entry.replicas) > 1 and not entry.gave_up and any(r.crashed for r in entry.replicas) \
                and restart_delay(entry.failures, self.clock()) == 0:
            self._start_model(entry, crashed_only=True)

    async def acquire(self, name: str, timeout: float | None = None,
                      affinity: str | None = None) -> Lease:
        """A lease on a ready replica of canonical model ``name`` (the one with the fewest requests
        in flight), starting the model if needed and waiting while it loads.

        Raises :class:`ModelUnavailable` (503, with ``Retry-After``) when the pool is shutting down,
        the model is backing off after failures or gave up, it fits nowhere for
        ``place_wait_timeout`` seconds, or it is not ready within ``timeout`` seconds (default
        ``load_wait_timeout``).
        """
        entry = self.entries.get(name)
        if entry is None:  # removed by a configuration reload meanwhile
            raise ModelNotFound(name)
        wait = self.settings.load_wait_timeout if timeout is None else timeout
        deadline = self.clock() + wait
        room_deadline: float | None = None
        started = False
        entry.waiting += 1
        try:
            while True:
                if self.closing:
                    raise ModelUnavailable("the server is shutting down", retry_after=5)
                if entry.retiring or self.entries.get(name) is not entry:
                    raise ModelNotFound(name)  # removed by a reload while this request waited
                key = pick_replica(self.views(entry), affinity)
                if key is not None:
                    rep = next(r for r in entry.replicas if r.key == key)
                    rep.in_flight += 1
                    self._restart_crashed(entry)
                    return Lease(self, entry, rep)
                changed, capacity, now = entry.changed, self._capacity, self.clock()
                if entry.gave_up:
                    raise entry.error or ModelUnavailable(f"the model {name} failed", retry_after=60)
                busy = any(r.state in (ModelState.LOADING, ModelState.STOPPING) for r in entry.replicas)
                if not busy:
                    if entry.nofit is not None and started:
                        room_deadline = room_deadline or now + self.settings.place_wait_timeout
                        left = min(room_deadline, deadline) - now
                        if left <= 0:
                            raise entry.nofit
                        try:  # wait for room: an engine stopping, or a busy one becoming idle
                            await asyncio.wait_for(capacity.wait(), left)
                        except asyncio.TimeoutError:
                            raise entry.nofit from None
                        entry.nofit = None
                        continue
                    delay = restart_delay(entry.failures, now)
                    if delay and entry.error is not None:
                        raise ModelUnavailable(
                            f"{name} failed {len(entry.failures)} time(s) recently; it restarts in "
                            f"{delay:.0f} s. Last failure: {entry.error.message}", retry_after=delay,
                            code=entry.error.code)
                    self._start_model(entry)
                    started = True
                    continue
                left = deadline - now
                if left <= 0:
                    raise ModelUnavailable(f"the model {name} is still loading after {wait:g} s",
                                           retry_after=10)
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    continue
        finally:
            entry.waiting -= 1

    async def load(self, name: str) -> ModelState:
        """Start ``name`` now (also after it gave up) and wait until it is ready or fails.

        Returns the resulting state; raises :class:`ModelUnavailable` as :meth:`acquire` does.
        """
        entry = self.entries[name]
        entry.failures, entry.gave_up, entry.error = [], False, None
        self._start_model(entry)  # every replica, not only as many as a request needs
        lease = await self.acquire(name)
        lease.release()
        return entry.state

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Stop every replica of ``name``: at once with ``force``, else once its in-flight requests
        have ended (new requests wait meanwhile and reload the model afterwards)."""
        entry = self.entries[name]
        reps = [r for r in entry.replicas if r.state in (ModelState.READY, ModelState.LOADING)]
        for rep in reps:
            rep.state = ModelState.STOPPING
        while not force and any(r.in_flight for r in reps):
            await entry.changed.wait()
        await asyncio.gather(*(self._stop_replica(r) for r in reps))

    async def reconfigure(self, settings: Settings,
                          profiles: Mapping[str, Profile] | None = None) -> dict[str, list[str]]:
        """Apply a new configuration: new models appear, removed ones unload after their in-flight
        work, changed ones restart (after their in-flight work). ``profiles`` are the models'
        profiles read anew. Returns what changed. Safe to call again before an earlier call's
        unloads finished: the latest configuration wins."""
        self.settings = settings
        self.profiles = dict(profiles or {})
        new = {m.name: m for m in settings.models}
        out: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        for name, entry in list(self.entries.items()):
            if name not in new and not entry.retiring:
                entry.retiring = True
                out["removed"].append(name)
                self._spawn(self._retire(entry), f"retire:{name}")
        for name, model in new.items():
            entry = self.entries.get(name)
            if entry is None:
                out["added"].append(name)
                self.entries[name] = entry = self._entry(model, self.profiles)
                if model.preload:
                    self._start_model(entry)
                continue
            if entry.retiring:  # removed, then added back before it was gone
                entry.retiring = False
                out["added"].append(name)
            elif entry.config != model:
                out["changed"].append(name)
            if entry.config != model:
                self._spawn(self._restart(entry), f"restart:{name}")
            elif name in self.profiles:  # the same model: its files may have changed (a download)
                self._adopt(entry, self.profiles[name])
        return out

    async def _retire(self, entry: ModelEntry) -> None:
        async with entry.lock:
            if not entry.retiring:
                return
            await self.unload(entry.config.name)
            if entry.retiring and self.entries.get(entry.config.name) is entry:
                del self.entries[entry.config.name]

    async def _restart(self, entry: ModelEntry) -> None:
        async with entry.lock:
            model = self.settings.resolve(entry.config.name)
            if model is None or model.name != entry.config.name or model == entry.config:
                return  # removed again, or an earlier restart already applied this configuration
            running = entry.state != ModelState.UNLOADED
            await self.unload(model.name)
            entry.config = self.settings.resolve(model.name) or model  # the latest, if it changed again
            entry.profile = self._entry(entry.config, self.profiles).profile
            entry.replicas = [Replica(model.name, i) for i in range(entry.config.replicas)]
            entry.failures, entry.gave_up, entry.error = [], False, None
            if entry.config.preload or running:
                self._start_model(entry)

    def begin_shutdown(self) -> None:
        """Stop admitting: every request waiting for a model gets a 503 now, new ones too."""
        self.closing = True
        for entry in self.entries.values():
            entry.notify()
        self.notify_capacity()

    async def stop_all(self) -> None:
        """Stop every engine (each: SIGTERM → grace → SIGKILL of its group) and wait for them."""
        self.closing = True
        reps = [r for _, r in self.replicas()]
        for rep in reps:
            if rep.state in (ModelState.READY, ModelState.LOADING):
                rep.state = ModelState.STOPPING
        tasks = [t for t in self._background if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rep in reps:
            if rep.process and rep.process.returncode is None:
                log.info("stopping engine for %s", rep.key)
        await asyncio.gather(*(r.process.stop() for r in reps if r.process), return_exceptions=True)
        for rep in reps:
            if rep.state == ModelState.STOPPING:
                rep.state = ModelState.UNLOADED
                rep.plan, rep.booked_bytes = None, 0
        for entry in self.entries.values():
            entry.notify()  # waiters see a model that is not ready and get a 503
        await self.http.aclose()
