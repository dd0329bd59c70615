"""ops/: the Prometheus alerting rules and the Grafana dashboard stay valid and in step with the code.

- ``promtool check rules`` and ``promtool test rules`` pass (promtool missing is a failure,
  never a skip: ``apt-get install prometheus``);
- every alert has ``for:``, a severity, a summary and a description, and unit tests that
  see it fire and not fire;
- every dashboard panel has the ``${DS_PROMETHEUS}`` datasource and at least one query,
  and every query parses as PromQL;
- every metric name used anywhere (dashboard queries and variables, alert expressions,
  the alert tests' input series) is one the code exports: the names are scraped from a
  real ``AgentMetrics`` and ``ControllerMetrics`` registry built in-process, so renaming
  or removing a metric fails here until ops/ follows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from controller.agent.daemon import Agent
from controller.bgp.exabgp_api import NeighborState
from controller.config.agent import load_agent_config
from controller.config.desired import load_desired
from controller.health.probes import ProbeResult
from controller.metrics.agent import AgentMetrics
from controller.metrics.central import ControllerMetrics
from controller.server.core import Controller

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
ALERTS_TEST = OPS / "prometheus" / "alerts_test.yml"
DASHBOARD = OPS / "grafana" / "anycast-fleet.json"
AGENT_CONFIG = ROOT / "configs" / "agent-sjc.yaml"
CONTROLLER_CONFIG = ROOT / "configs" / "controller"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEVERITIES = ("critical", "warning", "info")


# --- promtool -----------------------------------------------------------------------------
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed, so the alerting rules cannot be checked: "
                    "apt-get install prometheus (Debian's package provides /usr/bin/promtool)")
    return path


def run_promtool(*args: str) -> str:
    proc = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed (exit {proc.returncode}):\n{out}"
    return out


def test_alert_rules_pass_promtool_check() -> None:
    out = run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert "SUCCESS" in out, out


def test_alert_rules_unit_tests_pass() -> None:
    out = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert "SUCCESS" in out, out


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each dashboard query, its Grafana variables replaced, is a valid PromQL expression
    (checked by promtool as a recording rule)."""
    rules = [{"record": f"dashboard_panel_{pid}_{ref}", "expr": _ungrafana(expr)}
             for pid, ref, expr in dashboard_queries(load_dashboard())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    out = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out, out


def _ungrafana(expr: str) -> str:
    expr = re.sub(r"\$__\w+|\$\{__\w+\}", "5m", expr)  # $__rate_interval, $__interval, ...
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # $pop, ${vip}: always inside a regex matcher


# --- the alerting rules' shape ----------------------------------------------------------------
def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_has_for_severity_and_annotations() -> None:
    alerts = [r for r in load_rules() if "alert" in r]
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: needs a `for:` duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity must be one of {SEVERITIES}"
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), f"{name}: needs a summary and a description"
        # Name what is affected: a VIP, a POP, a neighbour or (controller-wide) the instance.
        text = notes["summary"] + notes["description"]
        assert re.search(r"\$labels\.(vip|pop|neighbor|instance)", text), f"{name}: annotations name no VIP/POP"


def test_every_alert_has_a_firing_and_a_non_firing_test() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert alerts - fires == set(), f"alerts never seen firing in {ALERTS_TEST.name}: {sorted(alerts - fires)}"
    assert alerts - silent == set(), f"alerts never checked silent in {ALERTS_TEST.name}: {sorted(alerts - silent)}"


# --- the dashboard's shape ----------------------------------------------------------------------
def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def all_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # panels inside a (collapsed) row


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(p["id"], t["refId"], t["expr"]) for p in all_panels(dash["panels"]) if p["type"] != "row"
            for t in p.get("targets", [])]


def test_dashboard_is_importable_with_a_prometheus_input() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    assert dash.get("id") is None  # an export for sharing: Grafana assigns its own id
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    for var in dash["templating"]["list"]:
        assert var["datasource"] == DATASOURCE, f"variable {var['name']}: datasource"
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_datasource_and_a_query() -> None:
    panels = [p for p in all_panels(load_dashboard()["panels"]) if p["type"] != "row"]
    assert len(panels) >= 20
    for p in panels:
        where = f"panel {p['id']} ({p['title']!r})"
        assert p.get("datasource") == DATASOURCE, f"{where}: datasource must be {DATASOURCE}"
        targets = p.get("targets", [])
        assert targets, f"{where}: no query"
        for t in targets:
            assert t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr"
            assert t.get("datasource") == DATASOURCE, f"{where}: target {t.get('refId')}: datasource"
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), f"{where}: gridPos"


# --- metric names -----------------------------------------------------------------------------------
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


