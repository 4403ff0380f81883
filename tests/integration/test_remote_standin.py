"""Engines on other hosts (config ``upstreams``): the gateway as a real process in front of
stand-in servers it did not start, standing in for vLLM servers elsewhere (``tests/standin_engine``,
started here by the test, on loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway import ROOT, free_port, standin_gateway, wait_for


class Upstream:
    """One stand-in server on a free port: ``python -m tests.standin_engine``."""

    def __init__(self, tmp: Path, served: str, mode: str = "ok", port: int | None = None) -> None:
        self.tmp, self.served, self.port = tmp, served, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (tmp / "standin").mkdir(exist_ok=True)
        self.log = open(tmp / f"upstream-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.standin_engine", "--model", f"standin:{mode}",
             "--served-model-name", served, "--port", str(self.port)], cwd=ROOT, stdout=self.log,
            stderr=subprocess.STDOUT, env={**os.environ, "STANDIN_DIR": str(tmp / "standin")})
        assert wait_for(self.healthy, 30), (tmp / f"upstream-{self.port}.log").read_text()

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self) -> dict:
        path = self.tmp / "standin" / f"{self.served}@{self.port}.json"
        return json.loads(path.read_text()) if path.exists() else {"completed": 0}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


@pytest.fixture
def upstreams(tmp_path):
    made: list[Upstream] = []

    def make(served: str, mode: str = "ok", port: int | None = None) -> Upstream:
        made.append(Upstream(tmp_path, served, mode, port))
        return made[-1]
    yield make
    for up in made:
        up.close()


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)


def ask(gw, model: str = "far", prompt: str = "hi", **kw):
    return client(gw).chat.completions.create(model=model, max_tokens=3,
                                              messages=[{"role": "user", "content": prompt}], **kw)


def test_upstreams_serve_under_their_own_name_and_share_the_load(tmp_path, upstreams):
    a, b = upstreams("their-name"), upstreams("their-name")
    config = {"models": [{"name": "far", "aliases": ["f"], "preload": True,
                          "upstreams": [{"url": a.url + "/v1", "model": "their-name"},
                                        {"url": b.url, "model": "their-name"}]}]}
    with standin_gateway(tmp_path, config) as gw:
        assert gw.wait_states(30) == {"far": "ready"}
        for i in range(20):  # distinct prompts: prefix affinity sends each to its hashed home
            out = ask(gw, "f", prompt=f"question {i}")
            assert out.choices[0].message.content == " w0 w1 w2"
            assert out.model == "far"  # answers carry our name, not the upstream's
        assert a.stats()["last"]["model"] == "their-name"  # the upstream's name, not the alias
        assert a.stats()["completed"] >= 1 and b.stats()["completed"] >= 1
        assert a.stats()["completed"] + b.stats()["completed"] == 20
        with client(gw).chat.completions.create(
                model="far", max_tokens=4, stream=True,
                messages=[{"role": "user", "content": "hi"}]) as stream:
            chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == " w0 w1 w2 w3" and {c.model for c in chunks} == {"far"}
        r = gw.client.post("/v1/messages", json={"model": "far", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "far", r.text
        with gw.client.stream("POST", "/v1/messages", json={
                "model": "far", "max_tokens": 2, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            body = r.read().decode()
        assert '"model": "far"' in body or '"model":"far"' in body
        assert "their-name" not in body
        replicas = gw.client.get("/admin/models").json()["data"][0]["replicas"]
        assert sorted(r["url"] for r in replicas) == sorted([a.url, b.url])
        assert all(r["device"] == "remote" and r["pid"] is None for r in replicas)
        metrics = gw.client.get("/metrics").text  # the upstreams' own vllm:* samples, relabelled
        assert 'model="far",replica="0"' in metrics and 'model="far",replica="1"' in metrics


def test_a_dead_upstream_stops_getting_requests_at_its_first_refused_connection(tmp_path, upstreams):
    a, b = upstreams("far"), upstreams("far")
    config = {"models": [{"name": "far", "preload": True, "upstreams": [a.url, b.url]}]}
    with standin_gateway(tmp_path, config) as gw:
        gw.wait_states(30)
        a.kill()
        before = b.stats()["completed"]
        for i in range(10):  # none fails: one that meets the refused connection goes to b
            assert ask(gw, prompt=f"question {i}").choices[0].message.content == " w0 w1 w2"
        assert b.stats()["completed"] == before + 10
        assert "could not be reached" in gw.log_text()
        first, second = gw.client.get("/admin/models").json()["data"][0]["replicas"]
        assert first["state"] != "ready" and (second["state"], second["url"]) == ("ready", b.url)
        b.kill()
        with pytest.raises(openai.APIStatusError) as err:  # none left: 503, with Retry-After
            ask(gw)
        assert err.value.status_code == 503
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.response.json()["error"]["type"] == "server_error"


def test_an_upstream_that_fails_its_health_checks_is_a_failed_replica(tmp_path, upstreams):
    a = upstreams("far")
    config = {"models": [{"name": "far", "preload": True, "upstreams": [a.url]}]}
    with standin_gateway(tmp_path, config) as gw:
        gw.wait_states(30)
        a.kill()  # nobody sends it a request: only the health checks can notice
        assert wait_for(lambda: gw.states()["far"] == "failed", 30), gw.states()
        assert "failed 3 health checks" in gw.log_text()
        r = gw.client.post("/v1/chat/completions", json={
            "model": "far", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["message"]
        again = upstreams("far", port=a.port)  # back: the next load reaches it
        assert gw.client.post("/admin/models/far/load").status_code == 200
        assert wait_for(lambda: gw.states()["far"] == "ready", 30), gw.log_text()[-2000:]
        assert ask(gw).choices[0].message.content == " w0 w1 w2"
        assert again.stats()["completed"] == 1


def test_an_unreachable_upstream_fails_the_load_quickly_with_503(tmp_path):
    port = free_port()  # nothing listens there
    config = {"models": [{"name": "far", "upstreams": [f"http://127.0.0.1:{port}"]}]}
    with standin_gateway(tmp_path, config) as gw:
        gw.wait_up()
        r = gw.client.post("/v1/chat/completions", json={
            "model": "far", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert "not healthy after 10 s" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1


def test_local_and_remote_replicas_serve_one_model(tmp_path, upstreams):
    remote = upstreams("mixed")
    config = {"models": [{"name": "mixed", "path": "standin:delay=0.05", "preload": True,
                          "upstreams": [remote.url]}]}
    with standin_gateway(tmp_path, config) as gw:
        assert gw.wait_states(60) == {"mixed": "ready"}

        def replicas() -> list[dict]:
            return gw.client.get("/admin/models").json()["data"][0]["replicas"]
        # the model is ready once one replica is; wait for both, or the remote one takes all 16
        assert wait_for(lambda: [r["state"] for r in replicas()] == ["ready", "ready"], 60), replicas()
        replicas = replicas()
        assert sorted(r["device"] for r in replicas) == ["cpu", "remote"]
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(8) as pool:  # concurrent: the fewest in flight spreads them
            outs = list(pool.map(lambda i: ask(gw, "mixed", f"q{i}"), range(16)))
        assert all(o.choices[0].message.content == " w0 w1 w2" for o in outs)
        local = [json.loads(p.read_text()) for p in (tmp_path / "standin").glob("mixed@*.json")
                 if p.name != f"mixed@{remote.port}.json"]
        assert len(local) == 1
        assert local[0]["completed"] >= 1 and remote.stats()["completed"] >= 1  # both served
        assert local[0]["completed"] + remote.stats()["completed"] == 16
