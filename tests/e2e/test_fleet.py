"""A real two-node fleet: two vramgate processes on loopback standing in for two nodes, node A with
the embedded chat model only and node B with the embedded embedding model only, behind
vllm-router (the router ``loadtest/routers.py`` chose; pinned and installed by
``scripts/install-router.sh`` into ``~/.cache/vramgate/routers/vllm-router``), the official openai
client talking to the router only.

Each node's ``/metrics`` (``vramgate_requests_total``) proves which node served a request. Then node B
gets SIGTERM: chat keeps being served by A, embeddings fail at once with an error status (no hang),
and the router's worker list shows B unhealthy, so it sends nothing more there.

About a minute and a half on two cores, most of it the two vLLM engines starting side by side.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.models import embedded_models, is_prepared
from tests.gateway import ROOT, Gateway, embedded_data_dir, free_port, wait_for

pytestmark = pytest.mark.e2e
CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
ROUTERS_DIR = Path(os.environ.get("VRAMGATE_ROUTERS_DIR", Path.home() / ".cache" / "vramgate" / "routers"))
ROUTER = ROUTERS_DIR / "vllm-router" / "bin" / "vllm-router"
HELLO = [{"role": "user", "content": "Say hello"}]


def model_entry(data_dir: Path, name: str) -> dict:
    """The embedded model ``name`` as a config entry, exactly as ``vramgate serve`` serves it."""
    m = next(m for m in embedded_models(data_dir) if m.name == name)
    entry = {"name": m.name, "path": m.path, "aliases": list(m.aliases), "task": m.task,
             "preload": True, "engine_args": list(m.engine_args)}
    if m.chat_template:
        entry["chat_template"] = m.chat_template
    return entry


def served(node: Gateway) -> dict[tuple[str, str], float]:
    """``vramgate_requests_total`` of 2xx answers by (model, route), from the node's /metrics."""
    out = {}
    for line in node.client.get("/metrics").text.splitlines():
        m = re.match(r'vramgate_requests_total\{model="([^"]+)",route="([^"]+)",status_class="2xx"\} (\S+)', line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


class VllmRouter:
    """vllm-router in IGW mode (routing by the request's ``model``) on a free loopback port, one
    worker registered per node and model over its REST API; health checked every second."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "router.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(ROUTER), "--host", "127.0.0.1", "--port", str(self.port),
             "--prometheus-port", str(free_port()), "--enable-igw", "--log-level", "warning",
             "--health-check-interval-secs", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vllm-router exited: {self.log_path.read_text()[-3000:]}")
        try:
            return self.client.get("/workers").status_code == 200
        except httpx.HTTPError:
            return False

    def register(self, url: str, model: str) -> None:
        r = self.client.post("/workers", json={"url": url, "model_id": model})
        assert r.status_code == 200 and r.json()["success"], r.text

    def healthy(self) -> dict[str, bool]:
        return {w["url"]: w["is_healthy"] for w in self.client.get("/workers").json()["workers"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not ROUTER.exists():
        subprocess.run([str(ROOT / "scripts" / "install-router.sh")], check=True, timeout=600)
    data_dir = embedded_data_dir()
    if not all(is_prepared(data_dir / "models" / m) for m in (CHAT, EMBED)):
        subprocess.run([sys.executable, "-m", "server", "prepare", "--data-dir", str(data_dir)],
                       cwd=ROOT, check=True, timeout=600)
    tmp = tmp_path_factory.mktemp("fleet")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    nodes = {}
    router = None
    try:  # both nodes start at once: their engines load side by side
        nodes["a"] = Gateway(tmp / "a", {"models": [model_entry(data_dir, CHAT)]}, data_dir=data_dir)
        nodes["b"] = Gateway(tmp / "b", {"models": [model_entry(data_dir, EMBED)]}, data_dir=data_dir)
        router = VllmRouter(tmp)
        assert wait_for(router.up, 30), router.log_path.read_text()[-3000:]
        assert nodes["a"].wait_states(timeout=400) == {CHAT: "ready"}, nodes["a"].log_text()[-3000:]
        assert nodes["b"].wait_states(timeout=400) == {EMBED: "ready"}, nodes["b"].log_text()[-3000:]
        router.register(nodes["a"].url, CHAT)
        router.register(nodes["b"].url, EMBED)
        assert wait_for(lambda: router.healthy() == {nodes["a"].url: True, nodes["b"].url: True}, 30), \
            router.healthy()
        yield nodes["a"], nodes["b"], router
    finally:
        if router:
            router.stop()
        for node in nodes.values():
            node.stop()


@pytest.fixture(scope="module")
def client(fleet):
    _, _, router = fleet
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_each_model_is_served_by_its_own_node(fleet, client):
    a, b = fleet[0], fleet[1]
    before_a, before_b = served(a), served(b)
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8, temperature=0)
    assert r.model == CHAT and r.choices[0].message.content.strip()
    stream = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    e = client.embeddings.create(model=EMBED, input=["hello world", "goodbye"])
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 384
    assert delta(before_a, served(a)) == {(CHAT, "/v1/chat/completions"): 2}
    assert delta(before_b, served(b)) == {(EMBED, "/v1/embeddings"): 1}


def test_the_gateways_errors_come_through_unchanged(fleet, client):
    with pytest.raises(openai.BadRequestError) as info:  # answered by node B, not the router
        client.chat.completions.create(model=EMBED, messages=HELLO, max_tokens=8)
    assert info.value.code == "model_not_supported" and info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[])
    assert info.value.code == "empty_array" and info.value.param == "messages"


def test_a_stopped_node_gets_no_more_requests(fleet, client):
    a, b, router = fleet
    b.stop(signal.SIGTERM)
    assert b.proc.poll() is not None  # ended
    # The router's health check takes B out; from then on it sends B nothing.
    assert wait_for(lambda: router.healthy().get(b.url) is False, 30), router.healthy()
    assert router.healthy().get(a.url) is True
    before = served(a)
    for _ in range(3):  # embeddings fail cleanly and at once: an error status, no hang
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(model=EMBED, input=["hello"])
        assert time.monotonic() - t0 < 5
        assert info.value.status_code >= 500, info.value.response.text
    for _ in range(3):  # chat is still served, by A
        r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None
    assert delta(before, served(a)) == {(CHAT, "/v1/chat/completions"): 3}
