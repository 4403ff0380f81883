"""``create_app``: the Starlette application and its lifespan (no module-level app)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from server import admin, api, batchapi, console, localsock
from server.accesslog import AccessLog
from server.batchrunner import BatchRunner
from server.batchstore import BatchStore
from server.auth import AuthConfig, AuthMiddleware
from server.cors import LOOPBACK_BINDS, Cors
from server.engineclient import EngineClient
from server.requestid import RequestIdMiddleware
from server.config import Settings
from server.errors import ConfigError
from server.gpus import Inventory, make_inventory
from server.metrics import Metrics
from server.books import ModelState
from server.scheduler import Launcher, Scheduler
from server.service import Service
from server.supervisor import GroupRecords
from server.profile import read_profiles
from server.proxy import new_session
from server.traffic import Traffic, read_totals
from server.validation import ROUTES, routes_for_task

log = logging.getLogger("vramgate.app")


@dataclass
class GatewayState:
    """What every request sees as ``request.state``: the scheduler (``pool``), the request
    service, the metrics, the start time (Unix seconds), the reload function, the batch runner and
    the console's traffic samples, and the keys in force."""

    pool: Scheduler
    service: Service
    metrics: Metrics
    started: int
    reload: Callable[[], Awaitable[dict]]
    batches: BatchRunner
    traffic: Traffic
    auth: AuthConfig  # the keys the middleware checks: the startup ones (a reload keeps them)


def reloader(pool: Scheduler, reload: Callable[[], Settings] | None, access: AccessLog
             ) -> Callable[[], Awaitable[dict]]:
    """The reload function of ``POST /admin/reload`` and SIGHUP: reads the configuration and the
    models' files again (in a thread) and hands them to the scheduler (and ``access_log`` to the
    access log); returns what changed. Raises :class:`ConfigError` (nothing changed then)."""
    async def do_reload() -> dict:
        if reload is None:
            raise ConfigError("this server was started without a configuration to reload")

        def read() -> tuple[Settings, dict]:
            new = reload()
            return new, read_profiles(new.models)
        new, profiles = await asyncio.to_thread(read)
        changes = await pool.reconfigure(new, profiles)
        access.enabled = new.access_log
        log.info("configuration reloaded: %s", changes)
        return changes
    return do_reload


def shutdown_starter(pool: Scheduler, settings: Settings, upstreams: set,
                     background: set) -> Callable[[], None]:
    """What a SIGTERM starts: the scheduler admits nothing new, and the engine responses still
    being relayed are cut (with an error event) a second before ``shutdown_timeout``."""
    def begin_shutdown() -> None:
        pool.begin_shutdown()
        log.info("shutting down: admitting nothing new, %d requests in flight get up to %g s",
                 len(upstreams), settings.shutdown_timeout)

        async def cut_late() -> None:  # end them with an error event before uvicorn cancels
            await asyncio.sleep(max(0.0, settings.shutdown_timeout - 1.0))
            for resp in list(upstreams):
                resp.close()
        in_background(background, cut_late())
    return begin_shutdown


def traffic_reader(metrics: Metrics, pool: Scheduler) -> Callable[[], dict]:
    """What the traffic sampler reads: the request, token, rejection and TTFT counters of the
    gateway's registry, and each model's queue, as ``server.traffic.Totals`` per model."""
    counters = (metrics.requests, metrics.tokens, metrics.rejections, metrics.ttft)

    def read() -> dict:
        samples = ((s.name, s.labels, s.value)
                   for c in counters for family in c.collect() for s in family.samples)
        return read_totals(samples, {name: m.waiting for name, m in pool.models().items()})
    return read


def in_background(background: set, aw: Awaitable[Any]) -> None:
    """Run ``aw`` as a task kept referenced in ``background`` until it ends."""
    task = asyncio.ensure_future(aw)
    background.add(task)
    task.add_done_callback(background.discard)


