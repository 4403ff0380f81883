"""The soak benchmark's 3-minute version (``loadtest/soak.py``; the one-hour figure is in
loadtest/README.md): a steady mixed load through the real gateway on the instant engine, with
5 % of the streams hung up mid-answer. No request fails, the gateway's RSS grows by at most 5 %
after the warm-up, and the in-flight and queued gauges return to 0."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.gateway import ROOT


def test_three_minutes_of_mixed_load_leave_nothing_behind(tmp_path):
    out = tmp_path / "soak"
    subprocess.run([sys.executable, "-m", "loadtest.soak", "--seconds", "180", "--concurrency", "8",
                    "--warmup", "30", "--sample", "5", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    row = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert row["errors"] == {}, row
    assert row["requests"] > 1000 and row["hung_up"] > 0, row
    assert row["rss_growth_pct"] <= 5.0, row
    assert row["in_flight_after"] == 0 and row["queued_after"] == 0, row
