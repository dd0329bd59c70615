"""HA in the three-POP lab (lab/ha.py): three controllers and a three-member etcd cluster,
each in its own lab node, agents listing every controller, clients sending requests
throughout. The scenarios (lab/ha_scenarios.py) kill the leader mid-drain and mid-failback
hold-down, partition it from etcd, and take etcd members away; timings go to the JSON
report ($LAB_HA_REPORT, else /tmp/anycast-lab-ha-report.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.metrics.central import HA_METRICS
from lab import ha_scenarios
from lab.fleet import Fleet
from lab.ha import CONTROLLERS, HaFleet
from lab.metrics import parse
from lab.ops import used_names
from lab.topology import load_topology
from tests.helpers.lab_fleet import lab_fleet

pytestmark = pytest.mark.lab
REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fleet(lab_preflight: None) -> Iterator[Fleet]:
    with lab_fleet("t-ha-", lambda lab: HaFleet(lab, load_topology(), controller_edit=ha_scenarios.ha_controller_config),
                   ha_scenarios.VIP, REPORT, Path(os.environ.get("LAB_HA_REPORT", "/tmp/anycast-lab-ha-report.json"))) as f:
        yield f


@pytest.mark.parametrize("scenario", ha_scenarios.SCENARIOS, ids=[s.__name__ for s in ha_scenarios.SCENARIOS])
def test_ha_scenario(fleet: Fleet, scenario: Callable[[Fleet], dict[str, Any]]) -> None:
    name = scenario.__name__
    try:
        REPORT[name] = {"ok": True, **scenario(fleet)}
    except Exception as exc:
        REPORT[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print("=== controller logs (tail) ===\n" + fleet.controller_log())
        for pop, agent in fleet.agents.items():
            print(f"=== agent {pop} log (tail) ===\n" + "\n".join(agent.log().splitlines()[-15:]))
        raise
    print(f"{name}: {json.dumps({k: v for k, v in REPORT[name].items() if k != 'clients'})}")


def test_the_ha_metrics_ops_uses_are_scraped_from_the_running_controllers(fleet: Fleet) -> None:
    """After the scenarios: the leader and a follower export every HA metric that the alerts
    and the dashboard use (the plain lab checks the others)."""
    assert isinstance(fleet, HaFleet)
    leader = fleet.leader()
    assert leader is not None
    follower = next(n for n in CONTROLLERS if n != leader)
    used = {n for n in used_names() if n in HA_METRICS}
    assert used, "ops/ uses no HA metric"
    for name in (leader, follower):
        scrape = parse(fleet.controller_metrics(name))
        missing = used - set(scrape.names())
        assert not missing, f"{name} does not export {sorted(missing)}"
        assert scrape.value("anycast_controller_leader") == (1.0 if name == leader else 0.0)
        assert scrape.value("anycast_controller_leader_known") == 1.0
