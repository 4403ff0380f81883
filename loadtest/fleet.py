"""Placement at fleet scale, simulated: pack against spread on 8 GPUs and 20 models.

    python -m loadtest.fleet [--seeds 1,2,3,4,5] [--events 10000]

The real scheduler (``server.scheduler.Scheduler``: its decisions, planner, eviction and books)
runs on a simulated inventory of 8 GPUs of mixed sizes (:data:`LAYOUT`) with 20 models of mixed
sizes (:data:`MODELS`: some larger than the small GPUs, some tensor parallel over 2), driven by a
random sequence of events: requests (some held in flight across events, some in bursts of
several models at once), explicit loads, time passing (so idle engines pass their ``ttl``),
unloads (forced or after their in-flight work), engine crashes and failed starts.

The engines are fakes at the ``server.supervisor.Engine`` boundary: each one, from the moment it is
started until it stops or crashes, holds on every GPU of its ``CUDA_VISIBLE_DEVICES`` what vLLM
would take with its ``--gpu-memory-utilization``: the CUDA context plus the fraction of the GPU's
total (:class:`FakeEngine`; a few models use less once up, so a measurement below the estimate
replaces it in the books). The inventory (:class:`FleetGpus`) reports free memory from what the
engines hold, so an over-commit by the planner would show up as memory that is not there.

The same event sequence (one per seed) is replayed under ``placement: pack`` and ``spread``;
per policy the benchmark counts cold starts (engines started), evictions (idle engines stopped to
make room), rejects (requests refused because no room could be made) and the rest, and writes
``loadtest/results/fleet.{md,json}``. No time passes for real: the scheduler's clock is
injected and moved on by the events. ``tests/unit/test_fleet_placement.py`` drives the same
simulation and checks after every event, and at every engine start and inventory read, that no
GPU is over-committed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import aiohttp

from server.books import ModelState, Phase
from server.config import ModelConfig, Settings
from server.errors import EngineStartError, VramgateError
from server.estimate import CUDA_CONTEXT_BYTES
from server.gpus import Snapshot
from server.gpus.simulated import SimulatedInventory, parse_spec
from server.placement import Device
from server.scheduler import Events, Scheduler

GiB = 2**30
# 8 GPUs: two 24 GiB, a 40 GiB with 6 GiB held by another tenant, a 48 GiB, two 80 GiB, two 141 GiB.
LAYOUT = "2x24GiB,1x40GiB@6GiB,1x48GiB,2x80GiB,2x141GiB"
HEADROOM = GiB
MAX_HELD = 8  # requests held in flight at once at most
FAKE_PIDS = itertools.count(10**9)  # above any pid_max: never a real process


@dataclass(frozen=True)
class FleetModel:
    """One model of the fleet: ``memory`` (GiB, weights + KV cache) and how it is configured;
    ``uses``: the part of its share its engine really holds once up (1.0: all of it, as vLLM)."""

    name: str
    memory: float
    ttl: float = 600.0
    tp: int | None = None
    replicas: int = 1
    gpus: tuple[int, ...] | None = None
    pinned: bool = False
    uses: float = 1.0

    def config(self) -> ModelConfig:
        return ModelConfig(name=self.name, path=f"/nonexistent/fleet/{self.name}",
                           memory_bytes=int(self.memory * GiB), ttl=self.ttl,
                           tensor_parallel_size=self.tp, replicas=self.replicas, gpus=self.gpus,
                           pinned=self.pinned)


MODELS = (
    FleetModel("tiny-a", 2, ttl=900, pinned=True),
    FleetModel("tiny-b", 3, ttl=300),
    FleetModel("small-a", 5),
    FleetModel("small-b", 6, replicas=2),
    FleetModel("small-c", 8, gpus=(0, 1)),          # only on the two 24 GiB GPUs
    FleetModel("mid-a", 12, ttl=300, uses=0.7),
    FleetModel("mid-b", 14),
    FleetModel("mid-c", 16, ttl=900),
    FleetModel("mid-d", 18, uses=0.8),
    FleetModel("mid-e", 21),                        # 21 + 1 + 1 GiB: just not on a 24 GiB GPU
    FleetModel("big-a", 26, ttl=300),               # larger than the small GPUs from here on
    FleetModel("big-b", 30),
    FleetModel("big-c", 36, ttl=900),
    FleetModel("big-d", 44, uses=0.75),
    FleetModel("large-a", 60),
    FleetModel("large-b", 70, ttl=300),
    FleetModel("large-tp2", 70, tp=2),              # 35 + 1 + 1 GiB on each of 2 GPUs of one size
    FleetModel("huge-a", 120, ttl=900),
    FleetModel("huge-tp2", 150, tp=2),
    FleetModel("giant", 250),                       # tensor parallel over the two 141 GiB GPUs only
)


class NoHttp:
    """The scheduler's HTTP session: every call fails at once (no health checks, no model card)."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise aiohttp.ClientConnectionError("no HTTP in the fleet simulation")


