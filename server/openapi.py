"""The OpenAPI 3.1 document of the gateway's own routes (``GET /openapi.json``).

Request bodies list what the gateway itself checks (``model``, ``messages``/``prompt``/``input``,
``stream``); every other field passes through to vLLM, so the schemas allow additional properties.
Every error response is the OpenAI envelope (the Anthropic shape on ``/v1/messages*``).
"""

from __future__ import annotations

from typing import Any

from server.validation import ANTHROPIC_ROUTES, ROUTES

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"]}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string"}, "content": {"type": ["string", "array", "null"]}}}
_FIELD = {"messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
          "prompt": {"type": ["string", "array"]}, "input": {"type": ["string", "array"]}}


def _errors(route: str, codes: tuple[int, ...]) -> dict[str, Any]:
    ref = "#/components/schemas/AnthropicError" if route in ANTHROPIC_ROUTES else \
        "#/components/schemas/Error"
    return {str(c): {"description": "error", "content": {"application/json": {"schema": {"$ref": ref}}}}
            for c in codes}


def _op(summary: str, codes: tuple[int, ...], params: tuple[str, ...] = (),
        query: dict[str, Any] | None = None, body: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "the object"}, **_errors("", codes)}}
    out["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                         for p in params] + [{"name": n, "in": "query", "schema": sch}
                                             for n, sch in (query or {}).items()]
    if body is not None:
        out["requestBody"] = {"required": True, "content": body}
    return out


def batch_paths() -> dict[str, Any]:
    """The Files and Batch routes (``server.batchapi``), as OpenAI documents them."""
    upload = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"},
                       "purpose": {"type": "string"}}}}}
    create = {"application/json": {"schema": {
        "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
        "additionalProperties": True,
        "properties": {"input_file_id": {"type": "string"}, "endpoint": {"type": "string"},
                       "completion_window": {"type": "string"},
                       "metadata": {"type": ["object", "null"]}}}}}
    paging = {"after": {"type": "string"}, "limit": {"type": "integer"}}
    return {
        "/v1/files": {
            "post": _op("Upload a file (multipart)", (400, 401, 413), body=upload),
            "get": _op("List files", (400, 401), query={
                **paging, "order": {"type": "string"}, "purpose": {"type": "string"}})},
        "/v1/files/{file_id}": {"get": _op("One file", (401, 404), ("file_id",)),
                                "delete": _op("Delete a file", (401, 404, 409), ("file_id",))},
        "/v1/files/{file_id}/content": {"get": _op("A file's bytes", (401, 404), ("file_id",))},
        "/v1/batches": {"post": _op("Create a batch", (400, 401, 413), body=create),
                        "get": _op("List batches", (400, 401), query=paging)},
        "/v1/batches/{batch_id}": {"get": _op("One batch", (401, 404), ("batch_id",))},
        "/v1/batches/{batch_id}/cancel": {"post": _op("Cancel a batch", (401, 404, 409),
                                                      ("batch_id",))},
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI document as a JSON-ready mapping."""
    paths: dict[str, Any] = {}
    for route, (field, task) in ROUTES.items():
        body = {"type": "object", "required": ["model", field], "additionalProperties": True,
                "properties": {"model": {"type": "string"}, field: _FIELD[field],
                               "stream": {"type": "boolean"}}}
        if route == "/v1/completions":
            body["properties"]["suffix"] = {"type": ["string", "null"]}
        if route == "/infill":  # llama.cpp's shape: nothing is required
            body = {"type": "object", "additionalProperties": True, "properties": {
                "model": {"type": "string"}, "input_prefix": {"type": "string"},
                "input_suffix": {"type": "string"}, "prompt": {"type": "string"},
                "n_predict": {"type": "integer"}, "stream": {"type": "boolean"},
                "input_extra": {"type": "array", "items": {"type": "object"}}}}
        paths[route] = {"post": {
            "summary": f"Forwarded to the engine of the named {task} model",
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {"description": "the engine's answer (JSON, or text/event-stream "
                                                 "with stream: true)"},
                          **_errors(route, (400, 401, 403, 404, 413, 429, 503))}}}
    listing = {"type": "object", "required": ["object", "data"]}
    paths["/v1/models"] = {"get": {"summary": "Every configured model and its state",
                                   "responses": {"200": {"description": "list", "content": {
                                       "application/json": {"schema": listing}}},
                                       **_errors("", (401,))}}}
    paths["/v1/models/{model_id}"] = {"get": {
        "summary": "One model by name or alias",
        "parameters": [{"name": "model_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the model"}, **_errors("", (401, 404))}}}
    paths.update(batch_paths())
    paths["/health"] = {"get": {"summary": "Liveness and each model's state",
                                "responses": {"200": {"description": "ok"}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition"}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "vramgate", "version": "0.1.0",
                     "description": "OpenAI-compatible gateway in front of vLLM engines."},
            "paths": paths,
            "components": {"schemas": {"Error": _ERROR, "AnthropicError": _ANTHROPIC_ERROR},
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
