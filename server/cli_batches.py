"""``vramgate batches``: the Batch API of a running server from the command line (``list``,
``show``, ``cancel``), over ``/v1/batches`` with the caller's key (each key sees its own batches;
the admin key sees all). Progress is shown as done/total lines."""

from __future__ import annotations

import json
from urllib.parse import quote

import click

from server.cli_remote import call_server, table, url_option

_key = click.option("--key", envvar=["VRAMGATE_API_KEY", "VRAMGATE_ADMIN_KEY"],
                    help="API key (default: $VRAMGATE_API_KEY, then $VRAMGATE_ADMIN_KEY).")


def progress(batch: dict) -> str:
    """``done/total`` lines, with the failed ones named."""
    c = batch.get("request_counts") or {}
    done = c.get("completed", 0) + c.get("failed", 0)
    failed = f" ({c['failed']} failed)" if c.get("failed") else ""
    return f"{done}/{c.get('total', 0)}{failed}"


@click.group()
def batches() -> None:
    """Batches on a running server: list, show, cancel."""


@batches.command("list")
@url_option
@_key
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def list_(url: str, key: str | None, limit: int, as_json: bool) -> None:
    """The newest batches: id, status, model, endpoint, progress."""
    data = call_server(url, "GET", f"/v1/batches?limit={limit}", key=key)["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("BATCH", "STATUS", "MODEL", "ENDPOINT", "DONE/TOTAL")]
    rows += [(b["id"], b["status"], b.get("model") or "-", b["endpoint"], progress(b)) for b in data]
    table(rows)


@batches.command()
@click.argument("batch_id")
@url_option
@_key
def show(batch_id: str, url: str, key: str | None) -> None:
    """One batch, whole (JSON), after a line of progress."""
    b = call_server(url, "GET", f"/v1/batches/{quote(batch_id, safe='')}", key=key)
    click.echo(f"{b['id']}: {b['status']}, {progress(b)} lines")
    for error in ((b.get("errors") or {}).get("data") or [])[:5]:
        where = f" (line {error['line']})" if error.get("line") else ""
        click.echo(f"  {error['code']}{where}: {error['message']}")
    click.echo(json.dumps(b, indent=2))


@batches.command()
@click.argument("batch_id")
@url_option
@_key
def cancel(batch_id: str, url: str, key: str | None) -> None:
    """Cancel a batch: the lines in flight finish, the rest are not run."""
    b = call_server(url, "POST", f"/v1/batches/{quote(batch_id, safe='')}/cancel", key=key)
    click.echo(f"{b['id']}: {b['status']}, {progress(b)} lines")


COMMANDS = (batches,)
