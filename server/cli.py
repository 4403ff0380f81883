"""The ``vramgate`` command line (click). Commands build settings and run; nothing else happens here.

Environment variables (read here and nowhere else): ``VRAMGATE_CONFIG``, ``VRAMGATE_HOST``,
``VRAMGATE_PORT``, ``VRAMGATE_DATA_DIR``, ``VRAMGATE_URL``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from urllib.parse import quote

import click

from server.configload import load_settings
from server.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vramgate")
def main() -> None:
    """vramgate: an OpenAI-compatible server that runs vLLM engines and routes requests to them.

    Start it with `vramgate serve`; with no config it serves the embedded models
    (SmolLM2-135M-Instruct for chat and completions, all-MiniLM-L6-v2 for embeddings).
    """


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="VRAMGATE_CONFIG", help="YAML config file (default: serve the embedded models).")
@click.option("--host", envvar="VRAMGATE_HOST", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), envvar="VRAMGATE_PORT",
              help="Port to listen on (default 8000).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="VRAMGATE_DATA_DIR",
              help="Embedded models and engine logs (default ~/.cache/vramgate).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--api-key", "api_keys", multiple=True, envvar="VRAMGATE_API_KEYS",
              help="An API key clients must send (repeatable; the variable takes a comma list).")
@click.option("--admin-key", envvar="VRAMGATE_ADMIN_KEY", help="The key /admin/* routes need.")
def serve(config_path: Path | None, host: str | None, port: int | None, data_dir: Path | None,
          log_level: str, api_keys: tuple[str, ...], admin_key: str | None) -> None:
    """Run the gateway; preloaded models start at once, the others on their first request."""
    import uvicorn

    from server.app import create_app
    from server.models import embedded_models, ensure_prepared

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    used_embedded: list[Path] = []

    def defaults(ddir: Path):
        used_embedded.append(ddir)
        return embedded_models(ddir)

    keys = tuple(k.strip() for raw in api_keys for k in raw.split(",") if k.strip())

    def reload():
        return load_settings(config_path, default_models=defaults, host=host, port=port,
                             data_dir=data_dir.expanduser() if data_dir else None,
                             api_keys=keys, admin_key=admin_key)

    try:
        settings = reload()
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.auth.enabled:
        logging.getLogger("vramgate").warning(
            "listening on %s without API keys: anyone who can reach it can use and control it "
            "(set api_keys in the config, --api-key or VRAMGATE_API_KEYS)", settings.host)
    if used_embedded:
        try:
            ensure_prepared(settings.data_dir)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    names = ", ".join(m.name for m in settings.models)
    click.echo(f"vramgate: serving {names} on http://{settings.host}:{settings.port}/v1 "
               f"(engine logs in {settings.log_dir})", err=True)
    app = create_app(settings, reload=reload)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_timeout))

    class GatewayServer(uvicorn.Server):
        """uvicorn, telling the gateway the moment SIGTERM/SIGINT arrives (to stop admitting)."""

        def handle_exit(self, sig, frame) -> None:
            hook = getattr(app.state, "begin_shutdown", None)
            if hook is not None and not self.should_exit:
                hook()
            super().handle_exit(sig, frame)

    GatewayServer(config).run()


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="VRAMGATE_DATA_DIR",
              default=Path.home() / ".cache" / "vramgate", show_default=True)
def prepare(data_dir: Path) -> None:
    """Prepare the embedded models into DATA_DIR/models (idempotent)."""
    from server.models import ensure_prepared

    try:
        ensure_prepared(data_dir.expanduser())
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"embedded models ready in {data_dir / 'models'}")


@main.command()
@click.option("--url", envvar="VRAMGATE_URL", default=DEFAULT_URL, show_default=True,
              help="Base URL of a running vramgate.")
@click.option("--key", envvar=["VRAMGATE_API_KEY", "VRAMGATE_ADMIN_KEY"],
              help="API key for a server with keys (default: $VRAMGATE_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def models(url: str, key: str | None, as_json: bool) -> None:
    """List the configured models of a running server and their state."""
    data = _admin(url, "GET", "/v1/models", timeout=10, key=key)["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("MODEL", "STATE", "TASK", "DEVICE", "ALIASES")]
    rows += [(m["id"], m.get("state", "?"), m.get("task", "?"), m.get("device", "?"),
              ",".join(m.get("aliases", [])) or "-") for m in data]
    _table(rows)


def _admin(url: str, method: str, path: str, timeout: float = 30, key: str | None = None) -> dict:
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(method, url.rstrip("/") + path, timeout=timeout, headers=headers)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
    if resp.status_code >= 400:
        raise click.ClickException(data.get("error", {}).get("message") or f"HTTP {resp.status_code}")
    return data


_url = click.option("--url", envvar="VRAMGATE_URL", default=DEFAULT_URL, show_default=True,
                    help="Base URL of a running vramgate.")
_key = click.option("--key", envvar=["VRAMGATE_ADMIN_KEY", "VRAMGATE_API_KEY"],
                    help="Key for a server with API keys (default: $VRAMGATE_ADMIN_KEY).")


@main.command()
@_url
@_key
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def ps(url: str, key: str | None, as_json: bool) -> None:
    """The engines of a running server: state, placement, memory, uptime, requests in flight."""
    data = _admin(url, "GET", "/admin/models", key=key)["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("MODEL", "REPLICA", "STATE", "DEVICES", "RESERVED", "MEASURED", "UPTIME", "IDLE",
             "IN FLIGHT", "PID")]
    for m in data:
        for r in m["replicas"]:
            p = r.get("placement") or {}
            rows.append((m["id"], str(r["index"]), r["state"], "+".join(p.get("devices", [])) or "-",
                         _gib(p.get("reserved_bytes")), _gib(p.get("measured_bytes")),
                         "-" if r["uptime_s"] is None else f"{r['uptime_s']:.0f}s",
                         "-" if r["idle_s"] is None else f"{r['idle_s']:.0f}s",
                         str(r["in_flight"]), str(r["pid"] or "-")))
    _table(rows)
    for m in data:
        if m.get("error") and m["state"] != "ready":
            click.echo(f"\n{m['id']} ({m['state']}): {m['error']}")


@main.command()
@click.argument("name")
@_url
@_key
def load(name: str, url: str, key: str | None) -> None:
    """Load model NAME on a running server and wait until it is ready."""
    data = _admin(url, "POST", f"/admin/models/{quote(name, safe='')}/load", timeout=1800, key=key)
    click.echo(f"{data['id']}: {data['state']}")


@main.command()
@click.argument("name")
@_url
@_key
@click.option("--force", is_flag=True, help="Do not wait for in-flight requests.")
def unload(name: str, url: str, key: str | None, force: bool) -> None:
    """Unload model NAME on a running server (after its in-flight requests, unless --force)."""
    data = _admin(url, "POST", f"/admin/models/{quote(name, safe='')}/unload" + ("?force=true" if force else ""),
                  timeout=1800, key=key)
    click.echo(f"{data['id']}: {data['state']}")


@main.command()
@click.argument("name")
@_url
@_key
@click.option("-n", "--lines", default=200, show_default=True, type=click.IntRange(1, 5000))
def logs(name: str, url: str, key: str | None, lines: int) -> None:
    """The last lines of model NAME's engine log(s) on a running server."""
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/admin/models/{quote(name, safe='')}/logs",
                         params={"lines": lines}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
    if resp.status_code >= 400:
        raise click.ClickException(resp.json().get("error", {}).get("message", f"HTTP {resp.status_code}"))
    click.echo(resp.text, nl=False)


