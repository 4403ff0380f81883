"""Gateway ceiling: how many requests/s and streamed chunks/s the gateway sustains per core, side by
side with LiteLLM's proxy, both in front of an engine that answers at once.

    python -m loadtest.ceiling [--requests 2000] [--concurrency 32] [--rounds 2]

LiteLLM's proxy is installed in its own virtualenv (``loadtest/.venv-litellm``, once, by this
script). Each proxy gets its own instant engine (``loadtest/instant_engine.py``, 16 chunks a
stream). Targets alternate within each round (vramgate, LiteLLM, vramgate, ...) so machine noise
hits both alike. "Per core" = answered requests ÷ CPU seconds the proxy process tree used during
the run (user + system, psutil): the load generator and the engines are not counted, so the figure
holds on a machine where they share the cores. Prints the table and the ratios; writes
``loadtest/results/ceiling.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from loadtest.loadgen import machine, payload, run_level, summarize
from loadtest.procs import ROOT, Proc, free_port, start_gateway, wait_http

LITELLM_VENV = Path(os.environ.get("LITELLM_VENV", ROOT / "loadtest" / ".venv-litellm"))
LITELLM_SPEC = os.environ.get("LITELLM_SPEC", "litellm[proxy]")
CHUNKS = 16


def ensure_litellm() -> Path:
    """LiteLLM's proxy in its own virtualenv (its dependencies never touch ours); its ``litellm``."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        click.echo(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (once) ...", err=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_SPEC], check=True)
    return exe


def litellm_version() -> str:
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def start_litellm(tmp: Path) -> tuple[Proc, Proc, str]:
    """An instant engine and LiteLLM's proxy (one worker) in front of it."""
    exe = ensure_litellm()
    eport, pport = free_port(), free_port()
    engine = Proc([sys.executable, "-m", "loadtest.instant_engine", "--model", "instant",
                   "--served-model-name", "instant", "--port", str(eport)], tmp / "litellm-engine.log",
                  env={"INSTANT_CHUNKS": str(CHUNKS)})
    wait_http(f"http://127.0.0.1:{eport}/health", engine, 30)
    cfg = {"model_list": [{"model_name": "instant", "litellm_params": {
        "model": "openai/instant", "api_base": f"http://127.0.0.1:{eport}/v1", "api_key": "none"}}]}
    (tmp / "litellm.yaml").write_text(json.dumps(cfg))
    proxy = Proc([str(exe), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                  "--port", str(pport), "--num_workers", "1"], tmp / "litellm.log",
                 env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                      "LITELLM_LOG": "ERROR"})
    wait_http(f"http://127.0.0.1:{pport}/health/liveliness", proxy, 180)
    return engine, proxy, f"http://127.0.0.1:{pport}"


def measure(target: str, url: str, proc: Proc, children: bool, stream: bool, requests: int,
            concurrency: int) -> dict[str, Any]:
    """One run: the load, the proxy's CPU seconds, the row."""
    body = payload("instant", "chat", stream, CHUNKS, "Say hello.", False)
    cpu0 = proc.cpu_seconds(children)
    results, wall = asyncio.run(run_level(url + "/v1/chat/completions", lambda i: body,
                                          concurrency=concurrency, requests=requests))
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


def table(rows: list[dict[str, Any]]) -> str:
    head = "| target | mode | req | err | req/s | proxy CPU s | req/s per core | chunks/s per core | p50 ms |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        chunks = f"{r['chunks_per_core_s']:.0f}" if r.get("chunks_per_core_s") else ""
        head += (f"| {r['target']} | {r['mode']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.0f} | "
                 f"{r['cpu_s']:.1f} | {r['req_per_core_s'] or 0:.0f} | {chunks} | "
                 f"{(r['e2e_p50_s'] or 0) * 1000:.1f} |\n")
    return head


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """vramgate ÷ LiteLLM per mode, summed over rounds: requests per core, chunks per core, req/s."""
    out = {}
    for mode in ("plain", "stream"):
        def total(target: str, key: str) -> float:
            return sum(r[key] or 0 for r in rows if r["target"] == target and r["mode"] == mode)

        def per_core(target: str) -> float:
            ok = sum(r["requests"] - r["errors"] for r in rows if r["target"] == target and r["mode"] == mode)
            return ok / max(total(target, "cpu_s"), 1e-9)

        if per_core("litellm"):
            out[f"{mode}: req/s per core, vramgate ÷ litellm"] = per_core("vramgate") / per_core("litellm")
        n = sum(1 for r in rows if r["target"] == "litellm" and r["mode"] == mode)
        if n and total("litellm", "req_per_s"):
            out[f"{mode}: req/s, vramgate ÷ litellm"] = total("vramgate", "req_per_s") / total("litellm", "req_per_s")
    return out


@click.command()
@click.option("--requests", type=click.IntRange(1), default=2000, show_default=True,
              help="Requests per run.")
@click.option("--concurrency", type=click.IntRange(1), default=32, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "loadtest" / "results" / "ceiling",
              show_default=True)
def main(requests: int, concurrency: int, rounds: int, out: Path) -> None:
    """vramgate's gateway ceiling against LiteLLM's proxy, per core, in one run."""
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-ceiling-"))
    procs: list[Proc] = []
    try:
        gw, gw_url = start_gateway({"engine_module": "loadtest.instant_engine", "models": [
            {"name": "instant", "path": "instant", "preload": True, "max_concurrency": 4096,
             "max_queue": 4096}]}, tmp / "gw", ready_timeout=60)
        procs.append(gw)
        engine, proxy, ll_url = start_litellm(tmp)
        procs += [engine, proxy]
        rows = []
        for rnd in range(rounds):
            for stream in (False, True):
                for target, url, proc, children in (("vramgate", gw_url, gw, False),
                                                    ("litellm", ll_url, proxy, True)):
                    row = measure(target, url, proc, children, stream, requests, concurrency)
                    row["round"] = rnd + 1
                    rows.append(row)
                    click.echo(table([row]).splitlines()[-1])
        r = ratios(rows)
        meta = {"machine": machine(), "litellm": litellm_version(), "chunks_per_stream": CHUNKS,
                "requests": requests, "concurrency": concurrency, "rounds": rounds, "ratios": r}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        text = table(rows) + "\n" + "\n".join(f"- {k}: **{v:.1f}×**" for k, v in r.items()) + "\n"
        out.with_suffix(".md").write_text(f"# Gateway ceiling (LiteLLM {meta['litellm']})\n\n" + text)
        click.echo("\n" + text)
        click.echo(f"machine: {meta['machine']}")
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
