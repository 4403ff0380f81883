"""The messages the scheduler's owning task handles (``_on_<kind>``, sent with
``Scheduler._send(kind, ...)``): requests from other tasks and reports from the engines' tasks.
Mixed into :class:`server.scheduler.Scheduler`; every method runs in its owning task only."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from server import decisions as d
from server import reconfig
from server.books import ModelBook, ModelState, Phase, ReplicaBook, WaiterBook
from server.errors import ModelUnavailable, VramgateError
from server.gpus import Snapshot
from server.placement import NoFit, Plan, Requirement, fmt, wake_plan
from server.sleep import sleeping_bookings
from server.supervisor import ReadyInfo, failure_error, stop_engine

if TYPE_CHECKING:
    from server.scheduler import Scheduler

log = logging.getLogger("vramgate.pool")


# What a handler returns when it decided everything there was to decide (as ``True``) and no
# timer can be due sooner for it (a lease granted at once, one given back to a still busy engine):
# the scheduler then skips working out its next wake (``Scheduler._settle``).
QUIET = "quiet"


def shutting_down() -> ModelUnavailable:
    return ModelUnavailable("the server is shutting down", retry_after=5)


class Messages:
    """The ``_on_*`` handlers."""

    # ---- from requests and admin -------------------------------------------------------------
    def _on_acquire(self: "Scheduler", wid: int, name: str, priority: int, affinity: str | None,
                    wait: float, fut: asyncio.Future) -> bool:
        """Returns whether the request was answered here (no further decision is needed)."""
        if fut.done():
            return True
        if self.closing:
            fut.set_exception(shutting_down())
            return True
        book = self.books.get(name)
        # Batch waiters never fill the queue for others: they count only against batch requests.
        queued = sum(1 for w in self.waiters.values() if w.model == name and (
            priority >= d.BATCH or w.priority < d.BATCH))
        error = d.admit(book, queued, name)
        if error is not None:
            fut.set_exception(error)
            return True
        now = self.clock()
        waiter = WaiterBook(wid, name, priority, next(self._seq), now, now + wait, affinity)
        self.waiters[wid], self.futures[wid] = waiter, fut
        if not queued:  # nobody waits before it: the decision for this one model is all there is
            granted = d.grants(self.books, {name: [waiter]}, self.settings.batch_beside)
            if granted:
                self._do_grant(granted[0], now)
                return QUIET  # a busier engine: no timer can be due sooner
        if book is not None and book.nofit is not None:
            book.retry = True  # a new request tries the placement again (room may have appeared)
        return False

    def _on_cancel(self: "Scheduler", wid: int) -> None:
        self.waiters.pop(wid, None)
        self.futures.pop(wid, None)

    def _on_release(self: "Scheduler", key: str, run: int, batch: bool = False) -> bool:
        """Returns whether no further decision is needed."""
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.leases <= 0:
            return True  # a lease on an engine that has since stopped or failed
        rep.leases -= 1
        rep.batch_leases = max(0, rep.batch_leases - batch)
        rep.last_used = self.clock()
        if rep.leases == 0:
            self._room_changed()  # an idle engine can be evicted
        # Nothing to decide when nobody waits and nothing drains, waits for room or is reloaded;
        # and while the engine stays busy, no idle timer of its can be due.
        quiet = not self.waiters and not rep.drain and not any(
            b.nofit is not None or b.pending is not None or b.retiring for b in self.books.values())
        return (QUIET if rep.leases else True) if quiet else False

    def _on_preload(self: "Scheduler") -> None:
        for book in self.books.values():
            if book.config.preload:
                self._do_start(d.Start(book.name, tuple(range(len(book.replicas)))), self.clock())

    def _on_load(self: "Scheduler", name: str) -> None:
        book = self.books.get(name)
        if book is None or book.retiring or self.closing:
            return
        book.failures, book.gave_up, book.error, book.nofit = [], False, None, None
        idle = tuple(r.index for r in book.replicas if r.state == ModelState.UNLOADED)
        if idle and not d.busy(book):
            self._do_start(d.Start(name, idle), self.clock())

    def _on_unload(self: "Scheduler", name: str, force: bool, fut: asyncio.Future) -> None:
        book = self.books.get(name)
        if book is None:
            fut.set_result(None)
            return
        for rep in book.replicas:
            self._drain(rep, "unload", force)
        runs = [(r, r.run) for r in book.replicas]  # done once each has stopped (or started anew)
        self._watchers.append((lambda: True if all(
            r.run != run or (r.state == ModelState.UNLOADED and r.phase == Phase.IDLE)
            for r, run in runs) else None, fut))

    def _on_reconfigure(self: "Scheduler", settings: Any, profiles: dict, fut: asyncio.Future) -> None:
        self.settings, self.profiles = settings, profiles
        out = reconfig.apply(self, settings, profiles)
        fut.set_result(out)

    def _on_shutdown(self: "Scheduler") -> None:
        self.closing = True
        for wid in list(self.waiters):
            self._do_refuse(d.Refuse(wid, shutting_down()), self.clock())

    def _on_stop_all(self: "Scheduler", fut: asyncio.Future) -> None:
        self._on_shutdown()
        for book in self.books.values():
            for rep in book.replicas:
                if rep.state != ModelState.UNLOADED or rep.phase != Phase.IDLE:
                    if rep.engine is not None:
                        log.info("stopping engine for %s", rep.key)
                    rep.drain = False
                    self._do_stop(d.Stop(rep.key, "shutdown"), self.clock())

        def all_stopped() -> bool | None:
            if any(r.state != ModelState.UNLOADED for b in self.books.values() for r in b.replicas):
                return None
            self.stopped = True
            return True
        self._watchers.append((all_stopped, fut))

    # ---- from the engines' tasks ---------------------------------------------------------------
    def _on_placed(self: "Scheduler", key: str, run: int, snap: Snapshot, req: Requirement) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.phase != Phase.PLACING or \
                rep.state != ModelState.LOADING or rep.stop_sent:
            return  # stopped or restarted while its inventory was read
        book = self.books[rep.model]
        if rep.asleep:
            self._placed_for_wake(rep, snap)
            return
        result = d.place(self.books, self._waiting(), key, req, snap, self.policy)
        if isinstance(result, NoFit):
            error = ModelUnavailable(f"cannot place {book.name}: {result.reason}", retry_after=10)
            log.warning("%s", error.message)
            for r in book.replicas:
                if r.phase in (Phase.QUEUED, Phase.PLACING):
                    r.state, r.phase = ModelState.UNLOADED, Phase.IDLE
            book.nofit, book.retry = error, False
            for w in self.waiters.values():
                if w.model == book.name and w.room_since is None:
                    w.room_since = self.clock()
            return
        rep.plan, rep.requirement, rep.booked_bytes = result, req, result.bytes_per_device
        book.nofit = None
        self._book_plan(rep, result)
        self._log_placed(rep, result.why)

    def _placed_for_wake(self: "Scheduler", rep: ReplicaBook, snap: Snapshot) -> None:
        """A sleeping replica's wake needs its full budget back on its own devices: booked (with
        idle engines evicted for it), or, when no room can be made there, the sleeping engine
        stops and the model starts anew wherever it fits."""
        assert rep.plan is not None
        result = wake_plan(rep.plan, rep.awake_bytes, snap.devices,
                           d.bookings(self.books, self._waiting(), exclude=rep.key), self.policy)
        if isinstance(result, NoFit):
            log.warning("cannot wake %s on %s: %s; stopping it to start anew", rep.key,
                        "+".join(rep.devices), result.reason)
            rep.state, rep.phase = ModelState.SLEEPING, Phase.IDLE
            self._do_stop(d.Stop(rep.key, "no_room_to_wake"), self.clock())
            return
        rep.booked_bytes = rep.awake_bytes
        self._book_plan(rep, result)
        self._log_placed(rep, f"its wake: {result.why}")

    def _book_plan(self: "Scheduler", rep: ReplicaBook, result: Plan) -> None:
        """``rep`` is booked: it starts once the engines ``result`` evicts have stopped."""
        rep.phase, rep.after = Phase.BOOKED, set(result.evict)
        now = self.clock()
        for victim_key in result.evict:
            victim = self._rep(victim_key)
            if victim is not None:
                log.warning("evicting %s (%s on %s, idle for %.0f s) to place %s: %s", victim.model,
                            fmt(victim.booked_bytes), "+".join(victim.devices),
                            now - victim.last_used, rep.model, result.why)
                self._do_stop(d.Stop(victim_key, "evicted"), now)

    def _on_place_error(self: "Scheduler", key: str, run: int, exc: Exception) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.phase != Phase.PLACING:
            return
        log.error("could not place %s: %s: %s", key, exc.__class__.__name__, exc)
        book = self.books[rep.model]
        if rep.asleep:  # its process runs: it goes, and its end is booked as a failure
            self._end_as_failure(rep, f"could not be placed for its wake ({exc})")
            return
        self._failed(book, rep, ModelUnavailable(
            f"vramgate could not run {book.name}: {exc.__class__.__name__}: {exc}", retry_after=30))

    def _on_ready(self: "Scheduler", key: str, run: int, info: ReadyInfo) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.phase != Phase.STARTING or rep.stop_sent:
            return
        book = self.books[rep.model]
        now = self.clock()
        rep.state, rep.phase = ModelState.READY, Phase.IDLE
        rep.load_seconds, rep.max_model_len = info.load_seconds, info.max_model_len
        rep.ready_since = rep.last_used = now
        if info.measured_bytes:
            log.info("%s measured at %s per device (share %s)", key, fmt(info.measured_bytes),
                     fmt(rep.plan.bytes_per_device) if rep.plan else "-")
            rep.measured_bytes = rep.booked_bytes = info.measured_bytes
        if info.profile is not None:
            book.profile = reconfig.adopt(book, info.profile)
        book.error, book.gave_up = None, False
        self.events.engine_ready(book.name, info.load_seconds)
        log.info("engine for %s ready on %s in %.1f s", key, rep.engine.address, info.load_seconds)

    def _on_start_failed(self: "Scheduler", key: str, run: int, error: VramgateError) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.stop_sent:
            return
        log.error("engine for %s failed to start: %s", key, error.message)
        self.runners.pop(key, None)
        self._failed(self.books[rep.model], rep, error)

    def _on_slept(self: "Scheduler", key: str, run: int, seconds: float,
                  measured: int | None) -> None:
        rep = self._falling_asleep(key, run)
        if rep is None:
            return  # stopped (or failed) meanwhile
        config = self.books[rep.model].config
        weights = rep.requirement.weight_bytes if rep.requirement else None
        rep.awake_bytes = rep.booked_bytes
        rep.booked_bytes, rep.host_bytes = sleeping_bookings(rep.awake_bytes, measured, weights,
                                                             config.sleep_level)
        rep.phase, rep.asleep = Phase.IDLE, True
        log.info("%s sleeps (level %d, %.1f s): booked %s per device (was %s), %s of host RAM", key,
                 config.sleep_level, seconds, fmt(rep.booked_bytes), fmt(rep.awake_bytes),
                 fmt(rep.host_bytes))
        self.events.engine_slept(rep.model)
        self._room_changed()

    def _on_sleep_failed(self: "Scheduler", key: str, run: int, why: str) -> None:
        rep = self._falling_asleep(key, run)
        if rep is not None:
            self._end_as_failure(rep, f"failed to sleep ({why})")

    def _on_woke(self: "Scheduler", key: str, run: int, seconds: float) -> None:
        rep = self._waking(key, run)
        if rep is None:
            return
        rep.state, rep.phase, rep.asleep, rep.host_bytes = ModelState.READY, Phase.IDLE, False, 0
        rep.last_used = self.clock()
        book = self.books[rep.model]
        book.error, book.gave_up = None, False  # it serves again, as after a start
        log.info("%s woke in %.2f s", key, seconds)
        self.events.engine_woke(rep.model, seconds)

    def _on_wake_failed(self: "Scheduler", key: str, run: int, why: str) -> None:
        rep = self._waking(key, run)
        if rep is not None:
            self._end_as_failure(rep, f"failed to wake ({why})")

    def _falling_asleep(self: "Scheduler", key: str, run: int) -> ReplicaBook | None:
        """Replica ``key`` if its ``/sleep`` call of run ``run`` is still what it waits for."""
        rep = self._rep(key)
        ok = rep is not None and rep.run == run and rep.state == ModelState.SLEEPING and \
            rep.phase == Phase.FALLING_ASLEEP
        return rep if ok else None

    def _waking(self: "Scheduler", key: str, run: int) -> ReplicaBook | None:
        """Replica ``key`` if its wake of run ``run`` is still under way."""
        rep = self._rep(key)
        ok = rep is not None and rep.run == run and rep.asleep and rep.phase == Phase.STARTING \
            and not rep.stop_sent
        return rep if ok else None

    def _end_as_failure(self: "Scheduler", rep: ReplicaBook, why: str) -> None:
        """Stop ``rep``'s engine, its end booked as a failure (a crash): nothing more is granted on
        it, and "exited" follows once it is gone."""
        log.error("engine for %s %s", rep.key, why)
        rep.state = ModelState.STOPPING  # no more grants; not stop_sent: its end is a failure
        engine, runner, key, run = rep.engine, self.runners.pop(rep.key, None), rep.key, rep.run

        async def end() -> None:
            await stop_engine(engine, runner)
            self._send("exited", key, run, why)
        self._spawn(end(), f"end:{key}")

    def _on_exited(self: "Scheduler", key: str, run: int, reason: str) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.stop_sent or rep.state == ModelState.UNLOADED:
            return  # we stopped it ("stopped" follows), or its end is booked already
        log.error("engine for %s %s", key, reason)
        self.runners.pop(key, None)
        book = self.books[rep.model]
        self._failed(book, rep, failure_error(book.name, reason, getattr(rep.engine, "log_path", None)))

    def _on_unreachable(self: "Scheduler", key: str, run: int, why: str) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run or rep.state != ModelState.READY or rep.stop_sent:
            return  # stale, or already on its way out
        self._end_as_failure(rep, f"could not be reached ({why})")

    def _on_stopped(self: "Scheduler", key: str, run: int) -> None:
        rep = self._rep(key)
        if rep is None or rep.run != run:
            return
        self._clear(rep)
        rep.stop_sent = False
        for book in self.books.values():
            for r in book.replicas:
                r.after.discard(key)
        self._room_changed()

    # ---- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _clear(rep: ReplicaBook) -> None:
        rep.state, rep.phase, rep.plan, rep.requirement = ModelState.UNLOADED, Phase.IDLE, None, None
        rep.booked_bytes, rep.measured_bytes, rep.ready_since, rep.engine = 0, None, None, None
        rep.leases, rep.batch_leases, rep.drain = 0, 0, False
        rep.sleepable, rep.asleep, rep.awake_bytes, rep.host_bytes = False, False, 0, 0

    def _failed(self: "Scheduler", book: ModelBook, rep: ReplicaBook, error: VramgateError) -> None:
        """Book an engine failure: reservation returned, back-off or give up."""
        self._clear(rep)
        rep.crashed = True
        self.events.engine_failed(book.name)
        book.error = error
        if d.failure(book, self.clock()):
            book.gave_up = True
            log.error("%s failed %d times: giving up until it is loaded by hand", book.name,
                      len(book.failures))
        self._room_changed()
