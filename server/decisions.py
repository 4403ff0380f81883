"""The scheduler's decisions (pure): its books and the clock in, the effects to carry out out.

:func:`step` looks at every model, replica and waiting request and returns a list of actions
(:class:`Grant`, :class:`Refuse`, :class:`Start`, :class:`Place`, :class:`Launch`,
:class:`Stop`, :class:`Forget`, :class:`Apply`); the scheduler carries them out and calls it again
until it returns nothing. No I/O, no clock (``now`` is an argument, seconds), no asyncio.

The rules, in the order :func:`step` applies them:

- **Drain.** A replica marked to drain (an unload, a reload) stops once its leases end.
- **Grant.** Waiters get ready replicas in priority order (lower ``priority`` first, then arrival),
  never more than ``max_concurrency`` leases on a model (its limit as configured *now*, so a reload
  that lowers it never lets more run). While other requests run on a model, at most
  ``batch_beside`` batch-priority leases do (default 0: an engine batches every sequence it
  holds, and one batch line beside four interactive streams raised their TTFT p50 by 24–28 % in
  ``loadtest/batch.py``, none by 2–4 %).
  The replica is :func:`~server.lifecycle.pick_replica`'s.
- **Refuse.** A waiter is refused when its model was removed (404), gave up after failures, is
  backing off after a failure, has waited ``queue_timeout`` for a slot, ``place_wait_timeout`` for
  room, or its deadline (``load_wait_timeout``) for a loading engine.
- **Start.** A model with waiters and no engine up or coming starts its replicas (single flight).
  Models are considered best waiter first, and a model whose best waiter has a *lower* priority
  than a model still waiting for room starts nothing: a batch request never takes room, by a cold
  start or an eviction, that an interactive one waits for.
- **Place.** Replicas queued for placement are placed one at a time (so each plan sees the one
  before in the books: cases C16), best waiter first; :func:`place` decides where.
- **Launch.** A placed replica starts once the engines it evicts have stopped, and when no other
  engine is starting on one of its GPUs.
- **Reap.** Ready replicas idle past their model's ``ttl`` stop (``lifecycle.idle_expired``), and
  so do sleeping ones.
- **Sleep.** On a GPU, a ready replica of a model with ``sleep_after`` that has had nothing in
  flight and nobody waiting for that long sleeps (vLLM's sleep mode, ``server.sleep``). A model
  with waiters wakes its sleeping replicas (a **Wake**, in the Start's place and by its rules):
  each is placed again on its own devices, evicting idle engines if its budget needs the room.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from server.effects import Action, Apply, Forget, Grant, Launch, Place, Refuse, Sleep, Start, Stop, Timeouts, Wake  # noqa: F401  (re-exported)
from server.admission import PRIORITIES
from server.books import ModelBook, ModelState, Phase, ReplicaBook, WaiterBook, bookings
from server.errors import CapacityError, ModelNotFound, ModelUnavailable, VramgateError
from server.lifecycle import ReplicaView, idle_expired, pick_replica, restart_delay
from server.placement import NoFit, Plan, Policy, Requirement, plan
from server.gpus import Snapshot

FAILURE_MEMORY = 3600.0  # seconds a failure is remembered for the back-off
BATCH = PRIORITIES["batch"]  # this priority and lower ones (higher numbers) are background work


def admit(book: ModelBook | None, queued: int, name: str) -> VramgateError | None:
    """Whether one more request for ``book`` may wait (``None``) or the error refusing it:
    404 for a model removed by a reload, 503 ``queue_full`` when ``max_concurrency`` requests run
    or wait for an engine and ``max_queue`` more already wait (what the old admission gate let in).
    ``queued``: the requests already waiting for it."""
    if book is None or book.retiring:
        return ModelNotFound(name)
    cfg = book.config
    if cfg.max_concurrency is not None and cfg.max_queue is not None and \
            book.leases + queued >= cfg.max_concurrency + cfg.max_queue:
        waiting = max(0, queued - max(0, cfg.max_concurrency - book.leases))
        return CapacityError(f"the queue for this model is full ({waiting} waiting, "
                             f"{book.leases} running)", code="queue_full", retry_after=1)
    return None


def by_model(waiters: Iterable[WaiterBook]) -> dict[str, list[WaiterBook]]:
    """Waiters per model, each list in serving order (priority, then arrival)."""
    out: dict[str, list[WaiterBook]] = {}
    for w in sorted(waiters, key=lambda w: (w.priority, w.seq)):
        out.setdefault(w.model, []).append(w)
    return out


def servable(rep: ReplicaBook) -> bool:
    return rep.state == ModelState.READY and not rep.drain


def views(book: ModelBook, extra: dict[str, int] | None = None) -> list[ReplicaView]:
    """The replicas as ``lifecycle``'s policies take them; ``extra`` leases counted per key."""
    extra = extra or {}
    return [ReplicaView(r.key, r.model, servable(r), r.leases + extra.get(r.key, 0), r.last_used)
            for r in book.replicas]


