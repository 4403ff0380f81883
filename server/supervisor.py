"""Engines and what the scheduler does to them: the effects, each a task whose end comes back to
the scheduler as a message. Nothing here writes the scheduler's books.

- :class:`Engine` is the narrow interface the scheduler needs of an engine; the local engine
  process under ``server.guard`` (``server.engines.EngineProcess``) is one, an engine on another
  host can be another.
- :func:`run_engine` starts one engine, waits until it is healthy, reads what it serves, then
  watches it until it exits or fails ``HEALTH_FAILURES`` health checks in a row.
- :func:`stop_engine` stops one (cancelling its runner first).
- :func:`placement_inputs` reads the inventory and the model's files (blocking: in a thread).
- :class:`GroupRecords` remembers, under the data dir, the process group of every engine this
  gateway started, so a gateway killed without cleaning up has its engines reaped by the next one
  started on that data dir (found by recorded process group and an environment mark, never by
  process name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, Sequence

import psutil

from server.config import ModelConfig, Settings
from server.engines import group_members, kill_group, log_tail
from server.errors import EngineStartError, ModelUnavailable, VramgateError
from server.estimate import requirement_for
from server.gpus import EngineUsage, Inventory, Snapshot
from server.gpus.cpu import tree_pids
from server.placement import Device, Requirement, fmt
from server.profile import Profile, read_profiles
from server.proxy import probe

log = logging.getLogger("vramgate.engines")
HEALTH_FAILURES = 3  # consecutive failed /health checks that count as an engine failure
MARK = "VRAMGATE_GATEWAY"  # environment variable naming the gateway instance that owns an engine


class Engine(Protocol):
    """What the scheduler needs of an engine: where it answers, the headers and model name
    requests to it carry, and four steps of its life. The local engine process
    (``server.engines.EngineProcess``) and a server on another host (``server.remote``) are
    the two kinds."""

    headers: dict[str, str]  # added to every request forwarded to it (an upstream's API key)
    served_name: str | None  # the model's name there (``None``: the served model name here)

    @property
    def base_url(self) -> str:
        """Where its OpenAI-compatible API answers (``http://host:port``)."""
        ...

    @property
    def address(self) -> str:
        """Where it listens, for people and logs: ``unix:/path.sock`` or its URL."""
        ...

    @property
    def health_url(self) -> str:
        """What answers 200 while it is healthy."""
        ...

    async def start(self) -> None:
        """Begin starting it. Raises ``OSError`` when it cannot even begin."""

    async def ready(self, timeout: float, client: Any) -> float:
        """Wait until it is healthy; returns the seconds it took. Raises
        :class:`~server.errors.EngineStartError` (it exited, or ``timeout`` seconds passed)."""
        ...

    async def exited(self) -> str:
        """Wait until it is gone, all of it; says how it ended."""
        ...

    async def stop(self) -> None:
        """Stop it and everything it started; returns once all of it is gone."""


@dataclass(frozen=True)
class ReadyInfo:
    """What a newly ready engine told us: its context length (tokens; ``None`` when it did not
    say), the bytes per device NVML measured it using (``None``: not measurable), its load time
    (seconds) and, for a hub model, its profile read from the files just downloaded."""

    max_model_len: int | None
    measured_bytes: int | None
    load_seconds: float
    profile: Profile | None


@dataclass(frozen=True)
class Usage:
    """One engine as the inventory must see it, as plain data (its process tree is walked in the
    inventory's thread)."""

    model: str
    pid: int
    devices: tuple[str, ...]
    share_bytes: int
    ready: bool


def with_cpu_budget(snap: Snapshot, budget: int | None) -> Snapshot:
    """Replace the CPU device by a fixed ``budget`` of bytes (``cpu_memory_budget``), if set."""
    if budget is None:
        return snap
    devices = tuple(Device("cpu", "cpu", budget, budget, 0, name=f"CPU (budget {fmt(budget)})")
                    if d.kind == "cpu" else d for d in snap.devices)
    return Snapshot(devices, snap.measured, snap.source)


def device_kind(model: ModelConfig, snap: Snapshot) -> str:
    """``cuda`` or ``cpu`` for ``model``: its ``device`` setting, or a GPU when the snapshot has one."""
    if model.device != "auto":
        return model.device
    return "cuda" if any(d.kind == "cuda" for d in snap.devices) else "cpu"


def read_snapshot(inventory: Inventory, usages: Sequence[Usage], budget: int | None) -> Snapshot:
    """The inventory now, our engines' process trees walked (blocking: run it in a thread).
    Raises :class:`~server.gpus.nvml.NvmlError` on a driver error."""
    engines = [EngineUsage(u.model, tree_pids(u.pid), u.devices, u.share_bytes, u.ready)
               for u in usages]
    return with_cpu_budget(inventory.snapshot(engines), budget)


def placement_inputs(inventory: Inventory, usages: Sequence[Usage], model: ModelConfig,
                     settings: Settings, index: int = 0) -> tuple[Snapshot, Requirement]:
    """A fresh snapshot and what replica ``index`` of ``model`` needs on it (reads its config.json
    and safetensors headers). An upstream needs nothing here (``kind`` ``remote``). Blocking: run
    it in a thread."""
    if model.upstream(index) is not None:
        return Snapshot((), {}, "remote"), Requirement(model.name, 0, overhead_bytes=0, kind="remote")
    snap = read_snapshot(inventory, usages, settings.cpu_memory_budget)
    kind = device_kind(model, snap)
    cpu_engines = sum(1 for m in settings.models if device_kind(m, snap) == "cpu")
    cpu_dev = next(d for d in snap.devices if d.kind == "cpu")
    return snap, requirement_for(model, kind, kv_sequences=settings.kv_cache_sequences,
                                 available_ram=cpu_dev.free_bytes, cpu_engines=cpu_engines)


async def served_max_model_len(client: Any, engine: Engine) -> int | None:
    """The context length (tokens) an engine serves, from its ``GET /v1/models``
    (``max_model_len`` of vLLM's model card: the card named ``engine.served_name`` on a server
    that serves several, else the first); ``None`` when it does not say."""
    got = await probe(client, engine.base_url + "/v1/models", 5, engine.headers)
    try:
        cards = json.loads(got[1])["data"] if got else []
        card = next((c for c in cards if c.get("id") == engine.served_name), cards[0] if cards else {})
        value = card.get("max_model_len")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def watch(engine: Engine, client: Any, interval: float) -> str:
    """Wait until the engine exits or fails :data:`HEALTH_FAILURES` health checks in a row (one
    every ``interval`` seconds); says which. An unhealthy engine is stopped before returning."""
    exited = asyncio.ensure_future(engine.exited())
    failed = 0
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=interval)
            if done:
                return exited.result()
            got = await probe(client, engine.health_url, 5, engine.headers)
            ok = got is not None and got[0] == 200
            failed = 0 if ok else failed + 1
            if failed >= HEALTH_FAILURES:
                await engine.stop()
                return f"failed {failed} health checks in a row"
    finally:
        exited.cancel()