def _settings_or_exit(config_path: Path | None, data_dir: Path | None, **overrides):
    from server.models import embedded_models
    try:
        return load_settings(config_path, default_models=embedded_models,
                             data_dir=data_dir.expanduser() if data_dir else None, **overrides)
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


_simulate = click.option("--simulate-gpus", envvar="VRAMGATE_SIMULATE_GPUS", metavar="SPEC",
                         help="A simulated layout instead of NVML, e.g. 2x80GiB@20GiB,1x24GiB.")


@main.command()
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
    rows += [(d["id"], d["name"], _gib(d["total_bytes"]),
              _gib(d["total_bytes"] - d["free_bytes"]), _gib(d["free_bytes"])) for d in view]
    _table(rows)
    if not any(d["kind"] == "cuda" for d in view):
        click.echo("(no GPU found by NVML: engines run on the CPU)")


@main.command()
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
            rows.append((req.model, "+".join(res.devices), str(res.tensor_parallel_size),
                         _gib(res.bytes_per_device),
                         "-" if res.gpu_memory_utilization is None else
                         f"{res.gpu_memory_utilization:.4f}", tools(req.model), fim(req.model),
                         res.why))
        else:
            rows.append((req.model, "DOES NOT FIT", "-", "-", "-", tools(req.model),
                         fim(req.model), res.reason))
    _table(rows)


if __name__ == "__main__":
    sys.exit(main())
