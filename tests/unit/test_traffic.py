"""The console's traffic figures: Prometheus's histogram_quantile, rates between samples, resets,
the 15-minute window, and reading the gateway's own registry."""

from __future__ import annotations

import math

import pytest

from server.metrics import Metrics
from server.traffic import Totals, Traffic, histogram_quantile, interval_point, read_totals

INF = math.inf


def test_histogram_quantile_interpolates_like_prometheus():
    # 10 observations: 4 under 0.1 s, 6 between 0.1 and 0.5 s. The median's rank 5 is the
    # first of the six: 0.1 + 0.4 * 1/6.
    buckets = ((0.1, 4.0), (0.5, 10.0), (INF, 10.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 / 6)
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None
    assert histogram_quantile(0.5, ()) is None
    # A rank in the +Inf bucket: the highest finite bound.
    assert histogram_quantile(0.9, ((0.1, 1.0), (0.5, 2.0), (INF, 10.0))) == 0.5


def test_interval_point_rates_and_median():
    before = Totals(10, 100, 1, ((0.1, 2.0), (0.5, 2.0), (INF, 2.0)), 0)
    after = Totals(20, 300, 3, ((0.1, 2.0), (0.5, 6.0), (INF, 6.0)), 4)
    point = interval_point(before, after, 5.0)
    assert point["req_s"] == 2.0 and point["tok_s"] == 40.0 and point["rejections_s"] == 0.4
    # Only the interval's four observations count, all between 0.1 and 0.5 s.
    assert point["ttft_p50_s"] == pytest.approx(0.1 + 0.4 * 2 / 4)
    assert point["queued"] == 4
    # No stream started in the interval: no median, not zero.
    assert interval_point(after, after, 5.0)["ttft_p50_s"] is None


def test_a_reset_counts_from_zero_and_a_new_model_from_nothing():
    old = Totals(50, 500, 5, ((0.1, 9.0), (INF, 9.0)))
    new = Totals(3, 30, 0, ((0.1, 1.0), (INF, 2.0)))
    point = interval_point(old, new, 1.0)
    assert point["req_s"] == 3 and point["tok_s"] == 30 and point["rejections_s"] == 0
    assert point["ttft_p50_s"] == pytest.approx(0.1)  # the reset histogram is all new
    assert interval_point(None, Totals(requests=4), 2.0)["req_s"] == 2.0


def test_traffic_keeps_the_window_and_fills_gaps_with_none():
    traffic = Traffic(interval=60.0, window=180.0)  # three points at most
    traffic.add(0, {"a": Totals()})
    assert traffic.series()["t"] == []  # one sample is no interval yet
    for i in range(1, 6):
        totals = {"a": Totals(requests=60.0 * i)}
        if i == 5:
            totals["b"] = Totals(requests=30.0)
        traffic.add(60.0 * i, totals)
    series = traffic.series()
    assert series["t"] == [180.0, 240.0, 300.0]
    assert series["models"]["a"]["req_s"] == [1.0, 1.0, 1.0]
    assert series["models"]["b"]["req_s"] == [None, None, 0.5]
    assert set(traffic.series(["b", "zzz"])["models"]) == {"b"}
    # The sample clock is monotonic; the charts get Unix seconds through the offset.
    assert traffic.series(offset=1000.0)["t"] == [1180.0, 1240.0, 1300.0]


def test_read_totals_from_the_gateway_registry():
    metrics = Metrics({"chat": ("/v1/chat/completions",), "embed": ("/v1/embeddings",)}, ["ready"])
    metrics.observe("chat", "/v1/chat/completions", 200, 0.2)
    metrics.observe("chat", "/v1/chat/completions", 503, 0.1)
    metrics.tokens.labels("chat", "completion").inc(7)
    metrics.tokens.labels("chat", "prompt").inc(100)  # not output
    metrics.rejections.labels("chat", "queue_full").inc()
    metrics.ttft.labels("chat", "/v1/chat/completions").observe(0.03)
    samples = [(s.name, s.labels, s.value) for m in metrics.registry.collect() for s in m.samples]
    totals = read_totals(samples, {"chat": 2, "embed": 0, "idle": 0})
    chat = totals["chat"]
    assert (chat.requests, chat.output_tokens, chat.rejections, chat.queued) == (2, 7, 1, 2)
    assert histogram_quantile(0.5, chat.ttft_buckets) == pytest.approx(0.025 + 0.025 / 2)
    assert totals["embed"].requests == 0 and totals["idle"] == Totals()
