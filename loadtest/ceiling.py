"""Gateway ceiling: how many requests/s and streamed chunks/s the gateway sustains per core, and
what it adds to one request, side by side with LiteLLM's proxy and with the floor (the least a
Python proxy can do: ``loadtest/floor_proxy.py``), each in front of an engine that answers at once.

    python -m loadtest.ceiling [--requests 2000] [--concurrency 32] [--rounds 2] [--pairs 300]

LiteLLM's proxy is installed in its own virtualenv (``loadtest/.venv-litellm``, once, by this
script). Each proxy gets its own instant engine (``loadtest/instant_engine.py``, 16 chunks a
stream). vramgate talks to its engine over a Unix socket, its default (``engine_transport``); the
direct path to that engine is a loopback port it also listens on (``INSTANT_TCP_PORT``). The floor
and LiteLLM reach theirs over loopback TCP, as a baseline checkout of vramgate older than the
sockets does. Two phases:

1. Added latency at concurrency 1: ``--pairs`` pairs of identical requests, the engine directly and
   through the proxy, order flipped every pair and the targets taking turns pair by pair (so a
   drift in the machine's speed falls on all alike); the median of the per-pair differences (time to
   the whole answer, and to the first chunk of a stream), and the whole answer again with
   ``--body-kb`` KiB of source code as context (IDE agents send 50–500 KB a request).
2. Throughput: ``--requests`` at ``--concurrency``, targets alternating within each round so that
   machine noise hits all alike, and the order turned by one each round, after an unmeasured
   warm-up of each target (up to 2,000 requests of each mode). "Per core" = answered
   requests ÷ CPU seconds the proxy's process tree used during the run (user + system, psutil):
   the load generator and the engines are not counted, so the figure holds on a machine where
   they share the cores.

Prints the tables and the ratios; writes ``loadtest/results/ceiling.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import click

from loadtest.loadgen import machine, one_request, payload, run_level, summarize
from loadtest.procs import ROOT, Proc, drop_scratch, engine_url, free_port, instant_direct, start_gateway, venv_version, \
    wait_http

LITELLM_VENV = Path(os.environ.get("LITELLM_VENV", ROOT / "loadtest" / ".venv-litellm"))
LITELLM_SPEC = os.environ.get("LITELLM_SPEC", "litellm[proxy]")
CHUNKS = 16
KEY = "sk-bench-0123456789abcdef0123456789abcdef"  # both proxies check a key (LiteLLM refuses to start without one)
AUTH = {"Authorization": f"Bearer {KEY}"}


def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own virtualenv (its dependencies never touch ours); its ``litellm``."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        click.echo(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (once) ...", err=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True)
    return exe


def litellm_version() -> str:
    return venv_version(LITELLM_VENV, "litellm")


def start_litellm(tmp: Path, procs: list[Proc]) -> tuple[Proc, str, str]:
    """An instant engine and LiteLLM's proxy (one worker) in front of it (both added to
    ``procs``): the proxy, the engine's URL and the proxy's."""
    exe = ensure_litellm()
    direct = start_engine(tmp, "litellm", procs)
    pport = free_port()
    cfg = {"model_list": [{"model_name": "instant", "litellm_params": {
        "model": "openai/instant", "api_base": f"{direct}/v1", "api_key": "none"}}],
        "general_settings": {"master_key": KEY}}
    (tmp / "litellm.yaml").write_text(json.dumps(cfg))
    proxy = Proc([str(exe), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                  "--port", str(pport), "--num_workers", "1"], tmp / "litellm.log",
                 env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                      "LITELLM_LOG": "ERROR"})
    procs.append(proxy)
    wait_http(f"http://127.0.0.1:{pport}/health/liveliness", proxy, 180, headers=AUTH)
    return proxy, direct, f"http://127.0.0.1:{pport}"


def start_engine(tmp: Path, name: str, procs: list[Proc], uds: Path | None = None) -> str:
    """An instant engine on a free port (added to ``procs`` at once, so it is stopped whatever
    happens next), and on the Unix socket ``uds`` too if given; its port's URL."""
    port = free_port()
    where = ["--uds", str(uds)] if uds else ["--port", str(port)]
    engine = Proc([sys.executable, "-m", "loadtest.instant_engine", "--model", "instant",
                   "--served-model-name", "instant", *where], tmp / f"{name}-engine.log",
                  env={"INSTANT_CHUNKS": str(CHUNKS), "INSTANT_TCP_PORT": str(port)})
    procs.append(engine)
    wait_http(f"http://127.0.0.1:{port}/health", engine, 30)
    return f"http://127.0.0.1:{port}"


