"""vLLM's sleep mode as an eviction tier: the pure decisions, placement and figures (issue #13 §4).
The scheduler carrying them out is covered against the stand-in in
``tests/integration/test_sleep_tier.py``."""

from __future__ import annotations

import pytest

from server import decisions as d
from server.books import ModelBook, ModelState, Phase, WaiterBook, bookings
from server.config import ModelConfig
from server.configmodel import parse_model
from server.engines import engine_launch, sleeps
from server.errors import ConfigError
from server.modelfiles import UNKNOWN
from server.placement import Booking, Device, NoFit, Plan, Requirement, plan, wake_plan
from server.profile import profile
from server.sleep import SLEEPING_BYTES, sleeping_bookings

GiB = 2**30


def book(name, state=ModelState.READY, **kw):
    cfg = ModelConfig(name=name, path="/x", **kw)
    b = ModelBook(cfg, profile(cfg, UNKNOWN))
    rep = b.replicas[0]
    rep.state, rep.sleepable, rep.last_used = state, True, 100.0
    rep.plan = Plan(name, ("cuda:0",), 1, 10 * GiB, 0.5)
    rep.booked_bytes = 10 * GiB
    if state == ModelState.SLEEPING:
        rep.asleep, rep.awake_bytes, rep.booked_bytes = True, 10 * GiB, SLEEPING_BYTES
    return b


def waiter(i, model):
    return WaiterBook(i, model, 5, i, 0.0, 900.0)


def test_an_idle_ready_engine_sleeps_after_sleep_after_and_next_wake_says_when():
    b = book("a", sleep_after=30, ttl=600)
    assert d.step({"a": b}, [], now=129.0) == []
    assert d.next_wake({"a": b}, [], now=129.0) == 130.0
    assert d.step({"a": b}, [], now=130.0) == [d.Sleep("a#0")]


def test_no_sleep_with_a_request_in_flight_a_waiter_or_without_sleep_mode():
    b = book("a", sleep_after=30, ttl=600)
    b.replicas[0].leases = 1  # a stream runs
    assert d.step({"a": b}, [], now=1000.0) == []
    b.replicas[0].leases = 0
    assert d.step({"a": b}, [waiter(1, "a")], now=1000.0) == [d.Grant(1, "a#0")]
    b.replicas[0].sleepable = False  # a CPU engine: started without sleep mode
    assert d.step({"a": b}, [], now=200.0) == []
    assert d.step({"b": book("b", ttl=600)}, [], now=10_000.0) == [d.Stop("b#0", "idle")]


def test_a_waiter_wakes_a_sleeping_model_instead_of_a_cold_start():
    b = book("a", ModelState.SLEEPING, sleep_after=30, ttl=600)
    assert d.step({"a": b}, [waiter(1, "a")], now=200.0) == [d.Wake("a", (0,))]
    b.replicas[0].phase = Phase.FALLING_ASLEEP  # its /sleep not answered yet: nothing yet
    assert d.step({"a": b}, [waiter(1, "a")], now=200.0) == []


def test_a_sleeping_engine_unloads_ttl_after_its_last_request():
    b = book("a", ModelState.SLEEPING, sleep_after=30, ttl=600)
    assert d.next_wake({"a": b}, [], now=200.0) == 700.0
    assert d.step({"a": b}, [], now=699.0) == []
    assert d.step({"a": b}, [], now=700.0) == [d.Stop("a#0", "idle")]


def test_sleeping_engines_are_evictable_and_book_host_ram():
    b = book("a", ModelState.SLEEPING, sleep_after=30)
    b.replicas[0].host_bytes = 4 * GiB
    (booking,) = bookings({"a": b}, {})
    assert booking.idle and booking.sleeping and booking.host_bytes == 4 * GiB
    assert booking.bytes_per_device == SLEEPING_BYTES
    assert not bookings({"a": b}, {"a": 1})[0].idle  # a waiter is waking it


GPU = Device("cuda:0", "cuda", 24 * GiB, 24 * GiB, index=0)
GPU1 = Device("cuda:1", "cuda", 24 * GiB, 24 * GiB, index=1)
CPU = Device("cpu", "cpu", 32 * GiB, 32 * GiB)


def test_eviction_takes_a_sleeping_engine_before_an_older_ready_one():
    ready_old = Booking("old#0", ("cuda:0",), 10 * GiB, idle=True, last_used=1.0)
    sleeping = Booking("s#0", ("cuda:0",), 2 * GiB, idle=True, last_used=50.0, sleeping=True)
    need = Requirement("c", 10 * GiB, overhead_bytes=0)  # 10 GiB; 15 are taken, 9 free
    got = plan(need, (GPU, CPU), (ready_old, sleeping, Booking("busy#0", ("cuda:0",), 3 * GiB)))
    assert isinstance(got, Plan) and got.evict == ("s#0",), got
    # Without the sleeping engine the old ready one goes, as before.
    got = plan(need, (GPU, CPU), (ready_old, Booking("busy#0", ("cuda:0",), 6 * GiB)))
    assert isinstance(got, Plan) and got.evict == ("old#0",)


