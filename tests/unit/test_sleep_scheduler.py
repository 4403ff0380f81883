"""The sleep tier in the scheduler (issue #13 §4): driven with the recording fake engine of
``tests/unit/test_scheduler.py`` on a fake 24 GiB GPU, ``/sleep`` and ``/wake_up`` replaced by
fakes, so each race can be held at the point that matters. Found by a review that tried to break
it; each test failed before its fix."""

from __future__ import annotations

import asyncio

import pytest

from server import decisions as d
from server import scheduler_actions
from server.books import ModelBook, ModelState, Phase, WaiterBook
from server.config import ModelConfig, Settings
from server.gpus import Snapshot
from server.modelfiles import UNKNOWN
from server.placement import Device, Plan
from server.profile import profile
from server.scheduler import Scheduler
from server.sleep import SLEEPING_BYTES
from server.supervisor import placement_inputs
from tests.unit.test_scheduler import Clock, FakeEngine, NoHttp, settle, tick

GiB = 2**30


class GpuInventory:
    source = "fake"

    def snapshot(self, engines=()):
        return Snapshot((Device("cuda:0", "cuda", 24 * GiB, 24 * GiB, index=0),
                         Device("cpu", "cpu", 64 * GiB, 64 * GiB)), {})


class Gate:
    """The offload: runs inline, but a placement read can be held (``hold``) or made to fail."""

    def __init__(self) -> None:
        self.hold: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, fn, *args):
        if fn is placement_inputs:
            if self.hold is not None:
                await self.hold.wait()
            if self.fail:
                raise OSError("the model folder went away")
        return fn(*args)


@pytest.fixture
def fake_sleep(monkeypatch):
    calls = []

    async def sleep_engine(session, engine, level):
        calls.append(("sleep", engine.name))
        return 0.01

    async def wake_engine(session, engine, level, timeout):
        calls.append(("wake", engine.name))
        return 0.01
    monkeypatch.setattr(scheduler_actions, "sleep_engine", sleep_engine)
    monkeypatch.setattr(scheduler_actions, "wake_engine", wake_engine)
    return calls


def make(models, gate=None, **settings):
    log, engines = [], {}

    def launcher(name, launch, s):
        engines[name] = FakeEngine(name, launch, log, False)
        return engines[name]
    s = Settings(models=tuple(models), gpu_headroom_bytes=GiB, **settings)
    clock = Clock()
    pool = Scheduler(s, GpuInventory(), launcher=launcher, clock=clock, health_interval=1e9,
                     reap_interval=1e9, offload=gate or Gate(), session=NoHttp())
    pool.start()
    return pool, clock, log, engines


def sleeper(name, mem=8, **kw):
    return ModelConfig(name=name, path=f"/nonexistent/{name}", memory_bytes=mem * GiB,
                       sleep_after=5, ttl=600, **kw)


def plain(name, mem=8, **kw):
    return ModelConfig(name=name, path=f"/nonexistent/{name}", memory_bytes=mem * GiB, ttl=600, **kw)


def rep(pool, key):
    return pool._rep(key)


async def asleep_model(pool, clock, name="a"):
    lease = await pool.acquire(name)
    lease.release()
    await settle()
    await tick(pool, clock, 6)
    assert rep(pool, f"{name}#0").state == ModelState.SLEEPING, pool.models()[name]
    assert rep(pool, f"{name}#0").asleep


def test_harness_sleep_and_wake(fake_sleep):
    async def main():
        pool, clock, log, engines = make([sleeper("a")])
        await asleep_model(pool, clock)
        lease = await asyncio.wait_for(pool.acquire("a"), 5)
        lease.release()
        assert fake_sleep == [("sleep", "a"), ("wake", "a")]
        assert log == [("start", "a")]
        await pool.stop_all()
    asyncio.run(main())


def test_a_placement_error_during_a_wake_stops_the_sleeping_engine(fake_sleep):
    async def main():
        gate = Gate()
        pool, clock, log, engines = make([sleeper("a")], gate)
        await asleep_model(pool, clock)
        gate.fail = True  # the wake's placement read fails (a driver error, a folder gone)
        with pytest.raises(Exception):
            await asyncio.wait_for(pool.acquire("a"), 5)
        await settle()
        assert rep(pool, "a#0").state == ModelState.UNLOADED
        assert ("stop", "a") in log, "the sleeping engine was forgotten, still running"
        await pool.stop_all()
    asyncio.run(main())


def test_an_unload_while_a_wake_is_being_placed_evicts_nothing(fake_sleep):
    async def main():
        gate = Gate()
        # a: 10 GiB awake, 1.5 asleep; b: 14 GiB. 23 GiB to book: the wake needs b gone.
        pool, clock, log, engines = make([sleeper("a"), plain("b", 12)], gate)
        await asleep_model(pool, clock)
        lease = await pool.acquire("b")
        lease.release()
        await settle()
        assert rep(pool, "b#0").state == ModelState.READY
        slow_stop, real_stop = asyncio.Event(), engines["a"].stop

        async def stop():  # a real engine takes a while to exit after SIGTERM
            await slow_stop.wait()
            await real_stop()
        engines["a"].stop = stop
        gate.hold = asyncio.Event()
        wid, fut = pool.request("a")
        await settle()
        assert rep(pool, "a#0").phase == Phase.PLACING
        unload = asyncio.ensure_future(pool.unload("a"))
        await settle()
        pool.withdraw(wid, fut)  # nobody wants a any more: nothing should start or evict for it
        await settle()
        gate.hold.set()
        await settle()
        slow_stop.set()
        await asyncio.wait_for(unload, 5)
        assert rep(pool, "b#0").state == ModelState.READY, "b evicted for a wake that was unloaded"
        assert ("stop", "b") not in log
        await pool.stop_all()
    asyncio.run(main())


