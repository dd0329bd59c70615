"""The FRR lab's scenarios (lab/scenarios.py) on the three-POP topology, as a user runs
them: three transit routers, three POP routers with BFD, three agents with ExaBGP, the
controller, Prometheus, two origins and three clients sending HTTP requests throughout.

The timings of every scenario go to a JSON report: $LAB_REPORT, else
/tmp/anycast-lab-report.json (printed at the end of the module)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import scenarios
from lab.fleet import Fleet
from lab.netns import Lab
from lab.topology import load_topology

pytestmark = pytest.mark.lab
REPORT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fleet(lab_preflight: None) -> Iterator[Fleet]:
    lab = Lab("t-scn-")
    try:
        f = Fleet(lab, load_topology(), controller_edit=scenarios.lab_controller_config, prometheus=True).up()
        f.start_clients(scenarios.VIP)
        yield f
    finally:
        path = Path(os.environ.get("LAB_REPORT", "/tmp/anycast-lab-report.json"))
        path.write_text(json.dumps(REPORT, indent=1))
        print(f"\nlab scenario report: {path}")
        lab.teardown()


@pytest.mark.parametrize("scenario", scenarios.SCENARIOS, ids=[s.__name__ for s in scenarios.SCENARIOS])
def test_scenario(fleet: Fleet, scenario: Callable[[Fleet], dict[str, Any]]) -> None:
    scenarios.run_all(fleet, REPORT, only=[scenario.__name__])
    result = REPORT[scenario.__name__]
    assert result["ok"], result
    print(f"{scenario.__name__}: {json.dumps({k: v for k, v in result.items() if k != 'clients'})}")
