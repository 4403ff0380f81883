"""Server-sent events at the byte level (pure). The gateway never re-chunks or re-decodes text.

vLLM frames each event as ``data: <one-line JSON>\\n\\n`` and ends with ``data: [DONE]\\n\\n``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from server.errors import anthropic_body

DONE = b"data: [DONE]\n\n"
# A chunk's own usage key: an object or null. "usage" can also be a token, a key of
# top_logprobs mapped to a number, or a string value: those are no usage key.
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*(?:\{|null)')
_NULL_USAGE = b',"usage":null'
_NULL_TAIL = _NULL_USAGE + b"}\n\n"
_OBJ_END = b"}\n\n"
_EVENT_DATA = b"\n\ndata: "


# The blank line that ends an SSE event: vLLM writes "\n\n"; the SSE standard also lets a server end
# its lines with "\r\n" (an upstream on another host may). A lone "\r" as a line end is not taken.
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class EventSplitter:
    """Cut a byte stream into whole SSE events (each ending in a blank line: ``\\n\\n``, or with
    ``\\r\\n`` line ends), keeping the bytes as they are."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # where the search for an event's end goes on: the bytes before hold none

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk``; return the events it completed (possibly none), separators included.
        Each byte is searched about once, however many reads an event takes (a multi-megabyte
        event of ``prompt_logprobs`` comes in many: searching the whole of it again at each read
        made it quadratic, seconds of the event loop for 8 MB, a break-it pass found)."""
        buf = self._buf
        buf += chunk
        out, pos = [], 0
        for end in _EVENT_END.finditer(buf, self._scanned):
            out.append(bytes(buf[pos:end.end()]))
            pos = end.end()
        if pos:
            del buf[:pos]
        self._scanned = max(0, len(buf) - 3)  # an event end of up to 4 bytes may start there
        return out

    @property
    def pending(self) -> int:
        """Bytes held of an event not yet ended."""
        return len(self._buf)

    def rest(self) -> bytes:
        """Bytes of an event not yet ended (at the end of the stream: a truncated event)."""
        return bytes(self._buf)


def with_null_usage(event: bytes) -> bytes:
    """Add ``"usage":null`` to a ``data: {...}`` chunk that has no ``usage`` key (one whose value
    is an object or null, written compactly or not).

    The OpenAI API documents that, with ``stream_options.include_usage``, every chunk but the last
    carries ``usage: null``; vLLM omits the key. Other events (``[DONE]``, comments) are returned as
    they are.
    """
    if not event.startswith(b"data: {") or (_USAGE in event and _USAGE_KEY.search(event)):
        return event
    if event.endswith(b"}\n\n"):  # how vLLM frames every chunk: one slice, no strip (issue #15)
        return event[:-3] + _NULL_TAIL
    end = event.rstrip(b"\r\n")
    if not end.endswith(b"}"):
        return event
    return end[:-1] + _NULL_USAGE + b"}" + event[len(end):]


def is_done(event: bytes) -> bool:
    """Is ``event`` the OpenAI stream's last, ``data: [DONE]`` (with either line end, and with or
    without the space the SSE standard makes optional)?"""
    return event == DONE or event.rstrip(b"\r\n") in (b"data: [DONE]", b"data:[DONE]")


def _last_event(chunk: bytes) -> bytes:
    """The last event of ``chunk``, whole events that end in ``\\n\\n``."""
    at = chunk.rfind(b"\n\n", 0, len(chunk) - 2)
    return chunk[at + 2:] if at >= 0 else chunk


def _data_only(chunk: bytes) -> bool:
    """Is every event of ``chunk`` (whole events) one ``data:`` field and nothing else (no
    comment, no ``event:`` line)? Then a ``}\\n\\n`` in it can only end an event's JSON object."""
    return chunk.startswith(b"data: ") and chunk.count(b"\n\n") == chunk.count(_EVENT_DATA) + 1


class ModelRename:
    """Turns an upstream's name for the model (``theirs``) back into ours (``ours``) in answer
    bytes: every ``"model": "theirs"`` (OpenAI chunks and objects, Anthropic's ``message``,
    Responses' ``response``), without re-encoding anything else. For a replica on another host
    that serves the model under its own name (``upstreams[].model``)."""

    def __init__(self, theirs: str, ours: str) -> None:
        self._find = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(theirs).encode()))
        self._ours = json.dumps(ours).encode()

    def __call__(self, data: bytes) -> bytes:
        return self._find.sub(lambda m: m.group(1) + self._ours, data)


_USAGE = b'"usage"'
# vLLM's first chat chunk names the role and carries no text: not a token, so no ITL gap. (Inside
# a JSON string every quote is escaped, so these bytes can only be the delta object itself.)
_ROLE_ONLY = b'"delta":{"role":"assistant","content":""'
_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*\{')  # vLLM writes compact JSON; others may not
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_TOKEN_FIELDS = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)":\s*(\d+)')
_TOKEN_KIND = {b"prompt_tokens": "prompt", b"input_tokens": "prompt",
               b"completion_tokens": "completion", b"output_tokens": "completion"}