class FleetGpus(SimulatedInventory):
    """The simulated GPUs of :data:`LAYOUT`, whose used memory is what the fake engines hold now
    (other tenants' memory as the layout says), plus a fixed CPU device. ``seen`` (our engines'
    memory) and ``measured`` come from the engines the scheduler reports, matched by model and
    devices, as NVML's per-process memory is matched by process tree."""

    def __init__(self, layout: str = LAYOUT) -> None:
        super().__init__(parse_spec(layout))
        self.held: dict[FakeEngine, tuple[int, ...]] = {}  # engine → bytes held on each GPU
        self.on_change: Callable[[], None] = lambda: None

    @property
    def totals(self) -> list[int]:
        return [g.total_bytes for g in self.spec.gpus]

    def used(self) -> list[int]:
        """Bytes used on each GPU now: other tenants' and our engines'."""
        used = [g.used_by_others for g in self.spec.gpus]
        for row in self.held.values():
            used = [u + b for u, b in zip(used, row)]
        return used

    def take(self, engine: FakeEngine, row: tuple[int, ...]) -> None:
        self.held[engine] = row
        self.on_change()

    def give_back(self, engine: FakeEngine) -> None:
        self.held.pop(engine, None)

    def snapshot(self, engines: Any = ()) -> Snapshot:
        listed = {(u.model, tuple(u.devices)) for u in engines}
        seen = [0] * len(self.spec.gpus)
        measured: dict[str, int] = {}
        for eng, row in self.held.items():
            if (eng.model, eng.device_ids) in listed:
                seen = [s + b for s, b in zip(seen, row)]
                measured[eng.model] = max(measured.get(eng.model, 0), max(row))
        devices = tuple(Device(id=f"cuda:{i}", kind="cuda", index=i, name=f"sim{i}",
                               total_bytes=g.total_bytes, free_bytes=g.total_bytes - u,
                               seen_bytes=seen[i])
                        for i, (g, u) in enumerate(zip(self.spec.gpus, self.used())))
        cpu = Device("cpu", "cpu", 64 * GiB, 64 * GiB, name="CPU")
        return Snapshot(devices + (cpu,), measured, source="simulated")


