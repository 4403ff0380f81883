"""The scheduler: one asyncio task owns every model, replica, lease and waiting request.

Everything else sends it messages (:meth:`Scheduler.request`, :meth:`Lease.release`, load,
unload, reconfigure, shutdown; engines report ready, failed, exited and stopped) and reads frozen
views (:meth:`Scheduler.models`). After each batch of messages the task asks the pure decisions
(``server.decisions.step``) what to do and carries that out: it grants leases, refuses waiters,
queues placements, and starts and stops engines as tasks (``server.supervisor``) whose ends come
back as messages, so a slow engine stop never holds up anything else.

- Models start ``unloaded`` unless ``preload``; the first request places and starts every replica
  and concurrent requests wait for that one start (single flight, cases C13).
- ``X-Priority`` orders every wait: for a concurrency slot, for a loading engine, for room; a
  lower-priority request never cold-starts or evicts ahead of a higher one (``decisions``).
- Idle replicas unload ``ttl`` seconds after their last request ended. When a model does not fit,
  idle engines are evicted least recently used first; when no room can be made requests wait up
  to ``place_wait_timeout`` for capacity, then get 503 with ``Retry-After``.
- An engine that exits or fails its health checks fails its streams and is restarted by the next
  request after a back-off (``lifecycle.restart_delay``); after ``lifecycle.MAX_FAILURES`` failures
  the model shows ``failed`` with its log's last lines until it is loaded by hand or reloaded.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from server import decisions as d
from server.books import Lease, ModelBook, ModelState, ModelView, ReplicaBook, WaiterBook, \
    bookings, model_view
from server.config import ModelConfig, Settings
from server.engines import EngineLaunch, EngineProcess
from server.gpus import Inventory, Snapshot
from server.modelfiles import UNKNOWN
from server.placement import Booking, Policy
from server.profile import Profile, profile
from server.proxy import new_session
from server.scheduler_actions import Actions
from server.scheduler_messages import QUIET, Messages
from server.supervisor import GroupRecords, Usage, read_snapshot

log = logging.getLogger("vramgate.pool")
NORMAL = 5  # the priority of a request that does not say (admission.PRIORITIES["normal"])
Launcher = Callable[[str, EngineLaunch, Settings], Any]


def default_launcher(name: str, launch: EngineLaunch, settings: Settings,
                     records: GroupRecords | None = None) -> EngineProcess:
    """The local engine process (under ``server.guard``), logging to a file of its own for this
    gateway instance."""
    suffix = f".{records.instance}" if records else ""
    return EngineProcess(name, launch, settings.log_dir / f"{name.replace('/', '_')}{suffix}.log",
                         grace=settings.engine_stop_grace, records=records)


class Events:
    """Receives the scheduler's lifecycle events (the metrics implement it); this one ignores them."""

    def engine_started(self, model: str) -> None: ...
    def engine_failed(self, model: str) -> None: ...
    def engine_stopped(self, model: str, reason: str) -> None: ...
    def engine_ready(self, model: str, seconds: float) -> None: ...
    def engine_slept(self, model: str) -> None: ...
    def engine_woke(self, model: str, seconds: float) -> None: ...


