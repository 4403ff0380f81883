"""An engine on another host: an OpenAI-compatible server (a vLLM server, or any other) that the
gateway fronts but does not start (config ``upstreams``). It is one more implementation of
:class:`server.supervisor.Engine`, so the scheduler treats it as it treats a local engine:
started (reached), health-checked, stopped (let go) and, when it fails its health checks, booked
as a failed replica and tried again after the back-off.

Health: vLLM answers ``GET /health`` (outside its ``--api-key``); a server without that route
(404/405) is checked with ``GET /v1/models`` and its API key instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from server.config import Upstream
from server.errors import EngineStartError
from server.proxy import probe

REACH_TIMEOUT = 10.0  # seconds an upstream has to answer its first health check


class RemoteEngine:
    """An upstream server as an engine. ``headers`` go with every request sent to it (its API
    key, read from ``api_key_env`` when built); ``served_name`` is the name it serves the model
    under. ``start()`` does nothing, ``ready()`` waits for a healthy answer (at most
    :data:`REACH_TIMEOUT` seconds, or the model's ``startup_timeout`` if shorter), ``exited()``
    returns once ``stop()`` lets it go: the process is not ours."""

    pid = None
    log_path = None

    def __init__(self, name: str, upstream: Upstream, served_name: str) -> None:
        self.name = name
        self.upstream = upstream
        self.served_name = upstream.model or served_name
        key = os.environ.get(upstream.api_key_env, "") if upstream.api_key_env else ""
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.health_path = "/health"
        self._gone = asyncio.Event()

    @property
    def base_url(self) -> str:
        return self.upstream.url

    @property
    def address(self) -> str:
        return self.upstream.url

    @property
    def health_url(self) -> str:
        return self.base_url + self.health_path

    async def start(self) -> None:
        self._gone.clear()

    async def ready(self, timeout: float, client: Any) -> float:
        """Poll its health until 200 (``/health``, or ``/v1/models`` where that route is
        missing); returns the seconds it took. Raises :class:`EngineStartError` after
        ``min(timeout, REACH_TIMEOUT)`` seconds."""
        t0 = time.monotonic()
        limit = min(timeout, REACH_TIMEOUT)
        last = "no answer"
        while True:
            got = await probe(client, self.health_url, 2.0, self.headers)
            if got is not None and got[0] in (404, 405) and self.health_path == "/health":
                self.health_path = "/v1/models"
                continue
            if got is not None and got[0] == 200:
                return time.monotonic() - t0
            last = f"status {got[0]}" if got is not None else "no answer"
            if time.monotonic() - t0 > limit:
                raise EngineStartError(f"the upstream {self.base_url} of {self.name} was not healthy "
                                       f"after {limit:g} s ({last} from {self.health_path})")
            await asyncio.sleep(0.5)

    async def exited(self) -> str:
        await self._gone.wait()
        return f"upstream {self.base_url} let go"

    async def stop(self) -> None:
        self._gone.set()
