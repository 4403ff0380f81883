"""Changes the gateway makes to a request body before its engine sees it (pure functions).

Each returns a new body (a ``dict``) when it changes something and ``None`` when it does not, so
that an untouched request is forwarded byte for byte.

- :func:`fim_completion`: ``prompt`` + ``suffix`` on ``/v1/completions`` → the model's own FIM
  prompt (``server.fim``), its stop tokens as ``stop_token_ids``, an output budget when none is set.
- :func:`special_stops`: client ``stop`` strings that are special tokens → ``stop_token_ids`` (vLLM
  strips special tokens from the text before it matches stop strings, so they would never fire).
- :func:`fit_output`: an output budget above the model's context → the context (vLLM 0.32 refuses
  ``max_tokens`` > ``max_model_len`` with a 400 but itself serves a smaller ``max_tokens`` with at
  most what the prompt leaves, ending with ``finish_reason: "length"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from server.fim import ExtraFile, Fim
from server.modelfiles import ModelFiles

# Route → the fields that carry its output budget (tokens).
BUDGET_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


@dataclass(frozen=True)
class BudgetNote:
    """Output budgets the gateway lowered: the fields ``params``, the largest ``requested``
    value, now ``sent`` tokens."""

    params: tuple[str, ...]
    requested: int
    sent: int

    def header(self) -> str:
        """The ``x-vramgate-max-tokens`` header: ``<sent>; requested=<n>; param=<field>[,<field>]``."""
        return f"{self.sent}; requested={self.requested}; param={','.join(self.params)}"


def budget_value(value: Any) -> int | None:
    """A token count as vLLM's pydantic models (lax mode) read one: an int, a float without a
    fraction, or a string of digits; ``None`` for anything else (vLLM judges those)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def fit_output(body: dict[str, Any], route: str,
               max_model_len: int | None) -> tuple[dict[str, Any] | None, BudgetNote | None]:
    """Lower each output-budget field of ``route`` that asks for more than ``max_model_len``
    tokens to ``max_model_len``; vLLM then serves at most what the prompt leaves of the context.
    Returns ``(new body or None, what was lowered or None)``."""
    if not max_model_len:
        return None, None
    changed: dict[str, int] = {}
    requested = 0
    for param in BUDGET_FIELDS.get(route, ()):
        value = budget_value(body.get(param))
        if value is not None and value > max_model_len:
            changed[param] = max_model_len
            requested = max(requested, value)
    if not changed:
        return None, None
    return dict(body, **changed), BudgetNote(tuple(changed), requested, max_model_len)


def _stop_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _token_ids(value: Any, param: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise InvalidRequest(f"'{param}' must be an array of token ids.", param=param,
                             code="invalid_type")
    return list(value)


def special_stops(body: dict[str, Any], files: ModelFiles,
                  extra_ids: tuple[int, ...] = (), extra_stop: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Move ``stop`` strings that are tokens of ``files``' tokenizer to ``stop_token_ids`` (and
    add ``extra_ids``/``extra_stop``); ``None`` when nothing changes."""
    stops = _stop_list(body.get("stop"))
    if not (files.tokens and stops) and not extra_ids and not extra_stop:
        return None
    ids = _token_ids(body.get("stop_token_ids"), "stop_token_ids")
    kept: list[Any] = []
    for stop in stops:
        tid = files.token_id(stop) if isinstance(stop, str) else None
        if tid is None:
            kept.append(stop)
        elif tid not in ids:
            ids.append(tid)
    kept += [s for s in extra_stop if s not in kept]
    ids += [i for i in extra_ids if i not in ids]
    if kept == stops and ids == _token_ids(body.get("stop_token_ids"), "stop_token_ids"):
        return None
    out = dict(body, stop=kept or None)
    if ids:
        out["stop_token_ids"] = ids
    return out


def _extra_files(value: Any) -> list[ExtraFile]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("'input_extra' must be an array of {filename, text} objects.",
                             param="input_extra", code="invalid_type")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("text", ""), str) or not isinstance(
                item.get("filename", ""), str):
            raise InvalidRequest(f"'input_extra[{i}]' must be an object with string filename and "
                                 "text.", param=f"input_extra[{i}]", code="invalid_type")
        out.append(ExtraFile(item.get("filename") or "tmp", item.get("text") or ""))
    return out


def fim_completion(body: dict[str, Any], model: str, fim: Fim | None, files: ModelFiles,
                   default_max_tokens: int, middle: str = "") -> dict[str, Any]:
    """A ``/v1/completions`` body with ``suffix`` turned into ``model``'s FIM prompt.

    ``prompt`` (text, or an array of texts: one FIM prompt each) is what comes before the
    cursor, ``suffix`` what comes after; the vramgate extension ``input_extra`` (as llama.cpp's
    ``/infill``: ``[{filename, text}]``) adds files of repository context. The family's stop
    tokens join ``stop_token_ids``; without ``max_tokens`` the request gets ``default_max_tokens``
    (vLLM's own default, 16, cuts most completions short). ``middle`` goes after the FIM prompt,
    as the start of the middle (llama.cpp's ``/infill`` ``prompt``). Raises :class:`InvalidRequest`: 400
    ``suffix_not_supported`` when the model has no FIM format, ``invalid_type`` for a suffix that
    is not text or a prompt of token ids.
    """
    suffix = body.get("suffix")
    if not isinstance(suffix, str):
        raise InvalidRequest("'suffix' must be a string.", param="suffix", code="invalid_type")
    if fim is None:
        raise InvalidRequest(
            f"The model '{model}' has no fill-in-the-middle tokens in its tokenizer, so it cannot "
            "complete with a 'suffix'. Use a FIM-trained model, or set 'fim' for this model in "
            "the configuration.", param="suffix", code="suffix_not_supported")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("With 'suffix', 'prompt' must be text (a string or an array of "
                             "strings), not token ids.", param="prompt", code="invalid_type")
    extra = _extra_files(body.get("input_extra"))
    rendered = [fim.render(p, suffix, extra) + middle for p in prompts]
    out = {k: v for k, v in body.items() if k not in ("suffix", "input_extra")}
    out["prompt"] = rendered[0] if isinstance(prompt, str) else rendered
    if out.get("max_tokens") is None:
        out["max_tokens"] = default_max_tokens
    return special_stops(out, files, fim.stop_token_ids, fim.stop) or out
