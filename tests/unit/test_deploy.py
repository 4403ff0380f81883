"""deploy/: Prometheus config and alert rules pass promtool; every dashboard query uses metrics
that vramgate (or the engines it re-exports) has."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVER = Path(__file__).resolve().parents[2] / "server"


def test_promtool_accepts_config_and_rules():
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        res = subprocess.run(["promtool", *args], cwd=DEPLOY, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "vramgate.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]  # rows have none


def test_every_dashboard_metric_is_exported():
    source = "".join(p.read_text() for p in SERVER.glob("*.py"))
    for expr in dashboard_exprs():
        for name in re.findall(r"\b(vramgate_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|total|count|sum)$", "", name).removeprefix("vramgate_")
            assert f'"{base}"' in source, f"{name} in {expr!r} is not defined in server/"