def grants(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]],
           beside: int = 0) -> list[Grant]:
    """Leases for waiters, best first, within each model's ``max_concurrency``; no more than
    ``beside`` batch-priority leases while other requests run on the model."""
    out = []
    for name, queue in queues.items():
        book = books.get(name)
        if book is None or book.retiring or book.pending is not None:
            continue
        limit, taken, extra = book.config.max_concurrency, book.leases, {}
        batch = book.batch_leases
        for w in queue:
            if limit is not None and taken >= limit:
                break
            if w.priority >= BATCH and taken > batch and batch >= beside:
                break  # the queue is in priority order: only batch waiters are left
            key = pick_replica(views(book, extra), w.affinity)
            if key is None:
                break
            extra[key] = extra.get(key, 0) + 1
            taken += 1
            batch += w.priority >= BATCH
            out.append(Grant(w.id, key))
    return out


def busy(book: ModelBook) -> bool:
    """Whether an engine of the model is coming or going (loading, stopping, falling asleep)."""
    return any(r.state in (ModelState.LOADING, ModelState.STOPPING) or
               r.phase == Phase.FALLING_ASLEEP for r in book.replicas)


def asleep(book: ModelBook) -> tuple[int, ...]:
    """The replicas that sleep and could be woken now (their ``/sleep`` call answered)."""
    return tuple(r.index for r in book.replicas
                 if r.state == ModelState.SLEEPING and r.phase == Phase.IDLE and not r.drain)


def refusal(book: ModelBook | None, w: WaiterBook, now: float, t: Timeouts) -> VramgateError | None:
    """Why waiter ``w`` must be answered with an error now, or ``None`` (it waits on)."""
    if book is None or book.retiring:
        return ModelNotFound(w.model)
    if book.pending is not None:
        return None  # restarting with a new configuration: the deadline below still counts
    if book.gave_up:
        return book.error or ModelUnavailable(f"the model {w.model} failed", retry_after=60)
    if any(servable(r) for r in book.replicas):  # at its concurrency limit
        if w.priority >= BATCH:
            return None  # background work waits its turn; its runner withdraws it in time
        limit = book.config.queue_timeout
        return CapacityError(f"waited {limit:g} s in the queue for this model",
                             code="queue_timeout", retry_after=1) if now - w.arrived >= limit else None
    if book.nofit is not None and w.room_since is not None and now - w.room_since >= t.place_wait:
        return book.nofit
    if now >= w.deadline:
        if book.nofit is not None:
            return book.nofit
        return ModelUnavailable(f"the model {w.model} is still loading after "
                                f"{w.deadline - w.arrived:g} s", retry_after=10)
    if not busy(book) and book.error is not None and not asleep(book):  # else: woken, below
        delay = backoff(book, now)
        if delay:
            return ModelUnavailable(
                f"{w.model} failed {len(book.failures)} time(s) recently; it restarts in "
                f"{delay:.0f} s. Last failure: {book.error.message}", retry_after=delay,
                code=book.error.code)
    return None


def wants_start(book: ModelBook) -> bool:
    """Whether a model with waiters should start its engines now (none up or coming, not
    waiting for room that has not appeared)."""
    if book.retiring or book.pending is not None or book.gave_up or busy(book):
        return False
    if any(r.state in (ModelState.READY, ModelState.SLEEPING) for r in book.replicas):
        return False  # ready, or woken instead (a Wake)
    return book.nofit is None or book.retry


