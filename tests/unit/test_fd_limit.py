"""``vramgate serve`` raises its open-file limit to the hard limit: 5,000 streams hold 10,000
sockets in the gateway (loadtest/streams.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from tests.gateway import ROOT


def test_the_soft_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    code = ("import json, resource\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard}))\n"
            "from server.cli import raise_open_files_limit\n"
            "before, after = raise_open_files_limit()\n"
            "print(json.dumps([before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    before, after, now = json.loads(out.stdout)
    expected = hard if hard != resource.RLIM_INFINITY else max(low, 1 << 20)
    assert (before, after, now) == (low, expected, expected)
