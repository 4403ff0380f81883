"""One batch while it runs (``server.batchrunner`` starts them): validate the input file, serve
its lines at ``batch`` priority with a bounded number in flight, append each result as it comes,
and finalize into the output and error files. :class:`BatchJob` is the only writer of its row."""

from __future__ import annotations

import asyncio
import json
import hashlib
import logging
import re
import sqlite3
from typing import TYPE_CHECKING, Any

from server.admission import PRIORITIES
from server.auth import allowed
from server.batchcheck import check_lines, read_tasks
from server.batchstore import ResultFile, new_id, read_results, result_line, usage_of
from server.calls import Call
from server.errors import (InvalidRequest, ModelNotFound, PermissionDenied, UpstreamError,
                           VramgateError, error_body)
from server.validation import validate

if TYPE_CHECKING:
    from server.batchrunner import BatchRunner

log = logging.getLogger("vramgate.batch")
RESULT_TTL = 30 * 86400  # seconds a result file is kept (OpenAI's default for batch output)
RETRY_MAX = 30.0  # seconds, the longest wait before a refused line is tried again
SAVE_EVERY = 1.0  # seconds between writes of a running batch's row
SAFE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,64}")  # fullmatch: what a request id may hold


def line_request_id(batch_id: str, custom_id: str) -> str:
    """A line's request id: ``<batch id>:<custom_id>`` when the custom_id is up to 64 safe
    characters (``requestid``'s), else ``<batch id>:<a hash of it>``: it goes in a header and
    the log, where control characters and huge ids do not belong."""
    if not SAFE_ID.fullmatch(custom_id):
        custom_id = "h" + hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{batch_id}:{custom_id}"