def usage_counts(text: bytes) -> dict[str, int]:
    """``{"prompt": n, "completion": m}`` from the token fields in ``text`` (OpenAI's
    ``prompt_tokens``/``completion_tokens``, the Responses and Anthropic APIs' ``input_tokens``/
    ``output_tokens``); where a field repeats, the largest value (Anthropic's cumulative counts)."""
    out: dict[str, int] = {}
    for name, value in _TOKEN_FIELDS.findall(text):
        kind = _TOKEN_KIND[name]
        out[kind] = max(out.get(kind, 0), int(value))
    return out


def answer_usage(body: bytes) -> dict[str, int]:
    """Token counts of a whole (non-streamed) JSON answer, read from its top-level ``usage`` object
    without parsing the answer: the last ``"usage"`` that opens an object (``"usage": {``) and the
    kilobyte after it. vLLM may put ``prompt_logprobs``, token ids or ``kv_transfer_params`` after
    ``usage``, so it is not always near the end; and there the bytes ``"usage"`` can also be a
    token: a string value (``"decoded_token":"usage"``) or a key of ``top_logprobs`` (``"usage":
    -0.5``), which opens no object."""
    end = len(body)
    while (at := body.rfind(_USAGE, 0, end)) >= 0:
        if _USAGE_OBJ.match(body, at):
            return usage_counts(body[at:at + 1024])
        end = at
    return {}


class StreamTap:
    """What the gateway learns from a stream on its way through, and the one change it makes.

    - ``tokens``: prompt/completion tokens from the engine's usage (OpenAI routes: the
      ``choices: []`` usage chunk; Responses/Anthropic: their ``usage`` objects).
    - ``gaps``: seconds between successive token events as the gateway forwards them (the first
      token excluded, and vLLM's role-only first chat chunk is no token; events that arrive in one
      read count 0, as the client sees them).
    - ``drop_usage``: the gateway asked the engine for ``include_usage`` on the client's behalf, so
      the usage chunk is removed (cases C01); ``null_usage``: the client asked, so other chunks get
      ``"usage":null`` (:func:`with_null_usage`).
    - ``rename``: a :class:`ModelRename` for an upstream that names the model otherwise.

    ``feed`` works on whole events and never re-encodes the ones it forwards; ``feed_bytes`` and
    ``feed_events`` take the engine's reads as they come (cut into events by an
    :class:`EventSplitter`).
    """

    def __init__(self, flavor: "StreamFlavor", *, null_usage: bool = False,
                 drop_usage: bool = False) -> None:
        self.flavor, self.null_usage, self.drop_usage = flavor, null_usage, drop_usage
        self.tokens: dict[str, int] = {}
        self.gaps: list[float] = []
        self.finished = False  # the stream's terminal event has been handed on (flavor.complete)
        self.last_event = b""  # the last whole event the engine sent (flavor.complete reads it)
        self.rename: ModelRename | None = None
        self._last: float | None = None
        self._splitter = EventSplitter()

    def feed_bytes(self, chunk: bytes, now: float) -> bytes:
        """The bytes to forward of ``chunk``, the engine's next read, arrived at ``now`` (seconds,
        monotonic): its whole events as :meth:`feed` changes them; an event cut short waits for
        the rest. Where nothing but ``"usage":null`` is to be changed (OpenAI events, no
        rename) a read of whole events is forwarded as it came, with no split or join, and only
        an event with a usage in it goes through :meth:`feed`: the same bytes and the same gaps,
        for a fraction of the cost (issue #15). Where the client asked for usage, such a read gets
        its ``"usage":null`` in one replace when all its events are ``data:`` lines, as vLLM's are."""
        if not (self.flavor is OPENAI and self.rename is None
                and not self._splitter.pending and chunk.endswith(b"\n\n")
                and b"\r" not in chunk  # "\r\n" line ends (no JSON holds a raw CR)
                and _ROLE_ONLY not in chunk  # a stream's first read, once
                and (not self.null_usage or _data_only(chunk))):
            return b"".join(self.feed_events(chunk, now))
        at = chunk.find(_USAGE)
        if at < 0:
            return self._whole(chunk, now)
        out, pos = [], 0  # each event with a usage in it is chunk[start:end]; the runs between
        while at >= 0:    # them go whole (a loop: a read may hold thousands of such events)
            start = chunk.rfind(b"\n\n", pos, at)
            start = pos if start < 0 else start + 2
            end = chunk.find(b"\n\n", at) + 2
            if start > pos:
                out.append(self._whole(chunk[pos:start], now))
            self.last_event = chunk[start:end]
            out += self.feed([self.last_event], now)
            pos, at = end, chunk.find(_USAGE, end)
        if pos < len(chunk):
            out.append(self._whole(chunk[pos:], now))
        return b"".join(out)

    def feed_events(self, chunk: bytes, now: float) -> list[bytes]:
        """The events to forward of ``chunk``, the engine's next read, arrived at ``now``: its
        whole events (an event cut short waits for the rest) as :meth:`feed` changes them."""
        events = self._splitter.feed(chunk)
        if not events:
            return []
        self.last_event = events[-1]
        return self.feed(events, now)

    def _whole(self, chunk: bytes, now: float) -> bytes:
        """Count ``chunk``'s whole events, none with a usage, as :meth:`feed` would; forward it."""
        last = _last_event(chunk) if chunk.endswith(b"[DONE]\n\n") else b""
        done = is_done(last)  # [DONE] can only come last
        self.last_event = last if done else b""
        tokens = chunk.count(b"\n\n") - done  # as many as the splitter would cut
        if tokens:
            if self._last is not None:
                self.gaps.append(now - self._last)
            if tokens > 1:  # the rest of one read reach the client at once
                self.gaps.extend([0.0] * (tokens - 1))
            self._last = now
        self.finished = self.finished or done
        # Each "}\n\n" of a read of data: lines ends a chunk's JSON (a raw line break cannot be in
        # one): with_null_usage on every event, at once.
        return chunk.replace(_OBJ_END, _NULL_TAIL) if self.null_usage else chunk

    def rest(self) -> bytes:
        """Bytes of an event not yet ended (at the end of the stream: a truncated event)."""
        return self._splitter.rest()

    def feed(self, events: list[bytes], now: float) -> list[bytes]:
        """The events to forward, of ``events`` that arrived at ``now`` (seconds, monotonic)."""
        out = []
        openai = self.flavor.name == "openai"
        for event in events:
            if _USAGE in event and _USAGE_OBJ.search(event):
                self.tokens.update(usage_counts(event))
                if openai and _EMPTY_CHOICES.search(event):
                    if not self.drop_usage:
                        out.append(event)
                    continue
            if (openai or b"delta" in event) and not is_done(event) and _ROLE_ONLY not in event:
                if self._last is not None:
                    self.gaps.append(now - self._last)
                self._last = now
            out.append(with_null_usage(event) if self.null_usage else event)
        if self.rename is not None:
            out = [self.rename(e) for e in out]
        if out and self.flavor.complete(out[-1]):
            self.finished = True
        return out


