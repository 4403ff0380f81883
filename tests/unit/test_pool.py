"""The model pool driven with a recording fake engine, a fake inventory and a fixed clock:
no processes, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from server.config import ModelConfig, Settings
from server.errors import EngineStartError, ModelUnavailable
from server.gpus import Snapshot
from server.lifecycle import MAX_FAILURES
from server.placement import Device
from server.pool import ModelPool, ModelState

GiB = 2**30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Records what the pool does to it; ``crash()`` makes it exit."""

    def __init__(self, name, launch, log, fail: bool) -> None:
        self.name, self.launch, self.log, self.fail = name, launch, log, fail
        self.log_path = Path("/nonexistent.log")
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pid = 4242

    @property
    def returncode(self):
        return self.exited.result() if self.exited.done() else None

    async def start(self):
        self.log.append(("start", self.name))

    async def wait_healthy(self, timeout, client):
        if self.fail:
            self.exited.set_result(3)
            raise EngineStartError(f"engine for {self.name} exited with status 3", log_tail="OOM")
        return 0.0

    async def wait(self):
        return await asyncio.shield(self.exited)

    async def stop(self):
        if not self.exited.done():
            self.log.append(("stop", self.name))
            self.exited.set_result(-15)

    def crash(self):
        self.exited.set_result(139)


class FakeInventory:
    source = "fake"

    def __init__(self, ram: int = 64 * GiB) -> None:
        self.ram = ram

    def snapshot(self, engines=()):
        return Snapshot((Device("cpu", "cpu", self.ram, self.ram),), {})


def make_pool(models, *, fail=(), **settings):
    log: list[tuple[str, str]] = []
    engines: dict[str, FakeEngine] = {}

    def launcher(name, launch, s):
        engines[name] = FakeEngine(name, launch, log, name in fail)
        return engines[name]

    s = Settings(models=tuple(models), **settings)
    clock = Clock()
    pool = ModelPool(s, FakeInventory(), launcher=launcher, clock=clock, health_interval=1e9,
                     reap_interval=1e9)
    return pool, clock, log, engines


def model(name, **kw):
    return ModelConfig(name=name, path=f"/nonexistent/{name}", memory_bytes=GiB, **kw)


def run(coro):
    return asyncio.run(coro)


