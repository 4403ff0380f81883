"""``BulkHistogram`` reads exactly as prometheus_client's ``Histogram`` fed the same values."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest

from server.bulkhist import BulkHistogram
from server.metrics import ITL_BUCKETS


def test_the_exposition_is_a_histograms_byte_for_byte():
    disable_created_metrics()  # as server.metrics does
    rng = random.Random(15)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("gap_seconds", "Gaps.", ["model"], ITL_BUCKETS, ours, namespace="x")
    hist = Histogram("gap_seconds", "Gaps.", ["model"], namespace="x", buckets=ITL_BUCKETS,
                     registry=theirs)
    for model in ("a", "b", "idle"):
        bulk.labels(model)
        hist.labels(model)
    for _ in range(50):  # streams of gaps: on a bound, between, past the last, zero
        model = rng.choice("ab")
        gaps = [rng.choice([0.0, 0.001, 80.0, 100.0, rng.uniform(0, 2)]) for _ in range(rng.randrange(20))]
        bulk.observe_many((model,), gaps)
        for gap in gaps:
            hist.labels(model).observe(gap)
    got, want = generate_latest(ours).decode(), generate_latest(theirs).decode()
    assert got == want
    assert 'x_gap_seconds_count{model="idle"} 0.0' in got


def test_unsorted_buckets_and_wrong_label_counts_are_refused():
    with pytest.raises(ValueError):
        BulkHistogram("y", "Y.", ["model"], (1.0, 0.5), CollectorRegistry())
    h = BulkHistogram("z", "Z.", ["model"], (1.0,), CollectorRegistry())
    with pytest.raises(ValueError):
        h.labels("a", "b")
