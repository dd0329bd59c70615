"""Two agents on one host cannot fight over ``kernel.route_protocol``: the second ``anycast-agent
launch`` with the same mark in the same network namespace is refused at start (exit 2),
while the first keeps running and announcing. Real ExaBGP + FRR (lab/single_pop.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from lab.nodes import lab_env
from lab.poll import wait_for
from lab.single_pop import VIP, SinglePop, serving

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    with serving("t-two-") as topo:
        yield topo


def test_a_second_agent_with_the_same_route_protocol_is_refused(pop: SinglePop) -> None:
    wait_for(lambda: pop.router.bgp_route(f"{VIP}/32") is not None, 60, desc="first agent announcing")
    exe = os.path.join(os.path.dirname(sys.executable), "anycast-agent")
    second = pop.nodes["pop"].run(
        [exe, "launch", "--config", str(pop.agent_config), "--state-dir", str(pop.workdir("pop") / "state2"),
         "--metrics-listen", "off"], check=False, timeout=60, env=lab_env())
    assert second.returncode == 2
    assert "kernel.route_protocol 99 is already used by another anycast agent" in second.stderr
    assert pop.agent_proc is not None and pop.agent_proc.poll() is None  # the first runs on
    assert pop.router.bgp_route(f"{VIP}/32") is not None