def error_event(message: str, type_: str = "server_error", code: str | None = None,
                param: str | None = None) -> bytes:
    """One SSE event carrying an OpenAI error object (the ``openai`` client raises on it)."""
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _last_is(event: bytes, *needles: bytes) -> bool:
    return any(n in event for n in needles)


class StreamFlavor:
    """How one API family ends a stream and reports an error in it.

    - ``openai`` (chat, completions): ends with ``data: [DONE]``; errors as ``data: {"error": …}``.
    - ``responses`` (``/v1/responses``): ends with a ``response.completed`` (or ``.failed``,
      ``.incomplete``) event; errors as ``event: error`` + ``{"type": "error", "code", "message"}``.
    - ``anthropic`` (``/v1/messages``): ends with ``event: message_stop``; errors as ``event: error``
      + ``{"type": "error", "error": {"type": "api_error", "message"}}``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def complete(self, last_event: bytes) -> bool:
        """Did the engine end the stream properly, given its last whole event?"""
        if self.name == "openai":
            return is_done(last_event)
        if self.name == "responses":
            return _last_is(last_event, b'"response.completed"', b'"response.failed"',
                            b'"response.incomplete"')
        return _last_is(last_event, b"event: message_stop", b'"type":"message_stop"',
                        b'"type": "message_stop"')

    def keepalive(self) -> bytes:
        """One event that keeps a quiet stream alive and that clients skip: an SSE comment on the
        OpenAI routes (the ``openai`` client ignores lines starting with ``:``), Anthropic's
        ``ping`` event on ``/v1/messages`` (the ``anthropic`` client skips it)."""
        if self.name == "anthropic":
            return b'event: ping\ndata: {"type":"ping"}\n\n'
        return b": keep-alive\n\n"

    def error(self, message: str, code: str | None, *, type_: str = "server_error",
              param: str | None = None, status: int = 500) -> bytes:
        """One error event in this family's shape: the OpenAI error object (``type_``, ``code``,
        ``param``) on the OpenAI routes and ``/v1/responses``, Anthropic's error (its type from
        ``status``, as ``errors.anthropic_body`` maps it) on ``/v1/messages``."""
        if self.name == "openai":
            return error_event(message, type_, code, param)
        if self.name == "responses":
            body: dict[str, Any] = {"type": "error", "code": code, "message": message, "param": param}
        else:
            body = anthropic_body(status, message)
        return b"event: error\ndata: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


OPENAI, RESPONSES, ANTHROPIC = StreamFlavor("openai"), StreamFlavor("responses"), StreamFlavor("anthropic")