class FakeEngine:
    """An engine at the ``Engine`` boundary: it holds, from ``start()`` until it stops or crashes,
    the CUDA context plus ``--gpu-memory-utilization`` × total on each GPU of its
    ``CUDA_VISIBLE_DEVICES`` (``uses`` × that share once ready); ``fail`` makes its start fail."""

    headers: dict[str, str] = {}  # what requests to it carry (none: a local engine)
    served_name: str | None = None

    def __init__(self, gpus: FleetGpus, launch: Any, uses: float, fail: bool) -> None:
        argv = list(launch.argv)

        def arg(flag: str, default: str) -> str:
            return argv[argv.index(flag) + 1] if flag in argv else default
        self.gpus, self.launch, self.uses, self.fail = gpus, launch, uses, fail
        self.model = arg("--served-model-name", "?")
        self.fraction = float(arg("--gpu-memory-utilization", "0"))
        self.tp = int(arg("--tensor-parallel-size", "1"))
        visible = launch.env.get("CUDA_VISIBLE_DEVICES", "")
        self.cuda = tuple(int(i) for i in visible.split(",") if i)
        self.pid = next(FAKE_PIDS)
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(f"cuda:{i}" for i in self.cuda)

    @property
    def base_url(self) -> str:
        return self.launch.base_url

    @property
    def health_url(self) -> str:
        return self.launch.base_url + "/health"

    def row(self, part: float = 1.0) -> tuple[int, ...]:
        share = [0] * len(self.gpus.totals)
        for i in self.cuda:
            share[i] = CUDA_CONTEXT_BYTES + math.ceil(self.fraction * self.gpus.totals[i] * part)
        return tuple(share)

    async def start(self) -> None:
        self.gpus.take(self, self.row())

    async def ready(self, timeout: float, client: Any) -> float:
        if self.fail:
            self.crash("exited with status 1")
            raise EngineStartError(f"engine for {self.model} exited with status 1", log_tail="OOM")
        if self.uses < 1.0:
            self.gpus.take(self, self.row(self.uses))
        return 0.0

    async def exited(self) -> str:
        return await asyncio.shield(self.gone)

    async def stop(self) -> None:
        self.gpus.give_back(self)
        if not self.gone.done():
            self.gone.set_result("stopped")

    def crash(self, why: str = "exited with status 139") -> None:
        self.gpus.give_back(self)
        if not self.gone.done():
            self.gone.set_result(why)


@dataclass
class Tally:
    """What happened in one run."""

    events: int = 0
    requests: int = 0
    served: int = 0
    cold_starts: int = 0
    evictions: int = 0
    idle_unloads: int = 0
    rejects: int = 0  # refused: no room could be made
    unavailable: int = 0  # refused otherwise: backing off after a crash, given up, deadline
    crashes: int = 0
    failed_starts: int = 0
    unloads: int = 0
    checks: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # rejects per model


class Counter(Events):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def engine_started(self, model: str) -> None:
        self.tally.cold_starts += 1

    def engine_stopped(self, model: str, reason: str) -> None:
        if reason == "evicted":
            self.tally.evictions += 1
        elif reason == "idle":
            self.tally.idle_unloads += 1


class Stuck(AssertionError):
    """The scheduler did not settle: something waits that nothing will wake."""


def events(seed: int, n: int, models: tuple[FleetModel, ...] = MODELS) -> list[tuple]:
    """``n`` events drawn from ``seed`` (the same list for every policy). Each is ``(gap, kind,
    ...)``: ``gap`` seconds pass before it. Popularity is skewed: a few models are hot."""
    rng = random.Random(seed)
    names = [m.name for m in models]
    rng.shuffle(names)
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(names))]
    kinds = ["request", "burst", "release", "idle", "unload", "crash", "load"]
    odds = [55, 7, 13, 10, 7, 5, 3]
    out: list[tuple] = []
    for _ in range(n):
        gap = rng.expovariate(1 / 5)
        kind = rng.choices(kinds, odds)[0]
        pick = rng.choices(names, weights)[0]
        if kind == "request":
            out.append((gap, kind, pick, rng.random() < 0.2))
        elif kind == "burst":
            out.append((gap, kind, tuple(rng.choices(names, weights, k=rng.randint(2, 4)))))
        elif kind == "idle":
            out.append((rng.uniform(0.3, 1.6) * 900, kind))
        elif kind == "unload":
            out.append((gap, kind, pick, rng.random() < 0.5))
        elif kind in ("release", "crash"):
            out.append((gap, kind, pick, rng.random()))
        else:
            out.append((gap, kind, pick))
    return out


