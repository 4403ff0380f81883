"""The placement planner (pure): a device snapshot and vramgate's books in, a plan out.

No I/O, no clock, no logging. Memory is in bytes throughout.

What is available on a device, for a new engine::

    available = free (as NVML reports it, so other tenants' memory counts: cases C17)
              + seen  (memory NVML shows our own engines using on it)
              − booked (our reservations on it: measured for running engines, the estimate or
                        what NVML already shows, whichever is larger, for starting ones: C16, C18)
              − headroom (configured in bytes; no hidden percentage)

A model needs ``per_device_bytes(tp)`` on each of ``tp`` devices (see :class:`Requirement`). The
planner tries one device first, then tensor parallel over 2, 4, 8 devices (only sizes that divide
the model's attention heads), with the policy choosing among the devices that fit:

- ``pack`` (default): best fit, the device(s) with the least available memory that still fit, so
  large holes stay free for large models;
- ``spread``: the device(s) with the most available memory.

When nothing fits, idle, unpinned engines are considered for eviction, sleeping ones first, then
least recently used first, and the shortest such prefix that makes room is returned with the plan. When even that is not
enough, the result is a :class:`NoFit` whose reason gives the numbers.

For vLLM on a GPU the plan carries ``--gpu-memory-utilization``: vLLM 0.32 reads it as a fraction
of the GPU's *total* memory and refuses to start when free memory is below fraction × total, so the
fraction is ``need / total`` rounded up to 4 decimals. vLLM measures that free memory *after* its
process has created its CUDA context (``gpu_worker.init_device``: ``MemorySnapshot`` then
``request_memory``), and the context stays outside the fraction's budget, so an engine takes
``context_bytes + ceil(fraction × total)`` on each GPU: that is what the plan books and what must
be available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 2**30
POLICIES = ("pack", "spread")
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Device:
    """One device in a snapshot. ``kind`` is ``cuda`` or ``cpu``; ``id`` is ``cuda:N`` or ``cpu``.

    ``free_bytes`` is what the driver reports free now; ``seen_bytes`` is how much of the used
    memory belongs to vramgate's own engines (NVML per-process memory).
    """

    id: str
    kind: str
    total_bytes: int
    free_bytes: int
    seen_bytes: int = 0
    index: int = -1
    name: str = ""


@dataclass(frozen=True)
class Booking:
    """A reservation in vramgate's books: ``bytes_per_device`` on each of ``devices``.

    ``starting`` engines book at least their estimate; ``idle`` engines (no request in flight) that
    are not ``pinned`` may be evicted: ``sleeping`` ones first (vLLM's sleep mode: they serve
    nothing until a wake), then least recently used (``last_used``, seconds) first. A sleeping
    engine also books ``host_bytes`` of RAM (on the ``cpu`` device) for the weights its level-1
    sleep moved there.
    """

    model: str
    devices: tuple[str, ...]
    bytes_per_device: int
    starting: bool = False
    idle: bool = False
    pinned: bool = False
    last_used: float = 0.0
    sleeping: bool = False
    host_bytes: int = 0


@dataclass(frozen=True)
class Requirement:
    """What a model needs. ``weight_bytes`` and ``kv_cache_bytes`` are totals, split evenly over the
    ``tp`` devices; ``overhead_bytes`` is needed on every device inside vLLM's budget (activations,
    CUDA graphs); ``context_bytes`` on every GPU outside it (the engine's CUDA context, created
    before vLLM measures free memory). ``None`` weights mean unknown: the model gets the most
    available device, all of it. ``attention_heads`` limits tensor parallel sizes to its divisors."""

    model: str
    weight_bytes: int | None
    kv_cache_bytes: int = 0
    overhead_bytes: int = GiB
    attention_heads: int | None = None
    kind: str = "cuda"
    allowed_devices: tuple[str, ...] | None = None
    tensor_parallel_size: int | None = None
    context_bytes: int = 0

    def per_device_bytes(self, tp: int) -> int:
        assert self.weight_bytes is not None
        return math.ceil((self.weight_bytes + self.kv_cache_bytes) / tp) + self.overhead_bytes


@dataclass(frozen=True)
class Plan:
    """Where a model goes: ``devices`` (ids), ``tensor_parallel_size``, the ``bytes_per_device`` to
    book, ``gpu_memory_utilization`` (None on the CPU), the engines to ``evict`` first, and ``why``."""

    model: str
    devices: tuple[str, ...]
    tensor_parallel_size: int
    bytes_per_device: int
    gpu_memory_utilization: float | None
    evict: tuple[str, ...] = ()
    why: str = ""

    @property
    def cuda_indices(self) -> tuple[int, ...]:
        return tuple(int(d.split(":")[1]) for d in self.devices if d.startswith("cuda:"))


REMOTE = "remote"  # a Requirement's kind for an engine on another host: it takes nothing here


@dataclass(frozen=True)
class NoFit:
    """The model fits nowhere, even after evicting every idle engine; ``reason`` gives the numbers,
    ``short_bytes`` by how much the best candidate falls short."""

    model: str
    reason: str
    short_bytes: int = 0


@dataclass(frozen=True)
class Policy:
    """``name`` is ``pack`` or ``spread``; ``headroom_bytes`` stays free on every GPU;
    ``max_engines`` caps the engines booked at once (``max_loaded_models``)."""

    name: str = "pack"
    headroom_bytes: int = 0
    allow_eviction: bool = True
    max_engines: int | None = None


def fmt(nbytes: float) -> str:
    """Bytes as GiB with two decimals (``'3.25 GiB'``)."""
    return f"{nbytes / GiB:.2f} GiB"


def available(devices: tuple[Device, ...], bookings: tuple[Booking, ...],
              headroom: int) -> dict[str, int]:
    """Bytes available for a new engine on each device (formula in the module doc); may be negative."""
    booked: dict[str, int] = {d.id: 0 for d in devices}
    for b in bookings:
        for dev in b.devices:
            if dev in booked:
                booked[dev] += b.bytes_per_device
        if b.host_bytes and "cpu" in booked:
            booked["cpu"] += b.host_bytes
    return {d.id: d.free_bytes + d.seen_bytes - booked[d.id] - (headroom if d.kind == "cuda" else 0)
            for d in devices}


def _fraction(share: int, total: int) -> float:
    """``share / total`` as vLLM's --gpu-memory-utilization: 4 decimals, rounded up so the engine
    gets at least ``share`` bytes (the caller checked that the rounding still fits)."""
    return math.ceil(share / total * 10_000) / 10_000


def _try_place(req: Requirement, devices: tuple[Device, ...], avail: dict[str, int],
               policy: Policy) -> tuple[Plan | None, int]:
    """One attempt without eviction. Returns (plan or None, the smallest shortfall seen)."""
    candidates = [d for d in devices if d.kind == req.kind and
                  (req.allowed_devices is None or d.id in req.allowed_devices)]
    best_short = math.inf
    if not candidates:
        return None, 0
    if req.weight_bytes is None:  # unknown size: the most available device, all of it
        dev = max(candidates, key=lambda d: avail[d.id])
        context = req.context_bytes if dev.kind == "cuda" else 0
        share = avail[dev.id] - context
        if share <= 0:
            return None, -share
        frac = None
        if dev.kind == "cuda":  # round down: the share must not exceed what is available
            frac = math.floor(share / dev.total_bytes * 10_000) / 10_000
            share = math.ceil(frac * dev.total_bytes) + context
        return Plan(req.model, (dev.id,), 1, share, frac,
                    why=f"size unknown: all {fmt(share)} available on {dev.id}"), 0
    sizes = (req.tensor_parallel_size,) if req.tensor_parallel_size else TP_SIZES
    if req.kind == "cpu":
        sizes = (1,)
    for tp in sizes:
        if tp > len(candidates) or (req.attention_heads and req.attention_heads % tp):
            continue
        need = req.per_device_bytes(tp)

        def granted(d: Device) -> int:  # what vLLM really takes: its context + fraction × total
            if d.kind != "cuda":
                return need
            return req.context_bytes + math.ceil(_fraction(need, d.total_bytes) * d.total_bytes)

        fitting = [d for d in candidates
                   if avail[d.id] >= granted(d) and need + req.context_bytes <= d.total_bytes]
        for size in {d.total_bytes for d in candidates}:  # how far the best same-size set is
            shorts = sorted(granted(d) - avail[d.id] for d in candidates if d.total_bytes == size)
            if len(shorts) >= tp:
                best_short = min(best_short, shorts[tp - 1])
        if len(fitting) < tp:
            continue
        # pack: the least room that fits; spread: the most room. Ties go to the lower id.
        key = (lambda d: (avail[d.id], d.id)) if policy.name == "pack" else (
            lambda d: (-avail[d.id], d.id))
        ordered = sorted(fitting, key=key)
        # One --gpu-memory-utilization applies to every rank, so tensor parallel takes GPUs of
        # one size: the first size group (in policy order) with enough fitting GPUs.
        groups = [[d for d in ordered if d.total_bytes == first.total_bytes] for first in ordered]
        group = next((g for g in groups if len(g) >= tp), None)
        if group is None:
            continue
        chosen = sorted(group[:tp], key=lambda d: d.id)
        frac = max(_fraction(need, d.total_bytes) for d in chosen) if req.kind == "cuda" else None
        share = max(granted(d) for d in chosen)
        left = ", ".join(f"{d.id} {fmt(avail[d.id])} available" for d in chosen)
        ctx = f" + {fmt(req.context_bytes)} CUDA context" if req.kind == "cuda" and req.context_bytes else ""
        why = f"needs {fmt(need)}{ctx} per device at tensor parallel {tp} ({policy.name}: {left})"
        return Plan(req.model, tuple(d.id for d in chosen), tp, share, frac, why=why), 0
    return None, 0 if best_short is math.inf else int(best_short)


def _spare(victims: list[Booking], start: int, over: int, fits) -> list[Booking] | None:
    """The engines to evict, of ``victims`` (in eviction order), given ``fits(gone)`` (whether
    the placement succeeds without those); ``None`` when even all of them do not make room. The
    shortest prefix of at least ``start`` that fits is taken, then each one in it the placement
    turns out not to need (one on another GPU, a sleeping engine whose little memory did not
    matter) is spared, last first; at least ``over`` go (``max_loaded_models``)."""
    n = next((n for n in range(start, len(victims) + 1) if fits(victims[:n])), None)
    if n is None:
        return None
    gone = list(victims[:n])
    for b in reversed(victims[:n - 1]):
        if len(gone) > over and fits([g for g in gone if g is not b]):
            gone.remove(b)
    return gone


def _without(bookings: tuple[Booking, ...], gone: list[Booking]) -> tuple[Booking, ...]:
    names = {b.model for b in gone}
    return tuple(b for b in bookings if b.model not in names)


def _evictable(bookings: tuple[Booking, ...]) -> list[Booking]:
    """Idle, unpinned engines that are not starting, in eviction order: sleeping first, then
    least recently used."""
    return sorted((b for b in bookings if b.idle and not b.pinned and not b.starting),
                  key=lambda b: (not b.sleeping, b.last_used, b.model))


def wake_plan(asleep: Plan, need: int, devices: tuple[Device, ...],
              bookings: tuple[Booking, ...], policy: Policy = Policy()) -> Plan | NoFit:
    """Room for the wake of the sleeping replica placed by ``asleep``: ``need`` bytes (what
    it held awake) on each of the same devices, as ``available`` counts them given every other
    booking; idle engines on those devices are evicted for it when that is short (sleeping ones
    first, then least recently used). The plan keeps the engine's tensor parallel size and
    ``--gpu-memory-utilization`` (its process keeps them); a :class:`NoFit` when even evicting
    every idle engine there does not make room."""
    def fits(gone: list[Booking]) -> bool:
        avail = available(devices, _without(bookings, gone), policy.headroom_bytes)
        return all(avail.get(dev, -1) >= need for dev in asleep.devices)
    mine = set(asleep.devices)
    victims = [b for b in _evictable(bookings) if mine & set(b.devices)] if policy.allow_eviction else []
    gone = _spare(victims, 0, 0, fits)
    on = "+".join(asleep.devices)
    if gone is None:
        avail = available(devices, bookings, policy.headroom_bytes)
        rooms = ", ".join(f"{dev} {fmt(avail.get(dev, 0))} available" for dev in asleep.devices)
        return NoFit(asleep.model, f"its wake needs {fmt(need)} per device on {on} ({rooms}, even "
                                   f"after evicting every idle engine there)")
    freed = "; after evicting idle " + ", ".join(
        f"{b.model} ({fmt(b.bytes_per_device)})" for b in gone) if gone else ""
    return Plan(asleep.model, asleep.devices, asleep.tensor_parallel_size, need,
                asleep.gpu_memory_utilization, evict=tuple(b.model for b in gone),
                why=f"{fmt(need)} per device back on {on}{freed}")


def plan(req: Requirement, devices: tuple[Device, ...], bookings: tuple[Booking, ...],
         policy: Policy = Policy()) -> Plan | NoFit:
    """Place ``req`` on ``devices`` given the ``bookings`` already made (the pure planner).

    Never over-commits: every device of the returned plan has ``available`` (module doc) of at
    least ``bytes_per_device`` once the plan's ``evict`` list is removed from the books. A
    :data:`REMOTE` requirement gets a plan on no device.
    """
    if policy.name not in POLICIES:
        raise ValueError(f"unknown placement policy {policy.name!r}")
    if req.kind == REMOTE:
        return Plan(req.model, (), 1, 0, None, why="an upstream on another host: nothing to book here")
    avail = available(devices, bookings, policy.headroom_bytes)
    result, short = _try_place(req, devices, avail, policy)
    over = 0 if policy.max_engines is None else max(0, len(bookings) + 1 - policy.max_engines)
    if result is not None and not over:
        return result
    if policy.allow_eviction:
        victims = _evictable(bookings)

        def fits(gone: list[Booking]) -> bool:
            avail_then = available(devices, _without(bookings, gone), policy.headroom_bytes)
            return _try_place(req, devices, avail_then, policy)[0] is not None
        gone = _spare(victims, max(1, over), over, fits)
        if gone is not None:
            kept = _without(bookings, gone)
            found, _ = _try_place(req, devices, available(devices, kept, policy.headroom_bytes),
                                  policy)
            assert found is not None
            freed = ", ".join(f"{b.model} ({fmt(b.bytes_per_device)} on {'+'.join(b.devices)})"
                              for b in gone)
            return Plan(found.model, found.devices, found.tensor_parallel_size,
                        found.bytes_per_device, found.gpu_memory_utilization,
                        evict=tuple(b.model for b in gone),
                        why=f"{found.why}; after evicting idle {freed}")
    if result is not None:  # it fits, but max_engines are loaded and none of them is idle
        return NoFit(req.model, f"max_loaded_models={policy.max_engines} engines are loaded and "
                                f"none of them is idle (evictable)")
    kinds = [d for d in devices if d.kind == req.kind and
             (req.allowed_devices is None or d.id in req.allowed_devices)]
    if not kinds:
        where = f" among {', '.join(req.allowed_devices)}" if req.allowed_devices else ""
        return NoFit(req.model, f"no {req.kind} device{where} to place {req.model} on")
    need = req.per_device_bytes(1) if req.weight_bytes is not None else 0
    if req.kind == "cuda":
        need += req.context_bytes
    rooms = ", ".join(f"{d.id} {fmt(avail[d.id])} of {fmt(d.total_bytes)}" for d in kinds)
    return NoFit(req.model, f"{req.model} needs {fmt(need)} on one device (less per device with "
                            f"tensor parallel); available after other processes, vramgate's "
                            f"reservations and {fmt(policy.headroom_bytes)} headroom: {rooms}; "
                            f"short by {fmt(short)} at best", short_bytes=short)
