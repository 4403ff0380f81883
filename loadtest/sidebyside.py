"""Side by side: this checkout's gateway and a baseline loaded at the same moment, for A/B figures
that machine noise cannot tilt.

    python -m loadtest.sidebyside --baseline COMMIT|floor|floor-uds [--rounds 6] [--requests 4000]

The ceiling benchmark (``loadtest/ceiling.py``) runs its targets one after another, a few seconds
each. On a shared 2-core VM the CPU a request costs drifts by ±20% from one such run to the next
(steal time, the host's other guests), which drowns a 3% change. Here both targets get the same
load at once, from one load generator (``--concurrency`` streams each), so whatever the machine
does in a round it does to both; the ratio is taken per round and the median printed.

The baseline is a commit (its gateway from a git worktree, as the ceiling's ``--baseline``),
``floor`` (``loadtest/floor_proxy.py``, to its engine over loopback TCP), ``floor-uds`` (the floor
over a Unix socket, the gateway's own transport) or ``dir:PATH`` (the gateway of a copy of the
package, for experiments). Each target has its own instant engine; this checkout's gateway talks
to it over its Unix socket. "Per core" = answered requests ÷ the target's CPU
seconds in the round (user + system, psutil). A ratio above 1 means this checkout serves more
requests per core than the baseline. Writes ``loadtest/results/sidebyside-<baseline>.{json,md}``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import click

from loadtest.ceiling import AUTH, CHUNKS, KEY, start_floor
from loadtest.loadgen import machine, payload, run_level
from loadtest.procs import ROOT, Proc, drop_scratch, start_gateway


def start_targets(tmp: Path, baseline: str, procs: list[Proc]) -> list[tuple[str, Proc, str]]:
    """This checkout's gateway and the baseline, each on an instant engine: ``(name, process,
    URL)`` pairs (every process is in ``procs`` for the caller to stop)."""
    model = {"name": "instant", "path": "instant", "preload": True, "max_concurrency": 4096,
             "max_queue": 4096}
    config = {"engine_module": "loadtest.instant_engine", "api_keys": [KEY], "models": [model]}
    gw, url = start_gateway(config, tmp / "gw", ready_timeout=60)
    procs.append(gw)
    if baseline in ("floor", "floor-uds"):
        floor, _, f_url = start_floor(tmp, procs, uds=baseline == "floor-uds")
        return [("vramgate", gw, url), (baseline, floor, f_url)]
    if baseline.startswith("dir:"):  # a scratch copy of the package (an experiment)
        var, var_url = start_gateway(config, tmp / "gw-dir", ready_timeout=60, cwd=Path(baseline[4:]))
        procs.append(var)
        return [("vramgate", gw, url), ("variant", var, var_url)]
    worktree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), baseline],
                   check=True, capture_output=True)
    old, old_url = start_gateway(config, tmp / "gw-baseline", ready_timeout=60, cwd=worktree)
    procs.append(old)
    return [("vramgate", gw, url), (f"vramgate@{baseline}", old, old_url)]


async def load_both(urls: list[str], stream: bool, requests: int, concurrency: int) -> list[int]:
    """``requests`` to each URL at once; the errors of each."""
    body = payload("instant", "chat", stream, CHUNKS, "Say hello.", False)
    runs = await asyncio.gather(*(run_level(u + "/v1/chat/completions", lambda i: body,
                                            concurrency=concurrency, requests=requests,
                                            headers=AUTH) for u in urls))
    return [sum(1 for r in results if r.error) for results, _ in runs]


def one_round(targets: list[tuple[str, Proc, str]], stream: bool, requests: int,
              concurrency: int) -> dict[str, Any]:
    """One round: both loaded at once; each one's CPU microseconds a request and errors."""
    before = [p.cpu_seconds() for _, p, _ in targets]
    errors = asyncio.run(load_both([u for _, _, u in targets], stream, requests, concurrency))
    cpu = [p.cpu_seconds() - b for (_, p, _), b in zip(targets, before)]
    row: dict[str, Any] = {"mode": "stream" if stream else "plain"}
    for (name, _, _), c, e in zip(targets, cpu, errors):
        row[name] = {"cpu_us_per_request": c / max(requests - e, 1) * 1e6, "errors": e}
    mine, theirs = (row[name]["cpu_us_per_request"] for name, _, _ in targets)
    row["per_core_ratio"] = theirs / mine if mine > 0 else None
    return row


