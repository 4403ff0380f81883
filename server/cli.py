"""The ``vramgate`` command line (click). Commands build settings and run; nothing else happens here.

Environment variables (read here and nowhere else): ``VRAMGATE_CONFIG``, ``VRAMGATE_HOST``,
``VRAMGATE_PORT``, ``VRAMGATE_DATA_DIR``, ``VRAMGATE_URL``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from server import cli_batches, cli_plan, cli_remote
from server.configload import load_settings
from server.errors import ConfigError

GC_GEN0 = 10_000  # first-generation threshold while serving (tune_gc)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit (``RLIMIT_NOFILE``) to its hard limit, as vLLM's
    own server does: each open stream holds two sockets here (client and engine), so 5,000
    streams need 10,000 descriptors. Returns the soft limit before and after (unchanged where
    the OS refuses or has no such limit)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft == resource.RLIM_INFINITY or soft >= want:
            return soft, soft
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return -1, -1


def tune_gc(gen0: int) -> tuple[int, int]:
    """Tune the cyclic garbage collector for serving; returns the objects frozen and the old
    first-generation threshold.

    Everything start-up made (modules, classes, the app: ~54,000 objects) is moved to the
    permanent generation (``gc.freeze``), so a full collection no longer walks it; and the first
    generation is collected every ``gen0`` net allocations of tracked objects instead of
    Python's 700. A request allocates dicts, coroutines and futures that mostly die by reference
    count; at 700 the gateway collected once every ~14 requests and spent ~10% of its CPU in
    collections (issue #15, measured with ``gc.callbacks`` at concurrency 32)."""
    import gc

    gc.collect()
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(gen0, old[1], old[2])
    return gc.get_freeze_count(), old[0]


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
@click.option("--access-log/--no-access-log", default=None, envvar="VRAMGATE_ACCESS_LOG",
              help="One log line per request (default: on, or the config's access_log).")
def serve(config_path: Path | None, host: str | None, port: int | None, data_dir: Path | None,
          log_level: str, api_keys: tuple[str, ...], admin_key: str | None,
          access_log: bool | None) -> None:
    """Run the gateway; preloaded models start at once, the others on their first request."""
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
                             api_keys=keys, admin_key=admin_key, access_log=access_log)

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
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)  # a bind-all address
    base = f"http://{'[' + shown + ']' if ':' in shown else shown}:{settings.port}"
    run_gateway(create_app, settings, reload, log_level,
                banner=f"vramgate: serving {names} on {base}/v1 (engine logs in {settings.log_dir}); "
                       f"web console: {base}/ui")


def run_gateway(create_app: Any, settings: Any, reload: Any, log_level: str, banner: str = "") -> None:
    """The serving process: its open-file limit and garbage collector tuned, access lines
    straight to stderr beside the root handler's lines (``server.accesslog``), and uvicorn,
    which tells the gateway the moment SIGTERM/SIGINT arrives (to stop admitting). ``banner``
    goes to stderr once the port is bound, never before a bind that fails (uvicorn then exits 3)."""
    import uvicorn

    from server.accesslog import AccessLog

    before, after = raise_open_files_limit()
    if after > before:
        logging.getLogger("vramgate").info("open-file limit raised from %d to %d", before, after)
    app = create_app(settings, reload=reload, access=AccessLog(sys.stderr))
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_timeout))

    class GatewayServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            hook = getattr(app.state, "begin_shutdown", None)
            if hook is not None and not self.should_exit:
                hook()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and banner:
                click.echo(banner, err=True)

    tune_gc(GC_GEN0)
    GatewayServer(config).run()  # the lifespan flushes the last access lines (server.app)


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


for _command in (*cli_remote.COMMANDS, *cli_plan.COMMANDS, *cli_batches.COMMANDS):
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
