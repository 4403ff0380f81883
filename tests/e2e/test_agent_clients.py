"""The real agent CLIs against the gateway on the embedded models, with no gateway configuration:
Claude Code, Codex, the Continue CLI, Cline, Aider and llm (``tests/clients``), each run once,
non-interactively, with the README's configuration.

Each must exit 0 with an answer, and the gateway's access log must show its request answered 200 on
the route it uses, carrying tools for the clients that send them. The clients are installed at
pinned versions by ``scripts/install-clients.sh`` (cached in ``~/.cache/vramgate/clients``).
Their output budget is set to 512 tokens in their own configuration where they allow it (the
135M model on two CPU cores writes about 20 tokens a second); Codex cannot be told one.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import clients
from tests.gateway import ROOT, Gateway, embedded_data_dir

pytestmark = pytest.mark.e2e
ACCESS = re.compile(r"vramgate\.access: .*?route=(\S+) .*?status=(\d+)(?: .*?tools=(\d+))?")


@pytest.fixture(scope="module")
def installed():
    subprocess.run([str(ROOT / "scripts" / "install-clients.sh")], check=True, timeout=1200)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, installed):
    data_dir = embedded_data_dir()
    gateway = Gateway(tmp_path_factory.mktemp("agents"), None, data_dir=data_dir)
    try:
        gateway.wait_up(timeout=300)
        assert set(gateway.wait_states(timeout=400).values()) == {"ready"}
        yield gateway
    finally:
        gateway.stop()


def access_lines(text: str) -> list[tuple[str, int, int]]:
    """(route, status, tools) of every access-log line in ``text``."""
    return [(m[1], int(m[2]), int(m[3] or 0)) for m in ACCESS.finditer(text)]


@pytest.mark.parametrize("name", clients.NAMES)
def test_the_client_answers_through_the_gateway(gw, name, tmp_path):
    before = len(gw.log_text())
    run = clients.run(name, gw.url, "smollm2", "Say hello", tmp_path, timeout=420)
    detail = f"rc={run.rc} in {run.seconds:.0f} s\nstdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-1500:]}"
    assert run.rc == 0, detail
    assert run.stdout.strip() and "litellm." not in run.stdout, detail  # aider exits 0 on API errors
    assert run.leftovers == [], detail
    seen = access_lines(gw.log_text()[before:])
    mine = [s for s in seen if s[0] == clients.ROUTE[name]]
    assert mine and all(status == 200 for _, status, _ in mine), (seen, detail)
    if name in clients.SENDS_TOOLS:
        assert all(tools > 0 for _, _, tools in mine), (seen, detail)