class Retry(Exception):
    """The gateway refused a line for now (429/503 of its own): try it again after ``delay`` s."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


class BatchJob:
    """One batch while it runs; :meth:`run` is the whole of it, and the only writer of its row."""

    def __init__(self, runner: BatchRunner, doc: dict[str, Any], owner: str) -> None:
        self.runner, self.store, self.doc, self.owner = runner, runner.store, doc, owner
        self.clock = runner.clock
        self.saved = 0.0
        self.broken: BaseException | None = None  # a result that could not be written
        self.halt = asyncio.Event()  # set with ``broken``: no more lines start

    async def save(self, progressed: bool = False) -> None:
        """Write the row; after a line at most every :data:`SAVE_EVERY` seconds (a restart
        counts the lines from the result files, so the row only needs to be near)."""
        now = self.clock()
        if progressed and now - self.saved < SAVE_EVERY:
            return
        self.saved = now
        await self.store.call(self.store.put_batch, self.doc, progressed=now if progressed else None)

    async def move(self, status: str) -> None:
        self.doc["status"] = status
        self.doc[f"{status}_at"] = int(self.clock())
        await self.save()
        log.info("batch %s: %s", self.doc["id"], status)

    async def run(self) -> None:
        try:
            if self.doc["status"] == "validating":
                await self.validate()
            if self.doc["status"] in ("in_progress", "cancelling"):
                await self.execute()
            if self.doc["status"] == "finalizing":
                await self.finalize("completed")
        except (OSError, sqlite3.Error) as exc:  # a full disk, most often: this batch fails
            log.error("batch %s failed: %s", self.doc["id"], exc)
            await self.fail("server_error", f"Storing the batch failed: {exc}")
        except PermissionDenied as exc:  # its key was removed by a reload
            await self.fail("invalid_api_key", exc.message)
        except Exception as exc:  # a fault of ours: the batch fails, it never stays active
            log.exception("batch %s failed", self.doc["id"])
            await self.fail("server_error", f"The gateway failed on this batch: {exc}")

    async def fail(self, code: str, message: str) -> None:
        """End in ``failed`` with one error, keeping the results written so far."""
        self.doc["errors"] = {"object": "list", "data": [
            {"code": code, "line": None, "param": None, "message": message}]}
        try:
            await self.register_results()
        except (OSError, sqlite3.Error) as exc:
            log.error("batch %s: its partial results could not be kept: %s", self.doc["id"], exc)
        self.doc["status"], self.doc["failed_at"] = "failed", int(self.clock())
        try:
            await self.save()
        except (OSError, sqlite3.Error) as exc:  # its row stays active: a restart tries again
            log.error("batch %s: its failure could not be stored: %s", self.doc["id"], exc)
        log.info("batch %s: failed (%s)", self.doc["id"], code)

    async def validate(self) -> None:
        """Check the input file (``batchcheck``): ``failed`` with its errors, or ``in_progress``."""
        settings, endpoint = self.runner.settings(), self.doc["endpoint"]
        key = self.runner.key_for(self.owner)

        def known(name: str) -> tuple[str, str] | None:
            model = settings.resolve(name)
            if model is None or not allowed(key, (model.name, *model.aliases)):
                return "model_not_found", (f"The model {name!r} does not exist or this key may "
                                           "not use it.")
            if model.task != ("embed" if endpoint == "/v1/embeddings" else "generate"):
                return "model_not_supported", (f"The model {name!r} serves {model.task} requests "
                                               f"and cannot answer {endpoint}.")
            return None
        path = self.store.path_for(self.doc["input_file_id"])

        def check() -> Any:
            with open(path, "rb") as f:
                return check_lines(f, endpoint, path.stat().st_size, known)
        checked = await self.store.call(check)
        if checked.errors:
            self.doc["errors"] = {"object": "list", "data": checked.errors}
            await self.move("failed")
            return
        if self.runner.cancelled[self.doc["id"]].is_set():
            await self.move("cancelling")
            await self.finalize("cancelled")
            return
        self.doc["model"] = settings.resolve(checked.model).name
        self.doc["request_counts"]["total"] = len(checked.custom_ids)
        self.doc["_output"], self.doc["_error"] = new_id("file-"), new_id("file-")
        await self.move("in_progress")

    # ---- running the lines --------------------------------------------------------------------
    def result_paths(self) -> tuple[Any, Any]:
        return self.store.path_for(self.doc["_output"]), self.store.path_for(self.doc["_error"])

    def finished(self) -> set[str]:
        """The custom_ids already answered (read from the result files: a restart resumes)."""
        counts = self.doc["request_counts"]
        counts["completed"] = counts["failed"] = 0
        self.doc["usage"] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                     "input_tokens_details": {"cached_tokens": 0},
                                     "output_tokens_details": {"reasoning_tokens": 0}}
        out, err = self.result_paths()
        done: set[str] = set()
        for path, kind in ((out, "completed"), (err, "failed")):
            for line in read_results(path):
                done.add(line["custom_id"])
                counts[kind] += 1
                if line.get("response"):
                    self.count_usage(line["response"]["body"])
        return done

    def count_usage(self, body: Any) -> None:
        inp, out = usage_of(body)
        usage = self.doc["usage"]
        usage["input_tokens"] += inp
        usage["output_tokens"] += out
        usage["total_tokens"] += inp + out

    async def execute(self) -> None:
        out_path, err_path = self.result_paths()
        done = await self.store.call(self.finished)
        path = self.store.path_for(self.doc["input_file_id"])

        def todo() -> list[dict[str, Any]]:
            with open(path, "rb") as f:
                return [t for t in read_tasks(f) if t["custom_id"] not in done]
        tasks = await self.store.call(todo)
        files = await self.store.call(lambda: (ResultFile(out_path), ResultFile(err_path)))
        try:
            await self.serve_all(tasks, *files)
        finally:
            await self.store.call(lambda: [f.close() for f in files])

    async def serve_all(self, tasks: list[dict[str, Any]], out: ResultFile, err: ResultFile) -> None:
        """Serve ``tasks`` (the lines not answered yet) and end the batch; its lines in flight
        are cancelled with it (a shutdown: their answers are lost, and a restart runs them)."""
        running: set[asyncio.Task] = set()
        try:
            await self._serve_all(tasks, out, err, running)
        except BaseException:
            for line in running:
                line.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _serve_all(self, tasks: list[dict[str, Any]], out: ResultFile, err: ResultFile,
                         running: set[asyncio.Task]) -> None:
        runner, batch_id = self.runner, self.doc["id"]
        cancel = runner.cancelled[batch_id]
        key = runner.key_for(self.owner)
        slots = asyncio.Semaphore(max(1, runner.settings().batch_concurrency))
        deadline = self.doc["expires_at"]
        self.publish()
        pending = list(reversed(tasks))
        def going() -> bool:
            return not cancel.is_set() and not self.halt.is_set() and self.clock() < deadline

        async def until(*aws: Any) -> None:  # one of aws, a cancel, a failed write or the deadline
            stops = [asyncio.ensure_future(cancel.wait()), asyncio.ensure_future(self.halt.wait())]
            await asyncio.wait({*aws, *stops}, timeout=max(0.0, deadline - self.clock()),
                               return_when=asyncio.FIRST_COMPLETED)
            for stop in stops:
                stop.cancel()
        while pending and going():
            acquire = asyncio.ensure_future(slots.acquire())
            await until(acquire)
            if not acquire.done() or acquire.cancelled():
                acquire.cancel()
                break
            if not going():
                slots.release()
                break
            task = pending.pop()
            line = asyncio.ensure_future(self.line(task, key, out, err, slots, deadline))
            running.add(line)
            line.add_done_callback(running.discard)
        while running and going():
            await until(*running)
        if self.broken is not None:
            for line in running:
                line.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise self.broken
        if cancel.is_set():
            if self.doc["status"] != "cancelling":
                await self.move("cancelling")
            await asyncio.gather(*running, return_exceptions=True)  # in-flight lines finish
            await self.finalize("cancelled")
        elif pending or running:
            await self.expire(running, err)
        else:
            await self.move("finalizing")

    async def line(self, task: dict[str, Any], key: Any, out: ResultFile, err: ResultFile,
                   slots: asyncio.Semaphore, deadline: float) -> None:
        """Serve one line until it has an answer (retrying the gateway's own refusals), then
        append it to its file."""
        cid = task["custom_id"]
        request_id = line_request_id(self.doc["id"], cid)
        try:
            while True:
                try:
                    status, body = await self.serve(task["body"], key, request_id)
                    break
                except Retry as again:
                    await asyncio.sleep(min(again.delay, max(0.0, deadline - self.clock())))
                    if self.clock() >= deadline:
                        return  # expire() writes it
                except Exception as exc:  # a fault of ours: the line gets a 500, the batch goes on
                    log.exception("batch line %s failed", request_id)
                    status, body = 500, error_body(f"The gateway failed on this line: {exc}",
                                                   "server_error", None, "internal_error")
                    break
            target = out if 200 <= status < 300 else err
            try:
                await self.store.call(target.append, [result_line(cid, request_id, status, body)])
                self.doc["request_counts"]["completed" if target is out else "failed"] += 1
                self.count_usage(body)
                self.publish()
                await self.save(progressed=True)
            except (OSError, sqlite3.Error) as exc:  # a full disk: the batch fails (serve_all)
                self.broken = self.broken or exc
                self.halt.set()
                return
            if self.runner.metrics is not None:
                outcome = "completed" if target is out else "failed"
                self.runner.metrics.batch_requests.labels(self.doc["model"], outcome).inc()
        finally:
            slots.release()

    async def serve(self, body: dict[str, Any], key: Any, request_id: str) -> tuple[int, Any]:
        """One line's request through the request service: (status, answer body). Raises
        :class:`Retry` for a refusal of the gateway's own (429, 502–504)."""
        route = self.doc["endpoint"]
        try:
            if body.get("stream"):
                raise InvalidRequest("stream is not supported in a batch.", param="body.stream")
            parsed = validate(route, body)
            model = self.runner.settings().resolve(parsed.model)
            if model is None:
                raise ModelNotFound(parsed.model)
            if not allowed(key, (model.name, *model.aliases)):
                raise PermissionDenied(f"This API key may not use the model '{parsed.model}'.")
            call = Call(route, json.dumps(body).encode(), parsed, model, key=key,
                        priority=PRIORITIES["batch"], request_id=request_id, retried=True)
            answer = await self.runner.service.serve(call)
        except VramgateError as exc:
            if exc.status in (429, 502, 503, 504) and not isinstance(exc, UpstreamError):
                raise Retry(min(RETRY_MAX, exc.retry_after or 1.0)) from None
            return exc.status, exc.envelope()
        try:
            return answer.status, json.loads(answer.body)
        except ValueError:
            return 502, error_body("The engine's answer is not JSON.", "server_error", None,
                                   "engine_bad_answer")

    def publish(self) -> None:
        """Mark now as this batch's last progress (the stalled-batch gauge reads it)."""
        self.runner.last_line[self.doc["id"]] = self.clock()

    # ---- the end ------------------------------------------------------------------------------
    async def expire(self, running: set[asyncio.Task], err: ResultFile) -> None:
        """Past the completion window: cancel the lines in flight and write every unanswered one
        to the error file with code ``batch_expired``."""
        for line in running:
            line.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        done = await self.store.call(self.finished)
        path = self.store.path_for(self.doc["input_file_id"])

        def write() -> None:
            with open(path, "rb") as f:
                lines = [result_line(t["custom_id"], "", None, None, {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window "
                               "expired."}) for t in read_tasks(f) if t["custom_id"] not in done]
            err.append(lines)
        await self.store.call(write)
        await self.store.call(self.finished)
        await self.finalize("expired")

    async def finalize(self, status: str) -> None:
        """Register the result files, then end in ``status``."""
        if self.doc["status"] not in ("finalizing", "cancelling"):
            await self.move("finalizing")
        await self.register_results()
        await self.move(status)

    async def register_results(self) -> None:
        """The non-empty result files become ``batch_output`` files (kept :data:`RESULT_TTL`
        seconds); empty ones are deleted."""
        now = int(self.clock())
        for field, private in (("output_file_id", "_output"), ("error_file_id", "_error")):
            if private not in self.doc:  # ended while validating: no result files
                continue
            path = self.store.path_for(self.doc[private])
            size = path.stat().st_size if path.exists() else 0
            if not size:
                path.unlink(missing_ok=True)
            elif self.doc.get(field) is None:
                name = "batch_" + ("output" if field == "output_file_id" else "error") + ".jsonl"
                await self.store.call(self.store.add_file, {
                    "id": self.doc[private], "owner": self.owner, "bytes": size,
                    "created_at": now, "filename": name, "purpose": "batch_output",
                    "status": "processed", "expires_at": now + RESULT_TTL, "path": str(path)})
                self.doc[field] = self.doc[private]
