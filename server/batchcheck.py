"""Checking a batch's input file (pure): its lines in, the tasks or the errors out.

Each line is ``{"custom_id", "method": "POST", "url", "body"}``. The checks and their error
codes are OpenAI's (``errors.data[{code, line, message, param}]``, lines counted from 1):
``invalid_json_line``, ``missing_required_parameter``, ``duplicate_custom_id``,
``url_mismatch`` (a ``url`` other than the batch's ``endpoint``), ``model_mismatch`` (more than
one model), ``model_not_found``, ``empty_file``, ``too_many_tasks`` (over :data:`MAX_LINES`) and
``file_too_large`` (over :data:`MAX_BYTES`). At most :data:`MAX_ERRORS` errors are reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from server.errors import InvalidRequest
from server.validation import MAX_DEPTH, check_nesting

MAX_LINES = 50_000  # OpenAI's limit on requests in one batch
MAX_BYTES = 200 * 1000 * 1000  # OpenAI's limit on a batch input file (200 MB)
MAX_ERRORS = 100
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


@dataclass
class Checked:
    """The outcome of :func:`check_lines`: the ``model`` named by every line, the ``custom_ids``
    in file order, and the ``errors`` (empty when the batch may run)."""

    model: str | None = None
    custom_ids: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "line": line, "message": message, "param": param})


def parse_line(raw: bytes, number: int, endpoint: str, out: Checked) -> dict[str, Any] | None:
    """One line's request, or ``None`` with its error added to ``out``."""
    try:
        task = json.loads(raw)
        check_nesting(task)  # what a request body may nest, so the line's body can be sent on
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        out.fail("invalid_json_line", "This line is not parseable as valid JSON.", number)
        return None
    except InvalidRequest:
        out.fail("invalid_json_line", f"This line nests arrays and objects more than "
                 f"{MAX_DEPTH} deep.", number)
        return None
    if not isinstance(task, dict):
        out.fail("invalid_json_line", "This line is not a JSON object.", number)
        return None
    for name in ("custom_id", "method", "url", "body"):
        if name not in task:
            out.fail("missing_required_parameter", f"Missing required parameter: '{name}'.",
                     number, name)
            return None
    if not isinstance(task["custom_id"], str) or not task["custom_id"]:
        out.fail("invalid_request", "custom_id must be a non-empty string.", number, "custom_id")
        return None
    if str(task["method"]).upper() != "POST":
        out.fail("invalid_request", "method must be POST.", number, "method")
        return None
    if task["url"] != endpoint:
        out.fail("url_mismatch", f"The url {task['url']!r} differs from the batch's endpoint "
                 f"{endpoint!r}.", number, "url")
        return None
    if not isinstance(task["body"], dict) or not isinstance(task["body"].get("model"), str):
        out.fail("missing_required_parameter", "body must be an object with a 'model'.", number,
                 "body.model")
        return None
    return task


def check_lines(lines: Iterable[bytes], endpoint: str, size: int,
                known: Callable[[str], tuple[str, str] | None]) -> Checked:
    """Check an input file of ``size`` bytes given as its ``lines``; ``known(model)`` is ``None``
    when the caller may use the model on this endpoint, else the error's ``(code, message)``.
    Blank lines are skipped."""
    out = Checked()
    if size > MAX_BYTES:
        out.fail("file_too_large", f"The input file is {size} bytes; a batch takes at most "
                 f"{MAX_BYTES} bytes.")
        return out
    seen: set[str] = set()
    count = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        count += 1
        if count > MAX_LINES:
            out.fail("too_many_tasks", f"The input file has more than {MAX_LINES} requests; a "
                     f"batch takes at most {MAX_LINES}.", number)
            return out
        task = parse_line(raw, number, endpoint, out)
        if task is None:
            continue
        cid, model = task["custom_id"], task["body"]["model"]
        if cid in seen:
            out.fail("duplicate_custom_id", f"The custom_id {cid!r} is used more than once.",
                     number, "custom_id")
        seen.add(cid)
        out.custom_ids.append(cid)
        if out.model is None:
            out.model = model
            refused = known(model)
            if refused is not None:
                out.fail(refused[0], refused[1], number, "body.model")
        elif model != out.model:
            out.fail("model_mismatch", f"Every request in a batch must use one model: this line "
                     f"uses {model!r}, an earlier one {out.model!r}.", number, "body.model")
    if count == 0:
        out.fail("empty_file", "The input file has no requests.")
    return out


def read_tasks(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    """The requests of an input file that :func:`check_lines` passed, in file order."""
    for raw in lines:
        if raw.strip():
            yield json.loads(raw)
