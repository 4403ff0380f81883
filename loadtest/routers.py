"""Which OpenAI-aware router goes in front of a vramgate fleet (one vramgate per node): three
candidates measured side by side in one run, in front of the same two nodes.

    python -m loadtest.routers [--pairs 300] [--requests 1000] [--rounds 2] [--only NAME,...]

The nodes are two real vramgate gateways on loopback, each with one model on an instant engine
(``loadtest/instant_engine.py``): node A serves ``model-x``, node B ``model-y``; both check API keys.
The candidates, each installed once into its own virtualenv under ``$VRAMGATE_ROUTERS_DIR``
(default ``~/.cache/vramgate/routers/<name>``), with the time the install took:

- ``vllm-router``: vllm-project/router, Rust (PyPI ``vllm-router``; every release there, 0.1.9 on,
  is this one), in IGW mode (``--enable-igw``), one ``POST /workers`` per node and model;
- ``litellm``: LiteLLM's proxy (``litellm[proxy]``), one ``model_list`` entry per node and model;
- ``production-stack``: vllm-project/production-stack's router (Python package ``vllm_router``,
  not on PyPI: installed from ``$PRODUCTION_STACK_SRC``, a source folder or pip URL, default its
  git tag), ``--service-discovery static --static-backends ... --static-models ...``.

Per router: (a) routing by ``model`` (each node's ``vramgate_requests_total`` counts what it
served); (b) added latency against node A directly, at concurrency 1 (pairs, order flipped every
pair; p50 = median of the differences, p99 = p99 through it − p99 direct) and at concurrency 32
(direct and the routers alternating within each round), plain (whole answer) and streamed (first
chunk); (c) node B stopped with SIGTERM under load through every router at once: what model-x and
model-y requests get, how fast, whether anything hangs, then B restarted on its port and the time
until each router serves model-y again; (d) the gateway's errors (401, 429 with Retry-After, 400
with ``param``, 404) through the router beside the same request direct; (e) install size and time,
startup time, RSS idle and at peak, CPU seconds per 1,000 requests.

Prints the tables; writes ``loadtest/results/routers.{json,md}``. Not part of the test suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import click
import httpx
import psutil
import yaml

from loadtest.loadgen import machine, one_request, payload, pct, run_level
from loadtest.procs import ROOT, Proc, free_port, wait_http

ROUTERS_DIR = Path(os.environ.get("VRAMGATE_ROUTERS_DIR", Path.home() / ".cache" / "vramgate" / "routers"))
PS_TAG = "vllm-stack-0.1.12"
SPECS = {  # what pip installs for each candidate (the pinned versions this comparison measured)
    "vllm-router": "vllm-router==0.1.17",
    "litellm": "litellm[proxy]==1.108.7",  # 1.109+ need litellm-proxy, which PyPI does not have
    "production-stack": os.environ.get(
        "PRODUCTION_STACK_SRC",
        f"git+https://github.com/vllm-project/production-stack.git@{PS_TAG}"),
}
KEY = "sk-bench-0123456789abcdef0123456789abcdef"
BAD = "sk-wrong-0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
TARGETS = ("direct", "vllm-router", "litellm", "production-stack")
LIMITED = {t: f"sk-limited-{t}-0123456789abcdef0123456789"[:48] for t in TARGETS}  # rpm 1 each
CHUNKS = 16
HELLO = [{"role": "user", "content": "Say hello."}]


# ---------------------------------------------------------------- installs

def ensure(name: str) -> dict[str, Any]:
    """The candidate's virtualenv, installed once (again if its pin changed); its install facts."""
    venv = ROUTERS_DIR / name
    spec = SPECS[name]
    stamp = venv / ".pinned"
    if not (stamp.exists() and stamp.read_text().strip() == spec):
        click.echo(f"installing {spec} into {venv} (once) ...", err=True)
        shutil.rmtree(venv, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        env = dict(os.environ)
        if name == "production-stack":
            # Its pyproject asks for Python >= 3.12; it runs on 3.11 (measured here). A source
            # folder without .git has no version for setuptools_scm: give it the tag's.
            env.setdefault("SETUPTOOLS_SCM_PRETEND_VERSION", PS_TAG.rsplit("-", 1)[1])
            if sys.version_info < (3, 12):
                pip.append("--ignore-requires-python")
        subprocess.run(pip + [spec], check=True, env=env)
        (venv / ".install-seconds").write_text(f"{time.monotonic() - t0:.1f}")
        stamp.write_text(spec)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    secs = venv / ".install-seconds"
    return {"spec": spec, "venv": str(venv), "size_mib": round(size / 2**20),
            "install_s": float(secs.read_text()) if secs.exists() else None,
            "version": dist_version(venv, "litellm" if name == "litellm" else "vllm-router")}


def dist_version(venv: Path, dist: str) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------- nodes and routers

class Node:
    """One vramgate gateway (a "node") with one model on an instant engine, on a fixed port so
    that it can be stopped and started again where the routers expect it."""

    def __init__(self, tmp: Path, name: str, model: str) -> None:
        self.tmp, self.name, self.model = tmp / name, name, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> None:
        keys: list[Any] = [KEY] + [{"key": k, "rpm": 1} for k in LIMITED.values()]
        config = {"engine_module": "loadtest.instant_engine", "api_keys": keys,
                  "models": [{"name": self.model, "path": "instant", "preload": True,
                              "max_concurrency": 4096, "max_queue": 4096}]}
        self.starts += 1
        tmp = self.tmp / f"run{self.starts}"
        tmp.mkdir(parents=True)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        # start_gateway picks its own free port; a node comes back on the port the routers know
        self.proc = Proc([sys.executable, "-m", "server", "serve", "--config", str(tmp / "config.yaml"),
                          "--port", str(self.port), "--data-dir", str(tmp / "data")], tmp / "gateway.log")

        def ready(r: httpx.Response) -> bool:
            return r.status_code == 200 and all(m.get("state") == "ready" for m in r.json()["data"])
        try:
            wait_http(self.url + "/v1/models", self.proc, 60, ready, AUTH)
        except BaseException:
            self.proc.stop()
            raise

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def served(self) -> dict[str, float]:
        """``vramgate_requests_total`` by model (2xx) from its /metrics."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            m = re.match(r'vramgate_requests_total\{model="([^"]+)",route="[^"]+",status_class="2xx"\} (\S+)', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + float(m.group(2))
        return out


def direct_auth(kind: str) -> tuple[str, str]:
    """The client key and model that make node A answer 401 (a wrong key) or, sent twice, 429."""
    return (BAD if kind == "401" else KEY), "model-x"


@dataclass
class Router:
    name: str
    url: str
    proc: Proc
    command: str
    startup_s: float
    children: bool = False  # count the process tree's CPU and memory (LiteLLM's workers)
    install: dict[str, Any] = field(default_factory=dict)
    # how to make node A answer 401 / 429: the client key it sends and the model it names
    probe_auth: Callable[[str], tuple[str, str]] = direct_auth
    health: Callable[[], dict[str, bool]] | None = None
    peak_rss: int = 0

    def rss(self) -> int:
        try:
            procs = [psutil.Process(self.proc.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total


def start_vllm_router(tmp: Path, a: Node, b: Node) -> Router:
    venv = ROUTERS_DIR / "vllm-router"
    port, prom = free_port(), free_port()
    argv = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-port", str(prom), "--enable-igw", "--log-level", "warning",
            "--health-check-interval-secs", "5"]
    t0 = time.monotonic()
    proc = Proc(argv, tmp / "vllm-router.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/workers", proc, 60)
    for node in (a, b):  # IGW mode takes its workers over its REST API, one per node and model
        r = httpx.post(url + "/workers", json={"url": node.url, "model_id": node.model}, timeout=10)
        r.raise_for_status()
    startup = time.monotonic() - t0

    def health() -> dict[str, bool]:
        workers = httpx.get(url + "/workers", timeout=5).json()["workers"]
        return {w["url"]: bool(w["is_healthy"]) for w in workers}
    cmd = (" ".join(argv[1:]).replace(str(port), "PORT").replace(str(prom), "PROM_PORT")
           + "; then per node: POST /workers {\"url\": NODE_URL, \"model_id\": MODEL}")
    return Router("vllm-router", url, proc, "vllm-router " + cmd, startup, health=health)


def start_litellm(tmp: Path, a: Node, b: Node) -> Router:
    venv = ROUTERS_DIR / "litellm"
    port = free_port()
    entries = [("model-x", a, KEY), ("model-y", b, KEY),
               # LiteLLM sends its own key upstream, never the client's: the 401 and 429 probes
               # need entries whose key node A refuses or limits
               ("model-x-badkey", a, BAD), ("model-x-limited", a, LIMITED["litellm"])]
    cfg = {"model_list": [{"model_name": name, "litellm_params": {
        "model": f"openai/{node.model}", "api_base": node.url + "/v1", "api_key": key}}
        for name, node, key in entries], "general_settings": {"master_key": KEY}}
    (tmp / "litellm.yaml").write_text(json.dumps(cfg))
    argv = [str(venv / "bin" / "litellm"), "--config", str(tmp / "litellm.yaml"), "--host",
            "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    t0 = time.monotonic()
    proc = Proc(argv, tmp / "litellm.log", env={"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                                 "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR"})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", proc, 240, headers=AUTH)
    return Router("litellm", url, proc, "litellm --config litellm.yaml --port PORT --num_workers 1",
                  time.monotonic() - t0, children=True,
                  probe_auth=lambda kind: (KEY, {"401": "model-x-badkey", "429": "model-x-limited"}[kind]))


def start_production_stack(tmp: Path, a: Node, b: Node) -> Router:
    venv = ROUTERS_DIR / "production-stack"
    port = free_port()
    # Static health checks (--static-backend-health-checks) send a chat request without a key:
    # a keyed vramgate answers 401 and every node would be taken out. Left at the default (off).
    argv = [str(venv / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
            "--service-discovery", "static", "--static-backends", f"{a.url},{b.url}",
            "--static-models", f"{a.model},{b.model}", "--routing-logic", "roundrobin",
            "--log-level", "warning"]
    t0 = time.monotonic()
    proc = Proc(argv, tmp / "production-stack.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, 120)
    cmd = " ".join(argv[1:]).replace(str(port), "PORT").replace(a.url, "NODE_A").replace(b.url, "NODE_B")
    return Router("production-stack", url, proc, "vllm-router " + cmd, time.monotonic() - t0)


STARTERS = {"vllm-router": start_vllm_router, "litellm": start_litellm,
            "production-stack": start_production_stack}


class RssSampler:
    """Samples every router's RSS every 100 ms in a thread, keeping each one's peak."""

    def __init__(self, routers: list[Router]) -> None:
        self.routers, self.done = routers, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(0.1):
            for r in self.routers:
                r.peak_rss = max(r.peak_rss, r.rss())

    def __enter__(self) -> "RssSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()


# ---------------------------------------------------------------- (a) routing

def routing(router: Router, a: Node, b: Node, n: int = 20) -> dict[str, Any]:
    """``n`` chat requests per model through the router; what each node served meanwhile."""
    before = {a.name: a.served(), b.name: b.served()}
    statuses: dict[str, list[int]] = {}
    with httpx.Client(timeout=30, headers=AUTH) as c:
        for i in range(2 * n):
            model = ("model-x", "model-y")[i % 2]
            r = c.post(router.url + "/v1/chat/completions",
                       json={"model": model, "messages": HELLO, "max_tokens": 4})
            statuses.setdefault(model, []).append(r.status_code)
    delta = {}
    for node in (a, b):
        after = node.served()
        delta[node.name] = {m: after.get(m, 0) - before[node.name].get(m, 0) for m in after
                            if after.get(m, 0) != before[node.name].get(m, 0)}
    ok = (delta["A"] == {"model-x": n} and delta["B"] == {"model-y": n}
          and all(s == 200 for v in statuses.values() for s in v))
    return {"ok": ok, "served": delta,
            "statuses": {m: {str(s): v.count(s) for s in set(v)} for m, v in statuses.items()}}


# ---------------------------------------------------------------- (b) latency

async def pairs(direct: str, router: Router, n: int, stream: bool) -> dict[str, float]:
    """``n`` pairs at concurrency 1, direct and through the router, order flipped every pair."""
    body = payload("model-x", "chat", stream, CHUNKS, "Say hello.", False)
    d, p, diffs = [], [], []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for i in range(n + 20):  # the first 20 warm connections up
            got = {}
            for url in ([direct, router.url] if i % 2 else [router.url, direct]):
                r = await one_request(session, url + "/v1/chat/completions", body)
                if not r.ok:
                    raise RuntimeError(f"{router.name if url == router.url else 'direct'}: {r.status} {r.error}")
                got[url] = r.ttft if stream else r.end - r.start
            if i >= 20:
                d.append(got[direct])
                p.append(got[router.url])
                diffs.append(got[router.url] - got[direct])
    return {"direct_p50_ms": 1000 * statistics.median(d), "router_p50_ms": 1000 * statistics.median(p),
            "added_p50_ms": 1000 * statistics.median(diffs),
            "direct_p99_ms": 1000 * pct(d, 99), "router_p99_ms": 1000 * pct(p, 99),
            "added_p99_ms": 1000 * (pct(p, 99) - pct(d, 99))}


def cpu_seconds(router: Router | None) -> float:
    return router.proc.cpu_seconds(router.children) if router else 0.0


def load(name: str, url: str, router: Router | None, stream: bool, requests: int,
         concurrency: int) -> dict[str, Any]:
    """One closed-loop run; latency percentiles (first chunk for streams, whole answer
    otherwise), req/s, the router's CPU seconds."""
    body = payload("model-x", "chat", stream, CHUNKS, "Say hello.", False)
    cpu0 = cpu_seconds(router)
    results, wall = asyncio.run(run_level(url + "/v1/chat/completions", lambda i: body,
                                          concurrency=concurrency, requests=requests, headers=AUTH))
    cpu = cpu_seconds(router) - cpu0
    good = [r for r in results if r.ok]
    lat = [(r.ttft if stream else r.end - r.start) for r in good]
    errors = [r for r in results if not r.ok]
    if errors:
        click.echo(f"  {name}: {len(errors)} errors, first: {errors[0].status} {errors[0].error}", err=True)
    return {"target": name, "mode": "stream" if stream else "plain", "requests": requests,
            "errors": len(errors), "req_per_s": len(good) / wall,
            "p50_ms": 1000 * pct(lat, 50) if lat else None, "p99_ms": 1000 * pct(lat, 99) if lat else None,
            "router_cpu_s": cpu if router else None,
            "cpu_s_per_1k": 1000 * cpu / max(len(good), 1) if router else None}


# ---------------------------------------------------------------- (d) errors

def error_shape(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = r.text[:200]
    err = body.get("error") if isinstance(body, dict) else None
    envelope = isinstance(err, dict) and {"message", "type"} <= set(err)
    return {"status": r.status_code, "openai_envelope": envelope,
            "type": err.get("type") if envelope else None,
            "code": err.get("code") if envelope else None,
            "param": err.get("param") if envelope else None,
            "message": (err.get("message") if envelope else json.dumps(body))[:160],
            "retry_after": r.headers.get("retry-after"),
            "x_should_retry": r.headers.get("x-should-retry")}


def probes(base: str, target: str, probe_auth: Callable[[str], tuple[str, str]]) -> dict[str, Any]:
    """The gateway's errors, one request each (the 429: the second of two on a key with rpm 1)."""
    chat = base + "/v1/chat/completions"
    out = {}
    with httpx.Client(timeout=30) as c:
        def post(key: str, body: dict[str, Any]) -> httpx.Response:
            return c.post(chat, json=body, headers={"Authorization": f"Bearer {key}"})
        key, model = probe_auth("401")
        out["401 invalid_api_key"] = error_shape(post(key, {"model": model, "messages": HELLO, "max_tokens": 4}))
        key, model = probe_auth("429")
        limited = LIMITED[target] if key == KEY and model == "model-x" and target != "litellm" else key
        body = {"model": model, "messages": HELLO, "max_tokens": 4}
        post(limited, body)
        try:  # LiteLLM retries a 429 itself, waiting out the Retry-After
            out["429 rate_limit_exceeded"] = error_shape(post(limited, body))
        except httpx.TimeoutException:
            out["429 rate_limit_exceeded"] = {"status": "no answer in 30 s", "openai_envelope": False,
                                              "type": None, "code": None, "param": None,
                                              "message": "timeout", "retry_after": None,
                                              "x_should_retry": None}
        out["400 empty messages"] = error_shape(post(KEY, {"model": "model-x", "messages": []}))
        out["400 empty messages, stream"] = error_shape(post(KEY, {"model": "model-x", "messages": [],
                                                                   "stream": True}))
        out["404 unknown model"] = error_shape(post(KEY, {"model": "no-such-model", "messages": HELLO}))
    return out


def same(direct: dict[str, Any], routed: dict[str, Any]) -> str:
    """``same``, or what differs (status, code, param, Retry-After)."""
    diff = [k for k in ("status", "code", "param", "retry_after") if direct[k] != routed[k]]
    return "same" if not diff else "differs: " + ", ".join(f"{k} {direct[k]!r}→{routed[k]!r}" for k in diff)


# ---------------------------------------------------------------- (c) a node stops

async def failover(routers: list[Router], b: Node, down_s: float, recover_s: float) -> dict[str, Any]:
    """Load through every router at once (per router two model-x and two model-y loops, 20 ms
    apart); SIGTERM to node B; ``down_s`` seconds later B starts again on its port; until every
    router serves model-y again or ``recover_s`` passes."""
    log: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    health: dict[str, list[tuple[float, bool]]] = {r.name: [] for r in routers}
    stop = asyncio.Event()
    recovered: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=10)

    async def loop(session: aiohttp.ClientSession, r: Router, model: str) -> None:
        body = {"model": model, "messages": HELLO, "max_tokens": 4}
        while not stop.is_set():
            t0 = time.monotonic()
            status, err = 0, ""
            try:
                async with session.post(r.url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
                    status = resp.status
                    text = await resp.text()
                    if status != 200:
                        err = text[:160]
            except asyncio.TimeoutError:
                err = "timeout (10 s)"
            except aiohttp.ClientError as exc:
                err = f"{exc.__class__.__name__}: {exc}"[:160]
            t1 = time.monotonic()
            log.append({"router": r.name, "model": model, "t0": t0, "t1": t1, "status": status, "error": err})
            if (model == "model-y" and status == 200 and "up" in marks and t0 >= marks["up"]
                    and r.name not in recovered):
                recovered[r.name] = t1 - marks["up"]
            await asyncio.sleep(0.02)

    async def watch_health() -> None:
        while not stop.is_set():
            for r in routers:
                if r.health:
                    try:
                        h = await asyncio.to_thread(r.health)
                        health[r.name].append((time.monotonic(), h.get(b.url, False)))
                    except (httpx.HTTPError, KeyError, ValueError):
                        pass
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(headers=AUTH, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(loop(session, r, m)) for r in routers
                 for m in ("model-x", "model-x", "model-y", "model-y")]
        tasks.append(asyncio.create_task(watch_health()))
        await asyncio.sleep(1.0)
        marks["sigterm"] = time.monotonic()
        await asyncio.to_thread(b.stop)  # SIGTERM, then waits for the process to end
        marks["exited"] = time.monotonic()
        await asyncio.sleep(down_s)
        marks["restart"] = time.monotonic()
        await asyncio.to_thread(b.start)
        marks["up"] = time.monotonic()
        deadline = marks["up"] + recover_s
        while time.monotonic() < deadline and len(recovered) < len(routers):
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)

    out: dict[str, Any] = {"b_exit_after_sigterm_s": marks["exited"] - marks["sigterm"],
                           "b_down_s": marks["up"] - marks["exited"], "routers": {}}
    for r in routers:
        mine = [x for x in log if x["router"] == r.name]
        x_after = [x for x in mine if x["model"] == "model-x" and x["t0"] >= marks["sigterm"]]
        y_down = [x for x in mine if x["model"] == "model-y" and marks["exited"] <= x["t0"] < marks["restart"]]
        kinds: dict[str, dict[str, Any]] = {}
        for x in y_down:
            k = f"{x['status'] or 'no answer'} {re.sub(r'[0-9]{3,}', 'N', x['error'])[:90]}".strip()
            e = kinds.setdefault(k, {"count": 0, "first_s": round(x["t0"] - marks["exited"], 2)})
            e["count"] += 1
        lat = [x["t1"] - x["t0"] for x in y_down]
        unhealthy = next((t - marks["exited"] for t, ok in health[r.name] if t >= marks["exited"] and not ok), None)
        out["routers"][r.name] = {
            "model_x_after_sigterm": len(x_after),
            "model_x_failed": sum(1 for x in x_after if x["status"] != 200),
            "model_y_while_down": len(y_down),
            "model_y_ok_while_down": sum(1 for x in y_down if x["status"] == 200),
            "model_y_answers_while_down": kinds,
            "model_y_latency_while_down_ms": {"p50": 1000 * pct(lat, 50) if lat else None,
                                              "max": 1000 * max(lat) if lat else None},
            "hung_over_5s": sum(1 for x in lat if x > 5),
            "marked_unhealthy_after_s": unhealthy,
            "serves_model_y_again_after_restart_s": recovered.get(r.name),
        }
    return out


# ---------------------------------------------------------------- report

def markdown(meta: dict[str, Any], res: dict[str, Any]) -> str:
    names = list(res["routers"])
    lines = [f"# Routers in front of two vramgate nodes ({meta['machine']['date']})", "",
             f"Machine: {meta['machine']['cores']} cores ({meta['machine']['cpu']}), "
             f"{meta['machine']['ram_gib']} GiB, Python {meta['machine']['python']}. Nodes: two vramgate "
             "gateways on instant engines (node A `model-x`, node B `model-y`), API keys on. "
             f"{meta['pairs']} pairs at concurrency 1; {meta['requests']} requests × {meta['rounds']} rounds "
             "at concurrency 32.", "",
             "## (a) routing by `model`, (e) footprint", "",
             "| router | version | routes by model | install MiB | install s | startup s | RSS idle MiB | RSS peak MiB | CPU s per 1k req (plain / stream) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        x = res["routers"][n]
        cpu = " / ".join(f"{v:.2f}" if v is not None else "–" for v in x.get("cpu_s_per_1k", []))
        inst = x["install"]
        lines.append(f"| {n} | {inst['version']} | {'yes' if x['routing']['ok'] else 'NO'} {x['routing']['served']} | "
                     f"{inst['size_mib']} | {inst['install_s'] or '–'} | {x['startup_s']:.1f} | "
                     f"{x['rss_idle_mib']:.0f} | {x['rss_peak_mib']:.0f} | {cpu} |")
    lines += ["", "## (b) added latency against node A directly (ms)", "",
              "Concurrency 1: p50 = median of paired differences; p99 = p99 through the router − p99 direct. "
              "Concurrency 32: medians over the rounds of (router − direct) in the same round. Plain: whole "
              "answer; stream: first chunk.", "",
              "| router | mode | c1 p50 | c1 p99 | c32 p50 | c32 p99 | c32 req/s (direct) |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        for mode in ("plain", "stream"):
            c1 = res["routers"][n]["pairs"][mode]
            c32 = res["routers"][n]["c32"][mode]
            lines.append(f"| {n} | {mode} | **{c1['added_p50_ms']:.2f}** | {c1['added_p99_ms']:.2f} | "
                         f"**{c32['added_p50_ms']:.2f}** | {c32['added_p99_ms']:.2f} | "
                         f"{c32['req_per_s']:.0f} ({c32['direct_req_per_s']:.0f}) |")
    lines += ["", "## (c) node B stopped (SIGTERM) under load, then started again", "",
              f"B exited {res['failover']['b_exit_after_sigterm_s']:.2f} s after SIGTERM and stayed down "
              f"{res['failover']['b_down_s']:.1f} s.", "",
              "| router | model-x after SIGTERM (failed) | model-y while B down: answers (first at +s) | p50 / max ms | hung > 5 s | marked unhealthy after | model-y served again after restart |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        f = res["failover"]["routers"][n]
        kinds = "; ".join(f"{k} ×{v['count']} (+{v['first_s']})" for k, v in f["model_y_answers_while_down"].items())
        lat = f["model_y_latency_while_down_ms"]
        fmt = lambda v: f"{v:.1f}" if v is not None else "–"  # noqa: E731
        unhealthy = f"{f['marked_unhealthy_after_s']:.1f} s" if f["marked_unhealthy_after_s"] is not None else "– (no health view)"
        again = f"{f['serves_model_y_again_after_restart_s']:.2f} s" if f["serves_model_y_again_after_restart_s"] is not None else "not within the wait"
        lines.append(f"| {n} | {f['model_x_after_sigterm']} ({f['model_x_failed']}) | {kinds} | {fmt(lat['p50'])} / {fmt(lat['max'])} | "
                     f"{f['hung_over_5s']} | {unhealthy} | {again} |")
    lines += ["", "## (d) the gateway's errors through the router", "",
              "| probe | direct | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for probe, d in res["errors"]["direct"].items():
        cells = []
        for n in names:
            r = res["errors"][n][probe]
            cells.append(f"{r['status']} `{r['code']}` RA={r['retry_after']}: {same(d, r)}")
        lines.append(f"| {probe} | {d['status']} `{d['code']}` param={d['param']} RA={d['retry_after']} | " + " | ".join(cells) + " |")
    lines += ["", "Messages through each router (what a client reads):", ""]
    for n in names:
        for probe, r in res["errors"][n].items():
            lines.append(f"- {n}, {probe}: {r['status']} {json.dumps(r['message'])}")
    lines += ["", "## Command lines", ""] + [f"- {n}: `{res['routers'][n]['command']}`" for n in names]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--pairs", "npairs", type=click.IntRange(1), default=300, show_default=True,
              help="Request pairs per router and mode at concurrency 1.")
@click.option("--requests", type=click.IntRange(1), default=1000, show_default=True,
              help="Requests per run at concurrency 32.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--down", "down_s", type=float, default=8.0, show_default=True,
              help="Seconds node B stays down.")
@click.option("--recover-timeout", type=float, default=90.0, show_default=True)
@click.option("--only", default=",".join(STARTERS), show_default=True, help="Routers to measure.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "loadtest" / "results" / "routers",
              show_default=True)
def main(npairs: int, requests: int, rounds: int, down_s: float, recover_timeout: float, only: str,
         out: Path) -> None:
    """vllm-router, LiteLLM's proxy and production-stack's router in front of the same two
    vramgate nodes, in one run."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    for n in names:
        if n not in STARTERS:
            raise click.BadParameter(f"unknown router {n!r} (one of {', '.join(STARTERS)})")
    installs = {n: ensure(n) for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-routers-"))
    a, b = Node(tmp, "A", "model-x"), Node(tmp, "B", "model-y")
    routers: list[Router] = []
    res: dict[str, Any] = {"routers": {}, "errors": {}}
    try:
        a.start()
        b.start()
        for n in names:
            r = STARTERS[n](tmp, a, b)
            r.install = installs[n]
            routers.append(r)
            click.echo(f"{n}: up in {r.startup_s:.1f} s", err=True)
        time.sleep(1.0)  # let the routers' start-up work (health checks, scrapes) settle before RSS
        for r in routers:
            res["routers"][r.name] = {"install": r.install, "command": r.command, "startup_s": r.startup_s,
                                      "rss_idle_mib": r.rss() / 2**20, "routing": routing(r, a, b)}
            click.echo(f"{r.name}: routing {res['routers'][r.name]['routing']}", err=True)
        res["errors"]["direct"] = probes(a.url, "direct", direct_auth)
        for r in routers:
            res["errors"][r.name] = probes(r.url, r.name, r.probe_auth)
        with RssSampler(routers):
            for r in routers:
                res["routers"][r.name]["pairs"] = {}
                for stream in (False, True):
                    p = asyncio.run(pairs(a.url, r, npairs, stream))
                    res["routers"][r.name]["pairs"]["stream" if stream else "plain"] = p
                    click.echo(f"{r.name:17s} {'stream' if stream else 'plain ':6s} c1 adds p50 "
                               f"{p['added_p50_ms']:.2f} ms, p99 {p['added_p99_ms']:.2f} ms", err=True)
            rows = []
            for rnd in range(rounds):
                for stream in (False, True):
                    for r in [None, *routers]:
                        row = load(r.name if r else "direct", r.url if r else a.url, r, stream, requests, 32)
                        row["round"] = rnd + 1
                        rows.append(row)
                        click.echo(f"round {rnd + 1} {row['target']:17s} {row['mode']:6s} "
                                   f"p50 {row['p50_ms'] or 0:.2f} ms p99 {row['p99_ms'] or 0:.2f} ms "
                                   f"{row['req_per_s']:.0f} req/s err {row['errors']}", err=True)
        res["c32_rows"] = rows
        for r in routers:
            res["routers"][r.name]["rss_peak_mib"] = r.peak_rss / 2**20
            res["routers"][r.name]["c32"] = {}
            cpu = []
            for mode in ("plain", "stream"):
                mine = [x for x in rows if x["target"] == r.name and x["mode"] == mode]
                direct = {x["round"]: x for x in rows if x["target"] == "direct" and x["mode"] == mode}
                res["routers"][r.name]["c32"][mode] = {
                    "added_p50_ms": statistics.median(x["p50_ms"] - direct[x["round"]]["p50_ms"] for x in mine),
                    "added_p99_ms": statistics.median(x["p99_ms"] - direct[x["round"]]["p99_ms"] for x in mine),
                    "req_per_s": statistics.median(x["req_per_s"] for x in mine),
                    "direct_req_per_s": statistics.median(d["req_per_s"] for d in direct.values()),
                    "errors": sum(x["errors"] for x in mine)}
                cpu.append(statistics.median(x["cpu_s_per_1k"] for x in mine))
            res["routers"][r.name]["cpu_s_per_1k"] = cpu
        res["failover"] = asyncio.run(failover(routers, b, down_s, recover_timeout))
        meta = {"machine": machine(), "pairs": npairs, "requests": requests, "rounds": rounds,
                "specs": {n: SPECS[n] for n in names}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, **res}, indent=2, default=str))
        text = markdown(meta, res)
        out.with_suffix(".md").write_text(text)
        click.echo("\n" + text)
    finally:
        for p in [r.proc for r in reversed(routers)]:
            p.stop()
        b.stop()
        a.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop every child
    main()