def report(rows: list[dict[str, Any]], names: list[str]) -> str:
    """The per-round table and each mode's median ratio, as Markdown."""
    a, b = names
    text = (f"| mode | {a} CPU µs/request | {b} CPU µs/request | per core, {a} ÷ {b} | errors |\n"
            "|---|---|---|---|---|\n")
    for r in rows:
        text += (f"| {r['mode']} | {r[a]['cpu_us_per_request']:.0f} | "
                 f"{r[b]['cpu_us_per_request']:.0f} | {r['per_core_ratio']:.3f} | "
                 f"{r[a]['errors']} / {r[b]['errors']} |\n")
    text += "\n"
    for mode in ("plain", "stream"):
        ratios = [r["per_core_ratio"] for r in rows if r["mode"] == mode]
        if ratios:
            rounds = f"{len(ratios)} round{'s' if len(ratios) > 1 else ''}"
            text += (f"- {mode}: req/s per core, {a} ÷ {b}: **{statistics.median(ratios):.2f}×** "
                     f"(median of {rounds}, {min(ratios):.2f}–{max(ratios):.2f})\n")
    return text


@click.command()
@click.option("--baseline", required=True, metavar="COMMIT|floor|floor-uds|dir:PATH",
              help="A commit's gateway (a git worktree), the floor proxy (to its engine over "
                   "loopback TCP, or a Unix socket), or the gateway of a copy of the package.")
@click.option("--rounds", type=click.IntRange(1), default=6, show_default=True)
@click.option("--requests", type=click.IntRange(1), default=4000, show_default=True,
              help="Requests to each target per round.")
@click.option("--concurrency", type=click.IntRange(1), default=32, show_default=True)
@click.option("--modes", default="plain,stream", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Default: loadtest/results/sidebyside-<baseline>.")
def main(baseline: str, rounds: int, requests: int, concurrency: int, modes: str,
         out: Path | None) -> None:
    """This checkout's gateway and ``--baseline``, loaded at once, round after round."""
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-sidebyside-"))
    procs: list[Proc] = []
    try:
        targets = start_targets(tmp, baseline, procs)
        names = [name for name, _, _ in targets]
        rows = []
        click.echo("\n".join(report([], names).splitlines()[:2]))  # the table's head
        for mode in modes.split(","):
            stream = mode.strip() == "stream"
            asyncio.run(load_both([u for _, _, u in targets], stream, min(requests, 2000),
                                  concurrency))  # unmeasured: connection pools and caches warm
            for rnd in range(rounds):
                row = one_round(targets, stream, requests, concurrency)
                row["round"] = rnd + 1
                rows.append(row)
                click.echo(report([row], names).splitlines()[2])
        text = report(rows, names)
        meta = {"machine": machine(), "baseline": baseline, "rounds": rounds, "requests": requests,
                "concurrency": concurrency, "chunks_per_stream": CHUNKS}
        out = out or ROOT / "loadtest" / "results" / f"sidebyside-{baseline.replace('/', '_')}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(
            f"# Side by side: vramgate and {names[1]}, loaded at once\n\n"
            f"{requests} requests to each per round at concurrency {concurrency}.\n\n{text}\n"
            f"machine: {meta['machine']}\n")
        click.echo("\n" + text)
        click.echo(f"machine: {meta['machine']}")
        click.echo(f"wrote {out.with_suffix('.md')} and .json")
    finally:
        for p in reversed(procs):
            p.stop()
        if (tmp / "baseline").exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(tmp / "baseline")], capture_output=True)
        drop_scratch(tmp)


if __name__ == "__main__":
    main()
