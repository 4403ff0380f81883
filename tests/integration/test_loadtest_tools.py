"""The benchmark tools work: the instant engine behind the real gateway and behind the floor proxy,
driven by the load generator (the benchmarks themselves run by hand: loadtest/README.md)."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from loadtest.loadgen import payload, run_level, summarize
from loadtest.procs import Proc, engine_url, free_port, instant_direct, start_gateway, wait_http


def drive(url: str, stream: bool, n: int = 20) -> dict:
    results, wall = asyncio.run(run_level(url + "/v1/chat/completions",
                                          lambda i: payload("instant", "chat", stream, 16, "hi", False),
                                          concurrency=4, requests=n))
    row = summarize(results, wall)
    assert row["errors"] == 0, [r.error for r in results if r.error][:1]
    return row


def test_gateway_floor_proxy_and_load_generator_on_the_instant_engine(tmp_path):
    model = {"name": "instant", "path": "instant", "preload": True}
    direct = instant_direct(model)  # a loopback port beside the Unix socket the gateway uses
    gw, url = start_gateway({"engine_module": "loadtest.instant_engine", "models": [model]},
                            tmp_path / "gw", ready_timeout=60)
    floor = None
    try:
        for stream in (False, True):
            row = drive(url, stream)
            assert row["output_tok_per_s"] > 0 and row["ttft_p50_s"] > 0
            if stream:
                assert row["itl_p50_s"] is not None  # 16 chunks a stream: 15 gaps each
        with pytest.raises(RuntimeError, match="engine_transport: tcp"):
            engine_url(url, "instant")  # it listens on a socket: no direct URL from the admin API
        port = free_port()
        floor = Proc([sys.executable, "-m", "loadtest.floor_proxy", "--upstream", direct,
                      "--port", str(port)], tmp_path / "floor.log")
        wait_http(f"http://127.0.0.1:{port}/v1/models", floor, 30)
        assert drive(f"http://127.0.0.1:{port}", True)["requests"] == 20
        metrics = httpx.get(url + "/metrics").text
        assert 'vramgate_tokens_total{kind="completion",model="instant"} 640.0' in metrics  # 40 × 16
    finally:
        if floor is not None:
            floor.stop()
        gw.stop()
    assert gw.proc.returncode is not None


def test_the_floor_reaches_its_engine_over_a_unix_socket_like_the_gateway(tmp_path):
    """``sidebyside --baseline floor-uds``: the floor on the gateway's own transport."""
    from loadtest.ceiling import start_floor
    procs: list[Proc] = []
    try:
        floor, direct, url = start_floor(tmp_path, procs, uds=True)
        assert drive(url, True)["requests"] == 20 and drive(url, False)["requests"] == 20
        assert httpx.get(direct + "/health").status_code == 200  # the direct path: a side port
        assert "--upstream-uds" in floor.proc.args and (tmp_path / "floor-engine.sock").exists()
    finally:
        for p in reversed(procs):
            p.stop()


def test_the_streams_benchmark_holds_n_streams_open_and_checks_every_byte(tmp_path):
    import json
    import subprocess

    out = tmp_path / "streams"
    subprocess.run([sys.executable, "-m", "loadtest.streams", "--levels", "40", "--chunks", "8",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    row = json.loads(out.with_suffix(".json").read_text())["levels"][0]
    assert row["all_open"] and row["held_at_peak"] == 40 and row["gateway_in_flight_open"] == 40
    assert row["errors"] == 0 and row["byte_exact"] == 40 and row["gateway_in_flight_after"] == 0
    assert row["gateway_fds_open"] >= 80  # two sockets a stream: client and engine
