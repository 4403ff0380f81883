"""The scheduler driven with a recording fake engine, a fake inventory, a fixed clock and the
blocking reads run inline: no processes, no sockets, no threads, no sleeps. ``settle()`` lets the
scheduler's task (and the engines' tasks) run until all of them wait again; no time passes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import pytest

from server.books import ModelState
from server.config import ModelConfig, Settings
from server.errors import EngineStartError, ModelUnavailable
from server.gpus import Snapshot
from server.lifecycle import MAX_FAILURES
from server.placement import Device
from server.scheduler import Scheduler

GiB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Records what the scheduler does to it; ``crash()`` makes it exit; ``hold`` (an Event)
    keeps it starting until set."""

    hold: asyncio.Event | None = None
    headers: dict = {}
    served_name = None

    def __init__(self, name, launch, log, fail: bool) -> None:
        self.name, self.launch, self.log, self.fail = name, launch, log, fail
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pid = None

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    @property
    def address(self) -> str:
        return self.launch.address

    @property
    def health_url(self) -> str:
        return self.launch.base_url + "/health"

    async def start(self):
        self.log.append(("start", self.name))

    async def ready(self, timeout, client):
        if FakeEngine.hold is not None:
            await FakeEngine.hold.wait()
        if self.fail:
            self.gone.set_result("exited with status 3")
            raise EngineStartError(f"engine for {self.name} exited with status 3", log_tail="OOM")
        return 0.0

    async def exited(self):
        return await asyncio.shield(self.gone)

    async def stop(self):
        if not self.gone.done():
            self.log.append(("stop", self.name))
            self.gone.set_result("stopped")

    def crash(self):
        self.gone.set_result("exited with status 139")


class FakeInventory:
    source = "fake"

    def __init__(self, ram: int = 64 * GiB) -> None:
        self.ram = ram

    def snapshot(self, engines=()):
        return Snapshot((Device("cpu", "cpu", self.ram, self.ram),), {})


async def inline(fn, *args):
    return fn(*args)


class NoHttp:
    """The scheduler's HTTP session (health checks, model cards): every call fails at once, with
    no I/O, so nothing in these tests waits on a socket."""

    def get(self, *args, **kwargs):
        raise aiohttp.ClientConnectionError("no HTTP in the scheduler's unit tests")


def make_pool(models, *, fail=(), **settings):
    log: list[tuple[str, str]] = []
    engines: dict[str, FakeEngine] = {}

    def launcher(name, launch, s):
        engines[name] = FakeEngine(name, launch, log, name in fail)
        return engines[name]

    s = Settings(models=tuple(models), **settings)
    clock = Clock()
    pool = Scheduler(s, FakeInventory(), launcher=launcher, clock=clock, health_interval=1e9,
                     reap_interval=1e9, offload=inline, session=NoHttp())
    pool.start()
    return pool, clock, log, engines


def model(name, **kw):
    return ModelConfig(name=name, path=f"/nonexistent/{name}", memory_bytes=GiB, **kw)


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    """Let every ready task run until it blocks again (no time passes)."""
    for _ in range(100):
        await asyncio.sleep(0)


async def tick(pool, clock, seconds: float) -> None:
    """Move the clock on, ring the scheduler's timer (as the real one would once the time is
    due) and let it decide what that changes."""
    clock.now += seconds
    pool._ring()
    await settle()


def state(pool, name):
    return pool.models()[name].state


def test_single_flight_start_for_concurrent_requests():
    async def go():
        pool, _, log, _ = make_pool([model("a")])
        await settle()
        assert state(pool, "a") == ModelState.UNLOADED  # not preloaded: nothing started
        leases = await asyncio.gather(*(pool.acquire("a") for _ in range(8)))
        assert log.count(("start", "a")) == 1
        assert pool.models()["a"].in_flight == 8
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        await settle()
        assert pool.models()["a"].in_flight == 0
        await pool.stop_all()
        assert log[-1] == ("stop", "a")
    run(go())


def test_ttl_counts_from_the_end_of_the_last_request():
    async def go():
        pool, clock, log, _ = make_pool([model("a", ttl=60)])
        lease = await pool.acquire("a")
        await tick(pool, clock, 600)  # a long request: never unloaded while it runs
        assert state(pool, "a") == ModelState.READY
        lease.release()  # last_used = now
        await settle()
        await tick(pool, clock, 59)
        assert state(pool, "a") == ModelState.READY
        await tick(pool, clock, 1)
        assert state(pool, "a") == ModelState.UNLOADED and ("stop", "a") in log
        await pool.acquire("a")  # the next request loads it again
        assert log.count(("start", "a")) == 2
        await pool.stop_all()
    run(go())


