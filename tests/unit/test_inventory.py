import json

import pytest
from click.testing import CliRunner

from server.cli import main
from server.errors import ConfigError
from server.gpus import EngineUsage, make_inventory
from server.gpus.nvml import GpuInfo, snapshot_from
from server.gpus.simulated import SimulatedInventory, parse_spec
from server.placement import Device

GiB = 2**30


def test_parse_spec_strings_and_yaml(tmp_path):
    spec = parse_spec("2x80GiB@20GiB, 1x24GiB;engine=2GiB;engine.m=1GiB")
    assert [(g.total_bytes, g.used_by_others) for g in spec.gpus] == [
        (80 * GiB, 20 * GiB), (80 * GiB, 20 * GiB), (24 * GiB, 0)]
    assert spec.engine_memory == {"default": 2 * GiB, "m": GiB}
    f = tmp_path / "layout.yaml"
    f.write_text("gpus:\n  - {memory: 40GiB, used_by_others: 1GiB, name: A100}\n"
                 "engine_memory: {m: 3GiB}\n")
    spec = parse_spec(str(f))
    assert spec.gpus[0].name == "A100" and spec.engine_memory == {"m": 3 * GiB}
    for bad in ("", "2x", "x80GiB", "1x8GiB@9GiB", "1x8GiB;colour=red", "0x8GiB"):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_simulated_engines_take_memory_when_ready():
    inv = SimulatedInventory(parse_spec("2x24GiB;engine.b=3GiB"))
    engines = [EngineUsage("a", frozenset({1}), ("cuda:0",), 10 * GiB, True),
               EngineUsage("b", frozenset({2}), ("cuda:1",), 10 * GiB, True),
               EngineUsage("c", frozenset({3}), ("cuda:1",), 10 * GiB, False)]
    snap = inv.snapshot(engines)
    gpus = {d.id: d for d in snap.devices}
    assert gpus["cuda:0"].free_bytes == 14 * GiB and gpus["cuda:0"].seen_bytes == 10 * GiB
    assert gpus["cuda:1"].free_bytes == 21 * GiB  # c is still starting
    assert snap.measured == {"a": 10 * GiB, "b": 3 * GiB}
    assert snap.devices[-1].kind == "cpu" and snap.source == "simulated"


def test_nvml_snapshot_counts_our_process_trees():
    gpus = [GpuInfo(0, "GPU-0", "H200", 140 * GiB, 100 * GiB, 40 * GiB,
                    processes={10: 30 * GiB, 99: 10 * GiB}),
            GpuInfo(1, "GPU-1", "H200", 140 * GiB, 130 * GiB, 10 * GiB, processes={11: 10 * GiB})]
    engines = [EngineUsage("m", frozenset({9, 10, 11}), ("cuda:0", "cuda:1"), 35 * GiB, True)]
    cpu = Device("cpu", "cpu", 64 * GiB, 60 * GiB)
    snap = snapshot_from(gpus, engines, cpu)
    assert [d.seen_bytes for d in snap.devices[:2]] == [30 * GiB, 10 * GiB]
    assert snap.measured == {"m": 30 * GiB}
    assert snap.devices[-1] is cpu


def test_nvml_without_a_gpu_is_an_empty_inventory_not_a_crash():
    snap = make_inventory(None).snapshot()
    assert snap.devices[-1].kind == "cpu"  # on this machine: the CPU alone


def test_cli_plan_and_gpus_on_a_simulated_layout(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - {name: big, path: meta-llama/Llama-3.1-70B, memory: 100GiB}\n"
                   "  - {name: small, path: org/small, memory: 10GiB, fim: qwen}\n"
                   "  - {name: huge, path: org/huge, memory: 500GiB, tool_parser: none}\n")
    runner = CliRunner()
    res = runner.invoke(main, ["plan", "--config", str(cfg), "--simulate-gpus", "2x80GiB,1x24GiB",
                               "--json"])
    assert res.exit_code == 0, res.output
    out = {m["model"]: m for m in json.loads(res.output)["models"]}
    assert out["big"]["devices"] == ["cuda:0", "cuda:1"] and out["big"]["tensor_parallel_size"] == 2
    assert out["small"]["devices"] == ["cuda:2"]
    assert not out["huge"]["fits"] and out["huge"]["short_bytes"] > 0
    assert [out[m]["tool_parser"] for m in ("big", "small", "huge")] == ["llama3_json", "hermes", None]
    assert out["small"]["fim"] == "qwen" and out["big"]["fim"] is None
    res = runner.invoke(main, ["plan", "--config", str(cfg), "--simulate-gpus", "2x80GiB,1x24GiB"])
    assert "DOES NOT FIT" in res.output and "cuda:0+cuda:1" in res.output
    assert "TOOLS" in res.output and "llama3_json" in res.output
    res = runner.invoke(main, ["gpus", "--simulate-gpus", "1x24GiB@4GiB", "--json"])
    dev = json.loads(res.output)["devices"][0]
    assert dev["free_bytes"] == 20 * GiB and dev["used_by_others_bytes"] == 4 * GiB
    res = runner.invoke(main, ["gpus", "--simulate-gpus", "nonsense"])
    assert res.exit_code == 2 and "simulate_gpus" in res.output


def test_cpu_engine_memory_counts_shared_pages_once():
    """vLLM's API server, engine core and worker share pages: adding up their resident sizes
    counted those pages once per process. Here a process fills 96 MiB, then forks: both map the
    same pages."""
    import subprocess
    import sys

    import psutil

    from server.gpus.cpu import memory_bytes

    code = ("import os, sys\nblob = bytearray(96 << 20)\nfor i in range(0, len(blob), 4096): blob[i] = 1\n"
            "child = os.fork()\nos.write(1, b'%d\\n' % (child or os.getpid()))\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        # the child's pid, written twice; one os.write each, so the lines cannot interleave (print's can)
        pids = {int(proc.stdout.readline()), int(proc.stdout.readline())}
        pids.add(proc.pid)
        rss = sum(psutil.Process(p).memory_info().rss for p in pids)
        assert rss > 2 * (96 << 20)  # each process shows the 96 MiB as resident
        assert memory_bytes(frozenset(pids)) < 0.7 * rss  # PSS splits them between the two
    finally:
        proc.stdin.close()
        proc.wait(10)
