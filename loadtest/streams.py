"""Scale of concurrency: N streams open through the gateway at once, on the instant engine.

    python -m loadtest.streams [--levels 1000,5000] [--chunks 64]

The gateway serves one model on the instant engine (``loadtest/instant_engine.py``) with 64 chunks
a stream and ``INSTANT_HOLD=1``: every stream stops after its first chunk until the benchmark
releases them. So for each level:

1. N streamed chat requests are sent at once (one aiohttp client, no connection limit);
2. once the engine holds all N (``GET /held``), the gateway's RSS, open file descriptors and
   in-flight gauge are read: N streams are open through it, mid-answer;
3. ``POST /release`` lets them finish; every answer must be complete and byte-exact (the same
   bytes as one stream read from the engine directly).

Printed and written to ``loadtest/results/streams.{json,md}``: errors, byte-exact answers, seconds
until all were open and until all had finished, the gateway's RSS idle and with N open (and per
open stream), its file descriptors, and its CPU seconds for the level.
"""

from __future__ import annotations

import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import click
import httpx
import psutil

from loadtest.loadgen import machine, write_results
from loadtest.procs import ROOT, instant_direct, start_gateway

KEY = "sk-streams-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "instant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
        "stream": True}


async def one_stream(session: aiohttp.ClientSession, url: str,
                     headers: dict[str, str]) -> tuple[int, bytes, str]:
    """POST one stream and read all of it: (status, body bytes, error text or '')."""
    try:
        async with session.post(url + "/v1/chat/completions", json=BODY, headers=headers) as resp:
            return resp.status, await resp.read(), ""
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        return 0, b"", f"{type(exc).__name__}: {exc}"[:200]


async def held(session: aiohttp.ClientSession, engine: str) -> int:
    async with session.get(engine + "/held") as resp:
        return (await resp.json())["held"]


async def release(session: aiohttp.ClientSession, engine: str) -> None:
    async with session.post(engine + "/release") as resp:
        await resp.read()


async def reference(session: aiohttp.ClientSession, engine: str) -> bytes:
    """One stream read from the engine directly: the bytes every answer must have."""
    task = asyncio.ensure_future(one_stream(session, engine, {}))
    while await held(session, engine) < 1:
        await asyncio.sleep(0.05)
    await release(session, engine)
    status, body, error = await task
    if status != 200:
        raise RuntimeError(f"direct stream failed: {status} {error}")
    return body


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vramgate_requests_in_flight{"))


async def level(n: int, url: str, engine: str, gateway: psutil.Process, expected: bytes,
                open_timeout: float) -> dict[str, Any]:
    """One level of N streams (see the module docstring); returns its figures."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=120, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as control:
        rss0, cpu0 = gateway.memory_info().rss, sum(gateway.cpu_times()[:2])
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(one_stream(session, url, AUTH)) for _ in range(n)]
        deadline = started + open_timeout
        count = 0
        while time.perf_counter() < deadline:
            count = await held(control, engine)
            if count >= n or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.1)
        opened = time.perf_counter() - started
        peak = {"rss": gateway.memory_info().rss, "fds": gateway.num_fds(),
                "in_flight": await asyncio.to_thread(in_flight, url), "held": count}
        await release(control, engine)
        released = time.perf_counter()
        results = await asyncio.gather(*tasks)
        finished = time.perf_counter() - released
        cpu = sum(gateway.cpu_times()[:2]) - cpu0
        after = {"rss": gateway.memory_info().rss, "in_flight": await asyncio.to_thread(in_flight, url)}
    errors = [r for r in results if r[0] != 200 or r[2]]
    exact = sum(1 for status, body, _ in results if status == 200 and body == expected)
    return {"streams": n, "all_open": peak["held"] >= n, "held_at_peak": peak["held"],
            "errors": len(errors), "error_samples": sorted({f"{s} {e}" for s, _, e in errors})[:5],
            "byte_exact": exact, "seconds_to_open": round(opened, 2),
            "seconds_to_finish": round(finished, 2),
            "gateway_rss_idle_mib": round(rss0 / 2**20, 1),
            "gateway_rss_open_mib": round(peak["rss"] / 2**20, 1),
            "rss_per_stream_kib": round((peak["rss"] - rss0) / n / 1024, 1),
            "gateway_fds_open": peak["fds"], "gateway_in_flight_open": peak["in_flight"],
            "gateway_rss_after_mib": round(after["rss"] / 2**20, 1),
            "gateway_in_flight_after": after["in_flight"],
            "gateway_cpu_seconds": round(cpu, 2),
            "gateway_cpu_ms_per_stream": round(1000 * cpu / n, 2)}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| streams | all open at once | errors | byte-exact | s to open | s to finish | "
            "gateway RSS idle → open → after (MiB) | RSS per open stream | gateway fds open | "
            "in flight after | gateway CPU (s) | CPU per stream |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['streams']} | {'yes' if r['all_open'] else 'no (' + str(r['held_at_peak']) + ')'} | "
        f"{r['errors']} | {r['byte_exact']} | {r['seconds_to_open']} | {r['seconds_to_finish']} | "
        f"{r['gateway_rss_idle_mib']} → {r['gateway_rss_open_mib']} → {r['gateway_rss_after_mib']} | "
        f"{r['rss_per_stream_kib']} KiB | {r['gateway_fds_open']} | {r['gateway_in_flight_after']:g} | "
        f"{r['gateway_cpu_seconds']} | {r['gateway_cpu_ms_per_stream']} ms |\n"
        for r in rows)


@click.command()
@click.option("--levels", default="1000,5000", help="Streams open at once, one level each.")
@click.option("--chunks", default=64, type=int, help="Chunks per stream.")
@click.option("--open-timeout", default=300.0, help="Seconds a level may take to open all its streams.")
@click.option("--out", default=str(ROOT / "loadtest" / "results" / "streams"), help="Output path stem.")
def main(levels: str, chunks: int, open_timeout: float, out: str) -> None:
    """N concurrent streams through the gateway on the instant engine (module docstring)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client holds N sockets too
    config = {"engine_module": "loadtest.instant_engine", "api_keys": [KEY], "models": [
        {"name": "instant", "path": "x", "preload": True,
         "engine_env": {"INSTANT_CHUNKS": str(chunks), "INSTANT_HOLD": "1"}}]}
    engine = instant_direct(config["models"][0])  # the gateway reaches it over its Unix socket
    rows: list[dict[str, Any]] = []
    limit = 0
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(config, Path(tmp) / "gw", ready_timeout=120)
        try:
            gateway = psutil.Process(proc.proc.pid)
            limit = gateway.rlimit(psutil.RLIMIT_NOFILE)[0]  # what serve raised its own to

            async def run_all() -> None:
                async with aiohttp.ClientSession() as s:
                    expected = await reference(s, engine)
                for n in (int(x) for x in levels.split(",")):
                    click.echo(f"{n} streams ...", err=True)
                    rows.append(await level(n, url, engine, gateway, expected, open_timeout))
                    click.echo(json.dumps(rows[-1]), err=True)
            asyncio.run(run_all())
        finally:
            proc.stop()
    report = {"machine": machine(), "chunks_per_stream": chunks, "gateway_fd_limit": limit,
              "levels": rows}
    md = write_results(out, report, "Concurrent streams through the gateway",
                      f"instant engine, {chunks} chunks a stream, held open after the first chunk until "
                      f"all were open; the gateway's open-file limit {limit}.", table(rows))
    click.echo(md)


if __name__ == "__main__":
    main()
