"""Scaling out, the pure parts: ``upstreams`` and ``distributed`` in the configuration, the Ray
engine's command line, what placement and ``vramgate plan`` book for each, and the remote engine."""

from __future__ import annotations

import json

import pytest

from server.config import Distributed, ModelConfig, Settings, Upstream
from server.configmodel import parse_model
from server.dryrun import dry_run
from server.engines import engine_launch
from server.errors import ConfigError
from server.gpus import Snapshot
from server.placement import REMOTE, Device, Plan, Requirement, plan
from server.remote import RemoteEngine

GiB = 2**30


def test_upstreams_parse_and_count_as_replicas_after_the_local_ones(monkeypatch):
    monkeypatch.setenv("UP_KEY", "s3cret")
    only = parse_model({"name": "a", "upstreams": ["http://h:8000/v1/"]}, "m")
    assert (only.path, only.replicas, only.engines) == ("", 0, 1)
    assert only.upstream(0) == Upstream("http://h:8000")
    mixed = parse_model({"name": "a", "path": "/p", "replicas": 2, "upstreams": [
        {"url": "https://h:1", "api_key_env": "UP_KEY", "model": "org/x"}]}, "m")
    assert mixed.engines == 3 and mixed.upstream(1) is None
    assert mixed.upstream(2) == Upstream("https://h:1", "UP_KEY", "org/x")


@pytest.mark.parametrize("raw, says", [
    ({"upstreams": []}, "upstreams: must be a non-empty list"),
    ({"upstreams": ["ftp://h"]}, "upstreams[0].url: must be http"),
    ({"upstreams": [{"url": "http://h:1", "api_key_env": "VG_NOT_SET_ANYWHERE"}]},
     "VG_NOT_SET_ANYWHERE is not set"),
    ({"upstreams": [{"url": "http://h:1", "key": "x"}]}, "upstreams[0]: must be a mapping"),
    ({"upstreams": ["http://h:1", "http://h:1/"]}, "lists one url twice"),
    ({"upstreams": ["http://h:1"], "replicas": 2}, "local replicas need a path"),
    ({"path": "/p", "replicas": 0}, "0 only beside upstreams"),
    ({"path": "/p", "pipeline_parallel_size": 2}, "needs distributed"),
    ({"path": "/p", "distributed": {"backend": "mpi", "address": "h:1"}}, "only ray"),
    ({"path": "/p", "distributed": {"address": "h"}}, "HOST:PORT"),
    ({"path": "/p", "replicas": 2, "distributed": {"address": "h:6379"}}, "one engine"),
])
def test_bad_scale_out_fields_name_their_path(raw, says):
    with pytest.raises(ConfigError) as err:
        parse_model({"name": "a", **raw}, "models[0]")
    assert says in str(err.value) and str(err.value).startswith("models[0].")


def test_a_distributed_engine_joins_the_ray_cluster_with_tp_and_pp():
    m = ModelConfig("big", "/models/big", tensor_parallel_size=8, pipeline_parallel_size=2,
                    distributed=Distributed("ray", "10.0.0.1:6379"))
    launch = engine_launch(m, port=1, device="cuda", python="py", module="v",
                           gpu_memory_utilization=0.9, tensor_parallel_size=8,
                           cuda_devices=tuple(range(8)))
    a = list(launch.argv)
    assert a[a.index("--distributed-executor-backend") + 1] == "ray"
    assert a[a.index("--pipeline-parallel-size") + 1] == "2"
    assert a.count("--tensor-parallel-size") == 1 and a[a.index("--tensor-parallel-size") + 1] == "8"
    assert launch.env["RAY_ADDRESS"] == "10.0.0.1:6379"
    local = engine_launch(ModelConfig("s", "/s"), port=1, device="cuda", python="py", module="v")
    assert "--distributed-executor-backend" not in local.argv and "RAY_ADDRESS" not in local.env