class Clock:
    """The simulated time (seconds): the scheduler's clock and its event loop's, so its timer
    rings when the simulated time passes its due time, never by the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        loop.time = self  # type: ignore[method-assign]
        return loop


@dataclass
class Fleet:
    """One run of the real scheduler on the simulated fleet. ``check(fleet)`` is called after every
    event (once the scheduler has settled), at every inventory read and every time an engine takes
    memory; it raises to fail the run."""

    policy: str = "pack"
    models: tuple[FleetModel, ...] = MODELS
    layout: str = LAYOUT
    check: Callable[["Fleet"], None] = lambda fleet: None
    tally: Tally = field(default_factory=Tally)
    clock: Clock = field(default_factory=Clock)

    async def run(self, sequence: list[tuple]) -> Tally:
        self.gpus = FleetGpus(self.layout)
        self.engines: list[FakeEngine] = []  # started, and not yet known by the books to be gone
        self.fail_next: set[str] = set()
        self.broken: Exception | None = None  # the first failed check
        self.held: list[Any] = []  # leases held in flight
        self.pending: list[tuple[str, bool, asyncio.Future]] = []  # (model, hold, answer)
        uses = {m.name: m.uses for m in self.models}

        def launcher(name: str, launch: Any, settings: Settings) -> FakeEngine:
            model = launch.argv[list(launch.argv).index("--served-model-name") + 1]
            engine = FakeEngine(self.gpus, launch, uses[model], model in self.fail_next)
            self.fail_next.discard(model)
            self.tally.failed_starts += engine.fail
            self.engines.append(engine)
            return engine

        async def offload(fn: Callable, *args: Any) -> Any:
            self._check()
            return fn(*args)

        settings = Settings(models=tuple(m.config() for m in self.models), placement=self.policy,
                            gpu_headroom_bytes=HEADROOM, place_wait_timeout=0)
        quiet = logging.getLogger("vramgate")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # thousands of evictions and crashes: not logged
        self.pool = Scheduler(settings, self.gpus, launcher=launcher, clock=self.clock,
                              health_interval=1e9, events=Counter(self.tally),
                              offload=offload, session=NoHttp())
        self.gpus.on_change = self._check
        try:
            self.pool.start()
            await self.settle()
            for event in sequence:
                await self.play(event)
                self.tally.events += 1
            for lease in self.held:
                lease.release()
            await self.pool.stop_all()
            for _, _, answer in self.pending:  # refused at the shutdown
                if answer.done() and not answer.cancelled():
                    answer.exception()
        finally:
            quiet.setLevel(level)
        return self.tally

    def _check(self) -> None:
        """Run ``check``; what it raises inside the scheduler's tasks (an engine start, an
        inventory read) would be taken for an engine failure there, so it is raised here, after
        the event, instead."""
        self.tally.checks += 1
        try:
            self.check(self)
        except Exception as exc:
            self.broken = self.broken or exc

    # ---- the events ----------------------------------------------------------------------------
    async def play(self, event: tuple) -> None:
        gap, kind, *args = event
        self.clock.now += gap  # the scheduler's timer (reap_interval: 1 s) rings on the next turn
        if kind in ("request", "load"):
            self.ask(args[0], hold=len(args) > 1 and args[1], load=kind == "load")
        elif kind == "burst":
            for name in args[0]:
                self.ask(name, hold=False)
        elif kind == "release" and self.held:
            self.held.pop(int(args[1] * len(self.held))).release()
        elif kind == "unload":
            self.tally.unloads += 1
            self.spawn(self.pool.unload(args[0], force=args[1]))
        elif kind == "crash":
            live = [e for e in self.engines if e in self.gpus.held and not e.gone.done()]
            mine = [e for e in live if e.model == args[0]]
            if mine or (live and args[1] < 0.5):
                victim = (mine or live)[int(args[1] * len(mine or live))]
                victim.crash()
                self.tally.crashes += 1
            else:
                self.fail_next.add(args[0])  # its next start fails
        await self.settle()
        self._check()
        if self.broken is not None:
            raise self.broken

    def ask(self, name: str, hold: bool, load: bool = False) -> None:
        self.tally.requests += 1
        if load:
            answer: asyncio.Future = self.spawn(self.pool.load(name))
        else:
            _, answer = self.pool.request(name)
        self.pending.append((name, hold and not load, answer))

    def spawn(self, coro: Any) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen: no warning
        return task

    def answered(self) -> bool:
        """Book the answers that came; returns whether a lease was released (more to settle)."""
        released, waiting = False, []
        for name, hold, answer in self.pending:
            if not answer.done():
                waiting.append((name, hold, answer))
                continue
            error = answer.exception()
            if error is None:
                self.tally.served += 1
                lease = answer.result()
                if lease is None or isinstance(lease, ModelState):
                    continue  # a load: its lease was released by load() itself
                if hold and len(self.held) < MAX_HELD:
                    self.held.append(lease)
                else:
                    lease.release()
                    released = True
            elif isinstance(error, VramgateError) and error.message.startswith("cannot place"):
                self.tally.rejects += 1
                self.tally.rejected[name] = self.tally.rejected.get(name, 0) + 1
            elif isinstance(error, VramgateError) and error.status == 503:
                self.tally.unavailable += 1
            else:
                raise error
        self.pending = waiting
        return released

    # ---- waiting until the scheduler has settled -------------------------------------------------
    def drained_by_work(self, name: str) -> bool:
        """Whether model ``name`` waits, rightly, for in-flight requests on an engine that is to
        stop (an unload that lets them finish): its waiters wait until a lease is released."""
        book = self.pool.books.get(name)
        return book is not None and any(r.drain and r.leases > 0 and not r.stop_sent
                                        for r in book.replicas)

    def settled(self) -> bool:
        pool = self.pool
        if pool._inbox or pool._wake.is_set():
            return False
        if any(not t.done() and t.get_name().startswith(("place:", "stop:")) for t in pool._tasks):
            return False
        live = {id(r.engine) for b in pool.books.values() for r in b.replicas}
        self.engines = [e for e in self.engines if not e.gone.done() or id(e) in live]
        if any(e.gone.done() for e in self.engines):
            return False  # an exit the scheduler has not heard of yet
        for book in pool.books.values():
            for r in book.replicas:
                if r.phase != Phase.IDLE:
                    return False  # queued, being placed, booked or starting
                if r.state == ModelState.STOPPING and not self.drained_by_work(book.name):
                    return False
        if any(not self.drained_by_work(w.model) for w in pool.waiters.values()):
            return False
        return all(a.done() or self.drained_by_work(n) for n, _, a in self.pending)

    async def settle(self, limit: int = 5000) -> None:
        """Let the scheduler and the engines' tasks run until :meth:`settled` (no time passes)."""
        await asyncio.sleep(0)  # one turn at least: timers due by the simulated clock ring
        while True:
            for _ in range(limit):
                if self.settled():
                    break
                await asyncio.sleep(0)
            else:
                raise Stuck(f"the scheduler did not settle after {limit} turns: {self.describe()}")
            if not self.answered():
                return

    def describe(self) -> str:
        out = []
        for book in self.pool.books.values():
            for r in book.replicas:
                if r.state != ModelState.UNLOADED or r.phase != Phase.IDLE:
                    out.append(f"{r.key} {r.state.value}/{r.phase.value} on {'+'.join(r.devices) or '-'} "
                               f"booked {r.booked_bytes / GiB:.2f} GiB leases {r.leases}")
        return "; ".join(out) or "no engines"


