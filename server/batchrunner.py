"""The Batch API's runner: one task per active batch carries it through OpenAI's status machine,
``validating`` → ``in_progress`` → ``finalizing`` → ``completed`` (or ``failed``, ``expired``,
``cancelling`` → ``cancelled``). Each batch's task is the only writer of that batch's row; the
runner's own timer task deletes expired files.

Every line is served by the request service (``Service.serve``), the same path as an interactive
request (rate limit, lease, forward, usage, metrics, access log with ``<batch id>:<custom_id>`` as
the request id), at priority ``batch`` (``admission.PRIORITIES``, after every other waiter; the
scheduler never cold-starts or evicts for it ahead of one), with at most ``batch_concurrency``
lines of one batch in flight. A refusal the gateway itself gives with 429 or 503 (a full queue,
no room, a loading engine) is retried after its ``Retry-After``: a batch waits for room; it is
never failed for it.

A result line is appended and fsynced (``batchstore.ResultFile``) as its answer arrives, so a
restart resumes a batch by skipping every ``custom_id`` already in its output or error file.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

from server.batchjob import BatchJob
from server.auth import ApiKey
from server.batchstore import BatchStore, owner_of
from server.errors import PermissionDenied

log = logging.getLogger("vramgate.batch")
WINDOW = re.compile(r"([0-9]{1,6})([smh])")  # fullmatch, ASCII digits only


def window_seconds(text: Any) -> int | None:
    """``completion_window`` (``24h``; ``90m`` or ``30s`` too, never over 24 h) in seconds, or
    ``None`` for a value that is not one."""
    m = WINDOW.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return None
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return seconds if 0 < seconds <= 86400 else None


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """The Batch object as answered (the runner's own ``_`` fields left out)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


class BatchRunner:
    """Runs the batches in ``store`` through ``service`` (a ``server.service.Service``).
    ``settings()`` gives the current ``Settings`` (a reload changes keys and models); ``clock``
    is Unix seconds."""

    def __init__(self, store: BatchStore, service: Any, settings: Callable[[], Any],
                 metrics: Any = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.service, self.settings, self.metrics, self.clock = (
            store, service, settings, metrics, clock)
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, dict[str, Any]] = {}  # id → the running batch's Batch object (its job's)
        self.cancelled: dict[str, asyncio.Event] = {}
        self.last_line: dict[str, float] = {}  # id → when its last line was answered (clock)
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        """Resume every batch a earlier run left active; start the file-expiry timer."""
        for doc, owner in await self.store.call(self.store.active_batches):
            self._spawn(doc, owner)
        self._timer = asyncio.ensure_future(self._expire_files())

    async def stop(self) -> None:
        """Stop every batch task (their rows stay active, and a restart resumes them)."""
        tasks = [*self.tasks.values(), *([self._timer] if self._timer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, doc: dict[str, Any], owner: str) -> None:
        """Run a batch just created (its row is stored already)."""
        self._spawn(doc, owner)

    def cancel(self, batch_id: str) -> None:
        """Ask a running batch to stop after its in-flight lines."""
        event = self.cancelled.get(batch_id)
        if event is not None:
            event.set()

    def _spawn(self, doc: dict[str, Any], owner: str) -> None:
        self.cancelled[doc["id"]] = asyncio.Event()
        if doc["status"] == "cancelling":
            self.cancelled[doc["id"]].set()
        self.live[doc["id"]] = doc
        task = asyncio.ensure_future(BatchJob(self, doc, owner).run())
        self.tasks[doc["id"]] = task
        task.add_done_callback(lambda _: self._forget(doc["id"]))

    def _forget(self, batch_id: str) -> None:
        self.tasks.pop(batch_id, None)
        self.live.pop(batch_id, None)
        self.cancelled.pop(batch_id, None)
        self.last_line.pop(batch_id, None)

    async def _expire_files(self) -> None:
        while True:
            for file_id in await self.store.call(self.store.expired_files, self.clock()):
                await self.store.call(self.store.delete_file, file_id)
                log.info("file %s expired and was deleted", file_id)
            await asyncio.sleep(60)  # a timer: files expire to the minute

    def key_for(self, owner: str) -> Any:
        """The configured key whose owner hash is ``owner`` (``None`` for ``""``); raises
        :class:`PermissionDenied` when that key is no longer configured."""
        if owner == "":
            return None
        auth = self.settings().auth
        keys = list(auth.api_keys)
        if auth.admin_key is not None:
            keys.append(ApiKey(auth.admin_key, name="admin"))
        for key in keys:
            if owner_of(key) == owner:
                return key
        raise PermissionDenied("The API key that created this batch is no longer configured.")

    def lines_queued(self) -> dict[str, int]:
        """Lines not yet answered, per model, over the running batches."""
        out: dict[str, int] = {}
        for doc in self.live.values():
            if doc["status"] == "in_progress":
                c = doc["request_counts"]
                out[doc["model"]] = out.get(doc["model"], 0) + c["total"] - c["completed"] - c["failed"]
        return out

    def seconds_since_progress(self) -> float:
        """The longest time (seconds) any in-progress batch has gone without a finished line."""
        now = self.clock()
        return max((now - last for batch_id, last in self.last_line.items()
                    if self.live.get(batch_id, {}).get("status") == "in_progress"), default=0.0)
