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
        # Down to one origin: a plain route; nothing of ours is left in the next-hop table.
        k.sync_routes({lab.route({2: 1})})
        (plain,) = _ip_json(lab, "route", "show", "proto", "99")
        assert plain["gateway"] == lab.next_hop(2) and "nhid" not in plain
        assert _ip_json(lab, "nexthop", "show") == []


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
        k.sync_routes(set())
        assert _ip_json(lab, "-6", "route", "show", "proto", "99") == [] and _ip_json(lab, "nexthop", "show") == []