@asynccontextmanager
async def gateway(settings: Settings, devices: Inventory, launcher: Launcher | None,
                  reload: Callable[[], Settings] | None, clock: Callable[[], float],
                  access: AccessLog) -> AsyncIterator[tuple[GatewayState, Callable[[], None]]]:
    """The running gateway: the metrics, the models' profiles, the reaping of engines an earlier
    gateway on this data dir left, the HTTP clients (aiohttp's session, and the engine client of
    the engines on sockets), the scheduler, the request service and the batch runner (its SQLite
    store in ``<data_dir>/batches``), its access lines to ``access``; a SIGHUP reloads. Yields
    the state and the function that begins a shutdown; on exit every engine is stopped."""
    metrics = Metrics({m.name: routes_for_task(m.task) for m in settings.models},
                      [s.value for s in ModelState])
    profiles = await asyncio.to_thread(read_profiles, settings.models)
    records = GroupRecords(settings.data_dir / "run" / "engines")
    # Engines an earlier gateway on this data dir left running (it was killed) go first.
    await asyncio.to_thread(records.reap)
    sockets, own_sockets = (await asyncio.to_thread(localsock.socket_dir, settings.data_dir)
                            if localsock.supported() else (None, False))
    session = new_session(sockets)  # aiohttp: the control plane, engines on ports, upstreams
    local = EngineClient(sockets) if sockets is not None else None  # the data path on sockets
    pool = Scheduler(settings, devices, launcher=launcher, events=metrics, profiles=profiles,
                     records=records, clock=clock, session=session, socket_dir=sockets)
    do_reload = reloader(pool, reload, access)
    upstreams: set = set()  # engine responses being read, cut short before a forced exit
    background: set = set()  # the reload and shutdown tasks, kept referenced

    async def reload_logged() -> None:
        try:
            await do_reload()
        except ConfigError as exc:
            log.error("configuration not reloaded: %s", exc)

    loop = asyncio.get_running_loop()
    # A SIGHUP handler only where a loop can have one: a platform with SIGHUP (not Windows), and
    # the main thread (an embedding application may run the app's loop on another).
    sighup = hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()
    if sighup:  # the handler only enqueues
        loop.add_signal_handler(signal.SIGHUP, lambda: in_background(background, reload_logged()))
    pool.start()
    service = Service(pool, metrics, session, upstreams=upstreams, access=access, local=local)
    store = await asyncio.to_thread(BatchStore, settings.data_dir / "batches")
    batches = BatchRunner(store, service, lambda: pool.settings, metrics)
    traffic = Traffic(settings.traffic_interval)
    sampler = asyncio.ensure_future(traffic.run(traffic_reader(metrics, pool)))
    try:
        await batches.start()  # batches an earlier run left active resume
        yield (GatewayState(pool, service, metrics, int(time.time()), do_reload, batches, traffic,
                            settings.auth),
               shutdown_starter(pool, settings, upstreams, background))
    finally:
        sampler.cancel()
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        await batches.stop()
        await asyncio.to_thread(store.close)
        await pool.stop_all()
        await session.close()
        if local is not None:
            local.close()
        if sockets is not None:
            localsock.remove_dir(sockets, own_sockets)


def create_app(settings: Settings, *, launcher: Launcher | None = None,
               inventory: Inventory | None = None,
               reload: Callable[[], Settings] | None = None,
               clock: Callable[[], float] = time.monotonic,
               access: AccessLog | None = None) -> Edge:
    """Build the gateway for ``settings``: an :class:`Edge` around the Starlette application.

    ``inventory`` (default: NVML, or the simulated layout of ``settings.simulate_gpus``) and
    ``launcher`` (builds each engine process) are injectable. On startup every model is placed and
    its engine started in the background; on shutdown every engine is stopped (SIGTERM → grace →
    SIGKILL). ``reload`` reads the configuration again, for SIGHUP and ``POST /admin/reload``.
    ``access``: where access lines go (default: through ``logging``; ``vramgate serve`` writes
    them to stderr directly, ``server.accesslog``).
    Raises :class:`~server.errors.ConfigError` for a bad ``simulate_gpus``.
    """
    devices = inventory or make_inventory(settings.simulate_gpus)
    access = access or AccessLog()
    access.enabled = settings.access_log

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        try:
            async with gateway(settings, devices, launcher, reload, clock, access) as (state, begin_shutdown):
                # uvicorn's signal handler calls this; it only enqueues (see cli.GatewayServer).
                loop = asyncio.get_running_loop()
                app.state.begin_shutdown = lambda: loop.call_soon_threadsafe(begin_shutdown)
                yield vars(state)
        finally:  # the last lines (a batch line ended by the stop): uvicorn re-raises SIGTERM
            access.flush()  # once it has served, so nothing after this runs then

    app = Starlette(routes=api.routes + batchapi.routes + admin.routes + console.routes,
                    lifespan=lifespan,
                    exception_handlers={HTTPException: api.http_error, Exception: api.server_error})
    app.router.redirect_slashes = False
    return Edge(app, settings, access)


class Edge:
    """What :func:`create_app` returns (ASGI): the gateway's own layers around Starlette, which
    serves every route but the inference ones. From the outside in: the CORS and host checks
    (preflights need no key, and a 401 carries the CORS headers), the request id, the key check
    and the inference fast path (``api.InferenceFastPath``, which answers its own bugs with a
    500 in the route's shape). Outside Starlette's error middleware, a streamed chunk passes one
    send wrapper fewer (issue #15), and a 500 from any route carries the request id. ``state``
    is Starlette's."""

    def __init__(self, app: Starlette, settings: Settings, access: AccessLog) -> None:
        self.starlette = app
        auth = settings.auth
        self.handler = Cors(
            RequestIdMiddleware(AuthMiddleware(api.InferenceFastPath(app), auth=auth),
                                log_format=settings.log_format, access=access, direct=ROUTES),
            origins=auth.cors_origins, hosts=auth.allowed_hosts,
            check_host=settings.host in LOOPBACK_BINDS)

    @property
    def state(self) -> Any:
        return self.starlette.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)
