"""Engines' own Prometheus metrics, re-exported through the gateway's ``/metrics`` (pure parts).

Each engine's ``vllm:*`` samples are copied with two labels added, ``model`` (the canonical name)
and ``replica`` (its index), so one scrape of the gateway shows KV-cache usage, running and waiting
requests and vLLM's own latencies per model. ``# HELP``/``# TYPE`` lines appear once per family.
Label values are escaped as the text exposition format requires.
"""

from __future__ import annotations

import re
from typing import Iterable

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(.*)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def relabel(text: str, labels: dict[str, str], seen_meta: set[str],
            prefix: str = "vllm:") -> list[str]:
    """Lines of ``text`` (Prometheus text format) whose metric names start with ``prefix``, with
    ``labels`` added to every sample. Metadata lines already in ``seen_meta`` are dropped, and
    the ones kept are added to it. Lines that do not parse are skipped."""
    extra = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[2].startswith(prefix):
                key = f"{parts[1]} {parts[2]}"
                if key not in seen_meta:
                    seen_meta.add(key)
                    out.append(line)
            continue
        m = _SAMPLE.match(line)
        if not m or not m.group(1).startswith(prefix):
            continue
        name, existing, value = m.groups()
        inner = existing[1:-1].rstrip(",") if existing else ""
        out.append(f"{name}{{{extra}{',' if inner else ''}{inner}}} {value}")
    return out


def merge(scrapes: Iterable[tuple[dict[str, str], str]]) -> str:
    """One text block from several engines' scrapes (``(labels, text)`` pairs), families kept
    together so that each family's samples follow its single ``# TYPE`` line."""
    seen: set[str] = set()
    families: dict[str, list[str]] = {}
    order: list[str] = []
    for labels, text in scrapes:
        for line in relabel(text, labels, seen):
            if line.startswith("#"):
                fam = line.split(" ", 3)[2]
            else:
                fam = _SAMPLE.match(line).group(1)  # type: ignore[union-attr]
                for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
                    if fam.endswith(suffix) and fam[: -len(suffix)] in families:
                        fam = fam[: -len(suffix)]
                        break
            if fam not in families:
                families[fam] = []
                order.append(fam)
            families[fam].append(line)
    return "".join(line + "\n" for fam in order for line in families[fam])
