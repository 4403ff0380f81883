"""The ``vramgate`` command line (click). Commands build settings and run; nothing else happens here.

Environment variables (read here and nowhere else): ``VRAMGATE_CONFIG``, ``VRAMGATE_HOST``,
``VRAMGATE_PORT``, ``VRAMGATE_DATA_DIR``, ``VRAMGATE_URL``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from server.config import load_settings
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
@click.option("--port", type=int, envvar="VRAMGATE_PORT", help="Port to listen on (default 8000).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="VRAMGATE_DATA_DIR",
              help="Embedded models and engine logs (default ~/.cache/vramgate).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config_path: Path | None, host: str | None, port: int | None, data_dir: Path | None,
          log_level: str) -> None:
    """Run the gateway and start an engine for every configured model."""
    import uvicorn

    from server.app import create_app
    from server.models import embedded_models, ensure_prepared

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    used_embedded: list[Path] = []

    def defaults(ddir: Path):
        used_embedded.append(ddir)
        return embedded_models(ddir)

    try:
        settings = load_settings(config_path, default_models=defaults, host=host, port=port,
                                 data_dir=data_dir.expanduser() if data_dir else None)
    except ConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None
    if used_embedded:
        try:
            ensure_prepared(settings.data_dir)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None
    names = ", ".join(m.name for m in settings.models)
    click.echo(f"vramgate: serving {names} on http://{settings.host}:{settings.port}/v1 "
               f"(engine logs in {settings.log_dir})", err=True)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_timeout))
    uvicorn.Server(config).run()


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
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def models(url: str, as_json: bool) -> None:
    """List the configured models of a running server and their state."""
    import httpx

    try:
        resp = httpx.get(url.rstrip("/") + "/v1/models", timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot read {url}/v1/models: {exc}") from None
    data = resp.json()["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("MODEL", "STATE", "TASK", "DEVICE", "ALIASES")]
    rows += [(m["id"], m.get("state", "?"), m.get("task", "?"), m.get("device", "?"),
              ",".join(m.get("aliases", [])) or "-") for m in data]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
