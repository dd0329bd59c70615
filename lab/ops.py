"""What ops/ (the Prometheus alerting rules and the Grafana dashboard) reads from the
daemons: its files, its PromQL queries and the metric names they select.

Shared by the unit tests (the names against an in-process registry), the lab's test (the
names against the running daemons) and the promtool tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
ALERTS_TEST = OPS / "prometheus" / "alerts_test.yml"
DASHBOARD = OPS / "grafana" / "anycast-fleet.json"
RUNBOOKS = OPS / "runbooks"
# Where every alert's runbook_url points: the Debian package installs ops/runbooks/ there.
RUNBOOK_URL = "file:///opt/anycast/doc/ops/runbooks/{alert}.md"
# Series Prometheus makes itself, per scrape target: no daemon exports them, so the checks
# that every used name is exported leave these out.
PROMETHEUS_BUILTINS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def load_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of alerts.yml, groups flattened."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def all_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # panels inside a (collapsed) row


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(panel id, refId, expr) of every query of every panel."""
    return [(p["id"], t["refId"], t["expr"]) for p in all_panels(dash["panels"]) if p["type"] != "row"
            for t in p.get("targets", [])]


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier that is not part of a number, a $variable or a longer name, and not a call.
_IDENT = re.compile(r"(?<![\w$.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, aggregations, keywords,
    label names and values, durations and Grafana variables left out)."""
    s = _STRINGS.sub(" ", expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGES.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    return {m for m in _IDENT.findall(s) if m.lower() not in _KEYWORDS}


def used_names() -> dict[str, set[str]]:
    """Metric name -> where ops/ uses it (dashboard queries and variables, alert and
    recording rules, the alert tests' input series), Prometheus' own per-target series
    (``PROMETHEUS_BUILTINS``, e.g. ``up``) left out. Raises ValueError naming a query that
    selects no metric (a parse slip here must not make the check vacuous)."""
    used: dict[str, set[str]] = {}

    def add(names: Iterable[str], where: str) -> None:
        for n in set(names) - PROMETHEUS_BUILTINS:
            used.setdefault(n, set()).add(where)

    dash = load_dashboard()
    for pid, ref, expr in dashboard_queries(dash):
        names = metric_names(expr)
        if not names:
            raise ValueError(f"dashboard panel {pid} query {ref} selects no metric: {expr}")
        add(names, f"{DASHBOARD.name} panel {pid}/{ref}")
    for var in dash["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
        if m is None:
            raise ValueError(f"variable {var['name']}: expected label_values(METRIC, LABEL), got {query!r}")
        add(metric_names(m.group(1)), f"{DASHBOARD.name} variable {var['name']}")
    for rule in load_rules():
        name = rule.get("alert") or rule.get("record")
        names = metric_names(rule["expr"])
        if not names:
            raise ValueError(f"rule {name} selects no metric")
        add(names, f"{ALERTS.name} {name}")
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for series in case.get("input_series", []):
            add(metric_names(series["series"]), f"{ALERTS_TEST.name} {case.get('name', '?')!r}")
    return used