async def until(cond, limit: float = 2.0) -> None:
    """Wait for ``cond()``: the pool reads the inventory in a worker thread, so a few real
    milliseconds may pass (the pool's own clock does not move)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every ready task run until it blocks again (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_single_flight_start_for_concurrent_requests():
    async def go():
        pool, _, log, _ = make_pool([model("a")])
        pool.start()
        assert pool.entries["a"].state == ModelState.UNLOADED  # not preloaded: nothing started
        leases = await asyncio.gather(*(pool.acquire("a") for _ in range(8)))
        assert log.count(("start", "a")) == 1
        assert pool.entries["a"].in_flight == 8
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        assert pool.entries["a"].in_flight == 0
        await pool.stop_all()
        assert log[-1] == ("stop", "a")
    run(go())


def test_ttl_counts_from_the_end_of_the_last_request():
    async def go():
        pool, clock, log, _ = make_pool([model("a", ttl=60)])
        lease = await pool.acquire("a")
        clock.now += 600  # a long request: never unloaded while it runs
        assert await pool.reap() == []
        lease.release()  # last_used = now
        clock.now += 59
        assert await pool.reap() == []
        clock.now += 1
        assert await pool.reap() == ["a#0"]
        assert pool.entries["a"].state == ModelState.UNLOADED and ("stop", "a") in log
        await pool.acquire("a")  # the next request loads it again
        assert log.count(("start", "a")) == 2
        await pool.stop_all()
    run(go())


def test_ttl_zero_never_unloads_and_waiting_requests_block_unload():
    async def go():
        pool, clock, _, _ = make_pool([model("a", ttl=0)])
        (await pool.acquire("a")).release()
        clock.now += 10**6
        assert await pool.reap() == []
        await pool.stop_all()
    run(go())


def test_requests_go_to_the_replica_with_fewest_in_flight():
    async def go():
        pool, _, log, _ = make_pool([model("a", replicas=2)])
        first = await pool.acquire("a")
        await until(lambda: all(r.state == ModelState.READY for r in pool.entries["a"].replicas))
        assert [r.state for r in pool.entries["a"].replicas] == [ModelState.READY] * 2
        second = await pool.acquire("a")
        assert {first.replica.index, second.replica.index} == {0, 1}
        assert log.count(("start", "a-0")) == 1 and log.count(("start", "a-1")) == 1
        third = await pool.acquire("a")
        second.release()
        fourth = await pool.acquire("a")
        assert fourth.replica is second.replica  # the one with nothing in flight now
        assert third.replica is not fourth.replica or first.replica is fourth.replica
        await pool.stop_all()
    run(go())


def test_crash_backs_off_then_restarts_then_gives_up():
    async def go():
        pool, clock, log, engines = make_pool([model("a")])
        lease = await pool.acquire("a")
        engines["a"].crash()
        await settle()  # the owning task sees the exit
        entry = pool.entries["a"]
        assert entry.state == ModelState.FAILED and "exited with status 139" in entry.error.message
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
        assert entry.gave_up and entry.state == ModelState.FAILED
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
        assert ("stop", "a") in log and pool.entries["a"].state == ModelState.UNLOADED
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
        assert not task.done() and pool.entries["a"].state == ModelState.STOPPING
        lease.release()
        await task
        assert ("stop", "a") in log and pool.entries["a"].state == ModelState.UNLOADED
        lease = await pool.acquire("a")
        await pool.unload("a", force=True)
        assert log.count(("stop", "a")) == 2
        await pool.stop_all()
    run(go())


def test_reconfigure_adds_removes_and_restarts():
    async def go():
        pool, _, log, _ = make_pool([model("a"), model("b")])
        (await pool.acquire("a")).release()
        (await pool.acquire("b")).release()
        new = replace(pool.settings, models=(model("a", ttl=5), model("c", preload=True)))
        changes = await pool.reconfigure(new)
        assert changes == {"added": ["c"], "removed": ["b"], "changed": ["a"]}
        await until(lambda: "b" not in pool.entries and log.count(("start", "a")) == 2
                    and ("start", "c") in log)
        assert "b" not in pool.entries and ("stop", "b") in log
        assert pool.entries["a"].config.ttl == 5 and log.count(("start", "a")) == 2
        assert ("start", "c") in log
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
        pool, _, log, engines = make_pool([model("a")])
        gate = asyncio.Event()
        original = FakeEngine.wait_healthy

        async def slow_healthy(self, timeout, client):
            await gate.wait()
            return await original(self, timeout, client)

        FakeEngine.wait_healthy = slow_healthy
        try:
            waiter = asyncio.create_task(pool.acquire("a"))
            await until(lambda: "a" in engines)
            await pool.unload("a")
            entry = pool.entries["a"]
            assert entry.failures == [] and entry.error is None
            assert ("stop", "a") in log
            gate.set()
            lease = await asyncio.wait_for(waiter, 5)  # the waiter loads it again
            assert log.count(("start", "a")) == 2
            lease.release()
        finally:
            FakeEngine.wait_healthy = original
        await pool.stop_all()
    run(go())


def test_quick_successive_reloads_apply_the_latest_configuration_once():
    async def go():
        pool, _, log, engines = make_pool([model("a")])
        lease = await pool.acquire("a")  # in flight: changes wait for it
        base = pool.settings
        await pool.reconfigure(replace(base, models=()))                 # removed ...
        assert (await pool.reconfigure(base))["added"] == ["a"]         # ... and back at once
        await pool.reconfigure(replace(base, models=(model("a", ttl=100),)))
        await pool.reconfigure(replace(base, models=(model("a", ttl=200),)))
        lease.release()
        await until(lambda: pool.entries["a"].config.ttl == 200)
        await settle()
        assert list(pool.entries) == ["a"]
        running = [r for r in pool.entries["a"].replicas if r.state != ModelState.UNLOADED]
        assert len(running) <= 1
        assert (await pool.reconfigure(replace(base, models=(model("a", ttl=200),)))) == {
            "added": [], "removed": [], "changed": []}
        await pool.stop_all()
    run(go())
