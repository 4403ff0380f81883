"""``vramgate serve`` tunes its process: the open-file limit raised to the hard limit (5,000 streams
hold 10,000 sockets in the gateway, loadtest/streams.py), and the garbage collector."""

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


def test_serving_freezes_the_start_up_heap_and_collects_the_young_less_often():
    """``tune_gc``: what start-up made leaves the collected generations, and the first generation's
    threshold is the serving one (Python's default is 700)."""
    code = ("import gc, json\n"
            "from server.cli import GC_GEN0, tune_gc\n"
            "import server.app\n"
            "frozen, old = tune_gc(GC_GEN0)\n"
            "print(json.dumps([frozen, old, gc.get_threshold()[0], GC_GEN0, len(gc.get_objects())]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    frozen, old, now, want, left = json.loads(out.stdout)
    assert old == 700 and now == want > old
    assert frozen > 10_000 and left < frozen / 2  # the app's modules are frozen, not collected
