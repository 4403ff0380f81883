"""Overhead benchmark: one real vLLM engine measured directly and through the gateway, in one run.

    python -m loadtest.overhead [--concurrency 1,4,16,64] [--max-tokens 32] [--rounds 3]

The gateway starts the embedded chat model (its engine only); the engine's own loopback URL comes
from ``GET /admin/models``. A CPU engine's speed drifts by tens of percent from one run to the
next on a busy 2-core machine (vLLM's engine core busy-polls one core, its worker takes the other),
so the two paths are never compared across separate runs:

1. Concurrency 1: ``--pairs`` pairs of identical streamed requests, direct then through the gateway
   (order flipped every pair). Added TTFT = the median of the per-pair TTFT differences (4-token
   answers); tokens/s ratio = the median of the per-pair ratios of end-to-end times of
   ``--max-tokens`` answers (``ignore_eos``: exactly that many tokens).
2. Concurrency C ≥ 2: mixed runs. C/2 streams go direct and C/2 through the gateway *at the same
   time*, so both halves share the engine's batches and the machine's state; each half's output
   tokens/s (its tokens ÷ its own wall time), and the ratio gateway ÷ direct per run. ``--rounds``
   runs per level; the median ratio, with the lowest and highest beside it.

Goals (issue #7): tokens/s through the gateway ≥ 99 % of direct; added TTFT p50 ≤ 0.3 ms.
Prints both and writes ``loadtest/results/overhead.{json,md,png}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import click

from loadtest.loadgen import PROMPTS, machine, markdown, one_request, payload, plot, run_level, summarize
from loadtest.procs import ROOT, engine_url, start_gateway

CHAT = "SmolLM2-135M-Instruct"
PATH = "/v1/chat/completions"


def data_dir() -> Path:
    return Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return payload(CHAT, "chat", True, max_tokens, PROMPTS[i % len(PROMPTS)], True)


async def pairs(direct: str, gateway: str, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` request pairs at concurrency 1 (after 2 warm-up pairs): the median TTFT difference
    gateway − direct (seconds) and the median ratio of end-to-end times direct ÷ gateway (= the
    tokens/s ratio gateway ÷ direct, both answers having the same number of tokens)."""
    ttft_diff, e2e_ratio, d_ttft, g_ttft = [], [], [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for i in range(n + 2):
            order = [direct, gateway] if i % 2 else [gateway, direct]
            got = {}
            for url in order:
                r = await one_request(s, url + PATH, body(i, max_tokens))
                if not r.ok:
                    raise RuntimeError(f"{url}: {r.status} {r.error}")
                got[url] = r
            if i < 2:
                continue
            d, g = got[direct], got[gateway]
            ttft_diff.append(g.ttft - d.ttft)
            e2e_ratio.append((d.end - d.start) / (g.end - g.start))
            d_ttft.append(d.ttft)
            g_ttft.append(g.ttft)
    return {"pairs": n, "max_tokens": max_tokens, "added_ttft_p50_s": statistics.median(ttft_diff),
            "direct_ttft_p50_s": statistics.median(d_ttft), "gateway_ttft_p50_s": statistics.median(g_ttft),
            "tok_s_ratio_median": statistics.median(e2e_ratio), "tok_s_ratio_min": min(e2e_ratio),
            "tok_s_ratio_max": max(e2e_ratio)}


async def mixed(direct: str, gateway: str, c: int, per_half: int, max_tokens: int) -> list[dict[str, Any]]:
    """One mixed run at concurrency ``c``: half the streams direct, half through the gateway."""
    half = max(1, c // 2)
    (d_res, d_wall), (g_res, g_wall) = await asyncio.gather(
        run_level(direct + PATH, lambda i: body(i, max_tokens), concurrency=half, requests=per_half),
        run_level(gateway + PATH, lambda i: body(i + 1, max_tokens), concurrency=half, requests=per_half))
    return [summarize(d_res, d_wall, target="direct", concurrency=c),
            summarize(g_res, g_wall, target="gateway", concurrency=c)]


@click.command()
@click.option("--concurrency", default="1,4,16,64", show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--waves", type=click.IntRange(1), default=2, show_default=True,
              help="Requests per half of a mixed run = concurrency ÷ 2 × waves (at least 4).")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Mixed runs per concurrency level.")
@click.option("--pairs", "n_pairs", type=click.IntRange(1), default=40, show_default=True,
              help="Request pairs at concurrency 1 (each for TTFT and for tokens/s).")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "loadtest" / "results" / "overhead",
              show_default=True)
def main(concurrency: str, max_tokens: int, waves: int, rounds: int, n_pairs: int, out: Path) -> None:
    """The same vLLM engine, direct and through the gateway, side by side."""
    from server.models import embedded_models, ensure_prepared

    levels = [int(x) for x in concurrency.split(",") if x]
    ensure_prepared(data_dir())
    chat = embedded_models(data_dir())[0]
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-overhead-"))
    click.echo("starting the gateway and its engine (about a minute on a CPU) ...", err=True)
    gw, gw_url = start_gateway({"engine_transport": "tcp",  # the engine is also read directly
                                "models": [{"name": chat.name, "path": chat.path, "preload": True,
                                            "aliases": list(chat.aliases), "max_concurrency": 256,
                                            "max_queue": 1024}]}, tmp, data_dir=data_dir())
    try:
        direct = engine_url(gw_url, CHAT)
        click.echo(f"engine {direct}, gateway {gw_url}", err=True)
        ttft = asyncio.run(pairs(direct, gw_url, n_pairs, 4))
        click.echo(f"added TTFT p50 at concurrency 1: {ttft['added_ttft_p50_s'] * 1000:+.2f} ms "
                   f"(direct {ttft['direct_ttft_p50_s'] * 1000:.1f} ms, gateway "
                   f"{ttft['gateway_ttft_p50_s'] * 1000:.1f} ms, {n_pairs} pairs)")
        summary: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for c in levels:
            if c == 1:
                p = asyncio.run(pairs(direct, gw_url, max(8, n_pairs // 2), max_tokens))
                summary.append({"concurrency": 1, "method": f"{p['pairs']} pairs",
                                "ratio_median": p["tok_s_ratio_median"], "ratio_min": p["tok_s_ratio_min"],
                                "ratio_max": p["tok_s_ratio_max"], "direct_tok_s": None, "gateway_tok_s": None})
                click.echo(f"concurrency 1: tokens/s gateway ÷ direct {p['tok_s_ratio_median'] * 100:.1f} % "
                           f"(median of {p['pairs']} pairs)")
                continue
            per_half = max(4, c // 2 * waves)
            asyncio.run(mixed(direct, gw_url, c, max(2, c // 2), max_tokens))  # warm-up
            ratios, level_rows = [], []
            for rnd in range(rounds):
                d, g = asyncio.run(mixed(direct, gw_url, c, per_half, max_tokens))
                for row in (d, g):
                    row["round"] = rnd + 1
                level_rows += [d, g]
                ratios.append(g["output_tok_per_s"] / d["output_tok_per_s"])
                click.echo(markdown([d]).splitlines()[-1])
                click.echo(markdown([g]).splitlines()[-1])
            rows += level_rows

            def med(target: str, key: str) -> float:
                return statistics.median(r[key] for r in level_rows if r["target"] == target)

            summary.append({"concurrency": c, "method": f"{rounds} mixed runs",
                            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                            "ratio_max": max(ratios), "direct_tok_s": med("direct", "output_tok_per_s"),
                            "gateway_tok_s": med("gateway", "output_tok_per_s"),
                            "ttft_p50_direct_s": med("direct", "ttft_p50_s"),
                            "ttft_p50_gateway_s": med("gateway", "ttft_p50_s")})
        text = ("| concurrency | method | direct tok/s | gateway tok/s | gateway ÷ direct (median) | "
                "lowest – highest |\n|---|---|---|---|---|---|\n")
        for s in summary:
            tok = (f"{s['direct_tok_s']:.1f} | {s['gateway_tok_s']:.1f}" if s["direct_tok_s"] is not None
                   else "– | –")
            text += (f"| {s['concurrency']} | {s['method']} | {tok} | **{s['ratio_median'] * 100:.1f} %** | "
                     f"{s['ratio_min'] * 100:.1f} – {s['ratio_max'] * 100:.1f} % |\n")
        text += (f"\nAdded TTFT p50 at concurrency 1 (median of {n_pairs} paired differences): "
                 f"**{ttft['added_ttft_p50_s'] * 1000:+.2f} ms** (direct {ttft['direct_ttft_p50_s'] * 1000:.1f} ms, "
                 f"gateway {ttft['gateway_ttft_p50_s'] * 1000:.1f} ms)\n")
        meta = {"machine": machine(), "model": CHAT, "max_tokens": max_tokens, "rounds": rounds,
                "ttft": ttft, "summary": summary}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text("# Overhead: the same vLLM engine, direct and through the gateway\n\n"
                                          + text + "\nMixed runs (each half's own figures):\n\n" + markdown(rows))
        plot(rows, out.with_suffix(".png"), "vLLM engine (CPU): direct vs through vramgate, mixed runs")
        click.echo("\n" + text)
        click.echo(f"machine: {meta['machine']}")
    finally:
        gw.stop()


if __name__ == "__main__":
    main()
