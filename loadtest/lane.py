"""The completion lane: FIM time to first token while chat streams run on another model.

    python -m loadtest.lane [--levels 1,8] [--requests 24] [--chat-streams 4] [--variants lane,shared]

Two models on the embedded SmolLM2 weights: ``chat``, and ``coder`` with a FIM format (SmolLM2 has
no FIM tokens, so a format string of its own tokens stands in; what is measured is latency, which
depends on the model's size, not on its training). For each variant one gateway is started, and:

1. FIM requests alone, at each concurrency level (the variant's own baseline);
2. the same FIM requests while ``--chat-streams`` long chat streams (``ignore_eos``, restarted as
   they end) run on ``chat``.

Variants:

- ``shared``: no lane. ``coder`` is an ordinary model and its FIM requests are sent at normal
  priority; vLLM's CPU workers bind to the same core (``VLLM_CPU_OMP_THREADS_BIND=auto`` keeps one
  core for the frontends and puts every engine's worker on the rest: core 0 of two).
- ``lane``: ``coder`` is ``pinned`` with ``cpu_cores: 1`` (its engine's worker gets a core of its
  own; chat's takes the others); FIM goes in at interactive priority (the default for
  ``suffix``).

Reported per variant and level: FIM TTFT p50/p99 alone and under chat, their ratio, and the chat
streams' output tokens/s; then lane ÷ shared. Writes ``loadtest/results/lane.{json,md}``. The CPU
engine core busy-polls, so only ratios within one run mean anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import click

from loadtest.loadgen import machine, one_request, pct
from loadtest.procs import ROOT, engine_url, start_gateway

CHAT = "SmolLM2-135M-Instruct"
PREFIX = "".join(f"def helper_{i}(values):\n    total = 0\n    for v in values:\n        total += v * {i}\n"
                 f"    return total\n\n" for i in range(12)) + "def main():\n    data = [1, 2, 3]\n    "
SUFFIX = "\n    print(result)\n\n\nif __name__ == '__main__':\n    main()\n"


def config(data_dir: Path, lane: bool) -> dict[str, Any]:
    folder = str(data_dir / "models" / CHAT)
    chat: dict[str, Any] = {"name": "chat", "path": folder, "preload": True, "ttl": 0}
    coder: dict[str, Any] = {"name": "coder", "path": folder, "preload": True, "ttl": 0,
                             "fim": "<repo_name>{suffix}<file_sep>{prefix}"}
    if lane:
        coder.update(pinned=True, cpu_cores=1)
    return {"engine_transport": "tcp", "models": [chat, coder]}  # the chat engine is read directly


def fim_body(i: int) -> dict[str, Any]:
    return {"model": "coder", "prompt": PREFIX + f"x_{i} = ", "suffix": SUFFIX, "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def generated(session: aiohttp.ClientSession, engine: str) -> float:
    """``vllm:generation_tokens_total`` of an engine, read from its own ``/metrics`` (it counts as
    tokens are made, so a window of a long stream can be measured)."""
    async with session.get(engine + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


async def chat_load(session: aiohttp.ClientSession, url: str, streams: int,
                    stop: asyncio.Event) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}

    async def one() -> None:
        while not stop.is_set():
            await one_request(session, url + "/v1/chat/completions", body)

    tasks = [asyncio.create_task(one()) for _ in range(streams)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def fim_level(session: aiohttp.ClientSession, url: str, concurrency: int, requests: int,
                    headers: dict[str, str]) -> list[float]:
    ttfts: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            async with session.post(url + "/v1/completions", json=fim_body(i), headers=headers) as resp:
                first = None
                async for chunk in resp.content.iter_any():
                    if first is None and b'"text"' in chunk:
                        first = time.perf_counter()
                if resp.status != 200 or first is None:
                    raise RuntimeError(f"FIM request failed: {resp.status}")
                ttfts.append(first - t0)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts


async def measure(url: str, levels: list[int], requests: int, streams: int,
                  lane: bool) -> list[dict[str, Any]]:
    headers = {} if lane else {"x-priority": "normal"}
    chat_engine = engine_url(url, "chat")
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=900)) as s:
        await fim_level(s, url, 1, 3, headers)  # warm-up: prefix cache and first-request costs
        for c in levels:
            alone = await fim_level(s, url, c, requests, headers)
            stop = asyncio.Event()
            load = asyncio.create_task(chat_load(s, url, streams, stop))
            await asyncio.sleep(3)  # the chat streams are decoding before FIM requests arrive
            t0, made = time.perf_counter(), await generated(s, chat_engine)
            busy = await fim_level(s, url, c, requests, headers)
            wall, made = time.perf_counter() - t0, await generated(s, chat_engine) - made
            stop.set()
            await load
            row = {"variant": "lane" if lane else "shared", "concurrency": c, "requests": requests,
                   "chat_streams": streams}
            for name, values in (("alone", alone), ("chat", busy)):
                row[f"ttft_{name}_p50_s"] = pct(values, 50)
                row[f"ttft_{name}_p99_s"] = pct(values, 99)
            row["slowdown_p50"] = row["ttft_chat_p50_s"] / row["ttft_alone_p50_s"]
            row["chat_tok_per_s"] = made / wall
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | conc | FIM TTFT p50 alone ms | p99 alone ms | p50 with chat ms | "
             "p99 with chat ms | slowdown p50 | chat tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['concurrency']} | {r['ttft_alone_p50_s'] * 1e3:.0f} | "
                     f"{r['ttft_alone_p99_s'] * 1e3:.0f} | {r['ttft_chat_p50_s'] * 1e3:.0f} | "
                     f"{r['ttft_chat_p99_s'] * 1e3:.0f} | {r['slowdown_p50']:.2f}× | "
                     f"{r['chat_tok_per_s']:.1f} |")
    by = {(r["variant"], r["concurrency"]): r for r in rows}
    for (variant, c), r in by.items():
        other = by.get(("shared", c))
        if variant == "lane" and other:
            chat = (f"{r['chat_tok_per_s'] / other['chat_tok_per_s']:.2f}×"
                    if other["chat_tok_per_s"] else f"{r['chat_tok_per_s']:.1f} against 0 tok/s")
            lines.append(f"\nconcurrency {c}: lane ÷ shared, FIM TTFT with chat: p50 "
                         f"{r['ttft_chat_p50_s'] / other['ttft_chat_p50_s']:.2f}×, p99 "
                         f"{r['ttft_chat_p99_s'] / other['ttft_chat_p99_s']:.3f}×; chat tok/s {chat}")
    return "\n".join(lines)


@click.command()
@click.option("--levels", default="1,8", help="FIM concurrency levels, comma-separated.")
@click.option("--requests", default=24, show_default=True, help="FIM requests per level and phase.")
@click.option("--chat-streams", default=4, show_default=True)
@click.option("--variants", default="shared,lane", show_default=True)
def main(levels: str, requests: int, chat_streams: int, variants: str) -> None:
    """FIM TTFT alone and while chat streams run, with and without the completion lane."""
    data_dir = Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))
    subprocess_prepare(data_dir)
    rows: list[dict[str, Any]] = []
    for variant in variants.split(","):
        with tempfile.TemporaryDirectory(prefix=f"lane-{variant}-") as tmp:
            proc, url = start_gateway(config(data_dir, variant == "lane"), Path(tmp), data_dir=data_dir)
            try:
                rows += asyncio.run(measure(url, [int(x) for x in levels.split(",")], requests,
                                            chat_streams, variant == "lane"))
            finally:
                proc.stop()
    write(rows)


def write(rows: list[dict[str, Any]]) -> None:
    """Print the table and write ``loadtest/results/lane.{json,md}``."""
    table = report(rows)
    print(table)
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lane.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    (out / "lane.md").write_text(f"# Completion lane\n\n{table}\n")


def subprocess_prepare(data_dir: Path) -> None:
    from server.models import ensure_prepared
    ensure_prepared(data_dir)


if __name__ == "__main__":
    main()
