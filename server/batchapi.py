"""The OpenAI Files and Batch routes: ``/v1/files`` (upload, list, retrieve, content, delete) and
``/v1/batches`` (create, retrieve, cancel, list), over ``server.batchstore`` and
``server.batchrunner``. Objects and parameters are OpenAI's, as the official SDK sends them.

Every file and batch belongs to the key that created it (``batchstore.owner_of``): other keys get
404, the admin key sees all. An upload streams to disk under ``max_file_bytes`` (413 past it),
never held whole in memory (Starlette's multipart parser spools past 1 MiB).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.auth import SCOPE_KEY
from server.batchcheck import ENDPOINTS
from server.batchrunner import public, window_seconds
from server.batchstore import file_object, new_id, owner_of
from server.errors import BodyTooLarge, Conflict, InvalidRequest, NotFound, VramgateError
from server.relay import error_response, read_limited
from server.validation import parse_body

PURPOSES = ("batch", "user_data", "fine-tune", "assistants", "vision", "evals")
BATCH_INPUT_TTL = 30 * 86400  # seconds: OpenAI's default expiry for purpose=batch files
EXPIRY_RANGE = (3600, 30 * 86400)  # OpenAI's bounds on expires_after[seconds]


def _viewer(request: Request) -> str | None:
    """The owner whose objects this request sees; ``None``: all (the admin key)."""
    key, auth = request.scope.get(SCOPE_KEY), request.state.pool.settings.auth
    if key is not None and auth.admin_key is not None and key.key == auth.admin_key:
        return None
    return owner_of(key)


def _visible(row_owner: str, viewer: str | None) -> bool:
    return viewer is None or row_owner == viewer


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"The upload is over this server's limit of {limit} bytes "
                               "(max_file_bytes).", param="file")
        yield chunk


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = data[:limit]
    return {"object": "list", "data": shown, "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None, "has_more": len(data) > limit}


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def _expiry(form: Any, created: int, purpose: str) -> int | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if seconds is None:
        return created + BATCH_INPUT_TTL if purpose == "batch" else None
    if anchor not in (None, "created_at"):
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.",
                             param="expires_after.anchor")
    value = int(seconds) if isinstance(seconds, str) and seconds.isascii() and \
        seconds.isdigit() else 0
    if not EXPIRY_RANGE[0] <= value <= EXPIRY_RANGE[1]:
        raise InvalidRequest(f"expires_after[seconds] must be from {EXPIRY_RANGE[0]} to "
                             f"{EXPIRY_RANGE[1]}.", param="expires_after.seconds")
    return created + value


async def create_file(request: Request) -> Response:
    """POST /v1/files (multipart: ``file``, ``purpose``, optional ``expires_after[...]``)."""
    store, settings = request.state.batches.store, request.state.pool.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("Upload the file as multipart/form-data with fields 'file' and "
                             "'purpose'.", param="file")
    framing = 1 << 20  # the multipart boundaries and fields around the file
    parser = MultiPartParser(request.headers,
                             _limited(request, settings.max_file_bytes + framing),
                             max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"The multipart body could not be read: {exc.message}", param="file")
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                 code="missing_required_parameter")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"'purpose' must be one of {', '.join(PURPOSES)}.", param="purpose")
        created = int(time.time())
        file_id = new_id("file-")
        path = store.path_for(file_id)
        row = {"id": file_id, "owner": owner_of(request.scope.get(SCOPE_KEY)),
               "created_at": created, "filename": upload.filename or "upload", "purpose": purpose,
               "status": "processed", "expires_at": _expiry(form, created, purpose),
               "path": str(path)}

        def save() -> int:
            upload.file.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            return path.stat().st_size
        row["bytes"] = await store.call(save)
        if row["bytes"] > settings.max_file_bytes:
            await store.call(path.unlink)
            raise BodyTooLarge(f"The upload is over this server's limit of "
                               f"{settings.max_file_bytes} bytes (max_file_bytes).", param="file")
        await store.call(store.add_file, row)
    finally:
        await form.close()
    return JSONResponse(file_object(row))


async def _file_row(request: Request) -> dict[str, Any]:
    store = request.state.batches.store
    file_id = request.path_params["file_id"]
    row = await store.call(store.get_file, file_id)
    if row is None or not _visible(row["owner"], _viewer(request)):
        raise NotFound(f"No such File object: {file_id}")
    return row


async def list_files(request: Request) -> Response:
    """GET /v1/files (``after``, ``limit``, ``order``, ``purpose``)."""
    store = request.state.batches.store
    limit = _int_param(request, "limit", 10000, 1, 10000)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    rows = await store.call(store.list_files, _viewer(request), request.query_params.get("purpose"),
                            request.query_params.get("after"), limit + 1, order)
    return JSONResponse(_page([file_object(r) for r in rows], limit))


async def get_file(request: Request) -> Response:
    """GET /v1/files/{id}."""
    return JSONResponse(file_object(await _file_row(request)))


async def file_content(request: Request) -> Response:
    """GET /v1/files/{id}/content: the bytes, streamed from disk. The file is opened before the
    answer starts, so a delete meanwhile is a 404 or a whole answer, never a cut one."""
    row = await _file_row(request)
    store = request.state.batches.store
    try:
        f = await store.call(open, row["path"], "rb")
    except FileNotFoundError:
        raise NotFound(f"No such File object: {row['id']}") from None
    size = os.fstat(f.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await store.call(f.read, 1 << 20):
                yield chunk
        finally:
            f.close()
    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"content-length": str(size)})


async def delete_file(request: Request) -> Response:
    """DELETE /v1/files/{id}."""
    store = request.state.batches.store
    row = await _file_row(request)
    users = [doc["id"] for doc, _ in await store.call(store.active_batches)
             if doc["input_file_id"] == row["id"]]
    if users:
        raise Conflict(f"The file {row['id']} is the input of batch {users[0]}, which has not "
                       "ended: cancel it first, or wait.")
    await store.call(store.delete_file, row["id"])
    return JSONResponse({"id": row["id"], "object": "file", "deleted": True})


def new_batch(body: dict[str, Any], now: int) -> dict[str, Any]:
    """A Batch object in ``validating`` from ``POST /v1/batches``' body; raises
    :class:`InvalidRequest` naming the field."""
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                                 code="missing_required_parameter")
    if body["endpoint"] not in ENDPOINTS:
        raise InvalidRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
    window = window_seconds(body["completion_window"])
    if window is None:
        raise InvalidRequest("'completion_window' must be '24h' (or a shorter '<n>h', '<n>m', "
                             "'<n>s').", param="completion_window")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in meta.items())):
        raise InvalidRequest("'metadata' must be at most 16 pairs of strings, keys up to 64 and "
                             "values up to 512 characters.", param="metadata")
    return {"id": new_id("batch_"), "object": "batch", "endpoint": body["endpoint"],
            "errors": None, "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"], "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + window, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": meta, "model": None, "usage": None}


async def create_batch(request: Request) -> Response:
    """POST /v1/batches."""
    runner = request.state.batches
    body = parse_body(await read_limited(request, request.state.pool.settings.max_body_bytes))
    doc = new_batch(body, int(time.time()))
    request.path_params["file_id"] = doc["input_file_id"]
    try:
        row = await _file_row(request)
    except NotFound:
        raise InvalidRequest(f"No such File object: {doc['input_file_id']}", param="input_file_id",
                             code="invalid_file") from None
    if row["purpose"] != "batch":
        raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id")
    owner = owner_of(request.scope.get(SCOPE_KEY))
    await runner.store.call(runner.store.put_batch, doc, owner=owner)
    runner.submit(doc, owner)
    return JSONResponse(public(doc))


async def _batch(request: Request) -> dict[str, Any]:
    store = request.state.batches.store
    batch_id = request.path_params["batch_id"]
    found = await store.call(store.get_batch, batch_id)
    if found is None or not _visible(found[1], _viewer(request)):
        raise NotFound(f"No batch found with id '{batch_id}'.")
    live = request.state.batches.live.get(batch_id)  # newer than its row (saved once a second)
    return dict(live) if live is not None else found[0]


async def get_batch(request: Request) -> Response:
    """GET /v1/batches/{id}."""
    return JSONResponse(public(await _batch(request)))


async def cancel_batch(request: Request) -> Response:
    """POST /v1/batches/{id}/cancel: ``cancelling`` until the lines in flight end."""
    doc = await _batch(request)
    if doc["status"] not in ("validating", "in_progress", "cancelling"):
        raise Conflict(f"Cannot cancel a batch with status '{doc['status']}'.")
    request.state.batches.cancel(doc["id"])
    if doc["status"] != "cancelling":
        doc = {**doc, "status": "cancelling", "cancelling_at": int(time.time())}
    return JSONResponse(public(doc))


async def list_batches(request: Request) -> Response:
    """GET /v1/batches (``after``, ``limit``), newest first."""
    store = request.state.batches.store
    limit = _int_param(request, "limit", 20, 1, 100)
    docs = await store.call(store.list_batches, _viewer(request),
                            request.query_params.get("after"), limit + 1)
    live = request.state.batches.live  # a running batch's object is newer than its row
    return JSONResponse(_page([public(live.get(d["id"], d)) for d in docs], limit))


def _answering(handler: Any) -> Any:
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except VramgateError as exc:
            return error_response(exc)
    route.__doc__ = handler.__doc__
    return route


routes = [
    Route("/v1/files", _answering(create_file), methods=["POST"]),
    Route("/v1/files", _answering(list_files), methods=["GET"]),
    Route("/v1/files/{file_id}", _answering(get_file), methods=["GET"]),
    Route("/v1/files/{file_id}", _answering(delete_file), methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", _answering(file_content), methods=["GET"]),
    Route("/v1/batches", _answering(create_batch), methods=["POST"]),
    Route("/v1/batches", _answering(list_batches), methods=["GET"]),
    Route("/v1/batches/{batch_id}", _answering(get_batch), methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", _answering(cancel_batch), methods=["POST"]),
]
