"""The access log: one line per request, under the ``vramgate.access`` logger's name.

``vramgate serve`` writes each line to stderr in one ``write``, in the format that the root
handler uses for every other line (``%(asctime)s %(levelname)s %(name)s: %(message)s``). It builds
no ``logging.LogRecord`` and takes no handler lock. py-spy put the record, the lock and the
formatter at about 6% of the gateway's CPU per request (``loadtest/README.md``, issue #15).
Embedded (``create_app`` without a stream: the tests, an application that brings its own
handlers), lines go through ``logging``, so ``caplog`` and any handler see them.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, TextIO

ACCESS = logging.getLogger("vramgate.access")


def access_line(fmt: str, **fields: Any) -> str:
    """One access-log line: ``json`` (one object) or ``text`` (``key=value`` pairs); fields that
    are ``None`` are left out."""
    kept = {k: v for k, v in fields.items() if v is not None}
    if fmt == "json":
        return json.dumps(kept, separators=(",", ":"))
    return " ".join(f"{k}={v}" for k, v in kept.items())


class AccessLog:
    """Where access lines go: ``stream`` (one write per line, a ``logging``-style prefix in local
    time with milliseconds), or ``logging`` when ``stream`` is ``None``. Either way nothing is
    written unless ``vramgate.access`` is enabled for INFO. A stream that fails (closed, a broken
    pipe) is dropped, and the lines go on through ``logging``, which reports its own errors."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._second = -1  # the Unix second whose formatted time is in ``_stamp``
        self._stamp = ""

    def write(self, fmt: str, **fields: Any) -> None:
        """Write one line of ``fields`` in ``fmt`` (see :func:`access_line`)."""
        if not ACCESS.isEnabledFor(logging.INFO):
            return
        line = access_line(fmt, **fields)
        if self.stream is not None:
            now = time.time()
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            try:
                self.stream.write(f"{self._stamp},{int((now - second) * 1000):03d} INFO "
                                  f"vramgate.access: {line}\n")
                return
            except (OSError, ValueError):  # a closed or broken stream: logging from now on
                self.stream = None
        ACCESS.info(line)
