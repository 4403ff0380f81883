"""Interactive TTFT with and without a Batch API batch on the same engine, in one run.

    python -m loadtest.batch [--requests 48] [--concurrency 4] [--lines 2000] [--rounds 2]

One gateway serves the embedded chat model. Each round measures ``--requests`` streamed chat
requests at ``--concurrency`` (no priority header: ``normal``, as an SDK sends them) three times:

1. ``alone``: nothing else runs;
2. ``batch_beside_N``: while a ``--lines``-line batch (chat, 16 tokens a line) runs on the same
   engine, submitted through the official workflow (upload, create) and in progress before the
   phase starts, once for each ``--besides`` value N of ``batch_beside`` (set by a reload);
3. ``after``: the batch cancelled and ended (a second baseline, to see drift).

Reported: TTFT p50/p99 per phase, each batch phase ÷ the baseline (phases 1 and 3 pooled), and
the batch lines answered per second during each batch phase. The goal (issue #12): p50 within
1.25× of alone with the default ``batch_beside`` (0). Writes ``loadtest/results/batch.{json,md}``. The CPU engine core busy-polls, so only the
ratios within this run mean anything.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import click
import httpx
import yaml

from loadtest.loadgen import PROMPTS, machine, one_request, payload, pct
from loadtest.procs import ROOT, start_gateway

CHAT = "SmolLM2-135M-Instruct"


def batch_file(lines: int) -> bytes:
    out = io.BytesIO()
    for i in range(lines):
        body = {"model": CHAT, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}]}
        out.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body}).encode() + b"\n")
    return out.getvalue()


async def interactive(session: aiohttp.ClientSession, url: str, n: int, c: int) -> list[float]:
    """TTFTs (seconds) of ``n`` streamed chat requests at concurrency ``c``."""
    ttfts: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            r = await one_request(session, url + "/v1/chat/completions",
                                  payload(CHAT, "chat", True, 16, PROMPTS[i % len(PROMPTS)], True))
            if not r.ok or r.ttft is None:
                raise RuntimeError(f"interactive request failed: {r.status} {r.error}")
            ttfts.append(r.ttft)
    await asyncio.gather(*(worker() for _ in range(c)))
    return ttfts


def answered(client: httpx.Client, batch_id: str) -> int:
    counts = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
    return counts["completed"] + counts["failed"]


def start_batch(client: httpx.Client, lines: int) -> str:
    f = client.post("/v1/files", files={"file": ("in.jsonl", batch_file(lines))},
                    data={"purpose": "batch"}).json()
    created = client.post("/v1/batches", json={"input_file_id": f["id"], "completion_window": "24h",
                                               "endpoint": "/v1/chat/completions"})
    created.raise_for_status()
    b = created.json()
    deadline = time.monotonic() + 120
    while answered(client, b["id"]) < 2:  # lines are at the engine before the phase starts
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not start")
        time.sleep(0.2)
    return b["id"]


def stop_batch(client: httpx.Client, batch_id: str) -> None:
    client.post(f"/v1/batches/{batch_id}/cancel")
    deadline = time.monotonic() + 120
    while client.get(f"/v1/batches/{batch_id}").json()["status"] != "cancelled":
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not end")
        time.sleep(0.2)


def set_beside(client: httpx.Client, config: dict[str, Any], path: Path, beside: int) -> None:
    """Change ``batch_beside`` on the running gateway: rewrite its config, ``POST /admin/reload``."""
    path.write_text(yaml.safe_dump({**config, "batch_beside": beside}))
    client.post("/admin/reload").raise_for_status()


async def measure(url: str, requests: int, c: int, lines: int, rounds: int, besides: list[int],
                  config: dict[str, Any], path: Path) -> dict[str, Any]:
    phases: dict[str, list[float]] = {"alone": [], "after": [],
                                      **{f"batch_beside_{b}": [] for b in besides}}
    rates: dict[str, list[float]] = {f"batch_beside_{b}": [] for b in besides}
    with httpx.Client(base_url=url, timeout=120) as client:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=900)) as s:
            await interactive(s, url, 8, c)  # warm-up
            for _ in range(rounds):
                phases["alone"] += await interactive(s, url, requests, c)
                batch_id = await asyncio.to_thread(start_batch, client, lines)
                for beside in besides:
                    name = f"batch_beside_{beside}"
                    await asyncio.to_thread(set_beside, client, config, path, beside)
                    t0, done = time.perf_counter(), await asyncio.to_thread(answered, client, batch_id)
                    phases[name] += await interactive(s, url, requests, c)
                    rates[name].append((await asyncio.to_thread(answered, client, batch_id) - done)
                                       / (time.perf_counter() - t0))
                await asyncio.to_thread(stop_batch, client, batch_id)
                phases["after"] += await interactive(s, url, requests, c)
    base = phases["alone"] + phases["after"]
    row: dict[str, Any] = {"requests_per_phase": requests * rounds, "concurrency": c,
                           "batch_lines": lines, "besides": besides}
    for name, values in (*phases.items(), ("baseline", base)):
        row[f"{name}_ttft_p50_s"], row[f"{name}_ttft_p99_s"] = pct(values, 50), pct(values, 99)
    for name in rates:
        row[f"{name}_ratio_p50"] = row[f"{name}_ttft_p50_s"] / row["baseline_ttft_p50_s"]
        row[f"{name}_ratio_p99"] = row[f"{name}_ttft_p99_s"] / row["baseline_ttft_p99_s"]
        row[f"{name}_lines_per_s"] = sum(rates[name]) / len(rates[name])
    return row


def report(row: dict[str, Any]) -> str:
    ms = {k: v * 1e3 for k, v in row.items() if k.endswith("_ttft_p50_s") or k.endswith("_ttft_p99_s")}
    variants = [f"batch_beside_{b}" for b in row["besides"]]
    lines = [
        f"Interactive streamed chat at concurrency {row['concurrency']}, "
        f"{row['requests_per_phase']} requests per phase; a batch of {row['batch_lines']} lines "
        "(16 tokens each) on the same engine, `batch_concurrency` "
        f"{row.get('batch_concurrency', 2)}; `batch_beside` changed by reload between phases.", "",
        "| phase | TTFT p50 ms | TTFT p99 ms | ÷ baseline p50 | ÷ baseline p99 | batch lines/s |",
        "|---|---|---|---|---|---|"]
    for p in ("alone", *variants, "after", "baseline"):
        extra = (f"**{row[p + '_ratio_p50']:.2f}×** | {row[p + '_ratio_p99']:.2f}× | "
                 f"{row[p + '_lines_per_s']:.2f}" if p in variants else " | | ")
        lines.append(f"| {p} | {ms[p + '_ttft_p50_s']:.1f} | {ms[p + '_ttft_p99_s']:.1f} | {extra} |")
    lines += ["", "baseline: the alone and after phases pooled. Goal (issue #12): p50 ≤ 1.25× with "
              "the default `batch_beside` (0)."]
    return "\n".join(lines)


@click.command()
@click.option("--requests", default=48, show_default=True, help="Interactive requests per phase and round.")
@click.option("--concurrency", default=4, show_default=True)
@click.option("--lines", default=2000, show_default=True, help="Lines of the batch.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--batch-concurrency", default=2, show_default=True,
              help="The gateway's batch_concurrency (lines of one batch in flight).")
@click.option("--besides", default="2,1,0", show_default=True,
              help="batch_beside values to measure, one phase each, comma-separated.")
def main(requests: int, concurrency: int, lines: int, rounds: int, batch_concurrency: int,
         besides: str) -> None:
    """Interactive TTFT with and without a batch running on the same engine."""
    data_dir = Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))
    from server.models import ensure_prepared
    ensure_prepared(data_dir)
    config = {"batch_concurrency": batch_concurrency,
              "models": [{"name": CHAT, "path": str(data_dir / "models" / CHAT), "preload": True,
                          "ttl": 0}]}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        proc, url = start_gateway(config, Path(tmp), data_dir=Path(tmp) / "data")
        try:
            row = asyncio.run(measure(url, requests, concurrency, lines, rounds,
                                      [int(b) for b in besides.split(",")], config,
                                      Path(tmp) / "config.yaml"))
        finally:
            proc.stop()
    row["batch_concurrency"] = batch_concurrency
    table = report(row)
    print(table)
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps({"machine": machine(), "row": row}, indent=2))
    (out / "batch.md").write_text(f"# Interactive TTFT beside a batch\n\n{table}\n")


if __name__ == "__main__":
    main()
