"""Live traffic for the web console (``/console/traffic``): the gateway's own counters sampled every
few seconds and kept for 15 minutes, as per-model rates. No Prometheus is needed: the samples are
read from the gateway's registry (``server.metrics``), and the rules are Prometheus's own.

Per model and interval (``interval`` seconds, ``traffic_interval`` in the configuration):

- ``req_s``: requests answered per second (``vramgate_requests_total``, every status);
- ``tok_s``: output tokens per second (``vramgate_tokens_total{kind="completion"}``);
- ``rejections_s``: requests refused before the engine per second (``vramgate_rejections_total``);
- ``ttft_p50_s``: the median time to first token of the streamed requests answered in the interval,
  from the bucket counts of ``vramgate_time_to_first_token_seconds`` interpolated as
  ``histogram_quantile`` does; ``None`` when none was;
- ``queued``: requests waiting for the model at the sample.

A counter that went down (a model removed and added again by a reload) counts from zero, as
Prometheus's ``rate`` treats a reset.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger("vramgate.traffic")

WINDOW_SECONDS = 900.0  # what the console's charts show: the last 15 minutes
SERIES = ("req_s", "tok_s", "rejections_s", "ttft_p50_s", "queued")


@dataclass(frozen=True)
class Totals:
    """One model's cumulative counters at one instant: requests answered, output tokens and
    rejections (counts), the TTFT histogram as ``(upper bound in seconds, cumulative count)``
    pairs ending with ``inf``, and the requests queued then."""

    requests: float = 0.0
    output_tokens: float = 0.0
    rejections: float = 0.0
    ttft_buckets: tuple[tuple[float, float], ...] = ()
    queued: int = 0


def read_totals(samples: Iterable[tuple[str, dict[str, str], float]],
                queued: dict[str, int]) -> dict[str, Totals]:
    """Fold Prometheus samples ``(name, labels, value)`` of the gateway's registry into
    :class:`Totals` per model (summed over routes, statuses and reasons). ``queued`` maps each
    model to its waiting requests; a model in neither gets no entry."""
    acc: dict[str, dict[str, Any]] = {}

    def entry(model: str) -> dict[str, Any]:
        return acc.setdefault(model, {"requests": 0.0, "output_tokens": 0.0, "rejections": 0.0,
                                      "buckets": {}})
    for name, labels, value in samples:
        model = labels.get("model")
        if model is None:
            continue
        if name == "vramgate_requests_total":
            entry(model)["requests"] += value
        elif name == "vramgate_tokens_total" and labels.get("kind") == "completion":
            entry(model)["output_tokens"] += value
        elif name == "vramgate_rejections_total":
            entry(model)["rejections"] += value
        elif name == "vramgate_time_to_first_token_seconds_bucket":
            le = float(labels["le"])
            buckets = entry(model)["buckets"]
            buckets[le] = buckets.get(le, 0.0) + value
    for model in queued:
        entry(model)
    return {m: Totals(a["requests"], a["output_tokens"], a["rejections"],
                      tuple(sorted(a["buckets"].items())), queued.get(m, 0))
            for m, a in acc.items()}


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The ``q`` quantile (0..1) of a histogram given as sorted ``(upper bound, cumulative count)``
    pairs, by Prometheus's ``histogram_quantile``: linear interpolation inside the bucket the rank
    falls in (the first bucket starts at 0); a rank in the ``+Inf`` bucket gives the highest finite
    bound. ``None`` when the histogram holds no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _increase(prev: float, cur: float) -> float:
    return cur - prev if cur >= prev else cur  # a reset counts from zero


def interval_point(prev: Totals | None, cur: Totals, seconds: float) -> dict[str, float | None]:
    """One model's point for an interval of ``seconds`` between two samples (see the module
    docstring for the fields). ``prev`` is ``None`` for a model that appeared in this interval."""
    prev = prev or Totals()
    span = max(seconds, 1e-9)
    old = dict(prev.ttft_buckets)
    delta = tuple((le, _increase(old.get(le, 0.0), count)) for le, count in cur.ttft_buckets)
    if delta and any(count < old.get(le, 0.0) for le, count in cur.ttft_buckets):
        delta = cur.ttft_buckets  # the histogram was reset: all of it is new
    return {"req_s": _increase(prev.requests, cur.requests) / span,
            "tok_s": _increase(prev.output_tokens, cur.output_tokens) / span,
            "rejections_s": _increase(prev.rejections, cur.rejections) / span,
            "ttft_p50_s": histogram_quantile(0.5, delta),
            "queued": cur.queued}


class Traffic:
    """The last :data:`WINDOW_SECONDS` of per-model points, one every ``interval`` seconds.
    Owned by its sampler task (:meth:`run`); handlers only call :meth:`series`."""

    def __init__(self, interval: float, window: float = WINDOW_SECONDS) -> None:
        self.interval = interval
        self.points: deque[tuple[float, dict[str, dict]]] = deque(
            maxlen=max(1, math.ceil(window / interval)))
        self._last: tuple[float, dict[str, Totals]] | None = None

    def add(self, at: float, totals: dict[str, Totals]) -> None:
        """Take a sample made at ``at`` (seconds of a clock that never goes back: the spans
        between samples come from it); from the second sample on, it adds a point."""
        if self._last is not None:
            then, old = self._last
            self.points.append((at, {m: interval_point(old.get(m), t, at - then)
                                     for m, t in totals.items()}))
        self._last = (at, totals)

    def series(self, models: Iterable[str] | None = None, offset: float = 0.0) -> dict[str, Any]:
        """Columns for the charts: ``t`` (each point's end: its sample clock plus ``offset``, the
        Unix time at that clock's zero) and, per model (all, or those of ``models``), one list per
        field of :data:`SERIES`, ``None`` where the model had no point."""
        keep = None if models is None else set(models)
        names = sorted({m for _, pts in self.points for m in pts if keep is None or m in keep})
        return {"interval_s": self.interval, "window_s": WINDOW_SECONDS,
                "t": [round(at + offset, 3) for at, _ in self.points],
                "models": {m: {f: [pts.get(m, {}).get(f) for _, pts in self.points] for f in SERIES}
                           for m in names}}

    async def run(self, read: Callable[[], dict[str, Totals]],
                  clock: Callable[[], float] = time.monotonic) -> None:
        """Sample ``read()`` now and every ``interval`` seconds until cancelled (a failed read is
        logged and skipped). ``clock`` must never go back (a wall clock that an NTP step moves
        would give a span near zero and an absurd rate)."""
        while True:
            try:
                self.add(clock(), read())
            except Exception:  # the charts miss a point; the gateway goes on
                log.exception("traffic: sampling failed")
            await asyncio.sleep(self.interval)
