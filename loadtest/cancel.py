"""How fast a hung-up completion stops at the engine, in decode steps.

    python -m loadtest.cancel [--runs 10] [--model chat|fim]

IDE clients drop a completion on every keystroke, so the engine must stop within about one decode
step of the disconnect. The gateway serves the embedded chat model; each run streams a long answer
through it (a FIM request by default: ``suffix`` with a format string of SmolLM2's tokens), reads
a few tokens, measures the stream's inter-token gap (one decode step), closes the connection, and
polls the engine's own ``vllm:num_requests_running`` every 5 ms until it is 0. The same is done
straight to the engine (the rendered prompt, no gateway) over its Unix socket, alternating, so the
gateway's share is seen beside vLLM's own. The gateway reaches the engine as it does by default
(``engine_transport: unix``, through ``server/engineclient.py``). Reports the abort latency (hang-up → 0 running) in milliseconds and in
decode steps for both paths; writes ``loadtest/results/cancel.json``. vLLM updates the gauge once
per step, so each figure includes up to a step of reporting lag.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import click
import httpx

from loadtest.loadgen import machine
from loadtest.procs import ROOT, start_gateway

CHAT = "SmolLM2-135M-Instruct"


def running(client: httpx.Client) -> float:
    """The engine's ``vllm:num_requests_running`` (``client`` talks to the engine's socket)."""
    text = client.get("http://engine/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def connect(where: int | str) -> socket.socket:
    """A connection to the gateway's loopback port, or to the engine's Unix socket (a path)."""
    if isinstance(where, int):
        return socket.create_connection(("127.0.0.1", where), timeout=60)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(where)
    return sock


def one(where: int | str, body: bytes, client: httpx.Client) -> tuple[float, float]:
    """(seconds from hang-up to 0 running, median seconds between token events before it), for a
    stream sent to ``where``: the gateway's port, or the engine's socket."""
    sock = connect(where)
    arrivals = []
    try:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a loopback
                     "Content-Type: application/json\r\n"  # gateway refuses other Host names
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while len(arrivals) < 12:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the stream ended early")
            seen += chunk
            arrivals += [time.perf_counter()] * chunk.count(b"data: {")
    finally:
        sock.close()
    hung_up = time.perf_counter()
    while running(client) != 0.0:
        if time.perf_counter() - hung_up > 30:
            raise RuntimeError("the engine kept generating")
        time.sleep(0.005)
    gaps = [b - a for a, b in zip(arrivals[2:], arrivals[3:]) if b > a]
    return time.perf_counter() - hung_up, statistics.median(gaps)


@click.command()
@click.option("--runs", default=10, show_default=True)
def main(runs: int) -> None:
    """Abort latency of a hung-up stream, against the stream's own decode step."""
    from server.models import ensure_prepared

    data_dir = Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))
    ensure_prepared(data_dir)
    config = {"models": [{"name": "coder", "path": str(data_dir / "models" / CHAT), "preload": True,
                          "fim": "<repo_name>{suffix}<file_sep>{prefix}"}]}
    common = {"model": "coder", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    body = json.dumps({**common, "prompt": "def main():\n    ", "suffix": "\n    return 0\n"}).encode()
    rendered = json.dumps({**common, "prompt": "<repo_name>\n    return 0\n<file_sep>def main():\n    "})
    results: dict[str, list[tuple[float, float]]] = {"gateway": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="cancel-") as tmp:
        proc, url = start_gateway(config, Path(tmp), data_dir=data_dir)
        try:
            engine = engine_socket(url, "coder")
            where = {"gateway": int(url.rsplit(":", 1)[1]), "direct": engine}
            bodies = {"gateway": body, "direct": rendered.encode()}
            with httpx.Client(timeout=10, transport=httpx.HTTPTransport(uds=engine)) as client:
                for i in range(runs * 2):
                    path = ("gateway", "direct")[i % 2]
                    results[path].append(one(where[path], bodies[path], client))
        finally:
            proc.stop()
    summary = {path: summarize(runs_) for path, runs_ in results.items()}
    summary["gateway_over_direct_p50"] = summary["gateway"]["abort_ms_p50"] / summary["direct"]["abort_ms_p50"]
    print(json.dumps(summary, indent=2))
    out = ROOT / "loadtest" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cancel.json").write_text(json.dumps({"machine": machine(), "summary": summary,
                                                 "runs": results}, indent=2))


def engine_socket(gateway_url: str, model: str) -> str:
    """The Unix socket of ``model``'s first engine (``GET /admin/models``: ``unix:/path``)."""
    models = httpx.get(gateway_url + "/admin/models", timeout=10).json()["data"]
    address = next(m for m in models if m["id"] == model)["replicas"][0]["url"]
    if not address or not address.startswith("unix:"):
        raise RuntimeError(f"the engine of {model} is not on a Unix socket: {address}")
    return address[len("unix:"):]


def summarize(results: list[tuple[float, float]]) -> dict[str, float]:
    """Abort latency (ms, and in decode steps of the same stream) over ``results``."""
    aborts = sorted(a for a, _ in results)
    steps = sorted(a / g for a, g in results)
    return {"runs": len(results), "abort_ms_p50": statistics.median(aborts) * 1e3,
            "abort_ms_max": aborts[-1] * 1e3,
            "decode_step_ms_p50": statistics.median(g for _, g in results) * 1e3,
            "abort_steps_p50": statistics.median(steps), "abort_steps_max": steps[-1]}


if __name__ == "__main__":
    main()
