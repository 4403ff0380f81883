"""The peer benchmarks' pure parts: guidellm's report read into our figures, the ratios over
rounds, and vramgate's Server-Timing header read back by the load generator."""

from __future__ import annotations

import pytest

from loadtest.loadgen import gateway_seconds
from loadtest.peers import METRICS, guidellm_figures, ratios


def test_guidellm_report_figures():
    def stat(mean, p50, p99):
        return {"successful": {"mean": mean, "median": p50, "percentiles": {"p50": p50, "p99": p99}}}
    report = {"benchmarks": [{"metrics": {
        "requests_per_second": stat(1.5, 1.4, 2.0), "output_tokens_per_second": stat(48.0, 40.0, 60.0),
        "time_to_first_token_ms": stat(2600.0, 2500.0, 2900.0),
        "inter_token_latency_ms": stat(90.0, 87.0, 160.0)}}]}
    assert guidellm_figures(report) == {
        "request_throughput": 1.5, "output_throughput": 48.0, "ttft_p50_ms": 2500.0,
        "ttft_p99_ms": 2900.0, "itl_p50_ms": 87.0, "itl_p99_ms": 160.0}


def test_ratios_are_gateway_over_direct_per_round():
    def run(d, g):
        return {"direct": {m: d for m in METRICS}, "gateway": {m: g for m in METRICS}}
    out = ratios([run(1.0, 1.1), run(2.0, 1.8), run(1.0, 1.0)])
    assert out["ttft_p50_ms"]["median"] == pytest.approx(1.0)
    assert out["request_throughput"]["min"] == pytest.approx(0.9)
    assert out["itl_p99_ms"]["max"] == pytest.approx(1.1)


def test_server_timing_is_read_back():
    assert gateway_seconds("gateway;dur=12.500") == pytest.approx(0.0125)
    assert gateway_seconds('db;dur=3, gateway;desc="x";dur=1.5') == pytest.approx(0.0015)
    assert gateway_seconds("") is None and gateway_seconds("gateway") is None
    assert gateway_seconds("gateway;dur=abc") is None
