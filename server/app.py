"""``create_app``: the Starlette application and its lifespan (no module-level app)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from server import api
from server.config import Settings
from server.gpus import Inventory, make_inventory
from server.metrics import Metrics
from server.pool import Launcher, ModelPool, ModelState, default_launcher
from server.proxy import new_session
from server.validation import routes_for_task


def create_app(settings: Settings, *, launcher: Launcher = default_launcher,
               inventory: Inventory | None = None) -> Starlette:
    """Build the gateway for ``settings``.

    ``inventory`` (default: NVML, or the simulated layout of ``settings.simulate_gpus``) and
    ``launcher`` (builds each engine process) are injectable. On startup every model is placed and
    its engine started in the background; on shutdown every engine is stopped (SIGTERM → grace →
    SIGKILL). Raises :class:`~server.errors.ConfigError` for a bad ``simulate_gpus``.
    """
    devices = inventory or make_inventory(settings.simulate_gpus)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        pool = ModelPool(settings, devices, launcher=launcher)
        metrics = Metrics({m.name: routes_for_task(m.task) for m in settings.models},
                          [s.value for s in ModelState])
        session = new_session()
        pool.start_all()
        try:
            yield {"settings": settings, "pool": pool, "metrics": metrics, "session": session,
                   "started": int(time.time())}
        finally:
            await pool.stop_all()
            await session.close()

    app = Starlette(routes=api.routes, lifespan=lifespan,
                    exception_handlers={HTTPException: api.http_error})
    app.router.redirect_slashes = False
    return app
