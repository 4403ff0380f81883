"""Request validation before any engine work (pure): what the gateway itself must read and check.

The gateway reads only ``model``, ``stream``, ``stream_options`` and the field that makes a request
non-empty (``messages``, ``prompt``, ``input``); everything else passes through to vLLM untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from server.errors import InvalidRequest

# route → (the field that must be present and non-empty, the model task it needs)
ROUTES = {
    "/v1/chat/completions": ("messages", "generate"),
    "/v1/completions": ("prompt", "generate"),
    "/v1/embeddings": ("input", "embed"),
    "/v1/responses": ("input", "generate"),
    "/v1/messages": ("messages", "generate"),             # Anthropic Messages API
    "/v1/messages/count_tokens": ("messages", "generate"),  # Anthropic token counting
    "/infill": ("prompt", "generate"),  # llama.cpp's FIM route, served as /v1/completions
}
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
# Routes whose answers can stream; on the others ``stream`` is the engine's business, never ours.
STREAMING_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                    "/infill")
# Routes that take ``stream_options.include_usage`` (and answer with a usage chunk).
USAGE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/infill")
# Routes whose ``stop`` strings vLLM matches after stripping special tokens (see rewrite.py).
STOP_ROUTES = ("/v1/chat/completions", "/v1/completions")
# What pydantic (vLLM's request models, lax mode) reads as a true boolean.
_TRUE_STRINGS = {"1", "true", "t", "yes", "y", "on"}


def truthy(value: Any) -> bool:
    """Whether vLLM's pydantic models read ``value`` as ``True`` for a boolean field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value == 1
    if isinstance(value, float):
        return value == 1.0
    return isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS


def routes_for_task(task: str) -> tuple[str, ...]:
    """The inference routes a model of ``task`` (``generate`` or ``embed``) answers."""
    return tuple(route for route, (_, needed) in ROUTES.items() if needed == task)


@dataclass(frozen=True)
class ParsedRequest:
    """What the gateway needs from a body: the ``model`` asked for, ``stream``, and whether the
    client asked for a usage chunk (``stream_options.include_usage``)."""

    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object; :class:`InvalidRequest` (400) for anything else, and for nesting past
    :data:`MAX_DEPTH`.

    orjson first: 1.2 µs against 2.3 µs for a short chat body, 0.40 ms against 1.05 ms for
    512 KB of code as context, 0.58 ms against 1.87 ms for a 320 KB agent history of 400
    messages (measured here, issue #15; the times include :func:`_scan`). What orjson refuses
    and Python's ``json`` accepts (a lone surrogate escape, ``NaN``, UTF-16 bytes) goes to
    ``json``, and so does a body where orjson may have read an integer past 64 bits as a float;
    so every body is read as before, and every error message is ``json``'s."""
    try:
        data = orjson.loads(raw)
        huge = _scan(data)
    except orjson.JSONDecodeError:
        huge = True
    if huge:
        data = _parse_slowly(raw)
        _scan(data, stop=False)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


_HUGE = float(2 ** 63)  # orjson reads integers below -2**63 or above 2**64 - 1 as floats
# Arrays and objects a body may nest. Python's json gave up near 965 inside the gateway (the
# recursion limit less the stack below it), and a body it read that deep could not be encoded
# again for the engine (RecursionError: a 500). A fixed limit, well inside both, is the same on
# every path; tool schemas nest a few dozen levels at most.
MAX_DEPTH = 512


def check_nesting(data: Any) -> None:
    """Raise :class:`InvalidRequest` when ``data`` (decoded JSON) nests arrays and objects past
    :data:`MAX_DEPTH`: the rule :func:`parse_body` applies, for what is decoded elsewhere (batch
    input lines)."""
    _scan(data, stop=False)


def _scan(data: Any, stop: bool = True) -> bool:
    """Whether any number in ``data`` is a float of magnitude 2**63 or more (an integer literal
    that orjson turned into a float, or, rarely, a float written so, which ``json`` reads alike);
    with ``stop``, the first one ends the walk. Raises :class:`InvalidRequest` for arrays and
    objects nested past :data:`MAX_DEPTH`."""
    if type(data) is not dict and type(data) is not list:
        return type(data) is float and (data >= _HUGE or data <= -_HUGE)
    stack, huge = [(data, 1)], False
    pop, push = stack.pop, stack.append
    while stack:
        o, depth = pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest("The request body is nested too deeply.", code="invalid_json")
        for v in (o.values() if type(o) is dict else o):
            kind = type(v)
            if kind is dict or kind is list:
                push((v, depth + 1))
            elif kind is float and (v >= _HUGE or v <= -_HUGE):
                huge = True
                if stop:
                    return True
    return huge


def _parse_slowly(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages",
                             code="missing_required_parameter")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of message objects.", param="messages",
                             code="invalid_type")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages",
                             code="empty_array")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where, code="invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"Missing required parameter: '{where}.role'.", param=f"{where}.role",
                                 code="missing_required_parameter")
        content = msg.get("content")
        calls = msg.get("tool_calls") or msg.get("function_call")
        if content is None and not (role == "assistant" and calls):
            raise InvalidRequest(f"Missing required parameter: '{where}.content'.",
                                 param=f"{where}.content", code="missing_required_parameter")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"'{where}.content' must be a string or an array of content parts.",
                                 param=f"{where}.content", code="invalid_type")