def test_an_eviction_the_placement_does_not_need_is_spared():
    # A sleeping engine on GPU 1 comes first in eviction order, but only GPU 0's engine matters.
    on_1 = Booking("s#0", ("cuda:1",), 2 * GiB, idle=True, sleeping=True)
    on_0 = Booking("r#0", ("cuda:0",), 20 * GiB, idle=True)
    full_1 = Booking("busy#0", ("cuda:1",), 20 * GiB)
    got = plan(Requirement("c", 20 * GiB, overhead_bytes=0), (GPU, GPU1, CPU), (on_1, on_0, full_1))
    assert isinstance(got, Plan) and got.devices == ("cuda:0",) and got.evict == ("r#0",), got


def test_host_bytes_count_against_the_cpu():
    sleeping = Booking("s#0", ("cuda:0",), 2 * GiB, idle=False, sleeping=True, host_bytes=30 * GiB)
    got = plan(Requirement("c", 4 * GiB, overhead_bytes=0, kind="cpu"), (GPU, CPU), (sleeping,))
    assert isinstance(got, NoFit) and "cpu 2.00 GiB of 32.00 GiB" in got.reason


def test_a_wake_takes_its_full_budget_back_on_its_own_devices():
    asleep = Plan("a", ("cuda:0",), 1, 10 * GiB, 0.4)
    others = (Booking("b#0", ("cuda:0",), 8 * GiB, idle=True, last_used=5.0),
              Booking("c#0", ("cuda:1",), 20 * GiB, idle=True, last_used=1.0))
    got = wake_plan(asleep, 10 * GiB, (GPU, GPU1, CPU), others)
    assert isinstance(got, Plan) and got.evict == () and got.gpu_memory_utilization == 0.4
    assert got.devices == ("cuda:0",) and got.bytes_per_device == 10 * GiB
    # b grows to 16 GiB: a's 10 no longer fit beside it, so b is evicted, never c on GPU 1.
    bigger = (Booking("b#0", ("cuda:0",), 16 * GiB, idle=True, last_used=5.0), others[1])
    got = wake_plan(asleep, 10 * GiB, (GPU, GPU1, CPU), bigger)
    assert isinstance(got, Plan) and got.evict == ("b#0",), got
    busy = (Booking("b#0", ("cuda:0",), 16 * GiB, idle=False), others[1])
    got = wake_plan(asleep, 10 * GiB, (GPU, GPU1, CPU), busy)
    assert isinstance(got, NoFit) and "its wake needs 10.00 GiB per device on cuda:0" in got.reason


def test_what_a_sleeping_engine_books():
    assert sleeping_bookings(10 * GiB, None, 6 * GiB, 1) == (SLEEPING_BYTES, 6 * GiB)
    assert sleeping_bookings(10 * GiB, 2 * GiB, 6 * GiB, 2) == (2 * GiB, 0)  # NVML's figure
    assert sleeping_bookings(GiB, None, None, 1) == (GiB, 0)  # never more than it held awake
    assert SLEEPING_BYTES == 1.5 * GiB


def test_only_gpu_engines_get_sleep_mode():
    cfg = ModelConfig(name="a", path="/x", sleep_after=60)
    gpu = engine_launch(cfg, port=1, device="cuda", python="py", module="m", cuda_devices=(0,))
    cpu = engine_launch(cfg, port=1, device="cpu", python="py", module="m")
    assert "--enable-sleep-mode" in gpu.argv and gpu.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "--enable-sleep-mode" not in cpu.argv and "VLLM_SERVER_DEV_MODE" not in cpu.env
    off = engine_launch(ModelConfig(name="a", path="/x"), port=1, device="cuda", python="py",
                        module="m", cuda_devices=(0,))
    assert "--enable-sleep-mode" not in off.argv and not sleeps(ModelConfig("a", "/x"), "cuda")


@pytest.mark.parametrize("raw, message", [
    ({"sleep_after": 900, "ttl": 600}, "must be less than ttl (600 s)"),
    ({"sleep_after": -1}, "must be 0 (never sleep)"),
    ({"sleep_after": 60, "sleep_level": 3}, "must be 1 (weights to host RAM) or 2"),
])
def test_bad_sleep_settings_are_refused_with_their_path(raw, message):
    with pytest.raises(ConfigError, match=r"models\[0\]\.sleep_") as err:
        parse_model({"name": "a", "path": "/x", **raw}, "models[0]")
    assert message in str(err.value)


def test_sleep_settings_parse():
    cfg = parse_model({"name": "a", "path": "/x", "sleep_after": 120, "sleep_level": 2, "ttl": 0},
                      "models[0]")
    assert (cfg.sleep_after, cfg.sleep_level) == (120.0, 2)