def _folder(tmp_path, weights: int):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 1024, "num_attention_heads": 16,
           "num_key_value_heads": 8, "num_hidden_layers": 4, "max_position_embeddings": 1024,
           "torch_dtype": "bfloat16", "vocab_size": 1000, "intermediate_size": 2048}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    header = json.dumps({"w": {"dtype": "BF16", "shape": [weights // 2], "data_offsets": [0, weights]}})
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode())
    return str(tmp_path)


def test_plan_books_the_ray_heads_share_and_nothing_for_an_upstream(tmp_path, monkeypatch):
    path = _folder(tmp_path, 40 * GiB)
    gpus = tuple(Device(f"cuda:{i}", "cuda", 80 * GiB, 80 * GiB, index=i) for i in range(2))
    snap = Snapshot((*gpus, Device("cpu", "cpu", 64 * GiB, 64 * GiB)), {}, "simulated")
    models = (ModelConfig("big", path, tensor_parallel_size=2, pipeline_parallel_size=2,
                          distributed=Distributed("ray", "head:6379"), memory_bytes=40 * GiB),
              ModelConfig("same", path, tensor_parallel_size=2, memory_bytes=40 * GiB),
              ModelConfig("far", "", replicas=0, upstreams=(Upstream("http://h:1"),)))
    (big_req, big), (same_req, same), (far_req, far) = dry_run(Settings(models=models), snap)
    assert isinstance(big, Plan) and isinstance(same, Plan)
    assert big.devices == ("cuda:0", "cuda:1") and big.tensor_parallel_size == 2
    # half the stages live on the other host: the head books half of what one host would
    assert big_req.weight_bytes == 20 * GiB and same_req.weight_bytes == 40 * GiB
    assert big.bytes_per_device < same.bytes_per_device
    assert "Ray at head:6379" in big.why and "Ray owns the rest" in big.why
    assert far_req.kind == REMOTE and isinstance(far, Plan) and far.devices == ()


def test_a_remote_requirement_is_planned_on_no_device():
    out = plan(Requirement("far", 0, overhead_bytes=0, kind=REMOTE), (), ())
    assert isinstance(out, Plan) and (out.devices, out.bytes_per_device) == ((), 0)


def test_a_remote_engine_carries_its_key_and_its_own_model_name(monkeypatch):
    monkeypatch.setenv("UP_KEY", "s3cret")
    eng = RemoteEngine("far#0", Upstream("http://h:1", "UP_KEY", "org/x"), "far")
    assert (eng.base_url, eng.health_url, eng.served_name) == ("http://h:1", "http://h:1/health",
                                                              "org/x")
    assert eng.headers == {"authorization": "Bearer s3cret"} and eng.pid is None
    assert RemoteEngine("far#0", Upstream("http://h:1"), "far").headers == {}
    assert RemoteEngine("far#0", Upstream("http://h:1"), "far").served_name == "far"


def test_a_model_served_only_by_upstreams_backs_off_but_never_gives_up():
    from server import decisions as d
    from server.books import ModelBook, WaiterBook
    from server.errors import ModelUnavailable
    from server.lifecycle import MAX_FAILURES, RESTART_CAP
    from server.modelfiles import UNKNOWN
    from server.profile import profile
    remote = ModelConfig(name="far", path="", replicas=0, upstreams=(Upstream("http://box:8000"),))
    local = ModelConfig(name="near", path="/x")
    books = {c.name: ModelBook(c, profile(c, UNKNOWN)) for c in (remote, local)}
    gave_up = {name: [d.failure(b, 100.0 + i) for i in range(MAX_FAILURES)][-1]
               for name, b in books.items()}
    assert gave_up == {"far": False, "near": True}
    # The upstream's model keeps answering 503 with Retry-After through the capped back-off, and
    # is started again once it has passed (a rebooted box comes back without `vramgate load`).
    far = books["far"]
    far.error = ModelUnavailable("the upstream did not answer", retry_after=10)
    w = WaiterBook(1, "far", 5, 1, 110.0, 10_000.0)
    refused = d.refusal(far, w, 110.0, d.Timeouts())
    assert refused is not None and refused.retry_after == 32 - 6  # 2 s × 2⁴ after the 5th, at 104
    assert d.backoff(far, 136.0) == 0
    assert d.step({"far": far}, [w], 136.0) == [d.Start("far", (0,))]
    for i in range(5):  # more failures: the wait stops growing at RESTART_CAP
        d.failure(far, 140.0 + i)
    assert d.backoff(far, 144.0) == RESTART_CAP and not far.gave_up
