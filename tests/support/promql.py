"""The metric names a PromQL expression reads, and the expressions detfleet ships: the dashboard's panels and
the alert rules. Shared by the unit test of the dashboard and the live-Prometheus test, which checks every
name has a series.

A light reading of PromQL, enough for the expressions detfleet writes: string literals, label matchers,
grouping clauses and range selectors are removed first, then every identifier left that is not a function
call, a keyword or a number is a metric name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD_JSON = DEPLOY / "grafana" / "dashboards" / "detfleet.json"
RULES = DEPLOY / "prometheus" / "rules.yml"

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, e.g. ``{"detfleet_ready"}`` for ``min(detfleet_ready) == 0``."""
    bare = _STRING.sub('""', expr)
    bare = _MATCHERS.sub("", bare)
    bare = _GROUPING.sub("", bare)
    bare = _RANGE.sub("", bare)
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


def dashboard_expressions() -> list[str]:
    """Every query of the committed dashboard, in panel order."""
    board: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def rule_expressions() -> list[str]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def shipped_metric_names() -> set[str]:
    """Every metric the dashboard and the alert rules read."""
    return {name for expr in dashboard_expressions() + rule_expressions() for name in metric_names(expr)}
