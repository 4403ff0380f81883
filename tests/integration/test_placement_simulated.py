"""The gateway on simulated GPU layouts, engines started as the planner says (cases C16–C18).

The stand-in engine records the arguments and CUDA_VISIBLE_DEVICES it was started with; the real
vLLM command line is covered by the e2e suite.
"""

from __future__ import annotations

import json
import math
import time

from tests.gateway import standin_gateway

GiB = 2**30


def run(tmp_path, models, simulate, **top):
    return standin_gateway(tmp_path, {"simulate_gpus": simulate, "gpu_headroom": "1GiB",
                                      "place_wait_timeout": 0,
                                      "models": [{"preload": True, **m} for m in models], **top})


def engine(tmp_path, name):
    path = tmp_path / "standin" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def arg(stats, flag):
    argv = stats["argv"]
    return argv[argv.index(flag) + 1] if flag in argv else None


def model(gw, name):
    return gw.client.get(f"/v1/models/{name}").json()


def test_other_tenants_count_and_engines_get_the_planned_arguments(tmp_path):
    # C17: other processes hold 64 GiB (80 %) of GPU 0.
    models = [{"name": "m", "path": "standin:ok", "memory": "30GiB"},
              {"name": "n", "path": "standin:ok", "memory": "8GiB"},
              {"name": "toobig", "path": "standin:ok", "memory": "100GiB"}]
    with run(tmp_path, models, "1x80GiB@64GiB,1x80GiB") as gw:
        assert gw.wait_states(60) == {"m": "ready", "n": "ready", "toobig": "unloaded"}
        m, n = engine(tmp_path, "m"), engine(tmp_path, "n")
        # m needs 30 GiB + 1 GiB overhead inside the fraction (of the 80 GiB total) + 1 GiB CUDA
        # context outside it: only GPU 1 has that.
        assert m["cuda_visible_devices"] == "1"
        assert arg(m, "--gpu-memory-utilization") == "0.3875"
        assert "--tensor-parallel-size" not in m["argv"] and "--enforce-eager" not in m["argv"]
        # n (8 + 1 + 1 GiB) fits in GPU 0's remaining 16 GiB - 1 GiB headroom: pack takes the tight fit.
        assert n["cuda_visible_devices"] == "0"
        assert arg(n, "--gpu-memory-utilization") == "0.1125"
        assert model(gw, "m")["replicas"][0]["placement"]["devices"] == ["cuda:1"]
        # Nothing fits: a prompt 503 with the numbers, no process started.
        t0 = time.monotonic()
        r = gw.client.post("/v1/completions", json={"model": "toobig", "prompt": "x"})
        assert time.monotonic() - t0 < 5
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        msg = r.json()["error"]["message"]
        assert "toobig needs 102.00 GiB" in msg and "cuda:0 5.00 GiB of 80.00 GiB" in msg  # n took 10
        assert engine(tmp_path, "toobig") is None
        metrics = gw.client.get("/metrics").text
        assert 'vramgate_gpu_memory_total_bytes{gpu="1"} 8.589934592e+10' in metrics
        assert 'vramgate_gpu_memory_reserved_bytes{gpu="1"}' in metrics
        gpus = gw.client.get("/admin/gpus").json()
        assert [g["id"] for g in gpus["devices"]][:2] == ["cuda:0", "cuda:1"]
        assert gpus["devices"][1]["reserved_bytes"] == GiB + math.ceil(0.3875 * 80 * GiB)


def test_a_model_still_starting_is_already_booked(tmp_path):
    # C16: A (slow to start) and B together exceed one GPU; B must not land on A's GPU.
    models = [{"name": "A", "path": "standin:slow-start=3", "memory": "20GiB"},
              {"name": "B", "path": "standin:ok", "memory": "10GiB"}]
    with run(tmp_path, models, "2x24GiB") as gw:
        gw.wait_up()
        deadline = time.monotonic() + 10
        while not (engine(tmp_path, "A") and engine(tmp_path, "B")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.states()["A"] == "loading"
        assert engine(tmp_path, "A")["cuda_visible_devices"] == "0"
        assert engine(tmp_path, "B")["cuda_visible_devices"] == "1"
        assert gw.wait_states(30) == {"A": "ready", "B": "ready"}


def test_measured_usage_replaces_the_estimate_and_evictions_are_logged(tmp_path):
    # C18: A is estimated at 22 GiB but uses 4 GiB once up; B then fits beside it.
    models = [{"name": "A", "path": "standin:ok", "memory": "20GiB"},
              {"name": "B", "path": "standin:slow-start=1", "memory": "20GiB"},
              {"name": "C", "path": "standin:slow-start=1", "memory": "30GiB"}]
    with run(tmp_path, models, "1x40GiB;engine.A=4GiB;engine.B=20GiB") as gw:
        states = gw.wait_states(30)
        assert states["A"] == "ready" and states["B"] == "unloaded"  # A was still booked at 22 GiB
        assert model(gw, "A")["replicas"][0]["placement"]["measured_bytes"] == 4 * GiB
        assert model(gw, "A")["replicas"][0]["placement"]["reserved_bytes"] == 4 * GiB
        r = gw.client.post("/v1/completions", json={"model": "B", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert gw.states()["A"] == "ready"  # B fitted without evicting A
        # C (32 GiB) needs 17 GiB more than the 15 left. Least recently used first, A (4 GiB) is
        # not enough and A + B is: then A is spared, since B alone makes the room.
        r = gw.client.post("/v1/completions", json={"model": "C", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert gw.states() == {"A": "ready", "B": "unloaded", "C": "ready"}
        log = gw.log_text()
        assert "evicting A (" not in log and "evicting B (20.00 GiB on cuda:0" in log
        assert "needs 31.00 GiB + 1.00 GiB CUDA context per device" in log
