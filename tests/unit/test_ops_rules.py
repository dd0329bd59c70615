"""ops/: the Prometheus alerting rules and the Grafana dashboard stay in step with the code
(pure checks; the promtool ones are tests/integration/test_ops_promtool.py).

- every alert has ``for:``, a severity, a summary and a description, a ``runbook_url``
  naming its runbook in ops/runbooks/ (which says what it means, what to check, what to
  do), and unit tests that see it fire and not fire;
- every dashboard panel has the ``${DS_PROMETHEUS}`` datasource and at least one query;
- every metric name used anywhere (dashboard queries and variables, alert expressions,
  the alert tests' input series; lab.ops reads them) is one the code exports: the names
  are scraped from a real ``AgentMetrics`` and ``ControllerMetrics`` registry built
  in-process and parsed by lab.metrics, so renaming or removing a metric fails here
  until ops/ follows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.helpers.agent_fakes import AckingAnnouncer, IdleScheduler
from controller.agent.daemon import Agent
from controller.bgp.exabgp_api import NeighborState
from controller.config.agent import load_agent_config
from controller.config.desired import load_desired
from controller.health.probes import ProbeResult
from controller.metrics.agent import AgentMetrics
from controller.metrics.central import ControllerMetrics, HaSnapshot, register_ha_metrics
from controller.server.core import Controller
from lab.metrics import parse
from lab.ops import (ALERTS_TEST, PROMETHEUS_BUILTINS, ROOT, RUNBOOK_URL, RUNBOOKS, all_panels, load_dashboard,
                     load_rules, metric_names, used_names)

AGENT_CONFIG = ROOT / "configs" / "agent-sjc.yaml"
CONTROLLER_CONFIG = ROOT / "configs" / "controller"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEVERITIES = ("critical", "warning", "info")


# --- the alerting rules' shape ----------------------------------------------------------------
def test_every_alert_has_for_severity_and_annotations() -> None:
    alerts = [r for r in load_rules() if "alert" in r]
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: needs a `for:` duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity must be one of {SEVERITIES}"
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), f"{name}: needs a summary and a description"
        # Name what is affected: a VIP, a POP, a neighbour or (controller-wide) the instance;
        # an absent() alert has no series, so no labels, to name.
        text = notes["summary"] + notes["description"]
        if rule["expr"].lstrip().startswith("absent("):
            continue
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


def test_every_alert_links_its_runbook_and_every_runbook_has_an_alert() -> None:
    alerts = sorted(r["alert"] for r in load_rules() if "alert" in r)
    for name in alerts:
        rule = next(r for r in load_rules() if r.get("alert") == name)
        url = rule["annotations"].get("runbook_url")
        assert url == RUNBOOK_URL.format(alert=name), f"{name}: runbook_url must be {RUNBOOK_URL.format(alert=name)}"
        page = RUNBOOKS / f"{name}.md"
        assert page.is_file(), f"{name}: its runbook_url names {page.relative_to(ROOT)}, which does not exist"
        text = page.read_text()
        assert text.startswith(f"# {name}\n"), f"{page.name}: the first line must be '# {name}'"
        for section in ("## What it means", "## What to check", "## What to do"):
            assert f"\n{section}\n" in text, f"{page.name}: no '{section}' section"
    pages = sorted(p.stem for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
    assert pages == alerts, f"runbooks without an alert: {sorted(set(pages) - set(alerts))}"


def test_the_control_plane_has_alerts() -> None:
    """A dead or unscraped controller, agents cut off from it, failing changes: issue 16."""
    exprs = {r["alert"]: r["expr"] for r in load_rules() if "alert" in r}
    uses = {name: metric_names(e) | ({"absent"} if "absent(" in e else set()) for name, e in exprs.items()}
    assert any("up" in u and "anycast-controller" in exprs[n] for n, u in uses.items())
    assert any("absent" in u for u in uses.values())
    for metric in ("anycast_controller_reachable", "anycast_reconcile_total", "anycast_kernel_sync_errors_total",
                   "anycast_exabgp_command_errors_total", "anycast_controller_reconcile_total"):
        assert any(metric in u for u in uses.values()), f"no alert uses {metric}"
    assert "up" in PROMETHEUS_BUILTINS


# --- the dashboard's shape ----------------------------------------------------------------------
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
    return set(parse(generate_latest(registry).decode()).names())


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


def agent_metric_names(tmp_path: Path) -> set[str]:
    config = dataclasses.replace(load_agent_config(str(AGENT_CONFIG)), state_dir=str(tmp_path / "agent"))
    registry = CollectorRegistry()
    agent = Agent(config, lambda: config, AckingAnnouncer(), kernel=_Kernel(),
                  metrics=lambda snapshot: AgentMetrics(registry, snapshot), clock=lambda: 1000.0,
                  scheduler_factory=IdleScheduler)
    scheduler = agent.scheduler
    assert isinstance(scheduler, IdleScheduler)
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
    # HA on etcd: leadership and etcd health, exported by every HA controller.
    register_ha_metrics(registry, _HaView(), lambda: None)
    return exported_names(registry)


class _HaView:
    def ha_snapshot(self) -> HaSnapshot:
        return HaSnapshot(True, True, 1, 3, {"http://127.0.0.1:2379": True}, {})


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


def test_both_daemons_export_process_metrics(tmp_path: Path) -> None:
    for names in (agent_metric_names(tmp_path / "a"), controller_metric_names(tmp_path / "c")):
        assert {"process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                "process_cpu_seconds_total", "python_info"} <= names, sorted(names)


def test_a_missing_metric_is_caught(known_names: set[str]) -> None:
    """The check above fails for a query on a metric the code does not export."""
    assert metric_names('sum by (vip) (rate(anycast_vip_withdrawals_total{pop=~"$pop"}[5m]))') == {
        "anycast_vip_withdrawals_total"}
    assert "anycast_vip_withdrawals_total" not in known_names
    assert "anycast_check_duration_seconds" not in known_names  # a histogram is queried by its series
