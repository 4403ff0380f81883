"""The stand-in engine's sleep mode (``tests/standin_sleep.py``) against vLLM 0.32's semantics:
requests that arrive while asleep wait for the wake, ``mode=abort`` ends running streams the way
vLLM ends them, ``mode=wait`` lets them finish, the dev routes exist only in dev mode with
``--enable-sleep-mode``, and the failure modes. The stand-in runs on its own, without a gateway;
nothing here waits a fixed time: each step waits on a condition (stats file, a future) with a
deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.gateway import ROOT, free_port, wait_for


class Engine:
    def __init__(self, tmp: Path, modes: str = "ok", *, sleep_flag: bool = True,
                 dev: str | None = "1") -> None:
        self.port, self.dir = free_port(), tmp
        env = dict(os.environ, STANDIN_DIR=str(tmp))
        env.pop("VLLM_SERVER_DEV_MODE", None)
        if dev is not None:
            env["VLLM_SERVER_DEV_MODE"] = dev
        argv = [sys.executable, "-m", "tests.standin_engine", "--model", f"standin:{modes}",
                "--served-model-name", "m", "--port", str(self.port)]
        self.proc = subprocess.Popen(argv + (["--enable-sleep-mode"] if sleep_flag else []),
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.pool = ThreadPoolExecutor(4)

    def wait_up(self) -> Engine:
        def up() -> bool:
            try:
                return self.client.get("/health").status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_for(up, 15), self.proc.poll()
        return self

    def stats(self) -> dict:
        return json.loads((self.dir / "m.json").read_text())

    def until(self, cond, what: str, timeout: float = 10) -> None:
        assert wait_for(lambda: cond(self.stats()), timeout), f"{what}: {self.stats()}"

    def later(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def chat(self, max_tokens: int = 4) -> httpx.Response:
        return self.client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})

    def stream(self, max_tokens: int, include_usage: bool = False) -> list[dict | str]:
        """A streamed chat completion: its events, ``"[DONE]"`` last when the stream ended so."""
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": max_tokens}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        events: list[dict | str] = []
        with httpx.Client(base_url=self.url, timeout=60) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def sleep(self, level: int = 1, mode: str | None = None) -> httpx.Response:
        params = {"level": level} | ({"mode": mode} if mode else {})
        with httpx.Client(base_url=self.url, timeout=60) as c:
            return c.post("/sleep", params=params)

    def close(self) -> None:
        self.client.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def start(tmp_path):
    engines: list[Engine] = []

    def start(*args, up: bool = True, **kw) -> Engine:
        e = Engine(tmp_path, *args, **kw)
        engines.append(e)
        return e.wait_up() if up else e
    yield start
    for e in engines:
        e.close()


def finish_reasons(events: list) -> list:
    return [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"]]


def test_sleep_wake_and_is_sleeping(start):
    e = start()
    assert e.client.get("/is_sleeping").json() == {"is_sleeping": False}
    s = e.stats()
    assert (s["sleeps"], s["wakes"], s["sleeping"], s["last_sleep_level"]) == (0, 0, False, None)
    r = e.sleep()  # level 1, mode abort: vLLM's defaults
    assert (r.status_code, r.json()) == (200, {"status": "sleeping", "level": 1})
    assert e.client.get("/is_sleeping").json() == {"is_sleeping": True}
    s = e.stats()
    assert (s["sleeps"], s["sleeping"], s["last_sleep_level"], s["last_sleep_mode"]) == \
        (1, True, 1, "abort")
    assert e.client.get("/health").status_code == 200  # health does not tell sleep (as vLLM)
    r = e.client.post("/wake_up")
    assert (r.status_code, r.json()) == (200, {"status": "awake", "tags": None})
    assert e.client.get("/is_sleeping").json() == {"is_sleeping": False}
    assert (e.stats()["wakes"], e.stats()["sleeping"]) == (1, False)
    assert e.chat().json()["choices"][0]["finish_reason"] == "length"
    # A wake while awake is harmless: 200 awake, and no wake counted.
    assert e.client.post("/wake_up").json()["status"] == "awake" and e.stats()["wakes"] == 1


def test_a_request_arriving_while_asleep_waits_for_the_wake(start):
    e = start()
    assert e.sleep(level=1, mode="wait").status_code == 200
    answer = e.later(e.chat)
    streamed = e.later(e.stream, 3)
    e.until(lambda s: s["waiting"] == 2, "both requests held by the sleep")
    assert not answer.done() and not streamed.done()
    assert e.stats()["started"] == 0 and e.stats()["running"] == 0
    assert e.client.post("/wake_up").json()["status"] == "awake"
    r = answer.result(timeout=15)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == " w0 w1 w2 w3"
    events = streamed.result(timeout=15)
    assert events[-1] == "[DONE]" and finish_reasons(events)[-1] == "length"
    assert e.stats()["waiting"] == 0 and e.stats()["completed"] == 2


def test_abort_ends_a_running_stream_as_vllm_does(start):
    e = start("ok,delay=0.05")
    streamed = e.later(e.stream, 400, True)  # 20 s if nothing cut it short
    answer = e.later(e.chat, 400)
    e.until(lambda s: s["running"] == 2, "both requests running")
    r = e.sleep(mode="abort")
    assert r.status_code == 200
    s = e.stats()
    assert (s["running"], s["sleep_aborted"], s["completed"]) == (0, 2, 0), s
    events = streamed.result(timeout=15)
    # The last choice chunk: empty delta, finish_reason "abort"; then usage, then [DONE].
    assert events[-1] == "[DONE]"
    chunks = [ev for ev in events if isinstance(ev, dict)]
    assert chunks[-2]["choices"] == [{"index": 0, "finish_reason": "abort", "stop_reason": None,
                                      "delta": {}}]
    words = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert 0 < words < 400 and chunks[-1]["usage"]["completion_tokens"] == words
    assert finish_reasons(events).count("length") == 0
    body = answer.result(timeout=15).json()  # not streamed: a 200 with the partial text
    assert body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["completion_tokens"] < 400


def test_wait_lets_running_requests_finish_and_holds_new_ones(start):
    e = start("ok,delay=0.05")
    streamed = e.later(e.stream, 20)
    e.until(lambda s: s["running"] == 1, "the stream running")
    sleeping = e.later(e.sleep, 1, "wait")
    assert wait_for(lambda: e.client.get("/is_sleeping").json()["is_sleeping"])  # paused at once
    late = e.later(e.chat)  # arrives during the drain: queued, as vLLM's PAUSED_NEW
    e.until(lambda s: s["waiting"] == 1, "the late request held")
    events = streamed.result(timeout=15)
    assert events[-1] == "[DONE]" and finish_reasons(events) == [None] * 19 + ["length"]
    r = sleeping.result(timeout=15)
    assert r.json() == {"status": "sleeping", "level": 1}
    s = e.stats()
    assert (s["completed"], s["sleep_aborted"], s["sleeps"], s["last_sleep_mode"]) == \
        (1, 0, 1, "wait")
    assert not late.done()
    e.client.post("/wake_up")
    assert late.result(timeout=15).json()["choices"][0]["finish_reason"] == "length"
    assert e.stats()["wake_during_drain"] == 0


def test_keep_freezes_a_stream_until_the_wake(start):
    e = start("ok,delay=0.05")
    streamed = e.later(e.stream, 10)
    e.until(lambda s: s["running"] == 1, "the stream running")
    assert e.sleep(mode="keep").status_code == 200
    assert e.stats()["running"] == 1 and not streamed.done()
    e.client.post("/wake_up")
    events = streamed.result(timeout=15)
    assert finish_reasons(events) == [None] * 9 + ["length"] and events[-1] == "[DONE]"


def test_level_2_needs_the_weights_reloaded(start):
    e = start()
    assert e.sleep(level=2).json() == {"status": "sleeping", "level": 2}
    assert e.stats()["last_sleep_level"] == 2
    # vLLM's own order (snapshot/server.py): weights, reload_weights, then the KV cache.
    r = e.client.post("/wake_up", params={"tags": "weights"})
    assert r.json() == {"status": "sleeping", "tags": ["weights"]}
    assert e.client.get("/is_sleeping").json() == {"is_sleeping": True}
    r = e.client.post("/collective_rpc", json={"method": "reload_weights"})
    assert (r.status_code, r.json()) == (200, {"results": [None]})
    r = e.client.post("/wake_up", params={"tags": "kv_cache"})
    assert r.json() == {"status": "awake", "tags": ["kv_cache"]}
    assert e.chat().json()["choices"][0]["message"]["content"] == " w0 w1 w2 w3"
    assert (e.stats()["reloads"], e.stats()["wakes"]) == (1, 1)
    # Woken without the reload, the weights are garbage (as a real engine's would be).
    e.sleep(level=2)
    e.client.post("/wake_up")
    assert e.chat().json()["choices"][0]["message"]["content"] == " garbage" * 4
    assert e.client.post("/collective_rpc", json={}).status_code == 400


def test_bad_level_or_mode_is_a_400(start):
    e = start()
    for params in ({"level": 3}, {"level": "x"}, {"mode": "nap"}):
        r = e.client.post("/sleep", params=params)
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, params
    assert e.stats()["sleeps"] == 0 and not e.client.get("/is_sleeping").json()["is_sleeping"]


@pytest.mark.parametrize("kw", [{"dev": None}, {"dev": "0"}, {"sleep_flag": False}])
def test_no_routes_without_dev_mode_and_the_flag(start, kw):
    e = start(**kw)
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                         ("POST", "/collective_rpc")):
        assert e.client.request(method, path).status_code == 404, (kw, path)
    assert "sleeps" not in e.stats()
    assert e.chat().status_code == 200


def test_fail_wake_answers_500_and_exits_3(start):
    e = start("fail-wake")
    e.sleep()
    r = e.client.post("/wake_up")
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert e.proc.wait(timeout=10) == 3
    assert e.stats()["wake_failed"] is True


def test_slow_wake_takes_its_time(start):
    e = start("slow-wake=1")
    e.sleep()
    t = time.monotonic()
    waking = e.later(e.client.post, "/wake_up")
    # While it wakes, the engine still says it sleeps.
    assert e.client.get("/is_sleeping").json()["is_sleeping"] is True
    assert waking.result(timeout=15).json()["status"] == "awake"
    assert time.monotonic() - t >= 1


def test_sleep_unsupported_exits_1_at_start(start):
    e = start("sleep-unsupported", up=False)
    assert e.proc.wait(timeout=15) == 1
    assert "Sleep mode is not supported on current platform." in e.proc.stderr.read()
    # Without the flag the same path starts as usual.
    assert start("sleep-unsupported", sleep_flag=False).chat().status_code == 200


def test_the_gpu_sleep_check_runs_against_the_stand_in(tmp_path):
    """tests/gpu/sleep_check.py (GPU only) imports without a GPU and its steps pass against the
    stand-in, so a GPU run is not spent on the script's own bugs."""
    script = ROOT / "tests" / "gpu" / "sleep_check.py"
    assert "--no-nvml" in subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                                          capture_output=True, text=True, timeout=60).stdout
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(script), "standin:ok", "--engine-module",
                        "tests.standin_engine", "--no-nvml", "--out", str(out), "--log",
                        str(tmp_path / "engine.log")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, STANDIN_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed"] == [] and len(result["checks"]) >= 15
    assert {"cold_start_s", "level1_wake_to_answer_s", "level2_collective_rpc_s"} <= set(
        result["figures"])
