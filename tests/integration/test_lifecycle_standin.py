"""Lifecycle through the real gateway process and stand-in engines: on-demand loads (single
flight), idle unload, crash restart with back-off, admin API, eviction without cutting streams,
configuration reload."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import yaml

from tests.gateway import Gateway, alive, standin_gateway, wait_for



def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def starts(gw: Gateway, name: str) -> int:
    """Engine starts of ``name``, counted in its log files (one per gateway instance)."""
    return sum(p.read_text().count("=== vramgate: starting")
               for p in (gw.tmp / "data" / "logs").glob(f"{name}.*.log"))


def stats(gw: Gateway, name: str) -> dict:
    return json.loads((gw.tmp / "standin" / f"{name}.json").read_text())


def gateway(tmp_path, models, **top) -> Gateway:
    gw = standin_gateway(tmp_path, {"models": models, **top})
    gw.wait_up()
    return gw


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    models = [{"name": "slow", "path": "standin:slow-start=3"},
              {"name": "cold", "path": "standin:slow-start=2"},
              {"name": "brief", "path": "standin:ok", "ttl": 1},
              {"name": "crashy", "path": "standin:crash-mid-stream"},
              {"name": "broken", "path": "standin:fail-start"}]
    with gateway(tmp_path_factory.mktemp("life"), models) as g:
        yield g


def test_nothing_starts_before_the_first_request(gw):
    assert set(gw.states().values()) == {"unloaded"}
    assert gw.descendants() == []
    listed = gw.client.get("/v1/models").json()["data"]
    assert {m["state"] for m in listed} == {"unloaded"} and gw.descendants() == []
    # C10: a bad request for a model that is not loaded is a 400 and starts nothing.
    for messages in ([], None, [{"role": "user"}]):
        for stream in (False, True):
            r = gw.client.post("/v1/chat/completions",
                               json={"model": "slow", "messages": messages, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    assert gw.descendants() == [] and starts(gw, "slow") == 0


def test_concurrent_first_requests_share_one_cold_start(gw):
    results: list[int] = []

    def one() -> None:
        results.append(httpx.post(gw.url + "/v1/chat/completions", json=chat("slow", max_tokens=3),
                                  timeout=30).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    # /v1/models and /health answer during the load
    assert wait_for(lambda: gw.states()["slow"] == "loading", 5)
    assert gw.client.get("/v1/models/slow").json()["state"] == "loading"
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert starts(gw, "slow") == 1


def test_a_caller_gone_during_the_cold_start_never_reaches_the_engine(gw):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", json=chat("cold", max_tokens=2),
                   timeout=httpx.Timeout(10, read=0.5))
    assert wait_for(lambda: gw.states()["cold"] == "ready", 10)  # the load itself goes on
    # The gateway has finished with the request (its access-log line says the caller was gone) ...
    assert wait_for(lambda: "route=/v1/chat/completions model=cold status=499" in gw.log_text(), 10)
    assert stats(gw, "cold")["started"] == 0  # ... but the request never reached the engine
    assert 'vramgate_requests_in_flight{model="cold"} 0.0' in gw.client.get("/metrics").text


def test_idle_model_unloads_after_its_ttl_and_reloads_on_the_next_request(gw):
    r = gw.client.post("/v1/completions", json={"model": "brief", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    pid = stats(gw, "brief")["pid"]
    assert wait_for(lambda: gw.states()["brief"] == "unloaded", 10)
    assert wait_for(lambda: not alive(pid), 5)
    cpu = next(d for d in gw.client.get("/admin/gpus").json()["devices"] if d["id"] == "cpu")
    assert "brief" not in " ".join(cpu["models"])
    r = gw.client.post("/v1/completions", json={"model": "brief", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and starts(gw, "brief") == 2
    assert 'vramgate_engine_stops_total{model="brief",reason="idle"} 1.0' in gw.client.get(
        "/metrics").text


def test_crashed_engine_fails_its_stream_and_restarts_on_a_later_request(gw):
    with gw.client.stream("POST", "/v1/chat/completions", json=chat("crashy", stream=True)) as r:
        raw = b"".join(r.iter_raw())
    assert raw.count(b'"error"') == 1 and b"[DONE]" not in raw
    assert wait_for(lambda: gw.states()["crashy"] == "failed", 5)
    r = gw.client.post("/v1/chat/completions", json=chat("crashy", max_tokens=2))
    if r.status_code == 503:  # inside the 2 s back-off: told when to come back
        assert float(r.headers["retry-after"]) >= 1
        assert wait_for(lambda: gw.client.post("/v1/chat/completions", json=chat(
            "crashy", max_tokens=2)).status_code == 200, 10)
    else:
        assert r.status_code == 200, r.text
    assert starts(gw, "crashy") == 2
    text = gw.client.get("/metrics").text
    assert 'vramgate_engine_failures_total{model="crashy"} 1.0' in text
    assert 'vramgate_engine_starts_total{model="crashy"} 2.0' in text
    assert 'vramgate_engine_load_seconds_count{model="crashy"} 2.0' in text


def test_failed_start_backs_off_instead_of_looping(gw):
    r = gw.client.post("/v1/chat/completions", json=chat("broken"))
    assert r.status_code == 503 and "simulated" in r.json()["error"]["message"]
    for _ in range(5):
        r = gw.client.post("/v1/chat/completions", json=chat("broken"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_start_failed"
        assert "restarts in" in r.json()["error"]["message"]
    assert starts(gw, "broken") == 1
    assert gw.client.get("/v1/models/broken").json()["state"] == "failed"


def test_admin_models_load_and_unload(gw):
    r = gw.client.post("/admin/models/slow/load")
    assert r.status_code == 200 and r.json()["state"] == "ready"
    listed = {m["id"]: m for m in gw.client.get("/admin/models").json()["data"]}
    rep = listed["slow"]["replicas"][0]
    assert rep["state"] == "ready" and rep["pid"] and rep["placement"]["devices"] == ["cpu"]
    assert rep["in_flight"] == 0 and rep["uptime_s"] >= 0
    pid = stats(gw, "slow")["pid"]
    r = gw.client.post("/admin/models/slow/unload")
    assert r.status_code == 200 and r.json()["state"] == "unloaded"
    assert wait_for(lambda: not alive(pid), 5)
    assert gw.client.post("/admin/models/nope/load").status_code == 404


def test_cli_ps_load_unload(gw):
    from click.testing import CliRunner

    from server.cli import main
    runner = CliRunner()
    res = runner.invoke(main, ["load", "brief", "--url", gw.url])
    assert res.exit_code == 0 and "brief: ready" in res.output
    res = runner.invoke(main, ["ps", "--url", gw.url])
    assert res.exit_code == 0 and "brief" in res.output and "ready" in res.output
    res = runner.invoke(main, ["unload", "brief", "--url", gw.url, "--force"])
    assert res.exit_code == 0 and "brief: unloaded" in res.output
    res = runner.invoke(main, ["load", "nope", "--url", gw.url])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_a_second_model_waits_for_the_first_ones_stream_instead_of_cutting_it(tmp_path):
    models = [{"name": "x", "path": "standin:delay=0.1"}, {"name": "y", "path": "standin:ok"}]
    with gateway(tmp_path, models, max_loaded_models=1, place_wait_timeout=20) as g:
        assert g.client.post("/v1/completions", json={"model": "x", "prompt": "a",
                                                       "max_tokens": 1}).status_code == 200
        out: dict = {}

        def stream_x() -> None:
            with httpx.stream("POST", g.url + "/v1/chat/completions", timeout=30,
                              json=chat("x", stream=True, max_tokens=20)) as r:
                out["x"] = b"".join(r.iter_raw())

        t = threading.Thread(target=stream_x)
        t.start()
        assert wait_for(lambda: stats(g, "x")["running"] == 1, 10)  # the stream is at the engine
        r = g.client.post("/v1/completions", json={"model": "y", "prompt": "b", "max_tokens": 2})
        t.join()
        assert out["x"].endswith(b"data: [DONE]\n\n") and b'"error"' not in out["x"]
        assert r.status_code == 200, r.text
        assert g.states() == {"x": "unloaded", "y": "ready"}
        assert "evicting x" in g.log_text()
        text = g.client.get("/metrics").text
        assert 'vramgate_engine_stops_total{model="x",reason="evicted"} 1.0' in text
        assert "vramgate_engines_loaded 1.0" in text


def test_reload_on_sighup_and_admin_reload(tmp_path):
    models = [{"name": "keep", "path": "standin:ok"}, {"name": "drop", "path": "standin:ok"}]
    with gateway(tmp_path, models) as g:
        assert g.client.post("/v1/completions", json={"model": "drop", "prompt": "x",
                                                       "max_tokens": 1}).status_code == 200
        pid = stats(g, "drop")["pid"]
        cfg = tmp_path / "config.yaml"
        doc = yaml.safe_load(cfg.read_text())
        doc["models"] = [models[0], {"name": "late", "path": "standin:ok", "aliases": ["newbie"]}]
        cfg.write_text(yaml.safe_dump(doc))
        g.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: {m["id"] for m in g.client.get("/v1/models").json()["data"]}
                        == {"keep", "late"}, 10)
        assert wait_for(lambda: not alive(pid), 5)
        r = g.client.post("/v1/completions", json={"model": "newbie", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "late"
        assert g.client.post("/v1/completions", json={"model": "drop", "prompt": "x"}).status_code == 404
        doc["models"][0] = {**models[0], "ttl": 5}
        cfg.write_text(yaml.safe_dump(doc))
        assert g.client.post("/admin/reload").json() == {"added": [], "removed": [], "changed": ["keep"]}
        cfg.write_text("models: [unclosed")
        r = g.client.post("/admin/reload")
        assert r.status_code == 400 and "not valid YAML" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "invalid_config"
        assert g.proc.poll() is None  # a bad reload changes nothing and stops nothing


def test_what_still_runs_at_the_shutdown_timeout_ends_in_its_routes_shape(tmp_path):
    """uvicorn cancels what still runs once ``shutdown_timeout`` is up: a whole answer the engine
    has not sent gets a JSON 503 ``server_shutting_down``, and a stream to a client that reads
    nothing ends quietly; no plain-text 500 and no traceback (a break-it pass saw both)."""
    import socket

    models = [{"name": "slow", "path": "standin:delay=0.2", "preload": True},
              {"name": "fast", "path": "standin:delay=0,word=20000", "preload": True}]
    g = gateway(tmp_path, models, shutdown_timeout=3)
    deaf = None
    try:
        g.wait_states(30)
        out: dict = {}

        def whole() -> None:  # 100 tokens at 0.2 s: the answer would take 20 s
            out["whole"] = httpx.post(g.url + "/v1/chat/completions", timeout=30,
                                      json=chat("slow", max_tokens=100))

        body = json.dumps(chat("fast", stream=True, max_tokens=1000)).encode()  # 20 MB
        deaf = socket.create_connection(("127.0.0.1", g.port))  # sends, never reads
        deaf.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        thread = threading.Thread(target=whole)
        thread.start()
        assert wait_for(lambda: stats(g, "slow")["running"] == 1 and stats(g, "fast")["running"] == 1, 10)
        g.proc.send_signal(signal.SIGTERM)
        thread.join()
        r = out["whole"]
        assert r.status_code == 503 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "server_shutting_down" and r.headers["retry-after"]
        g.proc.wait(30)
        log = g.log_text()
        assert "Exception in ASGI application" not in log and "Traceback" not in log, log[-3000:]
        assert "status=503" in log  # its access-log line
    finally:
        if deaf is not None:
            deaf.close()
        g.stop()


def test_sigterm_answers_waiters_at_once_and_ends_long_streams_with_an_error_event(tmp_path):
    models = [{"name": "slow", "path": "standin:delay=0.2", "preload": True},
              {"name": "stuck", "path": "standin:hang-start", "startup_timeout": 60}]
    g = gateway(tmp_path, models, shutdown_timeout=3)
    try:
        g.wait_states(30, done=("ready", "unloaded", "failed"))
        out: dict = {}

        def stream() -> None:
            with httpx.stream("POST", g.url + "/v1/chat/completions", timeout=30,
                              json=chat("slow", stream=True, max_tokens=100)) as r:
                out["stream"] = b"".join(r.iter_raw())

        def wait_cold() -> None:
            out["cold"] = httpx.post(g.url + "/v1/completions", timeout=30,
                                     json={"model": "stuck", "prompt": "x"})
            out["cold_at"] = time.monotonic()

        threads = [threading.Thread(target=stream), threading.Thread(target=wait_cold)]
        for t in threads:
            t.start()
        assert wait_for(lambda: 'vramgate_requests_queued{model="stuck"} 1.0' in g.client.get(
            "/metrics").text and stats(g, "slow")["running"] == 1, 10)  # both are waiting
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        cold = out["cold"]
        assert cold.status_code == 503 and "shutting down" in cold.json()["error"]["message"]
        assert out["cold_at"] - t0 < 1.5
        events = out["stream"].rstrip(b"\n").split(b"\n\n")
        assert b"[DONE]" not in out["stream"]
        assert json.loads(events[-1][6:])["error"]["code"] == "server_shutting_down"
        assert sum(b'"error"' in e for e in events) == 1
    finally:
        g.stop()


def test_a_busy_port_exits_without_claiming_to_serve_and_leaves_no_engine(tmp_path):
    """The "serving … on :PORT" line comes once the port is bound: on a busy port the gateway
    exits with uvicorn's startup failure (3), says the address is in use, and never printed that
    line (a new user read it as success). A preloaded engine it started is stopped."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    gw = standin_gateway(tmp_path, {"models": [{"name": "pre", "path": "standin:ok", "preload": True}]},
                         port=busy.getsockname()[1])
    try:
        assert gw.proc.wait(60) == 3
        log = gw.log_text()
        assert "address already in use" in log.lower() and "vramgate: serving" not in log, log[-3000:]
        record = tmp_path / "standin" / "pre.json"
        if record.exists():
            assert wait_for(lambda: not alive(json.loads(record.read_text())["pid"]), 10)
    finally:
        gw.stop()
        busy.close()
    (tmp_path / "free").mkdir()
    with gateway(tmp_path / "free", [{"name": "pre", "path": "standin:ok"}]) as up:
        assert wait_for(lambda: f"vramgate: serving pre on {up.url}/v1" in up.log_text(), 10), \
            up.log_text()[-3000:]
