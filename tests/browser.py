"""Test helper: a real Chromium (Debian's ``chromium``) driven by Playwright's Python package
through ``executable_path``; Playwright's own browser download is never used."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Iterator

# A machine with no network: no background connections, no sandbox as root (the flags of the
# environment's own browser check).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium binary: ``$VRAMGATE_CHROMIUM``, else ``chromium`` on the PATH. Fails the
    test (never skips it) when there is none: ``scripts/test.sh`` installs it."""
    path = os.environ.get("VRAMGATE_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    assert path, "chromium not found: scripts/test.sh installs it (apt-get install chromium)"
    return path


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A page open at ``url``; ``page.errors`` collects console errors and uncaught exceptions."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": width, "height": height}).new_page()
            page.on("console", lambda m: errors.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.errors = errors
            page.goto(url)
            yield page
        finally:
            browser.close()
