"""Admission before the engine: per-model concurrency and bounded priority queues, and per-key
request rates. Decisions are pure functions; :class:`ModelGate` is the thin asyncio part.

- ``max_concurrency`` requests of a model may be at its engine(s) at once; further ones wait in a
  queue of at most ``max_queue``, lower ``priority`` first (``interactive`` = 0 before ``batch`` =
  10), first come first served within a priority, for at most ``queue_timeout`` seconds. A full
  queue or a wait past the timeout is a 503 ``queue_full`` / ``queue_timeout`` with ``Retry-After``
  (capacity: the same request may well succeed a moment later).
- A key with ``rpm`` may start that many requests in any 60 s window; beyond it a 429
  ``rate_limit_exceeded`` with ``Retry-After`` says when the oldest request leaves the window.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Deque

from server.errors import CapacityError

PRIORITIES = {"interactive": 0, "high": 0, "normal": 5, "batch": 10, "low": 10}


def parse_priority(value: str | None) -> int:
    """``X-Priority`` header → an int (lower runs first): a name of :data:`PRIORITIES` or an integer;
    missing or unreadable → ``normal`` (5)."""
    if value is None:
        return PRIORITIES["normal"]
    value = value.strip().lower()
    if value in PRIORITIES:
        return PRIORITIES[value]
    try:
        return int(value)
    except ValueError:
        return PRIORITIES["normal"]


def decide(running: int, queued: int, max_concurrency: int | None, max_queue: int | None) -> str:
    """``run`` (a slot is free and nobody queues before us), ``queue`` or ``reject``."""
    if max_concurrency is None or (running < max_concurrency and queued == 0):
        return "run"
    if max_queue is not None and queued >= max_queue:
        return "reject"
    return "queue"


def rate_check(times: Deque[float], now: float, rpm: int, window: float = 60.0) -> float:
    """Seconds until one more request is allowed (0 = now). ``times`` are the starts inside the
    window, oldest first; entries older than ``window`` are dropped from it here."""
    while times and now - times[0] >= window:
        times.popleft()
    if len(times) < rpm:
        return 0.0
    return max(0.001, times[0] + window - now)


class ModelGate:
    """One model's concurrency slots and waiting queue. ``enter()`` returns when the request may
    go to the engine; every successful ``enter()`` is matched by exactly one ``leave()``."""

    def __init__(self, max_concurrency: int | None, max_queue: int | None, timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.timeout = timeout
        self.running = 0
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    @property
    def queued(self) -> int:
        return sum(1 for *_, f in self._heap if not f.done())

    def try_enter(self) -> bool:
        """Take a slot now if one is free and nobody waits (no await: the common case costs no
        task); ``False`` means call :meth:`enter`."""
        if self.max_concurrency is None or (self.running < self.max_concurrency and not self._heap):
            self.running += 1
            return True
        return False

    async def enter(self, priority: int) -> None:
        """Wait for a slot; raises :class:`CapacityError` (queue full, or ``timeout`` seconds)."""
        verdict = decide(self.running, self.queued, self.max_concurrency, self.max_queue)
        if verdict == "run":
            self.running += 1
            return
        if verdict == "reject":
            raise CapacityError(f"the queue for this model is full ({self.max_queue} waiting, "
                                f"{self.running} running)", code="queue_full", retry_after=1)
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._seq), fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self.leave()  # the slot was handed to us just now: pass it on
            else:
                fut.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise CapacityError(f"waited {self.timeout:g} s in the queue for this model",
                                    code="queue_timeout", retry_after=1) from None
            raise

    def leave(self) -> None:
        """Free a slot, handing it to the first waiter in priority order."""
        while self._heap:
            *_, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # the slot passes on: running stays the same
                return
        self.running -= 1
