"""The Grafana dashboard that ships in deploy/, read for tests: its PromQL expressions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "shoal.json"
METRIC = re.compile(r"\bshoal_[a-z0-9_]+\b")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
