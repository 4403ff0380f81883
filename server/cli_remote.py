"""The ``vramgate`` commands that talk to a running server over HTTP (httpx): ``models``, ``ps``,
``load``, ``unload``, ``logs``. ``VRAMGATE_URL`` names the server; ``VRAMGATE_ADMIN_KEY`` or
``VRAMGATE_API_KEY`` the key."""

from __future__ import annotations

import json
from urllib.parse import quote

import click

DEFAULT_URL = "http://127.0.0.1:8000"


def gib(n: int | None) -> str:
    """``n`` bytes in GiB, two decimals; ``-`` for ``None``."""
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(rows: list[tuple[str, ...]]) -> None:
    """Echo ``rows`` (the first is the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())



@click.command()
@click.option("--url", envvar="VRAMGATE_URL", default=DEFAULT_URL, show_default=True,
              help="Base URL of a running vramgate.")
@click.option("--key", envvar=["VRAMGATE_API_KEY", "VRAMGATE_ADMIN_KEY"],
              help="API key for a server with keys (default: $VRAMGATE_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def models(url: str, key: str | None, as_json: bool) -> None:
    """List the configured models of a running server and their state."""
    data = call_server(url, "GET", "/v1/models", timeout=10, key=key)["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("MODEL", "STATE", "TASK", "DEVICE", "ALIASES")]
    rows += [(m["id"], m.get("state", "?"), m.get("task", "?"), m.get("device", "?"),
              ",".join(m.get("aliases", [])) or "-") for m in data]
    table(rows)


def call_server(url: str, method: str, path: str, timeout: float = 30, key: str | None = None) -> dict:
    """``method path`` on the server at ``url`` with ``key``: the JSON answer. Raises
    ``click.ClickException`` with the server's error message, or when it cannot be reached."""
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


url_option = click.option("--url", envvar="VRAMGATE_URL", default=DEFAULT_URL, show_default=True,
                    help="Base URL of a running vramgate.")
_key = click.option("--key", envvar=["VRAMGATE_ADMIN_KEY", "VRAMGATE_API_KEY"],
                    help="Key for a server with API keys (default: $VRAMGATE_ADMIN_KEY).")


@click.command()
@url_option
@_key
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def ps(url: str, key: str | None, as_json: bool) -> None:
    """The engines of a running server: state, placement, memory, uptime, requests in flight."""
    data = call_server(url, "GET", "/admin/models", key=key)["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("MODEL", "REPLICA", "STATE", "DEVICES", "RESERVED", "MEASURED", "UPTIME", "IDLE",
             "IN FLIGHT", "PID")]
    for m in data:
        for r in m["replicas"]:
            p = r.get("placement") or {}
            rows.append((m["id"], str(r["index"]), r["state"], "+".join(p.get("devices", [])) or "-",
                         gib(p.get("reserved_bytes")), gib(p.get("measured_bytes")),
                         "-" if r["uptime_s"] is None else f"{r['uptime_s']:.0f}s",
                         "-" if r["idle_s"] is None else f"{r['idle_s']:.0f}s",
                         str(r["in_flight"]), str(r["pid"] or "-")))
    table(rows)
    for m in data:
        if m.get("error") and m["state"] != "ready":
            click.echo(f"\n{m['id']} ({m['state']}): {m['error']}")


@click.command()
@click.argument("name")
@url_option
@_key
def load(name: str, url: str, key: str | None) -> None:
    """Load model NAME on a running server and wait until it is ready."""
    data = call_server(url, "POST", f"/admin/models/{quote(name, safe='')}/load", timeout=1800, key=key)
    click.echo(f"{data['id']}: {data['state']}")


@click.command()
@click.argument("name")
@url_option
@_key
@click.option("--force", is_flag=True, help="Do not wait for in-flight requests.")
def unload(name: str, url: str, key: str | None, force: bool) -> None:
    """Unload model NAME on a running server (after its in-flight requests, unless --force)."""
    data = call_server(url, "POST", f"/admin/models/{quote(name, safe='')}/unload" + ("?force=true" if force else ""),
                  timeout=1800, key=key)
    click.echo(f"{data['id']}: {data['state']}")


@click.command()
@click.argument("name")
@url_option
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


COMMANDS = (models, ps, load, unload, logs)
