"""The FRR lab's scenarios (lab/scenarios.py) on the three-POP topology, as a user runs
them: three transit routers, three POP routers with BFD, three agents with ExaBGP, the
controller, Prometheus, two origins and three clients sending HTTP requests throughout.
Dual-stack: every session has an IPv6 twin, and the controller an IPv6 VIP (game-global-v6,
a /128 at sjc and fra) that s12 and s13 break, with IPv6 clients, while the IPv4 VIP carries on.

The timings of every scenario go to a JSON report: $LAB_REPORT, else
/tmp/anycast-lab-report.json (printed at the end of the module)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.metrics.central import HA_METRICS
from lab import scenarios
from lab.fleet import Fleet
from lab.metrics import parse
from lab.ops import used_names
from lab.topology import load_topology
from tests.helpers.lab_fleet import lab_fleet

pytestmark = pytest.mark.lab
REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fleet(lab_preflight: None) -> Iterator[Fleet]:
    topo = load_topology()  # dual-stack: s12 and s13 are about its IPv6 VIP
    with lab_fleet("t-scn-", lambda lab: Fleet(lab, topo, controller_edit=scenarios.dual_stack_controller_config(topo),
                                               prometheus=True), scenarios.VIP, REPORT,
                   Path(os.environ.get("LAB_REPORT", "/tmp/anycast-lab-report.json"))) as f:
        yield f


@pytest.mark.parametrize("scenario", scenarios.SCENARIOS, ids=[s.__name__ for s in scenarios.SCENARIOS])
def test_scenario(fleet: Fleet, scenario: Callable[[Fleet], dict[str, Any]]) -> None:
    try:
        scenarios.run_all(fleet, REPORT, only=[scenario.__name__])
    except Exception:
        print("=== controller log (tail) ===\n" + "\n".join(fleet.controller_log().splitlines()[-40:]))
        for pop, agent in fleet.agents.items():
            print(f"=== agent {pop} log (tail) ===\n" + "\n".join(agent.log().splitlines()[-25:]))
        raise
    result = REPORT[scenario.__name__]
    assert result["ok"], result
    print(f"{scenario.__name__}: {json.dumps({k: v for k, v in result.items() if k != 'clients'})}")


def test_every_metric_the_dashboard_and_alerts_use_is_scraped_from_the_running_daemons(fleet: Fleet) -> None:
    """After the scenarios: scrape the real agents and controller, and ask the lab's real
    Prometheus, for every metric name ops/ uses."""
    scraped = set(scenarios.answered_metrics(fleet).names())  # (an unanswered scrape would miss every name)
    for pop in fleet.topo.pops:
        scraped |= parse(fleet.agent_metrics(pop.name)).names()
    used = used_names()
    missing = {n: sorted(w) for n, w in used.items() if n not in scraped and n not in HA_METRICS}
    assert not missing, f"ops/ uses metrics the running daemons do not export: {json.dumps(missing, indent=1)}"
    in_prometheus = {r["metric"]["__name__"] for r in fleet.prometheus_query('{__name__=~"anycast_.+"}')}
    assert {"anycast_vip_announced", "anycast_controller_plan_generation", "anycast_bgp_neighbor_up"} <= in_prometheus
    assert fleet.prometheus_query('anycast_vip_announced{pop="sjc",vip="game-global"} == 1'), \
        "Prometheus does not see sjc announcing game-global (scrape labels as ops/README.md says)"
