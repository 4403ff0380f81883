"""llama.cpp's ``POST /infill`` (used by llama.vscode and other editor plugins), served through the
same FIM rendering as ``/v1/completions`` with ``suffix`` (pure translations both ways).

Request (llama.cpp server README): ``input_prefix`` and ``input_suffix`` (text before and after the
cursor), ``prompt`` (after the FIM prompt, as llama.cpp puts it: the start of the middle),
``input_extra`` (``[{filename, text}]`` of repository context), ``n_predict`` (output budget; -1
or missing: the model's ``fim_max_tokens``; 0: evaluate the prompt only, as llama.vscode's cache
warm-ups ask: one token is made and not returned),
``stream``, the sampling fields ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``,
``ignore_eos``, ``stop``, ``logit_bias`` (an object, or llama.cpp's ``[[id, bias], ...]``), and an
optional ``model`` (default: the first configured model that has FIM tokens).
llama.cpp's own tuning fields (``cache_prompt``, ``t_max_predict_ms``, ``n_indent``, ``id_slot``,
``samplers``, …) are accepted and ignored.

Answer as llama.cpp writes it: ``{"content", "stop": true, "model", "tokens_predicted",
"tokens_evaluated", "stop_type": "eos"|"limit"|"word", "truncated"}``; streamed, one
``data: {"content", "stop": false}`` event per chunk, then one with ``"stop": true`` and the counts
(no ``[DONE]``: llama.cpp's own routes end without it).
"""

from __future__ import annotations

import json
from typing import Any

from server.errors import InvalidRequest

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "ignore_eos")
_STOP_TYPE = {"length": "limit", "stop": "eos"}


def to_completion(body: dict[str, Any], model: str, default_max_tokens: int) -> dict[str, Any]:
    """The ``/v1/completions`` body (with ``suffix``, for ``rewrite.fim_completion``; ``prompt``
    is for its ``middle``, see :func:`middle`) for an ``/infill`` ``body``; raises
    :class:`InvalidRequest` naming a field of the wrong type."""
    for field in ("input_prefix", "input_suffix", "prompt"):
        if not isinstance(body.get(field, ""), str):
            raise InvalidRequest(f"'{field}' must be a string.", param=field, code="invalid_type")
    n = body.get("n_predict", -1)
    if isinstance(n, bool) or not isinstance(n, int):
        raise InvalidRequest("'n_predict' must be an integer.", param="n_predict", code="invalid_type")
    out: dict[str, Any] = {
        "model": model, "prompt": body.get("input_prefix", ""),
        "suffix": body.get("input_suffix", ""), "stream": body.get("stream") is True,
        "max_tokens": n if n > 0 else 1 if n == 0 else default_max_tokens}
    if body.get("input_extra") is not None:
        out["input_extra"] = body["input_extra"]
    out.update({k: body[k] for k in _SAMPLING if body.get(k) is not None})
    if isinstance(body.get("repeat_penalty"), (int, float)):
        out["repetition_penalty"] = body["repeat_penalty"]
    if body.get("stop"):
        out["stop"] = body["stop"]
    bias = body.get("logit_bias")
    if isinstance(bias, list):  # llama.cpp's [[token id, bias], ...]
        bias = {str(p[0]): p[1] for p in bias if isinstance(p, list) and len(p) == 2
                and isinstance(p[0], int) and isinstance(p[1], (int, float))}
    if isinstance(bias, dict) and bias:
        out["logit_bias"] = bias
    return out


def middle(body: dict[str, Any]) -> str:
    """llama.cpp's ``prompt`` of an ``/infill`` body: text after the FIM prompt."""
    value = body.get("prompt", "")
    return value if isinstance(value, str) else ""


def warm_only(body: dict[str, Any]) -> bool:
    """``n_predict: 0``: evaluate the prompt only (its one generated token is not returned)."""
    return body.get("n_predict") == 0 and not isinstance(body.get("n_predict"), bool)


def _stop_fields(choice: dict[str, Any]) -> dict[str, Any]:
    reason = choice.get("finish_reason")
    word = choice.get("stop_reason")
    stop_type = "word" if isinstance(word, str) else _STOP_TYPE.get(reason, "eos")
    return {"stop_type": stop_type, "stopping_word": word if isinstance(word, str) else ""}


def from_completion(answer: dict[str, Any], model: str, warm: bool = False) -> dict[str, Any]:
    """llama.cpp's ``/infill`` answer for a whole ``/v1/completions`` ``answer`` (``warm``: a
    prompt-only request, nothing predicted)."""
    choice = (answer.get("choices") or [{}])[0]
    usage = answer.get("usage") or {}
    return {"content": "" if warm else choice.get("text") or "", "stop": True, "model": model,
            "tokens_predicted": 0 if warm else usage.get("completion_tokens", 0),
            "tokens_evaluated": usage.get("prompt_tokens", 0), "truncated": False,
            **_stop_fields(choice)}


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class InfillStream:
    """Turns the engine's ``/v1/completions`` SSE events into llama.cpp's ``/infill`` events.

    ``feed(events)`` takes whole engine events and returns the events to send; the engine's
    ``[DONE]`` becomes the final ``"stop": true`` event with the token counts: ``tokens``
    (``{"prompt": n, "completion": m}``, filled by the gateway's ``StreamTap`` from the usage chunk
    it asked for and removed) or the usage chunk itself when it comes through.
    """

    def __init__(self, model: str, tokens: dict[str, int] | None = None, warm: bool = False) -> None:
        self.model = model
        self.warm = warm
        self._tokens = tokens if tokens is not None else {}
        self._final: dict[str, Any] = {"stop_type": "eos", "stopping_word": ""}

    def feed(self, events: list[bytes]) -> list[bytes]:
        out = []
        for event in events:
            if not event.startswith(b"data: "):
                out.append(event)  # keep-alive comments and the like
                continue
            data = event[6:].strip()
            if data == b"[DONE]":
                out.append(_event({"content": "", "stop": True, "model": self.model,
                                   "tokens_predicted": 0 if self.warm else self._tokens.get("completion", 0),
                                   "tokens_evaluated": self._tokens.get("prompt", 0),
                                   "truncated": False, **self._final}))
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if "error" in chunk:
                out.append(event)
                continue
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._tokens.setdefault("prompt", usage.get("prompt_tokens", 0))
                self._tokens.setdefault("completion", usage.get("completion_tokens", 0))
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    self._final = _stop_fields(choice)
                if choice.get("text") and not self.warm:
                    out.append(_event({"content": choice["text"], "stop": False}))
        return out
