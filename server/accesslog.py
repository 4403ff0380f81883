"""The access log: one line per request, under the ``vramgate.access`` logger's name.

``vramgate serve`` writes the lines to stderr in the format that the root handler uses for every
other line (``%(asctime)s %(levelname)s %(name)s: %(message)s``). It builds no
``logging.LogRecord`` and takes no handler lock: py-spy put the record, the lock and the
formatter at about 6% of the gateway's CPU per request (``loadtest/README.md``, issue #15). The
lines of one turn of the event loop go out in one ``write``, once the turn's answers are sent
(the write was another 4.5%); a line is never more than that turn late.
Embedded (``create_app`` without a stream: the tests, an application that brings its own
handlers), lines go through ``logging``, so ``caplog`` and any handler see them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, TextIO

ACCESS = logging.getLogger("vramgate.access")


# A text value with any of these is written as a JSON string: a path with ``%0A`` in it (the
# route is the decoded path) could otherwise forge a line, and one with a space a field.
_UNSAFE = re.compile(r'[\x00-\x20\x7f"]')


# ``text`` lines by the names they have: "k1=%s k2=%s ...", one ``%`` a line instead of an
# f-string a field and a join (2.4 µs of 6.9 a line, issue #15). The callers' field sets are few.
_TEMPLATES: dict[tuple[str, ...], str] = {}


def access_line(fmt: str, **fields: Any) -> str:
    """One access-log line: ``json`` (one object) or ``text`` (``key=value`` pairs, a value with a
    control character, a space or a quote as a JSON string); fields that are ``None`` are left
    out."""
    if fmt == "json":
        return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))
    names, values = [], []
    for name, value in fields.items():
        if value is not None:
            names.append(name)
            values.append(json.dumps(value) if isinstance(value, str) and _UNSAFE.search(value)
                          else value)
    key = tuple(names)
    template = _TEMPLATES.get(key)
    if template is None:
        template = " ".join(f"{name}=%s" for name in names)
        if len(_TEMPLATES) < 256:  # bounded, whatever a caller passes
            _TEMPLATES[key] = template
    return template % tuple(values)


class AccessLog:
    """Where access lines go: ``stream`` (a ``logging``-style prefix in local time with
    milliseconds; each event-loop turn's lines in one write), or ``logging`` when ``stream`` is
    ``None``. Only the event loop's thread writes. Either way nothing is written while
    ``enabled`` is false (the ``access_log`` setting, which the gateway applies at start and at
    each reload) or ``vramgate.access`` is not enabled for INFO. A stream that fails (closed, a
    broken pipe) is dropped, and the lines go on through ``logging``, which reports its own
    errors."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.enabled = True
        self._second = -1  # the Unix second whose formatted time is in ``_stamp``
        self._stamp = ""
        self._pending: list[tuple[str, str]] = []  # this turn's (time, line), for flush()

    def write(self, fmt: str, **fields: Any) -> None:
        """Write one line of ``fields`` in ``fmt`` (see :func:`access_line`): on a stream, at the
        end of this turn of the running event loop (at once outside one)."""
        if not self.enabled or not ACCESS.isEnabledFor(logging.INFO):
            return
        line = access_line(fmt, **fields)
        if self.stream is None:
            ACCESS.info(line)
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._pending.append((f"{self._stamp},{int((now - second) * 1000):03d}", line))
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running here
                self.flush()

    def flush(self) -> None:
        """Write the pending lines in one ``write``; the gateway's lifespan also calls this as it
        ends."""
        lines, self._pending = self._pending, []
        if not lines:
            return
        if self.stream is not None:
            try:
                self.stream.write("".join(f"{stamp} INFO vramgate.access: {line}\n"
                                          for stamp, line in lines))
                return
            except (OSError, ValueError):  # a closed or broken stream: logging from now on
                self.stream = None
        for _, line in lines:
            ACCESS.info(line)
