"""Lifecycle policies (pure): which replica serves, which idle engines unload, when a crashed model
may restart. Plain functions over plain data; the clock is an argument (seconds, monotonic)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

# Restart back-off after failures (engine exits, failed health checks, failed starts): 2 s after
# the first, doubling per failure within RESTART_WINDOW, at most RESTART_CAP; MAX_FAILURES failures
# within the window and the model stays failed until it is loaded by hand or the config reloads.
RESTART_BASE = 2.0
RESTART_CAP = 120.0
RESTART_WINDOW = 600.0
MAX_FAILURES = 5
# A replica chosen for prefix affinity is passed over once it has this many more requests in flight
# than the least-loaded ready replica: vLLM batches concurrent requests well, so a few more on the
# replica that holds the prefix in its cache cost less than a cold prefill elsewhere.
AFFINITY_SLACK = 4


@dataclass(frozen=True)
class ReplicaView:
    """What the policies need of one engine replica. ``last_used`` is when its last request ended
    (or when it became ready), in the same clock as ``now``."""

    key: str
    model: str
    ready: bool
    in_flight: int
    last_used: float


def pick_replica(replicas: Sequence[ReplicaView], affinity: str | None = None,
                 slack: int = AFFINITY_SLACK) -> str | None:
    """The ready replica to send a request to, or ``None`` when none is ready.

    Without ``affinity``: the one with the fewest outstanding requests (ties: the first). With
    ``affinity`` (a key derived from the request's prompt prefix): the ready replica that
    rendezvous hashing assigns to that key, so requests sharing a prefix meet vLLM's prefix cache
    on one engine, unless it has ``slack`` or more requests in flight beyond the least-loaded one.
    """
    ready = [r for r in replicas if r.ready]
    if not ready:
        return None
    least = min(ready, key=lambda r: r.in_flight)
    if affinity is None or len(ready) == 1:
        return least.key
    home = max(ready, key=lambda r: zlib.crc32(f"{r.key}|{affinity}".encode()))
    return home.key if home.in_flight - least.in_flight < slack else least.key


def idle_expired(replicas: Sequence[ReplicaView], ttl: dict[str, float], waiting: dict[str, int],
                 now: float) -> list[str]:
    """Keys of the ready replicas to unload: idle (nothing in flight, nobody waiting for the model)
    for at least the model's ``ttl`` seconds since their last request ended. ``ttl`` 0 = never."""
    out = []
    for r in replicas:
        limit = ttl.get(r.model, 0)
        if (r.ready and limit > 0 and r.in_flight == 0 and waiting.get(r.model, 0) == 0
                and now - r.last_used >= limit):
            out.append(r.key)
    return out


def restart_delay(failures: Sequence[float], now: float, give_up: bool = True) -> float | None:
    """Seconds to wait before the next start, given the times of earlier failures.

    0 when there were none in the last ``RESTART_WINDOW`` seconds; else ``RESTART_BASE × 2^(n-1)``
    (capped at ``RESTART_CAP``) counted from the latest failure; ``None`` once ``MAX_FAILURES``
    happened within the window: give up, the model is ``failed``. Without ``give_up`` (a model
    served only by upstreams on other hosts, which come back by themselves after a reboot) the
    wait stays at ``RESTART_CAP`` instead.
    """
    recent = sorted(t for t in failures if now - t < RESTART_WINDOW)
    if not recent:
        return 0.0
    if len(recent) >= MAX_FAILURES and give_up:
        return None
    wait = min(RESTART_CAP, RESTART_BASE * 2 ** (len(recent) - 1))
    return max(0.0, recent[-1] + wait - now)


def model_state(replica_states: Sequence[str], failed: bool) -> str:
    """One state for a model from its replicas': ``ready`` if any is, else ``loading`` if any is
    (a wake too), else ``sleeping`` if any is, else ``stopping`` if any is, else ``failed`` if its
    last start or engine failed, else ``unloaded``."""
    for state in ("ready", "loading", "sleeping", "stopping"):
        if state in replica_states:
            return state
    return "failed" if failed else "unloaded"
