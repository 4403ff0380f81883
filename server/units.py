"""Byte sizes as configurations write them (``"512MiB"``, ``"2GiB"``, ``"1.5GB"``) and as logs
show them. Below every other module: the configuration and the GPU layouts both read sizes."""

from __future__ import annotations

import re
from typing import Any

from server.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, where: str) -> int:
    """Parse a byte count: an int, or a string such as ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``.

    Raises :class:`ConfigError` naming ``where`` for anything else or a negative number.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a byte count such as 4GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{where}: must be a byte count such as 4GiB, got {value!r}")
