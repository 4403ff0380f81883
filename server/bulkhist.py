"""A labelled Prometheus histogram that takes a stream's many observations in one call.

A 64-token stream has 63 inter-token gaps. prometheus_client's ``Histogram.observe`` takes a lock
twice and walks the buckets for each one: 15 gaps a stream were 3.3% of the gateway's CPU in a
py-spy profile (issue #15). :class:`BulkHistogram` counts a whole stream's gaps with ``bisect``
into plain lists and is exposed through prometheus_client's custom-collector API
(``HistogramMetricFamily``), so the series, their names and ``le`` labels read exactly as a
``Histogram``'s would.

Only the event loop's thread observes and collects (the ``/metrics`` route renders there), so
there is no lock.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class BulkHistogram:
    """Histogram ``name`` (``<namespace>_<name>`` with a ``namespace``, as prometheus_client
    names them) with ``labelnames``, bucket upper bounds ``buckets`` (seconds or any unit,
    ascending; ``+Inf`` is added), registered in ``registry``. Raises ``ValueError`` for unsorted
    buckets, and as ``registry.register`` does for a name already taken."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry, namespace: str = "") -> None:
        name = f"{namespace}_{name}" if namespace else name
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets must be in ascending order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in bounds)
        # label values -> [count in each bucket (not cumulative)], and -> sum of the values
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def labels(self, *values: str) -> None:
        """Make the series of ``values`` exist at zero (a ``rate()`` over it exists before the
        first observation)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
        if values not in self._counts:
            self._counts[values] = [0] * len(self.bounds)
            self._sums[values] = 0.0

    def observe_many(self, values: tuple[str, ...], amounts: Iterable[float]) -> None:
        """Observe each of ``amounts`` in the series of label ``values``."""
        counts = self._counts.get(values)
        if counts is None:
            self.labels(*values)
            counts = self._counts[values]
        bounds, total = self.bounds, self._sums[values]
        for amount in amounts:  # added one by one, as Histogram.observe does: the same float sum
            counts[bisect.bisect_left(bounds, amount)] += 1
            total += amount
        self._sums[values] = total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The exposition: cumulative buckets, ``_count`` and ``_sum`` for every series."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counts in self._counts.items():
            cumulative, buckets = 0, []
            for le, n in zip(self._le, counts):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, self._sums[values])
        yield family

    def describe(self) -> list[HistogramMetricFamily]:
        """The family without samples, for the registry's name check."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]
