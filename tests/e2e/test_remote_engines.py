"""An engine on another host, for real: a vLLM server the gateway did not start (here on loopback,
behind vLLM's own ``--api-key``), served through the gateway's ``upstreams`` with the key read
from the environment, driven by the official ``openai`` client."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from server.config import DEFAULT_ENGINE_MODULE
from server.models import EMBED_MODEL, ensure_prepared
from tests.gateway import Gateway, embedded_data_dir, free_port, wait_for

pytestmark = pytest.mark.e2e
KEY = "upstream-secret"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on the embedded embedding model."""
    data_dir = embedded_data_dir()
    ensure_prepared(data_dir)
    port, log_path = free_port(), tmp_path_factory.mktemp("upstream") / "vllm.log"
    argv = [sys.executable, "-m", DEFAULT_ENGINE_MODULE, "--model", str(data_dir / "models" / EMBED_MODEL),
            "--served-model-name", EMBED_MODEL, "--runner", "pooling", "--enforce-eager",
            "--kv-cache-memory-bytes", str(256 << 20), "--host", "127.0.0.1", "--port", str(port),
            "--api-key", KEY, "--disable-uvicorn-access-log"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # exited: stop waiting, the assert says why
    try:
        assert wait_for(healthy, 300) and proc.poll() is None, log_path.read_text()[-3000:]
        yield url
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_a_vllm_server_elsewhere_is_served_with_its_key_and_its_metrics(tmp_path, vllm_server):
    assert httpx.post(vllm_server + "/v1/embeddings", json={
        "model": EMBED_MODEL, "input": "x"}).status_code == 401  # it wants its key
    config = {"models": [{"name": "far-embed", "task": "embed", "preload": True, "upstreams": [
        {"url": vllm_server + "/v1", "api_key_env": "VG_UPSTREAM_KEY", "model": EMBED_MODEL}]}]}
    with Gateway(tmp_path, config, env={"VG_UPSTREAM_KEY": KEY}) as gw:
        assert gw.wait_states(60) == {"far-embed": "ready"}
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        out = client.embeddings.create(model="far-embed", input=["hello world", "bonjour"])
        assert [len(d.embedding) for d in out.data] == [384, 384]
        assert out.usage.prompt_tokens > 0
        assert out.model == "far-embed"  # vLLM answered with its own name; clients see ours
        card = client.models.retrieve("far-embed")
        assert card.id == "far-embed"
        metrics = gw.client.get("/metrics").text
        assert 'vramgate_requests_total{model="far-embed",route="/v1/embeddings",status_class="2xx"} ' \
            '1.0' in metrics
        relayed = [line for line in metrics.splitlines()
                   if line.startswith("vllm:") and 'model="far-embed",replica="0"' in line]
        assert relayed, "the upstream's own vllm:* metrics are re-exported"
        replica = gw.client.get("/admin/models").json()["data"][0]["replicas"][0]
        assert (replica["device"], replica["url"], replica["max_model_len"]) == \
            ("remote", vllm_server, 256)
