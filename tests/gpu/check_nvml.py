"""The real NVML path on a machine with an NVIDIA GPU: inventory, measured engine memory, and the
planner's ``--gpu-memory-utilization`` against vLLM's own start check. No vLLM needed (torch is).

    python tests/gpu/check_nvml.py [OUT_JSON]

Prints every figure and a PASS/FAIL line per check; exits 1 when a check fails. Not part of the
CPU suite (there is no GPU in CI); run it where a GPU exists. Each "engine" here is a torch
process that does what a vLLM worker does with memory: create its CUDA context, read free memory
(``torch.cuda.mem_get_info``, as vLLM's ``MemorySnapshot``), refuse when free < fraction × total
(vLLM's ``request_memory``), then allocate its whole budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
GiB, MiB = 2**30, 2**20
results: dict = {"checks": [], "env": {}}


def check(name: str, ok: bool, detail: str = "") -> bool:
    results["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def psutil_shim() -> None:
    """Just enough psutil for server.gpus.cpu where psutil is not installed (/proc only)."""
    shim = types.ModuleType("psutil")

    class Error(Exception):
        pass

    def virtual_memory():
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        kib = lambda k: int(info[k].split()[0]) * 1024  # noqa: E731
        return types.SimpleNamespace(total=kib("MemTotal"), available=kib("MemAvailable"))

    class Process:
        def __init__(self, pid):
            if not os.path.exists(f"/proc/{pid}"):
                raise Error(pid)
            self.pid = pid

        def children(self, recursive=False):
            return []

        def memory_info(self):
            return types.SimpleNamespace(rss=0)

    shim.Error, shim.virtual_memory, shim.Process = Error, virtual_memory, Process
    sys.modules["psutil"] = shim


CHILD = r"""
import json, math, sys, torch
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(json.dumps({"free": free, "total": total}), flush=True)
held = []
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "alloc":
        try:
            held.append(torch.empty(int(arg[0]), dtype=torch.uint8, device="cuda"))
            held[-1].fill_(1); torch.cuda.synchronize(); ok = True
        except torch.OutOfMemoryError:
            ok = False
        free, total = torch.cuda.mem_get_info()
        print(json.dumps({"ok": ok, "free": free, "total": total}), flush=True)
    elif cmd == "vllm_check":  # vLLM's request_memory(): free after the context >= ceil(total * frac)
        need = math.ceil(total * float(arg[0]))
        free, total = torch.cuda.mem_get_info()
        print(json.dumps({"free": free, "requested": need, "ok": free >= need}), flush=True)