def starts(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]]) -> list[Start | Wake]:
    """Cold starts and wakes, best waiter first; none for a model whose best waiter ranks below
    one that waits for room (module docstring). A model wakes its sleeping replicas only when none
    of its replicas serves: waiters beside a ready one wait for the model's own limit
    (``max_concurrency``, ``batch_beside``), which another replica would not lift."""
    ranked = sorted(((q[0].priority, q[0].seq, name) for name, q in queues.items() if q))
    out, room_wait = [], None
    for priority, _, name in ranked:
        book = books.get(name)
        if book is None:
            continue
        if room_wait is not None and priority > room_wait:
            break
        sleeping = asleep(book)
        if sleeping and not any(servable(r) for r in book.replicas) and \
                not (book.retiring or book.pending is not None or book.gave_up):
            out.append(Wake(name, sleeping))
        elif wants_start(book):
            out.append(Start(name, tuple(r.index for r in book.replicas
                                         if r.state == ModelState.UNLOADED)))
        elif book.nofit is not None and not busy(book):
            room_wait = priority if room_wait is None else room_wait
    return out


def restarts(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]],
             now: float) -> list[Start]:
    """Crashed replicas of a model whose other replicas serve: started again once the back-off
    has passed, while the model has requests (a model that gave up waits for a load by hand)."""
    out = []
    for name, book in books.items():
        crashed = tuple(r.index for r in book.replicas
                        if r.crashed and r.state == ModelState.UNLOADED)
        if crashed and not book.gave_up and not book.retiring and book.pending is None and \
                (book.leases or queues.get(name)) and backoff(book, now) == 0:
            out.append(Start(name, crashed))
    return out


def next_placement(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]]) -> list[Place]:
    """The queued replica to place next (best waiter of its model first), unless one is being
    placed now."""
    reps = [(b, r) for b in books.values() for r in b.replicas]
    if any(r.phase == Phase.PLACING for _, r in reps):
        return []
    queued = [(b, r) for b, r in reps if r.phase == Phase.QUEUED]
    if not queued:
        return []

    def rank(item: tuple[ModelBook, ReplicaBook]) -> tuple[int, int, int]:
        q = queues.get(item[0].name)
        return (q[0].priority, q[0].seq, item[1].index) if q else (1 << 30, 0, item[1].index)
    return [Place(min(queued, key=rank)[1].key)]


def launches(books: dict[str, ModelBook]) -> list[Launch]:
    """Placed replicas whose evicted engines are gone, one starting engine per GPU at a time."""
    reps = [r for b in books.values() for r in b.replicas]
    starting = {d for r in reps if r.phase == Phase.STARTING for d in r.devices if d != "cpu"}
    out = []
    for r in reps:
        if r.phase == Phase.BOOKED and not r.after:
            gpus = {d for d in r.devices if d != "cpu"}
            if gpus & starting:
                continue
            starting |= gpus
            out.append(Launch(r.key))
    return out


def drains(books: dict[str, ModelBook]) -> list[Stop]:
    """Replicas marked to drain whose leases have ended."""
    return [Stop(r.key, r.stop_reason) for b in books.values() for r in b.replicas
            if r.drain and not r.stop_sent and r.leases == 0 and r.state != ModelState.UNLOADED]


def settled(books: dict[str, ModelBook]) -> list[Forget | Apply]:
    """Models removed or reconfigured by a reload whose engines have all stopped."""
    out: list[Forget | Apply] = []
    for name, book in books.items():
        if all(r.state == ModelState.UNLOADED and r.phase == Phase.IDLE for r in book.replicas):
            if book.retiring:
                out.append(Forget(name))
            elif book.pending is not None:
                out.append(Apply(name))
    return out


def reap(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]], now: float,
         granted: Iterable[str] = ()) -> list[Stop]:
    """Ready replicas idle past their model's ``ttl`` (none that ``granted`` names: a lease on it
    was decided in the same step)."""
    busy_now = set(granted)
    all_views = [v for b in books.values() for v in views(b) if v.key not in busy_now]
    ttl = {name: b.config.ttl for name, b in books.items()}
    waiting = {name: len(q) for name, q in queues.items()}
    out = [Stop(key, "idle") for key in idle_expired(all_views, ttl, waiting, now)]
    for name, book in books.items():  # a sleeping replica unloads ttl after its last request too
        out += [Stop(book.replicas[i].key, "idle") for i in asleep(book)
                if book.config.ttl > 0 and not waiting.get(name)
                and now - book.replicas[i].last_used >= book.config.ttl]
    return out


