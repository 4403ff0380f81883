"""``create_app``: the Starlette application and its lifespan (no module-level app)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from server import api
from server.config import Settings
from server.gpus import read_inventory
from server.metrics import Metrics
from server.pool import Launcher, ModelPool, ModelState, default_launcher
from server.proxy import new_session
from server.validation import routes_for_task


def create_app(settings: Settings, *, launcher: Launcher = default_launcher,
               gpu_count: int | None = None, available_ram: int | None = None) -> Starlette:
    """Build the gateway for ``settings``.

    ``gpu_count`` (default: what NVML reports) and ``available_ram`` in bytes (default: psutil) are
    injectable for tests; ``launcher`` builds each engine process. On startup every model's engine
    starts in the background; on shutdown every engine is stopped (SIGTERM → grace → SIGKILL).
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        gpus = len(read_inventory()) if gpu_count is None else gpu_count
        ram = psutil.virtual_memory().available if available_ram is None else available_ram
        pool = ModelPool(settings, gpu_count=gpus, available_ram=ram, launcher=launcher)
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
