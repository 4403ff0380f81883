"""Load generator for OpenAI-compatible servers: what users feel (TTFT, ITL, end to end) and what the
server sustains (requests/s, output tokens/s), at fixed concurrencies or Poisson arrival rates.

    python -m loadtest.loadgen --url http://127.0.0.1:8000 --model smollm2 \\
        --concurrency 1,4,16 --requests 64 --stream --out loadtest/results/run1

Each level writes one row; the whole run goes to ``OUT.json``, ``OUT.md`` (a markdown table) and
``OUT.png`` (latency against throughput). Times are seconds on the client's monotonic clock;
percentiles are numpy's (linear interpolation). aiohttp is the client: it adds less per request than
the ``openai`` SDK, which matters when the thing measured is a proxy's own overhead.

Token counts: from the engine's ``usage`` (streams ask for ``stream_options.include_usage``); ITL is
the time between successive content chunks of one stream (vLLM sends one chunk per token step).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp

PROMPTS = (  # a small bundled set: short chat turns of the kind IDE assistants and chat UIs send
    "Say hello.",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers and say why each is prime.",
    "Translate 'good morning, how are you?' into French and German.",
    "Write a Python function that reverses a string, with a docstring.",
    "What is the capital of Australia? Answer in one sentence.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
)
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def synthetic_prompt(words: int, rng: random.Random) -> str:
    """A prompt of about ``words`` words (roughly 1.3 tokens each for English-like text)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Result:
    """One request as the client saw it. ``start``/``end`` are monotonic seconds; ``ttft`` the time
    to the first content chunk (streams) or to the whole answer; ``itls`` the gaps between chunks;
    ``gateway_s`` the time vramgate says it held the request (its ``Server-Timing``), if it did;
    ``headers_s`` the time to the response's headers (a streaming vLLM sends them once the request
    is in its engine, before the first token)."""

    start: float
    end: float = 0.0
    ok: bool = False
    status: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""
    gateway_s: float | None = None
    headers_s: float | None = None


def payload(model: str, route: str, stream: bool, max_tokens: int, prompt: str,
            ignore_eos: bool) -> dict[str, Any]:
    """The request body for ``route`` (``chat`` or ``completions``)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                            "stream": stream}
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension: exactly max_tokens, comparable runs
    if stream:
        body["stream_options"] = {"include_usage": True}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Result:
    """Send one request and time it; never raises (errors go into the result)."""
    res = Result(start=time.perf_counter())
    try:
        async with session.post(url, json=body) as resp:
            res.status = resp.status
            res.headers_s = time.perf_counter() - res.start
            res.gateway_s = gateway_seconds(resp.headers.get("server-timing", ""))
            if resp.status != 200:
                res.error = (await resp.text())[:200]
                return res
            if not body.get("stream"):
                data = await resp.read()
                res.ttft = time.perf_counter() - res.start
                res.output_tokens = json.loads(data).get("usage", {}).get("completion_tokens", 0)
                res.ok = True
                return res
            last = None
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    if b'"usage"' in event or b'"error"' in event[:20]:
                        data = json.loads(event[6:])
                        if data.get("error"):
                            res.error = event[:200].decode(errors="replace")
                            continue
                        if data.get("usage"):
                            res.output_tokens = data["usage"]["completion_tokens"]
                        if not data.get("choices"):
                            continue  # the usage chunk is not a token
                    if last is None:
                        res.ttft = now - res.start
                    else:
                        res.itls.append(now - last)
                    last = now
            res.ok = not res.error and res.ttft is not None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        res.error = f"{exc.__class__.__name__}: {exc}"[:200]
    finally:
        res.end = time.perf_counter()
    return res


def write_results(stem: str, report: dict[str, Any], title: str, setup: str, body: str) -> str:
    """Write ``stem.json`` (``report``, which holds ``machine()``) and ``stem.md``: the title and
    date, the machine, ``setup``, then ``body`` (markdown); returns that markdown."""
    from pathlib import Path

    m = report["machine"]
    Path(stem + ".json").write_text(json.dumps(report, indent=2) + "\n")
    md = (f"# {title} ({m['date']})\n\n{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, "
          f"Python {m['python']}; {setup}\n\n{body}")
    Path(stem + ".md").write_text(md)
    return md


def gateway_seconds(header: str) -> float | None:
    """``gateway;dur=MS`` of a ``Server-Timing`` header, in seconds; ``None`` without it."""
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        if name == "gateway":
            for param in params.split(";"):
                key, _, value = param.strip().partition("=")
                if key == "dur":
                    try:
                        return float(value) / 1000
                    except ValueError:
                        return None
    return None


def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``values``, numpy's linear method; ``None`` if empty."""
    if not values:
        return None
    import numpy as np
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(results: Sequence[Result], wall: float, **labels: Any) -> dict[str, Any]:
    """One row: counts, requests/s and output tokens/s over ``wall`` seconds, and p50/p90/p99 of
    TTFT, ITL and end-to-end latency in seconds (pure)."""
    good = [r for r in results if r.ok]
    row: dict[str, Any] = dict(labels)
    row.update(requests=len(results), errors=len(results) - len(good), wall_s=wall,
               req_per_s=len(good) / wall if wall > 0 else 0.0,
               output_tok_per_s=sum(r.output_tokens for r in good) / wall if wall > 0 else 0.0)
    series = {"ttft": [r.ttft for r in good if r.ttft is not None],
              "itl": [x for r in good for x in r.itls],
              "e2e": [r.end - r.start for r in good]}
    for name, values in series.items():
        for q in (50, 90, 99):
            row[f"{name}_p{q}_s"] = pct(values, q)
    return row


