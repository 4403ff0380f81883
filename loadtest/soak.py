"""Soak: a steady mixed load through the gateway for a long time, on the instant engine; does the
gateway's memory stay flat and do its gauges return to 0?

    python -m loadtest.soak [--seconds 3600] [--concurrency 16]

The gateway serves a chat model and an embedding model, both on the instant engine (32 chunks a
stream, 5 ms apart). ``--concurrency`` clients loop until the time is up, each request drawn at
random (seeded) from: a streamed chat (40 %), a chat answered whole (30 %), an embedding (25 %),
and a streamed chat whose client hangs up after its first chunks (5 %).

The gateway's RSS is sampled every ``--sample`` seconds. Growth is measured from the end of the
warm-up (the first ``--warmup`` seconds, 10 % of the run by default: allocator pools and caches
fill then) to the end. After the load stops, the in-flight and queued gauges must fall to 0.
Written to ``loadtest/results/soak.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import click
import httpx
import psutil

from loadtest.loadgen import machine, write_results
from loadtest.procs import ROOT, start_gateway

KEY = "sk-soak-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIX = (("stream", 0.40), ("whole", 0.30), ("embed", 0.25), ("hangup", 0.05))
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}


async def one(session: aiohttp.ClientSession, url: str, kind: str) -> str:
    """One request of ``kind``; returns ``ok``, ``hung_up`` or an error text."""
    try:
        if kind == "embed":
            async with session.post(url + "/v1/embeddings", json={"model": "embed", "input": "hi"}) as r:
                data = await r.json()
                return "ok" if r.status == 200 and len(data["data"][0]["embedding"]) == 384 else f"{r.status}"
        body = {**CHAT, "stream": kind != "whole"}
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return f"{r.status} {(await r.text())[:100]}"
            if kind == "hangup":
                await r.content.readline()  # the first event's line, then hang up
                r.close()
                return "hung_up"
            text = await r.text()
            complete = text.endswith("data: [DONE]\n\n") if kind == "stream" else '"choices"' in text
            return "ok" if complete else "incomplete"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__}"


def gauges(url: str) -> dict[str, float]:
    """The sums of the gateway's in-flight and queued gauges."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"in_flight": 0.0, "queued": 0.0}
    for line in text.splitlines():
        for name, key in (("vramgate_requests_in_flight{", "in_flight"), ("vramgate_requests_queued{", "queued")):
            if line.startswith(name):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


async def load(url: str, seconds: float, concurrency: int, seed: int, gateway: psutil.Process,
               sample: float) -> tuple[dict[str, int], list[tuple[float, float]]]:
    """Run the mix for ``seconds``; returns the outcome counts and the RSS samples
    ``(seconds since start, MiB)``."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    counts: dict[str, int] = {}
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    end = start + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            outcome = await one(session, url, rng.choices(kinds, weights)[0])
            counts[outcome] = counts.get(outcome, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < end:
            samples.append((round(time.monotonic() - start, 1), gateway.memory_info().rss / 2**20))
            await asyncio.sleep(sample)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(sampler(), *(client(session) for _ in range(concurrency)))
    samples.append((round(time.monotonic() - start, 1), gateway.memory_info().rss / 2**20))
    return counts, samples


def settle(url: str, timeout: float = 30) -> dict[str, float]:
    """The gauges once they reach 0 (or as they are after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    now = gauges(url)
    while time.monotonic() < deadline and any(now.values()):
        time.sleep(0.2)
        now = gauges(url)
    return now


def summary(counts: dict[str, int], samples: list[tuple[float, float]], warmup: float,
            after: dict[str, float], seconds: float) -> dict[str, Any]:
    """The run's figures: requests, errors, RSS at the end of the warm-up and at the end."""
    base = next((mib for t, mib in samples if t >= warmup), samples[0][1])
    last = samples[-1][1]
    errors = {k: v for k, v in counts.items() if k not in ("ok", "hung_up")}
    return {"seconds": seconds, "requests": sum(counts.values()), "ok": counts.get("ok", 0),
            "hung_up": counts.get("hung_up", 0), "errors": errors,
            "rss_after_warmup_mib": round(base, 1), "rss_end_mib": round(last, 1),
            "rss_peak_mib": round(max(m for _, m in samples), 1),
            "rss_growth_pct": round(100 * (last - base) / base, 2),
            "in_flight_after": after["in_flight"], "queued_after": after["queued"]}


@click.command()
@click.option("--seconds", default=3600.0, help="How long the load runs.")
@click.option("--concurrency", default=16, help="Clients in a closed loop.")
@click.option("--warmup", default=None, type=float, help="Seconds before the RSS baseline (default 10 %).")
@click.option("--sample", default=10.0, help="Seconds between RSS samples.")
@click.option("--seed", default=1, help="Seed of the request mix.")
@click.option("--out", default=str(ROOT / "loadtest" / "results" / "soak"), help="Output path stem.")
def main(seconds: float, concurrency: int, warmup: float | None, sample: float, seed: int,
         out: str) -> None:
    """A steady mixed load for ``--seconds`` (module docstring)."""
    engine_env = {"INSTANT_CHUNKS": "32", "INSTANT_CHUNK_DELAY": "0.005"}
    config = {"engine_module": "loadtest.instant_engine", "api_keys": [KEY], "models": [
        {"name": "chat", "path": "x", "preload": True, "engine_env": engine_env},
        {"name": "embed", "path": "x", "task": "embed", "preload": True, "engine_env": engine_env}]}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(config, Path(tmp) / "gw", ready_timeout=120)
        try:
            gateway = psutil.Process(proc.proc.pid)
            counts, samples = asyncio.run(load(url, seconds, concurrency, seed, gateway, sample))
            after = settle(url)
        finally:
            proc.stop()
    row = summary(counts, samples, seconds / 10 if warmup is None else warmup, after, seconds)
    report = {"machine": machine(), "concurrency": concurrency, "mix": dict(MIX), "summary": row,
              "rss_samples": samples}
    body = ("| requests | ok | hung up | errors | RSS after warm-up | RSS at the end | peak | growth | "
            "in flight after | queued after |\n|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {row['requests']} | {row['ok']} | {row['hung_up']} | {sum(row['errors'].values())} | "
            f"{row['rss_after_warmup_mib']} MiB | {row['rss_end_mib']} MiB | {row['rss_peak_mib']} MiB | "
            f"{row['rss_growth_pct']} % | {row['in_flight_after']:g} | {row['queued_after']:g} |\n")
    md = write_results(out, report, "Soak", f"instant engine; {concurrency} clients for {seconds:g} s; "
                      f"mix {dict(MIX)}.", body)
    click.echo(md)


if __name__ == "__main__":
    main()
