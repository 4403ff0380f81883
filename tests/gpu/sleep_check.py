"""vLLM's sleep mode on a real GPU, as the gateway will use it (issue #13, section 4): the costs
that decide whether sleeping an idle engine is worth it, and the HTTP semantics that
``tests/standin_sleep.py`` reproduces for the CPU suite.

    python tests/gpu/sleep_check.py MODEL_PATH [--out OUT_JSON] [--enforce-eager] [-- VLLM_ARGS...]

MODEL_PATH is a small Hugging Face checkpoint folder (real weights: a level-2 wake reloads them
from disk, which ``--load-format dummy`` cannot). Starts ``python -m
vllm.entrypoints.openai.api_server --model MODEL_PATH --enable-sleep-mode`` with
``VLLM_SERVER_DEV_MODE=1`` and measures: the cold start (process start to ``/health`` 200), one
greedy completion, then for level 1 (``mode=wait``) and level 2 the sleep time, the NVML memory of
the engine's processes awake and asleep (``nvmlDeviceGetComputeRunningProcesses``, summed over the
engine's process tree; the device's used memory beside it, for containers whose NVML shows other
pids), and the wake time (``POST /wake_up`` to a request answered; level 2:
``/wake_up?tags=weights``, ``/collective_rpc {"method": "reload_weights"}``,
``/wake_up?tags=kv_cache``, vLLM's own order in ``vllm/snapshot/server.py``). It also checks that
a request sent while asleep waits and is served after the wake, and that ``mode=abort`` ends a
running stream with ``finish_reason: "abort"`` and ``[DONE]``.

Prints every figure and a PASS/FAIL line per check, writes the JSON (``--out``); exits 1 when a
check fails. Needs vLLM with CUDA and pynvml; needs no third-party module to import or to answer
``--help``. The CPU suite runs it once against the stand-in (``--engine-module
tests.standin_engine --no-nvml``, model ``standin:ok``) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.gpu.check_nvml import check, finish, results  # noqa: E402 (stdlib only at import)

MiB = 2**20
NAME = "sleep-check"
results.update(figures={}, memory={})


def figure(name: str, value) -> None:
    results["figures"][name] = value
    print(f"{name} = {value}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Engine:
    def __init__(self, module: str, model: str, port: int, extra: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", module, "--model", model,
                "--served-model-name", NAME, "--port", str(port), "--enable-sleep-mode", *extra]
        results["argv"] = argv
        self.log = log.open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=dict(os.environ, VLLM_SERVER_DEV_MODE="1"),
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 600) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_healthy(self, timeout: float) -> float | None:
        """Seconds from the process start to the first ``/health`` 200; None if it never came."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline and self.proc.poll() is None:
            try:
                if self.call("GET", "/health", timeout=5)[0] == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.25)
        return None

    def complete(self, max_tokens: int = 16) -> tuple[int, str, str | None]:
        status, body = self.call("POST", "/v1/completions", {
            "model": NAME, "prompt": "The capital of France is", "max_tokens": max_tokens,
            "temperature": 0})
        if status != 200:
            return status, str(body), None
        choice = body["choices"][0]
        return status, choice["text"], choice["finish_reason"]

    def stream(self, max_tokens: int, first: threading.Event) -> list:
        """A streamed completion's events (``"[DONE]"`` last if it ended so); sets ``first`` at
        the first chunk."""
        req = urllib.request.Request(self.url + "/v1/completions", method="POST", data=json.dumps({
            "model": NAME, "prompt": "Count: one, two,", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}).encode(), headers={"content-type": "application/json"})
        events: list = []
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    line = line.decode().strip()
                    if line.startswith("data: "):
                        data = line[6:]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        first.set()
        except (OSError, ValueError) as exc:
            events.append(f"error: {exc}")
        finally:
            first.set()
        return events

    def waiting(self) -> float:
        """``vllm:num_requests_waiting`` summed over the engine's labels."""
        status, text = self.call("GET", "/metrics", timeout=10)
        total = 0.0
        for line in str(text).splitlines():
            if line.startswith("vllm:num_requests_waiting{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


def tree(pid: int) -> set[int]:
    """``pid`` and its descendants, from /proc (psutil is not needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def memory(engine: Engine, label: str) -> dict:
    """NVML: the engine's processes' used GPU memory, and each device's used memory."""
    got = {"engine_bytes": 0, "engine_pids": [], "device_used_bytes": [], "nvml_pids": []}
    if results["env"].get("nvml") is False:
        return got
    import pynvml

    pids = tree(engine.proc.pid)
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        got["device_used_bytes"].append(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            used = p.usedGpuMemory or 0  # None where the driver does not say
            got["nvml_pids"].append([p.pid, used])
            if p.pid in pids:
                got["engine_bytes"] += used
                got["engine_pids"].append(p.pid)
    results["memory"][label] = got
    print(f"memory {label}: engine {got['engine_bytes'] / MiB:.0f} MiB (pids {got['engine_pids']})"
          f", devices used {[round(b / MiB) for b in got['device_used_bytes']]} MiB", flush=True)
    return got


def used(m: dict) -> int:
    """The engine's bytes; the device's used bytes where NVML's pids are not ours (containers)."""
    return m["engine_bytes"] if m["engine_pids"] else sum(m["device_used_bytes"])


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - t, 3)


def sleep_and_wake(e: Engine, level: int, first_text: str) -> None:
    awake = memory(e, f"awake_before_level{level}")
    (status, body), secs = timed(e.call, "POST", f"/sleep?level={level}&mode=wait")
    figure(f"level{level}_sleep_s", secs)
    check(f"level {level}: /sleep answers 200 sleeping",
          status == 200 and body == {"status": "sleeping", "level": level}, str(body))
    check(f"level {level}: /is_sleeping true", e.call("GET", "/is_sleeping")[1] ==
          {"is_sleeping": True})
    asleep = memory(e, f"asleep_level{level}")
    figure(f"level{level}_freed_mib", round((used(awake) - used(asleep)) / MiB))
    if results["env"].get("nvml") is not False:
        check(f"level {level}: memory freed", used(asleep) < used(awake),
              f"{used(awake) / MiB:.0f} -> {used(asleep) / MiB:.0f} MiB")

    # A request sent while asleep waits (vLLM queues it) and is served after the wake.
    held: dict = {}
    t = threading.Thread(target=lambda: held.update(r=e.complete()), daemon=True)
    t.start()
    deadline = time.monotonic() + 5  # a sleeping engine may not publish its gauges: 5 s at most
    while e.waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    check(f"level {level}: a request sent while asleep is not answered before the wake",
          "r" not in held, f"vllm:num_requests_waiting={e.waiting()}")

    t0 = time.perf_counter()
    if level == 2:
        steps = [("POST", "/wake_up?tags=weights", None),
                 ("POST", "/collective_rpc", {"method": "reload_weights"}),
                 ("POST", "/wake_up?tags=kv_cache", None)]
    else:
        steps = [("POST", "/wake_up", None)]
    for method, path, body in steps:
        (status, answer), secs = timed(e.call, method, path, body)
        figure(f"level{level}_{path.strip('/').replace('?', '_').replace('=', '_')}_s", secs)
        check(f"level {level}: {path} answers 200", status == 200, str(answer))
    t.join(120)
    status, text, _ = e.complete()
    figure(f"level{level}_wake_to_answer_s", round(time.perf_counter() - t0, 3))
    check(f"level {level}: the queued request was served after the wake",
          held.get("r", (0, ""))[:2] == (200, first_text), str(held.get("r")))
    check(f"level {level}: the answer after the wake is the first one", status == 200 and
          text == first_text, repr(text))
    check(f"level {level}: /is_sleeping false", e.call("GET", "/is_sleeping")[1] ==
          {"is_sleeping": False})
    memory(e, f"awake_after_level{level}")


def abort_check(e: Engine, max_tokens: int) -> None:
    first = threading.Event()
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(events=e.stream(max_tokens, first)), daemon=True)
    t.start()
    first.wait(120)
    status, body = e.call("POST", "/sleep?level=1&mode=abort")
    t.join(120)
    events = got.get("events") or []
    reasons = [c.get("finish_reason") for ev in events if isinstance(ev, dict)
               for c in ev.get("choices", [])]
    check("mode=abort: the running stream ends with finish_reason abort, then [DONE]",
          status == 200 and events[-1:] == ["[DONE]"] and reasons[-1:] == ["abort"],
          f"{len(events)} events, last {events[-2:]}")
    status, _ = e.call("POST", "/wake_up")
    check("mode=abort: the engine wakes", status == 200)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a small Hugging Face checkpoint folder (real weights)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--port", type=int, default=0, help="default: a free one")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--gpu-memory-utilization", default="0.3")
    p.add_argument("--max-model-len", default="2048")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: a faster start")
    p.add_argument("--log", type=Path, default=Path("sleep_check_vllm.log"))
    p.add_argument("--engine-module", default="vllm.entrypoints.openai.api_server",
                   help="what to start (tests.standin_engine: a dry run of this script on a CPU)")
    p.add_argument("--no-nvml", action="store_true", help="measure no memory (the dry run)")
    p.add_argument("vllm_args", nargs="*", help="more vLLM arguments, after --")
    args = p.parse_args(argv)
    extra = ["--gpu-memory-utilization", args.gpu_memory_utilization,
             "--max-model-len", args.max_model_len, *(["--enforce-eager"] if args.enforce_eager
                                                       else []), *args.vllm_args]
    results["env"].update(model=args.model, engine_module=args.engine_module,
                          nvml=not args.no_nvml)
    if not args.no_nvml:
        import pynvml

        pynvml.nvmlInit()
        results["env"]["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
    try:
        if args.engine_module.startswith("vllm"):
            import vllm
            results["env"]["vllm"] = vllm.__version__
    except Exception as exc:  # still run: the engine is a subprocess
        results["env"]["vllm"] = f"not importable here: {exc}"
    e = Engine(args.engine_module, args.model, args.port or free_port(), extra, args.log)
    try:
        cold = e.wait_healthy(args.start_timeout)
        figure("cold_start_s", None if cold is None else round(cold, 2))
        if not check("cold start: /health 200", cold is not None,
                     f"exit status {e.proc.poll()}, log {args.log}"):
            return finish(args.out)
        (status, first_text, reason), secs = timed(e.complete)
        figure("first_request_s", secs)
        if not check("one request answered", status == 200, repr(first_text)):
            return finish(args.out)
        sleep_and_wake(e, 1, first_text)
        sleep_and_wake(e, 2, first_text)
        abort_check(e, min(1000, int(args.max_model_len) - 64))
    finally:
        e.stop()
        if not args.no_nvml:
            import pynvml

            pynvml.nvmlShutdown()
    return finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