def _check_nonempty(field: str, value: Any, *, empty_text: bool = False) -> None:
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{field}'.", param=field,
                             code="missing_required_parameter")
    if isinstance(value, (list, str)) and len(value) == 0 and not (empty_text and value == ""):
        raise InvalidRequest(f"'{field}' must not be empty.", param=field, code="empty_array"
                             if isinstance(value, list) else "empty_string")
    if not isinstance(value, (list, str)):
        raise InvalidRequest(f"'{field}' must be a string or an array.", param=field,
                             code="invalid_type")


def validate(route: str, body: dict[str, Any]) -> ParsedRequest:
    """Check ``body`` for ``route`` (a key of :data:`ROUTES`); raises :class:`InvalidRequest` (400)
    naming the offending field in ``param``."""
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model",
                             code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model", code="invalid_type")
    field, _ = ROUTES[route]
    if field == "messages":
        _check_messages(body.get("messages"))
    else:  # a FIM request may have nothing before the cursor
        _check_nonempty(field, body.get(field), empty_text=isinstance(body.get("suffix"), str))
    if route not in STREAMING_ROUTES:  # embeddings, token counts: one JSON answer, whatever is asked
        return ParsedRequest(body=body, model=model, stream=False, include_usage=False)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object.", param="stream_options",
                                 code="invalid_type")
        if not stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.",
                                 param="stream_options", code="invalid_value")
        include_usage = truthy(options.get("include_usage"))
    return ParsedRequest(body=body, model=model, stream=stream, include_usage=include_usage)


_USAGE_OPTION = b'{"stream_options":{"include_usage":true},'


def engine_body(raw: bytes, parsed: ParsedRequest, served_name: str, *, want_usage: bool,
                body: dict[str, Any] | None = None) -> bytes:
    """The body to send the engine (pure): ``raw`` untouched where nothing changes; ``body``, when
    given, is the request as the gateway rewrote it (``server.rewrite``) and is encoded anew.

    ``served_name`` replaces an alias (an engine only knows its served name). ``want_usage``: the
    gateway asks for ``stream_options.include_usage`` on a stream whose client did not (for its
    token metrics; the usage chunk is then dropped on the way back, cases C01). Where the body has
    no ``stream_options`` key at all, no alias and is UTF-8, the option is spliced in at the byte
    level (no re-encoding of a long prompt); otherwise the object is encoded again (a duplicate key
    would let the client's own value win, and splicing ASCII into UTF-16 would corrupt it). A
    client that set other stream options (vLLM's ``continuous_usage_stats``) keeps exactly what it
    asked for.
    """
    options = parsed.body.get("stream_options")
    inject = want_usage and parsed.stream and not parsed.include_usage and (
        options is None or (isinstance(options, dict) and set(options) <= {"include_usage"}))
    if body is None:
        if parsed.model == served_name and not inject:
            return raw
        if parsed.model == served_name and "stream_options" not in parsed.body \
                and json.detect_encoding(raw) in ("utf-8", "utf-8-sig"):
            start = raw.index(b"{")
            return raw[:start] + _USAGE_OPTION + raw[start + 1:]
    body = dict(parsed.body if body is None else body, model=served_name)
    if inject:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()
