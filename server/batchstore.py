"""The Batch API's persistent state: SQLite (standard library, WAL mode) in
``<data_dir>/batches/state.sqlite3``, with the files' bytes beside it in ``<data_dir>/batches/files/``.

Rows are plain dicts in the shape the OpenAI API answers (a File object, a Batch object), plus
``owner`` (who created it, :func:`owner_of`) and, for files, ``path``. Every method is blocking
and runs on the store's one thread (:meth:`BatchStore.call`), so the event loop never waits on the
disk and SQLite sees one writer.

Result files are appended line by line with an fsync after each (:class:`ResultFile`), so a kill
leaves at worst one partial last line, which :func:`read_results` drops on resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FILE_FIELDS = ("id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at",
               "status_details")
BATCH_JSON = ("errors", "metadata", "request_counts", "usage")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  id TEXT PRIMARY KEY, owner TEXT, bytes INTEGER, created_at INTEGER, filename TEXT,
  purpose TEXT, status TEXT, expires_at INTEGER, path TEXT);
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, owner TEXT, doc TEXT, status TEXT, created_at INTEGER, progressed_at REAL);
"""


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``file-…``, ``batch_…``, ``batch_req_…`` (24 hex digits)."""
    return f"{prefix}{secrets.token_hex(12)}"


def owner_of(key: Any) -> str:
    """Who owns what ``key`` (a ``server.auth.ApiKey`` or ``None``) creates: a hash of the key
    (never the key itself); ``""`` when the server has no keys."""
    return "" if key is None else hashlib.sha256(key.key.encode()).hexdigest()[:32]


class BatchStore:
    """The SQLite database and the files' folder. ``root`` is ``<data_dir>/batches``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vramgate-batchstore")
        self._db = sqlite3.connect(root / "state.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` (a method of this store, or any blocking file work) on the
        store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kw))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._db.close()

    # ---- files --------------------------------------------------------------------------------
    def path_for(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, row: dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO files VALUES (:id, :owner, :bytes, :created_at, :filename, "
                         ":purpose, :status, :expires_at, :path)", row)

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        found = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if found is None else dict(found)

    def list_files(self, owner: str | None, purpose: str | None, after: str | None, limit: int,
                   order: str) -> list[dict[str, Any]]:
        """Up to ``limit`` files, newest first for ``order`` ``desc``, after the cursor ``after``
        (a file id); ``owner`` ``None`` lists everyone's (the admin key)."""
        where, args = ["1"], []
        if owner is not None:
            where.append("owner = ?"), args.append(owner)
        if purpose:
            where.append("purpose = ?"), args.append(purpose)
        sign, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        if after:  # rowid: the order of creation, even within one second
            where.append(f"rowid {sign} COALESCE((SELECT rowid FROM files WHERE id = ?), "
                         f"{'1e18' if order == 'desc' else '-1'})")
            args.append(after)
        sql = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY rowid {direction} LIMIT ?"
        return [dict(r) for r in self._db.execute(sql, (*args, limit))]

    def delete_file(self, file_id: str) -> None:
        row = self.get_file(file_id)
        self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if row is not None:
            Path(row["path"]).unlink(missing_ok=True)

    def expired_files(self, now: float) -> list[str]:
        """Files whose ``expires_at`` (Unix seconds) has passed."""
        rows = self._db.execute("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                (int(now),))
        return [r["id"] for r in rows]

    # ---- batches ------------------------------------------------------------------------------
    def put_batch(self, doc: dict[str, Any], owner: str | None = None, progressed: float | None = None) -> None:
        """Insert or replace batch ``doc`` (a Batch object); ``owner`` only on insert;
        ``progressed``: monotonic-free Unix time of its last finished line."""
        if owner is not None:
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                             (doc["id"], owner, json.dumps(doc), doc["status"], doc["created_at"],
                              progressed or doc["created_at"]))
            return
        self._db.execute("UPDATE batches SET doc = ?, status = ?, progressed_at = "
                         "COALESCE(?, progressed_at) WHERE id = ?",
                         (json.dumps(doc), doc["status"], progressed, doc["id"]))

    def get_batch(self, batch_id: str) -> tuple[dict[str, Any], str] | None:
        """The Batch object and its owner."""
        row = self._db.execute("SELECT doc, owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else (json.loads(row["doc"]), row["owner"])

    def list_batches(self, owner: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` batches, newest first, after the cursor ``after`` (a batch id)."""
        where, args = ["1"], []
        if owner is not None:
            where.append("owner = ?"), args.append(owner)
        if after:
            where.append("rowid < COALESCE((SELECT rowid FROM batches WHERE id = ?), 1e18)")
            args.append(after)
        sql = f"SELECT doc FROM batches WHERE {' AND '.join(where)} ORDER BY rowid DESC LIMIT ?"
        return [json.loads(r["doc"]) for r in self._db.execute(sql, (*args, limit))]

    def active_batches(self) -> list[tuple[dict[str, Any], str]]:
        """Batches a runner must carry on (a restart resumes them), oldest first, with owners."""
        rows = self._db.execute(f"SELECT doc, owner FROM batches WHERE status IN "
                                f"({','.join('?' * len(ACTIVE))}) ORDER BY rowid", ACTIVE)
        return [(json.loads(r["doc"]), r["owner"]) for r in rows]

    def status_counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in
                self._db.execute("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")}


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A store row as the OpenAI File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"], "expires_at": row["expires_at"],
            "status_details": None}


class ResultFile:
    """A batch's output or error file while it grows: each :meth:`append` writes whole lines and
    fsyncs them before it returns. A partial last line left by a kill is cut on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            with open(path, "rb+") as f:
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, lines: list[bytes]) -> None:
        """Write ``lines`` (each one JSON document, no newline) and fsync. Raises ``OSError``
        (a full disk among them), after cutting off whatever part of them was written."""
        data = b"".join(line + b"\n" for line in lines)
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # a partial last line is cut when the file is opened again
            raise

    def close(self) -> None:
        os.close(self._fd)


def read_results(path: Path) -> Iterator[dict[str, Any]]:
    """The whole lines of a result file (a partial last line is skipped)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield json.loads(line)


def usage_of(body: Any) -> tuple[int, int]:
    """(input, output) tokens of an answer's ``usage``, whichever API's names it uses."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    inp = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
    out = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
    return int(inp), int(out)


def result_line(custom_id: str, request_id: str, status: int | None, body: Any,
                error: dict[str, str] | None = None) -> bytes:
    """One line of a result file: ``{id, custom_id, response: {status_code, request_id, body},
    error}`` (``response`` ``None`` for a line that never got an answer)."""
    response = None if status is None else {"status_code": status, "request_id": request_id,
                                            "body": body}
    return json.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": response,
                       "error": error}, separators=(",", ":")).encode()
