"""The ``vramgate`` commands that read this machine and a config without starting anything:
``gpus`` (NVML or a simulated layout) and ``plan`` (where each model would go, and why)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from server.cli_remote import gib, table
from server.configload import load_settings
from server.errors import ConfigError


def _settings_or_exit(config_path: Path | None, data_dir: Path | None, **overrides):
    from server.models import embedded_models
    try:
        return load_settings(config_path, default_models=embedded_models,
                             data_dir=data_dir.expanduser() if data_dir else None, **overrides)
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None



_simulate = click.option("--simulate-gpus", envvar="VRAMGATE_SIMULATE_GPUS", metavar="SPEC",
                         help="A simulated layout instead of NVML, e.g. 2x80GiB@20GiB,1x24GiB.")


@click.command()
@_simulate
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gpus(simulate_gpus: str | None, as_json: bool) -> None:
    """The devices on this machine (NVML, or a simulated layout) and the CPU."""
    from server.admin import inventory_view
    from server.gpus import make_inventory

    try:
        snap = make_inventory(simulate_gpus).snapshot()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    view = inventory_view(snap, (), 0)
    if as_json:
        click.echo(json.dumps({"source": snap.source, "devices": view}, indent=2))
        return
    rows = [("DEVICE", "NAME", "TOTAL", "USED", "FREE")]
    rows += [(d["id"], d["name"], gib(d["total_bytes"]),
              gib(d["total_bytes"] - d["free_bytes"]), gib(d["free_bytes"])) for d in view]
    table(rows)
    if not any(d["kind"] == "cuda" for d in view):
        click.echo("(no GPU found by NVML: engines run on the CPU)")


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="VRAMGATE_CONFIG", help="YAML config (default: the embedded models).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="VRAMGATE_DATA_DIR")
@_simulate
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(config_path: Path | None, data_dir: Path | None, simulate_gpus: str | None,
         as_json: bool) -> None:
    """Where each configured model would go now, and why; what does not fit and by how much; the
    tool-call parser and FIM format each model gets."""
    from server.gpus import make_inventory
    from server.placement import Plan
    from server.dryrun import dry_run

    from server.profile import read_profiles

    settings = _settings_or_exit(config_path, data_dir, simulate_gpus=simulate_gpus)
    try:
        snap = make_inventory(settings.simulate_gpus).snapshot()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    results = dry_run(settings, snap)
    profiles = read_profiles(settings.models)

    def tools(model: str) -> str:
        return profiles[model].tool_parser or "-"

    def fim(model: str) -> str:
        found = profiles[model].fim
        return found.family if found else "-"

    if as_json:
        out = []
        for req, res in results:
            item = {"model": req.model, "kind": req.kind, "weight_bytes": req.weight_bytes,
                    "kv_cache_bytes": req.kv_cache_bytes, "overhead_bytes": req.overhead_bytes,
                    "tool_parser": profiles[req.model].tool_parser,
                    "fim": None if fim(req.model) == "-" else fim(req.model)}
            model = settings.resolve(req.model)
            if model is not None and model.distributed is not None and req.kind != "remote":
                item["distributed"] = {"backend": model.distributed.backend,
                                       "address": model.distributed.address,
                                       "tensor_parallel_size": model.tensor_parallel_size or 1,
                                       "pipeline_parallel_size": model.pipeline_parallel_size}
            if isinstance(res, Plan):
                item.update(fits=True, devices=list(res.devices),
                            tensor_parallel_size=res.tensor_parallel_size,
                            bytes_per_device=res.bytes_per_device,
                            gpu_memory_utilization=res.gpu_memory_utilization, why=res.why)
            else:
                item.update(fits=False, short_bytes=res.short_bytes, why=res.reason)
            out.append(item)
        click.echo(json.dumps({"source": snap.source, "policy": settings.placement, "models": out},
                              indent=2))
        return
    rows = [("MODEL", "DEVICES", "TP", "PER DEVICE", "GPU MEM UTIL", "TOOLS", "FIM", "WHY")]
    for req, res in results:
        if isinstance(res, Plan):
            rows.append((req.model, "+".join(res.devices) or "remote", str(res.tensor_parallel_size),
                         gib(res.bytes_per_device),
                         "-" if res.gpu_memory_utilization is None else
                         f"{res.gpu_memory_utilization:.4f}", tools(req.model), fim(req.model),
                         res.why))
        else:
            rows.append((req.model, "DOES NOT FIT", "-", "-", "-", tools(req.model),
                         fim(req.model), res.reason))
    table(rows)


COMMANDS = (gpus, plan)
