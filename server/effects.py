"""The effects the scheduler's decisions (``server.decisions``) return, as plain frozen data:
each names a waiter (its id), a replica (its key, ``model#index``) or a model, and the scheduler
(``server.scheduler_actions``) carries it out. ``Timeouts`` are the decisions' own settings."""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import VramgateError


@dataclass(frozen=True)
class Grant:
    """Give waiter ``waiter`` a lease on replica ``replica``."""

    waiter: int
    replica: str


@dataclass(frozen=True)
class Refuse:
    """Answer waiter ``waiter`` with ``error``."""

    waiter: int
    error: VramgateError


@dataclass(frozen=True)
class Start:
    """Create replicas ``indices`` of ``model`` and queue them for placement."""

    model: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Place:
    """Decide where replica ``replica`` goes (NVML read in a thread, then :func:`~server.decisions.place`)."""

    replica: str


@dataclass(frozen=True)
class Launch:
    """Start the engine of placed replica ``replica``."""

    replica: str


@dataclass(frozen=True)
class Stop:
    """Stop the engine of replica ``replica``; ``reason`` (``idle``, ``evicted``, ``shutdown`` or a drain's) goes to the log and the metrics."""

    replica: str
    reason: str


@dataclass(frozen=True)
class Forget:
    """Drop model ``model`` (removed by a reload) once its replicas are gone."""

    model: str


@dataclass(frozen=True)
class Apply:
    """Apply model ``model``'s pending configuration (a reload) once its replicas are gone."""

    model: str


@dataclass(frozen=True)
class Sleep:
    """Put the idle engine of replica ``replica`` into vLLM's sleep mode (``server.sleep``)."""

    replica: str


@dataclass(frozen=True)
class Wake:
    """Wake the sleeping replicas ``indices`` of model ``model``: each is placed again on its own
    devices (evicting idle engines if its full budget must be made room for), then woken."""

    model: str
    indices: tuple[int, ...]


Action = Grant | Refuse | Start | Place | Launch | Stop | Forget | Apply | Sleep | Wake


@dataclass(frozen=True)
class Timeouts:
    """The decisions' settings: the wait for room that ends in a 503 (``place_wait``, seconds),
    and the batch-priority leases a model may hold while other requests run on it
    (``batch_beside``, the setting of that name)."""

    place_wait: float = 10.0
    batch_beside: int = 0
