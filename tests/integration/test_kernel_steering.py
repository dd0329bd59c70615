"""Weighted origins in the real kernel: the agent's adapter installs a resilient next-hop
group, clients in a namespace measure the split, and established connections survive a
weight change and an origin leaving (lab/steering.py: the topology and the client)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from itertools import count

import pytest

from controller.kernel.diff import KernelRoute
from controller.kernel.netlink import KernelAdapter
from controller.kernel.nexthop import ResilientSettings, SplitFallback
from lab.poll import wait_for
from lab.steering import SteeringLab, steering_lab, survival

pytestmark = pytest.mark.lab
_n = count()


@pytest.fixture
def lab() -> Iterator[SteeringLab]:
    with steering_lab(f"t-steer-{os.getpid() % 100000}-{next(_n)}", origins=3) as lab:
        yield lab


def _ip_json(lab: SteeringLab, *args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", "-n", lab.pop, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def test_a_split_route_is_a_resilient_group_read_back_as_installed(lab: SteeringLab) -> None:
    with KernelAdapter(netns=lab.pop) as k:
        want = lab.route({1: 3, 2: 1})
        assert k.sync_routes({want}).add == (want,)
        assert k.read_routes() == {want}
        assert not k.sync_routes({want})  # level-based: nothing to do the second time
        groups = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert len(groups) == 1 and groups[0]["type"] == "resilient"
        assert sorted(m.get("weight", 1) for m in groups[0]["group"]) == [1, 3]
        (route,) = _ip_json(lab, "route", "show", "proto", "99")
        assert route["nhid"] == groups[0]["id"]
        # A weight change keeps the group (replaced in place: the point of resilience).
        k.sync_routes({lab.route({1: 1, 2: 1})})
        (after,) = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert after["id"] == groups[0]["id"] and sorted(m.get("weight", 1) for m in after["group"]) == [1, 1]
        # Down to one origin (the other dialed to 0, or failing): the group stays, with that next
        # hop alone, and reads back as the plain route it forwards like (level-based again).
        one = lab.route({2: 1})
        k.sync_routes({one})
        assert k.read_routes() == {one} and not k.sync_routes({one})
        (single,) = _ip_json(lab, "route", "show", "proto", "99")
        assert single["nhid"] == groups[0]["id"] and _gateways(single) == {lab.next_hop(2)}, single
        # (Two members: the next hop and its shadow, same gateway, no bucket: see nexthop.py.)
        nexthops = {n["id"]: n for n in _ip_json(lab, "nexthop", "show")}
        members = nexthops[groups[0]["id"]]["group"]
        assert [(nexthops[m["id"]]["gateway"], m.get("weight", 1)) for m in members] == \
            [(lab.next_hop(2), 255), (lab.next_hop(2), 1)], members
        assert len(nexthops) == 3  # the group and those two: the other's next hop is gone
        assert _buckets(lab) == {lab.next_hop(2): 128}
        # The other's return replaces the members in place again (same group).
        k.sync_routes({lab.route({1: 3, 2: 1})})
        (back,) = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert back["id"] == groups[0]["id"] and sorted(m.get("weight", 1) for m in back["group"]) == [1, 3]
        # A single path somewhere else entirely: still in place; then the route goes, and its group.
        k.sync_routes({lab.route({3: 1})})
        (moved,) = _ip_json(lab, "route", "show", "proto", "99")
        assert moved["nhid"] == groups[0]["id"] and _gateways(moved) == {lab.next_hop(3)}, moved
        k.sync_routes(set())
        assert _ip_json(lab, "route", "show", "proto", "99") == [] and _ip_json(lab, "nexthop", "show") == []


def test_a_single_path_group_is_removed_alone_and_a_plain_route_stays_plain(lab: SteeringLab) -> None:
    """Removing a route through a one-member group (matched without a gateway: the kernel
    matches none against a group route) takes ours only: a foreign route for the same VIP
    at another metric stays. A VIP that was never split keeps a plain route."""
    with KernelAdapter(netns=lab.pop) as k:
        plain = lab.route({1: 1})
        k.sync_routes({plain})
        (route,) = _ip_json(lab, "route", "show", "proto", "99")
        assert "nhid" not in route and route["gateway"] == lab.next_hop(1), route
        k.sync_routes({lab.route({1: 1, 2: 1})})
        k.sync_routes({lab.route({2: 1})})
        subprocess.run(["ip", "-n", lab.pop, "route", "add", f"{lab.vip}/32", "via", lab.next_hop(1),
                        "proto", "static", "metric", "50"], check=True)
        assert k.read_routes() == {lab.route({2: 1})}  # (the foreign one is not ours)
        assert k.sync_routes(set()).remove == (lab.route({2: 1}),)
        assert _ip_json(lab, "route", "show", "proto", "99") == [] and _ip_json(lab, "nexthop", "show") == []
        (foreign,) = _ip_json(lab, "route", "show", f"{lab.vip}/32")
        assert foreign["gateway"] == lab.next_hop(1) and foreign["metric"] == 50, foreign


def test_a_region_back_from_0_keeps_every_connection_opened_while_it_was_out(lab: SteeringLab) -> None:
    """3:1, then o2 dialed to 0 (the group keeps o1 alone), connections opened meanwhile (all
    on o1), then o2 back at 1: the members are replaced in place, so every one of those busy
    connections keeps its bucket and its origin (a new group would hash them afresh and send
    about a quarter to o2, which resets them); o2 gets new connections once idle buckets moved."""
    with KernelAdapter(netns=lab.pop, resilient=ResilientSettings(idle_timer=3.0)) as k:
        k.sync_routes({lab.route({1: 3, 2: 1})})
        k.sync_routes({lab.route({1: 1})})
        during = lab.client_do("open 64 0.5")["origins"]
        assert during == ["o1"] * 64, during
        k.sync_routes({lab.route({1: 3, 2: 1})})
        asked = lab.client_do("ask")
        kept = survival(during, asked["origins"], stable=asked["stable"])
        assert kept["survived"] == kept["connections"] == 64, kept
        wait_for(lambda: _buckets(lab).get(lab.next_hop(2), 0) == 32, 60, interval=0.2,
                 desc="o2 holds its 32 of 128 buckets (idle ones moved)")
        split = lab.client_do("split 400")
        assert split["failed"] == 0 and split["counts"].get("o2", 0) > 0, split
        asked = lab.client_do("ask")
        kept = survival(during, asked["origins"], stable=asked["stable"])
        assert kept["survived"] == kept["connections"] == 64, kept
        k.sync_routes(set())


def _gateways(route: dict) -> set[str]:
    """The gateways a route of ``ip -j route`` forwards to (one, or its group's members)."""
    return {h["gateway"] for h in route["nexthops"]} if "nexthops" in route else {route["gateway"]}


def _buckets(lab: SteeringLab) -> dict[str, int]:
    """Buckets per next hop of the VIP's group ({} while it has none)."""
    (route,) = _ip_json(lab, "route", "show", "proto", "99")
    if "nhid" not in route:
        return {}
    gateway = {n["id"]: n.get("gateway") for n in _ip_json(lab, "nexthop", "show")}
    out: dict[str, int] = {}
    for b in _ip_json(lab, "nexthop", "bucket", "show", "id", str(route["nhid"])):
        gw = gateway[b["bucket"]["nhid"]]
        out[gw] = out.get(gw, 0) + 1
    return out


def test_clients_see_the_split_and_keep_their_connections(lab: SteeringLab) -> None:
    with KernelAdapter(netns=lab.pop) as k:
        k.sync_routes({lab.route({1: 3, 2: 1})})
        split = lab.client_do("split 2000")
        assert split["failed"] == 0
        share = split["counts"].get("o1", 0) / 2000
        assert abs(share - 0.75) < 0.06, split  # 96 of 128 buckets; the L4 hash over 2,000 connections

        before = lab.client_do("open 400")["origins"]
        assert None not in before
        k.sync_routes({lab.route({1: 1, 2: 1})})
        kept = survival(before, lab.client_do("ask")["origins"])
        assert kept["survived"] == kept["connections"], kept  # busy buckets stay where they are

        k.sync_routes({lab.route({1: 1, 2: 1, 3: 1})})
        before = lab.client_do("open 400")["origins"]
        k.sync_routes({lab.route({2: 1, 3: 1})})  # o1 fails: weight 0 here
        after = survival(before, lab.client_do("ask")["origins"], frozenset({"o1"}))
        assert after["broken"] == 0 and after["survived"] + after["on_the_origin_that_left"] == 400, after

        k.sync_routes({lab.route({2: 1})})  # o3 dialed to 0
        drained = lab.client_do("split 1000")
        assert drained == {"counts": {"o2": 1000}, "failed": 0}
        k.sync_routes(set())
        assert _ip_json(lab, "route", "show", "proto", "99") == [] and _ip_json(lab, "nexthop", "show") == []


def test_a_refused_resilient_group_falls_back_to_the_first_next_hop_and_says_why(lab: SteeringLab) -> None:
    """The kernel refuses the group (here: 0 buckets, EINVAL, as a kernel before 5.13 refuses
    the resilient attributes): the route goes single-path to the first next hop, the adapter
    keeps the reason (the agent's anycast_kernel_split_fallback), and later split routes
    are single-path at once, without asking the kernel again."""
    with KernelAdapter(netns=lab.pop, resilient=ResilientSettings(buckets=0)) as k:
        assert k.resilient_ok and k.split_fallback is None
        k.sync_routes({lab.route({1: 3, 2: 1})})
        assert k.split_fallback is SplitFallback.INVALID and not k.resilient_ok
        (route,) = _ip_json(lab, "route", "show", "proto", "99")
        assert route["gateway"] == lab.next_hop(1) and "nhid" not in route, route
        assert [n for n in _ip_json(lab, "nexthop", "show") if "group" in n] == []
        assert k.read_routes() == {KernelRoute(lab.route({1: 3}).prefix, ip_address(lab.next_hop(1)))}
        k.sync_routes({lab.route({2: 1, 3: 1})})
        (route,) = _ip_json(lab, "route", "show", "proto", "99")
        assert route["gateway"] == lab.next_hop(2) and "nhid" not in route, route
        k.sync_routes(set())
        assert _ip_json(lab, "route", "show", "proto", "99") == []


@pytest.fixture
def lab6() -> Iterator[SteeringLab]:
    with steering_lab(f"t-steer-{os.getpid() % 100000}-{next(_n)}", origins=3, ipv6=True) as lab:
        yield lab


def test_an_ipv6_split_route_is_a_resilient_group_and_clients_keep_their_connections(lab6: SteeringLab) -> None:
    """The same over IPv6: a weighted /128 through a resilient group of IPv6 next hops, read
    back as installed; clients over IPv6 see the 3:1 split; established connections survive
    a weight change (every one) and an origin leaving (every one not on it)."""
    lab = lab6
    with KernelAdapter(netns=lab.pop) as k:
        want = lab.route({1: 3, 2: 1})
        assert want.prefix.version == 6 and k.sync_routes({want}).add == (want,)
        assert k.read_routes() == {want} and not k.sync_routes({want})
        (group,) = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert group["type"] == "resilient" and group["resilient_args"]["buckets"] == 128, group
        assert sorted(m.get("weight", 1) for m in group["group"]) == [1, 3]
        singles = {n["id"]: n["gateway"] for n in _ip_json(lab, "nexthop", "show") if "gateway" in n}
        assert sorted(singles[m["id"]] for m in group["group"]) == [lab.next_hop(1), lab.next_hop(2)]
        (route,) = _ip_json(lab, "-6", "route", "show", "proto", "99")
        assert route["dst"] == lab.vip and route["nhid"] == group["id"], route

        split = lab.client_do("split 1000")
        assert split["failed"] == 0 and abs(split["counts"].get("o1", 0) / 1000 - 0.75) < 0.07, split

        before = lab.client_do("open 200 0.5")["origins"]
        assert None not in before
        k.sync_routes({lab.route({1: 1, 2: 1})})
        (after,) = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert after["id"] == group["id"]  # replaced in place
        asked = lab.client_do("ask")
        kept = survival(before, asked["origins"], stable=asked["stable"])
        assert kept["survived"] == kept["connections"] == 200, kept

        k.sync_routes({lab.route({1: 1, 2: 1, 3: 1})})
        before = lab.client_do("open 200 0.5")["origins"]
        assert None not in before
        k.sync_routes({lab.route({2: 1, 3: 1})})  # o1 fails
        asked = lab.client_do("ask")
        left = survival(before, asked["origins"], frozenset({"o1"}), asked["stable"])
        assert left["broken"] == 0 and left["survived"] == 200 - before.count("o1"), left
        # Down to o2 alone and back: the same group throughout (an IPv6 shadow next hop too).
        k.sync_routes({lab.route({2: 1})})
        assert k.read_routes() == {lab.route({2: 1})}
        (single,) = _ip_json(lab, "-6", "route", "show", "proto", "99")
        assert single["nhid"] == group["id"] and _gateways(single) == {lab.next_hop(2)}, single
        during = lab.client_do("open 64 0.5")["origins"]
        assert during == ["o2"] * 64, during
        k.sync_routes({lab.route({2: 1, 3: 1})})
        (back,) = [n for n in _ip_json(lab, "nexthop", "show") if "group" in n]
        assert back["id"] == group["id"], back
        asked = lab.client_do("ask")
        kept = survival(during, asked["origins"], stable=asked["stable"])
        assert kept["survived"] == kept["connections"] == 64, kept
        k.sync_routes(set())
        assert _ip_json(lab, "-6", "route", "show", "proto", "99") == [] and _ip_json(lab, "nexthop", "show") == []