def test_no_wake_that_cannot_serve_the_waiter_and_no_eviction_for_it(fake_sleep):
    async def main():
        pool, clock, log, engines = make([sleeper("a", replicas=2, max_concurrency=1),
                                          plain("b")])
        lease_a = await pool.acquire("a")  # a#0 serves a long stream
        await settle()
        await tick(pool, clock, 6)
        assert rep(pool, "a#1").state == ModelState.SLEEPING  # a#1 idle: it sleeps
        lease_b = await pool.acquire("b")  # b fits beside a#0 and the sleeping a#1
        lease_b.release()
        await settle()
        wid, fut = pool.request("a")  # waits for the one slot a has
        await settle()
        assert not fut.done()
        assert rep(pool, "b#0").state == ModelState.READY, "b evicted for nothing"
        assert rep(pool, "a#1").state == ModelState.SLEEPING, "woken for a waiter it cannot serve"
        lease_a.release()
        await settle()
        (await asyncio.wait_for(fut, 5)).release()  # served by a#0 once the slot is free
        await pool.stop_all()
    asyncio.run(main())


def test_pure_no_wake_while_the_ready_replica_is_at_the_models_limit():
    cfg = ModelConfig(name="a", path="/x", sleep_after=5, ttl=600, replicas=2, max_concurrency=1)
    b = ModelBook(cfg, profile(cfg, UNKNOWN))
    r0, r1 = b.replicas
    for r in (r0, r1):
        r.sleepable, r.last_used = True, 100.0
        r.plan = Plan("a", ("cuda:0",), 1, 10 * GiB, 0.4)
    r0.state, r0.leases = ModelState.READY, 1
    r1.state, r1.asleep, r1.booked_bytes = ModelState.SLEEPING, True, SLEEPING_BYTES
    actions = d.step({"a": b}, [WaiterBook(1, "a", 5, 1, 100.0, 900.0)], now=101.0)
    assert not any(isinstance(a, d.Wake) for a in actions), actions


def test_requests_during_the_sleep_call_wait_then_wake(monkeypatch):
    calls, answered = [], asyncio.Event()

    async def sleep_engine(session, engine, level):
        calls.append("sleep")
        await answered.wait()
        return 0.5

    async def wake_engine(session, engine, level, timeout):
        calls.append("wake")
        return 0.01
    monkeypatch.setattr(scheduler_actions, "sleep_engine", sleep_engine)
    monkeypatch.setattr(scheduler_actions, "wake_engine", wake_engine)

    async def main():
        pool, clock, log, engines = make([sleeper("a")])
        (await pool.acquire("a")).release()
        await settle()
        await tick(pool, clock, 6)
        assert rep(pool, "a#0").phase == Phase.FALLING_ASLEEP
        futs = [pool.request("a")[1] for _ in range(5)]
        await tick(pool, clock, 1)
        assert not any(f.done() for f in futs) and calls == ["sleep"]
        answered.set()
        await settle()
        leases = [await asyncio.wait_for(f, 5) for f in futs]
        assert calls == ["sleep", "wake"] and log == [("start", "a")]
        for lease in leases:
            lease.release()
        await pool.stop_all()
    asyncio.run(main())


def test_a_crashed_sibling_does_not_refuse_requests_a_sleeping_replica_can_serve(fake_sleep):
    """BUG: decisions.refusal counts only READY replicas as able to serve; with the model's
    other replica crashed (back-off running), a request is refused 503 "failed 1 time(s)
    recently; it restarts in 2 s" although its healthy sleeping replica could be woken (with it
    READY instead, the request is served)."""
    async def main():
        pool, clock, log, engines = make([sleeper("a", 4, replicas=2)])
        (await pool.acquire("a")).release()
        await settle()
        await tick(pool, clock, 6)
        assert [r.state for r in pool.books["a"].replicas] == [ModelState.SLEEPING] * 2
        engines["a-1"].crash()  # a#1's process dies while it sleeps
        await settle()
        assert rep(pool, "a#1").state == ModelState.UNLOADED
        lease = await asyncio.wait_for(pool.acquire("a"), 5)  # a#0 could be woken for it
        lease.release()
        await pool.stop_all()
    asyncio.run(main())


def test_a_sleeping_replica_books_its_own_nvml_figure_not_its_awake_siblings(fake_sleep, monkeypatch):
    # NVML's figures are per model (the largest over its engines): with a#0 awake beside it, a#1
    # would be "measured" at a#0's 10 GiB asleep, and its sleep would free nothing in the books.
    per_pid = {100: 10 * GiB, 200: 10 * GiB}

    def read_snapshot(inventory, usages, budget):
        snap = inventory.snapshot()
        return Snapshot(snap.devices, {usages[0].model: max(per_pid[u.pid] for u in usages)} if usages else {})
    monkeypatch.setattr(scheduler_actions, "read_snapshot", read_snapshot)

    async def main():
        pool, clock, log, engines = make([sleeper("a", 4, replicas=2)])
        pool.inventory.source = "nvml"
        lease = await pool.acquire("a")  # a#0 keeps a stream: it stays awake
        await settle()
        engines["a-0"].pid, engines["a-1"].pid = 100, 200
        per_pid[200] = GiB  # a#1 once asleep
        await tick(pool, clock, 6)
        assert rep(pool, "a#1").state == ModelState.SLEEPING
        assert rep(pool, "a#1").booked_bytes == GiB, rep(pool, "a#1").booked_bytes / GiB
        lease.release()
        await pool.stop_all()
    asyncio.run(main())