def test_ttl_zero_never_unloads():
    async def go():
        pool, clock, _, _ = make_pool([model("a", ttl=0)])
        (await pool.acquire("a")).release()
        await tick(pool, clock, 10**6)
        assert state(pool, "a") == ModelState.READY
        await pool.stop_all()
    run(go())


def test_requests_go_to_the_replica_with_fewest_in_flight():
    async def go():
        pool, _, log, _ = make_pool([model("a", replicas=2)])
        first = await pool.acquire("a")
        await settle()
        assert [r.state for r in pool.models()["a"].replicas] == [ModelState.READY] * 2
        second = await pool.acquire("a")
        assert {first.key, second.key} == {"a#0", "a#1"}
        assert log.count(("start", "a-0")) == 1 and log.count(("start", "a-1")) == 1
        await pool.acquire("a")
        second.release()
        fourth = await pool.acquire("a")
        assert fourth.key == second.key  # the one with the fewest in flight now
        await pool.stop_all()
    run(go())


def test_crash_backs_off_then_restarts_then_gives_up():
    async def go():
        pool, clock, log, engines = make_pool([model("a")])
        lease = await pool.acquire("a")
        engines["a"].crash()
        await settle()  # the scheduler sees the exit
        view = pool.models()["a"]
        assert view.state == ModelState.FAILED and "exited with status 139" in view.error.message
        lease.release()
        with pytest.raises(ModelUnavailable) as info:  # within the 2 s back-off: no restart
            await pool.acquire("a")
        assert info.value.retry_after == pytest.approx(2)
        assert log.count(("start", "a")) == 1
        clock.now += 2
        (await pool.acquire("a")).release()  # restarted
        assert log.count(("start", "a")) == 2
        for n in range(2, MAX_FAILURES + 1):
            engines["a"].crash()
            await settle()
            clock.now += 70  # past the back-off (2, 4, 8, 16 s), inside the 600 s window
            if n < MAX_FAILURES:
                (await pool.acquire("a")).release()
        assert pool.books["a"].gave_up and state(pool, "a") == ModelState.FAILED
        with pytest.raises(ModelUnavailable):
            await pool.acquire("a")
        starts = log.count(("start", "a"))
        assert await pool.load("a") == ModelState.READY  # by hand: tried again
        assert log.count(("start", "a")) == starts + 1
        await pool.stop_all()
    run(go())


def test_failed_start_returns_the_reservation_and_names_the_cause():
    async def go():
        pool, _, _, _ = make_pool([model("a")], fail={"a"})
        with pytest.raises(ModelUnavailable) as info:
            await pool.acquire("a")
        assert "OOM" in info.value.message and info.value.status == 503
        assert info.value.code == "engine_start_failed" and info.value.retry_after
        assert pool.bookings() == ()
        await pool.stop_all()
    run(go())


def test_max_loaded_models_evicts_the_least_recently_used_idle_engine():
    async def go():
        pool, clock, log, _ = make_pool([model("a"), model("b"), model("c", pinned=True)],
                                        max_loaded_models=2, place_wait_timeout=0)
        (await pool.acquire("a")).release()
        clock.now += 1
        busy = await pool.acquire("b")
        clock.now += 1
        (await pool.acquire("c")).release()  # a was idle longest
        assert ("stop", "a") in log and state(pool, "a") == ModelState.UNLOADED
        with pytest.raises(ModelUnavailable) as info:  # b is busy and c is pinned
            await pool.acquire("a")
        assert "max_loaded_models=2" in info.value.message
        busy.release()
        (await pool.acquire("a")).release()  # now b is idle: evicted
        assert ("stop", "b") in log
        await pool.stop_all()
    run(go())


def test_unload_waits_for_in_flight_work_unless_forced():
    async def go():
        pool, _, log, _ = make_pool([model("a")])
        lease = await pool.acquire("a")
        task = asyncio.create_task(pool.unload("a"))
        await settle()
        assert not task.done() and state(pool, "a") == ModelState.STOPPING
        lease.release()
        await task
        assert ("stop", "a") in log and state(pool, "a") == ModelState.UNLOADED
        lease = await pool.acquire("a")
        await pool.unload("a", force=True)
        assert log.count(("stop", "a")) == 2
        await pool.stop_all()
    run(go())


