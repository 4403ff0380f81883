"""What a configuration reload changes in the scheduler's books (runs in its owning task).

- A new model appears (and starts if ``preload``).
- A removed model refuses new requests (404), finishes its in-flight ones, then its engines stop.
- A model whose changes are all in :data:`LIVE_FIELDS` (limits, aliases, ttl, output and FIM
  settings) takes them at once: its engines keep running, and the new ``max_concurrency`` counts
  from the next grant on, against every lease already out.
- Any other change restarts the model once its in-flight requests have ended (requests arriving
  meanwhile wait); it starts again at once if it was running or is ``preload``.
- Every model's profile (tool-call parser, FIM format) is read again; a running engine keeps the
  tool-call parser it was started with.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from server.books import ModelBook, ModelState
from server.config import ModelConfig
from server.profile import Profile

if TYPE_CHECKING:
    from server.scheduler import Scheduler

LIVE_FIELDS = frozenset({"aliases", "pinned", "ttl", "preload", "max_concurrency", "max_queue",
                         "queue_timeout", "startup_timeout", "max_tokens_policy", "fim_template",
                         "fim_stop", "fim_max_tokens"})


def live_only(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether every difference between ``old`` and ``new`` is in :data:`LIVE_FIELDS`."""
    return all(getattr(old, f.name) == getattr(new, f.name)
               for f in dataclasses.fields(ModelConfig) if f.name not in LIVE_FIELDS)


def adopt(book: ModelBook, fresh: Profile) -> Profile:
    """``fresh``, keeping the tool-call parser the model's running engines were started with."""
    if all(r.state == ModelState.UNLOADED for r in book.replicas):
        return fresh
    return dataclasses.replace(fresh, tool_parser=book.profile.tool_parser,
                               tool_parser_source=book.profile.tool_parser_source)


def apply(sched: "Scheduler", settings: Any, profiles: dict[str, Profile]) -> dict[str, list[str]]:
    """Bring the books to ``settings`` (module docstring); returns the names ``added``,
    ``removed`` and ``changed``."""
    new = {m.name: m for m in settings.models}
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
    for name, book in sched.books.items():
        if name not in new and not book.retiring:
            book.retiring, book.pending = True, None
            out["removed"].append(name)
            for rep in book.replicas:
                sched._drain(rep, "removed")
    for name, model in new.items():
        book = sched.books.get(name)
        if book is None:
            out["added"].append(name)
            sched.books[name] = book = sched._book(model)
            if model.preload:
                from server.decisions import Start
                sched._do_start(Start(name, tuple(range(model.engines))), sched.clock())
            continue
        if book.retiring:  # removed, then added back before it was gone
            book.retiring = False
            out["added"].append(name)
        target = book.pending or book.config
        if target != model:
            if name not in out["added"]:
                out["changed"].append(name)
            if book.pending is None and live_only(book.config, model):
                book.config = model
            else:
                restart(sched, book, model)
        if name in profiles:
            book.profile = adopt(book, profiles[name])
    return out


def restart(sched: "Scheduler", book: ModelBook, model: ModelConfig) -> None:
    """Give ``book`` the configuration ``model`` once its engines have stopped (after their
    in-flight requests)."""
    running = any(r.state != ModelState.UNLOADED for r in book.replicas)
    book.restart = book.restart or running
    book.pending = model
    for rep in book.replicas:
        sched._drain(rep, "reload")