def test_metric_name_extraction() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, pop) (rate(anycast_check_duration_seconds_bucket'
                        '{pop=~"$pop", vip=~"$vip"}[$__rate_interval])))') == {"anycast_check_duration_seconds_bucket"}
    assert metric_names('sum by (vip) (x_total) < 1 and on (vip) count by (vip) (y{reason!~"a|b"} == 1) '
                        "or vector(0)") == {"x_total", "y"}
    assert metric_names("a * on (instance) group_left (pop) b offset 5m > bool 1e3") == {"a", "b"}
    assert metric_names("sum(rate(gone_total[5m])) by (pop)") == {"gone_total"}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape of ``registry`` can return (histogram and counter
    suffixes included, for families that have no samples yet too)."""
    return names_in_exposition(generate_latest(registry).decode())


def names_in_exposition(text: str) -> set[str]:
    """The same, from a scrape's text (the lab's test scrapes the running daemons)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names |= {name, name + "_sum", name + "_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            m = re.match(r"[A-Za-z_:][\w:]*", line)
            assert m, line
            names.add(m.group())
    return names


class _Announcer:
    async def send(self, line: str) -> bool:
        return True


class _Kernel:
    def read_routes(self) -> set[Any]:
        return set()

    def sync_routes(self, desired: Iterable[Any]) -> None:
        pass

    def read_addresses(self) -> set[Any]:
        return set()

    def sync_addresses(self, desired: Iterable[Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Scheduler:
    """Runs no checks: the test hands results to the agent as the real scheduler would."""

    def __init__(self, on_result: Callable[[Hashable, ProbeResult, float], None]) -> None:
        self.on_result = on_result

    def set_targets(self, targets: Iterable[Any]) -> None:
        pass

    async def run(self) -> None:
        await asyncio.Event().wait()

    def stop(self) -> None:
        pass


def agent_metric_names(tmp_path: Path) -> set[str]:
    config = dataclasses.replace(load_agent_config(str(AGENT_CONFIG)), state_dir=str(tmp_path / "agent"))
    registry = CollectorRegistry()
    agent = Agent(config, lambda: config, _Announcer(), kernel=_Kernel(),
                  metrics=lambda snapshot: AgentMetrics(registry, snapshot), clock=lambda: 1000.0,
                  scheduler_factory=_Scheduler)
    scheduler = agent.scheduler
    assert isinstance(scheduler, _Scheduler)
    # Enough to populate every family: checks (counter, histogram, transitions), a decision
    # and its announcement, a BGP session, the controller link's state.
    for _ in range(3):
        for key in list(agent.health):
            scheduler.on_result(key, ProbeResult(True, 0.002, "HTTP 200"), 1000.0)
    assert asyncio.run(agent.reconcile_once())
    agent.on_event(NeighborState("100.64.1.1", "100.64.1.2", "up"))
    agent._controller_state(True)  # what follow_plans reports; only then is anycast_controller_reachable exported
    return exported_names(registry)


def controller_metric_names(tmp_path: Path) -> set[str]:
    desired = dataclasses.replace(load_desired(str(CONTROLLER_CONFIG), "test"), state_dir=str(tmp_path / "ctl"))
    ctl = Controller(desired, clock=lambda: 1000.0)
    registry = CollectorRegistry()
    metrics = ControllerMetrics(registry, lambda: ctl)
    metrics.reconcile_duration.observe(0.001)
    metrics.requests.labels("/v1/status", "200").inc()
    return exported_names(registry)


@pytest.fixture(scope="module")
def known_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    tmp = tmp_path_factory.mktemp("metrics")
    names = agent_metric_names(tmp) | controller_metric_names(tmp)
    # If collecting the names broke, say so here rather than blaming every query.
    for expected in ("anycast_vip_announced", "anycast_agent_info", "anycast_checks_total",
                     "anycast_check_duration_seconds_bucket", "anycast_bgp_neighbor_up",
                     "anycast_controller_reachable", "anycast_controller_alarm",
                     "anycast_controller_report_age_seconds", "anycast_controller_reconcile_total"):
        assert expected in names, f"{expected} missing from the in-process scrape: {sorted(names)}"
    return names


def used_names() -> dict[str, set[str]]:
    """Metric name -> where ops/ uses it."""
    used: dict[str, set[str]] = {}

    def add(names: Iterable[str], where: str) -> None:
        for n in names:
            used.setdefault(n, set()).add(where)

    dash = load_dashboard()
    for pid, ref, expr in dashboard_queries(dash):
        names = metric_names(expr)
        assert names, f"dashboard panel {pid} query {ref} selects no metric: {expr}"
        add(names, f"{DASHBOARD.name} panel {pid}/{ref}")
    for var in dash["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
        assert m, f"variable {var['name']}: expected label_values(METRIC, LABEL), got {query!r}"
        add(metric_names(m.group(1)), f"{DASHBOARD.name} variable {var['name']}")
    for rule in load_rules():
        name = rule.get("alert") or rule.get("record")
        names = metric_names(rule["expr"])
        assert names, f"rule {name} selects no metric"
        add(names, f"{ALERTS.name} {name}")
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for series in case.get("input_series", []):
            add(metric_names(series["series"]), f"{ALERTS_TEST.name} {case.get('name', '?')!r}")
    return used


def test_ops_use_only_metrics_the_code_exports(known_names: set[str]) -> None:
    used = used_names()
    unknown = {n: sorted(where) for n, where in used.items() if n not in known_names}
    assert not unknown, (
        "ops/ uses metric names the agent and controller do not export (renamed or removed? "
        "see controller/metrics/): " + json.dumps(unknown, indent=2))
    # And the check is not vacuous: the main families are all used.
    for name in ("anycast_vip_announced", "anycast_announcement_changes_total", "anycast_check_duration_seconds_bucket",
                 "anycast_checks_total", "anycast_bgp_neighbor_up", "anycast_controller_safety_holds",
                 "anycast_controller_alarm", "anycast_controller_report_age_seconds",
                 "anycast_config_last_reload_successful", "anycast_controller_config_last_reload_successful",
                 "anycast_controller_active_origin", "anycast_controller_plan_generation"):
        assert name in used, f"{name} is used nowhere in ops/"


def test_a_missing_metric_is_caught(known_names: set[str]) -> None:
    """The check above fails for a query on a metric the code does not export."""
    assert metric_names('sum by (vip) (rate(anycast_vip_withdrawals_total{pop=~"$pop"}[5m]))') == {
        "anycast_vip_withdrawals_total"}
    assert "anycast_vip_withdrawals_total" not in known_names
    assert "anycast_check_duration_seconds" not in known_names  # a histogram is queried by its series