def test_reconfigure_adds_removes_restarts_and_applies_limits_live():
    async def go():
        pool, _, log, _ = make_pool([model("a"), model("b"), model("d")])
        for name in "abd":
            (await pool.acquire(name)).release()
        new = replace(pool.settings, models=(model("a", ttl=5), model("c", preload=True),
                                             model("d", engine_args=("--seed", "1"))))
        changes = await pool.reconfigure(new)
        assert changes == {"added": ["c"], "removed": ["b"], "changed": ["a", "d"]}
        await settle()
        assert "b" not in pool.models() and ("stop", "b") in log
        assert pool.models()["a"].config.ttl == 5 and log.count(("start", "a")) == 1  # live
        assert log.count(("start", "d")) == 2 and ("start", "c") in log  # restarted, preloaded
        await pool.stop_all()
    run(go())


@pytest.mark.parametrize("config", ['{"num_attention_heads": "x"}',
                                    '{"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 64}',
                                    '[1, 2]', '{"text_config": 5}'])
def test_odd_model_config_never_leaves_a_model_loading(tmp_path, config):
    (tmp_path / "config.json").write_text(config)

    async def go():
        pool, _, log, _ = make_pool([ModelConfig(name="m", path=str(tmp_path))])
        lease = await asyncio.wait_for(pool.acquire("m"), 5)  # the estimate falls back, it runs
        lease.release()
        await pool.stop_all()
    run(go())


def test_unloading_a_model_while_it_starts_is_not_a_failure():
    async def go():
        FakeEngine.hold = asyncio.Event()
        try:
            pool, _, log, engines = make_pool([model("a")])
            waiter = asyncio.create_task(pool.acquire("a"))
            await settle()
            assert "a" in engines
            await pool.unload("a")
            book = pool.books["a"]
            assert book.failures == [] and book.error is None
            assert ("stop", "a") in log
            FakeEngine.hold.set()
            lease = await asyncio.wait_for(waiter, 5)  # the waiter loads it again
            assert log.count(("start", "a")) == 2
            lease.release()
            await pool.stop_all()
        finally:
            FakeEngine.hold = None
    run(go())


def test_quick_successive_reloads_apply_the_latest_configuration_once():
    async def go():
        pool, _, log, engines = make_pool([model("a")])
        lease = await pool.acquire("a")  # in flight: changes wait for it
        base = pool.settings
        await pool.reconfigure(replace(base, models=()))                 # removed ...
        assert (await pool.reconfigure(base))["added"] == ["a"]         # ... and back at once
        await pool.reconfigure(replace(base, models=(model("a", engine_args=("--seed", "1")),)))
        await pool.reconfigure(replace(base, models=(model("a", engine_args=("--seed", "2")),)))
        lease.release()
        await settle()
        assert list(pool.models()) == ["a"] and pool.models()["a"].config.engine_args == ("--seed", "2")
        running = [r for r in pool.models()["a"].replicas if r.state != ModelState.UNLOADED]
        assert len(running) <= 1
        assert (await pool.reconfigure(replace(base, models=(model("a", engine_args=("--seed", "2")),)))) == {
            "added": [], "removed": [], "changed": []}
        await pool.stop_all()
    run(go())


def test_a_batch_waiter_never_cold_starts_or_evicts_while_an_interactive_one_waits_for_room():
    async def go():
        # One engine at a time: "held" serves a long request; "chat" (interactive) and "bulk"
        # (batch) both wait for room.
        pool, clock, log, _ = make_pool([model("held"), model("chat"), model("bulk")],
                                        max_loaded_models=1, place_wait_timeout=600)
        busy = await pool.acquire("held")
        chat = asyncio.create_task(pool.acquire("chat", priority=0))
        await settle()
        bulk = asyncio.create_task(pool.acquire("bulk", priority=10))
        await settle()
        assert pool.models()["bulk"].state == ModelState.UNLOADED and ("start", "bulk") not in log
        busy.release()  # room: the interactive waiter gets it, the batch one keeps waiting
        lease = await asyncio.wait_for(chat, 5)
        assert ("stop", "held") in log and ("start", "chat") in log and ("start", "bulk") not in log
        assert not bulk.done()
        lease.release()  # now the batch waiter may evict the idle chat engine
        await asyncio.wait_for(bulk, 5)
        assert log.index(("start", "bulk")) > log.index(("stop", "chat"))
        await pool.stop_all()
    run(go())


def test_waiters_for_a_slot_are_served_by_priority_then_arrival():
    async def go():
        pool, _, _, _ = make_pool([model("a", max_concurrency=1, max_queue=10)])
        first = await pool.acquire("a")
        order: list[str] = []

        async def wait(name, priority):
            lease = await pool.acquire("a", priority=priority)
            order.append(name)
            return lease
        tasks = [asyncio.create_task(wait(n, p)) for n, p in
                 (("batch", 10), ("normal1", 5), ("interactive", 0), ("normal2", 5))]
        await settle()
        assert pool.models()["a"].waiting == 4
        first.release()
        for task in tasks:
            await settle()
            done = [t for t in tasks if t.done() and not t.result().released]
            assert len(done) == 1  # never more than max_concurrency at once
            done[0].result().release()
        assert order == ["interactive", "normal1", "normal2", "batch"]
        await pool.stop_all()
    run(go())