def play(policy: str, sequence: list[tuple], check: Callable[[Fleet], None] = lambda f: None) -> Tally:
    """Replay ``sequence`` under ``policy`` on a fresh fleet; the run's tally."""
    fleet = Fleet(policy, check=check)
    with asyncio.Runner(loop_factory=fleet.clock.loop) as runner:
        return runner.run(fleet.run(sequence))


# ---- the benchmark ---------------------------------------------------------------------------------
FIGURES = ("cold_starts", "evictions", "rejects")


def compare(seeds: list[int], n: int) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {"pack": [], "spread": []}
    for seed in seeds:
        sequence = events(seed, n)
        for policy in runs:
            t0 = time.perf_counter()
            tally = play(policy, sequence)
            runs[policy].append({"seed": seed, "seconds": round(time.perf_counter() - t0, 2),
                                 **asdict(tally)})
    counts = [k for k, v in asdict(Tally()).items() if isinstance(v, int)]
    totals: dict[str, dict[str, Any]] = {
        p: {k: sum(r[k] for r in rows) for k in counts} for p, rows in runs.items()}
    for p, rows in runs.items():
        models = {m.name: sum(r["rejected"].get(m.name, 0) for r in rows) for m in MODELS}
        totals[p]["rejected"] = {m: n for m, n in sorted(models.items(), key=lambda kv: -kv[1]) if n}
    ratio = {k: (totals["spread"][k] / totals["pack"][k] if totals["pack"][k] else None)
             for k in FIGURES}
    return {"layout": LAYOUT, "models": [asdict(m) for m in MODELS], "seeds": seeds, "events": n,
            "runs": runs, "totals": totals, "spread_over_pack": ratio}


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    t, seeds = result["totals"], result["seeds"]
    rows = ["| policy | requests | served | cold starts | evictions | rejects (no room) | "
            "other 503s | idle unloads | crashes |", "|---|---|---|---|---|---|---|---|---|"]
    for p in ("pack", "spread"):
        rows.append(f"| {p} | {t[p]['requests']} | {t[p]['served']} | {t[p]['cold_starts']} | "
                    f"{t[p]['evictions']} | {t[p]['rejects']} | {t[p]['unavailable']} | "
                    f"{t[p]['idle_unloads']} | {t[p]['crashes']} |")
    per_seed = ["| seed | policy | cold starts | evictions | rejects | seconds |", "|---|---|---|---|---|---|"]
    for p in ("pack", "spread"):
        per_seed += [f"| {r['seed']} | {p} | {r['cold_starts']} | {r['evictions']} | {r['rejects']} | "
                     f"{r['seconds']} |" for r in result["runs"][p]]
    most = [f"- {p}: " + ", ".join(f"{m} {n}" for m, n in list(t[p]["rejected"].items())[:6])
            for p in ("pack", "spread")]
    return "\n".join([
        "# Fleet placement: pack against spread (simulated)", "",
        f"`python -m loadtest.fleet --seeds {','.join(map(str, seeds))} --events {result['events']}`, "
        f"{machine['date']}, {machine['cores']} cores, Python {machine['python']}.", "",
        f"GPUs `{result['layout']}`, {len(result['models'])} models, {len(seeds)} seeds × "
        f"{result['events']} events, the same sequences under both policies.", "",
        *rows, "", ratio_line(result), "", "Most rejected models (no room):", "", *most, "",
        *per_seed, ""])


def ratio_line(result: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')} {v:.2f}×" if v is not None else f"{k.replace('_', ' ')} -"
             for k, v in result["spread_over_pack"].items()]
    return "spread ÷ pack: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from loadtest.loadgen import machine
    from loadtest.procs import ROOT

    parser = argparse.ArgumentParser(prog="python -m loadtest.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated seeds, one sequence each")
    parser.add_argument("--events", type=int, default=10_000, help="events per sequence")
    args = parser.parse_args(argv)
    result = compare([int(s) for s in args.seeds.split(",")], args.events)
    for p in ("pack", "spread"):
        t = result["totals"][p]
        print(f"{p:6}  cold starts {t['cold_starts']:6}  evictions {t['evictions']:6}  "
              f"rejects {t['rejects']:6}  (requests {t['requests']}, served {t['served']}, "
              f"other 503s {t['unavailable']}, idle unloads {t['idle_unloads']}, crashes {t['crashes']})")
    print(ratio_line(result))
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    (out / "fleet.json").write_text(json.dumps({"machine": info, **result}, indent=2))
    (out / "fleet.md").write_text(markdown(result, info))


if __name__ == "__main__":
    main()
