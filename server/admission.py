"""Admission before the engine: per-model concurrency and bounded priority queues, and per-key
request rates (pure functions). The scheduler (``server.scheduler``, ``server.decisions``) applies
the per-model limits; the routes apply the rates.

- ``max_concurrency`` requests of a model may be at its engine(s) at once; further ones wait in a
  queue of at most ``max_queue``, lower ``priority`` first (``interactive`` = 0 before ``batch`` =
  10), first come first served within a priority, for at most ``queue_timeout`` seconds. A full
  queue or a wait past the timeout is a 503 ``queue_full`` / ``queue_timeout`` with ``Retry-After``
  (capacity: the same request may well succeed a moment later).
- A key with ``rpm`` may start that many requests in any 60 s window; beyond it a 429
  ``rate_limit_exceeded`` with ``Retry-After`` says when the oldest request leaves the window.
"""

from __future__ import annotations

from typing import Deque


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