def test_a_reload_that_lowers_max_concurrency_never_lets_more_run():
    async def go():
        pool, _, log, _ = make_pool([model("a", max_concurrency=2)])
        held = [await pool.acquire("a"), await pool.acquire("a")]
        await pool.reconfigure(replace(pool.settings, models=(model("a", max_concurrency=1),)))
        waiters = [asyncio.create_task(pool.acquire("a")) for _ in range(3)]
        await settle()
        assert pool.models()["a"].in_flight == 2 and not any(w.done() for w in waiters)
        held[0].release()
        await settle()
        assert pool.models()["a"].in_flight == 1 and not any(w.done() for w in waiters)
        held[1].release()
        await settle()
        assert pool.models()["a"].in_flight == 1 and sum(w.done() for w in waiters) == 1
        assert log.count(("start", "a")) == 1  # limits apply live: no restart
        for w in waiters:
            (await w).release()
            await settle()
        await pool.stop_all()
    run(go())


def test_a_slow_stopping_evicted_engine_does_not_delay_another_placement():
    async def go():
        pool, _, log, engines = make_pool([model("old"), model("keep"), model("new"),
                                           model("side")], max_loaded_models=2)
        (await pool.acquire("old")).release()
        keep = await pool.acquire("keep")
        never = asyncio.Event()

        async def slow_stop():  # the evicted engine takes its time to go
            log.append(("stopping", "old"))
            await never.wait()
        engines["old"].stop = slow_stop
        new = asyncio.create_task(pool.acquire("new"))  # evicts "old", which is slow to stop
        await settle()
        assert ("stopping", "old") in log and not new.done() and ("start", "new") not in log
        pool.settings = replace(pool.settings, max_loaded_models=4)
        side = await asyncio.wait_for(pool.acquire("side"), 5)  # placed and started meanwhile
        assert ("start", "side") in log and not new.done()
        never.set()
        engines["old"].gone.set_result("stopped")
        (await asyncio.wait_for(new, 5)).release()  # "new" starts once "old" is gone
        assert log.index(("start", "new")) > log.index(("start", "side"))
        side.release()
        keep.release()
        await pool.stop_all()
    run(go())


def test_batch_waiters_neither_fill_the_queue_for_others_nor_time_out_in_it():
    async def go():
        pool, clock, _, _ = make_pool([model("a", max_concurrency=1, max_queue=1, queue_timeout=30)])
        held = await pool.acquire("a")
        batch = [asyncio.create_task(pool.acquire("a", priority=10)) for _ in range(3)]
        await settle()
        refused = [t for t in batch if t.done()]  # batch requests count one another: one place
        waiting = [t for t in batch if not t.done()]
        assert len(waiting) == 1 and {t.exception().code for t in refused} == {"queue_full"}
        interactive = asyncio.create_task(pool.acquire("a", priority=0))  # not refused: a batch
        await settle()                                                      # waiter fills no place
        assert not interactive.done()
        await tick(pool, clock, 31)  # past queue_timeout: the interactive one is refused ...
        assert interactive.done() and interactive.exception().code == "queue_timeout"
        assert not waiting[0].done()  # ... the batch one waits on
        held.release()
        (await asyncio.wait_for(waiting[0], 5)).release()
        await pool.stop_all()
    run(go())


def test_only_what_can_bring_a_timer_forward_works_out_the_next_wake(monkeypatch):
    """A lease granted at once, or given back to an engine still busy, makes no deadline sooner:
    the scheduler skips ``next_wake`` for it. The last release (the engine idles: its ttl
    starts) works it out, and the ttl still unloads the engine."""
    import server.decisions as d
    calls = []
    real = d.next_wake
    monkeypatch.setattr(d, "next_wake", lambda *a: calls.append(1) or real(*a))

    async def go():
        pool, clock, log, _ = make_pool([model("a", ttl=60)])
        first = await pool.acquire("a")  # the load: timers worked out
        await settle()
        calls.clear()
        second = await pool.acquire("a")
        first.release()
        await settle()
        assert calls == []  # granted at once, and given back to a busy engine
        second.release()
        await settle()
        assert calls == [1]
        await tick(pool, clock, 60)
        assert state(pool, "a") == ModelState.UNLOADED and ("stop", "a") in log
        await pool.stop_all()
    run(go())
