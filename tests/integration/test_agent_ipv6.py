"""IPv6 end to end in the lab (issue 14): a /128 VIP announced by the agent over an IPv6 BGP
session to FRR, IPv6 clients served through it, and withdrawn when its origin fails.

lab/single_pop.py with ``ipv6=True``: every link dual-stack, rtr peering with the POP over
IPv4 (100.64.1.1 -- .2) and IPv6 (fd00:64:1::1 -- ::2), the origins holding VIP6 on loopback
and serving HTTP on their IPv6 backend addresses. One agent, one ExaBGP, both families
(configs/agent-sjc.yaml plus the IPv6 session and VIP). Assertions read FRR's JSON, the
kernel's JSON and ``anycastctl agent status --json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.checks import json_cmp
from lab.metrics import parse
from lab.poll import wait_for
from lab.single_pop import AGENT_CONFIG, ORIGIN6, POP6, RTR6, VIP, VIP6, SinglePop, serving

PREFIX4, PREFIX6 = f"{VIP}/32", f"{VIP6}/128"
ANYCASTCTL = Path(sys.executable).parent / "anycastctl"
pytestmark = pytest.mark.lab


def dual_stack_config() -> str:
    doc = yaml.safe_load(AGENT_CONFIG.read_text())
    doc["bgp"]["neighbors"].append({"address": RTR6, "local_address": POP6, "router_id": "100.64.1.2",
                                     "peer_as": 65001, "hold_time": 3})
    v4 = doc["vips"][0]
    doc["vips"].append({
        "name": "game-v6", "address": PREFIX6, "check": dict(v4["check"]),
        "origins": [
            {"region": "us-west", "next_hop": ORIGIN6["usw"],
             "backends": [f"[{ORIGIN6['usw']}]:8080", f"[{ORIGIN6['usw']}]:8081"]},
            {"region": "eu-central", "next_hop": ORIGIN6["euc"], "backends": [f"[{ORIGIN6['euc']}]:8080"]},
        ],
    })
    return yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def pop(lab_preflight: None) -> Iterator[SinglePop]:
    with serving("t-ag6-", dual_stack_config(), ipv6=True) as topo:
        yield topo


def status(pop: SinglePop) -> dict[str, Any] | None:
    sock = pop.workdir("pop") / "state" / "agent.sock"
    r = subprocess.run([str(ANYCASTCTL), "agent", "status", "--socket", str(sock), "--json"],
                       capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else None


def vip_status(pop: SinglePop, name: str) -> dict[str, Any] | None:
    doc = status(pop)
    return next((v for v in doc["vips"] if v["name"] == name), None) if doc else None


def received(pop: SinglePop, afi: str, peer: str) -> int | None:
    peers = pop.router.vtysh_json(f"show bgp {afi} unicast summary json").get("peers", {})
    return peers.get(peer, {}).get("pfxRcd")


def pop_kernel_routes6(pop: SinglePop) -> list[dict[str, Any]]:
    out = pop.nodes["pop"].run(["ip", "-j", "-6", "route", "show", "proto", "99"]).stdout
    return json.loads(out) if out.strip() else []


def test_a_128_vip_over_an_ipv6_session_serves_ipv6_clients_and_is_withdrawn_on_failure(pop: SinglePop) -> None:
    # Announced over the IPv6 session, with the config's "up" attributes.
    path = wait_for(lambda: (pop.router.bgp_route(PREFIX6) or {}).get("paths", [None])[0], 60,
                    desc=f"{PREFIX6} in rtr's BGP table")
    assert json_cmp(path, {"metric": 100, "community": {"list": ["65101:100"]}, "valid": True,
                           "peer": {"peerId": POP6}}) == [], path
    wait_for(lambda: pop.router.fib_has(PREFIX6), 30, desc=f"{PREFIX6} in rtr's kernel FIB")
    # Each family on its own session: the IPv4 session carries the /32 only, the IPv6 one the /128 only.
    wait_for(lambda: received(pop, "ipv4", "100.64.1.2") == 1 and received(pop, "ipv6", POP6) == 1, 30,
             desc="one prefix received on each session")
    assert pop.router.bgp_route(PREFIX4) is not None
    # The agent's view: announced, in sync, toward the active origin's IPv6 next hop; both sessions up.
    v6 = wait_for(lambda: (v := vip_status(pop, "game-v6")) and v["exabgp"]["in_sync"] and v, 30,
                  desc="agent status: game-v6 announced and in sync")
    assert (v6["action"], v6["reason"], v6["origin"], v6["next_hop"]) == ("announce", "healthy", "us-west",
                                                                          ORIGIN6["usw"])
    doc = status(pop)
    assert doc is not None
    assert {s["neighbor"]: s["state"] for s in doc["bgp"]["sessions"]} == {"100.64.1.1": "up", RTR6: "up"}
    assert [(r["dst"], r.get("gateway")) for r in pop_kernel_routes6(pop)] == [(VIP6, ORIGIN6["usw"])]
    # An IPv6 client (rtr, fd00:64:1::1) reaches the VIP: rtr's FIB -> POP -> the POP's kernel route -> us-west.
    served = wait_for(lambda: pop.request_vip(vip=VIP6), 60, desc="HTTP over IPv6 through the VIP")
    assert served.startswith("served-by origin=us-west") and f"peer={RTR6}" in served, served

    # One watch connection per backend endpoint, both families (3 IPv4, 3 IPv6).
    wait_for(lambda: parse(pop.metrics()).value("anycast_watch_connected") == 6, 30, desc="six watches connected")
    before = parse(pop.metrics())
    assert before.value("anycast_watch_endpoints") == 6

    # The origin fails: the /128 is withdrawn with its reason, from BGP, the FIB and the POP's kernel.
    pop.stop_backends("usw")
    try:
        v6 = wait_for(lambda: (v := vip_status(pop, "game-v6")) and v["action"] == "withdraw"
                      and v["exabgp"]["in_sync"] and v, 60, desc="agent status: game-v6 withdrawn")
        assert v6["reason"] == "backend_down" and v6["exabgp"]["holds"] is False
        wait_for(lambda: pop.router.bgp_route(PREFIX6) is None, 30, desc=f"{PREFIX6} gone from rtr's BGP table")
        wait_for(lambda: not pop.router.fib_has(PREFIX6), 30, desc=f"{PREFIX6} gone from rtr's FIB")
        wait_for(lambda: pop_kernel_routes6(pop) == [], 30, desc="the POP's kernel route to VIP6 removed")
        assert pop.request_vip(vip=VIP6, timeout=0.5) is None
        # The watches saw us-west's four endpoints go and ran confirmation probes.
        after = parse(pop.metrics())
        assert after.total("anycast_watch_losses_total") - before.total("anycast_watch_losses_total") >= 4
        assert after.value("anycast_check_confirmations_total") > before.value("anycast_check_confirmations_total")
    finally:
        pop.start_backends("usw")
    # Back: announced again over IPv6.
    wait_for(lambda: pop.router.bgp_route(PREFIX6) is not None, 60, desc=f"{PREFIX6} announced again")
    wait_for(lambda: pop.request_vip(vip=VIP6), 60, desc="HTTP over IPv6 again")
