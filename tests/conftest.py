import contextlib
import os
import tempfile
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    # e2e tests last: they are the slow ones, and a quick failure elsewhere should show first.
    items.sort(key=lambda item: "tests/e2e/" in str(item.fspath).replace("\\", "/"))


@pytest.fixture(scope="session", autouse=True)
def no_socket_dirs_left():
    """The fallback socket dirs (``server.localsock``) that gateways a test kills leave behind:
    a restart on the same data dir would reuse one, but every test's data dir is new, so each run
    of the suite would leave more. Empty ones made during the session are removed at its end."""
    pattern = f"vramgate-{os.getuid()}-*"
    before = set(Path(tempfile.gettempdir()).glob(pattern))
    yield
    for path in set(Path(tempfile.gettempdir()).glob(pattern)) - before:
        with contextlib.suppress(OSError):  # not empty (a live gateway's), or gone
            path.rmdir()