@dataclass(frozen=True)
class RunContext:
    """What a runner needs besides its engine: the model, the HTTP session, the health-check
    interval (seconds), a way to measure the engine once healthy (bytes per device; ``None`` on the
    CPU) and whether to read the model's profile again once it is up (a hub model)."""

    model: ModelConfig
    client: Any  # the gateway's aiohttp session (server.proxy)
    health_interval: float
    measure: Callable[[], Awaitable[int | None]] | None
    reread_profile: bool
    offload: Callable[..., Awaitable[Any]] = asyncio.to_thread  # runs the blocking file reads


async def run_engine(engine: Engine, ctx: RunContext, ready: Callable[[ReadyInfo], None],
                     failed: Callable[[VramgateError], None], exited: Callable[[str], None]) -> None:
    """Start ``engine`` and follow it to its end: ``ready(info)`` once it is healthy, then
    ``exited(reason)``; or ``failed(error)`` when it never became healthy. Cancelled by
    :func:`stop_engine`."""
    name = ctx.model.name
    t0 = time.monotonic()
    try:
        await engine.start()
        await engine.ready(ctx.model.startup_timeout, ctx.client)
    except (EngineStartError, OSError) as exc:
        await engine.stop()
        failed(exc if isinstance(exc, EngineStartError) else
               EngineStartError(f"engine for {name} could not be started: {exc}"))
        return
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug or an odd model folder: fail the model, keep the gateway
        log.exception("engine for %s: unexpected error", name)
        await engine.stop()
        failed(ModelUnavailable(f"vramgate could not run {name}: {exc.__class__.__name__}: {exc}",
                                retry_after=30))
        return
    seconds = time.monotonic() - t0
    max_len = await served_max_model_len(ctx.client, engine)
    fresh = None
    if ctx.reread_profile:  # a hub model: vLLM has downloaded it by now
        fresh = (await ctx.offload(read_profiles, (ctx.model,)))[name]
    measured = None
    if ctx.measure is not None:
        try:
            measured = await ctx.measure()
        except Exception as exc:  # the estimate stays in the books
            log.warning("could not measure %s: %s", name, exc)
    ready(ReadyInfo(max_len, measured, seconds, fresh))
    exited(await watch(engine, ctx.client, ctx.health_interval))


