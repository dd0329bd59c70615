"""Clean stops with real parts: ExaBGP running the agent (``anycast-agent launch``), FRR as the
POP router, in namespaces (lab/single_pop.py).

However the service stops, the agent's kernel routes (``proto 99``) and its loopback VIPs
(``loopback: true``) are gone afterwards: a systemd stop (SIGTERM to ExaBGP and the agent at
once, repeated, since the race it had was timing-dependent), SIGTERM to one then the other
in each order, and ExaBGP SIGKILLed (the agent sees EOF). Before, the agent skipped its
cleanup when it saw ExaBGP's shutdown notification first, or was killed by ExaBGP 2 s into
waiting for acks that never came. Assertions read ``ip -j`` (JSON) and FRR's JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.netns import Lab
from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, VIP, SinglePop

PREFIX = f"{VIP}/32"
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    lab = Lab("t-stop-")
    try:
        topo = SinglePop(lab)
        topo.up()
        config = topo.workdir("pop") / "agent.yaml"
        shutil.copy(AGENT_CONFIG, config)
        data = yaml.safe_load(AGENT_CONFIG.read_text())
        data["vips"][0]["loopback"] = True  # the VIP on the POP's lo too: it must go as well
        config.write_text(yaml.safe_dump(data))
        topo.agent_config = config
        for node in ("usw", "euc"):
            topo.start_backends(node)
        yield topo
    finally:
        lab.teardown()


def kernel_routes(pop: SinglePop) -> list[str]:
    out = pop.nodes["pop"].run(["ip", "-j", "route", "show", "proto", "99"]).stdout
    return [r["dst"] for r in json.loads(out or "[]")]


def loopback_vips(pop: SinglePop) -> list[str]:
    out = pop.nodes["pop"].run(["ip", "-j", "addr", "show", "dev", "lo"]).stdout
    return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])
            if a.get("local") == VIP]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return False
    return "zombie" not in state


def start_and_announce(pop: SinglePop) -> tuple[int, int]:
    """Start the service; wait until the VIP is in FRR's table and the POP's kernel holds
    the agent's route and loopback address. Returns (ExaBGP PID, agent PID)."""
    if pop.agent_proc is not None and pop.agent_proc.poll() is None:
        pop.stop_exabgp(signal.SIGTERM, timeout=60)
    pop.start_agent()
    wait_for(lambda: pop.router.bgp_route(PREFIX) is not None, 60, desc=f"{PREFIX} in FRR's BGP table")
    wait_for(lambda: kernel_routes(pop) == [VIP] and loopback_vips(pop) == [VIP], 60,
             desc="the agent's kernel route and loopback VIP")
    agent = wait_for(pop.agent_pid, 60, desc="agent running under ExaBGP")
    assert pop.agent_proc is not None
    return pop.agent_proc.pid, agent


def wait_stopped(pop: SinglePop, agent: int) -> None:
    assert pop.agent_proc is not None
    deadline = time.monotonic() + 60  # a hang guard only: slower under load is fine
    while pop.agent_proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pop.agent_proc.poll() is not None, "ExaBGP did not exit"
    wait_for(lambda: not alive(agent), 60, desc="agent exited")


def assert_clean(pop: SinglePop) -> None:
    assert kernel_routes(pop) == []
    assert loopback_vips(pop) == []
    wait_for(lambda: pop.router.bgp_route(PREFIX) is None, 60, desc=f"{PREFIX} gone from FRR")


@pytest.mark.parametrize("attempt", range(3))
def test_systemd_stop_sigterm_to_both_at_once_leaves_nothing(pop: SinglePop, attempt: int) -> None:
    exabgp, agent = start_and_announce(pop)
    for pid in (exabgp, agent):  # what systemd's KillMode=control-group does
        os.kill(pid, signal.SIGTERM)
    wait_stopped(pop, agent)
    assert_clean(pop)


@pytest.mark.parametrize("first", ["agent", "exabgp"])
def test_sigterm_one_then_the_other_leaves_nothing(pop: SinglePop, first: str) -> None:
    exabgp, agent = start_and_announce(pop)
    order = (agent, exabgp) if first == "agent" else (exabgp, agent)
    os.kill(order[0], signal.SIGTERM)
    time.sleep(0.3)  # the order matters, not the gap: any gap shows it
    try:
        os.kill(order[1], signal.SIGTERM)
    except ProcessLookupError:
        pass  # ExaBGP already stopped its helper
    wait_stopped(pop, agent)
    assert_clean(pop)
    # A respawned agent (ExaBGP respawns one that exits first) must not have left anything either.
    assert pop.agent_pid() is None


def test_exabgp_sigkill_the_agent_sees_eof_and_cleans_up(pop: SinglePop) -> None:
    _, agent = start_and_announce(pop)
    pop.stop_exabgp(signal.SIGKILL, timeout=60)
    wait_for(lambda: not alive(agent), 60, desc="agent exited on EOF")
    assert_clean(pop)


def test_shutdown_keep_leaves_routes_and_addresses(pop: SinglePop) -> None:
    data = yaml.safe_load(pop.agent_config.read_text())
    data["shutdown"] = "keep"
    pop.agent_config.write_text(yaml.safe_dump(data))
    try:
        exabgp, agent = start_and_announce(pop)
        for pid in (exabgp, agent):
            os.kill(pid, signal.SIGTERM)
        wait_stopped(pop, agent)
        assert kernel_routes(pop) == [VIP] and loopback_vips(pop) == [VIP]
    finally:
        data["shutdown"] = "withdraw"
        pop.agent_config.write_text(yaml.safe_dump(data))
    # The next agent takes the kept state over; its stop removes it.
    exabgp, agent = start_and_announce(pop)
    for pid in (exabgp, agent):
        os.kill(pid, signal.SIGTERM)
    wait_stopped(pop, agent)
    assert_clean(pop)
