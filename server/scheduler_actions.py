"""How the scheduler carries out the decisions' actions (``server.decisions``): the part of the
owning task that writes the books and spawns the effects. Mixed into
:class:`server.scheduler.Scheduler`; every method runs in its owning task only."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from server import decisions as d
from server.books import Lease, ModelState, Phase, ReplicaBook
from server.engines import cpu_binding, cpu_list, engine_launch, free_port, sleeps
from server.localsock import new_socket
from server.placement import fmt
from server.remote import RemoteEngine
from server.sleep import sleep_engine, wake_engine
from server.supervisor import MARK, RunContext, placement_inputs, read_snapshot, run_engine, stop_engine

if TYPE_CHECKING:
    from server.scheduler import Scheduler

log = logging.getLogger("vramgate.pool")


class Actions:
    """The ``_do_*`` methods, one per action type; each takes the action and ``now``."""

    def _do_grant(self: "Scheduler", a: d.Grant, now: float) -> None:
        waiter = self.waiters.pop(a.waiter, None)
        fut = self.futures.pop(a.waiter, None)
        rep = self._rep(a.replica)
        if fut is None or fut.done():
            return  # withdrawn meanwhile
        if rep is None or not d.servable(rep):  # stopped by an action of the same step
            self.waiters[a.waiter], self.futures[a.waiter] = waiter, fut
            return
        rep.leases += 1
        batch = waiter is not None and waiter.priority >= d.BATCH
        rep.batch_leases += batch
        eng = rep.engine
        fut.set_result(Lease(self._send, rep.key, rep.run, eng.base_url, rep.max_model_len, batch,
                             eng.headers, eng.served_name))

    def _do_refuse(self: "Scheduler", a: d.Refuse, now: float) -> None:
        self.waiters.pop(a.waiter, None)
        fut = self.futures.pop(a.waiter, None)
        if fut is not None and not fut.done():
            fut.set_exception(a.error)

    def _do_start(self: "Scheduler", a: d.Start, now: float) -> None:
        book = self.books[a.model]
        book.retry = False
        for i in a.indices:
            rep = book.replicas[i]
            rep.run += 1
            rep.state, rep.phase, rep.crashed = ModelState.LOADING, Phase.QUEUED, False
            rep.ready_since, rep.drain, rep.stop_sent = None, False, False
            rep.loading_since = now

    def _do_place(self: "Scheduler", a: d.Place, now: float) -> None:
        rep = self._rep(a.replica)
        if rep is None or rep.phase != Phase.QUEUED or rep.state != ModelState.LOADING:
            return
        rep.phase = Phase.PLACING
        model, run, usages = self.books[rep.model].config, rep.run, self._usages()

        async def place() -> None:
            try:
                snap, req = await self.offload(placement_inputs, self.inventory, usages, model,
                                               self.settings, rep.index)
            except Exception as exc:  # an odd model folder, a driver error: the model fails
                self._send("place_error", rep.key, run, exc)
            else:
                self._send("placed", rep.key, run, snap, req)
        self._spawn(place(), f"place:{rep.key}")

    def _do_launch(self: "Scheduler", a: d.Launch, now: float) -> None:
        rep = self._rep(a.replica)
        if rep is None or rep.phase != Phase.BOOKED or rep.state != ModelState.LOADING or \
                rep.plan is None:
            return
        book = self.books[rep.model]
        rep.phase = Phase.STARTING
        if rep.asleep:
            self._send_wake(rep)
            return
        engine, what = self._engine_for(book.config, rep)
        rep.engine, run, key = engine, rep.run, rep.key
        log.info("starting engine for %s: %s", key, what)
        self.starts += 1
        self.events.engine_started(rep.model)
        measure = None
        if any(dev.startswith("cuda:") for dev in rep.plan.devices):
            async def measure() -> int | None:
                return await self._measure(rep, healthy=True)
        ctx = RunContext(book.config, self.http, self.health_interval, measure,
                         reread_profile=book.profile.files.folder is None, offload=self.offload)
        self.runners[key] = self._spawn(run_engine(
            engine, ctx, ready=lambda info: self._send("ready", key, run, info),
            failed=lambda err: self._send("start_failed", key, run, err),
            exited=lambda why: self._send("exited", key, run, why)), f"engine:{key}")

    def _engine_for(self: "Scheduler", model: Any, rep: ReplicaBook) -> tuple[Any, str]:
        """The engine for placed replica ``rep`` and what it is, for the log: an upstream's URL,
        or the command line of a local engine process (from the launcher)."""
        upstream = model.upstream(rep.index)
        if upstream is not None:
            return RemoteEngine(rep.key, upstream, model.name), f"the upstream {upstream.url}"
        placed = rep.plan
        assert placed is not None
        kind = "cpu" if placed.devices == ("cpu",) else "cuda"
        rep.sleepable = sleeps(model, kind)
        cores = cpu_binding(self.settings.models, cpu_list()).get(rep.key) if kind == "cpu" else None
        uds = (str(new_socket(self.socket_dir)) if self.socket_dir is not None
               and self.settings.engine_transport == "unix" else None)
        launch = engine_launch(
            model, port=0 if uds else free_port(), uds=uds, device=kind,
            python=self.settings.engine_python or sys.executable,
            module=self.settings.engine_module,
            kv_cache_bytes=rep.requirement.kv_cache_bytes if rep.requirement else None,
            gpu_memory_utilization=placed.gpu_memory_utilization,
            tensor_parallel_size=placed.tensor_parallel_size, cuda_devices=placed.cuda_indices,
            tool_parser=self.books[rep.model].profile.tool_parser, cpu_cores=cores)
        if self.records is not None:
            launch.env[MARK] = self.records.instance
        name = model.name if model.replicas == 1 else rep.key.replace("#", "-")
        return self.launcher(name, launch, self.settings), " ".join(launch.argv)

    def _do_stop(self: "Scheduler", a: d.Stop, now: float) -> None:
        rep = self._rep(a.replica)
        if rep is None or rep.stop_sent:
            return
        rep.stop_sent, rep.drain, rep.state = True, False, ModelState.STOPPING
        engine, runner, run = rep.engine, self.runners.pop(rep.key, None), rep.run
        if engine is None and runner is None:  # queued, being placed or booked: nothing runs
            self._on_stopped(rep.key, run)
            return
        if a.reason in ("idle", "evicted"):
            log.info("unloading %s (%s): idle for %.0f s", rep.key, a.reason, now - rep.last_used)
        self.events.engine_stopped(rep.model, a.reason)

        async def stop() -> None:
            try:
                await stop_engine(engine, runner)
            finally:
                self._send("stopped", rep.key, run)
        self._spawn(stop(), f"stop:{rep.key}")

    def _do_sleep(self: "Scheduler", a: d.Sleep, now: float) -> None:
        rep = self._rep(a.replica)
        if rep is None or not d.servable(rep) or rep.leases or rep.phase != Phase.IDLE:
            return
        level, engine, run, key = self.books[rep.model].config.sleep_level, rep.engine, rep.run, rep.key
        rep.state, rep.phase = ModelState.SLEEPING, Phase.FALLING_ASLEEP
        log.info("putting %s to sleep (level %d): idle for %.0f s", key, level, now - rep.last_used)
        measure = self.inventory.source == "nvml"  # a simulated GPU has nothing to measure

        async def fall_asleep() -> None:
            try:
                seconds = await sleep_engine(self.http, engine, level)
            except Exception as exc:  # the engine's state is unknown now: it goes, as a failure
                self._send("sleep_failed", key, run, str(exc))
                return
            measured = None
            try:
                measured = await self._measure(rep) if measure else None
            except Exception as exc:  # the default figure stays in the books
                log.warning("could not measure %s asleep: %s", key, exc)
            self._send("slept", key, run, seconds, measured)
        self._spawn(fall_asleep(), f"sleep:{key}")

    async def _measure(self: "Scheduler", rep: ReplicaBook, healthy: bool = False) -> int | None:
        """What NVML shows ``rep``'s engine using per device (bytes), or ``None``. Only its own
        process tree is read: the inventory's figures are per model, and a sibling replica's
        must not count as its own."""
        pid = getattr(rep.engine, "pid", None)
        mine = [u for u in self._usages(rep.key if healthy else None) if u.pid == pid]
        snap = await self.offload(read_snapshot, self.inventory, mine, self.settings.cpu_memory_budget)
        return snap.measured.get(rep.model)

    def _do_wake(self: "Scheduler", a: d.Wake, now: float) -> None:
        """Queue the sleeping replicas for a placement on their own devices (``_on_placed``)."""
        book = self.books[a.model]
        for i in a.indices:
            rep = book.replicas[i]
            if rep.state == ModelState.SLEEPING and rep.phase == Phase.IDLE:
                rep.state, rep.phase, rep.loading_since = ModelState.LOADING, Phase.QUEUED, now

    def _send_wake(self: "Scheduler", rep: ReplicaBook) -> None:
        """Send the wake of placed, sleeping replica ``rep``; its answer comes back as a message."""
        model, engine, run, key = self.books[rep.model].config, rep.engine, rep.run, rep.key
        log.info("waking %s (level %d)", key, model.sleep_level)

        async def wake() -> None:
            try:
                seconds = await wake_engine(self.http, engine, model.sleep_level, model.startup_timeout)
            except Exception as exc:
                self._send("wake_failed", key, run, str(exc))
            else:
                self._send("woke", key, run, seconds)
        self._spawn(wake(), f"wake:{key}")

    def _drain(self: "Scheduler", rep: ReplicaBook, reason: str, force: bool = False) -> None:
        """Mark ``rep`` to stop once its requests end (at once with ``force``)."""
        if rep.state in (ModelState.READY, ModelState.LOADING, ModelState.SLEEPING):
            rep.drain, rep.stop_reason, rep.state = True, reason, ModelState.STOPPING
        if force and rep.state == ModelState.STOPPING and not rep.stop_sent:
            self._do_stop(d.Stop(rep.key, reason), self.clock())

    def _do_forget(self: "Scheduler", a: d.Forget, now: float) -> None:
        self.books.pop(a.model, None)

    def _do_apply(self: "Scheduler", a: d.Apply, now: float) -> None:
        book = self.books[a.model]
        assert book.pending is not None
        config, again = book.pending, book.restart
        self.books[a.model] = self._book(config)
        if again or config.preload:
            self._do_start(d.Start(config.name, tuple(range(config.engines))), now)

    def _log_placed(self: "Scheduler", rep: ReplicaBook, why: str) -> None:
        log.info("placed %s on %s (%s): %s", rep.key, "+".join(rep.devices), fmt(rep.booked_bytes),
                 why)