def start_floor(tmp: Path, procs: list[Proc], uds: bool = False) -> tuple[Proc, str, str]:
    """An instant engine and the floor proxy in front of it (both added to ``procs``): the proxy,
    the engine's URL (its loopback port) and the proxy's. With ``uds`` the proxy reaches the
    engine over a Unix socket, as the gateway does by default."""
    name = "floor-uds" if uds else "floor"
    sock = tmp / "floor-engine.sock" if uds else None
    direct = start_engine(tmp, name, procs, uds=sock)
    port = free_port()
    upstream = ["--upstream-uds", str(sock)] if sock else ["--upstream", direct]
    proxy = Proc([sys.executable, "-m", "loadtest.floor_proxy", *upstream,
                  "--port", str(port)], tmp / f"{name}.log")
    procs.append(proxy)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proxy, 30)
    return proxy, direct, f"http://127.0.0.1:{port}"


def baseline_direct(gateway_url: str, side_port_url: str) -> str:
    """The direct URL of a baseline gateway's engine: its loopback port (a commit older than the
    Unix sockets), else the side port beside its socket."""
    try:
        return engine_url(gateway_url, "instant", AUTH)
    except RuntimeError:  # it listens on a socket: the side port is the direct path
        return side_port_url


def context(kb: int) -> str:
    """About ``kb`` KiB of source code as a prompt: what an IDE agent sends as context (quotes and
    newlines, so JSON has escapes to decode)."""
    unit = 'def area(w, h):\n    """The area, in "square units"."""\n    return w * h\n\n'
    return (unit * (kb * 1024 // len(unit) + 1))[:kb * 1024]


async def added_latency(targets: list[tuple[str, str, str]], pairs: int, stream: bool,
                        prompt: str = "Say hello.") -> dict[str, dict[str, float]]:
    """Per target ``(name, direct URL, proxy URL)``: the median per-pair difference proxy − direct
    (seconds) at concurrency 1, with both medians. The targets take turns pair by pair (the
    order turned each time, direct and proxy flipped every pair), so a drift in the machine's
    speed over the phase falls on every target alike."""
    body = payload("instant", "chat", stream, CHUNKS, prompt, False)
    diffs: dict[str, list[float]] = {t: [] for t, _, _ in targets}
    d: dict[str, list[float]] = {t: [] for t, _, _ in targets}
    p: dict[str, list[float]] = {t: [] for t, _, _ in targets}
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for i in range(pairs + 20):  # the first 20 pairs warm connections up
            turn = i % len(targets)
            for target, direct, proxy in targets[turn:] + targets[:turn]:
                got = {}
                for url in ([direct, proxy] if i % 2 else [proxy, direct]):
                    r = await one_request(session, url + "/v1/chat/completions", body)
                    if not r.ok:
                        raise RuntimeError(f"{url}: {r.status} {r.error}")
                    got[url] = r.ttft if stream else r.end - r.start
                if i >= 20:
                    diffs[target].append(got[proxy] - got[direct])
                    d[target].append(got[direct])
                    p[target].append(got[proxy])
    return {t: {"added_s": statistics.median(diffs[t]), "direct_s": statistics.median(d[t]),
                "proxy_s": statistics.median(p[t])} for t in diffs}


def warm_up(url: str, stream: bool, requests: int, concurrency: int) -> None:
    """``requests`` at ``concurrency``, not measured: the first run at a concurrency opens the
    proxy's connections to its engine and warms its caches, which the measured runs should not
    pay for in the first round only."""
    body = payload("instant", "chat", stream, CHUNKS, "Say hello.", False)
    asyncio.run(run_level(url + "/v1/chat/completions", lambda i: body, concurrency=concurrency,
                          requests=requests, headers=AUTH))


def measure(target: str, url: str, proc: Proc, children: bool, stream: bool, requests: int,
            concurrency: int) -> dict[str, Any]:
    """One run: the load, the proxy's CPU seconds, the row."""
    body = payload("instant", "chat", stream, CHUNKS, "Say hello.", False)
    cpu0 = proc.cpu_seconds(children)
    results, wall = asyncio.run(run_level(url + "/v1/chat/completions", lambda i: body,
                                          concurrency=concurrency, requests=requests,
                                          headers=AUTH))
    cpu = proc.cpu_seconds(children) - cpu0
    row = summarize(results, wall, target=target, mode="stream" if stream else "plain",
                    concurrency=concurrency)
    ok = requests - row["errors"]
    row.update(cpu_s=cpu, req_per_core_s=ok / cpu if cpu > 0 else None,
               chunks_per_s=ok * CHUNKS / wall if stream else None,
               chunks_per_core_s=ok * CHUNKS / cpu if stream and cpu > 0 else None)
    errors = [r.error for r in results if r.error]
    if errors:
        click.echo(f"  {target}: {len(errors)} errors, first: {errors[0]}", err=True)
    return row


def latency_phase(targets: list[tuple[str, str, str]], pairs: int,
                  body_kb: tuple[int, ...]) -> list[dict[str, Any]]:
    """Added latency of each ``(target, direct URL, proxy URL)``: plain and streamed with a short
    prompt, then plain with each of ``body_kb`` KiB of context."""
    cases = [(False, "Say hello.", "plain (whole answer)"), (True, "Say hello.", "stream (first chunk)")]
    cases += [(False, context(kb), f"plain, {kb} KB body") for kb in body_kb]
    latency = []
    for stream, prompt, mode in cases:
        for target, lat in asyncio.run(added_latency(targets, pairs, stream, prompt)).items():
            lat.update(target=target, mode=mode)
            latency.append(lat)
            click.echo(f"{target:9s} {mode:22s} adds {lat['added_s'] * 1000:7.3f} ms "
                       f"(direct {lat['direct_s'] * 1000:.3f} ms, through it {lat['proxy_s'] * 1000:.3f} ms)")
    return latency


def added_ratios(latency: list[dict[str, Any]], other: str) -> dict[str, float]:
    """vramgate's added latency ÷ ``other``'s, per request kind (the goal: at most 1.5× the
    floor's for 64 and 512 KB bodies, issue #15)."""
    by = {(x["target"], x["mode"]): x["added_s"] for x in latency}
    return {f"{mode}: added latency, vramgate ÷ {other}": by[("vramgate", mode)] / by[(other, mode)]
            for (target, mode) in by if target == other and by[(other, mode)] > 0
            and ("vramgate", mode) in by}


def table(rows: list[dict[str, Any]]) -> str:
    head = "| target | mode | req | err | req/s | proxy CPU s | req/s per core | chunks/s per core | p50 ms |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        chunks = f"{r['chunks_per_core_s']:.0f}" if r.get("chunks_per_core_s") else ""
        head += (f"| {r['target']} | {r['mode']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.0f} | "
                 f"{r['cpu_s']:.1f} | {r['req_per_core_s'] or 0:.0f} | {chunks} | "
                 f"{(r['e2e_p50_s'] or 0) * 1000:.1f} |\n")
    return head


def ratios(rows: list[dict[str, Any]], other: str) -> dict[str, float]:
    """vramgate ÷ ``other`` per mode, summed over rounds: requests per core and req/s."""
    out = {}
    for mode in ("plain", "stream"):
        mine = {t: [r for r in rows if r["target"] == t and r["mode"] == mode] for t in ("vramgate", other)}
        if not mine[other]:
            continue

        def per_core(t: str) -> float:
            ok = sum(r["requests"] - r["errors"] for r in mine[t])
            return ok / max(sum(r["cpu_s"] for r in mine[t]), 1e-9)

        out[f"{mode}: req/s per core, vramgate ÷ {other}"] = per_core("vramgate") / per_core(other)
        out[f"{mode}: req/s, vramgate ÷ {other}"] = (sum(r["req_per_s"] for r in mine["vramgate"])
                                                    / sum(r["req_per_s"] for r in mine[other]))
    return out


@click.command()
@click.option("--requests", type=click.IntRange(1), default=2000, show_default=True,
              help="Requests per run.")
@click.option("--concurrency", type=click.IntRange(1), default=32, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--pairs", type=click.IntRange(1), default=300, show_default=True,
              help="Request pairs for the added-latency phase.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "loadtest" / "results" / "ceiling",
              show_default=True)
@click.option("--baseline", metavar="COMMIT", default=None,
              help="Also run the gateway of this commit (a git worktree), side by side.")
@click.option("--litellm/--no-litellm", default=True, show_default=True,
              help="Include LiteLLM's proxy (the slowest target by far).")
@click.option("--body-kb", default="64,512", show_default=True,
              help="Context sizes (KiB, comma list; empty: none) for large-body added latency.")
def main(requests: int, concurrency: int, rounds: int, pairs: int, out: Path, baseline: str | None,
         litellm: bool, body_kb: str) -> None:
    """vramgate's gateway against LiteLLM's proxy and the floor proxy (and, with ``--baseline``,
    an earlier vramgate), in one run."""
    sizes = tuple(int(k) for k in body_kb.split(",") if k.strip())
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-ceiling-"))
    procs: list[Proc] = []
    worktree = tmp / "baseline"
    try:
        model = {"name": "instant", "path": "instant", "preload": True, "max_concurrency": 4096,
                 "max_queue": 4096}
        config = {"engine_module": "loadtest.instant_engine", "api_keys": [KEY], "models": [model]}
        direct = instant_direct(model)  # beside the Unix socket the gateway talks to it over
        gw, gw_url = start_gateway(config, tmp / "gw", ready_timeout=60)
        procs.append(gw)
        targets = [("vramgate", direct, gw_url, gw, False)]
        if baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree),
                           baseline], check=True, capture_output=True)
            old_model = {k: v for k, v in model.items() if k != "engine_env"}
            old_direct = instant_direct(old_model)  # ignored by a commit older than the sockets
            old, old_url = start_gateway({**config, "models": [old_model]}, tmp / "gw-baseline",
                                         ready_timeout=60, cwd=worktree)
            procs.append(old)
            targets.append((f"vramgate@{baseline}", baseline_direct(old_url, old_direct), old_url,
                            old, False))
        floor, f_direct, f_url = start_floor(tmp, procs)
        targets.append(("floor", f_direct, f_url, floor, False))
        if litellm:
            proxy, l_direct, l_url = start_litellm(tmp, procs)
            targets.append(("litellm", l_direct, l_url, proxy, True))

        latency = latency_phase([(t, d, u) for t, d, u, _, _ in targets], pairs, sizes)
        for _, _, url, _, _ in targets:  # unmeasured: the engine connection pools grow to size
            for stream in (False, True):
                warm_up(url, stream, min(requests, 2000), concurrency)
        rows = []
        for rnd in range(rounds):
            for stream in (False, True):
                turn = rnd % len(targets)  # each target goes first in some round: no order bias
                for target, _, url, proc, children in targets[turn:] + targets[:turn]:
                    row = measure(target, url, proc, children, stream, requests, concurrency)
                    row["round"] = rnd + 1
                    rows.append(row)
                    click.echo(table([row]).splitlines()[-1])
        r = {**ratios(rows, "litellm"), **ratios(rows, "floor"), **added_ratios(latency, "floor"),
             **(ratios(rows, f"vramgate@{baseline}") if baseline else {})}
        meta = {"machine": machine(), "litellm": litellm_version() if litellm else None,
                "baseline": baseline, "chunks_per_stream": CHUNKS,
                "requests": requests, "concurrency": concurrency, "rounds": rounds, "pairs": pairs,
                "body_kb": sizes,
                "latency": latency, "ratios": r}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        lat_table = ("| proxy | request | added ms (median of pairs) | direct ms | through the proxy ms |\n"
                     "|---|---|---|---|---|\n" + "".join(
                         f"| {x['target']} | {x['mode']} | **{x['added_s'] * 1000:.3f}** | "
                         f"{x['direct_s'] * 1000:.3f} | {x['proxy_s'] * 1000:.3f} |\n" for x in latency))
        text = (f"Added latency at concurrency 1 ({pairs} pairs):\n\n{lat_table}\n"
                f"Throughput at concurrency {concurrency}:\n\n{table(rows)}\n"
                + "\n".join(f"- {k}: **{v:.2f}×**" for k, v in r.items()) + "\n")
        out.with_suffix(".md").write_text(f"# Gateway ceiling (LiteLLM {meta['litellm']})\n\n" + text)
        click.echo("\n" + text)
        click.echo(f"machine: {meta['machine']}")
    finally:
        for p in reversed(procs):
            p.stop()
        if worktree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
        drop_scratch(tmp)


if __name__ == "__main__":
    main()
