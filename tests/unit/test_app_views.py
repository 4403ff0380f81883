"""The gateway built through ``create_app`` with an injected launcher, inventory and clock: the
admin views and ``/metrics`` over the scheduler's frozen views, no engine process."""

from __future__ import annotations

import asyncio
import logging

from starlette.testclient import TestClient

from server.app import create_app
from server.config import ModelConfig, Settings
from server.gpus import Snapshot
from server.gpus.nvml import NvmlError
from server.placement import Device

GiB = 2**30


class BrokenNvml:
    """An inventory whose driver fails on every read after the first ``good`` ones."""

    source = "nvml"

    def __init__(self, good: int) -> None:
        self.good = good

    def snapshot(self, engines=()):
        if self.good <= 0:
            raise NvmlError("nvmlDeviceGetMemoryInfo: GPU is lost")
        self.good -= 1
        return Snapshot((Device("cpu", "cpu", 64 * GiB, 64 * GiB),), {}, source="nvml")


class IdleEngine:
    base_url = address = "http://127.0.0.1:9"
    health_url = base_url + "/health"
    headers: dict = {}
    served_name = None

    async def start(self): ...
    async def ready(self, timeout, client): return 0.0
    async def exited(self): await asyncio.Event().wait()
    async def stop(self): ...


def test_metrics_answer_200_without_device_gauges_when_nvml_raises(tmp_path):
    settings = Settings(models=(ModelConfig(name="m", path="/nonexistent/m", memory_bytes=GiB),),
                        data_dir=tmp_path)
    app = create_app(settings, launcher=lambda *a: IdleEngine(), inventory=BrokenNvml(good=0),
                     clock=lambda: 1000.0)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/metrics")
        assert r.status_code == 200
        assert 'vramgate_model_state{model="m",state="unloaded"} 1.0' in r.text
        assert client.get("/health").json() == {"status": "ok", "models": {"m": "unloaded"}}
        r = client.get("/admin/models")
        assert r.status_code == 200 and r.json()["data"][0]["state"] == "unloaded"


def test_admin_gpus_answers_503_in_the_envelope_when_nvml_raises(tmp_path):
    settings = Settings(models=(), data_dir=tmp_path)
    app = create_app(settings, launcher=lambda *a: IdleEngine(), inventory=BrokenNvml(good=0))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/admin/gpus")
        assert r.status_code == 503 and r.json()["error"]["code"] == "gpu_read_failed"
        assert "GPU is lost" in r.json()["error"]["message"]


def test_a_bug_on_the_inference_fast_path_is_a_500_in_the_routes_shape(tmp_path, monkeypatch, caplog):
    """The fast path runs outside Starlette's error middleware (server.app.Edge): a bug there is
    still answered as Starlette's would be, in the route's shape, with the request id."""
    import server.exchange

    def broken(*args, **kwargs):
        raise KeyError("a bug")
    monkeypatch.setattr(server.exchange, "read_call", broken)
    settings = Settings(models=(), data_dir=tmp_path)
    app = create_app(settings, launcher=lambda *a: IdleEngine(), inventory=BrokenNvml(good=0))
    caplog.set_level(logging.INFO, logger="vramgate.access")
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json={}, headers={"x-request-id": "bug-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
        assert r.json()["error"] == {"message": "Internal error: KeyError", "type": "server_error",
                                     "param": None, "code": "internal_error"}
        r = client.post("/v1/messages", json={})
        assert r.status_code == 500 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "api_error" and len(r.headers["x-request-id"]) == 32
        assert client.get("/health").status_code == 200  # and the gateway goes on
        metrics = client.get("/metrics").text  # counted, as every answered request is
        assert 'vramgate_requests_total{model="unknown",route="/v1/chat/completions",' \
               'status_class="5xx"} 1.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.name == "vramgate.access"]
    assert any("request_id=bug-1 route=/v1/chat/completions model=unknown status=500" in line
               for line in lines), lines