class Scheduler(Messages, Actions):
    """Models and their engines, by canonical name. Create inside the running event loop; call
    :meth:`start` once, :meth:`stop_all` at the end. ``clock`` gives seconds (monotonic);
    ``launcher(name, launch, settings)`` builds an :class:`~server.supervisor.Engine`;
    ``offload(fn, *args)`` runs the blocking inventory and model-file reads (default: a thread).
    ``records`` notes each engine's process group for reaping after a crash of the gateway;
    ``session``: the aiohttp session for health checks (default: one of its own);
    ``socket_dir``: where local engines' Unix sockets go while ``engine_transport`` is ``unix``
    (``None``: they listen on loopback ports; the session must dial it, see
    :func:`server.proxy.new_session`)."""

    def __init__(self, settings: Settings, inventory: Inventory, *,
                 launcher: Launcher | None = None, clock: Callable[[], float] = time.monotonic,
                 health_interval: float = 5.0, reap_interval: float = 1.0,
                 events: Events = Events(), profiles: Mapping[str, Profile] | None = None,
                 records: GroupRecords | None = None,
                 offload: Callable[..., Awaitable[Any]] = asyncio.to_thread,
                 session: Any = None, socket_dir: Path | None = None) -> None:
        self.settings, self.inventory, self.clock, self.events = settings, inventory, clock, events
        self.records, self.offload = records, offload  # offload(fn, *args): blocking reads
        self.launcher = launcher or (lambda n, l, s: default_launcher(n, l, s, records))
        self.health_interval, self.reap_interval = health_interval, reap_interval
        self.profiles = dict(profiles or {})
        self.books = {m.name: self._book(m) for m in settings.models}
        self.waiters: dict[int, WaiterBook] = {}
        self.futures: dict[int, asyncio.Future] = {}
        self.runners: dict[str, asyncio.Task] = {}
        self._own_session = session is None  # the app passes its own; tests get one here
        self.socket_dir = socket_dir
        self.http = session if session is not None else new_session(socket_dir)
        self.closing = False
        self.stopped = False  # every engine stopped for good: the owning task ends
        self._dirty = True  # whether the decisions must run after this batch of messages
        self.starts = 0  # engines started so far (a counter for metrics and tests)
        self._inbox: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._watchers: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self._owner: asyncio.Task | None = None
        self._view: dict[str, ModelView] | None = None

    def _book(self, model: ModelConfig) -> ModelBook:
        return ModelBook(model, self.profiles.get(model.name) or profile(model, UNKNOWN))

    # ---- what other tasks call ---------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        s = self.settings
        return Policy(s.placement, s.gpu_headroom_bytes, max_engines=s.max_loaded_models)

    def start(self) -> None:
        """Start the owning task and the preloaded models."""
        self._owner = asyncio.create_task(self._run(), name="scheduler")
        self._send("preload")

    def request(self, name: str, priority: int = NORMAL, affinity: str | None = None,
                timeout: float | None = None) -> tuple[int, asyncio.Future]:
        """Ask for a lease on canonical model ``name``; the future gets a :class:`Lease` or the
        error refusing it (404 ``ModelNotFound``, 503 ``ModelUnavailable``/``CapacityError`` with
        ``Retry-After``). ``timeout``: seconds to wait for a loading engine (default
        ``load_wait_timeout``). Call :meth:`withdraw` if the answer is no longer wanted."""
        wid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        wait = self.settings.load_wait_timeout if timeout is None else timeout
        self._send("acquire", wid, name, priority, affinity, wait, fut)
        return wid, fut

    def withdraw(self, wid: int, fut: asyncio.Future) -> None:
        """Give up a request: its lease, if granted already, is released."""
        if fut.done() and not fut.cancelled():
            if fut.exception() is None:
                fut.result().release()
            return
        fut.cancel()
        self._send("cancel", wid)

    def unreachable(self, lease: Lease, why: str) -> None:
        """Say that ``lease``'s engine could not be reached: it stops serving at once and its
        end is booked as a failure (as three failed health checks would be, sooner)."""
        self._send("unreachable", lease.key, lease.run, why)

    async def acquire(self, name: str, priority: int = NORMAL, affinity: str | None = None,
                      timeout: float | None = None) -> Lease:
        """:meth:`request`, awaited (cancel-safe)."""
        wid, fut = self.request(name, priority, affinity, timeout)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.withdraw(wid, fut)
            raise

    def models(self) -> dict[str, ModelView]:
        """Frozen views of every model, by canonical name (rebuilt after each change)."""
        if self._view is None:
            waiting = self._waiting()
            self._view = {n: model_view(b, waiting[n]) for n, b in self.books.items()}
        return self._view

    def profile(self, name: str) -> Profile | None:
        """The model's profile (frozen: tool-call parser, FIM format, special tokens), without
        building the views; ``None`` for a model not in the books."""
        book = self.books.get(name)
        return book.profile if book is not None else None

    def loading(self, name: str) -> bool:
        """Whether an engine of ``name`` is starting now (placed or being placed, not ready)."""
        view = self.models().get(name)
        return view is not None and view.loading

    def bookings(self) -> tuple[Booking, ...]:
        """Every reservation in the books, as the planner takes them."""
        return bookings(self.books, self._waiting())

    async def snapshot(self) -> Snapshot:
        """The inventory now (read in a thread). Raises ``NvmlError`` on a driver error."""
        return await self.offload(read_snapshot, self.inventory, self._usages(),
                                  self.settings.cpu_memory_budget)

    async def load(self, name: str) -> ModelState:
        """Start ``name`` now (also after it gave up) and wait until it is ready or fails; returns
        its state. Raises as :meth:`request` does."""
        self._send("load", name)
        lease = await self.acquire(name)
        lease.release()
        return self.books[name].state if name in self.books else ModelState.UNLOADED

    async def unload(self, name: str, *, force: bool = False) -> None:
        """Stop every replica of ``name``: at once with ``force``, else once its in-flight requests
        have ended (new requests wait meanwhile and load the model again afterwards)."""
        await self._ask("unload", name, force)

    async def reconfigure(self, settings: Settings,
                          profiles: Mapping[str, Profile] | None = None) -> dict[str, list[str]]:
        """Apply a new configuration (``server.reconfig``): new models appear, removed ones unload
        after their in-flight work, changed ones restart after it (limits and other live fields
        apply at once). Returns what changed. The latest configuration wins."""
        return await self._ask("reconfigure", settings, dict(profiles or {}))

    def begin_shutdown(self) -> None:
        """Stop admitting: every waiting request gets a 503 now, new ones too."""
        self._send("shutdown")

    async def stop_all(self) -> None:
        """Stop every engine (each: SIGTERM → grace → SIGKILL of its group) and wait for them."""
        if self._owner is not None and not self._owner.done():
            await self._ask("stop_all")
            await self._owner
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_session:
            await self.http.close()

    # ---- the owning task -------------------------------------------------------------------
    def _send(self, kind: str, *args: Any) -> None:
        self._inbox.append((kind, args))
        self._wake.set()

    async def _ask(self, kind: str, *args: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._send(kind, *args, fut)
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            retime = self._timer is None
            while self._inbox:
                kind, args = self._inbox.popleft()
                try:  # handlers that answer True (or QUIET) decided all there was to decide
                    answer = getattr(self, f"_on_{kind}")(*args)
                    if answer is not True and answer is not QUIET:
                        self._dirty = True
                    retime = retime or answer is not QUIET
                except Exception:  # a bug in one message must not stop the scheduler
                    self._dirty = retime = True
                    log.exception("scheduler: %s", kind)
            try:
                self._settle(retime)
            except Exception:  # a bug in one decision or action must not stop the scheduler
                log.exception("scheduler: deciding")
            if self.stopped:
                return

    def _settle(self, retime: bool = True) -> None:
        """Decide and act until nothing more follows, then (with ``retime``) arm the timer for the
        next deadline, back-off or ttl; a ringing timer sets ``_dirty``."""
        now = self.clock()
        timeouts = d.Timeouts(self.settings.place_wait_timeout, self.settings.batch_beside)
        decided = self._dirty
        for _ in range(50 if decided else 0):
            actions = d.step(self.books, list(self.waiters.values()), now, timeouts)
            for action in actions:
                getattr(self, f"_do_{type(action).__name__.lower()}")(action, now)
            # Answering waiters enables nothing that this step did not already decide (it counted
            # its own grants and refusals); any other action may, so decide again.
            if all(isinstance(a, (d.Grant, d.Refuse)) for a in actions):
                break
        self._dirty = False
        self._view = None
        self._resolve_watchers()
        if not (retime or decided):
            return
        wake = d.next_wake(self.books, list(self.waiters.values()), now, timeouts)
        delay = min(self.reap_interval, max(0.0, wake - now) if wake is not None else 1e9)
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._timer is None or due < self._timer.when() - 0.001:
            if self._timer is not None:  # re-armed only when it must ring earlier
                self._timer.cancel()
            self._timer = loop.call_later(delay, self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._dirty = True  # time has passed: deadlines, back-offs and ttls may be due
        self._wake.set()

    def _resolve_watchers(self) -> None:
        keep = []
        for done, fut in self._watchers:
            if fut.done():
                continue
            value = done()
            if value is not None:
                fut.set_result(value)
            else:
                keep.append((done, fut))
        self._watchers = keep

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _waiting(self) -> collections.Counter:
        """Waiting requests per model."""
        return collections.Counter(w.model for w in self.waiters.values())

    def _rep(self, key: str) -> ReplicaBook | None:
        name, _, index = key.rpartition("#")
        book = self.books.get(name)
        return book.replicas[int(index)] if book and int(index) < len(book.replicas) else None

    def _usages(self, healthy: str | None = None) -> list[Usage]:
        """Our engines as plain data for the inventory; ``healthy``: the key of one that has
        just passed its health check (it counts as ready)."""
        # A sleeping engine holds what it booked asleep, and its weights in host RAM ("cpu").
        return [Usage(r.model, r.engine.pid, r.plan.devices + (("cpu",) if r.host_bytes else ()),
                      r.booked_bytes if r.asleep else r.plan.bytes_per_device,
                      r.ready_since is not None or r.key == healthy)
                for b in self.books.values() for r in b.replicas
                if r.plan and r.engine is not None and getattr(r.engine, "pid", None)]

    def _room_changed(self) -> None:
        for book in self.books.values():
            if book.nofit is not None:
                book.retry = True
