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