async def stop_engine(engine: Engine | None, runner: asyncio.Task | None) -> None:
    """Cancel the engine's runner (wherever it is: starting, watching), then stop the engine."""
    if runner is not None and not runner.done() and runner is not asyncio.current_task():
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    if engine is not None:
        await engine.stop()


def failure_error(model: str, reason: str, log_path: Path | None) -> ModelUnavailable:
    """The 503 for requests that find a model whose engine failed (with its log's last lines,
    when it has a log: an upstream has none here)."""
    if log_path is None:
        return ModelUnavailable(f"the engine for {model} {reason}", retry_after=5)
    tail = log_tail(log_path, 20)
    return ModelUnavailable(f"the engine for {model} {reason}; last lines of its log:\n{tail}",
                            retry_after=5)


class GroupRecords:
    """Process groups of this gateway's engines, one file each under ``folder``
    (``<pgid>.json``: the gateway instance and its pid and start time). Blocking file and process
    reads: call from a thread, or where a few milliseconds do not matter (an engine start)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.instance = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def record(self, pgid: int, model: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = psutil.Process()
        (self.folder / f"{pgid}.json").write_text(json.dumps(
            {"pgid": pgid, "model": model, "instance": self.instance, "pid": me.pid,
             "started": me.create_time()}))

    def forget(self, pgid: int) -> None:
        (self.folder / f"{pgid}.json").unlink(missing_ok=True)

    def reap(self) -> list[int]:
        """Kill what is left of engines recorded by gateways that are gone; returns the pids
        killed. A group whose gateway still runs (another gateway on this data dir) is left."""
        killed: list[int] = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                rec = json.loads(path.read_text())
                pgid, instance = int(rec["pgid"]), str(rec["instance"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if instance == self.instance or _alive(int(rec.get("pid", 0)), rec.get("started")):
                continue
            ours = [pid for pid in group_members(pgid) if _marked(pid, instance)]
            if ours:
                log.warning("reaping %d process(es) of %s's engine left by an earlier gateway "
                            "(process group %d)", len(ours), rec.get("model"), pgid)
                kill_group(pgid)
                killed += ours
            path.unlink(missing_ok=True)
        return killed


def _alive(pid: int, started: Any) -> bool:
    try:
        return pid > 0 and abs(psutil.Process(pid).create_time() - float(started)) < 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


def _marked(pid: int, instance: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(MARK) == instance
    except psutil.Error:
        return False