async def run_level(url: str, make_body: Callable[[int], dict[str, Any]], *, concurrency: int | None = None,
                    rate: float | None = None, requests: int, seed: int = 0,
                    progress: Callable[[], None] | None = None,
                    session: aiohttp.ClientSession | None = None,
                    headers: dict[str, str] | None = None) -> tuple[list[Result], float]:
    """Run ``requests`` requests, either ``concurrency`` at a time (a closed loop) or arriving as a
    Poisson process of ``rate`` per second (an open loop). Returns the results and the wall time."""
    own = session is None
    if own:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=600))
    results: list[Result] = []
    try:
        t0 = time.perf_counter()
        if rate:
            rng = random.Random(seed)
            tasks = []
            next_at = t0
            for i in range(requests):
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.create_task(one_request(session, url, make_body(i))))
                if progress:
                    tasks[-1].add_done_callback(lambda _: progress())
                next_at += rng.expovariate(rate)
            results = list(await asyncio.gather(*tasks))
        else:
            counter = iter(range(requests))

            async def worker() -> None:
                for i in counter:
                    results.append(await one_request(session, url, make_body(i)))
                    if progress:
                        progress()
            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        return results, time.perf_counter() - t0
    finally:
        if own:
            await session.close()


LATENCY = re.compile(r"_p\d+_s$")  # latency columns, shown in ms
COLUMNS = [("target", "target", "{}"), ("concurrency", "conc", "{}"), ("rate", "rate/s", "{}"),
           ("requests", "req", "{}"), ("errors", "err", "{}"), ("req_per_s", "req/s", "{:.2f}"),
           ("output_tok_per_s", "out tok/s", "{:.1f}"), ("ttft_p50_s", "TTFT p50 ms", "{:.1f}"),
           ("ttft_p99_s", "TTFT p99 ms", "{:.1f}"), ("itl_p50_s", "ITL p50 ms", "{:.2f}"),
           ("itl_p99_s", "ITL p99 ms", "{:.2f}"), ("e2e_p50_s", "E2E p50 ms", "{:.1f}"),
           ("e2e_p90_s", "E2E p90 ms", "{:.1f}"), ("e2e_p99_s", "E2E p99 ms", "{:.1f}")]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (latencies in ms), columns that no row has left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None:
                cells.append("")
            else:
                cells.append(fmt.format(v * 1000 if LATENCY.search(key) else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Latency (TTFT and end-to-end p50) against output tokens/s, one line per target, one point
    per load level (the median over that level's runs), as a PNG. Returns False where matplotlib
    is not installed (``pip install matplotlib``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import statistics
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r.get("target", "") for r in rows):
        levels: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get("target", "") == target and r["output_tok_per_s"] > 0:
                levels.setdefault(r.get("concurrency") or r.get("rate"), []).append(r)
        points = sorted(levels.items(), key=lambda kv: kv[0] or 0)
        x = [statistics.median(r["output_tok_per_s"] for r in runs) for _, runs in points]
        for ax, key in zip(axes, ("ttft_p50_s", "e2e_p50_s")):
            y = [statistics.median((r[key] or 0) * 1000 for r in runs) for _, runs in points]
            ax.plot(x, y, marker="o", label=target or "server")
            for (level, _), xi, yi in zip(points, x, y):
                ax.annotate(str(level), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, name in zip(axes, ("TTFT p50 (ms)", "end-to-end p50 (ms)")):
        ax.set_xlabel("output tokens/s (labels: concurrency or rate)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], out: Path, title: str, meta: dict[str, Any]) -> None:
    """``out``.json (meta + rows), ``out``.md and ``out``.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(f"# {title}\n\n" + markdown(rows))
    plot(rows, out.with_suffix(".png"), title)


def machine() -> dict[str, Any]:
    """Where a figure came from: CPU model, cores, RAM, Python."""
    import os
    import platform
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: Sequence[str] | None = None) -> None:
    import click

    @click.command()
    @click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Server base URL.")
    @click.option("--model", default="smollm2", show_default=True)
    @click.option("--route", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
    @click.option("--stream/--no-stream", default=True, show_default=True)
    @click.option("--concurrency", default="1,4,16", show_default=True,
                  help="Comma-separated fixed concurrencies (a closed loop each).")
    @click.option("--rate", default="", help="Comma-separated Poisson arrival rates per second "
                  "(an open loop each), instead of --concurrency.")
    @click.option("--requests", "n", type=click.IntRange(1), default=64, show_default=True,
                  help="Requests per level.")
    @click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
    @click.option("--prompt-words", type=click.IntRange(0), default=0,
                  help="Synthetic prompts of this many words instead of the bundled set.")
    @click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
                  help="Ask vLLM for exactly --max-tokens tokens.")
    @click.option("--api-key", envvar="OPENAI_API_KEY", default="")
    @click.option("--out", type=click.Path(path_type=Path), default=Path("loadtest/results/loadgen"),
                  show_default=True, help="Report path without suffix (.json, .md, .png).")
    def cli(url, model, route, stream, concurrency, rate, n, max_tokens, prompt_words, ignore_eos,
            api_key, out):
        """Sweep fixed concurrencies or Poisson rates against an OpenAI-compatible server."""
        from tqdm import tqdm

        path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        rng = random.Random(0)
        prompts = [synthetic_prompt(prompt_words, rng) if prompt_words else PROMPTS[i % len(PROMPTS)]
                   for i in range(n)]
        levels = ([("rate", float(x)) for x in rate.split(",") if x] or
                  [("concurrency", int(x)) for x in concurrency.split(",") if x])
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

        async def go() -> list[dict[str, Any]]:
            rows = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=600)) as session:
                for kind, value in levels:
                    bar = tqdm(total=n, desc=f"{kind} {value}", unit="req", leave=False)
                    results, wall = await run_level(
                        url.rstrip("/") + path,
                        lambda i: payload(model, route, stream, max_tokens, prompts[i], ignore_eos),
                        requests=n, progress=lambda: bar.update(1), session=session,
                        **{kind: value})
                    bar.close()
                    row = summarize(results, wall, target=url, **{kind: value})
                    rows.append(row)
                    click.echo(markdown([row]).splitlines()[-1])
                    errors = [r.error for r in results if r.error]
                    if errors:
                        click.echo(f"  {len(errors)} errors, first: {errors[0]}", err=True)
            return rows

        rows = asyncio.run(go())
        write_report(rows, out, f"{model} via {url}", {"machine": machine(), "route": route,
                     "stream": stream, "max_tokens": max_tokens, "requests": n})
        click.echo("\n" + markdown(rows))
        click.echo(f"wrote {out}.json, {out}.md, {out}.png")

    cli.main(args=list(argv) if argv is not None else None, prog_name="python -m loadtest.loadgen")


if __name__ == "__main__":
    main()