"""


class Probe:
    """A torch process holding a CUDA context (and whatever it is told to allocate) on one GPU."""

    def __init__(self, index: int) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(index))
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.first = json.loads(self.proc.stdout.readline())

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    env = results["env"]
    for mod in ("pynvml", "torch", "psutil", "prometheus_client", "click", "yaml", "starlette",
                "aiohttp"):
        env[mod] = have(mod)
    print("modules:", env, flush=True)
    if not env["psutil"]:
        psutil_shim()
    import pynvml

    from server.estimate import CUDA_CONTEXT_BYTES
    from server.gpus import EngineUsage
    from server.gpus.cpu import tree_pids
    from server.gpus.nvml import NvmlInventory, read_inventory
    from server.placement import Booking, NoFit, Plan, Requirement, available, plan

    try:
        pynvml.nvmlInit()
        env["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        env["driver"] = f"none: {exc}"
    t = time.perf_counter()
    gpus = read_inventory()
    env["read_inventory_seconds"] = round(time.perf_counter() - t, 4)
    for g in gpus:
        print(f"GPU {g.index} {g.name} {g.uuid} total={g.total_bytes / GiB:.2f} GiB "
              f"free={g.free_bytes / GiB:.2f} used={g.used_bytes / GiB:.2f} util={g.utilization_pct}% "
              f"temp={g.temperature_c}C power={g.power_w}W processes={g.processes}", flush=True)
    results["gpus"] = [{k: v for k, v in vars(g).items()} for g in gpus]
    if not check("NVML lists at least one GPU", len(gpus) >= 1):
        return finish(out)
    g0 = gpus[0]
    check("GPU fields read", g0.total_bytes > 0 and g0.name and g0.uuid.startswith("GPU-")
          and g0.utilization_pct is not None and g0.temperature_c is not None
          and g0.power_w is not None, f"{g0.name} {g0.uuid}")
    check("free + used = total (within 1%)",
          abs(g0.free_bytes + g0.used_bytes - g0.total_bytes) <= g0.total_bytes / 100,
          f"{g0.free_bytes} + {g0.used_bytes} vs {g0.total_bytes}")

    inv = NvmlInventory()
    free0 = inv.snapshot().devices[0].free_bytes
    probe = Probe(g0.index)  # the CUDA context alone
    time.sleep(0.5)
    free1 = inv.snapshot().devices[0].free_bytes
    context = free0 - free1
    results["cuda_context_bytes"] = context
    results["torch_free_vs_nvml_free_bytes"] = probe.first["free"] - free1
    check("CUDA context within the planner's CUDA_CONTEXT_BYTES", context <= CUDA_CONTEXT_BYTES,
          f"measured {context / MiB:.0f} MiB, constant {CUDA_CONTEXT_BYTES / MiB:.0f} MiB; "
          f"torch free − NVML free = {results['torch_free_vs_nvml_free_bytes'] / MiB:.0f} MiB")

    # C18 / C17: what one process really holds, as NVML reports it per process
    r = probe.ask(f"alloc {8 * GiB}")
    time.sleep(0.5)
    usage = EngineUsage("probe", tree_pids(probe.proc.pid) or frozenset([probe.proc.pid]),
                        (f"cuda:{g0.index}",), 0, True)
    snap = inv.snapshot([usage])
    dev = snap.devices[0]
    measured = snap.measured.get("probe")
    results["probe_measured_bytes"] = measured
    results["nvml_process_pids"] = sorted(read_inventory()[0].processes)
    results["probe_pid"] = probe.proc.pid
    check("NVML free drops by the 8 GiB allocated", r["ok"] and
          abs((free1 - dev.free_bytes) - 8 * GiB) < 256 * MiB,
          f"dropped {(free1 - dev.free_bytes) / GiB:.3f} GiB")
    check("NVML per-process memory measures our engine (C18)",
          measured is not None and abs(measured - (8 * GiB + context)) < 512 * MiB,
          f"measured={measured} pid={probe.proc.pid} nvml pids={results['nvml_process_pids']}")
    snap_other = inv.snapshot()  # the probe as another tenant: its memory is not available (C17)
    room_other = available(snap_other.devices, (), 0)[dev.id]
    room_ours = available(snap.devices, (Booking("probe", (dev.id,), measured or 0),), 0)[dev.id]
    check("another tenant's memory is not available (C17)",
          room_other <= g0.total_bytes - 8 * GiB, f"available {room_other / GiB:.2f} GiB")
    results["available_other_vs_ours_bytes"] = [room_other, room_ours]

    # the planner's fraction against vLLM's start check, on the tightest plan there is
    for name, req in [
        ("20 GiB model", Requirement("m20", 20 * GiB, 0, overhead_bytes=GiB,
                                     context_bytes=CUDA_CONTEXT_BYTES)),
        ("size unknown: all that is available",
         Requirement("whole", None, context_bytes=CUDA_CONTEXT_BYTES)),
    ]:
        p = plan(req, inv.snapshot().devices, ())
        if not check(f"plan for {name}", isinstance(p, Plan), getattr(p, "why", getattr(p, "reason", ""))):
            continue
        engine = Probe(g0.index)
        vc = engine.ask(f"vllm_check {p.gpu_memory_utilization}")
        check(f"vLLM start check passes for {name}", vc["ok"],
              f"fraction {p.gpu_memory_utilization}: free after context {vc['free'] / GiB:.3f} GiB, "
              f"requested {vc['requested'] / GiB:.3f} GiB")
        if vc["ok"]:
            a = engine.ask(f"alloc {vc['requested']}")
            time.sleep(0.5)
            u = EngineUsage("engine", tree_pids(engine.proc.pid) or frozenset([engine.proc.pid]),
                            (dev.id,), 0, True)
            got = inv.snapshot([u]).measured.get("engine")
            check(f"the engine's whole budget fits and stays within the booking for {name}",
                  a["ok"] and (got is None or got <= p.bytes_per_device + 64 * MiB),
                  f"booked {p.bytes_per_device / GiB:.3f} GiB, measured {got and got / GiB:.3f} GiB")
        engine.close()
    over = plan(Requirement("too-big", g0.total_bytes, 0, context_bytes=CUDA_CONTEXT_BYTES),
                inv.snapshot().devices, ())
    check("a model larger than the GPU gets a no-fit with numbers", isinstance(over, NoFit)
          and "GiB" in over.reason, getattr(over, "reason", ""))
    probe.close()

    if env["prometheus_client"]:
        from server.metrics import Metrics
        m = Metrics({}, [])
        m.set_devices(inv.snapshot().devices, (), read_inventory())
        text = m.render().decode()
        lines = [x for x in text.splitlines() if x.startswith("vramgate_gpu_") and 'gpu="0"' in x]
        print("\n".join(lines), flush=True)
        check("GPU gauges exported", len({x.split("{")[0] for x in lines}) >= 6, f"{len(lines)} series")
    if env["click"] and env["yaml"] and env["starlette"]:
        res = subprocess.run([sys.executable, "-m", "server", "gpus", "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        print(res.stdout[-2000:], res.stderr[-2000:], flush=True)
        ok = res.returncode == 0 and any(d["kind"] == "cuda" for d in json.loads(res.stdout)["devices"])
        check("vramgate gpus lists the GPU", ok)
    return finish(out)


def finish(out: Path | None) -> int:
    failed = [c["name"] for c in results["checks"] if not c["ok"]]
    results["failed"] = failed
    text = json.dumps(results, indent=2, default=str)
    if out:
        out.write_text(text)
    print(f"{len(results['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
