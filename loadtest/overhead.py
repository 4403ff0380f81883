"""Overhead benchmark: one real vLLM engine measured directly and through the gateway, in one run.

    python -m loadtest.overhead [--concurrency 1,4,16,64] [--max-tokens 32] [--rounds 2]

The gateway starts the embedded chat model (its engine only); the engine's own loopback URL comes
from the gateway's log. Two phases, both alternating between the targets so that machine noise hits
both alike:

1. Added TTFT at concurrency 1: ``--pairs`` pairs of identical streamed requests, direct then
   through the gateway (order flipped every pair); the figure is the median of the per-pair
   differences, with the two medians beside it.
2. Throughput: at each concurrency, runs of ``concurrency × --waves`` streamed requests
   (``ignore_eos``, exactly ``--max-tokens`` tokens each), direct and gateway alternating for
   ``--rounds`` rounds; output tokens/s summed over the rounds, as a ratio gateway ÷ direct.

Goals (issue #7): tokens/s through the gateway ≥ 99 % of direct; added TTFT p50 ≤ 0.3 ms.
Prints both and writes ``loadtest/results/overhead.{json,md,png}``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import click

from loadtest.loadgen import PROMPTS, machine, markdown, one_request, payload, plot, run_level, summarize
from loadtest.procs import ROOT, engine_url, start_gateway

CHAT = "SmolLM2-135M-Instruct"


def data_dir() -> Path:
    import os
    return Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))


async def ttft_pairs(direct: str, gateway: str, pairs: int, max_tokens: int) -> dict[str, Any]:
    """Per-pair TTFT differences (gateway − direct) in seconds, at concurrency 1."""
    diffs, d_ttft, g_ttft = [], [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for i in range(pairs + 2):
            body = payload(CHAT, "chat", True, max_tokens, PROMPTS[i % len(PROMPTS)], True)
            order = [(direct, d_ttft), (gateway, g_ttft)]
            if i % 2:
                order.reverse()
            got = {}
            for url, _ in order:
                r = await one_request(s, url + "/v1/chat/completions", body)
                if not r.ok:
                    raise RuntimeError(f"{url}: {r.status} {r.error}")
                got[url] = r.ttft
            if i < 2:
                continue  # warm-up: connections opened, prefix cache filled
            d_ttft.append(got[direct])
            g_ttft.append(got[gateway])
            diffs.append(got[gateway] - got[direct])
    return {"pairs": pairs, "added_ttft_p50_s": statistics.median(diffs),
            "direct_ttft_p50_s": statistics.median(d_ttft), "gateway_ttft_p50_s": statistics.median(g_ttft)}


@click.command()
@click.option("--concurrency", default="1,4,16,64", show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--waves", type=click.IntRange(1), default=2, show_default=True,
              help="Requests per run = concurrency × waves (at least 8).")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True)
@click.option("--pairs", type=click.IntRange(1), default=60, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "loadtest" / "results" / "overhead",
              show_default=True)
def main(concurrency: str, max_tokens: int, waves: int, rounds: int, pairs: int, out: Path) -> None:
    """The same vLLM engine, direct and through the gateway, side by side."""
    from server.models import embedded_models, ensure_prepared

    levels = [int(x) for x in concurrency.split(",") if x]
    ensure_prepared(data_dir())
    chat = embedded_models(data_dir())[0]
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-overhead-"))
    click.echo("starting the gateway and its engine (about a minute on a CPU) ...", err=True)
    gw, gw_url = start_gateway({"models": [{"name": chat.name, "path": chat.path, "preload": True,
                                            "aliases": list(chat.aliases), "max_concurrency": 256,
                                            "max_queue": 1024}]}, tmp, data_dir=data_dir())
    try:
        direct = engine_url(gw_url, CHAT)
        click.echo(f"engine {direct}, gateway {gw_url}", err=True)
        ttft = asyncio.run(ttft_pairs(direct, gw_url, pairs, 4))
        click.echo(f"added TTFT p50 at concurrency 1: {ttft['added_ttft_p50_s'] * 1000:+.2f} ms "
                   f"(direct {ttft['direct_ttft_p50_s'] * 1000:.1f} ms, gateway "
                   f"{ttft['gateway_ttft_p50_s'] * 1000:.1f} ms, {pairs} pairs)")
        rows: list[dict[str, Any]] = []
        for c in levels:
            n = max(8, c * waves)
            for rnd in range(rounds):
                targets = [("direct", direct), ("gateway", gw_url)]
                if rnd % 2:
                    targets.reverse()
                for name, url in targets:
                    results, wall = asyncio.run(run_level(
                        url + "/v1/chat/completions",
                        lambda i: payload(CHAT, "chat", True, max_tokens, PROMPTS[i % len(PROMPTS)], True),
                        concurrency=c, requests=n))
                    row = summarize(results, wall, target=name, concurrency=c)
                    row["round"] = rnd + 1
                    rows.append(row)
                    click.echo(markdown([row]).splitlines()[-1])
        summary = []
        for c in levels:
            tok = {t: sum(r["output_tok_per_s"] for r in rows if r["target"] == t and r["concurrency"] == c)
                   for t in ("direct", "gateway")}
            ttft_p50 = {t: statistics.median(r["ttft_p50_s"] for r in rows
                                             if r["target"] == t and r["concurrency"] == c)
                        for t in ("direct", "gateway")}
            summary.append({"concurrency": c, "direct_tok_s": tok["direct"] / rounds,
                            "gateway_tok_s": tok["gateway"] / rounds,
                            "ratio": tok["gateway"] / tok["direct"] if tok["direct"] else None,
                            "ttft_p50_direct_s": ttft_p50["direct"], "ttft_p50_gateway_s": ttft_p50["gateway"]})
        text = ("| concurrency | direct tok/s | gateway tok/s | gateway ÷ direct | TTFT p50 direct ms | TTFT p50 gateway ms |\n"
                "|---|---|---|---|---|---|\n")
        for s in summary:
            text += (f"| {s['concurrency']} | {s['direct_tok_s']:.1f} | {s['gateway_tok_s']:.1f} | "
                     f"**{s['ratio'] * 100:.1f} %** | {s['ttft_p50_direct_s'] * 1000:.1f} | "
                     f"{s['ttft_p50_gateway_s'] * 1000:.1f} |\n")
        text += (f"\nAdded TTFT p50 at concurrency 1 (median of {pairs} paired differences): "
                 f"**{ttft['added_ttft_p50_s'] * 1000:+.2f} ms** (direct {ttft['direct_ttft_p50_s'] * 1000:.1f} ms, "
                 f"gateway {ttft['gateway_ttft_p50_s'] * 1000:.1f} ms)\n")
        meta = {"machine": machine(), "model": CHAT, "max_tokens": max_tokens, "rounds": rounds,
                "ttft": ttft, "summary": summary}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text("# Overhead: the same vLLM engine, direct and through the gateway\n\n"
                                          + text + "\nAll runs:\n\n" + markdown(rows))
        plot(rows, out.with_suffix(".png"), "vLLM engine: direct vs through vramgate")
        click.echo("\n" + text)
        click.echo(f"machine: {meta['machine']}")
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
