"""The pure planner: table tests and a property test over random layouts and request sequences."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from server.placement import GiB, Booking, Device, NoFit, Plan, Policy, Requirement, available, plan


def gpu(i, total_gib, free_gib=None, seen_gib=0):
    free = total_gib if free_gib is None else free_gib
    return Device(f"cuda:{i}", "cuda", int(total_gib * GiB), int(free * GiB), int(seen_gib * GiB), i)


def req(name, gib, **kw):
    return Requirement(name, int(gib * GiB), 0, overhead_bytes=0, **kw)


def test_pack_takes_the_tightest_fit_and_spread_the_roomiest():
    devs = (gpu(0, 80), gpu(1, 24), gpu(2, 40))
    assert plan(req("m", 20), devs, ()).devices == ("cuda:1",)
    assert plan(req("m", 20), devs, (), Policy("spread")).devices == ("cuda:0",)
    assert plan(req("m", 30), devs, ()).devices == ("cuda:2",)


def test_other_tenants_count_and_the_fraction_is_of_the_total():
    # C17: another process holds 80% of GPU 0; the model fits only in GPU 1's free memory.
    devs = (gpu(0, 80, free_gib=16), gpu(1, 80))
    p = plan(req("m", 30), devs, ())
    assert isinstance(p, Plan) and p.devices == ("cuda:1",)
    assert p.gpu_memory_utilization == 0.375  # 30 GiB of 80 GiB total
    assert p.bytes_per_device >= 30 * GiB


def test_reservations_of_starting_engines_count():
    # C16: A (60 GiB) is still starting on GPU 0 and NVML does not show it yet.
    devs = (gpu(0, 80), gpu(1, 80))
    booked = (Booking("A", ("cuda:0",), 60 * GiB, starting=True),)
    assert plan(req("B", 40), devs, booked).devices == ("cuda:1",)
    assert isinstance(plan(req("B", 40), devs[:1], booked), NoFit)


def test_measured_memory_replaces_the_estimate():
    # C18: A was booked at 60 GiB, measured at 20 GiB: NVML shows 20 GiB used, all of it ours.
    devs = (gpu(0, 80, free_gib=60, seen_gib=20),)
    assert isinstance(plan(req("B", 50), devs, (Booking("A", ("cuda:0",), 60 * GiB),)), NoFit)
    p = plan(req("B", 50), devs, (Booking("A", ("cuda:0",), 20 * GiB),))
    assert isinstance(p, Plan) and p.evict == ()


def test_headroom_is_bytes_and_applies_to_gpus():
    devs = (gpu(0, 24),)
    assert isinstance(plan(req("m", 23.5), devs, (), Policy(headroom_bytes=1 * GiB)), NoFit)
    assert isinstance(plan(req("m", 22.99), devs, (), Policy(headroom_bytes=1 * GiB)), Plan)


def test_tensor_parallel_when_no_single_gpu_fits():
    devs = tuple(gpu(i, 80) for i in range(4))
    p = plan(req("big", 140, attention_heads=64), devs, ())
    assert p.tensor_parallel_size == 2 and len(p.devices) == 2
    assert p.bytes_per_device >= 70 * GiB and p.gpu_memory_utilization == 0.875
    p = plan(req("huge", 200, attention_heads=64), devs, ())
    assert p.tensor_parallel_size == 4
    assert isinstance(plan(req("huge", 200, attention_heads=6), devs, ()), NoFit)  # 6 % 4 != 0


def test_tensor_parallel_uses_gpus_of_one_size():
    devs = (gpu(0, 80), gpu(1, 40), gpu(2, 80))
    p = plan(req("big", 100), devs, ())
    assert p.devices == ("cuda:0", "cuda:2")


def test_pinned_devices_and_fixed_tp():
    devs = tuple(gpu(i, 80) for i in range(4))
    p = plan(req("m", 10, allowed_devices=("cuda:3",)), devs, ())
    assert p.devices == ("cuda:3",)
    p = plan(req("m", 10, tensor_parallel_size=2), devs, ())
    assert p.tensor_parallel_size == 2
    nofit = plan(req("m", 10, allowed_devices=("cuda:9",)), devs, ())
    assert isinstance(nofit, NoFit) and "cuda:9" in nofit.reason


def test_eviction_is_lru_idle_unpinned_and_minimal():
    devs = (gpu(0, 80),)
    booked = (Booking("old", ("cuda:0",), 30 * GiB, idle=True, last_used=1),
              Booking("newer", ("cuda:0",), 30 * GiB, idle=True, last_used=5),
              Booking("busy", ("cuda:0",), 10 * GiB, idle=False, last_used=0))
    p = plan(req("m", 35), devs, booked)
    assert p.evict == ("old",) and "evicting idle old" in p.why
    p = plan(req("m", 65), devs, booked)
    assert p.evict == ("old", "newer")
    assert isinstance(plan(req("m", 75), devs, booked), NoFit)  # "busy" is never evicted
    pinned = (Booking("keep", ("cuda:0",), 60 * GiB, idle=True, pinned=True),)
    assert isinstance(plan(req("m", 30), devs, pinned), NoFit)
    assert isinstance(plan(req("m", 35), devs, booked, Policy(allow_eviction=False)), NoFit)


def test_no_fit_reason_gives_numbers():
    r = plan(req("m", 30), (gpu(0, 24, free_gib=20),), (), Policy(headroom_bytes=GiB))
    assert isinstance(r, NoFit)
    assert "30.00 GiB" in r.reason and "cuda:0 19.00 GiB of 24.00 GiB" in r.reason
    assert r.short_bytes == 11 * GiB
    assert "short by 11.00 GiB" in r.reason


def test_unknown_size_takes_the_most_available_gpu_whole():
    devs = (gpu(0, 80, free_gib=10), gpu(1, 40))
    p = plan(Requirement("hub", None), devs, (), Policy(headroom_bytes=GiB))
    assert p.devices == ("cuda:1",) and p.bytes_per_device <= 39 * GiB
    assert p.gpu_memory_utilization == 0.975


def test_the_cuda_context_is_booked_outside_vllms_fraction():
    """vLLM checks free memory after creating its CUDA context and budgets the fraction on top."""
    devices = (gpu(0, 80, free_gib=20),)
    need = Requirement("m", 10 * GiB, 0, overhead_bytes=GiB, context_bytes=GiB // 2)
    r = plan(need, devices, ())
    assert r.gpu_memory_utilization == math.ceil(11 / 80 * 10_000) / 10_000
    assert r.bytes_per_device == GiB // 2 + math.ceil(r.gpu_memory_utilization * 80 * GiB)
    # 11 GiB of need fits 11.4 GiB free without the context, not with it
    tight = (gpu(0, 80, free_gib=11.4),)
    assert isinstance(plan(Requirement("m", 10 * GiB, 0, overhead_bytes=GiB), tight, ()), Plan)
    assert isinstance(plan(need, tight, ()), NoFit)
    # unknown size: all that is left once the context is made
    r = plan(Requirement("u", None, context_bytes=GiB // 2), devices, ())
    assert r.gpu_memory_utilization == math.floor(19.5 / 80 * 10_000) / 10_000
    assert r.bytes_per_device <= 20 * GiB


def test_cpu_placement():
    cpu = Device("cpu", "cpu", 24 * GiB, 20 * GiB)
    p = plan(Requirement("m", GiB, GiB, overhead_bytes=GiB // 2, kind="cpu"), (gpu(0, 80), cpu), ())
    assert p.devices == ("cpu",) and p.gpu_memory_utilization is None
    assert isinstance(plan(Requirement("m", 30 * GiB, kind="cpu"), (cpu,), ()), NoFit)


layouts = st.lists(st.tuples(st.sampled_from([16, 24, 40, 80]), st.floats(0, 1)), min_size=1,
                   max_size=8)
requests = st.lists(st.tuples(st.floats(0.5, 200), st.sampled_from([None, 8, 12, 64]),
                              st.booleans(), st.sampled_from(["pack", "spread"])),
                    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(layouts, requests, st.integers(0, 2), st.sampled_from([0, 300 * 2**20, 2**30]))
def test_never_over_commits(layout, reqs, headroom_gib, context):
    """Whatever the layout and sequence, every GPU's bookings stay within its free memory, and
    vLLM's own start check (free after its CUDA context ≥ fraction × total) passes."""
    devices = tuple(gpu(i, total, free_gib=total * (1 - used))
                    for i, (total, used) in enumerate(layout))
    policy_headroom = headroom_gib * GiB
    bookings: list[Booking] = []
    for n, (gib, heads, idle, policy) in enumerate(reqs):
        r = plan(Requirement(f"m{n}", int(gib * GiB), 0, overhead_bytes=GiB // 2, attention_heads=heads,
                             context_bytes=context),
                 devices, tuple(bookings), Policy(policy, policy_headroom))
        if isinstance(r, NoFit):
            assert r.short_bytes > 0 or "no cuda device" in r.reason
            continue
        bookings = [b for b in bookings if b.model not in r.evict]
        room = available(devices, tuple(bookings), policy_headroom)
        for d in r.devices:  # what vLLM's request_memory() checks once its context exists
            total = next(x.total_bytes for x in devices if x.id == d)
            assert room[d] - context >= math.ceil(r.gpu_memory_utilization * total)
        assert all(not b.starting for b in bookings if b.model in r.evict)
        bookings.append(Booking(r.model, r.devices, r.bytes_per_device, idle=idle, last_used=n))
        used = {d for b in bookings for d in b.devices}
        for dev_id, room in available(devices, tuple(bookings), policy_headroom).items():
            assert dev_id not in used or room >= 0, (dev_id, room)
        dev = {d.id: d for d in devices}
        for d in r.devices:  # vLLM gets at least the need, within the GPU's total
            assert r.gpu_memory_utilization * dev[d].total_bytes >= r.bytes_per_device - context - 1
            assert r.gpu_memory_utilization <= 1
