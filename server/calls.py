"""The plain data of one inference call, shared by the HTTP edge (``server.exchange``), the request
service (``server.service``) and a batch runner: the :class:`Call` going in, the :class:`Answer`
coming out, the ``watch`` through which the service learns the caller is gone, and the replica
affinity key of a prompt."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from server.config import ModelConfig
from server.validation import ParsedRequest

AFFINITY_CHARS = 512  # the prompt prefix that keys replica affinity (characters)
Watch = Callable[..., Awaitable[Any]]


def affinity_key(route: str, body: dict[str, Any]) -> str:
    """What requests that share a prompt prefix have in common: the first
    :data:`AFFINITY_CHARS` characters of their prompt, messages (with the system prompt) or input."""
    if route in ("/v1/completions", "/infill"):
        head = body.get("prompt")
    elif route == "/v1/responses":
        head = [body.get("instructions"), body.get("input")]
    else:
        head = [body.get("system"), body.get("messages")]
    text = head if isinstance(head, str) else json.dumps(head, separators=(",", ":"), default=str)
    return text[:AFFINITY_CHARS]


async def unwatched(aw: Awaitable[Any], undo: Callable[[Any], Any] | None = None) -> Any:
    """A ``watch`` for a caller that never leaves (a batch runner)."""
    return await aw


@dataclass
class Call:
    """One inference call. ``route`` is the public route (``/infill`` included); ``raw`` the body
    as sent and ``parsed`` its validated form (for ``/infill``, already a completion); ``key`` the
    API key (``server.auth.ApiKey``) or ``None``; ``priority`` lower first, ``None`` for the
    default (interactive for FIM, else normal); ``middle`` and ``warm``: ``/infill``'s prompt and
    whether it only warms the cache (``n_predict`` 0); ``retried``: the caller tries a refusal of
    the gateway's own (429, 503) again later (the batch runner), so such a refusal is no answer
    and is not recorded (no metrics, no access-log line, no alert fed by it)."""

    route: str
    raw: bytes
    parsed: ParsedRequest
    model: ModelConfig
    key: Any = None
    priority: int | None = None
    request_id: str = ""
    middle: str = ""
    warm: bool = False
    retried: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def engine_route(self) -> str:
        return "/v1/completions" if self.route == "/infill" else self.route


@dataclass
class Answer:
    """What a call produced: a whole ``body`` (with ``media_type``), or a ``stream`` of bytes whose
    ``finalize(complete)`` must be called once it ends. ``headers`` go with it."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    media_type: str = "application/json"
    stream: AsyncIterator[bytes] | None = None
    finalize: Callable[[bool], None] | None = None
