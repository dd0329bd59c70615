"""ops/ checked by Prometheus' own promtool (a subprocess, so here and not in tests/unit):
the alerting rules load, their unit tests (ops/prometheus/alerts_test.yml) pass, and every
dashboard query parses as PromQL. promtool missing is a failure, never a skip
(``apt-get install prometheus``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lab.ops import ALERTS, ALERTS_TEST, ROOT, dashboard_queries, load_dashboard


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
