"""The one error tree of vramgate, and the OpenAI error envelope every error leaves in.

::

    VramgateError                      (500 server_error)
    ├── InvalidRequest                 (400 invalid_request_error; param names the field)
    │   └── ModelNotFound              (404 invalid_request_error, code model_not_found)
    ├── AuthError                      (401 invalid_request_error, code invalid_api_key)
    ├── PermissionDenied               (403 permission_error, code model_not_allowed)
    ├── RouteNotFound                  (404 invalid_request_error, code not_found)
    ├── BodyTooLarge                   (413 invalid_request_error, code request_too_large)
    ├── RateLimited                    (429 rate_limit_exceeded, Retry-After)
    ├── CapacityError                  (503 server_error, code queue_full / queue_timeout)
    ├── ModelUnavailable               (503 server_error, code model_unavailable, Retry-After)
    │   └── EngineStartError           (503, carries the engine log's last lines)
    ├── UpstreamError                  (an engine's own error, relayed with its status)
    └── ConfigError                    (a configuration file or flag is wrong; the CLI prints it)

Every HTTP-facing error renders as ``{"error": {"message", "type", "param", "code"}}``, the shape the
official OpenAI clients parse (``openai.APIStatusError`` exposes ``.status_code``, ``.code``,
``.param`` and ``.type``). Foreign exceptions are translated into this tree in one place each
(``proxy.py`` for the engine connection, ``config.py`` for YAML) with ``raise ... from exc``.
"""

from __future__ import annotations

import json
from typing import Any


class ClientGone(Exception):
    """The caller went away (closed its connection) before its answer was ready. Not an error of
    the request: nothing is answered, the access log says 499."""


class VramgateError(Exception):
    """Base of every vramgate error. ``status`` is the HTTP status it is answered with."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, should_retry: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.should_retry = should_retry

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Headers that go with the error: ``Retry-After`` (whole seconds) and ``x-should-retry``."""
        out: dict[str, str] = {}
        if self.retry_after is not None:
            out["retry-after"] = str(max(1, int(round(self.retry_after))))
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out


class InvalidRequest(VramgateError):
    """The request itself is wrong (400); retrying it unchanged cannot help."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code, should_retry=False)


class ModelNotFound(InvalidRequest):
    """The ``model`` names no configured model or alias (404, as OpenAI answers)."""

    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist. GET /v1/models lists the models "
                         "this server serves.", param="model")


class AuthError(VramgateError):
    """401: no key, or a key that is not configured."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, should_retry=False)


class PermissionDenied(VramgateError):
    """403: a valid key that may not use this model."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", should_retry=False)


class BodyTooLarge(VramgateError):
    """413: the request body is larger than ``max_body_bytes``."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(VramgateError):
    """429: the key used up its requests per minute."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class CapacityError(VramgateError):
    """503: the model's queue is full, or the request waited in it too long."""

    status = 503
    type = "server_error"


class RouteNotFound(VramgateError):
    """No such route on this gateway (404). Nothing is forwarded to an engine's other endpoints."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, should_retry=False)


class NotFound(RouteNotFound):
    """No file or batch with that id for this key (404): another key's objects are not found."""

    code = None


class Conflict(VramgateError):
    """The object is in a state that does not allow this (409), e.g. cancelling a finished batch."""

    status = 409
    type = "invalid_request_error"


class ModelUnavailable(VramgateError):
    """The model is configured but its engine cannot serve now (503, with ``Retry-After``)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class EngineUnreachable(ModelUnavailable):
    """No connection to the engine could be made (refused, no route, connect timeout): the
    request never reached it, so it may go to another replica (``server.service``)."""

    code = "engine_unreachable"


class NvmlError(VramgateError):
    """NVML answered with an error while reading a GPU that it had listed (503: the devices
    cannot be read now). Raised by ``server.gpus.nvml``, the only reader of NVML."""

    status = 503
    type = "server_error"
    code = "gpu_read_failed"


class EngineStartError(ModelUnavailable):
    """An engine process failed to become healthy. ``log_tail`` holds its log's last lines."""

    code = "engine_start_failed"

    def __init__(self, message: str, *, log_tail: str = "", retry_after: float | None = 30) -> None:
        full = f"{message}\n--- last lines of the engine log ---\n{log_tail}" if log_tail else message
        super().__init__(full, retry_after=retry_after)
        self.log_tail = log_tail


class UpstreamError(VramgateError):
    """An error answered by an engine, relayed with the engine's status and normalised."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None,
                 code: str | None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type_


class ConfigError(VramgateError):
    """The configuration is invalid; the message starts with the field path (``models[1].name``)."""


# The OpenAI ``type`` for an upstream status; 401 is ``invalid_request_error``, as OpenAI answers a
# wrong key (and as AuthError says).
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error",
                   403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
                   413: "invalid_request_error", 422: "invalid_request_error",
                   429: "rate_limit_exceeded"}


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """Build the OpenAI error envelope. ``param`` and ``code`` are strings or ``None``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_CONTEXT_PARAMS = ("input_tokens", "input_text")


def normalize_upstream_error(status: int, body: bytes, field: str | None = None) -> UpstreamError:
    """Turn an engine's error response into an :class:`UpstreamError` in the OpenAI shape.

    vLLM answers ``{"error": {"message", "type": "BadRequestError", "param", "code": 400}}``: its
    ``type`` is a Python class name and its ``code`` an integer, which OpenAI clients do not expect.
    The message and ``param`` are kept; ``type`` is derived from the status (400 →
    ``invalid_request_error``, 5xx → ``server_error``); ``code`` is kept only when it is a string.
    A body that is not JSON becomes the message itself (cut to 2000 characters). A prompt longer
    than the context (vLLM's ``param`` ``input_tokens``/``input_text``, or "maximum context
    length" in its message) gets OpenAI's code ``context_length_exceeded`` and the route's prompt
    ``field`` (``messages``, ``prompt``, ``input``) as ``param``.
    """
    message, param, code = "", None, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or "")
            param = err.get("param") if isinstance(err.get("param"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
        elif isinstance(err, str):
            message = err
        if not message and isinstance(data.get("detail"), (str, list)):
            message = str(data["detail"])
    if not message:
        message = body.decode("utf-8", "replace")[:2000] or f"engine answered HTTP {status}"
    type_ = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if status == 400 and (param in _CONTEXT_PARAMS or "maximum context length" in message):
        code, param = "context_length_exceeded", field or param
    return UpstreamError(status, message, type_=type_, param=param, code=code)


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    """The Anthropic API's error shape, ``{"type": "error", "error": {"type", "message"}}``, which
    the official ``anthropic`` client parses on ``/v1/messages``."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                       "message": message}}
