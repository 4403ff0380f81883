"""The scheduler's books (plain data) and the frozen views readers get of them.

Only the scheduler's task writes :class:`ModelBook`, :class:`ReplicaBook` and :class:`WaiterBook`
(``server.scheduler``); the pure decisions (``server.decisions``) read them and return what to do.
Everything else (routes, admin views, metrics) reads :class:`ModelView` objects: frozen copies made
after each change, safe to hold across an ``await``. Times are the scheduler's clock (seconds,
monotonic); memory is in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from server.config import ModelConfig
from server.errors import VramgateError
from server.lifecycle import model_state
from server.placement import Booking, Plan, Requirement
from server.profile import Profile


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # the engine runs in vLLM's sleep mode (server.sleep)


class Phase(str, Enum):
    """Where a loading replica is: ``queued`` for placement, ``placing`` (its inventory is being
    read), ``booked`` (placed; waits for its evicted engines to stop or for its GPU's turn),
    ``starting`` (the engine process runs, not yet healthy; for a sleeping engine: its wake is
    under way), ``falling_asleep`` (its ``/sleep`` call is under way). ``idle`` otherwise."""

    IDLE = "idle"
    QUEUED = "queued"
    PLACING = "placing"
    BOOKED = "booked"
    STARTING = "starting"
    FALLING_ASLEEP = "falling_asleep"


@dataclass
class ReplicaBook:
    """One engine of a model. ``run`` counts its starts: messages about an earlier run are
    stale. ``leases`` are its requests in flight (``batch_leases`` of them at batch priority); ``drain`` means stop it once they end (an unload
    or a reload), ``stop_sent`` that its stop is under way. ``after`` holds the keys of the
    engines it evicts, which must stop before it starts. ``booked_bytes``: the plan's share while
    starting, NVML's measurement once ready (cases C18), what a sleeping engine still holds while
    it sleeps (``awake_bytes`` keeps its figure awake, ``host_bytes`` the host RAM its level-1 sleep
    took). ``sleepable``: started with sleep mode; ``asleep``: its process sleeps (also while it is
    being placed for its wake)."""

    model: str
    index: int
    state: ModelState = ModelState.UNLOADED
    phase: Phase = Phase.IDLE
    run: int = 0
    engine: Any = None  # the Engine of the current run (server.supervisor)
    plan: Plan | None = None
    requirement: Requirement | None = None
    booked_bytes: int = 0
    measured_bytes: int | None = None
    leases: int = 0
    batch_leases: int = 0  # of ``leases``, those of batch priority (decisions.BATCH)
    last_used: float = 0.0
    ready_since: float | None = None
    loading_since: float | None = None  # clock time its current load (or wake) was queued
    load_seconds: float | None = None
    max_model_len: int | None = None
    crashed: bool = False
    drain: bool = False
    stop_sent: bool = False
    stop_reason: str = "unload"
    after: set[str] = field(default_factory=set)
    sleepable: bool = False
    asleep: bool = False
    awake_bytes: int = 0
    host_bytes: int = 0

    @property
    def key(self) -> str:
        return f"{self.model}#{self.index}"

    @property
    def devices(self) -> tuple[str, ...]:
        return self.plan.devices if self.plan else ()


@dataclass
class ModelBook:
    """The books on one model. ``failures``: clock times of engine failures (the back-off);
    ``nofit``: the last placement refusal, and ``retry`` whether room may have appeared since; ``retiring``: removed by a reload;
    ``pending``: the configuration a reload gave it, applied once its engines have stopped
    (``restart``: start it again then)."""

    config: ModelConfig
    profile: Profile
    replicas: list[ReplicaBook] = field(default_factory=list)
    error: VramgateError | None = None
    failures: list[float] = field(default_factory=list)
    gave_up: bool = False
    nofit: VramgateError | None = None
    retry: bool = False
    retiring: bool = False
    pending: ModelConfig | None = None
    restart: bool = False

    def __post_init__(self) -> None:
        if not self.replicas:
            self.replicas = [ReplicaBook(self.config.name, i) for i in range(self.config.engines)]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> ModelState:
        return ModelState(model_state([r.state.value for r in self.replicas], self.error is not None))

    @property
    def leases(self) -> int:
        return sum(r.leases for r in self.replicas)

    @property
    def batch_leases(self) -> int:
        return sum(r.batch_leases for r in self.replicas)


@dataclass
class WaiterBook:
    """One request waiting for a lease: ``priority`` (lower first), ``seq`` (arrival order),
    ``arrived`` and ``deadline`` (clock seconds; the wait for a loading engine), ``affinity`` (a
    prompt-prefix key for replica choice), ``room_since`` (when a placement for it first found no
    room: its wait for room counts from then)."""

    id: int
    model: str
    priority: int
    seq: int
    arrived: float
    deadline: float
    affinity: str | None = None
    room_since: float | None = None


class Lease:
    """The right to send one request to a ready replica; ``release()`` exactly once when done
    (more calls do nothing). ``base_url`` is the engine's, ``headers`` go with the request to it
    and ``served_name`` is the model's name there (``None``: its name here); ``max_model_len`` its
    context (tokens)."""

    __slots__ = ("key", "run", "base_url", "max_model_len", "released", "batch", "_send", "headers",
                 "served_name")

    def __init__(self, send: Callable[..., None], key: str, run: int, base_url: str,
                 max_model_len: int | None, batch: bool = False,
                 headers: dict[str, str] | None = None, served_name: str | None = None) -> None:
        self._send, self.key, self.run, self.batch = send, key, run, batch
        self.base_url, self.max_model_len, self.released = base_url, max_model_len, False
        self.headers, self.served_name = headers or {}, served_name

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._send("release", self.key, self.run, self.batch)


@dataclass(frozen=True)
class EngineView:
    """A frozen copy of one replica, for readers."""

    model: str
    index: int
    state: ModelState
    phase: Phase
    pid: int | None
    base_url: str | None
    env: tuple[tuple[str, str], ...]
    plan: Plan | None
    requirement: Requirement | None
    booked_bytes: int
    measured_bytes: int | None
    in_flight: int
    last_used: float
    ready_since: float | None
    load_seconds: float | None
    max_model_len: int | None
    log_path: str | None
    host_bytes: int = 0  # host RAM its level-1 sleep holds (bytes)
    loading_since: float | None = None  # clock time its current load or wake was queued
    address: str | None = None  # where it listens, for people: unix:/path.sock, or its URL

    @property
    def key(self) -> str:
        return f"{self.model}#{self.index}"

    @property
    def device(self) -> str:
        """Where the engine runs (``cuda:0+cuda:1``, ``cpu``, ``remote`` for an upstream), or
        ``-`` when not placed."""
        return ("+".join(self.plan.devices) or "remote") if self.plan else "-"


@dataclass(frozen=True)
class ModelView:
    """A frozen copy of one model's books, for readers. ``waiting``: requests waiting for it."""

    config: ModelConfig
    profile: Profile
    state: ModelState
    replicas: tuple[EngineView, ...]
    error: VramgateError | None
    nofit: VramgateError | None
    waiting: int

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def device(self) -> str:
        return ",".join(r.device for r in self.replicas if r.plan) or "-"

    @property
    def loading(self) -> bool:
        return any(r.state == ModelState.LOADING for r in self.replicas)


def replica_view(rep: ReplicaBook) -> EngineView:
    """The frozen copy of ``rep`` (its engine's pid, URL and log as they are now)."""
    eng = rep.engine
    return EngineView(
        rep.model, rep.index, rep.state, rep.phase, getattr(eng, "pid", None),
        eng.base_url if eng is not None else None,
        tuple(getattr(getattr(eng, "launch", None), "env", {}).items()), rep.plan,
        rep.requirement, rep.booked_bytes, rep.measured_bytes, rep.leases, rep.last_used,
        rep.ready_since, rep.load_seconds, rep.max_model_len,
        str(eng.log_path) if getattr(eng, "log_path", None) else None, rep.host_bytes,
        rep.loading_since, eng.address if eng is not None else None)


def model_view(book: ModelBook, waiting: int) -> ModelView:
    """The frozen copy of ``book``."""
    return ModelView(book.config, book.profile, book.state,
                     tuple(replica_view(r) for r in book.replicas), book.error, book.nofit, waiting)


def bookings(books: dict[str, ModelBook], waiting: dict[str, int],
             exclude: str | None = None) -> tuple[Booking, ...]:
    """Every reservation in the books, as the planner takes them (keyed ``model#replica``). A
    replica counts as idle (evictable) only when ready or asleep, without requests in flight,
    nobody waits for its model and it is not draining. An upstream (a plan on no device) books
    nothing."""
    return tuple(
        Booking(r.key, r.plan.devices, r.booked_bytes,
                starting=r.state == ModelState.LOADING,
                idle=(r.state in (ModelState.READY, ModelState.SLEEPING) and r.phase == Phase.IDLE
                      and r.leases == 0 and not r.drain and not waiting.get(b.name)),
                pinned=b.config.pinned, last_used=r.last_used,
                sleeping=r.asleep, host_bytes=r.host_bytes)
        for b in books.values() for r in b.replicas if r.plan and r.plan.devices and r.key != exclude)