def sleep_due(book: ModelBook, rep: ReplicaBook, now: float) -> float | None:
    """When ready replica ``rep`` falls asleep if it stays idle (clock seconds), or ``None``: it
    was not started with sleep mode, or has requests, or the model does not sleep."""
    after = book.config.sleep_after
    if not (after > 0 and rep.sleepable and servable(rep) and rep.leases == 0 and rep.phase == Phase.IDLE):
        return None
    return rep.last_used + after


def sleeps(books: dict[str, ModelBook], queues: dict[str, list[WaiterBook]], now: float,
           taken: Iterable[str] = ()) -> list[Sleep]:
    """Ready replicas idle for their model's ``sleep_after`` with nobody waiting for the model
    (none that ``taken`` names: granted or stopped in the same step)."""
    skip = set(taken)
    return [Sleep(r.key) for name, b in books.items() if not queues.get(name) and not b.retiring
            and b.pending is None for r in b.replicas
            if r.key not in skip and (due := sleep_due(b, r, now)) is not None and now >= due]


def step(books: dict[str, ModelBook], waiters: Sequence[WaiterBook], now: float,
         timeouts: Timeouts = Timeouts()) -> list[Action]:
    """Everything to do now (module docstring), in that order. Grants come first, so a waiter
    that can be served is never refused; refused waiters trigger no start."""
    queues = by_model(waiters)
    out: list[Action] = [*drains(books), *settled(books)]
    granted = grants(books, queues, timeouts.batch_beside)
    out += granted
    done = {g.waiter for g in granted}
    for w in waiters:
        if w.id not in done:
            error = refusal(books.get(w.model), w, now, timeouts)
            if error is not None:
                out.append(Refuse(w.id, error))
                done.add(w.id)
    queues = by_model(w for w in waiters if w.id not in done)
    out += starts(books, queues)
    out += restarts(books, queues, now)
    out += next_placement(books, queues)
    out += launches(books)
    reaped = reap(books, queues, now, (g.replica for g in granted))
    out += reaped
    out += sleeps(books, queues, now, [g.replica for g in granted] + [r.replica for r in reaped])
    return out


def next_wake(books: dict[str, ModelBook], waiters: Sequence[WaiterBook], now: float,
              timeouts: Timeouts = Timeouts()) -> float | None:
    """The earliest clock time at which :func:`step` may decide something new without any
    message arriving (a deadline, a back-off ending, a ttl passing); ``None``: nothing pending."""
    times: list[float] = []
    for w in waiters:
        book = books.get(w.model)
        times.append(w.deadline)
        if book is None:
            continue
        times.append(w.arrived + book.config.queue_timeout)
        if w.room_since is not None:
            times.append(w.room_since + timeouts.place_wait)
    for book in books.values():
        if book.failures and book.error is not None:
            delay = backoff(book, now)
            if delay:
                times.append(now + delay)
        for r in book.replicas:
            if (servable(r) or r.state == ModelState.SLEEPING) and r.leases == 0 and book.config.ttl > 0:
                times.append(r.last_used + book.config.ttl)
            due = sleep_due(book, r, now)
            if due is not None:
                times.append(due)
    future = [t for t in times if t > now]
    return min(future) if future else None


def failure(book: ModelBook, now: float) -> bool:
    """Book one engine failure at ``now``; returns whether the model gives up
    (``lifecycle.MAX_FAILURES`` within the window)."""
    book.failures = [t for t in book.failures if now - t < FAILURE_MEMORY] + [now]
    return backoff(book, now) is None


def backoff(book: ModelBook, now: float) -> float | None:
    """The model's restart delay (``lifecycle.restart_delay``): a model served only by upstreams
    never gives up (an upstream that reboots comes back without ``vramgate load``); any local
    engine keeps the crash-loop limit."""
    return restart_delay(book.failures, now, give_up=book.config.replicas > 0)


def place(books: dict[str, ModelBook], waiting: dict[str, int], key: str, req: Requirement,
          snap: Snapshot, policy: Policy) -> Plan | NoFit:
    """Where replica ``key`` goes on ``snap``, given every other reservation in the books."""
    return plan(req, snap.devices, bookings(books, waiting, exclude=key), policy)
